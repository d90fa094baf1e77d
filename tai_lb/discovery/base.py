"""The discovery framework: providers fetch full endpoint sets, a watcher applies them safely.

A provider answers one question, "what are the endpoints now?", with a full set; the registry
diffs it into added, removed and changed events (:meth:`ServiceRegistry.set_endpoints`).  The
:class:`DiscoveryWatcher` asks on a named daemon thread and guards the answer:

* a source that fails keeps the last good set in place (logged, counted, with a staleness
  figure in ``status()``);
* malformed entries are skipped by the provider (logged and counted); the rest still apply;
* an update that would empty the service, or remove more than ``max_removal_share`` of it at
  once, applies only after the same set has been seen ``confirmations`` times in a row, and one
  that would empty it only once it has also been seen for ``empty_hold`` seconds;
* with ``cache_path``, every applied set is saved, and a process that starts while its source is
  down starts from the saved set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import _forksafe
from .._settings import (
    MAX_SECONDS,
    MIN_INTERVAL,
    Settings,
    check_int,
    check_number,
    doc,
    shown,
)
from ..endpoint import Endpoint
from ..exceptions import ConfigError, LoadBalancerError

__all__ = ["DiscoveryWatcher", "Provider", "Skipped", "SourceError", "WatchConfig", "WatchSettings"]

log = logging.getLogger(__name__)


class SourceError(LoadBalancerError):
    """The source could not be read at all (down, unreadable, malformed as a whole).

    The discovery watcher catches it and keeps the last good set; it reaches user code only
    from a provider or client called directly.
    """


def read_regular_file(path: str) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file at ``path`` and its status; never blocks on the path.

    The file is opened without blocking (a FIFO with no writer would hold ``open()`` forever)
    and refused, with an :class:`OSError`, unless it is a regular file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError("not a regular file")
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:
        return file.read(), info


class Provider(ABC):
    """Fetches the full endpoint set of one service from one source."""

    #: malformed entries skipped so far (logged as one warning per read, with a few examples)
    skipped: int = 0

    @abstractmethod
    def fetch(self) -> Optional[list[Endpoint]]:
        """The endpoints now, or None if the source has not changed since the last fetch.

        Raises :class:`SourceError` when the source cannot be read; skips (and counts) malformed
        entries.
        """

    def wait_hint(self) -> Optional[float]:
        """Seconds until the next fetch if the source says so (a DNS TTL), else None."""
        return None

    def start(self, notify: Callable[[], None]) -> None:  # noqa: B027 - optional hook
        """Begin watching a source that pushes changes (etcd); ``notify()`` after each change.

        Called before the first :meth:`fetch`, and again in a forked child. A polled source
        (a file, DNS) has nothing to start.
        """

    def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop watching (within a second); the provider may be started again."""

    def snapshot(self) -> Optional[dict[str, Any]]:
        """JSON-serialisable state of the source for ``status()``, if it has any."""
        return None


class Skipped:
    """The malformed entries one read of a source skips: counted, with the first few reasons,
    for one warning however many there are (100,000 bad entries are one line, not 100,000)."""

    #: reasons quoted in the warning (the count says how many there were)
    EXAMPLES = 3

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, reason: str) -> None:
        """Count one skipped entry, and why it was skipped."""
        self.count += 1
        if len(self.examples) < self.EXAMPLES:
            self.examples.append(reason[:200])

    def report(self, logger: logging.Logger, provider: Provider, source: str,
               what: str, lock: Optional[threading.Lock] = None) -> None:
        """Add the count to ``provider.skipped`` and log one warning naming ``source`` and
        ``what`` was skipped (a plural noun: ``"malformed endpoint(s)"``), if any was.

        :param lock: the provider's lock, for a provider that reads on more than one thread:
            the count is added under it (the warning is logged after it is released).
        """
        if self.count:
            if lock is None:
                provider.skipped += self.count
            else:
                with lock:
                    provider.skipped += self.count
            logger.warning("tai-lb: %s: skipping %d %s, such as: %s", source, self.count, what,
                           "; ".join(self.examples))


@dataclass(frozen=True)
class WatchConfig(Settings):
    """How a discovery watcher polls and guards (keys shared by every discovery type).

    :param interval: seconds between fetches.
    :param max_removal_share: an update removing more than this share of the endpoints at once
        (or all of them) must be confirmed.
    :param confirmations: times in a row such an update must be seen before it applies.
    :param empty_hold: seconds an update that would empty the service must keep being seen
        (besides ``confirmations`` times) before it applies; 0 holds it for the reads alone.
    :param cache_path: file where the last applied set is saved, to start warm.
    """

    interval: float = field(default=1.0, metadata=doc("seconds", low=MIN_INTERVAL, high=3600))
    max_removal_share: float = field(default=0.5, metadata=doc("share", low=0, high=1))
    confirmations: int = field(default=3, metadata=doc("reads", low=1, high=100))
    empty_hold: float = field(default=30.0, metadata=doc("seconds", low=0, high=MAX_SECONDS))
    cache_path: Optional[str] = field(default=None, metadata=doc(
        allowed="a file path, or null (none)"))

    def __post_init__(self) -> None:
        check_number(self.interval, "interval", MIN_INTERVAL, 3600.0, low_open=False)
        check_number(self.max_removal_share, "max_removal_share", 0.0, 1.0, low_open=False,
                     what="a share")
        check_int(self.confirmations, "confirmations", 1, 100)
        check_number(self.empty_hold, "empty_hold", 0.0, MAX_SECONDS, low_open=False)
        if self.cache_path is not None and (not isinstance(self.cache_path, str)
                                            or not self.cache_path):
            raise ConfigError("cache_path", f"must be a file path, got {shown(self.cache_path)}")


WatchSettings = WatchConfig  #: old name of :class:`WatchConfig`


class DiscoveryWatcher:
    """Keeps one service of a registry in step with a provider, on a named daemon thread.

    :param apply: called with a full endpoint set to make it the service's
        (``registry.set_endpoints`` bound to the service).
    :param current: returns the service's current endpoints.
    """

    def __init__(self, service: str, provider: Provider, settings: WatchConfig,
                 apply: Callable[[Sequence[Endpoint]], None],
                 current: Callable[[], Sequence[Endpoint]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.provider = provider
        self.settings = settings
        self._apply = apply
        self._current = current
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pending: Optional[frozenset[str]] = None
        self._pending_endpoints: list[Endpoint] = []
        self._pending_seen = 0
        self._pending_since = 0.0  # clock time the held-back update was first seen
        self._guarded = False  # set by the first set applied
        self.errors = 0
        self.updates = 0
        self.held_back = 0
        self.last_error: Optional[str] = None
        self.last_success: Optional[float] = None
        _forksafe.after_fork_in_child(self, DiscoveryWatcher._reset_after_fork)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Fetch once now (or start from the cache), then keep watching on a thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self.provider.start(self._wake.set)
        if not self._poll_safely() and self.settings.cache_path:
            self._load_cache()
        self._start_thread(resume=False)

    def _start_thread(self, resume: bool) -> None:
        self._thread = threading.Thread(target=self._run, args=(resume,), daemon=True,
                                        name=f"tai-lb-discovery-{self.service}")
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop watching; the thread ends within ``timeout`` seconds."""
        self._stop.set()
        self._wake.set()
        self.provider.stop()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def wake(self) -> None:
        """Read the source now rather than at the end of the current wait (what a pushing
        provider's ``notify`` does)."""
        self._wake.set()

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The watching thread, or None while stopped."""
        return self._thread

    def _reset_after_fork(self) -> None:
        # The parent's thread is gone, and another of its threads may have been setting an
        # event (holding its lock) at the fork: the child gets fresh ones.
        running = self._thread is not None and not self._stop.is_set()
        _forksafe.inherited(self._stop, self._wake, self._thread)  # never freed in the child
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread = None
        if running:
            # The source is started again and read on the new thread, not here: this runs
            # inside os.fork(), where a read of a source that is down would hold the child.
            self._start_thread(resume=True)
        else:
            self._stop.set()

    def _run(self, resume: bool) -> None:
        if resume:
            try:
                self.provider.start(self._wake.set)
            except Exception:
                self.errors += 1
                log.exception("tai-lb: discovery of %s failed to restart", self.service)
            if self._stop.is_set():  # stop() came first, and found nothing started to stop
                self.provider.stop()
                return
            self._wake.set()  # read at once
        while True:
            wait = self.provider.wait_hint() or self.settings.interval
            self._wake.wait(wait)  # a pushing source wakes it early
            self._wake.clear()
            if self._stop.is_set():
                return
            self._poll_safely(on_thread=True)

    def _poll_safely(self, on_thread: bool = False) -> bool:
        """:meth:`poll`, with a bug in a provider or a callback logged and counted as a failed
        round rather than raised: the watcher, and the balancer starting it, outlive it."""
        try:
            return self._poll(on_thread)
        except Exception:
            self.errors += 1
            log.exception("tai-lb: discovery of %s failed unexpectedly", self.service)
            return False

    # -- one round ------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Fetch and apply once; False if the source failed (the last good set stays)."""
        return self._poll(on_thread=False)

    def _poll(self, on_thread: bool) -> bool:
        try:
            endpoints = self.provider.fetch()
        except SourceError as error:
            if on_thread and self._stop.is_set():  # a read cut short by stop(): no failure
                return False
            self.errors += 1
            # One warning when the source starts failing, not one a round for as long as it
            # is down: the messages of one outage differ (a DNS timeout says how long it
            # waited, an etcd outage goes from "watch lost" to "connection refused").
            level = logging.DEBUG if self.last_error is not None else logging.WARNING
            self.last_error = str(error)
            log.log(level, "tai-lb: discovery of %s failed, keeping the last good set: %s",
                    self.service, error)
            return False
        if self.last_error is not None:
            log.info("tai-lb: discovery of %s works again", self.service)
        self.last_success = self._clock()
        self.last_error = None
        if endpoints is None:  # unchanged: a held-back update is seen once more
            if self._pending is None:
                return True
            endpoints = self._pending_endpoints
        wanted = frozenset(e.address for e in endpoints)
        current = frozenset(e.address for e in self._current())
        removed = len(current - wanted)
        # The first answer replaces what was configured at once, unless it empties the
        # service; later ones (and the first after a warm start from the cache) are guarded.
        risky = bool(current) and (not wanted or (
            self._guarded and removed > self.settings.max_removal_share * len(current)))
        if risky:
            now = self._clock()
            first = wanted != self._pending
            if first:
                self._pending, self._pending_seen = wanted, 0
                self._pending_since = now
                self._pending_endpoints = list(endpoints)
            self._pending_seen += 1
            # An emptied source (a wiped prefix, a truncated file) is held for a time, not
            # only a count of reads: 3 reads are 3 s at the default interval.
            hold = 0.0 if wanted else self.settings.empty_hold
            if (self._pending_seen < self.settings.confirmations
                    or now - self._pending_since < hold):
                self.held_back += 1
                # A warning when the update first shows, not at every read while it is held.
                log.log(logging.WARNING if first else logging.DEBUG,
                        "tai-lb: discovery of %s would remove %d of %d endpoints; held back "
                        "until seen %d times in a row%s (%d so far, for %.1f s)", self.service,
                        removed, len(current), self.settings.confirmations,
                        f" and for {hold:g} s" if hold else "", self._pending_seen,
                        now - self._pending_since)
                return True
        self._pending, self._pending_seen, self._pending_endpoints = None, 0, []
        self._apply(endpoints)
        self._guarded = True
        self.updates += 1
        if self.settings.cache_path:
            self._save_cache(endpoints)
        return True

    # -- the warm-start cache -------------------------------------------------------------------

    def _save_cache(self, endpoints: Sequence[Endpoint]) -> None:
        path = self.settings.cache_path
        assert path is not None
        text = json.dumps({"service": self.service,
                           "endpoints": [e.to_dict() for e in endpoints]})
        directory = os.path.dirname(os.path.abspath(path))
        tmp_name: Optional[str] = None
        try:
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory,
                                             delete=False, prefix=".tai-lb-",
                                             suffix=".tmp") as tmp:
                tmp_name = tmp.name
                tmp.write(text)
                tmp.flush()
                os.fsync(tmp.fileno())  # on disk before it takes the old file's place
            os.replace(tmp_name, path)  # atomic: a reader never sees half a file
        except OSError as error:
            log.warning("tai-lb: cannot save the discovery cache %s: %s", path, error)
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)

    def _load_cache(self) -> None:
        path = self.settings.cache_path
        assert path is not None
        try:
            data = json.loads(read_regular_file(path)[0].decode("utf-8"))
            if data["service"] != self.service:
                raise ValueError(f"it holds the endpoints of {data['service']!r}")
            endpoints = [Endpoint.from_value(item) for item in data["endpoints"]]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
            log.warning("tai-lb: cannot read the discovery cache %s: %s", path, error)
            return
        if not endpoints:
            # No warmer than what is configured, and never a reason to empty the service.
            log.info("tai-lb: the discovery cache %s of %s is empty; not used", path,
                     self.service)
            return
        log.warning("tai-lb: %s starts from the cached endpoints in %s (%d), its source being "
                    "down", self.service, path, len(endpoints))
        self._apply(endpoints)
        self._guarded = True

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state of the watcher."""
        age = None if self.last_success is None else round(self._clock() - self.last_success, 3)
        return {"staleness_seconds": age, "errors": self.errors, "last_error": self.last_error,
                "updates": self.updates, "held_back": self.held_back,
                "skipped_entries": self.provider.skipped, "running": self._thread is not None,
                "source": self.provider.snapshot()}
