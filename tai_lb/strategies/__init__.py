"""Load-balancing strategies: small objects that turn a set of endpoints into a picker.

A :class:`Strategy` is configuration only.  For each registry snapshot the balancer calls
:meth:`Strategy.prepare <tai_lb.strategies.Strategy.prepare>` once with the endpoints' live
:class:`~tai_lb.stats.EndpointStats`; the returned *picker* holds whatever the algorithm
precomputes (a hash ring, cumulative weights, the smooth weighted round-robin sequence) and is
called for every pick with the request's routing key.  Pickers take no lock on the common path.

=========================  ===========================================================  ========
name                       picks                                                        per pick
=========================  ===========================================================  ========
``round_robin``            each endpoint in turn                                        O(1)
``weighted_round_robin``   in proportion to weight, spread evenly (nginx's smooth WRR)  O(1)
``random``                 uniformly at random                                          O(1)
``weighted``               at random, in proportion to weight                           O(log n)
``least_connections``      fewest in flight per weight; two random choices past 8       O(1) [#]_
``consistent_hash``        the key's owner on a ketama ring (random without a key)      O(log n)
``maglev``                 the key's owner in a Maglev table (random without a key)     O(1)
``peak_ewma``              two random choices, lower peak-EWMA latency x (in flight+1)  O(1)
=========================  ===========================================================  ========

.. [#] O(log n) when weights differ: the two choices are drawn in proportion to weight.

A plain function ``f(candidates, key) -> EndpointStats`` is accepted wherever a strategy is; it is
wrapped in :class:`FunctionStrategy` and called with every candidate on every pick.

The package's modules, each re-exported here: :mod:`~tai_lb.strategies.base` (the base class,
the picker and routing key types, the function wrapper), :mod:`~tai_lb.strategies.rotation`
(``round_robin``, ``weighted_round_robin``), :mod:`~tai_lb.strategies.randomized` (``random``,
``weighted``), :mod:`~tai_lb.strategies.least_loaded` (``least_connections``, ``peak_ewma``),
:mod:`~tai_lb.strategies.hashing` (``consistent_hash``, and what hashing strategies share),
:mod:`~tai_lb.strategies.maglev` (``maglev``) and :mod:`~tai_lb.strategies.names`
(the names of configuration, :func:`resolve_strategy`).
"""

from __future__ import annotations

from .base import EXCLUDING as EXCLUDING
from .base import FunctionStrategy, Picker, RoutingKey, Strategy
from .base import StrategyFunction as StrategyFunction
from .hashing import ConsistentHash
from .hashing import bucket_index as bucket_index
from .hashing import build_ring as build_ring
from .hashing import key_bytes as key_bytes
from .hashing import key_hash as key_hash
from .hashing import ring_of as ring_of
from .hashing import ring_points as ring_points
from .hashing import shift_bucket_index as shift_bucket_index
from .least_loaded import LeastConnections, PeakEwma
from .maglev import Maglev
from .maglev import build_table as build_table
from .maglev import table_of as table_of
from .names import STRATEGIES, StrategyLike, resolve_strategy
from .randomized import Random, Weighted
from .rotation import RoundRobin, WeightedRoundRobin
from .rotation import smooth_weighted_order as smooth_weighted_order
from .rotation import smooth_weighted_sequence as smooth_weighted_sequence

__all__ = [
    "STRATEGIES",
    "ConsistentHash",
    "FunctionStrategy",
    "LeastConnections",
    "Maglev",
    "PeakEwma",
    "Picker",
    "Random",
    "RoundRobin",
    "RoutingKey",
    "Strategy",
    "StrategyLike",
    "Weighted",
    "WeightedRoundRobin",
    "resolve_strategy",
]
