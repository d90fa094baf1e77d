"""Balancing a client that is not HTTP: ``lb.pick()`` leases and ``lb.connection()`` pools.

Run it with ``python examples/non_http_pick.py``: it needs nothing but tai-lb.  It starts three
line-based TCP echo servers on 127.0.0.1 (alpha, bravo, gamma; each answers a line with its own
name and the line) and one balancer whose service ``echo`` spreads keys over them with
``consistent_hash``, with a circuit breaker per endpoint.  Then it:

1. calls the servers over raw sockets with ``with lb.pick("echo", key=...) as lease:`` (a new
   socket per call): each key always lands on the same server, and the lease records each
   call's outcome and latency (``lease.mark_failure()`` for a wrong answer);
2. makes 300 calls with ``with lb.connection("echo", connect, key=...) as sock:``, which keeps
   a pool of sockets per endpoint: 300 calls open one socket per server;
3. stops gamma (its listener and its open connections): the calls that meet it fail, their
   leases count the failures, gamma's breaker opens after 2, and the calls go to the others.

It prints the key placement, the pool figures and the calls after the stop, and exits 0 when
all went as described.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import sys
import threading
from collections import Counter

import tai_lb

KEYS = [f"user-{n}" for n in range(12)]


class _EchoHandler(socketserver.StreamRequestHandler):
    server: EchoServer

    def handle(self) -> None:
        self.server.track(self.connection)
        with contextlib.suppress(OSError):
            for line in self.rfile:  # one answer per line, until the client closes
                self.wfile.write(self.server.name.encode() + b" " + line)


class EchoServer(socketserver.ThreadingTCPServer):
    """A TCP echo server on a free port of 127.0.0.1, serving from construction on."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.name = name
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=f"example-echo-{name}", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def track(self, sock: socket.socket) -> None:
        with self.lock:
            self.sockets.append(sock)

    def stop(self) -> None:
        """Refuse new connections and cut the open ones, as a crashed server would."""
        self.shutdown()
        self.server_close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=1)


def ask(sock: socket.socket, text: str) -> str:
    """Send one line, read the one-line answer (raises ConnectionError if the server is gone)."""
    sock.sendall(text.encode() + b"\n")
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        answer += chunk
    return answer.decode().strip()


def connect(endpoint: tai_lb.Endpoint) -> socket.socket:
    """The factory of ``lb.connection()``: module level, so the same object (the same pool) on
    every call.  ``endpoint`` is the endpoint the balancer picked."""
    return socket.create_connection((endpoint.host, endpoint.port), timeout=2)


def main() -> int:
    servers = [EchoServer(name) for name in ("alpha", "bravo", "gamma")]
    names = {server.address: server.name for server in servers}
    print("servers: " + ", ".join(f"{s.name} {s.address}" for s in servers))
    lb = tai_lb.LoadBalancer.from_config({"services": {"echo": {
        "endpoints": list(names),
        "strategy": "consistent_hash",
        "circuit_breaker": {"fail_max": 2, "reset_timeout": 60},
    }}})
    ok = True
    with lb:
        # 1. Leases: pick an endpoint, make the call yourself, release the lease.
        placement: dict[str, set[str]] = {}
        for _ in range(3):
            for key in KEYS:
                with lb.pick("echo", key=key) as lease:  # released at the end of the block
                    with socket.create_connection((lease.endpoint.host, lease.endpoint.port),
                                                  timeout=2) as sock:
                        answer = ask(sock, key)
                    if not answer.endswith(key):
                        lease.mark_failure()  # a wrong answer: counted as a failure
                placement.setdefault(key, set()).add(answer.split()[0])
        print("1. lb.pick() over raw sockets, each key 3 times:")
        for key in KEYS:
            print(f"   {key:<8} -> {', '.join(sorted(placement[key]))}")
        sticky = all(len(found) == 1 for found in placement.values())
        spread = len({server for found in placement.values() for server in found})
        print(f"   every key on one server: {'yes' if sticky else 'NO'}; servers used: {spread}")
        ok &= sticky and spread > 1

        # 2. lb.connection(): the same balancing, with a pool of sockets per endpoint.
        served: Counter[str] = Counter()
        for n in range(300):
            key = KEYS[n % len(KEYS)]
            with lb.connection("echo", connect, key=key, max_size=4, max_idle=30) as sock:
                served[ask(sock, key).split()[0]] += 1
        pools = lb.topology.connection_pools.pools()
        opened = sum(pool.stats()["opened"] for found in pools.values() for pool in found)
        borrows = sum(pool.stats()["borrows"] for found in pools.values() for pool in found)
        print("2. lb.connection(), 300 calls: "
              + ", ".join(f"{name} {served[name]}" for name in sorted(served))
              + f"; {borrows} borrows, {opened} sockets opened")
        ok &= sum(served.values()) == 300 and opened == len(served)

        # 3. A server stops: the calls that meet it fail, then its breaker keeps it out.
        gamma = servers[2]
        gamma.stop()
        failed = 0
        after: Counter[str] = Counter()
        for n in range(120):
            key = KEYS[n % len(KEYS)]
            try:
                with lb.connection("echo", connect, key=key, max_size=4) as sock:
                    after[ask(sock, key).split()[0]] += 1
            except OSError:  # raised in the block, or by connect(): the lease failed
                failed += 1
        breaker = lb.stats("echo")[gamma.address].breaker
        state = breaker.state if breaker is not None else "none"
        print(f"3. gamma stopped, 120 calls: {failed} failed, then "
              + ", ".join(f"{name} {after[name]}" for name in sorted(after))
              + f"; gamma's breaker: {state}")
        ok &= failed == 2 and after["gamma"] == 0 and state == "open"
    for server in servers[:2]:
        server.stop()
    print(f"as described: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
