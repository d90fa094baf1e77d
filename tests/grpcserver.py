"""Real gRPC servers for the tests, on ephemeral loopback ports: an echo method served by a generic
handler (no generated code) and the standard ``grpc.health.v1`` service.

``/demo.Echo/Echo`` answers ``b"<name>:" + request``, or aborts with UNAVAILABLE while the
server's ``failing`` is set; :meth:`GrpcServer.set_serving` changes what its health service says.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ECHO = "/demo.Echo/Echo"


class GrpcServer:
    """One gRPC server on 127.0.0.1, started by the constructor; stop() it when done."""

    def __init__(self, name: str, tls: Optional[tuple[bytes, bytes]] = None) -> None:
        """``tls``: (private key, certificate chain) in PEM, to serve over TLS."""
        self.name = name
        self.failing = False
        self.calls = 0
        self._lock = threading.Lock()
        self._executor = futures.ThreadPoolExecutor(max_workers=4,
                                                    thread_name_prefix=f"grpc-{name}")
        self._server = grpc.server(self._executor)
        echo = grpc.unary_unary_rpc_method_handler(self._echo)  # bytes in, bytes out
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("demo.Echo", {"Echo": echo}),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if tls is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self._server.add_secure_port(
                "127.0.0.1:0", grpc.ssl_server_credentials([tls]))
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()
        self._stopped = False

    def _echo(self, request: bytes, context: Any) -> bytes:
        with self._lock:
            self.calls += 1
        if self.failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is failing")
        return self.name.encode() + b":" + request

    def set_serving(self, serving: bool, service: str = "") -> None:
        """Make the health service answer SERVING or NOT_SERVING for ``service``."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(service, status)

    def stop(self) -> None:
        """Stop serving at once and end the server's threads; calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._server.stop(None).wait(5)
        self._executor.shutdown(wait=True)
