"""The tai-lb command: ``check`` and ``status`` exit codes and output, the picks demonstration,
and ``--help``."""

from __future__ import annotations

import configparser
import importlib
import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from tai_lb import ConfigError, LoadBalancer
from tai_lb.__main__ import main

from . import backends
from .backends import Backend
from .etcdserver import EtcdServer


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


def test_check_an_unresolvable_statsd_host_exits_2_with_the_construction_message(
        tmp_path: Path) -> None:
    config = {"services": {"users": {"endpoints": ["127.0.0.1:8001"]}},
              "metrics": {"statsd": {"host": "nonexistent.invalid"}}}  # .invalid never resolves
    with pytest.raises(ConfigError) as built:
        LoadBalancer.from_config(config)
    path = tmp_path / "lb.json"
    path.write_text(json.dumps(config))
    result = run("check", str(path))
    assert result.returncode == 2, result.stdout
    assert result.stderr == f"tai-lb: invalid configuration: {built.value}\n"
    assert "metrics.statsd.host: cannot resolve 'nonexistent.invalid'" in result.stderr


def test_check_metrics_prometheus_without_prometheus_client_exits_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    path = tmp_path / "lb.json"
    path.write_text(json.dumps({"services": {}, "metrics": {"prometheus": {}}}))
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err == (
        "tai-lb: invalid configuration: metrics.prometheus: Prometheus export needs "
        "prometheus_client: pip install 'tai-lb[prometheus]'\n")


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
    # The closing sentence quotes the final table: bravo's failures (none before the kill),
    # and whether status() shows it ejected.
    row = re.search(r"KILLED\s+(ejected|in use)\s+\d+\s+[\d.]+%\s+(\d+)\s", killed_line)
    assert row, killed_line
    ejected, failures = row[1] == "ejected", int(row[2])
    attempts = "1 attempt failed" if failures == 1 else f"{failures} attempts failed"
    assert f"After bravo was killed, {attempts} on it, " in result.stdout
    assert ("and outlier detection ejected it." in result.stdout) is ejected
    assert ("and outlier detection did not eject it" in result.stdout) is not ejected


# -- status ---------------------------------------------------------------------------------------


def dead_address() -> str:
    """An address on which nobody listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def status(capsys: pytest.CaptureFixture[str], tmp_path: Path, config: dict[str, Any],
           *options: str) -> tuple[int, str]:
    path = tmp_path / "lb.json"
    path.write_text(json.dumps(config))
    code = main(["status", *options, str(path)])
    captured = capsys.readouterr()
    assert not captured.err
    return code, captured.out


def table_rows(out: str) -> dict[str, list[str]]:
    """The table's rows by endpoint: [service, endpoint, zone, state, detail]."""
    lines = out.split("\n\n", maxsplit=1)[0].splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == ["service", "endpoint", "zone", "state",
                                                     "detail"]
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=4) for line in lines[1:]]
    return {row[1]: row for row in rows}


def test_status_probes_an_http_check_healthy_and_dead_and_exits_0(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        backend_factory: Callable[..., Backend]) -> None:
    up, dead = backend_factory(), dead_address()
    code, out = status(capsys, tmp_path, {"services": {"users": {
        "endpoints": [{"address": up.address, "zone": "eu-1a"}, dead],
        "health_check": {"path": "/healthz"}}}})
    assert code == 0, out  # the service has a healthy endpoint
    rows = table_rows(out)
    assert rows[up.address][:4] == ["users", up.address, "eu-1a", "healthy"]
    assert rows[up.address][4].startswith("HTTP 200, ") and rows[up.address][4].endswith(" ms")
    assert rows[dead][2:4] == ["-", "unhealthy"]
    assert rows[dead][4].startswith("ConnectionRefusedError")
    assert "users: 1 of 2 endpoints healthy (http GET /healthz)" in out
    assert [(r["path"], r["headers"]["Host"]) for r in up.received] == [("/healthz", "users")]
    # every probing thread has ended when the command returns
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tai-lb")]


def test_status_an_http_check_answering_503_is_unhealthy_and_exits_1(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        backend_factory: Callable[..., Backend]) -> None:
    failing, tolerated = backend_factory(), backend_factory()
    failing.behaviour = tolerated.behaviour = backends.status(503)
    code, out = status(capsys, tmp_path, {"services": {
        "users": {"endpoints": [failing.address], "health_check": {"path": "/healthz"}},
        "legacy": {"endpoints": [tolerated.address],
                   "health_check": {"path": "/healthz", "expected_statuses": [503]}}}})
    assert code == 1, out
    rows = table_rows(out)
    assert rows[failing.address][3] == "unhealthy"
    assert rows[failing.address][4].startswith("HTTP 503, ")
    assert rows[tolerated.address][3] == "healthy"  # the service's expected statuses decide
    assert "users: 0 of 1 endpoints healthy (http GET /healthz); NO HEALTHY ENDPOINT" in out
    assert "legacy: 1 of 1 endpoints healthy" in out


def test_status_tcp_check_and_no_check_connect_without_http(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        backend_factory: Callable[..., Backend]) -> None:
    cache, plain, dead = backend_factory(), backend_factory(), dead_address()
    code, out = status(capsys, tmp_path, {"services": {
        "cache": {"endpoints": [cache.address], "health_check": {"type": "tcp"}},
        "plain": {"endpoints": [plain.address, dead]}}}, "--timeout", "2")
    assert code == 0, out
    rows = table_rows(out)
    assert rows[cache.address][3] == "healthy"
    assert rows[cache.address][4].startswith("connected, ")
    assert rows[plain.address][3] == "healthy" and rows[dead][3] == "unhealthy"
    assert "cache: 1 of 1 endpoints healthy (tcp connect)" in out
    assert "plain: 1 of 2 endpoints healthy (tcp connect, no health_check)" in out
    assert cache.requests_count() == plain.requests_count() == 0  # a connect, no request


def test_status_a_service_with_no_healthy_endpoint_exits_1(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dead = dead_address()
    code, out = status(capsys, tmp_path, {"services": {"users": {"endpoints": [dead]}}})
    assert code == 1
    assert table_rows(out)[dead][3] == "unhealthy"
    assert "users: 0 of 1 endpoints healthy" in out and "NO HEALTHY ENDPOINT" in out


def test_status_invalid_config_exits_2_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "lb.json"
    path.write_text(json.dumps({"services": {"users": {"endpoints": ["127.0.0.1:8001"],
                                                       "health_check": {"type": "http"}}}}))
    result = run("status", str(path))
    assert result.returncode == 2 and not result.stdout
    assert "tai-lb: invalid configuration: services.users.health_check.path:" in result.stderr
    result = run("status", str(tmp_path / "absent.json"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_status_json_has_the_same_figures(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        backend_factory: Callable[..., Backend]) -> None:
    up, dead = backend_factory(), dead_address()
    code, out = status(capsys, tmp_path, {"services": {
        "users": {"endpoints": [{"address": up.address, "zone": "eu-1a"}, dead],
                  "health_check": {"path": "/healthz"}},
        "orders": {"endpoints": [dead]}}}, "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    users, orders = data["services"]["users"], data["services"]["orders"]
    assert (users["check"], users["endpoints_total"], users["endpoints_healthy"]) == (
        "http GET /healthz", 2, 1)
    first, second = users["endpoints"]
    assert (first["address"], first["zone"], first["state"], first["detail"]) == (
        up.address, "eu-1a", "healthy", "HTTP 200")
    assert isinstance(first["latency_ms"], float) and first["latency_ms"] >= 0
    assert (second["address"], second["zone"], second["state"]) == (dead, None, "unhealthy")
    assert (orders["check"], orders["endpoints_healthy"]) == ("tcp connect, no health_check", 0)


def test_status_probes_what_discovery_answers_or_the_configured_endpoints(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        backend_factory: Callable[..., Backend]) -> None:
    found, configured = backend_factory(), backend_factory()
    listing = tmp_path / "users.json"
    listing.write_text(json.dumps([found.address]))
    code, out = status(capsys, tmp_path, {"services": {
        "users": {"discovery": {"type": "file", "path": str(listing)}},
        "orders": {"endpoints": [configured.address],
                   "discovery": {"type": "file", "path": str(tmp_path / "absent.json")}},
        "empty": {"discovery": {"type": "file", "path": str(tmp_path / "absent.json")}}}},
        "--discovery-timeout", "0.2")
    assert code == 1, out  # "empty" has no endpoint at all
    rows = table_rows(out)
    assert rows[found.address][0] == "users" and rows[found.address][3] == "healthy"
    assert rows[configured.address][0] == "orders" and rows[configured.address][3] == "healthy"
    assert "users: 1 of 1 endpoints healthy (tcp connect, no health_check); file discovery: " \
           "1 endpoints found" in out
    orders = next(line for line in out.splitlines() if line.startswith("orders: "))
    assert "file discovery: SourceError: " in orders
    assert "absent.json" in orders and "1 configured endpoints probed" in orders
    empty = next(line for line in out.splitlines() if line.startswith("empty: "))
    assert empty.startswith("empty: no endpoints;") and empty.endswith("NO HEALTHY ENDPOINT")


class _Gate:
    """A backend behaviour that holds each request until ``wanted`` are in at once (or 0.3 s
    passed), counting the most that were ever in at once, across every backend using it."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.active = 0
        self.most = 0
        self.condition = threading.Condition()

    def __call__(self, handler: Any, record: dict[str, Any]) -> None:
        with self.condition:
            self.active += 1
            self.most = max(self.most, self.active)
            self.condition.notify_all()
            self.condition.wait_for(lambda: self.active >= self.wanted, timeout=0.3)
            self.active -= 1  # before the answer: the probe's thread is free only after it
        handler.server.backend.ok(handler, record)


@pytest.mark.parametrize(("workers", "wanted", "most"), [(4, 4, 4), (2, 3, 2)])
def test_status_probes_concurrently_on_at_most_workers_threads(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        backend_factory: Callable[..., Backend], workers: int, wanted: int, most: int) -> None:
    gate = _Gate(wanted)
    made = [backend_factory() for _ in range(4)]
    for backend in made:
        backend.behaviour = gate
    code, out = status(capsys, tmp_path, {"services": {"users": {
        "endpoints": [b.address for b in made],
        "health_check": {"path": "/healthz", "timeout": 5}}}}, "--workers", str(workers))
    assert code == 0, out
    assert gate.most == most  # all four at once with 4 workers; never more than 2 with 2


@pytest.mark.parametrize("command", ["demo", "check", "status", "picks"])
def test_help_of_each_command_exits_0_and_names_it(
        capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tai-lb {command} ") and "examples:" in out


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "check", "status", "picks"):
        assert re.search(rf"^\s+{command}\s+\w", out, re.MULTILINE), command


def test_status_asks_etcd_once_and_leaves_no_watch_running(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        backend_factory: Callable[..., Backend]) -> None:
    up = backend_factory()
    server = EtcdServer(tmp_path)
    server.start()
    try:
        client = server.client()
        client.put("/status/services/users/one", json.dumps({"address": up.address}))
        client.close()
        down_url = f"http://{dead_address()}"
        code, out = status(capsys, tmp_path, {"services": {
            "users": {"discovery": {"type": "etcd", "urls": [server.url],
                                    "prefix": "/status/services"}},
            "orders": {"discovery": {"type": "etcd", "urls": [down_url],
                                     "prefix": "/status/services", "timeout": 0.2}}}},
            "--discovery-timeout", "0.5")
    finally:
        server.stop()
    assert code == 1, out  # orders: etcd down and nothing configured
    assert table_rows(out)[up.address][:4] == ["users", up.address, "-", "healthy"]
    assert "users: 1 of 1 endpoints healthy (tcp connect, no health_check); etcd discovery: " \
           "1 endpoints found" in out
    orders = next(line for line in out.splitlines() if line.startswith("orders: "))
    assert "etcd discovery: SourceError: " in orders and "0 configured endpoints probed" in orders
    # the etcd watch threads started for the answer were stopped before the command returned
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tai-lb")]


def test_the_console_script_runs_main() -> None:
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).parent.parent / "setup.cfg")
    scripts = dict(line.split(" = ") for line in
                   setup["options.entry_points"]["console_scripts"].strip().splitlines())
    module, _, function = scripts["tai-lb"].partition(":")
    assert getattr(importlib.import_module(module), function) is main


def test_status_probes_discovered_endpoints_concurrently(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        backend_factory: Callable[..., Backend]) -> None:
    gate = _Gate(4)
    made = [backend_factory() for _ in range(4)]
    for backend in made:
        backend.behaviour = gate
    listing = tmp_path / "users.json"
    listing.write_text(json.dumps([b.address for b in made]))
    code, out = status(capsys, tmp_path, {"services": {"users": {
        "discovery": {"type": "file", "path": str(listing)},
        "health_check": {"path": "/healthz", "timeout": 5}}}}, "--workers", "4")
    assert code == 0, out
    assert gate.most == 4  # not one at a time for want of configured endpoints
