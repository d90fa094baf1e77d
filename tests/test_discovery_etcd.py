"""Discovery from a real etcd (Debian's etcd-server), and self-registration under a lease."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tai_lb import ConfigError, LoadBalancer
from tai_lb.discovery.etcd import (
    Backoff,
    EtcdClient,
    EtcdProvider,
    EtcdRegistrar,
    WatchCompacted,
    interrupt,
)

from .conftest import functions_on_stack, in_forked_child, wait_for
from .etcdserver import EtcdServer, free_port
from .faultproxy import FaultProxy

_counter = itertools.count()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for the session; each test works under a prefix of its own."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of the test's own, for tests that stop it."""
    server = EtcdServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"/t{next(_counter)}/services"


@pytest.fixture
def client(etcd: EtcdServer) -> Iterator[EtcdClient]:
    client = etcd.client()
    yield client
    client.close()


def put(client: EtcdClient, prefix: str, instance: str, value: Any) -> int:
    text = value if isinstance(value, str) else json.dumps(value)
    return client.put(f"{prefix}/users/{instance}", text)


def lb_for(urls: list[str], prefix: str, **settings: Any) -> LoadBalancer:
    return LoadBalancer.from_config({"services": {"users": {"discovery": {
        "type": "etcd", "urls": urls, "prefix": prefix, "interval": 0.05, **settings}}}})


def addresses(lb: LoadBalancer) -> set[str]:
    return {e.address for e in lb.registry.endpoints("users")}


def discovery(lb: LoadBalancer) -> dict[str, Any]:
    state: dict[str, Any] = lb.status()["services"]["users"]["discovery"]
    return state


def test_add_remove_and_change_reach_picks(etcd: EtcdServer, client: EtcdClient,
                                           prefix: str) -> None:
    put(client, prefix, "a", {"address": "10.0.0.1:80"})
    put(client, prefix, "b", {"address": "10.0.0.2:80", "zone": "eu-1a"})
    client.put(f"{prefix}/orders/x", json.dumps({"address": "10.9.9.9:80"}))  # another service
    with lb_for([etcd.url], prefix) as lb:
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"}  # listed at start
        assert lb.registry.snapshot("users").by_address["10.0.0.2:80"].zone == "eu-1a"
        put(client, prefix, "c", {"address": "10.0.0.3:80", "labels": {"canary": "yes"}})
        assert wait_for(lambda: "10.0.0.3:80" in {lb.pick("users").address for _ in range(30)})
        put(client, prefix, "a", {"address": "10.0.0.1:80", "weight": 7})
        assert wait_for(lambda: lb.registry.snapshot("users").by_address["10.0.0.1:80"].weight
                        == 7)
        client.delete(f"{prefix}/users/b")
        assert wait_for(lambda: addresses(lb) == {"10.0.0.1:80", "10.0.0.3:80"})
        assert "10.0.0.2:80" not in {lb.pick("users").address for _ in range(30)}
        state = discovery(lb)
        assert state["source"]["connected"] and state["errors"] == 0
        assert state["source"]["lists"] == 1  # one list, then the watch alone


def test_malformed_values_are_skipped_and_the_last_good_value_kept(
        etcd: EtcdServer, client: EtcdClient, prefix: str) -> None:
    put(client, prefix, "a", {"address": "10.0.0.1:80"})
    put(client, prefix, "bad-json", "{not json")
    put(client, prefix, "bad-port", {"address": "10.0.0.2:0"})
    put(client, prefix, "bad-key", {"address": "10.0.0.3:80", "colour": "red"})
    with lb_for([etcd.url], prefix) as lb:
        assert addresses(lb) == {"10.0.0.1:80"}
        assert discovery(lb)["skipped_entries"] == 3
        put(client, prefix, "a", "garbage")  # a bad update of a good key keeps its last value
        put(client, prefix, "d", {"address": "10.0.0.4:80"})
        assert wait_for(lambda: addresses(lb) == {"10.0.0.1:80", "10.0.0.4:80"})
        assert discovery(lb)["skipped_entries"] == 4


def test_500_malformed_keys_are_one_warning_with_their_count_and_a_few_examples(
        etcd: EtcdServer, client: EtcdClient, prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    put(client, prefix, "a", {"address": "10.0.0.1:80"})
    for i in range(500):
        put(client, prefix, f"bad{i:03}", "{not json" if i % 2 else {"address": "10.0.0.2:0"})
    put(client, prefix, "b", {"address": "10.0.0.1:80"})  # a repeat, the other kind of skip
    with caplog.at_level(logging.WARNING, logger="tai_lb"), lb_for([etcd.url], prefix) as lb:
        assert addresses(lb) == {"10.0.0.1:80"}
        assert discovery(lb)["skipped_entries"] == 501
    skips = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    malformed = [m for m in skips if "holding no valid endpoint" in m]
    assert len(malformed) == 1, skips
    assert f"etcd keys {prefix}/users/*: skipping 500 key(s)" in malformed[0]
    assert "bad000" in malformed[0] and "bad001" in malformed[0]  # examples of both kinds
    assert "bad499" not in malformed[0] and len(malformed[0]) < 1000
    assert [m for m in skips if "repeating an endpoint" in m] == [
        f"tai-lb: etcd keys {prefix}/users/*: skipping 1 key(s) repeating an endpoint, such "
        f"as: {prefix}/users/b repeats 10.0.0.1:80"]


def test_a_watch_on_a_compacted_revision_lists_again_and_loses_no_change(
        etcd: EtcdServer, client: EtcdClient, prefix: str) -> None:
    for i in range(1, 6):
        put(client, prefix, f"i{i}", {"address": f"10.0.0.{i}:80"})
    with lb_for([etcd.url], prefix) as lb:
        provider = lb.watcher("users").provider
        assert isinstance(provider, EtcdProvider)
        listed_at = provider.snapshot()["revision"]
        provider.stop()  # the watch is down while these happen and are compacted away
        client.delete(f"{prefix}/users/i1")
        put(client, prefix, "i2", {"address": "10.0.0.2:80", "weight": 3})
        put(client, prefix, "i6", {"address": "10.0.0.6:80"})
        client.delete(f"{prefix}/users/i6")
        latest = put(client, prefix, "i7", {"address": "10.0.0.7:80"})
        client.compact(latest)
        stream = client.watch(f"{prefix}/users/", listed_at + 1)
        with pytest.raises(WatchCompacted):  # etcd creates the watch, then cancels it
            stream.next_message()
        stream.close()
        provider.start(lb.watcher("users").wake)  # resumes from the listed revision
        assert wait_for(lambda: addresses(lb) == {"10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80",
                                                  "10.0.0.5:80", "10.0.0.7:80"})
        assert provider.compactions == 1
        assert lb.registry.snapshot("users").by_address["10.0.0.2:80"].weight == 3
        put(client, prefix, "i8", {"address": "10.0.0.8:80"})  # and the new watch works
        assert wait_for(lambda: "10.0.0.8:80" in addresses(lb))


def test_a_silent_watch_is_opened_again_without_listing(etcd: EtcdServer, client: EtcdClient,
                                                        prefix: str) -> None:
    put(client, prefix, "a", {"address": "10.0.0.1:80"})
    provider = EtcdProvider(etcd.client(), prefix, "users", idle=0.1)
    woken = threading.Event()
    provider.start(woken.set)
    try:
        assert provider.fetch() is not None
        woken.clear()
        assert wait_for(lambda: provider.rewatches >= 2)
        put(client, prefix, "b", {"address": "10.0.0.2:80"})
        assert wait_for(woken.is_set)
        endpoints = provider.fetch()
        assert endpoints is not None
        assert {e.address for e in endpoints} == {"10.0.0.1:80", "10.0.0.2:80"}
        assert provider.lists == 1 and provider.snapshot()["connected"]
    finally:
        provider.stop()


@contextlib.contextmanager
def connects_hang() -> Iterator[str]:
    """The URL of a listener whose backlog is full: new connections hang in connect(), as
    with a host that drops packets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield f"http://127.0.0.1:{port}"
    finally:
        for sock in (*fillers, listener):
            sock.close()


def test_a_lost_watch_reconnects_and_catches_up(etcd: EtcdServer, client: EtcdClient,
                                                prefix: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    proxy = FaultProxy(("127.0.0.1", etcd.client_port))
    caplog.set_level(logging.DEBUG, logger="tai_lb")
    try:
        put(client, prefix, "a", {"address": "10.0.0.1:80"})
        with lb_for([f"http://{proxy.address}"], prefix) as lb:
            assert addresses(lb) == {"10.0.0.1:80"}
            assert wait_for(lambda: discovery(lb)["source"]["watching"])
            proxy.mode = "refuse"  # the watch is cut, reconnects are refused
            put(client, prefix, "b", {"address": "10.0.0.2:80"})
            assert wait_for(lambda: "refused" in (discovery(lb)["last_error"] or "").lower())
            assert wait_for(lambda: discovery(lb)["errors"] >= 3)
            assert addresses(lb) == {"10.0.0.1:80"}  # the last good set
            proxy.mode = "pass"
            assert wait_for(lambda: addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"})
            assert wait_for(lambda: discovery(lb)["last_error"] is None)
    finally:
        proxy.stop()
    # One warning for the outage ("watch lost", then "connection refused" at every attempt),
    # not one per message or per round; its end at INFO.
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_close_ends_a_connect_that_hangs(etcd: EtcdServer, prefix: str) -> None:
    provider = EtcdProvider(EtcdClient([etcd.url], timeout=30), prefix, "users")
    provider.start(lambda: None)
    thread = provider.thread
    assert thread is not None
    try:
        assert wait_for(lambda: provider.snapshot()["watching"])
        with connects_hang() as url:
            provider.client.urls = [url]  # the member is now behind a host dropping packets
            interrupt(thread)  # the watch is lost: the thread connects again, and hangs
            assert wait_for(lambda: "_new_conn" in functions_on_stack(thread))
            provider.stop()  # cuts the connect short; joins for one second at most
            assert not thread.is_alive()
    finally:
        provider.stop()


def test_keys_that_are_not_utf8_stay_apart(etcd: EtcdServer, client: EtcdClient,
                                           prefix: str) -> None:
    def key(raw: bytes) -> str:
        return base64.b64encode(f"{prefix}/users/".encode() + raw).decode()

    for raw, address in ((b"\xfe", "10.0.0.1:80"), (b"\xff", "10.0.0.2:80")):
        client.call("kv/put", {"key": key(raw), "value": base64.b64encode(
            json.dumps({"address": address}).encode()).decode()})
    with lb_for([etcd.url], prefix) as lb:
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"}
        client.call("kv/deleterange", {"key": key(b"\xff")})  # by the watch
        assert wait_for(lambda: addresses(lb) == {"10.0.0.1:80"})
        assert discovery(lb)["skipped_entries"] == 0


def test_a_repeated_address_is_skipped_and_counted_once_while_it_stays(
        etcd: EtcdServer, client: EtcdClient, prefix: str) -> None:
    put(client, prefix, "a", {"address": "10.0.0.1:80", "weight": 2})
    put(client, prefix, "b", {"address": "10.0.0.1:80", "weight": 5})  # the same, again
    with lb_for([etcd.url], prefix) as lb:
        assert addresses(lb) == {"10.0.0.1:80"}
        assert discovery(lb)["skipped_entries"] == 1
        put(client, prefix, "c", {"address": "10.0.0.3:80"})  # an unrelated change
        assert wait_for(lambda: "10.0.0.3:80" in addresses(lb))
        assert discovery(lb)["skipped_entries"] == 1  # not counted again
        client.delete(f"{prefix}/users/a")  # the first key goes: the second one serves
        assert wait_for(lambda: lb.registry.snapshot("users").by_address["10.0.0.1:80"].weight
                        == 5)
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.3:80"}


def test_etcd_stopped_keeps_the_last_good_set_serving(own_etcd: EtcdServer) -> None:
    client = own_etcd.client()
    put(client, "/services", "a", {"address": "10.0.0.1:80"})
    put(client, "/services", "b", {"address": "10.0.0.2:80"})
    with lb_for([own_etcd.url], "/services") as lb:
        own_etcd.stop()
        assert wait_for(lambda: discovery(lb)["errors"] >= 2)
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"}
        assert lb.pick("users").address in {"10.0.0.1:80", "10.0.0.2:80"}
        assert not discovery(lb)["source"]["connected"]
        assert discovery(lb)["staleness_seconds"] is not None
        own_etcd.start()
        client.delete("/services/users/b")
        assert wait_for(lambda: addresses(lb) == {"10.0.0.1:80"}, timeout=20)
    client.close()


def test_a_mass_removal_is_held_back_until_confirmed(etcd: EtcdServer, client: EtcdClient,
                                                     prefix: str) -> None:
    for i in range(1, 5):
        put(client, prefix, f"i{i}", {"address": f"10.0.0.{i}:80"})
    with lb_for([etcd.url], prefix, confirmations=3, interval=0.2, empty_hold=0) as lb:
        watcher = lb.watcher("users")
        client.delete(f"{prefix}/users/", prefix=True)  # a bad deploy wipes the prefix
        assert wait_for(lambda: watcher.held_back >= 1)
        assert len(addresses(lb)) == 4
        assert wait_for(lambda: not addresses(lb))  # still empty at the third look: applied
        assert watcher.held_back == 2


def test_several_urls_one_member_down(etcd: EtcdServer, client: EtcdClient,
                                      prefix: str) -> None:
    proxy = FaultProxy(("127.0.0.1", etcd.client_port))
    proxy.mode = "refuse"
    try:
        put(client, prefix, "a", {"address": "10.0.0.1:80"})
        with lb_for([f"http://{proxy.address}", etcd.url], prefix) as lb:
            assert addresses(lb) == {"10.0.0.1:80"}
            put(client, prefix, "b", {"address": "10.0.0.2:80"})
            assert wait_for(lambda: len(addresses(lb)) == 2)
    finally:
        proxy.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_resumes_the_watch(etcd: EtcdServer, client: EtcdClient,
                                          prefix: str) -> None:
    put(client, prefix, "a", {"address": "10.0.0.1:80"})
    with lb_for([etcd.url], prefix) as lb:
        assert wait_for(lambda: discovery(lb)["source"]["watching"])

        def child() -> dict[str, Any]:  # sees a change made after the fork, on its threads
            seen = wait_for(lambda: addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"})
            names = sorted(t.name for t in threading.enumerate() if t.name.startswith("tai"))
            lists = discovery(lb)["source"]["lists"]
            lb.close()
            return {"seen": seen, "threads": names, "lists": lists}

        report = in_forked_child(child, lambda: put(client, prefix, "b",
                                                    {"address": "10.0.0.2:80"}))
        assert report["seen"]
        assert "tai-lb-etcd-watch-users" in report["threads"]
        assert report["lists"] == 1  # resumed from the revision, not listed again
        assert wait_for(lambda: addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"})  # parent too


def test_the_registrar_registers_keeps_alive_and_deletes(etcd: EtcdServer, client: EtcdClient,
                                                         prefix: str) -> None:
    endpoint = {"address": "10.0.0.9:8080", "zone": "eu-1a", "labels": {"canary": "no"}}
    with lb_for([etcd.url], prefix, empty_hold=0.5) as lb:
        registrar = EtcdRegistrar([etcd.url], "users", endpoint, prefix=prefix, ttl=2)
        with registrar:
            assert wait_for(lambda: addresses(lb) == {"10.0.0.9:8080"})
            stored = json.loads(dict(client.get_prefix(f"{prefix}/users/")[1])[registrar.key])
            assert stored == {"address": "10.0.0.9:8080", "weight": 1, "zone": "eu-1a",
                              "labels": {"canary": "no"}}
            assert registrar.key == f"{prefix}/users/10.0.0.9:8080"
            lease = registrar.lease
            # Kept alive: after four renewals (more than a TTL) the same lease holds the key.
            assert wait_for(lambda: registrar.keepalives >= 4)
            assert registrar.lease == lease and registrar.registrations == 1
            assert addresses(lb) == {"10.0.0.9:8080"}
            assert any(t.name == "tai-lb-etcd-registrar-users" for t in threading.enumerate())
        assert not any(t.name == "tai-lb-etcd-registrar-users" for t in threading.enumerate())
        assert client.get_prefix(f"{prefix}/users/")[1] == []  # deleted on close
        assert wait_for(lambda: discovery(lb)["held_back"] >= 1)  # emptying: held back...
        assert wait_for(lambda: not addresses(lb))  # ...then applied


def test_a_lost_lease_is_granted_again_within_two_ttls(etcd: EtcdServer, client: EtcdClient,
                                                       prefix: str) -> None:
    ttl = 2
    with EtcdRegistrar([etcd.url], "users", "10.0.0.9:8080", prefix=prefix,
                       ttl=ttl) as registrar:
        assert registrar.registrations == 1
        lost = registrar.lease
        client.revoke(lost)  # as etcd does when the lease expires: the key goes with it
        # (The registrar may put it back at any moment, so its absence is not asserted.)
        assert wait_for(lambda: registrar.registrations == 2, timeout=2 * ttl)
        assert registrar.lease != lost
        assert [key for key, _ in client.get_prefix(f"{prefix}/users/")[1]] == [registrar.key]


def test_etcd_out_of_reach_longer_than_the_ttl_registers_again(
        etcd: EtcdServer, client: EtcdClient, prefix: str) -> None:
    ttl = 1
    proxy = FaultProxy(("127.0.0.1", etcd.client_port))
    try:
        with EtcdRegistrar([f"http://{proxy.address}"], "users", "10.0.0.9:8080",
                           prefix=prefix, ttl=ttl) as registrar:
            proxy.mode = "refuse"
            # The lease expires in etcd while this instance cannot reach it.
            assert wait_for(lambda: client.get_prefix(f"{prefix}/users/")[1] == [], timeout=10)
            assert wait_for(lambda: registrar.errors > 0)
            proxy.mode = "pass"
            assert wait_for(lambda: client.get_prefix(f"{prefix}/users/")[1] != [],
                            timeout=2 * ttl + 1)
            assert wait_for(lambda: registrar.registrations == 2)
    finally:
        proxy.stop()


def test_interpreter_exit_deletes_the_registration(etcd: EtcdServer, client: EtcdClient,
                                                   prefix: str) -> None:
    script = (
        "import sys, tai_lb\n"
        f"r = tai_lb.EtcdRegistrar([{etcd.url!r}], 'users', '10.0.0.9:8080', prefix={prefix!r},"
        " ttl=60).start()\n"
        "assert r.registrations == 1\n"
        "print('registered', flush=True)\n"
        "sys.stdin.readline()\n"  # exits normally, without close(), when told to
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline() == "registered\n"
    assert [key for key, _ in client.get_prefix(f"{prefix}/users/")[1]] == [
        f"{prefix}/users/10.0.0.9:8080"]
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.wait(20) == 0
    assert client.get_prefix(f"{prefix}/users/")[1] == []  # well before the 60 s lease ends


def test_reconnect_delays_grow_with_jitter_up_to_the_cap_and_reset() -> None:
    backoff = Backoff(first=0.1, cap=1.0)
    delays = [backoff.next() for _ in range(8)]
    bounds = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    for delay, bound in zip(delays, bounds):
        assert bound / 2 <= delay <= bound
    assert len({round(d, 9) for d in delays[4:]}) > 1  # jittered, not in step
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.1


def test_the_registrar_warns_once_while_etcd_is_down(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tai_lb")
    registrar = EtcdRegistrar([f"http://127.0.0.1:{free_port()}"], "users", "10.0.0.9:8080",
                              ttl=1)  # nothing listens: every attempt, each 1/3 s, fails
    with registrar:
        assert wait_for(lambda: registrar.errors >= 4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "refused" in warnings[0].lower()
    assert registrar.snapshot()["last_error"] is not None


@pytest.mark.parametrize(("urls", "path"), [
    ("http://127.0.0.1:2379", "urls"),  # one string, not a list
    (["127.0.0.1:2379"], "urls[0]"),
    (["http://127.0.0.1:port"], "urls[0]"),
])
def test_the_registrar_checks_its_urls(urls: Any, path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        EtcdRegistrar(urls, "users", "10.0.0.9:8080")
    assert caught.value.path == path


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_neither_renews_nor_revokes_the_parents_lease(
        etcd: EtcdServer, client: EtcdClient, prefix: str) -> None:
    with EtcdRegistrar([etcd.url], "users", "10.0.0.9:8080", prefix=prefix,
                       ttl=5) as registrar:
        parent_lease = registrar.lease

        def child() -> dict[str, Any]:
            inherited = registrar.snapshot()
            registrar.close()  # leaves the parent's registration alone
            registrar.start()  # a registration of the child's own...
            own = registrar.lease
            registrar.close()  # ...which its close() revokes
            return {"inherited": inherited, "own": own}

        report = in_forked_child(child)
        assert report["inherited"]["lease"] == 0 and not report["inherited"]["running"]
        assert report["own"] not in (0, parent_lease)
        assert client.keepalive(report["own"]) == 0  # revoked by the child that granted it
        assert client.keepalive(parent_lease) > 0  # the parent's lives on
