"""Probes: one check of one endpoint, and what the checks know about it.

:func:`probe` runs one check (an HTTP GET, with SNI and certificate checks for the endpoint's
TLS name over https, a TCP connect, a ``grpc.health.v1`` call (:mod:`tai_lb.health.grpc_probe`),
or a function) and never raises; :class:`EndpointHealth` is the record of an endpoint's checks,
kept on the checker's :class:`HealthTarget` of each endpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Optional

from ..endpoint import Endpoint
from .grpc_probe import grpc_probe
from .settings import HealthCheckConfig

__all__ = ["NO_HISTORY", "EndpointHealth", "HealthTarget", "probe"]


@dataclass
class EndpointHealth:
    """What the checks know about one endpoint of one service."""

    healthy: bool = True
    checked: bool = False
    passes_in_row: int = 0
    failures_in_row: int = 0
    added_at: float = 0.0
    last_check: Optional[float] = None
    history: collections.deque[tuple[float, bool, str]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=10))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {"healthy": self.healthy, "checked": self.checked,
                "passes_in_row": self.passes_in_row, "failures_in_row": self.failures_in_row,
                "history": [{"ok": ok, "detail": detail} for _, ok, detail in self.history]}


NO_HISTORY: collections.deque[tuple[float, bool, str]] = collections.deque(maxlen=0)
"""The history of a target never checked yet: shared, and it keeps nothing."""


class HealthTarget:
    """One checked endpoint of one service, as the checker keeps it: what to probe, when, and
    what the probes found (:attr:`health`).

    The checker owns its targets and changes them under its lock; read them, never change them.
    """

    __slots__ = ("_health", "added_at", "address", "claimed", "config", "due", "endpoint",
                 "running", "scheme", "service", "shared_seq", "skips_in_row")

    def __init__(self, service: str, endpoint: Endpoint, config: HealthCheckConfig, scheme: str,
                 now: float) -> None:
        self.service = service
        self.endpoint = endpoint
        self.address = endpoint.address
        self.config = config
        self.scheme = scheme
        self.due = now
        self.running = False
        self.skips_in_row = 0  # probes replaced by real traffic since the last one that ran
        self.claimed = False  # probed for the processes sharing its checks (health.sharing)
        self.shared_seq: object = None  # the shared result last adopted
        self.added_at = now
        # Made at the first check (by state()): a discovery update that brings 10,000 endpoints
        # should not build 10,000 records, with their history, while it is being applied.
        self._health: Optional[EndpointHealth] = None

    @property
    def health(self) -> EndpointHealth:
        """What the checks know; for a target never checked, a fresh record (not kept)."""
        health = self._health
        if health is None:
            return EndpointHealth(added_at=self.added_at, history=NO_HISTORY)
        return health

    @property
    def healthy(self) -> bool:
        """False only once checks have failed."""
        return self._health is None or self._health.healthy

    @property
    def failing(self) -> bool:
        """True while its last counted probe failed."""
        return self._health is not None and self._health.failures_in_row > 0

    @property
    def share_key(self) -> str:
        """The endpoint's key in a shared file: its address, and its TLS name if any."""
        name = self.endpoint.tls_name
        return self.address if not name else f"{self.address}|{name}"

    def state(self) -> EndpointHealth:
        """The record to update, made at the first call; only under the checker's lock."""
        if self._health is None:
            self._health = EndpointHealth(added_at=self.added_at, history=NO_HISTORY)
        return self._health


def probe(target: HealthTarget) -> tuple[bool, str]:
    """Run one check; returns (passed, detail).  Never raises."""
    config = target.config
    endpoint = target.endpoint
    try:
        if config.type == "function":
            assert config.function is not None
            ok = bool(config.function(endpoint))
            return ok, "function returned " + ("true" if ok else "false")
        if config.type == "tcp":
            with socket.create_connection((endpoint.host, endpoint.port), config.timeout):
                return True, "connected"
        if config.type == "grpc":
            return grpc_probe(target)
        name = endpoint.tls_name or target.service
        connection: http.client.HTTPConnection
        if target.scheme == "https":
            context = ssl.create_default_context(
                cafile=config.verify if isinstance(config.verify, str) else None)
            if config.verify is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            connection = _NamedHTTPSConnection(endpoint.host, endpoint.port, name, context,
                                               config.timeout)
        else:
            connection = http.client.HTTPConnection(endpoint.host, endpoint.port,
                                                    timeout=config.timeout)
        try:
            connection.request("GET", config.path or "/", headers={
                "Host": name, "User-Agent": "tai-lb health check", "Connection": "close"})
            response = connection.getresponse()
            response.read(65536)
            ok = response.status in config.expected_statuses
            return ok, f"HTTP {response.status}"
        finally:
            connection.close()
    except Exception as error:  # a failed probe, whatever the cause
        return False, f"{type(error).__name__}: {error}"[:200]


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address, with SNI and certificate checks for a name."""

    def __init__(self, host: str, port: int, name: str, context: ssl.SSLContext,
                 timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls_name = name
        self._tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=self._tls_name)
