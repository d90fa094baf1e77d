"""Real HTTP(S) backends on 127.0.0.1 for the tests, with faults on demand.

Each :class:`Backend` is a threaded ``http.server`` on an ephemeral port, with TCP_NODELAY on
every accepted socket (otherwise each keep-alive request waits about 40 ms for delayed ACKs).
It records what it received, and its ``mode`` chooses what it does with the next requests.
"""

from __future__ import annotations

import http.server
import json
import socket
import socketserver
import ssl
import struct
import threading
import time
from typing import Any, Callable, Optional

import tai_lb


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
        if self.server.backend.idle_close is not None:
            self.connection.settimeout(self.server.backend.idle_close)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (TimeoutError, socket.timeout):  # idle keep-alive connection: close it
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self.close_connection = True

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        backend = self.server.backend
        body = self._body()
        last_done = getattr(self, "last_done", None)
        if (backend.drop_idle_after is not None and last_done is not None
                and time.monotonic() - last_done > backend.drop_idle_after):
            # A keep-alive connection idle too long: read the request, then close without an
            # answer, as a server closing idle connections does when a request races its close.
            with backend.lock:
                backend.dropped += 1
            self.close_connection = True
            return
        sni = getattr(self.connection, "tai_sni", None)
        record = {"method": self.command, "path": self.path, "headers": dict(self.headers),
                  "body": body, "sni": sni, "host_headers": self.headers.get_all("Host")}
        with backend.lock:
            backend.received.append(record)
            backend.active += 1
            backend.max_active = max(backend.max_active, backend.active)
        try:
            backend.handle(self, record)
        finally:
            with backend.lock:
                backend.active -= 1
            self.last_done = time.monotonic()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

    def reply(self, status: int = 200, body: bytes = b"", headers: Optional[dict[str, str]] = None,
              ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reset(self) -> None:
        """Abort the connection with a TCP reset."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    backend: Backend

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        context = self.backend.tls_context
        if context is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(sock, server_side=True)
        return sock, address


Behaviour = Callable[[_Handler, dict[str, Any]], None]


class Backend:
    """One real HTTP backend on 127.0.0.1 with a replaceable behaviour.

    :param name: sent back in the ``X-Backend`` header and the JSON body.
    :param tls_context: serve HTTPS with this server-side context.
    :param idle_close: close a keep-alive connection idle this many seconds.
    """

    def __init__(self, name: str = "backend", tls_context: Optional[ssl.SSLContext] = None,
                 idle_close: Optional[float] = None,
                 drop_idle_after: Optional[float] = None) -> None:
        self.name = name
        self.tls_context = tls_context
        self.idle_close = idle_close
        self.drop_idle_after = drop_idle_after
        self.dropped = 0
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        self.received: list[dict[str, Any]] = []
        self.behaviour: Behaviour = self.ok
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.backend = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05},
                                       name=f"test-backend-{name}", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def handle(self, handler: _Handler, record: dict[str, Any]) -> None:
        self.behaviour(handler, record)

    def ok(self, handler: _Handler, record: dict[str, Any]) -> None:
        body = json.dumps({"backend": self.name, "path": record["path"],
                           "host": record["headers"].get("Host")}).encode()
        handler.reply(200, body, {"X-Backend": self.name, "Content-Type": "application/json"})

    def requests_count(self) -> int:
        with self.lock:
            return len(self.received)

    def stop(self) -> None:
        """Stop serving and close the listening socket: new connections are refused."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=2)


def status(code: int) -> Behaviour:
    def behaviour(handler: _Handler, record: dict[str, Any]) -> None:
        handler.reply(code, f"status {code}".encode(), {"X-Backend": handler.server.backend.name})
    return behaviour


def reset_connection(handler: _Handler, record: dict[str, Any]) -> None:
    handler.reset()


def cut_off_body(handler: _Handler, record: dict[str, Any]) -> None:
    """Promise 1000 bytes, send 10, then reset."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b"x" * 10)
    handler.wfile.flush()
    time.sleep(0.01)
    handler.reset()


def redirect_to(location: str) -> Behaviour:
    def behaviour(handler: _Handler, record: dict[str, Any]) -> None:
        handler.reply(302, b"", {"Location": location})
    return behaviour


def slow(seconds: float) -> Behaviour:
    def behaviour(handler: _Handler, record: dict[str, Any]) -> None:
        time.sleep(seconds)
        handler.server.backend.ok(handler, record)
    return behaviour


def streamed(chunks: int, size: int, pause: float = 0.0) -> Behaviour:
    def behaviour(handler: _Handler, record: dict[str, Any]) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(chunks * size))
        handler.end_headers()
        for _ in range(chunks):
            handler.wfile.write(b"s" * size)
            handler.wfile.flush()
            time.sleep(pause)
    return behaviour


def sni_recording_context(cert_chain: Any) -> ssl.SSLContext:
    """A server context that stores the SNI name a client sent on the socket."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert_chain.configure_cert(context)

    def remember(sock: ssl.SSLSocket, name: Optional[str], ctx: ssl.SSLContext) -> None:
        sock.tai_sni = name  # type: ignore[attr-defined]

    context.sni_callback = remember
    return context


def bad_gzip(handler: _Handler, record: dict[str, Any]) -> None:
    handler.reply(200, b"this is not gzip", {"Content-Encoding": "gzip"})


def chunked_cut_off(handler: _Handler, record: dict[str, Any]) -> None:
    """A chunked body that stops after one chunk, with a reset."""
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    handler.wfile.write(b"5\r\nhello\r\n")
    handler.wfile.flush()
    time.sleep(0.01)
    handler.reset()


class Trickle:
    """A behaviour that sends its response one step at a time, ``interval`` seconds apart.

    Every wait is shorter than any read timeout, so only a deadline ends such a request early.

    :param where: ``"status"``: the whole response (status line and headers included) trickles,
        a byte at a time; ``"body"``: the headers come at once, then a ``Content-Length`` body a
        byte at a time; ``"chunked"``: the headers come at once, then a chunked body of one-byte
        chunks.
    :param size: bytes of body.
    """

    def __init__(self, where: str, size: int = 20, interval: float = 0.05,
                 status: int = 200) -> None:
        assert where in ("status", "body", "chunked"), where
        self.where = where
        self.size = size
        self.interval = interval
        self.status = status
        self.steps_sent = 0
        self.cut = threading.Event()  # the client closed the connection before the end
        self.finished = threading.Event()  # the whole response went out

    def _parts(self) -> tuple[bytes, list[bytes]]:
        body = b"t" * self.size
        if self.where == "chunked":
            head = (f"HTTP/1.1 {self.status} Trickle\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .encode())
            return head, [b"1\r\nt\r\n"] * self.size + [b"0\r\n\r\n"]
        head = f"HTTP/1.1 {self.status} Trickle\r\nContent-Length: {self.size}\r\n\r\n".encode()
        if self.where == "status":
            whole = head + body
            return b"", [whole[i:i + 1] for i in range(len(whole))]
        return head, [body[i:i + 1] for i in range(len(body))]

    def __call__(self, handler: _Handler, record: dict[str, Any]) -> None:
        head, steps = self._parts()
        try:
            if head:
                handler.wfile.write(head)
            for step in steps:
                time.sleep(self.interval)
                handler.wfile.write(step)
                self.steps_sent += 1
        except OSError:  # EPIPE or a reset: the client closed its end
            self.cut.set()
            handler.close_connection = True
            return
        self.finished.set()


def redirect_with_broken_body(kind: str, location: str = "/target") -> Behaviour:
    """A 302 to ``location`` whose body is broken, then ``ok`` on every other path.

    :param kind: ``"bad_gzip"``: ``Content-Encoding: gzip`` on a body that is not gzip;
        ``"chunked_cut_off"``: a chunked body that stops after one chunk, with a reset.
    """
    assert kind in ("bad_gzip", "chunked_cut_off"), kind

    def behaviour(handler: _Handler, record: dict[str, Any]) -> None:
        if record["path"] != "/start":
            handler.server.backend.ok(handler, record)
        elif kind == "bad_gzip":
            handler.reply(302, b"this is not gzip", {"Location": location,
                                                      "Content-Encoding": "gzip"})
        else:
            handler.send_response(302)
            handler.send_header("Location", location)
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            handler.wfile.write(b"5\r\nhello\r\n")
            handler.wfile.flush()
            time.sleep(0.01)
            handler.reset()
    return behaviour


Factory = Callable[..., Backend]
"""What the ``backend_factory`` fixture gives: ``make(name="", **kwargs) -> Backend``."""


def balancer(*backends_: Backend, **service: Any) -> tai_lb.LoadBalancer:
    """A balancer whose one service, ``users``, has ``backends_`` as endpoints and ``service``
    as its other settings."""
    settings = {"endpoints": [b.address for b in backends_], **service}
    return tai_lb.LoadBalancer.from_config({"services": {"users": settings}})
