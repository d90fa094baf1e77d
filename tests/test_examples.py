"""The scripts of examples/ run as their users run them (a subprocess each), against real gRPC
and Redis servers, and say that the traffic moved off the servers that stopped; and
``lb.connection()`` with redis-py clients routes around a stopped redis-server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tai_lb import Endpoint, LoadBalancer

from .redisserver import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str) -> str:
    """Run examples/<name> with this checkout's tai_lb; its output (it must exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], env=env,
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def table_row(output: str, label: str) -> list[int]:
    match = re.search(rf"^{re.escape(label)}\s+([\d ]+)$", output, re.MULTILINE)
    assert match is not None, output
    return [int(figure) for figure in match[1].split()]


def test_the_grpc_example_moves_traffic_off_the_stopped_servers() -> None:
    output = run_example("grpc_channels.py")
    assert "traffic moved off beta (NOT_SERVING) and gamma (stopped): yes" in output
    # columns: alpha, beta, gamma, failed
    assert sum(table_row(output, "all serving")[:3]) == 300
    assert table_row(output, "beta NOT_SERVING")[1::2] == [0, 0]  # beta, failed
    stopped = table_row(output, "gamma stopped")
    assert stopped[1:3] == [0, 0] and stopped[0] + stopped[3] == 300 and stopped[3] <= 2
    assert table_row(output, "after the check") == [300, 0, 0, 0]
    assert re.search(r"^beta .* health=down", output, re.MULTILINE)
    assert re.search(r"^gamma .* health=down", output, re.MULTILINE)


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[list[RedisServer]]:
    servers = [RedisServer(tmp_path / f"redis-{i}") for i in range(3)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_the_redis_example_starts_its_own_servers() -> None:
    output = run_example("redis_pool.py")
    assert "keys routed around the stopped server: yes" in output
    assert "stopped" in output and "0 errors; keys of live servers that moved: 0" in output


def test_the_redis_example_spreads_keys_and_routes_around_a_stopped_server(
        redis_servers: list[RedisServer]) -> None:
    output = run_example("redis_pool.py", *(server.address for server in redis_servers))
    assert "keys routed around the stopped server: yes" in output
    before = [int(re.search(rf"^{s.address}\s+(\d+)", output, re.MULTILINE)[1])  # type: ignore[index]
              for s in redis_servers]
    assert sum(before) == 3000 and min(before) > 500  # spread: about 1,000 each
    # The example shut the last server down; the other two hold every key now.
    assert not redis_servers[2].running or not answers(redis_servers[2])
    held = 0
    for server in redis_servers[:2]:
        client = server.client()
        held += int(client.dbsize())
        client.close()
    assert held == 3000


def answers(server: RedisServer) -> bool:
    client = server.client()
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


class Clients:
    """redis-py clients for lb.connection(), counting those opened and closed."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0

    def open(self, endpoint: Endpoint) -> redis.Redis:
        # connects at once (single_connection_client): raises when the server is down
        client = redis.Redis(host=endpoint.host, port=endpoint.port,
                             single_connection_client=True, socket_timeout=2,
                             socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
        self.opened += 1
        return client

    def close(self, client: redis.Redis) -> None:
        self.closed += 1
        client.close()


def test_redis_clients_route_around_a_stopped_server_by_its_breaker(
        redis_servers: list[RedisServer]) -> None:
    clients = Clients()
    lb = LoadBalancer.from_config({"services": {"cache": {
        "endpoints": [server.address for server in redis_servers],
        "strategy": "consistent_hash", "circuit_breaker": {"fail_max": 2, "reset_timeout": 60}}}})
    keys = [f"k{i}" for i in range(300)]
    with lb:
        home = {}
        for key in keys:
            with lb.connection("cache", clients.open, key=key, close=clients.close) as client:
                client.set(key, "v")
                home[key] = client.connection_pool.connection_kwargs["port"]
        stopped = redis_servers[0]
        assert sum(port == stopped.port for port in home.values()) > 30
        stopped.stop()  # no health check: only the failures tell the balancer
        errors = 0
        found = []
        for key in keys:
            try:
                with lb.connection("cache", clients.open, key=key, close=clients.close) as client:
                    found.append(client.get(key) is not None)
                    port = client.connection_pool.connection_kwargs["port"]
                    assert port == home[key] or home[key] == stopped.port
            except redis.ConnectionError:  # raised inside the block: the lease fails
                errors += 1
        breaker = lb.stats("cache")[stopped.address].breaker
        assert breaker is not None and breaker.state == "open"
        assert errors == 2  # fail_max; then the stopped server's keys go to the others
        # keys of live servers are found where they were; the stopped server's are missed
        assert found.count(True) == sum(port != stopped.port for port in home.values())
    assert clients.opened == clients.closed  # close() closed every pooled client
