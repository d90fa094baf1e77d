"""Endpoints from a watched JSON file: they arrive and leave while a thread keeps picking.

Run it with ``python examples/discovery_file.py``: it needs nothing but tai-lb.  The service
``users`` takes its endpoints from ``users.json`` in a temporary directory (``discovery``
``{"type": "file", "interval": 0.1}``), and a thread picks an endpoint of it without a pause, the
whole time.  The example rewrites the file, the way a deploy tool should (a temporary file
renamed over the old one), and after each change prints the endpoints the balancer now has and
where the next 2,000 picks went:

1. two endpoints; 2. a third one added; 3. one removed (a third of the set: applied at once);
4. a half-written file, which does not parse: the last good set stays, and ``status()`` counts
   the error; 5. two of three removed at once: more than ``max_removal_share`` (half), so the
   update is held back until it has been read ``confirmations`` (3) times in a row, then applied.

No pick fails at any point.  The addresses are never connected to (picking needs no server), so
they are made up.  It exits 0 when every step went as described.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import tai_lb

A, B, C = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"
PICKS = 2000


class Picker:
    """A thread that picks an endpoint of ``users`` again and again, counting where each went."""

    def __init__(self, lb: tai_lb.LoadBalancer) -> None:
        self.lb = lb
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.wanted = 0  # picks still to count
        self.generation = 0  # counts only picks that started after next_picks() was called
        self.failures = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="example-picker", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                generation = self.generation
            try:
                with self.lb.pick("users") as lease:  # a real client would call it here
                    address = lease.endpoint.address
            except tai_lb.LoadBalancerError:
                with self.lock:
                    self.failures += 1
                continue
            with self.lock:
                if self.wanted and generation == self.generation:
                    self.wanted -= 1
                    self.counts[address] += 1

    def next_picks(self, count: int) -> Counter[str]:
        """Where the next ``count`` picks went."""
        with self.lock:
            self.counts, self.wanted = Counter(), count
            self.generation += 1
        wait_until(lambda: self.wanted == 0)
        with self.lock:
            return self.counts


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out: the balancer did not follow the file")
        time.sleep(0.01)


def write_atomically(path: Path, endpoints: list[Any]) -> None:
    """Write the file next to ``path`` and rename it over ``path``: readers see all or nothing."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(endpoints))
    os.replace(temporary, path)


def main() -> int:
    # The balancer logs what discovery does (a held-back update is a warning): show it.
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="   log: %(message)s")
    with tempfile.TemporaryDirectory(prefix="tai-lb-discovery-") as directory:
        path = Path(directory) / "users.json"
        write_atomically(path, [A, B])
        lb = tai_lb.LoadBalancer.from_config({"services": {"users": {
            "discovery": {"type": "file", "path": str(path), "interval": 0.1},
            "strategy": "round_robin",
        }}})
        with lb:
            picker = Picker(lb)

            def has(*addresses: str) -> bool:
                """True once the route that picks use now has exactly these endpoints."""
                route = lb.route("users", wait=False)
                return {e.address for e in route.snapshot.endpoints} == set(addresses)

            def discovery() -> dict[str, Any]:
                found: dict[str, Any] = lb.status()["services"]["users"]["discovery"]
                return found

            def step(title: str, *expected: str) -> bool:
                wait_until(lambda: has(*expected))
                picks = picker.next_picks(PICKS)
                shown = ", ".join(f"{address} {picks[address]}" for address in sorted(picks))
                print(f"{title}\n   endpoints: {', '.join(sorted(expected))}\n   picks: {shown}")
                return set(picks) == set(expected)

            ok = step("1. the file lists two endpoints", A, B)

            write_atomically(path, [A, B, {"address": C, "weight": 2}])
            ok &= step("2. a third one added (weight 2; round_robin ignores weights)", A, B, C)

            write_atomically(path, [A, C])
            ok &= step("3. one removed: a third of the set, applied at once", A, C)

            errors = discovery()["errors"]
            path.write_text(f'["{A}", "{C}", "127.0.0.1:90')  # cut short, not renamed: broken
            wait_until(lambda: discovery()["errors"] > errors)
            ok &= step("4. a half-written file: the last good set stays", A, C)
            print(f"   status: errors={discovery()['errors']}, "
                  f"last_error={discovery()['last_error']!r}")

            write_atomically(path, [A, B, C])
            wait_until(lambda: has(A, B, C))
            held = discovery()["held_back"]
            write_atomically(path, [C])
            ok &= step("5. back to three, then two of three removed at once: held back, "
                       "then applied", C)
            held_now = discovery()["held_back"] - held
            print(f"   reads that held the removal back: {held_now}")
            ok &= held_now == 2  # read 3 times in a row: held at the first two

            picker.stop.set()
            picker.thread.join(timeout=5)
            found = discovery()
            print(f"discovery status: updates={found['updates']} errors={found['errors']} "
                  f"held_back={found['held_back']}; failed picks: {picker.failures}")
            ok &= picker.failures == 0
    print(f"as described: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
