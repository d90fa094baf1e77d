"""Fair backpressure: 64 threads on a pool of 8 connections, urllib3's LifoQueue vs FairQueue.

One real backend on 127.0.0.1 (a threaded ``http.server`` in a process of its own, so it never
competes with the client threads for the GIL) answers every GET after 20 ms.  64 threads send
GETs as fast as they can through one pool of 8 connections (``block=True``), so 56 of them are
always waiting for a connection.  Two pools take turns, in a shuffled order within each round:
tai-lb's pool with urllib3's own ``queue.LifoQueue`` (what every urllib3 pool uses), and the same
pool with tai-lb's :class:`~tai_lb.pool.FairQueue` (waiters served first come, first served).
Each request's time counts its wait for a connection::

    python benchmarks/pool_fairness.py          # about a minute; updates "## pool_fairness.py"
    python benchmarks/pool_fairness.py --quick  # a few seconds; never writes RESULTS.md

Target (printed as PASS/FAIL, never asserted): with FairQueue, p99 / p50 <= 3.  With 8
connections and 20 ms per request the pool serves about 400 requests/s whatever the queue, so
the mean time of a request is the same for both (64 / 400 s): fairness moves time from the
unlucky threads' tail to everyone's median.
"""

from __future__ import annotations

import http.server
import multiprocessing
import queue
import random
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from picks import (
    benchmark_parser,
    environment_line,
    markdown_table,
    publish,
    verdict,
)

from tai_lb.pool import TaiHTTPConnectionPool

SECTION = "## pool_fairness.py"
LIFO = "urllib3 LifoQueue"
FAIR = "tai-lb FairQueue"
QUEUES = (LIFO, FAIR)
TARGET_TAIL = 3.0  # FairQueue's p99 / p50 at most this


@dataclass(frozen=True)
class Settings:
    """How much to measure."""

    threads: int
    connections: int
    delay_s: float
    rounds: int
    run_s: float  # one case of one round, warm-up included
    warm_s: float  # requests that ended in the first warm_s seconds of a case are not counted


FULL = Settings(threads=64, connections=8, delay_s=0.02, rounds=3, run_s=9.0, warm_s=1.0)
QUICK = Settings(threads=64, connections=8, delay_s=0.02, rounds=1, run_s=1.5, warm_s=0.5)


class _PlainQueuePool(TaiHTTPConnectionPool):
    """tai-lb's pool with urllib3's own queue: the 'before' of this benchmark."""

    QueueCls = queue.LifoQueue  # type: ignore[assignment]


POOLS: dict[str, type[TaiHTTPConnectionPool]] = {LIFO: _PlainQueuePool,
                                                 FAIR: TaiHTTPConnectionPool}


# -- the backend, in a process of its own ---------------------------------------------------------


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET after the server's delay, on a kept-alive HTTP/1.1 connection."""

    protocol_version = "HTTP/1.1"
    server: _SlowServer

    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def do_GET(self) -> None:
        time.sleep(self.server.delay_s)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


class _SlowServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    delay_s = 0.0


def _serve(sock: socket.socket, delay_s: float) -> None:
    server = _SlowServer(sock.getsockname(), _SlowHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock  # listening already: the parent knows the port before we start
    server.delay_s = delay_s
    server.serve_forever()


class Backend:
    """The 20 ms backend: a server process listening on an ephemeral port of 127.0.0.1."""

    def __init__(self, delay_s: float) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        # Forked before the client threads start: nothing is held in the child.
        self.process = multiprocessing.get_context("fork").Process(
            target=_serve, args=(sock, delay_s), name="pool-fairness-backend", daemon=True)
        self.process.start()
        sock.close()

    def close(self) -> None:
        """Stop the server process."""
        self.process.terminate()
        self.process.join(5)


# -- the clients ------------------------------------------------------------------------------


@dataclass
class Case:
    """What one queue class measured over the rounds."""

    latencies: list[float] = field(default_factory=list)  # seconds, every counted request
    tail_ratios: list[float] = field(default_factory=list)  # p99 / p50 of each round
    per_thread: list[int] = field(default_factory=list)  # counted requests of each thread
    rates: list[float] = field(default_factory=list)  # counted requests / s, each round


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def measure(backend: Backend, name: str, s: Settings, case: Case) -> None:
    """One round of one queue class: threads x GETs through one pool for ``s.run_s``."""
    pool = POOLS[name]("127.0.0.1", backend.port, maxsize=s.connections, block=True)
    barrier = threading.Barrier(s.threads + 1)
    samples: list[list[float]] = [[] for _ in range(s.threads)]
    in_window = [0] * s.threads  # requests that ended within the timed window, for the rate
    errors: list[BaseException] = []
    start = end = 0.0

    def work(index: int) -> None:
        mine = samples[index]
        barrier.wait()
        try:
            while True:
                began = time.perf_counter()
                if began >= end:
                    return
                pool.urlopen("GET", "/", retries=False, pool_timeout=60)
                ended = time.perf_counter()
                if ended >= start + s.warm_s:  # a wait begun in the warm-up counts in full
                    mine.append(ended - began)
                    in_window[index] += ended < end
        except Exception as error:  # reported below; a benchmark never hides errors
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,), name=f"pool-fairness-{i}")
               for i in range(s.threads)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    end = start + s.run_s
    barrier.wait()
    for thread in threads:
        thread.join()
    pool.close()
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} requests failed, first: {errors[0]!r}")
    latencies = [x for mine in samples for x in mine]
    case.latencies += latencies
    case.per_thread += [len(mine) for mine in samples]
    case.tail_ratios.append(percentile(latencies, 0.99) / percentile(latencies, 0.5))
    case.rates.append(sum(in_window) / (s.run_s - s.warm_s))


@dataclass
class Results:
    """Every case, and how the run went."""

    settings: Settings
    cases: dict[str, Case]
    seconds: float


def run(settings: Settings, seed: int, progress: bool) -> Results:
    """Measure both queue classes, ``settings.rounds`` times each, in a shuffled order."""
    rng = random.Random(seed)
    cases = {name: Case() for name in QUEUES}
    began = time.perf_counter()
    backend = Backend(settings.delay_s)
    try:
        for number in range(settings.rounds):
            order = list(QUEUES)
            rng.shuffle(order)
            for name in order:
                if progress:
                    print(f"round {number + 1}/{settings.rounds}: {name}", file=sys.stderr,
                          flush=True)
                measure(backend, name, settings, cases[name])
    finally:
        backend.close()
    return Results(settings, cases, time.perf_counter() - began)


# -- the report -----------------------------------------------------------------------------


def rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """One row per queue class."""
    header = ["queue", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "p99 / p50",
              "median round p99 / p50", "per-thread requests min-max",
              f"p99 / p50 <= {TARGET_TAIL:g}"]
    table = []
    for name in QUEUES:
        case = results.cases[name]
        p50, p99 = percentile(case.latencies, 0.5), percentile(case.latencies, 0.99)
        tail = p99 / p50
        table.append([
            name, f"{len(case.latencies):,}", f"{statistics.median(case.rates):,.0f}",
            f"{p50 * 1e3:,.1f}", f"{p99 * 1e3:,.1f}", f"{max(case.latencies) * 1e3:,.1f}",
            f"{tail:.2f}", f"{statistics.median(case.tail_ratios):.2f}",
            f"{min(case.per_thread)}-{max(case.per_thread)}",
            verdict(tail <= TARGET_TAIL) if name == FAIR else "(contrast)"])
    return header, table


def summary_lines(results: Results) -> list[str]:
    """The claim, in figures."""
    lifo, fair = (results.cases[name] for name in QUEUES)

    def figures(case: Case) -> str:
        p50, p99 = percentile(case.latencies, 0.5), percentile(case.latencies, 0.99)
        return f"p50 {p50 * 1e3:,.1f} ms, p99 {p99 * 1e3:,.1f} ms (p99 / p50 {p99 / p50:.2f})"

    tail = percentile(fair.latencies, 0.99) / percentile(fair.latencies, 0.5)
    return [f"{LIFO}: {figures(lifo)}.",
            f"{FAIR}: {figures(fair)}.",
            f"FairQueue's p99 / p50 <= {TARGET_TAIL:g}: {verdict(tail <= TARGET_TAIL)}."]


def method_text(results: Results) -> str:
    """How the figures were taken."""
    s = results.settings
    return (
        f"A backend process on 127.0.0.1 answers every GET after {s.delay_s * 1e3:g} ms "
        f"(threaded `http.server`, TCP_NODELAY). In each of {s.rounds} rounds, for each queue "
        f"class in a shuffled order, {s.threads} threads released by a barrier send GETs for "
        f"{s.run_s:g} s through one fresh tai-lb HTTP pool of {s.connections} connections "
        f"(`block=True`): once with urllib3's own `queue.LifoQueue`, once with `FairQueue`. A "
        "request's time runs from asking the pool for a connection to the end of the body; "
        f"requests that ended in the first {s.warm_s:g} s of a case are not counted, and those "
        "under way at the end finish and count (a thread that waited the whole run counts its "
        "wait). Percentiles "
        "are over every counted request of every round; the per-round p99 / p50 is also shown."
    )


def markdown_report(results: Results) -> str:
    """The Markdown section for RESULTS.md (without its heading)."""
    s = results.settings
    environment = environment_line(f"{s.rounds} rounds in {results.seconds:.0f} s")
    return "\n".join([
        environment, "", method_text(results), "",
        *(f"- {line}" for line in summary_lines(results)), "",
        markdown_table(*rows(results)), "",
        f"Target: with FairQueue, p99 / p50 <= {TARGET_TAIL:g}. Both queues serve the same "
        f"rate ({s.connections} connections / {s.delay_s * 1e3:g} ms); with LifoQueue a thread "
        "that puts a connection back usually takes it again before the waiter it woke, so "
        "some threads run at the backend's speed while others wait for seconds.",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the tables and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(
        __doc__, "a few seconds, one short round (smoke test); no write",
        "seed of the case order", f"the file whose '{SECTION}' section is replaced")
    args = parser.parse_args(argv)
    results = run(QUICK if args.quick else FULL, args.seed, progress=not args.quick)
    print(f"{results.settings.threads} threads on a pool of {results.settings.connections} "
          f"connections to a {results.settings.delay_s * 1e3:g} ms backend")
    publish(args, "--quick: a smoke test; one short round, too few requests for a firm p99",
            summary_lines(results), [rows(results)], markdown_report(results), SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
