"""Circuit breakers: one ``pybreaker`` breaker per endpoint, driven by recorded outcomes.

``pybreaker.CircuitBreaker.call()`` holds the breaker's lock for the whole call, so running a
request inside it would serialise every request to the endpoint.  Requests run outside; their
outcome is then recorded by calling the breaker with a function that returns (a success) or
raises (a failure) at once, so the lock is held only for that bookkeeping.  pybreaker keeps the
state, the counters and the listeners; tai-lb decides admission with a monotonic, injectable
clock (pybreaker's open timer reads the wall clock):

* **closed**: every request passes;
* **open**: none passes until ``reset_timeout`` seconds have passed since it opened;
* **half-open**: exactly one probe request passes at a time; ``success_threshold`` successes
  close the breaker, one failure opens it again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pybreaker

from . import _forksafe
from ._settings import MAX_SECONDS, Settings, check_int, check_number, doc, shown
from .exceptions import ConfigError

__all__ = ["BreakerConfig", "EndpointBreaker", "FailoverConfig", "FailoverPolicy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BreakerConfig(Settings):
    """The ``circuit_breaker`` settings of a service.

    :param fail_max: failures in a row that open an endpoint's breaker.
    :param reset_timeout: seconds an open breaker waits before it lets a probe through.
    :param success_threshold: successful probes that close a half-open breaker.
    """

    fail_max: int = field(default=5, metadata=doc("failures", low=1, high=10_000))
    reset_timeout: float = field(default=30.0, metadata=doc("seconds", low=0, high=MAX_SECONDS,
                                                            low_open=True))
    success_threshold: int = field(default=1, metadata=doc("successes", low=1, high=10_000))

    def __post_init__(self) -> None:
        for name in ("fail_max", "success_threshold"):
            check_int(getattr(self, name), name, 1, 10_000)
        check_number(self.reset_timeout, "reset_timeout")


@dataclass(frozen=True)
class FailoverConfig(Settings):
    """When traffic moves between priority groups (endpoint ``priority``, then ``backups``).

    :param failover_below: the group in use keeps the traffic while this share of its endpoints
        is usable (healthy and not ejected); below it, the next group that meets it takes over.
    :param failback_at: a higher-priority group takes the traffic back only once this share of
        it is usable again (above ``failover_below``, so traffic does not flap).
    """

    failover_below: float = field(default=0.5, metadata=doc("share", low=0, high=1,
                                                            low_open=True))
    failback_at: float = field(default=0.7, metadata=doc(
        "share", "at least failover_below", low=0, high=1, low_open=True))

    def __post_init__(self) -> None:
        for name in ("failover_below", "failback_at"):
            check_number(getattr(self, name), name, 0.0, 1.0, what="a share")
        if self.failback_at < self.failover_below:
            raise ConfigError("failback_at", f"must be >= failover_below "
                                             f"({self.failover_below:g}), got "
                                             f"{shown(self.failback_at)}")


FailoverPolicy = FailoverConfig  #: old name of :class:`FailoverConfig`


class _Failure(Exception):
    """The failure a recorded outcome raises inside the breaker."""


def _succeed() -> None:
    return None


def _fail() -> None:
    raise _Failure("request failed")


class _StateListener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: EndpointBreaker) -> None:
        self.owner = owner

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        self.owner._state_changed(getattr(old_state, "name", None), new_state.name)


class EndpointBreaker:
    """The breaker of one endpoint of one service.

    :param on_change: called with ``(old_state, new_state)`` after each transition, outside the
        breaker's lock.
    """

    def __init__(self, name: str, config: BreakerConfig,
                 on_change: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._opened_at: Optional[float] = None
        self._probe = 0  # the probe ticket out while half-open, 0 when none
        self._probes = 0
        self._changes: list[tuple[str, str]] = []
        self.trips = 0
        self.rejected = 0
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=config.fail_max, reset_timeout=config.reset_timeout,
            success_threshold=config.success_threshold, name=name,
            listeners=[_StateListener(self)])

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"``."""
        return str(self.breaker.current_state)

    def admit(self) -> Optional[int]:
        """Whether a request may go to the endpoint now: None if not, else a ticket.

        The ticket is 0 for a request let through a closed breaker, and a probe number for the
        one request a half-open breaker lets through; pass it back to :meth:`record`, so that
        only the probe's own outcome decides the probe (and frees its slot).
        """
        if self.breaker.current_state == pybreaker.STATE_CLOSED:
            return 0  # the common case, without a lock: a stale read only lets one more by
        with self._lock:
            state = self.breaker.current_state
            if state == pybreaker.STATE_CLOSED:
                return 0
            if state == pybreaker.STATE_OPEN:
                opened = self._opened_at
                if opened is not None and self._clock() - opened < self.config.reset_timeout:
                    self.rejected += 1
                    return None
                self.breaker.half_open()
                self._probe = 0
            if self._probe:  # half-open: exactly one probe at a time
                self.rejected += 1
                return None
            self._probes += 1
            self._probe = self._probes
            ticket = self._probe
        self._flush()
        return ticket

    def record(self, success: bool, ticket: int = 0) -> None:
        """Record the outcome of a request let through with ``ticket`` (see :meth:`admit`)."""
        with self._lock:
            state = self.breaker.current_state
            is_probe = ticket != 0 and ticket == self._probe
            if is_probe:
                self._probe = 0
            if state == pybreaker.STATE_OPEN or (state == pybreaker.STATE_HALF_OPEN
                                                 and not is_probe):
                pass  # started before the breaker opened, or not the probe: no say
            else:
                # Bookkeeping only: the request already ran, outside the breaker's lock.
                with contextlib.suppress(_Failure, pybreaker.CircuitBreakerError):
                    self.breaker.call(_succeed if success else _fail)
            if self.breaker.current_state != pybreaker.STATE_OPEN:
                self._opened_at = None
        self._flush()

    def reset_after_fork(self) -> None:
        _forksafe.inherited(self._lock, self.breaker._lock)  # never freed in the child
        self._lock = threading.Lock()
        self.breaker._lock = threading.RLock()  # pybreaker's own, held at the fork maybe
        self._probe = 0

    def _state_changed(self, old: Optional[str], new: str) -> None:
        # Called by pybreaker with its lock held: only note it; _flush() reports it outside.
        if new == pybreaker.STATE_OPEN:
            self.trips += 1
            self._opened_at = self._clock()
        self._changes.append((old or "?", new))

    def _flush(self) -> None:
        while True:
            try:
                old, new = self._changes.pop(0)
            except IndexError:
                return
            log.warning("tai-lb: breaker of %s: %s -> %s", self.name, old, new)
            try:
                self._on_change(old, new)
            except Exception:
                log.exception("tai-lb: breaker state listener failed")

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state of the breaker."""
        return {"state": self.state, "failures_in_row": self.breaker.fail_counter,
                "trips": self.trips, "rejected": self.rejected}
