"""Request context: who the incoming request is for, for ``hash_key`` and affinity keys.

A web integration (:mod:`tai_lb.integrations.flask`, :mod:`tai_lb.integrations.django`) or your
own middleware sets it for the duration of an incoming request; balanced requests made meanwhile
read their routing key from it::

    with tai_lb.context.routing_context(user_id="42", source_ip="203.0.113.7",
                                        cookies={"session": "abc"}):
        session.get("http://users/api/profile")

The rule, for a service whose key is

* ``source_ip`` or ``user_id``: the context's value (an outgoing request has neither);
* ``header:NAME`` or ``cookie:NAME``: the outgoing request's own header or cookie when it has
  one, else the incoming request's (the context's ``headers`` and ``cookies``).

The context is only read for routing keys: nothing in it is ever sent to a backend.

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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Optional, Union

from requests.structures import CaseInsensitiveDict

__all__ = ["RoutingContext", "current", "enter", "leave", "routing_context", "subset_value",
           "using"]

_NOTHING: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class RoutingContext:
    """Who the current incoming request is for, and the subset it asks for.

    :param user_id: the user's id, or None.
    :param source_ip: the client's address, or None.
    :param cookies: the incoming request's cookies, by name.
    :param headers: the incoming request's headers (looked up with any case of the name).
    :param user_id_of: called when a ``user_id`` key is needed while ``user_id`` is None, so
        a user that costs a session lookup is only looked up when a key needs it.
    :param source_ip_of: called when a ``source_ip`` key is needed while ``source_ip`` is None.
    :param subset: the value a service's ``subset`` rule selects endpoints by, or None.
    """

    user_id: Optional[str] = None
    source_ip: Optional[str] = None
    cookies: Mapping[str, str] = field(default_factory=lambda: _NOTHING, repr=False,
                                       compare=False)
    headers: Mapping[str, str] = field(default_factory=lambda: _NOTHING, repr=False,
                                       compare=False)
    user_id_of: Optional[Callable[[], Optional[Any]]] = field(default=None, repr=False,
                                                              compare=False)
    source_ip_of: Optional[Callable[[], Optional[str]]] = field(default=None, repr=False,
                                                                compare=False)
    subset: Optional[str] = None

    def user(self) -> Optional[str]:
        """The user id: ``user_id``, else what ``user_id_of()`` returns (as a string)."""
        if self.user_id is not None or self.user_id_of is None:
            return self.user_id
        value = self.user_id_of()
        return None if value is None or value == "" else str(value)

    def source(self) -> Optional[str]:
        """The source IP: ``source_ip``, else what ``source_ip_of()`` returns."""
        if self.source_ip is not None or self.source_ip_of is None:
            return self.source_ip
        return self.source_ip_of() or None

    def header(self, name: str) -> Optional[str]:
        """The incoming request's header ``name`` (any case), or None."""
        return self.headers.get(name) or None

    def cookie(self, name: str) -> Optional[str]:
        """The incoming request's cookie ``name``, or None."""
        return self.cookies.get(name) or None


_EMPTY = RoutingContext()
_current: contextvars.ContextVar[RoutingContext] = contextvars.ContextVar("tai_lb_routing",
                                                                          default=_EMPTY)

#: The routing context of the running thread (or task).  It is the context variable's own
#: ``get``, with no Python function around it: subsets read it on every pick.
current: Callable[[], RoutingContext] = _current.get


def enter(routing: RoutingContext) -> contextvars.Token[RoutingContext]:
    """Make ``routing`` the routing context, as it is, until :func:`leave` is given the token
    this returns.

    For integrations that cannot use a ``with`` block (a framework's before- and after-request
    hooks, a middleware's ``try``/``finally``); :func:`using` otherwise.  The calls must pair
    up, the last entered left first.
    """
    return _current.set(routing)


def leave(token: contextvars.Token[RoutingContext]) -> None:
    """Restore the routing context that was current before the :func:`enter` that returned
    ``token``."""
    _current.reset(token)


@contextlib.contextmanager
def routing_context(user_id: Optional[str] = None, source_ip: Optional[str] = None, *,
                    cookies: Optional[Mapping[str, str]] = None,
                    headers: Optional[Union[Mapping[str, str],
                                            Iterable[tuple[str, str]]]] = None,
                    user_id_of: Optional[Callable[[], Optional[Any]]] = None,
                    subset: Optional[str] = None) -> Iterator[RoutingContext]:
    """Set the routing context of the incoming request inside the ``with`` block.

    The values are copied: changing ``cookies`` or ``headers`` afterwards changes nothing.
    ``headers`` may be a mapping or ``(name, value)`` pairs (a repeated name keeps its last).
    See :class:`RoutingContext` for the parameters.
    """
    with using(RoutingContext(
            user_id, source_ip,
            MappingProxyType(dict(cookies)) if cookies else _NOTHING,
            CaseInsensitiveDict(headers) if headers else _NOTHING,
            user_id_of, subset=subset)) as installed:
        yield installed


@contextlib.contextmanager
def subset_value(value: Optional[str]) -> Iterator[RoutingContext]:
    """The current context with its subset value set to ``value``, inside the ``with`` block
    (the HTTP path sets a request's own value this way)."""
    with using(dataclasses.replace(_current.get(), subset=value)) as installed:
        yield installed


@contextlib.contextmanager
def using(routing: RoutingContext) -> Iterator[RoutingContext]:
    """Make ``routing`` the routing context inside the ``with`` block, as it is.

    For integrations: nothing is copied, so the request's own mappings (whose ``get`` must
    ignore the case of header names) and lookups serve, and a request whose outgoing calls need
    no key pays for none of them.  They must stay valid until the block ends.
    """
    token = _current.set(routing)
    try:
        yield routing
    finally:
        _current.reset(token)
