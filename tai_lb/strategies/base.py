"""The base of every strategy, and what all of them share.

:class:`~tai_lb.Strategy` (configuration that :meth:`~tai_lb.Strategy.prepare` turns into a
picker for one snapshot), the :data:`Picker` and :data:`RoutingKey` types, the
:data:`EXCLUDING` attribute a picker may carry, and
:class:`~tai_lb.strategies.FunctionStrategy`, the wrapper that lets a plain function stand
wherever a strategy is accepted.  The strategies themselves live in the modules beside this one.
"""

from __future__ import annotations

import operator
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Callable, ClassVar, Optional, Union

from .._forksafe import ForkRandom
from ..endpoint import Endpoint
from ..stats import EndpointStats

__all__ = ["EXCLUDING", "FunctionStrategy", "Picker", "RoutingKey", "Strategy", "StrategyFunction",
           "weight_of"]

RoutingKey = Union[str, bytes, int]
"""A request's routing key, as used by ``consistent_hash`` and affinity."""

Picker = Callable[[Optional[RoutingKey]], EndpointStats]
"""A prepared strategy: called with the routing key (or None), returns the chosen endpoint."""

StrategyFunction = Callable[[Sequence[EndpointStats], Optional[RoutingKey]],
                            Union[EndpointStats, Endpoint]]
"""A function that serves as a strategy: ``f(candidates, key)`` returns one of the candidates
(its :class:`~tai_lb.EndpointStats` or its :class:`~tai_lb.Endpoint`)."""

weight_of = operator.attrgetter("endpoint.weight")
"""``weight_of(stats)`` is ``stats.endpoint.weight``, in C: ``map(weight_of, candidates)``."""

EXCLUDING = "excluding"
"""A picker may carry ``picker.excluding(key, exclude)``: a pick that avoids the addresses in
``exclude`` (or returns None when none remains), cheaper or truer than the balancer's fallback."""


class Strategy(ABC):
    """Base of every strategy: ``prepare(candidates)`` returns a picker for one snapshot.

    :param rng: the random source (a seeded :class:`random.Random` makes picks repeatable).
        When None, the strategy makes its own, reseeded in every forked child so that workers
        forked from one parent do not pick in step; a source given here is left as it is, and
        children forked after it was given draw the same numbers (seed one per process if they
        must differ).
    """

    name: ClassVar[str] = ""

    def __init__(self, *, rng: Optional[random.Random] = None) -> None:
        self.rng = rng if rng is not None else ForkRandom()

    @abstractmethod
    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        """Precompute what picks need over ``candidates`` (never empty) and return a picker."""

    def prepare_next(self, candidates: Sequence[EndpointStats], previous: Picker) -> Picker:
        """As :meth:`prepare`, for a service whose last picker from this strategy is ``previous``.

        The balancer calls this when a service's candidates change.  A strategy whose
        preparation is costly (a hash ring) may update what ``previous`` holds rather than start
        over; by default, this is :meth:`prepare`.
        """
        return self.prepare(candidates)

    def options(self) -> dict[str, Any]:
        """The strategy's settings, as shown by ``status()``."""
        return {}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({settings})"


class FunctionStrategy(Strategy):
    """Wraps a plain function ``f(candidates, key)`` that returns one of the candidates."""

    def __init__(self, function: StrategyFunction) -> None:
        super().__init__()
        self.function = function
        self.name = getattr(function, "__name__", "function")  # type: ignore[misc]

    def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
        items = tuple(candidates)
        by_address = {c.endpoint.address: c for c in items}
        function = self.function

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            chosen = function(items, key)
            address = chosen.endpoint.address if isinstance(chosen, EndpointStats) else (
                chosen.address if isinstance(chosen, Endpoint) else None)
            found = by_address.get(address) if address is not None else None
            if found is None:
                raise ValueError(f"strategy function {function!r} returned {chosen!r}, "
                                 "which is not one of the candidates")
            return found

        return pick

    def __repr__(self) -> str:
        return f"FunctionStrategy({self.function!r})"

