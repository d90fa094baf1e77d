"""The generic connection pool and ``lb.connection()``, on real TCP connections to echo servers."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tai_lb import ConfigError, ConnectionPool, LoadBalancer, LoadBalancerError, PoolExhausted
from tai_lb.endpoint import Endpoint

from .conftest import FakeClock, in_forked_child, wait_for


class _EchoHandler(socketserver.StreamRequestHandler):
    """Answers each line with ``<connection number> <line>``."""

    server: EchoServer

    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        number = self.server.opened()
        try:
            for line in self.rfile:
                self.wfile.write(b"%d %s" % (number, line))
        except OSError:
            pass
        finally:
            self.server.ended()


class EchoServer(socketserver.ThreadingTCPServer):
    """A line echo server on 127.0.0.1 that counts the connections it has accepted and has open."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self._lock = threading.Lock()
        self.accepted = 0
        self.open = 0
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True,
                                        name="test-echo-server")
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def opened(self) -> int:
        with self._lock:
            self.accepted += 1
            self.open += 1
            return self.accepted

    def ended(self) -> None:
        with self._lock:
            self.open -= 1

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


class Conn:
    """One TCP connection to an echo server."""

    def __init__(self, address: str, counts: Counts) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self.valid = True
        self.closed = False
        self._counts = counts
        self.number = int(self.ask("hello").split()[0])  # the server's number for it

    def ask(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\n")
        return self.reader.readline().decode().strip()

    def close(self) -> None:
        self.closed = True
        self.reader.close()
        self.sock.close()
        self._counts.closed()


class Counts:
    """How many connections a factory opened and how many were closed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.made = 0
        self.gone = 0

    def made_one(self) -> None:
        with self._lock:
            self.made += 1

    def closed(self) -> None:
        with self._lock:
            self.gone += 1


@pytest.fixture
def server() -> Iterator[EchoServer]:
    echo = EchoServer()
    yield echo
    echo.stop()


@pytest.fixture
def servers() -> Iterator[list[EchoServer]]:
    echoes = [EchoServer(), EchoServer()]
    yield echoes
    for echo in echoes:
        echo.stop()


def factory_for(address: str, counts: Counts) -> Any:
    def factory() -> Conn:
        conn = Conn(address, counts)
        counts.made_one()
        return conn
    return factory


def make_pool(server: EchoServer, counts: Counts, **settings: Any) -> ConnectionPool[Conn]:
    return ConnectionPool(factory_for(server.address, counts), **settings)


def test_min_size_connections_are_opened_by_the_constructor(server: EchoServer) -> None:
    counts = Counts()
    with make_pool(server, counts, max_size=4, min_size=2) as pool:
        assert counts.made == 2 and server.accepted == 2
        stats = pool.stats()
        assert (stats["size"], stats["idle"], stats["in_use"]) == (2, 2, 0)
        with pool.connection() as conn:
            assert conn.ask("x").endswith("x")
        assert counts.made == 2  # the borrow took a pre-filled one
    assert counts.gone == 2


def test_32_threads_on_a_pool_of_4_open_at_most_4_and_leak_none(server: EchoServer) -> None:
    counts = Counts()
    pool = make_pool(server, counts, max_size=4, acquire_timeout=30)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for round_ in range(20):
                with pool.connection() as conn:
                    assert conn.ask(f"{index}-{round_}").endswith(f"{index}-{round_}")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    stats = pool.stats()
    assert stats["borrows"] == 32 * 20
    assert counts.made <= 4 and stats["size"] == counts.made and stats["in_use"] == 0
    pool.close()
    assert counts.gone == counts.made  # every connection opened was closed: none leaked
    assert pool.stats()["size"] == 0
    assert wait_for(lambda: server.open == 0)


def test_an_exhausted_pool_raises_pool_exhausted_after_the_timeout(server: EchoServer) -> None:
    counts = Counts()
    pool = make_pool(server, counts, max_size=4, acquire_timeout=0.05)
    hold = threading.Event()
    holding = threading.Barrier(5)
    outcomes: list[object] = []

    def holder() -> None:
        with pool.connection():
            holding.wait()
            hold.wait(30)

    def latecomer() -> None:
        try:
            with pool.connection():
                outcomes.append("got one")
        except PoolExhausted as error:
            outcomes.append(error)

    holders = [threading.Thread(target=holder) for _ in range(4)]
    for thread in holders:
        thread.start()
    holding.wait()  # all 4 connections are in use
    latecomers = [threading.Thread(target=latecomer) for _ in range(28)]
    for thread in latecomers:
        thread.start()
    for thread in latecomers:
        thread.join(30)
    hold.set()
    for thread in holders:
        thread.join(30)
    assert len(outcomes) == 28
    assert all(isinstance(o, PoolExhausted) and o.timeout == 0.05 for o in outcomes)
    assert pool.stats()["exhausted"] == 28
    assert counts.made == 4
    pool.close()
    assert counts.gone == 4


def test_waiting_threads_are_served_first_come_first_served(server: EchoServer) -> None:
    counts = Counts()
    pool = make_pool(server, counts, max_size=4, acquire_timeout=30)
    order: list[int] = []
    order_lock = threading.Lock()

    def waiter(index: int) -> None:
        # Borrow, note it, give back and at once borrow again: a thread that barges in ahead
        # of the waiters would get its second connection before a later waiter got its first.
        for _ in range(2):
            with pool.connection(), order_lock:
                order.append(index)

    with contextlib.ExitStack() as others:
        for _ in range(3):
            others.enter_context(pool.connection())
        first = pool.connection()
        first.__enter__()
        threads = []
        for index in range(28):
            thread = threading.Thread(target=waiter, args=(index,))
            thread.start()
            threads.append(thread)
            assert wait_for(lambda n=index + 1: pool.stats()["waiting"] == n)
        assert not order
        first.__exit__(None, None, None)  # one connection goes round the waiters, in turn
        for thread in threads:
            thread.join(30)
    assert order[:28] == list(range(28))
    assert sorted(order[28:]) == list(range(28))
    pool.close()
    assert counts.gone == counts.made


def test_a_connection_past_its_lifetime_is_closed_and_replaced(server: EchoServer,
                                                               clock: FakeClock) -> None:
    counts = Counts()
    pool = make_pool(server, counts, max_lifetime=10, clock=clock)
    with pool.connection() as conn:
        first = conn.number
    clock.advance(5)
    with pool.connection() as conn:
        assert conn.number == first  # young enough: reused
    clock.advance(6)  # 11 s old
    with pool.connection() as conn:
        assert conn.number != first
    assert counts.made == 2 and counts.gone == 1
    assert pool.stats()["expired"] == 1
    pool.close()


def test_a_connection_past_its_lifetime_when_given_back_is_closed(server: EchoServer,
                                                                   clock: FakeClock) -> None:
    counts = Counts()
    pool = make_pool(server, counts, max_lifetime=10, clock=clock)
    with pool.connection():
        clock.advance(11)
    assert counts.gone == 1 and pool.stats()["size"] == 0
    pool.close()


def test_a_connection_idle_too_long_is_closed_and_replaced(server: EchoServer,
                                                           clock: FakeClock) -> None:
    counts = Counts()
    pool = make_pool(server, counts, max_idle=5, clock=clock)
    with pool.connection() as conn:
        first = conn.number
    for _ in range(3):  # used every 4 s: never idle for 5, however old
        clock.advance(4)
        with pool.connection() as conn:
            assert conn.number == first
    clock.advance(6)
    with pool.connection() as conn:
        assert conn.number != first
    assert (counts.made, counts.gone, pool.stats()["expired"]) == (2, 1, 1)
    pool.close()


def test_a_connection_failing_validation_is_closed_and_the_next_idle_one_taken(
        server: EchoServer) -> None:
    counts = Counts()
    pool = make_pool(server, counts, max_size=4, min_size=2, validate=lambda c: c.valid)
    with pool.connection() as top:
        top.valid = False  # broken while in use, say
    with pool.connection() as conn:
        assert conn is not top and not conn.closed
        assert conn.ask("ok").endswith("ok")
    assert top.closed
    stats = pool.stats()
    assert (counts.made, counts.gone, stats["invalid"], stats["size"]) == (2, 1, 1, 1)
    pool.close()


def test_when_validation_fails_with_no_other_idle_connection_a_new_one_is_opened(
        server: EchoServer) -> None:
    counts = Counts()

    def validate(conn: Conn) -> bool:
        if not conn.valid:
            raise OSError("broken")  # a validator that raises refuses the connection
        return True

    pool = make_pool(server, counts, max_size=1, validate=validate)
    with pool.connection() as first:
        first.valid = False
    with pool.connection() as second:
        assert second is not first and second.number != first.number
    assert first.closed and pool.stats()["invalid"] == 1
    pool.close()


def test_an_exception_in_the_block_closes_the_connection_instead_of_giving_it_back(
        server: EchoServer) -> None:
    counts = Counts()
    pool = make_pool(server, counts, max_size=2)
    with pytest.raises(ZeroDivisionError), pool.connection() as conn:
        broken = conn
        1 / 0  # noqa: B018
    assert broken.closed
    with pool.connection() as conn:
        assert conn is not broken
    stats = pool.stats()
    assert (stats["failed"], stats["size"], counts.made, counts.gone) == (1, 1, 2, 1)
    pool.close()


def test_a_factory_that_raises_gives_its_slot_back(server: EchoServer) -> None:
    attempts = []

    def factory() -> Conn:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionRefusedError("down")
        return Conn(server.address, Counts())

    pool = ConnectionPool(factory, max_size=1, acquire_timeout=0)
    with pytest.raises(ConnectionRefusedError), pool.connection():
        pass
    with pool.connection() as conn:  # the one slot is free again
        assert conn.ask("up").endswith("up")
    pool.close()


def test_close_closes_idle_connections_now_and_borrowed_ones_when_given_back(
        server: EchoServer) -> None:
    counts = Counts()
    pool = make_pool(server, counts, max_size=3, min_size=2)
    with pool.connection() as borrowed:
        pool.close()
        assert counts.gone == 1 and not borrowed.closed  # the idle one went at once
        assert borrowed.ask("still").endswith("still")
        with pytest.raises(LoadBalancerError), pool.connection():
            pass
    assert borrowed.closed and counts.gone == 2
    assert pool.stats()["pool_closed"] and pool.closed
    assert wait_for(lambda: server.open == 0)
    pool.close()  # twice is fine


def test_close_wakes_waiting_threads(server: EchoServer) -> None:
    pool = make_pool(server, Counts(), max_size=1, acquire_timeout=60)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with pool.connection():
                pass
        except BaseException as error:
            errors.append(error)

    with pool.connection():
        thread = threading.Thread(target=waiter)
        thread.start()
        assert wait_for(lambda: pool.stats()["waiting"] == 1)
        pool.close()
        thread.join(10)
        assert not thread.is_alive()  # woken, not left to wait 60 s
    assert len(errors) == 1 and type(errors[0]) is LoadBalancerError


@pytest.mark.parametrize(("settings", "key"), [
    ({"max_size": 0}, "max_size"),
    ({"max_size": 2, "min_size": 3}, "min_size"),
    ({"acquire_timeout": -1}, "acquire_timeout"),
    ({"max_lifetime": 0}, "max_lifetime"),
    ({"max_idle": "5"}, "max_idle"),
    ({"validate": 3}, "validate"),
    ({"close": "x"}, "close"),
])
def test_bad_settings_raise_config_error_naming_the_setting(settings: dict[str, Any],
                                                            key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ConnectionPool(object, **settings)
    assert caught.value.path == key


# -- lb.connection() ------------------------------------------------------------------------


def endpoint_factory(counts: Counts) -> Any:
    def factory(endpoint: Endpoint) -> Conn:
        conn = Conn(endpoint.address, counts)
        counts.made_one()
        return conn
    return factory


def balancer_for(servers: list[EchoServer]) -> LoadBalancer:
    return LoadBalancer.from_config(
        {"services": {"echo": {"endpoints": [s.address for s in servers]}}})


def test_lb_connection_borrows_from_one_pool_per_endpoint_and_factory(
        servers: list[EchoServer]) -> None:
    counts = Counts()
    factory = endpoint_factory(counts)
    with balancer_for(servers) as lb:
        seen = []
        for _ in range(6):
            with lb.connection("echo", factory, max_size=2) as conn:
                seen.append(conn.sock.getpeername()[1])
        assert sorted(set(seen)) == sorted(s.server_address[1] for s in servers)  # round robin
        assert counts.made == 2  # one connection per endpoint, reused
        pools = lb.topology.connection_pools.pools()
        assert sorted(pools) == sorted(s.address for s in servers)
        assert all(len(p) == 1 and p[0].max_size == 2 for p in pools.values())
        status = lb.status()["services"]["echo"]["endpoints"]
        assert sum(e["successes"] for e in status.values()) == 6
    assert counts.gone == 2  # lb.close() closed the pools


def test_lb_connection_block_that_raises_fails_the_lease_and_closes_the_connection(
        servers: list[EchoServer]) -> None:
    counts = Counts()
    with balancer_for(servers[:1]) as lb:
        factory = endpoint_factory(counts)
        with pytest.raises(OSError), lb.connection("echo", factory) as conn:
            raise OSError("protocol error")
        assert conn.closed
        endpoint = lb.status()["services"]["echo"]["endpoints"][servers[0].address]
        assert (endpoint["failures"], endpoint["successes"], endpoint["in_flight"]) == (1, 0, 0)
        with lb.connection("echo", factory) as again:
            assert again is not conn
    assert counts.gone == 2


def test_lb_connection_rejects_an_unknown_pool_setting(servers: list[EchoServer]) -> None:
    with balancer_for(servers[:1]) as lb, pytest.raises(ConfigError) as caught, \
            lb.connection("echo", endpoint_factory(Counts()), max_sise=3):
        pass
    assert caught.value.path == "max_sise"


def test_a_removed_endpoints_pool_drains_then_closes(servers: list[EchoServer]) -> None:
    counts = Counts()
    factory = endpoint_factory(counts)
    with balancer_for(servers) as lb:
        for _ in range(2):  # one idle connection to each endpoint
            with lb.connection("echo", factory):
                pass
        with lb.connection("echo", factory) as conn:
            gone, staying = sorted(servers, key=lambda s: s.server_address[1]
                                   != conn.sock.getpeername()[1])
            pool = lb.topology.connection_pools.pools()[gone.address][0]
            lb.registry.deregister("echo", gone.address)
            assert not pool.closed  # its connection is still in use: the endpoint drains
            assert conn.ask("draining").endswith("draining")
        assert pool.closed and conn.closed  # the last lease ended: closed, not given back
        assert gone.address not in lb.topology.connection_pools.pools()
        assert wait_for(lambda: gone.open == 0)
        assert staying.open == 1  # the other endpoint's pool is untouched
        lb.registry.deregister("echo", staying.address)  # nothing in flight: closed at once
        assert wait_for(lambda: staying.open == 0)
        assert lb.topology.connection_pools.pools() == {}


def test_a_forked_child_never_uses_the_parents_connections(server: EchoServer) -> None:
    counts = Counts()
    pool = make_pool(server, counts, max_size=2, min_size=1)
    with pool.connection() as conn:
        parents = conn.number

    def child() -> dict[str, Any]:
        stats = pool.stats()
        with pool.connection() as theirs:
            number = theirs.number
            answer = theirs.ask("child")
        return {"number": number, "answer": answer, "size_before": stats["size"]}

    seen = in_forked_child(child, timeout=30)
    assert seen["number"] not in (parents, None) and seen["answer"].endswith("child")
    assert seen["size_before"] == 0  # the child starts empty
    with pool.connection() as conn:  # the child neither used nor closed the parent's one
        assert conn.number == parents and conn.ask("parent").endswith("parent")
    pool.close()


def test_a_connection_borrowed_across_a_fork_is_not_given_back_in_the_child(
        server: EchoServer) -> None:
    pool = make_pool(server, Counts(), max_size=1)
    lease = pool.connection()
    conn = lease.__enter__()

    def child() -> dict[str, Any]:
        lease.__exit__(None, None, None)  # the parent's connection: kept out of the child's pool
        with pool.connection() as theirs:
            return {"reused": theirs is conn, "closed": conn.closed}

    seen = in_forked_child(child, timeout=30)
    assert seen == {"reused": False, "closed": False}
    lease.__exit__(None, None, None)
    pool.close()


