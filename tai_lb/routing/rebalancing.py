"""A service's rebalancing settings and state: its mode, its ramps, its events, what it holds.

The per-service half of :mod:`tai_lb.rebalance` (which has the modes, and the balancer-wide
half: the thread, the drain deadlines): routes read it, so it lives beside them.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._settings import MAX_SECONDS, Settings, check_number, doc, shown
from ..exceptions import ConfigError
from .slow_start import Ramps, SlowStartConfig

if TYPE_CHECKING:
    from ..registry import ServiceSnapshot

__all__ = ["ADDRESSES_SHOWN", "EVENTS_KEPT", "MODES", "RebalanceConfig", "ServiceRebalance"]

MODES = ("immediate", "gradual", "manual")
"""The values of ``rebalance.mode``; ``immediate`` is the default."""

EVENTS_KEPT = 100
"""The events kept per service (the oldest go first)."""

ADDRESSES_SHOWN = 20
"""The most addresses an event lists (its ``count`` says how many there were)."""


@dataclass(frozen=True)
class RebalanceConfig(Settings):
    """How a service takes changes of its endpoints (the service key ``rebalance``).

    :param mode: ``"immediate"``, ``"gradual"`` (slow start and bounded drains) or
        ``"manual"`` (changes wait for ``lb.rebalance(service)``).
    :param drain_timeout: the most seconds a removed endpoint drains (gradual and manual
        modes): its pools then close whatever is still in flight.
    """

    mode: str = field(default="immediate", metadata=doc(
        allowed='"immediate", "gradual" or "manual"'))
    drain_timeout: float = field(default=30.0, metadata=doc("seconds", low=0, high=MAX_SECONDS))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", f"must be \"immediate\", \"gradual\" or \"manual\", "
                                      f"got {shown(self.mode)}")
        object.__setattr__(self, "drain_timeout", check_number(
            self.drain_timeout, "drain_timeout", 0.0, MAX_SECONDS, low_open=False))


def _listed(addresses: Iterable[str]) -> dict[str, Any]:
    shown_ = list(addresses)
    return {"addresses": shown_[:ADDRESSES_SHOWN], "count": len(shown_)}


class ServiceRebalance:
    """One service's rebalancing: its mode, its ramping endpoints, its events and (manual) the
    snapshot last applied.

    :param service: the service's name.
    :param config: its ``rebalance`` settings.
    :param slow_start: its slow-start settings, or None when new endpoints take their full
        share at once.
    """

    def __init__(self, service: str, config: RebalanceConfig,
                 slow_start: Optional[SlowStartConfig]) -> None:
        self.service = service
        self.config = config
        #: the last events, oldest first, as JSON-serialisable dicts
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        #: the endpoints ramping up, when the service has slow start
        self.ramps = Ramps(slow_start, self._ramps_ended) if slow_start is not None else None
        #: manual mode: ``{service: the snapshot applied}``, picks' view (None until the
        #: balancer is built, and in the other modes)
        self.applied: Optional[Mapping[str, ServiceSnapshot]] = None
        #: manual mode: changes held since the last rebalance()
        self.held = 0
        self.lock = threading.Lock()  # serialises rebalance() calls of the service
        # Guards held with the applied snapshot: only a counter and a reference under it, so
        # the registry's delivering thread never waits for more than that.
        self._held_lock = threading.Lock()

    @property
    def manual(self) -> bool:
        """True in manual mode."""
        return self.config.mode == "manual"

    @property
    def bounded_drains(self) -> bool:
        """True when drains end after ``drain_timeout`` (gradual and manual modes)."""
        return self.config.mode != "immediate"

    def record(self, kind: str, **figures: Any) -> None:
        """Add an event (``at`` is the wall clock)."""
        self.events.append({"at": round(time.time(), 3), "kind": kind, **figures})

    def figures(self) -> dict[str, Any]:
        """mode, drain_timeout, slow_start (its settings, or None), ramping (how many
        endpoints), held (changes waiting for rebalance() in manual mode)."""
        ramps = self.ramps
        return {"mode": self.config.mode, "drain_timeout": self.config.drain_timeout,
                "slow_start": None if ramps is None else {
                    "window": ramps.config.window, "aggression": ramps.config.aggression,
                    "min_weight_percent": ramps.config.min_weight_percent},
                "ramping": len(ramps.started) if ramps is not None else 0,
                "held": self.held}

    def snapshot(self, current: Callable[[], Optional[ServiceSnapshot]],
                 ) -> Optional[ServiceSnapshot]:
        """The snapshot routes are built from: the applied one in manual mode, else
        ``current()`` (the registry's)."""
        applied = self.applied
        return applied[self.service] if applied is not None else current()

    def hold(self, count: int) -> Optional[int]:
        """Manual mode: count ``count`` changes as held and return the changes held now; None
        (nothing counted) when no snapshot is applied (another mode, or not built yet)."""
        with self._held_lock:
            if self.applied is None:
                return None
            self.held += count
            return self.held

    def take(self, current: Callable[[], Optional[ServiceSnapshot]],
             ) -> tuple[Optional[ServiceSnapshot], Optional[ServiceSnapshot], int]:
        """Manual mode: make ``current()`` the snapshot picks use, in one step with ending
        the count of held changes (a change delivered meanwhile is held for the next
        rebalance(), not lost from the count); returns the snapshot applied until now (None
        in the other modes, which apply nothing), the new one, and the changes held."""
        with self._held_lock:
            applied, snapshot, held = self.applied, current(), self.held
            if applied is None or snapshot is None:
                return None, snapshot, held
            self.applied = MappingProxyType({self.service: snapshot})
            self.held = 0
            return applied[self.service], snapshot, held

    def apply(self, snapshot: Optional[ServiceSnapshot]) -> None:
        """Manual mode: make ``snapshot`` the one picks use."""
        with self._held_lock:
            if snapshot is not None:
                self.applied = MappingProxyType({self.service: snapshot})
            self.held = 0

    def ramp(self, addresses: list[str], now: float) -> None:
        """Begin the slow start of endpoints just added (nothing without slow start)."""
        if self.ramps is None or not addresses:
            return
        self.ramps.started.update(dict.fromkeys(addresses, now))
        self.record("slow_start_began", window=self.ramps.config.window, **_listed(addresses))

    def _ramps_ended(self, addresses: list[str], now: float) -> None:
        self.record("slow_start_ended", **_listed(addresses))
