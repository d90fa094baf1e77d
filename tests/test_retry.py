"""Retry policy values, the retry budget's arithmetic, and failure classification."""

from __future__ import annotations

import pytest
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    EmptyPoolError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from tai_lb import ConfigError, RetryBudget, RetryConfig
from tai_lb.retry import classify

from .conftest import FakeClock


def test_budget_allows_the_floor_then_a_share_of_requests(clock: FakeClock) -> None:
    budget = RetryBudget(percent=0.2, min_per_second=1.0, ttl=10.0, clock=clock)
    # with no requests, the floor alone: 1 per second over 10 seconds
    assert sum(budget.try_retry() for _ in range(20)) == 10
    assert budget.refused == 10
    for _ in range(100):
        budget.request()
    assert sum(budget.try_retry() for _ in range(50)) == 20  # 20% of 100
    assert budget.snapshot()["retries_left"] == 0


def test_budget_window_slides(clock: FakeClock) -> None:
    budget = RetryBudget(percent=0.0, min_per_second=1.0, ttl=10.0, clock=clock)
    assert sum(budget.try_retry() for _ in range(15)) == 10
    clock.advance(5.0)
    assert not budget.try_retry()  # the spent retries are still inside the window
    clock.advance(5.5)
    assert budget.retries_left() == 10  # they have all left it
    assert budget.try_retry()


def test_policy_defaults_and_backoff() -> None:
    policy = RetryConfig()
    assert policy.attempts == 3 and policy.statuses == {502, 503, 504}
    assert "GET" in policy.methods and "POST" not in policy.methods
    assert policy.backoff(1, 1.0) == pytest.approx(0.025)
    assert policy.backoff(3, 1.0) == pytest.approx(0.1)
    assert policy.backoff(10, 1.0) == pytest.approx(0.25)  # capped
    assert policy.backoff(2, 0.5) == pytest.approx(0.025)  # full jitter: a share of the cap
    assert RetryConfig.from_config(False).attempts == 1
    assert policy.new(attempts=2).attempts == 2
    with pytest.raises(ConfigError, match="attempts"):
        policy.new(attempts=0)


@pytest.mark.parametrize(("error", "kind"), [
    (NewConnectionError(None, "refused"), "not_sent"),  # type: ignore[arg-type]
    (MaxRetryError(None, "/", NewConnectionError(None, "refused")), "not_sent"),  # type: ignore[arg-type]
    (ConnectTimeoutError("connect timed out"), "not_sent"),
    (EmptyPoolError(None, "empty"), "not_sent"),  # type: ignore[arg-type]
    (NameResolutionError("nosuch", None, OSError("no such name")), "not_sent"),  # type: ignore[arg-type]
    (ClosedPoolError(None, "closed"), "not_sent"),  # type: ignore[arg-type]
    (SSLError("bad record mac"), "sent"),  # TLS after connecting: it may have been sent
    (ProtocolError("reset"), "sent"),
    (ReadTimeoutError(None, "/", "read timed out"), "sent"),  # type: ignore[arg-type]
])
def test_classify(error: BaseException, kind: str) -> None:
    assert classify(error) == kind
