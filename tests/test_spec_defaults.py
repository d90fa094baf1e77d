"""Every default that SPEC.md states, pinned against the code's.

Each case loads a minimal configuration that leaves the key out (or builds the class with no
arguments) and reads the value the code chose; its id is the key's path.  A default changed in
the code without SPEC.md (or the other way round) fails here, by name.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import pytest

from tai_lb import ConnectionPool, Endpoint, LoadBalancer, ServiceRegistry
from tai_lb.config import LoadBalancerConfig, ServiceConfig, load_config


# Any: the cases read optional parts (affinity, locality, ...) that the key they pass has set.
def config(**top: Any) -> Any:
    """A minimal configuration (a :class:`LoadBalancerConfig`): one service, ``users``, with one
    endpoint, and ``top``."""
    built: LoadBalancerConfig = load_config(
        {"services": {"users": {"endpoints": ["127.0.0.1:8001"]}}, **top})
    return built


def service(**keys: Any) -> Any:
    """The parsed settings (a :class:`ServiceConfig`) of a minimal service with ``keys``."""
    settings: ServiceConfig = load_config(
        {"services": {"users": {"endpoints": ["127.0.0.1:8001"], **keys}}}).services["users"]
    return settings


def registry_strategy() -> str:
    """The strategy of a balancer built from a registry with no strategy given."""
    registry = ServiceRegistry()
    registry.register("users", Endpoint("127.0.0.1", 8001))
    with LoadBalancer(registry) as lb:
        name: str = lb.status()["services"]["users"]["strategy"]
    return name


def pool_default(name: str) -> Any:
    """The default of one keyword of ``ConnectionPool(factory, *, ...)``."""
    return inspect.signature(ConnectionPool).parameters[name].default


def etcd_source() -> Any:
    discovery = service(discovery={"type": "etcd", "urls": ["http://127.0.0.1:2379"]}).discovery
    assert discovery is not None
    return discovery.source


CASES = [
    # "`scheme` (`http` or `https`, used by health probes; default `http`)"
    pytest.param(lambda: service().scheme, "http", id="services.NAME.scheme"),
    # "The default strategy is `round_robin` (predictable for a newcomer)"
    pytest.param(lambda: service().strategy.name, "round_robin", id="services.NAME.strategy"),
    pytest.param(registry_strategy, "round_robin", id="LoadBalancer(registry).strategy"),
    # "the strategy `maglev` takes `table_size` (a prime, default 65537)"
    pytest.param(lambda: service(strategy="maglev").strategy.table_size, 65537,
                 id="services.NAME.strategy.maglev.table_size"),
    pytest.param(lambda: service(strategy={"name": "maglev"}).strategy.table_size, 65537,
                 id="services.NAME.strategy{name:maglev}.table_size"),
    # "Panic starts when the healthy share is strictly below the threshold (default 0.5)."
    pytest.param(lambda: service(health_check={"path": "/healthz"}).health_check.panic_threshold,
                 0.5, id="services.NAME.health_check.panic_threshold"),
    # "`pool` (`{"maxsize": 10, "block": true, "timeout": 5}`)"; "Each endpoint's HTTP pool
    # holds 10 connections by default, as requests' does."
    pytest.param(lambda: service().pool.maxsize, 10, id="services.NAME.pool.maxsize"),
    pytest.param(lambda: service().pool.block, True, id="services.NAME.pool.block"),
    pytest.param(lambda: service().pool.timeout, 5, id="services.NAME.pool.timeout"),
    # "idempotent methods by default" (retries; RFC 9110's idempotent methods)
    pytest.param(lambda: service().retries.methods,
                 {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"},
                 id="services.NAME.retries.methods"),
    # "`affinity` = `{"key": ..., "ttl": 300, "max_entries": 100000,
    # "max_moves_per_second": 50}`"
    pytest.param(lambda: service(affinity={"key": "source_ip"}).affinity.ttl, 300,
                 id="services.NAME.affinity.ttl"),
    pytest.param(lambda: service(affinity={"key": "source_ip"}).affinity.max_entries, 100000,
                 id="services.NAME.affinity.max_entries"),
    pytest.param(lambda: service(affinity={"key": "source_ip"}).affinity.max_moves_per_second,
                 50, id="services.NAME.affinity.max_moves_per_second"),
    # "`rebalance` = `{"mode": "immediate" | "gradual" | "manual", "drain_timeout": 30}`"
    pytest.param(lambda: service(rebalance={"mode": "gradual"}).rebalance.drain_timeout, 30,
                 id="services.NAME.rebalance.drain_timeout"),
    # "`slow_start` = `{"window": 30, "aggression": 1.0, "min_weight_percent": 10}`"
    pytest.param(lambda: service(slow_start={}).slow_start.window, 30,
                 id="services.NAME.slow_start.window"),
    pytest.param(lambda: service(slow_start={}).slow_start.aggression, 1.0,
                 id="services.NAME.slow_start.aggression"),
    pytest.param(lambda: service(slow_start={}).slow_start.min_weight_percent, 10,
                 id="services.NAME.slow_start.min_weight_percent"),
    # "`locality` = `{"enabled": true, "min_cluster_size": 6}`"
    pytest.param(lambda: service(locality={}).locality.enabled, True,
                 id="services.NAME.locality.enabled"),
    pytest.param(lambda: service(locality={}).locality.min_cluster_size, 6,
                 id="services.NAME.locality.min_cluster_size"),
    # "`{"type": "etcd", "urls": [...], "prefix": "/services"}`"
    pytest.param(lambda: etcd_source().prefix, "/services",
                 id="services.NAME.discovery.etcd.prefix"),
    # "`metrics` = `{..., "prometheus": {"namespace": "tai_lb"}}`"
    pytest.param(lambda: config(metrics={"prometheus": {}}).metrics.prometheus.namespace,
                 "tai_lb", id="metrics.prometheus.namespace"),
    # "`tai_lb.ConnectionPool(factory, *, max_size=10, min_size=0, acquire_timeout=5.0,
    # max_lifetime=None, max_idle=None, validate=None, close=None)`"
    pytest.param(lambda: pool_default("max_size"), 10, id="ConnectionPool.max_size"),
    pytest.param(lambda: pool_default("min_size"), 0, id="ConnectionPool.min_size"),
    pytest.param(lambda: pool_default("acquire_timeout"), 5.0,
                 id="ConnectionPool.acquire_timeout"),
    pytest.param(lambda: pool_default("max_lifetime"), None, id="ConnectionPool.max_lifetime"),
    pytest.param(lambda: pool_default("max_idle"), None, id="ConnectionPool.max_idle"),
    pytest.param(lambda: pool_default("validate"), None, id="ConnectionPool.validate"),
    pytest.param(lambda: pool_default("close"), None, id="ConnectionPool.close"),
]


@pytest.mark.parametrize(("read", "spec"), CASES)
def test_the_code_default_is_the_one_spec_states(read: Callable[[], Any], spec: Any) -> None:
    value = read()
    assert value == spec
    # 5 and 5.0 are equal; true must not be 1, nor a set a list
    assert isinstance(value, bool) == isinstance(spec, bool)
    if isinstance(spec, set):
        assert isinstance(value, (set, frozenset))
