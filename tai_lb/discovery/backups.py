"""The discovery watchers of a balancer, and the configured backups they must not touch.

A service may have both ``discovery`` and ``backups``: discovery answers for the primaries, and
the configured backups stay after them, in priority, whatever the source says.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable

from .base import DiscoveryWatcher

if TYPE_CHECKING:
    from ..config import LoadBalancerConfig
    from ..endpoint import Endpoint
    from ..registry import ServiceRegistry

__all__ = ["discovery_watchers"]


def discovery_watchers(config: LoadBalancerConfig, registry: ServiceRegistry,
                       clock: Callable[[], float]) -> dict[str, DiscoveryWatcher]:
    """A watcher, not started, for every service with ``discovery`` (built without I/O)."""
    return {name: DiscoveryWatcher(name, service.discovery.provider(name),
                                   service.discovery.watch,
                                   functools.partial(_apply, config, registry, name),
                                   functools.partial(_discovered, config, registry, name),
                                   clock)
            for name, service in config.services.items() if service.discovery is not None}


def _apply(config: LoadBalancerConfig, registry: ServiceRegistry, service: str,
           endpoints: Sequence[Endpoint]) -> None:
    """Make a discovery answer the service's endpoints, its configured backups kept after
    them (in priority, and out of the answer's reach)."""
    settings = config.services[service]
    if settings.backups:
        configured_after = max((e.priority for e in settings.endpoints), default=0) + 1
        after = max((e.priority for e in endpoints), default=0) + 1
        taken = {e.address for e in endpoints}
        endpoints = [*endpoints, *(
            b.replace(priority=min(1000, after + b.priority - configured_after))
            for b in settings.backups if b.address not in taken)]
    registry.set_endpoints(service, endpoints)


def _discovered(config: LoadBalancerConfig, registry: ServiceRegistry,
                service: str) -> list[Endpoint]:
    """The service's endpoints but its configured backups (what discovery answers for)."""
    backups = {b.address for b in config.services[service].backups}
    return [e for e in registry.endpoints(service) if e.address not in backups]
