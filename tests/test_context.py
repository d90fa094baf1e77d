"""The routing context (tai_lb.context): the incoming request's headers, cookies and user give
outgoing requests their routing key, with the outgoing request's own header or cookie first."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from tai_lb import context
from tai_lb.context import RoutingContext, current, routing_context, using

from .backends import Factory, balancer


def _home(session: Any, **kwargs: Any) -> str:
    return str(session.get("http://users/", **kwargs).json()["backend"])


@pytest.mark.parametrize("hash_key", ["header:X-User", "cookie:session"])
def test_an_incoming_header_or_cookie_is_the_key_of_outgoing_requests_without_one(
        backend_factory: Factory, hash_key: str) -> None:
    pool = [backend_factory(f"h{i}") for i in range(4)]
    kind = hash_key.partition(":")[0]
    with balancer(*pool, strategy="consistent_hash", hash_key=hash_key) as lb:
        s = lb.session()
        homes: dict[str, set[str]] = {}
        for _ in range(3):
            for i in range(12):
                key = f"k{i}"
                inbound = ({"headers": {"x-user": key}} if kind == "header"
                           else {"cookies": {"session": key}})
                with routing_context(**inbound):
                    homes.setdefault(key, set()).add(_home(s))
        assert all(len(v) == 1 for v in homes.values())  # one endpoint per incoming key
        assert len({next(iter(v)) for v in homes.values()}) > 1  # and keys spread
        # the incoming values are only read: none of them was sent to a backend
        sent = [r["headers"] for b in pool for r in b.received]
        assert not any("X-User" in h or "Cookie" in h for h in sent)


@pytest.mark.parametrize("hash_key", ["header:X-User", "cookie:session"])
def test_the_outgoing_requests_own_header_or_cookie_wins(backend_factory: Factory,
                                                        hash_key: str) -> None:
    pool = [backend_factory(f"h{i}") for i in range(4)]
    header = hash_key.startswith("header")

    def own(key: str) -> dict[str, Any]:
        return {"headers": {"X-User": key}} if header else {"cookies": {"session": key}}

    with balancer(*pool, strategy="consistent_hash", hash_key=hash_key) as lb:
        s = lb.session()
        alone = {f"k{i}": _home(s, **own(f"k{i}")) for i in range(12)}
        # an incoming value that would send each key elsewhere: "k0" goes where "k1" goes...
        other = {k: next(o for o in alone if alone[o] != alone[k]) for k in alone}
        for key, home in alone.items():
            inbound = ({"headers": {"X-User": other[key]}} if header
                       else {"cookies": {"session": other[key]}})
            with routing_context(**inbound):
                assert _home(s, **own(key)) == home


def test_user_id_of_is_called_only_when_a_user_id_key_is_needed(
        backend_factory: Factory) -> None:
    pool = [backend_factory(f"h{i}") for i in range(3)]
    calls: list[int] = []

    def user() -> Optional[int]:
        calls.append(1)
        return 7

    with balancer(*pool, strategy="consistent_hash", hash_key="header:X-Other") as lb:
        with routing_context(user_id_of=user):
            lb.session().get("http://users/")
        assert calls == []  # not a user_id key: the user was never looked up
    with balancer(*pool, strategy="consistent_hash", hash_key="user_id") as lb:
        s = lb.session()
        with routing_context(user_id_of=user):
            homes = {_home(s) for _ in range(6)}
        with routing_context(user_id="7"):
            assert {_home(s) for _ in range(3)} == homes  # 7 and "7" are one key
        assert len(homes) == 1 and len(calls) == 6


def test_the_context_copies_what_it_is_given_and_looks_headers_up_in_any_case() -> None:
    cookies = {"a": "1"}
    headers = {"X-Forwarded-For": "203.0.113.9"}
    with routing_context(cookies=cookies, headers=headers, source_ip="198.51.100.1") as ctx:
        cookies["a"] = "changed"
        headers["X-Forwarded-For"] = "changed"
        assert current() is ctx
        assert ctx.cookie("a") == "1" and ctx.cookie("b") is None
        assert ctx.header("x-forwarded-for") == "203.0.113.9"
        assert ctx.user() is None
    assert current().source_ip is None and current().header("x-forwarded-for") is None


def test_using_installs_a_context_as_it_is_with_lazy_lookups(backend_factory: Factory) -> None:
    pool = [backend_factory(f"h{i}") for i in range(4)]
    asked: list[str] = []

    def source() -> str:
        asked.append("ip")
        return "203.0.113.50"

    headers = {"x-user": "u1"}  # used as it is: no copy
    with balancer(*pool, strategy="consistent_hash", hash_key="source_ip") as lb:
        s = lb.session()
        with using(RoutingContext(source_ip_of=source, headers=headers)) as ctx:
            assert current() is ctx and ctx.headers is headers
            homes = {_home(s) for _ in range(4)}
        with routing_context(source_ip="203.0.113.50"):
            assert {_home(s) for _ in range(2)} == homes
    assert len(homes) == 1 and asked == ["ip"] * 4
    assert RoutingContext(source_ip="198.51.100.2", source_ip_of=source).source() == (
        "198.51.100.2")  # a value given wins: no lookup
    assert len(asked) == 4


def test_enter_and_leave_set_the_context_without_a_with_block() -> None:
    outer = RoutingContext(user_id="outer")
    inner = RoutingContext(user_id="inner")
    first = context.enter(outer)
    try:
        assert current() is outer
        second = context.enter(inner)
        assert current() is inner
        context.leave(second)
        assert current() is outer
    finally:
        context.leave(first)
    assert current().user_id is None
