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
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Callable, Literal, NamedTuple, Optional, Union

from . import _forksafe
from ._settings import shown
from .endpoint import Endpoint
from .exceptions import ConfigError, UnknownService
from .filters import EndpointFilter, metadata_filter
from .snapshot import (
    ServiceSnapshot,
    SnapshotDelta,
    delta_of,
    diff_full_update,
    snapshot_of,
    table_copy,
    value_keys,
)

__all__ = ["EndpointLike", "ServiceRegistry", "ServiceSnapshot", "SnapshotDelta", "Subscription",
           "TopologyChange"]

log = logging.getLogger(__name__)

EndpointLike = Union[Endpoint, str, Mapping[str, Any]]
"""What registry calls accept as an endpoint: an `Endpoint`, ``"host:port"`` or a config dict."""

ChangeKind = Literal["added", "removed", "changed"]

_SERVICE_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?\Z")  # \Z: no "users\n"


def check_service_name(name: object, path: str = "service") -> str:
    """Return ``name`` if it is a valid service name, else raise `ConfigError`.

    Service names are used as URL hosts, so they are lower-case host names.
    """
    if not isinstance(name, str) or not _SERVICE_NAME.match(name):
        raise ConfigError(path, "a service name must be a lower-case host name (letters, digits, "
                                f"'-', '_', '.'), got {shown(name)}")
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


class Subscription:
    """Handle returned by :meth:`ServiceRegistry.subscribe`; call or close it to unsubscribe."""

    __slots__ = ("_batches", "_callback", "_registry", "_seen")

    def __init__(self, registry: ServiceRegistry, callback: Callable[[Any], None], *,
                 batches: bool = False) -> None:
        self._registry: Optional[ServiceRegistry] = registry
        self._callback = callback
        self._batches = batches  # called with a list of changes rather than with each
        self._seen = 0  # sequence of the last change handed to it (by the delivering thread)

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
        #: every service's current snapshot, read-only; replaced whole by each write
        self.snapshots: MappingProxyType[str, ServiceSnapshot] = MappingProxyType({})
        self._subscribers: tuple[Subscription, ...] = ()
        self._sequence = 0
        self._pending: collections.deque[TopologyChange] = collections.deque()
        self._delivering = False
        # The changes the delivering thread has taken out of _pending and is handing over.
        self._handing: list[TopologyChange] = []
        self.callback_errors = 0
        _forksafe.after_fork_in_child(self, ServiceRegistry._reset_after_fork)

    def _reset_after_fork(self) -> None:
        _forksafe.inherited(self._lock, self._handing)  # never freed in the child
        self._lock = threading.Lock()
        if self._delivering and self._handing:
            # The delivering thread is not in the child: the changes it was handing over go
            # back in front (those not back already), and the next write delivers them.  Each
            # subscription's count of what it was handed keeps every change exactly once.
            first = self._pending[0].sequence if self._pending else None
            self._pending.extendleft(reversed(
                [c for c in self._handing if first is None or c.sequence < first]))
        self._handing = []
        self._delivering = False

    # -- reads (no lock) ----------------------------------------------------------------------

    def snapshot(self, service: str) -> ServiceSnapshot:
        """The current snapshot of ``service``; raises `UnknownService` for an unknown name."""
        snap = self.snapshots.get(service)
        if snap is None:
            raise UnknownService(service)
        return snap

    def get_snapshot(self, service: str) -> Optional[ServiceSnapshot]:
        """The current snapshot of ``service``, or None if it is unknown."""
        return self.snapshots.get(service)

    def endpoints(self, service: str) -> tuple[Endpoint, ...]:
        """The endpoints of ``service`` in registration order."""
        return self.snapshot(service).endpoints

    def services(self) -> tuple[str, ...]:
        """The names of every known service, sorted."""
        return tuple(sorted(self.snapshots))

    def __contains__(self, service: object) -> bool:
        return service in self.snapshots

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
            sources = self.snapshots.values()
        return tuple(e for snap in sources for e in snap.endpoints if condition(e))

    # -- writes -------------------------------------------------------------------------------

    def add_service(self, service: str) -> None:
        """Make ``service`` known, with no endpoints if it has none yet."""
        check_service_name(service)
        with self._lock:
            if service not in self.snapshots:
                self._publish(snapshot_of(service, {}))

    def register(self, service: str, endpoint: EndpointLike) -> None:
        """Add ``endpoint`` to ``service`` or, if its address is known, replace its metadata."""
        self.register_many(service, (endpoint,))

    def register_many(self, service: str, endpoints: Iterable[EndpointLike]) -> None:
        """Add or replace several endpoints in one atomic step (one snapshot)."""
        check_service_name(service)
        new = _endpoint_list(endpoints)
        with self._lock:
            snap = self.snapshots.get(service)
            table: Optional[dict[str, Endpoint]] = None  # copied on the first difference
            current: Mapping[str, Endpoint] = snap.by_address if snap is not None else {}
            added: list[str] = []
            changed: list[str] = []
            for endpoint in new:
                address = endpoint.address
                old = current.get(address)
                if old is not None and (old is endpoint
                                        or old.compare_key == endpoint.compare_key):
                    continue  # equal: the registered object stays
                if table is None:
                    table = current = table_copy(snap)
                table[address] = endpoint
                self._queue("added" if old is None else "changed", service, endpoint, old)
                (added if old is None else changed).append(address)
            if table is not None or snap is None:
                self._publish(snapshot_of(service, table if table is not None else {},
                                          delta=delta_of(snap, added, (), changed)))
        self._deliver()

    def deregister(self, service: str, endpoint: Union[Endpoint, str]) -> bool:
        """Remove one endpoint (an `Endpoint` or ``"host:port"``); True if it was there."""
        return self.deregister_many(service, (endpoint,)) == 1

    def deregister_many(self, service: str, endpoints: Iterable[Union[Endpoint, str]]) -> int:
        """Remove several endpoints in one atomic step; returns how many were removed."""
        addresses = [_address_of(e) for e in endpoints]
        with self._lock:
            snap = self.snapshots.get(service)
            if snap is None:
                raise UnknownService(service)
            table: Optional[dict[str, Endpoint]] = None  # copied on the first removal
            current: Mapping[str, Endpoint] = snap.by_address
            removed: list[str] = []
            for address in addresses:
                old = current.get(address)
                if old is None:
                    continue
                if table is None:
                    table = current = table_copy(snap)
                del table[address]
                self._queue("removed", service, old, None)
                removed.append(address)
            if table is not None:
                self._publish(snapshot_of(service, table,
                                          delta=delta_of(snap, (), removed, ())))
        self._deliver()
        return len(snap) - len(table) if table is not None else 0

    def set_endpoints(self, service: str, endpoints: Iterable[EndpointLike]) -> None:
        """Make ``endpoints`` the whole set of ``service``, emitting only the differences.

        Endpoints that stay keep their position (and the registered object, when equal); new
        ones are appended.  Events come in this order: removed, then changed (both in the order
        of the current set), then added (in the order given).  Discovery providers use this to
        apply a full update.
        """
        check_service_name(service)
        new = _endpoint_list(endpoints)
        keys = value_keys(new)
        with self._lock:
            # Diffed with the lock held: the current snapshot must stay current meanwhile.
            update = diff_full_update(self.snapshots.get(service), new, keys)
            self._queue_all("removed", service, update.removed)
            for endpoint, previous in update.changed:
                self._queue("changed", service, endpoint, previous)
            self._queue_all("added", service, update.added)
            if update.table is not None:
                self._publish(snapshot_of(service, update.table, update.order, update.delta))
        self._deliver()

    # -- subscriptions ------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[TopologyChange], None]) -> Subscription:
        """Call ``callback(change)`` for every later change, in order, exactly once each.

        Callbacks run outside the registry's lock, on the thread that made the change (or on
        another writer's thread if two write at once); they may call the registry.  An exception
        in one callback is logged and counted in ``callback_errors``; the others still run.
        Returns a :class:`Subscription`; call ``unsubscribe()`` on it to stop.
        """
        return self._add_subscriber(callback, batches=False)

    def subscribe_batches(self, callback: Callable[[Sequence[TopologyChange]], None],
                          ) -> Subscription:
        """Call ``callback(changes)`` with every later change, in order, exactly once each.

        As :meth:`subscribe`, but ``callback`` gets the changes in lists, in one call: every
        change of one write (a full update of 10,000 endpoints is one call), or of several
        writes applied while an earlier delivery ran.  Work done once per call rather than once
        per change is then done once per update.
        """
        return self._add_subscriber(callback, batches=True)

    def _add_subscriber(self, callback: Callable[[Any], None], *, batches: bool,
                        ) -> Subscription:
        subscription = Subscription(self, callback, batches=batches)
        with self._lock:
            subscription._seen = self._sequence  # "every later change"
            self._subscribers = (*self._subscribers, subscription)
        return subscription

    def _remove_subscriber(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not subscription)

    # -- internals (called with self._lock held) ----------------------------------------------

    def _publish(self, snapshot: ServiceSnapshot) -> None:
        snapshots = self.snapshots.copy()
        snapshots[snapshot.service] = snapshot
        self.snapshots = MappingProxyType(snapshots)

    def _queue(self, kind: ChangeKind, service: str, endpoint: Endpoint,
               previous: Optional[Endpoint]) -> None:
        self._sequence += 1
        self._pending.append(TopologyChange(kind, service, endpoint, previous, self._sequence))

    def _queue_all(self, kind: ChangeKind, service: str, endpoints: Sequence[Endpoint]) -> None:
        # One "added" or "removed" change per endpoint, built in C (tuple.__new__ over zipped
        # fields skips the named tuple's Python-level constructor).
        first = self._sequence + 1
        self._sequence += len(endpoints)
        fields = zip(itertools.repeat(kind), itertools.repeat(service), endpoints,
                     itertools.repeat(None), itertools.count(first))
        self._pending.extend(map(tuple.__new__, itertools.repeat(TopologyChange), fields))

    # -- delivery (outside the lock) ----------------------------------------------------------

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
                    self._handing = []
                    if not self._pending:
                        self._delivering = False
                        return
                    batch = self._handing = list(self._pending)
                    self._pending.clear()
                    subscribers = self._subscribers
                try:
                    self._deliver_batch(batch, subscribers)
                except BaseException:
                    # An interrupt: the batch goes back in front.  Every subscription knows
                    # the last change it was handed, so none gets a change twice.
                    with self._lock:
                        self._handing = []
                        self._pending.extendleft(reversed(batch))
                    raise
        except BaseException:
            with self._lock:
                self._delivering = False
            raise

    def _deliver_batch(self, batch: list[TopologyChange],
                       subscribers: tuple[Subscription, ...]) -> None:
        last = batch[-1].sequence
        for subscription in subscribers:
            if not subscription._batches or subscription._seen >= last:
                continue
            if subscription._registry is None:
                continue  # unsubscribed meanwhile
            seen = subscription._seen
            # A list of its own: one that a subscriber reorders or empties must not change
            # what the others get (nor what goes back in front after an interrupt).
            changes = batch[:] if seen < batch[0].sequence else [c for c in batch
                                                                 if c.sequence > seen]
            subscription._seen = last
            self._call(subscription, changes)
        singles = [s for s in subscribers if not s._batches]
        if not singles:
            return
        for change in batch:
            for subscription in singles:
                if subscription._registry is None or subscription._seen >= change.sequence:
                    continue
                subscription._seen = change.sequence
                self._call(subscription, change)

    def _call(self, subscription: Subscription,
              changes: Union[TopologyChange, list[TopologyChange]]) -> None:
        try:
            subscription._callback(changes)
        except Exception:
            self.callback_errors += 1
            if isinstance(changes, TopologyChange):
                log.exception("tai-lb: registry subscriber %r failed on %s %s of %s",
                              subscription._callback, changes.kind, changes.endpoint.address,
                              changes.service)
            else:
                log.exception("tai-lb: registry subscriber %r failed on %d changes",
                              subscription._callback, len(changes))


def _endpoint_list(values: Iterable[EndpointLike]) -> list[Endpoint]:
    """``values`` as a new list of endpoints (`Endpoint` objects, the usual case, as they are)."""
    items = list(values)
    if all(issubclass(kind, Endpoint) for kind in set(map(type, items))):
        return items  # type: ignore[return-value]
    return [Endpoint.from_value(e, path=f"endpoints[{i}]") for i, e in enumerate(items)]


def _address_of(endpoint: Union[Endpoint, str]) -> str:
    if isinstance(endpoint, Endpoint):
        return endpoint.address
    if isinstance(endpoint, str):
        return Endpoint.parse(endpoint).address
    raise TypeError(f"expected an Endpoint or 'host:port', got {endpoint!r}")
