"""LoadBalancer: leases, status(), close(), exclusion, topology changes and forks."""

from __future__ import annotations

import json
import os
import threading

import pytest

import tai_lb
from tai_lb import (
    Endpoint,
    LoadBalancer,
    LoadBalancerError,
    NoEndpointAvailable,
    ServiceRegistry,
    UnknownService,
)

from .conftest import FakeClock


def make_lb(clock: FakeClock, *addresses: str, strategy: str = "round_robin") -> LoadBalancer:
    reg = ServiceRegistry()
    reg.add_service("users")
    reg.register_many("users", addresses)
    return LoadBalancer(reg, strategy=strategy, clock=clock)


def test_spec_example_from_python_objects() -> None:
    reg = tai_lb.ServiceRegistry()
    reg.register("users", tai_lb.Endpoint("127.0.0.1", 8001, zone="eu-1a", version="1.4",
                                          labels={"canary": "no"}))
    lb = tai_lb.LoadBalancer(reg, strategy="round_robin")
    with lb.pick("users", key="user-42") as lease:
        assert lease.endpoint.address == "127.0.0.1:8001"
        assert lease.key == "user-42"
        assert lb.stats("users")["127.0.0.1:8001"].in_flight == 1
    assert lb.stats("users")["127.0.0.1:8001"].in_flight == 0


def test_lease_records_latency_and_success(clock: FakeClock) -> None:
    lb = make_lb(clock, "127.0.0.1:8001")
    with lb.pick("users"):
        clock.advance(0.25)
    stats = lb.stats("users")["127.0.0.1:8001"]
    assert (stats.successes, stats.failures, stats.in_flight) == (1, 0, 0)
    assert stats.last_latency == pytest.approx(0.25)
    assert stats.latency_ewma == pytest.approx(0.25)


def test_exception_inside_lease_is_a_failure_and_propagates(clock: FakeClock) -> None:
    lb = make_lb(clock, "127.0.0.1:8001")
    with pytest.raises(ZeroDivisionError), lb.pick("users"):
        1 / 0  # noqa: B018
    stats = lb.stats("users")["127.0.0.1:8001"]
    assert (stats.successes, stats.failures, stats.in_flight) == (0, 1, 0)


def test_mark_failure_and_done_once(clock: FakeClock) -> None:
    lb = make_lb(clock, "127.0.0.1:8001")
    with lb.pick("users") as lease:
        lease.mark_failure()
    lease.done()  # already released: nothing more is counted
    lease2 = lb.pick("users")
    lease2.done(success=True, latency=0.5)
    with lease2:
        pass
    stats = lb.stats("users")["127.0.0.1:8001"]
    assert (stats.successes, stats.failures, stats.in_flight) == (1, 1, 0)
    assert lease.released and "released" in repr(lease)


def test_unknown_service_and_empty_service(clock: FakeClock) -> None:
    lb = make_lb(clock)
    with pytest.raises(UnknownService):
        lb.pick("billing")
    with pytest.raises(NoEndpointAvailable) as caught:
        lb.pick("users")
    assert caught.value.service == "users"


def test_exclude_picks_another_endpoint_while_one_remains(clock: FakeClock) -> None:
    lb = make_lb(clock, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", strategy="consistent_hash")
    for i in range(100):
        home = lb.pick("users", key=f"k{i}")
        home.done()
        with lb.pick("users", key=f"k{i}", exclude={home.address}) as other:
            assert other.address != home.address
    with lb.pick("users", exclude={"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}) as last:
        assert last.address in {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}


def test_status_is_json_serialisable_and_complete(clock: FakeClock) -> None:
    reg = ServiceRegistry()
    reg.register("users", Endpoint("127.0.0.1", 8001, weight=3, zone="eu-1a"))
    reg.add_service("billing")
    lb = LoadBalancer(reg, strategy="peak_ewma", clock=clock)
    held = lb.pick("users")
    with lb.pick("users"):
        clock.advance(0.01)
    status = json.loads(json.dumps(lb.status()))
    users = status["services"]["users"]
    assert users["strategy"] == "peak_ewma"
    assert users["in_flight"] == 1
    entry = users["endpoints"]["127.0.0.1:8001"]
    assert entry["weight"] == 3 and entry["zone"] == "eu-1a"
    assert entry["health"] == "unchecked"  # no health_check configured
    assert (entry["in_flight"], entry["requests"], entry["successes"]) == (1, 1, 1)
    assert entry["latency_ewma_ms"] == pytest.approx(10.0)
    assert status["services"]["billing"]["endpoints"] == {}
    held.done()


def test_metadata_change_keeps_live_figures(clock: FakeClock) -> None:
    lb = make_lb(clock, "10.0.0.1:80", strategy="weighted")
    open_lease = lb.pick("users")
    lb.pick("users").done()
    lb.registry.register("users", Endpoint("10.0.0.1", 80, weight=5))
    stats = lb.stats("users")["10.0.0.1:80"]
    assert stats.endpoint.weight == 5
    assert (stats.in_flight, stats.successes) == (1, 1)
    open_lease.done()
    assert stats.in_flight == 0


def test_removed_endpoint_lease_still_finishes(clock: FakeClock) -> None:
    lb = make_lb(clock, "10.0.0.1:80", "10.0.0.2:80")
    leases = [lb.pick("users") for _ in range(2)]
    lb.registry.deregister("users", "10.0.0.1:80")
    assert list(lb.stats("users")) == ["10.0.0.2:80"]
    for lease in leases:
        lease.done()  # no error, counts go back to zero
    assert lb.status()["services"]["users"]["in_flight"] == 0


def test_close_and_with(clock: FakeClock) -> None:
    lb = make_lb(clock, "10.0.0.1:80")
    with lb as same:
        assert same is lb
        lb.pick("users").done()
    assert lb.closed
    with pytest.raises(LoadBalancerError, match="closed"):
        lb.pick("users")
    lb.close()  # twice is fine
    assert lb.status()["closed"] is True
    assert "10.0.0.1:80" in lb.status()["services"]["users"]["endpoints"]


def test_from_config_dict_builds_services_with_their_strategies() -> None:
    lb = LoadBalancer.from_config({
        "defaults": {"strategy": "least_connections"},
        "services": {
            "users": {"endpoints": ["127.0.0.1:8001",
                                    {"address": "127.0.0.1:8002", "weight": 3, "zone": "eu-1a"}],
                      "strategy": "peak_ewma"},
            "billing": {"endpoints": ["127.0.0.1:9001"]},
            "empty": {"endpoints": []},
        },
    })
    status = lb.status()["services"]
    assert status["users"]["strategy"] == "peak_ewma"
    assert status["billing"]["strategy"] == "least_connections"
    assert lb.registry.endpoints("users")[1].zone == "eu-1a"
    with pytest.raises(NoEndpointAvailable):
        lb.pick("empty")
    assert lb.service_config("users").retries.attempts == 3


def test_default_strategy_is_round_robin() -> None:
    lb = LoadBalancer.from_config({"services": {"users": {"endpoints": ["127.0.0.1:1"]}}})
    assert lb.status()["services"]["users"]["strategy"] == "round_robin"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_usable_in_a_child_forked_while_every_lock_was_held() -> None:
    reg = ServiceRegistry()
    reg.register("users", "10.0.0.1:80")
    lb = LoadBalancer(reg)
    stats_lock = lb.stats("users")["10.0.0.1:80"]._lock
    held = [reg._lock, lb._lock, stats_lock]
    for lock in held:  # as if other threads were writing at the moment of the fork
        lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                reg.register("users", "10.0.0.2:80")
                with lb.pick("users") as lease:
                    code = 0 if lease.address.startswith("10.0.0.") else 3
            finally:
                os._exit(code)
    finally:
        for lock in held:
            lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_picks_survive_concurrent_topology_changes_with_counts_intact() -> None:
    reg = ServiceRegistry()
    reg.register_many("users", [f"10.0.0.{i}:80" for i in range(1, 11)])
    lb = LoadBalancer(reg, strategy="least_connections")
    stop = threading.Event()
    errors: list[BaseException] = []
    picks: list[int] = []

    def pick_loop() -> None:
        count = 0
        try:
            while not stop.is_set():
                with lb.pick("users"):
                    count += 1
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)
        picks.append(count)

    threads = [threading.Thread(target=pick_loop) for _ in range(6)]
    for t in threads:
        t.start()
    for i in range(300):
        reg.register("users", f"10.0.1.{i % 20}:80")
        reg.deregister("users", f"10.0.1.{(i + 10) % 20}:80")
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert len(picks) == 6 and sum(picks) > 0
    assert all(s.in_flight == 0 for s in lb.stats("users").values())
    assert lb.status()["services"]["users"]["in_flight"] == 0  # removed endpoints included
