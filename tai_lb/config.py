"""Configuration: frozen value objects, and the loader that builds them from dicts and files.

Everything is checked at load time.  A bad key or value raises :class:`~tai_lb.ConfigError`
whose message names the key path, the value and what is allowed, for example::

    services.users.strategy: unknown strategy 'fastest'; allowed: round_robin, ...

Keys of the specification that this version does not implement yet are rejected with a clear
"not supported yet" error rather than silently ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Literal, Optional, Union

from ._config_files import read_config_file
from ._settings import MAX_SECONDS, Settings, check_instance, check_number, doc, key_text, shown
from .discovery import DiscoveryConfig
from .endpoint import Endpoint
from .exceptions import ConfigError
from .failover import BreakerConfig, FailoverConfig
from .health import HealthCheckConfig
from .metrics import MetricsConfig
from .outlier import OutlierConfig
from .pool import PoolConfig
from .profiles import PROFILES, profile_defaults
from .registry import check_service_name
from .retry import RetryConfig
from .routing.affinity import AffinityConfig
from .routing.locality import LocalityConfig, check_zone
from .routing.rebalancing import RebalanceConfig
from .routing.slow_start import SlowStartConfig
from .routing.subsets import SubsetConfig
from .strategies import RoundRobin, RoutingKey, Strategy, StrategyLike, resolve_strategy

__all__ = [
    "TOKEN_PATTERN",
    "KeySource",
    "LoadBalancerConfig",
    "ServiceConfig",
    "load_config",
    "parse_config",
]

# \Z, not $: "$" also matches before a trailing newline, which would let "X-User\n" through.
TOKEN_PATTERN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
"""What a header or cookie name may be: an HTTP token (RFC 9110), one character or more."""

SERVICE_KEYS = ("endpoints", "discovery", "strategy", "scheme", "hash_key", "health_check",
                "outlier_detection", "circuit_breaker", "retries", "affinity", "backups",
                "rebalance", "slow_start", "pool", "timeout", "locality", "subset")
"""Every key a service may have (some not supported yet, see :data:`NOT_SUPPORTED_YET`)."""

TOP_LEVEL_KEYS = ("services", "defaults", "metrics", "zone", "profile")

#: the environment variable that gives the balancer's zone when the configuration has none
_ZONE_VARIABLE = "TAI_LB_ZONE"

#: the top-level keys that are no field of :class:`LoadBalancerConfig`, for the reference
LOADER_KEYS: Mapping[str, Mapping[str, Any]] = {
    "defaults": doc(allowed="a mapping of service keys but endpoints and discovery", default="{}",
                    meaning="service keys given to every service; a service's own value wins, "
                            "and two mappings merge one level deep"),
    "profile": doc(allowed=", ".join(f'"{name}"' for name in PROFILES) + ", or null",
                   default="null", meaning="a tuning profile (:doc:`tuning`), whose "
                   "``defaults`` come before the configuration's own"),
}
#: the keys of a ``timeout`` mapping
TIMEOUT_KEYS: Mapping[str, Mapping[str, Any]] = {
    name: doc("seconds", "or null (no limit)", low=0, high=MAX_SECONDS, low_open=True,
              default="null", meaning=meaning)
    for name, meaning in (("connect", "the longest wait to connect, a free pooled connection "
                                      "included"),
                          ("read", "the longest wait for data, each time (not the whole "
                                   "response: see retries.deadline)"))}

NOT_SUPPORTED_YET: Mapping[str, str] = MappingProxyType({})
"""Keys of the specification that this version rejects, with the reason shown to the user."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass(frozen=True)
class KeySource:
    """Where a request's routing key comes from: a header, a cookie, the source IP or the user.

    Written in configuration as ``"header:X-User-Id"``, ``"cookie:sessionid"``, ``"source_ip"``
    or ``"user_id"``; from Python a function of the request is accepted too.
    """

    kind: Literal["header", "cookie", "source_ip", "user_id", "function"]
    name: Optional[str] = None
    function: Optional[Callable[[Any], Optional[RoutingKey]]] = None

    def __post_init__(self) -> None:
        if self.kind in ("header", "cookie"):
            if not isinstance(self.name, str) or not TOKEN_PATTERN.match(self.name):
                raise ConfigError("name", f"a {self.kind} name must be an HTTP token, "
                                          f"got {shown(self.name)}")
        elif self.kind == "function":
            if not callable(self.function):
                raise ConfigError("function", f"must be callable, got {shown(self.function)}")
        elif self.kind not in ("source_ip", "user_id"):
            raise ConfigError("kind", f"must be header, cookie, source_ip, user_id or function, "
                                      f"got {shown(self.kind)}")

    @classmethod
    def parse(cls, value: Union[str, Callable[[Any], Optional[RoutingKey]]],
              path: str = "hash_key") -> KeySource:
        """Build from ``"header:NAME"``, ``"cookie:NAME"``, ``"source_ip"``, ``"user_id"``, or a
        function of the request."""
        if callable(value):
            return cls("function", function=value)
        if not isinstance(value, str):
            raise ConfigError(path, f"must be \"header:NAME\", \"cookie:NAME\", \"source_ip\" or "
                                    f"\"user_id\", got {shown(value)}")
        kind, sep, name = value.partition(":")
        if value in ("source_ip", "user_id"):
            return cls(value)  # type: ignore[arg-type]
        if sep and kind in ("header", "cookie"):
            try:
                return cls(kind, name)  # type: ignore[arg-type]
            except ConfigError:
                raise ConfigError(path, f"{kind} name must be an HTTP token, "
                                        f"got {shown(value)}") from None
        raise ConfigError(path, f"must be \"header:NAME\", \"cookie:NAME\", \"source_ip\" or "
                                f"\"user_id\", got {shown(value)}")

    def __str__(self) -> str:
        if self.kind in ("header", "cookie"):
            return f"{self.kind}:{self.name}"
        return self.kind if self.kind != "function" else repr(self.function)


#: the parts of a service that may be None (not used), and the class each must be otherwise
_OPTIONAL_PARTS: tuple[tuple[str, type[Any]], ...] = (
    ("hash_key", KeySource), ("health_check", HealthCheckConfig),
    ("outlier_detection", OutlierConfig), ("circuit_breaker", BreakerConfig),
    ("discovery", DiscoveryConfig), ("affinity", AffinityConfig), ("locality", LocalityConfig),
    ("subset", SubsetConfig), ("rebalance", RebalanceConfig), ("slow_start", SlowStartConfig))


@dataclass(frozen=True)
class ServiceConfig(Settings):
    """The settings of one service.

    :param endpoints: the static endpoints (a service needs these, ``discovery``, or both).
    :param strategy: how to pick among them (default round robin).
    :param scheme: ``"http"`` or ``"https"``: the scheme of health probes (a request's URL sets
        its own).
    :param health_check: active health checks, or None for none.
    :param outlier_detection: passive ejection of endpoints failing real traffic, or None.
    :param circuit_breaker: a circuit breaker per endpoint, or None.
    :param backups: endpoints used only when the primary groups fail (their priority is after
        every endpoint's).
    :param failover: when traffic moves between priority groups and back.
    :param discovery: where the endpoints come from, when not (only) listed.
    :param hash_key: where the routing key of an HTTP request comes from.
    :param affinity: session affinity (sticky keys), or None; its ``key`` is then the routing
        key of HTTP requests, and ``hash_key``, if set too, must be the same.
    :param rebalance: how changes of the endpoints are taken (immediate when None).
    :param slow_start: how a new endpoint's share ramps up, or None (the defaults then in
        gradual mode; not allowed with ``rebalance`` mode immediate).
    :param retries: when and how often a failed HTTP request is retried on another endpoint.
    :param pool: the HTTP connections kept per endpoint.
    :param timeout: (connect, read) seconds for HTTP requests that set no timeout of their own;
        None waits as long as plain requests does.
    :param locality: zone-aware routing, or None.
    :param subset: routing by endpoint metadata, or None.
    """

    endpoints: tuple[Endpoint, ...] = field(default=(), metadata=doc(
        allowed="a list of \"host:port\" or mappings (below)"))
    strategy: Strategy = field(default_factory=RoundRobin, metadata=doc(
        allowed="a strategy name, or a mapping of name and options (below)"))
    scheme: Literal["http", "https"] = field(default="http", metadata=doc(
        allowed='"http" or "https"'))
    hash_key: Optional[KeySource] = field(default=None, metadata=doc(
        allowed='"header:NAME", "cookie:NAME", "source_ip", "user_id", or null'))
    retries: RetryConfig = field(default_factory=RetryConfig, metadata=doc(
        allowed="a mapping (below), or false (one attempt)"))
    pool: PoolConfig = field(default_factory=PoolConfig)
    timeout: Optional[tuple[Optional[float], Optional[float]]] = field(default=None, metadata=doc(
        "seconds", "a number, [connect, read] or {connect, read} (below); null: none"))
    health_check: Optional[HealthCheckConfig] = None
    outlier_detection: Optional[OutlierConfig] = None
    circuit_breaker: Optional[BreakerConfig] = None
    backups: tuple[Endpoint, ...] = field(default=(), metadata=doc(
        allowed="a list of endpoints, or a mapping (below)"))
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    discovery: Optional[DiscoveryConfig] = field(default=None, metadata=doc(
        allowed="a mapping with a type (below)"))
    affinity: Optional[AffinityConfig] = None
    locality: Optional[LocalityConfig] = None
    subset: Optional[SubsetConfig] = None
    rebalance: Optional[RebalanceConfig] = None
    slow_start: Optional[SlowStartConfig] = None

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, endpoint in enumerate((*self.endpoints, *self.backups)):
            check_instance(endpoint, f"endpoints[{i}]", Endpoint)
            if endpoint.address in seen:
                raise ConfigError(f"endpoints[{i}]", f"duplicate address {endpoint.address} "
                                                     f"(also endpoints[{seen[endpoint.address]}])")
            seen[endpoint.address] = i
        check_instance(self.failover, "failover", FailoverConfig)
        check_instance(self.strategy, "strategy", Strategy)
        if self.scheme not in ("http", "https"):
            raise ConfigError("scheme", f"must be \"http\" or \"https\", got {shown(self.scheme)}")
        check_instance(self.retries, "retries", RetryConfig)
        check_instance(self.pool, "pool", PoolConfig)
        for key, kind in _OPTIONAL_PARTS:
            if getattr(self, key) is not None:
                check_instance(getattr(self, key), key, kind)
        if self.timeout is not None:
            object.__setattr__(self, "timeout", parse_timeout(self.timeout, "timeout"))
        if self.affinity is not None and self.hash_key not in (None, self.affinity.source):
            raise ConfigError("affinity.key", "must be the same as hash_key when both are set "
                                              f"({self.affinity.key} and {self.hash_key})")
        if (self.slow_start is not None and self.rebalance is not None
                and self.rebalance.mode == "immediate"):
            raise ConfigError("slow_start", "has no effect with rebalance mode \"immediate\": "
                                            "use \"gradual\" or \"manual\", or no rebalance")

    @classmethod
    def from_config(cls, value: Any) -> ServiceConfig:
        """Build from one service's mapping of a configuration (errors name the sub-key)."""
        if not isinstance(value, Mapping):
            raise ConfigError("", f"must be a mapping of service settings, got {shown(value)}")
        return cls(**_parse_service_fields(value, ""))


@dataclass(frozen=True)
class LoadBalancerConfig(Settings):
    """A whole balancer's settings: the services by name, where metrics go, and its own zone.

    :param services: the services by name (lower-case host names); required.
    :param metrics: where metrics go.
    :param zone: the balancer's zone, for zone-aware routing; when None, the environment
        variable ``TAI_LB_ZONE`` gives it (see :attr:`local_zone`).
    """

    services: Mapping[str, ServiceConfig] = field(
        default_factory=lambda: MappingProxyType({}),
        metadata=doc(allowed="a mapping of service names to service mappings", default="required"))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    zone: Optional[str] = field(default=None, metadata=doc(
        allowed="a zone name (at most 253 characters), or null"))

    @property
    def local_zone(self) -> Optional[str]:
        """The balancer's zone: ``zone`` if set, else ``TAI_LB_ZONE`` if set and not empty.

        :raises ConfigError: ``TAI_LB_ZONE`` is used and is no zone name (``"eu-1a "``, whose
            space would match no endpoint's zone and turn zone-aware routing off unseen).
        """
        if self.zone is not None:
            return self.zone
        return check_zone(os.environ.get(_ZONE_VARIABLE) or None, _ZONE_VARIABLE)

    def __post_init__(self) -> None:
        check_zone(self.zone, "zone")
        self.local_zone  # noqa: B018 - checks TAI_LB_ZONE at load time, when it gives the zone
        for name, service in self.services.items():
            check_service_name(name, f"services.{key_text(name)}")
            check_instance(service, f"services.{key_text(name)}", ServiceConfig)
        object.__setattr__(self, "services", MappingProxyType(dict(self.services)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (LoadBalancerConfig, (dict(self.services), self.metrics, self.zone))

    @classmethod
    def from_config(cls, value: Any) -> LoadBalancerConfig:
        """Build from a whole configuration mapping (as :func:`parse_config`)."""
        return parse_config(value)


# -- the loader ---------------------------------------------------------------------------------


def parse_config(data: Mapping[str, Any]) -> LoadBalancerConfig:
    """Check a configuration dict and build its :class:`LoadBalancerConfig`."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the configuration must be a mapping, got {type(data).__name__}")
    _reject_unknown(data, TOP_LEVEL_KEYS, "")
    metrics = MetricsConfig()
    if data.get("metrics") is not None:
        try:
            metrics = MetricsConfig.from_config(data["metrics"])
        except ConfigError as error:
            raise ConfigError(f"metrics.{error.path}" if error.path else "metrics",
                              error.reason) from None
    defaults = data.get("defaults", {})
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, Mapping):
        raise ConfigError("defaults", f"must be a mapping of service keys, got {shown(defaults)}")
    if data.get("profile") is not None:  # its defaults first: the configuration's own win
        defaults = _merge(profile_defaults(data["profile"]), defaults)
    for key in ("endpoints", "discovery"):
        if key in defaults:
            raise ConfigError(f"defaults.{key}", "is per service and not allowed in defaults")
    _parse_service_fields(defaults, "defaults")  # report bad defaults under their own path
    services = data.get("services")
    if services is None:
        raise ConfigError("services", "is required: a mapping of service names to settings")
    if not isinstance(services, Mapping):
        raise ConfigError("services", f"must be a mapping of service names to settings, "
                                      f"got {shown(services)}")
    built: dict[str, ServiceConfig] = {}
    for name, value in services.items():
        path = f"services.{key_text(name)}"
        check_service_name(name, path)
        settings = {} if value is None else value
        if not isinstance(settings, Mapping):
            raise ConfigError(path, f"must be a mapping of service settings, "
                                    f"got {shown(settings)}")
        if "endpoints" not in settings and "discovery" not in settings:
            raise ConfigError(path, "needs endpoints (a list of \"host:port\" or mappings) "
                                    "or discovery")
        built[name] = ServiceConfig(**_parse_service_fields(_merge(defaults, settings), path))
    zone = check_zone(data.get("zone"), "zone")
    return LoadBalancerConfig(MappingProxyType(built), metrics, zone)


#: the parts of a service that null cannot turn off (null turns off the others, when set in
#: defaults or a profile)
_NEVER_NULL = ("retries", "pool", "discovery")


def _merge(defaults: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in own.items():
        base = merged.get(key)
        if isinstance(base, Mapping) and isinstance(value, Mapping):
            if key == "strategy" and value.get("name", base.get("name")) != base.get("name"):
                merged[key] = value  # another strategy: the default's options do not apply
            else:
                merged[key] = {**base, **value}
        else:
            merged[key] = value
    return merged


def _parse_service_fields(settings: Mapping[str, Any], path: str) -> dict[str, Any]:
    _reject_unknown(settings, SERVICE_KEYS, path)
    for key in settings:
        if key in NOT_SUPPORTED_YET:
            raise ConfigError(_join(path, key), f"not supported yet: {NOT_SUPPORTED_YET[key]}; "
                                                "remove the key")
    fields: dict[str, Any] = {}
    if "endpoints" in settings:
        raw = settings["endpoints"]
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise ConfigError(_join(path, "endpoints"),
                              f"must be a list of \"host:port\" or mappings, got {shown(raw)}")
        fields["endpoints"] = tuple(
            Endpoint.from_value(item, path=f"{_join(path, 'endpoints')}[{i}]")
            for i, item in enumerate(raw))
    if "strategy" in settings:
        strategy: StrategyLike = settings["strategy"]
        fields["strategy"] = resolve_strategy(strategy, _join(path, "strategy"))
    if "scheme" in settings:
        fields["scheme"] = settings["scheme"]
    if settings.get("hash_key") is not None:  # null: none (undoes one set in defaults)
        fields["hash_key"] = KeySource.parse(settings["hash_key"], _join(path, "hash_key"))
    for key, build in (("retries", RetryConfig.from_config), ("pool", PoolConfig.from_config),
                       ("discovery", DiscoveryConfig.from_config),
                       ("health_check", HealthCheckConfig.from_config),
                       ("outlier_detection", OutlierConfig.from_config),
                       ("circuit_breaker", BreakerConfig.from_config),
                       ("affinity", AffinityConfig.from_config),
                       ("locality", LocalityConfig.from_config),
                       ("subset", SubsetConfig.from_config),
                       ("rebalance", RebalanceConfig.from_config),
                       ("slow_start", SlowStartConfig.from_config)):
        if key in settings and (settings[key] is not None or key in _NEVER_NULL):
            try:
                fields[key] = build(settings[key])
            except ConfigError as error:
                raise ConfigError(_join(_join(path, key), error.path) if error.path
                                  else _join(path, key), error.reason) from None
    if "backups" in settings:
        fields.update(_parse_backups(settings["backups"], _join(path, "backups"),
                                     fields.get("endpoints", ())))
    if "timeout" in settings and settings["timeout"] is not None:
        fields["timeout"] = parse_timeout(settings["timeout"], _join(path, "timeout"))
    try:
        ServiceConfig(**fields)
    except ConfigError as error:
        raise ConfigError(_join(path, error.path), error.reason) from None
    return fields


def _parse_backups(value: Any, path: str, primaries: tuple[Endpoint, ...]) -> dict[str, Any]:
    """``backups``: a list of endpoints, or ``{"endpoints": [...], "failover_below": ...,
    "failback_at": ...}``.  Backups get priorities after every primary endpoint's."""
    policy: dict[str, Any] = {}
    items = value
    if isinstance(value, Mapping):
        for key in value:
            if key not in ("endpoints", "failover_below", "failback_at"):
                raise ConfigError(f"{path}.{key_text(key)}",
                                  "unknown key; allowed: endpoints, failover_below, failback_at")
        items = value.get("endpoints", [])
        policy = {k: value[k] for k in ("failover_below", "failback_at") if k in value}
        path = f"{path}.endpoints"
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ConfigError(path, f"must be a list of \"host:port\" or mappings, got {shown(items)}")
    after = max((e.priority for e in primaries), default=0) + 1
    backups = []
    for i, item in enumerate(items):
        endpoint = Endpoint.from_value(item, path=f"{path}[{i}]")
        backups.append(endpoint.replace(priority=min(1000, after + endpoint.priority)))
    try:
        failover = FailoverConfig(**policy)
    except ConfigError as error:
        raise ConfigError(f"{path.rsplit('.endpoints', 1)[0]}.{error.path}", error.reason) from None
    return {"backups": tuple(backups), "failover": failover}


def parse_timeout(value: Any, path: str) -> tuple[Optional[float], Optional[float]]:
    """A timeout setting as (connect, read) seconds: a number, a pair or ``{connect, read}``."""
    if isinstance(value, Mapping):
        for key in value:
            if key not in TIMEOUT_KEYS:
                raise ConfigError(f"{path}.{key_text(key)}", "unknown key; allowed: connect, read")
        pair = (value.get("connect"), value.get("read"))
        names = (f"{path}.connect", f"{path}.read")
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = (value[0], value[1])
        names = (f"{path}[0]", f"{path}[1]")
    else:
        pair = (value, value)
        names = (path, path)
    result: list[Optional[float]] = []
    for item, name in zip(pair, names):
        result.append(None if item is None else check_number(item, name))
    return (result[0], result[1])


def _reject_unknown(settings: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for key in settings:
        if key not in allowed:
            raise ConfigError(_join(path, key_text(key)),
                              f"unknown key; allowed: {', '.join(allowed)}")


def load_config(source: Union[Mapping[str, Any], str, os.PathLike[str],
                              LoadBalancerConfig]) -> LoadBalancerConfig:
    """Build a :class:`LoadBalancerConfig` from a dict, or from a JSON, TOML or YAML file."""
    if isinstance(source, LoadBalancerConfig):
        return source
    if isinstance(source, Mapping):
        return parse_config(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError("", "the configuration must be a mapping or a file path, "
                              f"got {type(source).__name__}")
    return parse_config(read_config_file(os.fspath(source)))
