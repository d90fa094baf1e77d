"""Load-balancing strategies: small objects that turn a set of endpoints into a picker.

A :class:`Strategy` is configuration only.  For each registry snapshot the balancer calls
:meth:`Strategy.prepare <tai_lb.strategies.Strategy.prepare>` once with the endpoints' live
:class:`~tai_lb.stats.EndpointStats`; the returned *picker* holds whatever the algorithm
precomputes (a hash ring, cumulative weights, the smooth weighted round-robin sequence) and is
called for every pick with the request's routing key.  Pickers take no lock on the common path.

=========================  ===========================================================  ========
name                       picks                                                        per pick
=========================  ===========================================================  ========
``round_robin``            each endpoint in turn                                        O(1)
``weighted_round_robin``   in proportion to weight, spread evenly (nginx's smooth WRR)  O(1)
``random``                 uniformly at random                                          O(1)
``weighted``               at random, in proportion to weight                           O(log n)
``least_connections``      fewest in flight per weight; two random choices past 8       O(1) [#]_
``consistent_hash``        the key's owner on a ketama ring (random without a key)      O(log n)
``peak_ewma``              two random choices, lower peak-EWMA latency x (in flight+1)  O(1)
=========================  ===========================================================  ========

.. [#] O(log n) when weights differ: the two choices are drawn in proportion to weight.

A plain function ``f(candidates, key) -> EndpointStats`` is accepted wherever a strategy is; it is
wrapped in :class:`FunctionStrategy` and called with every candidate on every pick.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import heapq
import itertools
import math
import operator
import random
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, Callable, ClassVar, Optional, Union

from .._forksafe import ForkRandom
from .._sequences import common_head, common_tail
from .._settings import check_int, check_number, key_text, shown
from ..endpoint import Endpoint
from ..exceptions import ConfigError
from ..stats import DEFAULT_DECAY, DEFAULT_LATENCY, EndpointStats

__all__ = [
    "STRATEGIES",
    "ConsistentHash",
    "FunctionStrategy",
    "LeastConnections",
    "PeakEwma",
    "Picker",
    "Random",
    "RoundRobin",
    "RoutingKey",
    "Strategy",
    "StrategyLike",
    "Weighted",
    "WeightedRoundRobin",
    "resolve_strategy",
]

RoutingKey = Union[str, bytes, int]
"""A request's routing key, as used by ``consistent_hash`` and affinity."""

Picker = Callable[[Optional[RoutingKey]], EndpointStats]
"""A prepared strategy: called with the routing key (or None), returns the chosen endpoint."""

StrategyFunction = Callable[[Sequence[EndpointStats], Optional[RoutingKey]],
                            Union[EndpointStats, Endpoint]]

_FULL_SCAN_MAX = 8
_MAX_LOAD_BOUND = 1000.0  # the highest consistent_hash load_bound: as good as none
_weight_of = operator.attrgetter("endpoint.weight")
_address_of = operator.attrgetter("endpoint.address")

EXCLUDING = "excluding"
"""A picker may carry ``picker.excluding(key, exclude)``: a pick that avoids the addresses in
``exclude`` (or returns None when none remains), cheaper or truer than the balancer's fallback."""


class Strategy(ABC):
    """Base of every strategy: ``prepare(candidates)`` returns a picker for one snapshot.

    :param rng: the random source (a seeded :class:`random.Random` makes picks repeatable).
        When None, the strategy makes its own, reseeded in every forked child so that workers
        forked from one parent do not pick in step; a source given here is left as it is, and
        children forked after it was given draw the same numbers (seed one per process if they
        must differ).
    """

    name: ClassVar[str] = ""

    def __init__(self, *, rng: Optional[random.Random] = None) -> None:
        self.rng = rng if rng is not None else ForkRandom()

    @abstractmethod
    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        """Precompute what picks need over ``candidates`` (never empty) and return a picker."""

    def prepare_next(self, candidates: Sequence[EndpointStats], previous: Picker) -> Picker:
        """As :meth:`prepare`, for a service whose last picker from this strategy is ``previous``.

        The balancer calls this when a service's candidates change.  A strategy whose
        preparation is costly (a hash ring) may update what ``previous`` holds rather than start
        over; by default, this is :meth:`prepare`.
        """
        return self.prepare(candidates)

    def options(self) -> dict[str, Any]:
        """The strategy's settings, as shown by ``status()``."""
        return {}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({settings})"


def _weights_equal(candidates: Sequence[EndpointStats]) -> bool:
    weights = list(map(_weight_of, candidates))
    return weights.count(weights[0]) == len(weights)


class RoundRobin(Strategy):
    """Each endpoint in turn, from a random starting point (so processes do not move in step).

    :param start: the index to start from; random when None.
    """

    name = "round_robin"

    def __init__(self, *, start: Optional[int] = None, rng: Optional[random.Random] = None):
        super().__init__(rng=rng)
        self.start = start

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        size = len(items)
        start = self.start if self.start is not None else self.rng.randrange(size)
        counter = itertools.count(start)  # next() on a count is atomic in CPython

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            return items[next(counter) % size]

        return pick


class WeightedRoundRobin(Strategy):
    """nginx's smooth weighted round robin: shares follow weights, interleaved evenly.

    The whole period (sum of weights over their gcd) is computed once per snapshot when it is at
    most ``max_period`` picks long; past that, picks step the same algorithm under a lock.

    :param start: position in the period to start from; random when None.
    """

    name = "weighted_round_robin"

    def __init__(self, *, start: Optional[int] = None, max_period: int = 1 << 16,
                 rng: Optional[random.Random] = None) -> None:
        super().__init__(rng=rng)
        self.start = start
        self.max_period = max_period

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        weights: list[int] = list(map(_weight_of, items))
        divisor = math.gcd(*weights)
        if divisor > 1:
            weights = [weight // divisor for weight in weights]
        period = sum(weights)
        start = self.start if self.start is not None else self.rng.randrange(period)
        if period <= self.max_period:
            order: tuple[EndpointStats, ...] = tuple(
                map(items.__getitem__, smooth_weighted_order(weights, period)))
            counter = itertools.count(start)

            def pick(key: Optional[RoutingKey]) -> EndpointStats:
                return order[next(counter) % period]

            return pick

        # Too long to precompute: step online, from a start within the first round only, so a
        # rebuild never walks millions of steps.
        sequence = smooth_weighted_sequence(weights)
        for _ in range(start % len(items)):
            next(sequence)
        lock = threading.Lock()

        def pick_online(key: Optional[RoutingKey]) -> EndpointStats:
            with lock:
                return items[next(sequence)]

        return pick_online


def smooth_weighted_sequence(weights: Sequence[int]) -> Iterator[int]:
    """Yield nginx's smooth weighted round-robin order of indices into ``weights``, forever.

    nginx adds every weight to its peer's current value, picks the largest (first on ties) and
    takes the total off it.  After t picks a peer's value is ``t*w - total*k`` (k: times picked),
    so among peers of equal weight the largest is the one picked least (then lowest index).  One
    heap per distinct weight makes each step O(distinct weights + log n) instead of O(n).
    """
    total = sum(weights)
    classes: dict[int, list[tuple[int, int]]] = {}
    for index, weight in enumerate(weights):
        classes.setdefault(weight, []).append((0, index))
    heaps = list(classes.items())
    for _, heap in heaps:
        heapq.heapify(heap)
    step = 0
    while True:
        step += 1
        best: Optional[tuple[int, int, list[tuple[int, int]]]] = None
        for weight, heap in heaps:
            picked, index = heap[0]
            value = step * weight - total * picked
            if best is None or value > best[0] or (value == best[0] and index < best[1]):
                best = (value, index, heap)
        assert best is not None
        _, index, heap = best
        picked, _ = heapq.heappop(heap)
        heapq.heappush(heap, (picked + 1, index))
        yield index


def smooth_weighted_order(weights: Sequence[int], count: int) -> list[int]:
    """The first ``count`` indices of :func:`smooth_weighted_sequence`, computed run by run.

    Peers of equal weight are picked in turn, by index, so the sequence is made of runs of one
    weight class taking consecutive turns.  Each run's length follows from the values (linear in
    the step number) of the classes that could overtake it, so the work grows with the number of
    runs, not of steps: a period over 10,000 endpoints of one or two weights takes a few runs,
    each copied as a slice.
    """
    total = sum(weights)
    distinct = set(weights)
    by_weight: dict[int, list[int]] = {}
    if len(distinct) <= 8:  # a pass in C per weight
        for weight in distinct:
            by_weight[weight] = list(itertools.compress(
                range(len(weights)), map(operator.eq, weights, itertools.repeat(weight))))
    else:
        for index, weight in enumerate(weights):
            by_weight.setdefault(weight, []).append(index)
    classes = [(weight, members, len(members)) for weight, members in by_weight.items()]
    picked = [0] * len(classes)  # picks of each class so far
    order: list[int] = []
    step = 1
    while len(order) < count:
        # The winner of this step: nginx's highest value, the lowest index on a tie.  A peer's
        # value is step * weight - total * (its picks so far).
        best = 0
        best_value = best_index = -1
        for number, (weight, members, size) in enumerate(classes):
            rounds, position = divmod(picked[number], size)
            value = step * weight - total * rounds
            if best_index < 0 or value > best_value or (
                    value == best_value and members[position] < best_index):
                best, best_value, best_index = number, value, members[position]
        weight, members, size = classes[best]
        position = picked[best] % size
        run = min(size - position, count - len(order))  # the rest of its round at most
        # A heavier class gains (its weight - this one's) per step on the winner; it takes over
        # when it gets ahead, or draws level with the lower index.
        for number, (other, other_members, other_size) in enumerate(classes):
            if other <= weight:
                continue
            rounds, other_position = divmod(picked[number], other_size)
            gap = best_value - (step * other - total * rounds)
            steps, rest = divmod(gap, other - weight)
            if not (rest == 0 and steps < run
                    and members[position + steps] > other_members[other_position]):
                steps += 1
            run = min(run, steps)
        order += members[position:position + run]
        picked[best] += run
        step += run
    return order


class Random(Strategy):
    """Uniformly at random."""

    name = "random"

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        size = len(items)
        draw = self.rng.random

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            return items[int(draw() * size)]

        return pick


class Weighted(Strategy):
    """At random, in proportion to weight (cumulative weights and a binary search)."""

    name = "weighted"

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        cumulative = list(itertools.accumulate(map(_weight_of, items)))
        total = cumulative[-1]
        last = len(items) - 1
        draw = self.rng.random
        search = bisect.bisect_right

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            return items[min(search(cumulative, draw() * total), last)]

        return pick


class LeastConnections(Strategy):
    """Fewest requests in flight per unit of weight.

    Up to 8 endpoints of equal weight are all compared (ties broken at random); larger or
    weighted sets use the power of two choices: two distinct endpoints drawn at random (in
    proportion to weight) and the less loaded of the two, as Envoy's least_request does.
    """

    name = "least_connections"

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        size = len(items)
        draw = self.rng.random
        if size == 1:
            only = items[0]
            return lambda key: only
        if _weights_equal(items):
            if size <= _FULL_SCAN_MAX:
                def scan(key: Optional[RoutingKey]) -> EndpointStats:
                    # One pass; ties broken uniformly by reservoir sampling.
                    best = items[0]
                    best_load = len(best._in_flight)
                    ties = 1
                    for i in range(1, size):
                        c = items[i]
                        load = len(c._in_flight)
                        if load < best_load:
                            best, best_load, ties = c, load, 1
                        elif load == best_load:
                            ties += 1
                            if draw() * ties < 1.0:
                                best = c
                    return best
                return scan

            def two_choices(key: Optional[RoutingKey]) -> EndpointStats:
                i = int(draw() * size)
                j = int(draw() * (size - 1))
                a, b = items[i], items[j + 1 if j >= i else j]
                return a if len(a._in_flight) <= len(b._in_flight) else b
            return two_choices

        cumulative = list(itertools.accumulate(map(_weight_of, items)))
        total = cumulative[-1]
        last = size - 1
        search = bisect.bisect_right

        def weighted_two_choices(key: Optional[RoutingKey]) -> EndpointStats:
            i = min(search(cumulative, draw() * total), last)
            j = i
            for _ in range(3):
                j = min(search(cumulative, draw() * total), last)
                if j != i:
                    break
            else:  # one endpoint holds nearly all the weight: any other will do
                j = (i + 1 + int(draw() * last)) % size
            a, b = items[i], items[j]
            # a.in_flight / a.weight <= b.in_flight / b.weight, without division
            a_load = len(a._in_flight) * b.endpoint.weight
            return a if a_load <= len(b._in_flight) * a.endpoint.weight else b
        return weighted_two_choices


class ConsistentHash(Strategy):
    """A ketama ring: a key always maps to the same endpoint while that endpoint stays.

    Every endpoint gets ``vnodes`` points on a 32-bit ring per unit of weight (MD5 of
    ``"address-i"``, four points per digest, as libketama), so adding or removing one endpoint
    moves only the keys next to its points.  A key (str, bytes or int) is hashed with MD5 too;
    Python's ``hash()`` is never used because it differs between processes.  With no key a pick
    is random.  With ``load_bound`` set (for example 1.25), an endpoint that already has more than
    ``load_bound`` times its fair share of the service's requests in flight is passed over for the
    next one on the ring (consistent hashing with bounded loads).

    The default of 1,000 points per unit of weight keeps every endpoint's share of keys within
    about 10% of the mean for ten endpoints.  The ring holds at most ``max_ring_size`` points
    (65,536 by default, so a build takes a few tens of milliseconds even for 10,000 endpoints,
    and a change of a few endpoints updates the previous ring in a few milliseconds): past that,
    every endpoint's points are halved, as often as needed.  Because the
    factor is a power of two, it changes only when the service's total weight crosses a power
    of two (66, 132, 263... endpoints of weight 1 by default); only a change across one of those
    sizes moves keys between endpoints that stay.

    :param vnodes: ring points per unit of weight.
    :param load_bound: at most this multiple of the mean load per endpoint; None disables it.
    :param max_ring_size: the most points on the ring; more endpoints get fewer points each.
    """

    name = "consistent_hash"

    def __init__(self, *, vnodes: int = 1000, load_bound: Optional[float] = None,
                 max_ring_size: int = 1 << 16, rng: Optional[random.Random] = None) -> None:
        super().__init__(rng=rng)
        check_int(vnodes, "vnodes", 4, 10_000)
        if load_bound is not None:
            # Bounded, so the capacity (the bound times the mean load) stays a finite number.
            load_bound = check_number(load_bound, "load_bound", 1.0, _MAX_LOAD_BOUND,
                                      what="a number")
        check_int(max_ring_size, "max_ring_size", 1024, 1 << 24)
        self.vnodes = vnodes
        self.load_bound = load_bound
        self.max_ring_size = max_ring_size
        self._points: dict[tuple[str, int], tuple[int, ...]] = {}

    def options(self) -> dict[str, Any]:
        """The ring's settings."""
        return {"vnodes": self.vnodes, "load_bound": self.load_bound,
                "max_ring_size": self.max_ring_size}

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        return self._picker(self._build(tuple(candidates)))

    def prepare_next(self, candidates: Sequence[EndpointStats], previous: Picker) -> Picker:
        """Update the previous ring when few endpoints came, went or changed weight.

        The points of those endpoints are taken out of, or put into, a copy of the ring, which
        then equals a ring built from scratch: a change to one endpoint of 10,000 costs a few
        milliseconds instead of a whole build.  Otherwise (a larger change, or one that changes
        the points per endpoint) the ring is built again.
        """
        cls = type(self)
        if cls.prepare is not ConsistentHash.prepare and (
                cls.prepare_next is ConsistentHash.prepare_next):
            # A subclass that prepares its own way (filters the candidates, wraps the picker)
            # keeps doing so: updating the previous ring would go around it.
            return self.prepare(candidates)
        items = tuple(candidates)
        last: Optional[_Ring] = getattr(previous, _RING, None)
        ring = self._update(last, items) if last is not None else None
        return self._picker(ring if ring is not None else self._build(items))

    def _build(self, items: tuple[EndpointStats, ...]) -> _Ring:
        hashes, owners = build_ring(items, self.vnodes, self.max_ring_size, self._points)
        self._forget_gone(items)
        weights: list[int] = list(map(_weight_of, items))
        shift, starts = bucket_index(hashes)
        return _Ring(items, weights, self._scale(sum(weights)), hashes, owners, shift, starts)

    def _forget_gone(self, items: tuple[EndpointStats, ...]) -> None:
        # The points of endpoints long gone: after a build and after an update alike, or a
        # service whose endpoints are replaced a few at a time (rolling restarts) would keep
        # the points of every endpoint it ever had.
        cache = self._points
        if len(cache) > 2 * len(items) + 64:
            current = {c.endpoint.address for c in items}
            self._points = {k: v for k, v in cache.items() if k[0] in current}

    def _scale(self, total_weight: int) -> float:
        # As build_ring: the factor, a power of two, that fits the ring in max_ring_size.
        scale = 1.0
        while total_weight * self.vnodes * scale > self.max_ring_size:
            scale /= 2.0
        return scale

    def _update(self, last: _Ring, items: tuple[EndpointStats, ...]) -> Optional[_Ring]:
        """``last`` changed for ``items``, or None when building again is as good."""
        weights: list[int] = list(map(_weight_of, items))
        if items == last.items and weights == last.weights:
            return last  # the same candidates and weights: the same ring
        scale = self._scale(sum(weights))
        if scale != last.scale:
            return None  # every endpoint's number of points changes
        # The candidates keep their order from one snapshot to the next: the difference is the
        # window between the common head and tail (of candidates and of weights, compared in
        # C; the figures compare by identity).
        shortest = min(len(items), len(last.items))
        head = min(common_head(items, last.items, shortest),
                   common_head(weights, last.weights, shortest))
        tail = min(common_tail(items, last.items, shortest - head),
                   common_tail(weights, last.weights, shortest - head))
        arriving = list(zip(items[head:len(items) - tail], weights[head:len(items) - tail]))
        leaving = list(zip(last.items[head:len(last.items) - tail],
                           last.weights[head:len(last.items) - tail]))
        if len(arriving) + len(leaving) > _RING_UPDATE_MAX:
            return None
        came = [m for m in arriving if m not in leaving]
        went = [m for m in leaving if m not in arriving]
        if not (came or went):  # only their order changed: no point moves
            return _Ring(items, weights, scale, last.hashes, last.owners, last.shift, last.starts)
        hashes, owners = list(last.hashes), list(last.owners)
        moved: list[tuple[int, int]] = []  # (point, +1 or -1) for the bucket index
        for stats, weight in went:
            for point in self._points_of(stats.endpoint.address, weight, scale):
                index = bisect.bisect_left(hashes, point)
                while owners[index] is not stats:  # an equal point of another endpoint
                    index += 1
                del hashes[index], owners[index]
                moved.append((point, -1))
        for stats, weight in came:
            address = stats.endpoint.address
            for point in self._points_of(address, weight, scale):
                index = bisect.bisect_left(hashes, point)
                # Equal points go to the lower address, as in build_ring.
                while (index < len(hashes) and hashes[index] == point
                       and owners[index].endpoint.address < address):
                    index += 1
                hashes.insert(index, point)
                owners.insert(index, stats)
                moved.append((point, 1))
        if came:
            self._forget_gone(items)
        shift, starts = shift_bucket_index(last.shift, last.starts, hashes, moved)
        return _Ring(items, weights, scale, hashes, owners, shift, starts)

    def _points_of(self, address: str, weight: int, scale: float) -> tuple[int, ...]:
        spec = (address, max(4, int(weight * self.vnodes * scale)))
        points = self._points.get(spec)
        if points is None:
            points = self._points[spec] = ring_points(*spec)
        return points

    def _picker(self, ring: _Ring) -> Picker:
        items = ring.items
        hashes, owners, shift, starts = ring.hashes, ring.owners, ring.shift, ring.starts
        ring_size = len(hashes)
        size = len(items)
        draw = self.rng.random
        search = bisect.bisect_right
        bound = self.load_bound
        md5, unpack = _md5, _unpack_first

        def excluding(key: Optional[RoutingKey],
                      exclude: Collection[str]) -> Optional[EndpointStats]:
            # The next owner clockwise that is not excluded: where the key would go if the
            # excluded endpoints were removed from the ring.
            if key is None:
                remaining = [c for c in items if c.endpoint.address not in exclude]
                return remaining[int(draw() * len(remaining))] if remaining else None
            h = key_hash(key)
            bucket = h >> shift
            i = search(hashes, h, starts[bucket], starts[bucket + 1])
            for step in range(ring_size):
                owner = owners[(i + step) % ring_size]
                if owner.endpoint.address not in exclude:
                    return owner
            return None

        if bound is None:
            def pick(key: Optional[RoutingKey]) -> EndpointStats:
                if key is None:
                    return items[int(draw() * size)]
                # key_hash(), inlined for the common str key: this is the hot path
                h = (unpack(md5(key.encode()).digest())[0] if type(key) is str
                     else key_hash(key))
                bucket = h >> shift
                i = search(hashes, h, starts[bucket], starts[bucket + 1])
                return owners[i if i < ring_size else 0]
            setattr(pick, EXCLUDING, excluding)
            setattr(pick, _RING, ring)
            return pick

        service_load = items[0]._service_load

        def pick_bounded(key: Optional[RoutingKey]) -> EndpointStats:
            if key is None:
                return items[int(draw() * size)]
            h = key_hash(key)
            bucket = h >> shift
            i = search(hashes, h, starts[bucket], starts[bucket + 1])
            capacity = math.ceil(bound * (len(service_load) + 1) / size)
            seen: set[int] = set()
            for step in range(ring_size):
                owner = owners[(i + step) % ring_size]
                if len(owner._in_flight) < capacity:
                    return owner
                seen.add(id(owner))
                if len(seen) == size:
                    break
            return owners[i % ring_size]
        setattr(pick_bounded, EXCLUDING, excluding)
        setattr(pick_bounded, _RING, ring)
        return pick_bounded


_RING = "_tai_lb_ring"  # the picker's attribute holding its _Ring, for prepare_next()
# A ring update that moves more endpoints than this builds the ring again instead.
_RING_UPDATE_MAX = 64


class _Ring:
    """A built ring and what it was built from, kept on its picker for the next update.

    ``items`` are the candidates and ``weights`` the weight each had; the ring's lists are
    never changed once built (an update changes copies).
    """

    __slots__ = ("hashes", "items", "owners", "scale", "shift", "starts", "weights")

    def __init__(self, items: tuple[EndpointStats, ...], weights: list[int], scale: float,
                 hashes: list[int], owners: list[EndpointStats], shift: int,
                 starts: list[int]) -> None:
        self.items = items
        self.weights = weights
        self.scale = scale
        self.hashes = hashes
        self.owners = owners
        self.shift = shift
        self.starts = starts


def _find_md5() -> Callable[[bytes], Any]:
    # Passing usedforsecurity=False costs more than hashing a short key, so pass it only where
    # the OpenSSL build refuses MD5 without it (FIPS mode).
    try:
        hashlib.md5(b"")
    except ValueError:  # pragma: no cover - FIPS systems only
        return functools.partial(hashlib.md5, usedforsecurity=False)
    return hashlib.md5


_md5 = _find_md5()
_unpack_first = struct.Struct("<I").unpack_from


def key_hash(key: RoutingKey) -> int:
    """The 32-bit ring position of a routing key (MD5, stable across processes)."""
    if isinstance(key, str):
        data = key.encode("utf-8")
    elif isinstance(key, bytes):
        data = key
    elif isinstance(key, int) and not isinstance(key, bool):
        data = str(key).encode("ascii")
    else:
        raise TypeError(f"a routing key must be str, bytes or int, got {type(key).__name__}")
    first: int = _unpack_first(_md5(data).digest())[0]
    return first


def bucket_index(hashes: Sequence[int]) -> tuple[int, list[int]]:
    """A table that narrows a ring search to one bucket of the 32-bit space.

    The space is cut into a power of two of equal buckets, about one per point; ``starts[b]`` is
    the index of the first point in bucket ``b`` or after it.  A lookup bisects only between
    ``starts[b]`` and ``starts[b + 1]``, usually zero to two points, whatever the ring's size.
    Returns the shift that turns a hash into its bucket, and ``starts``.
    """
    bits = max(1, min(24, len(hashes).bit_length() - 1))
    shift = 32 - bits
    total = len(hashes)
    starts = [total] * ((1 << bits) + 1)
    for index in range(total - 1, -1, -1):  # backwards, so each bucket keeps its first point
        starts[hashes[index] >> shift] = index
    for bucket in range((1 << bits) - 1, -1, -1):
        if starts[bucket] == total:  # an empty bucket starts where the next one does
            starts[bucket] = starts[bucket + 1]
    return shift, starts


def shift_bucket_index(shift: int, starts: list[int], hashes: Sequence[int],
                       moved: Sequence[tuple[int, int]]) -> tuple[int, list[int]]:
    """:func:`bucket_index` of ``hashes``, from the one before a few points were put in (+1)
    or taken out (-1) as listed in ``moved``, as ``(point, +1 or -1)``.

    Each point shifts the starts of every bucket after its own by one; the shifts are applied
    segment by segment, in C.  When the number of points changes the number of buckets, this
    is a full :func:`bucket_index`.
    """
    if max(1, min(24, len(hashes).bit_length() - 1)) != 32 - shift:
        return bucket_index(hashes)
    starts = list(starts)
    steps = sorted(((point >> shift) + 1, step) for point, step in moved)
    running = 0
    for number, (first, step) in enumerate(steps):
        running += step
        end = steps[number + 1][0] if number + 1 < len(steps) else len(starts)
        if running and first < end:
            starts[first:end] = map(operator.add, starts[first:end], itertools.repeat(running))
    return shift, starts


_unpack_digest = struct.Struct("<4I").unpack


def ring_points(address: str, count: int) -> tuple[int, ...]:
    """``count`` 32-bit ring points of an endpoint address.

    Four points per MD5 digest of ``"address-i"``, libketama's layout.
    """
    points: list[int] = []
    prefix = f"{address}-"
    for i in range((count + 3) // 4):
        points.extend(_unpack_digest(_md5(f"{prefix}{i}".encode()).digest()))
    return tuple(points[:count])


def build_ring(items: Sequence[EndpointStats], vnodes: int, max_ring_size: int,
               cache: Optional[dict[tuple[str, int], tuple[int, ...]]] = None,
               ) -> tuple[list[int], list[EndpointStats]]:
    """The ring of ``items``: sorted 32-bit points and the endpoint owning each.

    ``vnodes`` points per unit of weight, halved as often as needed to stay within
    ``max_ring_size``.  Equal points go to the lower address, so every process builds the same
    ring whatever order it learnt the endpoints in.  ``cache`` keeps points between builds.
    """
    ordered = sorted(items, key=_address_of)
    weights: list[int] = list(map(_weight_of, ordered))
    total = sum(weights) * vnodes
    # Halve the points per endpoint as often as needed to fit, never by another factor: the
    # scale then changes only when a service crosses a power of two, so between those sizes
    # adding or removing an endpoint moves only that endpoint's keys.
    scale = 1.0
    while total * scale > max_ring_size:
        scale /= 2.0
    if weights and weights.count(weights[0]) == len(weights):
        counts = [max(4, int(weights[0] * vnodes * scale))] * len(weights)
    else:
        counts = [max(4, int(weight * vnodes * scale)) for weight in weights]
    specs = list(zip(map(_address_of, ordered), counts))
    if cache is None:
        cache = {}
    points: list[Optional[tuple[int, ...]]] = list(map(cache.get, specs))
    if None in points:
        for index in itertools.compress(range(len(points)), map(operator.not_, points)):
            points[index] = cache[specs[index]] = ring_points(*specs[index])
    # Each point packed with its owner's index in address order, so one sort of plain ints
    # orders the ring by point, then by address; done in C, by maps over the whole ring.
    shift = len(ordered).bit_length()
    owner_indices = itertools.chain.from_iterable(map(itertools.repeat, range(len(ordered)),
                                                      counts))
    packed = list(map(operator.or_,
                      map(operator.lshift,
                          itertools.chain.from_iterable(points),  # type: ignore[arg-type]
                          itertools.repeat(shift)),
                      owner_indices))
    packed.sort()
    mask = (1 << shift) - 1
    hashes = list(map(operator.rshift, packed, itertools.repeat(shift)))
    owners = list(map(ordered.__getitem__, map(operator.and_, packed, itertools.repeat(mask))))
    return hashes, owners


class PeakEwma(Strategy):
    """Power of two choices over peak-EWMA latency x (in flight + 1), as Finagle and Linkerd.

    Each endpoint's cost is its peak-sensitive moving average of latency (a slower response
    takes over at once, faster ones blend in over ``decay`` seconds), decayed towards zero while
    the endpoint gets no traffic, times its requests in flight plus one.  An endpoint with no
    measurement yet costs nothing while idle, so a new endpoint is tried and measured at once,
    and ``default_latency`` per request while its first requests are out (as Finagle, with
    Linkerd's 30 ms).  A failure counts as at least twice the current peak, so an endpoint that
    fails fast never looks fastest.  Two distinct endpoints are drawn at random and the cheaper
    one wins.

    :param decay: time constant of the average in seconds (default 10 s, as Finagle and Linkerd).
    :param default_latency: cost per request in flight of an unmeasured endpoint, in seconds.
    """

    name = "peak_ewma"

    def __init__(self, *, decay: float = DEFAULT_DECAY, default_latency: float = DEFAULT_LATENCY,
                 rng: Optional[random.Random] = None) -> None:
        super().__init__(rng=rng)
        self.decay = check_number(decay, "decay")
        self.default_latency = check_number(default_latency, "default_latency")

    def options(self) -> dict[str, Any]:
        """The averaging settings."""
        return {"decay": self.decay, "default_latency": self.default_latency}

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        size = len(items)
        if size == 1:
            only = items[0]
            return lambda key: only
        draw = self.rng.random
        clock = items[0].clock

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            i = int(draw() * size)
            j = int(draw() * (size - 1))
            a, b = items[i], items[j + 1 if j >= i else j]
            now = clock()
            return a if a.peak_cost(now) <= b.peak_cost(now) else b

        return pick


class FunctionStrategy(Strategy):
    """Wraps a plain function ``f(candidates, key)`` that returns one of the candidates."""

    def __init__(self, function: StrategyFunction) -> None:
        super().__init__()
        self.function = function
        self.name = getattr(function, "__name__", "function")  # type: ignore[misc]

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        by_address = {c.endpoint.address: c for c in items}
        function = self.function

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            chosen = function(items, key)
            address = chosen.endpoint.address if isinstance(chosen, EndpointStats) else (
                chosen.address if isinstance(chosen, Endpoint) else None)
            found = by_address.get(address) if address is not None else None
            if found is None:
                raise ValueError(f"strategy function {function!r} returned {chosen!r}, "
                                 "which is not one of the candidates")
            return found

        return pick

    def __repr__(self) -> str:
        return f"FunctionStrategy({self.function!r})"


STRATEGIES: Mapping[str, type[Strategy]] = {
    cls.name: cls
    for cls in (RoundRobin, WeightedRoundRobin, Random, Weighted, LeastConnections,
                ConsistentHash, PeakEwma)
}
"""Strategy classes by configuration name."""

StrategyLike = Union[str, Strategy, StrategyFunction, Mapping[str, Any]]
"""A strategy name, a `Strategy`, a function, or a config dict ``{"name": ..., **options}``."""

_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "round_robin": (),
    "weighted_round_robin": (),
    "random": (),
    "weighted": (),
    "least_connections": (),
    "consistent_hash": ("vnodes", "load_bound", "max_ring_size"),
    "peak_ewma": ("decay", "default_latency"),
}


def resolve_strategy(value: StrategyLike, path: str = "strategy") -> Strategy:
    """Turn a name, a config dict, a `Strategy` or a function into a `Strategy`.

    Raises :class:`~tai_lb.ConfigError` naming ``path`` for an unknown name or a bad option.
    """
    if isinstance(value, Strategy):
        return value
    allowed_names = ", ".join(STRATEGIES)
    if isinstance(value, str):
        if value not in STRATEGIES:
            raise ConfigError(path, f"unknown strategy {shown(value)}; allowed: {allowed_names}")
        value = {"name": value}
    if isinstance(value, Mapping):
        if "name" not in value:
            raise ConfigError(path, f"a strategy mapping needs 'name'; allowed: {allowed_names}")
        name = value["name"]
        if not isinstance(name, str) or name not in STRATEGIES:
            raise ConfigError(f"{path}.name",
                              f"unknown strategy {shown(name)}; allowed: {allowed_names}")
        options = {k: v for k, v in value.items() if k != "name"}
        for key in options:
            if key not in _OPTIONS[name]:
                allowed = ", ".join(_OPTIONS[name]) or "none"
                raise ConfigError(f"{path}.{key_text(key)}",
                                  f"unknown option of {name}; allowed: {allowed}")
        try:
            return STRATEGIES[name](**options)
        except ConfigError as error:
            raise ConfigError(f"{path}.{error.path}", error.reason) from None
    if callable(value):
        return FunctionStrategy(value)
    raise ConfigError(path, f"must be a strategy name ({', '.join(STRATEGIES)}), a Strategy, a "
                            f"function or a mapping with 'name', got {shown(value)}")
