"""Priority groups: traffic goes to the best group that can carry it, with hysteresis.

Endpoints carry a ``priority`` (0 first; configured backups come after every primary).  The
current group keeps the traffic while its usable share is at least ``failover_below``; a
lower-priority group takes it over on the same condition; a higher-priority group takes it back
only once its share reaches ``failback_at``, so traffic does not flap between groups on one
check.  When no group qualifies, the one with the largest usable share does.  Envoy chooses the
priority first, then the locality, then the host; so does this chain.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from ..failover import FailoverConfig
    from ..metrics import Metrics
    from ..stats import EndpointStats
    from .route import RouteState

__all__ = ["FailoverEvents", "PriorityFailover"]

log = logging.getLogger(__name__)

Group = tuple[int, tuple["EndpointStats", ...]]


class PriorityFailover:
    """Stage: narrow ``state.candidates`` to the active priority group.

    :param policy: the service's failover thresholds.
    :param changed: called with ``(kind, from_priority, to_priority, usable_shares)`` when the
        active group changes (``kind`` is ``"failover"`` or ``"failback"``), off any lock.
    """

    def __init__(self, policy: FailoverConfig,
                 changed: Callable[[str, int, int, list[float]], None]) -> None:
        self.policy = policy
        self._changed = changed
        self.active: Optional[int] = None  # the active group's priority, once there are several

    def build(self, state: RouteState) -> None:
        """Keep the active group's endpoints (all of them when there is one priority)."""
        if state.priority is not None or not state.everyone:
            return
        groups = _groups(state.everyone)
        if len(groups) > 1:
            state.candidates = self._choose(groups, state.unusable)

    def _choose(self, groups: list[Group], unusable: Collection[str],
                ) -> tuple[EndpointStats, ...]:
        shares = [sum(1 for s in members if s.endpoint.address not in unusable) / len(members)
                  for _, members in groups]
        priorities = [priority for priority, _ in groups]
        current = self.active if self.active is not None else priorities[0]
        current_index = priorities.index(current) if current in priorities else 0
        chosen = None
        for index, share in enumerate(shares):
            need = (self.policy.failback_at if index < current_index
                    else self.policy.failover_below)
            if share >= need:
                chosen = index
                break
        if chosen is None:
            chosen = max(range(len(groups)), key=lambda i: (shares[i], -i))
        priority = priorities[chosen]
        if priority != current:
            self.active = priority
            kind = "failback" if priority < current else "failover"
            self._changed(kind, current, priority, [round(s, 3) for s in shares])
        elif self.active is None:
            self.active = priority
        return groups[chosen][1]


def _groups(everyone: tuple[EndpointStats, ...]) -> list[Group]:
    by_priority: dict[int, list[EndpointStats]] = {}
    for stats in everyone:
        by_priority.setdefault(stats.endpoint.priority, []).append(stats)
    return [(priority, tuple(by_priority[priority])) for priority in sorted(by_priority)]


class FailoverEvents:
    """The balancer's record of failovers and failbacks: the last 100, counted and logged.

    :param metrics: where each switch is counted (``<service>.failover`` or ``.failback``).
    :param clock: the balancer's clock, for each event's ``at``.
    """

    def __init__(self, metrics: Metrics, clock: Callable[[], float]) -> None:
        self._metrics = metrics
        self._clock = clock
        #: the last 100 switches, oldest first, as JSON-serialisable dicts
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)

    def record(self, service: str, kind: str, before: int, after: int,
               shares: list[float]) -> None:
        """Record one switch of ``service``'s active group (called by its priority stage)."""
        self.events.append({"service": service, "kind": kind, "from_priority": before,
                            "to_priority": after, "usable_shares": shares,
                            "at": round(self._clock(), 3)})
        self._metrics.count(service, kind)
        log.warning("tai-lb: %s %s from priority %d to %d (usable shares %s)", service, kind,
                    before, after, shares)
