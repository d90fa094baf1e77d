"""Forked children: they draw their own random numbers and never free what they inherited."""

from __future__ import annotations

import atexit
import os
import random
import threading
from typing import Any

import pytest

from tai_lb import LoadBalancer, ServiceRegistry
from tai_lb.pool import PoolConfig
from tai_lb.strategies import RoundRobin

from .backends import Backend
from .conftest import in_forked_child, wait_for

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
        # Two independent fleets of 8 workers, forked from the same parent.
        fleets = [[in_forked_child(lambda: _first_picks(lb)) for _ in range(WORKERS)]
                  for _ in range(2)]
    spread = {service: [len({r[service] for r in fleet}) for fleet in fleets]
              for service in ("rr", "wrr", "rand")}
    print(f"distinct first picks of two fleets of {WORKERS} forked workers over "
          f"{len(ENDPOINTS)} endpoints: {spread}")
    # The target: 8 workers start on at least 3 different endpoints of 10.  Each
    # worker's first pick is uniform over the 10, so one fleet lands on 2 or fewer by chance
    # with odds (10 + 45 x (2**8 - 2)) / 10**8 = 1.1e-4; asking it of one fleet of the two
    # makes a chance failure 1.2e-8 per service.  In step, as before the reseed, every fleet
    # lands on 1 endpoint.
    assert all(max(counts) >= 3 for counts in spread.values()), spread


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


@fork_only
@pytest.mark.timeout(60)
def test_a_child_forked_while_a_pool_queue_lock_was_held_comes_back() -> None:
    # The after-fork reset replaces the parent's HTTP pools.  Freeing them would run urllib3's
    # finalizer, which empties each pool's queue under the queue's lock; a parent's thread
    # holding that lock at the fork would hang the child inside os.fork().
    with _balancer() as lb:
        pool = lb.pools.pool_for("10.0.0.1", 80, "http", PoolConfig(), None, dict)
        assert pool.pool is not None
        mutex = pool.pool.mutex
        del pool  # the balancer holds the only reference, as in a real worker
        taken, release = threading.Event(), threading.Event()

        def hold() -> None:  # a parent's thread taking a connection at the moment of the fork
            with mutex:
                taken.set()
                release.wait(30)

        holder = threading.Thread(target=hold, name="test-holder")
        holder.start()
        try:
            assert wait_for(taken.is_set)
            report = in_forked_child(lambda: _first_picks(lb), timeout=20)
            # and exits: the parent's pools, kept alive, are finalized at exit (here as
            # sys.exit() would), which empties their queues under that lock too
            exited = in_forked_child(lambda: _exit_handlers_run(lb), timeout=20)
        finally:
            release.set()
            holder.join()
        assert set(report) == {"rr", "wrr", "rand"}
        assert exited == {"exit handlers": "ran"}


def _exit_handlers_run(lb: LoadBalancer) -> dict[str, Any]:
    _first_picks(lb)
    # The child's first pool closes its copies of the parent's idle connections.
    lb.pools.pool_for("10.0.0.2", 80, "http", PoolConfig(), None, dict)
    atexit._run_exitfuncs()
    return {"exit handlers": "ran"}


@fork_only
def test_a_child_closes_its_copies_of_the_parents_idle_connections_on_first_use() -> None:
    backend = Backend("one")
    try:
        config = {"services": {"users": {"endpoints": [backend.address]}}}
        with LoadBalancer.from_config(config) as lb, lb.session() as session:
            assert session.get("http://users/").status_code == 200
            pool = lb.pools.pool_for("127.0.0.1", backend.port, "http",
                                      lb.service_config("users").pool, None, dict)
            idle = [c for c in pool.pool.queue if c is not None]  # type: ignore[union-attr]
            sockets = [c.sock for c in idle]
            assert sockets and all(s is not None for s in sockets)

            def child() -> dict[str, Any]:
                kept_through_fork = sum(c.sock is not None for c in idle)
                with lb.session() as own:
                    status = own.get("http://users/").status_code
                return {"kept through fork": kept_through_fork, "status": status,
                        "open after first use": sum(c.sock is not None for c in idle)}

            report = in_forked_child(child, timeout=20)
            assert report == {"kept through fork": len(idle), "status": 200,
                              "open after first use": 0}
            # The child closed only its copies: the parent's connection is still its own.
            assert session.get("http://users/").status_code == 200
            assert [c.sock for c in idle] == sockets  # reused, not reconnected
    finally:
        backend.stop()


@pytest.mark.parametrize("strategy", ["least_connections", "peak_ewma"])
def test_a_forked_child_counts_none_of_the_parents_requests_in_flight(strategy: str) -> None:
    # The parent's requests in flight at the fork never finish in the child (their threads do not
    # exist there): counted, they would keep a load-aware strategy off the endpoint for ever.
    reg = ServiceRegistry()
    reg.register_many("users", ["10.0.0.1:80", "10.0.0.2:80"])
    with LoadBalancer(reg, strategy=strategy) as lb:
        leases = [lb.pick("users", exclude=("10.0.0.2:80",)) for _ in range(3)]
        assert {lease.address for lease in leases} == {"10.0.0.1:80"}

        def child() -> dict[str, Any]:
            with lb.pick("users") as first, lb.pick("users") as second:
                leases[0].done()  # a lease from before the fork may end here: no error
                picked = sorted([first.address, second.address])
            stats = lb.stats("users")
            return {"picked": picked, "in_flight": {a: s.in_flight for a, s in
                                                          stats.items()},
                    "service": lb.status()["services"]["users"]["in_flight"]}

        report = in_forked_child(child, timeout=20)
        for lease in leases:
            lease.done()
    assert report["picked"] == ["10.0.0.1:80", "10.0.0.2:80"]  # two held at once: one each
    assert report["service"] == 0
    assert report["in_flight"] == {"10.0.0.1:80": 0, "10.0.0.2:80": 0}
