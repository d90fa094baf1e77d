"""Django integration: the process's balancer, the routing context middleware, the status page.

::

    # settings.py
    TAI_LB = "services.yaml"                     # or a config dict
    MIDDLEWARE = [..., "tai_lb.integrations.django.RoutingContextMiddleware"]

    # urls.py
    urlpatterns += tai_lb.integrations.django.status_urls("lb-status/")

    # a view
    from tai_lb.integrations.django import balancer
    balancer().session().get("http://users/api/profile")

Settings: ``TAI_LB`` (required), ``TAI_LB_TRUSTED_PROXY_HEADER``, ``TAI_LB_TRUSTED_PROXIES`` and
``TAI_LB_USER_ID`` (see :class:`~tai_lb.integrations.WebSettings`); by default the user id is
``request.user.pk`` when the user is authenticated (``AuthenticationMiddleware`` must come
before this one).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Optional

import requests
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import path

from .. import context
from ..balancer import LoadBalancer
from ..config import LoadBalancerConfig
from ..context import RoutingContext
from ..web import DEFAULT_REFRESH
from ._common import (
    SETTING,
    Deferred,
    LazyStatusPage,
    ProcessBalancer,
    WebSettings,
    balancer_config,
)

__all__ = ["RoutingContextMiddleware", "balancer", "session", "status_urls", "status_view"]

_config_lock = threading.Lock()
_config: Optional[LoadBalancerConfig] = None


def _balancer_config() -> LoadBalancerConfig:
    """``settings.TAI_LB``, read and checked once per process tree."""
    global _config
    with _config_lock:
        if _config is None:
            _config = balancer_config(getattr(settings, SETTING, None))
        return _config


_process = ProcessBalancer(_balancer_config)
_sessions = threading.local()


def balancer() -> LoadBalancer:
    """The process's balancer, made from ``settings.TAI_LB`` on first use; closed at exit.

    :raises ConfigError: ``TAI_LB`` is missing or wrong; the message names the key.
    """
    return _process.get()


def session() -> requests.Session:
    """A balanced :class:`requests.Session` of :func:`balancer`, one per thread, kept."""
    lb = _process.get()
    current: Optional[requests.Session] = getattr(_sessions, "session", None)
    if current is None or getattr(_sessions, "balancer", None) is not lb:
        current = lb.session()
        _sessions.session, _sessions.balancer = current, lb
    return current


def _user_pk(request: HttpRequest) -> Optional[Any]:
    user = getattr(request, "user", None)  # set by AuthenticationMiddleware, lazily
    return user.pk if user is not None and user.is_authenticated else None


class RoutingContextMiddleware:
    """Makes each request's client address, user and cookies and headers the routing context
    (:mod:`tai_lb.context`) while the view runs.

    The settings are checked when Django loads the middleware (``TAI_LB`` included); the
    balancer is not made then, but on first use.  The user is looked up only when a ``user_id``
    key needs it.  A streamed response's body is produced after the context has ended.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        _balancer_config()
        self.settings = WebSettings.read(functools.partial(getattr, settings))
        self.user_id = self.settings.user_id or _user_pk

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Run the view inside the request's routing context."""
        _process.drop_inherited()
        # Nothing is read from the request until an outgoing request needs a key.
        headers = Deferred(lambda: request.headers)
        token = context.enter(RoutingContext(
            cookies=Deferred(lambda: request.COOKIES), headers=headers,
            user_id_of=functools.partial(self.user_id, request),
            source_ip_of=functools.partial(self.settings.client_ip,
                                           request.META.get("REMOTE_ADDR"), headers.get)))
        try:
            return self.get_response(request)
        finally:
            context.leave(token)


def status_view(request: HttpRequest, refresh: float = DEFAULT_REFRESH) -> HttpResponse:
    """The status page (:mod:`tai_lb.web`) of this worker's balancer, as a Django view."""
    page = LazyStatusPage(_process.get, refresh)
    code, headers, body = page.render(request.method or "GET",
                                      request.META.get("QUERY_STRING", ""))
    response = HttpResponse(body, status=code)
    for name, value in headers:
        response[name] = value
    return response


def status_urls(prefix: str = "lb-status/", *, refresh: float = DEFAULT_REFRESH) -> list[Any]:
    """URL patterns serving the status page at ``prefix``: ``urlpatterns += status_urls()``.

    The page has no access control of its own: protect the prefix as the rest of your site.
    """
    LazyStatusPage(_process.get, refresh)  # checks refresh now
    return [path(prefix, status_view, {"refresh": refresh}, name="tai_lb_status")]
