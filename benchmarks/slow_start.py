"""Slow start: a new endpoint's share of picks through its window, against its steady share.

::

    python benchmarks/slow_start.py          # about 80 s; updates its section of RESULTS.md
    python benchmarks/slow_start.py --quick  # a few seconds; never writes RESULTS.md

For each strategy (``round_robin``, ``weighted``, ``least_connections``, ``peak_ewma``): a
balancer with 4 endpoints in ``gradual`` mode (``slow_start`` window ``W``, aggression 1,
min_weight_percent 10) on the real clock, so the ``tai-lb-rebalance`` thread rebuilds the route
as it does in service (every ``W / 40``).  A fifth endpoint is registered, then one thread
picks (each lease released at once, recording a latency of 1 ms: equal endpoints) until
``1.2 W`` have passed, counting each pick in its twentieth of the window.  The new endpoint's
share in the first 10% of the window, in the middle tenth, in the window's last 5% and over
``[1.05 W, 1.2 W)`` (the ramp over: its steady share) is measured; the figures are medians
over the rounds, the strategies taking turns in a shuffled order within each round.

Targets (printed as PASS/FAIL, never asserted): share in the first 10% <= 0.15 x the steady
share; in the window's last 5% >= 0.9 x.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from picks import benchmark_parser, environment_line, markdown_table, publish, verdict

import tai_lb

SECTION = "## slow_start.py"
STRATEGIES = ("round_robin", "weighted", "least_connections", "peak_ewma")
OLD = [f"10.0.0.{i}:80" for i in range(1, 5)]
NEW = "10.0.0.9:80"
TARGET_FIRST = 0.15
TARGET_END = 0.9
SLICES = 24  # twentieths of the window, up to 1.2 W
LATENCY = 0.001  # what every lease records: the endpoints are equally fast


@dataclass(frozen=True)
class Settings:
    """How long a run is."""

    window: float  # seconds
    rounds: int


FULL = Settings(window=5.0, rounds=3)
QUICK = Settings(window=0.5, rounds=1)


def ramp(strategy: str, window: float) -> list[tuple[int, int]]:
    """(picks of the new endpoint, all picks) in each twentieth of its window, to 1.2 W."""
    lb = tai_lb.LoadBalancer.from_config({"services": {"svc": {
        "endpoints": OLD, "strategy": strategy, "rebalance": {"mode": "gradual"},
        "slow_start": {"window": window}}}})
    counts = [[0, 0] for _ in range(SLICES)]
    try:
        with lb.pick("svc"):  # the route is built before the clock starts
            pass
        pick, clock = lb.pick, time.monotonic
        lb.registry.register("svc", NEW)
        began = clock()
        width = window / 20
        while True:
            slot = int((clock() - began) / width)
            if slot >= SLICES:
                break
            lease = pick("svc")
            counts[slot][1] += 1
            if lease.address == NEW:
                counts[slot][0] += 1
            lease.done(latency=LATENCY)  # equal endpoints, for peak_ewma
    finally:
        lb.close()
    return [(new, total) for new, total in counts]


def share(counts: list[tuple[int, int]], first: int, last: int) -> float:
    """The new endpoint's share of the picks in twentieths ``first`` to ``last - 1``."""
    new = sum(c[0] for c in counts[first:last])
    total = sum(c[1] for c in counts[first:last])
    return new / total if total else float("nan")


PHASES = (("first 10%", 0, 2), ("middle tenth", 9, 11), ("last 5%", 19, 20))
STEADY = (21, 24)


def run(settings: Settings, seed: int) -> dict[str, dict[str, float]]:
    """Per strategy: the median over the rounds of each phase's share / the steady share, and
    the steady share itself."""
    rng = random.Random(seed)
    ratios: dict[str, dict[str, list[float]]] = {
        s: {name: [] for name in (*(p[0] for p in PHASES), "steady share", "picks")}
        for s in STRATEGIES}
    for _ in range(settings.rounds):
        order = list(STRATEGIES)
        rng.shuffle(order)
        for strategy in order:
            counts = ramp(strategy, settings.window)
            steady = share(counts, *STEADY)
            figures = ratios[strategy]
            for name, first, last in PHASES:
                figures[name].append(share(counts, first, last) / steady)
            figures["steady share"].append(steady)
            figures["picks"].append(sum(c[1] for c in counts))
    return {s: {name: _median(values) for name, values in figures.items()}
            for s, figures in ratios.items()}


def _median(values: list[float]) -> float:
    # A phase with no pick at all (the picking thread descheduled through it) is left out.
    found = [v for v in values if not math.isnan(v)]
    return statistics.median(found) if found else float("nan")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the table and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(__doc__, "a shorter window, one round (smoke test); no write",
                              "seed of the strategies' order",
                              f"the file whose '{SECTION}' section is replaced")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    started = time.monotonic()
    figures = run(settings, args.seed)
    first_ok = all(f["first 10%"] <= TARGET_FIRST for f in figures.values())
    end_ok = all(f["last 5%"] >= TARGET_END for f in figures.values())
    header = ["strategy", "steady share", "first 10% x steady", "middle tenth x steady",
              "last 5% x steady", f"first <= {TARGET_FIRST:g}", f"end >= {TARGET_END:g}",
              "picks"]
    rows = [[s, f"{f['steady share']:.3f}", f"{f['first 10%']:.3f}", f"{f['middle tenth']:.3f}",
             f"{f['last 5%']:.3f}", verdict(f["first 10%"] <= TARGET_FIRST),
             verdict(f["last 5%"] >= TARGET_END), f"{f['picks']:,.0f}"]
            for s, f in figures.items()]
    summary = [
        f"target share in the first 10% of the window <= {TARGET_FIRST:g} x steady: "
        f"largest {max(f['first 10%'] for f in figures.values()):.3f} x, {verdict(first_ok)}",
        f"target share in the window's last 5% >= {TARGET_END:g} x steady: "
        f"smallest {min(f['last 5%'] for f in figures.values()):.3f} x, {verdict(end_ok)}"]
    report = "\n".join([
        environment_line(f"{settings.rounds} rounds in {time.monotonic() - started:.0f} s"),
        "",
        f"4 endpoints, gradual mode, a fifth endpoint added; slow_start window "
        f"{settings.window:g} s (aggression 1, min_weight_percent 10) on the real clock, the "
        "route rebuilt by the tai-lb-rebalance thread every window / 40; one thread picks and "
        "releases (recording 1 ms: equal endpoints) until 1.2 windows have passed.  The new "
        "endpoint's share in each phase over its share in [1.05, 1.2) windows (steady); "
        "medians over the rounds, the strategies in a shuffled order per round.  Its weight is "
        "1 x the factor against 4 for the others, so the formula gives 5f / (4 + f) x steady: "
        "0.12 in the first 10%, 0.56 in the middle tenth and 0.96 to 1 in the last 5% (the "
        "route lags by up to window / 40).",
        "",
        *(f"- {line}" for line in summary),
        "",
        markdown_table(header, rows),
    ])
    publish(args, "quick run: a shorter window, one round; RESULTS.md is not written",
            summary, [(header, rows)], report, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
