"""Prometheus export: the request metrics and endpoint states, read when Prometheus scrapes.

Configured by the top-level ``metrics.prometheus`` key (``{"namespace": "tai_lb"}``), with the
``prometheus`` extra installed (``prometheus_client``, imported only then).  The names, with
``<ns>`` the namespace:

===========================================  =================================================
``<ns>_requests_total``                      counter ``{service, endpoint, outcome}``: finished
                                             requests (each attempt counts); ``outcome`` is
                                             ``success`` or the kind of error: ``connect``,
                                             ``timeout``, ``status_5xx``, ``status_4xx``,
                                             ``other``
``<ns>_retries_total``                       counter ``{service, endpoint}``: failed attempts
                                             that were retried
``<ns>_retry_refusals_total``                counter ``{service, endpoint}``: retries the retry
                                             budget refused
``<ns>_request_duration_seconds``            histogram ``{service}``: the latency of every
                                             request; buckets from 0.1 ms doubling to 105 s
                                             (``_bucket``, ``_sum``, ``_count``)
``<ns>_endpoint_healthy``                    gauge ``{service, endpoint}``: 1 when the active
                                             health check (if any) passes and outlier detection
                                             has not ejected the endpoint, else 0
``<ns>_endpoint_in_flight``                  gauge ``{service, endpoint}``: requests in flight
``<ns>_breaker_open``                        gauge ``{service, endpoint}``: 1 while the circuit
                                             breaker is open, else 0 (closed, half-open, none)
===========================================  =================================================

In one process, a collector on ``prometheus_client``'s default ``REGISTRY`` (one per namespace,
shared by the balancers that use it, unregistered when the last one closes) reads the figures
the balancer keeps anyway (:mod:`tai_lb.request_metrics`) at scrape time: requests pay nothing.
The duration histogram's buckets are every fourth bound of :data:`~tai_lb.histogram.BOUNDS`, so
their counts are exact; ``_sum`` is estimated from the buckets (each request at its bucket's
middle, within 19%).

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn's multiprocess mode), a collector in one worker
would show that worker alone, so the same names are written instead through
``prometheus_client``'s multiprocess-aware metric objects (files in that directory), by the
metrics thread every half second (the increases since its last pass), and read by a
``MultiProcessCollector`` at scrape: counters and the histogram are summed over the workers,
``in_flight`` summed over the live ones, ``endpoint_healthy`` is the lowest of the live workers'
(0 if any worker sees the endpoint unhealthy) and ``breaker_open`` the highest.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from ._settings import Settings, doc, shown
from .exceptions import ConfigError
from .histogram import BOUNDS, bucket_middle
from .request_metrics import ERROR_KINDS

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["DURATION_BUCKETS", "BalancerCollector", "EndpointRow", "MultiprocessWriter",
           "PrometheusConfig", "attach", "detach"]

_STEP = 4
DURATION_BUCKETS: tuple[float, ...] = tuple(float(f"{bound:.6g}") for bound in BOUNDS[::_STEP])
"""The upper bounds (seconds) of ``request_duration_seconds``: 0.1 ms doubling up to 105 s
(every fourth bound of :data:`~tai_lb.histogram.BOUNDS`, to 6 significant digits)."""


@dataclass(frozen=True)
class PrometheusConfig(Settings):
    """``metrics.prometheus``: the namespace (prefix) of every Prometheus name.

    :param namespace: the first part of every name (``<namespace>_requests_total``...).
    """

    namespace: str = field(default="tai_lb", metadata=doc(
        allowed="letters, digits and '_', not starting with a digit"))

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not re.fullmatch(
                r"[A-Za-z_][A-Za-z0-9_]*", self.namespace):
            raise ConfigError("namespace", "must be a Prometheus name: letters, digits and '_', "
                                           "not starting with a digit, got "
                                           f"{shown(self.namespace)}")


class EndpointRow(NamedTuple):
    """One endpoint's figures, as the exports read them."""

    service: str
    address: str
    counts: dict[str, Any]  # RequestFigures.counts(), with "in_flight"
    healthy: bool
    breaker_open: bool


def _cumulative(latency: Sequence[int]) -> list[tuple[str, float]]:
    """Prometheus histogram buckets (``le`` as text, cumulative count) from bucket counts."""
    buckets, seen = [], 0
    for index, count in enumerate(latency):
        seen += count
        if index % _STEP == 0 and index < len(BOUNDS):
            buckets.append((repr(DURATION_BUCKETS[index // _STEP]), float(seen)))
    buckets.append(("+Inf", float(seen)))
    return buckets


def _estimated_sum(latency: Sequence[int]) -> float:
    return sum(count * bucket_middle(index) for index, count in enumerate(latency) if count)


class BalancerCollector:
    """The collector of one namespace: the figures of every balancer attached to it, summed per
    label set, read at scrape time."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.sources: weakref.WeakSet[Metrics] = weakref.WeakSet()

    def _families(self) -> dict[str, Any]:
        from prometheus_client.core import (  # noqa: PLC0415 - an optional extra
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        ns, endpoint = self.namespace, ["service", "endpoint"]
        return {
            "requests": CounterMetricFamily(
                f"{ns}_requests", "Finished requests (attempts) by outcome: success or the "
                "kind of error.", labels=[*endpoint, "outcome"]),
            "retries": CounterMetricFamily(
                f"{ns}_retries", "Failed attempts that were retried.", labels=endpoint),
            "refusals": CounterMetricFamily(
                f"{ns}_retry_refusals", "Retries the retry budget refused.", labels=endpoint),
            "duration": HistogramMetricFamily(
                f"{ns}_request_duration_seconds", "Latency of finished requests (attempts).",
                labels=["service"]),
            "healthy": GaugeMetricFamily(
                f"{ns}_endpoint_healthy", "1 when the endpoint passes its health checks and is "
                "not ejected, else 0.", labels=endpoint),
            "in_flight": GaugeMetricFamily(
                f"{ns}_endpoint_in_flight", "Requests in flight.", labels=endpoint),
            "breaker": GaugeMetricFamily(
                f"{ns}_breaker_open", "1 while the endpoint's circuit breaker is open, else 0.",
                labels=endpoint),
        }

    def describe(self) -> Iterator[Any]:
        """The metric families without samples (so registering reads no figure)."""
        return iter(self._families().values())

    def collect(self) -> Iterator[Any]:
        """The figures now: called by ``prometheus_client`` at every scrape."""
        families = self._families()
        endpoints: dict[tuple[str, str], list[Any]] = {}
        latency: dict[str, list[int]] = {}
        for source in list(self.sources):
            for row in source.rows():
                counts = row.counts
                figures = endpoints.setdefault((row.service, row.address), [
                    dict.fromkeys(("success", *ERROR_KINDS), 0), 0, 0, 1, 0, 0])
                errors = sum(counts["errors"].values())
                figures[0]["success"] += counts["requests"] - errors
                for kind in ERROR_KINDS:
                    figures[0][kind] += counts["errors"][kind]
                figures[1] += counts["retries"]
                figures[2] += counts["refusals"]
                figures[3] = min(figures[3], int(row.healthy))
                figures[4] += counts["in_flight"]
                figures[5] = max(figures[5], int(row.breaker_open))
                total = latency.setdefault(row.service, [0] * len(counts["latency"]))
                for index, count in enumerate(counts["latency"]):
                    total[index] += count
        for (service, address), (outcomes, retries, refusals, healthy, in_flight,
                                 breaker) in endpoints.items():
            labels = [service, address]
            for outcome, value in outcomes.items():
                families["requests"].add_metric([*labels, outcome], value)
            families["retries"].add_metric(labels, retries)
            families["refusals"].add_metric(labels, refusals)
            families["healthy"].add_metric(labels, healthy)
            families["in_flight"].add_metric(labels, in_flight)
            families["breaker"].add_metric(labels, breaker)
        for service, histogram in latency.items():
            families["duration"].add_metric([service], _cumulative(histogram),
                                            _estimated_sum(histogram))
        return iter(families.values())


_collectors: dict[str, BalancerCollector] = {}
_collectors_lock = threading.Lock()


def attach(source: Metrics, namespace: str) -> None:
    """Export ``source``'s figures through the collector of ``namespace`` on the default
    registry (registered with the first source).

    :raises ConfigError: another collector or metric of the default registry has those names.
    """
    from prometheus_client import REGISTRY  # noqa: PLC0415 - an optional extra

    with _collectors_lock:
        collector = _collectors.get(namespace)
        if collector is None:
            collector = BalancerCollector(namespace)
            try:
                REGISTRY.register(collector)
            except ValueError as error:  # duplicated time series
                raise ConfigError("metrics.prometheus.namespace",
                                  f"{namespace!r} clashes with metrics already registered: "
                                  f"{error}") from None
            _collectors[namespace] = collector
        collector.sources.add(source)


def detach(source: Metrics, namespace: str) -> None:
    """Stop exporting ``source``; the last source of a namespace unregisters its collector."""
    with _collectors_lock:
        collector = _collectors.get(namespace)
        if collector is None:
            return
        collector.sources.discard(source)
        if not collector.sources:
            from prometheus_client import REGISTRY  # noqa: PLC0415 - an optional extra

            del _collectors[namespace]
            REGISTRY.unregister(collector)


_objects: dict[str, dict[str, Any]] = {}


def _metric_objects(namespace: str) -> dict[str, Any]:
    """The multiprocess-aware metric objects of ``namespace`` (one set per process: two
    objects of the same name would overwrite each other's values in the shared files)."""
    from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415 - an optional extra

    with _collectors_lock:
        objects = _objects.get(namespace)
        if objects is None:
            ns, endpoint = namespace, ["service", "endpoint"]
            objects = _objects[namespace] = {
                "requests": Counter(f"{ns}_requests", "Finished requests (attempts) by "
                                    "outcome.", [*endpoint, "outcome"], registry=None),
                "retries": Counter(f"{ns}_retries", "Failed attempts that were retried.",
                                   endpoint, registry=None),
                "refusals": Counter(f"{ns}_retry_refusals", "Retries the retry budget "
                                    "refused.", endpoint, registry=None),
                "duration": Histogram(f"{ns}_request_duration_seconds", "Latency of finished "
                                      "requests (attempts).", ["service"], registry=None,
                                      buckets=(*DURATION_BUCKETS, float("inf"))),
                "healthy": Gauge(f"{ns}_endpoint_healthy", "1 when the endpoint passes its "
                                 "health checks and is not ejected, else 0.", endpoint,
                                 registry=None, multiprocess_mode="livemin"),
                "in_flight": Gauge(f"{ns}_endpoint_in_flight", "Requests in flight.", endpoint,
                                   registry=None, multiprocess_mode="livesum"),
                "breaker": Gauge(f"{ns}_breaker_open", "1 while the endpoint's circuit breaker "
                                 "is open, else 0.", endpoint, registry=None,
                                 multiprocess_mode="livemax"),
            }
    return objects


class MultiprocessWriter:
    """Writes the increases of the figures into ``prometheus_client``'s multiprocess files
    (called by the metrics thread with what changed since its last pass)."""

    def __init__(self, namespace: str) -> None:
        self.metrics = _metric_objects(namespace)
        self._gauged: set[tuple[str, str]] = set()  # the endpoints whose gauges were set

    def write(self, rows: Iterable[tuple[EndpointRow, dict[str, int], dict[int, int]]]) -> None:
        """Add each row's counter increases and latency bucket increases; set its gauges.  An
        endpoint gone since the last pass gets ``in_flight`` 0 (a value written to the shared
        files stays there: its other gauges keep their last value until the worker exits)."""
        m = self.metrics
        gauged = set()
        for row, counters, buckets in rows:
            labels = (row.service, row.address)
            gauged.add(labels)
            success = counters["requests"] - counters["errors"]
            if success:
                m["requests"].labels(*labels, "success").inc(success)
            for kind in ERROR_KINDS:
                if counters[f"errors.{kind}"]:
                    m["requests"].labels(*labels, kind).inc(counters[f"errors.{kind}"])
            for name in ("retries", "refusals"):
                if counters[name]:
                    m[name].labels(*labels).inc(counters[name])
            if buckets:
                # no public way to add n to a bucket: one observation per request, at the
                # bucket's middle (which lies inside the same coarser Prometheus bucket)
                histogram = m["duration"].labels(row.service)
                for bucket, count in buckets.items():
                    middle = bucket_middle(bucket) if bucket < len(BOUNDS) else BOUNDS[-1] * 2
                    for _ in range(count):
                        histogram.observe(middle)
            m["healthy"].labels(*labels).set(int(row.healthy))
            m["in_flight"].labels(*labels).set(row.counts["in_flight"])
            m["breaker"].labels(*labels).set(int(row.breaker_open))
        for labels in self._gauged - gauged:
            m["in_flight"].labels(*labels).set(0)
        self._gauged = gauged
