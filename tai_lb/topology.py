"""`TopologyFollower`: what the balancer does when a service's endpoints change, besides routing.

For every list of registry changes it updates the health checker's targets, forgets the outlier
state of removed endpoints, and closes their pools (HTTP, and the generic ``connection_pools``):
at once when nothing is in flight on them, or, when requests are still in flight, once the last
one ends (the endpoint drains: it gets no new picks, its requests finish, then its pools close).
An endpoint removed and added back before it drained keeps its pools.  A removed address that
another service still uses keeps its pools too.

It also rebalances (:mod:`tai_lb.rebalance`): records every change as an event of the service,
begins the slow start of added endpoints, bounds drains by ``drain_timeout`` in gradual and
manual modes, and in manual mode holds changes back until :meth:`TopologyFollower.rebalance`.

Whole lists are handled at a time, in C where it can (a full update of 10,000 endpoints is one
list of as many changes); one change at a time, in order, only when an address went and came back
within the list.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Optional

from .connpool import EndpointConnectionPools
from .endpoint import Endpoint
from .rebalance import ADDRESSES_SHOWN, Rebalancer, ServiceRebalance
from .registry import TopologyChange
from .stats import EndpointStats

if TYPE_CHECKING:
    from .config import LoadBalancerConfig
    from .health import HealthCheckConfig, HealthChecker
    from .outlier import OutlierDetector
    from .pool import EndpointPools
    from .registry import ServiceRegistry, ServiceSnapshot
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
    :param rebuild: rebuilds a service's route (while its endpoints ramp up).
    :param clock: the balancer's monotonic clock.
    """

    def __init__(self, registry: ServiceRegistry, config: LoadBalancerConfig,
                 health: HealthChecker, outliers: OutlierDetector,
                 pools: Callable[[], EndpointPools],
                 members: Callable[[str], Optional[Membership]],
                 rebuild: Callable[[str], None], clock: Callable[[], float]) -> None:
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
        #: each service's rebalancing: events, slow starts, drain deadlines, held changes
        self.rebalancer = Rebalancer(config, clock, rebuild)
        self._clock = clock

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

    def apply(self, service: str, changes: Sequence[TopologyChange], *,
              hold: bool = True) -> None:
        """Health targets, outlier state, pools, draining, slow start and events for changes to
        one service; in manual mode (unless ``hold`` is False) only the event: they are held."""
        kinds = list(map(_kind_of, changes))
        state = self.rebalancer.service(service)
        if hold and state.applied is not None:  # manual mode: held until rebalance()
            held = state.hold(len(changes))
            if held is not None:
                state.record("held", **_counts(kinds), held=held)
                return
        self._record(state, changes, kinds)
        checks = self.checks(service)
        if checks is not None:
            self._health.apply_changes(service, changes, *checks)
        members = self._members(service)
        table, load = (members.figures, members.load) if members is not None else ({}, ())
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
                    closer = self._closer(service, endpoint, stats)
                    stats.when_drained(closer)
                    self.rebalancer.drain_deadline(service, stats, closer)
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

    def _closer(self, service: str, endpoint: Endpoint,
                stats: EndpointStats) -> Callable[[], None]:
        """What closes a removed endpoint's pools once its last lease is released (or its
        drain's timeout passed)."""
        state = self.rebalancer.service(service)
        began = self._clock()
        state.record("drain_began", address=endpoint.address, in_flight=stats.in_flight,
                     timeout=state.config.drain_timeout if state.bounded_drains else None)

        def close_pools() -> None:
            self.draining.discard(stats)
            left = stats.in_flight
            state.record("drain_ended", address=endpoint.address, in_flight=left,
                         timed_out=left > 0, seconds=round(self._clock() - began, 3))
            self._pools().close_endpoint(endpoint.host, endpoint.port)
            self.connection_pools.close_endpoints(((endpoint.host, endpoint.port),))

        self.draining.add(stats)
        return close_pools

    def _keep_pools(self, stats: EndpointStats) -> None:
        stats.on_drained = None
        self.draining.discard(stats)

    def _record(self, state: ServiceRebalance, changes: Sequence[TopologyChange],
                kinds: list[str]) -> None:
        # One event per kind of change in the list (a full update of 10,000 endpoints is one
        # list), and the slow start of the added endpoints.
        for kind in ("added", "removed", "changed"):
            if kind not in kinds:
                continue
            addresses = list(map(_address_of, itertools.compress(
                changes, map(operator.eq, kinds, itertools.repeat(kind)))))
            state.record(kind, addresses=addresses[:ADDRESSES_SHOWN], count=len(addresses))
            if state.ramps is not None:
                if kind == "added":
                    self.rebalancer.ramp(state.service, addresses)
                elif kind == "removed" and state.ramps.started:
                    for address in addresses:
                        state.ramps.started.pop(address, None)

    def rebalance(self, service: str) -> list[TopologyChange]:
        """Manual mode: apply what the registry holds for ``service`` now, and return the
        changes from what picks used until now (none in the other modes).  In every mode, end
        the drains past their timeout and build the service's route here and now."""
        state = self.rebalancer.service(service)
        changes: list[TopologyChange] = []
        # The lock serialises rebalance() calls so that their changes apply in order.  No pick,
        # registry write or other reader takes it: closing the idle pools of removed endpoints
        # under it can only make another rebalance() of the service wait.
        with state.lock:
            applied, current, held = state.take(
                functools.partial(self._registry.get_snapshot, service))
            if applied is not None and current is not None:
                changes = _difference(service, applied, current)
                if changes:
                    self.apply(service, changes, hold=False)
                state.record("applied", **_counts(list(map(_kind_of, changes))), held=held)
        self.rebalancer.end_overdue(service)
        self.rebalancer.rebuild(service)
        return changes


def _counts(kinds: list[str]) -> dict[str, int]:
    return {kind: kinds.count(kind) for kind in ("added", "removed", "changed")}


def _difference(service: str, old: ServiceSnapshot,
                new: ServiceSnapshot) -> list[TopologyChange]:
    """The changes from ``old`` to ``new``, as the registry would have delivered them
    (``sequence`` 0: the registry did not deliver these)."""
    before, after = old.by_address, new.by_address
    changes = [TopologyChange("removed", service, e, None, 0)
               for e in old.endpoints if e.address not in after]
    for endpoint in new.endpoints:
        previous = before.get(endpoint.address)
        if previous is None:
            changes.append(TopologyChange("added", service, endpoint, None, 0))
        elif previous != endpoint:
            changes.append(TopologyChange("changed", service, endpoint, previous, 0))
    return changes
