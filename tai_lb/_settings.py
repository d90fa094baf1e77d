"""What every group of settings shares: building from a configuration mapping, and new()."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from .exceptions import ConfigError

S = TypeVar("S", bound="Settings")


def check_int(value: object, key: str, low: int, high: int) -> int:
    """``value`` if it is an integer from ``low`` to ``high`` (not a bool), else a
    :class:`ConfigError` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(key, f"must be an integer from {low} to {high}, got {value!r}")
    return value


class Settings:
    """Mixin for the frozen dataclasses that hold one configuration key's settings.

    ``python_only`` names fields that configuration files may not set (a function, say).
    """

    python_only: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls: type[S], value: Any) -> S:
        """Build from a configuration mapping; errors name the sub-key (the caller adds the
        key path before it)."""
        if not isinstance(value, Mapping):
            raise ConfigError("", f"must be a mapping, got {value!r}")
        allowed = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.name not in cls.python_only]
        for key in value:
            if key not in allowed:
                raise ConfigError(str(key), f"unknown key; allowed: {', '.join(allowed)}")
        return cls(**value)

    def new(self: S, **changes: Any) -> S:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
