"""Service discovery: providers that feed a service's endpoints into the registry.

Implemented here: ``static``, ``file`` (see :mod:`tai_lb.discovery.file`), ``dns`` (see
:mod:`tai_lb.discovery.dns`) and ``etcd`` (see :mod:`tai_lb.discovery.etcd`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Protocol

from .._settings import Settings, doc, key_text, shown
from ..endpoint import Endpoint
from ..exceptions import ConfigError
from .base import DiscoveryWatcher, Provider, SourceError, WatchConfig, WatchSettings
from .dns import DnsConfig, DnsProvider, DnsSettings
from .etcd import EtcdClient, EtcdConfig, EtcdProvider, EtcdSettings
from .file import YAML_SUFFIXES, FileProvider

__all__ = ["DiscoveryConfig", "DiscoveryWatcher", "DnsConfig", "DnsProvider", "DnsSettings",
           "EtcdClient", "EtcdConfig", "EtcdProvider", "EtcdSettings", "FileConfig", "FileProvider",
           "FileSettings", "Provider", "SourceConfig", "SourceError", "SourceSettings",
           "StaticConfig", "StaticProvider", "StaticSettings", "WatchConfig", "WatchSettings"]

_PLANNED: dict[str, str] = {}


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


class SourceConfig(Protocol):
    """The settings of one discovery type (the keys other than ``type`` and the watch keys)."""

    def provider(self, service: str) -> Provider:
        """A new provider of the endpoints of ``service``."""


@dataclass(frozen=True)
class StaticConfig(Settings):
    """``{"type": "static", "endpoints": [...]}``: a fixed list.

    :param endpoints: the endpoints, as a service's ``endpoints``.
    """

    endpoints: tuple[Endpoint, ...] = field(default=(), metadata=doc(
        allowed='a list of "host:port" or endpoint mappings', default="required"))

    @classmethod
    def from_config(cls, value: Any) -> StaticConfig:
        """Build from the discovery mapping (without ``type`` and the watch keys)."""
        raw = value.get("endpoints")
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise ConfigError("endpoints", f"static discovery needs a list, got {shown(raw)}")
        return cls(tuple(Endpoint.from_value(item, path=f"endpoints[{i}]")
                         for i, item in enumerate(raw)))

    def provider(self, service: str) -> Provider:
        """A provider giving the list once."""
        return StaticProvider(self.endpoints)


@dataclass(frozen=True)
class FileConfig(Settings):
    """``{"type": "file", "path": ...}``: a watched JSON or YAML file.

    :param path: the file, read again when it changes (``.yaml`` and ``.yml`` need PyYAML).
    """

    path: str = field(default="", metadata=doc(allowed="a file path", default="required"))

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError("path", f"file discovery needs a path, got {shown(self.path)}")
        if self.path.endswith(YAML_SUFFIXES):
            try:
                import yaml  # noqa: F401, PLC0415 - fail here, not at every read
            except ImportError:
                raise ConfigError("path", "a YAML file needs PyYAML: pip install "
                                          "'tai-lb[yaml]' (or write the file as JSON)") from None

    def provider(self, service: str) -> Provider:
        """A provider reading the file when it changes."""
        return FileProvider(self.path)


SourceSettings = SourceConfig  #: old name of :class:`SourceConfig`
StaticSettings = StaticConfig  #: old name of :class:`StaticConfig`
FileSettings = FileConfig  #: old name of :class:`FileConfig`

#: discovery type -> (its own keys, how to build its settings from them)
_TYPES: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, Any]], SourceConfig]]] = {
    "static": (("endpoints",), StaticConfig.from_config),
    "file": (("path",), FileConfig.from_config),
    "dns": (("name", "record", "nameserver", "port", "endpoint_port", "min_ttl", "max_ttl",
             "timeout"), DnsConfig.from_config),
    "etcd": (("urls", "prefix", "timeout"), EtcdConfig.from_config),
}
_WATCH_KEYS = tuple(f.name for f in fields(WatchConfig))


@dataclass(frozen=True)
class DiscoveryConfig(Settings):
    """The ``discovery`` setting of a service: its type, the type's settings, how to watch.

    :param type: where the endpoints come from: a fixed list, a watched file, DNS records or
        etcd keys.
    :param source: the type's own settings (a :class:`StaticConfig`, :class:`FileConfig`,
        :class:`DnsConfig` or :class:`EtcdConfig`).
    :param watch: how the source is polled and guarded.
    """

    type: str = field(metadata=doc(allowed='"static", "file", "dns" or "etcd"'))
    source: SourceConfig
    watch: WatchConfig = field(default_factory=WatchConfig)

    @classmethod
    def from_config(cls, value: Any) -> DiscoveryConfig:
        """Build from the ``discovery`` mapping of a configuration."""
        if not isinstance(value, Mapping):
            raise ConfigError("", f"must be a mapping with a type, got {shown(value)}")
        kind = value.get("type")
        if not isinstance(kind, str):  # a list or a mapping would not even be hashable
            raise ConfigError("type", f"must be static, file, dns or etcd, got {shown(kind)}")
        if kind in _PLANNED:
            raise ConfigError("type", f"not supported yet: {_PLANNED[kind]}")
        if kind not in _TYPES:
            raise ConfigError("type", f"must be static, file, dns or etcd, got {shown(kind)}")
        own, build = _TYPES[kind]
        for key in value:
            if key != "type" and key not in own and key not in _WATCH_KEYS:
                raise ConfigError(key_text(key), f"unknown key for {kind} discovery; allowed: "
                                            f"{', '.join(('type', *own, *_WATCH_KEYS))}")
        watch = WatchConfig.from_config({k: value[k] for k in _WATCH_KEYS if k in value})
        return cls(kind, build({k: value[k] for k in own if k in value}), watch)

    def provider(self, service: str) -> Provider:
        """A new provider of the endpoints of ``service``."""
        return self.source.provider(service)
