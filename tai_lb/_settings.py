"""What every group of settings shares: building from a configuration mapping, new(), and the
checks (numbers, durations, ports, integers from LOW to HIGH, booleans, value objects) and the
quoting of values that every ``ConfigError`` message uses.  Settings classes call these checks
rather than writing their own."""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Optional, TypeVar, cast

from .exceptions import ConfigError

S = TypeVar("S", bound="Settings")

MAX_SECONDS = 86_400.0
"""The longest duration any setting accepts (one day): every duration must also work as a
socket timeout, an ``Event.wait()`` and a deadline on the monotonic clock."""

MIN_INTERVAL = 0.001
"""The shortest period of anything that repeats (a health check, a discovery read): below it a
scheduler would spin, and ``now + 5e-324`` is ``now``, so a check would be due forever."""

_SHOWN_MAX = 100  # characters of a value quoted in an error message


class _Quoting(reprlib.Repr):
    """``repr()`` that stays short whatever the value: a few levels, items and characters.

    A configuration value may be nested a thousand deep, be a YAML alias bomb (a few hundred
    bytes whose full repr needs gigabytes), or an integer of thousands of digits (whose repr
    raises ``ValueError`` on Python 3.11+).
    """

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 4
        self.maxdeque = self.maxarray = 4
        self.maxstring = self.maxother = 60
        self.maxlong = 40

    def repr1(self, x: Any, level: int) -> str:
        if isinstance(x, Mapping) and not isinstance(x, dict):  # MappingProxyType and friends
            return self.repr_dict(x, level)  # type: ignore[arg-type]
        return super().repr1(x, level)

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # str() of a huge int is slow, and refused past 4300 digits
            return f"<an integer of {int(x.bit_length() * 0.30103) + 1} digits>"
        return super().repr_int(x, level)


_quoting = _Quoting()


def shown(value: object) -> str:
    """``repr(value)`` cut to about 100 characters, safe for any size or depth of value."""
    try:
        text = _quoting.repr(value)
    except Exception:  # a broken __repr__ of a value given from Python
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX - 3] + "..."


def key_text(key: object) -> str:
    """A mapping key as one part of a key path: a string (cut to 100 characters), or the
    quoted value of another type (YAML keys may be numbers, dates, null...)."""
    if isinstance(key, str):
        return key if len(key) <= _SHOWN_MAX else key[:_SHOWN_MAX - 3] + "..."
    return shown(key)


MAX_PORT = 65535
"""The highest TCP or UDP port number."""


def is_int(value: object, low: float = -math.inf, high: float = math.inf) -> bool:
    """Whether ``value`` is an integer (not a bool) from ``low`` to ``high``."""
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def check_int(value: object, key: str, low: int, high: int, *,
              what: str = "an integer") -> int:
    """``value`` if it is an integer from ``low`` to ``high`` (not a bool), else a
    :class:`ConfigError` naming ``key``: "must be <what> from <low> to <high>"."""
    if not is_int(value, low, high):
        raise ConfigError(key, f"must be {what} from {low} to {high}, got {shown(value)}")
    return cast(int, value)


def check_port(value: object, key: str, *, what: str = "a port number") -> int:
    """``value`` if it is a port number (1 to 65535), else a :class:`ConfigError` naming
    ``key`` (``what`` as in :func:`check_int`)."""
    return check_int(value, key, 1, MAX_PORT, what=what)


def check_bool(value: object, key: str) -> bool:
    """``value`` if it is True or False, else a :class:`ConfigError` naming ``key``."""
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {shown(value)}")
    return value


def check_instance(value: object, key: str, kind: type[Any]) -> None:
    """A :class:`ConfigError` naming ``key`` unless ``value`` is a ``kind`` (a value object
    given from Python, where a setting's own class is expected)."""
    if not isinstance(value, kind):
        name = kind.__name__
        article = "an" if name[:1] in "AEIOU" else "a"
        raise ConfigError(key, f"must be {article} {name}, got {shown(value)}")


def keyed_settings(value: object, keys: Sequence[str]) -> Mapping[str, Any]:
    """``value`` if it is the mapping of a setting that routes by a request's ``key`` (affinity,
    subsets): only ``keys``, ``key`` among them required; else a :class:`ConfigError` naming
    the sub-key."""
    if not isinstance(value, Mapping):
        raise ConfigError("", f"must be a mapping with a key, got {shown(value)}")
    for key in value:
        if key not in keys:
            raise ConfigError(key_text(key), f"unknown key; allowed: {', '.join(keys)}")
    if "key" not in value:
        raise ConfigError("key", "is required: \"header:NAME\", \"cookie:NAME\", "
                                 "\"source_ip\" or \"user_id\"")
    return value


def check_number(value: object, key: str, low: float = 0.0, high: float = MAX_SECONDS, *,
                 low_open: bool = True, what: str = "a number of seconds") -> float:
    """``value`` as a float if it is a number above ``low`` (or at it, unless ``low_open``) and
    at most ``high`` (not a bool, never infinite nor NaN), else a :class:`ConfigError` naming
    ``key`` and the bounds.

    Python compares an int with a float exactly, so an integer too large for a float is
    refused here rather than raising ``OverflowError`` in ``float()``.
    """
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not (low < value if low_open else low <= value) or not value <= high):
        bounds = (f"> {low:.15g} and <= {high:.15g}" if low_open
                  else f"from {low:.15g} to {high:.15g}")
        raise ConfigError(key, f"must be {what} {bounds}, got {shown(value)}")
    return float(value)


def doc(unit: str = "", allowed: str = "", *, low: Optional[float] = None,
        high: Optional[float] = None, low_open: bool = False, key: str = "",
        default: str = "", meaning: str = "") -> dict[str, Any]:
    """What the configuration reference (``docs/reference.rst``) says of a key, kept next to
    the field as its ``dataclasses.field(metadata=...)``.

    :param unit: the unit of a number, in words (``"seconds"``, ``"count"``, ``"share"``...).
    :param allowed: the values allowed, in words, when not (only) a range.
    :param low: the lowest value allowed (above it only, with ``low_open``).
    :param high: the highest value allowed.
    :param low_open: ``low`` itself is refused.
    :param key: the key in a configuration, when it is not the field's name
        (``"backoff.base"`` for ``backoff_base``).
    :param default: the default as shown, when the field's default does not show well.
    :param meaning: the meaning, for a key that has no ``:param`` line in its class's docstring.

    ``low``, ``high`` and ``low_open`` repeat the bounds that the class's checks apply:
    ``tests/test_reference.py`` tries each against the class, so the two cannot drift apart.
    """
    given = {"unit": unit, "allowed": allowed, "low": low, "high": high, "low_open": low_open,
             "key": key, "default": default, "meaning": meaning}
    return {name: value for name, value in given.items()
            if value is not None and value != "" and value is not False}


class Settings:
    """Mixin of every settings class: the frozen dataclasses that hold a configuration key's
    settings (a whole configuration's, for :class:`~tai_lb.LoadBalancerConfig`).

    It gives :meth:`new` and a :meth:`from_config` that takes the fields by name; a class whose
    configuration has another shape overrides :meth:`from_config`.  ``python_only`` names fields
    that configuration files may not set (a function, say).
    """

    python_only: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls: type[S], value: Any) -> S:
        """Build from a configuration mapping; errors name the sub-key (the caller adds the
        key path before it)."""
        if not isinstance(value, Mapping):
            raise ConfigError("", f"must be a mapping, got {shown(value)}")
        allowed = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.name not in cls.python_only]
        for key in value:
            if key not in allowed:
                raise ConfigError(key_text(key), f"unknown key; allowed: {', '.join(allowed)}")
        return cls(**value)

    def new(self: S, **changes: Any) -> S:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
