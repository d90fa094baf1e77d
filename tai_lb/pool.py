"""HTTP connection pools per endpoint: urllib3's pools, with three additions.

* A connection idle for longer than ``idle_timeout`` is closed before reuse, so a backend that
  closes idle keep-alive connections never fails a request sent on one it is closing.
* A failure while connecting (TCP or the TLS handshake) is marked, so retries can tell that the
  request never left (see :func:`tai_lb.retry.classify`).
* A callback can be attached to a connection; it runs when the connection returns to the pool,
  which is when a streamed response has been read to the end or closed.

Pools are urllib3 ``PoolManager`` pools keyed by endpoint address, scheme, every TLS setting
(server name, CA bundle, client certificate, verification) and every ``pool`` setting, so a
request with ``verify=False`` gets its own pool and never weakens the next request
(CVE-2024-35195), and two services on one address each get their own pool settings.

Threads waiting for a connection are served first come, first served (:class:`FairQueue`).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager

from . import _forksafe
from ._deadline import DeadlineHTTPConnection, DeadlineHTTPSConnection
from ._settings import MAX_SECONDS, Settings, check_bool, check_int, check_number, doc

__all__ = ["EndpointPools", "FairQueue", "PoolConfig"]

log = logging.getLogger(__name__)

_CONNECT_PHASE = "_tai_lb_connect_phase"
_IDLE_SINCE = "_tai_lb_idle_since"
_ON_RELEASE = "_tai_lb_on_release"


@dataclass(frozen=True)
class PoolConfig(Settings):
    """The ``pool`` settings of a service: the HTTP connections kept per endpoint.

    :param maxsize: connections per endpoint (and TLS setting); requests' default is 10.
    :param block: wait for a free connection rather than open one past ``maxsize``.
    :param timeout: longest wait for a free connection, in seconds; a request's connect timeout
        shortens it.  Then the attempt fails with :class:`~tai_lb.HTTPPoolExhausted` (and,
        since nothing was sent, may be retried on another endpoint).
    :param idle_timeout: a connection idle longer than this is closed rather than reused; keep
        it below the backends' keep-alive timeout (gunicorn's is 2 s).
    """

    maxsize: int = field(default=10, metadata=doc("connections", low=1, high=10_000))
    block: bool = field(default=True, metadata=doc(allowed="true or false"))
    timeout: float = field(default=5.0, metadata=doc("seconds", low=0, high=MAX_SECONDS,
                                                     low_open=True))
    idle_timeout: float = field(default=1.5, metadata=doc("seconds", low=0, high=MAX_SECONDS,
                                                          low_open=True))

    def __post_init__(self) -> None:
        check_int(self.maxsize, "maxsize", 1, 10_000)
        check_bool(self.block, "block")
        object.__setattr__(self, "timeout", check_number(self.timeout, "timeout"))
        object.__setattr__(self, "idle_timeout", check_number(self.idle_timeout, "idle_timeout"))


class _Waiter:
    """A thread waiting in :meth:`FairQueue.get`: a lock it sleeps on until it is handed an item."""

    __slots__ = ("given", "item", "wake")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()  # released by the hand-off
        self.given = False
        self.item: Any = None


class FairQueue(queue.LifoQueue):  # type: ignore[type-arg]
    """urllib3's pool queue, with waiting threads served first come, first served.

    Idle connections stay last in, first out (urllib3 reuses the most recent, whose socket is
    likeliest alive).  A thread that finds none joins a queue of waiters, and a connection put
    back goes straight to the thread that has waited longest, as HikariCP's hand-off does.
    With a plain :class:`queue.LifoQueue`, a put back only wakes a waiter, and the thread that
    put it back, or any newcomer, usually takes it again first: under load some threads win
    again and again while others wait for seconds.  ``get()`` keeps the queue's ``block`` and
    ``timeout`` semantics (:class:`queue.Empty` once ``timeout`` has passed).
    """

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._waiters: collections.deque[_Waiter] = collections.deque()
        _forksafe.after_fork_in_child(self, FairQueue._reset_after_fork)

    def _put(self, item: Any) -> None:
        # Called with the mutex held, by put(): a waiter gets the item, else it goes idle.
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.item, waiter.given = item, True
            waiter.wake.release()
        else:
            super()._put(item)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """The most recent idle item, or (waiting behind earlier waiters) the next one put."""
        with self.mutex:
            if self._qsize():  # there are waiters only while nothing is idle
                item = self._get()
                self.not_full.notify()
                return item
            if not block:
                raise queue.Empty
            if timeout is not None and timeout < 0:
                raise ValueError("'timeout' must be a non-negative number")
            waiter = _Waiter()
            self._waiters.append(waiter)
        try:
            waiter.wake.acquire(True, -1 if timeout is None else timeout)
        except BaseException:  # interrupted: never keep a slot, nor a place in the queue
            with self.mutex:
                if waiter.given:
                    self._put(waiter.item)
                else:
                    self._waiters.remove(waiter)
            raise
        with self.mutex:
            if waiter.given:  # perhaps just as the wait timed out
                return waiter.item
            self._waiters.remove(waiter)
        raise queue.Empty

    def _reset_after_fork(self) -> None:
        # The child never uses the parent's pools, but closing or finalizing one (at exit)
        # empties its queue under the mutex, which a parent's thread may have held at the fork.
        _forksafe.inherited(self.mutex, self.not_empty, self.not_full, self.all_tasks_done,
                            self._waiters)
        self.mutex = threading.Lock()
        self.not_empty = threading.Condition(self.mutex)
        self.not_full = threading.Condition(self.mutex)
        self.all_tasks_done = threading.Condition(self.mutex)
        self._waiters = collections.deque()  # the parent's threads: none is in the child


class _PoolMixin:
    """What tai-lb adds to urllib3's HTTP and HTTPS connection pools."""

    QueueCls = FairQueue
    idle_timeout: float = 1.5

    def __init__(self, *args: Any, idle_timeout: float = 1.5, **kwargs: Any) -> None:
        self.idle_timeout = idle_timeout
        super().__init__(*args, **kwargs)

    def _get_conn(self, timeout: Optional[float] = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        idle_since = getattr(conn, _IDLE_SINCE, None)
        if idle_since is not None and time.monotonic() - idle_since > self.idle_timeout:
            conn.close()  # reconnects on use, before anything is sent
        return conn

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            on_release = conn.__dict__.pop(_ON_RELEASE, None)
            setattr(conn, _IDLE_SINCE, time.monotonic())
            if on_release is not None:
                try:
                    on_release()
                except Exception:
                    log.exception("tai-lb: releasing a streamed response's lease failed")
        super()._put_conn(conn)  # type: ignore[misc]

    def _validate_conn(self, conn: Any) -> None:
        try:
            super()._validate_conn(conn)  # type: ignore[misc]
        except BaseException as error:
            setattr(error, _CONNECT_PHASE, True)
            raise


class TaiHTTPConnectionPool(_PoolMixin, HTTPConnectionPool):
    """urllib3's HTTP pool with idle expiry and release callbacks."""

    ConnectionCls = DeadlineHTTPConnection  # reads and sends end by the request's deadline


class TaiHTTPSConnectionPool(_PoolMixin, HTTPSConnectionPool):
    """urllib3's HTTPS pool with idle expiry, release callbacks and connect-phase marking."""

    ConnectionCls = DeadlineHTTPSConnection


def failed_while_connecting(error: BaseException) -> bool:
    """True if ``error`` (or an error it wraps) was raised while connecting."""
    seen: set[int] = set()
    stack: list[Any] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        if getattr(current, _CONNECT_PHASE, False):
            return True
        stack.extend((getattr(current, "reason", None), current.__cause__, current.__context__,
                      *[a for a in current.args if isinstance(a, BaseException)]))
    return False


def on_release(conn: Any, callback: Callable[[], None]) -> None:
    """Run ``callback`` once, when ``conn`` goes back to its pool."""
    setattr(conn, _ON_RELEASE, callback)


class _PoolKey(NamedTuple):
    """urllib3's pool key (address, scheme, TLS, maxsize, block) plus our ``idle_timeout``."""

    urllib3_key: Any
    idle_timeout: Optional[float]


def _close_pool(pool: HTTPConnectionPool) -> None:
    pool.close()


def _address(key: Any) -> tuple[str, int]:
    """The (host, port) of one of our pool keys."""
    return key.urllib3_key.key_host, key.urllib3_key.key_port or 0


def _with_idle_timeout(key_fn: Callable[[dict[str, Any]], Any],
                       ) -> Callable[[dict[str, Any]], _PoolKey]:
    def pool_key(context: dict[str, Any]) -> _PoolKey:
        context = dict(context)  # the pool is built from the original, idle_timeout included
        idle_timeout = context.pop("idle_timeout", None)
        return _PoolKey(key_fn(context), idle_timeout)

    return pool_key


class EndpointPools:
    """All the HTTP pools of one balancer: one per endpoint, scheme, TLS and pool settings.

    Thread-safe.  :meth:`close_endpoint` closes an endpoint's pools (its idle connections at
    once, connections in use when they come back); :meth:`close` closes everything, and a
    pool asked for afterwards comes closed (its requests fail with urllib3's
    ``ClosedPoolError``, before anything is sent).
    """

    def __init__(self, num_pools: int = 1000) -> None:
        self._num_pools = num_pools
        self._parent: Optional[EndpointPools] = None  # a forked child's inherited pools
        self._manager = PoolManager(num_pools=num_pools)
        self._manager.pool_classes_by_scheme = {"http": TaiHTTPConnectionPool,
                                                "https": TaiHTTPSConnectionPool}
        # Every pool setting is part of a pool's identity: urllib3's key knows maxsize and
        # block, and idle_timeout is added, so services on one address never share a pool
        # whose settings the last of them would win.
        key_fns: dict[str, Any] = {scheme: _with_idle_timeout(key_fn)
                                   for scheme, key_fn in self._manager.key_fn_by_scheme.items()}
        self._manager.key_fn_by_scheme = key_fns
        # urllib3 1.26's manager closes the pools it lets go (LRU eviction, clear(), del);
        # urllib3 2's only drops them, and their sockets close whenever the pools are freed:
        # closing is what close_endpoints() and close() promise, on both.
        self._manager.pools.dispose_func = _close_pool
        self._lock = threading.Lock()
        self._closed = False
        # The manager's key normalisation costs more than the rest of a pick: remember its
        # answers by the raw settings.  Entries go with close_endpoint() and close().
        self._cache: dict[tuple[Any, ...], HTTPConnectionPool] = {}

    def pool_for(self, host: str, port: int, scheme: str, settings: PoolConfig,
                 tls_key: Hashable, tls: Callable[[], Mapping[str, Any]]) -> HTTPConnectionPool:
        """The pool for one endpoint, scheme, pool settings and TLS settings.

        :param tls_key: the raw TLS settings (verify, cert, server name), hashable.
        :param tls: builds urllib3's TLS keyword arguments; called only for a new pool.
        """
        key = (host, port, scheme, settings, tls_key)
        pool = self._cache.get(key)
        if pool is not None and pool.pool is not None:
            return pool
        kwargs: dict[str, Any] = {"maxsize": settings.maxsize, "block": settings.block,
                                  "idle_timeout": settings.idle_timeout}
        if scheme == "https":
            kwargs.update(tls())
        parent = self._parent
        if parent is not None:  # the first pool asked for in a forked child
            self._parent = None
            parent._close_inherited()
        if self._closed:  # a request that picked just before close(): it fails unsent
            late: HTTPConnectionPool = self._manager.pool_classes_by_scheme[scheme](host, port)
            late.close()
            return late
        pool = self._manager.connection_from_host(host, port, scheme, pool_kwargs=kwargs)
        with self._lock:
            kept = not self._closed
            if kept:
                self._cache[key] = pool
        if not kept:  # close() came while the pool was made, and may have missed it
            pool.close()
        return pool

    def for_child(self) -> EndpointPools:
        """New, empty pools for a forked child, which must never use the parent's connections.

        Called in the after-fork hook, where nothing inherited may be closed or freed (see
        :mod:`tai_lb._forksafe`): these pools are kept for good.  The child closes its copies
        of their idle sockets (the parent's stay open) when it first asks for a pool, outside
        the hook, so a long-lived worker does not hold the parent's connections open.
        """
        _forksafe.inherited(self)
        child = EndpointPools(self._num_pools)
        child._parent = self
        return child

    def _close_inherited(self) -> None:
        # In the child, after the fork hooks: every queue has fresh locks by now.  The cache
        # knows every live pool; the manager's container lock, perhaps held at the fork, is
        # not taken.
        for pool in list(self._cache.values()):
            pool.close()

    def close_endpoint(self, host: str, port: int) -> int:
        """Close every pool of the endpoint at ``host:port``; returns how many."""
        return self.close_endpoints(((host, port),))

    def close_endpoints(self, endpoints: Iterable[tuple[str, int]]) -> int:
        """Close every pool of the endpoints given as ``(host, port)``; returns how many.

        One pass over the pools, however many endpoints go (a discovery update may remove
        thousands).
        """
        if not self._cache and not len(self._manager.pools):
            return 0  # no pool at all (no HTTP traffic yet)
        gone = set(endpoints)
        if not gone:
            return 0
        if self._cache:
            for cached in [k for k in list(self._cache) if (k[0], k[1]) in gone]:
                self._cache.pop(cached, None)
        pools = self._manager.pools
        with self._lock:
            # The container refuses plain iteration (not thread-safe); keys() takes its lock.
            keys = [k for k in pools.keys()  # noqa: SIM118
                    if _address(k) in gone]
        closed = 0
        for key in keys:
            try:
                del pools[key]  # the container closes the pool it drops
                closed += 1
            except KeyError:
                pass
        return closed

    def endpoints(self) -> list[tuple[str, int]]:
        """The (host, port) pairs that have at least one pool."""
        return sorted(set(map(_address, self._manager.pools.keys())))

    def close(self) -> None:
        """Close every pool (idle connections at once, those in use when they come back).

        Pools are closed, not dropped: with urllib3 2, a dropped pool's sockets close only
        when the pool is freed.  Safe to call twice.
        """
        with self._lock:
            self._closed = True
            self._cache.clear()
        self._manager.clear()  # closes them (dispose_func), outside the container's lock
