"""Rebalancing: how a service takes a change of its endpoints, and the record of every change.

The service key ``rebalance`` chooses the mode:

* ``immediate`` (the default): a change is applied at once; a new endpoint gets its full share
  (unless the service has ``slow_start``); a removed endpoint gets no new picks, and its pools
  close when its last request in flight ends.
* ``gradual``: as immediate, plus slow start (``slow_start``'s settings, or its defaults): a new
  endpoint's share ramps up over a window (:mod:`tai_lb.routing.slow_start`); and a removed
  endpoint's drain ends after ``drain_timeout`` seconds at most: its pools then close with
  requests still in flight.
* ``manual``: changes are held back: picks go on with the endpoints last applied until
  :meth:`LoadBalancer.rebalance() <tai_lb.LoadBalancer.rebalance>` applies what the registry
  holds then (removals included: a deregistered endpoint keeps its picks until then); then as
  gradual (slow start when the service has ``slow_start``; drains bounded by the timeout).

Every change is an event in ``status()["services"][name]["events"]``: a dict with ``at`` (wall
clock, seconds since the epoch), ``kind`` and its figures.  The last 100 per service are kept.

:class:`Rebalancer` owns the per-service state and the ``tai-lb-rebalance`` daemon thread, which
runs only while an endpoint ramps or a drain has a deadline: it rebuilds the routes of ramping
services every ``window / 40`` seconds (one second at most) and ends drains past their timeout.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import _forksafe
from ._threads import ThreadOwner
from .routing.rebalancing import (
    ADDRESSES_SHOWN,
    EVENTS_KEPT,
    RebalanceConfig,
    ServiceRebalance,
)
from .routing.slow_start import SlowStartConfig

if TYPE_CHECKING:
    from .config import LoadBalancerConfig
    from .registry import ServiceSnapshot
    from .stats import EndpointStats

__all__ = ["ADDRESSES_SHOWN", "EVENTS_KEPT", "RebalanceConfig", "Rebalancer", "ServiceRebalance"]

log = logging.getLogger(__name__)

class _Drain:
    """A drain with a deadline: the endpoint's figures and the callback that ends it."""

    __slots__ = ("callback", "deadline", "service", "stats")

    def __init__(self, service: str, stats: EndpointStats, callback: Callable[[], None],
                 deadline: float) -> None:
        self.service = service
        self.stats = stats
        self.callback = callback
        self.deadline = deadline


class Rebalancer(ThreadOwner):
    """The rebalancing of every service of a balancer, and the thread that moves it on (the
    ``tai-lb-rebalance`` thread, while something ramps or drains).

    :param config: the balancer's settings (each service's ``rebalance`` and ``slow_start``).
    :param clock: the balancer's monotonic clock (ramps and drain deadlines run on it).
    :param rebuild: rebuilds the route of a service (while its endpoints ramp).
    """

    def __init__(self, config: LoadBalancerConfig, clock: Callable[[], float],
                 rebuild: Callable[[str], None]) -> None:
        super().__init__()  # its lock guards the tables and the thread's start and end
        self._config = config
        self.clock = clock
        #: rebuilds the route of a service
        self.rebuild = rebuild
        self._services: dict[str, ServiceRebalance] = {}
        self._drains: list[_Drain] = []
        #: False while the balancer is being built: endpoints added then start at full weight
        self.built = False
        _forksafe.after_fork_in_child(self, Rebalancer._reset_after_fork)

    def service(self, name: str) -> ServiceRebalance:
        """The rebalancing state of ``name``, made on first use."""
        state = self._services.get(name)
        if state is None:
            settings = self._config.services.get(name)
            config = settings.rebalance if settings is not None else None
            config = config if config is not None else RebalanceConfig()
            slow_start = settings.slow_start if settings is not None else None
            if slow_start is None and config.mode == "gradual":
                slow_start = SlowStartConfig()
            with self._lock:
                state = self._services.setdefault(name, ServiceRebalance(name, config,
                                                                         slow_start))
        return state

    def events(self, name: str) -> list[dict[str, Any]]:
        """The events of ``name``, oldest first."""
        state = self._services.get(name)
        return list(state.events) if state is not None else []

    def mark_built(self, snapshot: Callable[[str], Optional[ServiceSnapshot]]) -> None:
        """The balancer is built: from now on additions ramp, and manual services hold their
        changes back (from the endpoints ``snapshot(name)`` gives)."""
        for name, settings in self._config.services.items():
            if settings.rebalance is not None and settings.rebalance.mode == "manual":
                self.service(name).apply(snapshot(name))
        self.built = True

    def ramp(self, service: str, addresses: list[str]) -> None:
        """Begin the slow start of endpoints added to ``service`` (after the balancer was
        built, and when the service has slow start)."""
        state = self.service(service)
        if self.built and state.ramps is not None and addresses:
            state.ramp(addresses, self.clock())
            self._wake()

    def drain_deadline(self, service: str, stats: EndpointStats,
                       callback: Callable[[], None]) -> None:
        """End the drain ``callback`` belongs to after the service's ``drain_timeout``, if it
        has not ended by then (gradual and manual modes)."""
        state = self.service(service)
        if not state.bounded_drains:
            return
        if state.config.drain_timeout == 0:
            stats.drained_now()
            return
        with self._lock:
            self._drains.append(_Drain(service, stats, callback,
                                       self.clock() + state.config.drain_timeout))
        self._wake()

    def end_overdue(self, service: Optional[str] = None) -> int:
        """End the drains past their deadline (of ``service``, or of all); how many ended."""
        now = self.clock()
        with self._lock:
            due = [d for d in self._drains if d.deadline <= now
                   and (service is None or d.service == service)]
            if not due:
                return 0
            self._drains = [d for d in self._drains if d not in due]
        for drain in due:
            if drain.stats.on_drained is drain.callback:  # not ended, nor kept (added back)
                drain.stats.drained_now()
        return len(due)

    # -- the thread -----------------------------------------------------------------------------

    def _work(self) -> Optional[float]:
        # The seconds to the next round, or None when nothing ramps nor drains.  Lock held.
        intervals = [min(1.0, max(0.01, s.ramps.config.window / 40))
                     for s in self._services.values() if s.ramps is not None and s.ramps.started]
        if self._drains:
            intervals.append(0.25)
        return min(intervals) if intervals else None

    def _wake(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed and self._work() is not None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="tai-lb-rebalance")
                self._thread.start()

    def _run(self) -> None:
        stop = self._stop
        while True:
            with self._lock:
                interval = self._work()
                if interval is None or self._closed:
                    self._thread = None  # a ramp or drain that comes later starts another
                    return
            if stop.wait(interval):
                return
            try:
                self.end_overdue()
                for name, state in list(self._services.items()):
                    if state.ramps is not None and state.ramps.started:
                        self.rebuild(name)
            except Exception:  # never let a round end the thread
                log.exception("tai-lb: a round of rebalancing failed")

    def _reset_after_fork(self) -> None:
        self._fresh_after_fork()
        for state in self._services.values():
            _forksafe.inherited(state.lock)
            state.lock = threading.Lock()
        self._wake()
