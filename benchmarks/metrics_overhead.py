"""Request metrics' cost per request: a pick + lease cycle with metrics off, on, and on with StatsD.

Three balancers over the same 10 endpoints (``round_robin``), measured side by side in
interleaved, shuffled batches over several rounds:

- ``off``: every endpoint's ``figures`` set to None, so nothing is recorded (the cycle as it was
  before request metrics);
- ``on``: the default: each lease's end records its latency bucket and error kind;
- ``on + StatsD``: the same, with the flush thread sending to a UDP socket on 127.0.0.1 every
  half second (a socket that reads nothing: datagrams are dropped by the kernel);
- ``on + Prometheus``: the same, with the Prometheus collector registered (read at scrape time
  only: nothing scrapes here, so this shows that requests pay nothing for it).

A second table measures OpenTelemetry on the HTTP path (the attempt loop is where each attempt's
span is opened), with balanced GETs to a loopback server: ``OTel absent`` (the tracer None, as
when opentelemetry is not importable: one ``is None`` check per attempt), ``OTel API, no SDK``
(no span is made: no recording span is current) and ``OTel SDK, recording`` (a span per attempt
under a recording request span; a tracer provider with no exporter).

The claim is the median over rounds of each round's ratio ``on / off``::

    python benchmarks/metrics_overhead.py          # about 20 s; updates its RESULTS.md section
    python benchmarks/metrics_overhead.py --quick  # a few seconds; never writes RESULTS.md

Target (printed as PASS/FAIL, never asserted): ``on`` costs at most 1.05 x ``off``.
"""

from __future__ import annotations

import contextlib
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Optional

from picks import (
    LoopbackHTTP,
    TimedCase,
    benchmark_parser,
    environment_line,
    interleaved_medians,
    markdown_table,
    publish,
    verdict,
)

import tai_lb
import tai_lb.attempts
import tai_lb.otel

SECTION = "## metrics_overhead.py"
SERVICE = "svc"
CASES = ("off", "on", "on + StatsD", "on + Prometheus")
OTEL_CASES = ("OTel absent", "OTel API, no SDK", "OTel SDK, recording")
TARGET = 1.05  # on / off at most this


def make_balancer(case: str, port: int) -> tai_lb.LoadBalancer:
    """A balancer of 10 endpoints with request metrics as ``case`` says."""
    config: dict[str, object] = {"services": {SERVICE: {
        "endpoints": [f"10.0.0.{i}:80" for i in range(1, 11)], "strategy": "round_robin"}}}
    if case == "on + StatsD":
        config["metrics"] = {"statsd": {"port": port}}
    if case == "on + Prometheus":
        config["metrics"] = {"prometheus": {"namespace": "bench"}}
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


Parent = Callable[[], contextlib.AbstractContextManager[object]]
"""What opens the span a timed batch runs in (nothing, or a recording span)."""


def _tracings() -> dict[str, tuple[object, Parent]]:
    """Per OpenTelemetry case, the attempt loop's tracer and the span each timed batch runs in
    (the SDK case inside a recording span: outside one, attempts make no span); empty when
    opentelemetry is not installed."""
    original = tai_lb.otel.TRACER
    if original is None:
        return {}
    from opentelemetry.sdk.trace import TracerProvider  # only for this case

    sdk = TracerProvider().get_tracer("tai_lb")
    return {"OTel absent": (None, contextlib.nullcontext),
            "OTel API, no SDK": (original, contextlib.nullcontext),
            "OTel SDK, recording": (sdk, lambda: sdk.start_as_current_span("request"))}


def _use(tracer: object) -> None:
    # attempts.py imported the name: both modules' globals are set
    vars(tai_lb.attempts)["TRACER"] = tai_lb.otel.TRACER = tracer


def otel_cases(port: int) -> dict[str, TimedCase]:
    """The OpenTelemetry cases: balanced GETs to 127.0.0.1:``port`` with the attempt loop's
    tracer None, the API's (no SDK) or an SDK tracer's inside a recording span."""
    tracings = _tracings()
    if not tracings:
        return {}
    original = tai_lb.otel.TRACER
    lb = tai_lb.LoadBalancer.from_config({"services": {SERVICE: {
        "endpoints": [f"127.0.0.1:{port}"]}}})
    session = lb.session()

    def timed(tracer: object, parent: Parent
              ) -> Callable[[int], float]:
        def run(count: int) -> float:
            _use(tracer)
            get = session.get
            with parent():
                start = time.perf_counter()
                for _ in range(count):
                    get(f"http://{SERVICE}/")
                return time.perf_counter() - start
        return run

    def close() -> None:
        _use(original)
        lb.close()

    # one close() for all: interleaved_medians calls each case's, and closing twice is safe
    return {case: (timed(*tracing), close) for case, tracing in tracings.items()}


def hook_cases() -> dict[str, TimedCase]:
    """The OpenTelemetry cases again, timing the attempt loop's hooks alone: the ``TRACER is
    None`` check and, when there is a tracer, opening and ending one attempt's span."""
    tracings = _tracings()
    if not tracings:
        return {}
    from tai_lb.trace import Attempt

    original = tai_lb.otel.TRACER
    lb = tai_lb.LoadBalancer.from_config({"services": {SERVICE: {"endpoints": ["10.0.0.1:80"]}}})
    lease = lb.pick(SERVICE)
    record = Attempt(lease.address, "picked by round_robin", "response", 200, None, "done")
    start, end = tai_lb.otel.start_attempt, tai_lb.otel.end_attempt

    def timed(tracer: object, parent: Parent
              ) -> Callable[[int], float]:
        def run(count: int) -> float:
            _use(tracer)
            with parent():
                began = time.perf_counter()
                for _ in range(count):  # what _attempt() does around each exchange
                    span = None if tracer is None else start("GET", SERVICE, 1, lease)
                    if span is not None:
                        end(span, record)
                return time.perf_counter() - began
        return run

    def close() -> None:
        _use(original)
        lease.done(success=True)
        lb.close()

    return {case: (timed(*tracing), close) for case, tracing in tracings.items()}


def otel_rows(gets: dict[str, float],
              hooks: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """One row per OpenTelemetry case: the hooks' cost per attempt, and the median
    microseconds per GET with its ratio to absent."""
    absent = gets["OTel absent"]
    return (["OpenTelemetry", "hooks ns/attempt", "us/GET", "x absent"],
            [[case, f"{hooks[case] * 1000:,.0f}", f"{gets[case]:,.1f}",
              f"{gets[case] / absent:.3f}"] for case in OTEL_CASES if case in gets])


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
    http = LoopbackHTTP()
    try:
        gets, get_rounds = (200, 3) if args.quick else (2_000, 9)
        medians = interleaved_medians(otel_cases(http.server.server_address[1]), gets,
                                      get_rounds, args.seed)
        hooks = interleaved_medians(hook_cases(), gets * 10, get_rounds, args.seed)
        otel = otel_rows(medians, hooks) if medians else (["OpenTelemetry"], [])
    finally:
        http.close()
    environment = environment_line(f"{rounds} rounds in {time.monotonic() - began:.0f} s")
    method = (f"`with lb.pick(...)` cycles on one thread over 10 endpoints (`round_robin`), in "
              f"{rounds} rounds of {batches} shuffled batches of {cycles:,} cycles per case; "
              "ns/cycle is the median over rounds of each round's median batch, `x off` the "
              "median over rounds of that round's ratio to `off`. `off` records nothing; `on` "
              "records each request's latency bucket and error kind under the endpoint's lock; "
              "`on + StatsD` also runs the flush thread, sending to a UDP socket on loopback; "
              "`on + Prometheus` has the Prometheus collector registered (nothing scrapes).")
    otel_method = (f"Balanced `session.get()` calls to a loopback HTTP server (kept-alive "
                   f"connection), {get_rounds} rounds of {gets:,} GETs per case in shuffled "
                   "order; us/GET is the median over rounds. `OTel absent` is the attempt loop "
                   "with its tracer None (opentelemetry not importable); `OTel API, no SDK` "
                   "(opentelemetry-api installed, no SDK: no span is made); `OTel SDK, "
                   "recording` records a span per attempt inside a recording request span "
                   "(a TracerProvider with no exporter). `hooks ns/attempt` times what the "
                   f"attempt loop adds alone ({gets * 10:,} iterations per round, same order): "
                   "the `TRACER is None` check, and opening and ending the attempt's span; on "
                   "this shared 2-core machine the GETs vary by more than the hooks cost, so "
                   "the hooks column is the figure to read.")
    summary = [f"{row[0]}: {row[1]} ns per cycle, {row[3]} x off" for row in table[1]]
    summary += [f"{row[0]}: {row[1]} ns per attempt for the hooks, {row[2]} us per GET, "
                f"{row[3]} x absent" for row in otel[1]]
    report = "\n".join([environment, "", method, "", markdown_table(*table), "",
                        f"Target: request metrics on cost at most {TARGET:g} x off per cycle. "
                        "The cycle is bare (no I/O): the nanoseconds added are the figure to "
                        "weigh against a request (see picks.py's raw loopback GET).", "",
                        otel_method, "",
                        markdown_table(*otel) if otel[1] else "(opentelemetry not installed)"])
    publish(args, "--quick: a smoke test; few rounds, noisy", summary, [table, otel], report,
            SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
