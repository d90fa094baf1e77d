"""Subsets: a request's header, cookie or routing context chooses the endpoints whose version,
zone, region or label equals it; tables prepared per route build, never per pick."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any, Optional

import pytest
import requests

import tai_lb
from tai_lb import ConfigError, LoadBalancer, NoEndpointAvailable
from tai_lb.context import routing_context
from tai_lb.routing.affinity import AffinityConfig
from tai_lb.routing.locality import LocalityConfig
from tai_lb.routing.slow_start import SlowStartConfig
from tai_lb.routing.subsets import SubsetConfig
from tai_lb.stats import EndpointStats
from tai_lb.strategies import ConsistentHash, Picker, RoundRobin, resolve_strategy
from tai_lb.trace import trace_of

from .conftest import FakeClock, picks_by

VERSIONS = {"1": 4, "2": 2}


def _endpoints(**extra: Any) -> list[tai_lb.Endpoint]:
    endpoints = []
    for number, (version, count) in enumerate(VERSIONS.items()):
        endpoints += [tai_lb.Endpoint.from_value({
            "address": f"10.0.{number}.{i}:80", "version": version,
            "labels": {"track": "canary" if version == "2" else "stable"}, **extra})
            for i in range(count)]
    return endpoints


def _balancer(endpoints: Sequence[tai_lb.Endpoint] = (), zone: Optional[str] = None,
              **service: Any) -> LoadBalancer:
    settings = {"subset": SubsetConfig(key="header:X-Version"), **service}
    return LoadBalancer(config=tai_lb.LoadBalancerConfig({"svc": tai_lb.ServiceConfig(
        endpoints=tuple(endpoints or _endpoints()), **settings)}, zone=zone))


def _versions(lb: LoadBalancer, picks: int = 400, key: Any = None,
              threads: int = 4) -> collections.Counter[Optional[str]]:
    """The versions picked by ``picks`` picks from ``threads`` threads, in the caller's
    routing context (each thread runs in a copy of it)."""
    return picks_by(lb, lambda endpoint: endpoint.version, picks, threads, key)


def test_a_value_in_the_routing_context_picks_within_its_subset() -> None:
    with _balancer() as lb:
        with routing_context(subset="2"):
            assert set(_versions(lb)) == {"2"}
        with routing_context(subset="1"):
            assert set(_versions(lb)) == {"1"}
        assert set(_versions(lb)) == {"1", "2"}  # no value: the whole route


def test_a_user_id_key_reads_the_routing_context_s_user() -> None:
    with _balancer(subset=SubsetConfig(key="user_id", by="label:track")) as lb:
        with routing_context(user_id="canary"):
            assert set(_versions(lb)) == {"2"}
        with routing_context(user_id="stable"):
            assert set(_versions(lb)) == {"1"}


def test_a_user_id_key_reads_a_user_looked_up_on_demand() -> None:
    # The Flask and Django integrations set user_id_of (and source_ip_of), never user_id: a
    # pick must look the user up as the HTTP path does.
    with _balancer(subset=SubsetConfig(key="user_id", by="label:track",
                                       fallback="fail")) as lb:
        with routing_context(user_id_of=lambda: "canary"):
            assert set(_versions(lb)) == {"2"}
        with routing_context(user_id_of=lambda: "stable"):
            assert set(_versions(lb)) == {"1"}


def test_a_new_endpoint_ramps_within_its_subset() -> None:
    clock = FakeClock()
    endpoints = [tai_lb.Endpoint("10.0.0.1", 80, version="2"),
                 tai_lb.Endpoint("10.0.0.2", 80, version="2")]
    lb = LoadBalancer(config=tai_lb.LoadBalancerConfig({"svc": tai_lb.ServiceConfig(
        endpoints=tuple(endpoints), subset=SubsetConfig(key="header:X-Version"),
        slow_start=SlowStartConfig(window=30))}), clock=clock)
    with lb:
        lb.registry.register("svc", tai_lb.Endpoint("10.0.0.3", 80, version="2"))
        for value in (None, "2"):  # the whole route, then the subset: the same ramp
            with routing_context(subset=value):
                picks = collections.Counter(lb.pick("svc").endpoint.address
                                            for _ in range(6000))
            assert picks["10.0.0.3:80"] / 6000 < 0.1, (value, picks)


def test_fallback_any_uses_the_whole_route_and_fail_names_the_subset() -> None:
    with _balancer() as lb, routing_context(subset="3"):
        assert set(_versions(lb)) == {"1", "2"}
    with _balancer(subset=SubsetConfig(key="header:X-Version", fallback="fail")) as lb:
        with routing_context(subset="3"), pytest.raises(NoEndpointAvailable) as raised:
            lb.pick("svc")
        assert "subset version='3'" in str(raised.value)
        assert "header:X-Version" in str(raised.value)
        assert set(_versions(lb)) == {"1", "2"}  # no value: fail applies only to a value


def test_a_session_routes_by_header_and_fails_with_the_subset_named(backend_factory: Any) -> None:
    backends = {v: [backend_factory(f"v{v}-{i}") for i in range(n)] for v, n in VERSIONS.items()}
    endpoints = [tai_lb.Endpoint.from_value({"address": b.address, "version": v})
                 for v, items in backends.items() for b in items]
    with _balancer(endpoints, subset=SubsetConfig(key="header:X-Version", fallback="fail"),
                   retries=tai_lb.RetryConfig(attempts=1)) as lb:
        session = lb.session()
        for _ in range(20):
            response = session.get("http://svc/", headers={"X-Version": "2"})
            assert response.status_code == 200
        assert sum(b.requests_count() for b in backends["2"]) == 20
        assert sum(b.requests_count() for b in backends["1"]) == 0
        trace = trace_of(response)
        assert trace is not None and "subset version='2'" in trace.attempts[0].reason
        for _ in range(20):
            session.get("http://svc/")
        assert sum(b.requests_count() for b in backends["1"]) > 0  # no header: any endpoint
        with pytest.raises(requests.ConnectionError) as raised:
            session.get("http://svc/", headers={"X-Version": "9"})
        assert "subset version='9'" in str(raised.value)
        session.close()


def test_a_huge_value_is_cut_short_in_the_error_and_the_trace(backend_factory: Any) -> None:
    # A 1 MB header went whole into NoEndpointAvailable's message and each attempt's reason.
    huge = "9" * 1_000_000
    with _balancer(subset=SubsetConfig(key="header:X-Version", fallback="fail")) as lb, \
            routing_context(subset=huge), pytest.raises(NoEndpointAvailable) as raised:
        lb.pick("svc")
    message = str(raised.value)
    assert "subset version='9999" in message and "header:X-Version" in message
    assert len(message) < 500, len(message)
    endpoints = [tai_lb.Endpoint.from_value({"address": backend_factory("v1").address,
                                             "version": "1"})]
    with _balancer(endpoints) as lb, lb.session() as session, routing_context(subset=huge):
        trace = trace_of(session.get("http://svc/"))
    assert trace is not None
    reason = trace.attempts[0].reason
    assert "no endpoint in subset version='9999" in reason and "fallback any" in reason
    assert len(reason) < 500, len(reason)


def test_a_request_s_header_wins_over_the_context_s_value(backend_factory: Any) -> None:
    backends = {v: [backend_factory(f"v{v}-{i}") for i in range(n)] for v, n in VERSIONS.items()}
    endpoints = [tai_lb.Endpoint.from_value({"address": b.address, "version": v})
                 for v, items in backends.items() for b in items]
    with _balancer(endpoints) as lb, routing_context(subset="1"):
        session = lb.session()
        for _ in range(10):
            session.get("http://svc/", headers={"X-Version": "2"})
            session.get("http://svc/")  # no header: the context's value
        assert sum(b.requests_count() for b in backends["2"]) == 10
        assert sum(b.requests_count() for b in backends["1"]) == 10
        session.close()


def test_a_hashing_strategy_hashes_within_the_subset() -> None:
    with _balancer(strategy=ConsistentHash()) as lb:
        for n in range(200):
            with routing_context(subset="2"):
                homes = {lb.pick("svc", f"user-{n}").address for _ in range(3)}
            assert len(homes) == 1
            assert next(iter(homes)).startswith("10.0.1.")  # version 2's endpoints
        with routing_context(subset="1"):
            spread = {lb.pick("svc", f"user-{n}").address for n in range(200)}
        assert spread == {f"10.0.0.{i}:80" for i in range(4)}


def test_affinity_keeps_keys_within_the_subset() -> None:
    affinity = AffinityConfig(key="user_id")
    with _balancer(affinity=affinity, strategy=RoundRobin(start=0)) as lb:
        pins = {n: lb.pick("svc", f"user-{n}").address for n in range(12)}  # no subset
        outside = [n for n, address in pins.items() if address.startswith("10.0.0.")]
        assert outside
        with routing_context(subset="2"):
            moved = {n: lb.pick("svc", f"user-{n}").address for n in outside}
            assert all(a.startswith("10.0.1.") for a in moved.values())
            # re-pinned there: the next requests stay
            assert {n: lb.pick("svc", f"user-{n}").address for n in outside} == moved
        figures = lb.status()["services"]["svc"]["affinity"]
        assert figures["repins"] + figures["deferred"] == len(outside)


def test_subsets_apply_within_the_active_priority_group() -> None:
    endpoints = _endpoints() + [
        tai_lb.Endpoint.from_value({"address": f"10.1.0.{i}:80", "version": "2", "priority": 1})
        for i in range(2)]
    with _balancer(endpoints) as lb, routing_context(subset="2"):
        assert {lb.pick("svc").address for _ in range(40)} == {"10.0.1.0:80", "10.0.1.1:80"}


def test_subsets_are_zone_aware_when_the_service_has_locality() -> None:
    endpoints = [tai_lb.Endpoint.from_value({"address": f"10.0.{z}.{i}:80", "zone": zone,
                                             "version": "2"})
                 for z, zone in enumerate("abc") for i in range(3)]
    endpoints += [tai_lb.Endpoint.from_value({"address": "10.9.0.1:80", "zone": "b",
                                              "version": "1"})]
    with _balancer(endpoints, zone="a", locality=LocalityConfig()) as lb:
        with routing_context(subset="2"):
            assert {lb.pick("svc").endpoint.zone for _ in range(100)} == {"a"}
        with routing_context(subset="1"):  # only in zone b: zone b it is
            assert {lb.pick("svc").address for _ in range(20)} == {"10.9.0.1:80"}


class CountingRoundRobin(RoundRobin):
    """Counts its preparations."""

    prepared = 0

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        self.prepared += 1
        return super().prepare(candidates)


def test_subset_tables_are_prepared_per_route_build_never_per_pick() -> None:
    strategy = CountingRoundRobin()
    with _balancer(strategy=strategy) as lb:
        with routing_context(subset="2"):
            lb.pick("svc")
        built = strategy.prepared
        assert built == 3  # the route's picker, and one per value
        with routing_context(subset="2"):
            for _ in range(500):
                lb.pick("svc").done()
        assert strategy.prepared == built
        lb.registry.register("svc", tai_lb.Endpoint.from_value(
            {"address": "10.0.7.1:80", "version": "3"}))
        with routing_context(subset="3"):
            assert lb.pick("svc").address == "10.0.7.1:80"
        assert strategy.prepared == built + 4
        status = lb.status()["services"]["svc"]["subset"]
        assert status["values"] == {"1": 4, "2": 2, "3": 1}


@pytest.mark.parametrize(("subset", "path"), [
    ([], "services.svc.subset"),
    ({}, "services.svc.subset.key"),
    ({"key": "header:"}, "services.svc.subset.key"),
    ({"key": "header:X", "by": "colour"}, "services.svc.subset.by"),
    ({"key": "header:X", "by": "label:"}, "services.svc.subset.by"),
    ({"key": "header:X", "fallback": "none"}, "services.svc.subset.fallback"),
    ({"key": "header:X", "size": 1}, "services.svc.subset.size"),
])
def test_bad_subset_settings_name_their_key(subset: Any, path: str) -> None:
    with pytest.raises(ConfigError) as raised:
        tai_lb.config.parse_config(
            {"services": {"svc": {"endpoints": ["10.0.0.1:80"], "subset": subset}}})
    assert raised.value.path == path


def test_a_subset_by_label_from_a_config_file_routes() -> None:
    config = {"services": {"svc": {
        "endpoints": [{"address": "10.0.0.1:80", "labels": {"pool": "x"}},
                      {"address": "10.0.0.2:80", "labels": {"pool": "y"}}],
        "strategy": resolve_strategy("random").name,
        "subset": {"key": "cookie:pool", "by": "label:pool", "fallback": "fail"}}}}
    with LoadBalancer.from_config(config) as lb, routing_context(subset="y"):
        assert {lb.pick("svc").address for _ in range(20)} == {"10.0.0.2:80"}


@pytest.mark.parametrize("affinity", [False, True])
def test_a_retry_stays_within_the_subset(affinity: bool) -> None:
    extra: dict[str, Any] = {"affinity": AffinityConfig(key="user_id")} if affinity else {}
    version_2 = ["10.0.1.0:80", "10.0.1.1:80"]
    with _balancer(**extra) as lb, routing_context(subset="2"):
        for n in range(30):
            assert lb.pick("svc", f"user-{n}", exclude=version_2[:1]).address == version_2[1]
        # every endpoint of the subset tried: a retry goes to one of them again
        assert {lb.pick("svc", f"user-{n}", exclude=version_2).address
                for n in range(30)} <= set(version_2)


def test_a_function_of_the_request_gives_the_value(backend_factory: Any) -> None:
    backends = {v: [backend_factory(f"v{v}-{i}") for i in range(n)] for v, n in VERSIONS.items()}
    endpoints = [tai_lb.Endpoint.from_value({"address": b.address, "version": v})
                 for v, items in backends.items() for b in items]

    def canary(request: requests.PreparedRequest) -> Optional[str]:
        return "2" if "/beta/" in (request.path_url or "") else None

    with _balancer(endpoints, subset=SubsetConfig(key=canary)) as lb:
        session = lb.session()
        for _ in range(10):
            assert session.get("http://svc/beta/x").status_code == 200
        assert sum(b.requests_count() for b in backends["2"]) == 10
        assert sum(b.requests_count() for b in backends["1"]) == 0
        session.close()
