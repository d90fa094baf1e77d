"""`Endpoint`: one instance of a service, an immutable and hashable value.

An endpoint's identity is its address (``host:port``): the registry keys endpoints by
:attr:`Endpoint.address`, and registering the same address again replaces its metadata.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional, Union

from ._settings import MAX_PORT, check_int, check_port, doc, key_text, shown
from .exceptions import ConfigError

__all__ = ["LABEL_KEY_PATTERN", "Endpoint", "Labels"]

# \Z, not $: "$" also matches before a trailing newline, which would let "host\n" through.
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")
LABEL_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_./-]{1,253}\Z")
"""What a label's name may be: 1 to 253 of letters, digits and ``_./-``."""
_MAX_WEIGHT = 1_000_000
#: the longest zone, region, version or label value (as a DNS name, and the balancer's zone):
#: each is copied into every status() and trace, so a 1 MB version would make them megabytes
_MAX_VALUE_LENGTH = 253
_NAME = f"a non-empty string of at most {_MAX_VALUE_LENGTH} characters, or null"
#: the keys of an endpoint mapping, with what the configuration reference says of each (the
#: meaning of the others is their ``:param`` line in :class:`Endpoint`'s docstring)
ENDPOINT_KEYS: Mapping[str, Mapping[str, Any]] = {
    "address": doc(allowed='"host:port" ("[v6]:port" for IPv6); or host and port',
                   default="required",
                   meaning="where the endpoint listens, as in a ``\"host:port\"`` item"),
    "host": doc(allowed="a host name (at most 253 characters) or an IP address"),
    "port": doc("port", low=1, high=MAX_PORT),
    "weight": doc("relative share", low=1, high=_MAX_WEIGHT),
    "zone": doc(allowed=_NAME), "region": doc(allowed=_NAME),
    "version": doc(allowed=_NAME + " (quote numbers in YAML and TOML)"),
    "labels": doc(allowed="a mapping of names (1 to 253 of letters, digits, _./-) to strings "
                          f"(at most {_MAX_VALUE_LENGTH} characters)"),
    "priority": doc("group", low=0, high=1000),
    "tls_name": doc(allowed="a host name or IPv4 address without a port, or null"),
}
_ENDPOINT_KEYS = tuple(ENDPOINT_KEYS)
_ENDPOINT_KEY_SET = frozenset(_ENDPOINT_KEYS)
_HOSTNAME_MATCH = _HOSTNAME.match
_LABEL_KEY_MATCH = LABEL_KEY_PATTERN.match


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Labels(Mapping[str, str]):
    """An immutable, hashable mapping of label names to values (both strings)."""

    __slots__ = ("_data", "_hash", "_items")

    def __init__(self, items: Union[Mapping[str, str], Iterable[tuple[str, str]], None] = None,
                 *, path: str = "labels") -> None:
        pairs = items.items() if type(items) is dict or isinstance(items, Mapping) else (
            items or ())
        data: dict[str, str] = {}
        for key, value in pairs:
            if not (type(key) is str or isinstance(key, str)) or not _LABEL_KEY_MATCH(key):
                raise ConfigError(path, f"label names must be 1-253 characters of letters, digits "
                                        f"and _./-, got {shown(key)}")
            if not ((type(value) is str or isinstance(value, str))
                    and len(value) <= _MAX_VALUE_LENGTH):
                raise ConfigError(_join(path, key), f"label values must be strings of at most "
                                                    f"{_MAX_VALUE_LENGTH} characters, "
                                                    f"got {shown(value)}")
            data[key] = value
        # The sorted pairs, as a tuple: endpoints compare and hash labels through it, in C.
        self._items = tuple(sorted(data.items()))
        self._data = dict(self._items)
        self._hash = hash(self._items)

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
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Labels, (self._data,))


_NO_LABELS = Labels()  # immutable, so every endpoint without labels shares it

# Labels are immutable, so endpoints with equal labels share one object: a discovery provider that
# rebuilds 10,000 endpoints from JSON makes no new Labels, and comparing two endpoints' labels is
# an identity check.  Bounded: past this many distinct label sets, it starts again.
_SHARED_LABELS: dict[tuple[tuple[str, str], ...], Labels] = {}
_SHARED_LABELS_MAX = 4096


def _shared_labels(items: Mapping[str, str], path: str) -> Labels:
    """The shared `Labels` equal to ``items``, checked (``ConfigError``) on first sight."""
    try:
        known = _SHARED_LABELS.get(tuple(sorted(items.items())))
    except TypeError:  # keys that do not sort, or values that do not hash: Labels() says why
        known = None
    if known is not None:
        return known
    labels = Labels(items, path=path)
    if not labels:
        return _NO_LABELS
    if len(_SHARED_LABELS) >= _SHARED_LABELS_MAX:
        _SHARED_LABELS.clear()
    return _SHARED_LABELS.setdefault(labels._items, labels)


def _intern(value: Optional[str]) -> Optional[str]:
    # Zones, regions and versions are few and repeated on every endpoint: one object each makes
    # comparing endpoints an identity check on them.
    return sys.intern(value) if type(value) is str else value


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
    :ivar compare_key: every field in one tuple (the labels as their sorted pairs): what equality
        and hashing compare.  Comparing two endpoints' ``compare_key`` gives ``==`` without a
        Python-level ``__eq__`` call, for loops over thousands of endpoints.
    """

    __slots__ = ("_hash", "address", "compare_key", "host", "labels", "port", "priority",
                 "region", "tls_name", "version", "weight", "zone")

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
    compare_key: tuple[Any, ...]
    _hash: int

    def __init__(self, host: str, port: int, weight: int = 1, zone: Optional[str] = None,
                 region: Optional[str] = None, version: Optional[str] = None,
                 labels: Union[Mapping[str, str], Labels, None] = None, priority: int = 0,
                 tls_name: Optional[str] = None, *, path: str = "") -> None:
        # The common case (plain str and int values, already valid) is checked inline: a
        # discovery update builds thousands of endpoints.  Anything else goes through the
        # checks that name the field in their error.
        if not (type(host) is str and len(host) <= 253 and _HOSTNAME_MATCH(host)):
            host = _check_host(host, _join(path, "host"))
        if not (type(port) is int and 1 <= port <= MAX_PORT):
            port = check_port(port, _join(path, "port"), what="an integer")
        if not (type(weight) is int and 1 <= weight <= _MAX_WEIGHT):
            weight = check_int(weight, _join(path, "weight"), 1, _MAX_WEIGHT)
        if zone is not None and (type(zone) is not str or not 0 < len(zone) <= _MAX_VALUE_LENGTH):
            zone = _check_name(zone, _join(path, "zone"))
        if region is not None and (type(region) is not str
                                   or not 0 < len(region) <= _MAX_VALUE_LENGTH):
            region = _check_name(region, _join(path, "region"))
        if version is not None and (type(version) is not str
                                    or not 0 < len(version) <= _MAX_VALUE_LENGTH):
            version = _check_name(version, _join(path, "version"))
        if labels is None:
            labels = _NO_LABELS
        elif type(labels) is dict:
            labels = _shared_labels(labels, _join(path, "labels")) if labels else _NO_LABELS
        elif not isinstance(labels, Labels):
            if not isinstance(labels, Mapping):
                raise ConfigError(_join(path, "labels"),
                                  f"must be a mapping of strings, got {shown(labels)}")
            labels = _shared_labels(labels, _join(path, "labels")) if labels else _NO_LABELS
        if not (type(priority) is int and 0 <= priority <= 1000):
            priority = check_int(priority, _join(path, "priority"), 0, 1000)
        if tls_name is not None:
            if ":" in tls_name if isinstance(tls_name, str) else True:
                raise ConfigError(_join(path, "tls_name"),
                                  f"must be a host name, got {shown(tls_name)}")
            tls_name = _check_host(tls_name, _join(path, "tls_name"))
        set_ = object.__setattr__
        set_(self, "host", host)
        set_(self, "port", port)
        set_(self, "weight", weight)
        set_(self, "zone", _intern(zone))
        set_(self, "region", _intern(region))
        set_(self, "version", _intern(version))
        set_(self, "labels", labels)
        set_(self, "priority", priority)
        set_(self, "tls_name", tls_name)
        set_(self, "address", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        # Every field, with the labels as their sorted pairs: equality and hashing compare
        # this tuple, so they never call back into Python (the registry diffs thousands).
        key = (host, port, weight, self.zone, self.region, self.version, labels._items, priority,
               tls_name)
        set_(self, "compare_key", key)
        set_(self, "_hash", hash(key))

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
        if not isinstance(value, (dict, Mapping)):  # dict first: the abstract check is slow
            raise ConfigError(path, f"an endpoint must be \"host:port\" or a mapping, "
                                    f"got {shown(value)}")
        if not _ENDPOINT_KEY_SET.issuperset(value):
            unknown = next(key for key in value if key not in _ENDPOINT_KEY_SET)
            raise ConfigError(_join(path, key_text(unknown)),
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
        return self is other or (self._hash == other._hash
                                 and self.compare_key == other.compare_key)

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
    if type(address) is not str and not isinstance(address, str):
        raise ConfigError(path, f"must be a \"host:port\" string, got {shown(address)}")
    text = address.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(path, f"must be \"[ipv6]:port\", got {shown(address)}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(path, f"must be \"host:port\" (IPv6 as \"[addr]:port\"), "
                                    f"got {shown(address)}")
    # At most five digits: int() of thousands of digits is slow, and refused past 4300.
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise ConfigError(path, f"the port must be a number 1-65535, got {shown(address)}")
    return host, int(port_text)


def _check_host(host: object, path: str) -> str:
    if not isinstance(host, str) or not host:
        raise ConfigError(path, f"must be a non-empty host name or IP address, got {shown(host)}")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ConfigError(path, f"is not a valid IPv6 address: {shown(host)}") from None
    if len(host) > 253 or not _HOSTNAME.match(host):
        raise ConfigError(path, f"must be a host name or IP address, got {shown(host)}")
    return host


def _check_name(value: object, path: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_VALUE_LENGTH:
        raise ConfigError(path, f"must be a non-empty string of at most {_MAX_VALUE_LENGTH} "
                                f"characters, or null, got {shown(value)}")
    return value
