"""Per-endpoint circuit breakers (pybreaker), driven by recorded outcomes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tai_lb import ConfigError, LoadBalancer, NoEndpointAvailable, load_config
from tai_lb.web import render_html

from . import backends
from .backends import Backend
from .conftest import FakeClock


def lb_with(clock: FakeClock, **breaker: Any) -> LoadBalancer:
    return LoadBalancer.from_config({"services": {"db": {
        "endpoints": ["10.0.0.1:5432", "10.0.0.2:5432"], "strategy": "round_robin",
        "circuit_breaker": {"fail_max": 3, "reset_timeout": 10, **breaker}}}}, clock=clock)


def fail(lb: LoadBalancer, address: str, times: int) -> None:
    for _ in range(times):
        with lb.pick("db", exclude={a for a in ("10.0.0.1:5432", "10.0.0.2:5432")
                                    if a != address}) as lease:
            assert lease.address == address
            lease.mark_failure()


def test_breaker_opens_after_fail_max_and_refuses_until_reset(clock: FakeClock) -> None:
    with lb_with(clock) as lb:
        fail(lb, "10.0.0.1:5432", 3)
        breaker = lb.stats("db")["10.0.0.1:5432"].breaker
        assert breaker is not None and breaker.state == "open"
        assert {lb.pick("db").address for _ in range(10)} == {"10.0.0.2:5432"}
        assert lb.status()["services"]["db"]["endpoints"]["10.0.0.1:5432"]["breaker"][
            "state"] == "open"
        clock.advance(9.9)
        assert {lb.pick("db").address for _ in range(10)} == {"10.0.0.2:5432"}


def test_status_has_the_breaker_key_null_without_a_breaker(clock: FakeClock) -> None:
    config = {"services": {"plain": {"endpoints": ["10.0.0.1:5432"]},
                           "guarded": {"endpoints": ["10.0.0.2:5432"],
                                       "circuit_breaker": {"fail_max": 3}}}}
    with LoadBalancer.from_config(config, clock=clock) as lb:
        services = lb.status()["services"]
        plain = services["plain"]["endpoints"]["10.0.0.1:5432"]
        assert "breaker" in plain and plain["breaker"] is None
        assert services["guarded"]["endpoints"]["10.0.0.2:5432"]["breaker"]["state"] == "closed"
        page = render_html(lb.status())  # the status page shows "-" for no breaker
        row = page.split(">10.0.0.1:5432</td>", 1)[1].split("</tr>", 1)[0].split("</td>")
        header = page.split("<thead><tr>", 1)[1].split("</tr>", 1)[0].split("</th>")
        assert row[header.index("<th>breaker") - 1] == "<td>-"


def test_half_open_admits_exactly_one_probe_then_closes(clock: FakeClock) -> None:
    with lb_with(clock) as lb:
        fail(lb, "10.0.0.1:5432", 3)
        clock.advance(10.0)
        leases = [lb.pick("db") for _ in range(6)]
        probes = [lease for lease in leases if lease.address == "10.0.0.1:5432"]
        assert len(probes) == 1  # one probe; every other pick went elsewhere
        breaker = lb.stats("db")["10.0.0.1:5432"].breaker
        assert breaker is not None and breaker.state == "half-open"
        for lease in leases:
            lease.done()
        assert breaker.state == "closed"  # the probe succeeded
        assert "10.0.0.1:5432" in {lb.pick("db").address for _ in range(4)}


def test_failed_probe_opens_again(clock: FakeClock) -> None:
    with lb_with(clock) as lb:
        fail(lb, "10.0.0.1:5432", 3)
        clock.advance(10.0)
        fail(lb, "10.0.0.1:5432", 1)
        breaker = lb.stats("db")["10.0.0.1:5432"].breaker
        assert breaker is not None and breaker.state == "open" and breaker.trips == 2


def test_every_breaker_open_is_a_clear_no_endpoint_available(clock: FakeClock) -> None:
    with lb_with(clock) as lb:
        fail(lb, "10.0.0.1:5432", 3)
        fail(lb, "10.0.0.2:5432", 3)
        with pytest.raises(NoEndpointAvailable, match="2 of 2 circuit breakers open"):
            lb.pick("db")


@pytest.fixture
def backend() -> Iterator[Backend]:
    made = Backend("slow")
    made.behaviour = backends.slow(0.3)
    yield made
    made.stop()


def test_concurrent_requests_through_one_breaker_overlap(backend: Backend) -> None:
    lb = LoadBalancer.from_config({"services": {"users": {
        "endpoints": [backend.address], "circuit_breaker": {"fail_max": 5}}}})
    with lb:
        barrier = threading.Barrier(4)

        def call() -> None:
            session = lb.session()
            barrier.wait()
            session.get("http://users/")

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        breaker = lb.stats("users")[backend.address].breaker
        assert breaker is not None and breaker.state == "closed"
    assert backend.max_active == 4  # never serialised by pybreaker's lock


@pytest.mark.parametrize(("settings", "path", "fragment"), [
    ({"fail_max": 0}, "fail_max", "1 to 10000"),
    ({"reset_timeout": -1}, "reset_timeout", "> 0"),
    ({"success_threshold": 1.5}, "success_threshold", "integer"),
    ({"window": 3}, "window", "unknown key"),
])
def test_config_errors_name_the_key(settings: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"services": {"db": {"endpoints": [], "circuit_breaker": settings}}})
    assert caught.value.path == f"services.db.circuit_breaker.{path}"
    assert fragment in str(caught.value)


def test_half_open_lets_exactly_one_of_many_concurrent_picks_through(clock: FakeClock) -> None:
    with lb_with(clock) as lb:
        fail(lb, "10.0.0.1:5432", 3)
        clock.advance(10.0)
        breaker = lb.stats("db")["10.0.0.1:5432"].breaker
        assert breaker is not None
        barrier = threading.Barrier(8)
        tickets: list[object] = []

        def admit() -> None:
            barrier.wait()
            tickets.append(breaker.admit())

        threads = [threading.Thread(target=admit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len([t for t in tickets if t]) == 1  # one probe ticket, seven refusals


def test_a_request_from_before_the_trip_does_not_decide_the_probe(clock: FakeClock) -> None:
    with lb_with(clock) as lb:
        early = lb.pick("db", exclude={"10.0.0.2:5432"})  # let through while closed
        fail(lb, "10.0.0.1:5432", 3)
        clock.advance(10.0)
        probe = lb.pick("db", exclude={"10.0.0.2:5432"})
        breaker = lb.stats("db")["10.0.0.1:5432"].breaker
        assert breaker is not None and breaker.state == "half-open"
        early.done()  # succeeds late: not the probe, no say
        assert breaker.state == "half-open" and breaker.admit() is None  # probe still out
        probe.done(success=False)
        assert breaker.state == "open"


def test_breaker_recovers_under_concurrent_load(clock: FakeClock) -> None:
    with lb_with(clock, fail_max=2, reset_timeout=1) as lb:
        healthy = threading.Event()
        stop = threading.Event()

        def worker() -> None:
            while not stop.is_set():
                try:
                    lease = lb.pick("db")
                except NoEndpointAvailable:
                    continue
                ok = healthy.is_set() or lease.address != "10.0.0.1:5432"
                lease.done(success=ok)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(200):  # failing, tripping, probing, failing again...
            clock.advance(0.05)
            threading.Event().wait(0.001)
        healthy.set()
        breaker = lb.stats("db")["10.0.0.1:5432"].breaker
        assert breaker is not None
        for _ in range(2000):
            clock.advance(0.05)
            if breaker.state == "closed":
                break
            threading.Event().wait(0.001)
        stop.set()
        for t in threads:
            t.join()
        assert breaker.state == "closed" and breaker.trips >= 1


def test_backups_take_requests_when_every_primary_breaker_refuses(clock: FakeClock) -> None:
    lb = LoadBalancer.from_config({"services": {"db": {
        "endpoints": ["10.0.0.1:5432"], "backups": ["10.0.9.1:5432"],
        "circuit_breaker": {"fail_max": 1, "reset_timeout": 10}}}}, clock=clock)
    with lb:
        with lb.pick("db") as lease:
            assert lease.address == "10.0.0.1:5432"
            lease.mark_failure()
        assert lb.pick("db").address == "10.0.9.1:5432"  # not NoEndpointAvailable


def test_breaker_locks_are_fresh_in_a_forked_child(clock: FakeClock) -> None:
    import os
    with lb_with(clock) as lb:
        breaker = lb.stats("db")["10.0.0.1:5432"].breaker
        assert breaker is not None
        fail(lb, "10.0.0.1:5432", 3)
        clock.advance(10)
        breaker._lock.acquire()
        breaker.breaker._lock.acquire()
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    signal_alarm = __import__("signal")
                    signal_alarm.alarm(5)
                    for _ in range(4):
                        lb.pick("db").done()
                    code = 0
                finally:
                    os._exit(code)
        finally:
            breaker.breaker._lock.release()
            breaker._lock.release()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
