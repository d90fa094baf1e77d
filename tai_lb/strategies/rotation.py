"""Rotation: ``round_robin`` and ``weighted_round_robin``, each endpoint in turn.

:class:`~tai_lb.strategies.RoundRobin` steps through the candidates from a random start;
:class:`~tai_lb.strategies.WeightedRoundRobin` follows nginx's smooth weighted round robin, whose
period :func:`smooth_weighted_order` computes run by run (or :func:`smooth_weighted_sequence`
steps online when the period is too long).
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
import random
import threading
from collections.abc import Iterator, Sequence
from typing import Optional

from ..stats import EndpointStats
from .base import Picker, RoutingKey, Strategy, weight_of

__all__ = ["RoundRobin", "WeightedRoundRobin", "smooth_weighted_order", "smooth_weighted_sequence"]


class RoundRobin(Strategy):
    """Each endpoint in turn, from a random starting point (so processes do not move in step).

    :param start: the index to start from; random when None.
    """

    name = "round_robin"

    def __init__(self, *, start: Optional[int] = None, rng: Optional[random.Random] = None):
        super().__init__(rng=rng)
        self.start = start

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        size = len(items)
        start = self.start if self.start is not None else self.rng.randrange(size)
        counter = itertools.count(start)  # next() on a count is atomic in CPython

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            return items[next(counter) % size]

        return pick


class WeightedRoundRobin(Strategy):
    """nginx's smooth weighted round robin: shares follow weights, interleaved evenly.

    The whole period (sum of weights over their gcd) is computed once per snapshot when it is at
    most ``max_period`` picks long; past that, picks step the same algorithm under a lock.

    :param start: position in the period to start from; random when None.
    """

    name = "weighted_round_robin"

    def __init__(self, *, start: Optional[int] = None, max_period: int = 1 << 16,
                 rng: Optional[random.Random] = None) -> None:
        super().__init__(rng=rng)
        self.start = start
        self.max_period = max_period

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        weights: list[int] = list(map(weight_of, items))
        divisor = math.gcd(*weights)
        if divisor > 1:
            weights = [weight // divisor for weight in weights]
        period = sum(weights)
        start = self.start if self.start is not None else self.rng.randrange(period)
        if period <= self.max_period:
            order: tuple[EndpointStats, ...] = tuple(
                map(items.__getitem__, smooth_weighted_order(weights, period)))
            counter = itertools.count(start)

            def pick(key: Optional[RoutingKey]) -> EndpointStats:
                return order[next(counter) % period]

            return pick

        # Too long to precompute: step online, from a start within the first round only, so a
        # rebuild never walks millions of steps.
        sequence = smooth_weighted_sequence(weights)
        for _ in range(start % len(items)):
            next(sequence)
        lock = threading.Lock()

        def pick_online(key: Optional[RoutingKey]) -> EndpointStats:
            with lock:
                return items[next(sequence)]

        return pick_online


def smooth_weighted_sequence(weights: Sequence[int]) -> Iterator[int]:
    """Yield nginx's smooth weighted round-robin order of indices into ``weights``, forever.

    nginx adds every weight to its peer's current value, picks the largest (first on ties) and
    takes the total off it.  After t picks a peer's value is ``t*w - total*k`` (k: times picked),
    so among peers of equal weight the largest is the one picked least (then lowest index).  One
    heap per distinct weight makes each step O(distinct weights + log n) instead of O(n).
    """
    total = sum(weights)
    classes: dict[int, list[tuple[int, int]]] = {}
    for index, weight in enumerate(weights):
        classes.setdefault(weight, []).append((0, index))
    heaps = list(classes.items())
    for _, heap in heaps:
        heapq.heapify(heap)
    step = 0
    while True:
        step += 1
        best: Optional[tuple[int, int, list[tuple[int, int]]]] = None
        for weight, heap in heaps:
            picked, index = heap[0]
            value = step * weight - total * picked
            if best is None or value > best[0] or (value == best[0] and index < best[1]):
                best = (value, index, heap)
        assert best is not None
        _, index, heap = best
        picked, _ = heapq.heappop(heap)
        heapq.heappush(heap, (picked + 1, index))
        yield index


def smooth_weighted_order(weights: Sequence[int], count: int) -> list[int]:
    """The first ``count`` indices of :func:`smooth_weighted_sequence`, computed run by run.

    Peers of equal weight are picked in turn, by index, so the sequence is made of runs of one
    weight class taking consecutive turns.  Each run's length follows from the values (linear in
    the step number) of the classes that could overtake it, so the work grows with the number of
    runs, not of steps: a period over 10,000 endpoints of one or two weights takes a few runs,
    each copied as a slice.
    """
    total = sum(weights)
    distinct = set(weights)
    by_weight: dict[int, list[int]] = {}
    if len(distinct) <= 8:  # a pass in C per weight
        for weight in distinct:
            by_weight[weight] = list(itertools.compress(
                range(len(weights)), map(operator.eq, weights, itertools.repeat(weight))))
    else:
        for index, weight in enumerate(weights):
            by_weight.setdefault(weight, []).append(index)
    classes = [(weight, members, len(members)) for weight, members in by_weight.items()]
    picked = [0] * len(classes)  # picks of each class so far
    order: list[int] = []
    step = 1
    while len(order) < count:
        # The winner of this step: nginx's highest value, the lowest index on a tie.  A peer's
        # value is step * weight - total * (its picks so far).
        best = 0
        best_value = best_index = -1
        for number, (weight, members, size) in enumerate(classes):
            rounds, position = divmod(picked[number], size)
            value = step * weight - total * rounds
            if best_index < 0 or value > best_value or (
                    value == best_value and members[position] < best_index):
                best, best_value, best_index = number, value, members[position]
        weight, members, size = classes[best]
        position = picked[best] % size
        run = min(size - position, count - len(order))  # the rest of its round at most
        # A heavier class gains (its weight - this one's) per step on the winner; it takes over
        # when it gets ahead, or draws level with the lower index.
        for number, (other, other_members, other_size) in enumerate(classes):
            if other <= weight:
                continue
            rounds, other_position = divmod(picked[number], other_size)
            gap = best_value - (step * other - total * rounds)
            steps, rest = divmod(gap, other - weight)
            if not (rest == 0 and steps < run
                    and members[position + steps] > other_members[other_position]):
                steps += 1
            run = min(run, steps)
        order += members[position:position + run]
        picked[best] += run
        step += run
    return order

