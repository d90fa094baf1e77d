"""`Lease`: one use of one picked endpoint, from the pick until it is released.

While a lease is open the endpoint counts it as in flight; releasing it records the latency and
whether the use succeeded.  Use it as a context manager: leaving normally is a success, leaving
with an exception is a failure (and the exception propagates).
"""

from __future__ import annotations

from types import TracebackType
from typing import Optional

from .endpoint import Endpoint
from .request_metrics import ERROR_KINDS
from .stats import EndpointStats
from .strategies import RoutingKey

__all__ = ["Lease"]


class Lease:
    """The endpoint picked for one request; release it with ``with``, :meth:`done` or both.

    :ivar service: the service the endpoint belongs to.
    :ivar endpoint: the picked :class:`~tai_lb.Endpoint`.
    :ivar key: the routing key the pick used, or None.
    """

    __slots__ = ("_failed", "_released", "_start", "_stats", "_ticket", "endpoint", "key",
                 "service")

    def __init__(self, service: str, stats: EndpointStats, key: Optional[RoutingKey] = None,
                 ticket: int = 0):
        self.service = service
        self.endpoint: Endpoint = stats.endpoint
        self.key = key
        self._stats = stats
        self._released = False
        self._failed = False
        self._ticket = ticket  # the circuit breaker's (0: none or closed)
        stats.load.append(None)  # EndpointStats.started(), inlined: this is the hot path
        stats.service_load.append(None)
        self._start = stats.clock()

    @property
    def address(self) -> str:
        """The endpoint's ``host:port``."""
        return self.endpoint.address

    @property
    def stats(self) -> EndpointStats:
        """The picked endpoint's live figures."""
        return self._stats

    @property
    def released(self) -> bool:
        """True once the lease has been released."""
        return self._released

    def mark_failure(self) -> None:
        """Make the release count as a failure even if no exception is raised (say, an HTTP 503)."""
        self._failed = True

    def done(self, success: Optional[bool] = None, latency: Optional[float] = None,
             status: Optional[int] = None, kind: Optional[str] = None) -> None:
        """Release the lease; later calls do nothing.

        :param success: whether the use succeeded; by default, True unless :meth:`mark_failure`
            was called.
        :param latency: the latency to record in seconds; by default, the time since the pick.
        :param status: for a failed HTTP request that got a response, its status (outlier
            detection tells 5xx and gateway failures from local-origin ones).
        :param kind: for a failure, its kind in the request metrics (one of
            :data:`~tai_lb.request_metrics.ERROR_KINDS`); by default told by ``status``.
        """
        if kind is not None and kind not in ERROR_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ERROR_KINDS)}, got {kind!r}")
        if self._released:
            return
        self._released = True
        stats = self._stats
        now = stats.clock()
        ok = (not self._failed) if success is None else success
        stats.finished(now - self._start if latency is None else latency, ok, now, status,
                       self._ticket, kind)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        if not self._released:  # done(), inlined: this is the hot path
            self._released = True
            stats = self._stats
            now = stats.clock()
            stats.finished(now - self._start, exc_type is None and not self._failed, now, None,
                           self._ticket)

    def __repr__(self) -> str:
        state = "released" if self._released else "open"
        return f"<Lease {self.service}/{self.endpoint.address} {state}>"
