"""Reset per-object state in a child process after ``os.fork()``.

A lock held by another thread at the moment of a fork stays held forever in the child, and the
child has none of the parent's threads.  Objects that own locks or threads register a method here;
it runs in the child right after the fork, before any user code.

A reset replaces what it must not use; it never frees what it replaces.  Freeing an inherited
object may run code that takes one of its locks (a urllib3 pool's finalizer empties its queue
under the queue's lock), and a parent's thread may have held that lock at the fork: the child
would hang inside ``os.fork()``.  So a reset hands every object it replaces to :func:`inherited`,
which keeps it alive for the life of the process.

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
# What resets replaced in this process, kept for ever: see the module's docstring.  It grows by
# one set of objects per fork in the process's ancestry, not per request.
_inherited: list[Any] = []


def after_fork_in_child(owner: Any, reset: Callable[[Any], None]) -> None:
    """Call ``reset(owner)`` in every forked child for as long as ``owner`` is alive."""
    with _hooks_lock:
        _hooks.setdefault(owner, []).append(reset)


def inherited(*objects: Any) -> None:
    """Keep ``objects`` (what a reset replaced) alive for good: never free them in the child."""
    _inherited.append(objects)


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
    inherited(_hooks_lock)
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
