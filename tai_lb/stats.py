"""`EndpointStats`: the live figures of one endpoint, read by strategies on every pick.

The in-flight count is a :class:`collections.deque` whose length is the count: ``append`` and
``pop`` are atomic in CPython, so picks and leases change it without a lock and never lose a
count.  Everything else (request counts, latency EWMA, peak EWMA) changes under a small
per-endpoint lock when a lease ends; strategies read those fields without the lock, and a read
racing an update sees either the old or the new figure, which is all an estimate needs.
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from .endpoint import Endpoint
from .histogram import BOUNDS
from .request_metrics import RequestFigures, summary

if TYPE_CHECKING:
    from .failover import EndpointBreaker

__all__ = ["DEFAULT_DECAY", "DEFAULT_LATENCY", "FAILURE_PENALTY_CAP", "EndpointStats"]

DEFAULT_DECAY = 10.0
"""Seconds for the latency averages to forget about 63% of the past (Finagle and Linkerd: 10 s)."""

DEFAULT_LATENCY = 0.030
"""Latency assumed for an endpoint with no measurement yet, in seconds (Linkerd: 30 ms)."""

FAILURE_PENALTY_CAP = 1.0
"""The most a fast failure adds to an endpoint's peak-EWMA cost, in seconds."""

Clock = Callable[[], float]
_exp = math.exp
_bisect = bisect.bisect_left


class EndpointStats:
    """Live figures of one endpoint of one service: in flight, counts and latency averages.

    :param endpoint: the endpoint measured.
    :param clock: monotonic clock in seconds, injectable for tests.
    :param decay: time constant of the latency averages, in seconds.
    :param default_latency: cost of an endpoint with no measurement yet, in seconds.
    :param service_load: a deque shared by the service's endpoints; its length is the
        service's total in flight (used by bounded-load consistent hashing).
    :ivar load: one item per request in flight on this endpoint: ``len(stats.load)`` is
        :attr:`in_flight`, read by strategies on every pick without a property call.  Only
        :meth:`started`, :meth:`finished` and :class:`~tai_lb.Lease` (which inlines
        :meth:`started`) change it.
    :ivar service_load: the ``service_load`` deque, changed along with :attr:`load`.
    :ivar figures: the endpoint's request metrics
        (:class:`~tai_lb.request_metrics.RequestFigures`), or None to record none.
    """

    __slots__ = (
        "__weakref__",  # the StatsD export follows the figures of live endpoints only
        "_default_latency",
        "_ewma",
        "_lock",
        "_peak",
        "_stamp",
        "breaker",
        "clock",
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "decay",
        "endpoint",
        "failures",
        "figures",
        "last_latency",
        "last_success",
        "load",
        "on_drained",
        "on_failure",
        "service_load",
        "successes",
    )

    def __init__(self, endpoint: Endpoint, clock: Clock, *, decay: float = DEFAULT_DECAY,
                 default_latency: float = DEFAULT_LATENCY,
                 service_load: Optional[collections.deque[None]] = None) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.decay = decay
        self._default_latency = default_latency
        self.load: collections.deque[None] = collections.deque()
        self.service_load: collections.deque[None] = (
            service_load if service_load is not None else collections.deque())
        self._lock = threading.Lock()
        self.successes = 0
        self.failures = 0
        self.last_latency: Optional[float] = None
        self.last_success: Optional[float] = None  # clock time of the last successful request
        self._ewma: Optional[float] = None
        self._peak = 0.0
        self._stamp = 0.0
        # Set while the endpoint drains after removal: runs once nothing is in flight.
        self.on_drained: Optional[Callable[[], None]] = None
        # Runs of failures, for outlier detection, and who to tell after a failure.
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.on_failure: Optional[Callable[[EndpointStats], None]] = None
        self.breaker: Optional[EndpointBreaker] = None  # set for services with breakers
        #: request metrics (None: not recorded, as the overhead benchmark's "off" side)
        self.figures: Optional[RequestFigures] = RequestFigures()

    @property
    def in_flight(self) -> int:
        """Requests started on this endpoint and not yet finished."""
        return len(self.load)

    @property
    def requests(self) -> int:
        """Finished requests (successes plus failures)."""
        return self.successes + self.failures

    @property
    def latency_ewma(self) -> Optional[float]:
        """Time-decayed average latency in seconds, or None before the first measurement."""
        return self._ewma

    def peak_cost(self, now: float) -> float:
        """Peak-EWMA latency decayed to ``now``, times (in flight + 1): the peak_ewma load."""
        if self._ewma is None:
            # As Finagle: an idle unmeasured endpoint is free, so it is tried and measured at
            # once; while its first requests are out it costs the default latency.
            if not self.load:
                return 0.0
            base = self._default_latency
        else:
            elapsed = now - self._stamp
            base = self._peak * math.exp(-elapsed / self.decay) if elapsed > 0 else self._peak
        return base * (len(self.load) + 1)

    def started(self) -> None:
        """Count one more request in flight."""
        self.load.append(None)
        self.service_load.append(None)

    def finished(self, latency: float, success: bool, now: float,
                 status: Optional[int] = None, ticket: int = 0,
                 kind: Optional[str] = None) -> None:
        """Count a request as finished and fold its latency into the averages.

        ``status`` is the HTTP status of a failed request that got a response; a failure
        without one is a local-origin failure (refused, reset, timed out, an exception).  A
        failed status below 500 (a retried 429, say) is not the endpoint failing: it ends the
        runs of failures and counts as a success for the circuit breaker.  ``ticket`` is the
        circuit breaker's, from its ``admit()``; ``kind``, a failure's kind for the request
        metrics (:data:`~tai_lb.request_metrics.ERROR_KINDS`), by default told by ``status``.

        For the peak-EWMA cost, a failure counts as at least twice the current peak and at
        least the default latency (at most :data:`FAILURE_PENALTY_CAP`, unless the failure
        itself took longer), so an endpoint that fails fast never looks like the fastest one.
        The reported latency average uses the real latency.
        """
        # This runs once per request: plain comparisons rather than max() calls.
        try:
            self.load.pop()
            self.service_load.pop()
        except IndexError:  # a lease older than a fork: the child's counts started at zero
            pass
        if not 0.0 <= latency < math.inf:  # negative, infinite or NaN: a broken measurement
            latency = 0.0 if latency < 0.0 else FAILURE_PENALTY_CAP
        lock = self._lock
        figures = self.figures
        lock.acquire()  # not `with`: the context manager protocol costs as much as the lock
        try:
            if figures is not None:
                figures.buckets[_bisect(BOUNDS, latency)] += 1
                if not success:
                    figures.errors[kind or ("other" if status is None else
                                            "status_5xx" if status >= 500 else "status_4xx")] += 1
            cost = latency
            if success:
                self.successes += 1
                self.last_success = now
                self.consecutive_5xx = self.consecutive_gateway = self.consecutive_local = 0
            elif status is not None and status < 500:
                self.failures += 1
                self.consecutive_5xx = self.consecutive_gateway = self.consecutive_local = 0
            else:
                self.failures += 1
                self.consecutive_5xx += 1
                if status is None:
                    self.consecutive_local += 1
                    self.consecutive_gateway += 1
                else:
                    self.consecutive_local = 0
                    if status in (502, 503, 504):
                        self.consecutive_gateway += 1
                    else:
                        self.consecutive_gateway = 0
                cost = max(latency, min(max(2.0 * self._peak, self._default_latency),
                                        FAILURE_PENALTY_CAP))
            self.last_latency = latency
            ewma = self._ewma
            if ewma is None:
                self._ewma = latency
                self._peak = cost
            else:
                elapsed = now - self._stamp
                keep = _exp(-elapsed / self.decay) if elapsed > 0.0 else 1.0
                self._ewma = ewma * keep + latency * (1.0 - keep)
                # Finagle's peak EWMA: a slower sample takes over at once, a faster one blends in.
                peak = self._peak
                self._peak = cost if cost > peak else peak * keep + cost * (1.0 - keep)
            self._stamp = now
        finally:
            lock.release()
        endpoint_failed = not success and (status is None or status >= 500)
        if self.breaker is not None:
            self.breaker.record(not endpoint_failed, ticket)
        if endpoint_failed and self.on_failure is not None:
            self.on_failure(self)
        if self.on_drained is not None and not self.load:
            self._drained()

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when nothing is in flight: at the end of the last lease, or now.

        The last lease may end on another thread just before ``callback`` is set, without seeing
        it: checking again after setting it makes sure it runs.
        """
        self.on_drained = callback
        if not self.load:
            self._drained()

    def drained_now(self) -> None:
        """Run the :meth:`when_drained` callback now, whatever is in flight (a drain's timeout
        ended it); nothing when none is waiting."""
        self._drained()

    def _drained(self) -> None:
        with self._lock:  # the last lease and when_drained() may both get here: one runs it
            drained, self.on_drained = self.on_drained, None
        if drained is not None:
            drained()

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock, here and in the breaker (a parent's thread may have
        held one at the fork), and no request in flight; the old ones are kept, never freed in
        the child."""
        from . import _forksafe  # noqa: PLC0415 - imported only where a fork happened

        _forksafe.inherited(self._lock, self.load)
        self._lock = threading.Lock()
        # The parent's requests in flight never end here (their threads are not in the child):
        # the child counts from zero (Membership gives the service's shared count anew).
        self.load = collections.deque()
        if self.figures is not None:
            self.figures.reset_after_fork()
        if self.breaker is not None:
            self.breaker.reset_after_fork()

    def reset_failure_runs(self) -> None:
        """Start the runs of consecutive failures over (after an ejection)."""
        with self._lock:
            self.consecutive_5xx = self.consecutive_gateway = self.consecutive_local = 0

    def snapshot(self) -> dict[str, Any]:
        """The figures as a JSON-serialisable dict (latencies in milliseconds)."""
        with self._lock:
            ewma, last = self._ewma, self.last_latency
            successes, failures = self.successes, self.failures
        return {
            "in_flight": len(self.load),
            "requests": successes + failures,
            "successes": successes,
            "failures": failures,
            "latency_ewma_ms": None if ewma is None else round(ewma * 1000.0, 3),
            "last_latency_ms": None if last is None else round(last * 1000.0, 3),
            **({} if self.figures is None else summary([self.figures.counts()])),
        }

    def __repr__(self) -> str:
        return (f"<EndpointStats {self.endpoint.address} in_flight={len(self.load)} "
                f"ok={self.successes} failed={self.failures}>")
