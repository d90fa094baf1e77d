"""LoadBalancer: leases, status(), close(), exclusion, topology changes and forks."""

from __future__ import annotations

import collections
import json
import os
import random
import threading
from typing import Any, Optional

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

from .conftest import FakeClock, in_forked_child


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
def test_usable_in_a_child_forked_while_its_lock_was_held() -> None:
    # The registry's lock and the figures' locks, held at a fork: test_registry and test_stats.
    reg = ServiceRegistry()
    reg.register("users", "10.0.0.1:80")
    lb = LoadBalancer(reg)  # no pick yet: the child's first pick takes the lock

    def child() -> dict[str, Any]:
        reg.register("users", "10.0.0.2:80")
        with lb.pick("users") as lease:
            return {"address": lease.address}

    lb._lock.acquire()  # as if another thread were writing at the moment of the fork
    report = in_forked_child(child, lb._lock.release, timeout=10)
    assert report["address"].startswith("10.0.0.")
    lb.close()


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


# -- routes rebuilt from a snapshot's delta equal routes built from scratch ------------------------


def random_change(rng: random.Random, reg: ServiceRegistry) -> None:
    """One write to "users": a register, a deregister, a metadata change or a full update."""
    pool = [f"10.0.{i // 40}.{i % 40}:80" for i in range(80)]
    current = list(reg.endpoints("users"))
    kind = rng.randrange(5)
    if kind == 0 or len(current) < 3:
        reg.register("users", Endpoint.parse(rng.choice(pool), weight=rng.randrange(1, 4)))
    elif kind == 1:
        reg.deregister("users", rng.choice(current))
    elif kind == 2:
        endpoint = rng.choice(current)
        reg.register("users", endpoint.replace(weight=rng.randrange(1, 4)))
    elif kind == 3:
        endpoint = rng.choice(current)
        reg.register("users", endpoint.replace(zone=rng.choice(["a", "b"]),
                                               priority=rng.choice([0, 0, 0, 1])))
    else:
        kept = [e for e in current if rng.random() < 0.9]
        reg.set_endpoints("users", kept + [Endpoint.parse(a) for a in rng.sample(pool, 3)])


@pytest.mark.parametrize("name", ["round_robin", "weighted_round_robin", "least_connections",
                                  "peak_ewma", "consistent_hash", "weighted", "random",
                                  "maglev"])
def test_routes_after_small_changes_equal_routes_built_from_scratch(name: str) -> None:
    from tai_lb.strategies import (
        ConsistentHash,
        Maglev,
        WeightedRoundRobin,
        bucket_index,
        build_ring,
        build_table,
        ring_of,
        table_of,
    )

    def strategy() -> tai_lb.Strategy:
        if name == "consistent_hash":
            return ConsistentHash(vnodes=40, max_ring_size=4096)
        if name == "maglev":
            return Maglev(table_size=1009)
        if name == "weighted_round_robin":
            return WeightedRoundRobin(start=0)
        return tai_lb.strategies.resolve_strategy(name)

    rng = random.Random(name)
    reg = ServiceRegistry()
    reg.register_many("users", [Endpoint("10.0.0.1", 80 + i, weight=1 + i % 2) for i in range(30)])
    lb = LoadBalancer(reg, strategy=strategy())
    keys = [f"user-{i}" for i in range(200)]
    for _ in range(80):
        before = lb.stats("users")
        random_change(rng, reg)
        lb.pick("users", key="warm").done()
        after = lb.stats("users")
        for address, stats in after.items():  # live figures survive every change
            assert before.get(address, stats) is stats
            assert stats.endpoint is reg.snapshot("users").by_address[address]
        fresh = LoadBalancer(reg, strategy=strategy())
        route, fresh_route = lb.route("users"), fresh.route("users")
        assert [s.endpoint for s in route.everyone] == [s.endpoint for s in fresh_route.everyone]
        assert [s.endpoint for s in route.candidates] == [
            s.endpoint for s in fresh_route.candidates]
        if name == "consistent_hash":
            ring = ring_of(route.picker)
            assert ring is not None
            hashes, owners = build_ring(route.candidates, 40, 4096)
            assert list(ring.hashes) == hashes and ring.owners == owners
            assert (ring.shift, list(ring.starts)) == bucket_index(hashes)
            assert [lb.pick("users", key=k).address for k in keys] == [
                fresh.pick("users", key=k).address for k in keys]
        if name == "maglev":
            table = table_of(route.picker)
            assert table is not None
            ordered = sorted(route.candidates, key=lambda s: s.endpoint.address)
            assert table.owners == build_table(ordered, 1009)
            assert [lb.pick("users", key=k).address for k in keys] == [
                fresh.pick("users", key=k).address for k in keys]
        if name == "weighted_round_robin":
            period = sum(s.endpoint.weight for s in route.candidates)
            # Pickers prepared afresh (sequence at 0) over both routes' candidates agree.
            ours, theirs = (strategy().prepare(r.candidates) for r in (route, fresh_route))
            assert [ours(None).endpoint.address for _ in range(period)] == [
                theirs(None).endpoint.address for _ in range(period)]
        fresh.close()
    lb.close()


def test_health_targets_follow_registry_changes_one_by_one(clock: FakeClock) -> None:
    reg = ServiceRegistry()
    reg.register_many("users", ["10.0.0.1:80", "10.0.0.2:80"])
    checks = tai_lb.HealthCheckConfig(type="function", function=lambda e: True, interval=3600.0)
    config = tai_lb.LoadBalancerConfig({"users": tai_lb.ServiceConfig(health_check=checks)})
    rng = random.Random(3)
    with LoadBalancer(reg, config=config, clock=clock) as lb:
        for _ in range(60):
            random_change(rng, reg)
            assert set(lb.health_checker.targets("users")) == set(reg.snapshot("users").by_address)
            for address, endpoint in reg.snapshot("users").by_address.items():
                target = lb.health_checker.target("users", address)
                assert target is not None and target.endpoint is endpoint


def test_an_endpoint_removed_and_back_in_one_delivery_keeps_its_pools(clock: FakeClock) -> None:
    lb = make_lb(clock, "10.0.0.1:80", "10.0.0.2:80")
    reg = lb.registry
    lease = lb.pick("users")
    while lease.address != "10.0.0.1:80":
        lease.done()
        lease = lb.pick("users")

    def bounce(change: tai_lb.TopologyChange) -> None:
        if change.endpoint.address == "10.0.0.3:80":
            # Both writes are queued while this delivery runs: the balancer gets them together.
            reg.deregister("users", "10.0.0.1:80")
            reg.register("users", "10.0.0.1:80")

    reg.subscribe(bounce)
    reg.register("users", "10.0.0.3:80")
    stats = lb.stats("users")["10.0.0.1:80"]
    assert stats.on_drained is None and not lb.topology.draining  # back before it drained
    lease.done()
    reg.deregister("users", "10.0.0.2:80")  # nothing in flight: closed at once, no drain
    assert not lb.topology.draining


def test_a_lease_ending_as_its_endpoint_is_removed_still_closes_its_pools(
        clock: FakeClock) -> None:
    from tai_lb.pool import PoolConfig

    lb = make_lb(clock, "10.0.0.1:80", "10.0.0.2:80")
    lease = lb.pick("users")
    stats = lb.stats("users")[lease.address]
    lb.pools.pool_for(stats.endpoint.host, stats.endpoint.port, "http", PoolConfig(), None,
                       dict)

    class EndsOnceSeen(collections.deque):  # type: ignore[type-arg]
        """The lease ends right after the balancer sees it in flight, as if on another thread."""

        armed = False

        def __len__(self) -> int:
            count = super().__len__()
            if self.armed and count:
                self.armed = False
                lease.done()
            return count

        def __bool__(self) -> bool:  # how truth is asked differs between Pythons
            return len(self) > 0

    in_flight = EndsOnceSeen(stats.load)
    stats.load = in_flight
    in_flight.armed = True
    lb.registry.deregister("users", lease.address)
    assert not in_flight and not in_flight.armed  # the lease ended during the removal
    assert stats.on_drained is None and not lb.topology.draining  # drained: nothing left waiting
    assert (stats.endpoint.host, stats.endpoint.port) not in lb.pools.endpoints()
    lb.close()


def test_health_targets_match_the_registry_when_it_changes_as_the_balancer_starts(
        clock: FakeClock) -> None:
    class Busy(ServiceRegistry):
        """Another thread registers an endpoint just after the balancer reads the set."""

        def get_snapshot(self, service: str) -> Optional[tai_lb.ServiceSnapshot]:
            snapshot = super().get_snapshot(service)
            if service == "users" and "10.0.0.9:80" not in self.snapshot("users").by_address:
                self.register("users", "10.0.0.9:80")  # delivered to the balancer at once
            return snapshot

    reg = Busy()
    reg.register("users", "10.0.0.1:80")
    checks = tai_lb.HealthCheckConfig(type="function", function=lambda e: True, interval=3600.0)
    config = tai_lb.LoadBalancerConfig({"users": tai_lb.ServiceConfig(health_check=checks)})
    with LoadBalancer(reg, config=config, clock=clock) as lb:
        assert set(lb.health_checker.targets("users")) == {"10.0.0.1:80", "10.0.0.9:80"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_child_forked_while_a_picker_held_its_lock_picks_with_a_new_one() -> None:
    from tai_lb.strategies import WeightedRoundRobin

    # A weighted_round_robin period too long to precompute is stepped under the picker's lock:
    # held by a parent's thread at the fork, it would be held for ever in the child.
    reg = ServiceRegistry()
    reg.register_many("users", [Endpoint("10.0.0.1", 80, weight=2),
                                Endpoint("10.0.0.2", 80, weight=3)])
    lb = LoadBalancer(reg, strategy=WeightedRoundRobin(max_period=2))
    lb.pick("users").done()
    picker = lb.route("users").picker
    lock = next(c.cell_contents for c in picker.__closure__ or ()  # type: ignore[union-attr]
                if isinstance(c.cell_contents, type(threading.Lock())))
    with lock:  # as if a parent's thread were picking at the moment of the fork
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                code = 0 if lb.route("users").picker is not picker else 3
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    lb.close()


def test_racing_writers_and_pickers_never_pick_a_removed_endpoint_and_end_in_step() -> None:
    from tai_lb.strategies import ConsistentHash, build_ring, ring_of

    reg = ServiceRegistry()
    reg.register_many("users", [Endpoint("10.9.0.1", 80 + i) for i in range(10)])
    checks = tai_lb.HealthCheckConfig(type="function", function=lambda e: True, interval=3600.0)
    config = tai_lb.LoadBalancerConfig({"users": tai_lb.ServiceConfig(
        health_check=checks, strategy=ConsistentHash(vnodes=40, max_ring_size=4096))})
    lb = LoadBalancer(reg, config=config)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(writer: int) -> None:  # each writer owns its addresses
        rng = random.Random(writer)
        mine = [f"10.{writer}.0.{i}:80" for i in range(20)]
        try:
            for _ in range(150):
                kind = rng.randrange(3)
                if kind == 0:
                    reg.register_many("users", [Endpoint.parse(
                        a, weight=rng.randrange(1, 3), priority=rng.choice([0, 0, 1]))
                        for a in rng.sample(mine, 3)])
                else:
                    gone = rng.sample(mine, 1 + kind)
                    reg.deregister_many("users", gone)
                    for i in range(10):  # picks that start after the removal returned
                        with lb.pick("users", key=f"{writer}-{i}") as lease:
                            assert lease.address not in gone
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def pick() -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                with lb.pick("users", key=str(i)):
                    pass
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    pickers = [threading.Thread(target=pick) for _ in range(3)]
    writers = [threading.Thread(target=write, args=(n,)) for n in range(1, 5)]
    for thread in pickers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in pickers:
        thread.join()
    assert errors == []
    snapshot = reg.snapshot("users")
    assert set(lb.health_checker.targets("users")) == set(snapshot.by_address)
    route = lb.route("users")
    assert [s.endpoint for s in route.everyone] == list(snapshot.endpoints)
    assert all(s.in_flight == 0 for s in route.everyone)
    hashes, owners = build_ring(route.candidates, 40, 4096)
    ring = ring_of(route.picker)
    assert ring is not None
    assert (list(ring.hashes), ring.owners) == (hashes, owners)
    lb.close()
