"""etcd discovery: the ``etcd`` setting, and the provider that lists and watches a service.

:class:`EtcdConfig` checks the ``discovery`` setting of type ``etcd``; :class:`EtcdProvider`
lists a service's keys at one revision, then watches from the next on a named daemon thread,
lists again (after a growing, jittered delay) when the watch is lost, and hands the watcher
the current set whenever it changed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from ... import _forksafe
from ..._settings import MAX_PORT, Settings, check_number, doc, is_int, shown
from ...endpoint import Endpoint
from ...exceptions import ConfigError
from ..base import Provider, Skipped, SourceError
from .client import Backoff, EtcdClient, decode_key, interrupt, shown_key, unb64
from .errors import EtcdError, WatchCompacted, WatchIdle
from .watch import WATCH_IDLE

__all__ = ["WATCH_HEALTHY", "EtcdConfig", "EtcdProvider", "EtcdSettings", "service_prefix"]

log = logging.getLogger(__name__)

#: a watch that lasted this long resets the reconnection delays
WATCH_HEALTHY = 1.0


@dataclass(frozen=True)
class EtcdConfig(Settings):
    """``{"type": "etcd", "urls": [...], "prefix": "/services"}``.

    :param urls: client URLs of etcd's members, ``http://host:port`` or ``https://...``.
    :param prefix: the key prefix; a service's instances are under ``<prefix>/<service>/``.
    :param timeout: seconds to connect to etcd and to wait for each answer.
    """

    urls: tuple[str, ...] = field(default=(), metadata=doc(
        allowed="a non-empty list of http:// or https:// URLs", default="required"))
    prefix: str = field(default="/services", metadata=doc(allowed="a key prefix starting with /"))
    timeout: float = field(default=2.0, metadata=doc("seconds", low=0, high=60, low_open=True))

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
                    or (port is not None and not is_int(port, 1, MAX_PORT))
                    or parts.query or parts.fragment):
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


EtcdSettings = EtcdConfig  #: old name of :class:`EtcdConfig`


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

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The watching thread, or None while stopped."""
        return self._thread

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
        skipped = Skipped()
        for key, endpoint in sorted(entries):
            if endpoint.address in seen:
                repeats.add(key)
                if key not in self._repeats:  # counted and logged once while it stays
                    skipped.add(f"{shown_key(key)} repeats {endpoint.address}")
                continue
            seen.add(endpoint.address)
            endpoints.append(endpoint)
        self._repeats = repeats
        skipped.report(log, self, self._source, "key(s) repeating an endpoint", self._lock)
        return endpoints

    @property
    def _source(self) -> str:
        return f"etcd keys {shown_key(self.prefix)}*"

    def _parse(self, key: str, value: bytes, skipped: Skipped) -> Optional[Endpoint]:
        try:
            data = json.loads(value)
            return Endpoint.from_value(data, path=shown_key(key))
        except (ValueError, TypeError) as error:  # ConfigError is a ValueError
            skipped.add(str(error) if isinstance(error, ConfigError)
                        else f"{shown_key(key)}: {value[:100]!r}")
            return None

    def _list(self) -> int:
        revision, pairs = self.client.get_prefix(self.prefix)
        with self._lock:
            old = dict(self._entries)
        entries: dict[str, Endpoint] = {}
        skipped = Skipped()
        for key, value in pairs:
            endpoint = self._parse(key, value, skipped)
            if endpoint is None:
                endpoint = old.get(key)  # a bad value keeps the key's last good one
            if endpoint is not None:
                entries[key] = endpoint
        skipped.report(log, self, self._source, "key(s) holding no valid endpoint",
                       self._lock)
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
        skipped = Skipped()
        for event in events:
            kv = event.get("kv", {})
            key = decode_key(unb64(kv.get("key", "")))
            revision = max(revision, int(kv.get("mod_revision", 0)))
            if event.get("type") == "DELETE":
                updates[key] = None
                continue
            endpoint = self._parse(key, unb64(kv.get("value", "")), skipped)
            if endpoint is not None:
                updates[key] = endpoint
        skipped.report(log, self, self._source, "key(s) holding no valid endpoint",
                       self._lock)
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

