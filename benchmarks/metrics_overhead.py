"""Request metrics' cost per request: a pick + lease cycle with metrics off, on, and on with StatsD.

Three balancers over the same 10 endpoints (``round_robin``), measured side by side in
interleaved, shuffled batches over several rounds:

- ``off``: every endpoint's ``figures`` set to None, so nothing is recorded (the cycle as it was
  before request metrics);
- ``on``: the default: each lease's end records its latency bucket and error kind;
- ``on + StatsD``: the same, with the flush thread sending to a UDP socket on 127.0.0.1 every
  half second (a socket that reads nothing: datagrams are dropped by the kernel).

The claim is the median over rounds of each round's ratio ``on / off``::

    python benchmarks/metrics_overhead.py          # about 20 s; updates its RESULTS.md section
    python benchmarks/metrics_overhead.py --quick  # a few seconds; never writes RESULTS.md

Target (printed as PASS/FAIL, never asserted): ``on`` costs at most 1.05 x ``off``.
"""

from __future__ import annotations

import random
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Optional

from picks import (
    benchmark_parser,
    environment_line,
    markdown_table,
    publish,
    verdict,
)

import tai_lb

SECTION = "## metrics_overhead.py"
SERVICE = "svc"
CASES = ("off", "on", "on + StatsD")
TARGET = 1.05  # on / off at most this


def make_balancer(case: str, port: int) -> tai_lb.LoadBalancer:
    """A balancer of 10 endpoints with request metrics as ``case`` says."""
    config: dict[str, object] = {"services": {SERVICE: {
        "endpoints": [f"10.0.0.{i}:80" for i in range(1, 11)], "strategy": "round_robin"}}}
    if case == "on + StatsD":
        config["metrics"] = {"statsd": {"port": port}}
    lb = tai_lb.LoadBalancer.from_config(config)
    for stats in lb.stats(SERVICE).values():
        if case == "off":
            stats.figures = None
    return lb


def batch(lb: tai_lb.LoadBalancer, cycles: int) -> float:
    """Seconds per pick + lease cycle over ``cycles`` cycles."""
    pick = lb.pick
    start = time.perf_counter()
    for _ in range(cycles):
        with pick(SERVICE):
            pass
    return (time.perf_counter() - start) / cycles


def run(rounds: int, batches: int, cycles: int, seed: int) -> dict[str, list[float]]:
    """Per case, the median ns per cycle of each round."""
    rng = random.Random(seed)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    balancers = {case: make_balancer(case, sink.getsockname()[1]) for case in CASES}
    per_round: dict[str, list[float]] = {case: [] for case in CASES}
    try:
        for lb in balancers.values():
            batch(lb, cycles)  # warm-up: routes built, code paths hot
        for _ in range(rounds):
            samples: dict[str, list[float]] = {case: [] for case in CASES}
            order = [case for case in CASES for _ in range(batches)]
            rng.shuffle(order)
            for case in order:
                samples[case].append(batch(balancers[case], cycles))
            for case in CASES:
                per_round[case].append(statistics.median(samples[case]) * 1e9)
    finally:
        for lb in balancers.values():
            lb.close()
        sink.close()
    return per_round


def rows(per_round: dict[str, list[float]]) -> tuple[list[str], list[list[str]]]:
    """One row per case: median ns per cycle and the median per-round ratio to ``off``."""
    off = per_round["off"]
    table = []
    for case in CASES:
        ratio = statistics.median(v / o for v, o in zip(per_round[case], off))
        target = verdict(ratio <= TARGET) if case == "on" else ""
        added = statistics.median(v - o for v, o in zip(per_round[case], off))
        table.append([case, f"{statistics.median(per_round[case]):,.0f}", f"{added:+,.0f}",
                      f"{ratio:.3f}", target])
    return ["metrics", "ns/cycle", "ns added", "x off", f"<= {TARGET:g} x"], table


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the table and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(
        __doc__, "a few seconds, fewer rounds (smoke test); no write",
        "seed of the batch order", f"the file whose '{SECTION}' section is replaced")
    args = parser.parse_args(argv)
    rounds, batches, cycles = (3, 5, 5_000) if args.quick else (9, 10, 20_000)
    began = time.monotonic()
    per_round = run(rounds, batches, cycles, args.seed)
    table = rows(per_round)
    environment = environment_line(f"{rounds} rounds in {time.monotonic() - began:.0f} s")
    method = (f"`with lb.pick(...)` cycles on one thread over 10 endpoints (`round_robin`), in "
              f"{rounds} rounds of {batches} shuffled batches of {cycles:,} cycles per case; "
              "ns/cycle is the median over rounds of each round's median batch, `x off` the "
              "median over rounds of that round's ratio to `off`. `off` records nothing; `on` "
              "records each request's latency bucket and error kind under the endpoint's lock; "
              "`on + StatsD` also runs the flush thread, sending to a UDP socket on loopback.")
    summary = [f"{row[0]}: {row[1]} ns per cycle, {row[3]} x off" for row in table[1]]
    report = "\n".join([environment, "", method, "", markdown_table(*table), "",
                        f"Target: request metrics on cost at most {TARGET:g} x off per cycle. "
                        "The cycle is bare (no I/O): the nanoseconds added are the figure to "
                        "weigh against a request (see picks.py's raw loopback GET)."])
    publish(args, "--quick: a smoke test; few rounds, noisy", summary, [table], report, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
