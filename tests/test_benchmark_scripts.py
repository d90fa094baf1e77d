"""The benchmark scripts still run (in their quick mode, which writes no results)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_picks_benchmark_quick_mode_prints_its_tables() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "picks.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    for name in ("round_robin", "consistent_hash", "peak_ewma", "x raw GET"):
        assert name in done.stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.slow
def test_discovery_benchmark_quick_mode_prints_its_tables() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "discovery.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    for text in ("set_endpoints: half of the set replaced", "deregister(): one endpoint",
                 "consistent_hash", "round_robin, checked", "target ms"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.slow
def test_faults_benchmark_trickle_quick_mode_prints_its_table() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--trickle",
                           "--quick"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    for text in ("status line, a byte per", "chunked body", "streamed body", "x deadline"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.slow
def test_pool_fairness_benchmark_quick_mode_prints_its_table() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pool_fairness.py"),
                           "--quick"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for text in ("urllib3 LifoQueue", "tai-lb FairQueue", "p99 / p50", "per-thread requests"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.slow
def test_churn_benchmark_quick_mode_prints_its_table() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "churn.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for text in ("round_robin", "consistent_hash", "steady", "churn", "p99.9 ms"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.slow
def test_pool_benchmark_quick_mode_prints_its_table() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pool.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for text in ("queue.Queue get/put", "ConnectionPool borrow/return", "lb.connection()",
                 "vs queue.Queue", "target ConnectionPool borrow and return <= 20 us"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before



@pytest.mark.slow
def test_hashing_benchmark_quick_mode_prints_its_table() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's tai_lb, not an installed one
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hashing.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode == 0, done.stderr
    for text in ("consistent_hash", "maglev", "memory MB", "moved x 1/10", "at home >= 90%"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.slow
def test_affinity_benchmark_quick_mode_prints_its_table() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's tai_lb, not an installed one
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "affinity.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode == 0, done.stderr
    for text in ("plain pick", "affinity hit", "vs plain pick", "1,000,000 entries"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before



@pytest.mark.slow
def test_locality_benchmark_quick_mode_prints_its_tables() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's tai_lb, not an installed one
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "locality.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode == 0, done.stderr
    for text in ("ideal local %", "measured local %", "plain pick", "zone aware + subset",
                 "vs plain pick", "local share vs ideal"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.slow
def test_metrics_overhead_benchmark_quick_mode_prints_its_table() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's tai_lb, not an installed one
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "metrics_overhead.py"),
                           "--quick"], capture_output=True, text=True, timeout=120, check=False,
                          env=env)
    assert done.returncode == 0, done.stderr
    for text in ("| off |", "| on |", "| on + StatsD |", "| on + Prometheus |", "x off",
                 "| OTel absent |", "| OTel API, no SDK |", "| OTel SDK, recording |"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.slow
def test_slow_start_benchmark_quick_mode_prints_its_table() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's tai_lb, not an installed one
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "slow_start.py"),
                           "--quick"], capture_output=True, text=True, timeout=120, check=False,
                          env=env)
    assert done.returncode == 0, done.stderr
    for strategy in ("round_robin", "weighted", "least_connections", "peak_ewma"):
        assert strategy in done.stdout
    for text in ("first 10% x steady", "last 5% x steady", "steady share"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before



@pytest.mark.slow
def test_integrations_benchmark_quick_mode_prints_its_table() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's tai_lb, not an installed one
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "integrations.py"),
                           "--quick"], capture_output=True, text=True, timeout=120, check=False,
                          env=env)
    assert done.returncode == 0, done.stderr
    for text in ("| Flask | integration |", "| Django | integration, keys read |", "x plain"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.slow
def test_prober_sharing_benchmark_quick_mode_prints_its_tables() -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prober_sharing.py"),
                           "--quick"], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout's tai_lb
    assert done.returncode == 0, done.stderr
    for text in ("1 worker", "8 workers, alone", "8 workers, shared", "x one worker",
                 "sees a failure within"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.slow
def test_fuzz_config_benchmark_prints_its_table_and_writes_only_its_section(
        tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "fuzz_config.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's tai_lb, not an installed one
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    done = subprocess.run([sys.executable, str(script), "--quick", "-n", "40"],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    for text in ("| configurations tried | 40 |", "| ConfigError |", "| other exceptions | 0 |",
                 "| runs leaving tai-lb threads | 0 |", "| seed | 2026 |"):
        assert text in done.stdout
    assert (results.read_text() if results.exists() else None) == before
    # Without --quick it replaces its own section of the results file, and nothing else.
    other = tmp_path / "RESULTS.md"
    other.write_text("# Results\n\n## picks.py\n\nkept\n")
    done = subprocess.run([sys.executable, str(script), "-n", "20", "--seed", "5", "--results",
                           str(other)], capture_output=True, text=True, timeout=120,
                          check=False, env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    text = other.read_text()
    assert "## picks.py\n\nkept\n" in text
    assert "## fuzz_config.py" in text and "| configurations tried | 20 |" in text
    assert "| seed | 5 |" in text
