"""The etcd client: the few v3 calls over the JSON gateway, on connections that can be cut.

:class:`EtcdClient` makes each call on the first member that answers, with urllib3 and TCP
keep-alive.  Its connections record which thread uses them, so that :func:`interrupt` can cut
the one a thread blocks on (a connect, a read, a watch) when it must stop; in a forked child
that record starts empty.  :class:`Backoff` spaces the attempts to reach etcd again.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import socket
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import urllib3
from urllib3.util.connection import allowed_gai_family

from ...exceptions import ConfigError
from .errors import EtcdError
from .watch import WATCH_IDLE, WatchStream

__all__ = ["RECONNECT_CAP", "RECONNECT_FIRST", "Backoff", "EtcdClient", "decode_key", "interrupt",
           "shown_key", "unb64"]

#: delays between reconnection attempts: from the first to the cap, doubling, with jitter
RECONNECT_FIRST = 0.05
#: the longest delay between reconnection attempts (see :data:`RECONNECT_FIRST`)
RECONNECT_CAP = 5.0
#: TCP keep-alive on etcd connections: first probe after 30 s idle, then every 10 s, 3 probes
_KEEPALIVE = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)]


def _b64(data: Union[str, bytes]) -> str:
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    """The bytes of a base64 field of etcd's JSON gateway (keys, values)."""
    return base64.b64decode(text)


def decode_key(raw: bytes) -> str:
    """A key as text: UTF-8, its other bytes kept apart as surrogates, so that two keys never
    become one (``errors="replace"`` would make ``b"\\xfe"`` and ``b"\\xff"`` the same key)."""
    return raw.decode("utf-8", "surrogateescape")


def shown_key(key: str) -> str:
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
            pairs = [(decode_key(unb64(kv["key"])), unb64(kv.get("value", "")))
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

