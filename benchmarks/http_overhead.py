"""Cost of a request through tai-lb's session, next to plain requests and a local HAProxy.

Starts nginx (Debian ``nginx-light``) with three keep-alive backends and HAProxy (Debian
``haproxy``) balancing round-robin over them, all on free 127.0.0.1 ports with their
configuration in a temporary directory (apt-get installs either when missing; that needs root),
then times GETs of a tiny fixed body from four clients:

* ``plain``: a ``requests.Session`` straight to one nginx backend;
* ``tai-lb, 3 backends``: ``lb.session()`` to ``http://users/``, round-robin over the three;
* ``tai-lb, 1 backend``: ``lb.session()`` to a service whose one endpoint is plain's backend;
* ``HAProxy``: a ``requests.Session`` to HAProxy's frontend.

Each client runs on one thread and on 16 threads (a session per thread, released by a barrier;
the tai-lb sessions share one balancer).  Machines are shared and noisy, so in every round the
clients take turns in short batches in shuffled (and mirrored) orders, and the claims are medians
over rounds of ratios taken within the same round::

    python benchmarks/http_overhead.py          # about 3 minutes; updates its RESULTS.md section
    python benchmarks/http_overhead.py --quick  # under 30 seconds; never writes RESULTS.md

Targets (printed as PASS/FAIL, never asserted): one request through tai-lb's session costs at
most 1.03 x one through a plain ``requests.Session`` to the same backend, and less than one
through the local HAProxy; on 16 threads tai-lb's throughput is at least 0.97 x plain's.
"""

from __future__ import annotations

import contextlib
import gc
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Callable, Optional, TextIO

import requests
from picks import (
    benchmark_parser,
    ensure_programs,
    environment_line,
    markdown_table,
    median,
    publish,
    verdict,
)

import tai_lb

SECTION = "## http_overhead.py"

BACKENDS = 3
BODY = b"ok\n"
TARGET_OVERHEAD = 1.03  # tai-lb seconds per request <= 1.03 x plain requests.Session
TARGET_VS_HAPROXY = 1.0  # tai-lb seconds per request < through the local HAProxy
TARGET_THROUGHPUT = 0.97  # 16-thread tai-lb requests/s >= 0.97 x plain

PLAIN = "plain"
TAI_MANY = "tai-lb, 3 backends"
TAI_ONE = "tai-lb, 1 backend"
HAPROXY = "HAProxy"
CLIENT_NAMES = (PLAIN, TAI_MANY, TAI_ONE, HAPROXY)
TAI_NAMES = (TAI_MANY, TAI_ONE)
DESCRIPTIONS = {
    PLAIN: "`requests.Session` straight to one nginx backend",
    TAI_MANY: "`lb.session()` to `http://users/`, round_robin over the 3 nginx backends",
    TAI_ONE: "`lb.session()` to a service whose one endpoint is plain's backend",
    HAPROXY: "`requests.Session` to HAProxy (roundrobin over the 3 backends)",
}


@dataclass(frozen=True)
class Settings:
    """How much to measure."""

    rounds: int
    threads: int
    chunk: int  # requests per timed one-thread batch
    chunks: int  # one-thread batches per client and round
    per_thread: int  # requests per thread in a multi-thread batch
    passes: int  # multi-thread batches per client and round (even)
    warm: int  # untimed requests before the one-thread turns
    thread_warm: int  # untimed requests per thread before each multi-thread batch


FULL = Settings(rounds=36, threads=16, chunk=10, chunks=30, per_thread=4, passes=6,
                warm=2 * BACKENDS, thread_warm=1)
QUICK = Settings(rounds=3, threads=16, chunk=10, chunks=10, per_thread=4, passes=2,
                 warm=2 * BACKENDS, thread_warm=1)


# -- servers -------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 (held together, so never the same twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def nginx_config(directory: Path, ports: Sequence[int]) -> str:
    """nginx.conf: one worker, one keep-alive server per port answering ``ok`` to everything."""
    servers = "\n".join(
        f"    server {{\n"
        f"        listen 127.0.0.1:{port};\n"
        f"        location / {{ return 200 \"ok\\n\"; }}\n"
        f"    }}"
        for port in ports)
    temp = {kind: directory / f"nginx-{kind}"
            for kind in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return f"""\
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "nginx-error.log"} warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
{servers}
}}
"""


def haproxy_config(port: int, backends: Sequence[int]) -> str:
    """haproxy.cfg: an HTTP frontend balancing round-robin over ``backends``, reusing them."""
    servers = "\n".join(f"    server nginx{i} 127.0.0.1:{backend}"
                        for i, backend in enumerate(backends))
    return f"""\
global
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s

frontend bench
    bind 127.0.0.1:{port}
    default_backend nginx

backend nginx
    balance roundrobin
{servers}
"""


class Servers:
    """nginx and HAProxy as foreground child processes, configured in a temporary directory."""

    def __init__(self, nginx: str, haproxy: str) -> None:
        self.temp = tempfile.TemporaryDirectory(prefix="tai-lb-http-overhead-")
        self.directory = Path(self.temp.name)
        *self.backends, self.haproxy_port = free_ports(BACKENDS + 1)
        self.processes: list[tuple[str, subprocess.Popen[bytes], TextIO]] = []
        try:
            nginx_conf = self.directory / "nginx.conf"
            nginx_conf.write_text(nginx_config(self.directory, self.backends), encoding="utf-8")
            haproxy_conf = self.directory / "haproxy.cfg"
            haproxy_conf.write_text(haproxy_config(self.haproxy_port, self.backends),
                                    encoding="utf-8")
            self._start("nginx", [nginx, "-p", str(self.directory), "-e",
                                  str(self.directory / "nginx-error.log"), "-c", str(nginx_conf),
                                  "-g", "daemon off;"], self.backends)
            self._start("haproxy", [haproxy, "-f", str(haproxy_conf), "-db"],
                        [self.haproxy_port])
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, command: list[str], ports: Sequence[int]) -> None:
        log = (self.directory / f"{name}.log").open("w", encoding="utf-8")
        # A session of its own: a Ctrl-C reaches only this script, which then stops the servers.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process, log))
        deadline = time.monotonic() + 10
        for port in ports:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {process.returncode}:\n"
                                       + self._log_text(name))
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} is not listening on 127.0.0.1:{port} "
                                           "after 10 s:\n" + self._log_text(name)) from None
                    time.sleep(0.02)

    def _log_text(self, name: str) -> str:
        text = ""
        for path in sorted(self.directory.glob(f"{name}*.log")):
            with contextlib.suppress(OSError):
                text += path.read_text(encoding="utf-8", errors="replace")
        return text.strip()

    def url(self, port: int) -> str:
        """The URL of a server on 127.0.0.1."""
        return f"http://127.0.0.1:{port}/"

    def close(self) -> None:
        """Stop every server (SIGTERM, then SIGKILL after 5 s) and remove the directory."""
        for _name, process, _log in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for _name, process, log in reversed(self.processes):
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
            log.close()
        self.processes.clear()
        self.temp.cleanup()

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while running, so the servers are stopped on it too."""

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- clients -------------------------------------------------------------------------------------

@dataclass
class Client:
    """One way of sending the GETs, with its sessions and what was measured of it."""

    name: str
    url: str
    session: requests.Session  # for one-thread batches
    sessions: list[requests.Session]  # one per thread, for multi-thread batches
    per_request_s: list[float] = field(default_factory=list)  # one thread, by round
    cpu_s: list[float] = field(default_factory=list)  # that thread's CPU per request, by round
    throughput: list[float] = field(default_factory=list)  # all threads, req/s, by round


def get_batch(session: requests.Session, url: str, count: int) -> None:
    """``count`` GETs on ``session``, each checked for a 200."""
    get = session.get
    for _ in range(count):
        if get(url).status_code != 200:
            raise RuntimeError(f"GET {url} did not answer 200")


def warm_up(session: requests.Session, url: str, count: int) -> None:
    """Untimed GETs, so connections closed while idle are open again before the timing."""
    for _ in range(count):
        session.get(url).raise_for_status()


def many_threads(client: Client, settings: Settings) -> float:
    """Aggregate requests per second of one thread per session, released by a barrier.

    Each thread warms its session up before the barrier; the wall time runs from the first
    thread's start to the last thread's end, so neither thread creation nor warm-up counts.
    """
    threads = len(client.sessions)
    per_thread = settings.per_thread
    barrier = threading.Barrier(threads)
    starts = [0.0] * threads
    ends = [0.0] * threads
    errors: list[BaseException] = []

    def work(index: int) -> None:
        session = client.sessions[index]
        try:
            warm_up(session, client.url, settings.thread_warm)
        except BaseException as error:
            errors.append(error)
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        starts[index] = time.perf_counter()
        try:
            get_batch(session, client.url, per_thread)
        except BaseException as error:
            errors.append(error)
        ends[index] = time.perf_counter()

    workers = [threading.Thread(target=work, args=(i,), name=f"http-overhead-{i}", daemon=True)
               for i in range(threads)]
    gc.collect()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise RuntimeError(f"{client.name}: a thread failed") from errors[0]
    return threads * per_thread / (max(ends) - min(starts))


def check_answers(clients: Sequence[Client]) -> None:
    """Every client gets nginx's fixed body, so all four measure the same exchange."""
    for client in clients:
        response = client.session.get(client.url)
        if response.status_code != 200 or response.content != BODY:
            raise RuntimeError(f"{client.name}: GET {client.url} answered "
                               f"{response.status_code} {response.content[:60]!r}")


# -- the run -------------------------------------------------------------------------------------

TIME = "time"  # one thread, wall seconds per request
CPU = "cpu"  # one thread, that thread's CPU seconds per request
THREADS = "threads"  # all threads, requests per second
FIGURES = (TIME, CPU, THREADS)


@dataclass
class Results:
    """Everything one run measured."""

    settings: Settings
    clients: dict[str, Client]
    ratios: dict[tuple[str, str, str], list[float]]  # (figure, client, baseline): by round
    seconds: float
    versions: str


def ratio_keys() -> list[tuple[str, str, str]]:
    """(figure, client, baseline) of every per-round ratio."""
    keys = [(figure, name, PLAIN) for figure in FIGURES
            for name in CLIENT_NAMES if name != PLAIN]
    keys += [(TIME, name, HAPROXY) for name in TAI_NAMES]
    return keys


def program_versions(nginx: str, haproxy: str) -> str:
    """``nginx/1.x, HAProxy 2.x`` as the programs report themselves."""
    found = []
    for command, pattern in (([nginx, "-v"], r"nginx/[\w.]+"), ([haproxy, "-v"],
                                                              r"HAProxy version [\w.]+")):
        output = subprocess.run(command, check=False, capture_output=True, text=True, timeout=10)
        match = re.search(pattern, output.stdout + output.stderr)
        found.append(match.group(0) if match else Path(command[0]).name)
    return ", ".join(found).replace(" version", "")


def single_segment(clients: dict[str, Client], settings: Settings,
                   rng: random.Random) -> dict[str, dict[str, float]]:
    """The one-thread figures of a round: wall and CPU seconds per request, by client name.

    The clients take turns in batches of ``settings.chunk`` GETs, in a new shuffled order each
    turn, so a slow spell of the machine hits every client alike; each client's figure is its
    total over ``settings.chunks`` batches.
    """
    order = list(clients.values())
    for client in order:
        warm_up(client.session, client.url, settings.warm)
    wall = dict.fromkeys(clients, 0.0)
    used = dict.fromkeys(clients, 0.0)
    gc.collect()
    for _ in range(settings.chunks):
        rng.shuffle(order)
        for client in order:
            cpu = time.thread_time()
            start = time.perf_counter()
            get_batch(client.session, client.url, settings.chunk)
            wall[client.name] += time.perf_counter() - start
            used[client.name] += time.thread_time() - cpu
    count = settings.chunk * settings.chunks
    figures = {TIME: {name: wall[name] / count for name in clients},
               CPU: {name: used[name] / count for name in clients}}
    for name, client in clients.items():
        client.per_request_s.append(figures[TIME][name])
        client.cpu_s.append(figures[CPU][name])
    return figures


def threaded_segment(clients: dict[str, Client], settings: Settings,
                     rng: random.Random) -> dict[str, dict[str, float]]:
    """The multi-thread figures of a round: requests/s by client name.

    Every client runs ``settings.passes`` batches, in pairs of passes: a new shuffled order,
    then its reverse (A B C D D C B A), so a drift in the machine's speed hits every client
    alike.  A client's figure is its total requests over its total batch time.
    """
    order = list(clients.values())
    plan: list[Client] = []
    for _ in range(max(1, settings.passes // 2)):
        rng.shuffle(order)
        plan += order + order[::-1]
    batch = settings.threads * settings.per_thread
    seconds = dict.fromkeys(clients, 0.0)
    done = dict.fromkeys(clients, 0)
    for client in plan:
        seconds[client.name] += batch / many_threads(client, settings)
        done[client.name] += batch
    throughput = {name: done[name] / seconds[name] for name in clients}
    for name, client in clients.items():
        client.throughput.append(throughput[name])
    return {THREADS: throughput}


def run(settings: Settings, seed: int, progress: bool) -> Results:
    """Measure every client in interleaved rounds and return the figures."""
    nginx, haproxy = ensure_programs({"nginx": "nginx-light", "haproxy": "haproxy"},
                                     "http_overhead.py")
    versions = program_versions(nginx, haproxy)
    began = time.perf_counter()
    rng = random.Random(seed)
    with sigterm_raises(), Servers(nginx, haproxy) as servers, contextlib.ExitStack() as stack:
        lb = tai_lb.LoadBalancer.from_config({"services": {
            "users": {"endpoints": [f"127.0.0.1:{port}" for port in servers.backends],
                      "strategy": "round_robin"},
            "users-one": {"endpoints": [f"127.0.0.1:{servers.backends[0]}"],
                          "strategy": "round_robin"},
        }})
        stack.enter_context(lb)
        makers: dict[str, tuple[str, Callable[[], requests.Session]]] = {
            PLAIN: (servers.url(servers.backends[0]), requests.Session),
            TAI_MANY: ("http://users/", lb.session),
            TAI_ONE: ("http://users-one/", lb.session),
            HAPROXY: (servers.url(servers.haproxy_port), requests.Session),
        }
        clients: dict[str, Client] = {}
        for name, (url, make) in makers.items():
            sessions = [stack.enter_context(make()) for _ in range(settings.threads + 1)]
            clients[name] = Client(name, url, sessions[0], sessions[1:])
        check_answers(list(clients.values()))
        for client in clients.values():  # opens every connection before the first round
            warm_up(client.session, client.url, 20)
            many_threads(client, settings)

        ratios: dict[tuple[str, str, str], list[float]] = {key: [] for key in ratio_keys()}
        for number in range(1, settings.rounds + 1):
            if rng.random() < 0.5:
                figures = single_segment(clients, settings, rng)
                figures.update(threaded_segment(clients, settings, rng))
            else:
                figures = threaded_segment(clients, settings, rng)
                figures.update(single_segment(clients, settings, rng))
            for (figure, name, baseline), values in ratios.items():
                values.append(figures[figure][name] / figures[figure][baseline])
            if progress:
                plain, many = figures[TIME][PLAIN], figures[THREADS]
                print(f"round {number}/{settings.rounds}: plain {plain * 1e6:.0f} us, "
                      f"tai-lb {figures[TIME][TAI_MANY] / plain:.3f} x, "
                      f"HAProxy {figures[TIME][HAPROXY] / plain:.3f} x; "
                      f"{settings.threads} threads: plain {many[PLAIN]:,.0f}/s, "
                      f"tai-lb {many[TAI_MANY] / many[PLAIN]:.3f} x; "
                      f"{time.perf_counter() - began:.0f} s so far",
                      file=sys.stderr, flush=True)
    return Results(settings, clients, ratios, time.perf_counter() - began, versions)


# -- reporting -----------------------------------------------------------------------------------


def quartiles(values: Sequence[float]) -> str:
    """The 25th-75th percentile range of ``values``."""
    if len(values) < 2:
        return f"{values[0]:.3f}-{values[0]:.3f}" if values else "n/a"
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low:.3f}-{high:.3f}"


def figure_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the figures table: one row per client."""
    header = ["client", "1-thread us/request", "x plain", "client CPU us/request", "x plain",
              f"{results.settings.threads}-thread requests/s", "x plain"]
    rows: list[list[str]] = []
    for name, client in results.clients.items():
        ratio = {figure: 1.0 if name == PLAIN else median(results.ratios[figure, name, PLAIN])
                 for figure in FIGURES}
        rows.append([name, f"{median(client.per_request_s) * 1e6:,.1f}", f"{ratio[TIME]:.3f}",
                     f"{median(client.cpu_s) * 1e6:,.1f}", f"{ratio[CPU]:.3f}",
                     f"{median(client.throughput):,.0f}", f"{ratio[THREADS]:.3f}"])
    return header, rows


def target_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the targets table: one row per target and tai-lb client."""
    header = ["target", "client", "median ratio", "p25-p75", "rounds passing", "result"]
    checks: list[tuple[str, str, str, Callable[[float], bool]]] = [
        (f"1-thread time <= {TARGET_OVERHEAD} x plain", TIME, PLAIN,
         lambda ratio: ratio <= TARGET_OVERHEAD),
        ("1-thread time < HAProxy", TIME, HAPROXY, lambda ratio: ratio < TARGET_VS_HAPROXY),
        (f"{results.settings.threads}-thread requests/s >= {TARGET_THROUGHPUT} x plain", THREADS,
         PLAIN, lambda ratio: ratio >= TARGET_THROUGHPUT),
    ]
    rows: list[list[str]] = []
    for target, figure, baseline, passes in checks:
        for name in TAI_NAMES:
            values = results.ratios[figure, name, baseline]
            ratio = median(values)
            rows.append([target, name, f"{ratio:.3f}", quartiles(values),
                         f"{sum(passes(v) for v in values)}/{len(values)}",
                         verdict(passes(ratio))])
    return header, rows


def summary_lines(results: Results) -> list[str]:
    """The baseline, HAProxy's cost and the verdict of each target."""
    plain = results.clients[PLAIN]
    threads = results.settings.threads
    haproxy = median(results.ratios[TIME, HAPROXY, PLAIN])
    many = f"{median(plain.throughput):,.0f} requests/s on {threads} threads"
    haproxy_many = (f"{median(results.ratios[THREADS, HAPROXY, PLAIN]):.3f} x plain's "
                    f"throughput on {threads} threads")
    _, rows = target_rows(results)
    passed = sum(row[-1] == "PASS" for row in rows)
    return [
        f"Plain `requests.Session` GET to one nginx backend: median "
        f"{median(plain.per_request_s) * 1e6:.1f} us on one thread (range over rounds "
        f"{min(plain.per_request_s) * 1e6:.1f}-{max(plain.per_request_s) * 1e6:.1f} us); "
        f"{many}.",
        f"Through the local HAProxy: {haproxy:.3f} x plain's time on one thread; "
        f"{haproxy_many}.",
        f"Targets: {passed} of {len(rows)} rows pass.",
    ]


def method_text(results: Results) -> str:
    """How the figures were taken."""
    s = results.settings
    return (
        f"Servers: {results.versions} on 127.0.0.1 (nginx: 1 worker, {BACKENDS} keep-alive "
        "servers returning `ok\\n`, access log off; HAProxy: `mode http`, `balance roundrobin` "
        "over the same servers, `http-reuse always`).  Clients: "
        + "; ".join(f"{name}: {text}" for name, text in DESCRIPTIONS.items())
        + ".  tai-lb runs with its default settings (pool of 10 connections per endpoint shared "
        "by all sessions of the balancer, 1.5 s idle expiry, 3 attempts).  "
        f"Each of {s.rounds} rounds has two segments in a random order.  On one thread the "
        f"clients take turns in timed batches of {s.chunk} GETs, in a new shuffled order each "
        f"turn, {s.chunks} turns ({s.chunk * s.chunks} GETs per client); `client CPU` is that "
        "thread's own CPU time (user + system) per request.  On "
        f"{s.threads} threads every client runs {max(2, s.passes)} timed batches of "
        f"{s.threads} x {s.per_thread} GETs (a session per thread, released by a barrier; the "
        "tai-lb sessions share one balancer), in pairs of passes: a shuffled order, then its "
        "reverse (A B C D D C B A).  "
        f"The one-thread segment begins with {s.warm} untimed GETs per client and each "
        f"multi-thread batch with {s.thread_warm} per thread before the barrier, so "
        "connections that tai-lb's idle expiry closed during the other clients' batches are "
        "reopened outside the timing.  The tables give medians over rounds; each ratio is the "
        "median over rounds of that round's own ratio, so slow spells on this shared machine "
        "cancel out."
    )


def markdown_report(results: Results) -> str:
    """The Markdown section for RESULTS.md (without its heading)."""
    s = results.settings
    environment = environment_line(f"{s.rounds} rounds in {results.seconds:.0f} s",
                                   f"requests {requests.__version__}")
    return "\n".join([
        environment,
        "",
        method_text(results),
        "",
        *(f"- {line}" for line in summary_lines(results)),
        "",
        markdown_table(*figure_rows(results)),
        "",
        markdown_table(*target_rows(results)),
        "",
        f"Targets: tai-lb's time per request <= {TARGET_OVERHEAD} x plain `requests.Session` "
        "to the same backend, and below the local HAProxy's; "
        f"{s.threads}-thread throughput >= {TARGET_THROUGHPUT} x plain.  `p25-p75` is the "
        "spread of the per-round ratios; `rounds passing` counts the rounds whose own ratio met "
        "the target.",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the tables and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(
        __doc__, "under 30 seconds with short batches (smoke test); no write",
        "seed of the batch order", f"the file whose '{SECTION}' section is replaced")
    parser.add_argument("--rounds", type=int, help="number of interleaved rounds")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        settings = Settings(**{**settings.__dict__, "rounds": args.rounds})
    results = run(settings, args.seed, progress=not args.quick)

    print("tai-lb session vs plain requests.Session vs local HAProxy, same nginx backends "
          "(medians over rounds; ratios per round)")
    publish(args, "--quick: a smoke test; its batches are too short for the ratios to mean much",
            summary_lines(results), [figure_rows(results), target_rows(results)],
            markdown_report(results), SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
