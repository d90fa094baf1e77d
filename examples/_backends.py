"""Tiny HTTP backends on 127.0.0.1 for the examples to balance over (not part of tai-lb).

Each :class:`DemoBackend` is a threaded ``http.server`` on a free port of 127.0.0.1.  It answers
every GET with 200 and a JSON body naming itself, ``{"backend": "alpha", "path": "/..."}``, so a
caller can see which endpoint served it.  :meth:`DemoBackend.kill` closes its listening socket
and every open connection, as a crashed process would: new connections are refused.

Run as a script, it serves on the ports it is given until Ctrl-C, for the quickstart's first
example (``docs/quickstart.rst``)::

    python examples/_backends.py 8001 8002
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import socketserver
import sys
import threading
from typing import Any

__all__ = ["DemoBackend", "start_backends"]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: DemoBackend

    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.request)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the examples print what matters

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # killed under our feet
            super().handle()

    def do_GET(self) -> None:
        body = json.dumps({"backend": self.server.name, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class DemoBackend(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """One HTTP backend on 127.0.0.1, serving on a daemon thread from construction on."""

    daemon_threads = True

    def __init__(self, name: str, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.name = name
        self.alive = True
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"example-backend-{name}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as an endpoint of a configuration."""
        return f"127.0.0.1:{self.server_address[1]}"

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def kill(self) -> None:
        """Refuse new connections and cut every open one.  Safe to call twice."""
        if not self.alive:
            return
        self.alive = False
        self.shutdown()
        self.server_close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=1)


def start_backends(*names: str) -> list[DemoBackend]:
    """One running backend per name."""
    return [DemoBackend(name) for name in names]


if __name__ == "__main__":
    running = [DemoBackend(f"backend-{port}", int(port)) for port in sys.argv[1:] or ["8001"]]
    print("serving on", ", ".join(backend.address for backend in running), "(Ctrl-C stops)",
          flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    for backend in running:
        backend.kill()
