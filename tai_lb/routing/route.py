"""What a routing stage works on, and the route the chain publishes.

A :class:`RouteState` goes down the chain once per change of a service (its endpoints or their
health); each stage narrows or annotates it.  What comes out is frozen into a :class:`Route`,
published whole, and read by every pick with no lock until the next one replaces it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Optional, Protocol

if TYPE_CHECKING:
    from ..registry import ServiceSnapshot
    from ..stats import EndpointStats
    from ..strategies import Picker, RoutingKey, Strategy
    from .locality import ZoneSplit

__all__ = ["Route", "RouteState", "Selector", "Stage"]


class RouteState:
    """A route being built: what the stages so far have kept.

    :ivar everyone: every endpoint's figures, in the snapshot's order (set by membership).
    :ivar candidates: the endpoints picks may choose from; each stage may narrow it.
    :ivar unusable: addresses that failed their health checks or are ejected.
    :ivar priority: the one priority all endpoints share, or None when there are several.
    :ivar panic: True when too few candidates are healthy and all of them are used.
    :ivar refusal: why nothing can be picked, when ``candidates`` is empty.
    :ivar ramp: the slow-start factor of each candidate that ramps (see ``slow_start.py``).
    :ivar picker: the strategy's picker over the candidates (set by the last stage, or by
        locality: one picker per zone).
    :ivar locality: the zone split, when the service has ``locality``.
    """

    __slots__ = ("candidates", "everyone", "locality", "panic", "picker", "priority", "ramp",
                 "refusal", "selectors", "service", "snapshot", "strategy", "unusable")

    def __init__(self, service: str, snapshot: ServiceSnapshot, strategy: Strategy) -> None:
        self.service = service
        self.snapshot = snapshot
        self.strategy = strategy
        self.everyone: tuple[EndpointStats, ...] = ()
        self.candidates: tuple[EndpointStats, ...] = ()
        self.unusable: Collection[str] = frozenset()
        self.priority: Optional[int] = None
        self.panic = False
        self.refusal = "no endpoints registered"
        self.ramp: Mapping[str, float] = {}
        self.picker: Optional[Picker] = None
        self.selectors: tuple[Selector, ...] = ()
        self.locality: Optional[ZoneSplit] = None


class Stage(Protocol):
    """One step of building a route: reads and changes a :class:`RouteState`.

    A stage runs off the request path, once per change of its service, never per pick.  It
    may keep state of its own between builds (the active priority group, the last hash ring);
    builds of one service never run at the same time.
    """

    def build(self, state: RouteState) -> None:
        """Narrow or annotate ``state``."""


class Selector(Protocol):
    """A per-request step: may choose an endpoint for a request before the strategy does.

    Affinity and subsets by header are selectors.  ``None`` leaves the choice to the picker.
    A selector never returns an endpoint in ``exclude`` (the ones a retry already tried) while
    another candidate remains.
    """

    def select(self, route: Route, key: Optional[RoutingKey],
               exclude: Collection[str] = ()) -> Optional[EndpointStats]:
        """The endpoint for this request, or None."""


class Route:
    """What picks of one service need, prepared once per change and published whole.

    :ivar snapshot: the registry snapshot it was built from.
    :ivar strategy: the service's strategy.
    :ivar everyone: every endpoint's figures; ``candidates`` the ones picks choose from (the
        healthy ones of the active priority group, or all of that group in panic).
    :ivar picker: the strategy's picker over ``candidates``; None when nothing can be picked,
        and then ``refusal`` says why.
    :ivar selectors: per-request steps tried before the picker.
    :ivar locality: the zone split (None when the service has no ``locality``).
    """

    __slots__ = ("candidates", "everyone", "locality", "panic", "picker", "refusal",
                 "selectors", "snapshot", "strategy")

    def __init__(self, state: RouteState) -> None:
        self.snapshot = state.snapshot
        self.strategy = state.strategy
        self.everyone = state.everyone
        self.candidates = state.candidates
        self.picker = state.picker
        self.panic = state.panic
        self.refusal = state.refusal
        self.selectors = state.selectors
        self.locality = state.locality

    def __repr__(self) -> str:
        return (f"<Route {self.snapshot.service!r} {len(self.candidates)} of "
                f"{len(self.everyone)} pickable{' (panic)' if self.panic else ''}>")
