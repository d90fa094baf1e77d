"""`LoadBalancer`: picks an endpoint of a service for each request.

The pick path, with no lock on the common path::

    pick(service, key) -> current registry snapshot -> route (prepared once per snapshot)
                       -> strategy's picker -> Lease (counts in flight until released)

A route is rebuilt when the registry publishes a new snapshot for the service; the check is one
identity comparison, so a pick that starts after ``deregister()`` returns never sees the removed
endpoint.  Live figures (:class:`~tai_lb.stats.EndpointStats`) are kept per address across
rebuilds, so in-flight counts and latency averages survive topology changes.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import operator
import os
import random
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import requests

from . import _forksafe
from .config import LoadBalancerConfig, ServiceConfig, load_config
from .discovery import DiscoveryWatcher
from .endpoint import Endpoint
from .exceptions import LoadBalancerError, NoEndpointAvailable, UnknownService
from .failover import EndpointBreaker
from .health import HealthCheckConfig, HealthChecker
from .lease import Lease
from .metrics import Metrics
from .outlier import OutlierConfig, OutlierDetector
from .pool import EndpointPools
from .registry import ServiceRegistry, ServiceSnapshot, TopologyChange
from .retry import RetryBudget
from .stats import DEFAULT_DECAY, DEFAULT_LATENCY, EndpointStats
from .strategies import EXCLUDING, Picker, RoutingKey, Strategy, StrategyLike, resolve_strategy

if TYPE_CHECKING:
    from .adapter import LoadBalancedAdapter

__all__ = ["LoadBalancer"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
_endpoint_of = operator.attrgetter("endpoint")
_priority_of = operator.attrgetter("endpoint.priority")
_address_of = operator.attrgetter("endpoint.address")
_kind_of = operator.attrgetter("kind")
_service_of = operator.attrgetter("service")
_endpoint_address = operator.attrgetter("address")
_host_port_of = operator.attrgetter("host", "port")


class _Route:
    """What picks of one service need, prepared for one registry snapshot and health epoch.

    ``everyone`` is every endpoint's figures; ``candidates`` the ones picks choose from (the
    healthy ones, or everyone in panic).  ``refusal`` says why nothing can be picked.
    """

    __slots__ = ("candidates", "epoch", "everyone", "panic", "picker", "refusal", "snapshot",
                 "strategy")

    def __init__(self, snapshot: ServiceSnapshot, strategy: Strategy,
                 everyone: tuple[EndpointStats, ...], candidates: tuple[EndpointStats, ...],
                 picker: Optional[Picker], epoch: int = 0, panic: bool = False,
                 refusal: str = "no endpoints registered") -> None:
        self.snapshot = snapshot
        self.strategy = strategy
        self.everyone = everyone
        self.candidates = candidates
        self.picker = picker
        self.epoch = epoch
        self.panic = panic
        self.refusal = refusal


class LoadBalancer:
    """Picks endpoints of services from a registry, one :class:`~tai_lb.Lease` per request.

    :param registry: where the endpoints come from; a new empty one when None.
    :param strategy: the strategy of every service without its own (default ``round_robin``):
        a name, a config dict, a :class:`~tai_lb.strategies.Strategy` or a function.
    :param config: per-service settings, as built by :meth:`from_config`.
    :param clock: monotonic clock in seconds, injectable for tests.
    """

    def __init__(self, registry: Optional[ServiceRegistry] = None,
                 strategy: StrategyLike = "round_robin", *,
                 config: Optional[LoadBalancerConfig] = None,
                 clock: Clock = time.monotonic) -> None:
        self.registry = registry if registry is not None else ServiceRegistry()
        self.config = config if config is not None else LoadBalancerConfig()
        self._default_strategy = resolve_strategy(strategy)
        self._clock = clock
        self._lock = threading.Lock()  # guards the tables below (never held while building)
        self._rebuild_locks: dict[str, threading.Lock] = {}
        self._routes: dict[str, _Route] = {}
        # Per service: the snapshot the members were last built for, the members (figures in
        # the snapshot's order) and their priority if they share one.  Rebuild lock held.
        self._members_cache: dict[str, tuple[ServiceSnapshot, tuple[EndpointStats, ...],
                                             Optional[int]]] = {}
        self._pickers: dict[str, tuple[Strategy, Picker]] = {}  # the last, per service
        # Figures of removed endpoints whose pools close once their leases are released.
        self._draining: set[EndpointStats] = set()
        self._stats: dict[str, dict[str, EndpointStats]] = {}
        self._service_load: dict[str, collections.deque[None]] = {}
        self._closed = False
        self._pools = EndpointPools()
        self._budgets: dict[str, RetryBudget] = {}
        self._health_epoch: dict[str, int] = {}
        self.breaker_transitions = 0
        self._active_group: dict[str, int] = {}
        self.failover_events: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        #: the StatsD export of state changes (does nothing unless ``metrics`` is configured)
        self.metrics = Metrics(self.config.metrics)
        self._health = HealthChecker(functools.partial(self._health_changed, source="health"),
                                     self._last_success, clock=clock)
        self._outliers = OutlierDetector(functools.partial(self._health_changed, source="outlier"),
                                         self._service_size, clock=clock)
        # Everything is built before anything starts (a provider is built without I/O), and a
        # failure while starting closes what started: a construction that fails leaves no
        # thread, socket or file open.
        self._watchers: dict[str, DiscoveryWatcher] = {
            name: DiscoveryWatcher(name, service.discovery.provider(name),
                                   service.discovery.watch,
                                   functools.partial(self._apply_discovered, name),
                                   functools.partial(self._discovered, name), clock)
            for name, service in self.config.services.items() if service.discovery is not None}
        self._subscription = self.registry.subscribe_batches(self._on_changes)
        _forksafe.after_fork_in_child(self, LoadBalancer._reset_after_fork)
        try:
            self.metrics.start()  # first: it resolves the StatsD host, a ConfigError if it fails
            for name, service in self.config.services.items():
                self.registry.add_service(name)
                if service.endpoints or service.backups:
                    self.registry.register_many(name, (*service.endpoints, *service.backups))
                self._sync_health(name)
            for watcher in self._watchers.values():
                watcher.start()
            if any(s.health_check is not None for s in self.config.services.values()):
                self._health.start()
        except BaseException:
            self.close()
            raise

    def _apply_discovered(self, service: str, endpoints: Sequence[Endpoint]) -> None:
        """Make a discovery answer the service's endpoints, its configured backups kept after
        them (in priority, and out of the answer's reach)."""
        backups = self.config.services[service].backups
        if backups:
            primaries = self.config.services[service].endpoints
            configured_after = max((e.priority for e in primaries), default=0) + 1
            after = max((e.priority for e in endpoints), default=0) + 1
            taken = {e.address for e in endpoints}
            endpoints = [*endpoints, *(
                b.replace(priority=min(1000, after + b.priority - configured_after))
                for b in backups if b.address not in taken)]
        self.registry.set_endpoints(service, endpoints)

    def _discovered(self, service: str) -> list[Endpoint]:
        """The service's endpoints but its configured backups (what discovery answers for)."""
        backups = {b.address for b in self.config.services[service].backups}
        return [e for e in self.registry.endpoints(service) if e.address not in backups]

    def _reset_after_fork(self) -> None:
        # What is replaced here is kept, never freed (see _forksafe): freeing the parent's
        # pools would empty their queues under locks a parent's thread may have held.
        _forksafe.inherited(self._lock, self._rebuild_locks, self._routes, self._pickers)
        # A lock held by another thread at the fork stays held in the child: replace them all.
        self._lock = threading.Lock()
        self._rebuild_locks = {}
        # A picker may step under a lock of its own (a long weighted_round_robin period): the
        # child builds new ones rather than pick with one a parent's thread may have held.
        self._routes = {}
        self._pickers = {}
        for table in self._stats.values():
            for stats in table.values():
                _forksafe.inherited(stats._lock)
                stats._lock = threading.Lock()
        # The parent's connections must not be shared: the child starts with no pools.
        self._pools = self._pools.for_child()
        for budget in self._budgets.values():
            _forksafe.inherited(budget._lock)
            budget._lock = threading.Lock()
        for table in self._stats.values():
            for stats in table.values():
                if stats.breaker is not None:
                    stats.breaker._reset_after_fork()

    @classmethod
    def from_config(cls, source: Union[Mapping[str, Any], str, os.PathLike[str],
                                       LoadBalancerConfig], *,
                    registry: Optional[ServiceRegistry] = None,
                    clock: Clock = time.monotonic) -> LoadBalancer:
        """Build a balancer from a config dict or a JSON, TOML or YAML file.

        Every key is checked here; a bad one raises :class:`~tai_lb.ConfigError`.
        """
        return cls(registry, config=load_config(source), clock=clock)

    # -- picking ------------------------------------------------------------------------------

    def pick(self, service: str, key: Optional[RoutingKey] = None, *,
             exclude: Collection[str] = ()) -> Lease:
        """Pick an endpoint of ``service`` and return its open :class:`~tai_lb.Lease`.

        :param key: the request's routing key (used by ``consistent_hash``).
        :param exclude: addresses not to pick while any other endpoint remains (retries use it
            to go to a different endpoint).
        :raises UnknownService: the service was never configured nor registered.
        :raises NoEndpointAvailable: the service has no endpoint to pick.
        """
        snapshot = self.registry._snapshots.get(service)
        route = self._routes.get(service)
        if route is None or route.snapshot is not snapshot:
            route = self._rebuild(service)
        picker = route.picker
        if picker is None:
            raise NoEndpointAvailable(service, route.refusal)
        stats = picker(key)
        if exclude and stats.endpoint.address in exclude:
            stats = self._pick_excluding(route, key, exclude, stats)
        breaker = stats.breaker
        if breaker is None:
            return Lease(service, stats, key)
        ticket = breaker.admit()
        if ticket is None:
            stats, ticket = self._pick_admitted(service, route, key, exclude, stats)
        return Lease(service, stats, key, ticket)

    def _pick_admitted(self, service: str, route: _Route, key: Optional[RoutingKey],
                       exclude: Collection[str], refused: EndpointStats,
                       ) -> tuple[EndpointStats, int]:
        """Another endpoint (and its breaker ticket) when the picked one's breaker refuses."""
        rejected = {refused.endpoint.address}
        candidates = route.candidates
        while len(rejected) < len(candidates):
            skip = set(exclude) | rejected
            if len(skip) >= len(candidates):
                skip = rejected  # the excluded ones are all that is left: they may do
            stats = self._pick_excluding(route, key, skip, refused)
            if stats.endpoint.address in rejected:
                break
            ticket = stats.breaker.admit() if stats.breaker is not None else 0
            if ticket is not None:
                return stats, ticket
            rejected.add(stats.endpoint.address)
        # Every breaker of the group in use refuses: any other endpoint (the next priority
        # groups, backups) beats refusing the request.
        for stats in sorted(route.everyone, key=lambda s: s.endpoint.priority):
            if stats.endpoint.address in rejected or stats in candidates:
                continue
            ticket = stats.breaker.admit() if stats.breaker is not None else 0
            if ticket is not None:
                return stats, ticket
            rejected.add(stats.endpoint.address)
        raise NoEndpointAvailable(service, f"{len(rejected)} of {len(route.everyone)} circuit "
                                           "breakers open")

    def _pick_excluding(self, route: _Route, key: Optional[RoutingKey],
                        exclude: Collection[str], first: EndpointStats) -> EndpointStats:
        picker = route.picker
        assert picker is not None
        own = getattr(picker, EXCLUDING, None)
        if own is not None:
            chosen: Optional[EndpointStats] = own(key, exclude)
            return chosen if chosen is not None else first
        for _ in range(3):  # the strategy's own choice, when it soon lands elsewhere
            stats = picker(key)
            if stats.endpoint.address not in exclude:
                return stats
        remaining = [c for c in route.candidates if c.endpoint.address not in exclude]
        if not remaining:
            return first  # everything was tried: another try on one of them beats failing
        # Few remain (retries exclude one endpoint per attempt): weighted at random among them,
        # without preparing strategy state for a single pick.
        return random.choices(remaining, weights=[c.endpoint.weight for c in remaining])[0]

    def _rebuild(self, service: str, *, picking: bool = True) -> _Route:
        if self._closed and picking:
            raise LoadBalancerError("the load balancer is closed")
        # One lock per service: a slow rebuild (a big hash ring) never holds up other services.
        lock = self._rebuild_locks.get(service)
        if lock is None:
            with self._lock:
                lock = self._rebuild_locks.setdefault(service, threading.Lock())
        with lock:
            while True:
                epoch = self._health_epoch.get(service, 0)
                route = self._build_route(service, epoch)
                if self._health_epoch.get(service, 0) == epoch:
                    return route
                # Health changed while the route was built: build it again.

    def _build_route(self, service: str, epoch: int) -> _Route:
        # Called with the service's rebuild lock held.
        snapshot = self.registry._snapshots.get(service)
        if snapshot is None:
            raise UnknownService(service)
        route = self._routes.get(service)
        if route is not None and route.snapshot is snapshot and route.epoch == epoch:
            return route  # another thread rebuilt it meanwhile
        strategy = self._strategy_for(service)
        everyone, priority = self._members(service, snapshot, strategy)
        pickable, panic, refusal = self._healthy_subset(service, everyone, priority)
        picker = self._prepare(service, strategy, pickable) if pickable else None
        route = _Route(snapshot, strategy, everyone, pickable, picker, epoch, panic, refusal)
        with self._lock:  # close() clears the routes under this lock: never store one after
            if not self._closed:
                self._routes[service] = route
        return route

    def _prepare(self, service: str, strategy: Strategy,
                 candidates: tuple[EndpointStats, ...]) -> Picker:
        # Called with the service's rebuild lock held.  The strategy may update what its last
        # picker for this service prepared (a hash ring) rather than start over.
        last = self._pickers.get(service)
        if last is not None and last[0] is strategy:
            picker = strategy.prepare_next(candidates, last[1])
        else:
            picker = strategy.prepare(candidates)
        self._pickers[service] = (strategy, picker)
        return picker

    def _members(self, service: str, snapshot: ServiceSnapshot, strategy: Strategy,
                 ) -> tuple[tuple[EndpointStats, ...], Optional[int]]:
        """Every endpoint's figures, in the snapshot's order, and their priority if only one.

        Called with the service's rebuild lock held.  Figures are kept per address, so in-flight
        counts and latency averages survive topology changes.  When the snapshot records how it
        differs from the one the members were last built for (a register(), deregister() or
        small update), only the endpoints that came, went or changed are looked at; otherwise
        the whole set is, in C (maps and set differences over the snapshot).
        """
        with self._lock:
            known = self._stats.setdefault(service, {})
            load = self._service_load.setdefault(service, collections.deque())
        table = snapshot._table
        last = self._members_cache.get(service)
        delta = snapshot._delta
        if last is not None and last[0] is snapshot:
            return last[1], last[2]  # a rebuild for a change of health: the same members
        if last is not None and delta is not None and delta.base == last[0].generation:
            everyone, priority = last[1], last[2]
            if delta.removed:
                gone = {known.get(address) for address in delta.removed}
                everyone = tuple(itertools.filterfalse(gone.__contains__, everyone))
            self._add_stats(service, [a for a in delta.added if a not in known], table, known,
                            strategy, load)
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
                    del known[address]
        else:
            self._add_stats(service, list(itertools.filterfalse(known.__contains__, table)),
                            table, known, strategy, load)
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
            # requests in flight at an earlier rebuild included).
            for address in known.keys() - table.keys():
                if not known[address].in_flight:
                    del known[address]
        self._members_cache[service] = (snapshot, everyone, priority)
        return everyone, priority

    def _add_stats(self, service: str, addresses: list[str], table: Mapping[str, Endpoint],
                   known: dict[str, EndpointStats], strategy: Strategy,
                   load: collections.deque[None]) -> None:
        """Create the figures (and breakers) of endpoints new to the service."""
        if not addresses:
            return
        breakers = self._service_setting(service, "circuit_breaker")
        outliers = self._outlier_config(service)
        decay = getattr(strategy, "decay", DEFAULT_DECAY)
        default_latency = getattr(strategy, "default_latency", DEFAULT_LATENCY)
        clock = self._clock
        for address in addresses:
            stats = EndpointStats(table[address], clock, decay=decay,
                                  default_latency=default_latency, service_load=load)
            if breakers is not None:
                stats.breaker = EndpointBreaker(f"{service}/{address}", breakers,
                                                functools.partial(self._breaker_changed, service),
                                                self._clock)
            if outliers is not None:
                stats.on_failure = functools.partial(self._outliers.report_failure, service,
                                                     config=outliers)
            known[address] = stats

    def _healthy_subset(self, service: str, everyone: tuple[EndpointStats, ...],
                        priority: Optional[int] = None,
                        ) -> tuple[tuple[EndpointStats, ...], bool, str]:
        """The endpoints picks may choose from, whether that is panic mode, and why not."""
        if not everyone:
            return (), False, "no endpoints registered"
        checks = self._health_config(service)
        watched = checks is not None or self._outlier_config(service) is not None
        # Failed checks or ejected: usually none, so a healthy service is never filtered.
        unusable = (self._health.unhealthy(service) | self._outliers.ejected(service)
                    if watched else frozenset())
        if priority is None:  # several priority groups (or not known)
            groups = self._priority_groups(everyone)
            if len(groups) > 1:
                everyone = self._choose_group(service, groups, unusable)
        if not unusable:
            return everyone, False, ""
        healthy = tuple(s for s in everyone if s.endpoint.address not in unusable)
        if len(healthy) == len(everyone):
            return healthy, False, ""
        threshold = checks.panic_threshold if checks is not None else 0.5
        if len(healthy) < threshold * len(everyone):
            # Panic: too few healthy endpoints to carry the load; spread it over all of them
            # rather than overload the few (Envoy's healthy_panic_threshold).
            return everyone, True, ""
        if not healthy:
            return (), False, (f"{len(everyone)} of {len(everyone)} unhealthy "
                               "(panic mode is off)")
        return healthy, False, ""

    @staticmethod
    def _priority_groups(everyone: tuple[EndpointStats, ...],
                         ) -> list[tuple[int, tuple[EndpointStats, ...]]]:
        priorities = set(map(_priority_of, everyone))
        if len(priorities) == 1:
            return [(priorities.pop(), everyone)]
        groups: dict[int, list[EndpointStats]] = {}
        for stats in everyone:
            groups.setdefault(stats.endpoint.priority, []).append(stats)
        return [(priority, tuple(groups[priority])) for priority in sorted(groups)]

    def _choose_group(self, service: str, groups: list[tuple[int, tuple[EndpointStats, ...]]],
                      unusable: Collection[str]) -> tuple[EndpointStats, ...]:
        """The priority group traffic goes to, with hysteresis between failover and failback.

        The current group keeps the traffic while its usable share is at least
        ``failover_below``; a lower-priority group takes it over on the same condition; a
        higher-priority group takes it back only once its share reaches ``failback_at``.  When no
        group qualifies, the one with the largest usable share does.
        """
        policy = self.service_config(service).failover
        shares = [sum(1 for s in members if s.endpoint.address not in unusable) / len(members)
                  for _, members in groups]
        priorities = [priority for priority, _ in groups]
        current = self._active_group.get(service, priorities[0])
        current_index = priorities.index(current) if current in priorities else 0
        chosen = None
        for index, share in enumerate(shares):
            need = policy.failback_at if index < current_index else policy.failover_below
            if share >= need:
                chosen = index
                break
        if chosen is None:
            chosen = max(range(len(groups)), key=lambda i: (shares[i], -i))
        priority = priorities[chosen]
        if priority != current:
            self._active_group[service] = priority
            kind = "failback" if priority < current else "failover"
            event = {"service": service, "kind": kind, "from_priority": current,
                     "to_priority": priority, "usable_shares": [round(s, 3) for s in shares],
                     "at": round(self._clock(), 3)}
            self.failover_events.append(event)
            self.metrics.count(service, kind)
            log.warning("tai-lb: %s %s from priority %d to %d (usable shares %s)", service,
                        kind, current, priority, event["usable_shares"])
        return groups[chosen][1]

    def _strategy_for(self, service: str) -> Strategy:
        settings = self.config.services.get(service)
        return settings.strategy if settings is not None else self._default_strategy

    def service_config(self, service: str) -> ServiceConfig:
        """The settings of ``service`` (defaults if it was registered from Python)."""
        if service not in self.registry:
            raise UnknownService(service)
        settings = self.config.services.get(service)
        return settings if settings is not None else ServiceConfig(strategy=self._default_strategy)

    # -- HTTP -------------------------------------------------------------------------------------

    def session(self) -> requests.Session:
        """A :class:`requests.Session` whose ``http(s)://<service>/`` requests are balanced.

        Any other host passes through as with plain requests.  Sessions share this balancer's
        connection pools; make as many as you like (one per thread is the usual pattern).
        """
        session = requests.Session()
        adapter = self.adapter()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def adapter(self) -> LoadBalancedAdapter:
        """A :class:`~tai_lb.LoadBalancedAdapter` for this balancer, to mount on a session."""
        from .adapter import LoadBalancedAdapter  # noqa: PLC0415 - adapter imports balancer

        return LoadBalancedAdapter(self)

    # -- health -----------------------------------------------------------------------------------

    def _health_config(self, service: str) -> Optional[HealthCheckConfig]:
        settings = self.config.services.get(service)
        return settings.health_check if settings is not None else None

    def _sync_health(self, service: str) -> None:
        """Make the checked set of ``service`` its current endpoints (changes then follow).

        A change delivered between reading the snapshot and setting it would be undone by the
        older set, and the checker only follows changes from then on: read and set again until
        the snapshot set is still the current one.
        """
        checks = self._health_config(service)
        if checks is None:
            return
        scheme = self.config.services[service].scheme
        snapshot = self.registry.get_snapshot(service)
        while snapshot is not None:
            self._health.set_endpoints(service, snapshot.endpoints, checks, scheme)
            current = self.registry.get_snapshot(service)
            if current is snapshot:
                return
            snapshot = current

    def _health_changed(self, service: str, source: Optional[str] = None) -> None:
        # Called by the checker or the outlier detector, outside their locks: the next pick
        # builds a route on the new health.
        with self._lock:
            self._health_epoch[service] = self._health_epoch.get(service, 0) + 1
            self._routes.pop(service, None)
        if source is not None:
            self.metrics.count(service, f"{source}.changed")

    def _service_setting(self, service: str, name: str) -> Any:
        settings = self.config.services.get(service)
        return getattr(settings, name) if settings is not None else None

    def _breaker_changed(self, service: str, old: str, new: str) -> None:
        self.breaker_transitions += 1
        self.metrics.count(service, f"breaker.{new.replace('-', '_')}")

    def _outlier_config(self, service: str) -> Optional[OutlierConfig]:
        settings = self.config.services.get(service)
        return settings.outlier_detection if settings is not None else None

    def _service_size(self, service: str) -> int:
        snapshot = self.registry.get_snapshot(service)
        return len(snapshot) if snapshot is not None else 0

    def _last_success(self, service: str, address: str) -> Optional[float]:
        stats = self._stats.get(service, {}).get(address)
        return stats.last_success if stats is not None else None

    def retry_budget(self, service: str) -> RetryBudget:
        """The retry budget of ``service`` (created on first use)."""
        budget = self._budgets.get(service)
        if budget is None:
            with self._lock:
                budget = self._budgets.get(service)
                if budget is None:
                    policy = self.service_config(service).retries
                    budget = RetryBudget.for_policy(policy, self._clock)
                    self._budgets[service] = budget
        return budget

    def strategy_name(self, service: str) -> str:
        """The name of the strategy ``service`` uses."""
        return self._strategy_for(service).name

    def _on_changes(self, changes: Sequence[TopologyChange]) -> None:
        # The registry hands over every change of a write in one list, so what is per service
        # (the health checker's lock, the other services' tables) is done once per list.
        service = changes[0].service
        if all(map(operator.eq, map(_service_of, changes), itertools.repeat(service))):
            self._apply_changes(service, changes)
            return
        by_service: dict[str, list[TopologyChange]] = {}
        for change in changes:
            by_service.setdefault(change.service, []).append(change)
        for name, group in by_service.items():
            self._apply_changes(name, group)

    def _apply_changes(self, service: str, changes: Sequence[TopologyChange]) -> None:
        """Health targets, outlier state, pools and draining for changes to one service.

        Whole lists at a time, in C where it can (a full update of 10,000 endpoints is one list
        of as many changes); one change at a time, in order, only when an address went and came
        back within the list.
        """
        checks = self._health_config(service)
        if checks is not None:
            settings = self.config.services[service]
            self._health.apply_changes(service, changes, checks, settings.scheme)
        table = self._stats.get(service, {})
        kinds = list(map(_kind_of, changes))
        # An addition matters only to an endpoint that drains, or may start to drain here
        # (one with requests in flight): its pools stay.  Usually neither is the case.
        in_flight = bool(self._service_load.get(service))
        added: list[str] = []
        if table and "added" in kinds and (in_flight or self._draining):
            added = list(map(_address_of, itertools.compress(
                changes, map(operator.eq, kinds, itertools.repeat("added")))))
        if "removed" in kinds:
            going = list(map(_endpoint_of, itertools.compress(
                changes, map(operator.eq, kinds, itertools.repeat("removed")))))
            gone = list(map(_endpoint_address, going))
            if added and in_flight and not set(gone).isdisjoint(added):
                self._apply_in_order(service, changes, table)  # gone and back: order matters
                return
            self._remove_endpoints(service, going, gone, table)
        if added and self._draining:
            # Removed earlier and back before it drained: its pools stay.
            for stats in filter(None, map(table.get, added)):
                self._keep_pools(stats)

    def _remove_endpoints(self, service: str, going: list[Endpoint], gone: list[str],
                          table: dict[str, EndpointStats]) -> None:
        self._outliers.forget_many(service, gone)
        others = [snapshot._table for name, snapshot in self.registry._snapshots.items()
                  if name != service]
        if others:  # another service still sends to these addresses: their pools stay
            going = [e for e in going if not any(e.address in other for other in others)]
        if self._service_load.get(service):  # requests in flight somewhere in the service
            draining: set[str] = set()
            for endpoint, stats in zip(going, map(table.get, map(_endpoint_address, going))):
                if stats is not None and stats._in_flight:
                    # Drain: requests in flight finish, then the pools close (at once if the
                    # last one ended meanwhile).
                    stats.when_drained(self._closer(endpoint, stats))
                    draining.add(endpoint.address)
            if draining:
                going = [e for e in going if e.address not in draining]
        self._pools.close_endpoints(map(_host_port_of, going))

    def _apply_in_order(self, service: str, changes: Sequence[TopologyChange],
                        table: dict[str, EndpointStats]) -> None:
        """_apply_changes(), one change at a time: an address went and came back in the list."""
        for change in changes:
            if change.kind == "removed":
                self._remove_endpoints(service, [change.endpoint], [change.endpoint.address],
                                       table)
            elif change.kind == "added":
                stats = table.get(change.endpoint.address)
                if stats is not None:
                    self._keep_pools(stats)

    def _closer(self, endpoint: Endpoint, stats: EndpointStats) -> Callable[[], None]:
        """What closes a removed endpoint's pools once its last lease is released."""
        def close_pools() -> None:
            self._draining.discard(stats)
            self._pools.close_endpoint(endpoint.host, endpoint.port)

        self._draining.add(stats)
        return close_pools

    def _keep_pools(self, stats: EndpointStats) -> None:
        # Back before it drained: its pools stay.
        stats.on_drained = None
        self._draining.discard(stats)

    # -- inspection -----------------------------------------------------------------------------

    def stats(self, service: str) -> dict[str, EndpointStats]:
        """The live figures of each current endpoint of ``service``, by address."""
        route = self._route(service)
        return {c.endpoint.address: c for c in route.everyone}

    def _route(self, service: str) -> _Route:
        route = self._routes.get(service)
        if route is None or route.snapshot is not self.registry._snapshots.get(service):
            route = self._rebuild(service, picking=False)
        return route

    def status(self) -> dict[str, Any]:
        """Every service's endpoints with their figures, as a JSON-serialisable dict."""
        services: dict[str, Any] = {}
        for name in self.registry.services():
            route = self._route(name)
            endpoints: dict[str, Any] = {}
            for stats in route.everyone:
                endpoint = stats.endpoint
                entry = endpoint.to_dict()
                del entry["address"]
                if stats.breaker is not None:
                    entry["breaker"] = stats.breaker.snapshot()
                outlier = self._outliers.state(name, endpoint.address)
                if outlier is not None:
                    entry["outlier"] = outlier
                health = self._health.health(name, endpoint.address)
                if health is None:
                    entry["health"] = "unchecked"
                else:
                    entry["health"] = "healthy" if health.healthy else "unhealthy"
                    entry["health_checks"] = health.to_dict()
                entry.update(stats.snapshot())
                endpoints[endpoint.address] = entry
            budget = self._budgets.get(name)
            watcher = self._watchers.get(name)
            services[name] = {
                "discovery": watcher.snapshot() if watcher is not None else None,
                "retry_budget": budget.snapshot() if budget is not None else None,
                "strategy": route.strategy.name,
                "strategy_options": route.strategy.options(),
                "endpoints_total": len(route.everyone),
                "endpoints_pickable": len(route.candidates),
                "panic": route.panic,
                "active_priority": self._active_group.get(
                    name, min((s.endpoint.priority for s in route.everyone), default=0)),
                "in_flight": len(self._service_load.get(name, ())),
                "endpoints": endpoints,
            }
        return {"closed": self._closed, "failover_events": list(self.failover_events),
                "metrics": self.metrics.snapshot(),
                "health_checker": self._health.snapshot(),
                "outlier_detection": self._outliers.snapshot(),
                "services": services}

    # -- life cycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the balancer: later picks raise `LoadBalancerError`.  Safe to call twice."""
        with self._lock:
            already, self._closed = self._closed, True
            self._routes.clear()  # picks now take the slow path, which refuses
            self._members_cache.clear()
            self._pickers.clear()
        if not already:
            self._subscription.unsubscribe()
            for watcher in self._watchers.values():
                watcher.stop()
            self._health.stop()
            self._outliers.stop()
            self._pools.close()
            self.metrics.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def __reduce__(self) -> tuple[Any, ...]:
        # Locks, threads and sockets cannot cross processes: what pickles is the recipe (the
        # configuration, every service's endpoints and the default strategy), and unpickling
        # builds a new balancer from it, with its own threads and pools.  A pickled
        # requests.Session with a balanced adapter therefore keeps balancing.
        endpoints = {name: self.registry.endpoints(name) for name in self.registry.services()}
        return (_restore, (self.config, endpoints, self._default_strategy))

    def __enter__(self) -> LoadBalancer:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<LoadBalancer services={list(self.registry.services())} {state}>"


def _restore(config: LoadBalancerConfig, endpoints: Mapping[str, Any],
             strategy: Strategy) -> LoadBalancer:
    registry = ServiceRegistry()
    for name, items in endpoints.items():
        registry.add_service(name)
        registry.register_many(name, items)
    return LoadBalancer(registry, strategy, config=config)
