"""Session affinity: a key seen before goes to the same endpoint while that endpoint is usable.

:class:`Affinity` is both a stage (each build records the route's candidates by address, and
adds itself to the route's selectors) and the selector a pick consults first.  It owns its
table, a ``cachetools`` LRU cache whose entries carry their TTL, behind its own lock, and a
daemon thread ``tai-lb-affinity-<service>`` that expires entries.

The rules:

* a key whose endpoint is a candidate of the current route and whose breaker is not open goes
  there (a hit); a live user never moves;
* a new key goes where the strategy picks, and is pinned there (a miss);
* a key whose endpoint is no longer a candidate (unhealthy, ejected, removed), is outside the
  request's subset (a :class:`~tai_lb.routing.subsets.SubsetRoute`), whose breaker is
  open, or that a retry excludes (the attempt on it failed) is picked again and re-pinned (a
  repin) - at most ``max_moves_per_second`` keys a second move; a key over the rate gets a pick
  without pinning and stays pinned to its old endpoint, so it moves on a later request (or
  goes home when its endpoint comes back).

A key is held as it is up to 64 characters (or bytes, or an int of 64 bytes); a longer one, a
client's 8 KB cookie say, as its 16-byte BLAKE2b digest, so an entry's memory is bounded
whatever the key: 1,000 keys of 100 KB hold a few hundred KB, not 100 MB.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import cachetools

from .. import _forksafe
from .._settings import MAX_SECONDS, Settings, check_int, check_number, doc, keyed_settings
from .._threads import ThreadOwner
from ..strategies.hashing import key_bytes
from .picking import excluding

if TYPE_CHECKING:
    from ..config import KeySource
    from ..stats import EndpointStats
    from ..strategies import RoutingKey
    from .route import Route, RouteState

__all__ = ["Affinity", "AffinityConfig"]

log = logging.getLogger(__name__)

_KEYS = ("key", "ttl", "max_entries", "max_moves_per_second")


@dataclass(frozen=True)
class AffinityConfig(Settings):
    """Session affinity of a service (the service key ``affinity``).

    :param key: where a request's affinity key comes from: ``"header:NAME"``,
        ``"cookie:NAME"``, ``"source_ip"``, ``"user_id"`` or (from Python) a function of the
        request; a :class:`~tai_lb.config.KeySource` once built.
    :param ttl: seconds a key stays pinned after its last request (a hit restarts the TTL when
        a tenth of it has passed: a key is forgotten 0.9 to 1 ``ttl`` after its last request).
    :param max_entries: the most keys kept; past it the least recently used one is evicted.
    :param max_moves_per_second: the most keys re-pinned a second (when an endpoint leaves,
        its keys move at this rate, not all at once).
    """

    key: Union[KeySource, str, Callable[[Any], Optional[RoutingKey]]] = field(metadata=doc(
        allowed='"header:NAME", "cookie:NAME", "source_ip" or "user_id"'))
    ttl: float = field(default=300.0, metadata=doc("seconds", low=0, high=MAX_SECONDS,
                                                   low_open=True))
    max_entries: int = field(default=100_000, metadata=doc("keys", low=1, high=100_000_000))
    max_moves_per_second: float = field(default=50.0, metadata=doc("keys a second", low=0,
                                                                   high=1e9))

    def __post_init__(self) -> None:
        from ..config import KeySource  # noqa: PLC0415 - config imports this module

        if not isinstance(self.key, KeySource):
            object.__setattr__(self, "key", KeySource.parse(self.key, "key"))
        object.__setattr__(self, "ttl", check_number(self.ttl, "ttl"))
        check_int(self.max_entries, "max_entries", 1, 100_000_000)
        object.__setattr__(self, "max_moves_per_second", check_number(
            self.max_moves_per_second, "max_moves_per_second", 0.0, 1e9, low_open=False,
            what="a number of keys"))

    @property
    def source(self) -> KeySource:
        """``key`` as built: a :class:`~tai_lb.config.KeySource`."""
        assert not isinstance(self.key, str) and not callable(self.key)
        return self.key

    @classmethod
    def from_config(cls, value: Any) -> AffinityConfig:
        """Build from ``{"key": ..., "ttl": ..., ...}`` (errors name the sub-key)."""
        return cls(**keyed_settings(value, _KEYS))


#: the TTL is counted in ticks of a tenth of it: an entry is kept this many ticks
_TICKS_PER_TTL = 10

#: the longest key held as it is (characters of a str, bytes, or bytes of an int); a longer
#: one is held as its digest
_SHORT_KEY = 64


def _held(key: RoutingKey) -> RoutingKey:
    """The key as the table holds it: itself when short, else the 16-byte BLAKE2b digest of
    its :func:`~tai_lb.strategies.hashing.key_bytes` (so a str, bytes or int key standing for
    the same bytes shares an entry when long, as it shares a ring position).

    :raises TypeError: a key that is no str, bytes or int (as ``hash_key``'s message).
    """
    if isinstance(key, (str, bytes)):
        short = len(key) <= _SHORT_KEY
    else:
        short = (isinstance(key, int) and not isinstance(key, bool)
                 and key.bit_length() <= 8 * _SHORT_KEY)
    if short:
        return key
    return hashlib.blake2b(key_bytes(key), digest_size=16).digest()  # TypeError for the rest


class _Table(cachetools.LRUCache):  # type: ignore[type-arg]
    """The TTL + LRU table: key -> (address, tick of its last refresh), counting evictions.

    An LRU cache, with the TTL carried by each entry's tick rather than by cachetools'
    ``TTLCache``, whose per-key link objects and second ordered dict cost about 90 bytes a key
    more: a million keys fit in under 200 MB.  An entry whose tick changes is put in again, so
    the table's iteration (insertion) order is the order of the ticks and :meth:`expire`
    reads the expired entries from the front, as many as there are, never the whole table.
    """

    evictions = 0

    def popitem(self) -> tuple[Any, Any]:
        self.evictions += 1  # only called to make room: expiry does not come through here
        return super().popitem()

    def peek(self, key: RoutingKey) -> Optional[tuple[str, int]]:
        """The entry of ``key`` without making it recently used, or None."""
        try:
            entry: tuple[str, int] = cachetools.Cache.__getitem__(self, key)
        except KeyError:
            return None
        return entry

    def put(self, key: RoutingKey, entry: tuple[str, int]) -> None:
        """Set ``key``'s entry at the end of the iteration order (the newest tick)."""
        if cachetools.Cache.__contains__(self, key):
            del self[key]
        self[key] = entry

    def expire(self, tick: int, limit: int = 1024) -> bool:
        """Drop up to ``limit`` entries expired at ``tick``; True when more may be left."""
        oldest = list(itertools.islice(cachetools.Cache.__iter__(self), limit))
        for key in oldest:
            entry = self.peek(key)
            if entry is not None and tick - entry[1] < _TICKS_PER_TTL:
                return False  # the first one still alive: every later one was refreshed later
            del self[key]
        return len(oldest) == limit


class Affinity(ThreadOwner):
    """Stage and selector: the sticky endpoint of each key of one service, and the thread that
    expires keys (``tai-lb-affinity-<service>``, started with the first pinned key).

    :param service: the service's name (for the thread's name and logs).
    :param config: its affinity settings.
    :param clock: monotonic clock in seconds (the balancer's).
    :param interval: seconds between two sweeps of expired entries.
    """

    def __init__(self, service: str, config: AffinityConfig, clock: Callable[[], float],
                 interval: float = 1.0) -> None:
        super().__init__()  # its lock guards the table, the counters and the move budget
        self.service = service
        self.config = config
        self.clock = clock
        self.interval = interval
        #: key -> (address, the tick its TTL last started in; a tick is a tenth of the TTL): a
        #: hit in a later tick starts it again, so a key expires 0.9 to 1 TTL after its last use
        self._table = _Table(config.max_entries)
        self._refresh = config.ttl / _TICKS_PER_TTL
        self._values: dict[str, tuple[str, int]] = {}
        self._by_address: Mapping[str, EndpointStats] = {}
        self.hits = self.misses = self.repins = self.deferred = 0
        self._tokens = self._rate = config.max_moves_per_second
        self._refilled = clock()
        _forksafe.after_fork_in_child(self, Affinity._reset_after_fork)

    # -- stage ------------------------------------------------------------------------------

    def build(self, state: RouteState) -> None:
        """Record the candidates by address; add this selector to the route."""
        self._by_address = {s.endpoint.address: s for s in state.candidates}
        state.selectors = (*state.selectors, self)

    # -- selector ---------------------------------------------------------------------------

    def select(self, route: Route, key: Optional[RoutingKey],
               exclude: Collection[str] = ()) -> Optional[EndpointStats]:
        """The key's sticky endpoint, or a new one pinned (None without a key: the picker's)."""
        if key is None or route.picker is None:
            return None
        # Outside the lock: a long key is hashed (the common short str costs a type and a len)
        held = key if type(key) is str and len(key) <= _SHORT_KEY else _held(key)
        table = self._table
        with self._lock:
            tick = self._tick()
            try:
                address, since = table[held]
            except KeyError:
                address = None
            else:
                if tick - since >= _TICKS_PER_TTL:  # expired, not swept yet: a new key
                    del table[held]
                    address = None
                else:
                    stats = self._by_address.get(address)
                    within = getattr(route, "addresses", None)  # a subset's route: stay within
                    if (stats is not None and address not in exclude
                            and (within is None or address in within)
                            and (stats.breaker is None or stats.breaker.state != "open")):
                        self.hits += 1
                        if since != tick:  # the TTL runs from the last request, to a tenth
                            table.put(held, self._value(address, tick))
                        return stats
        stats = route.picker(key)  # outside the lock: a strategy may take its own
        if exclude and stats.endpoint.address in exclude:
            stats = excluding(route, key, exclude, stats)
        with self._lock:
            if address is None:
                self.misses += 1
            elif self._take_move():
                self.repins += 1
            else:
                self.deferred += 1
                return stats  # over the move rate: this pick is not pinned
            table.put(held, self._value(stats.endpoint.address, self._tick()))
            self._start()
        return stats

    def _value(self, address: str, tick: int) -> tuple[str, int]:
        # One shared (address, tick) per endpoint and tick, not one per key: a million entries
        # hold a million references, not a million tuples.  Called with the lock held.
        value = self._values.get(address)
        if value is None or value[1] != tick:
            value = self._values[address] = (address, tick)
        return value

    def _take_move(self) -> bool:
        # A token bucket holding at most one second of moves.  Called with the lock held.
        now = self.clock()
        self._tokens = min(self._rate, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def pinned(self, key: RoutingKey) -> Optional[str]:
        """The address ``key`` is pinned to, or None (for inspection and tests)."""
        held = _held(key)
        with self._lock:
            entry = self._table.peek(held)
            if entry is None or self._tick() - entry[1] >= _TICKS_PER_TTL:
                return None
            return entry[0]

    def _tick(self) -> int:
        return int(self.clock() / self._refresh)

    def expire(self) -> None:
        """Drop the expired entries, a batch at a time: picks may take the lock in between."""
        more = True
        while more:
            with self._lock:
                more = self._table.expire(self._tick())

    # -- figures ----------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """entries, hits, misses, evictions, repins, deferred (moves over the rate)."""
        self.expire()
        with self._lock:
            return {"entries": len(self._table), "hits": self.hits, "misses": self.misses,
                    "evictions": self._table.evictions, "repins": self.repins,
                    "deferred": self.deferred,
                    "key": str(self.config.key), "ttl": self.config.ttl,
                    "max_entries": self.config.max_entries,
                    "max_moves_per_second": self.config.max_moves_per_second}

    # -- the expiry thread ------------------------------------------------------------------

    def _start(self) -> None:
        # Called with the lock held, on a pin: the thread starts with the first key.
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"tai-lb-affinity-{self.service}")
            self._thread.start()

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(self.interval):
            try:
                self.expire()
            except Exception:  # never let a sweep end the thread
                log.exception("tai-lb: expiring the affinity keys of %s failed", self.service)

    def _reset_after_fork(self) -> None:
        self._fresh_after_fork()  # a new thread with the next pin (the table is kept)
        if not self._closed and len(self._table):
            with self._lock:
                self._start()
