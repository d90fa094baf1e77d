"""Random picks: ``random`` (uniform) and ``weighted`` (in proportion to weight).

Both draw from the strategy's random source on every pick and keep no state between picks;
``weighted`` precomputes cumulative weights once per snapshot and bisects them.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Optional

from ..stats import EndpointStats
from .base import Picker, RoutingKey, Strategy, weight_of

__all__ = ["Random", "Weighted"]


class Random(Strategy):
    """Uniformly at random."""

    name = "random"

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        size = len(items)
        draw = self.rng.random

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            return items[int(draw() * size)]

        return pick


class Weighted(Strategy):
    """At random, in proportion to weight (cumulative weights and a binary search)."""

    name = "weighted"

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        cumulative = list(itertools.accumulate(map(weight_of, items)))
        total = cumulative[-1]
        last = len(items) - 1
        draw = self.rng.random
        search = bisect.bisect_right

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            return items[min(search(cumulative, draw() * total), last)]

        return pick

