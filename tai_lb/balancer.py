"""`LoadBalancer`: picks an endpoint of a service for each request.

The balancer is the face: construction, pick, session, status, close.  Routing is a chain of
stages per service (:mod:`tai_lb.routing`) whose route is built whenever the service changes, on
the thread that changed it, and published whole; the pick path takes no lock::

    pick(service, key) -> the service's published route -> selectors, then the strategy's picker
                       -> breaker admission -> Lease (counts in flight until released)

A pick never waits for a build, except the very first of a service.  While a newer registry
snapshot is being built into a route, picks go on with the last route and refuse any endpoint the
registry has removed, so a pick that starts after ``deregister()`` returns never gets it.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import requests

from . import _forksafe
from ._status import balancer_status
from .config import LoadBalancerConfig, ServiceConfig, load_config
from .discovery import DiscoveryWatcher
from .endpoint import Endpoint
from .exceptions import LoadBalancerError, NoEndpointAvailable, UnknownService
from .failover import EndpointBreaker
from .health import HealthCheckConfig, HealthChecker
from .lease import Lease
from .metrics import Metrics
from .outlier import OutlierDetector
from .pool import EndpointPools
from .registry import ServiceRegistry, TopologyChange
from .retry import RetryBudget
from .routing import Route, ServiceRouting
from .stats import DEFAULT_DECAY, DEFAULT_LATENCY, EndpointStats
from .strategies import EXCLUDING, RoutingKey, Strategy, StrategyLike, resolve_strategy
from .topology import TopologyFollower

if TYPE_CHECKING:
    from .adapter import LoadBalancedAdapter

__all__ = ["LoadBalancer"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]


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
        self.clock = clock
        self._lock = threading.Lock()  # guards the tables below (never held while building)
        self._services: dict[str, ServiceRouting] = {}
        self._closed = False
        self._pools = EndpointPools()
        self._budgets: dict[str, RetryBudget] = {}
        self.breaker_transitions = 0
        self.failover_events: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        #: the StatsD export of state changes (does nothing unless ``metrics`` is configured)
        self.metrics = Metrics(self.config.metrics)
        self._health = HealthChecker(functools.partial(self._health_changed, source="health"),
                                     self._last_success, clock=clock)
        self._outliers = OutlierDetector(functools.partial(self._health_changed, source="outlier"),
                                         self._service_size, clock=clock)
        self.topology = TopologyFollower(self.registry, self._health, self._outliers,
                                         lambda: self._pools, self._checks, self._figures)
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
        routing = self._services.get(service)
        if routing is None:
            routing = self._routing(service)
        route = routing.router.route or routing.router.current()
        snapshot = self.registry.get_snapshot(service)
        # A newer set may be being built into a route: this one may still hold endpoints the
        # registry has removed (checked below).  Build now only when it has nothing to offer.
        if route.snapshot is not snapshot and route.picker is None and snapshot:
            route = routing.router.fresh()
        picker = route.picker
        if picker is None:
            raise NoEndpointAvailable(service, route.refusal)
        stats = picker(key)
        if exclude and stats.endpoint.address in exclude:
            stats = self._pick_excluding(route, key, exclude, stats)
        if route.snapshot is not snapshot and snapshot is not None \
                and stats.endpoint.address not in snapshot.by_address:
            return self._pick_fresh(routing, service, key, exclude)
        breaker = stats.breaker
        if breaker is None:
            return Lease(service, stats, key)
        ticket = breaker.admit()
        if ticket is None:
            stats, ticket = self._pick_admitted(service, route, key, exclude, stats)
        return Lease(service, stats, key, ticket)

    def _pick_fresh(self, routing: ServiceRouting, service: str, key: Optional[RoutingKey],
                    exclude: Collection[str]) -> Lease:
        """A pick that landed on a removed endpoint: wait for the current route, pick there."""
        route = routing.router.fresh()
        if route.picker is None:
            raise NoEndpointAvailable(service, route.refusal)
        stats = route.picker(key)
        if exclude and stats.endpoint.address in exclude:
            stats = self._pick_excluding(route, key, exclude, stats)
        ticket = stats.breaker.admit() if stats.breaker is not None else 0
        if ticket is None:
            stats, ticket = self._pick_admitted(service, route, key, exclude, stats)
        return Lease(service, stats, key, ticket)

    def _pick_admitted(self, service: str, route: Route, key: Optional[RoutingKey],
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

    @staticmethod
    def _pick_excluding(route: Route, key: Optional[RoutingKey], exclude: Collection[str],
                        first: EndpointStats) -> EndpointStats:
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

    # -- routes -------------------------------------------------------------------------------

    def _routing(self, service: str, *, picking: bool = True) -> ServiceRouting:
        """The service's routing, made on first use."""
        if self._closed and picking:
            raise LoadBalancerError("the load balancer is closed")
        if service not in self.registry:
            raise UnknownService(service)
        with self._lock:
            routing = self._services.get(service)
            if routing is None:
                settings = self.service_config(service)
                routing = ServiceRouting(
                    service, settings, settings.strategy,
                    functools.partial(self.registry.get_snapshot, service),
                    functools.partial(self._new_stats, service, settings),
                    self._unusable_sources(service, settings),
                    functools.partial(self._failover_changed, service))
                if not self._closed:  # close() empties the table under this lock
                    self._services[service] = routing
        return routing

    def route(self, service: str) -> Route:
        """The route of ``service`` for the registry's current endpoints (for inspection: it
        waits for a build in progress, which a pick never does)."""
        return self._routing(service, picking=False).router.fresh()

    def _new_stats(self, service: str, settings: ServiceConfig, endpoint: Endpoint,
                   load: collections.deque[None]) -> EndpointStats:
        """The figures (and breaker) of an endpoint new to the service."""
        strategy = settings.strategy
        stats = EndpointStats(endpoint, self.clock,
                              decay=getattr(strategy, "decay", DEFAULT_DECAY),
                              default_latency=getattr(strategy, "default_latency",
                                                      DEFAULT_LATENCY),
                              service_load=load)
        if settings.circuit_breaker is not None:
            stats.breaker = EndpointBreaker(f"{service}/{endpoint.address}",
                                            settings.circuit_breaker,
                                            functools.partial(self._breaker_changed, service),
                                            self.clock)
        if settings.outlier_detection is not None:
            stats.on_failure = functools.partial(self._outliers.report_failure, service,
                                                 config=settings.outlier_detection)
        return stats

    def _unusable_sources(self, service: str, settings: ServiceConfig,
                          ) -> tuple[Callable[[], AbstractSet[str]], ...]:
        sources: list[Callable[[], AbstractSet[str]]] = []
        if settings.health_check is not None:
            sources.append(functools.partial(self._health.unhealthy, service))
        if settings.outlier_detection is not None:
            sources.append(functools.partial(self._outliers.ejected, service))
        return tuple(sources)

    def _failover_changed(self, service: str, kind: str, before: int, after: int,
                          shares: list[float]) -> None:
        event = {"service": service, "kind": kind, "from_priority": before,
                 "to_priority": after, "usable_shares": shares, "at": round(self.clock(), 3)}
        self.failover_events.append(event)
        self.metrics.count(service, kind)
        log.warning("tai-lb: %s %s from priority %d to %d (usable shares %s)", service, kind,
                    before, after, shares)

    def service_config(self, service: str) -> ServiceConfig:
        """The settings of ``service`` (defaults if it was registered from Python)."""
        if service not in self.registry:
            raise UnknownService(service)
        settings = self.config.services.get(service)
        return settings if settings is not None else ServiceConfig(strategy=self._default_strategy)

    def strategy_name(self, service: str) -> str:
        """The name of the strategy ``service`` uses."""
        return self.service_config(service).strategy.name

    # -- changes --------------------------------------------------------------------------------

    def _on_changes(self, changes: Sequence[TopologyChange]) -> None:
        # The registry hands over every change of a write in one list: apply them per service,
        # then build and publish each service's route here, off the request path.
        by_service: dict[str, list[TopologyChange]] = {}
        for change in changes:
            by_service.setdefault(change.service, []).append(change)
        for name, group in by_service.items():
            self.topology.apply(name, group)
            routing = self._services.get(name)
            if routing is not None:
                routing.router.update()

    def _health_changed(self, service: str, source: Optional[str] = None) -> None:
        # Called by the checker or the outlier detector, outside their locks: build the route
        # on the new health, on their thread.
        routing = self._services.get(service)
        if routing is not None:
            routing.router.update()
        if source is not None:
            self.metrics.count(service, f"{source}.changed")

    def _checks(self, service: str) -> Optional[tuple[HealthCheckConfig, str]]:
        settings = self.config.services.get(service)
        if settings is None or settings.health_check is None:
            return None
        return settings.health_check, settings.scheme

    def _figures(self, service: str,
                 ) -> Optional[tuple[dict[str, EndpointStats], collections.deque[None]]]:
        routing = self._services.get(service)
        return None if routing is None else (routing.members.figures, routing.members.load)

    def _sync_health(self, service: str) -> None:
        """Make the checked set of ``service`` its current endpoints (changes then follow).

        A change delivered between reading the snapshot and setting it would be undone by the
        older set, and the checker only follows changes from then on: read and set again until
        the snapshot set is still the current one.
        """
        checks = self._checks(service)
        if checks is None:
            return
        snapshot = self.registry.get_snapshot(service)
        while snapshot is not None:
            self._health.set_endpoints(service, snapshot.endpoints, *checks)
            current = self.registry.get_snapshot(service)
            if current is snapshot:
                return
            snapshot = current

    def _breaker_changed(self, service: str, old: str, new: str) -> None:
        self.breaker_transitions += 1
        self.metrics.count(service, f"breaker.{new.replace('-', '_')}")

    def _service_size(self, service: str) -> int:
        snapshot = self.registry.get_snapshot(service)
        return len(snapshot) if snapshot is not None else 0

    def _last_success(self, service: str, address: str) -> Optional[float]:
        routing = self._services.get(service)
        stats = routing.members.get(address) if routing is not None else None
        return stats.last_success if stats is not None else None

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

    @property
    def pools(self) -> EndpointPools:
        """The HTTP connection pools of every endpoint (a forked child gets new ones)."""
        return self._pools

    def retry_budget(self, service: str) -> RetryBudget:
        """The retry budget of ``service`` (created on first use)."""
        budget = self._budgets.get(service)
        if budget is None:
            with self._lock:
                budget = self._budgets.get(service)
                if budget is None:
                    policy = self.service_config(service).retries
                    budget = RetryBudget.for_policy(policy, self.clock)
                    self._budgets[service] = budget
        return budget

    # -- inspection -----------------------------------------------------------------------------

    def stats(self, service: str) -> dict[str, EndpointStats]:
        """The live figures of each current endpoint of ``service``, by address."""
        return {c.endpoint.address: c for c in self.route(service).everyone}

    @property
    def health_checker(self) -> HealthChecker:
        """The active health checks of every service (its threads run only when a service has
        ``health_check``)."""
        return self._health

    @property
    def outlier_detector(self) -> OutlierDetector:
        """The passive health checks of every service: ejections after failures of real traffic."""
        return self._outliers

    def watcher(self, service: str) -> Optional[DiscoveryWatcher]:
        """The discovery watcher of ``service``, or None when its endpoints are not discovered."""
        return self._watchers.get(service)

    def status(self) -> dict[str, Any]:
        """Every service's endpoints with their figures, as a JSON-serialisable dict."""
        services = {}
        for name in self.registry.services():
            routing = self._routing(name, picking=False)
            route = routing.router.fresh()
            active = routing.failover.active
            services[name] = balancer_status(
                route, self._health, self._outliers, self._budgets.get(name),
                self._watchers.get(name), active, routing.members.load)
        return {"closed": self._closed, "failover_events": list(self.failover_events),
                "metrics": self.metrics.snapshot(),
                "health_checker": self._health.snapshot(),
                "outlier_detection": self._outliers.snapshot(),
                "services": services}

    # -- life cycle -----------------------------------------------------------------------------

    def _reset_after_fork(self) -> None:
        # What is replaced here is kept, never freed (see _forksafe): freeing the parent's
        # pools would empty their queues under locks a parent's thread may have held.
        _forksafe.inherited(self._lock)
        self._lock = threading.Lock()
        for routing in self._services.values():
            routing.reset_after_fork()
        # The parent's connections must not be shared: the child starts with no pools.
        self._pools = self._pools.for_child()
        for budget in self._budgets.values():
            budget.reset_after_fork()

    def close(self) -> None:
        """Stop the balancer: later picks raise `LoadBalancerError`.  Safe to call twice."""
        with self._lock:
            already, self._closed = self._closed, True
            self._services.clear()  # picks now take the slow path, which refuses
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
