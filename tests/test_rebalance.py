"""Rebalancing: slow start ramps a new endpoint's share, a removed endpoint drains (its pools
close when its requests end or its drain times out), manual mode holds changes until
rebalance(), and every change is an event in status()."""

from __future__ import annotations

import collections
import socket
import threading
from typing import Any, Optional

import pytest
import requests

from tai_lb import (
    ConfigError,
    Endpoint,
    LoadBalancer,
    RebalanceConfig,
    SlowStartConfig,
    TopologyChange,
)
from tai_lb.config import LoadBalancerConfig, ServiceConfig
from tai_lb.rebalance import Rebalancer

from .backends import Backend, Factory
from .conftest import FakeClock, functions_on_stack, in_forked_child, wait_for

OLD = [f"10.0.0.{i}:80" for i in range(1, 5)]
NEW = "10.0.0.9:80"
WINDOW = 30.0
PICKS = 20_000


def ramp_balancer(clock: FakeClock, strategy: str = "round_robin",
                  **service: Any) -> LoadBalancer:
    settings = {"endpoints": OLD, "strategy": strategy, "rebalance": {"mode": "gradual"},
                "slow_start": {"window": WINDOW}, **service}
    return LoadBalancer.from_config({"services": {"svc": settings}}, clock=clock)


def shares(lb: LoadBalancer, picks: int = PICKS) -> collections.Counter[str]:
    """Each endpoint's share of ``picks`` picks (each released before the next)."""
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(picks):
        with lb.pick("svc") as lease:
            counts[lease.endpoint.address] += 1
    return collections.Counter({a: n / picks for a, n in counts.items()})


def kinds(lb: LoadBalancer, service: str = "svc") -> list[str]:
    return [e["kind"] for e in lb.status()["services"][service]["events"]]


# -- slow start ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["round_robin", "weighted", "least_connections",
                                      "peak_ewma", "consistent_hash", "maglev"])
def test_a_new_endpoints_share_ramps_over_the_window(strategy: str) -> None:
    clock = FakeClock()
    with ramp_balancer(clock, strategy) as lb:
        lb.registry.register("svc", NEW)
        steady = 1 / 5
        seen = []
        # (seconds since it was added, the factor the formula gives: max(0.1, t / window))
        for at, factor in ((0.0, 0.1), (3.0, 0.1), (7.5, 0.25), (15.0, 0.5), (24.0, 0.8),
                           (WINDOW, 1.0)):
            clock.now = 1000.0 + at
            lb.rebalance("svc")  # the route as of now (the rebalance thread does it too)
            share = shares(lb)[NEW] / steady
            seen.append((at, round(share, 3)))
            # SPEC: its weight is 1 x factor, against 4 for the others: factor / (4 + factor)
            assert abs(share - factor / (4 + factor) / steady) < 0.06, seen
        # the others share what the newcomer does not take, evenly
        final = shares(lb)
        assert all(abs(final[a] - steady) < 0.03 for a in OLD), final


@pytest.mark.parametrize("strategy", ["least_connections", "peak_ewma"])
def test_a_load_aware_strategy_cannot_undo_the_ramp(strategy: str) -> None:
    # An endpoint that gets few requests looks idle to these strategies: without slow start
    # it would take every pick until its load caught up with the others'.
    clock = FakeClock()
    with ramp_balancer(clock, strategy) as lb:
        held = [lb.pick("svc") for _ in range(400)]  # 100 in flight on each old endpoint
        lb.registry.register("svc", NEW)
        held += [lb.pick("svc") for _ in range(500)]
        on_new = sum(lease.address == NEW for lease in held)
        assert on_new < 30  # 0.1 x its fifth of 500 is 10
        for lease in held:
            lease.done()
    with LoadBalancer.from_config({"services": {"svc": {"endpoints": OLD,
                                                        "strategy": strategy}}}) as lb:
        held = [lb.pick("svc") for _ in range(400)]
        lb.registry.register("svc", NEW)
        held += [lb.pick("svc") for _ in range(500)]
        assert sum(lease.address == NEW for lease in held) > 90  # what the ramp holds back
        for lease in held:
            lease.done()


def test_the_ramp_follows_the_formula() -> None:
    linear = SlowStartConfig(window=10, aggression=1.0, min_weight_percent=10)
    assert [linear.factor(t) for t in (0, 0.5, 2.5, 5, 10, 11)] == [0.1, 0.1, 0.25, 0.5, 1, 1]
    steep = SlowStartConfig(window=10, aggression=2.0, min_weight_percent=0)
    assert steep.factor(2.5) == pytest.approx(0.5)  # (t / window) ** (1 / aggression)
    gentle = SlowStartConfig(window=10, aggression=0.5, min_weight_percent=0)
    assert gentle.factor(5) == pytest.approx(0.25)
    assert SlowStartConfig(min_weight_percent=0).factor(0) == 0.0


def test_endpoints_present_at_construction_start_at_full_weight() -> None:
    clock = FakeClock()
    with ramp_balancer(clock) as lb:
        counts = shares(lb, 4000)
        assert all(counts[a] == pytest.approx(0.25) for a in OLD)  # round robin: exact
        assert lb.topology.rebalancer.thread is None  # nothing ramps: no thread
        assert "slow_start_began" not in kinds(lb)
        status = lb.status()["services"]["svc"]
        assert all("slow_start_factor" not in e for e in status["endpoints"].values())


def test_slow_start_alone_ramps_and_the_thread_stops_when_the_ramp_ends() -> None:
    clock = FakeClock()
    config = {"services": {"svc": {"endpoints": OLD, "slow_start": {"window": 0.2}}}}
    with LoadBalancer.from_config(config, clock=clock) as lb:
        lb.registry.register("svc", NEW)
        thread = lb.topology.rebalancer.thread
        assert thread is not None and thread.name == "tai-lb-rebalance" and thread.daemon
        status = lb.status()["services"]["svc"]
        assert status["endpoints"][NEW]["slow_start_factor"] == 0.1
        assert status["rebalance"]["ramping"] == 1
        clock.advance(0.2)  # the window has passed: the thread's next round ends the ramp
        assert wait_for(lambda: lb.topology.rebalancer.thread is None)
        assert not thread.is_alive() or wait_for(lambda: not thread.is_alive())
        assert kinds(lb)[-2:] == ["slow_start_began", "slow_start_ended"]
        assert shares(lb, 5000)[NEW] == pytest.approx(0.2)


def test_immediate_mode_gives_a_new_endpoint_its_full_share_at_once() -> None:
    clock = FakeClock()
    config = {"services": {"svc": {"endpoints": OLD, "rebalance": {"mode": "immediate"}}}}
    with LoadBalancer.from_config(config, clock=clock) as lb:
        lb.registry.register("svc", NEW)
        assert shares(lb, 5000)[NEW] == pytest.approx(0.2)
        assert lb.topology.rebalancer.thread is None


def test_an_endpoint_removed_while_ramping_stops_ramping() -> None:
    clock = FakeClock()
    with ramp_balancer(clock) as lb:
        lb.registry.register("svc", NEW)
        lb.registry.deregister("svc", NEW)
        assert lb.status()["services"]["svc"]["rebalance"]["ramping"] == 0
        assert wait_for(lambda: lb.topology.rebalancer.thread is None)


def test_the_rebalance_thread_survives_a_failing_round_and_stops_on_close() -> None:
    clock = FakeClock()
    config = LoadBalancerConfig({"svc": ServiceConfig(
        slow_start=SlowStartConfig(window=0.4))})  # a round every 10 ms
    rounds: list[str] = []

    def rebuild(service: str) -> None:
        rounds.append(service)
        if len(rounds) == 1:
            raise RuntimeError("a broken round")

    rebalancer = Rebalancer(config, clock, rebuild)
    rebalancer.mark_built(lambda name: None)
    rebalancer.ramp("svc", [NEW])
    try:
        assert wait_for(lambda: len(rounds) >= 3)  # the round after the failure came
        thread = rebalancer.thread
        assert thread is not None and thread.is_alive()
    finally:
        rebalancer.close()
    thread.join(1.0)
    assert not thread.is_alive() and rebalancer.thread is None
    rebalancer.ramp("svc", ["10.0.0.10:80"])  # closed: no thread starts again
    assert rebalancer.thread is None


def test_the_ramp_and_its_thread_go_on_in_a_forked_child() -> None:
    clock = FakeClock()
    with ramp_balancer(clock) as lb:
        lb.registry.register("svc", NEW)

        def child() -> dict[str, Any]:
            thread = lb.topology.rebalancer.thread
            return {"thread": thread.name if thread is not None and thread.is_alive() else None,
                    "share": round(shares(lb, 5000)[NEW] / 0.2, 1)}

        report = in_forked_child(child, timeout=60)
    assert report == {"thread": "tai-lb-rebalance", "share": 0.1}


def test_picks_under_churn_while_endpoints_ramp_and_drain() -> None:
    config = {"services": {"svc": {"endpoints": OLD, "strategy": "least_connections",
                                   "rebalance": {"mode": "gradual", "drain_timeout": 0.05},
                                   "slow_start": {"window": 0.1}}}}
    errors: list[BaseException] = []
    stop = threading.Event()
    with LoadBalancer.from_config(config) as lb:

        def picker() -> None:
            try:
                while not stop.is_set():
                    held = [lb.pick("svc") for _ in range(3)]
                    for lease in held:
                        lease.done()
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=picker) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            for i in range(30):
                address = f"10.3.0.{i}:80"
                lb.registry.register("svc", address)
                if i % 2:
                    lb.registry.deregister("svc", address)
                    for _ in range(20):
                        with lb.pick("svc") as lease:
                            assert lease.address != address  # never after deregister()
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        assert errors == []
        figures = lb.stats("svc")
        assert sum(s.in_flight for s in figures.values()) == 0  # no count lost
        assert len(figures) == 4 + 15
        assert wait_for(lambda: lb.topology.rebalancer.thread is None)  # every ramp ended


# -- drain --------------------------------------------------------------------------------------


class Gate:
    """A backend behaviour that answers only once opened."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.open = threading.Event()
        self.entered = threading.Event()
        backend.behaviour = self

    def __call__(self, handler: Any, record: dict[str, Any]) -> None:
        self.entered.set()
        self.open.wait(10)
        self.backend.ok(handler, record)


def opened(endpoint: Endpoint) -> socket.socket:
    return socket.create_connection((endpoint.host, endpoint.port), timeout=5)


def drain_setup(backend_factory: Factory, clock: Optional[FakeClock] = None,
                **rebalance: Any) -> tuple[LoadBalancer, Backend, Backend, Gate]:
    slow, other = backend_factory("slow"), backend_factory("other")
    config = {"services": {"users": {
        "endpoints": [slow.address, other.address], "strategy": "round_robin",
        "rebalance": {"mode": "gradual", **rebalance}}}}
    lb = (LoadBalancer.from_config(config, clock=clock) if clock is not None
          else LoadBalancer.from_config(config))
    return lb, slow, other, Gate(slow)


def start_slow_request(lb: LoadBalancer, slow: Backend, gate: Gate,
                       ) -> tuple[threading.Thread, list[Any]]:
    """A request in flight on ``slow`` (an HTTP pool and a generic pool made for it)."""
    endpoint = Endpoint.from_value(slow.address)
    with lb.connection("users", opened, key=None):
        pass  # a generic pool for each endpoint: round robin gives one connection to each
    with lb.connection("users", opened):
        pass
    assert endpoint.address in lb.topology.connection_pools.pools()
    done: list[Any] = []
    session = lb.session()

    def call() -> None:
        try:
            done.append(session.get("http://users/slow", timeout=10).json()["backend"])
        except requests.RequestException as error:
            done.append(error)

    while True:  # round robin: a request goes to the slow backend at the first or second try
        thread = threading.Thread(target=call)
        thread.start()
        assert wait_for(lambda: gate.entered.is_set() or bool(done), 5)
        if gate.entered.is_set():
            break
        thread.join(5)
        done.clear()
    assert gate.entered.wait(5)
    return thread, done


def test_a_removed_endpoint_drains_then_its_pools_close(backend_factory: Factory) -> None:
    lb, slow, other, gate = drain_setup(backend_factory)
    with lb:
        thread, done = start_slow_request(lb, slow, gate)
        lb.registry.deregister("users", slow.address)
        # no new picks, at once
        assert {lb.pick("users").address for _ in range(20)} == {other.address}
        # its pools stay while its request is in flight
        assert ("127.0.0.1", slow.port) in lb.pools.endpoints()
        assert slow.address in lb.topology.connection_pools.pools()
        events = lb.status()["services"]["users"]["events"]
        began = [e for e in events if e["kind"] == "drain_began"]
        assert began == [{"at": began[0]["at"], "kind": "drain_began", "address": slow.address,
                          "in_flight": 1, "timeout": 30.0}]
        gate.open.set()
        thread.join(10)
        assert done == ["slow"]  # the request in flight finished
        assert ("127.0.0.1", slow.port) not in lb.pools.endpoints()
        assert slow.address not in lb.topology.connection_pools.pools()
        ended = [e for e in lb.status()["services"]["users"]["events"]
                 if e["kind"] == "drain_ended"]
        assert len(ended) == 1 and ended[0]["in_flight"] == 0 and not ended[0]["timed_out"]


def test_a_drain_ends_when_its_timeout_passes(backend_factory: Factory) -> None:
    clock = FakeClock()
    lb, slow, other, gate = drain_setup(backend_factory, clock, drain_timeout=5)
    with lb:
        thread, done = start_slow_request(lb, slow, gate)
        lb.registry.deregister("users", slow.address)
        clock.advance(4.9)
        lb.rebalance("users")
        assert ("127.0.0.1", slow.port) in lb.pools.endpoints()  # not yet
        clock.advance(0.1)  # the thread ends it within a round; rebalance() at once
        lb.rebalance("users")
        assert ("127.0.0.1", slow.port) not in lb.pools.endpoints()
        assert slow.address not in lb.topology.connection_pools.pools()
        ended = [e for e in lb.status()["services"]["users"]["events"]
                 if e["kind"] == "drain_ended"]
        assert len(ended) == 1 and ended[0]["in_flight"] == 1 and ended[0]["timed_out"]
        assert ended[0]["seconds"] == 5.0
        gate.open.set()
        thread.join(10)
        assert len(done) == 1  # the request in flight ended (its pool was closed under it)
        assert lb.stats("users").keys() == {other.address}
        assert wait_for(lambda: lb.topology.rebalancer.thread is None)


def test_the_drain_timeout_thread_ends_an_overdue_drain(backend_factory: Factory) -> None:
    lb, slow, _other, gate = drain_setup(backend_factory, drain_timeout=0.05)
    with lb:
        thread, done = start_slow_request(lb, slow, gate)
        lb.registry.deregister("users", slow.address)
        assert wait_for(lambda: ("127.0.0.1", slow.port) not in lb.pools.endpoints())
        assert "drain_ended" in kinds(lb, "users")  # by the thread: no rebalance() call
        assert lb.stats("users")  # still picking
        gate.open.set()
        thread.join(10)
        assert len(done) == 1
        assert wait_for(lambda: lb.topology.rebalancer.thread is None)


# -- manual mode --------------------------------------------------------------------------------


def test_manual_mode_holds_changes_until_rebalance() -> None:
    config = {"services": {"svc": {"endpoints": OLD, "rebalance": {"mode": "manual"}}}}
    with LoadBalancer.from_config(config) as lb:
        lb.registry.register("svc", NEW)
        lb.registry.deregister("svc", OLD[0])
        lb.registry.register("svc", Endpoint.from_value(OLD[1]).replace(weight=3))
        picked = {lb.pick("svc").address for _ in range(40)}
        assert picked == set(OLD)  # the membership last applied: the removal is held too
        status = lb.status()["services"]["svc"]
        assert status["rebalance"]["held"] == 3 and set(status["endpoints"]) == set(OLD)
        assert kinds(lb)[-3:] == ["held", "held", "held"]
        changes = lb.rebalance("svc")
        assert sorted((c.kind, c.endpoint.address) for c in changes) == [
            ("added", NEW), ("changed", OLD[1]), ("removed", OLD[0])]
        assert all(isinstance(c, TopologyChange) for c in changes)
        changed = next(c for c in changes if c.kind == "changed")
        assert changed.previous is not None and changed.previous.weight == 1
        assert {lb.pick("svc").address for _ in range(40)} == {NEW, *OLD[1:]}
        applied = lb.status()["services"]["svc"]["events"][-1]
        assert applied["kind"] == "applied"
        assert (applied["added"], applied["removed"], applied["changed"]) == (1, 1, 1)
        assert lb.rebalance("svc") == []  # nothing held any more
        assert lb.status()["services"]["svc"]["rebalance"]["held"] == 0


def test_manual_mode_counts_a_change_delivered_while_rebalance_reads_the_registry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A change registered (by another thread) just after rebalance() read the registry is not
    # in what it applies: it must stay counted as held, not be reset with the others.
    config = {"services": {"svc": {"endpoints": OLD, "rebalance": {"mode": "manual"}}}}
    with LoadBalancer.from_config(config) as lb:
        lb.registry.register("svc", NEW)
        assert lb.status()["services"]["svc"]["rebalance"]["held"] == 1
        read = lb.registry.get_snapshot
        late = "10.0.0.10:80"
        writers: list[threading.Thread] = []

        def get_snapshot(service: str) -> Any:
            snapshot = read(service)
            if not writers:
                writer = threading.Thread(target=lb.registry.register, args=("svc", late))
                writers.append(writer)
                writer.start()
                # until the change is counted, or its delivery waits for rebalance()'s step
                assert wait_for(lambda: not writer.is_alive()
                                or "hold" in functions_on_stack(writer))
            return snapshot

        monkeypatch.setattr(lb.registry, "get_snapshot", get_snapshot)
        changes = lb.rebalance("svc")
        writers[0].join(5)
        assert [(c.kind, c.endpoint.address) for c in changes] == [("added", NEW)]
        assert lb.status()["services"]["svc"]["rebalance"]["held"] == 1  # the late one waits
        assert [(c.kind, c.endpoint.address) for c in lb.rebalance("svc")] == [("added", late)]
        assert lb.status()["services"]["svc"]["rebalance"]["held"] == 0


def test_manual_mode_with_slow_start_ramps_from_the_rebalance() -> None:
    clock = FakeClock()
    config = {"services": {"svc": {"endpoints": OLD, "rebalance": {"mode": "manual"},
                                   "slow_start": {"window": WINDOW}}}}
    with LoadBalancer.from_config(config, clock=clock) as lb:
        lb.registry.register("svc", NEW)
        clock.advance(WINDOW)  # held all this time: its ramp has not begun
        lb.rebalance("svc")
        assert shares(lb)[NEW] / 0.2 == pytest.approx(0.1, abs=0.05)


def test_other_modes_return_no_changes_from_rebalance() -> None:
    with LoadBalancer.from_config({"services": {"svc": {"endpoints": OLD}}}) as lb:
        lb.registry.register("svc", NEW)
        assert lb.rebalance("svc") == []
        assert NEW in lb.stats("svc")


# -- events -------------------------------------------------------------------------------------


def test_every_change_is_an_event_with_its_figures() -> None:
    clock = FakeClock()
    with ramp_balancer(clock) as lb:
        lb.registry.register("svc", NEW)
        lb.registry.register("svc", Endpoint.from_value(NEW).replace(zone="eu-1a"))
        lb.registry.deregister("svc", NEW)
        events = lb.status()["services"]["svc"]["events"]
        assert [e["kind"] for e in events] == [
            "added", "added", "slow_start_began", "changed", "removed"]
        assert events[0]["count"] == 4 and events[0]["addresses"] == OLD  # construction
        assert events[2]["window"] == WINDOW and events[2]["addresses"] == [NEW]
        assert all(isinstance(e["at"], float) and e["at"] > 1e9 for e in events)  # wall clock
        status = lb.status()["services"]["svc"]["rebalance"]
        assert status == {"mode": "gradual", "drain_timeout": 30.0, "held": 0, "ramping": 0,
                          "slow_start": {"window": WINDOW, "aggression": 1.0,
                                         "min_weight_percent": 10.0}}


def test_the_events_are_bounded() -> None:
    with LoadBalancer.from_config({"services": {"svc": {"endpoints": OLD}}}) as lb:
        for i in range(150):
            lb.registry.register("svc", f"10.1.0.{i % 250}:80")
        events = lb.status()["services"]["svc"]["events"]
        assert len(events) == 100 and events[-1]["addresses"] == ["10.1.0.149:80"]


def test_a_large_change_is_one_event_listing_some_addresses() -> None:
    with LoadBalancer.from_config({"services": {"svc": {"endpoints": OLD}}}) as lb:
        lb.registry.register_many("svc", [f"10.2.{i // 250}.{i % 250}:80" for i in range(1000)])
        event = lb.status()["services"]["svc"]["events"][-1]
        assert event["kind"] == "added" and event["count"] == 1000
        assert len(event["addresses"]) == 20


# -- configuration ------------------------------------------------------------------------------


def service(**keys: Any) -> dict[str, Any]:
    return {"services": {"svc": {"endpoints": OLD, **keys}}}


BAD = [
    (service(rebalance={"mode": "slow"}), "services.svc.rebalance.mode", "immediate"),
    (service(rebalance={"drain_timeout": -1}), "services.svc.rebalance.drain_timeout", "from 0"),
    (service(rebalance={"drain_timeout": float("inf")}), "services.svc.rebalance.drain_timeout",
     "86400"),
    (service(rebalance={"drain_timeout": True}), "services.svc.rebalance.drain_timeout",
     "number"),
    (service(rebalance={"timeout": 3}), "services.svc.rebalance.timeout", "unknown key"),
    (service(rebalance=[]), "services.svc.rebalance", "mapping"),
    (service(slow_start={"window": 0}), "services.svc.slow_start.window", "> 0"),
    (service(slow_start={"window": float("nan")}), "services.svc.slow_start.window", "> 0"),
    (service(slow_start={"aggression": 0}), "services.svc.slow_start.aggression", "> 0"),
    (service(slow_start={"aggression": 1e9}), "services.svc.slow_start.aggression", "100"),
    (service(slow_start={"min_weight_percent": 101}),
     "services.svc.slow_start.min_weight_percent", "from 0 to 100"),
    (service(slow_start={"min_weight_percent": -1}),
     "services.svc.slow_start.min_weight_percent", "from 0 to 100"),
    (service(slow_start={"windw": 3}), "services.svc.slow_start.windw", "unknown key"),
    (service(rebalance={"mode": "immediate"}, slow_start={}), "services.svc.slow_start",
     "no effect"),
    ({"defaults": {"slow_start": {"window": -3}}, "services": {}}, "defaults.slow_start.window",
     "> 0"),
]


@pytest.mark.parametrize(("config", "path", "fragment"), BAD,
                         ids=[p for _c, p, _f in BAD])
def test_bad_rebalance_settings_name_their_key(config: dict[str, Any], path: str,
                                               fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        LoadBalancer.from_config(config)
    assert caught.value.path == path
    assert fragment in str(caught.value)


def test_the_settings_are_value_objects() -> None:
    assert RebalanceConfig().mode == "immediate" and RebalanceConfig().drain_timeout == 30.0
    assert SlowStartConfig() == SlowStartConfig(window=30, aggression=1, min_weight_percent=10)
    assert SlowStartConfig().new(window=5).window == 5.0
    with pytest.raises(ConfigError):
        SlowStartConfig().new(window=-1)


def test_slow_start_ramps_a_new_endpoint_inside_its_zone_with_zone_aware_routing() -> None:
    # Locality prepares one picker per zone: the ramp must hold there too.
    clock = FakeClock()
    local = [{"address": f"10.0.1.{i}:80", "zone": "a"} for i in range(1, 4)]
    remote = [{"address": f"10.0.2.{i}:80", "zone": "b"} for i in range(1, 4)]
    config = {"zone": "a", "services": {"svc": {
        "endpoints": local + remote, "locality": {"min_cluster_size": 1},
        "rebalance": {"mode": "gradual"}, "slow_start": {"window": WINDOW}}}}
    with LoadBalancer.from_config(config, clock=clock) as lb:
        lb.registry.register("svc", Endpoint.parse("10.0.1.9:80", zone="a"))
        got = shares(lb, 8000)
    # All traffic stays in zone a; at t = 0 the newcomer gets min_weight_percent (10%) of its
    # full share there (a quarter of the zone's picks): 2.5%, not 25%.
    assert sum(share for address, share in got.items()
               if address.startswith("10.0.1.")) == pytest.approx(1.0)
    assert got["10.0.1.9:80"] < 0.06


@pytest.mark.parametrize("strategy", ["round_robin", "peak_ewma", "consistent_hash", "maglev"])
def test_a_ramping_endpoints_weight_is_its_weight_times_the_factor(strategy: str) -> None:
    # SPEC: weight x max(min_weight_percent / 100, (t / window) ** (1 / aggression)).  With one
    # old endpoint of weight 1 and a new one at factor f, the new one's share is f / (1 + f)
    # (0.091 at f = 0.1, a third at f = 0.5), not f x its full half.
    clock = FakeClock()
    config = {"services": {"svc": {"endpoints": [OLD[0]], "strategy": strategy,
                                   "rebalance": {"mode": "gradual"},
                                   "slow_start": {"window": WINDOW}}}}
    with LoadBalancer.from_config(config, clock=clock) as lb:
        lb.registry.register("svc", NEW)
        for at, factor in ((0.0, 0.1), (WINDOW / 2, 0.5)):
            clock.now = 1000.0 + at
            lb.rebalance("svc")
            keyed = strategy in ("consistent_hash", "maglev")
            counts: collections.Counter[str] = collections.Counter()
            for i in range(20_000):
                with lb.pick("svc", f"user-{i}" if keyed else None) as lease:
                    counts[lease.address] += 1
            assert counts[NEW] / 20_000 == pytest.approx(factor / (1 + factor), abs=0.02)
