"""Hashing: ``consistent_hash``, a ketama ring with optional bounded loads.

:class:`~tai_lb.strategies.ConsistentHash` maps a routing key to the same endpoint while that
endpoint stays, and updates the previous ring in place of a new build when a few endpoints
change.  The ring's pieces are plain functions beside it: :func:`key_hash` and
:func:`ring_points` (MD5, stable across processes), :func:`build_ring`, and the bucket index
that narrows a lookup (:func:`bucket_index`, :func:`shift_bucket_index`).  A picker keeps the
:class:`HashRing` it picks from, which :func:`ring_of` reads.  What every hashing strategy
(``maglev`` too) shares is here as well: the ``load_bound`` check (:func:`check_load_bound`),
and the walks from a key's place to the next owner that is not excluded
(:func:`excluding_walk`) or has room (:func:`bounded_picker`).
"""

from __future__ import annotations

import array
import bisect
import functools
import hashlib
import importlib
import itertools
import math
import operator
import random
import struct
from collections.abc import Collection, Sequence
from typing import Any, Callable, Optional

from .._sequences import common_head, common_tail
from .._settings import check_int, check_number
from ..stats import EndpointStats
from .base import EXCLUDING, Picker, RoutingKey, Strategy, weight_of

__all__ = [
    "ConsistentHash",
    "HashRing",
    "bounded_picker",
    "bucket_index",
    "build_ring",
    "check_load_bound",
    "excluding_walk",
    "key_bytes",
    "key_hash",
    "ring_of",
    "ring_points",
    "shift_bucket_index",
]

_MAX_LOAD_BOUND = 1000.0  # the highest consistent_hash load_bound: as good as none

_address_of = operator.attrgetter("endpoint.address")
_RING = "_tai_lb_ring"  # the picker's attribute holding its HashRing: see ring_of()
# A ring update that moves more endpoints than this builds the ring again instead.
_RING_UPDATE_MAX = 64


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
        load_bound = check_load_bound(load_bound)
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
        last = ring_of(previous)
        ring = self._update(last, items) if last is not None else None
        return self._picker(ring if ring is not None else self._build(items))

    def _build(self, items: tuple[EndpointStats, ...]) -> HashRing:
        hashes, owners = build_ring(items, self.vnodes, self.max_ring_size, self._points)
        self._forget_gone(items)
        weights: list[int] = list(map(weight_of, items))
        shift, starts = bucket_index(hashes)
        return HashRing(items, weights, self._scale(sum(weights)), hashes, owners, shift, starts)

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

    def _update(self, last: HashRing, items: tuple[EndpointStats, ...]) -> Optional[HashRing]:
        """``last`` changed for ``items``, or None when building again is as good."""
        weights: list[int] = list(map(weight_of, items))
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
            return HashRing(items, weights, scale, last.hashes, last.owners, last.shift,
                            last.starts)
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
        return HashRing(items, weights, scale, hashes, owners, shift, starts)

    def _points_of(self, address: str, weight: int, scale: float) -> tuple[int, ...]:
        spec = (address, max(4, int(weight * self.vnodes * scale)))
        points = self._points.get(spec)
        if points is None:
            points = self._points[spec] = ring_points(*spec)
        return points

    def _picker(self, ring: HashRing) -> Picker:
        items = ring.items
        hashes, owners, shift, starts = ring.hashes, ring.owners, ring.shift, ring.starts
        ring_size = len(hashes)
        size = len(items)
        draw = self.rng.random
        search = bisect.bisect_right
        md5, unpack = _md5, _unpack_first

        def locate(key: RoutingKey) -> int:
            # The index of the key's point: the first ring point after its hash (ring_size
            # past the last point, which the walks wrap to 0).
            h = key_hash(key)
            bucket = h >> shift
            return search(hashes, h, starts[bucket], starts[bucket + 1])

        if self.load_bound is not None:
            # As without a bound, a key goes to the next owner clockwise that has room.
            picker = bounded_picker(items, owners, locate, size, self.load_bound, draw)
        else:
            def pick(key: Optional[RoutingKey]) -> EndpointStats:
                if key is None:
                    return items[int(draw() * size)]
                # key_hash(), inlined for the common str key: this is the hot path
                h = (unpack(md5(key.encode()).digest())[0] if type(key) is str
                     else key_hash(key))
                bucket = h >> shift
                i = search(hashes, h, starts[bucket], starts[bucket + 1])
                return owners[i if i < ring_size else 0]
            picker = pick
        # The next owner clockwise that is not excluded: where the key would go if the
        # excluded endpoints were removed from the ring.
        setattr(picker, EXCLUDING, excluding_walk(items, owners, locate, size, draw))
        setattr(picker, _RING, ring)
        return picker


def check_load_bound(value: object) -> Optional[float]:
    """``load_bound`` of a hashing strategy: None (off), or a number above 1 and at most 1000
    (as good as none), so the capacity it gives stays a finite number."""
    if value is None:
        return None
    return check_number(value, "load_bound", 1.0, _MAX_LOAD_BOUND, what="a number")


def excluding_walk(items: Sequence[EndpointStats], owners: Sequence[EndpointStats],
                   locate: Callable[[RoutingKey], int], distinct: int,
                   draw: Callable[[], float],
                   ) -> Callable[[Optional[RoutingKey], Collection[str]], Optional[EndpointStats]]:
    """The :data:`~tai_lb.strategies.EXCLUDING` function of a hashing picker.

    From the key's place in ``owners`` (``locate(key)``, wrapped at the end), the first owner
    that is not excluded; None once ``distinct`` different owners (every endpoint that owns a
    place) were all excluded.  Without a key, one of the ``items`` left, at random.
    """
    length = len(owners)

    def excluding(key: Optional[RoutingKey],
                  exclude: Collection[str]) -> Optional[EndpointStats]:
        if key is None:
            remaining = [c for c in items if c.endpoint.address not in exclude]
            return remaining[int(draw() * len(remaining))] if remaining else None
        start = locate(key)
        seen: set[int] = set()
        for step in range(length):
            owner = owners[(start + step) % length]
            if owner.endpoint.address not in exclude:
                return owner
            seen.add(id(owner))
            if len(seen) == distinct:
                break
        return None

    return excluding


def bounded_picker(items: Sequence[EndpointStats], owners: Sequence[EndpointStats],
                   locate: Callable[[RoutingKey], int], distinct: int, bound: float,
                   draw: Callable[[], float]) -> Picker:
    """A hashing picker with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2016).

    From the key's place in ``owners`` (``locate(key)``, wrapped at the end), the first owner
    with fewer than ``ceil(bound * (in flight in the service + 1) / len(items))`` requests in
    flight; the key's own owner when ``distinct`` different owners are all that full.  Without
    a key, one of the ``items`` at random.
    """
    size = len(items)
    length = len(owners)
    service_load = items[0].service_load

    def pick_bounded(key: Optional[RoutingKey]) -> EndpointStats:
        if key is None:
            return items[int(draw() * size)]
        start = locate(key)
        capacity = math.ceil(bound * (len(service_load) + 1) / size)
        seen: set[int] = set()
        for step in range(length):
            owner = owners[(start + step) % length]
            if len(owner.load) < capacity:
                return owner
            seen.add(id(owner))
            if len(seen) == distinct:
                break
        return owners[start % length]

    return pick_bounded


class HashRing:
    """A built ring and what it was built from, kept on its picker for the next update.

    ``items`` are the candidates and ``weights`` the weight each had; ``hashes`` and ``owners``
    are the ring as :func:`build_ring` returns it, ``shift`` and ``starts`` its
    :func:`bucket_index`.  ``hashes`` and ``starts`` are kept as arrays of 32-bit integers:
    4 bytes a point where a list of ints takes about 40, so a ring of 65,536 points stays in
    the processor's cache beside the endpoints' figures instead of pushing them out (a pick on
    a ring of 1,000 endpoints costs about a fifth less).  The ring's sequences are never
    changed once built (an update changes copies): read them, never change them.
    """

    __slots__ = ("hashes", "items", "owners", "scale", "shift", "starts", "weights")

    def __init__(self, items: tuple[EndpointStats, ...], weights: list[int], scale: float,
                 hashes: Sequence[int], owners: list[EndpointStats], shift: int,
                 starts: Sequence[int]) -> None:
        self.items = items
        self.weights = weights
        self.scale = scale
        self.hashes = _uint32_array(hashes)
        self.owners = owners
        self.shift = shift
        self.starts = _uint32_array(starts)


# The array type code of an unsigned integer of at least 32 bits: 'I' where an int has 4 bytes
# (everywhere this runs), else 'L'.
_UINT32 = "I" if array.array("I").itemsize >= 4 else "L"


def _uint32_array(values: Sequence[int]) -> array.array[int]:
    if isinstance(values, array.array) and values.typecode == _UINT32:
        return values
    return array.array(_UINT32, values)


def ring_of(picker: Optional[Picker]) -> Optional[HashRing]:
    """The ring a ``consistent_hash`` picker picks from, or None for any other picker (or
    for None, a route's picker when it has no endpoint)."""
    ring: Optional[HashRing] = getattr(picker, _RING, None)
    return ring


def _find_md5() -> Callable[[bytes], Any]:
    # CPython's own MD5 (the _md5 module) gives the same digests as OpenSSL's through hashlib
    # at about half the cost for a short key: hashlib sets up an OpenSSL context per call,
    # which costs more than hashing a routing key.  Where a build leaves it out, hashlib's.
    try:
        builtin: Callable[[bytes], Any] = importlib.import_module("_md5").md5
    except ImportError:  # pragma: no cover - CPython built without its own hashes, or not CPython
        pass
    else:
        return builtin
    # Passing usedforsecurity=False costs more than hashing a short key, so pass it only where
    # the OpenSSL build refuses MD5 without it (FIPS mode).
    try:
        hashlib.md5(b"")
    except ValueError:  # pragma: no cover - FIPS systems only
        return functools.partial(hashlib.md5, usedforsecurity=False)
    return hashlib.md5


_md5 = _find_md5()
_unpack_first = struct.Struct("<I").unpack_from


def key_bytes(key: RoutingKey) -> bytes:
    """The bytes a routing key stands for: a str's UTF-8, bytes as they are, an int's decimal
    digits (what :func:`key_hash` hashes, and affinity digests a long key from).

    :raises TypeError: the key is of another type (a list, a float, a bool...).
    """
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, bytes):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key).encode("ascii")
    raise TypeError(f"a routing key must be str, bytes or int, got {type(key).__name__}")


def key_hash(key: RoutingKey) -> int:
    """The 32-bit ring position of a routing key (MD5, stable across processes)."""
    first: int = _unpack_first(_md5(key_bytes(key)).digest())[0]
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


def shift_bucket_index(shift: int, starts: Sequence[int], hashes: Sequence[int],
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
    weights: list[int] = list(map(weight_of, ordered))
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

