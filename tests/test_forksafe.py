"""Forked children: they draw their own random numbers and never free what they inherited."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from tai_lb import LoadBalancer, ServiceRegistry
from tai_lb.strategies import RoundRobin

from .conftest import in_forked_child

fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
WORKERS = 8
ENDPOINTS = [f"10.0.0.{i}:80" for i in range(1, 11)]


def _balancer() -> LoadBalancer:
    return LoadBalancer.from_config({"services": {
        "rr": {"endpoints": ENDPOINTS, "strategy": "round_robin"},
        "wrr": {"endpoints": ENDPOINTS, "strategy": "weighted_round_robin"},
        "rand": {"endpoints": ENDPOINTS, "strategy": "random"}}})


def _first_picks(lb: LoadBalancer) -> dict[str, Any]:
    picks = {}
    for service in ("rr", "wrr", "rand"):
        with lb.pick(service) as lease:
            picks[service] = lease.address
    return picks


@fork_only
def test_forked_workers_start_on_different_endpoints_and_draw_different_picks() -> None:
    with _balancer() as lb:
        _first_picks(lb)  # the parent's pickers are prepared (and started) before the forks
        reports = [in_forked_child(lambda: _first_picks(lb)) for _ in range(WORKERS)]
    spread = {service: len({r[service] for r in reports}) for service in ("rr", "wrr", "rand")}
    print(f"distinct first picks of {WORKERS} forked workers over {len(ENDPOINTS)} endpoints: "
          f"{spread}")
    # Each worker's picks are uniform over 10 endpoints: all 8 alike has odds 1e-7.
    assert all(count > 1 for count in spread.values()), spread


@fork_only
def test_a_strategy_given_its_own_seeded_rng_is_left_repeatable_in_children() -> None:
    registry = ServiceRegistry()
    registry.register_many("rr", ENDPOINTS)
    with LoadBalancer(registry, RoundRobin(rng=random.Random(7))) as lb:
        def first() -> dict[str, Any]:
            with lb.pick("rr") as lease:
                return {"rr": lease.address}

        reports = [in_forked_child(first) for _ in range(3)]
        assert reports[0] == reports[1] == reports[2] == first()
