"""Zone-aware routing and subsets: the share kept local as the local zone fails, and the pick cost.

::

    python benchmarks/locality.py          # under a minute; updates "## locality.py" in RESULTS.md
    python benchmarks/locality.py --quick  # a few seconds; never writes RESULTS.md

**Spill-over.** Three zones of 4, 6 and 5 endpoints, the balancer in the first.  The local
zone's endpoints fail one by one (a function health check on the checker's thread; each step
waits for the route to show the new health); at each step ``lb.pick()`` runs from 4 threads and
the share of picks landing in the local zone is compared with the ideal computed from the
capacities alone: ``min(1, (healthy local / healthy) / (local / all))``, Envoy's rule.  Its
standard error at this many picks is printed beside it.

**Pick cost.** One thread, no contention, 30 endpoints (3 zones x 2 versions), ``round_robin``.
Three cases take turns in a shuffled order within each round: ``plain pick`` (``with
lb.pick(service):`` on a service with neither key), ``zone aware`` (``locality`` with a
``caller_distribution`` that makes it spill, so the draw chooses among zones) and ``zone aware
+ subset`` (the same and a ``subset`` rule by version, each pick in a routing context asking for
version 2, itself zone-aware).  The figure is the median over the rounds of a batch's time per
pick.

Targets (printed as PASS/FAIL, never asserted): the local share within 5 percentage points of
the ideal at every step; a pick with zone awareness and a subset rule <= 1.5 x a plain pick.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from picks import (
    benchmark_parser,
    environment_line,
    interleaved_medians,
    markdown_table,
    publish,
    verdict,
)

import tai_lb
from tai_lb.context import routing_context

SECTION = "## locality.py"
TARGET_POINTS = 5.0
TARGET_RATIO = 1.5
ZONES = {"a": 4, "b": 6, "c": 5}
CASES = ("plain pick", "zone aware", "zone aware + subset")


@dataclass(frozen=True)
class Settings:
    """How big and how long a run is."""

    picks: int  # picks per spill-over step
    batch: int  # picks per timed batch
    rounds: int


FULL = Settings(picks=40_000, batch=20_000, rounds=15)
QUICK = Settings(picks=4_000, batch=2_000, rounds=3)


def _endpoints(versions: Sequence[str] = ("1",)) -> list[dict[str, Any]]:
    return [{"address": f"10.{v}.{z}.{i}:80", "zone": zone, "version": version}
            for v, version in enumerate(versions)
            for z, (zone, count) in enumerate(ZONES.items()) for i in range(count)]


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("the route did not show the new health in time")
        time.sleep(0.005)


def _local_share(lb: tai_lb.LoadBalancer, picks: int, threads: int = 4) -> float:
    counts: collections.Counter[Optional[str]] = collections.Counter()
    lock = threading.Lock()

    def run() -> None:
        mine: collections.Counter[Optional[str]] = collections.Counter()
        for _ in range(picks // threads):
            with lb.pick("svc") as lease:
                mine[lease.endpoint.zone] += 1
        with lock:
            counts.update(mine)

    workers = [threading.Thread(target=run, name=f"bench-picker-{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return counts["a"] / sum(counts.values())


def spill_steps(picks: int) -> list[tuple[int, float, float]]:
    """(local endpoints failed, ideal local share, measured local share) per step."""
    down: set[str] = set()
    checks = tai_lb.HealthCheckConfig(type="function", function=lambda e: e.address not in down,
                                      interval=0.01, jitter=0.0, healthy_threshold=1,
                                      unhealthy_threshold=1)
    endpoints = _endpoints()
    lb = tai_lb.LoadBalancer(config=tai_lb.LoadBalancerConfig({"svc": tai_lb.ServiceConfig(
        endpoints=tuple(tai_lb.Endpoint.from_value(e) for e in endpoints),
        locality=tai_lb.LocalityConfig(), health_check=checks)}, zone="a"))
    local = [e["address"] for e in endpoints if e["zone"] == "a"]
    total = len(endpoints)
    steps = []
    try:
        for failed in range(len(local) + 1):
            down.update(local[:failed])
            _wait(lambda f=failed: lb.status()["services"]["svc"][  # type: ignore[misc]
                "endpoints_pickable"] == total - f)
            healthy_local, healthy = len(local) - failed, total - failed
            ideal = min(1.0, (healthy_local / healthy) / (len(local) / total))
            steps.append((failed, ideal, _local_share(lb, picks)))
    finally:
        lb.close()
    return steps


def _case(locality: bool, subset: bool) -> tuple[Callable[[int], float], Callable[[], None]]:
    service: dict[str, Any] = {"endpoints": _endpoints(("1", "2"))}
    if locality:  # the callers crowd zone a: it keeps about half and spills the rest
        service["locality"] = {"caller_distribution": {"a": 2, "b": 1, "c": 1}}
    if subset:
        service["subset"] = {"key": "header:X-Version", "by": "version"}
    lb = tai_lb.LoadBalancer.from_config({"zone": "a", "services": {"svc": service}})
    if locality:
        assert lb.status()["services"]["svc"]["locality"]["mode"] == "spill"

    def timed(batch: int) -> float:
        pick = lb.pick
        with routing_context(subset="2" if subset else None):
            started = time.perf_counter()
            for _ in range(batch):
                with pick("svc"):
                    pass
            return time.perf_counter() - started

    return timed, lb.close


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the tables and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(__doc__, "a smaller, shorter run (smoke test); no write",
                              "seed of the case order",
                              f"the file whose '{SECTION}' section is replaced")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    started = time.monotonic()
    steps = spill_steps(settings.picks)
    costs = interleaved_medians({"plain pick": _case(False, False),
                                 "zone aware": _case(True, False),
                                 "zone aware + subset": _case(True, True)},
                                settings.batch, settings.rounds, args.seed)
    worst = max(abs(measured - ideal) * 100 for _, ideal, measured in steps)
    ratio = costs["zone aware + subset"] / costs["plain pick"]
    spill_header = ["local failed", "healthy local", "ideal local %", "measured local %",
                    "error (points)", "std error (points)"]
    spill_rows = []
    for failed, ideal, measured in steps:
        error = math.sqrt(max(ideal * (1 - ideal), 1e-12) / settings.picks) * 100
        spill_rows.append([str(failed), f"{ZONES['a'] - failed}/{ZONES['a']}",
                           f"{ideal * 100:.1f}", f"{measured * 100:.1f}",
                           f"{(measured - ideal) * 100:+.2f}", f"{error:.2f}"])
    cost_header = ["case", "us per pick", "vs plain pick", f"<= {TARGET_RATIO:g} x"]
    cost_rows = [[name, f"{costs[name]:.2f}", f"{costs[name] / costs['plain pick']:.2f}",
                  verdict(ratio <= TARGET_RATIO) if name == "zone aware + subset" else "-"]
                 for name in CASES]
    summary = [
        f"local share vs ideal: at most {worst:.2f} points off over {len(steps)} steps "
        f"(target <= {TARGET_POINTS:g}), {verdict(worst <= TARGET_POINTS)}",
        *(f"{name}: {costs[name]:.2f} us" for name in CASES),
        f"target zone aware + subset <= {TARGET_RATIO:g} x a plain pick: {ratio:.2f} x, "
        f"{verdict(ratio <= TARGET_RATIO)}"]
    report = "\n".join([
        environment_line(f"{settings.rounds} rounds in {time.monotonic() - started:.0f} s"),
        "",
        f"Spill-over: zones of {', '.join(f'{z} {n}' for z, n in ZONES.items())} endpoints, the "
        f"balancer in a; a's endpoints fail one by one; {settings.picks:,} lb.pick() calls "
        "from 4 threads per step; the ideal is min(1, (healthy local / healthy) / (local / "
        "all)).  Pick cost: one thread, 30 endpoints, round_robin; batches of "
        f"{settings.batch:,} picks per case, interleaved in a shuffled order per round; the "
        "median batch's time per pick.",
        "",
        *(f"- {line}" for line in summary),
        "",
        markdown_table(spill_header, spill_rows),
        "",
        markdown_table(cost_header, cost_rows),
    ])
    publish(args, "quick run: fewer picks, shorter batches; RESULTS.md is not written",
            summary, [(spill_header, spill_rows), (cost_header, cost_rows)], report, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
