"""One service's part of :meth:`LoadBalancer.status() <tai_lb.LoadBalancer.status>`."""

from __future__ import annotations

from collections.abc import Sized
from typing import TYPE_CHECKING, Any, Optional

from .request_metrics import summary
from .routing.subsets import subsets_of

if TYPE_CHECKING:
    from .discovery import DiscoveryWatcher
    from .health import HealthChecker
    from .outlier import OutlierDetector
    from .retry import RetryBudget
    from .routing import Route

__all__ = ["balancer_status"]


def balancer_status(route: Route, health: HealthChecker, outliers: OutlierDetector,
                    budget: Optional[RetryBudget], watcher: Optional[DiscoveryWatcher],
                    active_priority: Optional[int], load: Sized) -> dict[str, Any]:
    """The status of the service ``route`` routes, as a JSON-serialisable dict."""
    name = route.snapshot.service
    endpoints: dict[str, Any] = {}
    for stats in route.everyone:
        endpoint = stats.endpoint
        entry = endpoint.to_dict()
        del entry["address"]
        if stats.breaker is not None:
            entry["breaker"] = stats.breaker.snapshot()
        outlier = outliers.state(name, endpoint.address)
        if outlier is not None:
            entry["outlier"] = outlier
        checked = health.health(name, endpoint.address)
        if checked is None:
            entry["health"] = "unchecked"
        else:
            entry["health"] = "healthy" if checked.healthy else "unhealthy"
            entry["health_checks"] = checked.to_dict()
        entry.update(stats.snapshot())
        endpoints[endpoint.address] = entry
    if active_priority is None:
        active_priority = min((s.endpoint.priority for s in route.everyone), default=0)
    figures = {type(s).__name__: s.figures() for s in route.selectors if hasattr(s, "figures")}
    return {
        "affinity": figures.get("Affinity"),
        "locality": route.locality.to_dict() if route.locality is not None else None,
        "subset": subsets.figures() if (subsets := subsets_of(route)) is not None else None,
        "discovery": watcher.snapshot() if watcher is not None else None,
        "retry_budget": budget.snapshot() if budget is not None else None,
        "strategy": route.strategy.name,
        "strategy_options": route.strategy.options(),
        "endpoints_total": len(route.everyone),
        "endpoints_pickable": len(route.candidates),
        "panic": route.panic,
        "active_priority": active_priority,
        "in_flight": len(load),
        **summary(s.figures.counts() for s in route.everyone if s.figures is not None),
        "endpoints": endpoints,
    }
