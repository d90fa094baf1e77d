"""The shared settings checks (``tai_lb._settings``), and the settings classes built on them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import tai_lb
import tai_lb.discovery
from tai_lb import (
    ConfigError,
    Endpoint,
    HealthCheckConfig,
    LoadBalancerConfig,
    PoolConfig,
    RetryConfig,
    ServiceConfig,
    failover,
)
from tai_lb._settings import (
    Settings,
    check_bool,
    check_instance,
    check_int,
    check_number,
    check_port,
    is_int,
)
from tai_lb.discovery import (
    DiscoveryConfig,
    DnsConfig,
    EtcdConfig,
    FileConfig,
    StaticConfig,
    WatchConfig,
    base,
    dns,
    etcd,
)
from tai_lb.discovery.etcd import EtcdRegistrar
from tai_lb.failover import BreakerConfig, FailoverConfig
from tai_lb.metrics import MetricsConfig, StatsdConfig
from tai_lb.outlier import OutlierConfig
from tai_lb.prometheus import PrometheusConfig
from tai_lb.routing.affinity import AffinityConfig
from tai_lb.routing.locality import LocalityConfig
from tai_lb.routing.rebalancing import RebalanceConfig
from tai_lb.routing.slow_start import SlowStartConfig
from tai_lb.routing.subsets import SubsetConfig

SETTINGS_CLASSES: list[type[Any]] = [
    AffinityConfig, BreakerConfig, DiscoveryConfig, DnsConfig, EtcdConfig, FailoverConfig,
    FileConfig, HealthCheckConfig, LoadBalancerConfig, LocalityConfig, MetricsConfig,
    OutlierConfig, PoolConfig, PrometheusConfig, RebalanceConfig, RetryConfig, ServiceConfig,
    SlowStartConfig, StaticConfig, StatsdConfig, SubsetConfig, WatchConfig]


def message(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, [1]])
def test_is_int_refuses_what_is_not_an_integer(value: Any) -> None:
    assert not is_int(value)


def test_is_int_bounds_are_inclusive_and_exact_for_huge_integers() -> None:
    assert is_int(1, 1, 3) and is_int(3, 1, 3) and not is_int(4, 1, 3)
    assert is_int(10**400) and not is_int(10**400, 1, 2**63)


def test_check_int_names_the_key_the_bounds_and_what_is_expected() -> None:
    assert check_int(7, "n", 1, 10) == 7
    assert message(check_int, 0, "n", 1, 10) == "n: must be an integer from 1 to 10, got 0"
    assert message(check_int, 0, "ttl", 1, 3600, what="an integer number of seconds") == (
        "ttl: must be an integer number of seconds from 1 to 3600, got 0")


@pytest.mark.parametrize("value", [0, 65536, -1, True, "80", 80.0, None])
def test_check_port_refuses_what_is_no_port(value: Any) -> None:
    assert message(check_port, value, "port").startswith(
        "port: must be a port number from 1 to 65535, got ")


def test_check_port_accepts_every_port() -> None:
    assert check_port(1, "port") == 1 and check_port(65535, "port") == 65535


def test_check_bool() -> None:
    assert check_bool(False, "block") is False
    assert message(check_bool, "yes", "block") == "block: must be true or false, got 'yes'"


def test_check_instance_names_the_class_with_its_article() -> None:
    check_instance(Endpoint("a", 1), "e", Endpoint)
    assert message(check_instance, "a:1", "e", Endpoint) == "e: must be an Endpoint, got 'a:1'"
    assert message(check_instance, 1, "s", ServiceConfig) == "s: must be a ServiceConfig, got 1"


def test_check_number_still_refuses_nan_and_infinity() -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"^d: must be a number of seconds"):
            check_number(value, "d")


# Every place a port is set goes through check_port (the endpoint keeps its older wording).
@pytest.mark.parametrize(("build", "text"), [
    (lambda port: Endpoint("a", port), "port: must be an integer from 1 to 65535"),
    (lambda port: StatsdConfig(port=port), "port: must be a port number from 1 to 65535"),
    (lambda port: DnsConfig(name="x", port=port), "port: must be a port number from 1 to 65535"),
    (lambda port: DnsConfig(name="x", record="A", endpoint_port=port),
     "endpoint_port: must be a port number from 1 to 65535"),
])
@pytest.mark.parametrize("port", [0, 65536, True, "80"])
def test_every_port_setting_is_checked_alike(build: Any, text: str, port: Any) -> None:
    assert message(build, port).startswith(text)


def test_an_etcd_url_with_port_0_is_refused() -> None:
    assert message(EtcdConfig, urls=("http://h:0",)).startswith("urls[0]: must be an http://")
    assert EtcdConfig(urls=("http://h", "http://h:65535")).urls == ("http://h", "http://h:65535")


def test_registrar_ttl_message_is_unchanged() -> None:
    assert message(EtcdRegistrar, ["http://127.0.0.1:1"], "users", "127.0.0.1:80", ttl=0) == (
        "ttl: must be an integer number of seconds from 1 to 3600, got 0")


def test_a_service_discovery_must_be_a_discovery_config() -> None:
    assert message(ServiceConfig, discovery={"type": "static"}).startswith(
        "discovery: must be a DiscoveryConfig, got {")


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda cls: cls.__name__)
def test_every_settings_class_is_a_frozen_settings_dataclass(cls: type[Any]) -> None:
    assert issubclass(cls, Settings) and dataclasses.is_dataclass(cls)
    assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert "new" not in vars(cls), "new() comes from Settings, not a copy"


def test_every_settings_class_in_the_package_is_listed() -> None:
    found = {cls for cls in _subclasses(Settings) if cls.__module__.startswith("tai_lb.")}
    assert found == set(SETTINGS_CLASSES)


def _subclasses(cls: type[Any]) -> set[type[Any]]:
    direct = set(cls.__subclasses__())
    return direct.union(*(_subclasses(sub) for sub in direct))


def test_new_returns_a_checked_copy() -> None:
    config = ServiceConfig(retries=RetryConfig(attempts=2))
    assert config.new(scheme="https").scheme == "https"
    assert config.new(scheme="https").retries == config.retries
    with pytest.raises(ConfigError, match=r"^scheme: "):
        config.new(scheme="ftp")
    assert MetricsConfig().new(statsd=StatsdConfig()).statsd == StatsdConfig()
    tagged = StatsdConfig(tags={"env": "prod"})
    assert tagged.new(port=9125).tags == tagged.tags == (("env", "prod"),)
    assert hash(tagged) == hash(StatsdConfig(tags={"env": "prod"}))
    assert tagged.tag_suffix == ",env:prod" and StatsdConfig(tags=True).tag_suffix == ""
    assert StatsdConfig().tag_suffix is None
    with pytest.raises(ConfigError, match=r"^tags: must be true, false or a mapping"):
        StatsdConfig(tags=("env",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^tags\.env: "):
        tagged.new(tags=(("env", "a|b"),))
    assert FailoverConfig().new(failback_at=0.9) == FailoverConfig(0.5, 0.9)


def test_service_and_whole_configurations_build_from_mappings() -> None:
    service = ServiceConfig.from_config({"endpoints": ["127.0.0.1:8001"], "retries": False})
    assert service.endpoints == (Endpoint("127.0.0.1", 8001),)
    assert service.retries.attempts == 1
    assert message(ServiceConfig.from_config, {"retries": {"attempts": 0}}).startswith(
        "retries.attempts: must be an integer from 1 to 10")
    assert message(ServiceConfig.from_config, ["a:1"]).startswith("must be a mapping")
    whole = LoadBalancerConfig.from_config({"services": {"users": {"endpoints": ["a:1"]}}})
    assert whole.services["users"].endpoints == (Endpoint("a", 1),)


def test_old_names_of_settings_classes_still_work() -> None:
    assert tai_lb.RetryPolicy is RetryConfig and "RetryPolicy" in tai_lb.__all__
    assert tai_lb.RetryPolicy() == RetryConfig.DEFAULT  # type: ignore[attr-defined]
    for old, new in (("DnsSettings", DnsConfig), ("EtcdSettings", EtcdConfig),
                     ("FileSettings", FileConfig), ("StaticSettings", StaticConfig),
                     ("WatchSettings", WatchConfig),
                     ("SourceSettings", tai_lb.discovery.SourceConfig)):
        assert getattr(tai_lb.discovery, old) is new and old in tai_lb.discovery.__all__
    assert (base.WatchSettings, dns.DnsSettings, etcd.EtcdSettings) == (
        WatchConfig, DnsConfig, EtcdConfig)
    assert failover.FailoverPolicy is FailoverConfig


def test_every_settings_class_name_ends_in_config() -> None:
    assert [cls.__name__ for cls in SETTINGS_CLASSES if not cls.__name__.endswith("Config")] == []
