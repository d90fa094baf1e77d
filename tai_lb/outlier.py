"""Passive outlier detection: eject endpoints that keep failing real traffic (Envoy's semantics).

Consecutive failures of real requests eject an endpoint from its service's picks:

* ``consecutive_5xx``: 5xx responses and local-origin failures (refused, reset, timeout), in a
  row;
* ``consecutive_gateway_failure``: 502, 503 and 504 responses and local-origin failures;
* ``consecutive_local_origin_failure``: local-origin failures alone.

Any response below 500 (4xx included) ends a run.  An ejection lasts ``base_ejection_time`` times
the number of times the endpoint was ejected, at most ``max_ejection_time``; the endpoint then
returns on probation: ejected again within ``max_ejection_time`` of its return, it stays out
longer; clean for that long, its count starts over.  At most ``max_ejection_percent`` of a
service's endpoints are out at once, but one endpoint is always ejectable.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import _forksafe
from ._settings import MAX_SECONDS, Settings, check_int, check_number, doc, shown
from .exceptions import ConfigError
from .stats import EndpointStats

__all__ = ["OutlierConfig", "OutlierDetector"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutlierConfig(Settings):
    """The ``outlier_detection`` settings of a service (Envoy's names and defaults).

    :param consecutive_5xx: 5xx responses and local-origin failures in a row that eject.
    :param consecutive_gateway_failure: 502/503/504 and local-origin failures in a row.
    :param consecutive_local_origin_failure: refused, reset or timed-out attempts in a row.
    :param base_ejection_time: seconds of the first ejection; later ones multiply it.
    :param max_ejection_time: the longest ejection, and the probation after a return.
    :param max_ejection_percent: the most endpoints of a service out at once, in percent
        (one endpoint is always ejectable).
    """

    consecutive_5xx: int = field(default=5, metadata=doc("failures", low=1, high=10_000))
    consecutive_gateway_failure: int = field(default=5, metadata=doc("failures", low=1,
                                                                     high=10_000))
    consecutive_local_origin_failure: int = field(default=5, metadata=doc("failures", low=1,
                                                                          high=10_000))
    base_ejection_time: float = field(default=30.0, metadata=doc(
        "seconds", low=0, high=MAX_SECONDS, low_open=True))
    max_ejection_time: float = field(default=300.0, metadata=doc(
        "seconds", "at least base_ejection_time", low=0, high=MAX_SECONDS, low_open=True))
    max_ejection_percent: float = field(default=10.0, metadata=doc("percent", low=0, high=100))

    def __post_init__(self) -> None:
        for name in ("consecutive_5xx", "consecutive_gateway_failure",
                     "consecutive_local_origin_failure"):
            check_int(getattr(self, name), name, 1, 10_000)
        for name in ("base_ejection_time", "max_ejection_time"):
            check_number(getattr(self, name), name)
        if self.max_ejection_time < self.base_ejection_time:
            raise ConfigError("max_ejection_time", f"must be >= base_ejection_time "
                                                   f"({self.base_ejection_time:g}), got "
                                                   f"{shown(self.max_ejection_time)}")
        check_number(self.max_ejection_percent, "max_ejection_percent", 0.0, 100.0,
                     low_open=False, what="a percentage")


class _Ejection:
    __slots__ = ("ejections", "returned_at", "until")

    def __init__(self) -> None:
        self.ejections = 0
        self.until: Optional[float] = None
        self.returned_at: Optional[float] = None


class OutlierDetector:
    """Decides ejections from reported failures, and returns endpoints when their time is up.

    A named daemon thread (``tai-lb-outlier``) wakes when the next ejection ends; it starts on the
    first ejection and stops on :meth:`stop`.

    :param on_change: called with the service name when an endpoint is ejected or returns.
    :param service_size: ``service -> number of endpoints`` (for the ejection cap).
    """

    def __init__(self, on_change: Callable[[str], None], service_size: Callable[[str], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._on_change = on_change
        self._service_size = service_size
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._states: dict[tuple[str, str], _Ejection] = {}
        self._heap: list[tuple[float, str, str]] = []
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self.ejections_total = 0
        self.ejections_refused = 0
        self.errors = 0
        _forksafe.after_fork_in_child(self, OutlierDetector._reset_after_fork)

    def _reset_after_fork(self) -> None:
        _forksafe.inherited(self._lock, self._wake, self._thread)  # never freed in the child
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        had_thread = self._thread is not None
        self._thread = None
        if had_thread and not self._stopped:
            self._start_thread()

    # -- decisions ------------------------------------------------------------------------------

    def report_failure(self, service: str, stats: EndpointStats, config: OutlierConfig) -> None:
        """Eject the endpoint if a run of failures reached a threshold and the cap allows."""
        reason = None
        if stats.consecutive_local >= config.consecutive_local_origin_failure:
            reason = f"{stats.consecutive_local} local-origin failures in a row"
        elif stats.consecutive_gateway >= config.consecutive_gateway_failure:
            reason = f"{stats.consecutive_gateway} gateway failures in a row"
        elif stats.consecutive_5xx >= config.consecutive_5xx:
            reason = f"{stats.consecutive_5xx} 5xx or local-origin failures in a row"
        if reason is None:
            return
        address = stats.endpoint.address
        now = self._clock()
        with self._lock:
            state = self._states.setdefault((service, address), _Ejection())
            if state.until is not None:
                return  # already out
            ejected = sum(1 for (s, _), st in self._states.items()
                          if s == service and st.until is not None)
            cap = max(1, math.floor(self._service_size(service) * config.max_ejection_percent
                                    / 100.0))
            if ejected >= cap:
                self.ejections_refused += 1
                return
            if (state.returned_at is not None
                    and now - state.returned_at > config.max_ejection_time):
                state.ejections = 0  # clean through its probation: start over
            state.ejections += 1
            duration = min(config.base_ejection_time * state.ejections,
                           config.max_ejection_time)
            state.until = now + duration
            heapq.heappush(self._heap, (state.until, service, address))
            self.ejections_total += 1
            stats.reset_failure_runs()
            self._wake.notify_all()
            start = self._thread is None
        log.warning("tai-lb: %s endpoint %s ejected for %.0f s: %s", service, address, duration,
                    reason)
        if start:
            self._start_thread()
        self._notify(service)

    def is_ejected(self, service: str, address: str) -> bool:
        """True while the endpoint is ejected."""
        state = self._states.get((service, address))
        return state is not None and state.until is not None

    def ejected(self, service: str) -> frozenset[str]:
        """The addresses of ``service`` that are ejected now."""
        with self._lock:  # only endpoints that ever reached a threshold have a state
            return frozenset(a for (s, a), state in self._states.items()
                             if s == service and state.until is not None)

    def forget(self, service: str, address: str) -> None:
        """Drop what is known of an endpoint removed from its service."""
        self.forget_many(service, (address,))

    def forget_many(self, service: str, addresses: Iterable[str]) -> None:
        """Drop what is known of endpoints removed from their service (one lock for all)."""
        with self._lock:
            if self._states:
                for address in addresses:
                    self._states.pop((service, address), None)

    def state(self, service: str, address: str) -> Optional[dict[str, Any]]:
        """JSON-serialisable outlier state of one endpoint, or None if it was never ejected."""
        state = self._states.get((service, address))
        if state is None:
            return None
        left = None if state.until is None else max(0.0, state.until - self._clock())
        return {"ejected": state.until is not None, "times_ejected": state.ejections,
                "seconds_left": None if left is None else round(left, 3)}

    def snapshot(self) -> dict[str, Any]:
        """Counters, JSON-serialisable."""
        return {"ejections": self.ejections_total, "refused_by_cap": self.ejections_refused,
                "ejected_now": sum(1 for s in self._states.values() if s.until is not None),
                "errors": self.errors}

    # -- the return timer -----------------------------------------------------------------------

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopped:
                return
            self._thread = threading.Thread(target=self._run, name="tai-lb-outlier",
                                            daemon=True)
            thread = self._thread
        thread.start()

    def _run(self) -> None:
        while True:
            returned: list[tuple[str, str]] = []
            try:
                with self._lock:
                    if self._stopped:
                        return
                    now = self._clock()
                    while self._heap and self._heap[0][0] <= now:
                        until, service, address = heapq.heappop(self._heap)
                        state = self._states.get((service, address))
                        if state is not None and state.until == until:
                            state.until = None
                            state.returned_at = now
                            returned.append((service, address))
                    if not returned:
                        wait = self._heap[0][0] - now if self._heap else 1.0
                        self._wake.wait(min(max(wait, 0.005), 1.0))
                for service, address in returned:
                    log.info("tai-lb: %s endpoint %s returns from ejection, on probation",
                             service, address)
                    self._notify(service)
            except Exception:
                self.errors += 1
                log.exception("tai-lb: outlier detection timer error")
                time.sleep(0.1)  # a recurring error must not spin the thread

    def _notify(self, service: str) -> None:
        try:
            self._on_change(service)
        except Exception:
            self.errors += 1
            log.exception("tai-lb: outlier change listener failed")

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the timer thread; calling it again does nothing."""
        with self._lock:
            self._stopped = True
            thread, self._thread = self._thread, None
            self._wake.notify_all()
        if thread is not None:
            thread.join(timeout)
