"""Zone-aware routing: callers stay in their zone while it can carry them, and spill over gradually.

Envoy's zone-aware routing, computed once per route build.  With ``c`` the callers' share of a
zone (taken to be the zone's share of the configured endpoints of the active priority group,
unless ``caller_distribution`` gives it) and ``u`` the zone's share of the group's healthy
endpoints, for the local zone ``L``:

* ``u[L] >= c[L]``: the local zone can carry its callers: every pick stays local ("all local");
* otherwise ("spill") the local zone keeps ``u[L] / c[L]`` of the picks, and the rest,
  ``1 - u[L] / c[L]``, goes to the other zones in proportion to their surplus
  ``u[z] - c[z]`` (only the zones where it is positive).

Every endpoint then gets about the same traffic when every caller does the same.  Locality is
off ("off", all zones as one) when the balancer has no zone of its own, when the group has
fewer than ``min_cluster_size`` endpoints, when none of them is in the local zone, and in panic
mode (Envoy's preconditions).  A pick costs one draw choosing the zone, then that zone's picker,
prepared here per zone by the service's strategy: it composes with every strategy.  With a
hashing strategy and a key, the draw is a hash of the key, so a key keeps its zone.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._settings import Settings, check_bool, check_int, check_number, doc, key_text, shown
from ..exceptions import ConfigError
from ..strategies import EXCLUDING, ConsistentHash, Maglev
from .slow_start import ramped_over

_NO_RAMP: Mapping[str, float] = MappingProxyType({})

if TYPE_CHECKING:
    from ..stats import EndpointStats
    from ..strategies import Picker, RoutingKey, Strategy
    from .route import RouteState

__all__ = ["Locality", "LocalityConfig", "ZonePicker", "ZoneSplit", "check_zone", "zone_split"]

Zone = Optional[str]
"""An endpoint's zone; None for an endpoint without one (a zone of its own for the formula)."""

NO_ZONE = "(no zone)"
"""How status() and traces name the endpoints without a zone."""


def check_zone(value: object, key: str) -> Optional[str]:
    """``value`` if it is None or a non-empty string without spaces, else a ConfigError."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or value != value.strip() or len(value) > 253:
        raise ConfigError(key, f"must be a zone name (a non-empty string, no surrounding spaces, "
                               f"at most 253 characters) or null, got {shown(value)}")
    return value


@dataclass(frozen=True)
class LocalityConfig(Settings):
    """Zone-aware routing of a service (the service key ``locality``).

    :param enabled: route by zone (False keeps the key in the file but turns it off).
    :param min_cluster_size: the fewest endpoints (in the active priority group) for zone-aware
        routing; below it the whole group is one (Envoy's default, 6).
    :param caller_distribution: the callers' share per zone, when it is not the endpoints'
        (``{"eu-1a": 2, "eu-1b": 1}``: any non-negative numbers, normalised to sum 1).
    """

    enabled: bool = field(default=True, metadata=doc(allowed="true or false"))
    min_cluster_size: int = field(default=6, metadata=doc("endpoints", low=1, high=1_000_000))
    caller_distribution: Optional[Mapping[str, float]] = field(default=None, metadata=doc(
        "shares", "a mapping of zone names to numbers from 0 to 10^9 (one above 0), or null "
        "(the endpoints' distribution)"))

    def __post_init__(self) -> None:
        check_bool(self.enabled, "enabled")
        check_int(self.min_cluster_size, "min_cluster_size", 1, 1_000_000)
        given = self.caller_distribution
        if given is None:
            return
        if not isinstance(given, Mapping) or not given:
            raise ConfigError("caller_distribution", "must be a non-empty mapping of zone names "
                                                     f"to shares, got {shown(given)}")
        shares: dict[str, float] = {}
        for zone, share in given.items():
            path = f"caller_distribution.{key_text(zone)}"
            check_zone(zone, path)
            shares[zone] = check_number(share, path, 0.0, 1e9, low_open=False, what="a share")
        total = sum(shares.values())
        if total <= 0:
            raise ConfigError("caller_distribution", "needs a zone with a share above 0")
        object.__setattr__(self, "caller_distribution",
                           MappingProxyType({z: s / total for z, s in shares.items()}))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mapping proxy cannot be pickled (a pickled balanced session carries its config).
        given = self.caller_distribution
        return (LocalityConfig, (self.enabled, self.min_cluster_size,
                                 dict(given) if given is not None else None))


@dataclass(frozen=True)
class ZoneSplit:
    """Where a route sends picks, zone by zone, and why (shown by status() and traces).

    :ivar local_zone: the balancer's zone (None when it has none).
    :ivar mode: ``"all local"``, ``"spill"`` or ``"off"``.
    :ivar reason: why, in words.
    :ivar callers: the callers' share per zone.
    :ivar healthy: the zone's share of the group's healthy endpoints.
    :ivar traffic: the share of this balancer's picks each zone gets (sums to 1; empty when off).
    """

    local_zone: Optional[str]
    mode: str
    reason: str
    callers: Mapping[Zone, float]
    healthy: Mapping[Zone, float]
    traffic: Mapping[Zone, float]

    def to_dict(self) -> dict[str, Any]:
        """The split as a JSON-serialisable dict (shares rounded to 4 places)."""
        def named(shares: Mapping[Zone, float]) -> dict[str, float]:
            return {NO_ZONE if z is None else z: round(s, 4) for z, s in shares.items()}

        return {"local_zone": self.local_zone, "mode": self.mode, "reason": self.reason,
                "caller_shares": named(self.callers), "healthy_shares": named(self.healthy),
                "traffic_shares": named(self.traffic)}

    def explain(self, zone: Zone) -> str:
        """Why a pick landed in ``zone``, for the decision trace."""
        name = NO_ZONE if zone is None else zone
        if self.mode == "off":
            return f"zone {name}, locality off: {self.reason}"
        if self.mode == "all local":
            where = "local" if zone == self.local_zone else "retry outside the local zone"
            return f"zone {name} ({where}; all local: {self.reason})"
        keep = self.traffic.get(self.local_zone, 0.0)
        if zone == self.local_zone:
            return f"zone {name} (local; spill: local keeps {keep:.0%})"
        return (f"zone {name} (spill-over: local keeps {keep:.0%}, "
                f"this zone gets {self.traffic.get(zone, 0.0):.0%})")


def _off(local: Optional[str], reason: str) -> ZoneSplit:
    return ZoneSplit(local, "off", reason, {}, {}, {})


def zone_split(local: Optional[str], config: LocalityConfig,
               group: Sequence[EndpointStats], healthy: Sequence[EndpointStats],
               panic: bool = False) -> ZoneSplit:
    """The zone split of a route (the formula in the module's docstring).

    :param local: the balancer's zone.
    :param config: the service's locality settings.
    :param group: every endpoint of the active priority group (healthy or not).
    :param healthy: the usable ones (the route's candidates outside panic).
    :param panic: the route is in panic mode.
    """
    if not config.enabled:
        return _off(local, "disabled")
    if local is None:
        return _off(local, "the balancer has no zone (set zone or TAI_LB_ZONE)")
    if panic:
        return _off(local, "panic mode")
    if len(group) < config.min_cluster_size:
        return _off(local, f"{len(group)} endpoints, fewer than min_cluster_size "
                           f"{config.min_cluster_size}")
    configured = _count(group)
    if local not in configured:
        return _off(local, "no endpoint in the local zone")
    if not healthy:
        return _off(local, "no healthy endpoint")
    counts = _count(healthy)
    up = {z: n / len(healthy) for z, n in counts.items()}
    given = config.caller_distribution
    callers: dict[Zone, float] = {z: n / len(group) for z, n in configured.items()}
    if given is not None:
        callers = dict(given.items())
    local_up, local_callers = up.get(local, 0.0), callers.get(local, 0.0)
    if local_up >= local_callers:
        return ZoneSplit(local, "all local", f"healthy share {local_up:.2f} >= callers' share "
                                             f"{local_callers:.2f}", callers, up, {local: 1.0})
    keep = local_up / local_callers
    surplus = {z: u - callers.get(z, 0.0) for z, u in up.items()
               if z != local and u > callers.get(z, 0.0)}
    total = sum(surplus.values())
    traffic: dict[Zone, float] = {local: keep} if keep > 0 else {}
    for zone, extra in surplus.items():
        traffic[zone] = (1.0 - keep) * extra / total
    return ZoneSplit(local, "spill", f"healthy share {local_up:.2f} < callers' share "
                                     f"{local_callers:.2f}", callers, up, traffic)


def _count(members: Sequence[EndpointStats]) -> dict[Zone, int]:
    counts: dict[Zone, int] = {}
    for stats in members:
        zone = stats.endpoint.zone
        counts[zone] = counts.get(zone, 0) + 1
    return counts


def _key_draw(key: RoutingKey) -> float:
    # A draw in [0, 1) from the key, independent of the ring's hash of it (another digest).
    data = key if isinstance(key, bytes) else str(key).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") / 2.0 ** 64


class ZonePicker:
    """A picker over several zones: one draw chooses the zone, that zone's picker the endpoint.

    :param split: the route's split (its ``traffic``, the local zone first, gives the draw).
    :param pickers: each zone's picker, prepared by the strategy over its healthy endpoints.
    :param members: each zone's healthy endpoints (for retries that exclude some).
    :param draw: a uniform draw in [0, 1) (the strategy's random source).
    :param hashed: a keyed pick draws from the key (hashing strategies).
    """

    __slots__ = ("_bounds", "_draw", "_hashed", "_keep", "_local", "_order", "_pickers",
                 "split")

    def __init__(self, split: ZoneSplit, pickers: Mapping[Zone, Picker],
                 members: Mapping[Zone, Sequence[EndpointStats]], draw: Callable[[], float],
                 hashed: bool) -> None:
        self.split = split
        local = split.local_zone
        self._keep = split.traffic.get(local, 0.0)
        self._local = pickers.get(local)
        others = [(z, s) for z, s in split.traffic.items() if z != local]
        self._pickers = [pickers[z] for z, _ in others]
        bounds, edge = [], self._keep
        for _, share in others:
            edge += share
            bounds.append(edge)
        if bounds:
            bounds[-1] = 1.0  # the last zone takes what rounding leaves
        self._bounds = bounds
        self._draw = draw
        self._hashed = hashed
        # Retries: the zones by share of traffic, then those that get none (all of them usable).
        ranked = sorted(pickers, key=lambda z: -split.traffic.get(z, 0.0))
        self._order = [(pickers[z], members[z]) for z in ranked]

    def __call__(self, key: Optional[RoutingKey]) -> EndpointStats:
        draw = _key_draw(key) if self._hashed and key is not None else self._draw()
        if draw < self._keep:
            return self._local(key)  # type: ignore[misc]  # keep > 0: the local zone has one
        pickers = self._pickers
        return pickers[min(bisect.bisect_right(self._bounds, draw), len(pickers) - 1)](key)

    def picker(self) -> Picker:
        """The route's picker: a function doing what calling this object does, with the locals
        it needs bound (a call of it costs less than a call of an object), carrying
        ``excluding`` and ``split``."""
        keep, local, bounds, pickers, draw = (self._keep, self._local, self._bounds,
                                              self._pickers, self._draw)
        last = len(pickers) - 1
        right = bisect.bisect_right
        pick: Picker
        if self._hashed:
            def pick(key: Optional[RoutingKey]) -> EndpointStats:
                value = _key_draw(key) if key is not None else draw()
                if value < keep:
                    return local(key)  # type: ignore[misc]
                return pickers[min(right(bounds, value), last)](key)
        elif not pickers:  # all local: no draw needed
            assert local is not None

            def pick(key: Optional[RoutingKey]) -> EndpointStats:
                return local(key)
        elif len(pickers) == 1:
            other = pickers[0]

            def pick(key: Optional[RoutingKey]) -> EndpointStats:
                return local(key) if draw() < keep else other(key)  # type: ignore[misc]
        else:
            def pick(key: Optional[RoutingKey]) -> EndpointStats:
                value = draw()
                if value < keep:
                    return local(key)  # type: ignore[misc]
                return pickers[min(right(bounds, value), last)](key)

        setattr(pick, EXCLUDING, self.excluding)
        pick.split = self.split  # type: ignore[attr-defined]
        return pick

    def excluding(self, key: Optional[RoutingKey],
                  exclude: Collection[str]) -> Optional[EndpointStats]:
        """A pick avoiding ``exclude``: a fresh draw first, then zone by zone (None if all are
        excluded)."""
        for _ in range(3):
            stats = self(key)
            if stats.endpoint.address not in exclude:
                return stats
        for picker, members in self._order:
            own = getattr(picker, EXCLUDING, None)
            if own is not None:
                chosen: Optional[EndpointStats] = own(key, exclude)
                if chosen is not None:
                    return chosen
                continue
            for stats in members:
                if stats.endpoint.address not in exclude:
                    return stats
        return None


class Locality:
    """Stage: the zone split of the route and, unless it is off, its :class:`ZonePicker`.

    It runs after :class:`~tai_lb.routing.HealthyOrPanic`; the picker it sets is the route's
    (the :class:`~tai_lb.routing.Prepare` stage then leaves it).  Subsets prepare their own
    pickers through :meth:`prepare`.

    :param config: the service's locality settings.
    :param zone: the balancer's zone.
    """

    def __init__(self, config: LocalityConfig, zone: Optional[str]) -> None:
        self.config = config
        self.zone = zone
        self._last: dict[Any, Picker] = {}  # (part, zone) -> the last picker, for prepare_next

    def build(self, state: RouteState) -> None:
        """Set ``state.locality`` and, when zones matter, ``state.picker``."""
        candidates = state.candidates
        group = _group(state.everyone, candidates)
        split, picker = self.prepare(group, candidates, state.panic, state.strategy,
                                     ramp=state.ramp)
        state.locality = split
        if picker is not None:
            state.picker = picker

    def prepare(self, group: Sequence[EndpointStats], healthy: Sequence[EndpointStats],
                panic: bool, strategy: Strategy, part: Any = None,
                ramp: Mapping[str, float] = _NO_RAMP) -> tuple[ZoneSplit, Optional[Picker]]:
        """The split of ``group`` and its picker over ``healthy`` (None when locality is off):
        a :class:`ZonePicker`'s :meth:`~ZonePicker.picker`.

        :param part: what the pickers are cached under (a subset's value; None: the route).
        :param ramp: the slow-start factor of each endpoint ramping up: within its zone, it
            gets that share of its full share of picks, as without zones.
        """
        split = zone_split(self.zone, self.config, group, healthy, panic)
        if split.mode == "off":
            return split, None
        members: dict[Zone, list[EndpointStats]] = {}
        for stats in healthy:
            members.setdefault(stats.endpoint.zone, []).append(stats)
        pickers: dict[Zone, Picker] = {}
        for zone, items in members.items():
            last = self._last.get((part, zone))
            picker = (strategy.prepare_next(items, last) if last is not None
                      else strategy.prepare(items))
            self._last[(part, zone)] = picker
            pickers[zone] = ramped_over(strategy, picker, items, ramp)
        for gone in [k for k in self._last if k[0] == part and k[1] not in members]:
            del self._last[gone]
        return split, ZonePicker(split, pickers, members, strategy.rng.random,
                                 isinstance(strategy, (ConsistentHash, Maglev))).picker()

    def keep_parts(self, parts: Collection[Any]) -> None:
        """Forget the pickers of subsets no longer there (the route's own are kept)."""
        for gone in [k for k in self._last if k[0] is not None and k[0] not in parts]:
            del self._last[gone]

    def reset_after_fork(self) -> None:
        """Forget the last pickers: one may hold a lock a parent's thread held at the fork."""
        self._last = {}


def _group(everyone: Sequence[EndpointStats],
           candidates: Sequence[EndpointStats]) -> Sequence[EndpointStats]:
    # The active priority group: every endpoint of the candidates' priority.
    if not candidates:
        return ()
    priority = candidates[0].endpoint.priority
    if all(s.endpoint.priority == priority for s in everyone):
        return everyone
    return tuple(s for s in everyone if s.endpoint.priority == priority)
