"""Real Redis servers for the tests, on free loopback ports, started and stopped by fixtures.

Each is a ``redis-server`` process with persistence off (``--save '' --appendonly no``), its
working directory a temporary one of its own.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
import redis

from .conftest import end_process
from .etcdserver import free_port, installed_program


def redis_binary() -> str:
    """The redis-server executable; fails (never skips) the test when it is missing."""
    return installed_program("redis-server", "redis-server")


class RedisServer:
    """One redis-server on 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        """Start redis-server and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self._process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=log, stderr=log)
        log.close()
        client = self.client()
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        text = (self.directory / "redis.log").read_text(errors="replace")
                        pytest.fail(f"redis-server did not start:\n{text[-3000:]}")
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop redis-server (its keys are lost: nothing is saved); again does nothing."""
        process, self._process = self._process, None
        if process is not None:
            end_process(process)

    @property
    def running(self) -> bool:
        """True while the process runs."""
        return self._process is not None and self._process.poll() is None

    def client(self) -> redis.Redis:
        """A client of this server (for the tests' own reads and writes)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2,
                           socket_connect_timeout=2)
