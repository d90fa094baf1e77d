"""A latency histogram in bounded memory: fixed log-scale buckets and percentile estimates.

The buckets are Prometheus-style cumulative-friendly upper bounds, growing by a factor of
``2 ** 0.25`` (about 19%) from 0.1 ms to about 105 s, plus one bucket for anything slower: 82
integers per histogram, whatever the traffic.  A percentile is estimated by finding the bucket
holding the wanted rank and interpolating inside it on a log scale, so an estimate is within
one bucket's width (under 19%) of the true value, and usually much closer.

Recording is one :func:`bisect.bisect_left` over the bounds and one list increment; it is not
synchronised here: the caller holds its own lock (:class:`~tai_lb.EndpointStats` records under
its per-endpoint lock).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Optional

__all__ = ["BOUNDS", "LatencyHistogram", "bucket_middle", "percentile"]

_FACTOR = 2.0 ** 0.25
BOUNDS: tuple[float, ...] = tuple(0.0001 * _FACTOR ** i for i in range(81))
"""Upper bounds of the buckets in seconds (the last bucket, above ``BOUNDS[-1]``, is open)."""

_bisect = bisect.bisect_left


class LatencyHistogram:
    """Counts of latencies per bucket of :data:`BOUNDS`.

    :ivar counts: one count per bucket, ``len(BOUNDS) + 1`` of them.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)

    def record(self, seconds: float) -> None:
        """Count one latency (the caller holds whatever lock guards this histogram)."""
        self.counts[_bisect(BOUNDS, seconds)] += 1

    @property
    def total(self) -> int:
        """Latencies recorded."""
        return sum(self.counts)

    def percentile(self, fraction: float) -> Optional[float]:
        """The estimated latency below which ``fraction`` (0 to 1) of the latencies fall, in
        seconds; None when nothing was recorded."""
        return percentile(self.counts, fraction)

    @classmethod
    def merged(cls, histograms: Iterable[Sequence[int]]) -> LatencyHistogram:
        """One histogram holding the counts of all of ``histograms`` (lists of counts)."""
        merged = cls()
        counts = merged.counts
        for other in histograms:
            for i, count in enumerate(other):
                counts[i] += count
        return merged


def bucket_middle(bucket: int) -> float:
    """The middle (on a log scale) of bucket number ``bucket``, in seconds: what one latency
    counted there stands for; ``BOUNDS[-1]`` for the open bucket."""
    if bucket >= len(BOUNDS):
        return BOUNDS[-1]
    upper = BOUNDS[bucket]
    if bucket == 0:
        return upper / 2
    return float((upper * BOUNDS[bucket - 1]) ** 0.5)


def percentile(counts: Sequence[int], fraction: float) -> Optional[float]:
    """The ``fraction`` percentile of the bucket counts ``counts``, in seconds, or None."""
    total = sum(counts)
    if total == 0:
        return None
    rank = min(max(fraction, 0.0), 1.0) * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(BOUNDS):  # the open bucket: all that is known is "above the last bound"
                return BOUNDS[-1]
            upper = BOUNDS[i]
            lower = upper / _FACTOR if i else 0.0
            share = (rank - seen) / count
            if lower == 0.0:
                return upper * share
            return float(lower * (upper / lower) ** share)
        seen += count
    return BOUNDS[-1]  # pragma: no cover - rank <= total always lands in a bucket
