"""One prober per host: probes per endpoint per interval with 8 workers, shared or not, and how
soon every worker sees a failure.

::

    python benchmarks/prober_sharing.py          # about 3 minutes; updates "## prober_sharing.py"
    python benchmarks/prober_sharing.py --quick  # about 15 s; never writes RESULTS.md

Real backends (threaded ``http.server`` on 127.0.0.1, one per endpoint, counting the GETs of
their health path) are probed by forked worker processes, each with its own balancer built
after the fork, as gunicorn workers are.  Three cases take turns in a shuffled order in each
round: ``1 worker`` (the reference), ``8 workers, alone`` (``share: false``) and ``8 workers,
shared`` (``share`` naming a fresh directory).  A case's figure is the probes each backend got
per check interval over a window of intervals, after every worker has checked every endpoint;
the median over the rounds.

Then the detection delay: with 8 sharing workers (and, side by side, 8 alone), one backend's
health path starts answering 503, and each worker notes when its balancer first calls it
unhealthy (a thread polling every 2 ms); the delay of every worker in every trial.

Targets (printed as PASS/FAIL, never asserted): shared, probes per endpoint per interval
<= 1.5 x one worker's; every worker sees the failure within
``interval x unhealthy_threshold + 1 s``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from picks import benchmark_parser, environment_line, markdown_table, publish, verdict

import tai_lb

SECTION = "## prober_sharing.py"
TARGET_RATIO = 1.5
HEALTH_PATH = "/healthz"
CASES = ("1 worker", "8 workers, alone", "8 workers, shared")


@dataclass(frozen=True)
class Settings:
    """How big and how long a run is."""

    workers: int
    endpoints: int
    interval: float  # seconds between checks of one endpoint
    window: int  # intervals counted per case and round
    rounds: int
    trials: int  # detection trials per sharing mode
    unhealthy_threshold: int = 2


FULL = Settings(workers=8, endpoints=10, interval=1.0, window=10, rounds=3, trials=3)
QUICK = Settings(workers=8, endpoints=3, interval=0.2, window=5, rounds=1, trials=1)


# -- backends ------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Backend

    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def do_GET(self) -> None:
        status = 200
        if self.path == HEALTH_PATH:
            with self.server.lock:
                self.server.probes += 1
                status = self.server.health_status
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Backend(http.server.ThreadingHTTPServer):
    """A loopback backend that counts the probes of its health path."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.probes = 0
        self.health_status = 200
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="prober-sharing-backend", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def count(self) -> int:
        with self.lock:
            return self.probes

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


# -- workers -------------------------------------------------------------------------------------


class Workers:
    """Forked processes, each with its own balancer built after the fork, answering commands
    (one JSON line each way) over pipes."""

    def __init__(self, count: int, config: dict[str, Any]) -> None:
        self.pids: list[int] = []
        self.pipes: list[tuple[Any, Any]] = []
        for _ in range(count):
            to_child, from_parent = os.pipe()
            to_parent, from_child = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    os.close(from_parent)
                    os.close(to_parent)
                    _serve(config, os.fdopen(to_child, "r"), os.fdopen(from_child, "w"))
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            os.close(to_child)
            os.close(from_child)
            self.pids.append(pid)
            self.pipes.append((os.fdopen(from_parent, "w"), os.fdopen(to_parent, "r")))

    def ask_all(self, *command: Any) -> list[Any]:
        """Send ``command`` to every worker, then read every answer."""
        for writer, _ in self.pipes:
            writer.write(json.dumps(command) + "\n")
            writer.flush()
        answers = []
        for _, reader in self.pipes:
            line = reader.readline()
            if not line:
                raise RuntimeError("a worker died")
            answers.append(json.loads(line))
        return answers

    def close(self) -> None:
        """Close every worker's balancer, then reap it (killed if it takes over 10 s)."""
        with contextlib.suppress(OSError, RuntimeError):
            self.ask_all("exit")
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
        for writer, reader in self.pipes:
            with contextlib.suppress(OSError):
                writer.close()
            reader.close()


def _serve(config: dict[str, Any], commands: Any, answers: Any) -> None:
    lb = tai_lb.LoadBalancer.from_config(config)
    seen: dict[str, float] = {}

    def watch(address: str) -> None:
        while not lb.closed:
            if not lb.health_checker.is_healthy("svc", address):
                seen[address] = time.monotonic()
                return
            time.sleep(0.002)

    for line in commands:
        command, *args = json.loads(line)
        answer: Any = None
        if command == "checked":
            answer = all((h := lb.health_checker.health("svc", a)) is not None and h.checked
                         for a in args[0])
        elif command == "watch":
            threading.Thread(target=watch, args=(args[0],), name="prober-sharing-watch",
                             daemon=True).start()
        elif command == "seen":
            answer = seen.get(args[0])
        elif command == "exit":
            lb.close()
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
        if command == "exit":
            return


# -- measurement ---------------------------------------------------------------------------------


def _config(settings: Settings, backends: Sequence[_Backend], share: Any) -> dict[str, Any]:
    return {"services": {"svc": {"endpoints": [b.address for b in backends], "health_check": {
        "path": HEALTH_PATH, "interval": settings.interval, "timeout": 0.5,
        "unhealthy_threshold": settings.unhealthy_threshold, "skip_if_traffic": False,
        "share": share}}}}


def _wait(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for the workers")
        time.sleep(0.01)


def _started(settings: Settings, backends: Sequence[_Backend], count: int,
             share: Optional[str]) -> Workers:
    """``count`` workers, once every one has checked every endpoint."""
    workers = Workers(count, _config(settings, backends, share or False))
    addresses = [b.address for b in backends]
    try:
        _wait(lambda: all(workers.ask_all("checked", addresses)), 30)
    except BaseException:
        workers.close()
        raise
    return workers


def probe_rate(settings: Settings, backends: Sequence[_Backend], count: int,
               share: Optional[str]) -> float:
    """Probes per endpoint per interval with ``count`` workers, over ``settings.window``
    intervals."""
    workers = _started(settings, backends, count, share)
    try:
        before = sum(b.count() for b in backends)
        started = time.monotonic()
        time.sleep(settings.window * settings.interval)  # a measuring window, not a wait
        probes = sum(b.count() for b in backends) - before
        elapsed = time.monotonic() - started
    finally:
        workers.close()
    return probes / len(backends) / (elapsed / settings.interval)


def detection_delays(settings: Settings, backends: Sequence[_Backend], share: Optional[str],
                     ) -> list[float]:
    """Seconds from a backend's health path failing to each worker calling it unhealthy."""
    failing = backends[0]
    workers = _started(settings, backends, settings.workers, share)
    try:
        workers.ask_all("watch", failing.address)
        time.sleep(random.uniform(0, settings.interval))  # at a random point of the interval
        with failing.lock:
            failing.health_status = 503
            failed_at = time.monotonic()
        _wait(lambda: None not in workers.ask_all("seen", failing.address), 60)
        seen = workers.ask_all("seen", failing.address)
    finally:
        workers.close()
        with failing.lock:
            failing.health_status = 200
    return [when - failed_at for when in seen]


@dataclass
class Results:
    """What a run measured."""

    settings: Settings
    rates: dict[str, list[float]] = field(default_factory=dict)
    delays: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def rate(self, case: str) -> float:
        return statistics.median(self.rates[case])


def run(settings: Settings, seed: int) -> Results:
    """Every case in every round, in a shuffled order, then the detection trials."""
    rng = random.Random(seed)
    random.seed(seed)
    results = Results(settings, {case: [] for case in CASES},
                      {"shared": [], "alone": []})
    started = time.monotonic()
    backends = [_Backend() for _ in range(settings.endpoints)]
    directory = tempfile.mkdtemp(prefix="tai-lb-prober-sharing-")
    try:
        for _ in range(settings.rounds):
            order = list(CASES)
            rng.shuffle(order)
            for case in order:
                count = 1 if case == "1 worker" else settings.workers
                share = directory if case.endswith("shared") else None
                results.rates[case].append(probe_rate(settings, backends, count, share))
        for _ in range(settings.trials):
            for mode in rng.sample(["shared", "alone"], 2):
                share = directory if mode == "shared" else None
                results.delays[mode] += detection_delays(settings, backends, share)
    finally:
        for backend in backends:
            backend.close()
        shutil.rmtree(directory, ignore_errors=True)
    results.seconds = time.monotonic() - started
    return results


def report(results: Results) -> tuple[list[str], list[tuple[list[str], list[list[str]]]], str]:
    """The summary lines, the tables and the Markdown section."""
    settings = results.settings
    one = results.rate("1 worker")
    shared = results.rate("8 workers, shared")
    bound = settings.interval * settings.unhealthy_threshold + 1.0
    worst = max(results.delays["shared"])
    summary = [
        f"target shared probes per endpoint per interval <= {TARGET_RATIO:g} x one worker's: "
        f"{shared:.2f} vs {one:.2f}, {shared / one:.2f} x, {verdict(shared / one <= TARGET_RATIO)}",
        f"target every sharing worker sees a failure within {bound:g} s: slowest "
        f"{worst:.2f} s of {len(results.delays['shared'])}, {verdict(worst <= bound)}"]
    rate_header = ["case", "probes per endpoint per interval", "x one worker"]
    rate_rows = [[case, f"{results.rate(case):.2f}", f"{results.rate(case) / one:.2f}"]
                 for case in CASES]
    delay_header = ["8 workers", "median s", "slowest s", "bound s", "within"]
    delay_rows = [[mode, f"{statistics.median(found):.2f}", f"{max(found):.2f}", f"{bound:g}",
                   verdict(max(found) <= bound)] for mode, found in results.delays.items()]
    tables = [(rate_header, rate_rows), (delay_header, delay_rows)]
    text = "\n".join([
        environment_line(f"{settings.rounds} rounds and {settings.trials} trials in "
                         f"{results.seconds:.0f} s"),
        "",
        f"{settings.endpoints} real loopback backends; workers are forked processes, each with "
        f"its own balancer (interval {settings.interval:g} s, jitter 0.1, "
        f"unhealthy_threshold {settings.unhealthy_threshold}, skip_if_traffic off); probes "
        f"counted at the backends over {settings.window} intervals per case and round, the cases "
        "in a shuffled order per round, medians over the rounds.  Detection: one backend's "
        "health path turns to 503 at a random point of an interval; each worker's delay until "
        "its balancer calls it unhealthy, every worker of every trial.",
        "",
        *(f"- {line}" for line in summary),
        "",
        markdown_table(rate_header, rate_rows),
        "",
        markdown_table(delay_header, delay_rows),
    ])
    return summary, tables, text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the tables and, unless told not to, update RESULTS.md."""
    if not hasattr(os, "fork"):
        print("prober_sharing.py needs os.fork", file=sys.stderr)
        return 2
    parser = benchmark_parser(
        __doc__, "about 15 s: short windows, one round (smoke test); no write",
        "seed of the case order", f"the file whose '{SECTION}' section is replaced")
    args = parser.parse_args(argv)
    results = run(QUICK if args.quick else FULL, args.seed)
    summary, tables, text = report(results)
    publish(args, "--quick: a smoke test; short windows, one round, figures are rough",
            summary, tables, text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
