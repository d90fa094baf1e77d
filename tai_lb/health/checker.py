"""The health checker: a scheduler thread, a few worker threads, and each endpoint's health.

:class:`HealthChecker` keeps a target per endpoint of every checked service, schedules each
target's next probe on one thread, runs the probes on a bounded pool of workers, counts passes
and failures against the thresholds, and tells the balancer when an endpoint's health flips.
The rules it follows (new endpoints, grace, traffic-proven health) are in :mod:`tai_lb.health`.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import operator
import queue
import random
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

from .. import _forksafe
from ..endpoint import Endpoint
from .probes import NO_HISTORY, EndpointHealth, HealthTarget, probe
from .settings import HealthCheckConfig
from .sharing import ProbeSharing, adopt

if TYPE_CHECKING:
    from ..registry import TopologyChange

__all__ = ["HealthChecker"]

log = logging.getLogger(__name__)

_SHARE_THREAD = "tai-lb-health-share"  # runs only while a service shares its checks

_endpoint_of = operator.attrgetter("endpoint")
_address_of = operator.attrgetter("address")
_kind_of = operator.attrgetter("kind")


class HealthChecker:
    """Probes the endpoints of the services that have a health check, and keeps their health.

    :param on_change: called with the service name when an endpoint's health flips (outside any
        lock of the checker).
    :param last_success: ``(service, address) -> monotonic time`` of the endpoint's last
        successful real request, or None; used for traffic-proven health.
    :param workers: threads that run probes.
    """

    def __init__(self, on_change: Callable[[str], None],
                 last_success: Callable[[str, str], Optional[float]],
                 workers: int = 4, clock: Callable[[], float] = time.monotonic) -> None:
        self._on_change = on_change
        self._last_success = last_success
        self._workers_wanted = workers
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Service -> address -> target (nested, so lookups hash plain strings, whose hash is
        # cached, rather than a tuple per lookup).
        self._targets: dict[str, dict[str, HealthTarget]] = {}
        # The unhealthy addresses of each service, replaced whole under the lock and read
        # without it: a route rebuild filters 10,000 endpoints by one set, not 10,000 lookups.
        self._unhealthy: dict[str, frozenset[str]] = {}
        # (due, tie-breaker, target): an entry whose target was replaced or removed is dropped
        self._heap: list[tuple[float, int, HealthTarget]] = []
        # New targets, due at once, in the order they came: the scheduler takes them before the
        # heap, so a full update adds 10,000 of them without 10,000 heap pushes.
        self._fresh: collections.deque[HealthTarget] = collections.deque()
        self._counter = 0
        self._queue: queue.Queue[Optional[HealthTarget]] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Shared checks (health.sharing): the settings of each checked service, the results of
        # probes run for the other processes, and the share thread's wake-up.
        self._checks: dict[str, tuple[HealthCheckConfig, str]] = {}
        self._sharing = ProbeSharing()
        self._share_results: collections.deque[tuple[HealthTarget, bool, str]] = (
            collections.deque())
        self._share_wake = threading.Event()
        self.errors = 0
        self.checks = 0
        self.skipped = 0
        self.flips = 0
        _forksafe.after_fork_in_child(self, HealthChecker._reset_after_fork)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler and worker threads; calling it again does nothing."""
        with self._lock:
            if self._threads:
                return
            self._stop.clear()
            threads = [threading.Thread(target=self._schedule, name="tai-lb-health-scheduler",
                                        daemon=True)]
            threads += [threading.Thread(target=self._work, name=f"tai-lb-health-{i}",
                                         daemon=True) for i in range(self._workers_wanted)]
            self._threads = threads
            for thread in threads:
                thread.start()
            self._start_share_thread()

    def _start_share_thread(self) -> None:
        # Called with the lock held: a running checker gets its share thread once a service
        # shares its checks (one that shares nothing runs none).
        if (not self._threads or any(t.name == _SHARE_THREAD for t in self._threads)
                or all(config.share is False for config, _ in self._checks.values())):
            return
        thread = threading.Thread(target=self._share, name=_SHARE_THREAD, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop every thread (within ``timeout`` seconds); calling it again does nothing.

        A worker inside a check that ignores its timeout (a function check that hangs) cannot be
        interrupted: it is left behind as a daemon thread and ends when the check returns.
        """
        with self._lock:
            threads, self._threads = self._threads, []
            self._stop.set()
            self._wake.notify_all()
        self._share_wake.set()
        for _ in threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _reset_after_fork(self) -> None:
        # never freed in the child
        _forksafe.inherited(self._lock, self._wake, self._queue, self._threads,
                            self._share_results, self._share_wake)
        was_running = bool(self._threads)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue = queue.Queue()
        self._threads = []
        self._share_results = collections.deque()
        self._share_wake = threading.Event()
        self._sharing.reset_after_fork()
        for targets in self._targets.values():
            for target in targets.values():
                target.running = target.claimed = False
        if was_running and not self._stop.is_set():
            self.start()

    @property
    def running(self) -> bool:
        """True while the threads run."""
        return bool(self._threads)

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        """The scheduler and worker threads started by :meth:`start` (none while stopped)."""
        return tuple(self._threads)

    # -- targets --------------------------------------------------------------------------------

    def set_endpoints(self, service: str, endpoints: Iterable[Endpoint],
                      config: HealthCheckConfig, scheme: str) -> None:
        """Make ``endpoints`` the checked set of ``service`` (new ones are checked at once)."""
        now = self._clock()
        wanted = {e.address: e for e in endpoints}
        with self._lock:
            self._checks[service] = (config, scheme)
            targets = self._targets.setdefault(service, {})
            for address in [a for a in targets if a not in wanted]:
                self._drop(service, address)
            for endpoint in wanted.values():
                self._upsert(service, endpoint, config, scheme, now)
            self._wake.notify_all()
            if config.share is not False:
                self._start_share_thread()
        if config.share is not False:
            self._share_wake.set()  # new endpoints are claimed at once

    def apply_changes(self, service: str, changes: Sequence[TopologyChange],
                      config: HealthCheckConfig, scheme: str) -> None:
        """Apply registry changes of ``service`` to its checked set, in order.

        Costs one step per change, whatever the size of the service: new endpoints are checked
        at once, changed ones keep their health, removed ones are dropped.
        """
        now = self._clock()
        endpoints = list(map(_endpoint_of, changes))
        addresses = list(map(_address_of, endpoints))
        with self._lock:
            self._checks[service] = (config, scheme)
            if config.share is not False:
                self._start_share_thread()
                self._share_wake.set()  # it takes the lock: new endpoints are claimed after us
            targets = self._targets.setdefault(service, {})
            if len(set(addresses)) < len(addresses):  # an address changed twice: in order
                for change in changes:
                    if change.kind == "removed":
                        self._drop(service, change.endpoint.address)
                    else:
                        self._upsert(service, change.endpoint, config, scheme, now)
                self._wake.notify_all()
                return
            # Each address once, so the order does not matter: whole lists at a time (a full
            # update of 10,000 endpoints brings as many changes).
            removing = list(map(operator.eq, map(_kind_of, changes), itertools.repeat("removed")))
            gone = list(itertools.compress(addresses, removing))
            if gone:
                for address in gone:
                    targets.pop(address, None)
                unhealthy = self._unhealthy.get(service)
                if unhealthy:
                    self._unhealthy[service] = unhealthy.difference(gone)
            staying = list(map(operator.not_, removing))
            new: list[HealthTarget] = []
            for address, endpoint, known in zip(
                    itertools.compress(addresses, staying), itertools.compress(endpoints, staying),
                    map(targets.get, itertools.compress(addresses, staying))):
                if known is not None:
                    known.endpoint = endpoint
                else:
                    target = targets[address] = HealthTarget(service, endpoint, config, scheme, now)
                    new.append(target)
            self._fresh += new  # checked at once
            self._wake.notify_all()

    def _upsert(self, service: str, endpoint: Endpoint, config: HealthCheckConfig, scheme: str,
                now: float) -> None:
        # Called with the lock held.
        targets = self._targets.setdefault(service, {})
        target = targets.get(endpoint.address)
        if target is None:
            target = HealthTarget(service, endpoint, config, scheme, now)
            targets[endpoint.address] = target
            self._fresh.append(target)  # checked at once
        else:
            target.endpoint = endpoint

    def _drop(self, service: str, address: str) -> None:
        # Called with the lock held.
        if self._targets.get(service, {}).pop(address, None) is not None:
            self._set_unhealthy(service, address, False)

    def target(self, service: str, address: str) -> Optional[HealthTarget]:
        """The target of one endpoint, or None if it is not checked (no lock: one read of each
        dict)."""
        targets = self._targets.get(service)
        return targets.get(address) if targets is not None else None

    def targets(self, service: str) -> dict[str, HealthTarget]:
        """The targets of ``service`` by address: a copy of the checked set, taken under the
        lock (O(n): for inspection, not for every request)."""
        with self._lock:
            return dict(self._targets.get(service, {}))

    def _set_unhealthy(self, service: str, address: str, unhealthy: bool) -> None:
        # Called with the lock held.
        current = self._unhealthy.get(service, frozenset())
        if (address in current) != unhealthy:
            self._unhealthy[service] = (current | {address} if unhealthy
                                        else current - {address})

    def unhealthy(self, service: str) -> frozenset[str]:
        """The addresses of ``service`` whose checks have failed (a set that never changes)."""
        return self._unhealthy.get(service, frozenset())

    def health(self, service: str, address: str) -> Optional[EndpointHealth]:
        """The health of one endpoint, or None if it is not checked."""
        target = self.target(service, address)
        return target.health if target is not None else None

    def is_healthy(self, service: str, address: str) -> bool:
        """False only for an endpoint whose checks have failed; unchecked ones are healthy."""
        target = self.target(service, address)
        return target is None or target.healthy

    # -- threads --------------------------------------------------------------------------------

    def _push(self, target: HealthTarget, due: float) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (due, self._counter, target))

    def _schedule(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    wait = self._tick()
                    self._wake.wait(min(max(wait, 0.005), 1.0))
            except Exception:  # the scheduler must outlive any bug
                self.errors += 1
                log.exception("tai-lb: health check scheduler error")
                self._stop.wait(0.1)

    def _tick(self) -> float:
        """One round of the scheduler, with the lock held: queue (or skip) every check that is
        due by the clock; returns the seconds until the next one."""
        now = self._clock()
        while self._fresh:
            self._due(self._fresh.popleft(), now)
        while self._heap and self._heap[0][0] <= now:
            self._due(heapq.heappop(self._heap)[2], now)
        return self._heap[0][0] - now if self._heap else 1.0

    def _due(self, target: HealthTarget, now: float) -> None:
        # Called by the scheduler with the lock held: schedule the next check of a target that
        # is due, and queue this one unless it can be skipped.
        if self.target(target.service, target.address) is not target:
            return  # removed (or removed and added again) meanwhile
        config = target.config
        spread = 1.0 + random.uniform(-config.jitter, config.jitter)
        self._push(target, now + config.interval * spread)
        if target.running:
            return  # the previous check still runs: never two at once
        if self._sharing.active(target.service, config):
            return  # the share thread claims its checks
        if self._may_skip(target, now):
            # Real traffic succeeded within the interval: that is a pass, though it does not
            # wipe out failed probes (a failing health endpoint drains a serving instance).
            self.skipped += 1
            target.skips_in_row += 1
            target.state().passes_in_row += 1
            return
        target.skips_in_row = 0
        target.running = True
        self._queue.put(target)

    def _may_skip(self, target: HealthTarget, now: float) -> bool:
        """True if real traffic may stand in for this probe: it succeeded within the interval,
        fewer than ``max_skips`` probes in a row were skipped, and no probe is failing."""
        config = target.config
        if (not config.skip_if_traffic or target.skips_in_row >= config.max_skips
                or not target.healthy or target.failing):
            return False
        last = self._last_success(target.service, target.address)
        return last is not None and now - last < config.interval

    def _work(self) -> None:
        while True:
            target = self._queue.get()
            if target is None or self._stop.is_set():
                return
            try:
                ok, detail = probe(target)
                if target.claimed:  # for every process sharing its checks: the share thread
                    target.claimed = False  # publishes it
                    self._share_results.append((target, ok, detail))
                    self._share_wake.set()
                else:
                    self._record(target, ok, detail)
            except Exception:
                self.errors += 1
                log.exception("tai-lb: health check of %s failed unexpectedly", target.address)
            finally:
                target.running = False

    def _record(self, target: HealthTarget, ok: bool, detail: str) -> None:
        now = self._clock()
        config = target.config
        flipped = False
        with self._lock:
            self.checks += 1
            health = target.state()
            health.checked = True
            health.last_check = now
            if health.history is NO_HISTORY:
                health.history = collections.deque(maxlen=config.history)
            health.history.append((now, ok, detail))
            if ok:
                health.passes_in_row += 1
                health.failures_in_row = 0
                if not health.healthy and health.passes_in_row >= config.healthy_threshold:
                    health.healthy = flipped = True
            elif now - health.added_at >= config.grace:
                health.failures_in_row += 1
                health.passes_in_row = 0
                if health.healthy and health.failures_in_row >= config.unhealthy_threshold:
                    health.healthy = False
                    flipped = True
            if flipped and self.target(target.service, target.address) is target:
                self._set_unhealthy(target.service, target.address, not health.healthy)
        if flipped:
            self.flips += 1
            log.info("tai-lb: %s endpoint %s is now %s (%s)", target.service, target.address,
                     "healthy" if ok else "unhealthy", detail)
            try:
                self._on_change(target.service)
            except Exception:
                self.errors += 1
                log.exception("tai-lb: health change listener failed")

    # -- shared checks (health.sharing) ----------------------------------------------------------

    def _share(self) -> None:
        while not self._stop.is_set():
            self._share_wake.clear()
            try:
                wait = self._share_round()
            except Exception:  # the share thread must outlive any bug
                self.errors += 1
                log.exception("tai-lb: health check share thread error")
                wait = 0.1
            self._share_wake.wait(wait)

    def _share_round(self) -> float:
        """Publish this process's shared results, claim due checks and adopt every shared
        result, service by service; returns the seconds until the next round."""
        results: dict[str, list[tuple[HealthTarget, bool, str]]] = {}
        while self._share_results:
            target, ok, detail = self._share_results.popleft()
            results.setdefault(target.service, []).append((target, ok, detail))
        with self._lock:
            checks = list(self._checks.items())
        wait = 1.0
        for service, (config, scheme) in checks:
            mine = results.pop(service, [])
            if self._sharing.active(service, config):
                wait = min(wait, config.interval / 4, 0.25,
                           self._share_service(service, config, scheme, mine))
            else:
                for target, ok, detail in mine:
                    self._record(target, ok, detail)
        return wait

    def _share_service(self, service: str, config: HealthCheckConfig, scheme: str,
                       mine: list[tuple[HealthTarget, bool, str]]) -> float:
        # On the share thread, with no lock held during the file's I/O; returns the seconds
        # until the next check of the service is due (or a lease runs out).
        with self._lock:
            current = list(self._targets.get(service, {}).values())
        candidates = [target.share_key for target in current if not target.running]
        try:
            records, claimed = self._sharing.exchange(
                service, config, scheme, [(t.share_key, ok, detail) for t, ok, detail in mine],
                candidates)
        except (OSError, ValueError) as error:  # ValueError: a path the OS cannot encode
            self._sharing.fail(service, error)
            for target, ok, detail in mine:
                self._record(target, ok, detail)
            return 1.0
        with self._lock:
            self.checks += len(mine)
        self._adopt(service, current, records)
        for target in current:
            if target.share_key in claimed:
                target.claimed = target.running = True
                self._queue.put(target)
        due = self._sharing.next_due(records, [t.share_key for t in current], config)
        return max(due - self._sharing.clock(), 0.01)

    def _adopt(self, service: str, current: list[HealthTarget],
               records: dict[str, Any]) -> None:
        """Make each shared result not seen yet this process's health of its endpoint."""
        now = self._clock()
        flipped: list[tuple[HealthTarget, str]] = []
        with self._lock:
            for target in current:
                record = records.get(target.share_key)
                if record is None or self.target(service, target.address) is not target:
                    continue
                detail = adopt(target, record, now)
                if detail is not None:
                    self._sharing.adopted += 1
                    if target.healthy != (target.address not in self.unhealthy(service)):
                        self._set_unhealthy(service, target.address, not target.healthy)
                        flipped.append((target, detail))
        for target, detail in flipped:
            self.flips += 1
            log.info("tai-lb: %s endpoint %s is now %s (%s, shared check)", service,
                     target.address, "healthy" if target.healthy else "unhealthy", detail)
        if flipped:
            try:
                self._on_change(service)
            except Exception:
                self.errors += 1
                log.exception("tai-lb: health change listener failed")

    def snapshot(self) -> dict[str, Any]:
        """Counters of the checker, JSON-serialisable."""
        shared = [service for service, (config, _) in list(self._checks.items())
                  if self._sharing.active(service, config)]
        return {"running": self.running, "checks": self.checks, "skipped_for_traffic":
                self.skipped, "flips": self.flips, "errors": self.errors,
                "targets": sum(map(len, list(self._targets.values()))),
                "sharing": self._sharing.snapshot(shared)}
