"""``tai-lb status CONFIG_FILE``: probe every endpoint of every service once, print a table.

Each endpoint is probed once, the way the service's ``health_check`` would probe it (a GET of
its path with its expected statuses and timeout, or a TCP connect); an endpoint of a service
with no ``health_check`` gets a TCP connect within ``--timeout`` seconds.  The probes run
concurrently on at most ``--workers`` threads, which end before the command returns.

A service with ``discovery`` asks its source once: the first answer within
``--discovery-timeout`` seconds is probed (with the service's configured ``backups`` after it,
as the balancer would use them).  When no answer comes in time, the service's configured
endpoints, if any, are probed instead, and the summary line says why.  The discovery
``cache_path`` is not read: the command shows what the source says now.

The command exits 0 when every service has at least one healthy endpoint, and 1 when one has
none (no endpoint passed, or it has no endpoints at all).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

from .config import LoadBalancerConfig, ServiceConfig
from .endpoint import Endpoint
from .health import HealthCheckConfig, probe
from .health.probes import HealthTarget

__all__ = ["DEFAULT_DISCOVERY_TIMEOUT", "DEFAULT_TIMEOUT", "DEFAULT_WORKERS", "EndpointReport",
           "ServiceReport", "print_json", "print_table", "probe_services"]

DEFAULT_TIMEOUT = 1.0
"""Seconds a TCP connect may take for a service with no ``health_check``."""

DEFAULT_DISCOVERY_TIMEOUT = 5.0
"""Seconds to wait for the first answer of a service's discovery source."""

DEFAULT_WORKERS = 16
"""Threads that probe at once (at most)."""


@dataclass(frozen=True)
class EndpointReport:
    """The result of one endpoint's probe."""

    endpoint: Endpoint
    healthy: bool
    detail: str
    latency: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"address": self.endpoint.address, "zone": self.endpoint.zone,
                "priority": self.endpoint.priority,
                "state": "healthy" if self.healthy else "unhealthy", "detail": self.detail,
                "latency_ms": round(self.latency * 1000.0, 3)}


@dataclass
class ServiceReport:
    """One service: how its endpoints were found and checked, and what each probe found."""

    name: str
    check: str
    discovery: Optional[dict[str, Any]] = None
    endpoints: list[EndpointReport] = field(default_factory=list)

    @property
    def healthy(self) -> int:
        """Endpoints whose probe passed."""
        return sum(report.healthy for report in self.endpoints)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"check": self.check, "discovery": self.discovery,
                "endpoints_total": len(self.endpoints), "endpoints_healthy": self.healthy,
                "endpoints": [report.to_dict() for report in self.endpoints]}


def _check_of(service: ServiceConfig, timeout: float) -> tuple[HealthCheckConfig, str]:
    """The check to run on the service's endpoints, and its description."""
    config = service.health_check
    if config is None:
        return HealthCheckConfig(type="tcp", timeout=timeout), "tcp connect, no health_check"
    if config.type == "tcp":
        return config, "tcp connect"
    if config.type == "grpc":
        return config, f"grpc health check of {config.service or 'the server'}"
    return config, f"{service.scheme} GET {config.path}"


def _discover(name: str, service: ServiceConfig,
              timeout: float) -> tuple[list[Endpoint], dict[str, Any]]:
    """The service's endpoints from the first answer of its source, and what happened."""
    discovery = service.discovery
    assert discovery is not None
    provider = discovery.provider(name)
    changed = threading.Event()
    deadline = time.monotonic() + timeout
    error = f"no answer within {timeout:g} s"
    found: Optional[list[Endpoint]] = None
    try:
        provider.start(changed.set)  # etcd lists here, then watches on a thread until stop()
        while found is None:
            changed.clear()
            try:
                found = provider.fetch()
            except Exception as failure:  # a source that fails is shown, never raised
                error = f"{type(failure).__name__}: {failure}"[:200]
            remaining = deadline - time.monotonic()
            if found is not None or remaining <= 0:
                break
            changed.wait(min(remaining, 0.1))  # a polled source is asked again
    except Exception as failure:  # start() itself failed
        error = f"{type(failure).__name__}: {failure}"[:200]
    finally:
        provider.stop()
    if found is None:
        endpoints = [*service.endpoints, *service.backups]
        return endpoints, {"type": discovery.type, "answered": False,
                           "detail": f"{error}; {len(endpoints)} configured endpoints probed"}
    taken = {endpoint.address for endpoint in found}
    endpoints = [*found, *(b for b in service.backups if b.address not in taken)]
    return endpoints, {"type": discovery.type, "answered": True,
                       "detail": f"{len(found)} endpoints found"}


def _probe(service: str, scheme: str, endpoint: Endpoint,
           config: HealthCheckConfig) -> EndpointReport:
    started = time.monotonic()
    ok, detail = probe(HealthTarget(service, endpoint, config, scheme, started))
    return EndpointReport(endpoint, ok, detail, time.monotonic() - started)


def probe_services(config: LoadBalancerConfig, timeout: float = DEFAULT_TIMEOUT,
                   discovery_timeout: float = DEFAULT_DISCOVERY_TIMEOUT,
                   workers: int = DEFAULT_WORKERS) -> list[ServiceReport]:
    """Probe every endpoint of every service of ``config`` once; reports in configuration order.

    :param timeout: seconds of the TCP connect for services with no ``health_check``.
    :param discovery_timeout: seconds to wait for a discovery source's first answer.
    :param workers: threads that discover and probe at once (at most); all have ended when
        this returns.
    """
    services = list(config.services.items())
    reports = {name: ServiceReport(name, _check_of(service, timeout)[1])
               for name, service in services}
    # The pool starts a thread only when a job waits and none is idle, so a small
    # configuration gets few threads, and a discovered service of 100 endpoints still gets
    # ``workers`` (a count from the configured endpoints would probe those one at a time).
    with concurrent.futures.ThreadPoolExecutor(max(1, workers),
                                               thread_name_prefix="tai-lb-status") as pool:
        found: dict[str, concurrent.futures.Future[tuple[list[Endpoint], dict[str, Any]]]] = {
            name: pool.submit(_discover, name, service, discovery_timeout)
            for name, service in services if service.discovery is not None}
        probes: list[tuple[str, concurrent.futures.Future[EndpointReport]]] = []
        for name, service in services:
            if name in found:
                endpoints, reports[name].discovery = found[name].result()
            else:
                endpoints = [*service.endpoints, *service.backups]
            check = _check_of(service, timeout)[0]
            probes.extend((name, pool.submit(_probe, name, service.scheme, endpoint, check))
                          for endpoint in endpoints)
        for name, future in probes:
            reports[name].endpoints.append(future.result())
    return list(reports.values())


def print_table(reports: Sequence[ServiceReport], out: TextIO) -> None:
    """One row per endpoint (service, endpoint, zone, state, detail), then one line per service."""
    rows = [("service", "endpoint", "zone", "state", "detail")]
    rows.extend((service.name, report.endpoint.address, report.endpoint.zone or "-",
                 "healthy" if report.healthy else "unhealthy",
                 f"{report.detail}, {report.latency * 1000.0:.1f} ms")
                for service in reports for report in service.endpoints)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                  + f"  {row[4]}\n")
    out.write("\n")
    for service in reports:
        line = (f"{service.name}: {service.healthy} of {len(service.endpoints)} endpoints "
                f"healthy ({service.check})" if service.endpoints else
                f"{service.name}: no endpoints")
        if service.discovery is not None:
            line += f"; {service.discovery['type']} discovery: {service.discovery['detail']}"
        if not service.healthy:
            line += "; NO HEALTHY ENDPOINT"
        out.write(line + "\n")


def print_json(reports: Sequence[ServiceReport], out: TextIO) -> None:
    """The reports as one JSON object: ``ok`` and the services by name."""
    json.dump({"ok": all(service.healthy for service in reports),
               "services": {service.name: service.to_dict() for service in reports}},
              out, indent=2)
    out.write("\n")
