"""Flask integration: ``TaiLB(app)`` gives the app its balancer and routing context.

::

    app.config["TAI_LB"] = "services.yaml"       # or a config dict
    lb = TaiLB(app)                              # or TaiLB() then lb.init_app(app)
    lb.mount_status("/lb-status")                # the status page, optional

    @app.get("/profile")
    def profile():
        return lb.session().get("http://users/api/profile").json()

Settings read from ``app.config`` by :meth:`TaiLB.init_app`: ``TAI_LB`` (required),
``TAI_LB_TRUSTED_PROXY_HEADER``, ``TAI_LB_TRUSTED_PROXIES`` and ``TAI_LB_USER_ID`` (see
:class:`~tai_lb.integrations.WebSettings`); by default the user id is ``flask.g.user_id``.
"""

from __future__ import annotations

import contextvars
import functools
import threading
import weakref
from typing import Any, Optional

import flask
import requests

from .. import context
from ..balancer import LoadBalancer
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

__all__ = ["TaiLB"]

_CONTEXT = "_tai_lb_context"


def _g_user_id(request: flask.Request) -> Optional[Any]:
    return flask.g.get("user_id")


class _AppState:
    """One app's balancer and settings."""

    def __init__(self, app: flask.Flask) -> None:
        config = balancer_config(app.config.get(SETTING))  # checked now, in the master too
        self.settings = WebSettings.read(app.config.get)
        self.process = ProcessBalancer(lambda: config)
        self.user_id = self.settings.user_id or _g_user_id
        self.sessions = threading.local()


class TaiLB:
    """The Flask extension: one balancer per worker process for each app it is set up on.

    ``app.extensions["tai_lb"]`` is this object, and it answers as the app's balancer: any
    public attribute of :class:`~tai_lb.LoadBalancer` it does not define itself (``pick``,
    ``status``, ``route``, ``connection``, ``rebalance``...) is the process's balancer's, so
    ``app.extensions["tai_lb"].status()`` is that balancer's status.  (The extension, rather
    than the balancer, is stored: each worker makes its own balancer after the fork.)
    Nothing is made when the app is set up; the process's balancer is made on the first use
    of :attr:`balancer` (or :meth:`session`, or any of its attributes), in the worker, and
    closed at exit or by :meth:`close`.  Before each request, the request's
    client address, user and cookies and headers become the routing context
    (:mod:`tai_lb.context`); after it, the context is reset.

    :param app: the app to set up now; or call :meth:`init_app` later, once per app.
    """

    def __init__(self, app: Optional[flask.Flask] = None) -> None:
        self.app = app
        self._states: weakref.WeakKeyDictionary[flask.Flask, _AppState] = (
            weakref.WeakKeyDictionary())
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Set ``app`` up: check its ``TAI_LB`` settings and install the routing context.

        :raises ConfigError: a setting is wrong; the message names it (``TAI_LB.services...``).
        """
        state = self._states[app] = _AppState(app)
        app.extensions["tai_lb"] = self
        app.before_request(functools.partial(self._enter, state))
        app.teardown_request(self._leave)

    def _state(self, app: Optional[flask.Flask] = None) -> _AppState:
        app = app or self.app or flask.current_app._get_current_object()  # type: ignore[attr-defined]
        return self._states[app]

    @property
    def balancer(self) -> LoadBalancer:
        """The process's balancer of the app (``self.app``, else the current app)."""
        return self._state().process.get()

    def __getattr__(self, name: str) -> Any:
        # Only for names the extension lacks: the balancer's public API (SPEC: "the balancer
        # at app.extensions['tai_lb']").  Private names never reach it (nor copy or pickle
        # probes made before __init__ has run).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.balancer, name)

    def session(self) -> requests.Session:
        """A balanced :class:`requests.Session` of the balancer, one per thread, kept."""
        state = self._state()
        lb = state.process.get()
        session: Optional[requests.Session] = getattr(state.sessions, "session", None)
        if session is None or getattr(state.sessions, "balancer", None) is not lb:
            session = lb.session()
            state.sessions.session, state.sessions.balancer = session, lb
        return session

    def close(self, app: Optional[flask.Flask] = None) -> None:
        """Close the app's balancer in this process (done at exit anyway)."""
        self._state(app).process.close()

    def mount_status(self, path: str = "/lb-status", app: Optional[flask.Flask] = None, *,
                     refresh: float = DEFAULT_REFRESH) -> str:
        """Serve the status page (:mod:`tai_lb.web`) at ``path``; returns the endpoint name.

        The page is a view of the app like any other: it runs the app's ``before_request``
        functions, so your access control applies.  It shows the worker that answers.
        """
        target = app or self.app
        if target is None:
            raise RuntimeError("mount_status() needs the app: TaiLB(app) or mount_status(app=app)")
        state = self._states[target]
        page = LazyStatusPage(state.process.get, refresh)

        def status_page() -> flask.Response:
            request = flask.request
            code, headers, body = page.render(request.method,
                                              request.query_string.decode("latin-1"))
            return flask.Response(body, status=code, headers=headers)

        target.add_url_rule(path, "tai_lb_status", status_page, methods=["GET", "HEAD"])
        return "tai_lb_status"

    @staticmethod
    def _enter(state: _AppState) -> None:
        state.process.drop_inherited()
        # Nothing is read from the request until an outgoing request needs a key; the hooks
        # set and reset the context variable themselves (no context manager): this is per
        # request.
        request: flask.Request = flask.request._get_current_object()  # type: ignore[attr-defined]
        headers = Deferred(lambda: request.headers)
        token = context.enter(RoutingContext(
            cookies=Deferred(lambda: request.cookies), headers=headers,
            user_id_of=functools.partial(state.user_id, request),
            source_ip_of=functools.partial(state.settings.client_ip, request.remote_addr,
                                           headers.get)))
        setattr(flask.g, _CONTEXT, token)

    @staticmethod
    def _leave(error: Optional[BaseException]) -> None:
        token: Optional[contextvars.Token[RoutingContext]] = flask.g.pop(_CONTEXT, None)
        if token is not None:
            context.leave(token)
