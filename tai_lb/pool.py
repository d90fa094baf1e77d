"""HTTP connection pools per endpoint: urllib3's pools, with three additions.

* A connection idle for longer than ``idle_timeout`` is closed before reuse, so a backend that
  closes idle keep-alive connections never fails a request sent on one it is closing.
* A failure while connecting (TCP or the TLS handshake) is marked, so retries can tell that the
  request never left (see :func:`tai_lb.retry.classify`).
* A callback can be attached to a connection; it runs when the connection returns to the pool,
  which is when a streamed response has been read to the end or closed.

Pools are urllib3 ``PoolManager`` pools keyed by endpoint address, scheme and every TLS setting
(server name, CA bundle, client certificate, verification), so a request with ``verify=False``
gets its own pool and never weakens the next request (CVE-2024-35195).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager

from ._settings import Settings, check_int, check_number, shown
from .exceptions import ConfigError

__all__ = ["EndpointPools", "PoolConfig"]

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

    maxsize: int = 10
    block: bool = True
    timeout: float = 5.0
    idle_timeout: float = 1.5

    def __post_init__(self) -> None:
        check_int(self.maxsize, "maxsize", 1, 10_000)
        if not isinstance(self.block, bool):
            raise ConfigError("block", f"must be true or false, got {shown(self.block)}")
        object.__setattr__(self, "timeout", check_number(self.timeout, "timeout"))
        object.__setattr__(self, "idle_timeout", check_number(self.idle_timeout, "idle_timeout"))


class _PoolMixin:
    """What tai-lb adds to urllib3's HTTP and HTTPS connection pools."""

    idle_timeout: float = 1.5

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


class TaiHTTPSConnectionPool(_PoolMixin, HTTPSConnectionPool):
    """urllib3's HTTPS pool with idle expiry, release callbacks and connect-phase marking."""


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


class EndpointPools:
    """All the HTTP pools of one balancer: one per endpoint, scheme and TLS setting.

    Thread-safe.  :meth:`close_endpoint` closes an endpoint's pools (its idle connections at
    once, connections in use when they come back); :meth:`close` closes everything.
    """

    def __init__(self, num_pools: int = 1000) -> None:
        self._manager = PoolManager(num_pools=num_pools)
        self._manager.pool_classes_by_scheme = {"http": TaiHTTPConnectionPool,
                                                "https": TaiHTTPSConnectionPool}
        self._lock = threading.Lock()
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
        kwargs: dict[str, Any] = {"maxsize": settings.maxsize, "block": settings.block}
        if scheme == "https":
            kwargs.update(tls())
        pool = self._manager.connection_from_host(host, port, scheme, pool_kwargs=kwargs)
        pool.idle_timeout = settings.idle_timeout  # type: ignore[attr-defined]
        self._cache[key] = pool
        return pool

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
                    if (k.key_host, k.key_port) in gone]
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
        return sorted({(k.key_host, k.key_port or 0)
                       for k in self._manager.pools.keys()})  # noqa: SIM118

    def close(self) -> None:
        """Close every pool."""
        self._cache.clear()
        self._manager.clear()
