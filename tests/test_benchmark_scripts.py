"""The benchmark scripts still run (in their quick mode, which writes no results)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


RESULTS = ROOT / "benchmarks" / "RESULTS.md"
CHECKOUT = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's tai_lb, not an installed one

#: script and its arguments besides --quick, the longest it may take, what its output shows
QUICK_RUNS = [
    ("picks.py", (), 300, ("round_robin", "consistent_hash", "peak_ewma", "x raw GET")),
    ("discovery.py", (), 300, ("set_endpoints: half of the set replaced",
                               "deregister(): one endpoint", "consistent_hash",
                               "round_robin, checked", "target ms")),
    ("faults.py", ("--trickle",), 300, ("status line, a byte per", "chunked body",
                                        "streamed body", "x deadline")),
    ("pool_fairness.py", (), 120, ("urllib3 LifoQueue", "tai-lb FairQueue", "p99 / p50",
                                   "per-thread requests")),
    ("churn.py", (), 120, ("round_robin", "consistent_hash", "steady", "churn", "p99.9 ms")),
    ("pool.py", (), 120, ("queue.Queue get/put", "ConnectionPool borrow/return",
                          "lb.connection()", "vs queue.Queue",
                          "target ConnectionPool borrow and return <= 20 us")),
    ("hashing.py", (), 120, ("consistent_hash", "maglev", "memory MB", "moved x 1/10",
                             "at home >= 90%")),
    ("affinity.py", (), 120, ("plain pick", "affinity hit", "vs plain pick",
                              "1,000,000 entries")),
    ("locality.py", (), 120, ("ideal local %", "measured local %", "plain pick",
                              "zone aware + subset", "vs plain pick", "local share vs ideal")),
    ("metrics_overhead.py", (), 120, ("| off |", "| on |", "| on + StatsD |",
                                      "| on + Prometheus |", "x off", "| OTel absent |",
                                      "| OTel API, no SDK |", "| OTel SDK, recording |")),
    ("slow_start.py", (), 120, ("round_robin", "weighted", "least_connections", "peak_ewma",
                                "first 10% x steady", "last 5% x steady", "steady share")),
    ("integrations.py", (), 120, ("| Flask | integration |",
                                  "| Django | integration, keys read |", "x plain")),
    ("prober_sharing.py", (), 120, ("1 worker", "8 workers, alone", "8 workers, shared",
                                    "x one worker", "sees a failure within")),
]


def quick_run(script: str, *args: str, timeout: float = 120) -> str:
    """Run ``benchmarks/<script> <args> --quick`` with this checkout's tai_lb; check that it
    succeeded and left RESULTS.md as it was, and return what it printed."""
    before = RESULTS.read_text() if RESULTS.exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--quick"],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=CHECKOUT)
    assert done.returncode == 0, done.stderr + done.stdout
    assert (RESULTS.read_text() if RESULTS.exists() else None) == before
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "timeout", "shown"), QUICK_RUNS,
                         ids=[run[0] for run in QUICK_RUNS])
def test_a_benchmark_s_quick_mode_prints_its_tables_and_writes_nothing(
        script: str, args: tuple[str, ...], timeout: float, shown: tuple[str, ...]) -> None:
    printed = quick_run(script, *args, timeout=timeout)
    for text in shown:
        assert text in printed


@pytest.mark.slow
def test_fuzz_config_benchmark_prints_its_table_and_writes_only_its_section(
        tmp_path: Path) -> None:
    printed = quick_run("fuzz_config.py", "-n", "40")
    for text in ("| configurations tried | 40 |", "| ConfigError |", "| other exceptions | 0 |",
                 "| runs leaving tai-lb threads | 0 |", "| seed | 2026 |"):
        assert text in printed
    # Without --quick it replaces its own section of the results file, and nothing else.
    other = tmp_path / "RESULTS.md"
    other.write_text("# Results\n\n## picks.py\n\nkept\n")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_config.py"), "-n",
                           "20", "--seed", "5", "--results", str(other)], capture_output=True,
                          text=True, timeout=120, check=False, env=CHECKOUT)
    assert done.returncode == 0, done.stderr + done.stdout
    text = other.read_text()
    assert "## picks.py\n\nkept\n" in text
    assert "## fuzz_config.py" in text and "| configurations tried | 20 |" in text
    assert "| seed | 5 |" in text
