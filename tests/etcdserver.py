"""A real etcd server for the tests, on free loopback ports, started and stopped by fixtures."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from tai_lb.discovery.etcd import EtcdClient, EtcdError

from .conftest import end_process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def installed_program(name: str, package: str) -> str:
    """The executable ``name`` (on PATH or in /usr/bin); fails (never skips) the test when it
    is missing, naming the Debian ``package`` the test command installs."""
    found = shutil.which(name) or (Path(f"/usr/bin/{name}").exists() and f"/usr/bin/{name}")
    if not found:
        pytest.fail(f"{name} is not installed: run `bash scripts/test.sh`, which installs the "
                    f"Debian package {package}")
    return str(found)


def etcd_binary() -> str:
    """The etcd executable; fails (never skips) the test when it is missing."""
    return installed_program("etcd", "etcd-server")


class EtcdServer:
    """One etcd member on 127.0.0.1; its data survives stop() and start()."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self._process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        """Start etcd and wait until it answers."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = (self.directory / "etcd.log").open("ab")
        self._process = subprocess.Popen(
            [etcd_binary(), "--name", "test", "--data-dir", str(self.directory / "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"test={peer}", "--log-level", "warn"],
            stdout=log, stderr=log)
        log.close()
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                client.get_prefix("/")
                break
            except EtcdError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    text = (self.directory / "etcd.log").read_text(errors="replace")
                    pytest.fail(f"etcd did not start:\n{text[-3000:]}")
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """Stop etcd (its data stays for the next start)."""
        process, self._process = self._process, None
        if process is not None:
            end_process(process)

    def client(self) -> EtcdClient:
        """A client of this server (for the tests' own writes)."""
        return EtcdClient([self.url], timeout=2.0)
