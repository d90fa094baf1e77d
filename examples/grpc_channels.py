"""gRPC channels balanced by tai-lb: ``lb.connection()`` hands out pooled ``grpc.Channel`` objects.

Three real gRPC servers on 127.0.0.1 (ephemeral ports) serve ``/demo.Echo/Echo`` through a
generic handler (bytes in, bytes out: no generated code) and the standard ``grpc.health.v1``
health service.  One LoadBalancer balances them with peak_ewma, a circuit breaker per endpoint
and a ``grpc`` health check.  The example calls the service in three phases:

1. all three servers serve;
2. ``beta`` tells its health service NOT_SERVING (as a server does when it drains): the health
   check takes it out, and no call reaches it;
3. ``gamma`` stops dead: the calls that find it fail with UNAVAILABLE, which fails their lease
   (the exception is raised inside the ``with`` block), so peak_ewma and the breaker move the
   traffic to ``alpha``, and the health check takes ``gamma`` out too.

It prints a table of the calls each server answered in each phase, and exits 0 when the traffic
moved as it should.  peak_ewma sends most calls to the servers that answered fastest lately; the
first call to each server also opens its channel and is the slowest, so the split between
healthy servers is uneven in so short a run.

Run it with ``python examples/grpc_channels.py`` (``pip install 'tai-lb[grpc]'`` first).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent import futures
from typing import Any, Callable

# grpcio's core logs to stderr at its own verbosity (a stopped server's GOAWAY, say): errors only.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # after its verbosity is set
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import tai_lb

CALLS_PER_PHASE = 300
NAMES = ("alpha", "beta", "gamma")


class EchoServer:
    """A gRPC server on 127.0.0.1: ``/demo.Echo/Echo`` answers ``b"<name>:" + request``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor = futures.ThreadPoolExecutor(max_workers=4)
        self._server = grpc.server(self._executor)
        echo = grpc.unary_unary_rpc_method_handler(
            self._echo, request_deserializer=bytes, response_serializer=bytes)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("demo.Echo", {"Echo": echo}),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()
        self._stopped = False

    def _echo(self, request: bytes, context: Any) -> bytes:
        return self.name.encode() + b":" + request

    def not_serving(self) -> None:
        """What a draining server does: its health service says NOT_SERVING."""
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self) -> None:
        """Stop at once (calls in progress are cancelled) and end the server's threads; calling
        it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._server.stop(None).wait(5)
        self._executor.shutdown(wait=True)


def open_channel(endpoint: tai_lb.Endpoint) -> grpc.Channel:
    """The factory of lb.connection(): one channel to one endpoint (module level, so it is the
    same object on every call, and so the same pool)."""
    return grpc.insecure_channel(endpoint.address)


def close_channel(channel: grpc.Channel) -> None:
    channel.close()


def call(lb: tai_lb.LoadBalancer, request: bytes) -> str:
    """One call through a pooled channel; returns the name of the server that answered."""
    with lb.connection("echo", open_channel, close=close_channel, max_size=4) as channel:
        answer: bytes = channel.unary_unary("/demo.Echo/Echo")(request, timeout=2)
    return answer.split(b":", 1)[0].decode()


def run_phase(lb: tai_lb.LoadBalancer) -> dict[str, int]:
    """CALLS_PER_PHASE calls: how many each server answered, and how many failed."""
    counts = dict.fromkeys((*NAMES, "failed"), 0)
    for i in range(CALLS_PER_PHASE):
        try:
            counts[call(lb, b"%d" % i)] += 1
        except grpc.RpcError:
            counts["failed"] += 1
    return counts


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def main() -> int:
    servers = {name: EchoServer(name) for name in NAMES}
    lb = tai_lb.LoadBalancer.from_config({"services": {"echo": {
        "endpoints": [server.address for server in servers.values()],
        "strategy": "peak_ewma",
        "circuit_breaker": {"fail_max": 2, "reset_timeout": 30},
        "health_check": {"type": "grpc", "interval": 0.1, "timeout": 0.5,
                         "healthy_threshold": 1, "unhealthy_threshold": 1,
                         # With 2 of 3 down, the default (0.5) would balance over all three
                         # (panic mode); 0 keeps the traffic on the healthy one.
                         "panic_threshold": 0}}}})
    address = {name: server.address for name, server in servers.items()}
    rows: list[tuple[str, dict[str, int]]] = []
    try:
        with lb:
            rows.append(("all serving", run_phase(lb)))

            servers["beta"].not_serving()
            if not wait_until(lambda: not lb.health_checker.is_healthy("echo", address["beta"])):
                print("beta was never found NOT_SERVING", file=sys.stderr)
                return 1
            rows.append(("beta NOT_SERVING", run_phase(lb)))

            servers["gamma"].stop()
            rows.append(("gamma stopped", run_phase(lb)))
            wait_until(lambda: not lb.health_checker.is_healthy("echo", address["gamma"]))
            rows.append(("after the check", run_phase(lb)))

            print(f"{'phase':<18}" + "".join(f"{name:>8}" for name in (*NAMES, "failed")))
            for phase, counts in rows:
                print(f"{phase:<18}" + "".join(f"{counts[name]:>8}"
                                               for name in (*NAMES, "failed")))
            print()
            stats = lb.stats("echo")
            for name in NAMES:
                endpoint = stats[address[name]]
                breaker = endpoint.breaker.state if endpoint.breaker is not None else "none"
                healthy = lb.health_checker.is_healthy("echo", address[name])
                print(f"{name:<6} {address[name]:<16} health={'up' if healthy else 'down':<5}"
                      f"breaker={breaker:<7} ok={endpoint.successes} failed={endpoint.failures}")
    finally:
        for server in servers.values():
            server.stop()

    first, drained, stopped, checked = (counts for _, counts in rows)
    moved = (sum(first[name] for name in NAMES) == CALLS_PER_PHASE
             and drained["beta"] == 0 and drained["failed"] == 0
             and stopped["beta"] == 0 and stopped["gamma"] == 0
             and stopped["failed"] <= 2  # the breaker's fail_max, at most
             and checked["alpha"] == CALLS_PER_PHASE)
    print()
    print("traffic moved off beta (NOT_SERVING) and gamma (stopped): "
          + ("yes" if moved else "NO"))
    return 0 if moved else 1


if __name__ == "__main__":
    sys.exit(main())
