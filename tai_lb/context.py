"""Request context: the caller's user id and source IP, for ``user_id`` and ``source_ip`` keys.

Your middleware (or, later, a web integration) sets them for the duration of an incoming
request; balanced requests made meanwhile use them as their routing key when the service's
``hash_key`` is ``"user_id"`` or ``"source_ip"``::

    with tai_lb.context.routing_context(user_id="42", source_ip="203.0.113.7"):
        session.get("http://users/api/profile")
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

__all__ = ["RoutingContext", "current", "routing_context"]


@dataclass(frozen=True)
class RoutingContext:
    """Who the current incoming request is for."""

    user_id: Optional[str] = None
    source_ip: Optional[str] = None


_EMPTY = RoutingContext()
_current: contextvars.ContextVar[RoutingContext] = contextvars.ContextVar("tai_lb_routing",
                                                                          default=_EMPTY)


def current() -> RoutingContext:
    """The routing context of the running thread (or task)."""
    return _current.get()


@contextlib.contextmanager
def routing_context(user_id: Optional[str] = None,
                    source_ip: Optional[str] = None) -> Iterator[RoutingContext]:
    """Set the user id and source IP used as routing keys inside the ``with`` block."""
    token = _current.set(RoutingContext(user_id, source_ip))
    try:
        yield _current.get()
    finally:
        _current.reset(token)
