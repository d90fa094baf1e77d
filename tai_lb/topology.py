"""`TopologyFollower`: what the balancer does when a service's endpoints change, besides routing.

For every list of registry changes it updates the health checker's targets, forgets the outlier
state of removed endpoints, and closes their pools (HTTP, and the generic ``connection_pools``):
at once when nothing is in flight on them, or, when requests are still in flight, once the last
one ends (the endpoint drains: it gets no new picks, its requests finish, then its pools close).
An endpoint removed and added back before it drained keeps its pools.  A removed address that
another service still uses keeps its pools too.

Whole lists are handled at a time, in C where it can (a full update of 10,000 endpoints is one
list of as many changes); one change at a time, in order, only when an address went and came back
within the list.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Optional

from .connpool import EndpointConnectionPools
from .endpoint import Endpoint
from .stats import EndpointStats

if TYPE_CHECKING:
    from .config import LoadBalancerConfig
    from .health import HealthCheckConfig, HealthChecker
    from .outlier import OutlierDetector
    from .pool import EndpointPools
    from .registry import ServiceRegistry, TopologyChange
    from .routing.members import Membership

__all__ = ["TopologyFollower"]

_endpoint_of = operator.attrgetter("endpoint")
_address_of = operator.attrgetter("endpoint.address")
_kind_of = operator.attrgetter("kind")
_endpoint_address = operator.attrgetter("address")
_host_port_of = operator.attrgetter("host", "port")


class TopologyFollower:
    """Applies a service's topology changes to health checks, outlier state and pools.

    :param registry: the registry the changes come from (to see which addresses other services
        still use).
    :param config: the balancer's settings (which services have health checks).
    :param health: the active health checker.
    :param outliers: the outlier detector.
    :param pools: returns the balancer's current HTTP pools (a forked child gets new ones).
    :param members: a service's figures (its membership stage), or None before its first route.
    """

    def __init__(self, registry: ServiceRegistry, config: LoadBalancerConfig,
                 health: HealthChecker, outliers: OutlierDetector,
                 pools: Callable[[], EndpointPools],
                 members: Callable[[str], Optional[Membership]]) -> None:
        self._registry = registry
        self._config = config
        self._health = health
        self._outliers = outliers
        self._pools = pools
        self._members = members
        #: the generic pools of ``LoadBalancer.connection()``, closed here as HTTP pools are
        self.connection_pools = EndpointConnectionPools()
        #: figures of removed endpoints whose pools close once their last lease is released
        self.draining: set[EndpointStats] = set()

    def checks(self, service: str) -> Optional[tuple[HealthCheckConfig, str]]:
        """The health-check settings and scheme of ``service``, or None when unchecked."""
        settings = self._config.services.get(service)
        if settings is None or settings.health_check is None:
            return None
        return settings.health_check, settings.scheme

    def sync_health(self, service: str) -> None:
        """Make the checked set of ``service`` its current endpoints (changes then follow).

        A change delivered between reading the snapshot and setting it would be undone by the
        older set, and the checker only follows changes from then on: read and set again until
        the snapshot set is still the current one.
        """
        checks = self.checks(service)
        if checks is None:
            return
        snapshot = self._registry.get_snapshot(service)
        while snapshot is not None:
            self._health.set_endpoints(service, snapshot.endpoints, *checks)
            current = self._registry.get_snapshot(service)
            if current is snapshot:
                return
            snapshot = current

    def apply(self, service: str, changes: Sequence[TopologyChange]) -> None:
        """Health targets, outlier state, pools and draining for changes to one service."""
        checks = self.checks(service)
        if checks is not None:
            self._health.apply_changes(service, changes, *checks)
        members = self._members(service)
        table, load = (members.figures, members.load) if members is not None else ({}, ())
        kinds = list(map(_kind_of, changes))
        # An addition matters only to an endpoint that drains, or may start to drain here
        # (one with requests in flight): its pools stay.  Usually neither is the case.
        in_flight = bool(load)
        added: list[str] = []
        if table and "added" in kinds and (in_flight or self.draining):
            added = list(map(_address_of, itertools.compress(
                changes, map(operator.eq, kinds, itertools.repeat("added")))))
        if "removed" in kinds:
            going = list(map(_endpoint_of, itertools.compress(
                changes, map(operator.eq, kinds, itertools.repeat("removed")))))
            gone = list(map(_endpoint_address, going))
            if added and in_flight and not set(gone).isdisjoint(added):
                self._apply_in_order(service, changes, table, load)  # gone and back
                return
            self._remove(service, going, gone, table, load)
        if added and self.draining:
            # Removed earlier and back before it drained: its pools stay.
            for stats in filter(None, map(table.get, added)):
                self._keep_pools(stats)

    def _remove(self, service: str, going: list[Endpoint], gone: list[str],
                table: dict[str, EndpointStats], load: Sequence[None]) -> None:
        self._outliers.forget_many(service, gone)
        others = [snapshot.by_address for name, snapshot in self._registry.snapshots.items()
                  if name != service]
        if others:  # another service still sends to these addresses: their pools stay
            going = [e for e in going if not any(e.address in other for other in others)]
        if load:  # requests in flight somewhere in the service
            draining: set[str] = set()
            for endpoint, stats in zip(going, map(table.get, map(_endpoint_address, going))):
                if stats is not None and stats.in_flight:
                    # Drain: requests in flight finish, then the pools close (at once if the
                    # last one ended meanwhile).
                    stats.when_drained(self._closer(endpoint, stats))
                    draining.add(endpoint.address)
            if draining:
                going = [e for e in going if e.address not in draining]
        addresses = list(map(_host_port_of, going))
        self._pools().close_endpoints(addresses)
        self.connection_pools.close_endpoints(addresses)

    def _apply_in_order(self, service: str, changes: Sequence[TopologyChange],
                        table: dict[str, EndpointStats], load: Sequence[None]) -> None:
        for change in changes:
            if change.kind == "removed":
                self._remove(service, [change.endpoint], [change.endpoint.address], table, load)
            elif change.kind == "added":
                stats = table.get(change.endpoint.address)
                if stats is not None:
                    self._keep_pools(stats)

    def _closer(self, endpoint: Endpoint, stats: EndpointStats) -> Callable[[], None]:
        """What closes a removed endpoint's pools once its last lease is released."""
        def close_pools() -> None:
            self.draining.discard(stats)
            self._pools().close_endpoint(endpoint.host, endpoint.port)
            self.connection_pools.close_endpoints(((endpoint.host, endpoint.port),))

        self.draining.add(stats)
        return close_pools

    def _keep_pools(self, stats: EndpointStats) -> None:
        stats.on_drained = None
        self.draining.discard(stats)
