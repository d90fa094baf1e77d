"""Session affinity: a key goes to the same endpoint while it is usable, expires, is evicted,
moves at a bounded rate when its endpoint leaves, and follows a successful retry."""

from __future__ import annotations

import os
import threading
import tracemalloc
from typing import Any, Callable, Optional

import pytest

from tai_lb import AffinityConfig, ConfigError, Endpoint, LoadBalancer, ServiceRegistry
from tai_lb.config import LoadBalancerConfig, ServiceConfig
from tai_lb.context import routing_context
from tai_lb.routing.affinity import Affinity

from . import backends
from .backends import Factory
from .conftest import FakeClock, in_forked_child, wait_for

ADDRESSES = [f"10.0.0.{i}:80" for i in range(1, 5)]
KEYS = [f"user-{i}" for i in range(40)]


def affinity_of(lb: LoadBalancer, service: str = "svc") -> Affinity:
    lb.route(service)  # the routing exists once a route does
    affinity = lb._services[service].affinity
    assert affinity is not None
    return affinity


def pick_balancer(clock: Optional[FakeClock] = None, **affinity: Any) -> LoadBalancer:
    config = {"services": {"svc": {"endpoints": ADDRESSES, "strategy": "round_robin",
                                   "affinity": {"key": "user_id", **affinity}}}}
    if clock is None:
        return LoadBalancer.from_config(config)
    return LoadBalancer.from_config(config, clock=clock)


def picked(lb: LoadBalancer, key: str) -> str:
    with lb.pick("svc", key) as lease:
        return lease.address


# -- each key kind through lb.session() --------------------------------------------------------

def _header(user: str) -> dict[str, Any]:
    return {"headers": {"X-User-Id": user}}


def _cookie(user: str) -> dict[str, Any]:
    return {"cookies": {"sid": user}}


KINDS: dict[str, tuple[Any, Callable[[str], dict[str, Any]]]] = {
    "header": ("header:X-User-Id", _header),
    "cookie": ("cookie:sid", _cookie),
    "source_ip": ("source_ip", lambda user: {}),
    "user_id": ("user_id", lambda user: {}),
    "function": (lambda request: request.headers.get("X-Tenant"),
                 lambda user: {"headers": {"X-Tenant": user}}),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_key_kind_keeps_a_user_on_one_backend_through_a_session(
        backend_factory: Factory, kind: str) -> None:
    servers = [backend_factory() for _ in range(3)]
    key, request_args = KINDS[kind]
    settings = ServiceConfig(endpoints=tuple(Endpoint.from_value(b.address) for b in servers),
                             affinity=AffinityConfig(key=key))
    with LoadBalancer(config=LoadBalancerConfig({"svc": settings})) as lb:
        session = lb.session()
        served: dict[str, set[str]] = {}
        for _ in range(4):
            for i in range(6):
                user = f"user-{i}"
                context = (routing_context(source_ip=f"203.0.113.{i}") if kind == "source_ip"
                           else routing_context(user_id=user))
                with context:
                    response = session.get("http://svc/", **request_args(user))
                assert response.status_code == 200
                served.setdefault(user, set()).add(response.headers["X-Backend"])
        session.close()
        figures = lb.status()["services"]["svc"]["affinity"]
    # Round robin alone would send each user's 4 requests to 3 backends in turn.
    assert all(len(names) == 1 for names in served.values()), served
    assert len({next(iter(names)) for names in served.values()}) == 3
    assert (figures["entries"], figures["misses"], figures["hits"]) == (6, 6, 18)


def test_pick_with_a_key_uses_affinity_and_without_one_the_strategy() -> None:
    with pick_balancer() as lb:
        first = picked(lb, "alice")
        assert [picked(lb, "alice") for _ in range(8)] == [first] * 8
        assert len({picked(lb, None) for _ in range(8)}) == 4  # type: ignore[arg-type]


def test_long_keys_are_held_as_digests_and_still_stick() -> None:
    # A client-controlled cookie or header of 8 KB was stored whole: 100k of them held 781 MB.
    body = "k" * 100_000
    with pick_balancer() as lb:
        affinity = affinity_of(lb)
        picked(lb, "warm-up")  # the thread and the table's first allocations
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            homes = {i: picked(lb, f"{i}:{body}") for i in range(1_000)}
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held < 1_000_000, f"1,000 keys of 100 KB hold {held:,} bytes"
        assert lb.status()["services"]["svc"]["affinity"]["entries"] == 1_001
        assert len(set(homes.values())) == 4  # distinct keys, not one digest for all
        for i in (0, 1, 999):  # each long key keeps its own endpoint
            assert [picked(lb, f"{i}:{body}") for _ in range(4)] == [homes[i]] * 4
            assert affinity.pinned(f"{i}:{body}") == homes[i]
        short = "s" * 64  # short keys are stored as they are
        picked(lb, short)
        assert short in affinity._table and all(len(k) <= 64 for k in affinity._table)


@pytest.mark.parametrize("key", [["alice"], {"user": 1}, 1.5, True])
def test_a_key_of_another_type_than_str_bytes_or_int_is_a_clear_type_error(key: Any) -> None:
    with pick_balancer() as lb, pytest.raises(
            TypeError, match=f"routing key must be str, bytes or int, got {type(key).__name__}"):
        lb.pick("svc", key)



def test_a_key_function_returning_a_list_is_the_same_clear_type_error(
        backend_factory: Factory) -> None:
    server = backend_factory()
    settings = ServiceConfig(endpoints=(Endpoint.from_value(server.address),),
                             affinity=AffinityConfig(key=lambda request: ["tenant", "1"]))
    with LoadBalancer(config=LoadBalancerConfig({"svc": settings})) as lb, \
            lb.session() as session, pytest.raises(
                TypeError, match="routing key must be str, bytes or int, got list"):
        session.get("http://svc/")


# -- expiry and eviction ---------------------------------------------------------------------

def test_a_key_expires_ttl_seconds_after_its_last_request(clock: FakeClock) -> None:
    with pick_balancer(clock, ttl=10) as lb:
        affinity = affinity_of(lb)
        first = picked(lb, "alice")
        clock.advance(8)
        assert picked(lb, "alice") == first  # a hit restarts the TTL
        clock.advance(8)
        assert affinity.pinned("alice") == first
        clock.advance(3)
        # The expiry thread sweeps the table (len() does not expire by itself).
        assert wait_for(lambda: len(affinity._table) == 0, timeout=5)
        assert affinity.pinned("alice") is None
        picked(lb, "alice")
        figures = lb.status()["services"]["svc"]["affinity"]
    assert (figures["misses"], figures["hits"], figures["entries"]) == (2, 1, 1)


def test_an_expired_key_not_swept_yet_is_a_miss_not_a_hit(clock: FakeClock) -> None:
    with pick_balancer(clock, ttl=10) as lb:
        affinity = affinity_of(lb)
        affinity.interval = 3600.0  # the thread never sweeps in this test
        picked(lb, "alice")
        clock.advance(10)
        assert len(affinity._table) == 1  # still in the table
        assert affinity.pinned("alice") is None
        picked(lb, "alice")
        figures = affinity.figures()
    assert (figures["hits"], figures["misses"], figures["repins"]) == (0, 2, 0)


def test_a_sweep_drops_every_expired_key_in_batches_and_no_live_one(clock: FakeClock) -> None:
    with pick_balancer(clock, ttl=10, max_entries=10_000) as lb:
        affinity = affinity_of(lb)
        affinity.interval = 3600.0
        old = [f"old-{i}" for i in range(2500)]  # more than one batch of the sweep
        for key in old:
            picked(lb, key)
        clock.advance(2)
        picked(lb, "old-0")  # refreshed two ticks later: it now sorts after the others
        young = [f"young-{i}" for i in range(5)]
        for key in young:
            picked(lb, key)
        clock.advance(8.5)  # the old keys' TTL has passed; old-0's and the young ones' has not
        affinity.expire()
        assert sorted(affinity._table) == sorted(["old-0", *young])
        assert all(affinity.pinned(key) is not None for key in ["old-0", *young])


def test_the_least_recently_used_key_is_evicted_at_max_entries() -> None:
    with pick_balancer(max_entries=3) as lb:
        affinity = affinity_of(lb)
        for key in ("a", "b", "c"):
            picked(lb, key)
        picked(lb, "a")  # b is now the least recently used
        picked(lb, "d")
        assert affinity.pinned("b") is None
        assert all(affinity.pinned(key) is not None for key in ("a", "c", "d"))
        figures = lb.status()["services"]["svc"]["affinity"]
    assert (figures["entries"], figures["evictions"]) == (3, 1)


# -- moves -----------------------------------------------------------------------------------

def test_keys_of_a_removed_endpoint_are_repinned_and_live_users_never_move() -> None:
    with pick_balancer() as lb:
        before = {key: picked(lb, key) for key in KEYS}
        gone = ADDRESSES[0]
        lb.registry.deregister("svc", gone)
        after = {key: picked(lb, key) for key in KEYS}
        again = {key: picked(lb, key) for key in KEYS}
        figures = lb.status()["services"]["svc"]["affinity"]
    moved = [key for key in KEYS if before[key] == gone]
    assert len(moved) == 10
    assert all(after[key] != gone for key in moved)
    assert {key: after[key] for key in KEYS if key not in moved} == {
        key: before[key] for key in KEYS if key not in moved}
    assert again == after  # re-pinned: the new endpoint is sticky too
    assert figures["repins"] == 10


def test_keys_of_an_ejected_endpoint_are_repinned_and_return_no_more() -> None:
    config = {"services": {"svc": {
        "endpoints": ADDRESSES, "affinity": {"key": "user_id"},
        "outlier_detection": {"consecutive_5xx": 2, "max_ejection_percent": 50}}}}
    with LoadBalancer.from_config(config) as lb:
        before = {key: picked(lb, key) for key in KEYS}
        bad = ADDRESSES[1]
        key_on_bad = next(key for key in KEYS if before[key] == bad)
        for _ in range(2):
            lb.pick("svc", key_on_bad).done(success=False, status=503)
        assert lb.outlier_detector.is_ejected("svc", bad)
        after = {key: picked(lb, key) for key in KEYS}
    assert all(after[key] != bad for key in KEYS)
    assert all(after[key] == before[key] for key in KEYS if before[key] != bad)


def test_a_key_whose_breaker_is_open_is_repinned() -> None:
    config = {"services": {"svc": {
        "endpoints": ADDRESSES, "affinity": {"key": "user_id"},
        "circuit_breaker": {"fail_max": 1, "reset_timeout": 60}}}}
    with LoadBalancer.from_config(config) as lb:
        home = picked(lb, "alice")
        lb.pick("svc", "alice").done(success=False)
        assert lb.stats("svc")[home].breaker.state == "open"  # type: ignore[union-attr]
        moved = picked(lb, "alice")
        assert moved != home
        assert affinity_of(lb).pinned("alice") == moved


def test_keys_move_at_most_max_moves_per_second(clock: FakeClock) -> None:
    with pick_balancer(clock, max_moves_per_second=4) as lb:
        affinity = affinity_of(lb)
        before = {key: picked(lb, key) for key in KEYS}
        gone = ADDRESSES[2]
        on_gone = [key for key in KEYS if before[key] == gone]
        lb.registry.deregister("svc", gone)
        for key in on_gone:  # every one is served elsewhere...
            assert picked(lb, key) != gone
        # ...but only the first 4 are re-pinned: the others keep their entry for later.
        still = [key for key in on_gone if affinity.pinned(key) == gone]
        assert len(still) == len(on_gone) - 4
        clock.advance(0.5)  # two more moves allowed
        for key in on_gone:
            picked(lb, key)
        assert len([key for key in on_gone if affinity.pinned(key) == gone]) == len(still) - 2
        figures = lb.status()["services"]["svc"]["affinity"]
    assert figures["repins"] == 6
    assert figures["deferred"] == (len(on_gone) - 4) + (len(still) - 2)


# -- retries ---------------------------------------------------------------------------------

def test_a_key_follows_the_retry_that_served_it(backend_factory: Factory) -> None:
    first, second = backend_factory("first"), backend_factory("second")
    config = {"services": {"svc": {"endpoints": [first.address, second.address],
                                   "affinity": {"key": "header:X-User-Id"}}}}
    with LoadBalancer.from_config(config) as lb:
        session = lb.session()
        users = [f"u{i}" for i in range(4)]
        home = {u: session.get("http://svc/", headers=_header(u)["headers"]).headers["X-Backend"]
                for u in users}
        user = next(u for u in users if home[u] == "first")
        first.behaviour = backends.status(503)
        response = session.get("http://svc/", headers={"X-User-Id": user})
        assert response.headers["X-Backend"] == "second"
        assert [a.endpoint for a in response.lb_trace.attempts] == [first.address,
                                                                    second.address]
        first.behaviour = first.ok
        # Pinned to the endpoint that served it, though its first endpoint is fine again.
        assert affinity_of(lb).pinned(user) == second.address
        assert session.get("http://svc/", headers={"X-User-Id": user}).headers[
            "X-Backend"] == "second"
        session.close()


# -- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize(("affinity", "path"), [
    ("user_id", "services.svc.affinity"),
    ({}, "services.svc.affinity.key"),
    ({"key": "header:"}, "services.svc.affinity.key"),
    ({"key": "ip"}, "services.svc.affinity.key"),
    ({"key": "user_id", "ttl": 0}, "services.svc.affinity.ttl"),
    ({"key": "user_id", "ttl": "5m"}, "services.svc.affinity.ttl"),
    ({"key": "user_id", "max_entries": 0}, "services.svc.affinity.max_entries"),
    ({"key": "user_id", "max_entries": 1.5}, "services.svc.affinity.max_entries"),
    ({"key": "user_id", "max_moves_per_second": -1},
     "services.svc.affinity.max_moves_per_second"),
    ({"key": "user_id", "stickiness": 1}, "services.svc.affinity.stickiness"),
])
def test_bad_affinity_settings_name_their_key(affinity: Any, path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        LoadBalancer.from_config({"services": {"svc": {"endpoints": ADDRESSES,
                                                       "affinity": affinity}}})
    assert caught.value.path == path


def test_affinity_and_hash_key_must_agree() -> None:
    with pytest.raises(ConfigError) as caught:
        LoadBalancer.from_config({"services": {"svc": {
            "endpoints": ADDRESSES, "hash_key": "header:X-A",
            "affinity": {"key": "header:X-B"}}}})
    assert caught.value.path == "services.svc.affinity.key"
    same = {"services": {"svc": {"endpoints": ADDRESSES, "hash_key": "header:X-A",
                                 "affinity": {"key": "header:X-A", "ttl": 60}}}}
    with LoadBalancer.from_config(same) as lb:
        settings = lb.service_config("svc").affinity
        assert settings is not None and settings.ttl == 60.0


# -- the thread ------------------------------------------------------------------------------

def _affinity_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith("tai-lb-affinity") and t.is_alive()]


def test_the_expiry_thread_starts_with_the_first_key_and_stops_on_close() -> None:
    lb = pick_balancer()
    affinity = affinity_of(lb)
    assert affinity.thread is None  # no key, no thread
    picked(lb, "alice")
    thread = affinity.thread
    assert thread is not None and thread.daemon and thread.name == "tai-lb-affinity-svc"
    lb.close()
    assert not thread.is_alive()  # close() joins it (a second at most)
    assert affinity.thread is None


def test_the_expiry_thread_survives_a_failing_sweep(clock: FakeClock) -> None:
    with pick_balancer(clock, ttl=5) as lb:
        affinity = affinity_of(lb)
        affinity.interval = 0.01
        picked(lb, "alice")
        calls = []
        real = affinity._table.expire

        def broken(*args: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a broken sweep")
            return real(*args)

        affinity._table.expire = broken  # type: ignore[method-assign]
        clock.advance(6)
        assert wait_for(lambda: len(calls) >= 2 and len(affinity._table) == 0)
        assert affinity.thread is not None and affinity.thread.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_the_expiry_thread_restarts_in_a_forked_child() -> None:
    with pick_balancer() as lb:
        home = picked(lb, "alice")

        def child() -> dict[str, Any]:
            return {"threads": [t.name for t in _affinity_threads()],
                    "alice": picked(lb, "alice")}

        report = in_forked_child(child)
    assert report == {"threads": ["tai-lb-affinity-svc"], "alice": home}


def test_a_balancer_from_python_gets_affinity_too() -> None:
    registry = ServiceRegistry()
    registry.register_many("svc", ADDRESSES)
    settings = ServiceConfig(affinity=AffinityConfig(key="user_id"))
    with LoadBalancer(registry, config=LoadBalancerConfig({"svc": settings})) as lb:
        assert len({picked(lb, "bob") for _ in range(5)}) == 1


def test_max_moves_per_second_zero_never_moves_a_key() -> None:
    with pick_balancer(max_moves_per_second=0) as lb:
        affinity = affinity_of(lb)
        before = {key: picked(lb, key) for key in KEYS}
        lb.registry.deregister("svc", ADDRESSES[0])
        on_gone = [key for key in KEYS if before[key] == ADDRESSES[0]]
        assert all(picked(lb, key) != ADDRESSES[0] for key in on_gone)
        assert all(affinity.pinned(key) == ADDRESSES[0] for key in on_gone)
        # The endpoint comes back: its users go home.
        lb.registry.register("svc", ADDRESSES[0])
        assert all(picked(lb, key) == ADDRESSES[0] for key in on_gone)
