"""Reset per-object state in a child process after ``os.fork()``.

A lock held by another thread at the moment of a fork stays held forever in the child, and the
child has none of the parent's threads.  Objects that own locks or threads register a method here;
it runs in the child right after the fork, before any user code.

Random sources the library makes itself are :class:`ForkRandom` instances, reseeded in every
child, so that forked workers do not make the same random choices.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import weakref
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

_hooks: weakref.WeakKeyDictionary[Any, list[Callable[[Any], None]]] = weakref.WeakKeyDictionary()
_hooks_lock = threading.Lock()
_randoms: weakref.WeakSet[ForkRandom] = weakref.WeakSet()


def after_fork_in_child(owner: Any, reset: Callable[[Any], None]) -> None:
    """Call ``reset(owner)`` in every forked child for as long as ``owner`` is alive."""
    with _hooks_lock:
        _hooks.setdefault(owner, []).append(reset)


class ForkRandom(random.Random):
    """A random source of the library's own: reseeded from the OS in every forked child.

    A strategy given no ``rng`` makes one, so workers forked from one parent start their round
    robin at different endpoints and draw different random picks.  A source given by the caller
    (a seeded :class:`random.Random` for repeatable tests) is the caller's and is left alone.
    """

    def __init__(self, x: Optional[int] = None) -> None:
        super().__init__(x)
        with _hooks_lock:
            _randoms.add(self)


def _run_child_hooks() -> None:
    global _hooks_lock
    _hooks_lock = threading.Lock()  # the parent may have held it during the fork
    for rng in list(_randoms):
        rng.seed()  # from os.urandom; in place, so pickers already prepared follow too
    for owner, resets in list(_hooks.items()):
        for reset in resets:
            try:
                reset(owner)
            except Exception:
                log.exception("tai-lb: resetting %s after fork failed", type(owner).__name__)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_run_child_hooks)
