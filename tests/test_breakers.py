"""Per-endpoint circuit breakers (pybreaker), driven by recorded outcomes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tai_lb import ConfigError, LoadBalancer, NoEndpointAvailable, load_config

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
