"""One prober per host: the processes of one host share their health checks through files.

With ``health_check.share`` on, a service's checks go through a small JSON file per (service,
check settings) in a directory of the host: ``/dev/shm/tai-lb-<uid>/`` by default (or the
system's temporary directory where there is no ``/dev/shm``), or a directory the settings name.
The file holds one record per endpoint; a process changes it only under an exclusive
``fcntl.flock`` of the file, held for the few microseconds of one read and one write, never
during a probe; a process that cannot have the lock within :data:`LOCK_WAIT` seconds (another
one holding it is stopped or stuck) probes alone, as after any ``OSError``.

A record says who claimed the endpoint's current check (the *lease*: owner, and until when),
when that check started, and the last result with the shared rise and fall counts::

    {"lease": ["4242:9f0c1a2b", 813.5], "started": 812.0, "seq": 17, "at": 811.03, "by": 4243,
     "ok": false, "detail": "HTTP 503", "healthy": true, "passes": 0, "failures": 1}

(process 4242 probes now; 4243 made the last check, the first failure after passes).

Every process looks at the file every quarter interval (at most 0.25 s apart) and when the next
check falls due.  A process claims an endpoint when its last check started an interval ago or
more and no live lease is on it, probes it, and writes the result: the counts go on from the
record's, so the chain of results is the one a single process probing alone would see, whoever
probed.  Every process then adopts the record's health as its own.  A lease whose owner has died
(its pid is gone) or that has outlived the check's timeout by a second is taken over.  A chain
broken for more than two intervals starts over as a new endpoint does: healthy until proven
otherwise.

Times are ``time.monotonic()``, the same clock for every process of a host (Linux's
``CLOCK_MONOTONIC``, macOS's ``mach_absolute_time``).  Any ``OSError`` (a directory that cannot
be made or written, a full disk) is logged once per service, counted, and the service's checks go
back to probing alone; sharing is tried again a minute later.  A file that cannot be read (cut
short by a writer that died mid-write, say) counts as empty and is rewritten: counted, and logged
as a warning at most once per file per minute.  Without ``fcntl`` (Windows), sharing is off.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Callable, Optional

from .probes import NO_HISTORY, HealthTarget
from .settings import HealthCheckConfig

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["AVAILABLE", "ProbeSharing", "adopt", "default_directory", "share_file_name"]

log = logging.getLogger(__name__)

AVAILABLE = fcntl is not None
"""Whether this platform can share checks (it has ``fcntl.flock``)."""

LOCK_WAIT = 0.5
"""Seconds a process waits for the file's lock before it probes alone (another process that
holds it longer is stopped or stuck: it must not stop this one's checks, nor its close())."""

LEASE_MARGIN = 1.0
"""Seconds a lease outlives the check's timeout before another process takes it over."""

RETRY_AFTER = 60.0
"""Seconds a service probes alone after sharing failed, before sharing is tried again."""

CORRUPT_LOG_EVERY = 60.0
"""Seconds between two warnings about the same corrupt share file (each one is counted)."""

KEEP_FOR = 60.0
"""Records untouched for this long (or ten intervals, if longer) are dropped from the file."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def default_directory() -> str:
    """The directory of ``share: true``: ``/dev/shm/tai-lb-<uid>`` (memory, no disk I/O) where
    ``/dev/shm`` is writable, else ``tai-lb-<uid>`` in the system's temporary directory."""
    base = "/dev/shm"
    if not (os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK)):
        base = tempfile.gettempdir()
    return os.path.join(base, f"tai-lb-{os.getuid() if hasattr(os, 'getuid') else 0}")


def share_file_name(service: str, config: HealthCheckConfig, scheme: str) -> str:
    """The file name of a service's shared checks: processes share checks only when the
    service and every setting that changes a check's outcome or timing are the same."""
    function = config.function
    key = json.dumps([service, scheme, config.type, config.path,
                      sorted(config.expected_statuses), config.interval, config.timeout,
                      config.healthy_threshold, config.unhealthy_threshold, config.verify,
                      None if function is None else
                      f"{getattr(function, '__module__', '')}."
                      f"{getattr(function, '__qualname__', repr(function))}"])
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return f"health-{_UNSAFE.sub('_', service)[:40]}-{digest}.json"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or no pid at all (a malformed file)
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def adopt(target: HealthTarget, record: Mapping[str, Any], now: float) -> Optional[str]:
    """Make a shared ``record`` the health of ``target`` (under the checker's lock), unless
    it was adopted already; returns the result's detail, or None when there was nothing new.

    The health, passes and failures in a row are the record's; the history grows by its
    result.  During the ``grace`` of an endpoint new to this process, a shared failure does not
    take it out.
    """
    # (seq, at): a file rewritten from scratch numbers its results from 1 again
    seq = (record.get("seq"), record.get("at"))
    if not isinstance(seq[0], int) or seq == target.shared_seq:
        return None
    target.shared_seq = seq
    health = target.state()
    health.checked = True
    health.last_check = now
    if health.history is NO_HISTORY:
        health.history = collections.deque(maxlen=target.config.history)
    detail = str(record.get("detail", ""))[:200]
    health.history.append((now, record.get("ok") is True, detail))
    passes, failures = record.get("passes"), record.get("failures")
    health.passes_in_row = passes if isinstance(passes, int) else 0
    health.failures_in_row = failures if isinstance(failures, int) else 0
    health.healthy = (record.get("healthy") is not False
                      or now - health.added_at < target.config.grace)
    return detail


def _lock(fd: int) -> None:
    # flock without LOCK_NB would wait for ever on a holder that is stopped or stuck.
    deadline = time.monotonic() + LOCK_WAIT
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise BlockingIOError(errno.EWOULDBLOCK, f"the share file stayed locked by "
                                      f"another process for {LOCK_WAIT:g} s") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


class ProbeSharing:
    """The shared checks of one health checker: the file I/O, on the checker's share thread.

    :param clock: the host-wide monotonic clock the records are written with.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.owner = f"{os.getpid()}:{os.urandom(4).hex()}"
        self.published = 0
        self.adopted = 0
        self.claimed = 0
        self.errors = 0
        self.corrupt = 0
        # Service -> (what failed, when sharing is tried again): those services probe alone.
        self.failed: dict[str, tuple[str, float]] = {}
        self._checked_directories: set[str] = set()
        self._logged: set[str] = set()
        self._corrupt_logged: dict[str, float] = {}  # file -> when it may be logged again
        self.directories: dict[str, str] = {}  # service -> directory in use

    def reset_after_fork(self) -> None:
        """A forked child is another prober: its own owner name and counters."""
        self.owner = f"{os.getpid()}:{os.urandom(4).hex()}"
        self.published = self.adopted = self.claimed = 0

    # -- which services share --------------------------------------------------------------------

    def active(self, service: str, config: HealthCheckConfig) -> bool:
        """Whether ``service``'s checks go through the shared file now."""
        if config.share is False or not AVAILABLE:
            return False
        failed = self.failed.get(service)
        return failed is None or self.clock() >= failed[1]

    def fail(self, service: str, error: BaseException) -> None:
        """Sharing ``service``'s checks failed: log it (once), count it, and probe alone."""
        self.errors += 1
        text = f"{type(error).__name__}: {error}"[:300]
        self.failed[service] = (text, self.clock() + RETRY_AFTER)
        if service not in self._logged:
            self._logged.add(service)
            log.warning("tai-lb: cannot share the health checks of %s (%s); this process "
                        "probes its endpoints alone", service, text)

    def directory(self, config: HealthCheckConfig) -> str:
        """The directory of ``config``'s shared files, made and checked at its first use.

        The default directory must be a private one of this user (it may be under a ``/tmp``
        that every user can write); a named one must exist and be writable.
        """
        path = default_directory() if config.share is True else str(config.share)
        if path in self._checked_directories:
            return path
        if config.share is True:
            os.makedirs(path, mode=0o700, exist_ok=True)
            found = os.lstat(path)
            if (not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid()
                    or found.st_mode & 0o077):
                raise PermissionError(errno.EPERM, "not a private directory of this user", path)
        elif not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "no such directory", path)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable", path)
        self._checked_directories.add(path)
        return path

    # -- the exchange ----------------------------------------------------------------------------

    def exchange(self, service: str, config: HealthCheckConfig, scheme: str,
                 results: Iterable[tuple[str, bool, str]], candidates: Collection[str],
                 ) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """One locked read and write of ``service``'s file: publish this process's
        ``results`` (key, passed, detail), claim those of ``candidates`` (endpoint keys not
        being probed here) whose check is due and unclaimed, and return every record with the
        claimed keys.  Raises ``OSError`` when the file cannot be used."""
        directory = self.directory(config)
        self.directories[service] = directory
        path = os.path.join(directory, share_file_name(service, config, scheme))
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o600)
        try:
            _lock(fd)
            try:
                records = self._read(fd, path)
                now = self.clock()
                changed = False
                for key, ok, detail in results:
                    self._publish(records.setdefault(key, {}), ok, detail, config, now)
                    changed = True
                claimed = set()
                for key in candidates:
                    record = records.setdefault(key, {})
                    if self._claimable(record, config, now):
                        record["lease"] = [self.owner, now + config.timeout + LEASE_MARGIN]
                        record["started"] = now
                        claimed.add(key)
                        changed = True
                if changed:
                    self._write(fd, records, config, now)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        self.claimed += len(claimed)
        self.failed.pop(service, None)
        return records, claimed

    def _read(self, fd: int, path: str) -> dict[str, dict[str, Any]]:
        chunks: list[bytes] = []
        offset = 0
        while True:
            chunk = os.pread(fd, 1 << 20, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        if not chunks:
            return {}
        try:
            data = json.loads(b"".join(chunks))
            records = data["endpoints"]
            if not isinstance(records, dict):
                raise TypeError("endpoints is not a mapping")
        except (ValueError, TypeError, KeyError, RecursionError) as error:  # cut short, say
            self.corrupt += 1
            now = self.clock()
            if now >= self._corrupt_logged.get(path, -1e300):
                self._corrupt_logged[path] = now + CORRUPT_LOG_EVERY
                log.warning("tai-lb: skipped a corrupt health share file %s (%s: %s, %d bytes);"
                            " it is rewritten", path, type(error).__name__, str(error)[:100],
                            offset)
            return {}
        return {key: record for key, record in records.items()
                if isinstance(key, str) and isinstance(record, dict)}

    def _write(self, fd: int, records: dict[str, dict[str, Any]], config: HealthCheckConfig,
               now: float) -> None:
        keep_for = max(KEEP_FOR, 10 * config.interval)
        kept = {key: record for key, record in records.items()
                if now - max(_number(record.get("at")) or -1e300,
                             _number(record.get("started")) or -1e300) < keep_for}
        data = json.dumps({"version": 1, "endpoints": kept}, separators=(",", ":")).encode()
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        os.ftruncate(fd, len(data))

    def _claimable(self, record: Mapping[str, Any], config: HealthCheckConfig,
                   now: float) -> bool:
        lease = record.get("lease")
        if isinstance(lease, list) and len(lease) == 2:
            owner, until = lease
            until = _number(until)
            # a lease no process could have written (a file from before a reboot, or malformed)
            # is void: none lasts longer than the check's timeout and the margin
            if until is not None and now < until <= now + config.timeout + LEASE_MARGIN:
                if owner == self.owner:
                    return False  # our own check still runs
                pid = owner.split(":", 1)[0] if isinstance(owner, str) else ""
                if _alive(int(pid) if pid.isascii() and pid.isdigit() else -1):
                    return False  # another process probes it now
            return True  # its prober died, or overran its timeout
        started = _number(record.get("started"))
        return started is None or not 0 <= now - started < config.interval

    def next_due(self, records: Mapping[str, Mapping[str, Any]], keys: Iterable[str],
                 config: HealthCheckConfig) -> float:
        """When the first record of ``keys`` may be claimed next (a check due, a lease running
        out), so that checks start on time rather than at the next look."""
        due = []
        for key in keys:
            record = records.get(key, {})
            lease = record.get("lease")
            if isinstance(lease, list) and len(lease) == 2:
                due.append(_number(lease[1]))
            else:
                started = _number(record.get("started"))
                due.append(None if started is None else started + config.interval)
        return min((d for d in due if d is not None), default=self.clock() + 1.0)

    def _publish(self, record: dict[str, Any], ok: bool, detail: str,
                 config: HealthCheckConfig, now: float) -> None:
        last = _number(record.get("at"))
        healthy, passes, failures = record.get("healthy"), record.get("passes"), record.get(
            "failures")
        if (last is None or not 0 <= now - last <= 2 * config.interval + config.timeout
                or not isinstance(healthy, bool) or not isinstance(passes, int)
                or not isinstance(failures, int)):
            healthy, passes, failures = True, 0, 0  # a new chain: healthy until proven not
        if ok:
            passes, failures = passes + 1, 0
            if not healthy and passes >= config.healthy_threshold:
                healthy = True
        else:
            passes, failures = 0, failures + 1
            if healthy and failures >= config.unhealthy_threshold:
                healthy = False
        seq = record.get("seq")
        record.update({"seq": (seq if isinstance(seq, int) else 0) + 1, "at": now,
                       "by": os.getpid(), "ok": ok, "detail": detail[:200], "healthy": healthy,
                       "passes": min(passes, 1_000_000), "failures": min(failures, 1_000_000)})
        lease = record.get("lease")
        if isinstance(lease, list) and lease[:1] == [self.owner]:
            del record["lease"]
        self.published += 1

    def snapshot(self, shared: Collection[str]) -> dict[str, Any]:
        """Figures of the sharing, JSON-serialisable: ``shared``, the services whose checks are
        shared now."""
        now = self.clock()
        return {"available": AVAILABLE, "services": sorted(shared),
                "directories": sorted(set(self.directories.values())),
                "probing_alone": {service: error for service, (error, retry) in
                                  sorted(self.failed.items()) if now < retry},
                "claimed": self.claimed, "published": self.published, "adopted": self.adopted,
                "errors": self.errors, "corrupt_files": self.corrupt}
