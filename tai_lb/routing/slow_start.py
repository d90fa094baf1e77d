"""Slow start: an endpoint added after the balancer was built takes its share of picks gradually.

A weight stage between :class:`~tai_lb.routing.HealthyOrPanic` and the strategy's picker.  An
endpoint that ramps (its addition began a slow start, see :mod:`tai_lb.rebalance`) has, ``t``
seconds after it was added on the balancer's clock, the factor (Envoy's slow start)::

    max(min_weight_percent / 100, (t / window) ** (1 / aggression))

and its weight is multiplied by that factor, so its share of the picks is ``factor x weight /
total`` where ``total`` is the candidates' weights, each ramping one's multiplied by its factor
(with four old endpoints and a new one, all of weight 1: ``0.1 / 4.1`` at first, a fifth at the
end).  :class:`SlowStart` sets ``state.ramp`` (address -> factor) and
:class:`~tai_lb.routing.Prepare` builds the picker around the strategy's, one of two ways:

* :func:`split` (every strategy but the hashing ones): a pick goes to a ramping endpoint with
  that probability, and otherwise to the strategy's picker over the endpoints that do not
  ramp.  The share is set before the strategy
  chooses, so a load-aware strategy (``least_connections``, ``peak_ewma``), which would send
  more to an endpoint that looks idle because it gets little, cannot undo the ramp; and
  ``round_robin``, which reads no weight, ramps too.
* :func:`thinned` (``consistent_hash``, ``maglev``): a pick that lands on a ramping endpoint
  stays there with the probability that gives it the same share (``factor x full total /
  total``, at most 1), else goes to the strategy's picker over the others, so only the keys the
  new endpoint takes over move, gradually.

The factor is read when a route is built, so routes are rebuilt while an endpoint ramps (every
``window / 40`` seconds, at most one second apart, by the ``tai-lb-rebalance`` thread); a pick
reads the published route and takes no lock.  Endpoints present when the balancer was built
start at full weight.  When every candidate ramps, there is nothing to thin towards: they share
the picks as the strategy gives them.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._forksafe import ForkRandom
from .._settings import MAX_SECONDS, Settings, check_number, doc
from ..strategies.base import weight_of

if TYPE_CHECKING:
    from ..stats import EndpointStats
    from ..strategies import Picker, RoutingKey, Strategy
    from .route import RouteState

__all__ = ["KEYED", "SlowStart", "SlowStartConfig", "split", "thinned"]

KEYED = frozenset({"consistent_hash", "maglev"})
"""The strategies whose ramp thins picks by key (:func:`thinned`) rather than :func:`split`."""

_rng = ForkRandom()  # reseeded in every forked child: workers do not thin in step


@dataclass(frozen=True)
class SlowStartConfig(Settings):
    """How a new endpoint's share ramps up (the service key ``slow_start``).

    :param window: seconds from an endpoint's addition to its full weight.
    :param aggression: the ramp's exponent is ``1 / aggression``: 1 ramps linearly, above 1
        faster at first, below 1 slower at first (Envoy's ``aggression``).
    :param min_weight_percent: the least factor of a ramping endpoint's weight, in percent
        (from the moment it is added).
    """

    window: float = field(default=30.0, metadata=doc("seconds", low=0, high=MAX_SECONDS,
                                                     low_open=True))
    aggression: float = field(default=1.0, metadata=doc("exponent", low=0, high=100,
                                                        low_open=True))
    min_weight_percent: float = field(default=10.0, metadata=doc("percent", low=0, high=100))

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", check_number(self.window, "window", 0.0, MAX_SECONDS))
        object.__setattr__(self, "aggression", check_number(
            self.aggression, "aggression", 0.0, 100.0, what="a number"))
        object.__setattr__(self, "min_weight_percent", check_number(
            self.min_weight_percent, "min_weight_percent", 0.0, 100.0, low_open=False,
            what="a percentage"))

    def factor(self, elapsed: float) -> float:
        """The share of its full weight an endpoint has ``elapsed`` seconds after its addition
        (1.0 once the window has passed)."""
        if elapsed >= self.window:
            return 1.0
        ramp: float = (max(elapsed, 0.0) / self.window) ** (1.0 / self.aggression)
        return min(1.0, max(self.min_weight_percent / 100.0, ramp))


class Ramps:
    """The endpoints of one service that ramp: address -> when its slow start began.

    Written by the topology follower (an addition) and by :class:`SlowStart` (a ramp that
    ended), on the threads that change the service or build its route; read by builds.
    """

    def __init__(self, config: SlowStartConfig,
                 ended: Callable[[list[str], float], None]) -> None:
        self.config = config
        self.started: dict[str, float] = {}
        self._ended = ended  # told of the ramps that reached full weight, and the clock

    def factors(self, now: float) -> dict[str, float]:
        """The factor of every ramping endpoint; those at full weight stop ramping."""
        factors: dict[str, float] = {}
        done: list[str] = []
        for address, since in list(self.started.items()):
            factor = self.config.factor(now - since)
            if factor >= 1.0:
                done.append(address)
            else:
                factors[address] = factor
        if done:
            for address in done:
                self.started.pop(address, None)
            self._ended(done, now)
        return factors


class SlowStart:
    """Stage: ``state.ramp``, the factor of each candidate that ramps (none usually).

    :param ramps: the service's ramping endpoints.
    :param clock: the balancer's monotonic clock.
    """

    def __init__(self, ramps: Ramps, clock: Callable[[], float]) -> None:
        self.ramps = ramps
        self.clock = clock

    def build(self, state: RouteState) -> None:
        """Set the factor of the ramping candidates, when some of the candidates do not ramp."""
        if not self.ramps.started:
            return
        factors = self.ramps.factors(self.clock())
        if not factors:
            return
        ramp = {s.endpoint.address: factors[s.endpoint.address] for s in state.candidates
                if s.endpoint.address in factors}
        if ramp and len(ramp) < len(state.candidates):
            state.ramp = ramp


def thinned(picker: Picker, steady: Picker, ramp: Mapping[str, float],
            keep: Optional[Mapping[str, float]] = None) -> Picker:
    """A picker that keeps a pick landing on a ramping endpoint with probability ``keep[address]``
    (by default its factor), and otherwise asks ``steady`` (the strategy's picker over the
    endpoints that do not ramp)."""
    factor_of = (keep if keep is not None else ramp).get
    draw = _rng.random

    def pick(key: Optional[RoutingKey]) -> EndpointStats:
        stats = picker(key)
        factor = factor_of(stats.endpoint.address)
        if factor is None or draw() < factor:
            return stats
        return steady(key)

    pick.ramp = ramp  # type: ignore[attr-defined]  # for inspection: status() shows it
    return pick


def split(steady: Picker, ramping: Sequence[tuple[EndpointStats, float]],
          ramp: Mapping[str, float]) -> Picker:
    """A picker that sends each ramping endpoint its probability's share of the picks (pairs of
    endpoint and probability), and the rest to ``steady``."""
    bounds = list(itertools.accumulate(p for _s, p in ramping))
    chosen = [s for s, _p in ramping]
    last = bounds[-1]
    draw = _rng.random

    def pick(key: Optional[RoutingKey]) -> EndpointStats:
        u = draw()
        if u >= last:
            return steady(key)
        return chosen[bisect.bisect_right(bounds, u)]

    pick.ramp = ramp  # type: ignore[attr-defined]  # for inspection: status() shows it
    return pick


def ramped(strategy: Strategy, picker: Picker, steady: Picker,
           candidates: Sequence[EndpointStats], ramp: Mapping[str, float]) -> Picker:
    """The picker over ``candidates`` while the endpoints in ``ramp`` ramp up: :func:`split`
    or, for hashing strategies, :func:`thinned`."""
    full = sum(map(weight_of, candidates))
    # Each ramping endpoint's weight times its factor (SPEC): the candidates' total shrinks too.
    total = sum(weight_of(s) * ramp.get(s.endpoint.address, 1.0) for s in candidates)
    if total <= 0.0:  # every candidate ramps from 0%: share as the strategy gives
        return picker
    if strategy.name in KEYED:
        # A key lands on an endpoint with its full share (weight / full); kept with probability
        # factor x full / total, it keeps factor x weight / total.
        keep = {address: min(1.0, factor * full / total) for address, factor in ramp.items()}
        return thinned(picker, steady, ramp, keep)
    ramping = [(s, ramp[s.endpoint.address] * weight_of(s) / total) for s in candidates
               if s.endpoint.address in ramp]
    return split(steady, ramping, ramp)


def ramped_over(strategy: Strategy, picker: Picker, members: Sequence[EndpointStats],
                ramp: Optional[Mapping[str, float]]) -> Picker:
    """``picker`` over ``members`` (a zone's, a subset's), made to share with those of them in
    ``ramp`` as :func:`ramped` does, over a picker the strategy prepares for the others; as it
    is when none of them ramps, or all do (none is then favoured)."""
    if not ramp:
        return picker
    steady = [s for s in members if s.endpoint.address not in ramp]
    if not 0 < len(steady) < len(members):
        return picker
    return ramped(strategy, picker, strategy.prepare(steady), members, ramp)


def ramp_of(picker: Optional[Picker]) -> Mapping[str, Any]:
    """The factors of the endpoints ramping under ``picker`` (empty when none ramps)."""
    return getattr(picker, "ramp", None) or {}
