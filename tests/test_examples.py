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


def test_the_requests_session_example_retries_then_routes_around_a_killed_backend() -> None:
    output = run_example("requests_session.py")
    assert "every request answered; routed around bravo: yes" in output
    after = re.search(r"^after: +alpha (\d+), bravo (\d+), charlie (\d+)$", output, re.MULTILINE)
    assert after is not None, output
    assert int(after[2]) == 0 and int(after[1]) + int(after[3]) == 90
    # the decision trace of a request that met bravo: refused there, answered by another
    trace = output.split("from its decision trace:\n", 1)[1]
    assert re.match(r"  users GET /api/users/\d+: 2 attempts", trace), trace
    assert "Connection refused" in trace and "excluding 1 tried) -> 200" in trace
    # the status() summary: bravo failed its checks, once refused a request, and no other did
    assert re.search(r"^  bravo .* health=unhealthy .* failures=1 ", output, re.MULTILINE)
    assert len(re.findall(r" health=healthy .* failures=0 ", output)) == 2
    assert re.search(r"^users: 2 of 3 endpoints pickable, \d+ attempts, 1 errors, 1 retries",
                     output, re.MULTILINE), output


def test_the_non_http_example_keeps_keys_pools_sockets_and_breaks_a_stopped_server() -> None:
    output = run_example("non_http_pick.py")
    assert "as described: yes" in output
    homes = re.findall(r"^   (user-\d+) +-> (\w+)$", output, re.MULTILINE)
    assert len(homes) == 12 and len({server for _, server in homes}) > 1  # one home per key
    pooled = re.search(r"300 calls: alpha (\d+), bravo (\d+), gamma (\d+); 300 borrows, "
                       r"3 sockets opened", output)
    assert pooled is not None and sum(int(n) for n in pooled.groups()) == 300, output
    stopped = re.search(r"120 calls: 2 failed, then alpha (\d+), bravo (\d+); gamma's breaker: "
                        r"open", output)
    assert stopped is not None and int(stopped[1]) + int(stopped[2]) == 118, output


def test_the_discovery_example_follows_the_file_and_no_pick_fails() -> None:
    output = run_example("discovery_file.py")
    assert "as described: yes" in output
    picks = re.findall(r"^   picks: (.*)$", output, re.MULTILINE)
    assert len(picks) == 5, output
    assert picks[0] == "127.0.0.1:9001 1000, 127.0.0.1:9002 1000"
    three = re.fullmatch(r"127\.0\.0\.1:9001 (\d+), 127\.0\.0\.1:9002 (\d+), "
                         r"127\.0\.0\.1:9003 (\d+)", picks[1])
    assert three is not None and sorted(int(n) for n in three.groups()) == [666, 667, 667]
    # the removal applied at once; the broken file kept it; the big removal applied at last
    assert picks[2] == picks[3] == "127.0.0.1:9001 1000, 127.0.0.1:9003 1000"
    assert picks[4] == "127.0.0.1:9003 2000"
    assert "reads that held the removal back: 2" in output
    assert re.search(r"errors=1 held_back=2; failed picks: 0$", output, re.MULTILINE), output
