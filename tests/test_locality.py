"""Zone-aware routing: traffic stays in the balancer's zone while it can carry it, and only the
overflow spills, as Envoy computes it.

Three zones with uneven endpoint counts (a: 3, b: 5, c: 4); the balancer is in zone a.  Health
comes from real function health checks on the checker's thread; picks are real ``lb.pick()``
calls from several threads, and one test goes through ``lb.session()`` to real backends.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import pytest

import tai_lb
from tai_lb import ConfigError, LoadBalancer
from tai_lb.routing.locality import LocalityConfig, zone_split
from tai_lb.strategies import resolve_strategy
from tai_lb.trace import trace_of

from .conftest import in_forked_child, picks_by, wait_for

ZONES = {"a": 3, "b": 5, "c": 4}


def _endpoints(zones: Mapping[str, int], subnet: int = 1, **extra: Any) -> list[dict[str, Any]]:
    endpoints = []
    for number, (zone, count) in enumerate(zones.items()):
        endpoints += [{"address": f"10.{subnet}.{number}.{i}:80", "zone": zone, **extra}
                      for i in range(count)]
    return endpoints


class Health:
    """The function health check's answers, by address (all healthy at first)."""

    def __init__(self) -> None:
        self.down: set[str] = set()

    def __call__(self, endpoint: tai_lb.Endpoint) -> bool:
        return endpoint.address not in self.down

    def checks(self, **extra: Any) -> tai_lb.HealthCheckConfig:
        return tai_lb.HealthCheckConfig(type="function", function=self, interval=0.01,
                                        jitter=0.0, healthy_threshold=1,
                                        unhealthy_threshold=1, **extra)


def _balancer(health: Health, zone: Optional[str] = "a", endpoints: Any = None,
              **service: Any) -> LoadBalancer:
    settings = tai_lb.ServiceConfig(
        endpoints=tuple(tai_lb.Endpoint.from_value(e) for e in (endpoints or _endpoints(ZONES))),
        health_check=health.checks(), **{"locality": LocalityConfig(), **service})
    return LoadBalancer(config=tai_lb.LoadBalancerConfig({"svc": settings}, zone=zone))


def _zone_shares(lb: LoadBalancer, picks: int = 12_000, threads: int = 4,
                 key: Any = None) -> dict[Optional[str], float]:
    """The share of picks per zone, ``picks`` picks from ``threads`` threads."""
    counts = picks_by(lb, lambda endpoint: endpoint.zone, picks, threads, key)
    total = sum(counts.values())
    return {zone: n / total for zone, n in counts.items()}


def _mode(lb: LoadBalancer) -> str:
    return str(lb.status()["services"]["svc"]["locality"]["mode"])


def _wait_mode(lb: LoadBalancer, mode: str, down: int) -> None:
    # The route is rebuilt on the checker's thread once it has seen the new health.
    assert wait_for(lambda: _mode(lb) == mode and lb.status()["services"]["svc"][
        "endpoints_pickable"] == sum(ZONES.values()) - down)


@pytest.fixture
def health() -> Iterator[Health]:
    yield Health()


# -- the formula --------------------------------------------------------------------------------


def test_the_split_follows_envoy_s_formula_in_the_worked_example() -> None:
    # The docs' worked example: a 3, b 5, c 4 endpoints; two of a's three fail.  Callers: a
    # 3/12; healthy: a 1/10.  a keeps (1/10) / (3/12) = 0.4; surpluses b 5/10 - 5/12 = 1/12 and
    # c 4/10 - 4/12 = 1/15 share the other 0.6 in proportion: b 1/3, c 4/15.
    group = tai_lb.LoadBalancer(config=tai_lb.LoadBalancerConfig({"svc": tai_lb.ServiceConfig(
        endpoints=tuple(tai_lb.Endpoint.from_value(e) for e in _endpoints(ZONES)))}))
    with group as lb:
        everyone = lb.route("svc").everyone
    healthy = [s for s in everyone if s.endpoint.address not in ("10.1.0.0:80", "10.1.0.1:80")]
    split = zone_split("a", LocalityConfig(), everyone, healthy)
    assert split.mode == "spill"
    assert split.traffic == pytest.approx({"a": 0.4, "b": 1 / 3, "c": 4 / 15})
    assert zone_split("a", LocalityConfig(), everyone, everyone).traffic == {"a": 1.0}
    # A caller distribution given: a's callers are half of all, so a (3/12 healthy) keeps half.
    given = LocalityConfig(caller_distribution={"a": 2, "b": 1, "c": 1})
    assert zone_split("a", given, everyone, everyone).traffic["a"] == pytest.approx(0.5)
    # Off: too few endpoints, no zone, no endpoint in the local zone, panic.
    assert zone_split("a", LocalityConfig(min_cluster_size=13), everyone, everyone).mode == "off"
    assert zone_split(None, LocalityConfig(), everyone, everyone).mode == "off"
    assert zone_split("d", LocalityConfig(), everyone, everyone).mode == "off"
    assert zone_split("a", LocalityConfig(), everyone, healthy, panic=True).mode == "off"


# -- picks under load ---------------------------------------------------------------------------


def test_traffic_stays_local_while_the_local_zone_can_carry_it(health: Health) -> None:
    with _balancer(health) as lb:
        assert _zone_shares(lb) == {"a": 1.0}
        # One of a's three down: a's healthy share 2/11 < its callers' 3/12, so it spills; one
        # of b's five down instead: a's share 3/11 >= 3/12, every pick stays local.
        health.down = {"10.1.1.0:80"}
        _wait_mode(lb, "all local", down=1)
        assert _zone_shares(lb) == {"a": 1.0}
        status = lb.status()["services"]["svc"]["locality"]
        assert status["local_zone"] == "a"
        assert status["traffic_shares"] == {"a": 1.0}


def test_a_zone_losing_two_of_three_spills_only_the_overflow(health: Health) -> None:
    with _balancer(health) as lb:
        health.down = {"10.1.0.0:80", "10.1.0.1:80"}
        _wait_mode(lb, "spill", down=2)
        shares = _zone_shares(lb)
        # 12,000 picks: a share's standard error is at most 0.0046; 0.025 is over 5 of them.
        expected = {"a": 0.4, "b": 1 / 3, "c": 4 / 15}
        for zone, share in expected.items():
            assert shares[zone] == pytest.approx(share, abs=0.025), (zone, shares)
        assert lb.status()["services"]["svc"]["locality"]["traffic_shares"] == {
            z: round(s, 4) for z, s in expected.items()}


def test_a_zone_losing_all_spills_all_and_recovery_brings_traffic_home(health: Health) -> None:
    with _balancer(health) as lb:
        health.down = {"10.1.0.0:80", "10.1.0.1:80", "10.1.0.2:80"}
        _wait_mode(lb, "spill", down=3)
        shares = _zone_shares(lb)
        assert "a" not in shares
        # Surpluses: b 5/9 - 5/12, c 4/9 - 4/12: in the ratio 5 : 4.
        assert shares["b"] == pytest.approx(5 / 9, abs=0.025)
        assert shares["c"] == pytest.approx(4 / 9, abs=0.025)
        health.down = set()
        _wait_mode(lb, "all local", down=0)
        assert _zone_shares(lb) == {"a": 1.0}


@pytest.mark.parametrize("strategy", ["round_robin", "weighted_round_robin", "random", "weighted",
                                      "least_connections", "consistent_hash", "maglev",
                                      "peak_ewma"])
def test_every_strategy_picks_within_the_zone_locality_chose(health: Health,
                                                             strategy: str) -> None:
    with _balancer(health, strategy=resolve_strategy(strategy)) as lb:
        assert _zone_shares(lb, picks=400, key="user-1") == {"a": 1.0}
        assert _zone_shares(lb, picks=400) == {"a": 1.0}
        health.down = {"10.1.0.0:80", "10.1.0.1:80"}
        _wait_mode(lb, "spill", down=2)
        shares = _zone_shares(lb, picks=4000)
        assert shares["a"] == pytest.approx(0.4, abs=0.05), shares


def test_a_hashing_strategy_keeps_each_key_on_one_endpoint_while_spilling(health: Health) -> None:
    with _balancer(health, strategy=resolve_strategy("consistent_hash")) as lb:
        health.down = {"10.1.0.0:80", "10.1.0.1:80"}
        _wait_mode(lb, "spill", down=2)
        homes = {}
        for n in range(2000):
            homes[n] = {lb.pick("svc", f"user-{n}").address for _ in range(3)}
        assert all(len(found) == 1 for found in homes.values())
        local = sum(1 for found in homes.values() if next(iter(found)).startswith("10.1.0."))
        assert local / len(homes) == pytest.approx(0.4, abs=0.05)


def test_locality_applies_within_the_active_priority_group(health: Health) -> None:
    primaries = _endpoints({"a": 1, "b": 2})
    backups = _endpoints({"a": 2, "b": 3, "c": 1}, subnet=2, priority=1)
    with _balancer(health, endpoints=primaries + backups,
                   locality=LocalityConfig(min_cluster_size=3)) as lb:
        assert _zone_shares(lb, picks=600) == {"a": 1.0}
        assert {lb.pick("svc").endpoint.priority for _ in range(20)} == {0}
        health.down = {e["address"] for e in primaries}  # the primaries fail: backups take over
        assert wait_for(lambda: lb.pick("svc").endpoint.priority == 1)
        assert _zone_shares(lb, picks=600) == {"a": 1.0}
        assert {lb.pick("svc").endpoint.priority for _ in range(20)} == {1}


def test_panic_turns_locality_off_and_spreads_over_the_whole_group(health: Health) -> None:
    with _balancer(health) as lb:
        # 7 of 12 down: 5/12 healthy, under the panic threshold of 0.5.
        health.down = {e["address"] for e in _endpoints(ZONES)[:7]}
        assert wait_for(lambda: lb.status()["services"]["svc"]["panic"])
        status = lb.status()["services"]["svc"]["locality"]
        assert (status["mode"], status["reason"]) == ("off", "panic mode")
        assert set(_zone_shares(lb, picks=1200)) == {"a", "b", "c"}


def test_locality_is_off_below_min_cluster_size_and_without_a_zone(health: Health) -> None:
    small = _endpoints({"a": 1, "b": 2, "c": 2})
    with _balancer(health, endpoints=small) as lb:
        assert _mode(lb) == "off"
        assert set(_zone_shares(lb, picks=300)) == {"a", "b", "c"}
    with _balancer(health, zone=None) as lb:
        assert _mode(lb) == "off"
        assert set(_zone_shares(lb, picks=300)) == {"a", "b", "c"}


def test_the_zone_comes_from_tai_lb_zone_unless_the_config_sets_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"services": {"svc": {"endpoints": _endpoints(ZONES), "locality": {}}}}
    monkeypatch.setenv("TAI_LB_ZONE", "b")
    with LoadBalancer.from_config(config) as lb:
        assert lb.status()["services"]["svc"]["locality"]["local_zone"] == "b"
        assert {lb.pick("svc").endpoint.zone for _ in range(50)} == {"b"}
    with LoadBalancer.from_config({**config, "zone": "c"}) as lb:
        assert {lb.pick("svc").endpoint.zone for _ in range(50)} == {"c"}
    monkeypatch.setenv("TAI_LB_ZONE", "")
    with LoadBalancer.from_config(config) as lb:
        assert lb.status()["services"]["svc"]["locality"]["local_zone"] is None


@pytest.mark.parametrize("zone", ["eu-1a ", " eu-1a", "eu-1a\n", "z" * 254])
def test_a_bad_tai_lb_zone_is_a_config_error_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                        zone: str) -> None:
    config = {"services": {"svc": {"endpoints": _endpoints(ZONES), "locality": {}}}}
    monkeypatch.setenv("TAI_LB_ZONE", zone)
    with pytest.raises(ConfigError) as caught:
        tai_lb.load_config(config)
    assert caught.value.path == "TAI_LB_ZONE" and "zone name" in str(caught.value)
    with LoadBalancer.from_config({**config, "zone": "a"}) as lb:  # the configuration wins
        assert lb.config.local_zone == "a"
    monkeypatch.setenv("TAI_LB_ZONE", "b")
    built = tai_lb.load_config(config)
    monkeypatch.setenv("TAI_LB_ZONE", zone)  # changed after the load: refused where it is read
    with pytest.raises(ConfigError, match="TAI_LB_ZONE"):
        built.local_zone  # noqa: B018 - the property is what is tested


@pytest.mark.parametrize("strategy", ["round_robin", "consistent_hash"])
def test_a_retry_leaves_the_local_zone_once_every_local_endpoint_was_tried(
        health: Health, strategy: str) -> None:
    with _balancer(health, strategy=resolve_strategy(strategy)) as lb:
        local = [e["address"] for e in _endpoints(ZONES) if e["zone"] == "a"]
        for n in range(50):
            assert lb.pick("svc", f"user-{n}", exclude=local[:2]).address == local[2]
            assert lb.pick("svc", f"user-{n}", exclude=local).endpoint.zone in ("b", "c")


# -- through a session, to real backends ------------------------------------------------------


def test_a_session_s_requests_stay_local_then_spill_and_the_trace_says_why(
        backend_factory: Any, health: Health) -> None:
    zones = {"a": 2, "b": 3, "c": 1}
    backends = {zone: [backend_factory(f"{zone}{i}") for i in range(count)]
                for zone, count in zones.items()}
    endpoints = [{"address": b.address, "zone": zone}
                 for zone, items in backends.items() for b in items]
    with _balancer(health, endpoints=endpoints) as lb:
        session = lb.session()
        for _ in range(60):
            response = session.get("http://svc/")
            assert response.status_code == 200
        assert sum(b.requests_count() for b in backends["a"]) == 60
        trace = trace_of(response)
        assert trace is not None
        assert "zone a (local; all local" in trace.attempts[0].reason
        # One of a's two down: a keeps (1/5) / (2/6) = 0.6; b gets 0.3 and c 0.1.
        health.down = {backends["a"][0].address}
        assert wait_for(lambda: _mode(lb) == "spill")
        before = {z: sum(b.requests_count() for b in items) for z, items in backends.items()}
        down_before = backends["a"][0].requests_count()
        reasons = collections.Counter()
        for _ in range(400):
            response = session.get("http://svc/")
            reasons[trace_of(response).attempts[0].reason.split(", ", 1)[1][:12]] += 1
        served = {z: sum(b.requests_count() for b in items) - before[z]
                  for z, items in backends.items()}
        assert backends["a"][0].requests_count() == down_before  # the failed one gets none
        # 400 requests: a share's standard error is at most 0.025; 0.1 is 4 of them.
        assert served["a"] / 400 == pytest.approx(0.6, abs=0.1), served
        assert served["b"] / 400 == pytest.approx(0.3, abs=0.1), served
        assert served["c"] / 400 == pytest.approx(0.1, abs=0.07), served
        assert reasons["zone a (loca"] == served["a"]
        assert reasons["zone b (spil"] == served["b"]
        session.close()


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "path"), [
    ({"zone": ""}, "zone"),
    ({"zone": 3}, "zone"),
    ({"services": {"svc": {"endpoints": ["10.0.0.1:80"], "locality": []}}},
     "services.svc.locality"),
    ({"services": {"svc": {"endpoints": ["10.0.0.1:80"], "locality": {"enabled": "yes"}}}},
     "services.svc.locality.enabled"),
    ({"services": {"svc": {"endpoints": ["10.0.0.1:80"], "locality": {"min_cluster_size": 0}}}},
     "services.svc.locality.min_cluster_size"),
    ({"services": {"svc": {"endpoints": ["10.0.0.1:80"], "locality": {"zones": 1}}}},
     "services.svc.locality.zones"),
    ({"services": {"svc": {"endpoints": ["10.0.0.1:80"],
                           "locality": {"caller_distribution": {"a": -1}}}}},
     "services.svc.locality.caller_distribution.a"),
    ({"services": {"svc": {"endpoints": ["10.0.0.1:80"],
                           "locality": {"caller_distribution": {"a": 0}}}}},
     "services.svc.locality.caller_distribution"),
    ({"services": {"svc": {"endpoints": ["10.0.0.1:80"],
                           "locality": {"caller_distribution": {"a": float("nan")}}}}},
     "services.svc.locality.caller_distribution.a"),
])
def test_bad_locality_settings_name_their_key(config: dict[str, Any], path: str) -> None:
    config.setdefault("services", {"svc": {"endpoints": ["10.0.0.1:80"]}})
    with pytest.raises(ConfigError) as raised:
        tai_lb.config.parse_config(config)
    assert raised.value.path == path


def test_a_pickled_balancer_keeps_its_zone_and_locality_settings() -> None:
    config = {"zone": "a", "services": {"svc": {
        "endpoints": _endpoints(ZONES),
        "locality": {"caller_distribution": {"a": 2, "b": 1, "c": 1}}}}}
    with LoadBalancer.from_config(config) as lb, pickle.loads(pickle.dumps(lb)) as copy:
        assert copy.config.local_zone == "a"
        assert copy.status()["services"]["svc"]["locality"] == lb.status()["services"]["svc"][
            "locality"]
        assert copy.status()["services"]["svc"]["locality"]["mode"] == "spill"


def test_a_forked_child_routes_by_zone_with_routes_of_its_own(health: Health) -> None:
    with _balancer(health) as lb:
        health.down = {"10.1.0.0:80", "10.1.0.1:80"}
        _wait_mode(lb, "spill", down=2)

        def child() -> dict[str, Any]:
            shares = _zone_shares(lb, picks=4000)
            return {"a": shares.get("a", 0.0), "mode": _mode(lb)}

        report = in_forked_child(child, timeout=60)
        assert report["mode"] == "spill"
        assert report["a"] == pytest.approx(0.4, abs=0.05)
