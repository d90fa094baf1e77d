"""The tai-lb command: ``check`` exit codes and messages, and the picks demonstration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tai_lb.__main__ import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tai_lb", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_check_valid_config_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "lb.json"
    path.write_text(json.dumps({"services": {"users": {"endpoints": ["127.0.0.1:8001"]}}}))
    result = run("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "users (1 endpoints, round_robin)" in result.stdout


def test_check_invalid_config_exits_2_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "lb.json"
    path.write_text(json.dumps({"services": {"users": {"endpoints": ["127.0.0.1:0"]}}}))
    result = run("check", str(path))
    assert result.returncode == 2
    assert "services.users.endpoints[0].port: must be an integer from 1 to 65535, got 0" in (
        result.stderr)


def test_check_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_picks_prints_every_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["picks", "--count", "600"]) == 0
    out = capsys.readouterr().out
    for name in ("round_robin", "weighted_round_robin", "random", "weighted",
                 "least_connections", "consistent_hash", "peak_ewma"):
        assert name in out
    wrr = next(line for line in out.splitlines() if line.startswith("weighted_round_robin"))
    assert wrr.split()[1:] == ["100", "200", "300"]


def test_demo_routes_around_the_killed_backend_with_no_failures() -> None:
    result = run("demo", "--duration", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed in " in result.stdout
    assert "KILLED" in result.stdout and "bravo killed at 1.5 s" in result.stdout
    killed_line = next(line for line in result.stdout.splitlines()[::-1] if "KILLED" in line)
    assert "bravo" in killed_line
