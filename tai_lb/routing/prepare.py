"""The last stage: the strategy prepares its picker over the candidates.

Preparation (a hash ring, cumulative weights, a round-robin order) runs once per change, here,
never per pick.  The strategy may update what its last picker prepared rather than start over
(``consistent_hash`` moves a few points of its ring for a small change).  While endpoints ramp up
(slow start sets ``state.ramp``), picks are shared between them and a second picker over the
others (see ``slow_start.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .slow_start import ramped

if TYPE_CHECKING:
    from ..strategies import Picker, Strategy
    from .route import RouteState

__all__ = ["Prepare"]


class Prepare:
    """Stage: ``state.picker``, the strategy's picker over ``state.candidates``."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self._last: Optional[Picker] = None
        self._steady: Optional[Picker] = None  # the last picker over the endpoints not ramping

    def build(self, state: RouteState) -> None:
        """Prepare the picker (none when there is no candidate; locality's when it set one)."""
        if state.picker is not None:
            return  # zone-aware routing prepared one picker per zone
        if not state.candidates:
            state.picker = None
            return
        last = self._last
        state.picker = (self.strategy.prepare_next(state.candidates, last) if last is not None
                        else self.strategy.prepare(state.candidates))
        self._last = state.picker
        if state.ramp:
            steady = tuple(s for s in state.candidates if s.endpoint.address not in state.ramp)
            last = self._steady
            self._steady = (self.strategy.prepare_next(steady, last) if last is not None
                            else self.strategy.prepare(steady))
            state.picker = ramped(self.strategy, state.picker, self._steady, state.candidates,
                                  state.ramp)
        else:
            self._steady = None  # holds the figures of endpoints that may have gone

    def reset_after_fork(self) -> None:
        """Forget the last picker: it may hold a lock a parent's thread held at the fork."""
        self._last = self._steady = None
