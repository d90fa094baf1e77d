"""``python -m tai_lb demo``: live balancing over loopback backends, one of which is killed.

It starts four HTTP backends on 127.0.0.1 (one of them slower), balances GETs from four client
threads over them with ``peak_ewma`` and retries, kills a backend halfway through (its listening
socket and every open connection), and shows the traffic moving around it: a table refreshed in
place, then the final figures.  Nothing to set up beyond the install.
"""

from __future__ import annotations

import contextlib
import http.server
import random
import socket
import socketserver
import sys
import threading
import time
from typing import Any, Optional, TextIO

from .balancer import LoadBalancer
from .trace import trace_of

__all__ = ["run_demo"]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Backend

    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.request)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # killed under our feet
            super().handle()

    def do_GET(self) -> None:
        time.sleep(random.uniform(0.5, 1.5) * self.server.delay)
        body = f"hello from {self.server.name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Backend(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, name: str, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.delay = delay
        self.alive = True
        self.state = "up"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=f"tai-lb-demo-{name}", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def kill(self, state: str = "KILLED") -> None:
        """Refuse new connections and cut every open one, as a crashed process would."""
        self.alive = False
        self.state = state
        self.shutdown()
        self.server_close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=1)


class _Clients:
    """Client threads sending GETs through the balancer until told to stop."""

    def __init__(self, lb: LoadBalancer, threads: int) -> None:
        self.lb = lb
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.retried = 0
        self.last_error: Optional[str] = None
        self.threads = [threading.Thread(target=self._run, name=f"tai-lb-demo-client-{i}",
                                         daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        session = self.lb.session()
        while not self.stop.is_set():
            try:
                response = session.get("http://users/hello", timeout=2)
                trace = trace_of(response)
                with self.lock:
                    self.ok += response.status_code == 200
                    self.failed += response.status_code != 200
                    self.retried += len(trace.attempts) - 1 if trace else 0
            except Exception as error:  # a failed request is what the demo counts
                with self.lock:
                    self.failed += 1
                    self.last_error = f"{type(error).__name__}: {error}"
        session.close()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)


def _table(lb: LoadBalancer, backends: list[_Backend], clients: _Clients, elapsed: float,
           note: str) -> list[str]:
    stats = lb.stats("users")
    views = lb.status()["services"]["users"]["endpoints"]
    total = sum(s.requests for s in stats.values()) or 1
    lines = [f"tai-lb demo: {elapsed:5.1f} s  ok {clients.ok:>7}  failed {clients.failed:>3}  "
             f"retried {clients.retried:>4}   {note}",
             f"  {'endpoint':<18}{'backend':<10}{'process':<9}{'balancer':<10}{'requests':>9}"
             f"{'share':>7}{'failures':>9}{'in flight':>10}{'latency ms':>11}"]
    for backend in backends:
        s = stats.get(backend.address)
        if s is None:
            continue
        ewma = s.latency_ewma
        outlier = views.get(backend.address, {}).get("outlier") or {}
        view = "ejected" if outlier.get("ejected") else "in use"
        lines.append(f"  {backend.address:<18}{backend.name:<10}"
                     f"{backend.state:<9}{view:<10}{s.requests:>9}"
                     f"{100.0 * s.requests / total:>6.1f}%{s.failures:>9}{s.in_flight:>10}"
                     f"{'-' if ewma is None else f'{ewma * 1000:.2f}':>11}")
    return lines


def _count(number: int, one: str, many: str = "") -> str:
    return f"{number} {one if number == 1 else many or one + 's'}"


def run_demo(duration: float = 10.0, out: TextIO = sys.stdout) -> int:
    """Run the demonstration for ``duration`` seconds; returns 0 if no request failed."""
    backends = [_Backend("alpha", 0.002), _Backend("bravo", 0.002), _Backend("charlie", 0.002),
                _Backend("delta", 0.008)]
    config = {"services": {"users": {
        "endpoints": [b.address for b in backends], "strategy": "peak_ewma",
        "outlier_detection": {"consecutive_local_origin_failure": 2, "base_ejection_time": 30,
                              "max_ejection_percent": 50}}}}
    live = out.isatty()
    shown = 0
    victim = backends[1]
    with LoadBalancer.from_config(config) as lb:
        started = time.monotonic()
        clients = _Clients(lb, threads=4)
        failures_at_kill: Optional[int] = None
        next_print = 0.0
        try:
            while (elapsed := time.monotonic() - started) < duration:
                if failures_at_kill is None and elapsed >= duration / 2:
                    # read first: the kill fails the requests in flight on it at once
                    failures_at_kill = lb.stats("users")[victim.address].failures
                    victim.kill()
                note = (f"{victim.name} killed at {duration / 2:.1f} s" if failures_at_kill
                        is not None else f"{victim.name} will be killed at {duration / 2:.1f} s")
                lines = _table(lb, backends, clients, elapsed, note)
                if live:
                    if shown:
                        out.write(f"\x1b[{shown}F")
                    out.write("".join(f"{line}\x1b[K\n" for line in lines))
                    shown = len(lines)
                elif elapsed >= next_print:
                    out.write("\n".join(lines) + "\n\n")
                    next_print += max(duration / 4, 0.5)
                out.flush()
                time.sleep(0.25)
        finally:
            clients.join()
            for backend in backends:
                if backend.alive:
                    backend.kill("stopped")
        elapsed = time.monotonic() - started
        final = _table(lb, backends, clients, elapsed, "finished")
        # Failures since the kill: a request in flight at the kill may still have succeeded.
        after_kill = lb.stats("users")[victim.address].failures - (failures_at_kill or 0)
        outlier = lb.status()["services"]["users"]["endpoints"].get(victim.address, {}).get(
            "outlier") or {}
    ejection = ("outlier detection ejected it" if outlier.get("ejected") else
                "outlier detection did not eject it (status() shows it in use)")
    if live and shown:
        out.write(f"\x1b[{shown}F")
    out.write("".join(f"{line}\x1b[K\n" if live else f"{line}\n" for line in final))
    out.write(f"\n{clients.ok} requests succeeded and {clients.failed} failed in {elapsed:.1f} s "
              f"({clients.ok / elapsed:.0f} per second).\n"
              f"After {victim.name} was killed, {_count(after_kill, 'attempt')} failed on it, "
              f"each fast and retried on another endpoint "
              f"({_count(clients.retried, 'retry', 'retries')} in all), and {ejection}.\n")
    if clients.last_error:
        out.write(f"Last failure: {clients.last_error}\n")
    out.flush()
    return 0 if clients.failed == 0 else 1
