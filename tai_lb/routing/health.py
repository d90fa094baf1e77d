"""Health and panic: which endpoints are usable, and what to do when too few are.

Two stages around the priority stage.  :class:`Unusable` gathers the addresses that failed their
active health checks or are ejected by outlier detection (the priority stage weighs groups by
what is left); :class:`HealthyOrPanic` then keeps the usable endpoints of the chosen group, or,
when their share falls strictly below the panic threshold, all of them: overloading the few
healthy endpoints would take them down too (Envoy's ``healthy_panic_threshold``).
"""

from __future__ import annotations

from collections.abc import Set
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .route import RouteState

__all__ = ["HealthyOrPanic", "Unusable"]


class Unusable:
    """Stage: ``state.unusable``, the addresses failing checks or ejected (usually none).

    :param sources: each returns a set of unusable addresses of the service (the health
        checker's, the outlier detector's).
    """

    def __init__(self, *sources: Callable[[], Set[str]]) -> None:
        self._sources = sources

    def build(self, state: RouteState) -> None:
        """Gather the unusable addresses from every source."""
        unusable: Set[str] = frozenset()
        for source in self._sources:
            found = source()
            if found:
                unusable = unusable | found if unusable else found
        state.unusable = unusable


class HealthyOrPanic:
    """Stage: keep the usable candidates, or all of them in panic.

    :param threshold: the usable share strictly below which panic starts (0 turns panic off).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def build(self, state: RouteState) -> None:
        """Narrow ``state.candidates`` to the usable ones; set ``panic`` and ``refusal``."""
        candidates = state.candidates
        if not candidates:
            state.refusal = "no endpoints registered"
            return
        state.refusal = ""
        unusable = state.unusable
        if not unusable:
            return
        healthy = tuple(s for s in candidates if s.endpoint.address not in unusable)
        if len(healthy) == len(candidates):
            return
        if len(healthy) < self.threshold * len(candidates):
            state.panic = True  # too few to carry the load: spread it over all of them
            return
        if not healthy:
            state.refusal = (f"{len(candidates)} of {len(candidates)} unhealthy "
                             "(panic mode is off)")
        state.candidates = healthy
