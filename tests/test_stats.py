"""EndpointStats: the live figures of one endpoint (their use by strategies: test_strategies)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tai_lb import LoadBalancer, ServiceRegistry

from .conftest import in_forked_child


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_lease_ends_in_a_child_forked_while_the_figures_lock_was_held() -> None:
    # The balancer resets every endpoint's figures in the child (EndpointStats.reset_after_fork).
    reg = ServiceRegistry()
    reg.register("users", "10.0.0.1:80")
    lb = LoadBalancer(reg)
    stats = lb.stats("users")["10.0.0.1:80"]

    def child() -> dict[str, Any]:
        with lb.pick("users") as lease:  # the lease's end takes the figures' lock
            address = lease.address
        return {"address": address, "requests": lb.stats("users")[address].requests}

    stats._lock.acquire()  # as if a lease were ending on another thread at the fork
    report = in_forked_child(child, stats._lock.release, timeout=10)
    assert report == {"address": "10.0.0.1:80", "requests": 1}
    assert stats.requests == 0  # the child's figures are its own
    lb.close()
