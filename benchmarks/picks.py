"""Cost of one pick + lease cycle for every strategy, next to a raw loopback HTTP GET.

Measures ``with lb.pick(service, key=...) as lease: pass`` for each strategy of
:data:`tai_lb.strategies.STRATEGIES` over 1, 10, 100 and 1,000 endpoints, on one thread and on
32 threads at once, and a keep-alive ``http.client`` GET to a threaded ``http.server`` on
127.0.0.1, all in the same run.  Machines are shared and noisy, so every figure comes from
batches that are interleaved (in a shuffled order) over several rounds, and the claims are medians
over rounds and ratios of figures taken side by side in the same round::

    python benchmarks/picks.py            # about 2-4 minutes; updates "## picks.py" in RESULTS.md
    python benchmarks/picks.py --quick    # a few seconds, fewer sizes; never writes RESULTS.md

Targets (printed as PASS/FAIL columns, never asserted): a cycle costs at most 0.02 x a raw GET;
1,000 endpoints cost at most 1.5 x 10 endpoints; 32 threads together pick at least 0.8 x as fast
as one thread.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import http.client
import http.server
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import tai_lb
from tai_lb.strategies import STRATEGIES, RoutingKey

SERVICE = "svc"
HASHED = "consistent_hash"  # the one strategy that gets a routing key
SECTION = "## picks.py"
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_HEADER = (
    "# tai-lb benchmark results\n\n"
    "Each section is written by the script it is named after (`python benchmarks/<name>`); a run\n"
    "replaces only its own section.  Figures are medians over interleaved rounds and ratios\n"
    "measured side by side in one run on one machine; absolute times are for context only.\n"
)

TARGET_GET_SHARE = 0.02  # cycle <= 0.02 x raw GET
TARGET_SIZE_GROWTH = 1.5  # 1,000-endpoint cycle <= 1.5 x 10-endpoint cycle
TARGET_SCALING = 0.8  # 32-thread aggregate >= 0.8 x one thread


@dataclass(frozen=True)
class Settings:
    """How much to measure."""

    sizes: tuple[int, ...]
    rounds: int
    threads: int
    batch_s: float  # wanted duration of one timed batch, single- or multi-threaded
    get_batch: int  # raw GETs per batch
    min_batch: int
    max_batch: int


FULL = Settings(sizes=(1, 10, 100, 1000), rounds=17, threads=32, batch_s=0.06,
                get_batch=200, min_batch=500, max_batch=200_000)
QUICK = Settings(sizes=(1, 10, 1000), rounds=3, threads=32, batch_s=0.008,
                 get_batch=40, min_batch=100, max_batch=5_000)


# -- loopback HTTP server and raw client ---------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a two-byte body on a kept-alive HTTP/1.1 connection."""

    protocol_version = "HTTP/1.1"
    body = b"ok"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _NoDelayServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server whose accepted sockets send at once (no Nagle + delayed ACK)."""

    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, object]:
        conn, address = super().get_request()
        # Without this, each keep-alive response waits about 40 ms for the client's delayed ACK.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address


class LoopbackHTTP:
    """A loopback server on an ephemeral port and one kept-alive client connection to it."""

    def __init__(self) -> None:
        self.server = _NoDelayServer(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="picks-http",
                                       daemon=True)
        self.thread.start()
        host, port = self.server.server_address[:2]
        self.conn = http.client.HTTPConnection(str(host), int(port), timeout=10)
        self.conn.connect()
        assert self.conn.sock is not None
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_batch(self, count: int) -> float:
        """Seconds per GET over ``count`` GETs on the kept-alive connection."""
        conn = self.conn
        start = time.perf_counter()
        for _ in range(count):
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
        elapsed = time.perf_counter() - start
        if conn.sock is None:  # http.client reconnected: the figure includes a handshake
            raise RuntimeError("the loopback connection was not kept alive")
        return elapsed / count

    def close(self) -> None:
        """Close the client, then stop the server."""
        self.conn.close()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# -- picks -------------------------------------------------------------------------------------


def endpoint_addresses(count: int) -> list[str]:
    """``count`` distinct addresses ``10.x.y.z:80``."""
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:80" for i in range(count)]


def make_registry(size: int) -> tai_lb.ServiceRegistry:
    """A registry holding one service with ``size`` endpoints."""
    registry = tai_lb.ServiceRegistry()
    registry.register_many(SERVICE, endpoint_addresses(size))
    return registry


def routing_keys(strategy: str, count: int) -> list[Optional[RoutingKey]]:
    """The keys a batch picks with: varying strings for consistent_hash, else None."""
    if strategy == HASHED:
        return [f"user-{i}" for i in range(count)]
    return [None] * count


def prepare_seconds(registry: tai_lb.ServiceRegistry, strategy: str) -> float:
    """Seconds of the first pick of a fresh balancer, which builds its route (ring, sequence)."""
    lb = tai_lb.LoadBalancer(registry, strategy=strategy)
    start = time.perf_counter()
    with lb.pick(SERVICE, key="prepare"):
        pass
    elapsed = time.perf_counter() - start
    lb.close()
    return elapsed


def cycle_batch(lb: tai_lb.LoadBalancer, keys: Sequence[Optional[RoutingKey]]) -> float:
    """Seconds per pick + lease cycle over one pass of ``keys``."""
    pick = lb.pick
    start = time.perf_counter()
    for key in keys:
        with pick(SERVICE, key=key):
            pass
    return (time.perf_counter() - start) / len(keys)


def threaded_batch(lb: tai_lb.LoadBalancer, keys: Sequence[Optional[RoutingKey]],
                   threads: int) -> float:
    """Aggregate cycles per second of ``threads`` threads each running one pass of ``keys``.

    The threads are released together by a barrier; the wall time runs from the first thread's
    start to the last thread's end, so thread creation is not counted.
    """
    barrier = threading.Barrier(threads)
    starts = [0.0] * threads
    ends = [0.0] * threads
    pick = lb.pick

    def work(index: int) -> None:
        barrier.wait()
        starts[index] = time.perf_counter()
        for key in keys:
            with pick(SERVICE, key=key):
                pass
        ends[index] = time.perf_counter()

    workers = [threading.Thread(target=work, args=(i,), name=f"picks-{i}", daemon=True)
               for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return threads * len(keys) / (max(ends) - min(starts))


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Case:
    """One strategy over one endpoint count, and what was measured of it round by round."""

    strategy: str
    size: int
    lb: tai_lb.LoadBalancer
    keys: list[Optional[RoutingKey]] = field(default_factory=list)
    thread_keys: list[Optional[RoutingKey]] = field(default_factory=list)
    prepare_s: list[float] = field(default_factory=list)
    cycle_s: list[float] = field(default_factory=list)  # one thread, seconds per cycle
    get_ratio: list[float] = field(default_factory=list)  # cycle / raw GET, same round
    aggregate: list[float] = field(default_factory=list)  # all threads, cycles per second
    scaling: list[float] = field(default_factory=list)  # aggregate / one-thread rate, same round


@dataclass
class Results:
    """Everything one run measured."""

    settings: Settings
    get_s: list[float]
    cases: dict[tuple[str, int], Case]
    size_growth: dict[str, list[float]]  # per strategy: largest / 10-endpoint cycle, by round
    seconds: float


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def run(settings: Settings, seed: int, progress: bool) -> Results:
    """Measure every case in interleaved rounds and return the figures."""
    began = time.perf_counter()
    rng = random.Random(seed)
    registries = {size: make_registry(size) for size in settings.sizes}
    cases: dict[tuple[str, int], Case] = {}
    for strategy in STRATEGIES:
        for size in settings.sizes:
            lb = tai_lb.LoadBalancer(registries[size], strategy=strategy)
            with lb.pick(SERVICE, key="warm"):  # builds the route: excluded from the cycle
                pass
            cases[strategy, size] = Case(strategy, size, lb)

    http_pair = LoopbackHTTP()
    try:
        # Warm up and size the batches so each takes about settings.batch_s.
        http_pair.get_batch(settings.get_batch)
        for case in cases.values():
            probe = cycle_batch(case.lb, routing_keys(case.strategy, settings.min_batch))
            count = int(settings.batch_s / probe)
            count = max(settings.min_batch, min(settings.max_batch, count))
            case.keys = routing_keys(case.strategy, count)
            case.thread_keys = case.keys[:max(20, count // settings.threads)]
            threaded_batch(case.lb, case.thread_keys[:10], settings.threads)

        get_s: list[float] = []
        order = list(cases.values())
        for number in range(1, settings.rounds + 1):
            rng.shuffle(order)
            gc.collect()
            # The raw GET is timed at the start, middle and end of the round, so a slow spell
            # during the round moves the baseline as it moves the picks.
            gets = [http_pair.get_batch(settings.get_batch)]
            round_cycles: dict[tuple[str, int], float] = {}
            for position, case in enumerate(order):
                if position == len(order) // 2:
                    gets.append(http_pair.get_batch(settings.get_batch))
                case.prepare_s.append(prepare_seconds(registries[case.size], case.strategy))
                gc.collect()
                cycle = cycle_batch(case.lb, case.keys)
                gc.collect()
                aggregate = threaded_batch(case.lb, case.thread_keys, settings.threads)
                case.cycle_s.append(cycle)
                case.aggregate.append(aggregate)
                case.scaling.append(aggregate * cycle)
                round_cycles[case.strategy, case.size] = cycle
            gets.append(http_pair.get_batch(settings.get_batch))
            get = statistics.median(gets)
            get_s.append(get)
            for case in order:
                case.get_ratio.append(round_cycles[case.strategy, case.size] / get)
            if progress:
                print(f"round {number}/{settings.rounds}: raw GET {get * 1e6:.0f} us, "
                      f"{time.perf_counter() - began:.0f} s so far", file=sys.stderr, flush=True)
    finally:
        http_pair.close()
        for case in cases.values():
            case.lb.close()

    size_growth: dict[str, list[float]] = {}
    largest = max(settings.sizes)
    if 10 in settings.sizes and largest > 10:
        for strategy in STRATEGIES:
            big, small = cases[strategy, largest], cases[strategy, 10]
            size_growth[strategy] = [b / s for b, s in zip(big.cycle_s, small.cycle_s)]
    return Results(settings, get_s, cases, size_growth, time.perf_counter() - began)


# -- reporting ---------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


def cycle_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: one row per strategy and endpoint count."""
    threads = results.settings.threads
    header = ["strategy", "endpoints", "prepare ms", "1-thread ns/cycle", "x raw GET",
              f"<= {TARGET_GET_SHARE} x GET", f"{threads}-thread picks/s", "x 1-thread",
              f">= {TARGET_SCALING} x"]
    rows: list[list[str]] = []
    for case in results.cases.values():
        get_ratio = median(case.get_ratio)
        scaling = median(case.scaling)
        rows.append([
            case.strategy,
            f"{case.size:,}",
            f"{median(case.prepare_s) * 1e3:.2f}",
            f"{median(case.cycle_s) * 1e9:,.0f}",
            f"{get_ratio:.4f}",
            verdict(get_ratio <= TARGET_GET_SHARE),
            f"{median(case.aggregate):,.0f}",
            f"{scaling:.2f}",
            verdict(scaling >= TARGET_SCALING),
        ])
    return header, rows


def growth_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the endpoint-count table: largest over 10 endpoints per strategy."""
    largest = max(results.settings.sizes)
    header = ["strategy", "10 ns/cycle", f"{largest:,} ns/cycle", f"{largest:,} / 10",
              f"<= {TARGET_SIZE_GROWTH} x"]
    rows: list[list[str]] = []
    for strategy, ratios in results.size_growth.items():
        growth = median(ratios)
        rows.append([
            strategy,
            f"{median(results.cases[strategy, 10].cycle_s) * 1e9:,.0f}",
            f"{median(results.cases[strategy, largest].cycle_s) * 1e9:,.0f}",
            f"{growth:.2f}",
            verdict(growth <= TARGET_SIZE_GROWTH),
        ])
    return header, rows


def _numeric(cell: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,]*\.?\d+", cell))


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width text table; numbers right-aligned."""
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w)
                         for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths),
                      *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; numeric columns right-aligned."""
    aligns = ["---:" if rows and all(_numeric(r[i]) for r in rows) else "---"
              for i in range(len(header))]
    return "\n".join([
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(aligns) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
    ])


def summary_lines(results: Results) -> list[str]:
    """Counts of passing rows per target, and the baseline."""
    cases = list(results.cases.values())
    get_pass = sum(median(c.get_ratio) <= TARGET_GET_SHARE for c in cases)
    scale_pass = sum(median(c.scaling) >= TARGET_SCALING for c in cases)
    growth_pass = sum(median(r) <= TARGET_SIZE_GROWTH for r in results.size_growth.values())
    get = median(results.get_s)
    lines = [
        f"Raw keep-alive GET to the loopback server: median {get * 1e6:.1f} us "
        f"(range over rounds {min(results.get_s) * 1e6:.1f}-{max(results.get_s) * 1e6:.1f} us); "
        f"{TARGET_GET_SHARE} x GET = {TARGET_GET_SHARE * get * 1e9:,.0f} ns.",
        f"Cycle <= {TARGET_GET_SHARE} x raw GET: {get_pass} of {len(cases)} rows pass.",
        f"{results.settings.threads}-thread aggregate >= {TARGET_SCALING} x one thread: "
        f"{scale_pass} of {len(cases)} rows pass.",
    ]
    if results.size_growth:
        lines.append(f"{max(results.settings.sizes):,}-endpoint cycle <= {TARGET_SIZE_GROWTH} x "
                     f"10-endpoint cycle: {growth_pass} of {len(results.size_growth)} "
                     "strategies pass.")
    return lines


def method_text(results: Results) -> str:
    """The method, in two sentences."""
    s = results.settings
    return (
        f"In each of {s.rounds} rounds every strategy x endpoint-count case (in a shuffled order) "
        f"timed one batch of `with lb.pick(...)` cycles on one thread and one batch on {s.threads} "
        "threads released by a barrier, on a balancer whose route was built beforehand, and "
        f"batches of {s.get_batch} keep-alive `http.client` GETs to a threaded `http.server` on "
        "127.0.0.1 (TCP_NODELAY both ends, same process) were timed at the start, middle and end "
        "of the round. "
        "Per-op times are batch time / count; the tables give medians over rounds, and each "
        "ratio is the median over rounds of that round's own ratio (cycle / that round's GET, "
        f"{s.threads}-thread rate / that round's one-thread rate, 1,000 / 10 endpoints), so "
        "slow spells on this shared machine cancel out."
    )


def find_program(name: str) -> Optional[str]:
    """The path of ``name`` on PATH or in the sbin directories (often not on a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def ensure_programs(packages: dict[str, str], script: str) -> list[str]:
    """The paths of the programs named by ``packages`` (program -> Debian package), installing
    the missing packages with apt-get first (which needs root)."""
    missing = [package for program, package in packages.items() if find_program(program) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            sys.exit(f"{script} needs the Debian packages {' and '.join(missing)}; install them "
                     f"(apt-get install {' '.join(missing)}) or run as root")
        print(f"installing {', '.join(missing)} with apt-get", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    paths = [find_program(program) for program in packages]
    found = [path for path in paths if path is not None]
    if len(found) != len(paths):
        sys.exit(f"{script}: {', '.join(packages)} still missing after apt-get install")
    return found


def source_revision() -> str:
    """The measured tai_lb's git commit, marked when tai_lb/ has uncommitted changes."""
    root = Path(tai_lb.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tai_lb"], cwd=root,
                               check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return f"commit {commit}" + (" + uncommitted changes to tai_lb/" if dirty.strip() else "")


def environment_line(run: str, *versions: str) -> str:
    """The first line of every RESULTS.md section: the date, Python, this machine, the other
    ``versions`` that matter (``"requests 2.34.2"``), the measured tai-lb's commit, then ``run``
    (what ran, and for how long)."""
    return "; ".join([
        f"{datetime.date.today().isoformat()}; Python {platform.python_version()} "
        f"({platform.python_implementation()}), {os.cpu_count()} cores "
        f"({platform.machine()}, {platform.system()})",
        *versions, f"tai-lb {tai_lb.__version__} ({source_revision()})", run]) + "."


def markdown_report(results: Results) -> str:
    """The Markdown section for RESULTS.md (without its heading)."""
    s = results.settings
    parts = [
        environment_line(f"{s.rounds} rounds in {results.seconds:.0f} s"),
        "",
        method_text(results),
        "",
        *(f"- {line}" for line in summary_lines(results)),
        "",
        markdown_table(*cycle_rows(results)),
        "",
        markdown_table(*growth_rows(results)),
        "",
        "Targets: cycle <= 0.02 x raw GET; 1,000-endpoint cost <= 1.5 x 10-endpoint cost; "
        f"{s.threads}-thread aggregate >= 0.8 x one thread.  `prepare ms` is the first pick of a "
        "fresh balancer (route, hash ring or weighted sequence built), excluded from the cycle.",
    ]
    return "\n".join(parts)


def write_section(path: Path, body: str, heading: str = SECTION) -> None:
    """Put ``body`` under ``heading`` in ``path``, replacing only that section.

    Every benchmark script writes its own section of RESULTS.md through this function.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    section = f"{heading}\n\n{body.rstrip()}\n"
    # The section runs to the next second-level heading or the end of the file.
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text, encoding="utf-8")


TimedCase = tuple[Callable[[int], float], Callable[[], None]]
"""A case of an interleaved benchmark: ``time(n)`` (seconds for n iterations) and ``close()``."""


def interleaved_medians(cases: dict[str, TimedCase], batch: int, rounds: int,
                        seed: int) -> dict[str, float]:
    """Median microseconds per iteration of each case: every case warmed up, then the cases
    taking turns in a shuffled order in each round (these machines are shared and noisy), and
    closed at the end whatever happens."""
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for timed, _close in cases.values():
            timed(max(1, batch // 10))  # warm up
        for _ in range(rounds):
            order = list(cases)
            rng.shuffle(order)
            for name in order:
                samples[name].append(cases[name][0](batch) / batch * 1e6)
    finally:
        for _timed, close in cases.values():
            close()
    return {name: statistics.median(found) for name, found in samples.items()}


def benchmark_parser(doc: Optional[str], quick_help: str, seed_help: str,
                     results_help: str) -> argparse.ArgumentParser:
    """The arguments every benchmark script takes: --quick, --no-write, --results, --seed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help=results_help)
    parser.add_argument("--seed", type=int, default=1, help=seed_help)
    return parser


def publish(args: argparse.Namespace, quick_note: str, summary: Sequence[str],
            tables: Sequence[tuple[list[str], list[list[str]]]], report: str,
            heading: str) -> None:
    """Print a run (its summary, its tables as plain text, then its Markdown) and, unless it
    was quick or told not to, put the Markdown under ``heading`` in the results file."""
    if args.quick:
        print(quick_note)
    print()
    for line in summary:
        print(line)
    print()
    for table in tables:
        print(plain_table(*table))
        print()
    print(report)
    if not (args.quick or args.no_write):
        write_section(args.results, report, heading)
        print(f"\nupdated the '{heading}' section of {args.results}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the tables and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(
        __doc__, "a few seconds with fewer sizes and rounds (smoke test); no write",
        "seed of the case order", f"the file whose '{SECTION}' section is replaced")
    parser.add_argument("--rounds", type=int, help="number of interleaved rounds")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        settings = Settings(**{**settings.__dict__, "rounds": args.rounds})
    results = run(settings, args.seed, progress=not args.quick)

    print("pick + lease cycle vs raw keep-alive GET (medians over rounds; ratios per round)")
    tables = [cycle_rows(results)] + ([growth_rows(results)] if results.size_growth else [])
    # Waking 32 threads from a barrier takes about 2 ms here, as long as a whole quick batch.
    publish(args, "--quick: a smoke test; its batches are too short for the ratios to mean much",
            summary_lines(results), tables, markdown_report(results), SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
