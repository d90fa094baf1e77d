"""Routing: how the endpoints of a service become the one a request gets.

A route is built by a chain of stages, once per change of the service (its endpoints, their
health), off the request path, and published whole; a pick reads the published route and takes
no lock.  The chain, in order (:class:`ServiceRouting` wires it)::

    registry snapshot
      -> Membership        figures per address (members.py)
      -> Unusable          failed health checks and ejections (health.py)
      -> PriorityFailover  the active priority group, failover and failback (priority.py)
      -> HealthyOrPanic    the usable endpoints, or all of the group in panic (health.py)
      -> SlowStart         when endpoints ramp up: the factor of each (slow_start.py)
      -> Locality          when the service has ``locality``: a picker per zone (locality.py)
      -> Affinity          when the service has ``affinity``: adds its selector (affinity.py)
      -> Prepare           the strategy's picker over what is left, shared with the ramping
                           endpoints while some ramp, unless locality set one (prepare.py)
      -> Subsets           when the service has ``subset``: a table per value; wraps the
                           picker, and its selector goes before affinity's (subsets.py)
    per request: route.selectors (subsets, then affinity), then route.picker(key)

Affinity and subsets are selectors.  A new stage is a new module here and one line in the
chain.  A service's rebalancing state (its mode, ramps, events, the snapshot manual mode
applied) is in rebalancing.py.
"""

from __future__ import annotations

from .health import HealthyOrPanic, Unusable
from .members import Membership
from .prepare import Prepare
from .priority import PriorityFailover
from .route import Route, RouteState, Selector, Stage
from .router import Router
from .service import ServiceRouting

__all__ = ["HealthyOrPanic", "Membership", "Prepare", "PriorityFailover", "Route", "RouteState",
           "Router", "Selector", "ServiceRouting", "Stage", "Unusable"]
