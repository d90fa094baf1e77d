"""Where two sequences differ: their common head and tail, found by slice comparisons in C.

Used to diff a new endpoint set (or candidate list) against the last one when both come in a
stable order, which discovery sources and snapshots keep: only the window between the common
head and tail then needs a look item by item.  Both sequences must be of one type: a list
never equals a tuple.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["common_head", "common_tail"]


def common_head(a: Sequence[Any], b: Sequence[Any], limit: int) -> int:
    """How many leading items ``a`` and ``b`` have in common, at most ``limit``.

    Halves by slice comparisons (in C), then finishes item by item.
    """
    low, high = 0, limit  # a[:low] == b[:low]; past high, unknown
    if a == b if high == len(a) == len(b) else a[:high] == b[:high]:
        return high
    while high - low > 16:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    while low < high and a[low] == b[low]:
        low += 1
    return low


def common_tail(a: Sequence[Any], b: Sequence[Any], limit: int) -> int:
    """How many trailing items ``a`` and ``b`` have in common, at most ``limit``."""
    end_a, end_b = len(a), len(b)
    low, high = 0, limit  # the last low items are equal; past high, unknown
    if a[end_a - high:] == b[end_b - high:]:
        return high
    while high - low > 16:
        middle = (low + high) // 2
        if a[end_a - middle:end_a - low] == b[end_b - middle:end_b - low]:
            low = middle
        else:
            high = middle
    while low < high and a[end_a - low - 1] == b[end_b - low - 1]:
        low += 1
    return low
