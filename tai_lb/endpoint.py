"""`Endpoint`: one instance of a service, an immutable and hashable value.

An endpoint's identity is its address (``host:port``): the registry keys endpoints by
:attr:`Endpoint.address`, and registering the same address again replaces its metadata.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional, Union

from .exceptions import ConfigError

__all__ = ["Endpoint", "Labels"]

_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9_./-]{1,253}$")
_MAX_WEIGHT = 1_000_000
_ENDPOINT_KEYS = ("address", "host", "port", "weight", "zone", "region", "version", "labels",
                  "priority", "tls_name")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Labels(Mapping[str, str]):
    """An immutable, hashable mapping of label names to values (both strings)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, items: Union[Mapping[str, str], Iterable[tuple[str, str]], None] = None,
                 *, path: str = "labels") -> None:
        pairs = items.items() if isinstance(items, Mapping) else (items or ())
        data: dict[str, str] = {}
        for key, value in pairs:
            if not isinstance(key, str) or not _LABEL_KEY.match(key):
                raise ConfigError(path, f"label names must be 1-253 characters of letters, digits "
                                        f"and _./-, got {key!r}")
            if not isinstance(value, str):
                raise ConfigError(_join(path, key), f"label values must be strings, got {value!r}")
            data[key] = value
        self._data = dict(sorted(data.items()))
        self._hash = hash(tuple(self._data.items()))

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Labels, (self._data,))


class Endpoint:
    """One instance of a service: where it listens and what is known about it.

    Immutable and hashable; two endpoints are equal when every field is equal.  Build one from
    keywords, or with :meth:`parse` (``"host:port"``, ``"[v6]:port"``) or :meth:`from_value`
    (a string or a configuration dict).

    :param host: a host name, an IPv4 address or an IPv6 address (without brackets).
    :param port: the TCP port, 1 to 65535.
    :param weight: relative share of traffic for weighted strategies, a positive integer.
    :param zone: availability zone, such as ``"eu-1a"``.
    :param region: region, such as ``"eu-1"``.
    :param version: the version the instance runs, such as ``"1.4"``.
    :param labels: free-form string labels; stored as immutable :class:`Labels`.
    :param priority: failover group; 0 is used first, then 1, and so on.
    :param tls_name: the name to send as SNI and verify the certificate against, for an
        endpoint whose certificate does not carry the service name; None: the service name.
    """

    __slots__ = ("_hash", "address", "host", "labels", "port", "priority", "region", "tls_name",
                 "version", "weight", "zone")

    host: str
    port: int
    weight: int
    zone: Optional[str]
    region: Optional[str]
    version: Optional[str]
    labels: Labels
    priority: int
    tls_name: Optional[str]
    address: str
    _hash: int

    def __init__(self, host: str, port: int, weight: int = 1, zone: Optional[str] = None,
                 region: Optional[str] = None, version: Optional[str] = None,
                 labels: Union[Mapping[str, str], Labels, None] = None, priority: int = 0,
                 tls_name: Optional[str] = None, *, path: str = "") -> None:
        set_ = object.__setattr__
        host = _check_host(host, _join(path, "host"))
        set_(self, "host", host)
        set_(self, "port", _check_int(port, _join(path, "port"), 1, 65535))
        set_(self, "weight", _check_int(weight, _join(path, "weight"), 1, _MAX_WEIGHT))
        set_(self, "zone", _check_name(zone, _join(path, "zone")))
        set_(self, "region", _check_name(region, _join(path, "region")))
        set_(self, "version", _check_name(version, _join(path, "version")))
        if labels is not None and not isinstance(labels, Mapping):
            raise ConfigError(_join(path, "labels"),
                              f"must be a mapping of strings, got {labels!r}")
        set_(self, "labels", labels if isinstance(labels, Labels)
             else Labels(labels, path=_join(path, "labels")))
        set_(self, "priority", _check_int(priority, _join(path, "priority"), 0, 1000))
        if tls_name is not None and (":" in tls_name if isinstance(tls_name, str) else True):
            raise ConfigError(_join(path, "tls_name"), f"must be a host name, got {tls_name!r}")
        set_(self, "tls_name", None if tls_name is None
             else _check_host(tls_name, _join(path, "tls_name")))
        shown = f"[{host}]" if ":" in host else host
        set_(self, "address", f"{shown}:{self.port}")
        set_(self, "_hash", hash(self._fields()))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def parse(cls, address: str, *, path: str = "", **metadata: Any) -> Endpoint:
        """Build an endpoint from ``"host:port"`` or ``"[ipv6]:port"`` and optional metadata."""
        host, port = _split_address(address, path or "address")
        return cls(host, port, path=path, **metadata)

    @classmethod
    def from_value(cls, value: Union[str, Mapping[str, Any], Endpoint], *,
                   path: str = "") -> Endpoint:
        """Build an endpoint from a configuration value: a string, a dict or an `Endpoint`.

        A dict has ``address`` (or ``host`` and ``port``) and optionally ``weight``, ``zone``,
        ``region``, ``version``, ``labels``, ``priority`` and ``tls_name``.
        """
        if isinstance(value, Endpoint):
            return value
        if isinstance(value, str):
            return cls.parse(value, path=path)
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"an endpoint must be \"host:port\" or a mapping, "
                                    f"got {value!r}")
        unknown = sorted(set(value) - set(_ENDPOINT_KEYS))
        if unknown:
            raise ConfigError(_join(path, str(unknown[0])),
                              f"unknown key; allowed: {', '.join(_ENDPOINT_KEYS)}")
        fields = dict(value)
        if "address" in fields:
            if "host" in fields or "port" in fields:
                raise ConfigError(path, "give either address or host and port, not both")
            host, port = _split_address(fields.pop("address"), _join(path, "address"))
        else:
            if "host" not in fields or "port" not in fields:
                raise ConfigError(path, "an endpoint needs address, or host and port")
            host, port = fields.pop("host"), fields.pop("port")
        return cls(host, port, path=path, **fields)

    def replace(self, **changes: Any) -> Endpoint:
        """Return a copy with the given fields changed."""
        fields: dict[str, Any] = {
            "host": self.host, "port": self.port, "weight": self.weight, "zone": self.zone,
            "region": self.region, "version": self.version, "labels": self.labels,
            "priority": self.priority, "tls_name": self.tls_name,
        }
        fields.update(changes)
        return Endpoint(**fields)

    # -- value behaviour ------------------------------------------------------------------------

    def _fields(self) -> tuple[Any, ...]:
        return (self.host, self.port, self.weight, self.zone, self.region, self.version,
                self.labels, self.priority, self.tls_name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Endpoint is immutable; use replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Endpoint is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Endpoint):
            return NotImplemented
        return self._hash == other._hash and self._fields() == other._fields()

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        extras = [f"weight={self.weight}"] if self.weight != 1 else []
        extras += [f"{name}={getattr(self, name)!r}" for name in ("zone", "region", "version")
                   if getattr(self, name) is not None]
        if self.labels:
            extras.append(f"labels={dict(self.labels)!r}")
        if self.priority:
            extras.append(f"priority={self.priority}")
        if self.tls_name:
            extras.append(f"tls_name={self.tls_name!r}")
        return f"Endpoint({self.address!r}{''.join(', ' + e for e in extras)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, self._fields())

    def to_dict(self) -> dict[str, Any]:
        """The endpoint as a JSON-serialisable dict (the configuration form)."""
        out: dict[str, Any] = {"address": self.address, "weight": self.weight}
        for name in ("zone", "region", "version"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.priority:
            out["priority"] = self.priority
        if self.tls_name:
            out["tls_name"] = self.tls_name
        return out


def _rebuild(host: str, port: int, weight: int, zone: Optional[str], region: Optional[str],
             version: Optional[str], labels: Labels, priority: int,
             tls_name: Optional[str] = None) -> Endpoint:
    return Endpoint(host, port, weight, zone, region, version, labels, priority, tls_name)


def _split_address(address: object, path: str) -> tuple[str, int]:
    if not isinstance(address, str):
        raise ConfigError(path, f"must be a \"host:port\" string, got {address!r}")
    text = address.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(path, f"must be \"[ipv6]:port\", got {address!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(path, f"must be \"host:port\" (IPv6 as \"[addr]:port\"), "
                                    f"got {address!r}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(path, f"the port must be a number 1-65535, got {address!r}")
    return host, int(port_text)


def _check_host(host: object, path: str) -> str:
    if not isinstance(host, str) or not host:
        raise ConfigError(path, f"must be a non-empty host name or IP address, got {host!r}")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ConfigError(path, f"is not a valid IPv6 address: {host!r}") from None
    if len(host) > 253 or not _HOSTNAME.match(host):
        raise ConfigError(path, f"must be a host name or IP address, got {host!r}")
    return host


def _check_int(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(path, f"must be an integer from {low} to {high}, got {value!r}")
    return value


def _check_name(value: object, path: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"must be a non-empty string or null, got {value!r}")
    return value
