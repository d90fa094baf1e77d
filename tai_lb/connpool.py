"""Generic connection pools: :class:`ConnectionPool` for any client (a database, Redis, a gRPC
channel, a raw socket), and the per-endpoint pools behind ``LoadBalancer.connection()``.

A pool is a queue of ``max_size`` slots, as urllib3's and baseplate's are: a slot holds an idle
connection or nothing.  Borrowing takes a slot, waiting up to ``acquire_timeout`` when none is
free (then :class:`~tai_lb.PoolExhausted`), and fills an empty one by calling the factory.  Idle
connections are reused most recent first, and empty slots sit under them, so a connection is
opened only when no idle one is left.  Waiting threads are served first come, first served: a
connection given back goes straight to the thread that has waited longest
(:class:`~tai_lb.pool.FairQueue`, as HikariCP's hand-off).

On borrow, a connection older than ``max_lifetime``, idle longer than ``max_idle``, or refused by
``validate`` is closed and the next one taken.  A connection whose block raised is in an unknown
state: it is closed, not given back.  The factory, ``validate`` and ``close`` never run under a
lock.  ``close()`` swaps the queue out and closes the idle connections; those in use are closed
when they come back.  A forked child starts with empty pools and never uses, nor closes, the
parent's connections (closing one may end the parent's session: a Redis ``QUIT``, a TLS alert).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, Generic, Optional, TypeVar

from . import _forksafe
from ._settings import check_int, check_number
from .exceptions import ConfigError, LoadBalancerError, PoolExhausted
from .pool import FairQueue

if TYPE_CHECKING:
    from .balancer import LoadBalancer
    from .endpoint import Endpoint
    from .strategies import RoutingKey

__all__ = ["ConnectionPool", "EndpointConnectionPools", "balanced_connection"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The names ``LoadBalancer.connection()`` accepts as pool settings.
POOL_SETTINGS = frozenset(("max_size", "min_size", "acquire_timeout", "max_lifetime", "max_idle",
                           "validate", "close"))
_FIGURES = ("opened", "closed", "borrows", "exhausted", "expired", "invalid", "failed")


class _Held(Generic[T]):
    """A connection with the times the pool needs (its identity is the connection's lease)."""

    __slots__ = ("conn", "created", "idle_since")

    def __init__(self, conn: T, now: float) -> None:
        self.conn = conn
        self.created = now
        self.idle_since = now


class _SlotQueue(FairQueue):
    """A :class:`~tai_lb.pool.FairQueue` whose empty slots (None) go under the idle connections,
    so a borrower takes an idle connection whenever there is one."""

    def _put(self, item: Any) -> None:
        if item is None and not self._waiters:
            self.queue.insert(0, None)  # at most max_size items: the insert is cheap
        else:
            super()._put(item)


def _new_queue(slots: int) -> _SlotQueue:
    slot_queue = _SlotQueue()  # unbounded: a put never blocks (the slots bound it)
    for _ in range(slots):
        slot_queue.put(None)
    return slot_queue


def _close_connection(conn: Any) -> None:
    """The default ``close``: the connection's own ``close()``, if it has one."""
    closer = getattr(conn, "close", None)
    if closer is not None:
        closer()


def _check_callable(value: object, key: str) -> None:
    if value is not None and not callable(value):
        raise ConfigError(key, f"must be a function or None, got {type(value).__name__}")


def _optional_seconds(value: object, key: str) -> Optional[float]:
    return None if value is None else check_number(value, key)


class ConnectionPool(Generic[T]):
    """A thread-safe pool of connections of any kind, made by ``factory()``.

    ``with pool.connection() as conn:`` borrows one and gives it back at the end of the block
    (or closes it, if the block raised).

    :param factory: opens a connection; takes no argument.
    :param max_size: most connections open at once (idle plus in use).
    :param min_size: connections opened at once by the constructor (the pool starts warm).
    :param acquire_timeout: longest wait for a free connection, in seconds; then
        :class:`~tai_lb.PoolExhausted`.  0 never waits.
    :param max_lifetime: a connection older than this (seconds) is closed rather than reused;
        None keeps it for ever.
    :param max_idle: a connection idle longer than this (seconds) is closed rather than reused;
        None keeps it for ever.
    :param validate: ``validate(conn)`` is called on borrow; a connection for which it returns
        false (or raises) is closed and another one taken.
    :param close: ``close(conn)`` closes one connection; by default its ``close()`` method.
    :param name: what :class:`~tai_lb.PoolExhausted` calls the pool (an endpoint's address).
    :param clock: monotonic clock in seconds, injectable for tests.
    :raises ConfigError: a setting is out of range; the error names it.
    """

    def __init__(self, factory: Callable[[], T], *, max_size: int = 10, min_size: int = 0,
                 acquire_timeout: float = 5.0, max_lifetime: Optional[float] = None,
                 max_idle: Optional[float] = None,
                 validate: Optional[Callable[[T], object]] = None,
                 close: Optional[Callable[[T], object]] = None, name: str = "pool",
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not callable(factory):
            raise ConfigError("factory", f"must be a function, got {type(factory).__name__}")
        _check_callable(validate, "validate")
        _check_callable(close, "close")
        self.max_size = check_int(max_size, "max_size", 1, 10_000)
        self.min_size = check_int(min_size, "min_size", 0, self.max_size,
                                  what="an integer (at most max_size)")
        self.acquire_timeout = check_number(acquire_timeout, "acquire_timeout", low_open=False)
        self.max_lifetime = _optional_seconds(max_lifetime, "max_lifetime")
        self.max_idle = _optional_seconds(max_idle, "max_idle")
        self.name = name
        self._factory = factory
        self._validate = validate
        self._close: Callable[[T], object] = close if close is not None else _close_connection
        self._clock = clock
        self._lock = threading.Lock()  # guards the figures and the borrowed set, nothing else
        self._borrowed: set[_Held[T]] = set()
        self._figures = dict.fromkeys(_FIGURES, 0)
        self._queue: Optional[_SlotQueue] = _new_queue(self.max_size)
        _forksafe.after_fork_in_child(self, ConnectionPool._reset_after_fork)
        self._fill()

    # -- borrowing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def connection(self) -> Iterator[T]:
        """Borrow a connection for the ``with`` block: given back at its end, closed if it raised.

        :raises PoolExhausted: no connection became free within ``acquire_timeout``.
        :raises LoadBalancerError: the pool is closed.
        """
        held = self._borrow()
        try:
            yield held.conn
        except BaseException:
            self._give_back(held, failed=True)
            raise
        self._give_back(held, failed=False)

    def _borrow(self) -> _Held[T]:
        slots = self._queue
        if slots is None:
            raise LoadBalancerError(f"the connection pool {self.name} is closed")
        try:
            held: Optional[_Held[T]] = slots.get(True, self.acquire_timeout)
        except queue.Empty:
            self._count("exhausted")
            raise PoolExhausted(self.name, self.acquire_timeout) from None
        try:
            if self._queue is not slots:  # closed while this thread waited
                raise LoadBalancerError(f"the connection pool {self.name} is closed")
            now = self._clock()
            while held is not None and not self._usable(held, now):
                self._dispose(held)
                try:
                    held = slots.get(False)  # the next idle connection, or an empty slot
                except queue.Empty:
                    held = None  # keep this slot: a new connection goes in it
                else:
                    slots.put(None)  # the slot of the connection just closed
            if held is None:
                held = _Held(self._factory(), now)
                self._count("opened")
        except BaseException:
            if held is not None:
                self._dispose(held)
            slots.put(None)  # never lose a slot
            raise
        with self._lock:
            self._borrowed.add(held)
            self._figures["borrows"] += 1
        return held

    def _usable(self, held: _Held[T], now: float) -> bool:
        """False for a connection past its lifetime or idle time, or refused by ``validate``."""
        if self._expired(held, now) or (
                self.max_idle is not None and now - held.idle_since > self.max_idle):
            self._count("expired")
            return False
        if self._validate is None:
            return True
        try:
            valid = bool(self._validate(held.conn))
        except Exception:
            log.debug("tai-lb: validating a connection of %s raised", self.name, exc_info=True)
            valid = False
        if not valid:
            self._count("invalid")
        return valid

    def _expired(self, held: _Held[T], now: float) -> bool:
        return self.max_lifetime is not None and now - held.created > self.max_lifetime

    def _give_back(self, held: _Held[T], *, failed: bool) -> None:
        with self._lock:
            ours = held in self._borrowed
            self._borrowed.discard(held)
            if failed:
                self._figures["failed"] += 1
        if not ours:  # borrowed in the parent before a fork: never reuse nor close it here
            _forksafe.inherited(held)
            return
        slots = self._queue
        now = self._clock()
        if slots is None or failed or self._expired(held, now):
            self._dispose(held)
            if slots is not None:
                slots.put(None)
            return
        held.idle_since = now
        slots.put(held)
        if self._queue is None:  # close() ran meanwhile and may have drained before the put
            self._drain(slots)

    def _dispose(self, held: _Held[T]) -> None:
        """Close one connection (never under a lock); a failure to close is only logged."""
        try:
            self._close(held.conn)
        except Exception:
            log.debug("tai-lb: closing a connection of %s raised", self.name, exc_info=True)
        self._count("closed")

    def _count(self, figure: str) -> None:
        with self._lock:
            self._figures[figure] += 1

    def _fill(self) -> None:
        """Open ``min_size`` connections into empty slots (fewer if some are in use)."""
        slots = self._queue
        taken: list[Optional[_Held[T]]] = []
        try:
            while slots is not None and len(taken) < self.min_size:
                taken.append(slots.get(False))  # idle connections first, then empty slots
        except queue.Empty:
            pass
        try:
            for index, item in enumerate(taken):
                if item is None:
                    taken[index] = _Held(self._factory(), self._clock())
                    self._count("opened")
        finally:
            for item in reversed(taken):  # back in the order they came out
                slots.put(item)  # type: ignore[union-attr]

    # -- figures and life cycle -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The pool's figures: ``size`` (open connections), ``idle``, ``in_use``, ``waiting``
        (threads), the settings, and counts since it started: ``opened``, ``closed``,
        ``borrows``, ``exhausted`` (waits that timed out), ``expired`` (lifetime or idle time),
        ``invalid`` (refused by ``validate``), ``failed`` (blocks that raised)."""
        slots = self._queue
        with self._lock:
            figures: dict[str, Any] = dict(self._figures)
            in_use = len(self._borrowed)
        size = figures["opened"] - figures["closed"]
        figures.update(size=size, in_use=in_use, idle=max(0, size - in_use),
                       waiting=len(slots._waiters) if slots is not None else 0,
                       max_size=self.max_size, min_size=self.min_size,
                       pool_closed=slots is None)
        return figures

    def close(self) -> None:
        """Close the idle connections now, those in use when they come back; later borrows
        raise :class:`~tai_lb.LoadBalancerError`.  Safe to call twice."""
        with self._lock:
            slots, self._queue = self._queue, None
        if slots is None:
            return
        self._drain(slots)
        with slots.mutex:
            waiting = len(slots._waiters)
        for _ in range(waiting):  # wake the waiters: each sees the pool closed
            slots.put(None)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._queue is None

    def _drain(self, slots: _SlotQueue) -> None:
        while True:
            try:
                item = slots.get(False)
            except queue.Empty:
                return
            if item is not None:
                self._dispose(item)

    def _reset_after_fork(self) -> None:
        # The child has none of the parent's threads, and its connections are the parent's:
        # start empty, keep (never close nor free) what the parent had.
        _forksafe.inherited(self._lock, self._queue, self._borrowed)
        self._lock = threading.Lock()
        self._borrowed = set()
        self._figures = dict.fromkeys(_FIGURES, 0)
        if self._queue is not None:
            self._queue = _new_queue(self.max_size)

    def __enter__(self) -> ConnectionPool[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<ConnectionPool {self.name} max_size={self.max_size} {state}>"


#: ``factory(endpoint)``: opens a connection to one endpoint, for ``LoadBalancer.connection()``.
ConnectionFactory = Callable[["Endpoint"], Any]


class EndpointConnectionPools:
    """The generic pools of one balancer: one per endpoint address, factory and pool settings.

    Made on first use by :meth:`pool`; :meth:`close_endpoints` closes those of removed endpoints
    (the balancer's :class:`~tai_lb.topology.TopologyFollower` calls it once they drained), and
    :meth:`close` closes all of them.  Pools are keyed by the factory object: pass the same
    function each time (a ``lambda`` written in a loop is a new object, hence a new pool).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the table: pools are made and closed outside it
        self._pools: dict[tuple[str, int, Hashable, Hashable], ConnectionPool[Any]] = {}
        self._closed = False
        _forksafe.after_fork_in_child(self, EndpointConnectionPools._reset_after_fork)

    def pool(self, endpoint: Endpoint, factory: ConnectionFactory,
             settings: Mapping[str, Any]) -> ConnectionPool[Any]:
        """The pool of ``endpoint`` for ``factory`` and ``settings``, made on first use.

        :raises ConfigError: an unknown or bad setting (it is named).
        """
        try:
            key = (endpoint.host, endpoint.port, factory, frozenset(settings.items()))
            pool = self._pools.get(key)
        except TypeError:
            raise ConfigError("pool_settings", "every value must be hashable") from None
        if pool is not None:
            return pool
        for name in settings:
            if name not in POOL_SETTINGS:
                raise ConfigError(name, f"is not a pool setting (one of {sorted(POOL_SETTINGS)})")
        # Made outside the lock: with min_size, the constructor connects.
        made = ConnectionPool(functools.partial(factory, endpoint), name=endpoint.address,
                              **settings)
        with self._lock:
            closed = self._closed
            pool = self._pools.setdefault(key, made) if not closed else made
        if pool is not made or closed:
            made.close()  # another thread made it first, or the balancer closed meanwhile
        if closed:
            raise LoadBalancerError("the load balancer is closed")
        return pool

    def pools(self) -> dict[str, list[ConnectionPool[Any]]]:
        """Every pool by endpoint address (``host:port``)."""
        with self._lock:
            items = list(self._pools.items())
        found: dict[str, list[ConnectionPool[Any]]] = {}
        for (_host, _port, _factory, _settings), pool in items:
            found.setdefault(pool.name, []).append(pool)
        return found

    def close_endpoints(self, endpoints: Iterable[tuple[str, int]]) -> int:
        """Close every pool of the endpoints given as ``(host, port)``; returns how many."""
        if not self._pools:
            return 0
        gone = set(endpoints)
        with self._lock:
            keys = [key for key in self._pools if (key[0], key[1]) in gone]
            closing = [self._pools.pop(key) for key in keys]
        for pool in closing:
            pool.close()
        return len(closing)

    def close(self) -> None:
        """Close every pool (idle connections now, those in use when they come back)."""
        with self._lock:
            self._closed = True
            closing, self._pools = list(self._pools.values()), {}
        for pool in closing:
            pool.close()

    def _reset_after_fork(self) -> None:
        # Each pool resets itself (empty in the child); only the table's lock is replaced.
        _forksafe.inherited(self._lock)
        self._lock = threading.Lock()


@contextlib.contextmanager
def balanced_connection(lb: LoadBalancer, service: str, factory: ConnectionFactory,
                        key: Optional[RoutingKey] = None, **pool_settings: Any) -> Iterator[Any]:
    """Borrow a connection to an endpoint of ``service``: ``with lb.connection(...) as conn:``.

    Picks an endpoint (as :meth:`pick`, with ``key``), borrows from that endpoint's pool for
    ``factory`` (made on first use with ``pool_settings``, the keyword arguments of
    :class:`~tai_lb.ConnectionPool`; ``factory(endpoint)`` opens a connection), and releases the
    lease at the end of the block: a success, or a failure if the block raised, in which case the
    connection is closed, not given back.  A connection that cannot be opened, or a pool that
    stays exhausted, fails the lease too.

    :raises PoolExhausted: no connection to the picked endpoint became free in time.
    :raises ConfigError: a bad pool setting.
    """
    with lb.pick(service, key) as lease, lb.topology.connection_pools.pool(
            lease.endpoint, factory, pool_settings).connection() as conn:
        yield conn
