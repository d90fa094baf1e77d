"""Request metrics: per endpoint counts of requests, errors by kind, retries and budget refusals,
and a latency histogram, summed per service for ``status()`` and StatsD.

Every endpoint's :class:`~tai_lb.EndpointStats` holds a :class:`RequestFigures`.  A lease's end
records its latency and, for a failure, its kind under the endpoint's own lock (the one its
averages already take: never a lock the next pick needs); the attempt loop counts retries and
budget refusals against the endpoint whose attempt failed.

The kinds of error (:data:`ERROR_KINDS`):

==============  ==================================================================================
``connect``     no connection: refused, unreachable, name resolution, TLS handshake, pool closed
``timeout``     a connect or read timeout, or the request's deadline
``status_5xx``  a response with a 5xx status counted as a failure
``status_4xx``  another failing status (a retried 429 or 408, say)
``other``       anything else: a reset, a body cut off or undecodable, an exception in a
                ``with lb.pick(...)`` block, ``lease.mark_failure()`` with no status
==============  ==================================================================================
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from typing import Any, Optional

from urllib3.exceptions import MaxRetryError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from .histogram import LatencyHistogram, percentile
from .pool import failed_while_connecting

__all__ = ["ERROR_KINDS", "RequestFigures", "error_kind", "summary"]

ERROR_KINDS = ("connect", "timeout", "status_5xx", "status_4xx", "other")
"""The kinds errors are counted by, in this order."""


def error_kind(error: BaseException) -> str:
    """The kind (of :data:`ERROR_KINDS`) of an exception an attempt raised."""
    reason = error.reason if isinstance(error, MaxRetryError) else None
    for current in (error, reason):
        if isinstance(current, NewConnectionError):  # a ConnectTimeoutError subclass in urllib3
            return "connect"
        if isinstance(current, (Urllib3Timeout, socket.timeout)):
            return "timeout"
    return "connect" if failed_while_connecting(error) else "other"


class RequestFigures:
    """One endpoint's request metrics since the balancer started.

    The latency histogram and the error counts change under the owning
    :class:`~tai_lb.EndpointStats`'s lock (in its ``finished()``); retries and refusals under
    this object's own lock.

    :ivar latency: the :class:`~tai_lb.histogram.LatencyHistogram` of every finished request.
    :ivar buckets: its counts (the same list).
    :ivar errors: failures per kind of :data:`ERROR_KINDS`.
    :ivar retries: failed attempts on this endpoint that were retried.
    :ivar refusals: failed attempts on this endpoint whose retry the retry budget refused.
    """

    __slots__ = ("_lock", "buckets", "errors", "latency", "refusals", "retries")

    def __init__(self) -> None:
        self.latency = LatencyHistogram()
        self.buckets = self.latency.counts  # the same list, one attribute nearer the hot path
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.retries = 0
        self.refusals = 0
        self._lock = threading.Lock()

    def retried(self, refused: bool = False) -> None:
        """Count a retry of a failed attempt here, or its refusal by the retry budget."""
        with self._lock:
            if refused:
                self.refusals += 1
            else:
                self.retries += 1

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's is kept, never freed in the child)."""
        from . import _forksafe  # noqa: PLC0415 - imported only where a fork happened

        _forksafe.inherited(self._lock)
        self._lock = threading.Lock()

    def counts(self) -> dict[str, Any]:
        """Copies of the counts: ``requests``, ``errors`` (per kind), ``retries``,
        ``refusals`` and ``latency`` (the histogram's bucket counts).  The histogram and errors
        are copied without the endpoint's lock: a copy racing a request may miss it."""
        latency = list(self.latency.counts)
        return {"requests": sum(latency), "errors": dict(self.errors), "retries": self.retries,
                "refusals": self.refusals, "latency": latency}


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000.0, 3)


def summary(figures: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The JSON-serialisable summary of one or more :meth:`RequestFigures.counts`, summed:
    requests, errors (total and per kind), retries, refusals and p50/p95/p99 in ms."""
    items = list(figures)
    latency = LatencyHistogram.merged(item["latency"] for item in items).counts
    errors = {kind: sum(item["errors"][kind] for item in items) for kind in ERROR_KINDS}
    return {"requests": sum(latency), "errors": sum(errors.values()), "errors_by_kind": errors,
            "retries": sum(item["retries"] for item in items),
            "refusals": sum(item["refusals"] for item in items),
            "p50_ms": _ms(percentile(latency, 0.50)), "p95_ms": _ms(percentile(latency, 0.95)),
            "p99_ms": _ms(percentile(latency, 0.99))}
