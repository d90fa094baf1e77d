"""A threaded TCP fault proxy for the chaos tests: sits before a backend, misbehaves on demand.

Modes (set ``proxy.mode`` at any time; they apply to new connections, and ``refuse`` closes the
listener at once):

* ``pass``: forward both ways;
* ``refuse``: nothing listens: connections are refused;
* ``blackhole``: accept and read, never answer;
* ``latency``: forward, holding each chunk from the backend ``delay`` seconds;
* ``reset``: forward up to ``reset_after`` bytes of the response, then reset the connection;
* ``slow_close``: forward, then hold the connection ``delay`` seconds before closing it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Optional

MODES = ("pass", "refuse", "blackhole", "latency", "reset", "slow_close")


class FaultProxy:
    """A TCP proxy on 127.0.0.1 before ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int], name: str = "proxy") -> None:
        self.target = target
        self.name = name
        self.delay = 0.2
        self.reset_after = 10
        self._mode = "pass"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._stopped = threading.Event()
        self._listener: Optional[socket.socket] = None
        self.port = self._listen(0)
        self.connections = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        assert mode in MODES, mode
        previous, self._mode = self._mode, mode
        if mode == "refuse" and previous != "refuse":
            self._close_listener()
            self.cut_all()
        elif previous == "refuse" and mode != "refuse":
            self._listen(self.port)

    def _listen(self, port: int) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        listener.settimeout(0.05)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name=f"test-{self.name}",
                         daemon=True).start()
        return int(listener.getsockname()[1])

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped.is_set() and self._listener is listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.append(client)
                self.connections += 1
            threading.Thread(target=self._serve, args=(client, self._mode), daemon=True,
                             name=f"test-{self.name}-conn").start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        if mode == "blackhole":
            with contextlib.suppress(OSError):
                while client.recv(65536):
                    pass
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sockets.append(upstream)
        threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
        self._pipe(upstream, client, mode)

    def _pipe(self, source: socket.socket, sink: socket.socket, mode: Optional[str]) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if mode == "latency":
                    time.sleep(self.delay)
                if mode == "reset" and sent + len(data) > self.reset_after:
                    sink.sendall(data[: max(0, self.reset_after - sent)])
                    self._reset(sink)
                    return
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        if mode == "slow_close":
            time.sleep(self.delay)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # close() alone leaves the connection open while a pipe thread is blocked reading it;
        # shutdown() ends it at once (and wakes that thread).
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def cut_all(self) -> None:
        """Reset every open connection, as a crashed process would."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            self._reset(sock)

    def stop(self) -> None:
        self._stopped.set()
        self._close_listener()
        self.cut_all()
