"""Redis through redis-py, sharded by tai-lb: ``lb.connection()`` hands out pooled clients.

Three ``redis-server`` processes run on free ports of 127.0.0.1 with persistence off (or pass
the addresses of servers of your own: ``python examples/redis_pool.py 127.0.0.1:6379 ...``).
One LoadBalancer shards keys over them with ``consistent_hash`` (the key of each call is the
routing key), with a TCP health check and a circuit breaker per endpoint.  The example:

1. writes 3,000 keys, each to its home server, and counts the keys each server holds;
2. shuts the last server down (``SHUTDOWN NOSAVE``, as a crash loses its keys), waits for the
   health check to take it out, and reads every key back: the keys of the live servers are all
   found where they were (none moved), and only the keys of the stopped server are missed; a
   cache would refill them, and the example does, on the servers that now own them.

It prints the keys per server before and after, the hits and misses, and exits 0 when the keys
were routed around the stopped server as they should.  Needs ``redis-server`` (Debian package
``redis-server``) unless you pass addresses, and ``pip install redis``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import tai_lb

KEYS = 3000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_servers(count: int, directory: str) -> tuple[list[str], list[subprocess.Popen[bytes]]]:
    """Start ``count`` redis-server processes with persistence off; their addresses, processes."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    addresses, processes = [], []
    for _ in range(count):
        port = free_port()
        processes.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL))
        addresses.append(f"127.0.0.1:{port}")
    for address in addresses:
        if not wait_until(lambda address=address: answers(address)):  # type: ignore[misc]
            raise SystemExit(f"redis-server on {address} did not start")
    return addresses, processes


def direct(address: str) -> redis.Redis:
    """A client of one server, outside the balancer (to count its keys)."""
    host, port = address.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), socket_timeout=2, socket_connect_timeout=2,
                       retry=Retry(NoBackoff(), 0))


def answers(address: str) -> bool:
    client = direct(address)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def open_client(endpoint: tai_lb.Endpoint) -> redis.Redis:
    """The factory of lb.connection(): a client holding one connection to one endpoint (module
    level, so it is the same object on every call, and so the same pool).  No retries of its own:
    a failure fails the lease at once, and the balancer decides where the next call goes."""
    return redis.Redis(host=endpoint.host, port=endpoint.port, single_connection_client=True,
                       socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


def served_by(client: redis.Redis) -> str:
    kwargs: dict[str, Any] = client.connection_pool.connection_kwargs
    return f"{kwargs['host']}:{kwargs['port']}"


def key_counts(addresses: list[str], down: str = "") -> dict[str, int]:
    counts = {}
    for address in addresses:
        if address == down:
            continue
        client = direct(address)
        counts[address] = int(client.dbsize())
        client.close()
    return counts


def run(addresses: list[str]) -> bool:
    """The example against running servers; True when the keys were routed as they should."""
    for address in addresses:
        client = direct(address)
        client.flushdb()
        client.close()
    lb = tai_lb.LoadBalancer.from_config({"services": {"cache": {
        "endpoints": addresses,
        "strategy": "consistent_hash",
        "health_check": {"type": "tcp", "interval": 0.1, "timeout": 0.5,
                         "healthy_threshold": 1, "unhealthy_threshold": 1},
        "circuit_breaker": {"fail_max": 3, "reset_timeout": 30}}}})
    with lb:
        home = {}
        for i in range(KEYS):
            key = f"user:{i}"
            with lb.connection("cache", open_client, key=key, max_size=4) as client:
                client.set(key, i)
                home[key] = served_by(client)
        before = key_counts(addresses)

        stopped = addresses[-1]
        client = direct(stopped)
        with contextlib.suppress(redis.ConnectionError):  # it may go away while answering
            client.shutdown(nosave=True)
        client.close()
        if not wait_until(lambda: not lb.health_checker.is_healthy("cache", stopped)):
            print(f"the health check never found {stopped} down", file=sys.stderr)
            return False

        hits = misses = errors = moved_live = 0
        for i in range(KEYS):
            key = f"user:{i}"
            try:
                with lb.connection("cache", open_client, key=key, max_size=4) as client:
                    value = client.get(key)
                    if value is None:  # its server is gone: refill it where it lives now
                        misses += 1
                        client.set(key, i)
                    else:
                        hits += 1
                    if home[key] != stopped and served_by(client) != home[key]:
                        moved_live += 1
            except redis.RedisError:
                errors += 1
        after = key_counts(addresses, down=stopped)

    print(f"{'server':<18}{'keys before':>12}{'keys after':>12}")
    for address in addresses:
        shown = str(after[address]) if address in after else "stopped"
        print(f"{address:<18}{before[address]:>12}{shown:>12}")
    print()
    print(f"reads after {stopped} stopped: {hits} hits, {misses} misses (refilled), "
          f"{errors} errors; keys of live servers that moved: {moved_live}")
    lost = before[stopped]
    ok = (all(count > 0 for count in before.values()) and misses == lost
          and hits == KEYS - lost and errors == 0 and moved_live == 0
          and sum(after.values()) == KEYS)
    print(f"keys routed around the stopped server: {'yes' if ok else 'NO'}")
    return ok


def main(argv: list[str]) -> int:
    if argv:
        return 0 if run(argv) else 1
    with tempfile.TemporaryDirectory(prefix="tai-lb-redis-") as directory:
        addresses, processes = start_servers(3, directory)
        try:
            return 0 if run(addresses) else 1
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(10)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
