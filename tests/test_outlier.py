"""Passive outlier detection: consecutive failures eject, time brings endpoints back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tai_lb import ConfigError, LoadBalancer, load_config, trace_of

from . import backends
from .backends import Backend
from .conftest import wait_for

QUICK = {"base_ejection_time": 0.2, "max_ejection_time": 5.0, "max_ejection_percent": 50}



@pytest.fixture
def servers() -> Iterator[list[Backend]]:
    made = [Backend(f"s{i}") for i in range(5)]
    yield made
    for backend in made:
        with contextlib.suppress(OSError):
            backend.stop()


def lb_for(servers: list[Backend], **outlier: Any) -> LoadBalancer:
    return LoadBalancer.from_config({"services": {"users": {
        "endpoints": [s.address for s in servers], "strategy": "round_robin",
        "retries": {"attempts": 1}, "outlier_detection": {**QUICK, **outlier}}}})


def ejected(lb: LoadBalancer, address: str) -> bool:
    return lb.outlier_detector.is_ejected("users", address)


def test_consecutive_5xx_eject_then_time_brings_it_back_on_probation(
        servers: list[Backend]) -> None:
    bad, good = servers[0], servers[1]
    bad.behaviour = backends.status(500)
    with lb_for([bad, good], consecutive_5xx=3) as lb:
        s = lb.session()
        for _ in range(6):  # round robin: three of them reach the bad endpoint
            s.get("http://users/")
        assert ejected(lb, bad.address)
        before = bad.requests_count()
        for _ in range(10):
            assert s.get("http://users/").status_code == 200  # all to the good one
        assert bad.requests_count() == before
        assert wait_for(lambda: not ejected(lb, bad.address))  # back after 0.2 s
        state = lb.status()["services"]["users"]["endpoints"][bad.address]["outlier"]
        assert state["times_ejected"] == 1
        for _ in range(6):
            s.get("http://users/")
        assert ejected(lb, bad.address)  # failed again on probation: ejected again...
        left = lb.status()["services"]["users"]["endpoints"][bad.address]["outlier"][
            "seconds_left"]
        assert left > 0.2  # ...for longer: twice the base time


def test_4xx_never_counts(servers: list[Backend]) -> None:
    bad, good = servers[0], servers[1]
    bad.behaviour = backends.status(404)
    with lb_for([bad, good], consecutive_5xx=2) as lb:
        s = lb.session()
        for _ in range(20):
            s.get("http://users/")
        assert not ejected(lb, bad.address)


def test_gateway_failures_count_on_their_own(servers: list[Backend]) -> None:
    bad, good = servers[0], servers[1]
    bad.behaviour = backends.status(503)
    with lb_for([bad, good], consecutive_5xx=100, consecutive_gateway_failure=2) as lb:
        s = lb.session()
        for _ in range(4):
            s.get("http://users/")
        assert ejected(lb, bad.address)


def test_refused_connections_eject_while_retries_hide_them(servers: list[Backend]) -> None:
    dead, good = servers[0], servers[1]
    dead.stop()
    lb = LoadBalancer.from_config({"services": {"users": {
        "endpoints": [dead.address, good.address], "strategy": "round_robin",
        "outlier_detection": {**QUICK, "consecutive_local_origin_failure": 2}}}})
    with lb:
        s = lb.session()
        for _ in range(8):
            assert s.get("http://users/").status_code == 200
        assert ejected(lb, dead.address)
        tried = {attempt.endpoint for _ in range(5)
                 for attempt in trace_of(s.get("http://users/")).attempts}  # type: ignore[union-attr]
        assert tried == {good.address}  # no attempt wasted on the ejected endpoint


def test_ejection_is_capped_but_one_is_always_ejectable(servers: list[Backend]) -> None:
    for backend in servers[:4]:
        backend.behaviour = backends.status(500)
    with lb_for(servers, consecutive_5xx=2, max_ejection_percent=10) as lb:
        s = lb.session()
        for _ in range(60):
            s.get("http://users/")
        out = [b for b in servers if ejected(lb, b.address)]
        assert len(out) == 1  # 10% of 5 rounds down to 0, but one is always ejectable
        assert lb.status()["outlier_detection"]["refused_by_cap"] > 0
        assert lb.pick("users").address  # never NoEndpointAvailable


def test_lease_exceptions_are_local_origin_failures() -> None:
    lb = LoadBalancer.from_config({"services": {"db": {
        "endpoints": ["10.0.0.1:5432", "10.0.0.2:5432"], "strategy": "round_robin",
        "outlier_detection": {**QUICK, "consecutive_local_origin_failure": 2}}}})
    with lb:
        raised = 0
        for _ in range(4):
            try:
                with lb.pick("db") as lease:
                    if lease.address == "10.0.0.1:5432":
                        raise ConnectionError("database refused")
            except ConnectionError:
                raised += 1  # the lease re-raises what happened inside it
        assert raised == 2
        assert ejected_db(lb, "10.0.0.1:5432")
        assert {lb.pick("db").address for _ in range(10)} == {"10.0.0.2:5432"}


def ejected_db(lb: LoadBalancer, address: str) -> bool:
    return lb.outlier_detector.is_ejected("db", address)


@pytest.mark.parametrize(("settings", "path", "fragment"), [
    ({"consecutive_5xx": 0}, "consecutive_5xx", "1 to 10000"),
    ({"consecutive_gateway_failure": 1.5}, "consecutive_gateway_failure", "integer"),
    ({"base_ejection_time": 0}, "base_ejection_time", "> 0"),
    ({"max_ejection_time": 1, "base_ejection_time": 2}, "max_ejection_time", ">= base"),
    ({"max_ejection_percent": 101}, "max_ejection_percent", "0 to 100"),
    ({"interval": 10}, "interval", "unknown key"),
])
def test_config_errors_name_the_key(settings: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"services": {"users": {"endpoints": [], "outlier_detection": settings}}})
    assert caught.value.path == f"services.users.outlier_detection.{path}"
    assert fragment in str(caught.value)


def test_a_retried_4xx_never_counts(servers: list[Backend]) -> None:
    busy, good = servers[0], servers[1]
    busy.behaviour = backends.status(429)
    lb = LoadBalancer.from_config({"services": {"users": {
        "endpoints": [busy.address, good.address], "strategy": "round_robin",
        "retries": {"statuses": [429]},
        "outlier_detection": {**QUICK, "consecutive_5xx": 2}}}})
    with lb:
        s = lb.session()
        for _ in range(10):
            assert s.get("http://users/").status_code == 200  # retried on the good one
        assert busy.requests_count() >= 4
        assert not ejected(lb, busy.address)
