"""The strategies by configuration name, and the function that resolves a configured strategy.

:data:`STRATEGIES` maps each built-in strategy's name to its class, and
:func:`~tai_lb.strategies.resolve_strategy` turns whatever a configuration gives (a name, a
mapping with ``name`` and options, a :class:`~tai_lb.Strategy` or a plain function) into a
strategy, or raises :class:`~tai_lb.ConfigError` naming the key path.  It sits apart from the
base class because it names every strategy, and the strategies' modules import the base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from .._settings import MAX_SECONDS, doc, key_text, shown
from ..exceptions import ConfigError
from .base import FunctionStrategy, Strategy, StrategyFunction
from .hashing import ConsistentHash
from .least_loaded import LeastConnections, PeakEwma
from .maglev import Maglev
from .randomized import Random, Weighted
from .rotation import RoundRobin, WeightedRoundRobin

__all__ = ["STRATEGIES", "StrategyLike", "resolve_strategy"]

STRATEGIES: Mapping[str, type[Strategy]] = {
    cls.name: cls
    for cls in (RoundRobin, WeightedRoundRobin, Random, Weighted, LeastConnections,
                ConsistentHash, Maglev, PeakEwma)
}
"""Strategy classes by configuration name."""

StrategyLike = Union[str, Strategy, StrategyFunction, Mapping[str, Any]]
"""A strategy name, a `Strategy`, a function, or a config dict ``{"name": ..., **options}``."""

_LOAD_BOUND = doc("times the mean load", "or null (off)", low=1, high=1000, low_open=True)
_SECONDS = doc("seconds", low=0, high=MAX_SECONDS, low_open=True)

OPTIONS: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    "round_robin": {},
    "weighted_round_robin": {},
    "random": {},
    "weighted": {},
    "least_connections": {},
    "consistent_hash": {"vnodes": doc("points per unit of weight", low=4, high=10_000),
                        "load_bound": _LOAD_BOUND,
                        "max_ring_size": doc("points", low=1024, high=1 << 24)},
    "maglev": {"table_size": doc("slots", "a prime", low=7, high=1_000_003),
               "load_bound": _LOAD_BOUND},
    "peak_ewma": {"decay": _SECONDS, "default_latency": _SECONDS},
}
"""The options of each strategy in a configuration (``{"name": ..., **options}``), with what
the configuration reference says of each (their meaning is the class's ``:param`` line)."""


def resolve_strategy(value: StrategyLike, path: str = "strategy") -> Strategy:
    """Turn a name, a config dict, a `Strategy` or a function into a `Strategy`.

    Raises :class:`~tai_lb.ConfigError` naming ``path`` for an unknown name or a bad option.
    """
    if isinstance(value, Strategy):
        return value
    allowed_names = ", ".join(STRATEGIES)
    if isinstance(value, str):
        if value not in STRATEGIES:
            raise ConfigError(path, f"unknown strategy {shown(value)}; allowed: {allowed_names}")
        value = {"name": value}
    if isinstance(value, Mapping):
        if "name" not in value:
            raise ConfigError(path, f"a strategy mapping needs 'name'; allowed: {allowed_names}")
        name = value["name"]
        if not isinstance(name, str) or name not in STRATEGIES:
            raise ConfigError(f"{path}.name",
                              f"unknown strategy {shown(name)}; allowed: {allowed_names}")
        options = {k: v for k, v in value.items() if k != "name"}
        for key in options:
            if key not in OPTIONS[name]:
                allowed = ", ".join(OPTIONS[name]) or "none"
                raise ConfigError(f"{path}.{key_text(key)}",
                                  f"unknown option of {name}; allowed: {allowed}")
        try:
            return STRATEGIES[name](**options)
        except ConfigError as error:
            raise ConfigError(f"{path}.{error.path}", error.reason) from None
    if callable(value):
        return FunctionStrategy(value)
    raise ConfigError(path, f"must be a strategy name ({', '.join(STRATEGIES)}), a Strategy, a "
                            f"function or a mapping with 'name', got {shown(value)}")
