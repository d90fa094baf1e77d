"""Generic pool cost: an uncontended borrow and return, side by side with a plain queue.Queue.

::

    python benchmarks/pool.py          # a few seconds; updates "## pool.py" in RESULTS.md
    python benchmarks/pool.py --quick  # under a second; never writes RESULTS.md

One thread, no contention.  Three cases take turns in a shuffled order within each round:
``queue.Queue get/put`` (the floor: a ``queue.Queue`` holding one object, ``get()`` then
``put()``), ``ConnectionPool borrow/return`` (``with pool.connection() as conn:`` on a pool
holding one idle connection, a real socket of a ``socket.socketpair()``) and ``lb.connection()``
(a round-robin pick over 3 endpoints, the borrow and return from that endpoint's pool, and the
lease's release).  Each case runs a batch of iterations timed by ``time.perf_counter()``; the
figure is the median over the rounds of a batch's time per iteration.

Target (printed as PASS/FAIL, never asserted): a ConnectionPool borrow and return <= 20 us.
"""

from __future__ import annotations

import queue
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

from picks import (
    benchmark_parser,
    environment_line,
    interleaved_medians,
    markdown_table,
    publish,
    verdict,
)

import tai_lb
from tai_lb.endpoint import Endpoint

SECTION = "## pool.py"
TARGET_US = 20.0
CASES = ("queue.Queue get/put", "ConnectionPool borrow/return", "lb.connection()")


@dataclass(frozen=True)
class Settings:
    """How big and how long a run is."""

    batch: int  # iterations per timed batch
    rounds: int


FULL = Settings(batch=20_000, rounds=15)
QUICK = Settings(batch=2_000, rounds=3)


def _queue_case() -> tuple[Callable[[int], float], Callable[[], None]]:
    plain: queue.Queue[object] = queue.Queue()
    plain.put(object())

    def timed(batch: int) -> float:
        get, put = plain.get, plain.put
        started = time.perf_counter()
        for _ in range(batch):
            item = get()
            put(item)
        return time.perf_counter() - started

    return timed, lambda: None


def _pool_case() -> tuple[Callable[[int], float], Callable[[], None]]:
    ends: list[socket.socket] = []

    def connect() -> socket.socket:
        mine, theirs = socket.socketpair()
        ends.append(theirs)
        return mine

    pool = tai_lb.ConnectionPool(connect, max_size=4, min_size=1)

    def timed(batch: int) -> float:
        connection = pool.connection
        started = time.perf_counter()
        for _ in range(batch):
            with connection():
                pass
        return time.perf_counter() - started

    def close() -> None:
        pool.close()
        for end in ends:
            end.close()

    return timed, close


def _balancer_case() -> tuple[Callable[[int], float], Callable[[], None]]:
    ends: list[socket.socket] = []

    def connect(endpoint: Endpoint) -> socket.socket:
        mine, theirs = socket.socketpair()  # stands for a connection to ``endpoint``
        ends.append(theirs)
        return mine

    lb = tai_lb.LoadBalancer.from_config({"services": {"db": {
        "endpoints": ["10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"]}}})

    def timed(batch: int) -> float:
        connection = lb.connection
        started = time.perf_counter()
        for _ in range(batch):
            with connection("db", connect):
                pass
        return time.perf_counter() - started

    def close() -> None:
        lb.close()
        for end in ends:
            end.close()

    return timed, close


def run(settings: Settings, seed: int) -> dict[str, float]:
    """Median microseconds per iteration of each case, the cases interleaved over the rounds."""
    return interleaved_medians({"queue.Queue get/put": _queue_case(),
                                "ConnectionPool borrow/return": _pool_case(),
                                "lb.connection()": _balancer_case()},
                               settings.batch, settings.rounds, seed)


def table(figures: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """The results as a header and rows of cells."""
    floor = figures["queue.Queue get/put"]
    header = ["case", "us per borrow and return", "vs queue.Queue", f"<= {TARGET_US:g} us"]
    rows = [[name, f"{figures[name]:.2f}", f"{figures[name] / floor:.1f}",
             verdict(figures[name] <= TARGET_US) if name.startswith("ConnectionPool") else "-"]
            for name in CASES]
    return header, rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the table and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(__doc__, "a smaller, shorter run (smoke test); no write",
                              "seed of the case order",
                              f"the file whose '{SECTION}' section is replaced")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    started = time.monotonic()
    figures = run(settings, args.seed)
    pool_us = figures["ConnectionPool borrow/return"]
    summary = [f"{name}: {figures[name]:.2f} us" for name in CASES] + [
        f"target ConnectionPool borrow and return <= {TARGET_US:g} us: "
        f"{verdict(pool_us <= TARGET_US)}"]
    header, rows = table(figures)
    report = "\n".join([
        environment_line(f"{settings.rounds} rounds in {time.monotonic() - started:.0f} s"),
        "",
        f"One thread, no contention; batches of {settings.batch:,} iterations per case, the "
        "cases interleaved in a shuffled order per round; the median batch's time per "
        "iteration.  The pool holds one idle connection (a socketpair socket); lb.connection() "
        "adds a round-robin pick over 3 endpoints and the lease's release.",
        "",
        *(f"- {line}" for line in summary),
        "",
        markdown_table(header, rows),
    ])
    publish(args, "quick run: fewer, shorter batches; RESULTS.md is not written",
            summary, [(header, rows)], report, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
