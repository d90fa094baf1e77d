"""`LoadBalancedAdapter`: routes ``http(s)://<service>/...`` requests through the balancer.

The request path::

    Session.send -> LoadBalancedAdapter.send -> [attempt loop, tenacity-driven]
        -> LoadBalancer.pick (excluding endpoints already tried) -> endpoint's urllib3 pool
        -> response (body read inside the loop unless streamed or a redirect) -> lease released

The URL requests sees stays the logical one (``http://users/api``), so its redirect handling,
auth stripping, cookie domains and netrc all work on the service name; only the connection goes
to the endpoint's address, with ``Host`` (and, for HTTPS, SNI and certificate verification) set
to the service name.  Hosts that are not services pass through to plain requests.

The attempt loop of one balanced request is in :mod:`tai_lb.attempts`; :func:`to_requests_error`,
the one place where urllib3's errors are translated, is in ``translate.py`` (re-exported
here).  When every attempt fails the last attempt's exception is raised with the decision trace
attached as ``error.lb_trace``.
"""

from __future__ import annotations

import http.cookies
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Union
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from . import context
from .attempts import CertArg, TimeoutArg, balanced_send
from .config import KeySource
from .strategies import RoutingKey
from .translate import to_requests_error as to_requests_error  # noqa: PLC0414 - documented here

if TYPE_CHECKING:
    from .balancer import LoadBalancer

__all__ = ["LoadBalancedAdapter"]


class LoadBalancedAdapter(HTTPAdapter):
    """A requests transport adapter that balances requests to services over their endpoints.

    Mount it for ``http://`` and ``https://`` (as :meth:`LoadBalancer.session
    <tai_lb.LoadBalancer.session>` does) or for one service's prefix
    (``session.mount("http://users/", adapter)``).  A host that is a service of the balancer is
    balanced; any other host is sent exactly as :class:`requests.adapters.HTTPAdapter` would.

    :param balancer: the :class:`~tai_lb.LoadBalancer` that picks endpoints.
    :param kwargs: passed to :class:`~requests.adapters.HTTPAdapter` (for pass-through hosts).
    """

    def __init__(self, balancer: LoadBalancer, **kwargs: Any) -> None:
        self.balancer = balancer
        super().__init__(**kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = {attr: getattr(self, attr, None) for attr in self.__attrs__}
        state["balancer"] = self.balancer
        return state

    def close(self) -> None:
        """Close pass-through hosts' connections; safe twice (``Session.close()`` does that).

        The balancer's pools are shared by every session and stay open until
        :meth:`LoadBalancer.close <tai_lb.LoadBalancer.close>`; this adapter remains usable.
        """
        super().close()

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: TimeoutArg = None, verify: Union[bool, str] = True,
             cert: CertArg = None,
             proxies: Optional[Mapping[str, str]] = None) -> requests.Response:
        """Send ``request``: balanced if its host is a service, else as plain requests does."""
        parts = urlsplit(request.url or "")
        host = (parts.hostname or "").lower()
        if not host or host not in self.balancer.registry:
            return super().send(request, stream=stream,
                                timeout=timeout,  # type: ignore[arg-type]
                                verify=verify, cert=cert, proxies=proxies)
        return balanced_send(self, request, host, parts.scheme.lower(), parts.netloc, stream,
                             timeout, verify, cert, routing_key)


def routing_key(source: Optional[KeySource], request: requests.PreparedRequest,
                ) -> Optional[RoutingKey]:
    """The routing key of ``request`` according to a service's ``hash_key`` setting.

    A header or cookie the outgoing request lacks is taken from the incoming request's, in the
    routing context (:mod:`tai_lb.context`); ``source_ip`` and ``user_id`` come from there only.
    """
    if source is None:
        return None
    if source.kind == "header":
        value = request.headers.get(source.name or "")
        return value if value else context.current().header(source.name or "")
    if source.kind == "cookie":
        return _cookie(request, source.name or "") or context.current().cookie(source.name or "")
    if source.kind == "function":
        assert source.function is not None
        return source.function(request)
    current = context.current()
    return current.source() if source.kind == "source_ip" else current.user()


def _cookie(request: requests.PreparedRequest, name: str) -> Optional[str]:
    """The cookie ``name`` of the outgoing request's ``Cookie`` header, or None."""
    header = request.headers.get("Cookie")
    if not header:
        return None
    jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
    try:
        jar.load(header)
    except http.cookies.CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None and morsel.value else None
