""":meth:`LoadBalancer.status() <tai_lb.LoadBalancer.status>`, and one service's part of it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any, Callable, Optional

from .request_metrics import summary
from .routing.slow_start import ramp_of
from .routing.subsets import subsets_of

if TYPE_CHECKING:
    from .balancer import LoadBalancer
    from .discovery import DiscoveryWatcher
    from .health import HealthChecker
    from .outlier import OutlierDetector
    from .retry import RetryBudget
    from .routing import Route, ServiceRouting

__all__ = ["balancer_status", "balancer_status_all"]


def balancer_status_all(lb: LoadBalancer, routing_of: Callable[[str], ServiceRouting],
                        budget_of: Callable[[str], Optional[RetryBudget]],
                        failover_events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Every service's endpoints with their figures, and the balancer's, as a
    JSON-serialisable dict (what :meth:`LoadBalancer.status` returns).

    :param routing_of: the routing of a service (made on first use).
    :param budget_of: the retry budget of a service, or None when it has none yet.
    :param failover_events: the balancer's failovers and failbacks.
    """
    services = {}
    rebalancer = lb.topology.rebalancer
    for name in lb.registry.services():
        routing = routing_of(name)
        route = routing.fresh()
        services[name] = balancer_status(
            route, lb.health_checker, lb.outlier_detector, budget_of(name),
            lb.watcher(name), routing.failover.active, routing.members.load)
        services[name]["events"] = rebalancer.events(name)
        services[name]["rebalance"] = rebalancer.service(name).figures()
    return {"closed": lb.closed, "failover_events": list(failover_events),
            "metrics": lb.metrics.snapshot(),
            "health_checker": lb.health_checker.snapshot(),
            "outlier_detection": lb.outlier_detector.snapshot(),
            "services": services}


def balancer_status(route: Route, health: HealthChecker, outliers: OutlierDetector,
                    budget: Optional[RetryBudget], watcher: Optional[DiscoveryWatcher],
                    active_priority: Optional[int], load: Sized) -> dict[str, Any]:
    """The status of the service ``route`` routes, as a JSON-serialisable dict."""
    name = route.snapshot.service
    endpoints: dict[str, Any] = {}
    ramp = ramp_of(route.picker)
    for stats in route.everyone:
        endpoint = stats.endpoint
        entry = endpoint.to_dict()
        del entry["address"]
        # always there (SPEC: breaker state per endpoint): null when the service has no breaker
        entry["breaker"] = None if stats.breaker is None else stats.breaker.snapshot()
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
        factor = ramp.get(endpoint.address)
        if factor is not None:
            entry["slow_start_factor"] = round(factor, 4)
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
