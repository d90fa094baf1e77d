"""Active health checks: probes on a small, fixed set of named daemon threads.

One scheduler thread keeps every endpoint's next check time; a bounded pool of worker threads
runs the probes (HTTP GET of a path, TCP connect, or a function).  A probe that hangs ties up one
worker and never delays the others, and an endpoint is never probed twice at once.  An endpoint
turns unhealthy after ``unhealthy_threshold`` failed checks in a row and healthy again after
``healthy_threshold`` passed ones (HAProxy's fall and rise).

A new endpoint is healthy until proven otherwise and is probed at once.  A client-side balancer
usually learns of an endpoint from configuration or discovery, both of which list instances that
are meant to serve; holding traffic back until a first probe passes would make every process
start cold and every discovery update wait an interval, while retries already cover an endpoint
that turns out dead.  ``grace`` gives slow starters time: failed checks in the first ``grace``
seconds after an endpoint appears are recorded but do not count.

Traffic-proven health: an endpoint that answered real traffic successfully within the last
interval may skip its probe (the success counts as a passed check), but only ``max_skips`` times
in a row, and never while it has failed probes in a row: operators drain an instance by failing
its health endpoint while it still serves, so a failing probe always counts and a busy endpoint
that fails its health endpoint is out within ``interval x (max_skips + unhealthy_threshold)``.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import http.client
import itertools
import logging
import operator
import queue
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

from . import _forksafe
from ._settings import MIN_INTERVAL, Settings, check_int, check_number, shown
from .endpoint import Endpoint
from .exceptions import ConfigError

if TYPE_CHECKING:
    from .registry import TopologyChange

__all__ = ["EndpointHealth", "HealthCheckConfig", "HealthChecker"]

log = logging.getLogger(__name__)

_endpoint_of = operator.attrgetter("endpoint")
_address_of = operator.attrgetter("address")
_kind_of = operator.attrgetter("kind")

ProbeFunction = Callable[[Endpoint], bool]


_STATUS_RANGE = re.compile(r"\s*([0-9]{3})\s*-\s*([0-9]{3})\s*")  # ASCII digits only


def _statuses(value: Any, path: str) -> frozenset[int]:
    items = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
    result: set[int] = set()
    for item in items:
        if isinstance(item, str):
            match = _STATUS_RANGE.fullmatch(item)
            if match is None:
                raise ConfigError(path, f"must be statuses (200) or ranges (\"200-399\"), got "
                                        f"{shown(item)}")
            low, high = int(match[1]), int(match[2])
            # Checked before the range is built: "200-999999999" would take gigabytes.
            if not 100 <= low <= high <= 599:
                raise ConfigError(path, f"a range must go up from 100 to at most 599, got "
                                        f"{shown(item)}")
            result.update(range(low, high + 1))
        elif isinstance(item, bool) or not isinstance(item, int):
            raise ConfigError(path, f"must be statuses (200) or ranges (\"200-399\"), got "
                                    f"{shown(item)}")
        else:
            result.add(item)
    if not result or min(result) < 100 or max(result) > 599:
        raise ConfigError(path, f"must be HTTP statuses from 100 to 599, got {shown(value)}")
    return frozenset(result)


@dataclass(frozen=True)
class HealthCheckConfig(Settings):
    """The ``health_check`` settings of a service.

    :param type: ``"http"`` (GET ``path``), ``"tcp"`` (connect) or ``"function"`` (Python only).
    :param path: the path an HTTP check requests; required for ``"http"``.
    :param expected_statuses: statuses that pass an HTTP check (default 200-399, as HAProxy).
    :param interval: seconds between checks of one endpoint.
    :param jitter: each wait is ``interval`` times a random factor in ``1 +- jitter``.
    :param timeout: seconds a check may take.
    :param healthy_threshold: passed checks in a row that make an unhealthy endpoint healthy.
    :param unhealthy_threshold: failed checks in a row that make a healthy endpoint unhealthy.
    :param grace: seconds after an endpoint appears during which failed checks do not count.
    :param history: checks remembered per endpoint (shown by ``status()``).
    :param skip_if_traffic: skip the probe of an endpoint that answered real traffic
        successfully within the last interval (at most ``max_skips`` times in a row).
    :param max_skips: probes in a row that real traffic may replace; the next one runs whatever
        the traffic, so an endpoint failing its health endpoint while it serves is out within
        ``interval x (max_skips + unhealthy_threshold)``.  0 probes at every interval.
    :param panic_threshold: when the healthy share of a service falls strictly below this, balance
        over all its endpoints (Envoy's panic mode); 0 never does, failing closed instead.
    :param verify: for ``https`` services: verify the certificate (True), not (False), or
        against this CA bundle path.
    :param function: for ``"function"`` checks: called with the endpoint; True passes.
    """

    type: Literal["http", "tcp", "function"] = "http"
    path: Optional[str] = None
    expected_statuses: frozenset[int] = frozenset(range(200, 400))
    interval: float = 1.0
    jitter: float = 0.1
    timeout: float = 0.5
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2
    grace: float = 0.0
    history: int = 10
    skip_if_traffic: bool = True
    max_skips: int = 2
    panic_threshold: float = 0.5
    verify: Union[bool, str] = True
    function: Optional[ProbeFunction] = None

    def __post_init__(self) -> None:
        if self.type not in ("http", "tcp", "function"):
            raise ConfigError("type", f"must be http, tcp or function, got {shown(self.type)}")
        if self.type == "http" and (not isinstance(self.path, str)
                                    or not self.path.startswith("/")):
            raise ConfigError("path", f"an http check needs a path starting with '/', got "
                                      f"{shown(self.path)}")
        if self.type == "function" and not callable(self.function):
            raise ConfigError("function", f"a function check needs a callable, got "
                                          f"{shown(self.function)}")
        object.__setattr__(self, "expected_statuses",
                           _statuses(self.expected_statuses, "expected_statuses"))
        check_number(self.interval, "interval", MIN_INTERVAL, low_open=False)
        check_number(self.jitter, "jitter", 0.0, 1.0, low_open=False, what="a share")
        check_number(self.timeout, "timeout")
        check_number(self.grace, "grace", low_open=False)
        check_number(self.panic_threshold, "panic_threshold", 0.0, 1.0, low_open=False,
                     what="a share")
        for name in ("healthy_threshold", "unhealthy_threshold", "history"):
            check_int(getattr(self, name), name, 1, 1000)
        check_int(self.max_skips, "max_skips", 0, 1000)
        if not isinstance(self.skip_if_traffic, bool):
            raise ConfigError("skip_if_traffic", f"must be true or false, got "
                                                 f"{shown(self.skip_if_traffic)}")
        if not isinstance(self.verify, (bool, str)):
            raise ConfigError("verify", f"must be true, false or a CA bundle path, got "
                                        f"{shown(self.verify)}")

    python_only = ("function",)

    @classmethod
    def from_config(cls, value: Any) -> HealthCheckConfig:
        """Build from the ``health_check`` mapping of a configuration."""
        if isinstance(value, Mapping) and value.get("type") == "function":
            raise ConfigError("type", "function checks are set from Python "
                                      "(HealthCheckConfig(type='function', function=...))")
        return super().from_config(value)


@dataclass
class EndpointHealth:
    """What the checks know about one endpoint of one service."""

    healthy: bool = True
    checked: bool = False
    passes_in_row: int = 0
    failures_in_row: int = 0
    added_at: float = 0.0
    last_check: Optional[float] = None
    history: collections.deque[tuple[float, bool, str]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=10))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {"healthy": self.healthy, "checked": self.checked,
                "passes_in_row": self.passes_in_row, "failures_in_row": self.failures_in_row,
                "history": [{"ok": ok, "detail": detail} for _, ok, detail in self.history]}


_NO_HISTORY: collections.deque[tuple[float, bool, str]] = collections.deque(maxlen=0)
"""The history of a target never checked yet: shared, and it keeps nothing."""


class _Target:
    __slots__ = ("_health", "added_at", "address", "config", "due", "endpoint", "running",
                 "scheme", "service", "skips_in_row")

    def __init__(self, service: str, endpoint: Endpoint, config: HealthCheckConfig, scheme: str,
                 now: float) -> None:
        self.service = service
        self.endpoint = endpoint
        self.address = endpoint.address
        self.config = config
        self.scheme = scheme
        self.due = now
        self.running = False
        self.skips_in_row = 0  # probes replaced by real traffic since the last one that ran
        self.added_at = now
        # Made at the first check (by state()): a discovery update that brings 10,000 endpoints
        # should not build 10,000 records, with their history, while it is being applied.
        self._health: Optional[EndpointHealth] = None

    @property
    def health(self) -> EndpointHealth:
        """What the checks know; for a target never checked, a fresh record (not kept)."""
        health = self._health
        if health is None:
            return EndpointHealth(added_at=self.added_at, history=_NO_HISTORY)
        return health

    @property
    def healthy(self) -> bool:
        """False only once checks have failed."""
        return self._health is None or self._health.healthy

    @property
    def failing(self) -> bool:
        """True while its last counted probe failed."""
        return self._health is not None and self._health.failures_in_row > 0

    def state(self) -> EndpointHealth:
        """The record to update, made at the first call; only under the checker's lock."""
        if self._health is None:
            self._health = EndpointHealth(added_at=self.added_at, history=_NO_HISTORY)
        return self._health


def probe(target: _Target) -> tuple[bool, str]:
    """Run one check; returns (passed, detail).  Never raises."""
    config = target.config
    endpoint = target.endpoint
    try:
        if config.type == "function":
            assert config.function is not None
            ok = bool(config.function(endpoint))
            return ok, "function returned " + ("true" if ok else "false")
        if config.type == "tcp":
            with socket.create_connection((endpoint.host, endpoint.port), config.timeout):
                return True, "connected"
        name = endpoint.tls_name or target.service
        connection: http.client.HTTPConnection
        if target.scheme == "https":
            context = ssl.create_default_context(
                cafile=config.verify if isinstance(config.verify, str) else None)
            if config.verify is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            connection = _NamedHTTPSConnection(endpoint.host, endpoint.port, name, context,
                                               config.timeout)
        else:
            connection = http.client.HTTPConnection(endpoint.host, endpoint.port,
                                                    timeout=config.timeout)
        try:
            connection.request("GET", config.path or "/", headers={
                "Host": name, "User-Agent": "tai-lb health check", "Connection": "close"})
            response = connection.getresponse()
            response.read(65536)
            ok = response.status in config.expected_statuses
            return ok, f"HTTP {response.status}"
        finally:
            connection.close()
    except Exception as error:  # a failed probe, whatever the cause
        return False, f"{type(error).__name__}: {error}"[:200]


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address, with SNI and certificate checks for a name."""

    def __init__(self, host: str, port: int, name: str, context: ssl.SSLContext,
                 timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls_name = name
        self._tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=self._tls_name)


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
        self._targets: dict[str, dict[str, _Target]] = {}
        # The unhealthy addresses of each service, replaced whole under the lock and read
        # without it: a route rebuild filters 10,000 endpoints by one set, not 10,000 lookups.
        self._unhealthy: dict[str, frozenset[str]] = {}
        # (due, tie-breaker, target): an entry whose target was replaced or removed is dropped
        self._heap: list[tuple[float, int, _Target]] = []
        # New targets, due at once, in the order they came: the scheduler takes them before the
        # heap, so a full update adds 10,000 of them without 10,000 heap pushes.
        self._fresh: collections.deque[_Target] = collections.deque()
        self._counter = 0
        self._queue: queue.Queue[Optional[_Target]] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
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

    def stop(self, timeout: float = 1.0) -> None:
        """Stop every thread (within ``timeout`` seconds); calling it again does nothing.

        A worker inside a check that ignores its timeout (a function check that hangs) cannot be
        interrupted: it is left behind as a daemon thread and ends when the check returns.
        """
        with self._lock:
            threads, self._threads = self._threads, []
            self._stop.set()
            self._wake.notify_all()
        for _ in threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _reset_after_fork(self) -> None:
        # never freed in the child
        _forksafe.inherited(self._lock, self._wake, self._queue, self._threads)
        was_running = bool(self._threads)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue = queue.Queue()
        self._threads = []
        for targets in self._targets.values():
            for target in targets.values():
                target.running = False
        if was_running and not self._stop.is_set():
            self.start()

    @property
    def running(self) -> bool:
        """True while the threads run."""
        return bool(self._threads)

    # -- targets --------------------------------------------------------------------------------

    def set_endpoints(self, service: str, endpoints: Iterable[Endpoint],
                      config: HealthCheckConfig, scheme: str) -> None:
        """Make ``endpoints`` the checked set of ``service`` (new ones are checked at once)."""
        now = self._clock()
        wanted = {e.address: e for e in endpoints}
        with self._lock:
            targets = self._targets.setdefault(service, {})
            for address in [a for a in targets if a not in wanted]:
                self._drop(service, address)
            for endpoint in wanted.values():
                self._upsert(service, endpoint, config, scheme, now)
            self._wake.notify_all()

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
            new: list[_Target] = []
            for address, endpoint, known in zip(
                    itertools.compress(addresses, staying), itertools.compress(endpoints, staying),
                    map(targets.get, itertools.compress(addresses, staying))):
                if known is not None:
                    known.endpoint = endpoint
                else:
                    target = targets[address] = _Target(service, endpoint, config, scheme, now)
                    new.append(target)
            self._fresh += new  # checked at once
            self._wake.notify_all()

    def _upsert(self, service: str, endpoint: Endpoint, config: HealthCheckConfig, scheme: str,
                now: float) -> None:
        # Called with the lock held.
        targets = self._targets.setdefault(service, {})
        target = targets.get(endpoint.address)
        if target is None:
            target = targets[endpoint.address] = _Target(service, endpoint, config, scheme, now)
            self._fresh.append(target)  # checked at once
        else:
            target.endpoint = endpoint

    def _drop(self, service: str, address: str) -> None:
        # Called with the lock held.
        if self._targets.get(service, {}).pop(address, None) is not None:
            self._set_unhealthy(service, address, False)

    def _target(self, service: str, address: str) -> Optional[_Target]:
        """The target of one endpoint, or None (no lock: one read of each dict)."""
        targets = self._targets.get(service)
        return targets.get(address) if targets is not None else None

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
        target = self._target(service, address)
        return target.health if target is not None else None

    def is_healthy(self, service: str, address: str) -> bool:
        """False only for an endpoint whose checks have failed; unchecked ones are healthy."""
        target = self._target(service, address)
        return target is None or target.healthy

    # -- threads --------------------------------------------------------------------------------

    def _push(self, target: _Target, due: float) -> None:
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

    def _due(self, target: _Target, now: float) -> None:
        # Called by the scheduler with the lock held: schedule the next check of a target that
        # is due, and queue this one unless it can be skipped.
        if self._target(target.service, target.address) is not target:
            return  # removed (or removed and added again) meanwhile
        config = target.config
        spread = 1.0 + random.uniform(-config.jitter, config.jitter)
        self._push(target, now + config.interval * spread)
        if target.running:
            return  # the previous check still runs: never two at once
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

    def _may_skip(self, target: _Target, now: float) -> bool:
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
                self._record(target, ok, detail)
            except Exception:
                self.errors += 1
                log.exception("tai-lb: health check of %s failed unexpectedly", target.address)
            finally:
                target.running = False

    def _record(self, target: _Target, ok: bool, detail: str) -> None:
        now = self._clock()
        config = target.config
        flipped = False
        with self._lock:
            self.checks += 1
            health = target.state()
            health.checked = True
            health.last_check = now
            if health.history is _NO_HISTORY:
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
            if flipped and self._target(target.service, target.address) is target:
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

    def snapshot(self) -> dict[str, Any]:
        """Counters of the checker, JSON-serialisable."""
        return {"running": self.running, "checks": self.checks, "skipped_for_traffic":
                self.skipped, "flips": self.flips, "errors": self.errors,
                "targets": sum(map(len, list(self._targets.values())))}
