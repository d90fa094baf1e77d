"""Configuration: every key is checked at load time with a ConfigError naming its path."""

from __future__ import annotations

import gc
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from tai_lb import (
    ConfigError,
    Endpoint,
    HealthCheckConfig,
    KeySource,
    LoadBalancer,
    ServiceConfig,
    load_config,
)
from tai_lb.config import NOT_SUPPORTED_YET, LoadBalancerConfig
from tai_lb.discovery import DiscoveryConfig, Provider, StaticConfig
from tai_lb.metrics import MetricsConfig, StatsdConfig
from tai_lb.strategies import ConsistentHash, Maglev, PeakEwma

from .backends import Backend
from .conftest import THREAD_PREFIX, open_descriptors, wait_for


def users(**settings: Any) -> dict[str, Any]:
    return {"services": {"users": {"endpoints": ["127.0.0.1:8001"], **settings}}}


# (configuration, the key path the error must name, a fragment of the message)
BAD: list[tuple[Any, str, str]] = [
    ([], "", "must be a mapping or a file path"),
    ({"service": {}}, "service", "unknown key; allowed: services, defaults, metrics"),
    ({}, "services", "is required"),
    ({"services": ["users"]}, "services", "mapping of service names"),
    ({"services": {"Users": {"endpoints": []}}}, "services.Users", "lower-case host name"),
    ({"services": {"users": "127.0.0.1:1"}}, "services.users", "mapping of service settings"),
    ({"services": {"users": {}}}, "services.users", "needs endpoints"),
    ({"services": {"users": None}}, "services.users", "needs endpoints"),
    (users(colour="red"), "services.users.colour", "unknown key; allowed: endpoints"),
    ({"services": {"users": {"endpoints": "127.0.0.1:1"}}}, "services.users.endpoints",
     "must be a list"),
    ({"services": {"users": {"endpoints": ["127.0.0.1"]}}}, "services.users.endpoints[0]",
     "host:port"),
    ({"services": {"users": {"endpoints": ["a:1", {"address": "b:0"}]}}},
     "services.users.endpoints[1].port", "1 to 65535"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "weight": 0}]}}},
     "services.users.endpoints[0].weight", "got 0"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "zone": 5}]}}},
     "services.users.endpoints[0].zone", "non-empty string"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "region": ""}]}}},
     "services.users.endpoints[0].region", "non-empty string"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "version": 1.4}]}}},
     "services.users.endpoints[0].version", "non-empty string"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "labels": {"x": 1}}]}}},
     "services.users.endpoints[0].labels.x", "label values must be strings"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "labels": {"x": "v" * 254}}]}}},
     "services.users.endpoints[0].labels.x", "at most 253 characters"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "zone": "z" * 254}]}}},
     "services.users.endpoints[0].zone", "at most 253 characters"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "region": "r" * 254}]}}},
     "services.users.endpoints[0].region", "at most 253 characters"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "version": "1" * 1_000_000}]}}},
     "services.users.endpoints[0].version", "at most 253 characters"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "priority": "high"}]}}},
     "services.users.endpoints[0].priority", "integer from 0 to 1000"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "port": 2}]}}},
     "services.users.endpoints[0]", "either address or host and port"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "tls": True}]}}},
     "services.users.endpoints[0].tls", "unknown key"),
    ({"services": {"users": {"endpoints": ["a:1", "a:1"]}}}, "services.users.endpoints[1]",
     "duplicate address a:1"),
    (users(strategy="fastest"), "services.users.strategy", "unknown strategy 'fastest'"),
    (users(strategy=3), "services.users.strategy", "must be a strategy name"),
    (users(strategy={"name": "nope"}), "services.users.strategy.name", "unknown strategy"),
    (users(strategy={"vnodes": 10}), "services.users.strategy", "needs 'name'"),
    (users(strategy={"name": "round_robin", "vnodes": 10}), "services.users.strategy.vnodes",
     "unknown option of round_robin; allowed: none"),
    (users(strategy={"name": "consistent_hash", "vnodes": 2}),
     "services.users.strategy.vnodes", "from 4 to 10000, got 2"),
    (users(strategy={"name": "consistent_hash", "load_bound": 1.0}),
     "services.users.strategy.load_bound", "number > 1"),
    (users(strategy={"name": "consistent_hash", "max_ring_size": 10}),
     "services.users.strategy.max_ring_size", "from 1024"),
    (users(strategy={"name": "maglev", "table_size": 65536}),
     "services.users.strategy.table_size", "a prime from 7 to 1000003, got 65536"),
    (users(strategy={"name": "maglev", "table_size": "65537"}),
     "services.users.strategy.table_size", "a prime from 7"),
    (users(strategy={"name": "maglev", "load_bound": 0.5}),
     "services.users.strategy.load_bound", "number > 1"),
    (users(strategy={"name": "peak_ewma", "decay": -1}), "services.users.strategy.decay",
     "seconds > 0 and <= 86400, got -1"),
    (users(strategy={"name": "peak_ewma", "decay": float("inf")}),
     "services.users.strategy.decay", "<= 86400, got inf"),
    (users(strategy={"name": "consistent_hash", "load_bound": float("inf")}),
     "services.users.strategy.load_bound", "<= 1000, got inf"),
    ({"services": {"users": {"endpoints": ["a:\u00b2"]}}}, "services.users.endpoints[0]",
     "port must be a number"),
    ({"services": {"users": {"endpoints": ["a:\u0668\u0660"]}}}, "services.users.endpoints[0]",
     "port must be a number"),
    (users(strategy={"name": "peak_ewma", "default_latency": "30ms"}),
     "services.users.strategy.default_latency", "seconds > 0"),
    (users(hash_key="query:id"), "services.users.hash_key", "header:NAME"),
    (users(hash_key="header:bad name"), "services.users.hash_key", "HTTP token"),
    (users(hash_key="header:X-User\n"), "services.users.hash_key", "HTTP token"),
    (users(hash_key=7), "services.users.hash_key", "got 7"),
    ({"defaults": [], "services": {}}, "defaults", "mapping of service keys"),
    ({"defaults": {"strategy": "fastest"}, "services": {}}, "defaults.strategy",
     "unknown strategy"),
    ({"defaults": {"endpoints": ["a:1"]}, "services": {}}, "defaults.endpoints",
     "not allowed in defaults"),
    ({"defaults": {"discovery": {}}, "services": {}}, "defaults.discovery",
     "not allowed in defaults"),
    (users(timeout=-1), "services.users.timeout", "seconds > 0 and <= 86400, got -1"),
    (users(scheme="ftp"), "services.users.scheme", "\"http\" or \"https\", got 'ftp'"),
    ({"defaults": {"scheme": "gopher"}, "services": {}}, "defaults.scheme", "http"),
    (users(timeout={"connect": 1, "total": 2}), "services.users.timeout.total", "unknown key"),
    (users(timeout=[1, "x"]), "services.users.timeout[1]", "got 'x'"),
    (users(retries=3), "services.users.retries", "must be a mapping"),
    (users(retries={"attempts": 0}), "services.users.retries.attempts", "from 1 to 10"),
    (users(retries={"tries": 2}), "services.users.retries.tries", "unknown key"),
    (users(retries={"statuses": [503, 700]}), "services.users.retries.statuses", "100-599"),
    (users(retries={"statuses": "503"}), "services.users.retries.statuses", "must be a list"),
    (users(retries={"methods": ["get"]}), "services.users.retries.methods", "upper-case"),
    (users(retries={"backoff": {"base": -1}}), "services.users.retries.backoff.base",
     "from 0 to 86400"),
    (users(retries={"backoff": {"cap": 1}}), "services.users.retries.backoff.cap",
     "unknown key"),
    (users(retries={"deadline": 0}), "services.users.retries.deadline", "<= 86400, got 0"),
    (users(retries={"budget": {"percent": -0.1}}), "services.users.retries.budget.percent",
     "share from 0 to 10"),
    (users(retries={"budget": {"ttl": 0}}), "services.users.retries.budget.ttl", "> 0"),
    (users(retries={"budget": []}), "services.users.retries.budget", "must be a mapping"),
    (users(pool=[]), "services.users.pool", "must be a mapping"),
    (users(pool={"maxsize": 0}), "services.users.pool.maxsize", "from 1 to 10000"),
    (users(pool={"block": "yes"}), "services.users.pool.block", "true or false"),
    (users(pool={"timeout": 0}), "services.users.pool.timeout", "> 0"),
    (users(pool={"idle_timeout": "1s"}), "services.users.pool.idle_timeout", "> 0"),
    (users(pool={"size": 3}), "services.users.pool.size", "unknown key"),
    ({"services": {"users": {"endpoints": [{"address": "a:1", "tls_name": "[::1]"}]}}},
     "services.users.endpoints[0].tls_name", "host name"),
    ({"defaults": {"retries": {"attempts": 11}}, "services": {}}, "defaults.retries.attempts",
     "from 1 to 10"),]
BAD += [(users(**{key: {}}), f"services.users.{key}", "not supported yet")
        for key in NOT_SUPPORTED_YET if key != "metrics"]
BAD += [({"defaults": {key: {}}, "services": {}}, f"defaults.{key}", "not supported yet")
        for key in NOT_SUPPORTED_YET if key not in ("metrics", "discovery")]
BAD += [({"metrics": {"prometheus": {"namespace": ""}}, "services": {}},
         "metrics.prometheus.namespace", "Prometheus name")]


@pytest.mark.parametrize(("config", "path", "fragment"), BAD,
                         ids=[f"{i}-{p or 'top'}" for i, (_, p, _f) in enumerate(BAD)])
def test_bad_configuration_names_the_key_path(config: Any, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        LoadBalancer.from_config(config)
    assert caught.value.path == path
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(f"{path}: " if path else "")


def test_error_message_format() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(users(strategy={"name": "peak_ewma", "decay": -1}))
    assert str(caught.value) == ("services.users.strategy.decay: must be a number of "
                                 "seconds > 0 and <= 86400, got -1")


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        load_config({"services": {"users": {}}})


def test_good_configuration_becomes_frozen_value_objects() -> None:
    config = load_config({
        "defaults": {"strategy": {"name": "consistent_hash", "vnodes": 100}},
        "services": {
            "users": {"endpoints": ["127.0.0.1:8001"], "hash_key": "header:X-User-Id",
                      "timeout": {"connect": 1, "read": 5},
                      "retries": {"attempts": 2, "statuses": [503], "deadline": 3,
                                  "budget": {"percent": 0.1}},
                      "pool": {"maxsize": 4, "timeout": 2}},
            "billing": {"endpoints": ["127.0.0.1:9001"], "strategy": "peak_ewma"},
        },
    })
    assert isinstance(config, LoadBalancerConfig)
    svc = config.services["users"]
    assert isinstance(svc, ServiceConfig)
    assert svc.timeout == (1.0, 5.0)
    assert (svc.retries.attempts, svc.retries.statuses, svc.retries.deadline) == (
        2, frozenset({503}), 3.0)
    assert svc.retries.budget_percent == 0.1 and svc.retries.budget_min_per_second == 10.0
    assert (svc.pool.maxsize, svc.pool.timeout, svc.pool.block) == (4, 2.0, True)
    assert svc.hash_key == KeySource("header", "X-User-Id")
    assert str(svc.hash_key) == "header:X-User-Id"
    assert isinstance(svc.strategy, ConsistentHash) and svc.strategy.vnodes == 100
    assert isinstance(config.services["billing"].strategy, PeakEwma)
    with pytest.raises(AttributeError):
        svc.timeout = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.services["x"] = svc  # type: ignore[index]
    assert svc.new(timeout=2).timeout == (2.0, 2.0) and svc.timeout == (1.0, 5.0)
    with pytest.raises(ConfigError, match="timeout"):
        svc.new(timeout=-2)


def test_defaults_merge_into_mappings() -> None:
    config = load_config({
        "defaults": {"strategy": {"name": "consistent_hash", "vnodes": 50}},
        "services": {"users": {"endpoints": [], "strategy": {"load_bound": 1.5}}},
    })
    ring = config.services["users"].strategy
    assert isinstance(ring, ConsistentHash) and (ring.vnodes, ring.load_bound) == (50, 1.5)


def test_maglev_with_its_table_size() -> None:
    config = load_config({"services": {"users": {
        "endpoints": ["a:1"], "strategy": {"name": "maglev", "table_size": 65537}}}})
    table = config.services["users"].strategy
    assert isinstance(table, Maglev) and table.options() == {"table_size": 65537,
                                                             "load_bound": None}


def test_default_strategy_options_do_not_leak_into_another_strategy() -> None:
    config = load_config({
        "defaults": {"strategy": {"name": "peak_ewma", "decay": 5}},
        "services": {"users": {"endpoints": [], "strategy": {"name": "consistent_hash"}},
                     "billing": {"endpoints": []}},
    })
    assert isinstance(config.services["users"].strategy, ConsistentHash)
    billing = config.services["billing"].strategy
    assert isinstance(billing, PeakEwma) and billing.decay == 5.0


@pytest.mark.parametrize("source", ["source_ip", "user_id", "cookie:sessionid",
                                    "header:X-User-Id"])
def test_key_sources(source: str) -> None:
    assert str(KeySource.parse(source)) == source
    assert KeySource.parse(len).kind == "function"


CONFIG = {"services": {"users": {"endpoints": ["127.0.0.1:8001",
                                               {"address": "127.0.0.1:8002", "weight": 3}],
                                 "strategy": "peak_ewma"}}}
TOML = """
[services.users]
endpoints = ["127.0.0.1:8001", {address = "127.0.0.1:8002", weight = 3}]
strategy = "peak_ewma"
"""
YAML = """
services:
  users:
    endpoints:
      - 127.0.0.1:8001
      - {address: "127.0.0.1:8002", weight: 3}
    strategy: peak_ewma
"""


@pytest.mark.parametrize(("name", "text"), [("lb.json", json.dumps(CONFIG)), ("lb.toml", TOML),
                                            ("lb.yaml", YAML), ("lb.yml", YAML)])
def test_files(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    lb = LoadBalancer.from_config(path)
    assert [e.weight for e in lb.registry.endpoints("users")] == [1, 3]
    assert lb.status()["services"]["users"]["strategy"] == "peak_ewma"
    assert load_config(str(path)).services["users"].endpoints[1].weight == 3


@pytest.mark.parametrize(("name", "text", "fragment"), [
    ("lb.json", "{not json", "not valid JSON"),
    ("lb.toml", "[services\n", "not valid TOML"),
    ("lb.yaml", "services: [unclosed", "not valid YAML"),
    ("lb.yaml", "- a list", "top level must be a mapping"),
    ("lb.ini", "[x]", "must end in .json, .toml, .yaml or .yml"),
])
def test_bad_files(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as caught:
        LoadBalancer.from_config(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.json")


def test_a_nul_byte_in_a_file_path_is_a_config_error(tmp_path: Path) -> None:
    # Python 3.13's os.open says "open: embedded null character", 3.11's "embedded null byte".
    with pytest.raises(ConfigError,
                       match=r"cannot read the configuration file: (open: )?embedded null"):
        load_config(f"{tmp_path}/lb\x00.json")


def test_file_errors_name_the_key_path(tmp_path: Path) -> None:
    path = tmp_path / "lb.json"
    path.write_text(json.dumps(users(health_check={"path": "/h", "interval": -1})))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == ("services.users.health_check.interval: must be a number of "
                                 "seconds from 0.001 to 86400, got -1")


# -- values of any size and shape ---------------------------------------------------------------

HUGE = 10 ** 400  # too large for a float: float() raises OverflowError


def nested(levels: int) -> Any:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


# (what is wrong, the configuration, the key path the error must name)
ANY_SIZE: list[tuple[str, Any, str]] = [
    ("huge-int-timeout", users(timeout=HUGE), "services.users.timeout"),
    ("huge-int-timeout-read", users(timeout={"read": HUGE}), "services.users.timeout.read"),
    ("huge-int-pool-timeout", users(pool={"timeout": HUGE}), "services.users.pool.timeout"),
    ("huge-int-health-interval", users(health_check={"path": "/", "interval": HUGE}),
     "services.users.health_check.interval"),
    ("huge-int-deadline", users(retries={"deadline": HUGE}), "services.users.retries.deadline"),
    ("huge-int-budget-ttl", users(retries={"budget": {"ttl": HUGE}}),
     "services.users.retries.budget.ttl"),
    ("huge-int-load-bound", users(strategy={"name": "consistent_hash", "load_bound": HUGE}),
     "services.users.strategy.load_bound"),
    ("huge-int-table-size", users(strategy={"name": "maglev", "table_size": HUGE}),
     "services.users.strategy.table_size"),
    ("huge-int-decay", users(strategy={"name": "peak_ewma", "decay": HUGE}),
     "services.users.strategy.decay"),
    ("huge-int-reset-timeout", users(circuit_breaker={"reset_timeout": HUGE}),
     "services.users.circuit_breaker.reset_timeout"),
    ("huge-int-ejection-time", users(outlier_detection={"base_ejection_time": HUGE,
                                                        "max_ejection_time": HUGE}),
     "services.users.outlier_detection.base_ejection_time"),
    ("inf-timeout", users(timeout=float("inf")), "services.users.timeout"),
    ("nan-timeout", users(timeout=float("nan")), "services.users.timeout"),
    ("1e300-deadline", users(retries={"deadline": 1e300}), "services.users.retries.deadline"),
    ("1e300-backoff", users(retries={"backoff": {"max": 1e300}}),
     "services.users.retries.backoff.max"),
    ("inf-budget", users(retries={"budget": {"min_per_second": float("inf")}}),
     "services.users.retries.budget.min_per_second"),
    ("1e300-health-interval", users(health_check={"path": "/", "interval": 1e300}),
     "services.users.health_check.interval"),
    ("1e300-pool-idle", users(pool={"idle_timeout": 1e300}), "services.users.pool.idle_timeout"),
    ("deep-endpoints", users(endpoints=nested(1000)), "services.users.endpoints[0]"),
    ("deep-strategy", users(strategy=nested(1000)), "services.users.strategy"),
    ("deep-defaults", {"defaults": nested(1000), "services": {}}, "defaults"),
    ("5000-digit-port", users(endpoints=["127.0.0.1:" + "9" * 5000]),
     "services.users.endpoints[0]"),
    ("huge-int-port", users(endpoints=[{"host": "127.0.0.1", "port": 10 ** 5000}]),
     "services.users.endpoints[0].port"),
    ("huge-int-key", users(**{"pool": {10 ** 5000: 1}}), "services.users.pool.<an integer "
                                                          "of 5001 digits>"),
    ("mixed-endpoint-keys", users(endpoints=[{"address": "a:1", 1: 2, "x": 3}]),
     "services.users.endpoints[0].1"),
    ("unhashable-status", users(retries={"statuses": [503, [504]]}),
     "services.users.retries.statuses[1]"),
    ("unhashable-method", users(retries={"methods": ["GET", {"POST": 1}]}),
     "services.users.retries.methods[1]"),
    ("non-ascii-status-range", users(health_check={"path": "/", "expected_statuses": ["²00-399"]}),
     "services.users.health_check.expected_statuses"),
    ("huge-status-range", users(health_check={"path": "/",
                                              "expected_statuses": ["200-999999999"]}),
     "services.users.health_check.expected_statuses"),
    ("bad-etcd-url", {"services": {"users": {"discovery": {"type": "etcd",
                                                           "urls": ["http://[::1"]}}}},
     "services.users.discovery.urls[0]"),
]


# A period so short that ``now + period == now``: a scheduler would find the check due forever.
ANY_SIZE += [
    ("denormal-health-interval", users(health_check={"path": "/", "interval": 5e-324}),
     "services.users.health_check.interval"),
    ("denormal-discovery-interval",
     {"services": {"users": {"discovery": {"type": "static", "endpoints": ["127.0.0.1:1"],
                                           "interval": 5e-324}}}},
     "services.users.discovery.interval"),
]


@pytest.mark.parametrize(("config", "path"), [(c, p) for _, c, p in ANY_SIZE],
                         ids=[name for name, _, _ in ANY_SIZE])
def test_values_of_any_size_and_shape_are_config_errors(config: Any, path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        LoadBalancer.from_config(config)
    assert caught.value.path == path
    assert len(str(caught.value)) < 500  # the value is quoted, cut short


def test_yaml_alias_bomb_gives_a_short_message(tmp_path: Path) -> None:
    # 9 levels of 9 aliases: a few hundred bytes whose full repr would need gigabytes.
    levels = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = ("services:\n  users:\n    endpoints: ['127.0.0.1:1']\n"
            f"    strategy: [{', '.join(levels)}]\n")
    assert len(text) < 700
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == "services.users.strategy"
    assert len(str(caught.value)) < 500


def test_quoted_values_are_cut_short() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(users(scheme="x" * 10_000))
    assert len(caught.value.reason) < 200
    assert "..." in caught.value.reason


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend("b1")
    yield server
    server.stop()


# Each setting with values at and past the edge of what it can mean.
EXTREMES: list[tuple[str, Any]] = [
    ("timeout", {"connect": value, "read": value}) for value in (86_400, 1e300, float("inf"))
] + [(key, {name: value}) for key, name in (("retries", "deadline"), ("pool", "timeout"),
                                            ("pool", "idle_timeout"))
     for value in (86_400, 1e300)] + [
    ("retries", {"backoff": {"base": 1e300, "max": 1e300}}),
    ("retries", {"budget": {"min_per_second": 1e300, "ttl": 1e300}}),
    ("retries", {"budget": {"min_per_second": 1_000_000, "ttl": 86_400}}),
    ("strategy", {"name": "consistent_hash", "load_bound": 1e308}),
    ("strategy", {"name": "consistent_hash", "load_bound": 1000}),
    ("strategy", {"name": "maglev", "table_size": 7, "load_bound": 1000}),
    ("strategy", {"name": "peak_ewma", "decay": 1e300, "default_latency": 1e300}),
    ("circuit_breaker", {"reset_timeout": 1e300}),
    ("outlier_detection", {"base_ejection_time": 1e300, "max_ejection_time": 1e300}),
    ("health_check", {"path": "/", "interval": 1e300, "timeout": 1e300, "grace": 1e300}),
    ("health_check", {"path": "/", "interval": 86_400, "timeout": 86_400, "grace": 86_400}),
]


@pytest.mark.parametrize(("key", "value"), EXTREMES,
                         ids=[f"{key}-{json.dumps(value)}" for key, value in EXTREMES])
def test_a_configuration_that_loads_never_breaks_a_request(backend: Backend, key: str,
                                                            value: Any) -> None:
    config = {"services": {"users": {"endpoints": [backend.address], key: value}}}
    try:
        lb = LoadBalancer.from_config(config)
    except ConfigError:
        return  # refused at load time: what the rule asks
    with lb:
        session = lb.session()
        for _ in range(3):
            assert session.get("http://users/").status_code == 200
        assert lb.status()["services"]["users"]


# -- a construction that fails leaves nothing running -------------------------------------------


def tai_lb_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


def test_unresolvable_statsd_host_is_a_config_error_and_leaves_no_thread(
        backend: Backend) -> None:
    config = {"services": {"users": {"endpoints": [backend.address],
                                     "health_check": {"path": "/", "interval": 0.05},
                                     "discovery": {"type": "static",
                                                   "endpoints": [backend.address]}}},
              "metrics": {"statsd": {"host": "nonexistent.invalid"}}}
    gc.collect()
    descriptors = open_descriptors()
    with pytest.raises(ConfigError) as caught:
        LoadBalancer.from_config(config)
    assert caught.value.path == "metrics.statsd.host"
    assert "nonexistent.invalid" in str(caught.value)
    assert wait_for(lambda: not tai_lb_threads(), 2.0), tai_lb_threads()
    assert open_descriptors().items() <= descriptors.items()  # no socket or file left open


class _FailingProvider(Provider):
    """A provider (a custom one, say) that fails to start."""

    def fetch(self) -> Optional[list[Endpoint]]:
        return None

    def start(self, notify: Callable[[], None]) -> None:
        raise RuntimeError("the source is broken")


class _FailingSource:
    def provider(self, service: str) -> Provider:
        return _FailingProvider()


def test_a_failure_while_starting_closes_what_started(backend: Backend) -> None:
    endpoint = Endpoint.parse(backend.address)
    started = ServiceConfig(endpoints=(endpoint,), health_check=HealthCheckConfig(path="/"),
                            discovery=DiscoveryConfig("static", StaticConfig((endpoint,))))
    failing = ServiceConfig(discovery=DiscoveryConfig("custom", _FailingSource()))
    config = LoadBalancerConfig({"a": started, "b": failing},
                                MetricsConfig(StatsdConfig("127.0.0.1", backend.port)))
    gc.collect()
    descriptors = open_descriptors()
    with pytest.raises(RuntimeError, match="the source is broken"):
        LoadBalancer(config=config)
    assert wait_for(lambda: not tai_lb_threads(), 2.0), tai_lb_threads()
    # The StatsD client's socket was open: it is closed, not dropped (no gc.collect() here).
    assert open_descriptors().items() <= descriptors.items()


def test_etcd_answering_200_with_another_shape_is_a_failed_read(backend: Backend) -> None:
    # The backend answers every POST with 200 and JSON that is no etcd answer: the service
    # starts without endpoints, its discovery failing (logged, counted) as if etcd were down.
    config = {"services": {
        "a": {"discovery": {"type": "static", "endpoints": [backend.address]}},
        "b": {"discovery": {"type": "etcd", "urls": [f"http://{backend.address}"],
                            "timeout": 1}}}}
    with LoadBalancer.from_config(config) as lb:
        assert not lb.registry.endpoints("b")
        status = lb.status()["services"]["b"]
        assert "malformed answer" in json.dumps(status), status
    assert wait_for(lambda: not tai_lb_threads(), 2.0), tai_lb_threads()


@pytest.mark.timeout(10)
def test_a_fifo_or_a_directory_as_the_configuration_file_is_refused_never_waited_on(
        tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)  # no writer: a plain open() would wait for one for ever
    with pytest.raises(ConfigError, match="cannot read the configuration file: not a regular file"):
        LoadBalancer.from_config(str(fifo))
    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config(folder)
