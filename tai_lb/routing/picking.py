"""Picks with a constraint: another endpoint than some, or one whose breaker admits the request.

The strategy's picker chooses among a route's candidates.  A retry must go elsewhere (``exclude``
names the endpoints tried), and a picked endpoint whose circuit breaker refuses must give way to
one whose breaker admits; these functions do both on the published route, without preparing
strategy state for a single pick.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import TYPE_CHECKING, Optional

from ..exceptions import NoEndpointAvailable
from ..strategies import EXCLUDING

if TYPE_CHECKING:
    from ..stats import EndpointStats
    from ..strategies import RoutingKey
    from .route import Route

__all__ = ["admitted", "excluding", "selected"]


def selected(route: Route, key: Optional[RoutingKey],
             exclude: Collection[str]) -> EndpointStats:
    """The first choice of the route's selectors (affinity), else the strategy's picker's."""
    for selector in route.selectors:
        stats = selector.select(route, key, exclude)
        if stats is not None:
            return stats
    assert route.picker is not None
    return route.picker(key)


def excluding(route: Route, key: Optional[RoutingKey], exclude: Collection[str],
              first: EndpointStats) -> EndpointStats:
    """A candidate not in ``exclude`` (``first`` when every candidate is excluded).

    A strategy may offer its own way (``consistent_hash`` walks its ring to the next endpoint);
    otherwise the picker is asked up to three more times, then a candidate left is drawn at
    random, by weight.
    """
    picker = route.picker
    assert picker is not None
    own = getattr(picker, EXCLUDING, None)
    if own is not None:
        chosen: Optional[EndpointStats] = own(key, exclude)
        return chosen if chosen is not None else first
    for _ in range(3):  # the strategy's own choice, when it soon lands elsewhere
        stats = picker(key)
        if stats.endpoint.address not in exclude:
            return stats
    remaining = [c for c in route.candidates if c.endpoint.address not in exclude]
    if not remaining:
        return first  # everything was tried: another try on one of them beats failing
    # Few remain (retries exclude one endpoint per attempt): weighted at random among them.
    return random.choices(remaining, weights=[c.endpoint.weight for c in remaining])[0]


def admitted(service: str, route: Route, key: Optional[RoutingKey], exclude: Collection[str],
             refused: EndpointStats) -> tuple[EndpointStats, int]:
    """Another endpoint and its breaker ticket, when ``refused``'s breaker refused the request.

    First the other candidates (those not excluded, unless only excluded ones are left), then
    any other endpoint of the service by priority (the next groups, backups): that beats
    refusing the request.

    :raises NoEndpointAvailable: every breaker refuses.
    """
    rejected = {refused.endpoint.address}
    candidates = route.candidates
    while len(rejected) < len(candidates):
        skip = set(exclude) | rejected
        if len(skip) >= len(candidates):
            skip = rejected  # the excluded ones are all that is left: they may do
        stats = excluding(route, key, skip, refused)
        if stats.endpoint.address in rejected:
            break
        ticket = stats.breaker.admit() if stats.breaker is not None else 0
        if ticket is not None:
            return stats, ticket
        rejected.add(stats.endpoint.address)
    for stats in sorted(route.everyone, key=lambda s: s.endpoint.priority):
        if stats.endpoint.address in rejected or stats in candidates:
            continue
        ticket = stats.breaker.admit() if stats.breaker is not None else 0
        if ticket is not None:
            return stats, ticket
        rejected.add(stats.endpoint.address)
    raise NoEndpointAvailable(service, f"{len(rejected)} of {len(route.everyone)} circuit "
                                       "breakers open")
