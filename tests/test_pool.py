"""HTTP pools: waiters served in order, every service's own pool settings, close()."""

from __future__ import annotations

import threading
from typing import Any, Union

import pytest
import requests
from urllib3.exceptions import ClosedPoolError, SSLError

import tai_lb
from tai_lb.pool import (
    _CONNECT_PHASE,
    EndpointPools,
    FairQueue,
    PoolConfig,
    TaiHTTPConnectionPool,
    failed_while_connecting,
)

from .backends import Backend
from .conftest import functions_on_stack, wait_for

WAITERS = 6


def _waiting(thread: threading.Thread) -> bool:
    return "get" in functions_on_stack(thread)


def test_a_returned_connection_goes_to_the_longest_waiting_thread() -> None:
    pool = TaiHTTPConnectionPool("127.0.0.1", 9, maxsize=1, block=True)
    assert isinstance(pool.pool, FairQueue)
    order: list[Union[int, str]] = []
    conn = pool._get_conn()

    def borrow(index: int) -> None:
        got = pool._get_conn(timeout=30)
        order.append(index)
        pool._put_conn(got)

    threads = []
    for index in range(WAITERS):  # they queue up one after another, in a known order
        thread = threading.Thread(target=borrow, args=(index,), name=f"test-waiter-{index}")
        thread.start()
        assert wait_for(lambda t=thread: _waiting(t))  # type: ignore[misc]
        threads.append(thread)
    # The holder puts its connection back and at once asks again: it must wait behind the
    # others (with a plain LifoQueue it would usually take the connection straight back).
    pool._put_conn(conn)
    conn = pool._get_conn(timeout=30)
    order.append("holder")
    pool._put_conn(conn)
    for thread in threads:
        thread.join()
    assert order == [*range(WAITERS), "holder"]
    pool.close()


def test_the_fair_queue_keeps_lifo_idle_items_and_the_queue_timeouts() -> None:
    q = FairQueue(3)
    for item in ("a", "b", "c"):
        q.put(item)
    assert [q.get(), q.get(), q.get()] == ["c", "b", "a"]  # the most recent first
    with pytest.raises(Exception) as empty:
        q.get(block=False)
    assert type(empty.value).__name__ == "Empty"
    with pytest.raises(Exception) as timed_out:
        q.get(timeout=0.01)
    assert type(timed_out.value).__name__ == "Empty"
    assert not q._waiters  # the waiter that gave up left its place
    with pytest.raises(ValueError):
        q.get(timeout=-1)
    q.put("d")
    assert q.get(block=False) == "d"


def test_an_exhausted_fair_pool_still_fails_as_http_pool_exhausted() -> None:
    backend = Backend("one")
    try:
        config = {"services": {"users": {"endpoints": [backend.address],
                                         "pool": {"maxsize": 1, "timeout": 0.05},
                                         "retries": {"attempts": 1}}}}
        with tai_lb.LoadBalancer.from_config(config) as lb:
            pool = lb.pools.pool_for("127.0.0.1", backend.port, "http",
                                      lb.service_config("users").pool, None, dict)
            held = pool._get_conn()
            try:
                with pytest.raises(tai_lb.HTTPPoolExhausted):
                    lb.session().get("http://users/")
            finally:
                pool._put_conn(held)
            assert lb.session().get("http://users/").status_code == 200
    finally:
        backend.stop()


def test_services_on_one_address_each_get_their_own_pool_settings() -> None:
    pools = EndpointPools()
    quick = pools.pool_for("127.0.0.1", 8080, "http", PoolConfig(idle_timeout=0.5), None, dict)
    slow = pools.pool_for("127.0.0.1", 8080, "http", PoolConfig(idle_timeout=30.0), None, dict)
    assert quick is not slow  # one pool would keep the last writer's idle_timeout
    assert (quick.idle_timeout, slow.idle_timeout) == (0.5, 30.0)  # type: ignore[attr-defined]
    same = pools.pool_for("127.0.0.1", 8080, "http", PoolConfig(idle_timeout=0.5, timeout=9.0),
                          None, dict)
    assert same is quick  # what only a request's wait uses needs no pool of its own
    assert pools.endpoints() == [("127.0.0.1", 8080)]
    assert pools.close_endpoint("127.0.0.1", 8080) == 2
    assert quick.pool is None and slow.pool is None
    pools.close()


def test_two_services_on_one_backend_keep_their_idle_timeouts() -> None:
    backend = Backend("shared")
    try:
        config = {"services": {
            "quick": {"endpoints": [backend.address], "pool": {"idle_timeout": 0.5}},
            "slow": {"endpoints": [backend.address], "pool": {"idle_timeout": 30}}}}
        with tai_lb.LoadBalancer.from_config(config) as lb, lb.session() as session:
            for service in ("quick", "slow"):
                assert session.get(f"http://{service}/").status_code == 200
            timeouts = {}
            for service in ("quick", "slow"):
                pool = lb.pools.pool_for("127.0.0.1", backend.port, "http",
                                          lb.service_config(service).pool, None, dict)
                timeouts[service] = pool.idle_timeout  # type: ignore[attr-defined]
            assert timeouts == {"quick": 0.5, "slow": 30.0}
    finally:
        backend.stop()


def test_close_closes_every_pool_and_later_pools_come_closed() -> None:
    backend = Backend("one")
    try:
        config: dict[str, Any] = {"services": {"users": {"endpoints": [backend.address]}}}
        lb = tai_lb.LoadBalancer.from_config(config)
        with lb.session() as session:
            assert session.get("http://users/").status_code == 200
        settings = lb.service_config("users").pool
        pool = lb.pools.pool_for("127.0.0.1", backend.port, "http", settings, None, dict)
        idle = list(pool.pool.queue)  # type: ignore[union-attr]
        assert any(c is not None and c.sock is not None for c in idle)  # a kept-alive socket
        lb.close()
        assert pool.pool is None
        assert all(c is None or c.sock is None for c in idle)  # closed, not left to the GC
        # A request that picked just before close() asks for its pool just after: it gets a
        # closed one (its attempt fails before sending), never a new pool nobody will close.
        late = lb.pools.pool_for("127.0.0.1", backend.port, "http", settings, None, dict)
        assert late.pool is None
        with pytest.raises(ClosedPoolError):
            late.urlopen("GET", "/")
        assert lb.pools.endpoints() == []
    finally:
        backend.stop()


def test_requests_still_flow_through_the_fair_pools() -> None:
    backend = Backend("one")
    try:
        config = {"services": {"users": {"endpoints": [backend.address],
                                         "pool": {"maxsize": 2}}}}
        with tai_lb.LoadBalancer.from_config(config) as lb, lb.session() as session:
            errors: list[BaseException] = []

            def work() -> None:
                try:
                    for _ in range(20):
                        assert session.get("http://users/").status_code == 200
                except (AssertionError, requests.RequestException) as error:
                    errors.append(error)

            threads = [threading.Thread(target=work, name=f"test-client-{i}") for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == []
            assert backend.max_active <= 2
    finally:
        backend.stop()


def test_an_error_raised_while_connecting_is_not_sent() -> None:
    inner = OSError("handshake failed")
    setattr(inner, _CONNECT_PHASE, True)
    wrapped = SSLError(inner)
    assert failed_while_connecting(wrapped)
    assert not failed_while_connecting(SSLError(OSError("after sending")))
