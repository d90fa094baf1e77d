"""The scripts of examples/ run as their users run them (a subprocess each, exit 0, output
checked): against real gRPC and Redis servers, echo servers and HTTP backends the examples start
themselves, and a watched file; the Flask and Django apps are served by gunicorn over real
backends, and by ``python examples/X.py``.  Also: ``lb.connection()`` with redis-py clients
routes around a stopped redis-server."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

from tai_lb import Endpoint, LoadBalancer

from .backends import Factory
from .conftest import end_process, wait_for
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
    killed = re.search(r"^killed: +(\w+), the busiest$", output, re.MULTILINE)
    assert killed is not None, output
    victim = killed[1]
    assert f"every request answered; routed around {victim}: yes" in output
    # no attempt went to the dead backend once it was out, and the others answered all 90
    after = re.search(rf"^after: +(\w+) (\d+), (\w+) (\d+); attempts to {victim}: 0$", output,
                      re.MULTILINE)
    assert after is not None, output
    assert victim not in (after[1], after[3]) and int(after[2]) + int(after[4]) == 90
    # the decision trace of a request that met it: refused there, answered by another
    trace = output.split("from its decision trace:\n", 1)[1]
    assert re.match(r"  users GET /api/users/\d+: 2 attempts", trace), trace
    assert "Connection refused" in trace and "excluding 1 tried) -> 200" in trace
    # the status() summary: the dead one failed its checks and some requests; no other did
    assert re.search(rf"^  {victim} .* health=unhealthy .* failures=[1-9]", output, re.MULTILINE)
    assert len(re.findall(r" health=healthy .* failures=0 ", output)) == 2, output
    summary = re.search(r"^users: 2 of 3 endpoints pickable, \d+ attempts, (\d+) errors, "
                        r"(\d+) retries", output, re.MULTILINE)
    assert summary is not None and summary[1] == summary[2] != "0", output  # each retried


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


# -- the web apps: examples/flask_app.py and examples/django_app.py ----------------------------

WEB_APPS = {"flask_app.py": "flask_app:app", "django_app.py": "django_app:application"}


def get_json(url: str, **kwargs: Any) -> dict[str, Any]:
    response = requests.get(url, timeout=10, **kwargs)
    assert response.status_code == 200, response.text[:500]
    answer: dict[str, Any] = response.json()
    return answer


@contextlib.contextmanager
def gunicorn(target: str, env: dict[str, str]) -> Iterator[str]:
    """``target`` (module:app in examples/) under gunicorn on a socket bound here; its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "--threads", "4",
         "--chdir", str(ROOT / "examples"), "--bind", f"fd://{listener.fileno()}",
         "--graceful-timeout", "5", "--log-level", "warning", target],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env}, pass_fds=(listener.fileno(),),
        stderr=subprocess.PIPE)
    listener.close()  # gunicorn has its own copy
    try:
        def up() -> bool:
            with contextlib.suppress(requests.ConnectionError):
                return requests.get(f"{url}/lb-status/?format=json", timeout=5).ok
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            return False
        assert wait_for(up, timeout=30)
        yield url
    finally:
        errors = end_process(process, 15)
    assert process.returncode == 0, f"gunicorn exited with {process.returncode}: {errors}"
    assert "Traceback" not in errors, errors


def check_cart_affinity(url: str) -> set[str]:
    """Each session cookie reaches one backend, every time; the backends the keys reached."""
    homes: dict[str, set[str]] = {}
    for key in [f"s{i}" for i in range(16)] * 3:
        answer = get_json(f"{url}/cart", cookies={"session": key},
                          headers={"Connection": "close"})
        assert answer["session"] == key
        homes.setdefault(key, set()).add(answer["served_by"])
    assert all(len(found) == 1 for found in homes.values()), homes
    return {next(iter(found)) for found in homes.values()}


@pytest.mark.slow  # gunicorn workers: the main run only
@pytest.mark.parametrize("example", sorted(WEB_APPS))
def test_the_web_example_under_gunicorn_balances_over_the_configured_backends(
        example: str, backend_factory: Factory, tmp_path: Path) -> None:
    backends = [backend_factory("one"), backend_factory("two")]
    endpoints = [backend.address for backend in backends]
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"services": {
        "users": {"endpoints": endpoints, "strategy": "round_robin"},
        "carts": {"endpoints": endpoints, "strategy": "consistent_hash",
                  "hash_key": "cookie:session"}}}))
    with gunicorn(WEB_APPS[example], {"TAI_LB_CONFIG": str(config)}) as url:
        for user in range(40):  # a new connection each: both workers answer
            answer = get_json(f"{url}/users/{user}", headers={"Connection": "close"})
            assert answer["user"] == user and answer["attempts"] == 1
        # both backends had calls, to the path the view asks for, with the service's name
        for backend in backends:
            users = [r for r in backend.received if r["path"].startswith("/api/users/")]
            assert len(users) >= 5 and {r["headers"]["Host"] for r in users} == {"users"}
        assert sum(backend.requests_count() for backend in backends) == 40
        assert check_cart_affinity(url) == {"one", "two"}  # 16 keys: both backends, surely
        status = get_json(f"{url}/lb-status/?format=json")
        assert sorted(status["services"]["users"]["endpoints"]) == sorted(endpoints)


@pytest.mark.parametrize("example", sorted(WEB_APPS))
def test_the_web_example_runs_with_python_over_its_demo_backends(example: str) -> None:
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / example), "--port", "0"],
                               env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # printed once the server listens
        found = re.search(r"serving on (http://127\.0\.0\.1:\d+)/", first)
        assert found is not None, first + process.communicate(timeout=10)[1]
        url = found[1]
        served = {get_json(f"{url}/users/{n}")["served_by"] for n in range(20)}
        assert served <= {"alpha", "bravo"} and served
        assert check_cart_affinity(url) <= {"alpha", "bravo"}
        status = get_json(f"{url}/lb-status/?format=json")
        assert set(status["services"]) == {"users", "carts"}
        assert status["services"]["users"]["requests"] == 20
    finally:
        process.terminate()  # SIGTERM: the example stops its server and exits 0
        errors = process.communicate(timeout=15)[1]
    assert process.returncode == 0, errors
    assert "Traceback" not in errors, errors


def test_every_example_says_how_to_run_it_and_is_run_here() -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    examples = sorted((ROOT / "examples").glob("[!_]*.py"))
    assert len(examples) >= 7
    for path in examples:
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert docstring and f"python examples/{path.name}" in docstring, path.name
        assert f'"{path.name}"' in source, f"no test runs examples/{path.name}"
