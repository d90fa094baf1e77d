"""State changes exported to StatsD, received by a real UDP socket on loopback."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tai_lb import ConfigError, LoadBalancer, load_config
from tai_lb.histogram import BOUNDS, LatencyHistogram

from .backends import Backend
from .backends import slow as backend_slow
from .backends import status as backend_status
from .conftest import FakeClock, in_forked_child, wait_for


class StatsdListener:
    """A UDP socket on 127.0.0.1 that gathers the StatsD lines it receives, summing counters."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-statsd")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            self.lines.extend(data.decode().splitlines())

    def counter(self, name: str) -> int:
        total = 0
        for line in list(self.lines):
            key, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            if key == name and kind.startswith("c"):
                total += int(value)
        return total

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def statsd() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()


def lb_with(statsd: StatsdListener, clock: FakeClock, **metrics: Any) -> LoadBalancer:
    return LoadBalancer.from_config({
        "metrics": {"statsd": {"port": statsd.port, "prefix": "app", **metrics}},
        "services": {"db": {
            "endpoints": ["10.0.0.1:5432", "10.0.0.2:5432"], "strategy": "round_robin",
            "circuit_breaker": {"fail_max": 2, "reset_timeout": 10}}}}, clock=clock)


def fail_first(lb: LoadBalancer, times: int) -> None:
    for _ in range(times):
        with lb.pick("db", exclude={"10.0.0.2:5432"}) as lease:
            lease.mark_failure()


def test_breaker_state_changes_reach_statsd(statsd: StatsdListener, clock: FakeClock) -> None:
    with lb_with(statsd, clock) as lb:
        fail_first(lb, 2)  # opens
        assert wait_for(lambda: statsd.counter("app.db.breaker.open") == 1)
        clock.advance(10)
        with lb.pick("db", exclude={"10.0.0.2:5432"}):  # the half-open probe, which succeeds
            pass
        assert wait_for(lambda: statsd.counter("app.db.breaker.half_open") == 1)
        assert wait_for(lambda: statsd.counter("app.db.breaker.closed") == 1)
        assert any(t.name == "tai-lb-metrics" for t in threading.enumerate())
        assert lb.status()["metrics"]["errors"] == 0
    assert not any(t.name == "tai-lb-metrics" for t in threading.enumerate())


def test_outlier_ejections_and_failover_reach_statsd(statsd: StatsdListener) -> None:
    with LoadBalancer.from_config({
            "metrics": {"statsd": {"port": statsd.port}},
            "services": {"db": {
                "endpoints": ["10.0.0.1:5432"], "backups": ["10.0.0.9:5432"],
                "outlier_detection": {"consecutive_local_origin_failure": 2}}}}) as lb:
        for _ in range(2):
            with lb.pick("db", exclude={"10.0.0.9:5432"}) as lease:
                lease.mark_failure()  # no status: a local-origin failure
        assert wait_for(lambda: statsd.counter("tai_lb.db.outlier.changed") >= 1)
        assert lb.pick("db").address == "10.0.0.9:5432"  # the backup group takes over
        assert wait_for(lambda: statsd.counter("tai_lb.db.failover") == 1)


def test_without_statsd_nothing_is_sent_and_no_thread_runs(clock: FakeClock) -> None:
    with LoadBalancer.from_config({"services": {"db": {"endpoints": ["10.0.0.1:5432"]}}},
                                  clock=clock) as lb:
        assert not lb.metrics.enabled
        assert not any(t.name == "tai-lb-metrics" for t in threading.enumerate())
        assert lb.status()["metrics"] == {"statsd": None, "prometheus": None, "sent": 0,
                                          "errors": 0, "failing": {}}


def test_metrics_prometheus_without_prometheus_client_fails_at_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ConfigError) as caught:
        load_config({"services": {}, "metrics": {"prometheus": {"namespace": "app"}}})
    assert caught.value.path == "metrics.prometheus"
    assert caught.value.reason == ("Prometheus export needs prometheus_client: "
                                   "pip install 'tai-lb[prometheus]'")


def test_load_config_leaves_the_statsd_lookup_to_construction() -> None:
    config = load_config({"services": {}, "metrics": {"statsd": {"host": "nonexistent.invalid"}}})
    assert config.metrics.statsd is not None
    with pytest.raises(ConfigError) as caught:
        LoadBalancer(config=config)
    assert caught.value.path == "metrics.statsd.host"


@pytest.mark.parametrize(("metrics", "path", "fragment"), [
    ({"statsd": {"port": 0}}, "metrics.statsd.port", "1 to 65535"),
    ({"statsd": {"host": ""}}, "metrics.statsd.host", "host name"),
    ({"statsd": {"prefix": "a b"}}, "metrics.statsd.prefix", "letters"),
    ({"statsd": {"colour": 1}}, "metrics.statsd.colour", "unknown key"),
    ({"statsd": {"tags": "yes"}}, "metrics.statsd.tags", "true, false or a mapping"),
    ({"statsd": {"tags": {"env": "a,b"}}}, "metrics.statsd.tags.env", "letters"),
    ({"statsd": {"tags": {"a b": "x"}}}, "metrics.statsd.tags.a b", "letters"),
    ({"statsd": {"tags": {"env": 1}}}, "metrics.statsd.tags.env", "got 1"),
    ({"prometheus": {"namespace": "9x"}}, "metrics.prometheus.namespace", "Prometheus name"),
    ({"prometheus": {"namespace": "a-b"}}, "metrics.prometheus.namespace", "Prometheus name"),
    ({"prometheus": {"prefix": "x"}}, "metrics.prometheus.prefix", "unknown key"),
    ({"graphite": {}}, "metrics.graphite", "unknown key"),
    ([], "metrics", "must be a mapping"),
])
def test_config_errors_name_the_key(metrics: Any, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"metrics": metrics, "services": {"db": {"endpoints": []}}})
    assert caught.value.path == path
    assert fragment in str(caught.value)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_sends_its_own_events(statsd: StatsdListener, clock: FakeClock) -> None:
    with lb_with(statsd, clock) as lb:
        lb.metrics.count("db", "parent.only")  # counted before the fork, sent by the parent

        def child() -> dict[str, Any]:
            fail_first(lb, 2)  # opens a breaker in the child
            names = [t.name for t in threading.enumerate()]
            sent = wait_for(lambda: lb.metrics.sent >= 1)
            lb.close()
            return {"threads": names, "sent": sent}

        report = in_forked_child(child)
        assert "tai-lb-metrics" in report["threads"] and report["sent"]
        assert wait_for(lambda: statsd.counter("app.db.breaker.open") == 1)  # from the child
        assert wait_for(lambda: statsd.counter("app.db.parent.only") == 1)  # once, not twice


def timer_count(statsd: StatsdListener, name: str) -> int:
    """Requests the StatsD timer lines of ``name`` stand for (1 / sample rate each)."""
    total = 0.0
    for line in list(statsd.lines):
        key, _, rest = line.partition(":")
        parts = rest.split("|")
        if key == name and len(parts) > 1 and parts[1] == "ms":
            rate = float(parts[2][1:]) if len(parts) > 2 else 1.0
            total += 1.0 / rate
    return round(total)


def test_request_metrics_reach_statsd(statsd: StatsdListener) -> None:
    good, flaky = Backend("good"), Backend("flaky")
    try:
        with LoadBalancer.from_config({
                "metrics": {"statsd": {"port": statsd.port, "prefix": "app"}},
                "services": {"users": {"endpoints": [good.address, flaky.address],
                                       "strategy": "round_robin"}}}) as lb:
            session = lb.session()
            for _ in range(60):
                assert session.get("http://users/ok").status_code == 200
            assert wait_for(lambda: statsd.counter("app.users.requests") == 60)
            g = f"app.users.endpoint.127_0_0_1_{good.port}"
            f = f"app.users.endpoint.127_0_0_1_{flaky.port}"
            assert statsd.counter(f"{g}.requests") == statsd.counter(f"{f}.requests") == 30
            assert wait_for(lambda: timer_count(statsd, "app.users.latency") == 60)
            assert timer_count(statsd, f"{g}.latency") == 30
            assert statsd.counter("app.users.errors") == 0

            flaky.behaviour = backend_status(503)  # retried on the good one
            for _ in range(10):
                assert session.get("http://users/ok").status_code == 200

            def failed() -> int:
                return statsd.counter(f"{f}.errors.status_5xx")

            # every attempt counts: 10 requests, plus one retry per 503
            assert wait_for(lambda: failed() >= 1
                            and statsd.counter("app.users.requests") == 70 + failed())
            assert statsd.counter("app.users.retries") == statsd.counter(f"{f}.retries") == failed()
            assert statsd.counter("app.users.errors.status_5xx") == failed()

            assert any(line.startswith(f"{g}.in_flight:") and line.endswith("|g")
                       for line in statsd.lines)
        with socket.socket() as sock:  # a port nothing listens on: connections are refused
            sock.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{sock.getsockname()[1]}"
        with LoadBalancer.from_config({
                "metrics": {"statsd": {"port": statsd.port, "prefix": "app"}},
                "services": {"orders": {"endpoints": [good.address, dead],
                                        "strategy": "round_robin"}}}) as lb:
            session = lb.session()
            for _ in range(10):
                assert session.get("http://orders/ok").status_code == 200
            d = f"app.orders.endpoint.127_0_0_1_{dead.rpartition(':')[2]}"
            assert wait_for(lambda: statsd.counter(f"{d}.errors.connect") >= 1
                            and statsd.counter("app.orders.errors")
                            == statsd.counter(f"{d}.errors.connect")
                            == statsd.counter("app.orders.retries"))
            assert lb.status()["metrics"]["errors"] == 0
    finally:
        good.stop()
        flaky.stop()


def test_request_figures_in_status(clock: FakeClock) -> None:
    with LoadBalancer.from_config({"services": {"db": {
            "endpoints": ["10.0.0.1:5432"]}}}, clock=clock) as lb:
        for i in range(100):
            lease = lb.pick("db")
            lease.done(latency=(i + 1) / 1000.0, success=i % 10 != 0,
                       status=503 if i % 20 == 0 else None)
        with pytest.raises(RuntimeError), lb.pick("db"):
            raise RuntimeError("an exception in the with block")
        service = lb.status()["services"]["db"]
        endpoint = service["endpoints"]["10.0.0.1:5432"]
        for figures in (service, endpoint):
            assert figures["requests"] == 101
            assert figures["errors"] == 11
            assert figures["errors_by_kind"] == {"connect": 0, "timeout": 0, "status_5xx": 5,
                                                 "status_4xx": 0, "other": 6}
            # true percentiles of 1..100 ms (and one ~0 ms): within a bucket (19%)
            assert 50 * 0.81 <= figures["p50_ms"] <= 50 * 1.19
            assert 95 * 0.81 <= figures["p95_ms"] <= 95 * 1.19
            assert 99 * 0.81 <= figures["p99_ms"] <= 99 * 1.19
        with pytest.raises(ValueError, match="kind must be one of"):
            lb.pick("db").done(success=False, kind="nonsense")


def test_timeouts_and_budget_refusals_are_counted() -> None:
    slow, failing = Backend("slow"), Backend("failing")
    slow.behaviour = backend_slow(2.0)
    failing.behaviour = backend_status(503)
    try:
        with LoadBalancer.from_config({"services": {
                "slow": {"endpoints": [slow.address], "timeout": 0.2,
                         "retries": {"attempts": 1}},
                "failing": {"endpoints": [failing.address],
                            "retries": {"budget": {"percent": 0, "min_per_second": 0}}}}}
                                      ) as lb:
            session = lb.session()
            with pytest.raises(requests.exceptions.ReadTimeout):
                session.get("http://slow/")
            assert session.get("http://failing/").status_code == 503  # its retry refused
            services = lb.status()["services"]
            assert services["slow"]["errors_by_kind"]["timeout"] == 1
            assert services["failing"]["errors_by_kind"]["status_5xx"] == 1
            assert services["failing"]["refusals"] == 1
            assert services["failing"]["endpoints"][failing.address]["refusals"] == 1
            assert services["failing"]["retries"] == 0
    finally:
        slow.stop()
        failing.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_sends_only_its_own_requests(statsd: StatsdListener,
                                                    clock: FakeClock) -> None:
    with lb_with(statsd, clock) as lb:
        for _ in range(5):
            lb.pick("db").done()
        assert wait_for(lambda: statsd.counter("app.db.requests") == 5)  # sent by the parent

        def child() -> dict[str, Any]:
            for _ in range(3):
                lb.pick("db").done()
            lb.close()  # sends what is left
            return {}

        in_forked_child(child)
        assert wait_for(lambda: statsd.counter("app.db.requests") >= 8)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # queued after the child's
            sock.sendto(b"marker:1|c", ("127.0.0.1", statsd.port))
        assert wait_for(lambda: statsd.counter("marker") == 1)  # so all of them have been read
        assert statsd.counter("app.db.requests") == 8  # the parent's 5 are not sent again
        assert lb.status()["services"]["db"]["requests"] == 5  # the child's are its own


def test_the_latency_histogram_is_bounded_and_estimates_within_a_bucket() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile(0.5) is None
    for i in range(1, 100_001):
        histogram.record(i / 100_000)  # 10 us to 1 s, evenly
    histogram.record(1e6)  # beyond the last bound: the open bucket
    assert len(histogram.counts) == len(BOUNDS) + 1 == 82  # whatever the traffic
    assert histogram.total == 100_001
    for fraction in (0.5, 0.95, 0.99):
        estimate = histogram.percentile(fraction)
        assert estimate is not None and abs(estimate - fraction) <= 0.19 * fraction
    assert histogram.percentile(1.0) == BOUNDS[-1]
    merged = LatencyHistogram.merged([histogram.counts, histogram.counts])
    assert merged.total == 200_002 and merged.percentile(0.5) == histogram.percentile(0.5)


def tagged_counters(statsd: StatsdListener, name: str) -> dict[str, int]:
    """The counter lines of ``name`` summed per tag list (the text after ``|#``)."""
    totals: dict[str, int] = {}
    for line in list(statsd.lines):
        key, _, rest = line.partition(":")
        parts = rest.split("|")
        if key == name and len(parts) == 3 and parts[1] == "c" and parts[2].startswith("#"):
            totals[parts[2][1:]] = totals.get(parts[2][1:], 0) + int(parts[0])
    return totals


def test_dogstatsd_tags_carry_the_service_and_endpoint(statsd: StatsdListener,
                                                       clock: FakeClock) -> None:
    one, two = Backend("one"), Backend("two")
    try:
        with LoadBalancer.from_config({
                "metrics": {"statsd": {"port": statsd.port, "prefix": "app",
                                       "tags": {"env": "test", "region": "eu-1"}}},
                "services": {"users": {"endpoints": [one.address, two.address]}}}) as lb:
            session = lb.session()
            for _ in range(20):
                assert session.get("http://users/ok").status_code == 200
            tags = {backend: f"service:users,endpoint:127.0.0.1_{backend.port},env:test,"
                             "region:eu-1" for backend in (one, two)}
            assert wait_for(lambda: tagged_counters(statsd, "app.requests")
                            == {tags[one]: 10, tags[two]: 10})
            lines = list(statsd.lines)
            timers = [line for line in lines if line.startswith("app.latency:")]
            assert timers and all(line.split("|")[1] == "ms"
                                  and line.split("|")[-1][1:] in tags.values() for line in timers)
            assert any(line == f"app.in_flight:0|g|#{tags[one]}" for line in lines)
            # no name carries the service or the endpoint any more, and nothing is untagged
            assert not any(line.startswith("app.users") for line in lines)
            assert all("|#service:users," in line for line in lines)
            assert statsd.counter("app.requests") == 20
        with LoadBalancer.from_config({
                "metrics": {"statsd": {"port": statsd.port, "prefix": "app", "tags": True}},
                "services": {"db": {"endpoints": ["10.0.0.1:5432", "10.0.0.2:5432"],
                                    "circuit_breaker": {"fail_max": 2}}}}, clock=clock) as lb:
            fail_first(lb, 2)
            assert wait_for(lambda: tagged_counters(statsd, "app.breaker.open")
                            == {"service:db": 1})
    finally:
        one.stop()
        two.stop()
