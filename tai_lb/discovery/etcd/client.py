"""etcd v3 discovery and self-registration, through etcd's JSON gateway with urllib3.

Layout (SPEC): one key per instance, ``<prefix>/<service>/<instance-id>``, whose value is JSON
``{"address": "host:port", "weight": 1, "zone": ..., "version": ..., "labels": {...}}``.

:class:`EtcdProvider` lists a service's keys at one revision, then watches from the next
revision on a thread of its own, so a change reaches the registry as soon as etcd reports it.
When the watch is lost (etcd restarted, the connection cut, the revision compacted) it lists
again, after a jittered, growing delay, and the registry receives exactly the differences.
:class:`EtcdRegistrar` puts this instance's key under a lease and keeps the lease alive.

The gateway is etcd's HTTP/1.1 + JSON front of its gRPC API (paths under ``/v3/``, etcd 3.4
and later; keys and values base64-encoded). The ``etcd3`` package is not used: it fails to
import with current protobuf releases.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union
from urllib.parse import urlsplit

import urllib3
from urllib3.util.connection import allowed_gai_family

from ... import _forksafe
from ..._settings import Settings, check_number, shown
from ...endpoint import Endpoint
from ...exceptions import ConfigError
from ..base import Provider, SourceError

__all__ = ["Backoff", "EtcdClient", "EtcdError", "EtcdProvider", "EtcdRegistrar", "EtcdSettings",
           "WatchCompacted", "WatchIdle", "WatchStream", "interrupt"]

log = logging.getLogger(__name__)

#: delays between reconnection attempts: from the first to the cap, doubling, with jitter
RECONNECT_FIRST = 0.05
RECONNECT_CAP = 5.0
#: a watch that lasted this long resets the reconnection delays
WATCH_HEALTHY = 1.0
#: a watch silent for this long is opened again from the next revision, in case etcd hangs
#: with the connection still up (a connection cut without a word is found by TCP keep-alive)
WATCH_IDLE = 300.0
#: TCP keep-alive on etcd connections: first probe after 30 s idle, then every 10 s, 3 probes
_KEEPALIVE = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)]


class EtcdError(SourceError):
    """etcd could not be reached, or answered with an error."""


class WatchCompacted(EtcdError):
    """The watch's start revision has been compacted away: list again."""


class WatchIdle(EtcdError):
    """The watch was silent for its idle time: establish it again (not a failure)."""


def _b64(data: Union[str, bytes]) -> str:
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _key(raw: bytes) -> str:
    """A key as text: UTF-8, its other bytes kept apart as surrogates, so that two keys never
    become one (``errors="replace"`` would make ``b"\\xfe"`` and ``b"\\xff"`` the same key)."""
    return raw.decode("utf-8", "surrogateescape")


def _shown(key: str) -> str:
    """A key for a log line or status(): its bytes that are not UTF-8 as ``\\xNN``."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _prefix_end(prefix: str) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's ``range_end``)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # every key
    raw[-1] += 1
    return bytes(raw)


class Backoff:
    """Growing, jittered delays between reconnection attempts (half fixed, half random)."""

    def __init__(self, first: float = RECONNECT_FIRST, cap: float = RECONNECT_CAP) -> None:
        self.first = first
        self.cap = cap
        self._bound = first

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the bound up to the cap."""
        bound = self._bound
        self._bound = min(self.cap, bound * 2)
        return bound / 2 + random.uniform(0, bound / 2)

    def reset(self) -> None:
        """Start again from the first delay (after a success)."""
        self._bound = self.first


if TYPE_CHECKING:
    _ConnectionBase = urllib3.connection.HTTPConnection
else:
    _ConnectionBase = object

#: the connection each thread is sending on or reading from, so that another can cut it
_in_use: weakref.WeakValueDictionary[int, _Cuttable] = weakref.WeakValueDictionary()


class _Cuttable(_ConnectionBase):
    """A urllib3 connection that another thread can cut while this one blocks on it."""

    _cut = False
    _connecting: Optional[socket.socket] = None

    def request(self, *args: Any, **kwargs: Any) -> Any:
        self._cut = False
        _in_use[threading.get_ident()] = self
        return super().request(*args, **kwargs)

    def connect(self) -> None:
        super().connect()
        if self._cut:  # cut while connecting
            self.cut()

    def _new_conn(self) -> socket.socket:
        # As urllib3's, but the socket is known to cut() while it connects: a member whose
        # host drops packets would otherwise hold a stopping thread for the connect timeout.
        host = self.host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, self.port, allowed_gai_family(), socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise urllib3.exceptions.NameResolutionError(self.host, self, error) from error
        last: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            self._connecting = sock
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                if isinstance(self.timeout, (int, float)):
                    sock.settimeout(self.timeout)
                if self._cut:
                    raise ConnectionAbortedError("cut before connecting")
                sock.connect(address)
                return sock
            except socket.timeout as error:
                sock.close()
                raise urllib3.exceptions.ConnectTimeoutError(
                    self, f"Connection to {self.host} timed out. (connect timeout="
                          f"{self.timeout})") from error
            except OSError as error:
                sock.close()
                last = error
            finally:
                self._connecting = None
        raise urllib3.exceptions.NewConnectionError(
            self, f"Failed to establish a new connection: {last}") from last

    def cut(self) -> None:
        """Shut the socket down: a blocked connect, read or write returns at once."""
        self._cut = True
        sock = getattr(self, "sock", None) or self._connecting
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _CuttableHTTPConnection(_Cuttable, urllib3.connection.HTTPConnection):
    pass


class _CuttableHTTPSConnection(_Cuttable, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _CuttableHTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _CuttableHTTPSConnection


def _forget_connections_after_fork() -> None:
    # A thread of the child can get the ident of one of the parent's: cutting the parent's
    # connection found under it would shut down a socket the parent still uses.
    _in_use.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_connections_after_fork)


def interrupt(thread: Optional[threading.Thread]) -> None:
    """Cut the etcd connection ``thread`` is using, if any, so that it stops waiting."""
    if thread is not None and thread.ident is not None:
        connection = _in_use.get(thread.ident)
        if connection is not None:
            connection.cut()


class EtcdClient:
    """The few etcd v3 calls discovery and registration need, over the JSON gateway.

    :param urls: client URLs of the cluster's members (``http://host:2379``); a call that
        cannot reach one member tries the next.
    :param timeout: seconds to connect and to wait for each answer.
    """

    def __init__(self, urls: Sequence[str], timeout: float = 2.0) -> None:
        if not urls:
            raise ConfigError("urls", "etcd needs at least one URL")
        self.urls = [url.rstrip("/") for url in urls]
        self.timeout = timeout
        self._preferred = 0
        self._http: Optional[urllib3.PoolManager] = None
        self._pid = 0

    def _pool(self) -> urllib3.PoolManager:
        if self._http is None or self._pid != os.getpid():  # a forked child starts afresh
            options = [*urllib3.connection.HTTPConnection.default_socket_options, *_KEEPALIVE]
            self._http = urllib3.PoolManager(maxsize=4, retries=False, socket_options=options)
            self._http.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
            self._pid = os.getpid()
        return self._http

    def close(self) -> None:
        """Close the client's connections."""
        http, self._http = self._http, None
        if http is not None:
            http.clear()

    def _members(self) -> Iterator[str]:
        start = self._preferred
        for offset in range(len(self.urls)):
            index = (start + offset) % len(self.urls)
            self._preferred = index
            yield self.urls[index]

    def call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` on the first member that answers; the JSON answer."""
        payload = json.dumps(body).encode()
        errors: list[str] = []
        for url in self._members():
            try:
                response = self._pool().request(
                    "POST", f"{url}/v3/{path}", body=payload,
                    headers={"Content-Type": "application/json"},
                    timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout))
            except urllib3.exceptions.HTTPError as error:
                errors.append(f"{url}: {error}")
                continue
            try:
                answer = json.loads(response.data)
            except ValueError:
                errors.append(f"{url}: HTTP {response.status}, not JSON")
                continue
            if response.status != 200 or not isinstance(answer, dict):
                message = answer.get("message") if isinstance(answer, dict) else answer
                errors.append(f"{url}: HTTP {response.status}: {message}")
                continue
            return answer
        raise EtcdError(f"etcd {path}: " + "; ".join(errors))

    # -- keys -----------------------------------------------------------------------------------

    def get_prefix(self, prefix: str) -> tuple[int, list[tuple[str, bytes]]]:
        """Every key under ``prefix`` with its value, and the revision they were read at."""
        answer = self.call("kv/range", {"key": _b64(prefix),
                                        "range_end": _b64(_prefix_end(prefix))})
        try:  # a member (or a proxy before it) may answer 200 with JSON of another shape
            pairs = [(_key(_unb64(kv["key"])), _unb64(kv.get("value", "")))
                     for kv in answer.get("kvs", ())]
            return int(answer["header"]["revision"]), pairs
        except (LookupError, TypeError, ValueError, AttributeError) as error:
            raise EtcdError(f"etcd kv/range: a malformed answer ({type(error).__name__}: "
                            f"{str(error)[:200]})") from None

    def put(self, key: str, value: Union[str, bytes], lease: int = 0) -> int:
        """Set ``key``, attached to ``lease`` if given; the new revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("kv/put", body)["header"]["revision"])

    def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); how many were deleted."""
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(_prefix_end(key))
        return int(self.call("kv/deleterange", body).get("deleted", 0))

    def compact(self, revision: int) -> None:
        """Compact the key history up to ``revision`` (watches from before it are cancelled)."""
        self.call("kv/compaction", {"revision": str(revision), "physical": True})

    # -- leases ---------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its ID."""
        return int(self.call("lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its remaining TTL, 0 when etcd no longer has it."""
        answer = self.call("lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        """End ``lease`` now; etcd deletes every key attached to it."""
        self.call("lease/revoke", {"ID": str(lease)})

    # -- watches --------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int,
              idle: float = WATCH_IDLE) -> WatchStream:
        """Open a watch on every key under ``prefix`` from ``start_revision``.

        Raises :class:`EtcdError` when no member accepts it, :class:`WatchCompacted` when the
        revision has been compacted.
        """
        body = json.dumps({"create_request": {
            "key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)),
            "start_revision": str(start_revision)}}).encode()
        errors: list[str] = []
        for url in self._members():
            try:
                response = self._pool().request(
                    "POST", f"{url}/v3/watch", body=body, preload_content=False,
                    headers={"Content-Type": "application/json"},
                    timeout=urllib3.Timeout(connect=self.timeout, read=idle))
            except urllib3.exceptions.HTTPError as error:
                errors.append(f"{url}: {error}")
                continue
            if response.status != 200:
                errors.append(f"{url}: HTTP {response.status}")
                response.release_conn()
                continue
            stream = WatchStream(response, url)
            try:
                first = stream.next_message()  # {"created": true}, or a cancellation
            except BaseException:
                stream.close()
                raise
            if first is None or not first.get("created"):
                stream.close()
                errors.append(f"{url}: the watch was not created: {first}")
                continue
            return stream
        raise EtcdError("etcd watch: " + "; ".join(errors))


class WatchStream:
    """One open watch: its messages, one JSON object per line; closable from another thread."""

    def __init__(self, response: urllib3.BaseHTTPResponse, url: str) -> None:
        self.url = url
        self._response = response
        self._chunks = response.stream(65536)
        self._buffer = b""

    def next_message(self) -> Optional[dict[str, Any]]:
        """The next message's ``result``; None when the stream ends.

        Raises :class:`WatchCompacted` on a compaction and :class:`EtcdError` on an error
        message, a cut connection or a silence longer than the idle time.
        """
        while b"\n" not in self._buffer:
            try:
                chunk = next(self._chunks, b"")
            except urllib3.exceptions.ReadTimeoutError:
                raise WatchIdle(f"etcd watch on {self.url} idle; watching again") from None
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise EtcdError(f"etcd watch on {self.url} lost: {error}") from None
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise EtcdError(f"etcd watch on {self.url}: not JSON: {line[:200]!r}") from None
        if "error" in message:
            raise EtcdError(f"etcd watch on {self.url}: {message['error']}")
        result: dict[str, Any] = message.get("result", {})
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            raise WatchCompacted(f"etcd watch on {self.url}: revision compacted (up to "
                                 f"{compacted})")
        if result.get("canceled"):
            raise EtcdError(f"etcd watch on {self.url} cancelled: "
                            f"{result.get('cancel_reason', 'no reason given')}")
        return result

    def close(self) -> None:
        """End the stream (its connection is not reused)."""
        self._response.close()
        self._response.release_conn()


@dataclass(frozen=True)
class EtcdSettings(Settings):
    """``{"type": "etcd", "urls": [...], "prefix": "/services"}``.

    :param urls: client URLs of etcd's members, ``http://host:port`` or ``https://...``.
    :param prefix: the key prefix; a service's instances are under ``<prefix>/<service>/``.
    :param timeout: seconds to connect to etcd and to wait for each answer.
    """

    urls: tuple[str, ...] = ()
    prefix: str = "/services"
    timeout: float = 2.0

    def __post_init__(self) -> None:
        urls: Any = self.urls  # from a configuration file: any value
        if isinstance(urls, str) or not isinstance(urls, (list, tuple)) or not urls:
            raise ConfigError("urls", f"etcd discovery needs a list of URLs, got {shown(urls)}")
        for index, url in enumerate(urls):
            try:  # urlsplit() raises on "http://[::1", .port on a port that is no number
                parts = urlsplit(url) if isinstance(url, str) else None
                port = parts.port if parts is not None else None
            except ValueError:
                parts = port = None
            if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                    or port == 0 or parts.query or parts.fragment):
                raise ConfigError(f"urls[{index}]", f"must be an http:// or https:// URL of an "
                                                    f"etcd member, such as "
                                                    f"http://10.0.0.5:2379, got {shown(url)}")
        object.__setattr__(self, "urls", tuple(urls))
        if not isinstance(self.prefix, str) or not self.prefix.startswith("/"):
            raise ConfigError("prefix", f"must be a key prefix starting with /, got "
                                        f"{shown(self.prefix)}")
        check_number(self.timeout, "timeout", 0.0, 60.0)

    def provider(self, service: str) -> Provider:
        """A provider watching the keys of ``service``."""
        return EtcdProvider(EtcdClient(self.urls, self.timeout), self.prefix, service)


def service_prefix(prefix: str, service: str) -> str:
    """The key prefix of one service's instances: ``<prefix>/<service>/``."""
    return f"{prefix.rstrip('/')}/{service}/"


class EtcdProvider(Provider):
    """One service's endpoints, kept up to date from an etcd watch on a named daemon thread.

    :meth:`fetch` hands out the current set when it changed; while etcd cannot be reached it
    raises :class:`SourceError`, so the watcher keeps the last good set and reports staleness.
    """

    def __init__(self, client: EtcdClient, prefix: str, service: str,
                 idle: float = WATCH_IDLE) -> None:
        self.client = client
        self.service = service
        self.prefix = service_prefix(prefix, service)
        self.idle = idle
        self.skipped = 0
        #: lists made, compactions met, watches opened again after a silence
        self.lists = 0
        self.compactions = 0
        self.rewatches = 0
        self._lock = threading.Lock()
        self._entries: dict[str, Endpoint] = {}
        self._revision = 0
        self._version = 0
        self._given = -1
        self._error: Optional[str] = "not listed yet"
        self._notify: Callable[[], None] = lambda: None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._watching = False
        self._repeats: set[str] = set()  # keys skipped as repeating an address, while they do
        _forksafe.after_fork_in_child(self, EtcdProvider._reset_after_fork)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self, notify: Callable[[], None]) -> None:
        """List now unless listed before (so the service starts with its endpoints), then
        watch on a thread; a restarted provider (or a forked child's) resumes its watch from
        the next revision."""
        if self._thread is not None:
            return
        self._notify = notify
        self._stop.clear()
        if self._revision == 0:
            try:
                self._list()
            except EtcdError as error:
                self._failed(error)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"tai-lb-etcd-watch-{self.service}")
        self._thread.start()

    def _reset_after_fork(self) -> None:
        _forksafe.inherited(self._lock, self._stop, self._thread)  # never freed in the child
        self._lock = threading.Lock()
        stopped = self._stop.is_set()
        self._stop = threading.Event()  # its lock may have been held by the parent's thread
        if stopped:
            self._stop.set()
        self._thread = None  # the watcher's own reset starts it again
        self._watching = False

    def stop(self) -> None:
        """Stop watching within a second (the open stream is cut)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            interrupt(thread)  # it may be waiting for etcd
            thread.join(1.0)
        self.client.close()

    # -- the source -----------------------------------------------------------------------------

    def fetch(self) -> Optional[list[Endpoint]]:
        """The endpoints if they changed since the last fetch; None if not."""
        with self._lock:
            error, version = self._error, self._version
            entries = list(self._entries.items()) if version != self._given else None
            self._given = version
        if error is not None:
            self._given = -1  # hand the set out again once etcd is back
            raise SourceError(error)
        if entries is None:
            return None
        endpoints: list[Endpoint] = []
        seen: set[str] = set()
        repeats: set[str] = set()
        for key, endpoint in sorted(entries):
            if endpoint.address in seen:
                repeats.add(key)
                if key not in self._repeats:  # counted and logged once while it stays
                    self.skipped += 1
                    log.warning("tai-lb: etcd key %s repeats endpoint %s; skipped",
                                _shown(key), endpoint.address)
                continue
            seen.add(endpoint.address)
            endpoints.append(endpoint)
        self._repeats = repeats
        return endpoints

    def _parse(self, key: str, value: bytes) -> Optional[Endpoint]:
        try:
            data = json.loads(value)
            return Endpoint.from_value(data, path=_shown(key))
        except (ValueError, TypeError) as error:  # ConfigError is a ValueError
            self.skipped += 1
            log.warning("tai-lb: etcd key %s holds no valid endpoint (%s); skipped",
                        _shown(key),
                        error if isinstance(error, ConfigError) else f"{value[:200]!r}")
            return None

    def _list(self) -> int:
        revision, pairs = self.client.get_prefix(self.prefix)
        with self._lock:
            old = dict(self._entries)
        entries: dict[str, Endpoint] = {}
        for key, value in pairs:
            endpoint = self._parse(key, value)
            if endpoint is None:
                endpoint = old.get(key)  # a bad value keeps the key's last good one
            if endpoint is not None:
                entries[key] = endpoint
        with self._lock:
            changed = entries != self._entries
            self._entries = entries
            self._revision = revision
            self._error = None
            if changed:
                self._version += 1
        self.lists += 1
        self._notify()
        return revision

    def _apply(self, events: Sequence[Mapping[str, Any]]) -> None:
        updates: dict[str, Optional[Endpoint]] = {}
        revision = 0
        for event in events:
            kv = event.get("kv", {})
            key = _key(_unb64(kv.get("key", "")))
            revision = max(revision, int(kv.get("mod_revision", 0)))
            if event.get("type") == "DELETE":
                updates[key] = None
                continue
            endpoint = self._parse(key, _unb64(kv.get("value", "")))
            if endpoint is not None:
                updates[key] = endpoint
        with self._lock:
            for key, endpoint in updates.items():
                if endpoint is None:
                    self._entries.pop(key, None)
                else:
                    self._entries[key] = endpoint
            self._revision = max(self._revision, revision)
            if updates:
                self._version += 1
        if updates:
            self._notify()

    def _failed(self, error: Exception) -> None:
        with self._lock:
            first = self._error is None
            self._error = str(error)
        if first:
            # DEBUG: the discovery watcher warns, once per outage, with the same message.
            log.debug("tai-lb: etcd discovery of %s: %s; keeping the last good set",
                      self.service, error)
            self._notify()

    def _run(self) -> None:
        backoff = Backoff()
        with self._lock:
            listed = self._error is None
        while not self._stop.is_set():
            try:
                if not listed:
                    self._list()
                listed = False  # a lost watch lists again, to emit exact differences
                self._watch(backoff)
            except WatchCompacted as error:
                self.compactions += 1
                log.info("tai-lb: %s", error)
                continue  # list again at once
            except WatchIdle:
                self.rewatches += 1
                listed = True  # the watch missed nothing: open it again from where it was
                continue
            except EtcdError as error:
                if not self._stop.is_set():
                    self._failed(error)
            except Exception:  # the thread must outlive any bug
                if not self._stop.is_set():
                    log.exception("tai-lb: etcd discovery of %s failed unexpectedly",
                                  self.service)
            if self._stop.wait(backoff.next()):
                return

    def _watch(self, backoff: Backoff) -> None:
        with self._lock:
            start = self._revision + 1
        stream = self.client.watch(self.prefix, start, self.idle)
        self._watching = True
        opened = time.monotonic()
        try:
            while not self._stop.is_set():
                result = stream.next_message()
                if result is None:
                    raise EtcdError(f"etcd watch on {stream.url} ended")
                events = result.get("events")
                if events:
                    self._apply(events)
        finally:
            self._watching = False
            stream.close()
            # Only a watch that lasted starts the delays afresh: a member that accepts watches
            # and ends them at once must not get a list and a watch every 50 ms.
            if time.monotonic() - opened >= WATCH_HEALTHY:
                backoff.reset()

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state of the watch."""
        with self._lock:
            return {"revision": self._revision, "lists": self.lists,
                    "compactions": self.compactions, "rewatches": self.rewatches,
                    "connected": self._error is None,
                    "watching": self._watching}


class EtcdRegistrar:
    """Registers this instance in etcd under a lease, and keeps it registered.

    The key ``<prefix>/<service>/<instance_id>`` is put with a lease of ``ttl`` seconds, kept
    alive every third of the TTL on a named daemon thread. When the lease is lost (etcd was down
    for longer than the TTL, or the lease was revoked), a new lease is granted and the key put
    again. :meth:`close`, and interpreter exit, delete the key.

    A forked child neither keeps the registration alive nor deletes it: the registration
    belongs to the process that made it (the master of a pre-fork server, typically). A child
    may :meth:`start` the registrar again, which makes a registration (and a lease) of its own.

    :param urls: client URLs of etcd's members.
    :param service: the service this instance serves.
    :param endpoint: this instance's address (and metadata), as clients should reach it.
    :param instance_id: the last part of the key; by default the endpoint's address, so a
        restarted instance takes over its own key rather than adding a second one.
    """

    def __init__(self, urls: Sequence[str], service: str,
                 endpoint: Union[str, Mapping[str, Any], Endpoint], *,
                 prefix: str = "/services", ttl: int = 10, instance_id: Optional[str] = None,
                 timeout: float = 2.0) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= 3600:
            raise ConfigError("ttl", f"must be an integer number of seconds from 1 to 3600, "
                                     f"got {ttl!r}")
        # The checks (and messages) of the etcd discovery setting: a ConfigError naming the
        # argument, rather than a string of URLs taken as a list of one-letter URLs.
        urls = EtcdSettings(urls=urls, prefix=prefix, timeout=timeout).urls  # type: ignore[arg-type]
        self.endpoint = Endpoint.from_value(endpoint)
        self.service = service
        self.key = service_prefix(prefix, service) + (instance_id or self.endpoint.address)
        self.ttl = ttl
        self.client = EtcdClient(urls, min(timeout, ttl / 3))
        self.lease = 0
        self.registrations = 0
        self.keepalives = 0
        self.errors = 0
        self.last_error: Optional[str] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._owner = os.getpid()
        ref = weakref.ref(self)
        self._exit_hook = lambda: _close_ref(ref)
        _forksafe.after_fork_in_child(self, EtcdRegistrar._forget_after_fork)

    def value(self) -> str:
        """The JSON stored under the key (SPEC's layout)."""
        endpoint = self.endpoint
        data: dict[str, Any] = {"address": endpoint.address, "weight": endpoint.weight}
        for name in ("zone", "region", "version", "tls_name"):
            if getattr(endpoint, name) is not None:
                data[name] = getattr(endpoint, name)
        if endpoint.priority:
            data["priority"] = endpoint.priority
        if endpoint.labels:
            data["labels"] = dict(endpoint.labels)
        return json.dumps(data, sort_keys=True)

    def start(self) -> EtcdRegistrar:
        """Register now if etcd answers (else keep trying), and keep the registration alive."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self._owner = os.getpid()  # the process whose registration this is
        try:
            self._register()
        except EtcdError as error:
            self._error(error)
        atexit.register(self._exit_hook)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"tai-lb-etcd-registrar-{self.service}")
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop keeping the lease alive and delete the key (revoking the lease)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            interrupt(thread)
            thread.join(1.0)
        atexit.unregister(self._exit_hook)
        with self._lock:
            lease, self.lease = self.lease, 0
        if os.getpid() == self._owner and lease:
            try:
                self.client.revoke(lease)  # deletes the key with it
            except EtcdError as error:
                log.warning("tai-lb: cannot revoke the lease of %s (it expires in %d s): %s",
                            self.key, self.ttl, error)
        self.client.close()

    def __enter__(self) -> EtcdRegistrar:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _forget_after_fork(self) -> None:
        _forksafe.inherited(self._thread, self._stop, self._lock)  # never freed in the child
        self._thread = None
        self._stop = threading.Event()  # its lock may have been held by the parent's thread
        self._stop.set()
        self._lock = threading.Lock()
        self.lease = 0  # the parent's, which the child must neither renew nor revoke

    def _register(self) -> None:
        lease = self.client.grant(self.ttl)
        self.client.put(self.key, self.value(), lease)
        with self._lock:
            self.lease = lease
        self.registrations += 1
        log.info("tai-lb: registered %s in etcd (lease %x, %d s)", self.key, lease, self.ttl)

    def _error(self, error: Exception) -> None:
        if self._stop.is_set():  # a call cut short by close(): not etcd's failure
            return
        self.errors += 1
        # One warning when etcd starts failing, not one every third of the TTL while it is
        # down; the rest at DEBUG, and the return at INFO.
        level = logging.DEBUG if self.last_error is not None else logging.WARNING
        self.last_error = str(error)
        log.log(level, "tai-lb: etcd registration of %s: %s", self.key, error)

    def _succeeded(self) -> None:
        if self.last_error is not None:
            log.info("tai-lb: etcd registration of %s works again", self.key)
            self.last_error = None

    def _run(self) -> None:
        period = self.ttl / 3
        while not self._stop.wait(period):
            try:
                with self._lock:
                    lease = self.lease
                if lease and self.client.keepalive(lease) > 0:
                    self.keepalives += 1
                    self._succeeded()
                    continue
                if lease:
                    log.warning("tai-lb: the etcd lease of %s was lost; registering again",
                                self.key)
                self._register()
                self._succeeded()
            except EtcdError as error:
                self._error(error)
            except Exception:  # the thread must outlive any bug
                self.errors += 1
                log.exception("tai-lb: etcd registration of %s failed unexpectedly", self.key)

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state of the registration."""
        return {"key": self.key, "lease": self.lease, "ttl": self.ttl,
                "registrations": self.registrations, "keepalives": self.keepalives,
                "errors": self.errors,
                "last_error": self.last_error, "running": self._thread is not None}


def _close_ref(ref: weakref.ReferenceType[EtcdRegistrar]) -> None:
    registrar = ref()
    if registrar is not None:
        registrar.close()
