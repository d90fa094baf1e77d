"""A real DNS server for the tests: dnsmasq on 127.0.0.1, answering for one zone from records
that a test sets.

dnsmasq reads ``host-record`` and ``srv-host`` lines from its configuration file only at start
(SIGHUP re-reads hosts files, not the configuration), so :meth:`DnsServer.apply` restarts it on
the same port, in a few tens of milliseconds.  Names in :data:`ZONE` without records get
NXDOMAIN; names outside it get REFUSED (there is no upstream server).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Optional

import dns.exception
import dns.message
import dns.query
import pytest

from .conftest import end_process

ZONE = "tai.test"
MISSING = ("dnsmasq is not installed: run scripts/test.sh, which installs the Debian package "
           "dnsmasq-base")


def dnsmasq_binary() -> str:
    """The dnsmasq executable; fails (never skips) the test when it is missing."""
    found = shutil.which("dnsmasq")
    if not found and os.access("/usr/sbin/dnsmasq", os.X_OK):  # sbin is often off the PATH
        found = "/usr/sbin/dnsmasq"
    if not found:
        pytest.fail(MISSING)
    return found


def free_port() -> int:
    """A loopback port free for both UDP and TCP (a DNS server listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no loopback port free for both UDP and TCP")


class Srv(NamedTuple):
    """One SRV record's data."""

    target: str
    port: int
    priority: int = 0
    weight: int = 0


class DnsServer:
    """dnsmasq on 127.0.0.1 and a free port, answering for :data:`ZONE` from set records.

    :param ttl: the TTL of every record without its own (dnsmasq's ``local-ttl``), seconds.
    """

    def __init__(self, directory: Path, ttl: int = 1) -> None:
        self.directory = directory
        self.ttl = ttl
        self.port = free_port()
        self.nameserver = "127.0.0.1"
        self.hosts: dict[str, tuple[list[str], Optional[int]]] = {}
        self.srv: dict[str, list[Srv]] = {}
        self.cnames: dict[str, str] = {}
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._config = directory / "dnsmasq.conf"
        self._log = directory / "dnsmasq.log"

    # -- records --------------------------------------------------------------------------------

    def set_host(self, name: str, *addresses: str, ttl: Optional[int] = None) -> None:
        """Give ``name`` these A and AAAA records (none: remove it); :meth:`apply` to serve."""
        if addresses:
            self.hosts[name] = (list(addresses), ttl)
        else:
            self.hosts.pop(name, None)

    def set_srv(self, name: str, *records: Srv) -> None:
        """Give ``name`` these SRV records (none: remove it); :meth:`apply` to serve."""
        if records:
            self.srv[name] = list(records)
        else:
            self.srv.pop(name, None)

    def set_cname(self, alias: str, target: Optional[str]) -> None:
        """Make ``alias`` a CNAME of ``target``, a name with a host record (None: remove it)."""
        if target is None:
            self.cnames.pop(alias, None)
        else:
            self.cnames[alias] = target

    def apply(self) -> None:
        """Write the configuration and, when running, restart on the same port to serve it."""
        lines = [f"port={self.port}", f"listen-address={self.nameserver}", "bind-interfaces",
                 "no-resolv", "no-hosts", "no-poll", f"local=/{ZONE}/",
                 f"local-ttl={self.ttl}"]
        for name, (addresses, ttl) in self.hosts.items():
            # one line per address: a host-record line holds one IPv4 and one IPv6 at most
            lines += [f"host-record={name},{address}" + ("" if ttl is None else f",{ttl}")
                      for address in addresses]
        lines += [f"cname={alias},{target}" for alias, target in self.cnames.items()]
        for name, records in self.srv.items():
            lines += [f"srv-host={name},{r.target},{r.port},{r.priority},{r.weight}"
                      for r in records]
        self._config.write_text("\n".join(lines) + "\n")
        if self.running:
            self.stop()
            self.start()

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether dnsmasq is running."""
        return self._process is not None

    def start(self) -> None:
        """Start dnsmasq in the foreground with the applied records; wait until it answers."""
        if self._process is not None:
            return
        if not self._config.exists():
            self.apply()
        command = [dnsmasq_binary(), "--keep-in-foreground", f"--conf-file={self._config}",
                   "--pid-file=", "--log-facility=-"]
        if os.geteuid() == 0:  # stay this user, not nobody, so the files stay readable
            command.append(f"--user={pwd.getpwuid(os.geteuid()).pw_name}")
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=log)
        self.wait_ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until dnsmasq answers a query (fails the test if it exits or never does)."""
        query = dns.message.make_query(f"ready.{ZONE}", "A")
        deadline = time.monotonic() + timeout
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                self._process = None
                pytest.fail(f"dnsmasq exited:\n{self.log_text()}")
            try:
                dns.query.udp(query, self.nameserver, port=self.port, timeout=0.01)
                return
            except (dns.exception.DNSException, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"dnsmasq did not answer within {timeout} s:\n"
                                f"{self.log_text()}")

    def stop(self) -> None:
        """Stop dnsmasq (the port and the records stay for the next start)."""
        process, self._process = self._process, None
        if process is not None:
            end_process(process, 5)

    def log_text(self) -> str:
        """The end of dnsmasq's log, for failure messages."""
        try:
            return self._log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"


@contextmanager
def running_dns_server(directory: Path, ttl: int = 1) -> Iterator[DnsServer]:
    """A started :class:`DnsServer` with no records, stopped on exit."""
    server = DnsServer(directory, ttl)
    try:
        server.start()
        yield server
    finally:
        server.stop()
