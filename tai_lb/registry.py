"""`ServiceRegistry`: which endpoints each service has, published as immutable snapshots.

Writers take one lock, build a new :class:`ServiceSnapshot` and swap the reference; readers
(every pick) read the current reference and take no lock.  Each write also queues
:class:`TopologyChange` events, which are handed to subscribers after the lock is released, in
the order the writes were applied, exactly once each.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Callable, Literal, NamedTuple, Optional, Union

from . import _forksafe
from .endpoint import Endpoint
from .exceptions import ConfigError, UnknownService
from .filters import EndpointFilter, metadata_filter

__all__ = ["EndpointLike", "ServiceRegistry", "ServiceSnapshot", "Subscription", "TopologyChange"]

log = logging.getLogger(__name__)

EndpointLike = Union[Endpoint, str, Mapping[str, Any]]
"""What registry calls accept as an endpoint: an `Endpoint`, ``"host:port"`` or a config dict."""

ChangeKind = Literal["added", "removed", "changed"]

_SERVICE_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?$")
_generation = itertools.count(1)


def check_service_name(name: object, path: str = "service") -> str:
    """Return ``name`` if it is a valid service name, else raise `ConfigError`.

    Service names are used as URL hosts, so they are lower-case host names.
    """
    if not isinstance(name, str) or not _SERVICE_NAME.match(name):
        raise ConfigError(path, "a service name must be a lower-case host name (letters, digits, "
                                f"'-', '_', '.'), got {name!r}")
    return name


class TopologyChange(NamedTuple):
    """One change to a service's endpoints, as delivered to subscribers.

    ``previous`` is the replaced endpoint for ``"changed"``, else None.  ``sequence`` increases by
    one for every change of a registry, so a subscriber can check that it missed nothing.
    (A named tuple: a full update of 10,000 endpoints creates as many.)
    """

    kind: ChangeKind
    service: str
    endpoint: Endpoint
    previous: Optional[Endpoint]
    sequence: int


class ServiceSnapshot:
    """The endpoints of one service at one moment; never changes once published."""

    __slots__ = ("by_address", "endpoints", "generation", "service")

    def __init__(self, service: str, endpoints: Mapping[str, Endpoint]) -> None:
        self.service = service
        self.by_address: Mapping[str, Endpoint] = MappingProxyType(dict(endpoints))
        self.endpoints: tuple[Endpoint, ...] = tuple(endpoints.values())
        self.generation = next(_generation)

    def __len__(self) -> int:
        return len(self.endpoints)

    def __repr__(self) -> str:
        return (f"<ServiceSnapshot {self.service!r} generation={self.generation} "
                f"endpoints={len(self.endpoints)}>")


class Subscription:
    """Handle returned by :meth:`ServiceRegistry.subscribe`; call or close it to unsubscribe."""

    __slots__ = ("_callback", "_registry")

    def __init__(self, registry: ServiceRegistry, callback: Callable[[TopologyChange], None]):
        self._registry: Optional[ServiceRegistry] = registry
        self._callback = callback

    def unsubscribe(self) -> None:
        """Stop deliveries to this subscriber; safe to call more than once."""
        registry, self._registry = self._registry, None
        if registry is not None:
            registry._remove_subscriber(self)

    __call__ = unsubscribe
    close = unsubscribe

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unsubscribe()


class ServiceRegistry:
    """Thread-safe store of services and their endpoints.

    >>> reg = ServiceRegistry()
    >>> reg.register("users", Endpoint("127.0.0.1", 8001, zone="eu-1a"))
    >>> [e.address for e in reg.endpoints("users")]
    ['127.0.0.1:8001']
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Copy-on-write: readers get this dict without a lock; writers replace it whole.
        self._snapshots: Mapping[str, ServiceSnapshot] = MappingProxyType({})
        self._subscribers: tuple[Subscription, ...] = ()
        self._sequence = 0
        self._pending: collections.deque[TopologyChange] = collections.deque()
        self._delivering = False
        self.callback_errors = 0
        _forksafe.after_fork_in_child(self, ServiceRegistry._reset_after_fork)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._delivering = False

    # -- reads (no lock) ----------------------------------------------------------------------

    def snapshot(self, service: str) -> ServiceSnapshot:
        """The current snapshot of ``service``; raises `UnknownService` for an unknown name."""
        snap = self._snapshots.get(service)
        if snap is None:
            raise UnknownService(service)
        return snap

    def get_snapshot(self, service: str) -> Optional[ServiceSnapshot]:
        """The current snapshot of ``service``, or None if it is unknown."""
        return self._snapshots.get(service)

    def endpoints(self, service: str) -> tuple[Endpoint, ...]:
        """The endpoints of ``service`` in registration order."""
        return self.snapshot(service).endpoints

    def services(self) -> tuple[str, ...]:
        """The names of every known service, sorted."""
        return tuple(sorted(self._snapshots))

    def __contains__(self, service: object) -> bool:
        return service in self._snapshots

    def find(self, service: Optional[str] = None, *, zone: Optional[str] = None,
             region: Optional[str] = None, version: Optional[str] = None,
             labels: Optional[Mapping[str, str]] = None,
             where: Optional[EndpointFilter] = None) -> tuple[Endpoint, ...]:
        """Endpoints that match every given condition, from one service or from all of them.

        :param service: look only in this service (`UnknownService` if unknown); None: all.
        :param labels: every given label must be present with the given value.
        :param where: any further filter, such as ``in_zone("a") | in_zone("b")``.
        """
        condition = metadata_filter(zone, region, version, dict(labels) if labels else None)
        if where is not None:
            condition = condition & where
        if service is not None:
            sources: Iterable[ServiceSnapshot] = (self.snapshot(service),)
        else:
            sources = self._snapshots.values()
        return tuple(e for snap in sources for e in snap.endpoints if condition(e))

    # -- writes -------------------------------------------------------------------------------

    def add_service(self, service: str) -> None:
        """Make ``service`` known, with no endpoints if it has none yet."""
        check_service_name(service)
        with self._lock:
            if service not in self._snapshots:
                self._publish(service, {})

    def register(self, service: str, endpoint: EndpointLike) -> None:
        """Add ``endpoint`` to ``service`` or, if its address is known, replace its metadata."""
        self.register_many(service, (endpoint,))

    def register_many(self, service: str, endpoints: Iterable[EndpointLike]) -> None:
        """Add or replace several endpoints in one atomic step (one snapshot)."""
        check_service_name(service)
        new = [Endpoint.from_value(e, path=f"endpoints[{i}]") for i, e in enumerate(endpoints)]
        with self._lock:
            snap = self._snapshots.get(service)
            current = dict(snap.by_address) if snap is not None else {}
            changed = snap is None
            for endpoint in new:
                old = current.get(endpoint.address)
                if old == endpoint:
                    continue
                current[endpoint.address] = endpoint
                self._queue("added" if old is None else "changed", service, endpoint, old)
                changed = True
            if changed:
                self._publish(service, current)
        self._deliver()

    def deregister(self, service: str, endpoint: Union[Endpoint, str]) -> bool:
        """Remove one endpoint (an `Endpoint` or ``"host:port"``); True if it was there."""
        return self.deregister_many(service, (endpoint,)) == 1

    def deregister_many(self, service: str, endpoints: Iterable[Union[Endpoint, str]]) -> int:
        """Remove several endpoints in one atomic step; returns how many were removed."""
        addresses = [_address_of(e) for e in endpoints]
        with self._lock:
            snap = self._snapshots.get(service)
            if snap is None:
                raise UnknownService(service)
            current = dict(snap.by_address)
            removed = 0
            for address in addresses:
                old = current.pop(address, None)
                if old is not None:
                    self._queue("removed", service, old, None)
                    removed += 1
            if removed:
                self._publish(service, current)
        self._deliver()
        return removed

    def set_endpoints(self, service: str, endpoints: Iterable[EndpointLike]) -> None:
        """Make ``endpoints`` the whole set of ``service``, emitting only the differences.

        Endpoints that stay keep their position; new ones are appended.  Discovery providers use
        this to apply a full update.
        """
        check_service_name(service)
        wanted: dict[str, Endpoint] = {}
        for i, value in enumerate(endpoints):
            endpoint = Endpoint.from_value(value, path=f"endpoints[{i}]")
            wanted[endpoint.address] = endpoint
        with self._lock:
            snap = self._snapshots.get(service)
            current = dict(snap.by_address) if snap is not None else {}
            result: dict[str, Endpoint] = {}
            changed = snap is None
            for address, old in current.items():
                if address not in wanted:
                    self._queue("removed", service, old, None)
                    changed = True
            for address, old in current.items():
                if address in wanted:
                    new = wanted[address]
                    if new != old:
                        self._queue("changed", service, new, old)
                        changed = True
                    result[address] = new
            for address, new in wanted.items():
                if address not in current:
                    self._queue("added", service, new, None)
                    result[address] = new
                    changed = True
            if changed:
                self._publish(service, result)
        self._deliver()

    # -- subscriptions ------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[TopologyChange], None]) -> Subscription:
        """Call ``callback(change)`` for every later change, in order, exactly once each.

        Callbacks run outside the registry's lock, on the thread that made the change (or on
        another writer's thread if two write at once); they may call the registry.  An exception
        in one callback is logged and counted in ``callback_errors``; the others still run.
        Returns a :class:`Subscription`; call ``unsubscribe()`` on it to stop.
        """
        subscription = Subscription(self, callback)
        with self._lock:
            self._subscribers = (*self._subscribers, subscription)
        return subscription

    def _remove_subscriber(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not subscription)

    # -- internals (called with self._lock held) ----------------------------------------------

    def _publish(self, service: str, endpoints: Mapping[str, Endpoint]) -> None:
        snapshots = dict(self._snapshots)
        snapshots[service] = ServiceSnapshot(service, endpoints)
        self._snapshots = MappingProxyType(snapshots)

    def _queue(self, kind: ChangeKind, service: str, endpoint: Endpoint,
               previous: Optional[Endpoint]) -> None:
        self._sequence += 1
        self._pending.append(TopologyChange(kind, service, endpoint, previous, self._sequence))

    def _deliver_one(self, change: TopologyChange, subscribers: tuple[Subscription, ...]) -> None:
        for subscription in subscribers:
            if subscription._registry is None:
                continue  # unsubscribed meanwhile
            try:
                subscription._callback(change)
            except Exception:
                self.callback_errors += 1
                log.exception("tai-lb: registry subscriber %r failed on %s %s of %s",
                              subscription._callback, change.kind, change.endpoint.address,
                              change.service)

    def _deliver(self) -> None:
        # One thread delivers at a time, so events keep their order; the others leave their
        # events to it.  No lock is held while a callback runs.
        with self._lock:
            if self._delivering or not self._pending:
                return
            self._delivering = True
        try:
            while True:
                with self._lock:  # take every pending change at once: one lock per batch
                    if not self._pending:
                        self._delivering = False
                        return
                    batch = list(self._pending)
                    self._pending.clear()
                    subscribers = self._subscribers
                for index, change in enumerate(batch):
                    try:
                        self._deliver_one(change, subscribers)
                    except BaseException:
                        with self._lock:  # an interrupt: the rest is delivered later
                            self._pending.extendleft(reversed(batch[index + 1:]))
                        raise
        except BaseException:
            with self._lock:
                self._delivering = False
            raise


def _address_of(endpoint: Union[Endpoint, str]) -> str:
    if isinstance(endpoint, Endpoint):
        return endpoint.address
    if isinstance(endpoint, str):
        return Endpoint.parse(endpoint).address
    raise TypeError(f"expected an Endpoint or 'host:port', got {endpoint!r}")
