"""`Router`: builds one service's route through the chain of stages and publishes it.

grpc-go's rule: a balancer builds a new picker whenever its state changes, and a pick never
blocks.  A change (the registry's, a health check's, an ejection) calls :meth:`Router.update`
on the thread that made it; that thread builds the route and publishes it, and picks go on
with the last published route meanwhile.  Only a service's first pick builds on the request
path.  Builds of one service never overlap: a change that arrives during a build marks the
route dirty and the building thread builds again before it lets go.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Optional

from .. import _forksafe
from ..exceptions import UnknownService
from .route import Route, RouteState, Stage

if TYPE_CHECKING:
    from ..registry import ServiceSnapshot
    from ..strategies import Strategy

__all__ = ["Router"]

log = logging.getLogger(__name__)


class Router:
    """The published route of one service and the chain that builds it.

    :param service: the service routed.
    :param stages: the chain, in order; each stage's :meth:`~Stage.build` runs once per build.
    :param snapshot: returns the registry's current snapshot of the service (None once it is
        gone).
    :param strategy: the service's strategy.
    """

    def __init__(self, service: str, stages: Sequence[Stage],
                 snapshot: Callable[[], Optional[ServiceSnapshot]], strategy: Strategy) -> None:
        self.service = service
        self.stages = tuple(stages)
        self.strategy = strategy
        self._snapshot = snapshot
        self._lock = threading.Lock()  # held by the thread building; picks never take it
        self._dirty = False
        #: the route picks use; replaced whole by each build
        self.route: Optional[Route] = None
        self.builds = 0
        self.build_errors = 0
        _forksafe.after_fork_in_child(self, Router._reset_after_fork)

    def _reset_after_fork(self) -> None:
        # A picker may step under a lock of its own that a parent's thread held: the child
        # builds its routes again, on first use.
        _forksafe.inherited(self._lock, self.route)
        self._lock = threading.Lock()
        self._dirty = False
        self.route = None

    def build(self, snapshot: ServiceSnapshot) -> Route:
        """Run the chain over ``snapshot`` and return the route (not published)."""
        state = RouteState(self.service, snapshot, self.strategy)
        for stage in self.stages:
            stage.build(state)
        return Route(state)

    def update(self) -> None:
        """Build and publish a route for the current state, unless another thread is building,
        in which case that thread builds again when it is done.  Never raises: a failed build
        is logged and counted, and the last route stays."""
        self._dirty = True
        self._build_while_dirty()

    def _build_while_dirty(self) -> None:
        # A change sets the flag, then tries the lock; a holder checks the flag again after it
        # lets go.  So a change that found the lock taken is built for by the holder, whether
        # the holder is update() or a first pick.
        while self._dirty and self._lock.acquire(blocking=False):
            try:
                while self._dirty:
                    self._dirty = False
                    self._publish()
            except Exception:
                self.build_errors += 1
                log.exception("tai-lb: building the route of %s failed; the last one stays",
                              self.service)
            finally:
                self._lock.release()

    def current(self) -> Route:
        """The published route, built here and now if there is none yet (a service's first
        pick, or the first after a fork)."""
        route = self.route
        if route is not None:
            return route
        with self._lock:  # the first pick of a service waits for its first route
            if self.route is None:
                self._dirty = False
                self._publish()
        self._build_while_dirty()  # a change that came during the build found the lock taken
        route = self.route
        assert route is not None
        return route

    def fresh(self) -> Route:
        """The route for the registry's current snapshot, waiting for a build if need be (for
        inspection: status() and stats(), never picks)."""
        current = self.current()
        if current.snapshot is self._snapshot():
            return current
        with self._lock:
            self._dirty = False
            self._publish()
        self._build_while_dirty()
        route = self.route
        assert route is not None
        return route

    def _publish(self) -> None:
        # Called with the lock held.
        snapshot = self._snapshot()
        if snapshot is None:
            raise UnknownService(self.service)
        self.route = self.build(snapshot)
        self.builds += 1
