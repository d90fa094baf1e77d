"""Tuning profiles: shipped configurations whose ``defaults`` suit one kind of traffic.

Each profile is a TOML file next to this module, a whole configuration that ``tai-lb check``
accepts: its ``defaults`` are the profile (every value commented with why), its ``services`` an
example to replace.  A configuration takes a profile's defaults with the top-level key
``"profile": "<name>"``; its own ``defaults`` and each service's keys then win over the
profile's, merged as ``defaults`` are (``docs/tuning.rst``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .._config_files import read_config_file
from .._settings import shown
from ..exceptions import ConfigError

__all__ = ["PROFILES", "profile_defaults", "profile_path"]

PROFILES = ("development", "high_throughput", "low_latency", "stability", "production_stable",
            "production_unstable")
"""The names of the shipped profiles."""


def profile_path(name: str) -> str:
    """The file of the profile ``name`` (one of :data:`PROFILES`)."""
    if name not in PROFILES:
        raise ValueError(f"no profile {name!r}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.toml")


def profile_defaults(name: object, path: str = "profile") -> Mapping[str, Any]:
    """The ``defaults`` of the profile ``name``, or a :class:`~tai_lb.ConfigError` naming
    ``path`` when there is no such profile."""
    if not isinstance(name, str) or name not in PROFILES:
        raise ConfigError(path, f"unknown profile {shown(name)}; allowed: {', '.join(PROFILES)}")
    defaults: Mapping[str, Any] = read_config_file(profile_path(name)).get("defaults", {})
    return defaults
