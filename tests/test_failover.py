"""Failover between priority groups and backups, with hysteresis on the way back."""

from __future__ import annotations

from typing import Any

import pytest

from tai_lb import ConfigError, Endpoint, HealthCheckConfig, LoadBalancer, load_config
from tai_lb.config import LoadBalancerConfig, ServiceConfig
from tai_lb.failover import FailoverConfig

from .conftest import wait_for

PRIMARY = ["10.0.0.1:80", "10.0.0.2:80"]
BACKUP = "10.0.9.1:80"



def balancer_with(bad: set[str], **failover: Any) -> LoadBalancer:
    config = load_config({"services": {"users": {
        "endpoints": PRIMARY, "backups": {"endpoints": [BACKUP], **failover}}}})
    checks = HealthCheckConfig(type="function", function=lambda e: e.address not in bad,
                               interval=0.02, healthy_threshold=1, unhealthy_threshold=1,
                               skip_if_traffic=False)
    service = config.services["users"].new(health_check=checks)
    return LoadBalancer(config=LoadBalancerConfig({"users": service}))


def picks(lb: LoadBalancer, n: int = 30) -> set[str]:
    return {lb.pick("users").address for _ in range(n)}


def test_backups_get_traffic_only_when_the_primaries_fail_and_failback_waits() -> None:
    bad: set[str] = set()
    with balancer_with(bad) as lb:
        assert picks(lb) == set(PRIMARY)  # backups idle while the primaries serve
        bad.update(PRIMARY)
        assert wait_for(lambda: picks(lb) == {BACKUP})
        events = lb.status()["failover_events"]
        assert [(e["kind"], e["from_priority"], e["to_priority"]) for e in events] == [
            ("failover", 0, 1)]
        bad.discard(PRIMARY[0])  # half the primaries back: below failback_at (0.7)
        assert wait_for(lambda: lb.health_checker.is_healthy("users", PRIMARY[0]))
        assert picks(lb) == {BACKUP}  # hysteresis: no flapping back at 50%
        bad.clear()
        assert wait_for(lambda: picks(lb) == set(PRIMARY))
        assert [e["kind"] for e in lb.status()["failover_events"]] == ["failover", "failback"]
        assert lb.status()["services"]["users"]["active_priority"] == 0


def test_half_the_primaries_healthy_keeps_traffic_on_them() -> None:
    bad = {PRIMARY[0]}
    with balancer_with(bad) as lb:
        assert wait_for(lambda: not lb.health_checker.is_healthy("users", PRIMARY[0]))
        assert picks(lb) == {PRIMARY[1]}
        assert lb.status()["failover_events"] == []


def test_endpoint_priorities_make_groups_without_backups() -> None:
    bad: set[str] = set()
    service = ServiceConfig(
        endpoints=(Endpoint("10.0.0.1", 80), Endpoint("10.0.1.1", 80, priority=1)),
        health_check=HealthCheckConfig(type="function", function=lambda e: e.address not in bad,
                                       interval=0.02, healthy_threshold=1,
                                       unhealthy_threshold=1, skip_if_traffic=False))
    with LoadBalancer(config=LoadBalancerConfig({"users": service})) as lb:
        assert picks(lb) == {"10.0.0.1:80"}
        bad.add("10.0.0.1:80")
        assert wait_for(lambda: picks(lb) == {"10.0.1.1:80"})


def test_backups_sit_after_every_primary_priority() -> None:
    config = load_config({"services": {"users": {
        "endpoints": ["10.0.0.1:80", {"address": "10.0.0.2:80", "priority": 2}],
        "backups": ["10.0.9.1:80"]}}})
    assert [e.priority for e in config.services["users"].backups] == [3]


@pytest.mark.parametrize(("backups", "path", "fragment"), [
    ("10.0.9.1:80", "backups", "must be a list"),
    ({"endpoints": ["10.0.9.1:0"]}, "backups.endpoints[0].port", "1 to 65535"),
    ({"endpoints": [], "failover_below": 0}, "backups.failover_below", "> 0"),
    ({"endpoints": [], "failover_below": 0.8, "failback_at": 0.6}, "backups.failback_at",
     ">= failover_below"),
    ({"hosts": []}, "backups.hosts", "unknown key"),
])
def test_backup_config_errors_name_the_key(backups: Any, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"services": {"users": {"endpoints": [], "backups": backups}}})
    assert caught.value.path == f"services.users.{path}"
    assert fragment in str(caught.value)


def test_policy_defaults() -> None:
    assert FailoverConfig() == FailoverConfig(0.5, 0.7)
