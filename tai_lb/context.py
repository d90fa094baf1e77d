"""Request context: the caller's user id and source IP, for ``user_id`` and ``source_ip`` keys.

Your middleware (or, later, a web integration) sets them for the duration of an incoming
request; balanced requests made meanwhile use them as their routing key when the service's
``hash_key`` is ``"user_id"`` or ``"source_ip"``::

    with tai_lb.context.routing_context(user_id="42", source_ip="203.0.113.7"):
        session.get("http://users/api/profile")

It may also carry a subset value: picks of a service with a ``subset`` rule made inside the
block go to the endpoints whose attribute equals it (``lb.pick()`` has no request to read a
header from; an HTTP request's own header or cookie sets it for that request)::

    with tai_lb.context.routing_context(subset="2"):
        lb.pick("users")
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

__all__ = ["RoutingContext", "current", "routing_context", "subset_value"]


@dataclass(frozen=True)
class RoutingContext:
    """Who the current incoming request is for, and the subset it asks for."""

    user_id: Optional[str] = None
    source_ip: Optional[str] = None
    subset: Optional[str] = None


_EMPTY = RoutingContext()
_current: contextvars.ContextVar[RoutingContext] = contextvars.ContextVar("tai_lb_routing",
                                                                          default=_EMPTY)


def current() -> RoutingContext:
    """The routing context of the running thread (or task)."""
    return _current.get()


@contextlib.contextmanager
def routing_context(user_id: Optional[str] = None, source_ip: Optional[str] = None,
                    subset: Optional[str] = None) -> Iterator[RoutingContext]:
    """Set the user id and source IP used as routing keys, and the subset value, inside the
    ``with`` block."""
    token = _current.set(RoutingContext(user_id, source_ip, subset))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


@contextlib.contextmanager
def subset_value(value: Optional[str]) -> Iterator[RoutingContext]:
    """The current context with its subset value set to ``value``, inside the ``with`` block
    (the HTTP path sets a request's own value this way)."""
    token = _current.set(dataclasses.replace(_current.get(), subset=value))
    try:
        yield _current.get()
    finally:
        _current.reset(token)
