"""Least-loaded picks: ``least_connections`` and ``peak_ewma``.

Both read the endpoints' live figures on every pick (requests in flight, and for ``peak_ewma``
the peak-sensitive latency average) and use the power of two random choices on larger sets, as
Envoy's least_request, Finagle and Linkerd do, so that a pick stays O(1) and takes no lock.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from typing import Any, Optional

from .._settings import check_number
from ..stats import DEFAULT_DECAY, DEFAULT_LATENCY, EndpointStats
from .base import Picker, RoutingKey, Strategy, weight_of

__all__ = ["LeastConnections", "PeakEwma"]

_FULL_SCAN_MAX = 8


def _weights_equal(candidates: Sequence[EndpointStats]) -> bool:
    weights = list(map(weight_of, candidates))
    return weights.count(weights[0]) == len(weights)


class LeastConnections(Strategy):
    """Fewest requests in flight per unit of weight.

    Up to 8 endpoints of equal weight are all compared (ties broken at random); larger or
    weighted sets use the power of two choices: two distinct endpoints drawn at random (in
    proportion to weight) and the less loaded of the two, as Envoy's least_request does.
    """

    name = "least_connections"

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        size = len(items)
        draw = self.rng.random
        if size == 1:
            only = items[0]
            return lambda key: only
        if _weights_equal(items):
            if size <= _FULL_SCAN_MAX:
                def scan(key: Optional[RoutingKey]) -> EndpointStats:
                    # One pass; ties broken uniformly by reservoir sampling.
                    best = items[0]
                    best_load = len(best.load)
                    ties = 1
                    for i in range(1, size):
                        c = items[i]
                        load = len(c.load)
                        if load < best_load:
                            best, best_load, ties = c, load, 1
                        elif load == best_load:
                            ties += 1
                            if draw() * ties < 1.0:
                                best = c
                    return best
                return scan

            def two_choices(key: Optional[RoutingKey]) -> EndpointStats:
                i = int(draw() * size)
                j = int(draw() * (size - 1))
                a, b = items[i], items[j + 1 if j >= i else j]
                return a if len(a.load) <= len(b.load) else b
            return two_choices

        cumulative = list(itertools.accumulate(map(weight_of, items)))
        total = cumulative[-1]
        last = size - 1
        search = bisect.bisect_right

        def weighted_two_choices(key: Optional[RoutingKey]) -> EndpointStats:
            i = min(search(cumulative, draw() * total), last)
            j = i
            for _ in range(3):
                j = min(search(cumulative, draw() * total), last)
                if j != i:
                    break
            else:  # one endpoint holds nearly all the weight: any other will do
                j = (i + 1 + int(draw() * last)) % size
            a, b = items[i], items[j]
            # a.in_flight / a.weight <= b.in_flight / b.weight, without division
            a_load = len(a.load) * b.endpoint.weight
            return a if a_load <= len(b.load) * a.endpoint.weight else b
        return weighted_two_choices


class PeakEwma(Strategy):
    """Power of two choices over peak-EWMA latency x (in flight + 1), as Finagle and Linkerd.

    Each endpoint's cost is its peak-sensitive moving average of latency (a slower response
    takes over at once, faster ones blend in over ``decay`` seconds), decayed towards zero while
    the endpoint gets no traffic, times its requests in flight plus one.  An endpoint with no
    measurement yet costs nothing while idle, so a new endpoint is tried and measured at once,
    and ``default_latency`` per request while its first requests are out (as Finagle, with
    Linkerd's 30 ms).  A failure counts as at least twice the current peak, so an endpoint that
    fails fast never looks fastest.  Two distinct endpoints are drawn at random and the cheaper
    one wins.

    :param decay: time constant of the average in seconds (default 10 s, as Finagle and Linkerd).
    :param default_latency: cost per request in flight of an unmeasured endpoint, in seconds.
    """

    name = "peak_ewma"

    def __init__(self, *, decay: float = DEFAULT_DECAY, default_latency: float = DEFAULT_LATENCY,
                 rng: Optional[random.Random] = None) -> None:
        super().__init__(rng=rng)
        self.decay = check_number(decay, "decay")
        self.default_latency = check_number(default_latency, "default_latency")

    def options(self) -> dict[str, Any]:
        """The averaging settings."""
        return {"decay": self.decay, "default_latency": self.default_latency}

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        size = len(items)
        if size == 1:
            only = items[0]
            return lambda key: only
        draw = self.rng.random
        clock = items[0].clock

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            i = int(draw() * size)
            j = int(draw() * (size - 1))
            a, b = items[i], items[j + 1 if j >= i else j]
            now = clock()
            return a if a.peak_cost(now) <= b.peak_cost(now) else b

        return pick


