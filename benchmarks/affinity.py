"""Session affinity's cost: a hit side by side with a plain pick, and the memory of its table.

::

    python benchmarks/affinity.py          # under a minute; updates "## affinity.py" in RESULTS.md
    python benchmarks/affinity.py --quick  # a few seconds; never writes RESULTS.md

One thread, no contention, 10 endpoints, ``round_robin``.  Two cases take turns in a shuffled
order within each round: ``plain pick`` (``with lb.pick(service, key):`` on a service without
affinity) and ``affinity hit`` (the same on a service with ``affinity``, every key already
pinned).  Each case runs a batch of picks over 1,000 keys, timed by ``time.perf_counter()``; the
figure is the median over the rounds of a batch's time per pick.  Then a service's table is
filled with distinct keys through ``lb.pick()`` under ``tracemalloc``: the memory it holds
(keys included) per million entries.

Targets (printed as PASS/FAIL, never asserted): a hit <= 2 x a plain pick; 1,000,000 entries
<= 200 MB.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
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

SECTION = "## affinity.py"
TARGET_RATIO = 2.0
TARGET_MB = 200.0
CASES = ("plain pick", "affinity hit")
ENDPOINTS = [f"10.0.0.{i}:80" for i in range(1, 11)]
KEYS = [f"user-{i}" for i in range(1000)]


@dataclass(frozen=True)
class Settings:
    """How big and how long a run is."""

    batch: int  # picks per timed batch
    rounds: int
    entries: int  # keys pinned for the memory figure


FULL = Settings(batch=20_000, rounds=15, entries=1_000_000)
QUICK = Settings(batch=2_000, rounds=3, entries=50_000)


def _balancer(affinity: bool, max_entries: int = 100_000) -> tai_lb.LoadBalancer:
    service: dict[str, object] = {"endpoints": ENDPOINTS}
    if affinity:
        service["affinity"] = {"key": "user_id", "max_entries": max_entries}
    return tai_lb.LoadBalancer.from_config({"services": {"svc": service}})


def _case(affinity: bool) -> tuple[Callable[[int], float], Callable[[], None]]:
    lb = _balancer(affinity)
    for key in KEYS:  # every key pinned: the timed picks are hits
        with lb.pick("svc", key):
            pass

    def timed(batch: int) -> float:
        pick, keys = lb.pick, KEYS
        started = time.perf_counter()
        for i in range(batch):
            with pick("svc", keys[i % 1000]):
                pass
        return time.perf_counter() - started

    return timed, lb.close


def run(settings: Settings, seed: int) -> dict[str, float]:
    """Median microseconds per pick of each case, the cases interleaved over the rounds."""
    return interleaved_medians({"plain pick": _case(False), "affinity hit": _case(True)},
                               settings.batch, settings.rounds, seed)


def table_memory(entries: int) -> float:
    """Megabytes per million entries held by a table filled with ``entries`` distinct keys."""
    lb = _balancer(True, max_entries=entries)
    try:
        with lb.pick("svc", "warm-up"):  # the route, the thread: not the table's
            pass
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        pick = lb.pick
        for i in range(entries):
            with pick("svc", f"user-{i}"):
                pass
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        figures = lb.status()["services"]["svc"]["affinity"]
        assert figures["entries"] == entries, figures
    finally:
        lb.close()
    return held / 1e6 * (1_000_000 / entries)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the table and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(__doc__, "a smaller, shorter run (smoke test); no write",
                              "seed of the case order",
                              f"the file whose '{SECTION}' section is replaced")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    started = time.monotonic()
    figures = run(settings, args.seed)
    megabytes = table_memory(settings.entries)
    ratio = figures["affinity hit"] / figures["plain pick"]
    summary = [f"{name}: {figures[name]:.2f} us" for name in CASES] + [
        f"target affinity hit <= {TARGET_RATIO:g} x a plain pick: {ratio:.2f} x, "
        f"{verdict(ratio <= TARGET_RATIO)}",
        f"target 1,000,000 entries <= {TARGET_MB:g} MB: {megabytes:.0f} MB "
        f"(measured over {settings.entries:,}), {verdict(megabytes <= TARGET_MB)}"]
    header = ["case", "us per pick", "vs plain pick", f"<= {TARGET_RATIO:g} x"]
    rows = [[name, f"{figures[name]:.2f}", f"{figures[name] / figures['plain pick']:.2f}",
             verdict(ratio <= TARGET_RATIO) if name == "affinity hit" else "-"]
            for name in CASES]
    report = "\n".join([
        environment_line(f"{settings.rounds} rounds in {time.monotonic() - started:.0f} s"),
        "",
        f"One thread, no contention, 10 endpoints, round_robin; batches of {settings.batch:,} "
        "picks over 1,000 keys per case, the cases interleaved in a shuffled order per round; "
        "the median batch's time per pick.  Memory: tracemalloc over a table filled with "
        f"{settings.entries:,} distinct keys through lb.pick(), keys included.",
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
