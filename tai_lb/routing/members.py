"""Membership: the live figures of every endpoint of a service, kept per address.

The first stage of the chain.  It turns the registry snapshot into a tuple of
:class:`~tai_lb.EndpointStats`, one per endpoint in the snapshot's order, keeping each address's
figures across changes: in-flight counts, latency averages and breakers survive topology changes,
and an endpoint whose metadata changed keeps its open leases' counts.  When the snapshot records
how it differs from the one the members were last built for (a register(), deregister() or small
update), only the endpoints that came, went or changed are looked at; otherwise the whole set
is, in C (maps and set differences over the snapshot).
"""

from __future__ import annotations

import collections
import functools
import itertools
import operator
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, Optional

from .. import _forksafe
from ..endpoint import Endpoint
from ..failover import EndpointBreaker
from ..stats import DEFAULT_DECAY, DEFAULT_LATENCY, EndpointStats

if TYPE_CHECKING:
    from ..config import ServiceConfig
    from ..outlier import OutlierDetector
    from ..registry import ServiceSnapshot
    from .route import RouteState

__all__ = ["Membership", "figures_factory"]

_endpoint_of = operator.attrgetter("endpoint")
_priority_of = operator.attrgetter("endpoint.priority")

#: makes the figures of an endpoint new to the service: (endpoint, the service's load deque)
StatsFactory = Callable[[Endpoint, "collections.deque[None]"], EndpointStats]


class Membership:
    """Stage: every endpoint's figures (``state.everyone``) and their shared priority.

    :param make_stats: makes the figures of an endpoint new to the service.
    """

    def __init__(self, make_stats: StatsFactory) -> None:
        self._make_stats = make_stats
        self._lock = threading.Lock()  # guards ``figures`` against readers on other threads
        #: the figures of each address, the removed ones included until nothing is in flight
        self.figures: dict[str, EndpointStats] = {}
        #: one item per request in flight on any endpoint of the service
        self.load: collections.deque[None] = collections.deque()
        self._last: Optional[tuple[ServiceSnapshot, tuple[EndpointStats, ...],
                                   Optional[int]]] = None

    def get(self, address: str) -> Optional[EndpointStats]:
        """The figures of ``address``, or None."""
        return self.figures.get(address)

    def build(self, state: RouteState) -> None:
        """Set ``state.everyone``, ``state.candidates`` (everyone) and ``state.priority``."""
        state.everyone, state.priority = self._members(state.snapshot)
        state.candidates = state.everyone

    def _members(self, snapshot: ServiceSnapshot,
                 ) -> tuple[tuple[EndpointStats, ...], Optional[int]]:
        known = self.figures
        table = snapshot.by_address
        last = self._last
        delta = snapshot.delta
        if last is not None and last[0] is snapshot:
            return last[1], last[2]  # a build for a change of health: the same members
        if last is not None and delta is not None and delta.base == last[0].generation:
            everyone, priority = last[1], last[2]
            if delta.removed:
                gone = {known.get(address) for address in delta.removed}
                everyone = tuple(itertools.filterfalse(gone.__contains__, everyone))
            self._add([a for a in delta.added if a not in known], table)
            for address in (*delta.changed, *delta.added):
                stats = known[address]
                # Changed metadata keeps the live figures and the open leases' counts.
                stats.endpoint = table[address]
                if stats.endpoint.priority != priority:
                    priority = None
            everyone += tuple(map(known.__getitem__, delta.added))
            for address in delta.removed:  # forgotten once nothing is in flight on them
                went = known.get(address)
                if went is not None and not went.in_flight and address not in table:
                    self._forget(address)
        else:
            self._add(list(itertools.filterfalse(known.__contains__, table)), table)
            everyone = tuple(map(known.__getitem__, table))
            moved = map(operator.is_not, map(_endpoint_of, everyone), snapshot.endpoints)
            for stats, endpoint in itertools.compress(zip(everyone, snapshot.endpoints), moved):
                stats.endpoint = endpoint
            priority = None
        if priority is None:
            priorities = set(map(_priority_of, everyone))
            priority = priorities.pop() if len(priorities) == 1 else None
        if len(known) > len(table):
            # Forget removed endpoints once nothing is in flight on them (those that still had
            # requests in flight at an earlier build included).
            for address in known.keys() - table.keys():
                if not known[address].in_flight:
                    self._forget(address)
        self._last = (snapshot, everyone, priority)
        return everyone, priority

    def _add(self, addresses: list[str], table: Mapping[str, Endpoint]) -> None:
        if addresses:
            made = [self._make_stats(table[address], self.load) for address in addresses]
            with self._lock:
                self.figures.update(zip(addresses, made))

    def _forget(self, address: str) -> None:
        with self._lock:
            self.figures.pop(address, None)

    def reset_after_fork(self) -> None:
        """Fresh locks for the figures (a parent's thread may have held one at the fork), and
        no request in flight (the parent's never end here); the old ones are kept, never freed
        in the child."""
        _forksafe.inherited(self._lock, self.load)
        self._lock = threading.Lock()
        self.load = collections.deque()
        for stats in self.figures.values():
            stats.reset_after_fork()
            stats.service_load = self.load


def figures_factory(service: str, settings: ServiceConfig, clock: Callable[[], float],
                    outliers: OutlierDetector,
                    breaker_changed: Callable[[str, str], None],
                    follow: Optional[Callable[[str, EndpointStats], None]] = None) -> StatsFactory:
    """What makes the figures of an endpoint new to ``service``: the strategy's averages, a
    circuit breaker when the service has one, and outlier reporting when it is configured;
    ``follow(service, stats)`` is told of each (the StatsD export of request metrics)."""
    strategy = settings.strategy
    decay = getattr(strategy, "decay", DEFAULT_DECAY)
    default_latency = getattr(strategy, "default_latency", DEFAULT_LATENCY)

    def make(endpoint: Endpoint, load: collections.deque[None]) -> EndpointStats:
        stats = EndpointStats(endpoint, clock, decay=decay, default_latency=default_latency,
                              service_load=load)
        if settings.circuit_breaker is not None:
            stats.breaker = EndpointBreaker(f"{service}/{endpoint.address}",
                                            settings.circuit_breaker, breaker_changed, clock)
        if settings.outlier_detection is not None:
            stats.on_failure = functools.partial(outliers.report_failure, service,
                                                 config=settings.outlier_detection)
        if follow is not None:
            follow(service, stats)
        return stats

    return make
