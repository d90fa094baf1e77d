"""The chaos suite: faults injected under real load (8 client threads) through a fault proxy.

Each case asserts behaviour (errors seen, ejections, events), never a timing; latency figures
under faults are in benchmarks/faults.py.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tai_lb import LoadBalancer, NoEndpointAvailable, TopologyChange

from .backends import Backend
from .conftest import wait_for
from .faultproxy import FaultProxy

THREADS = 8



class Load:
    """THREADS client threads sending GETs through the balancer until stopped."""

    def __init__(self, lb: LoadBalancer, timeout: Any = 2.0) -> None:
        self.lb = lb
        self.timeout = timeout
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.threads = [threading.Thread(target=self._run) for _ in range(THREADS)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        session = self.lb.session()
        while not self.stop_event.is_set():
            try:
                response = session.get("http://users/", timeout=self.timeout)
                outcome = str(response.status_code)
            except NoEndpointAvailable:
                outcome = "NoEndpointAvailable"
            except requests.exceptions.RequestException as error:
                outcome = type(error).__name__
            with self.lock:
                self.outcomes[outcome] += 1

    def total(self) -> int:
        with self.lock:
            return sum(self.outcomes.values())

    def run_for(self, requests_count: int) -> None:
        start = self.total()
        assert wait_for(lambda: self.total() - start >= requests_count, 30.0)

    def stop(self) -> collections.Counter[str]:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(10)
        return self.outcomes


@pytest.fixture
def fleet() -> Iterator[tuple[list[Backend], list[FaultProxy]]]:
    servers = [Backend(f"s{i}") for i in range(5)]
    proxies = [FaultProxy(("127.0.0.1", s.port), f"p{i}") for i, s in enumerate(servers)]
    yield servers, proxies
    for proxy in proxies:
        proxy.stop()
    for server in servers:
        with contextlib.suppress(OSError):
            server.stop()


def balancer(proxies: list[FaultProxy], **service: Any) -> LoadBalancer:
    return LoadBalancer.from_config({"services": {"users": {
        "endpoints": [p.address for p in proxies], "strategy": "round_robin", **service}}})


def test_two_of_five_killed_mid_load_no_failed_request_and_both_ejected(
        fleet: tuple[list[Backend], list[FaultProxy]]) -> None:
    _, proxies = fleet
    threshold = 3
    lb = balancer(proxies, outlier_detection={
        "consecutive_local_origin_failure": threshold, "max_ejection_percent": 50})
    with lb:
        load = Load(lb)
        load.run_for(200)
        for proxy in proxies[:2]:
            proxy.mode = "refuse"  # the process dies: listener gone, connections cut
        assert wait_for(lambda: all(lb.outlier_detector.is_ejected("users", p.address)
                                    for p in proxies[:2]))
        load.run_for(300)
        outcomes = load.stop()
        for proxy in proxies[:2]:
            failures = lb.stats("users")[proxy.address].failures
            # ejected within the threshold, plus what was already in flight
            assert failures <= threshold + THREADS
    assert set(outcomes) == {"200"}  # not one failed idempotent request


def test_a_backend_that_never_answers_is_timed_out_retried_and_ejected(
        fleet: tuple[list[Backend], list[FaultProxy]]) -> None:
    _, proxies = fleet
    lb = balancer(proxies, outlier_detection={"consecutive_local_origin_failure": 2})
    with lb:
        load = Load(lb, timeout=(1.0, 0.3))
        load.run_for(100)
        proxies[0].mode = "blackhole"
        proxies[0].cut_all()
        assert wait_for(lambda: lb.outlier_detector.is_ejected("users", proxies[0].address))
        load.run_for(200)
        outcomes = load.stop()
    assert set(outcomes) == {"200"}


def test_four_of_five_returning_500_ejection_capped_panic_no_refusal(
        fleet: tuple[list[Backend], list[FaultProxy]]) -> None:
    servers, proxies = fleet

    def broken(handler: Any, record: dict[str, Any]) -> None:
        handler.reply(500, b"broken", {})

    for server in servers[:4]:
        server.behaviour = broken
    lb = balancer(proxies, outlier_detection={"consecutive_5xx": 3},
                  health_check={"path": "/healthz", "interval": 0.05, "healthy_threshold": 1,
                                "unhealthy_threshold": 1, "skip_if_traffic": False})
    with lb:
        load = Load(lb)
        assert wait_for(lambda: lb.status()["services"]["users"]["panic"])
        load.run_for(300)
        outcomes = load.stop()
        ejected = [p for p in proxies if lb.outlier_detector.is_ejected("users", p.address)]
        assert len(ejected) <= 1  # 10% of 5, but one is always ejectable
        assert lb.status()["services"]["users"]["endpoints_pickable"] == 5  # panic: all
    assert "NoEndpointAvailable" not in outcomes
    assert outcomes["200"] > 0 and outcomes["500"] > 0


def test_every_backend_dies_then_returns(
        fleet: tuple[list[Backend], list[FaultProxy]]) -> None:
    _, proxies = fleet
    interval = 0.1
    lb = balancer(proxies, health_check={"type": "tcp", "interval": interval, "jitter": 0,
                                         "healthy_threshold": 1, "unhealthy_threshold": 1,
                                         "panic_threshold": 0, "skip_if_traffic": False})
    with lb:
        load = Load(lb)
        load.run_for(100)
        for proxy in proxies:
            proxy.mode = "refuse"
        assert wait_for(lambda: lb.status()["services"]["users"]["endpoints_pickable"] == 0)
        with pytest.raises(NoEndpointAvailable, match="5 of 5 unhealthy"):
            lb.pick("users")
        load.run_for(100)
        for proxy in proxies:
            proxy.mode = "pass"
        assert wait_for(lambda: lb.status()["services"]["users"]["endpoints_pickable"] == 5)
        for proxy in proxies:
            health = lb.health_checker.health("users", proxy.address)
            assert health is not None
            # healthy_threshold 1: the first passed check after the return brings it back
            assert health.healthy and health.history[-1][1]
        start = load.outcomes["200"]
        load.run_for(100)
        outcomes = load.stop()
    assert outcomes["NoEndpointAvailable"] > 0  # a clear error while everything was down
    assert outcomes["200"] - start >= 100  # full recovery


def test_a_flapping_backend_causes_no_storm(
        fleet: tuple[list[Backend], list[FaultProxy]]) -> None:
    _, proxies = fleet
    lb = balancer(proxies, health_check={"type": "tcp", "interval": 0.1,
                                         "healthy_threshold": 2, "unhealthy_threshold": 2,
                                         "skip_if_traffic": False},
                  outlier_detection={"consecutive_local_origin_failure": 5,
                                     "base_ejection_time": 1})
    toggles = 0
    with lb:
        load = Load(lb)
        ends = time.monotonic() + 3.0
        while time.monotonic() < ends:
            proxies[0].mode = "refuse" if proxies[0].mode == "pass" else "pass"
            toggles += 1
            time.sleep(0.3)
        proxies[0].mode = "pass"
        outcomes = load.stop()
        status = lb.status()
    assert status["health_checker"]["flips"] <= toggles  # rise/fall damp the flapping
    assert status["outlier_detection"]["ejections"] <= toggles
    assert set(outcomes) == {"200"}


def test_exceptions_in_checks_and_listeners_are_survived_and_counted(
        fleet: tuple[list[Backend], list[FaultProxy]]) -> None:
    servers, proxies = fleet

    def explode(handler: Any, record: dict[str, Any]) -> None:
        if record["path"] == "/healthz":
            raise RuntimeError("health endpoint bug")  # the check sees a broken connection
        servers[0].ok(handler, record)

    servers[0].behaviour = explode
    lb = balancer(proxies, health_check={"path": "/healthz", "interval": 0.05,
                                         "unhealthy_threshold": 1, "skip_if_traffic": False})

    def bad_listener(change: TopologyChange) -> None:
        raise ValueError("listener bug")

    with lb:
        lb.registry.subscribe(bad_listener)
        load = Load(lb)
        lb.registry.deregister("users", proxies[4].address)
        lb.registry.register("users", proxies[4].address)
        assert wait_for(lambda: not lb.health_checker.is_healthy("users", proxies[0].address))
        load.run_for(200)
        outcomes = load.stop()
        assert lb.registry.callback_errors == 2  # counted, and the registry carried on
        assert all(t.is_alive() for t in lb.health_checker.threads)  # the checker survived
    assert set(outcomes) == {"200"}
