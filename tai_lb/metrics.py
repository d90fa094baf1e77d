"""Metrics export to StatsD: the balancer's state changes as counters.

This version exports the events that change where traffic goes, per service, as StatsD
counters (``<prefix>.<service>.<event>``):

=================================  ==========================================================
``breaker.open``                   an endpoint's circuit breaker opened
``breaker.half_open``              a breaker let a probe through
``breaker.closed``                 a breaker closed again
``health.changed``                 an active health check changed an endpoint's health
``outlier.changed``                outlier detection ejected an endpoint or let it back
``failover`` / ``failback``        traffic moved to another priority group, or came back
=================================  ==========================================================

Events are counted in memory (a dict under a lock, never any I/O on the caller's thread) and sent
by a named daemon thread every half second, so they reach StatsD within a second of happening.

The same thread sends the request metrics (:mod:`tai_lb.request_metrics`) of every live endpoint,
per service (``<prefix>.<service>.<name>``) and per endpoint
(``<prefix>.<service>.endpoint.<address>.<name>``, the address with dots and colons as ``_``):

=================================  ==========================================================
``requests``                       counter: requests finished (each attempt counts)
``errors``                         counter: failed requests, all kinds together
``errors.<kind>``                  counter: failed requests of one kind: ``connect``,
                                   ``timeout``, ``status_5xx``, ``status_4xx``, ``other``
``retries``                        counter: failed attempts that were retried
``refusals``                       counter: retries the retry budget refused
``latency``                        timer (ms): one line per histogram bucket that changed,
                                   at the bucket's middle, with sample rate ``1/count``
``in_flight``                      gauge: requests in flight, sent when it changes
=================================  ==========================================================

Counters are the increase since the last send; figures are read from the endpoints' own counts
on the thread, so requests pay nothing for the export.  A forked child (a gunicorn worker, say)
sends the increases since the fork: what came before is the parent's to send.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from . import _forksafe
from ._settings import Settings, check_port, key_text, shown
from .exceptions import ConfigError
from .histogram import BOUNDS
from .request_metrics import ERROR_KINDS
from .stats import EndpointStats

__all__ = ["FLUSH_INTERVAL", "Metrics", "MetricsConfig", "StatsdConfig"]

log = logging.getLogger(__name__)

#: seconds between two sends to StatsD
FLUSH_INTERVAL = 0.5


@dataclass(frozen=True)
class StatsdConfig(Settings):
    """``metrics.statsd``: where StatsD listens (UDP) and the prefix of every name."""

    host: str = "127.0.0.1"
    port: int = 8125
    prefix: str = "tai_lb"

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("host", f"must be a host name or address, got {shown(self.host)}")
        check_port(self.port, "port")
        if not isinstance(self.prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.-]*", self.prefix):
            raise ConfigError("prefix", f"must be letters, digits, '_', '-' and '.', got "
                                        f"{shown(self.prefix)}")


@dataclass(frozen=True)
class MetricsConfig(Settings):
    """The top-level ``metrics`` setting."""

    statsd: Optional[StatsdConfig] = None

    @classmethod
    def from_config(cls, value: Any) -> MetricsConfig:
        """Build from the ``metrics`` mapping of a configuration."""
        if not isinstance(value, Mapping):
            raise ConfigError("", f"must be a mapping, got {shown(value)}")
        for key in value:
            if key == "prometheus":
                raise ConfigError(key, "not supported yet: Prometheus export is not built yet")
            if key != "statsd":
                raise ConfigError(key_text(key), "unknown key; allowed: statsd")
        statsd = value.get("statsd")
        if statsd is None:
            return cls()
        try:
            return cls(StatsdConfig.from_config(statsd))
        except ConfigError as error:
            raise ConfigError(f"statsd.{error.path}" if error.path else "statsd",
                              error.reason) from None


def _segment(name: str) -> str:
    """A service name as one segment of a StatsD name (dots would add levels)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _middle_ms(bucket: int) -> float:
    """The middle (on a log scale) of a histogram bucket, in milliseconds."""
    if bucket >= len(BOUNDS):
        return BOUNDS[-1] * 1000.0
    upper = BOUNDS[bucket]
    if bucket == 0:
        return upper * 500.0
    return float((upper * BOUNDS[bucket - 1]) ** 0.5 * 1000.0)


def _deltas(now: dict[str, Any], last: Optional[dict[str, Any]]
            ) -> tuple[dict[str, int], dict[int, int]]:
    """The increases from ``last`` to ``now`` (both from ``RequestFigures.counts()``): the
    counters by StatsD name, and the histogram buckets that grew."""
    old = last or {"requests": 0, "retries": 0, "refusals": 0,
                   "errors": dict.fromkeys(ERROR_KINDS, 0), "latency": [0] * len(now["latency"])}
    counters = {name: now[name] - old[name] for name in ("requests", "retries", "refusals")}
    counters["errors"] = sum(now["errors"].values()) - sum(old["errors"].values())
    for kind in ERROR_KINDS:
        counters[f"errors.{kind}"] = now["errors"][kind] - old["errors"][kind]
    buckets = {index: count - old["latency"][index]
               for index, count in enumerate(now["latency"]) if count != old["latency"][index]}
    return counters, buckets


def _put(pipe: Any, prefix: str, counters: dict[str, int], buckets: dict[int, int]) -> int:
    """Put counters that grew and latency timers into ``pipe``; how many lines."""
    lines = 0
    for name, value in counters.items():
        if value:
            pipe.incr(f"{prefix}.{name}", value)
            lines += 1
    for bucket, count in buckets.items():
        # One line stands for ``count`` requests at the bucket's middle: StatsD's sample rate,
        # written here (the client's own sample rate drops lines at random).
        rate = f"|@{1 / count:.6g}" if count > 1 else ""
        pipe._send_stat(f"{prefix}.latency",
                        f"{_middle_ms(bucket):0.3f}|ms{rate}", 1)
        lines += 1
    return lines


class Metrics:
    """Counts events and sends them to StatsD on a named daemon thread (``tai-lb-metrics``).

    With no StatsD configured, :meth:`count` does nothing.
    """

    def __init__(self, config: Optional[MetricsConfig] = None) -> None:
        self.config = config or MetricsConfig()
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._client: Any = None
        # the live endpoints of each service, and what was last sent for each
        self._followed: dict[str, weakref.WeakSet[EndpointStats]] = {}
        self._last: weakref.WeakKeyDictionary[EndpointStats, dict[str, Any]] = (
            weakref.WeakKeyDictionary())
        #: sends that failed (each logged)
        self.errors = 0
        #: lines sent (counter increments, timers, gauges)
        self.sent = 0
        self._flushing = threading.Lock()  # one flush at a time (close() and the thread)
        _forksafe.after_fork_in_child(self, Metrics._reset_after_fork)

    @property
    def enabled(self) -> bool:
        """Whether events are exported at all."""
        return self.config.statsd is not None

    def count(self, service: str, event: str, value: int = 1) -> None:
        """Count ``value`` occurrences of ``event`` for ``service``; no I/O here."""
        if self.config.statsd is None:
            return
        name = f"{_segment(service)}.{event}"
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + value

    def follow(self, service: str, stats: EndpointStats) -> None:
        """Export the request metrics of ``stats``, an endpoint of ``service``, while it lives."""
        if self.config.statsd is None:
            return
        with self._lock:
            self._followed.setdefault(service, weakref.WeakSet()).add(stats)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start sending (does nothing without StatsD settings).

        :raises ConfigError: the StatsD host does not resolve (``metrics.statsd.host``); no
            thread or socket is left open then.
        """
        statsd_config = self.config.statsd
        if statsd_config is None or self._thread is not None:
            return
        import statsd  # noqa: PLC0415 - a dependency, imported only when used

        try:  # the client resolves the host once, here (an IPv4 address, as statsd does)
            self._client = statsd.StatsClient(statsd_config.host, statsd_config.port,
                                              prefix=statsd_config.prefix or None)
        except (OSError, UnicodeError, ValueError) as error:  # gaierror; a bad IDNA label
            raise ConfigError("metrics.statsd.host", f"cannot resolve {shown(statsd_config.host)}"
                                                     f" to an IPv4 address: {error}") from None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tai-lb-metrics")
        self._thread.start()

    def close(self) -> None:
        """Send what is counted and stop, within a second."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(1.0)
        self.flush()
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _reset_after_fork(self) -> None:
        # never freed in the child (the StatsD client's socket included)
        _forksafe.inherited(self._lock, self._counts, self._stop, self._thread, self._client,
                            self._flushing)
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._counts = {}  # the parent sends its own
        # The parent sends what was counted before the fork: the child's baseline is the fork.
        self._last = weakref.WeakKeyDictionary({
            stats: {**stats.figures.counts(), "in_flight": len(stats.load)}
            for members in self._followed.values() for stats in members
            if stats.figures is not None})
        stopped = self._stop.is_set()
        self._stop = threading.Event()  # its lock may have been held by the parent's thread
        had = self._thread is not None
        self._thread = None
        if had and not stopped:
            self._client = None
            self.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self.flush()

    def flush(self) -> None:
        """Send the counts gathered since the last send (outside the lock)."""
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            followed = [(service, list(members)) for service, members in self._followed.items()]
        client = self._client
        if client is None:
            return
        try:
            with client.pipeline() as pipe:  # as few datagrams as fit
                for name, value in counts.items():
                    pipe.incr(name, value)
                sent = len(counts)
                for service, members in followed:
                    sent += self._send_requests(pipe, _segment(service), members)
            self.sent += sent
        except Exception as error:  # an exporter must never break the balancer
            self.errors += 1
            log.warning("tai-lb: sending metrics to StatsD failed: %s", error)

    def _send_requests(self, pipe: Any, service: str, members: list[EndpointStats]) -> int:
        """Put the request metrics of one service's endpoints into ``pipe``; how many."""
        sent = 0
        service_counters: dict[str, int] = {}
        service_buckets: dict[int, int] = {}
        in_flight_changed = False
        for stats in members:
            figures = stats.figures
            if figures is None:
                continue
            now = figures.counts()
            now["in_flight"] = len(stats.load)
            last = self._last.get(stats)
            self._last[stats] = now
            prefix = f"{service}.endpoint.{re.sub(r'[^A-Za-z0-9_-]', '_', stats.endpoint.address)}"
            counters, buckets = _deltas(now, last)
            for name, value in counters.items():
                service_counters[name] = service_counters.get(name, 0) + value
            for bucket, count in buckets.items():
                service_buckets[bucket] = service_buckets.get(bucket, 0) + count
            sent += _put(pipe, prefix, counters, buckets)
            if last is None or last["in_flight"] != now["in_flight"]:
                pipe.gauge(f"{prefix}.in_flight", now["in_flight"])
                sent += 1
                in_flight_changed = True
        sent += _put(pipe, service, service_counters, service_buckets)
        if in_flight_changed:
            pipe.gauge(f"{service}.in_flight", sum(len(stats.load) for stats in members))
            sent += 1
        return sent

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state of the export."""
        statsd_config = self.config.statsd
        return {"statsd": None if statsd_config is None else
                f"{statsd_config.host}:{statsd_config.port}",
                "sent": self.sent, "errors": self.errors}
