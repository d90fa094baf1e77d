"""Reset per-object state in a child process after ``os.fork()``.

A lock held by another thread at the moment of a fork stays held forever in the child, and the
child has none of the parent's threads.  Objects that own locks or threads register a method here;
it runs in the child right after the fork, before any user code.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any, Callable

log = logging.getLogger(__name__)

_hooks: weakref.WeakKeyDictionary[Any, list[Callable[[Any], None]]] = weakref.WeakKeyDictionary()
_hooks_lock = threading.Lock()


def after_fork_in_child(owner: Any, reset: Callable[[Any], None]) -> None:
    """Call ``reset(owner)`` in every forked child for as long as ``owner`` is alive."""
    with _hooks_lock:
        _hooks.setdefault(owner, []).append(reset)


def _run_child_hooks() -> None:
    global _hooks_lock
    _hooks_lock = threading.Lock()  # the parent may have held it during the fork
    for owner, resets in list(_hooks.items()):
        for reset in resets:
            try:
                reset(owner)
            except Exception:
                log.exception("tai-lb: resetting %s after fork failed", type(owner).__name__)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_run_child_hooks)
