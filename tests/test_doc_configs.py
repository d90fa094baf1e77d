"""Every configuration file the docs ship loads, and the sidecar migration example says what it
maps.

``docs/examples/`` holds the configuration files the pages include. Each must pass ``tai-lb
check`` (run as a reader runs it, in a subprocess) and build a balancer. The worked example of
docs/migrating.rst pairs an HAProxy backend (``haproxy.cfg``) and an nginx upstream
(``nginx.conf``) with the tai-lb configuration that replaces each (``from_haproxy.json``,
``from_nginx.json``); the tests below read the numbers out of the proxy's file and check that
the tai-lb file carries them as the page's mapping table says, so that neither side of the
example can change without the other. HAProxy and nginx themselves check their files (both
are installed by scripts/test.sh), and the HAProxy equivalent runs with endpoints failing to
show it keeps HAProxy's rule for servers down and backups.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tai_lb
from tai_lb import LoadBalancerConfig, ServiceConfig

from .conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
CONFIG_FILES = sorted(p for p in EXAMPLES.iterdir()
                      if p.suffix in (".json", ".toml", ".yaml", ".yml"))


def check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tai_lb", "check", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def test_the_docs_ship_the_migration_example() -> None:
    names = {p.name for p in CONFIG_FILES}
    assert {"from_haproxy.json", "from_nginx.json"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_doc_config_passes_check_and_builds(path: Path) -> None:
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: valid; services: ")
    with tai_lb.LoadBalancer.from_config(path) as lb:
        assert lb.registry.services()


def users(name: str) -> ServiceConfig:
    return tai_lb.load_config(EXAMPLES / name).services["users"]


def seconds(text: str) -> float:
    """An HAProxy or nginx duration (``2s``, ``500ms``, ``1m``) in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text)
    assert match, text
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]


def directives(text: str) -> list[list[str]]:
    """The lines of a proxy's configuration file as words, comments and blank lines left out."""
    lines = (line.split("#", 1)[0].strip().rstrip(";") for line in text.splitlines())
    return [line.split() for line in lines if line]


def test_the_haproxy_backend_maps_as_the_table_says() -> None:
    lines = directives((EXAMPLES / "haproxy.cfg").read_text())
    one = {words[0]: words[1:] for words in lines}
    default_server = one["default-server"]
    option = dict(zip(default_server[1::2], default_server[2::2]))  # after "check"
    servers = [words[1:] for words in lines if words[0] == "server"]
    config = users("from_haproxy.json")

    assert one["balance"] == ["roundrobin"]
    assert config.strategy.name == "weighted_round_robin"
    primaries = {s[1]: int(s[s.index("weight") + 1]) for s in servers if "backup" not in s}
    assert {e.address: e.weight for e in config.endpoints} == primaries
    assert [e.address for e in config.backups] == [s[1] for s in servers if "backup" in s]
    # backup servers serve only when no primary is up, and a primary back takes over again
    assert config.failover is not None and 0 < config.failover.failover_below <= 0.01
    assert config.failover.failback_at == config.failover.failover_below

    options = [words[1:] for words in lines if words[0] == "option"]
    health = config.health_check
    assert health is not None and ["httpchk", "GET", health.path] in options
    assert health.interval == seconds(option["inter"])
    assert health.healthy_threshold == int(option["rise"])
    assert health.unhealthy_threshold == int(option["fall"])
    assert health.panic_threshold == 0  # HAProxy balances over the servers that are up only
    assert option["observe"] == "layer7" and option["on-error"] == "mark-down"
    assert config.outlier_detection is not None
    assert config.outlier_detection.consecutive_5xx == int(option["error-limit"])
    assert config.outlier_detection.max_ejection_percent == 100  # HAProxy has no cap
    assert config.slow_start is not None
    assert config.slow_start.window == seconds(option["slowstart"])
    assert config.pool.maxsize == int(option["maxconn"]) and config.pool.block

    timeouts = {words[1]: seconds(words[2]) for words in lines if words[0] == "timeout"}
    assert config.timeout == (timeouts["connect"], timeouts["server"])
    assert config.retries.attempts == int(one["retries"][0]) + 1  # HAProxy counts retries only
    assert ["redispatch", "1"] in options  # every retry on another server, as tai-lb's
    retry_on = one["retry-on"]
    assert config.retries.statuses == {int(word) for word in retry_on if word.isdigit()}


def test_the_nginx_upstream_maps_as_the_table_says() -> None:
    lines = directives((EXAMPLES / "nginx.conf").read_text())
    one = {words[0]: words[1:] for words in lines}
    servers = [words[1:] for words in lines if words[0] == "server" and ":" in words[1]]
    config = users("from_nginx.json")

    assert not {"least_conn", "ip_hash", "hash", "random"} & set(one)
    assert config.strategy.name == "weighted_round_robin"  # nginx's smooth weighted round robin

    def parameters(server: list[str]) -> dict[str, str]:
        return dict(word.split("=", 1) for word in server[1:] if "=" in word)

    primaries = [s for s in servers if "backup" not in s]
    weights = {s[0]: int(parameters(s).get("weight", "1")) for s in primaries}
    assert {e.address: e.weight for e in config.endpoints} == weights
    assert [e.address for e in config.backups] == [s[0] for s in servers if "backup" in s]
    assert config.failover is not None and 0 < config.failover.failover_below <= 0.01

    (max_fails,) = {parameters(s)["max_fails"] for s in primaries}
    (fail_timeout,) = {parameters(s)["fail_timeout"] for s in primaries}
    outlier = config.outlier_detection
    assert outlier is not None
    # proxy_next_upstream lists http_502/503/504 but not http_500: gateway failures count
    next_upstream = one["proxy_next_upstream"]
    assert "http_500" not in next_upstream and outlier.consecutive_5xx == 10_000
    assert outlier.consecutive_gateway_failure == int(max_fails)
    assert outlier.consecutive_local_origin_failure == int(max_fails)
    assert outlier.base_ejection_time == outlier.max_ejection_time == seconds(fail_timeout)

    assert config.pool.maxsize == int(one["keepalive"][0]) and not config.pool.block
    assert config.pool.idle_timeout == seconds(one["keepalive_timeout"][0])
    assert config.timeout == (seconds(one["proxy_connect_timeout"][0]),
                              seconds(one["proxy_read_timeout"][0]))
    assert config.retries.attempts == int(one["proxy_next_upstream_tries"][0])
    assert config.retries.statuses == {int(word[5:]) for word in next_upstream
                                       if word.startswith("http_")}
    assert config.retries.deadline == seconds(one["proxy_next_upstream_timeout"][0])


def test_the_haproxy_example_sends_to_servers_up_and_to_the_backup_only_when_none_is() -> None:
    # The page says: only endpoints that pass their checks get traffic (HAProxy never sends to
    # a server marked down), and the backup takes it when no primary is up, and only then.
    down: set[str] = set()
    users_config = users("from_haproxy.json")
    assert users_config.health_check is not None
    fast_check = users_config.health_check.new(  # the file's check, probing without a network
        type="function", function=lambda endpoint: endpoint.address not in down,
        interval=0.01, jitter=0.0, healthy_threshold=1, unhealthy_threshold=1)
    config = LoadBalancerConfig({"users": users_config.new(health_check=fast_check)})

    def picked() -> set[str]:
        chosen = set()
        for _ in range(200):
            with lb.pick("users") as lease:
                chosen.add(lease.endpoint.address)
        return chosen

    with tai_lb.LoadBalancer.from_config(config) as lb:
        assert picked() == {"10.0.1.11:8001", "10.0.1.12:8001", "10.0.1.13:8001"}
        down.update({"10.0.1.11:8001", "10.0.1.12:8001"})
        assert wait_for(lambda: picked() == {"10.0.1.13:8001"})  # no panic: the one up
        down.add("10.0.1.13:8001")
        assert wait_for(lambda: picked() == {"10.1.1.11:8001"})  # the backup
        down.discard("10.0.1.12:8001")
        assert wait_for(lambda: picked() == {"10.0.1.12:8001"})  # one primary back: failback


def program(name: str) -> str:
    """The path of a Debian-installed server program (scripts/test.sh installs it)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    assert found, f"{name} is missing: apt-get install {name} (scripts/test.sh does)"
    return found


def test_haproxy_accepts_the_example_backend() -> None:
    done = subprocess.run([program("haproxy"), "-c", "-f", str(EXAMPLES / "haproxy.cfg")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_nginx_accepts_the_example_upstream(tmp_path: Path) -> None:
    done = subprocess.run([program("nginx"), "-t", "-q", "-e", "stderr", "-p", f"{tmp_path}/",
                           "-c", str(EXAMPLES / "nginx.conf"), "-g", "pid nginx.pid;"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
