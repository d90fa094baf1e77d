"""Hashing: ``maglev``, Google's Maglev lookup table, with optional bounded loads.

:class:`~tai_lb.strategies.Maglev` fills a table of a prime number of slots with the endpoints,
each taking slots in its own pseudo-random order, turn by turn, in proportion to its weight
(Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016, as
Envoy's ``MAGLEV`` load balancer does).  A pick is one hash of the routing key and one index
into the table.  The table's pieces are plain functions beside it: :func:`maglev_permutation`
(an endpoint's order of slots, from MD5, stable across processes) and :func:`build_table`.  A
picker keeps the :class:`MaglevTable` it picks from, which :func:`table_of` reads.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
import random
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from .._settings import check_int, shown
from ..exceptions import ConfigError
from ..stats import EndpointStats
from .base import EXCLUDING, Picker, RoutingKey, Strategy, weight_of
from .hashing import _md5, _unpack_first, bounded_picker, check_load_bound, excluding_walk, key_hash

__all__ = ["Maglev", "MaglevTable", "build_table", "is_prime", "maglev_permutation", "table_of"]

DEFAULT_TABLE_SIZE = 65537
"""The default ``table_size`` of ``maglev``: a prime, Envoy's default and the paper's example."""

MIN_TABLE_SIZE = 7
# Envoy allows up to 5,000,011, but a build in Python takes about 2 s at 1,000,003 and 8 s at
# 5,000,011; 1,000,003 slots keep 10,000 endpoints within about 1% of their share.
MAX_TABLE_SIZE = 1_000_003

_address_of = operator.attrgetter("endpoint.address")
_TABLE = "_tai_lb_maglev"  # the picker's attribute holding its MaglevTable: see table_of()
_unpack_halves = struct.Struct("<QQ").unpack


class Maglev(Strategy):
    """Google's Maglev hashing: a key maps to an endpoint through a table of ``table_size`` slots.

    Every endpoint takes slots in its own order (an offset and a step from the MD5 of its
    address), in turns that follow its weight, until the table is full: each endpoint ends with
    its weight's share of the slots, to within one slot, so keys spread more evenly than on a
    ring of a similar size (within 1% of the mean for ten endpoints and the default table).
    Removing one endpoint of n moves its keys and a few more (at most about twice its share).
    A key (str, bytes or int) is hashed with MD5 as for ``consistent_hash``, and the table
    depends only on the endpoints' addresses and weights, so every process maps a key to the
    same endpoint.  With no key a pick is random.

    A pick is O(1): one hash and one index.  The table is built again (O(table_size log
    table_size)) for each new set of endpoints or weights, off the request path.

    :param table_size: the number of slots, a prime; at least 100 times the number of
        endpoints keeps each one's share within about 1% of its weight's.
    :param load_bound: at most this multiple of the mean load per endpoint (for example 1.25;
        an endpoint that is full passes the key to the owner of the next slot that has room, as
        ``consistent_hash`` does on its ring); None disables it.
    """

    name = "maglev"

    def __init__(self, *, table_size: int = DEFAULT_TABLE_SIZE,
                 load_bound: Optional[float] = None,
                 rng: Optional[random.Random] = None) -> None:
        super().__init__(rng=rng)
        check_table_size(table_size)
        self.table_size = table_size
        self.load_bound = check_load_bound(load_bound)

    def options(self) -> dict[str, Any]:
        """The table's settings."""
        return {"table_size": self.table_size, "load_bound": self.load_bound}

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        return self._picker(self._build(tuple(candidates)))

    def prepare_next(self, candidates: Sequence[EndpointStats], previous: Picker) -> Picker:
        """Build the table again, unless the endpoints and their weights are those of
        ``previous``'s table (in any order): then it is the same table, and is kept."""
        cls = type(self)
        if cls.prepare is not Maglev.prepare and cls.prepare_next is Maglev.prepare_next:
            # A subclass that prepares its own way (filters the candidates, wraps the picker)
            # keeps doing so: keeping the previous table would go around it.
            return self.prepare(candidates)
        items = tuple(candidates)
        last = table_of(previous)
        if last is not None and len(last.owners) == self.table_size:
            ordered = tuple(sorted(items, key=_address_of))
            if ordered == last.ordered and list(map(weight_of, ordered)) == last.weights:
                return self._picker(MaglevTable(items, ordered, last.weights, last.owners,
                                                last.distinct))
        return self._picker(self._build(items))

    def _build(self, items: tuple[EndpointStats, ...]) -> MaglevTable:
        ordered = tuple(sorted(items, key=_address_of))
        weights: list[int] = list(map(weight_of, ordered))
        owners = build_table(ordered, self.table_size)
        distinct = len(set(map(id, owners)))
        return MaglevTable(items, ordered, weights, owners, distinct)

    def _picker(self, table: MaglevTable) -> Picker:
        items, owners = table.items, table.owners
        size = len(items)
        table_size = len(owners)
        draw = self.rng.random
        md5, unpack = _md5, _unpack_first

        def locate(key: RoutingKey) -> int:
            return key_hash(key) % table_size

        if self.load_bound is not None:
            picker = bounded_picker(items, owners, locate, table.distinct, self.load_bound,
                                    draw)
        else:
            def pick(key: Optional[RoutingKey]) -> EndpointStats:
                if key is None:
                    return items[int(draw() * size)]
                # key_hash(), inlined for the common str key: this is the hot path
                h = (unpack(md5(key.encode()).digest())[0] if type(key) is str
                     else key_hash(key))
                return owners[h % table_size]
            picker = pick
        # A retry walks the table from the key's slot to the first endpoint not excluded.
        setattr(picker, EXCLUDING, excluding_walk(items, owners, locate, table.distinct, draw))
        setattr(picker, _TABLE, table)
        return picker


class MaglevTable:
    """A built Maglev table and what it was built from, kept on its picker.

    ``items`` are the candidates, ``ordered`` the same sorted by address and ``weights`` the
    weight of each of those; ``owners`` is the table (the endpoint of each slot) and
    ``distinct`` the number of endpoints that own at least one slot.  Read them, never change
    them: a picker in use reads the same lists.
    """

    __slots__ = ("distinct", "items", "ordered", "owners", "weights")

    def __init__(self, items: tuple[EndpointStats, ...], ordered: tuple[EndpointStats, ...],
                 weights: list[int], owners: list[EndpointStats], distinct: int) -> None:
        self.items = items
        self.ordered = ordered
        self.weights = weights
        self.owners = owners
        self.distinct = distinct


def table_of(picker: Optional[Picker]) -> Optional[MaglevTable]:
    """The table a ``maglev`` picker picks from, or None for any other picker (or for None)."""
    table: Optional[MaglevTable] = getattr(picker, _TABLE, None)
    return table


def is_prime(number: int) -> bool:
    """Whether ``number`` is a prime (trial division: meant for table sizes, up to millions)."""
    if number < 2:
        return False
    if number % 2 == 0:
        return number == 2
    return all(number % d for d in range(3, math.isqrt(number) + 1, 2))


def check_table_size(value: object) -> int:
    """``value`` if it is a prime from 7 to 1,000,003, else a :class:`ConfigError` naming
    ``table_size`` (with the nearest prime above, for a number in range)."""
    what = "a prime"
    size = check_int(value, "table_size", MIN_TABLE_SIZE, MAX_TABLE_SIZE, what=what)
    if not is_prime(size):
        higher = next(n for n in itertools.count(size + 1) if is_prime(n))
        raise ConfigError("table_size", f"must be {what} from {MIN_TABLE_SIZE} to "
                                        f"{MAX_TABLE_SIZE}, got {shown(value)} "
                                        f"(the next prime is {higher})")
    return size


def maglev_permutation(address: str, table_size: int) -> tuple[int, int]:
    """The ``(offset, skip)`` of an endpoint: it takes the free slots among ``offset``,
    ``offset + skip``, ``offset + 2 * skip``... (mod ``table_size``) in that order.

    Both come from the two halves of the MD5 digest of the address, so they are the same in
    every process; ``skip`` is never 0, and with a prime ``table_size`` the order visits every
    slot.
    """
    first, second = _unpack_halves(_md5(address.encode()).digest())
    return first % table_size, second % (table_size - 1) + 1


def _turns(weights: Sequence[int]) -> Iterator[int]:
    """Endpoint indices in the order they take slots, forever: each endpoint's k-th turn comes
    in round ``ceil(k * greatest weight / its weight)``, and endpoints of one round go in
    index order.  With equal weights, plain rotation."""
    if weights.count(weights[0]) == len(weights):
        yield from itertools.cycle(range(len(weights)))
        return
    top = max(weights)
    rounds = [(-(-top // weight), index, 1) for index, weight in enumerate(weights)]
    heapq.heapify(rounds)
    while True:
        _, index, turn = rounds[0]
        yield index
        turn += 1
        heapq.heapreplace(rounds, (-(-turn * top // weights[index]), index, turn))


def build_table(ordered: Sequence[EndpointStats], table_size: int) -> list[EndpointStats]:
    """The Maglev table of ``ordered`` (non-empty, sorted by address): the owner of each slot.

    The endpoints take turns (in proportion to their weights, see the module's docstring), and
    at each turn an endpoint takes the next free slot in its own order of slots
    (:func:`maglev_permutation`), until every slot is taken.  The same endpoints and weights
    give the same table in every process.
    """
    places = [maglev_permutation(stats.endpoint.address, table_size) for stats in ordered]
    nexts = [offset for offset, _ in places]
    skips = [skip for _, skip in places]
    slots = [-1] * table_size
    left = table_size
    for index in _turns(list(map(weight_of, ordered))):
        slot, skip = nexts[index], skips[index]
        while slots[slot] >= 0:
            slot += skip
            if slot >= table_size:
                slot -= table_size
        slots[slot] = index
        left -= 1
        if not left:
            break
        slot += skip
        nexts[index] = slot - table_size if slot >= table_size else slot
    return list(map(ordered.__getitem__, slots))
