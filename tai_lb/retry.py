"""Retries: which failures may be retried, on which requests, and how many retries may run.

:class:`RetryConfig` is the ``retries`` setting of a service.  :class:`RetryBudget` caps retries
at a share of recent requests plus a floor per second (Finagle's ``RetryBudget``), so that when a
whole service is failing, retries do not multiply its load.  :func:`classify` sorts a failure
into what it proves about the request: whether it could have reached a server.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    EmptyPoolError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from . import _forksafe
from ._settings import (
    MAX_SECONDS,
    Settings,
    check_int,
    check_number,
    doc,
    is_int,
    key_text,
    shown,
)
from .exceptions import ConfigError

__all__ = ["IDEMPOTENT_METHODS", "FailureKind", "RetryBudget", "RetryBudgets", "RetryConfig",
           "RetryPolicy", "classify"]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods that RFC 9110 defines as idempotent: retried after any transport failure."""

MAX_RETRIES_PER_SECOND = 1_000_000.0
"""The highest ``budget.min_per_second``: far beyond any real traffic, yet finite."""

FailureKind = Literal["not_sent", "sent", "status"]
"""``not_sent``: the request provably never reached a server (refused, connect timeout, name
resolution, no free connection; the adapter adds any failure while connecting, TLS handshake
included); ``sent``: it may have (reset, read timeout, a response cut off, a TLS error after
connecting); ``status``: a response came back with a retryable status."""


@dataclass(frozen=True)
class RetryConfig(Settings):
    """The ``retries`` settings of a service.

    :param attempts: attempts in all, the first included (1 disables retries).
    :param statuses: response statuses retried for idempotent requests.
    :param methods: methods retried after a failure that may have reached a server.
    :param backoff_base: first backoff in seconds; retry ``n`` (1 for the second attempt) waits
        a random time up to ``backoff_base * 2**(n - 1)``, capped at ``backoff_max`` (full
        jitter).
    :param backoff_max: the longest backoff in seconds.
    :param deadline: seconds for all attempts together (None: attempts alone bound them).
    :param budget_percent: retries allowed as a share of requests in the budget window.
    :param budget_min_per_second: retries always allowed per second, whatever the share.
    :param budget_ttl: seconds of history the budget counts.
    """

    attempts: int = field(default=3, metadata=doc("attempts", low=1, high=10))
    statuses: frozenset[int] = field(default=frozenset({502, 503, 504}), metadata=doc(
        allowed="a list of HTTP statuses, 100 to 599"))
    methods: frozenset[str] = field(default=IDEMPOTENT_METHODS, metadata=doc(
        allowed="a list of upper-case HTTP methods"))
    backoff_base: float = field(default=0.025, metadata=doc("seconds", low=0, high=MAX_SECONDS,
                                                            key="backoff.base"))
    backoff_max: float = field(default=0.25, metadata=doc("seconds", low=0, high=MAX_SECONDS,
                                                          key="backoff.max"))
    deadline: Optional[float] = field(default=None, metadata=doc(
        "seconds", "or null (none)", low=0, high=MAX_SECONDS, low_open=True))
    budget_percent: float = field(default=0.2, metadata=doc(
        "share", "0.2 is 20%", low=0, high=10, key="budget.percent"))
    budget_min_per_second: float = field(default=10.0, metadata=doc(
        "retries a second", low=0, high=MAX_RETRIES_PER_SECOND, key="budget.min_per_second"))
    budget_ttl: float = field(default=10.0, metadata=doc(
        "seconds", low=0, high=MAX_SECONDS, low_open=True, key="budget.ttl"))

    def __post_init__(self) -> None:
        check_int(self.attempts, "attempts", 1, 10)
        for status in self.statuses:
            if not is_int(status, 100, 599):
                raise ConfigError("statuses", f"must be HTTP statuses (100-599), "
                                              f"got {shown(status)}")
        for method in self.methods:
            if not isinstance(method, str) or not method.isalpha() or not method.isupper():
                raise ConfigError("methods", f"must be upper-case HTTP methods, "
                                             f"got {shown(method)}")
        check_number(self.backoff_base, "backoff.base", low_open=False)
        check_number(self.backoff_max, "backoff.max", low_open=False)
        if self.deadline is not None:
            check_number(self.deadline, "deadline")
        check_number(self.budget_percent, "budget.percent", 0.0, 10.0, low_open=False,
                     what="a share")
        check_number(self.budget_min_per_second, "budget.min_per_second", 0.0,
                     MAX_RETRIES_PER_SECOND, low_open=False, what="a number of retries a second")
        check_number(self.budget_ttl, "budget.ttl")
        object.__setattr__(self, "statuses", frozenset(self.statuses))
        object.__setattr__(self, "methods", frozenset(self.methods))

    @classmethod
    def from_config(cls, value: Any) -> RetryConfig:
        """Build from the ``retries`` mapping of a configuration (errors name the sub-key)."""
        if value is False:
            return cls(attempts=1)
        if not isinstance(value, Mapping):
            raise ConfigError("", f"must be a mapping (or false to disable), got {shown(value)}")
        allowed = ("attempts", "statuses", "methods", "backoff", "deadline", "budget")
        for key in value:
            if key not in allowed:
                raise ConfigError(key_text(key), f"unknown key; allowed: {', '.join(allowed)}")
        fields: dict[str, Any] = {}
        if "attempts" in value:
            fields["attempts"] = value["attempts"]
        for key in ("statuses", "methods"):
            if key in value:
                raw = value[key]
                if isinstance(raw, (str, bytes)) or not isinstance(raw, Collection):
                    raise ConfigError(key, f"must be a list, got {shown(raw)}")
                for index, item in enumerate(raw):
                    try:
                        hash(item)
                    except TypeError:  # a list or a mapping in the list
                        raise ConfigError(f"{key}[{index}]", f"must be an HTTP "
                                          f"{'status' if key == 'statuses' else 'method'}, "
                                          f"got {shown(item)}") from None
                fields[key] = frozenset(raw)
        if "deadline" in value:
            fields["deadline"] = value["deadline"]
        for key, prefix, names in (("backoff", "backoff_", ("base", "max")),
                                   ("budget", "budget_", ("percent", "min_per_second", "ttl"))):
            if key in value:
                sub = value[key]
                if not isinstance(sub, Mapping):
                    raise ConfigError(key, f"must be a mapping, got {shown(sub)}")
                for name in sub:
                    if name not in names:
                        raise ConfigError(f"{key}.{key_text(name)}",
                                          f"unknown key; allowed: {', '.join(names)}")
                    fields[prefix + name] = sub[name]
        return cls(**fields)

    def backoff(self, retry: int, draw: float) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), given a uniform ``draw``."""
        return draw * min(self.backoff_max, self.backoff_base * 2.0 ** (retry - 1))


RetryConfig.DEFAULT = RetryConfig()  # type: ignore[attr-defined]

RetryPolicy = RetryConfig  #: old name of :class:`RetryConfig`


class RetryBudget:
    """Retries allowed: ``percent`` of the requests of the last ``ttl`` seconds plus a floor.

    Thread-safe.  Every request calls :meth:`request`; a retry runs only if :meth:`try_retry`
    returns True.  Counts are kept in one-second buckets with running totals, so every call is
    O(1) and the window slides in steps of a second.  (Finagle's ``RetryBudget``: 20% plus 10
    per second over 10 seconds by default.)

    :param percent: retries allowed per request in the window.
    :param min_per_second: retries always allowed per second of the window.
    :param ttl: seconds of history counted.
    :param clock: monotonic clock in seconds.
    """

    def __init__(self, percent: float = 0.2, min_per_second: float = 10.0, ttl: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.percent = percent
        self.min_per_second = min_per_second
        self.ttl = ttl
        self.clock = clock
        self.refused = 0
        self._lock = threading.Lock()
        # (second, requests, retries) per bucket, oldest first, and the window's totals
        self._buckets: collections.deque[list[int]] = collections.deque()
        self._requests = 0
        self._retries = 0

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's is kept, never freed in the child)."""
        _forksafe.inherited(self._lock)
        self._lock = threading.Lock()

    @classmethod
    def for_policy(cls, policy: RetryConfig, clock: Callable[[], float]) -> RetryBudget:
        """The budget a service with ``policy`` uses."""
        return cls(policy.budget_percent, policy.budget_min_per_second, policy.budget_ttl, clock)

    def _bucket(self, now: float) -> list[int]:
        # Called with the lock held: expire old buckets, return the current one.
        second = int(now)
        buckets = self._buckets
        horizon = second - self.ttl
        while buckets and buckets[0][0] <= horizon:
            _, requests, retries = buckets.popleft()
            self._requests -= requests
            self._retries -= retries
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
        return buckets[-1]

    def _allowed(self) -> float:
        return self.percent * self._requests + self.min_per_second * self.ttl

    def request(self) -> None:
        """Count one request (its first attempt)."""
        now = self.clock()
        with self._lock:
            self._bucket(now)[1] += 1
            self._requests += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget if it allows one; False (and counted) if not."""
        now = self.clock()
        with self._lock:
            bucket = self._bucket(now)
            if self._retries + 1 > self._allowed():
                self.refused += 1
                return False
            bucket[2] += 1
            self._retries += 1
            return True

    def retries_left(self) -> int:
        """Retries the budget would allow now."""
        now = self.clock()
        with self._lock:
            self._bucket(now)
            return max(0, int(self._allowed() - self._retries))

    def snapshot(self) -> dict[str, Any]:
        """Requests, retries and refusals in the window, as a JSON-serialisable dict."""
        now = self.clock()
        with self._lock:
            self._bucket(now)
            requests, retries, refused = self._requests, self._retries, self.refused
            left = max(0, int(self._allowed() - retries))
        return {"requests": requests, "retries": retries, "retries_left": left,
                "refused": refused, "percent": self.percent,
                "min_per_second": self.min_per_second, "ttl": self.ttl}

    def __repr__(self) -> str:
        return (f"RetryBudget(percent={self.percent}, min_per_second={self.min_per_second}, "
                f"ttl={self.ttl})")


def classify(error: BaseException) -> FailureKind:
    """Whether a urllib3 failure proves the request never reached a server.

    Refused and failed connections, connect timeouts, name resolution and an exhausted or closed
    pool all fail before a byte of the request is sent.  (TLS handshake failures are recognised
    by the adapter, which marks errors raised while connecting.)  Anything else (a
    reset, a read timeout, a response cut off) may have reached the server.
    """
    if isinstance(error, MaxRetryError) and error.reason is not None:
        error = error.reason
    if isinstance(error, (NewConnectionError, ConnectTimeoutError, NameResolutionError,
                          EmptyPoolError, ClosedPoolError)):
        return "not_sent"
    # An SSLError may come from the handshake or from a record received after the request was
    # sent: only the adapter knows which (it marks errors of the connect phase), so here it is
    # "sent", like anything else that is not provably before sending.
    if isinstance(error, (ProtocolError, ReadTimeoutError)):
        return "sent"
    return "sent"


class RetryBudgets:
    """The retry budget of each service of a balancer, made on first use.  Thread-safe.

    :param clock: monotonic clock in seconds, for every budget.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._budgets: dict[str, RetryBudget] = {}

    def get(self, service: str, policy: Callable[[], RetryConfig]) -> RetryBudget:
        """The budget of ``service``, made from ``policy()`` the first time."""
        budget = self._budgets.get(service)
        if budget is None:
            with self._lock:
                budget = self._budgets.get(service)
                if budget is None:
                    budget = RetryBudget.for_policy(policy(), self._clock)
                    self._budgets[service] = budget
        return budget

    def find(self, service: str) -> Optional[RetryBudget]:
        """The budget of ``service`` if it has one yet."""
        return self._budgets.get(service)

    def reset_after_fork(self) -> None:
        """In a forked child: fresh locks here and in every budget (the old ones are kept)."""
        _forksafe.inherited(self._lock)
        self._lock = threading.Lock()
        for budget in self._budgets.values():
            budget.reset_after_fork()
