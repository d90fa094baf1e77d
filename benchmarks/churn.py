"""Pick times under churn: 10,000 endpoints, a tenth replaced every 250 ms, 8 threads picking.

A route is built off the request path, on the thread that changed the registry, and published
whole; a pick goes on with the last published route meanwhile (see docs/architecture.rst).  This
script measures what a pick costs while that happens, against the same run with no churn::

    python benchmarks/churn.py          # about half a minute; updates "## churn.py"
    python benchmarks/churn.py --quick  # a few seconds; never writes RESULTS.md

For each strategy, two cases take turns in a shuffled order within each round: ``steady`` (no
change) and ``churn`` (a writer thread calls ``set_endpoints()`` every 250 ms with a tenth of the
10,000 endpoints replaced by new addresses).  8 threads pick for the whole case; after each pick
a thread sleeps 0.2 ms, as a request thread would wait for its network I/O (without it, 8
threads that never release the GIL measure the interpreter's switch interval, not the
balancer).  A pick's time is ``lb.pick()`` and ``lease.done()``, by ``time.perf_counter()``.

Target (printed as PASS/FAIL, never asserted): under churn, p99.9 pick time <= 5 ms for every
strategy measured.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from picks import (
    benchmark_parser,
    environment_line,
    markdown_table,
    publish,
    verdict,
)

import tai_lb

SECTION = "## churn.py"
STRATEGIES = ("round_robin", "consistent_hash")
TARGET_MS = 5.0


@dataclass(frozen=True)
class Settings:
    """How big and how long a run is."""

    endpoints: int
    share: float  # of the endpoints replaced by each change
    every: float  # seconds between changes
    threads: int
    seconds: float  # per case
    rounds: int
    pause: float  # seconds a picker sleeps after each pick


FULL = Settings(endpoints=10_000, share=0.1, every=0.25, threads=8, seconds=3.0, rounds=3,
                pause=0.0002)
QUICK = Settings(endpoints=2_000, share=0.1, every=0.25, threads=4, seconds=0.6, rounds=1,
                 pause=0.0002)


def addresses(start: int, count: int) -> list[str]:
    """``count`` distinct loopback-range addresses from number ``start`` on (never dialled)."""
    return [f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}:8080"
            for n in range(start + 1, start + count + 1)]


def run_case(settings: Settings, strategy: str, churn: bool) -> tuple[list[float], int]:
    """Pick times in seconds of one case, and how many changes were applied."""
    registry = tai_lb.ServiceRegistry()
    live = addresses(0, settings.endpoints)
    registry.set_endpoints("users", live)
    lb = tai_lb.LoadBalancer(registry, strategy=strategy)
    lb.pick("users", key="warm").done()  # the first route: built before timing starts
    stop = threading.Event()
    times: list[list[float]] = [[] for _ in range(settings.threads)]
    changes = 0

    def pick(index: int) -> None:
        mine = times[index]
        clock, pause = time.perf_counter, settings.pause
        n = 0
        while not stop.is_set():
            n += 1
            start = clock()
            lb.pick("users", key=f"user-{index}-{n}").done()
            mine.append(clock() - start)
            time.sleep(pause)

    def write() -> None:
        nonlocal changes, live
        rng = random.Random(7)
        next_address = settings.endpoints
        count = int(settings.endpoints * settings.share)
        while not stop.wait(settings.every):
            gone = set(rng.sample(range(len(live)), count))
            kept = [a for i, a in enumerate(live) if i not in gone]
            live = kept + addresses(next_address, count)
            next_address += count
            registry.set_endpoints("users", live)
            changes += 1

    threads = [threading.Thread(target=pick, args=(i,)) for i in range(settings.threads)]
    if churn:
        threads.append(threading.Thread(target=write))
    for thread in threads:
        thread.start()
    time.sleep(settings.seconds)
    stop.set()
    for thread in threads:
        thread.join()
    lb.close()
    return [t for mine in times for t in mine], changes


def percentile(values: Sequence[float], share: float) -> float:
    """The value below which ``share`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(share * len(ordered) + 0.5) - 1))]


@dataclass
class Row:
    """The figures of one strategy and case over every round."""

    strategy: str
    case: str
    picks: int
    changes: int
    p50: float
    p99: float
    p999: float
    longest: float


def run(settings: Settings, seed: int) -> list[Row]:
    """Every strategy and case, interleaved over the rounds."""
    rng = random.Random(seed)
    samples: dict[tuple[str, str], list[float]] = {}
    changes: dict[tuple[str, str], int] = {}
    for _ in range(settings.rounds):
        cases = [(s, c) for s in STRATEGIES for c in ("steady", "churn")]
        rng.shuffle(cases)
        for strategy, case in cases:
            found, made = run_case(settings, strategy, case == "churn")
            samples.setdefault((strategy, case), []).extend(found)
            changes[(strategy, case)] = changes.get((strategy, case), 0) + made
    rows = []
    for strategy in STRATEGIES:
        for case in ("steady", "churn"):
            found = samples[(strategy, case)]
            rows.append(Row(strategy, case, len(found), changes[(strategy, case)],
                            percentile(found, 0.5) * 1000, percentile(found, 0.99) * 1000,
                            percentile(found, 0.999) * 1000, max(found) * 1000))
    return rows


def table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """The results as a header and rows of cells."""
    header = ["strategy", "case", "picks", "changes", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
              "p99.9 vs steady", f"p99.9 <= {TARGET_MS:g} ms"]
    steady = {r.strategy: r for r in rows if r.case == "steady"}
    cells = []
    for r in rows:
        base = steady[r.strategy].p999
        cells.append([r.strategy, r.case, f"{r.picks:,}", str(r.changes), f"{r.p50:.3f}",
                      f"{r.p99:.3f}", f"{r.p999:.3f}", f"{r.longest:.1f}",
                      f"{r.p999 / base:.2f}" if base else "-",
                      verdict(r.p999 <= TARGET_MS) if r.case == "churn" else "-"])
    return header, cells


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the table and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(__doc__, "a smaller, shorter run (smoke test); no write",
                              "seed of the case order",
                              f"the file whose '{SECTION}' section is replaced")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    started = time.monotonic()
    rows = run(settings, args.seed)
    header, cells = table(rows)
    passed = all(r.p999 <= TARGET_MS for r in rows if r.case == "churn")
    summary = [f"{r.strategy} {r.case}: p99.9 {r.p999:.3f} ms, max {r.longest:.1f} ms"
               for r in rows] + [f"target p99.9 <= {TARGET_MS:g} ms under churn: "
                                 f"{verdict(passed)}"]
    report = "\n".join([
        environment_line(f"{settings.rounds} rounds in {time.monotonic() - started:.0f} s"),
        "",
        f"{settings.endpoints:,} endpoints; {settings.threads} threads pick for "
        f"{settings.seconds:g} s per case, sleeping {settings.pause * 1000:g} ms after each pick; "
        f"under churn a writer replaces {settings.share:.0%} of the endpoints every "
        f"{settings.every * 1000:g} ms with set_endpoints(), and the route is built on the "
        "writer's thread while picks go on with the last one.  Cases interleaved in a shuffled "
        "order per round; percentiles over every pick of every round.",
        "",
        *(f"- {line}" for line in summary),
        "",
        markdown_table(header, cells),
    ])
    publish(args, "--quick: a smoke test on a smaller set; no write", summary,
            [(header, cells)], report, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
