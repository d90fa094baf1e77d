"""`ServiceSnapshot`: one service's endpoints at one moment, and how a write changes them.

A snapshot never changes once published; :class:`~tai_lb.ServiceRegistry` publishes a new one
for each write that changes something.  The functions here work out, for the registry and under
its lock, what a write changes: :func:`diff_full_update` compares a full update with the
current set (only the window between their common head and tail when it can, by address over
the whole set otherwise), and :func:`delta_of` records a small change as a
:class:`SnapshotDelta`, which subscribers use to update per-snapshot state for the endpoints
that changed alone.
"""

from __future__ import annotations

import collections
import itertools
import operator
from collections.abc import Collection, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Optional, Union

from ._sequences import common_head, common_tail
from .endpoint import Endpoint

__all__ = ["ServiceSnapshot", "SnapshotDelta"]

_generation = itertools.count(1)
_address = operator.attrgetter("address")
_key = operator.attrgetter("compare_key")
_Order = tuple[list[Endpoint], list[tuple[Any, ...]]]
# A full update whose differences (after the common head and tail) span more endpoints than this
# is diffed by address over the whole set instead.
_WINDOW_MAX = 2048


class SnapshotDelta(NamedTuple):
    """How a snapshot differs from the one it replaced (generation ``base``), by address.

    Subscribers that keep per-snapshot state (the balancer's routes) use it to update that
    state for the few endpoints that changed, rather than rebuild it over the whole set.
    """

    base: int
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]


# A write that changes more endpoints than this records no delta: rebuilding is as cheap.
_DELTA_MAX = 64


class _Absent:
    """Stands for an endpoint a full update adds: its key equals no endpoint's."""

    __slots__ = ()
    compare_key = None


_ABSENT = _Absent()


class ServiceSnapshot:
    """The endpoints of one service at one moment; never changes once published."""

    __slots__ = ("_delta", "_order", "_table", "by_address", "endpoints", "generation",
                 "service")

    def __init__(self, service: str, endpoints: Mapping[str, Endpoint]) -> None:
        self._adopt(service, dict(endpoints), None, None)

    def _adopt(self, service: str, table: dict[str, Endpoint], order: Optional[_Order],
               delta: Optional[SnapshotDelta]) -> None:
        # ``table`` becomes the snapshot's own: its owner never changes it afterwards.
        self.service = service
        self._table = table
        self.by_address: Mapping[str, Endpoint] = MappingProxyType(table)
        self.endpoints: tuple[Endpoint, ...] = tuple(table.values())
        self.generation = next(_generation)
        # For the next set_endpoints(): these endpoints in the order the last full set gave
        # them, with their value keys.  Read and written only under the registry's lock.
        self._order = order
        self._delta = delta  # the difference from the snapshot this one replaced, if small

    @classmethod
    def _of(cls, service: str, table: dict[str, Endpoint], order: Optional[_Order] = None,
            delta: Optional[SnapshotDelta] = None) -> ServiceSnapshot:
        snapshot = cls.__new__(cls)
        snapshot._adopt(service, table, order, delta)
        return snapshot

    @property
    def delta(self) -> Optional[SnapshotDelta]:
        """How this snapshot differs from the one it replaced, by address, when a write made
        a small change (None otherwise): subscribers that keep per-snapshot state update it for
        those endpoints alone."""
        return self._delta

    def __len__(self) -> int:
        return len(self.endpoints)

    def __repr__(self) -> str:
        return (f"<ServiceSnapshot {self.service!r} generation={self.generation} "
                f"endpoints={len(self.endpoints)}>")


def snapshot_of(service: str, table: dict[str, Endpoint], order: Optional[_Order] = None,
                delta: Optional[SnapshotDelta] = None) -> ServiceSnapshot:
    """A new snapshot that takes ``table`` over (nobody may change it afterwards), uncopied.

    ``order`` and ``delta`` are what :func:`diff_full_update` returned, if it made the table.
    """
    return ServiceSnapshot._of(service, table, order, delta)


def table_copy(snap: Optional[ServiceSnapshot]) -> dict[str, Endpoint]:
    """A new dict of ``snap``'s endpoints by address, in its order (empty for None), to change."""
    return snap._table.copy() if snap is not None else {}


def value_keys(endpoints: Iterable[Endpoint]) -> list[tuple[Any, ...]]:
    """Each endpoint's value key: two endpoints are equal when their keys are."""
    return list(map(_key, endpoints))


def delta_of(base: Optional[ServiceSnapshot], added: Collection[Union[Endpoint, str]],
             removed: Collection[Union[Endpoint, str]], changed: Collection[str],
             ) -> Optional[SnapshotDelta]:
    """The delta from ``base`` (endpoints or addresses), or None: no base, or a large change."""
    if base is None or len(added) + len(removed) + len(changed) > _DELTA_MAX:
        return None
    return SnapshotDelta(base.generation,
                         tuple(e if isinstance(e, str) else e.address for e in added),
                         tuple(e if isinstance(e, str) else e.address for e in removed),
                         tuple(changed))


class FullUpdate(NamedTuple):
    """What a full update changes: its events in the order they are delivered (removed, then
    changed, both in the current set's order, then added, in the order given), and the table
    to publish (None when there is nothing to publish)."""

    removed: list[Endpoint]
    changed: list[tuple[Endpoint, Endpoint]]  # (new, previous)
    added: list[Endpoint]
    table: Optional[dict[str, Endpoint]]
    order: Optional[_Order]
    delta: Optional[SnapshotDelta]


_UNCHANGED = FullUpdate([], [], [], None, None, None)

# A full update is diffed in C wherever the whole set is walked (maps, list and set
# comparisons, never one Python call per endpoint): an update of 10,000 endpoints that
# differs in one costs a few milliseconds.  Each endpoint's ``compare_key`` is a tuple of plain
# values, so equality is one C comparison.  All of it runs with the registry's lock held.


def diff_full_update(snap: Optional[ServiceSnapshot], new: list[Endpoint],
                     keys: list[tuple[Any, ...]]) -> FullUpdate:
    """What making ``new`` (with its :func:`value_keys`) the whole set of a service changes.

    ``snap`` is the service's current snapshot (None: the service is new).  Endpoints that stay
    keep their position (and the registered object, when equal); new ones are appended.  When
    nothing is published, ``snap`` remembers the order ``new`` gave, for the next update.
    """
    if snap is None or not snap._table:
        if new or snap is None:
            return _all_added(new, keys)
        return _UNCHANGED
    update = _window_diff(snap, new, keys)
    return update if update is not None else _address_diff(snap, new, keys)


def _all_added(new: list[Endpoint], keys: list[tuple[Any, ...]]) -> FullUpdate:
    # Into an empty (or new) service: everything is added.
    wanted = dict(zip(map(_address, new), new))
    order: Optional[_Order] = (new, keys)
    if len(wanted) < len(new):  # an address twice: its last endpoint, in its first place
        new, order = list(wanted.values()), None
    return FullUpdate([], [], new, wanted, order, None)


def _window_diff(snap: ServiceSnapshot, new: list[Endpoint],
                 keys: list[tuple[Any, ...]]) -> Optional[FullUpdate]:
    # Providers send their endpoints in a stable order, so an update is usually the last
    # one with a few endpoints inserted, removed or changed somewhere.  The common head and
    # tail (equal keys, position by position) stay as they are; only the window between
    # them is diffed, by address.  None when the window is too wide or is not
    # self-contained (an address also in the head or tail): the caller diffs by address.
    current = snap._table
    if snap._order is not None:
        last, last_keys = snap._order
    else:
        last = list(snap.endpoints)
        last_keys = list(map(_key, last))
    if abs(len(new) - len(last)) > _WINDOW_MAX:
        return None
    shortest = min(len(new), len(last))
    head = common_head(keys, last_keys, shortest)
    if head == len(new) == len(last):
        snap._order = (last, last_keys)
        return _UNCHANGED  # the same endpoints in the same order: nothing to do
    tail = common_tail(keys, last_keys, shortest - head)
    arriving = new[head:len(new) - tail]
    leaving = last[head:len(last) - tail]
    if len(arriving) + len(leaving) > _WINDOW_MAX:
        return None
    window = dict(zip(map(_address, arriving), arriving))
    gone = set(map(_address, leaving))
    if len(window) < len(arriving) or any(a in current and a not in gone for a in window):
        return None  # an address given twice
    removed = [current[a] for a in _in_table_order(current, gone - window.keys())]
    changed = {a: e for a, e in window.items()
               if a in gone and e.compare_key != current[a].compare_key}
    added = [e for a, e in window.items() if a not in current]
    table = _table_after(current, removed, changed, added) if (
        removed or changed or added) else current
    order = (last[:head] + list(map(table.__getitem__, window)) + last[len(last) - tail:],
             last_keys[:head] + keys[head:len(new) - tail] + last_keys[len(last) - tail:])
    if table is current:  # the same endpoints in another order: nothing to publish
        snap._order = order
        return _UNCHANGED
    return FullUpdate(removed, _pairs(current, changed), added, table, order,
                      delta_of(snap, added, removed, changed))


def _address_diff(snap: ServiceSnapshot, new: list[Endpoint],
                  keys: list[tuple[Any, ...]]) -> FullUpdate:
    current = snap._table
    addresses = list(map(_address, new))
    wanted = dict(zip(addresses, new))
    if len(wanted) < len(new):  # an address twice: its last endpoint, in its first place
        new, addresses = list(wanted.values()), list(wanted)
        keys = list(map(_key, new))
    registered_keys = map(_key, map(current.get, addresses, itertools.repeat(_ABSENT)))
    differ = list(itertools.compress(range(len(new)),
                                     map(operator.ne, keys, registered_keys)))
    known = list(map(current.__contains__, map(addresses.__getitem__, differ)))
    added = list(map(new.__getitem__, itertools.compress(differ, map(operator.not_, known))))
    changed = {addresses[i]: new[i] for i in itertools.compress(differ, known)}
    removed = []
    if len(current) + len(added) > len(wanted):  # in the current order
        removed = [current[a] for a in itertools.filterfalse(wanted.__contains__, current)]
    if not (removed or changed or added):
        snap._order = (list(map(current.__getitem__, addresses)), keys)  # another order
        return _UNCHANGED
    table = _table_after(current, removed, changed, added)
    return FullUpdate(removed, _pairs(current, changed), added, table,
                      (list(map(table.__getitem__, addresses)), keys),
                      delta_of(snap, added, removed, changed))


def _table_after(current: dict[str, Endpoint], removed: list[Endpoint],
                 changed: dict[str, Endpoint], added: list[Endpoint]) -> dict[str, Endpoint]:
    # The current table with the removed taken out, the changed replaced in place and the
    # added appended.
    table = dict(current)
    collections.deque(map(table.pop, map(_address, removed)), maxlen=0)  # del each, in C
    table.update(changed)
    table.update(zip(map(_address, added), added))
    return table


def _pairs(current: dict[str, Endpoint], changed: dict[str, Endpoint],
           ) -> list[tuple[Endpoint, Endpoint]]:
    """Each changed endpoint with the one it replaces, in the current table's order."""
    return [(changed[a], current[a]) for a in _in_table_order(current, changed.keys())]


def _in_table_order(table: dict[str, Endpoint], addresses: Collection[str]) -> list[str]:
    """``addresses`` (all in ``table``) in the table's order."""
    if len(addresses) < 2:
        return list(addresses)
    return list(filter(addresses.__contains__, table))
