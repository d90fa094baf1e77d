"""gRPC: channels to real gRPC servers through ``lb.connection()`` (peak_ewma and breakers), and
the ``grpc`` health check (the standard ``grpc.health.v1`` protocol) against real servers."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from tai_lb import ConfigError, LoadBalancer
from tai_lb.__main__ import main
from tai_lb.endpoint import Endpoint
from tai_lb.health import HealthCheckConfig
from tai_lb.health.probes import HealthTarget, probe

from .conftest import wait_for
from .grpcserver import ECHO, GrpcServer


@pytest.fixture
def servers() -> Iterator[list[GrpcServer]]:
    made = [GrpcServer(name) for name in ("a", "b", "c")]
    yield made
    for server in made:
        server.stop()


def checked_lb(servers: list[GrpcServer], **check: Any) -> LoadBalancer:
    return LoadBalancer.from_config({"services": {"echo": {
        "endpoints": [s.address for s in servers], "strategy": "peak_ewma",
        "health_check": {"type": "grpc", "interval": 0.05, "jitter": 0, "timeout": 1.0,
                         "healthy_threshold": 1, "unhealthy_threshold": 1,
                         "skip_if_traffic": False, **check}}}})


def last_detail(lb: LoadBalancer, address: str) -> str:
    health = lb.health_checker.health("echo", address)
    assert health is not None and health.history
    return health.history[-1][2]


def test_the_grpc_check_follows_not_serving_and_serving(servers: list[GrpcServer]) -> None:
    with checked_lb(servers) as lb:
        first = servers[0].address
        assert wait_for(lambda: lb.health_checker.checks >= 6)
        assert lb.health_checker.is_healthy("echo", first)
        assert last_detail(lb, first) == "SERVING"
        servers[0].set_serving(False)
        assert wait_for(lambda: not lb.health_checker.is_healthy("echo", first))
        assert last_detail(lb, first) == "NOT_SERVING"
        picked = {lb.pick("echo").endpoint.address for _ in range(60)}
        assert first not in picked and len(picked) == 2
        servers[0].set_serving(True)
        assert wait_for(lambda: lb.health_checker.is_healthy("echo", first))
        assert last_detail(lb, first) == "SERVING"


def test_the_grpc_check_asks_about_its_service(servers: list[GrpcServer]) -> None:
    for server in servers[:2]:
        server.set_serving(True, "demo.Echo")
    # servers[2] does not know demo.Echo: NOT_FOUND, a failed check.
    with checked_lb(servers, service="demo.Echo") as lb:
        assert wait_for(lambda: not lb.health_checker.is_healthy("echo", servers[2].address))
        assert last_detail(lb, servers[2].address) == "gRPC NOT_FOUND"
        servers[1].set_serving(False, "demo.Echo")  # the server as a whole still serves
        assert wait_for(lambda: not lb.health_checker.is_healthy("echo", servers[1].address))
        assert lb.health_checker.is_healthy("echo", servers[0].address)


def test_the_grpc_check_of_a_stopped_server_fails(servers: list[GrpcServer]) -> None:
    with checked_lb(servers) as lb:
        gone = servers[0].address
        assert wait_for(lambda: lb.health_checker.checks >= 3)
        servers[0].stop()
        assert wait_for(lambda: not lb.health_checker.is_healthy("echo", gone))
        assert last_detail(lb, gone).startswith("gRPC UNAVAILABLE")


def test_a_grpc_check_over_https_cannot_skip_verification(servers: list[GrpcServer]) -> None:
    lb = LoadBalancer.from_config({"services": {"echo": {
        "endpoints": [servers[0].address], "scheme": "https",
        "health_check": {"type": "grpc", "interval": 0.05, "unhealthy_threshold": 1,
                         "verify": False}}}})
    with lb:
        assert wait_for(lambda: not lb.health_checker.is_healthy("echo", servers[0].address))
        assert "cannot skip certificate verification" in last_detail(lb, servers[0].address)


def test_a_grpc_check_over_https_checks_the_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    certificate = ca.issue_cert("echo.internal")
    server = GrpcServer("tls", tls=(certificate.private_key_pem.bytes(),
                                    certificate.cert_chain_pems[0].bytes()))
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    try:
        good = Endpoint.parse(server.address, tls_name="echo.internal")
        wrong = Endpoint.parse(server.address, tls_name="other.internal")
        config = HealthCheckConfig(type="grpc", verify=str(bundle), timeout=2.0)
        assert probe(HealthTarget("echo", good, config, "https", 0.0)) == (True, "SERVING")
        ok, detail = probe(HealthTarget("echo", wrong, config, "https", 0.0))
        assert not ok and detail.startswith("gRPC UNAVAILABLE")  # the name does not match
        untrusted = config.new(verify=True)  # the system's roots do not know this CA
        ok, detail = probe(HealthTarget("echo", good, untrusted, "https", 0.0))
        assert not ok and detail.startswith("gRPC UNAVAILABLE")
        ok, detail = probe(HealthTarget("echo", good, config, "http", 0.0))  # plaintext to TLS
        assert not ok and detail.startswith("gRPC UNAVAILABLE")
    finally:
        server.stop()


def test_a_grpc_check_without_grpcio_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules is how Python marks a module that cannot be imported.
    monkeypatch.setitem(sys.modules, "grpc_health", None)
    with pytest.raises(ConfigError, match=r"pip install 'tai-lb\[grpc\]'") as caught:
        LoadBalancer.from_config({"services": {"echo": {
            "endpoints": ["127.0.0.1:1"], "health_check": {"type": "grpc"}}}})
    assert caught.value.path == "services.echo.health_check.type"
    HealthCheckConfig(type="tcp")  # the other kinds do not need it


def test_the_core_does_not_import_grpc() -> None:
    code = ("import sys, tai_lb\n"
            "lb = tai_lb.LoadBalancer.from_config({'services': {'e': {\n"
            "    'endpoints': ['127.0.0.1:1'], 'health_check': {'type': 'tcp'}}}})\n"
            "lb.pick('e').done()\n"
            "lb.close()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'grpc_health')))")
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": root},
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_status_command_runs_a_grpc_check(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path,
                                              servers: list[GrpcServer]) -> None:
    servers[1].set_serving(False)
    path = tmp_path / "lb.json"
    path.write_text(json.dumps({"services": {"echo": {
        "endpoints": [servers[0].address, servers[1].address],
        "health_check": {"type": "grpc"}}}}))
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"{servers[0].address}\s+-\s+healthy\s+SERVING", out), out
    assert re.search(rf"{servers[1].address}\s+-\s+unhealthy\s+NOT_SERVING", out), out
    assert "echo: 1 of 2 endpoints healthy (grpc health check of the server)" in out


def test_grpc_check_settings() -> None:
    config = HealthCheckConfig.from_config({"type": "grpc"})
    assert config.service == "" and config.path is None  # no path needed
    with pytest.raises(ConfigError) as caught:
        LoadBalancer.from_config({"services": {"echo": {
            "endpoints": ["127.0.0.1:1"], "health_check": {"type": "grpc", "service": ["x"]}}}})
    assert caught.value.path == "services.echo.health_check.service"


class Channels:
    """The factory and close of ``lb.connection()``, counting the channels they open and close."""

    def __init__(self) -> None:
        self.opened: list[grpc.Channel] = []
        self.closed: list[grpc.Channel] = []

    def open(self, endpoint: Endpoint) -> grpc.Channel:
        channel = grpc.insecure_channel(endpoint.address)
        self.opened.append(channel)
        return channel

    def close(self, channel: grpc.Channel) -> None:
        self.closed.append(channel)
        channel.close()


def echo(lb: LoadBalancer, channels: Channels, request: bytes = b"hi") -> bytes:
    with lb.connection("echo", channels.open, close=channels.close, max_size=2) as channel:
        answer: bytes = channel.unary_unary(ECHO)(request, timeout=5)
        return answer


# peak_ewma steers away from an endpoint after one fast failure (its cost jumps), and comes back
# to it as that cost decays: with a short decay it comes back within a fraction of a second, so
# the failing server is picked again until its breaker opens after fail_max failures.
@pytest.mark.parametrize("strategy", [{"name": "peak_ewma", "decay": 0.05}, "round_robin"],
                         ids=["peak_ewma", "round_robin"])
def test_channels_move_off_a_failing_server_when_its_breaker_opens(
        servers: list[GrpcServer], strategy: Any) -> None:
    channels = Channels()
    fail_max = 3
    lb = LoadBalancer.from_config({"services": {"echo": {
        "endpoints": [s.address for s in servers], "strategy": strategy,
        "circuit_breaker": {"fail_max": fail_max, "reset_timeout": 60}}}})
    with lb:
        for _ in range(30):
            echo(lb, channels)
        breaker = lb.stats("echo")[servers[0].address].breaker
        assert breaker is not None and breaker.state == "closed"
        servers[0].failing = True
        failures = 0
        deadline = time.monotonic() + 10
        while breaker.state != "open" and time.monotonic() < deadline:
            try:
                echo(lb, channels)
            except grpc.RpcError as error:  # raised inside the with block: the lease fails
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                failures += 1
        assert breaker.state == "open"
        assert failures == fail_max
        calls_before = servers[0].calls
        answered = collections.Counter(echo(lb, channels).split(b":")[0] for _ in range(100))
        assert set(answered) == {b"b", b"c"} and servers[0].calls == calls_before
        # each failed block closed its channel instead of giving it back
        assert lb.topology.connection_pools.pools()[servers[0].address][0].stats()[
            "failed"] == fail_max


def test_no_channel_or_thread_is_left_after_close(servers: list[GrpcServer]) -> None:
    before = set(threading.enumerate())
    channels = Channels()
    lb = checked_lb(servers)
    with lb:
        results: list[bytes] = []

        def work() -> None:
            for _ in range(20):
                results.append(echo(lb, channels))

        workers = [threading.Thread(target=work) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert len(results) == 80
        assert wait_for(lambda: lb.health_checker.checks >= 6)
        assert channels.opened and not channels.closed  # pooled and reused, not one per call
        assert len(channels.opened) <= 3 * 2  # at most max_size per endpoint
    assert sorted(map(id, channels.closed)) == sorted(map(id, channels.opened))
    for server in servers:  # their worker threads too (the fixture's stop() then does nothing)
        server.stop()

    def left() -> set[str]:
        return {thread.name for thread in set(threading.enumerate()) - before}

    assert wait_for(lambda: not left(), timeout=2), left()
