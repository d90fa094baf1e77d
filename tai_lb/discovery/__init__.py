"""Service discovery: providers that feed a service's endpoints into the registry.

Implemented here: ``static`` and ``file`` (see :mod:`tai_lb.discovery.file`).  DNS and etcd
are planned; their types are rejected as "not supported yet".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..endpoint import Endpoint
from ..exceptions import ConfigError
from .base import DiscoveryWatcher, Provider, SourceError, WatchSettings
from .file import FileProvider

__all__ = ["DiscoveryConfig", "DiscoveryWatcher", "FileProvider", "Provider", "SourceError",
           "StaticProvider", "WatchSettings"]

_PLANNED = {"dns": "DNS discovery is not built yet", "etcd": "etcd discovery is not built yet"}


class StaticProvider(Provider):
    """A fixed list, as ``{"type": "static", "endpoints": [...]}``."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = list(endpoints)
        self.skipped = 0
        self._given = False

    def fetch(self) -> Optional[list[Endpoint]]:
        """The list, the first time; None (unchanged) after."""
        if self._given:
            return None
        self._given = True
        return list(self.endpoints)


@dataclass(frozen=True)
class DiscoveryConfig:
    """The ``discovery`` setting of a service."""

    type: Literal["static", "file"]
    path: Optional[str] = None
    endpoints: tuple[Endpoint, ...] = ()
    watch: WatchSettings = field(default_factory=WatchSettings)

    @classmethod
    def from_config(cls, value: Any) -> DiscoveryConfig:
        """Build from the ``discovery`` mapping of a configuration."""
        if not isinstance(value, Mapping):
            raise ConfigError("", f"must be a mapping with a type, got {value!r}")
        kind = value.get("type")
        if kind in _PLANNED:
            raise ConfigError("type", f"not supported yet: {_PLANNED[kind]}")
        if kind not in ("static", "file"):
            raise ConfigError("type", f"must be static, file, dns or etcd, got {kind!r}")
        own = {"static": ("endpoints",), "file": ("path",)}[kind]
        shared = ("interval", "max_removal_share", "confirmations", "cache_path")
        for key in value:
            if key != "type" and key not in own and key not in shared:
                raise ConfigError(str(key), f"unknown key for {kind} discovery; allowed: "
                                            f"{', '.join(('type', *own, *shared))}")
        watch = WatchSettings.from_config({k: value[k] for k in shared if k in value})
        if kind == "file":
            path = value.get("path")
            if not isinstance(path, str) or not path:
                raise ConfigError("path", f"file discovery needs a path, got {path!r}")
            return cls("file", path=path, watch=watch)
        raw = value.get("endpoints")
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise ConfigError("endpoints", f"static discovery needs a list, got {raw!r}")
        endpoints = tuple(Endpoint.from_value(item, path=f"endpoints[{i}]")
                          for i, item in enumerate(raw))
        return cls("static", endpoints=endpoints, watch=watch)

    def provider(self) -> Provider:
        """A new provider for this setting."""
        if self.type == "file":
            assert self.path is not None
            return FileProvider(self.path)
        return StaticProvider(self.endpoints)
