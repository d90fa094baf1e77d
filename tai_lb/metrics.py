"""Metrics export to StatsD (and, through :mod:`tai_lb.prometheus`, to Prometheus).

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

With ``metrics.statsd.tags`` on (``true``, or a mapping of constant tags), the names lose the
service and the endpoint, which become DogStatsD-style tags instead:
``<prefix>.requests:3|c|#service:users,endpoint:10.0.0.1_80`` for an endpoint's request metrics
(only per endpoint: a backend such as Datadog's agent sums them per service by tag),
``<prefix>.breaker.open:1|c|#service:users`` for a state change; the constant tags follow.

Counters are the increase since the last send; figures are read from the endpoints' own counts
on the thread, so requests pay nothing for the export.  A forked child (a gunicorn worker, say)
sends the increases since the fork: what came before is the parent's to send.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

from . import _forksafe
from ._settings import Settings, check_port, doc, key_text, shown
from .exceptions import ConfigError
from .histogram import bucket_middle
from .prometheus import EndpointRow, PrometheusConfig
from .request_metrics import ERROR_KINDS
from .stats import EndpointStats

if TYPE_CHECKING:
    from .balancer import LoadBalancer
    from .prometheus import MultiprocessWriter

__all__ = ["FLUSH_INTERVAL", "Metrics", "MetricsConfig", "StatsdConfig"]

log = logging.getLogger(__name__)

#: seconds between two sends to StatsD
FLUSH_INTERVAL = 0.5

_TAG = re.compile(r"[A-Za-z0-9_.:/-]+")
Tags = Union[bool, Mapping[str, str], tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class StatsdConfig(Settings):
    """``metrics.statsd``: where StatsD listens (UDP), the prefix of every name, and whether
    the service and endpoint are sent as DogStatsD-style tags (``tags``: false, true, or a
    mapping of constant tags sent with every line, which turns tags on).

    :param host: the StatsD server's host name or address (resolved when the balancer is built).
    :param port: its UDP port.
    :param prefix: the first part of every metric name.
    :param tags: send the service and endpoint as DogStatsD tags rather than in the names;
        a mapping adds constant tags (``{"env": "prod"}``) to every line.
    """

    host: str = field(default="127.0.0.1", metadata=doc(allowed="a host name or address"))
    port: int = field(default=8125, metadata=doc("port", low=1, high=65535))
    prefix: str = field(default="tai_lb", metadata=doc(
        allowed="letters, digits, '_', '-' and '.'"))
    tags: Tags = field(default=False, metadata=doc(
        allowed="true, false or a mapping of tag names to values (letters, digits, "
                "'_', '.', ':', '/', '-')"))

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("host", f"must be a host name or address, got {shown(self.host)}")
        check_port(self.port, "port")
        if not isinstance(self.prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.-]*", self.prefix):
            raise ConfigError("prefix", f"must be letters, digits, '_', '-' and '.', got "
                                        f"{shown(self.prefix)}")
        tags = self.tags
        if isinstance(tags, tuple):  # as stored (from new()): checked again as a mapping
            try:
                tags = dict(tags)
            except (TypeError, ValueError):
                raise ConfigError("tags", f"must be true, false or a mapping of constant tags, "
                                          f"got {shown(self.tags)}") from None
        if isinstance(tags, Mapping):
            for key, value in tags.items():
                for text in (key, value):
                    if not isinstance(text, str) or not _TAG.fullmatch(text):
                        raise ConfigError(f"tags.{key_text(key)}", "names and values must be "
                                          "letters, digits, '_', '.', ':', '/' and '-', got "
                                          f"{shown(text)}")
            object.__setattr__(self, "tags", tuple(tags.items()))  # frozen and hashable
        elif not isinstance(tags, bool):
            raise ConfigError("tags", f"must be true, false or a mapping of constant tags, got "
                                      f"{shown(tags)}")

    @property
    def tag_suffix(self) -> Optional[str]:
        """The constant tags as ``,name:value,...`` (empty for none); None when tags are off."""
        if self.tags is False:
            return None
        pairs = self.tags if isinstance(self.tags, tuple) else ()
        return "".join(f",{name}:{value}" for name, value in pairs)


@dataclass(frozen=True)
class MetricsConfig(Settings):
    """The top-level ``metrics`` setting.

    :param statsd: send metrics to StatsD (see ``metrics.statsd``), or null for not.
    :param prometheus: export metrics to Prometheus (see ``metrics.prometheus``; needs the
        ``prometheus`` extra), or null for not.
    """

    statsd: Optional[StatsdConfig] = field(default=None, metadata=doc(
        allowed="a mapping (below), or null"))
    prometheus: Optional[PrometheusConfig] = field(default=None, metadata=doc(
        allowed="a mapping (below), or null"))

    @classmethod
    def from_config(cls, value: Any) -> MetricsConfig:
        """Build from the ``metrics`` mapping of a configuration."""
        if not isinstance(value, Mapping):
            raise ConfigError("", f"must be a mapping, got {shown(value)}")
        for key in value:
            if key not in ("statsd", "prometheus"):
                raise ConfigError(key_text(key), "unknown key; allowed: statsd, prometheus")
        built: dict[str, Any] = {}
        for key, kind in (("statsd", StatsdConfig), ("prometheus", PrometheusConfig)):
            if value.get(key) is not None:
                try:
                    built[key] = kind.from_config(value[key])
                except ConfigError as error:
                    raise ConfigError(f"{key}.{error.path}" if error.path else key,
                                      error.reason) from None
        return cls(**built)

    def __post_init__(self) -> None:  # find_spec() imports nothing
        if self.prometheus is not None and importlib.util.find_spec("prometheus_client") is None:
            raise ConfigError("prometheus", "Prometheus export needs prometheus_client: "
                                            "pip install 'tai-lb[prometheus]'")


def open_statsd(config: StatsdConfig) -> Any:
    """A ``statsd.StatsClient`` for ``config``, its host resolved now (the one lookup building
    a balancer makes; ``tai-lb check`` makes it too, through :func:`resolve_hosts`).

    :raises ConfigError: ``metrics.statsd.host`` does not resolve to an IPv4 address.
    """
    import statsd  # noqa: PLC0415 - a dependency, imported only when used

    try:  # the client resolves the host once, here (an IPv4 address, as statsd does)
        return statsd.StatsClient(config.host, config.port, prefix=config.prefix or None)
    except (OSError, UnicodeError, ValueError) as error:  # gaierror; bad IDNA label
        raise ConfigError("metrics.statsd.host", f"cannot resolve {shown(config.host)} to an "
                                                 f"IPv4 address: {error}") from None


def resolve_hosts(config: MetricsConfig) -> None:
    """Resolve what building a balancer resolves (the StatsD host), keeping nothing open: the
    lookup ``tai-lb check`` adds to :func:`~tai_lb.load_config` (which makes none).

    :raises ConfigError: as :meth:`Metrics.start` would, with the same message."""
    if config.statsd is not None:
        open_statsd(config.statsd).close()


def _segment(name: str) -> str:
    """A service name as one segment of a StatsD name (dots would add levels)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _middle_ms(bucket: int) -> float:
    """The middle (on a log scale) of a histogram bucket, in milliseconds."""
    return bucket_middle(bucket) * 1000.0


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


def _put(pipe: Any, prefix: str, counters: dict[str, int], buckets: dict[int, int],
         tags: str = "") -> int:
    """Put counters that grew and latency timers into ``pipe``; how many lines.  ``tags`` is
    ``|#...`` for DogStatsD-style tags, or empty."""
    lines = 0
    for name, value in counters.items():
        if value:
            # The statsd package has no tags and no public way to send a line as it is given:
            # _send_stat(name, "value|type...", rate) is what its own incr() and timing() call.
            pipe._send_stat(f"{prefix}{name}", f"{value}|c{tags}", 1)
            lines += 1
    for bucket, count in buckets.items():
        # One line stands for ``count`` requests at the bucket's middle: StatsD's sample rate,
        # written here (the client's own sample rate drops lines at random).
        rate = f"|@{1 / count:.6g}" if count > 1 else ""
        pipe._send_stat(f"{prefix}latency", f"{_middle_ms(bucket):0.3f}|ms{rate}{tags}", 1)
        lines += 1
    return lines


class Metrics:
    """Counts events and sends them to StatsD on a named daemon thread (``tai-lb-metrics``);
    exports the request metrics to Prometheus (:mod:`tai_lb.prometheus`) when configured.

    With neither configured, :meth:`count` and :meth:`follow` do nothing.

    :param config: the ``metrics`` settings.
    :param balancer: the balancer whose endpoints' health and breakers the Prometheus export
        shows (held weakly).
    """

    def __init__(self, config: Optional[MetricsConfig] = None,
                 balancer: Optional[LoadBalancer] = None) -> None:
        self.config = config or MetricsConfig()
        self._balancer = None if balancer is None else weakref.ref(balancer)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._client: Any = None
        self._writer: Optional[MultiprocessWriter] = None
        self._attached = False
        # the live endpoints of each service, and what was last sent for each
        self._followed: dict[str, weakref.WeakSet[EndpointStats]] = {}
        self._last: weakref.WeakKeyDictionary[EndpointStats, dict[str, Any]] = (
            weakref.WeakKeyDictionary())
        #: sends that failed (each counted; logged once until that export works again)
        self.errors = 0
        # exporter ("statsd", "prometheus") -> its error, while its sends fail
        self._failing: dict[str, str] = {}
        #: lines sent (counter increments, timers, gauges)
        self.sent = 0
        self._flushing = threading.Lock()  # one flush at a time (close() and the thread)
        _forksafe.after_fork_in_child(self, Metrics._reset_after_fork)

    @property
    def enabled(self) -> bool:
        """Whether anything is exported at all."""
        return self.config.statsd is not None or self.config.prometheus is not None

    def count(self, service: str, event: str, value: int = 1) -> None:
        """Count ``value`` occurrences of ``event`` for ``service``; no I/O here."""
        if self.config.statsd is None:
            return
        key = (service, event)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + value

    def follow(self, service: str, stats: EndpointStats) -> None:
        """Export the request metrics of ``stats``, an endpoint of ``service``, while it lives."""
        if not self.enabled:
            return
        with self._lock:
            self._followed.setdefault(service, weakref.WeakSet()).add(stats)

    def rows(self) -> list[EndpointRow]:
        """The figures of every followed endpoint now (read without their locks)."""
        return [row for _, row in self._rows()]

    def _rows(self) -> list[tuple[EndpointStats, EndpointRow]]:
        with self._lock:
            followed = [(service, list(members)) for service, members in self._followed.items()]
        lb = None if self._balancer is None else self._balancer()
        rows = []
        for service, members in followed:
            for stats in members:
                if stats.figures is None:
                    continue
                counts = stats.figures.counts()
                counts["in_flight"] = len(stats.load)
                address = stats.endpoint.address
                healthy = lb is None or (
                    lb.health_checker.is_healthy(service, address)
                    and not (lb.outlier_detector.state(service, address) or {}).get("ejected"))
                rows.append((stats, EndpointRow(service, address, counts, healthy,
                                                stats.breaker is not None
                                                and stats.breaker.state == "open")))
        return rows

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start exporting (does nothing with no export configured).

        :raises ConfigError: the StatsD host does not resolve (``metrics.statsd.host``) or the
            Prometheus names clash with metrics already registered; nothing is left open then.
        """
        statsd_config, prometheus_config = self.config.statsd, self.config.prometheus
        if self._thread is not None:
            return
        if statsd_config is not None and self._client is None:
            self._client = open_statsd(statsd_config)
        if prometheus_config is not None:  # prometheus_client is there: MetricsConfig checked
            from . import prometheus  # noqa: PLC0415 - prometheus_client only when used

            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                self._writer = prometheus.MultiprocessWriter(prometheus_config.namespace)
            elif not self._attached:
                prometheus.attach(self, prometheus_config.namespace)
                self._attached = True
        if self._client is None and self._writer is None:
            return
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
        if self._attached and self.config.prometheus is not None:
            from . import prometheus  # noqa: PLC0415 - prometheus_client only when used

            prometheus.detach(self, self.config.prometheus.namespace)
            self._attached = False

    def _reset_after_fork(self) -> None:
        # never freed in the child (the StatsD client's socket included)
        _forksafe.inherited(self._lock, self._counts, self._stop, self._thread, self._client,
                            self._flushing)
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._counts = {}  # the parent sends its own
        self._failing = {}  # the child's exports are its own (its own files, say)
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
        client, writer = self._client, self._writer
        if client is None and writer is None:
            return
        changes = []
        for stats, row in self._rows():  # what grew since the last pass, once for both
            last = self._last.get(stats)
            self._last[stats] = row.counts
            changes.append((row, last, *_deltas(row.counts, last)))
        if client is not None:
            self._send_statsd(client, counts, changes)
        if writer is not None:
            try:
                writer.write((row, counters, buckets) for row, _, counters, buckets in changes)
            except Exception as error:  # an exporter must never break the balancer
                self._failed("prometheus", "writing Prometheus metrics", error)
            else:
                self._worked("prometheus", "writing Prometheus metrics")

    def _send_statsd(self, client: Any, counts: dict[tuple[str, str], int],
                     changes: list[Any]) -> None:
        statsd_config = self.config.statsd
        suffix = None if statsd_config is None else statsd_config.tag_suffix
        try:
            with client.pipeline() as pipe:  # as few datagrams as fit
                for (service, event), value in counts.items():
                    if suffix is None:
                        pipe.incr(f"{_segment(service)}.{event}", value)
                    else:
                        pipe._send_stat(event, f"{value}|c|#service:{_tag(service)}{suffix}", 1)
                sent = len(counts)
                by_service: dict[str, list[Any]] = {}
                for change in changes:
                    by_service.setdefault(change[0].service, []).append(change)
                for service, items in by_service.items():
                    sent += _send_service(pipe, service, items, suffix)
            self.sent += sent
        except Exception as error:  # an exporter must never break the balancer
            self._failed("statsd", "sending metrics to StatsD", error)
        else:
            self._worked("statsd", "sending metrics to StatsD")

    def _failed(self, exporter: str, what: str, error: Exception) -> None:
        # Counted every time, logged once: a missing PROMETHEUS_MULTIPROC_DIR fails every
        # pass (twice a second) for as long as it is missing.
        self.errors += 1
        if exporter not in self._failing:
            log.warning("tai-lb: %s failed: %s (counted, not logged again until it works)",
                        what, error)
        self._failing[exporter] = f"{type(error).__name__}: {error}"[:300]

    def _worked(self, exporter: str, what: str) -> None:
        if self._failing.pop(exporter, None) is not None:
            log.info("tai-lb: %s works again", what)

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state of the export."""
        statsd_config, prometheus_config = self.config.statsd, self.config.prometheus
        return {"statsd": None if statsd_config is None else
                f"{statsd_config.host}:{statsd_config.port}",
                "prometheus": None if prometheus_config is None else {
                    "namespace": prometheus_config.namespace,
                    "multiprocess": self._writer is not None},
                "sent": self.sent, "errors": self.errors, "failing": dict(self._failing)}


def _tag(text: str) -> str:
    """A DogStatsD tag value: no ',', '|', '#' or ':' (an address's port follows a '_')."""
    return re.sub(r"[^A-Za-z0-9_./-]", "_", text)


def _send_service(pipe: Any, service: str, changes: list[Any], suffix: Optional[str]) -> int:
    """Put the request metrics of one service's endpoints into ``pipe``; how many lines.

    ``changes`` holds ``(row, last counts, counters, buckets)`` per endpoint; ``suffix`` the
    constant tags, or None for names with the service and endpoint in them."""
    sent = 0
    segment = _segment(service)
    service_counters: dict[str, int] = {}
    service_buckets: dict[int, int] = {}
    in_flight_changed = False
    for row, last, counters, buckets in changes:
        in_flight = row.counts["in_flight"]
        if suffix is None:
            prefix, tags = f"{segment}.endpoint.{_segment(row.address)}.", ""
        else:
            prefix, tags = "", f"|#service:{_tag(service)},endpoint:{_tag(row.address)}{suffix}"
        for name, value in counters.items():
            service_counters[name] = service_counters.get(name, 0) + value
        for bucket, count in buckets.items():
            service_buckets[bucket] = service_buckets.get(bucket, 0) + count
        sent += _put(pipe, prefix, counters, buckets, tags)
        if last is None or last["in_flight"] != in_flight:
            pipe._send_stat(f"{prefix}in_flight", f"{in_flight}|g{tags}", 1)
            sent += 1
            in_flight_changed = True
    if suffix is None:  # tagged lines are per endpoint only: tags sum them per service
        sent += _put(pipe, f"{segment}.", service_counters, service_buckets)
        if in_flight_changed:
            pipe.gauge(f"{segment}.in_flight", sum(row.counts["in_flight"]
                                                   for row, *_ in changes))
            sent += 1
    return sent
