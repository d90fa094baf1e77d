"""State changes exported to StatsD, received by a real UDP socket on loopback."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tai_lb import ConfigError, LoadBalancer, load_config

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
        assert lb.status()["metrics"] == {"statsd": None, "sent": 0, "errors": 0}


@pytest.mark.parametrize(("metrics", "path", "fragment"), [
    ({"statsd": {"port": 0}}, "metrics.statsd.port", "1 to 65535"),
    ({"statsd": {"host": ""}}, "metrics.statsd.host", "host name"),
    ({"statsd": {"prefix": "a b"}}, "metrics.statsd.prefix", "letters"),
    ({"statsd": {"colour": 1}}, "metrics.statsd.colour", "unknown key"),
    ({"prometheus": {}}, "metrics.prometheus", "not supported yet"),
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
