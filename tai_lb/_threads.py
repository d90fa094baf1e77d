"""`ThreadOwner`: an object that starts its one background thread itself, when it has work.

The rebalancer and the affinity stage share this shape: a lock guarding their tables and the
thread's start and end, a stop event, at most one daemon thread started under the lock unless
closed, a ``close()`` that stops it within a second, and a fork hook that leaves the parent's
lock, event and thread behind (never freed in the child: see :mod:`tai_lb._forksafe`).
"""

from __future__ import annotations

import threading
from typing import Optional

from . import _forksafe

__all__ = ["ThreadOwner"]


class ThreadOwner:
    """The lock, stop event and background thread of an object that starts the thread itself.

    The owner starts ``self._thread`` with ``self._lock`` held and only while not
    ``self._closed``; its thread waits on ``self._stop``.  Its fork hook calls
    :meth:`_fresh_after_fork` before anything else.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The background thread while it runs, else None (before any work, and after close)."""
        return self._thread

    def close(self) -> None:
        """Stop the background thread (it ends within a second); safe to call twice."""
        with self._lock:  # no thread starts after this
            self._closed = True
            thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)

    def _fresh_after_fork(self) -> None:
        # In a forked child: the parent's thread does not exist here, and its lock may have been
        # held at the fork.  Fresh ones; the closed flag is kept.
        _forksafe.inherited(self._lock, self._thread, self._stop)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
