"""The configuration reference, read off the settings classes: every key, its default, unit,
allowed values and meaning.

Nothing here is written twice: the keys are the settings dataclasses' fields (and the loader's
tables of keys that are not fields: an endpoint's, a strategy's options, ``timeout``'s), the
defaults are the fields' defaults, the meanings the ``:param`` lines of the classes'
docstrings, and the units and bounds the :func:`~tai_lb._settings.doc` metadata next to each
field.  ``docs/_ext/config_reference.py`` renders :func:`sections` into ``docs/reference.rst``
when the documentation is built, and ``tests/test_reference.py`` checks that every key the loader
accepts is in it, and that the bounds shown are those the checks apply.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import config
from ._settings import Settings
from .discovery import DiscoveryConfig, FileConfig, StaticConfig, WatchConfig
from .discovery.dns import DnsConfig
from .discovery.etcd import EtcdConfig
from .endpoint import ENDPOINT_KEYS, Endpoint
from .failover import BreakerConfig, FailoverConfig
from .health import HealthCheckConfig
from .metrics import MetricsConfig, StatsdConfig
from .outlier import OutlierConfig
from .pool import PoolConfig
from .prometheus import PrometheusConfig
from .retry import RetryConfig
from .routing.affinity import AffinityConfig
from .routing.locality import LocalityConfig
from .routing.rebalancing import RebalanceConfig
from .routing.slow_start import SlowStartConfig
from .routing.subsets import SubsetConfig
from .strategies import STRATEGIES, Strategy
from .strategies.names import OPTIONS

__all__ = ["Row", "Section", "allowed_text", "as_configured", "param_docs", "sections",
           "shown_default"]

_PARAM = re.compile(r"^:param (\w+):(.*)$")
_CONFIG_WORDS = {"None": "null", "True": "true", "False": "false"}
_PYTHON_WORDS = re.compile(r"\b(None|True|False)\b")


@dataclass(frozen=True)
class Row:
    """One key of a section: how it is written, its default, unit, allowed values and meaning
    (reStructuredText)."""

    key: str
    default: str
    unit: str
    allowed: str
    meaning: str
    #: the keyword of the section's ``build`` that sets the key (empty when none does)
    field: str = ""
    #: the bounds of a number, as :func:`~tai_lb._settings.doc` gives them (None: not a number)
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Section:
    """The keys of one mapping of a configuration.

    :param id: a short name, such as ``health_check`` or ``discovery.dns``.
    :param path: where the mapping is in a configuration, such as
        ``services.NAME.health_check``.
    :param intro: what the mapping is (reStructuredText).
    :param rows: its keys.
    :param build: builds the section's settings from keyword arguments (for the bound checks
        of ``tests/test_reference.py``), when there is such a class.
    """

    id: str
    path: str
    intro: str
    rows: tuple[Row, ...]
    build: Optional[Callable[..., Any]] = None

    @property
    def title(self) -> str:
        """The section's title: its path as a literal (the top level has none)."""
        return f"``{self.path}``" if self.path else "The top level"


def param_docs(obj: object) -> dict[str, str]:
    """The ``:param NAME: text`` lines of ``obj``'s docstring, by name, each on one line."""
    params: dict[str, str] = {}
    current: Optional[str] = None
    for line in (inspect.getdoc(obj) or "").splitlines():
        match = _PARAM.match(line.strip())
        if match:
            current = match[1]
            params[current] = match[2].strip()
        elif current is not None and line.startswith(" ") and line.strip():
            params[current] += " " + line.strip()
        else:
            current = None
    return params


def _intro(obj: object) -> str:
    return as_configured((inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " "))


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e16:
        return f"{int(value):,}"
    return f"{value:g}"


def shown_default(value: Any) -> str:
    """A default value as a configuration would write it (JSON's spelling)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (int, float)):
        return f"{value:g}" if float(value).is_integer() and abs(value) < 1e16 else repr(value)
    if isinstance(value, (frozenset, set, tuple, list)):
        items = sorted(value)
        return "[" + ", ".join(shown_default(item) for item in items) + "]"
    if isinstance(value, Settings):
        return "the defaults below"
    if isinstance(value, Strategy):
        return f'"{value.name}"'
    return repr(value)


def allowed_text(meta: Mapping[str, Any], integer: bool) -> str:
    """The allowed values of a key from its metadata: its bounds and its ``allowed`` words."""
    parts = []
    if "low" in meta or "high" in meta:
        kind = "an integer" if integer else "a number"
        low, high = meta.get("low"), meta.get("high")
        if low is not None and high is not None:
            bounds = (f"> {_number(low)} and ≤ {_number(high)}" if meta.get("low_open")
                      else f"{_number(low)} to {_number(high)}")
        elif low is not None:
            bounds = f"> {_number(low)}" if meta.get("low_open") else f"≥ {_number(low)}"
        else:
            bounds = f"≤ {_number(high)}"  # type: ignore[arg-type]
        parts.append(f"{kind}, {bounds}")
    if meta.get("allowed"):
        parts.append(meta["allowed"])
    return "; ".join(parts)


def as_configured(text: str) -> str:
    """A docstring's words as a configuration spells them: None, True and False as null, true
    and false."""
    return _PYTHON_WORDS.sub(lambda match: _CONFIG_WORDS[match[0]], text)


def _row(key: str, default: str, meta: Mapping[str, Any], meaning: str, integer: bool) -> Row:
    return Row(key=meta.get("key") or key, default=meta.get("default") or default,
               unit=meta.get("unit", ""), allowed=allowed_text(meta, integer),
               meaning=as_configured(meta.get("meaning") or meaning), field=key,
               low=meta.get("low"), high=meta.get("high"), low_open=bool(meta.get("low_open")),
               integer=integer)


def _is_int(annotation: object) -> bool:
    return str(annotation) in ("int", "Optional[int]")


def settings_rows(cls: type[Settings], skip: Iterable[str] = ()) -> tuple[Row, ...]:
    """The rows of a settings dataclass: its fields but the Python-only ones and ``skip``."""
    params = param_docs(cls)
    rows = []
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        if item.name in cls.python_only or item.name in skip:
            continue
        if item.default is not dataclasses.MISSING:
            default = shown_default(item.default)
        elif item.default_factory is not dataclasses.MISSING:
            default = shown_default(item.default_factory())
        else:
            default = "required"
        meta = dict(item.metadata)
        if not meta.get("allowed") and "Config" in str(item.type):  # a part of its own
            meta["allowed"] = ("a mapping (below), or null (off)"
                               if str(item.type).startswith("Optional[") else "a mapping (below)")
        rows.append(_row(item.name, default, meta, params.get(item.name, ""),
                         _is_int(item.type)))
    return tuple(rows)


def table_rows(table: Mapping[str, Mapping[str, Any]],
               owner: Optional[Callable[..., Any]] = None) -> tuple[Row, ...]:
    """The rows of a table of keys (key -> metadata) whose defaults are the keyword arguments
    of ``owner`` and whose meanings are its ``:param`` lines (else the metadata's)."""
    params = param_docs(owner) if owner is not None else {}
    signature = inspect.signature(owner if owner is not None else (lambda: None))
    rows = []
    for key, meta in table.items():
        parameter = signature.parameters.get(key)
        default = ("required" if parameter is None or parameter.default is parameter.empty
                   else shown_default(parameter.default))
        integer = parameter is not None and _is_int(parameter.annotation)
        rows.append(_row(key, default, meta, params.get(key, ""), integer))
    return tuple(rows)


def _strategy_rows() -> tuple[Row, ...]:
    rows = []
    for name, cls in STRATEGIES.items():
        options = ", ".join(f"``{option}``" for option in OPTIONS[name])
        rows.append(Row(key=f'"{name}"', default="the default" if name == "round_robin" else "",
                        unit="", allowed=f"options: {options}" if options else "no options",
                        meaning=(inspect.getdoc(cls) or "").split("\n")[0]))
    return tuple(rows)


def _by_keyword(cls: type[Settings], **base: Any) -> Callable[..., Any]:
    return lambda **changes: cls(**{**base, **changes})


def sections() -> tuple[Section, ...]:
    """Every mapping of a configuration, with its keys: the top level and metrics, a service,
    then the mappings of a service's keys in the order of :data:`~tai_lb.config.SERVICE_KEYS`."""
    service = {row.key: row for row in settings_rows(config.ServiceConfig, skip=("failover",))}
    top = settings_rows(config.LoadBalancerConfig)
    result = [
        Section("top", "", "The top level of a configuration.",
                (*top, *table_rows(config.LOADER_KEYS))),
        Section("metrics", "metrics", _intro(MetricsConfig), settings_rows(MetricsConfig)),
        Section("metrics.statsd", "metrics.statsd", _intro(StatsdConfig),
                settings_rows(StatsdConfig), StatsdConfig),
        Section("metrics.prometheus", "metrics.prometheus", _intro(PrometheusConfig),
                settings_rows(PrometheusConfig), PrometheusConfig),
        Section("service", "services.NAME", "The settings of one service (and of ``defaults``, "
                "but ``endpoints`` and ``discovery``). A service needs ``endpoints`` or "
                "``discovery``; every other key is optional.",
                tuple(service[key] for key in config.SERVICE_KEYS)),
    ]
    parts: dict[str, list[Section]] = {key: [] for key in config.SERVICE_KEYS}
    parts["endpoints"].append(Section(
        "endpoint", "services.NAME.endpoints[]", "An endpoint written as a mapping (or as a "
        "``\"host:port\"`` string).", table_rows(ENDPOINT_KEYS, Endpoint),
        lambda **changes: Endpoint(**{"host": "127.0.0.1", "port": 80, **changes})))
    parts["strategy"].append(Section(
        "strategy", "services.NAME.strategy", "A strategy name, or a mapping with ``name`` and "
        "the strategy's options next to it: ``{\"name\": \"consistent_hash\", \"load_bound\": "
        "1.25}``.", _strategy_rows()))
    for name, table in OPTIONS.items():
        if table:
            parts["strategy"].append(Section(
                f"strategy.{name}", f"services.NAME.strategy (name {name})",
                f"The options of ``{name}``.", table_rows(table, STRATEGIES[name]),
                STRATEGIES[name]))
    own: list[tuple[str, type[Settings], Callable[..., Any]]] = [
        ("health_check", HealthCheckConfig, _by_keyword(HealthCheckConfig, path="/")),
        ("outlier_detection", OutlierConfig, OutlierConfig),
        ("circuit_breaker", BreakerConfig, BreakerConfig),
        ("retries", RetryConfig, RetryConfig),
        ("pool", PoolConfig, PoolConfig),
        ("affinity", AffinityConfig, _by_keyword(AffinityConfig, key="source_ip")),
        ("locality", LocalityConfig, LocalityConfig),
        ("subset", SubsetConfig, _by_keyword(SubsetConfig, key="header:X-Version")),
        ("rebalance", RebalanceConfig, RebalanceConfig),
        ("slow_start", SlowStartConfig, SlowStartConfig),
    ]
    for key, cls, build in own:
        parts[key].append(Section(key, f"services.NAME.{key}", _intro(cls), settings_rows(cls),
                                  build))
    parts["backups"].append(Section(
        "backups", "services.NAME.backups", "A list of endpoints, or a mapping of the endpoints "
        "and the failover thresholds (which apply to every priority group). " + _intro(
            FailoverConfig), (Row("endpoints", "[]", "", "a list of endpoints, as ``endpoints``",
                                  "the backup endpoints: their priorities come after every "
                                  "primary endpoint's"), *settings_rows(FailoverConfig)),
        FailoverConfig))
    parts["timeout"].append(Section(
        "timeout", "services.NAME.timeout", "A number (both timeouts), a list ``[connect, "
        "read]`` or a mapping of these keys, for HTTP requests that set no timeout of their "
        "own; null, the default, waits as long as plain requests does.",
        table_rows(config.TIMEOUT_KEYS),
        lambda **changes: config.parse_timeout(changes, "timeout")))
    parts["discovery"].append(Section(
        "discovery", "services.NAME.discovery", _intro(DiscoveryConfig) + " The keys of "
        "every type are below; these apply to all of them.",
        (*settings_rows(DiscoveryConfig, skip=("source", "watch")), *settings_rows(WatchConfig)),
        WatchConfig))
    for kind, source in (("static", StaticConfig), ("file", FileConfig), ("dns", DnsConfig),
                         ("etcd", EtcdConfig)):
        parts["discovery"].append(Section(
            f"discovery.{kind}", f"services.NAME.discovery (type {kind})", _intro(source),
            settings_rows(source), source))
    for key in config.SERVICE_KEYS:
        result.extend(parts[key])
    return tuple(result)
