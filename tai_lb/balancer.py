"""`LoadBalancer`: picks an endpoint of a service for each request.

The balancer is the face: construction, pick, session, status, close.  Routing is a chain of
stages per service (:mod:`tai_lb.routing`) whose route is built whenever the service changes, on
the thread that changed it, and published whole; the pick path takes no lock::

    pick(service, key) -> the service's published route -> selectors, then the strategy's picker
                       -> breaker admission -> Lease (counts in flight until released)

A pick never waits for a build but a service's first; while a newer snapshot is being built, picks
use the last route and refuse endpoints the registry removed (never one after deregister(); in
manual rebalancing mode, never one after the rebalance() that applies the removal).
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import requests

from . import _forksafe
from ._status import balancer_status_all
from .config import LoadBalancerConfig, ServiceConfig, load_config
from .connpool import balanced_connection
from .discovery.backups import discovery_watchers
from .exceptions import LoadBalancerError, NoEndpointAvailable, UnknownService
from .health import HealthChecker
from .lease import Lease
from .metrics import Metrics
from .outlier import OutlierDetector
from .pool import EndpointPools
from .registry import ServiceRegistry, TopologyChange
from .retry import RetryBudget, RetryBudgets
from .routing import Route, ServiceRouting
from .routing.members import Membership, figures_factory
from .routing.picking import admitted, excluding, selected
from .routing.priority import FailoverEvents
from .stats import EndpointStats
from .strategies import RoutingKey, Strategy, StrategyLike, resolve_strategy
from .topology import TopologyFollower

if TYPE_CHECKING:
    from .adapter import LoadBalancedAdapter
    from .discovery.base import DiscoveryWatcher

__all__ = ["LoadBalancer"]

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
        self._defaults = ServiceConfig(strategy=resolve_strategy(strategy))  # made once
        self.clock = clock
        self._lock = threading.Lock()  # guards the tables below (never held while building)
        self._services: dict[str, ServiceRouting] = {}
        self._closed = False
        self._pools = EndpointPools()
        self._budgets = RetryBudgets(clock)
        self.breaker_transitions = 0
        #: the StatsD export (does nothing unless ``metrics`` is configured)
        self.metrics = Metrics(self.config.metrics, self)
        self._failovers = FailoverEvents(self.metrics, clock)
        #: the active health checks of every service (threads only when one has ``health_check``)
        self.health_checker = HealthChecker(
            functools.partial(self._health_changed, source="health"), self._last_success,
            clock=clock)
        #: the passive checks: ejections after failures of real traffic
        self.outlier_detector = OutlierDetector(
            functools.partial(self._health_changed, source="outlier"),
            lambda name: len(self.registry.get_snapshot(name) or ()), clock=clock)
        self.topology = TopologyFollower(self.registry, self.config, self.health_checker,
                                         self.outlier_detector, lambda: self._pools,
                                         self._members, self._health_changed, clock)
        # Everything is built before anything starts (a provider is built without I/O); a failure
        # while starting closes what started: no thread, socket or file is left open.
        self._watchers = discovery_watchers(self.config, self.registry, clock)
        self._subscription = self.registry.subscribe_batches(self._on_changes)
        _forksafe.after_fork_in_child(self, LoadBalancer._reset_after_fork)
        try:
            self.metrics.start()  # first: it resolves the StatsD host, a ConfigError if it fails
            for name, service in self.config.services.items():
                self.registry.add_service(name)
                if service.endpoints or service.backups:
                    self.registry.register_many(name, (*service.endpoints, *service.backups))
                self.topology.sync_health(name)
            for watcher in self._watchers.values():
                watcher.start()
            if any(s.health_check is not None for s in self.config.services.values()):
                self.health_checker.start()
            self.topology.rebalancer.mark_built(self.registry.get_snapshot)  # ramps from now
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

        :param key: the routing key (``consistent_hash``, ``maglev`` and affinity use it).
        :param exclude: addresses not to pick while any other endpoint remains (retries use it
            to go to a different endpoint).
        :raises UnknownService: the service was never configured nor registered.
        :raises NoEndpointAvailable: the service has no endpoint to pick.
        """
        routing = self._services.get(service)
        if routing is None:
            routing = self._routing(service)
        route = routing.route or routing.current()
        snapshot = (routing.rebalancing.applied or self.registry.snapshots).get(service)
        # A newer set may be being built into a route: this one may still hold endpoints the
        # registry has removed (checked below).  Build now only when it has nothing to offer.
        stale = route.snapshot is not snapshot
        if stale and route.picker is None and snapshot:
            route = routing.fresh()
        picker = route.picker
        if picker is None:
            raise NoEndpointAvailable(service, route.refusal)
        stats = picker(key) if not route.selectors else selected(route, key, exclude)
        if exclude and stats.endpoint.address in exclude:
            stats = excluding(route, key, exclude, stats)
        if stale and snapshot is not None and stats.endpoint.address not in snapshot.by_address:
            routing.fresh()  # landed on a removed endpoint: wait for the current route
            return self.pick(service, key, exclude=exclude)
        breaker = stats.breaker
        if breaker is None:
            return Lease(service, stats, key)
        ticket = breaker.admit()
        if ticket is None:
            stats, ticket = admitted(service, route, key, exclude, stats)
        return Lease(service, stats, key, ticket)

    # -- routes -------------------------------------------------------------------------------

    def _routing(self, service: str, *, picking: bool = True) -> ServiceRouting:
        """The service's routing, made on first use."""
        if self._closed and picking:
            raise LoadBalancerError("the load balancer is closed")
        settings = self.service_config(service)  # UnknownService for a name never seen
        with self._lock:
            routing = self._services.get(service)
            if routing is None:
                routing = ServiceRouting(
                    service, settings, functools.partial(self.registry.get_snapshot, service),
                    figures_factory(service, settings, self.clock, self.outlier_detector,
                                    functools.partial(self._breaker_changed, service),
                                    self.metrics.follow),
                    self.health_checker, self.outlier_detector, self._failovers, self.clock,
                    self.config.local_zone, self.topology.rebalancer.service(service))
                if not self._closed:  # close() empties the table under this lock
                    self._services[service] = routing
        return routing

    def route(self, service: str, *, wait: bool = True) -> Route:
        """The route of ``service`` for the registry's current endpoints, waiting for a build
        in progress (for inspection); with ``wait=False``, the route picks use now."""
        routing = self._routing(service, picking=False)
        return routing.fresh() if wait else routing.current()

    def service_config(self, service: str) -> ServiceConfig:
        """The settings of ``service`` (defaults if it was registered from Python)."""
        if service not in self.registry:
            raise UnknownService(service)
        settings = self.config.services.get(service)
        return settings if settings is not None else self._defaults

    def strategy_name(self, service: str) -> str:
        """The name of the strategy ``service`` uses."""
        return self.service_config(service).strategy.name

    # -- changes --------------------------------------------------------------------------------

    def _on_changes(self, changes: Sequence[TopologyChange]) -> None:
        # A write's changes (usually one service's), applied per run of one service, in order, in
        # C (10,000 changes a list); each route is built here, off the request path.
        for name, group in itertools.groupby(changes, key=operator.attrgetter("service")):
            self.topology.apply(name, list(group))
            routing = self._services.get(name)
            if routing is not None:
                routing.update()

    def rebalance(self, service: str) -> list[TopologyChange]:
        """Apply the changes manual mode held back; return them as
        :class:`~tai_lb.TopologyChange` (``sequence`` 0; none in the other modes).  Also ends
        drains past their timeout and rebuilds the route (slow-start ramps as of now)."""
        self.service_config(service)  # UnknownService for a name never seen
        return self.topology.rebalance(service)  # which builds the route, on this thread

    def _health_changed(self, service: str, source: Optional[str] = None) -> None:
        # Called by the checker or the outlier detector, outside their locks: build the route
        # on the new health, on their thread.
        routing = self._services.get(service)
        if routing is not None:
            routing.update()
        if source is not None:
            self.metrics.count(service, f"{source}.changed")

    def _breaker_changed(self, service: str, old: str, new: str) -> None:
        self.breaker_transitions += 1
        self.metrics.count(service, f"breaker.{new.replace('-', '_')}")

    def _members(self, service: str) -> Optional[Membership]:
        routing = self._services.get(service)
        return routing.members if routing is not None else None

    def _last_success(self, service: str, address: str) -> Optional[float]:
        stats = members.get(address) if (members := self._members(service)) else None
        return stats.last_success if stats is not None else None

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

    connection = balanced_connection  # a method: ``with lb.connection(service, factory) as conn:``

    @property
    def pools(self) -> EndpointPools:
        """The HTTP connection pools of every endpoint (a forked child gets new ones)."""
        return self._pools

    def retry_budget(self, service: str) -> RetryBudget:
        """The retry budget of ``service`` (created on first use)."""
        return self._budgets.get(service, lambda: self.service_config(service).retries)

    # -- inspection -----------------------------------------------------------------------------

    def stats(self, service: str) -> dict[str, EndpointStats]:
        """The live figures of each current endpoint of ``service``, by address."""
        return {c.endpoint.address: c for c in self.route(service).everyone}

    def watcher(self, service: str) -> Optional[DiscoveryWatcher]:
        """The discovery watcher of ``service``, or None when its endpoints are not discovered."""
        return self._watchers.get(service)

    def status(self) -> dict[str, Any]:
        """Every service's endpoints with their figures, as a JSON-serialisable dict."""
        return balancer_status_all(self, functools.partial(self._routing, picking=False),
                                   self._budgets.find, self._failovers.events)

    # -- life cycle -----------------------------------------------------------------------------

    def _reset_after_fork(self) -> None:
        # Replaced objects are kept, never freed (see _forksafe): their locks may be held.
        _forksafe.inherited(self._lock)
        self._lock = threading.Lock()
        for routing in self._services.values():
            routing.reset_after_fork()
        # The parent's connections must not be shared: the child starts with no pools.
        self._pools = self._pools.for_child()
        self._budgets.reset_after_fork()

    def close(self) -> None:
        """Stop the balancer: later picks raise `LoadBalancerError`.  Safe to call twice."""
        with self._lock:
            already, self._closed = self._closed, True
            routings, self._services = self._services, {}  # picks take the refusing slow path
        if not already:
            for routing in routings.values():
                routing.close()
            self._subscription.unsubscribe()
            self.topology.rebalancer.close()
            for watcher in self._watchers.values():
                watcher.stop()
            self.health_checker.stop()
            self.outlier_detector.stop()
            self._pools.close()
            self.topology.connection_pools.close()
            self.metrics.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def __reduce__(self) -> tuple[Any, ...]:
        # The recipe (configuration, endpoints, default strategy): a pickled session balances.
        endpoints = {name: self.registry.endpoints(name) for name in self.registry.services()}
        return (_restore, (self.config, endpoints, self._defaults.strategy))

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
