"""Routes are built off the request path and published whole; picks never wait for a build."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import pytest

import tai_lb
from tai_lb import Endpoint, LoadBalancer, ServiceRegistry
from tai_lb.stats import EndpointStats
from tai_lb.strategies import Picker, RoundRobin

from .conftest import wait_for


class GatedRoundRobin(RoundRobin):
    """round_robin whose preparation, once armed, waits for ``gate`` (or raises once)."""

    name = "gated_round_robin"

    def __init__(self) -> None:
        super().__init__(start=0)
        self.armed = False
        self.fail_once = False
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.threads: list[str] = []

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        self.threads.append(threading.current_thread().name)
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("this build fails")
        if self.armed:
            self.entered.set()
            assert self.gate.wait(10)
        return super().prepare(candidates)


def make(strategy: GatedRoundRobin, *addresses: str) -> LoadBalancer:
    reg = ServiceRegistry()
    reg.register_many("users", addresses)
    lb = LoadBalancer(reg, strategy=strategy)
    lb.pick("users").done()  # the first route, built by the first pick
    return lb


def test_the_thread_that_changes_the_registry_builds_the_route() -> None:
    strategy = GatedRoundRobin()
    lb = make(strategy, "10.0.0.1:80")
    writer = threading.Thread(target=lb.registry.register, args=("users", "10.0.0.2:80"),
                              name="writer")
    writer.start()
    writer.join()
    assert strategy.threads[-1] == "writer"
    seen = {lb.pick("users").address for _ in range(4)}
    assert seen == {"10.0.0.1:80", "10.0.0.2:80"}
    lb.close()


def test_picks_go_on_with_the_last_route_while_a_new_one_is_built() -> None:
    strategy = GatedRoundRobin()
    lb = make(strategy, "10.0.0.1:80", "10.0.0.2:80")
    strategy.armed = True
    writer = threading.Thread(target=lb.registry.register, args=("users", "10.0.0.3:80"))
    writer.start()
    try:
        assert strategy.entered.wait(10)  # the writer's thread is building, and stays there
        picked = [lb.pick("users").address for _ in range(20)]
        assert set(picked) == {"10.0.0.1:80", "10.0.0.2:80"}  # the last route, not waited for
    finally:
        strategy.gate.set()
        writer.join()
    assert wait_for(lambda: "10.0.0.3:80" in {lb.pick("users").address for _ in range(6)})
    lb.close()


def test_a_change_during_the_first_pick_s_build_reaches_the_route() -> None:
    # The first pick builds on its own thread; a change that lands meanwhile finds the lock
    # taken and leaves it to the builder, which must build again (CI once lost an etcd add so).
    strategy = GatedRoundRobin()
    strategy.armed = True
    reg = ServiceRegistry()
    reg.register("users", "10.0.0.1:80")
    lb = LoadBalancer(reg, strategy=strategy)
    first = threading.Thread(target=lambda: lb.pick("users").done(), name="first-pick")
    first.start()
    try:
        assert strategy.entered.wait(10)  # the first build has read the old snapshot
        strategy.armed = False
        writer = threading.Thread(target=reg.register, args=("users", "10.0.0.2:80"))
        writer.start()
        writer.join(10)
        assert not writer.is_alive()  # the change did not wait for the build
    finally:
        strategy.gate.set()
        first.join(10)
    assert {lb.pick("users").address for _ in range(4)} == {"10.0.0.1:80", "10.0.0.2:80"}
    lb.close()


def test_a_pick_after_deregister_never_gets_the_removed_endpoint_while_a_build_runs() -> None:
    strategy = GatedRoundRobin()
    lb = make(strategy, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
    strategy.armed = True
    writer = threading.Thread(target=lb.registry.deregister, args=("users", "10.0.0.1:80"))
    writer.start()
    assert strategy.entered.wait(10)
    # The registry has published the removal; the route that picks have still holds it.
    assert "10.0.0.1:80" not in lb.registry.snapshot("users").by_address
    release = threading.Timer(0.2, strategy.gate.set)  # the pick that lands on it waits
    release.start()
    try:
        picked = [lb.pick("users").address for _ in range(9)]
    finally:
        strategy.gate.set()
        release.join()
        writer.join()
    assert "10.0.0.1:80" not in picked
    assert set(picked) == {"10.0.0.2:80", "10.0.0.3:80"}
    lb.close()


def test_a_failed_build_is_logged_and_the_last_route_stays(
        caplog: pytest.LogCaptureFixture) -> None:
    strategy = GatedRoundRobin()
    lb = make(strategy, "10.0.0.1:80")
    strategy.fail_once = True
    with caplog.at_level(logging.ERROR, logger="tai_lb.routing.router"):
        lb.registry.register("users", "10.0.0.2:80")  # its build raises on this thread
    assert "building the route of users failed" in caplog.text
    assert lb.pick("users").address == "10.0.0.1:80"  # the last route
    # Inspection shows the current state: it builds the route for the current snapshot.
    assert [s.endpoint.address for s in lb.route("users").candidates] == [
        "10.0.0.1:80", "10.0.0.2:80"]
    assert {lb.pick("users").address for _ in range(4)} == {"10.0.0.1:80", "10.0.0.2:80"}
    lb.close()


def test_a_health_change_publishes_a_route_on_the_checker_thread() -> None:
    healthy = {"10.0.0.1:80": True, "10.0.0.2:80": True}
    strategy = GatedRoundRobin()
    checks = tai_lb.HealthCheckConfig(type="function", interval=0.01, jitter=0.0,
                                      healthy_threshold=1, unhealthy_threshold=1,
                                      function=lambda e: healthy[e.address])
    config = tai_lb.LoadBalancerConfig({"users": tai_lb.ServiceConfig(
        strategy=strategy, health_check=checks)})
    reg = ServiceRegistry()
    reg.register_many("users", [Endpoint.parse(a) for a in healthy])
    with LoadBalancer(reg, config=config) as lb:
        lb.pick("users").done()
        healthy["10.0.0.2:80"] = False
        assert wait_for(lambda: {lb.pick("users").address for _ in range(4)} == {"10.0.0.1:80"})
        assert any(name.startswith("tai-lb-health") for name in strategy.threads)
