"""`ServiceRouting`: the chain of one service, wired, with its router.

The one place that says which stages a route goes through, in which order.  A new stage is a
new module in this package and one line in :meth:`ServiceRouting.chain`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Set
from typing import TYPE_CHECKING, Callable, Optional

from .affinity import Affinity
from .health import HealthyOrPanic, Unusable
from .locality import Locality
from .members import Membership, StatsFactory
from .prepare import Prepare
from .priority import PriorityFailover
from .rebalancing import RebalanceConfig, ServiceRebalance
from .route import Stage
from .router import Router
from .slow_start import SlowStart
from .subsets import Subsets

if TYPE_CHECKING:
    from ..config import ServiceConfig
    from ..health import HealthChecker
    from ..outlier import OutlierDetector
    from ..registry import ServiceSnapshot
    from .priority import FailoverEvents

__all__ = ["ServiceRouting"]


class ServiceRouting(Router):
    """The router of one service, with its chain of stages.

    :param service: the service's name.
    :param settings: its settings.
    :param snapshot: returns the registry's current snapshot of the service.
    :param make_stats: makes the figures of an endpoint new to the service.
    :param health: the active health checker (consulted when the service has checks).
    :param outliers: the outlier detector (consulted when the service has outlier detection).
    :param events: where failovers and failbacks are recorded.
    :param clock: the balancer's monotonic clock (affinity's TTL and slow start run on it).
    :param zone: the balancer's own zone (zone-aware routing needs one).
    :param rebalancing: the service's rebalancing (its slow starts; in manual mode, routes are
        built from the snapshot it last applied rather than the registry's).
    """

    def __init__(self, service: str, settings: ServiceConfig,
                 snapshot: Callable[[], Optional[ServiceSnapshot]], make_stats: StatsFactory,
                 health: HealthChecker, outliers: OutlierDetector,
                 events: FailoverEvents, clock: Callable[[], float] = time.monotonic,
                 zone: Optional[str] = None,
                 rebalancing: Optional[ServiceRebalance] = None) -> None:
        self.members = Membership(make_stats)
        self.failover = PriorityFailover(settings.failover,
                                         functools.partial(events.record, service))
        strategy = settings.strategy
        self._prepare = Prepare(strategy)
        checks = settings.health_check
        unusable: list[Callable[[], Set[str]]] = []
        if checks is not None:
            unusable.append(functools.partial(health.unhealthy, service))
        if settings.outlier_detection is not None:
            unusable.append(functools.partial(outliers.ejected, service))
        self._unusable = Unusable(*unusable)
        self._panic = HealthyOrPanic(checks.panic_threshold if checks is not None else 0.5)
        #: session affinity, when the service has ``affinity``
        self.affinity = (Affinity(service, settings.affinity, clock)
                         if settings.affinity is not None else None)
        #: zone-aware routing, when the service has ``locality``
        self.locality = (Locality(settings.locality, zone)
                         if settings.locality is not None else None)
        #: routing by endpoint metadata, when the service has ``subset``
        self.subsets = (Subsets(service, settings.subset, self.locality)
                        if settings.subset is not None else None)
        #: the service's rebalancing (picks read its ``applied`` snapshot in manual mode)
        self.rebalancing = (rebalancing if rebalancing is not None
                            else ServiceRebalance(service, RebalanceConfig(), None))
        ramps = self.rebalancing.ramps
        self._slow_start = SlowStart(ramps, clock) if ramps is not None else None
        snapshot = functools.partial(self.rebalancing.snapshot, snapshot)
        super().__init__(service, self.chain(), snapshot, strategy)

    def chain(self) -> list[Stage]:
        """The stages, in order: priority, slow start, locality, then the host's picker."""
        return [
            self.members,    # figures per address
            self._unusable,  # failed checks and ejections
            self.failover,   # the active priority group
            self._panic,     # its usable endpoints, or all of them in panic
            *([self._slow_start] if self._slow_start is not None else []),  # new ones ramp
            *([self.locality] if self.locality is not None else []),  # a picker per zone
            *([self.affinity] if self.affinity is not None else []),  # sticky keys (selector)
            self._prepare,   # the strategy's picker
            *([self.subsets] if self.subsets is not None else []),  # selector, before affinity
        ]

    def close(self) -> None:
        """Stop what runs in the background (affinity's expiry thread)."""
        if self.affinity is not None:
            self.affinity.close()

    def reset_after_fork(self) -> None:
        """In a forked child: fresh locks in the figures, no picker of the parent's."""
        self.members.reset_after_fork()
        self._prepare.reset_after_fork()
        for stage in (self.locality, self.subsets):
            if stage is not None:
                stage.reset_after_fork()
