"""Latency and errors when a backend slows down or dies: tai-lb's strategies, and HAProxy.

Two experiments on 127.0.0.1, each backend a threaded ``http.server`` in a process of its own
(so the backends never compete with the client threads for the benchmark's GIL), steered through
shared memory:

(a) **a slow backend**: 10 backends answer after a random delay around a base delay; one of them
    turns 20 x slower for the middle half of the run.  16 threads, each with its own
    ``lb.session()``, send GETs for the whole run; p50, p99 and p99.9 of every request, for
    ``peak_ewma``, ``least_connections`` and ``round_robin``, each next to the same run without
    the slow backend (the two runs of a strategy back to back, in alternating order);
(b) **a failing backend**: 5 backends; under load one of them starts refusing connections (its
    process is killed: listener and open connections closed) or answering 503.  Three clients
    send GETs at the same time, through the same fault: tai-lb with retries (the default 3
    attempts), tai-lb without retries (``"retries": false``), both with outlier detection at its
    default thresholds, and HAProxy (Debian ``haproxy``; apt-get installs it when missing, which
    needs root) with HTTP checks every 2 s and ``fall 3``.  For each: the errors its callers see
    after the fault, and the time from the fault to the ejection (tai-lb) or to the server marked
    DOWN (HAProxy's stats socket, polled every 10 ms);
(c) **a backend that accepts and never answers**: 5 backends, 16 threads with a
    ``lb.session()`` each and a ``(1.0, 0.5)`` s timeout on every GET, retries on and outlier
    detection at its defaults; at a quarter of the run backend 0 turns into a black hole (it
    accepts connections and reads requests, and never answers, on new and open connections).
    For ``peak_ewma`` and ``round_robin``, each next to the same run without the fault: p50 and
    p99 of the requests that never touched backend 0 (by their decision traces), the errors
    callers see, the requests that touched backend 0, the time to eject it, and the longest wall
    time any thread spent inside ``lb.pick()`` and inside ``lb.status()`` (polled every 20 ms).

(d) **a backend that trickles its response** (``--trickle``, run on its own): one backend sends
    a 20-byte response a byte at a time, 1 s apart (the status line and headers, or the body
    with a ``Content-Length``, or a chunked body, or a body read with ``stream=True``); GETs with
    ``timeout=(1, 2)`` (each wait for data is under the read timeout) and a ``retries.deadline``
    of 1 s or 3 s, a few runs each, next to one run without a deadline: the time each request
    took to end, and what it ended with.

::

    python benchmarks/faults.py          # about 4 minutes; updates "## faults.py" in RESULTS.md
    python benchmarks/faults.py --quick  # under 45 seconds; never writes RESULTS.md
    python benchmarks/faults.py --trickle          # (d) alone, about 2 minutes; updates its
                                                   # own section of RESULTS.md
    python benchmarks/faults.py --trickle --quick  # (d) in about 10 seconds; no write

Targets (printed as PASS/FAIL, never asserted): peak_ewma's p99 <= 1.3 x and p99.9 <= 2 x the
run without the slow backend (the other strategies are shown for contrast); with retries on, 0
errors seen by callers of idempotent requests when a backend fails; time to eject a refusing
backend <= 0.05 x HAProxy's default detection time, measured in the same run; with a backend
that never answers, the p99 of the requests that never touched it <= 1.5 x the run without the
fault, 0 caller errors, and no thread more than 50 ms inside ``lb.pick()`` or ``lb.status()``;
a trickling response with a 1 s deadline ends within 2 s (median).
"""

from __future__ import annotations

import contextlib
import gc
import http.server
import logging
import math
import multiprocessing
import random
import re
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO, Union

import requests
from http_overhead import sigterm_raises
from picks import (
    benchmark_parser,
    ensure_programs,
    environment_line,
    markdown_table,
    publish,
    verdict,
)

import tai_lb
from tai_lb.lease import Lease
from tai_lb.strategies import RoutingKey
from tai_lb.trace import trace_of

SECTION = "## faults.py"

SERVICE = "users"
STRATEGY_NAMES = ("peak_ewma", "least_connections", "round_robin")
TARGETED = "peak_ewma"  # the strategy the latency targets apply to; the others are contrast
SLOW_FACTOR = 20  # the slow backend's delays are this many times the others'
JITTER = 0.5  # each delay is the base delay x a uniform factor in 1 +- JITTER
REFUSE = "refusing"
UNAVAILABLE = "503"
FAULTS = (REFUSE, UNAVAILABLE)
TAI_RETRIES = "tai-lb, retries on"
TAI_NO_RETRIES = "tai-lb, retries off"
HAPROXY = "HAProxy"
FAULT_CLIENTS = (TAI_RETRIES, TAI_NO_RETRIES, HAPROXY)

TARGET_P99 = 1.3  # peak_ewma p99 with the slow backend <= 1.3 x without
TARGET_P999 = 2.0  # peak_ewma p99.9 with the slow backend <= 2 x without
TARGET_ERRORS = 0  # caller-visible errors with retries on, after a backend fails
TARGET_EJECT_SHARE = 0.05  # tai-lb's time to eject <= 0.05 x HAProxy's detection time

HAPROXY_INTER = 2.0  # HAProxy's default check interval, seconds
HAPROXY_FALL = 3  # HAProxy's default failed checks before DOWN
HAPROXY_RISE = 2  # HAProxy's default passed checks before UP
POLL_S = 0.01  # how often HAProxy's stats socket is read after the fault

HANG_STRATEGIES = ("peak_ewma", "round_robin")  # the strategies of experiment (c)
HANG_TIMEOUT = (1.0, 0.5)  # (connect, read) seconds, passed on every GET of (c)
BLACKHOLE = 0  # a backend status: accept, read the request, never answer
BLACKHOLE_POLL_S = 0.1  # how often a black-holed handler looks whether the fault is over
STATUS_POLL_S = 0.02  # how often a thread calls lb.status() in (c)
TARGET_HANG_P99 = 1.5  # p99 of the requests that never touched the hanging backend <= 1.5 x
TARGET_HANG_ERRORS = 0  # caller-visible errors with a hanging backend
TARGET_LOCK_S = 0.05  # the longest wall time inside lb.pick() or lb.status(), seconds


@dataclass(frozen=True)
class Settings:
    """How much to measure."""

    slow_backends: int  # backends of experiment (a)
    threads: int  # client threads of experiment (a)
    base_delay: float  # seconds; each answer takes base_delay x uniform(0.5, 1.5)
    run_s: float  # seconds of one run of (a); the slow phase is its middle half
    warm: int  # untimed GETs per thread before a run of (a)
    fault_backends: int  # backends of experiment (b)
    fault_threads: int  # threads per client in (b)
    fault_delay: float  # base delay of the backends of (b)
    before_fault_s: float  # seconds of load in (b) before the fault
    after_down_s: float  # seconds of load in (b) after HAProxy marked the backend DOWN
    max_wait_s: float  # the longest wait for HAProxy to mark the backend DOWN
    hang_backends: int  # backends of experiment (c)
    hang_threads: int  # client threads of experiment (c)
    hang_delay: float  # base delay of the backends of (c)
    hang_run_s: float  # seconds of one run of (c); backend 0 hangs from a quarter of it on


FULL = Settings(slow_backends=10, threads=16, base_delay=0.02, run_s=24.0, warm=5,
                fault_backends=5, fault_threads=6, fault_delay=0.005, before_fault_s=3.0,
                after_down_s=1.0, max_wait_s=15.0,
                hang_backends=5, hang_threads=16, hang_delay=0.02, hang_run_s=16.0)
QUICK = Settings(slow_backends=10, threads=16, base_delay=0.02, run_s=2.0, warm=2,
                 fault_backends=5, fault_threads=6, fault_delay=0.005, before_fault_s=1.0,
                 after_down_s=0.3, max_wait_s=10.0,
                 hang_backends=5, hang_threads=16, hang_delay=0.02, hang_run_s=2.0)


# -- backends ------------------------------------------------------------------------------------


class _BackendHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with ``ok`` after the backend's delay, or at once with its error."""

    protocol_version = "HTTP/1.1"
    server: _BackendServer

    def setup(self) -> None:
        # Without TCP_NODELAY each keep-alive response waits about 40 ms for a delayed ACK.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def handle(self) -> None:
        # A client (or HAProxy) that resets its connection is normal here, not worth a traceback.
        with contextlib.suppress(ConnectionError):
            super().handle()

    def do_GET(self) -> None:
        server = self.server
        status = server.statuses[server.index]
        if status == BLACKHOLE:
            # The request is read; no answer comes while the fault lasts.  Once it is over the
            # connection is closed, still without an answer (its client gave up long before).
            while server.statuses[server.index] == BLACKHOLE:
                time.sleep(BLACKHOLE_POLL_S)
            self.close_connection = True
            return
        if status == 200:
            time.sleep(server.delays[server.index] * server.rng.uniform(1 - JITTER, 1 + JITTER))
            body = b"ok\n"
        else:
            body = b"unavailable\n"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _BackendServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A threaded HTTP server on a listening socket made by the parent process."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, index: int, delays: Any, statuses: Any,
                 seed: int) -> None:
        super().__init__(sock.getsockname()[:2], _BackendHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.index = index
        self.delays = delays
        self.statuses = statuses
        self.rng = random.Random(seed)


def _serve(sock: socket.socket, index: int, delays: Any, statuses: Any, seed: int) -> None:
    """The body of a backend process: serve until killed or terminated."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C stops the parent, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.disable(logging.CRITICAL)
    _BackendServer(sock, index, delays, statuses, seed).serve_forever(poll_interval=0.5)


class Backends:
    """HTTP backends on 127.0.0.1, one process each, with delays and statuses set from here.

    The listening sockets are made here and inherited by the forked processes, so each port
    accepts connections before its process runs, and is closed (refusing connections) once its
    process dies.  Create every set before the first thread starts: forking a process with
    threads is unsafe.
    """

    def __init__(self, count: int, base_delay: float, seed: int) -> None:
        context = multiprocessing.get_context("fork")
        self.base_delay = base_delay
        self.delays: Any = context.RawArray("d", [base_delay] * count)
        self.statuses: Any = context.RawArray("i", [200] * count)
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.addresses: list[str] = []
        try:
            for index in range(count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    sock.listen(256)
                    self.addresses.append(f"127.0.0.1:{sock.getsockname()[1]}")
                    process = context.Process(
                        target=_serve, args=(sock, index, self.delays, self.statuses,
                                             seed * 1000 + index),
                        name=f"faults-backend-{index}", daemon=True)
                    process.start()
                    self.processes.append(process)
        except BaseException:
            self.close()
            raise

    def ports(self) -> list[int]:
        """The backends' ports, in order."""
        return [int(address.rpartition(":")[2]) for address in self.addresses]

    def reset(self) -> None:
        """Every live backend back to its base delay and to answering 200."""
        for index in range(len(self.processes)):
            self.delays[index] = self.base_delay
            self.statuses[index] = 200

    def slow_down(self, index: int, factor: float) -> None:
        """Backend ``index`` answers ``factor`` times slower from its next request on."""
        self.delays[index] = self.base_delay * factor

    def blackhole(self, index: int) -> None:
        """Backend ``index`` keeps accepting connections and reading requests, never answering.

        Requests already waiting on it hang too; :meth:`reset` ends it (its open connections
        are then closed without an answer).
        """
        self.statuses[index] = BLACKHOLE

    def fail(self, index: int, fault: str) -> None:
        """Backend ``index`` starts answering 503 or, killed, refusing connections."""
        if fault == UNAVAILABLE:
            self.statuses[index] = 503
        else:
            process = self.processes[index]
            process.kill()  # SIGKILL: the kernel closes its listener and every connection
            process.join(5)

    def close(self) -> None:
        """Stop every backend process (SIGTERM, then SIGKILL after 5 s)."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        self.processes.clear()

    def __enter__(self) -> Backends:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- HAProxy -------------------------------------------------------------------------------------


def haproxy_version(haproxy: str) -> str:
    """``HAProxy 2.x.y`` as the program reports itself."""
    output = subprocess.run([haproxy, "-v"], check=False, capture_output=True, text=True,
                            timeout=10)
    match = re.search(r"HAProxy version ([\w.]+)", output.stdout + output.stderr)
    return f"HAProxy {match.group(1)}" if match else "HAProxy"


def haproxy_config(port: int, backends: Sequence[int], stats: Path) -> str:
    """haproxy.cfg: round robin over ``backends`` with HTTP checks at HAProxy's default timing."""
    servers = "\n".join(f"    server b{i} 127.0.0.1:{backend}"
                        for i, backend in enumerate(backends))
    return f"""\
global
    maxconn 4096
    stats socket {stats} mode 600 level user

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend bench
    bind 127.0.0.1:{port}
    default_backend app

backend app
    balance roundrobin
    option httpchk GET /healthz
    default-server check inter {HAPROXY_INTER:g}s fall {HAPROXY_FALL} rise {HAPROXY_RISE}
{servers}
"""


class HAProxy:
    """HAProxy as a foreground child process in front of some backends, with a stats socket."""

    def __init__(self, program: str, backends: Sequence[int]) -> None:
        self.temp = tempfile.TemporaryDirectory(prefix="tai-lb-faults-")
        directory = Path(self.temp.name)
        self.stats_path = directory / "haproxy.sock"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        config = directory / "haproxy.cfg"
        config.write_text(haproxy_config(self.port, backends, self.stats_path), encoding="utf-8")
        self.log_path = directory / "haproxy.log"
        self.log: TextIO = self.log_path.open("w", encoding="utf-8")
        # A session of its own: a Ctrl-C reaches only this script, which then stops HAProxy.
        self.process = subprocess.Popen([program, "-f", str(config), "-db"],
                                        stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_until_up(len(backends))
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The URL of HAProxy's frontend."""
        return f"http://127.0.0.1:{self.port}/"

    def _wait_until_up(self, count: int) -> None:
        """Wait until every server has passed a check (10 s at most)."""
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with status {self.process.returncode}:\n"
                                   + self.log_path.read_text(encoding="utf-8", errors="replace"))
            with contextlib.suppress(OSError):
                rows = self.servers()
                if len(rows) == count and all(row["status"] == "UP"
                                              and row["check_status"] == "L7OK"
                                              for row in rows.values()):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("haproxy's servers are not all UP after 10 s")
            time.sleep(0.05)

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the servers of backend ``app``, by server name."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(self.stats_path))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        lines = b"".join(chunks).decode("utf-8", "replace").splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        names = lines[0][2:].split(",")
        rows: dict[str, dict[str, str]] = {}
        for line in lines[1:]:
            row = dict(zip(names, line.split(",")))
            if row.get("pxname") == "app" and row.get("svname") not in ("BACKEND", None):
                rows[row["svname"]] = row
        return rows

    def close(self) -> None:
        """Stop HAProxy (SIGTERM, then SIGKILL after 5 s) and remove its directory."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.log.close()
        self.temp.cleanup()

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- (a) a slow backend --------------------------------------------------------------------------


@dataclass
class LatencyRun:
    """One run of experiment (a): one strategy, with or without the slow backend."""

    strategy: str
    slow: bool
    seconds: float  # from the barrier to the last request's end
    latencies: list[float]  # seconds, sorted
    errors: int
    to_slow: int  # requests to backend 0 in the middle half (slow in the slow runs)
    to_recovered: int  # requests to backend 0 in the last quarter (fast again)

    @property
    def rate(self) -> float:
        """Requests per second."""
        return len(self.latencies) / self.seconds

    def percentile(self, share: float) -> float:
        """The nearest-rank percentile of the latencies, in seconds."""
        if not self.latencies:
            return float("nan")
        return self.latencies[max(1, math.ceil(share * len(self.latencies))) - 1]


def latency_config(addresses: Sequence[str], strategy: str, threads: int) -> dict[str, Any]:
    """A service over ``addresses`` with ``strategy``; pools sized for the threads."""
    return {"services": {SERVICE: {
        "endpoints": list(addresses), "strategy": strategy,
        "pool": {"maxsize": threads}, "timeout": {"connect": 1, "read": 10},
    }}}


def last_endpoint(outcome: object) -> Optional[str]:
    """The endpoint of the last attempt of a balanced request (a response or an error)."""
    trace = trace_of(outcome)
    return trace.attempts[-1].endpoint if trace is not None and trace.attempts else None


Sample = tuple[float, float, bool, bool]
"""One request: when it began, its latency, whether it succeeded, whether it met the faulty
backend."""


def client_loop(session: requests.Session, url: str, warm: int, barrier: threading.Barrier,
                end: Callable[[], float], clock: Callable[[], float], samples: list[Sample],
                failures: list[BaseException], touched: Callable[[object], bool],
                timeout: Optional[Union[float, tuple[float, float]]] = None) -> None:
    """One client thread: warm up, wait at ``barrier``, then GET ``url`` until ``end()``.

    A failed warm-up is kept in ``failures`` and breaks the barrier, so the run stops.
    """
    try:
        for _ in range(warm):
            session.get(url, timeout=timeout).raise_for_status()
    except BaseException as error:
        failures.append(error)
        barrier.abort()
        return
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        return
    until = end()
    get = session.get
    while True:
        begun = clock()
        if begun >= until:
            break
        outcome: object
        try:
            response = get(url, timeout=timeout)
            outcome, ok = response, response.status_code == 200
        except requests.RequestException as error:
            outcome, ok = error, False
        samples.append((begun, clock() - begun, ok, touched(outcome)))


def latency_run(backends: Backends, strategy: str, slow: bool, settings: Settings) -> LatencyRun:
    """16 threads of GETs for ``settings.run_s``; backend 0 slow in the middle half if ``slow``.

    Every thread warms its session up, then waits at a barrier; the run starts when all are
    released.  A request counts if it started before the end; its latency is the wall time of
    ``session.get`` on its thread, as the caller sees it.
    """
    backends.reset()
    slow_address = backends.addresses[0]
    threads = settings.threads
    url = f"http://{SERVICE}/"
    starts = [0.0]
    results: list[list[Sample]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []
    with tai_lb.LoadBalancer.from_config(
            latency_config(backends.addresses, strategy, threads)) as lb:
        sessions = [lb.session() for _ in range(threads)]
        barrier = threading.Barrier(threads + 1,
                                    action=lambda: starts.__setitem__(0, time.perf_counter()))

        def work(index: int) -> None:
            client_loop(sessions[index], url, settings.warm, barrier,
                        lambda: starts[0] + settings.run_s, time.perf_counter, results[index],
                        failures, lambda outcome: last_endpoint(outcome) == slow_address)

        workers = [threading.Thread(target=work, args=(i,), name=f"faults-{i}", daemon=True)
                   for i in range(threads)]
        gc.collect()
        for worker in workers:
            worker.start()
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            for worker in workers:
                worker.join()
            raise RuntimeError(f"{strategy}: a warm-up request failed") from failures[0]
        start = starts[0]
        slow_from, slow_until = start + settings.run_s / 4, start + settings.run_s * 3 / 4
        time.sleep(max(0.0, slow_from - time.perf_counter()))
        if slow:
            backends.slow_down(0, SLOW_FACTOR)
        time.sleep(max(0.0, slow_until - time.perf_counter()))
        backends.reset()
        for worker in workers:
            worker.join()
        finished = time.perf_counter()
        for session in sessions:
            session.close()
    samples = [sample for local in results for sample in local]
    return LatencyRun(
        strategy, slow, finished - start,
        sorted(latency for _, latency, _, _ in samples),
        sum(not ok for _, _, ok, _ in samples),
        sum(to_slow and slow_from <= begun < slow_until for begun, _, _, to_slow in samples),
        sum(to_slow and begun >= slow_until for begun, _, _, to_slow in samples))


def latency_runs(backends: Backends, settings: Settings, rng: random.Random,
                 progress: bool, began: float) -> dict[tuple[str, bool], LatencyRun]:
    """Both runs of every strategy, back to back; the strategies and pair orders shuffled."""
    order = list(STRATEGY_NAMES)
    rng.shuffle(order)
    first_slow = rng.random() < 0.5
    runs: dict[tuple[str, bool], LatencyRun] = {}
    for strategy in order:
        for slow in (first_slow, not first_slow):
            run = latency_run(backends, strategy, slow, settings)
            runs[strategy, slow] = run
            if progress:
                print(f"(a) {strategy}, {'slow backend' if slow else 'no slow backend'}: "
                      f"{run.rate:,.0f} requests/s, p50 {run.percentile(0.5) * 1e3:.1f} ms, "
                      f"p99 {run.percentile(0.99) * 1e3:.1f} ms, "
                      f"p99.9 {run.percentile(0.999) * 1e3:.1f} ms; backend 0 got {run.to_slow} "
                      f"in the middle half, {run.to_recovered} in the last quarter; "
                      f"{time.perf_counter() - began:.0f} s so far",
                      file=sys.stderr, flush=True)
        first_slow = not first_slow
    return runs


# -- (b) a failing backend -----------------------------------------------------------------------


class EjectionLog(logging.Handler):
    """Notes when tai-lb's outlier detection logs an ejection, by (service, address)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.times: dict[tuple[str, str], float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        args = record.args
        if isinstance(args, tuple) and len(args) >= 2 and "ejected" in str(record.msg):
            self.times.setdefault((str(args[0]), str(args[1])), now)


@dataclass
class FaultClient:
    """One client of experiment (b) and what its requests met."""

    name: str
    url: str
    sessions: list[requests.Session]
    lb: Optional[tai_lb.LoadBalancer] = None
    service: str = ""
    # (start, end, ok, attempts to the faulty backend) of every request
    samples: list[tuple[float, float, bool, int]] = field(default_factory=list)
    detected_s: Optional[float] = None  # fault to ejection / DOWN, seconds
    ejected_at_end: Optional[bool] = None

    def started_after(self, fault_at: float) -> int:
        """How many requests started after the fault."""
        return sum(begun >= fault_at for begun, _, _, _ in self.samples)

    def errors(self) -> int:
        """Requests of the whole run that failed as the caller sees them."""
        return sum(not ok for _, _, ok, _ in self.samples)

    def attempts_after(self, fault_at: float) -> int:
        """Attempts to the faulty backend in requests that ended after the fault."""
        return sum(tried for _, ended, _, tried in self.samples if ended >= fault_at)


@dataclass
class FaultRun:
    """One run of experiment (b): one fault, seen by every client at once."""

    fault: str
    seconds: float
    clients: dict[str, FaultClient]
    fault_at: float
    requests_before: dict[str, int]

    def errors(self, name: str) -> int:
        """Requests of the whole run that failed as ``name``'s callers see them."""
        return self.clients[name].errors()


def fault_config(addresses: Sequence[str], service: str, retries: bool,
                 threads: int) -> dict[str, Any]:
    """A round-robin service with outlier detection at Envoy's defaults, retries on or off."""
    settings: dict[str, Any] = {
        "endpoints": list(addresses), "strategy": "round_robin", "outlier_detection": {},
        "pool": {"maxsize": threads}, "timeout": {"connect": 1, "read": 10},
    }
    if not retries:
        settings["retries"] = False
    return {"services": {service: settings}}


def fault_run(backends: Backends, haproxy_program: str, fault: str,
              settings: Settings) -> FaultRun:
    """Load from every client, then backend 0 fails; wait for HAProxy to mark it DOWN."""
    victim = backends.addresses[0]
    threads = settings.fault_threads
    ejections = EjectionLog()
    outlier_log = logging.getLogger("tai_lb.outlier")
    outlier_log.addHandler(ejections)
    stop = threading.Event()
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.callback(outlier_log.removeHandler, ejections)
        haproxy = stack.enter_context(HAProxy(haproxy_program, backends.ports()))
        clients: dict[str, FaultClient] = {}
        for name, service, retries in ((TAI_RETRIES, "retries-on", True),
                                       (TAI_NO_RETRIES, "retries-off", False)):
            lb = stack.enter_context(tai_lb.LoadBalancer.from_config(
                fault_config(backends.addresses, service, retries, threads)))
            clients[name] = FaultClient(name, f"http://{service}/",
                                        [stack.enter_context(lb.session())
                                         for _ in range(threads)], lb, service)
        clients[HAPROXY] = FaultClient(HAPROXY, haproxy.url,
                                       [stack.enter_context(requests.Session())
                                        for _ in range(threads)])
        lock = threading.Lock()

        def work(client: FaultClient, session: requests.Session) -> None:
            local: list[tuple[float, float, bool, int]] = []
            get = session.get
            clock = time.monotonic
            while not stop.is_set():
                begun = clock()
                outcome: object
                try:
                    response = get(client.url)
                    outcome, ok = response, response.status_code == 200
                except requests.RequestException as error:
                    outcome, ok = error, False
                ended = clock()
                trace = trace_of(outcome)
                tried = (sum(a.endpoint == victim for a in trace.attempts)
                         if trace is not None else 0)
                local.append((begun, ended, ok, tried))
            with lock:
                client.samples.extend(local)

        workers = [threading.Thread(target=work, args=(client, session),
                                    name=f"faults-{client.service or 'haproxy'}-{i}",
                                    daemon=True)
                   for client in clients.values() for i, session in enumerate(client.sessions)]
        gc.collect()
        for worker in workers:
            worker.start()
        try:
            time.sleep(settings.before_fault_s)
            fault_at = time.monotonic()
            backends.fail(0, fault)
            deadline = fault_at + settings.max_wait_s
            while True:
                rows = haproxy.servers()
                now = time.monotonic()
                if rows["b0"]["status"].startswith("DOWN"):
                    clients[HAPROXY].detected_s = now - fault_at
                    break
                if now > deadline:
                    break
                time.sleep(POLL_S)
            time.sleep(settings.after_down_s)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        for client in clients.values():
            if client.lb is not None:
                ejected = ejections.times.get((client.service, victim))
                client.detected_s = None if ejected is None else ejected - fault_at
                view = client.lb.status()["services"][client.service]["endpoints"][victim]
                client.ejected_at_end = bool((view.get("outlier") or {}).get("ejected"))
    seconds = time.monotonic() - began
    before = {name: len(client.samples) - client.started_after(fault_at)
              for name, client in clients.items()}
    return FaultRun(fault, seconds, clients, fault_at, before)


# -- (c) a backend that accepts and never answers ------------------------------------------------


class TimedBalancer(tai_lb.LoadBalancer):
    """A balancer that notes, per thread, the longest wall time spent inside :meth:`pick`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pick_max: dict[int, float] = {}  # thread ident -> longest pick, seconds

    def pick(self, service: str, key: Optional[RoutingKey] = None, *,
             exclude: Collection[str] = ()) -> Lease:
        begun = time.perf_counter()
        try:
            return super().pick(service, key, exclude=exclude)
        finally:
            spent = time.perf_counter() - begun
            ident = threading.get_ident()  # each thread writes only its own entry
            if spent > self.pick_max.get(ident, 0.0):
                self.pick_max[ident] = spent


@dataclass
class HangRun:
    """One run of experiment (c): one strategy, with or without the black-holed backend."""

    strategy: str
    fault: bool
    seconds: float  # from the barrier to the last request's end
    window_from: float  # monotonic time of the fault (or of a quarter of the run without it)
    # (start, latency, ok, touched backend 0) of every request of the run
    samples: list[Sample]
    ejected_s: Optional[float]  # fault to ejection of backend 0, seconds
    ejected_at_end: bool
    pick_max: float  # the longest time a thread spent inside lb.pick(), seconds
    status_max: float  # the longest lb.status() call, seconds
    status_calls: int

    @property
    def rate(self) -> float:
        """Requests per second."""
        return len(self.samples) / self.seconds

    def errors(self) -> int:
        """Requests of the whole run that raised or did not answer 200."""
        return sum(not ok for _, _, ok, _ in self.samples)

    def window(self) -> list[Sample]:
        """The requests that started at or after the fault (a quarter of the run without it)."""
        return [sample for sample in self.samples if sample[0] >= self.window_from]

    def touched(self) -> list[float]:
        """Latencies of the requests of the window that tried backend 0, sorted."""
        return sorted(latency for _, latency, _, touched in self.window() if touched)

    def compared(self) -> list[float]:
        """The latencies compared, sorted: with the fault, the window's requests that never
        touched backend 0; without it, every request of the window."""
        return sorted(latency for _, latency, _, touched in self.window()
                      if not (touched and self.fault))

    def percentile(self, share: float) -> float:
        """The nearest-rank percentile of :meth:`compared`, in seconds."""
        latencies = self.compared()
        if not latencies:
            return float("nan")
        return latencies[max(1, math.ceil(share * len(latencies))) - 1]


def hang_config(addresses: Sequence[str], strategy: str, threads: int) -> dict[str, Any]:
    """``strategy`` over ``addresses``, retries on, outlier detection at its defaults."""
    return {"services": {SERVICE: {
        "endpoints": list(addresses), "strategy": strategy, "outlier_detection": {},
        "pool": {"maxsize": threads},
    }}}


def hang_run(backends: Backends, strategy: str, fault: bool, settings: Settings) -> HangRun:
    """16 threads of GETs for ``settings.hang_run_s``; backend 0 black-holed from a quarter on.

    A thread calls ``lb.status()`` every 20 ms all along, timing each call and watching backend
    0's outlier state; the balancer times every ``pick``.  Both clocks start at the barrier,
    after the warm-up.
    """
    backends.reset()
    victim = backends.addresses[0]
    threads = settings.hang_threads
    url = f"http://{SERVICE}/"
    ejections = EjectionLog()
    outlier_log = logging.getLogger("tai_lb.outlier")
    outlier_log.addHandler(ejections)
    results: list[list[Sample]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []
    status_times: list[float] = []
    seen_ejected: list[float] = []
    stop = threading.Event()
    starts = [0.0]
    try:
        lb = TimedBalancer.from_config(hang_config(backends.addresses, strategy, threads))
        assert isinstance(lb, TimedBalancer)
        with lb:
            sessions = [lb.session() for _ in range(threads)]

            def begin() -> None:
                starts[0] = time.monotonic()
                lb.pick_max.clear()  # the warm-up's picks do not count

            barrier = threading.Barrier(threads + 1, action=begin)

            def touched(outcome: object) -> bool:
                trace = trace_of(outcome)
                return trace is not None and any(a.endpoint == victim for a in trace.attempts)

            def work(index: int) -> None:
                client_loop(sessions[index], url, settings.warm, barrier,
                            lambda: starts[0] + settings.hang_run_s, time.monotonic,
                            results[index], failures, touched, HANG_TIMEOUT)

            def watch() -> None:
                clock = time.perf_counter
                while not stop.wait(STATUS_POLL_S):
                    begun = clock()
                    view = lb.status()
                    status_times.append(clock() - begun)
                    outlier = view["services"][SERVICE]["endpoints"][victim].get("outlier")
                    if not seen_ejected and outlier and outlier.get("ejected"):
                        seen_ejected.append(time.monotonic())

            workers = [threading.Thread(target=work, args=(i,), name=f"faults-hang-{i}",
                                        daemon=True) for i in range(threads)]
            watcher = threading.Thread(target=watch, name="faults-status", daemon=True)
            gc.collect()
            for worker in workers:
                worker.start()
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                for worker in workers:
                    worker.join()
                raise RuntimeError(f"{strategy}: a warm-up request failed") from failures[0]
            start = starts[0]
            watcher.start()
            try:
                window_from = start + settings.hang_run_s / 4
                time.sleep(max(0.0, window_from - time.monotonic()))
                if fault:
                    backends.blackhole(0)
                    window_from = time.monotonic()
                for worker in workers:
                    worker.join()
                finished = time.monotonic()
            finally:
                stop.set()
                watcher.join()
                backends.reset()  # the hanging handlers close their connections
            outlier = lb.status()["services"][SERVICE]["endpoints"][victim].get("outlier")
            ejected_at_end = bool((outlier or {}).get("ejected"))
            pick_max = max(lb.pick_max.values(), default=0.0)
            for session in sessions:
                session.close()
    finally:
        outlier_log.removeHandler(ejections)
    ejected = ejections.times.get((SERVICE, victim))
    if ejected is None and seen_ejected:
        ejected = seen_ejected[0]
    return HangRun(strategy, fault, finished - start, window_from,
                   [sample for local in results for sample in local],
                   None if ejected is None or not fault else ejected - window_from,
                   ejected_at_end, pick_max, max(status_times, default=0.0), len(status_times))


def hang_runs(backends: Backends, settings: Settings, rng: random.Random, progress: bool,
              began: float) -> dict[tuple[str, bool], HangRun]:
    """Both runs of each strategy of (c), back to back, the pair's order alternating."""
    order = list(HANG_STRATEGIES)
    rng.shuffle(order)
    first_fault = rng.random() < 0.5
    runs: dict[tuple[str, bool], HangRun] = {}
    for strategy in order:
        for fault in (first_fault, not first_fault):
            run = hang_run(backends, strategy, fault, settings)
            runs[strategy, fault] = run
            if progress:
                print(f"(c) {strategy}, {'backend 0 hangs' if fault else 'no fault'}: "
                      f"{run.rate:,.0f} requests/s, p50 {run.percentile(0.5) * 1e3:.1f} ms, "
                      f"p99 {run.percentile(0.99) * 1e3:.1f} ms, {run.errors()} errors, "
                      f"{len(run.touched())} touched backend 0, ejected "
                      + ("-" if not fault else "never" if run.ejected_s is None
                         else f"after {run.ejected_s * 1e3:,.0f} ms")
                      + f"; longest pick {run.pick_max * 1e3:.1f} ms, status "
                      f"{run.status_max * 1e3:.1f} ms; {time.perf_counter() - began:.0f} s so far",
                      file=sys.stderr, flush=True)
        first_fault = not first_fault
    return runs


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Results:
    """Everything one run measured."""

    settings: Settings
    latency: dict[tuple[str, bool], LatencyRun]
    faults: dict[str, FaultRun]
    hangs: dict[tuple[str, bool], HangRun]
    seconds: float
    haproxy: str


def run(settings: Settings, seed: int, progress: bool) -> Results:
    """Run experiment (a), then (b) once per fault, then (c), and return the figures."""
    (haproxy_program,) = ensure_programs({"haproxy": "haproxy"}, "faults.py")
    version = haproxy_version(haproxy_program)
    began = time.perf_counter()
    rng = random.Random(seed)
    with sigterm_raises(), contextlib.ExitStack() as stack:
        # Every backend process is forked here, before any thread starts.
        slow_set = stack.enter_context(Backends(settings.slow_backends, settings.base_delay,
                                                seed))
        fault_sets = {fault: stack.enter_context(Backends(settings.fault_backends,
                                                          settings.fault_delay, seed + 1 + i))
                      for i, fault in enumerate(FAULTS)}
        hang_set = stack.enter_context(Backends(settings.hang_backends, settings.hang_delay,
                                                seed + 1 + len(FAULTS)))
        latency = latency_runs(slow_set, settings, rng, progress, began)
        slow_set.close()
        faults: dict[str, FaultRun] = {}
        for fault in FAULTS:
            result = fault_run(fault_sets[fault], haproxy_program, fault, settings)
            fault_sets[fault].close()
            faults[fault] = result
            if progress:
                parts = [f"{name}: {result.errors(name)} errors, detected "
                         + ("never" if client.detected_s is None
                            else f"after {client.detected_s * 1e3:,.0f} ms")
                         for name, client in result.clients.items()]
                print(f"(b) {fault}: " + "; ".join(parts)
                      + f"; {time.perf_counter() - began:.0f} s so far",
                      file=sys.stderr, flush=True)
        hangs = hang_runs(hang_set, settings, rng, progress, began)
        hang_set.close()
    return Results(settings, latency, faults, hangs, time.perf_counter() - began, version)


# -- reporting -----------------------------------------------------------------------------------


def ratio(results: Results, strategy: str, share: float) -> float:
    """A percentile of the run with the slow backend over the same one of the run without."""
    slow, normal = results.latency[strategy, True], results.latency[strategy, False]
    return slow.percentile(share) / normal.percentile(share)


def latency_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the latency table: two rows per strategy."""
    header = ["strategy", "backend 0", "requests", "requests/s", "to backend 0, middle half",
              "to backend 0, last quarter", "p50 ms", "p99 ms", "p99.9 ms", "p99 x normal",
              "p99.9 x normal", "targets"]
    rows: list[list[str]] = []
    for strategy in STRATEGY_NAMES:
        for slow in (False, True):
            run = results.latency[strategy, slow]
            row = [strategy, f"{SLOW_FACTOR} x slower" if slow else "normal",
                   f"{len(run.latencies):,}", f"{run.rate:,.0f}", f"{run.to_slow:,}",
                   f"{run.to_recovered:,}",
                   f"{run.percentile(0.5) * 1e3:.1f}", f"{run.percentile(0.99) * 1e3:.1f}",
                   f"{run.percentile(0.999) * 1e3:.1f}"]
            if slow:
                p99, p999 = ratio(results, strategy, 0.99), ratio(results, strategy, 0.999)
                targets = (verdict(p99 <= TARGET_P99 and p999 <= TARGET_P999)
                           if strategy == TARGETED else "contrast")
                row += [f"{p99:.2f}", f"{p999:.2f}", targets]
            else:
                row += ["1.00", "1.00", "-"]
            rows.append(row)
    return header, rows


def fault_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the failing-backend table: one row per fault and client."""
    header = ["fault", "client", "requests/s before", "requests after", "caller errors",
              "attempts to faulty backend", "time to eject ms", "x HAProxy"]
    rows: list[list[str]] = []
    for fault, run in results.faults.items():
        haproxy = run.clients[HAPROXY].detected_s
        for name, client in run.clients.items():
            detected = client.detected_s
            rows.append([
                fault, name, f"{run.requests_before[name] / results.settings.before_fault_s:,.0f}",
                f"{client.started_after(run.fault_at):,}", f"{run.errors(name):,}",
                f"{client.attempts_after(run.fault_at):,}" if client.lb is not None else "-",
                "never" if detected is None else f"{detected * 1e3:,.0f}",
                "-" if detected is None or haproxy is None else f"{detected / haproxy:.3f}",
            ])
    return header, rows


def hang_ratio(results: Results, strategy: str) -> float:
    """p99 of the requests that never touched the hanging backend over the run without it."""
    fault, normal = results.hangs[strategy, True], results.hangs[strategy, False]
    return fault.percentile(0.99) / normal.percentile(0.99)


def lock_wait(run: HangRun) -> float:
    """The longest wall time a thread spent inside lb.pick() or lb.status(), seconds."""
    return max(run.pick_max, run.status_max)


def hang_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the hanging-backend table: two rows per strategy."""
    header = ["strategy", "backend 0", "requests", "requests/s", "compared", "p50 ms", "p99 ms",
              "p99 x normal", "caller errors", "touched backend 0", "time to eject ms",
              "max in pick ms", "max in status ms", "targets"]
    rows: list[list[str]] = []
    for strategy in HANG_STRATEGIES:
        for fault in (False, True):
            run = results.hangs[strategy, fault]
            row = [strategy, "never answers" if fault else "normal", f"{len(run.samples):,}",
                   f"{run.rate:,.0f}", f"{len(run.compared()):,}",
                   f"{run.percentile(0.5) * 1e3:.1f}", f"{run.percentile(0.99) * 1e3:.1f}"]
            if fault:
                p99 = hang_ratio(results, strategy)
                ok = (p99 <= TARGET_HANG_P99 and run.errors() <= TARGET_HANG_ERRORS
                      and lock_wait(run) <= TARGET_LOCK_S)
                row += [f"{p99:.2f}", f"{run.errors():,}", f"{len(run.touched()):,}",
                        "never" if run.ejected_s is None else f"{run.ejected_s * 1e3:,.0f}",
                        f"{run.pick_max * 1e3:.1f}", f"{run.status_max * 1e3:.1f}", verdict(ok)]
            else:
                row += ["1.00", f"{run.errors():,}", f"{len(run.touched()):,}", "-",
                        f"{run.pick_max * 1e3:.1f}", f"{run.status_max * 1e3:.1f}", "-"]
            rows.append(row)
    return header, rows


def target_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the targets table."""
    header = ["target", "measured", "result"]
    p99, p999 = ratio(results, TARGETED, 0.99), ratio(results, TARGETED, 0.999)
    rows = [
        [f"{TARGETED} p99 with a {SLOW_FACTOR} x slower backend <= {TARGET_P99} x without",
         f"{p99:.2f} x", verdict(p99 <= TARGET_P99)],
        [f"{TARGETED} p99.9 with a {SLOW_FACTOR} x slower backend <= {TARGET_P999:g} x without",
         f"{p999:.2f} x", verdict(p999 <= TARGET_P999)],
    ]
    for fault, run in results.faults.items():
        errors = run.errors(TAI_RETRIES)
        rows.append([f"retries on, backend {fault}: {TARGET_ERRORS} caller errors (GET)",
                     f"{errors:,}", verdict(errors <= TARGET_ERRORS)])
    for fault, run in results.faults.items():
        haproxy = run.clients[HAPROXY].detected_s
        for name in (TAI_RETRIES, TAI_NO_RETRIES):
            detected = run.clients[name].detected_s
            label = (f"{name}, backend {fault}: eject <= {TARGET_EJECT_SHARE} x HAProxy's "
                     "detection" + ("" if fault == REFUSE else " (not a stated target)"))
            if detected is None or haproxy is None:
                measured = ("not ejected" if detected is None
                            else f"HAProxy: no DOWN in {results.settings.max_wait_s:g} s")
                rows.append([label, measured, verdict(detected is not None)])
            else:
                rows.append([label, f"{detected * 1e3:,.0f} / {haproxy * 1e3:,.0f} ms = "
                                    f"{detected / haproxy:.3f} x",
                             verdict(detected <= TARGET_EJECT_SHARE * haproxy)])
    for strategy in HANG_STRATEGIES:
        hang, normal = results.hangs[strategy, True], results.hangs[strategy, False]
        p99 = hang_ratio(results, strategy)
        rows.append([f"{strategy}, backend never answers: p99 of requests that never touched "
                     f"it <= {TARGET_HANG_P99:g} x without the fault",
                     f"{hang.percentile(0.99) * 1e3:.1f} / {normal.percentile(0.99) * 1e3:.1f} "
                     f"ms = {p99:.2f} x", verdict(p99 <= TARGET_HANG_P99)])
        rows.append([f"{strategy}, backend never answers: {TARGET_HANG_ERRORS} caller errors "
                     "(GET)", f"{hang.errors():,}", verdict(hang.errors() <= TARGET_HANG_ERRORS)])
        rows.append([f"{strategy}, backend never answers: no thread more than "
                     f"{TARGET_LOCK_S * 1e3:g} ms inside lb.pick() or lb.status()",
                     f"pick {hang.pick_max * 1e3:.1f} ms, status {hang.status_max * 1e3:.1f} ms",
                     verdict(lock_wait(hang) <= TARGET_LOCK_S)])
    return header, rows


def summary_lines(results: Results) -> list[str]:
    """The verdicts, and the points to read the tables by."""
    _, rows = target_rows(results)
    passed = sum(row[-1] == "PASS" for row in rows)
    lines = [f"Targets: {passed} of {len(rows)} rows pass."]
    for fault, run in results.faults.items():
        haproxy = run.clients[HAPROXY]
        lines.append(
            f"Backend {fault}: HAProxy marked it DOWN "
            + ("never" if haproxy.detected_s is None
               else f"{haproxy.detected_s:.2f} s after the fault")
            + f"; its callers saw {run.errors(HAPROXY):,} errors, tai-lb's "
            f"{run.errors(TAI_RETRIES):,} with retries and {run.errors(TAI_NO_RETRIES):,} "
            "without.")
    for strategy in HANG_STRATEGIES:
        hang = results.hangs[strategy, True]
        touched = hang.touched()
        lines.append(
            f"Backend never answering, {strategy}: ejected "
            + ("never" if hang.ejected_s is None
               else f"{hang.ejected_s * 1e3:,.0f} ms after it stopped answering")
            + ("" if hang.ejected_at_end else " (not ejected at the end of the run)")
            + f"; {len(touched):,} requests after the fault touched it"
            + (f" (the slowest took {touched[-1] * 1e3:,.0f} ms)" if touched else "")
            + f"; {hang.errors():,} caller errors.")
    return lines


def method_text(results: Results) -> str:
    """How the figures were taken."""
    s = results.settings
    return (
        f"Backends: threaded `http.server`s on 127.0.0.1, one process each (TCP_NODELAY, "
        "keep-alive), steered through shared memory; each GET is answered `ok` after the "
        f"backend's delay x a uniform factor in {1 - JITTER:g}-{1 + JITTER:g}.  "
        f"(a) {s.slow_backends} backends with a {s.base_delay * 1e3:g} ms delay; "
        f"{s.threads} threads, each with its own `lb.session()` on one balancer (pools of "
        f"{s.threads} connections per endpoint), send GETs for {s.run_s:g} s after "
        f"{s.warm} untimed ones; in the slow runs backend 0's delay is {SLOW_FACTOR} x longer "
        f"from {s.run_s / 4:g} s to {s.run_s * 3 / 4:g} s.  Each strategy, at its default "
        "settings, runs without and with the slow backend back to back (strategies in a "
        "shuffled order, the pair's order alternating), each run on a fresh balancer.  "
        "Latency is the wall time of `session.get` on its thread over every request of the "
        "run; percentiles are nearest-rank; the `to backend 0` columns count requests "
        "answered by backend 0 in the middle half (the slow phase of the slow runs) and in the "
        "last quarter (fast again).  "
        f"(b) {s.fault_backends} backends with a {s.fault_delay * 1e3:g} ms delay; three "
        f"clients of {s.fault_threads} threads each run at once: tai-lb with retries (3 "
        "attempts, default budget), tai-lb without (`\"retries\": false`), both round robin "
        "with `\"outlier_detection\": {}` (5 failures in a row eject, Envoy's defaults), and "
        f"`requests.Session`s to {results.haproxy} (`balance roundrobin`, `option httpchk GET "
        f"/healthz`, `check inter {HAPROXY_INTER:g}s fall {HAPROXY_FALL} rise {HAPROXY_RISE}`, "
        "otherwise its defaults: 3 connect retries on the same server, no redispatch).  After "
        f"{s.before_fault_s:g} s, backend 0 fails: `refusing` kills its process (the kernel "
        "closes its listener and connections), `503` makes it answer 503 at once.  Time to "
        "eject runs from the fault to tai-lb's ejection (its outlier log record) or to "
        "HAProxy's `DOWN` (its stats socket, read every "
        f"{POLL_S * 1e3:g} ms); the load goes on until {s.after_down_s:g} s after HAProxy's "
        "DOWN.  `requests/s before` is each client's rate before the fault; "
        "`caller errors` count the GETs of the whole run that raised or did not answer "
        "200; `attempts to faulty backend` count tai-lb's attempts there in requests that "
        "ended after the fault, retries included.  "
        f"(c) {s.hang_backends} backends with a {s.hang_delay * 1e3:g} ms delay; "
        f"{s.hang_threads} threads, each with its own `lb.session()`, send GETs with "
        f"`timeout={HANG_TIMEOUT}` for {s.hang_run_s:g} s after {s.warm} untimed ones, through "
        "a balancer with retries on (3 attempts) and `\"outlier_detection\": {}`; in the fault "
        f"runs backend 0 turns into a black hole at {s.hang_run_s / 4:g} s (it accepts "
        "connections and reads requests, new and already open, and never answers).  Each "
        "strategy runs without and with the fault back to back, on fresh balancers.  Compared "
        "are the requests started from the fault on (from a quarter of the run without it) "
        "that never touched backend 0 in any attempt (their decision traces), against every "
        "request of the same window without the fault; `touched backend 0` counts the window's "
        "requests with an attempt there; `caller errors` cover the whole run.  "
        "`max in pick` is the longest wall time any thread spent inside `lb.pick()` (a "
        "subclass times every call) after the warm-up; `max in status` the longest "
        f"`lb.status()`, called by a thread of its own every {STATUS_POLL_S * 1e3:g} ms: "
        "upper bounds of any lock wait inside them, GIL waits included."
    )


def markdown_report(results: Results) -> str:
    """The Markdown section for RESULTS.md (without its heading)."""
    environment = environment_line(f"one run of each case in {results.seconds:.0f} s",
                                   f"requests {requests.__version__}", results.haproxy)
    return "\n".join([
        environment,
        "",
        method_text(results),
        "",
        *(f"- {line}" for line in summary_lines(results)),
        "",
        markdown_table(*latency_rows(results)),
        "",
        markdown_table(*fault_rows(results)),
        "",
        markdown_table(*hang_rows(results)),
        "",
        markdown_table(*target_rows(results)),
        "",
        f"Targets: {TARGETED}'s p99 <= {TARGET_P99} x and p99.9 <= {TARGET_P999:g} x the run "
        f"without the slow backend (the other strategies for contrast); with retries on, "
        f"{TARGET_ERRORS} caller-visible errors for idempotent requests when a backend fails; "
        f"time to eject a refusing backend <= {TARGET_EJECT_SHARE} x HAProxy's default "
        "detection time in the same run; with a backend that accepts and never answers, the "
        f"p99 of the requests that never touched it <= {TARGET_HANG_P99:g} x the run without "
        f"the fault, {TARGET_HANG_ERRORS} caller errors, and no thread waiting on a lock for "
        f"more than {TARGET_LOCK_S * 1e3:g} ms (measured as the longest wall time inside "
        "`lb.pick()` and `lb.status()`).  One run of each case: figures vary from run to run "
        "on this shared machine.",
    ])


# -- (d) a trickling response against the deadline ----------------------------------------------

TRICKLE_SECTION = "## faults.py --trickle: a trickling response vs the deadline"
TRICKLE_BYTES = 20  # bytes of body, sent one at a time
TRICKLE_TIMEOUT = (1.0, 2.0)  # (connect, read): every wait for data is under the read timeout
TRICKLE_CASES = ("status line", "body", "chunked body", "streamed body")
TARGET_TRICKLE_DEADLINE = 1.0  # the deadline the target is stated for, seconds
TARGET_TRICKLE_S = 2.0  # a trickling response with a 1 s deadline ends within 2 s (median)


@dataclass(frozen=True)
class TrickleSettings:
    """How much of (d) to measure."""

    interval: float  # seconds between two bytes of the response
    deadlines: tuple[float, ...]  # the retries.deadline values measured
    runs: int  # requests per case and deadline


TRICKLE_FULL = TrickleSettings(interval=1.0, deadlines=(1.0, 3.0), runs=5)
TRICKLE_QUICK = TrickleSettings(interval=0.2, deadlines=(1.0,), runs=1)


def trickle_response(case: str) -> tuple[bytes, list[bytes]]:
    """What a trickling backend sends at once, then the steps it sends ``interval`` apart."""
    body = b"t" * TRICKLE_BYTES
    if case == "chunked body":
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head, [b"1\r\nt\r\n"] * TRICKLE_BYTES + [b"0\r\n\r\n"]
    head = (f"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {TRICKLE_BYTES}\r\n\r\n"
            .encode())
    if case == "status line":  # the whole response trickles, status line first
        whole = head + body
        return b"", [whole[i:i + 1] for i in range(len(whole))]
    return head, [body[i:i + 1] for i in range(len(body))]


class TrickleBackend:
    """A raw HTTP backend on 127.0.0.1 that trickles every response as ``case`` says.

    One thread accepts, one thread per connection reads the request and trickles the answer;
    a connection the client closes ends its thread at the next byte.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.case = "body"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stopped = threading.Event()
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, name="faults-trickle", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._answer, args=(client, self.case),
                             name="faults-trickle-conn", daemon=True).start()

    def _answer(self, client: socket.socket, case: str) -> None:
        head, steps = trickle_response(case)
        with client, contextlib.suppress(OSError):
            request = b""
            while b"\r\n\r\n" not in request:
                data = client.recv(65536)
                if not data:
                    return
                request += data
            if head:
                client.sendall(head)
            for step in steps:
                if self._stopped.wait(self.interval):
                    return
                client.sendall(step)

    def close(self) -> None:
        """Stop accepting and end every trickle at its next byte."""
        self._stopped.set()
        self._listener.close()
        self._thread.join(5)


@dataclass
class TrickleRun:
    """The requests of one case of (d) with one deadline (None: no deadline)."""

    case: str
    deadline: Optional[float]
    seconds: list[float] = field(default_factory=list)  # each request's time to end
    endings: list[str] = field(default_factory=list)  # how each ended: an exception or "200"

    @property
    def median(self) -> float:
        """The median time to end, seconds."""
        return statistics.median(self.seconds)


def trickle_request(session: requests.Session, case: str) -> str:
    """One GET of (d), its body read to the end; how it ended."""
    try:
        streamed = case == "streamed body"
        with session.get(f"http://{SERVICE}/", timeout=TRICKLE_TIMEOUT, stream=streamed) as r:
            if streamed:
                for _ in r.iter_content(1):
                    pass
            return str(r.status_code)
    except requests.exceptions.RequestException as error:
        return type(error).__name__


def trickle_runs(settings: TrickleSettings, progress: bool) -> list[TrickleRun]:
    """Every case with every deadline, then the body case once without a deadline."""
    runs: list[TrickleRun] = []
    backend = TrickleBackend(settings.interval)
    try:
        plan: list[tuple[str, Optional[float], int]] = [
            (case, deadline, settings.runs) for case in TRICKLE_CASES
            for deadline in settings.deadlines]
        plan.append(("body", None, 1))
        for case, deadline, count in plan:
            backend.case = case
            retries: dict[str, Any] = {} if deadline is None else {"deadline": deadline}
            config = {"services": {SERVICE: {"endpoints": [backend.address],
                                             "retries": retries}}}
            run = TrickleRun(case, deadline)
            with tai_lb.LoadBalancer.from_config(config) as lb:
                session = lb.session()
                for _ in range(count):
                    begun = time.perf_counter()
                    run.endings.append(trickle_request(session, case))
                    run.seconds.append(time.perf_counter() - begun)
            runs.append(run)
            if progress:
                print(f"(d) {case}, deadline {deadline}: median {run.median:.2f} s",
                      file=sys.stderr, flush=True)
    finally:
        backend.close()
    return runs


def trickle_ok(run: TrickleRun) -> Optional[bool]:
    """Whether ``run`` meets the target, or None if the target is not stated for it."""
    if run.deadline != TARGET_TRICKLE_DEADLINE:
        return None
    return run.median <= TARGET_TRICKLE_S


def trickle_rows(runs: Sequence[TrickleRun], settings: TrickleSettings,
                 ) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table of (d): one row per case and deadline."""
    header = ["response", "deadline s", "requests", "median s to end", "longest s",
              "x deadline", "x body without deadline", "ended with", "target"]
    whole = next(run.median for run in runs if run.deadline is None)
    rows = []
    for run in runs:
        ok = trickle_ok(run)
        rows.append([
            f"{run.case}, a byte per {settings.interval:g} s",
            "none" if run.deadline is None else f"{run.deadline:g}", f"{len(run.seconds)}",
            f"{run.median:.2f}", f"{max(run.seconds):.2f}",
            "-" if run.deadline is None else f"{run.median / run.deadline:.2f}",
            f"{run.median / whole:.2f}", ", ".join(sorted(set(run.endings))),
            "-" if ok is None else verdict(ok)])
    return header, rows


def trickle_summary(runs: Sequence[TrickleRun]) -> list[str]:
    """The verdict of (d)."""
    judged = [ok for ok in map(trickle_ok, runs) if ok is not None]
    if not judged:
        return [f"Target not measured: no run with a {TARGET_TRICKLE_DEADLINE:g} s deadline."]
    return [f"Targets: {sum(judged)} of {len(judged)} rows pass (a trickling response with a "
            f"{TARGET_TRICKLE_DEADLINE:g} s deadline ends within {TARGET_TRICKLE_S:g} s, "
            "median)."]


def trickle_report(runs: Sequence[TrickleRun], settings: TrickleSettings,
                   seconds: float) -> str:
    """The Markdown section of (d) for RESULTS.md (without its heading)."""
    environment = environment_line(f"{seconds:.0f} s in all", f"requests {requests.__version__}")
    method = (
        "One raw HTTP backend on 127.0.0.1 (a thread per connection, TCP_NODELAY, "
        f"`Connection: close`) trickles a {TRICKLE_BYTES}-byte response a byte at a time, "
        f"{settings.interval:g} s apart: the whole response from the status line on, or the "
        "body after headers sent at once (with a `Content-Length`, or chunked in one-byte "
        "chunks, or with a `Content-Length` and read by `iter_content(1)` after "
        "`session.get(..., stream=True)` returned).  Each GET goes through `lb.session()` "
        f"with `timeout={TRICKLE_TIMEOUT}`, so no wait for data reaches the read timeout, and "
        "`retries.deadline` as shown (default retries: 3 attempts); a fresh balancer per row.  "
        "Time to end is the wall time from the call to its exception (or to the end of the "
        "body); `x body without deadline` compares with the one request without a deadline, which "
        "read the whole response.")
    return "\n".join([environment, "", method, "",
                      *(f"- {line}" for line in trickle_summary(runs)), "",
                      markdown_table(*trickle_rows(runs, settings))])


def trickle_main(args: Any) -> int:
    """Run (d) alone, print its table and, unless told not to, update its RESULTS.md section."""
    settings = TRICKLE_QUICK if args.quick else TRICKLE_FULL
    began = time.perf_counter()
    with sigterm_raises():
        runs = trickle_runs(settings, progress=not args.quick)
    print("a trickling response against retries.deadline: time to end (median of a few runs)")
    publish(args, "--quick: a smoke test with a faster trickle and one request per row",
            trickle_summary(runs), [trickle_rows(runs, settings)],
            trickle_report(runs, settings, time.perf_counter() - began), TRICKLE_SECTION)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the tables and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(
        __doc__, "under 45 seconds with short runs (smoke test); no write",
        "seed of the run order and delays", f"the file whose '{SECTION}' section is replaced")
    parser.add_argument("--run-seconds", type=float, help="seconds of each run of (a)")
    parser.add_argument("--trickle", action="store_true",
                        help="run only (d), a trickling response against the deadline, and "
                             f"update its own '{TRICKLE_SECTION}' section")
    args = parser.parse_args(argv)
    if args.trickle:
        return trickle_main(args)

    settings = QUICK if args.quick else FULL
    if args.run_seconds is not None:
        if args.run_seconds < 1:
            parser.error("--run-seconds must be at least 1")
        settings = Settings(**{**settings.__dict__, "run_s": args.run_seconds})
    results = run(settings, args.seed, progress=not args.quick)

    print(f"one backend {SLOW_FACTOR} x slower, failing or never answering: latency "
          "percentiles, caller errors and time to eject (one run each)")
    publish(args,
            "--quick: a smoke test; its runs are too short for the percentiles to mean much",
            summary_lines(results),
            [latency_rows(results), fault_rows(results), hang_rows(results),
             target_rows(results)],
            markdown_report(results), SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
