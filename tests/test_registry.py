"""ServiceRegistry: writes, snapshots, queries, and subscriptions delivered in order, once."""

from __future__ import annotations

import os
import random
import threading
from typing import Any, Optional

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tai_lb import ConfigError, Endpoint, ServiceRegistry, TopologyChange, UnknownService
from tai_lb.filters import in_zone

from .conftest import in_forked_child


def test_register_and_read_back_in_order() -> None:
    reg = ServiceRegistry()
    reg.register("users", "127.0.0.1:8002")
    reg.register("users", Endpoint("127.0.0.1", 8001, zone="eu-1a"))
    assert [e.address for e in reg.endpoints("users")] == ["127.0.0.1:8002", "127.0.0.1:8001"]
    assert reg.services() == ("users",)
    assert "users" in reg and "billing" not in reg


def test_reregistering_an_address_replaces_its_metadata() -> None:
    reg = ServiceRegistry()
    changes: list[TopologyChange] = []
    reg.subscribe(changes.append)
    reg.register("users", Endpoint("127.0.0.1", 8001, weight=1))
    reg.register("users", Endpoint("127.0.0.1", 8001, weight=4))
    reg.register("users", Endpoint("127.0.0.1", 8001, weight=4))  # identical: no event
    assert [e.weight for e in reg.endpoints("users")] == [4]
    assert [(c.kind, c.endpoint.weight) for c in changes] == [("added", 1), ("changed", 4)]
    assert changes[1].previous is not None and changes[1].previous.weight == 1


def test_deregister_by_endpoint_or_address() -> None:
    reg = ServiceRegistry()
    reg.register_many("users", ["127.0.0.1:8001", "127.0.0.1:8002", "[::1]:8003"])
    assert reg.deregister("users", "127.0.0.1:8001")
    assert reg.deregister("users", Endpoint("127.0.0.1", 8002, weight=9))  # identity is address
    assert reg.deregister("users", "[0:0::1]:8003")
    assert not reg.deregister("users", "127.0.0.1:8001")
    assert reg.endpoints("users") == ()
    assert reg.deregister_many("users", ["127.0.0.1:9"]) == 0


def test_a_service_stays_known_with_zero_endpoints() -> None:
    reg = ServiceRegistry()
    reg.register("users", "127.0.0.1:8001")
    reg.deregister("users", "127.0.0.1:8001")
    assert reg.services() == ("users",)
    reg.add_service("billing")
    assert reg.endpoints("billing") == ()


def test_unknown_service() -> None:
    reg = ServiceRegistry()
    with pytest.raises(UnknownService):
        reg.endpoints("users")
    with pytest.raises(UnknownService):
        reg.deregister("users", "127.0.0.1:1")
    assert reg.get_snapshot("users") is None


def test_bad_service_name_and_endpoint_are_config_errors() -> None:
    reg = ServiceRegistry()
    with pytest.raises(ConfigError, match="lower-case host name"):
        reg.register("Users", "127.0.0.1:1")
    with pytest.raises(ConfigError, match="lower-case host name"):
        reg.register("users\n", "127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"endpoints\[1\].port"):
        reg.register_many("users", ["127.0.0.1:1", "127.0.0.1:0"])
    assert "users" not in reg  # nothing was applied


def test_batch_is_one_snapshot() -> None:
    reg = ServiceRegistry()
    reg.add_service("users")
    before = reg.snapshot("users")
    reg.register_many("users", ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    after = reg.snapshot("users")
    assert after.generation > before.generation
    assert len(before) == 0 and len(after) == 3  # the old snapshot never changes


def test_set_endpoints_emits_only_differences() -> None:
    reg = ServiceRegistry()
    reg.register_many("users", ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    changes: list[TopologyChange] = []
    reg.subscribe(changes.append)
    reg.set_endpoints("users", ["127.0.0.1:2", {"address": "127.0.0.1:3", "weight": 2},
                                "127.0.0.1:4"])
    assert [(c.kind, c.endpoint.address) for c in changes] == [
        ("removed", "127.0.0.1:1"), ("changed", "127.0.0.1:3"), ("added", "127.0.0.1:4")]
    assert [e.address for e in reg.endpoints("users")] == [
        "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]


def test_find_by_metadata() -> None:
    reg = ServiceRegistry()
    reg.register_many("users", [
        Endpoint("10.0.0.1", 80, zone="a", region="r1", version="1", labels={"canary": "no"}),
        Endpoint("10.0.0.2", 80, zone="b", region="r1", version="2", labels={"canary": "yes"}),
    ])
    reg.register("billing", Endpoint("10.0.0.3", 80, zone="a", region="r2"))
    assert sorted(e.address for e in reg.find(zone="a")) == ["10.0.0.1:80", "10.0.0.3:80"]
    assert [e.address for e in reg.find("users", zone="a")] == ["10.0.0.1:80"]
    assert [e.address for e in reg.find("users", region="r1", version="2")] == ["10.0.0.2:80"]
    assert [e.address for e in reg.find("users", labels={"canary": "yes"})] == ["10.0.0.2:80"]
    assert [e.address for e in reg.find("users", where=~in_zone("a"))] == ["10.0.0.2:80"]
    assert [e.address for e in reg.find("users", where=in_zone("a") | in_zone("b"))] == [
        "10.0.0.1:80", "10.0.0.2:80"]
    assert reg.find("users", zone="c") == ()


def test_failing_subscriber_never_breaks_the_others() -> None:
    reg = ServiceRegistry()
    seen: list[str] = []

    def broken(change: TopologyChange) -> None:
        raise RuntimeError("subscriber bug")

    reg.subscribe(broken)
    reg.subscribe(lambda c: seen.append(c.endpoint.address))
    reg.register("users", "127.0.0.1:1")
    reg.register("users", "127.0.0.1:2")
    assert seen == ["127.0.0.1:1", "127.0.0.1:2"]
    assert reg.callback_errors == 2


def test_unsubscribe_stops_deliveries() -> None:
    reg = ServiceRegistry()
    seen: list[TopologyChange] = []
    subscription = reg.subscribe(seen.append)
    reg.register("users", "127.0.0.1:1")
    subscription.unsubscribe()
    subscription.unsubscribe()  # twice is fine
    reg.register("users", "127.0.0.1:2")
    assert len(seen) == 1
    with reg.subscribe(seen.append):
        reg.register("users", "127.0.0.1:3")
    reg.register("users", "127.0.0.1:4")
    assert [c.endpoint.address for c in seen] == ["127.0.0.1:1", "127.0.0.1:3"]


def test_callbacks_run_outside_the_lock_and_may_write() -> None:
    reg = ServiceRegistry()
    seen: list[tuple[str, str]] = []

    def mirror(change: TopologyChange) -> None:
        seen.append((change.kind, change.endpoint.address))
        if change.service == "users" and change.kind == "added":
            reg.register("mirror", change.endpoint)  # re-entrant write must not deadlock

    reg.subscribe(mirror)
    reg.register("users", "127.0.0.1:1")
    assert [e.address for e in reg.endpoints("mirror")] == ["127.0.0.1:1"]
    assert seen == [("added", "127.0.0.1:1"), ("added", "127.0.0.1:1")]


def test_concurrent_writers_deliver_every_change_once_in_order() -> None:
    reg = ServiceRegistry()
    received: list[TopologyChange] = []
    lock = threading.Lock()

    def record(change: TopologyChange) -> None:
        with lock:
            received.append(change)

    reg.subscribe(record)
    barrier = threading.Barrier(8)

    def writer(n: int) -> None:
        barrier.wait()
        for i in range(200):
            reg.register("users", f"10.0.{n}.{i % 50}:80")
            if i % 3 == 0:
                reg.deregister("users", f"10.0.{n}.{i % 50}:80")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sequences = [c.sequence for c in received]
    assert sequences == list(range(1, len(received) + 1))  # every change, once, in order
    model: dict[str, Endpoint] = {}
    for change in received:
        if change.kind == "removed":
            del model[change.endpoint.address]
        else:
            model[change.endpoint.address] = change.endpoint
    assert set(model) == {e.address for e in reg.endpoints("users")}


addresses = st.sampled_from([f"127.0.0.1:{port}" for port in range(8000, 8006)])
weights = st.integers(min_value=1, max_value=3)
services = st.sampled_from(["users", "billing"])


class RegistryMachine(RuleBasedStateMachine):
    """The registry matches a plain dict model, and its events replay to the same state."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = ServiceRegistry()
        self.model: dict[str, dict[str, Endpoint]] = {}
        self.replayed: dict[str, dict[str, Endpoint]] = {}
        self.last_sequence = 0
        self.registry.subscribe(self.replay)

    def replay(self, change: TopologyChange) -> None:
        assert change.sequence == self.last_sequence + 1
        self.last_sequence = change.sequence
        endpoints = self.replayed.setdefault(change.service, {})
        if change.kind == "added":
            assert change.endpoint.address not in endpoints
            endpoints[change.endpoint.address] = change.endpoint
        elif change.kind == "changed":
            assert endpoints[change.endpoint.address] == change.previous
            endpoints[change.endpoint.address] = change.endpoint
        else:
            assert endpoints.pop(change.endpoint.address) == change.endpoint

    @rule(service=services, address=addresses, weight=weights)
    def register(self, service: str, address: str, weight: int) -> None:
        endpoint = Endpoint.parse(address, weight=weight)
        self.registry.register(service, endpoint)
        self.model.setdefault(service, {})[address] = endpoint

    @rule(service=services, batch=st.lists(st.tuples(addresses, weights), max_size=4))
    def register_many(self, service: str, batch: list[tuple[str, int]]) -> None:
        endpoints = [Endpoint.parse(a, weight=w) for a, w in batch]
        self.registry.register_many(service, endpoints)
        target = self.model.setdefault(service, {})
        for endpoint in endpoints:
            target[endpoint.address] = endpoint

    @rule(service=services, address=addresses)
    def deregister(self, service: str, address: str) -> None:
        if service not in self.model:
            with pytest.raises(UnknownService):
                self.registry.deregister(service, address)
            return
        removed = self.registry.deregister(service, address)
        assert removed == (self.model[service].pop(address, None) is not None)

    @rule(service=services, batch=st.lists(st.tuples(addresses, weights), max_size=4))
    def set_endpoints(self, service: str, batch: list[tuple[str, int]]) -> None:
        wanted = {a: Endpoint.parse(a, weight=w) for a, w in batch}
        self.registry.set_endpoints(service, list(wanted.values()))
        self.model[service] = dict(wanted)

    @invariant()
    def matches_model(self) -> None:
        assert set(self.registry.services()) == set(self.model)
        for service, endpoints in self.model.items():
            snapshot = self.registry.snapshot(service)
            assert dict(snapshot.by_address) == endpoints
            assert set(snapshot.endpoints) == set(endpoints.values())
            replayed: Optional[dict[str, Endpoint]] = self.replayed.get(service, {})
            assert replayed == endpoints


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


# -- full updates: the fast paths agree with the plain algorithm --------------------------------


Event = tuple[str, Endpoint, Optional[Endpoint]]


def plain_set_endpoints(current: dict[str, Endpoint], endpoints: list[Endpoint],
                        ) -> tuple[dict[str, Endpoint], list[Event]]:
    """set_endpoints() written plainly: the new set, in order, and its events."""
    wanted: dict[str, Endpoint] = {}
    for endpoint in endpoints:
        wanted[endpoint.address] = endpoint
    events: list[Event] = [
        ("removed", old, None) for address, old in current.items() if address not in wanted]
    result: dict[str, Endpoint] = {}
    for address, old in current.items():
        if address in wanted:
            if wanted[address] != old:
                events.append(("changed", wanted[address], old))
            result[address] = wanted[address]
    for address, new in wanted.items():
        if address not in current:
            events.append(("added", new, None))
            result[address] = new
    return result, events


def next_endpoint_set(rng: random.Random, current: list[Endpoint]) -> list[Endpoint]:
    """A full update as a provider sends it: rebuilt objects, mostly in the last order."""
    pool = [f"10.0.{i // 50}.{i % 50}:80" for i in range(120)]
    items = [Endpoint.from_value(e.to_dict()) for e in current]  # equal, never identical
    for _ in range(rng.choice([0, 0, 1, 1, 2, 5, 40])):
        kind = rng.randrange(5)
        if kind == 0 or not items:
            items.insert(rng.randrange(len(items) + 1), Endpoint.parse(rng.choice(pool)))
        elif kind == 1:
            del items[rng.randrange(len(items))]
        elif kind == 2:
            index = rng.randrange(len(items))
            items[index] = items[index].replace(weight=rng.randrange(1, 4))
        elif kind == 3:
            index = rng.randrange(len(items))
            items[index] = items[index].replace(labels={"v": str(rng.randrange(3))})
        else:  # an address twice, the second with other metadata
            items.append(rng.choice(items).replace(zone="z2"))
    if rng.random() < 0.15:
        rng.shuffle(items)
    return items


@pytest.mark.parametrize("window", ["default", "never"])
@pytest.mark.parametrize("seed", range(6))
def test_full_updates_match_the_plain_algorithm(seed: int, window: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import tai_lb.snapshot

    if window == "never":  # every update diffed over the whole set, by address
        monkeypatch.setattr(tai_lb.snapshot, "_WINDOW_MAX", -1)
    rng = random.Random(seed)
    reg = ServiceRegistry()
    reg.add_service("users")
    changes: list[TopologyChange] = []
    reg.subscribe(changes.append)
    sent: list[Endpoint] = []
    for _ in range(60):
        if rng.random() < 0.2:  # a write of another kind in between drops the diff's memory
            address = f"10.0.9.{rng.randrange(5)}:80"
            if rng.random() < 0.5:
                reg.register("users", address)
            else:
                reg.deregister("users", address)
            sent = list(reg.endpoints("users"))
            continue
        sent = next_endpoint_set(rng, sent)
        before = reg.snapshot("users")
        expected, events = plain_set_endpoints(dict(before.by_address), sent)
        changes.clear()
        reg.set_endpoints("users", sent)
        after = reg.snapshot("users")
        assert list(after.by_address) == list(expected)  # positions: stay, then appended
        assert list(after.endpoints) == list(expected.values())
        assert [(c.kind, c.endpoint, c.previous) for c in changes] == events
        assert (after is before) == (not events)  # nothing published for no difference
        for endpoint in after.endpoints:  # an equal endpoint keeps the registered object
            old = before.by_address.get(endpoint.address)
            assert old is None or old != endpoint or old is endpoint


def test_set_endpoints_keeps_the_registered_objects() -> None:
    reg = ServiceRegistry()
    first = [Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)]
    reg.set_endpoints("users", first)
    reg.set_endpoints("users", [Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80, weight=2),
                                Endpoint("10.0.0.3", 80)])
    endpoints = reg.endpoints("users")
    assert endpoints[0] is first[0]
    assert endpoints[1].weight == 2 and endpoints[2].address == "10.0.0.3:80"


def test_batch_subscribers_get_each_write_at_once_and_in_order() -> None:
    reg = ServiceRegistry()
    batches: list[list[str]] = []
    singles: list[str] = []
    reg.subscribe_batches(lambda changes: batches.append(
        [f"{c.kind} {c.endpoint.address}" for c in changes]))
    reg.subscribe(lambda change: singles.append(f"{change.kind} {change.endpoint.address}"))
    reg.set_endpoints("users", ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    reg.set_endpoints("users", ["127.0.0.1:2", "127.0.0.1:4"])
    reg.register("users", "127.0.0.1:5")
    assert batches == [["added 127.0.0.1:1", "added 127.0.0.1:2", "added 127.0.0.1:3"],
                       ["removed 127.0.0.1:1", "removed 127.0.0.1:3", "added 127.0.0.1:4"],
                       ["added 127.0.0.1:5"]]
    assert singles == [change for batch in batches for change in batch]


def test_an_interrupted_delivery_resumes_without_repeating_a_change() -> None:
    reg = ServiceRegistry()
    first: list[int] = []
    second: list[int] = []
    interrupt = [True]

    def flaky(change: TopologyChange) -> None:
        first.append(change.sequence)
        if change.sequence == 2 and interrupt.pop():
            raise KeyboardInterrupt

    reg.subscribe(flaky)
    reg.subscribe_batches(lambda changes: second.extend(c.sequence for c in changes))
    with pytest.raises(KeyboardInterrupt):
        reg.register_many("users", ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    reg.register("users", "127.0.0.1:4")  # the next write delivers the rest first
    assert first == [1, 2, 3, 4]
    assert second == [1, 2, 3, 4]


def test_a_subscriber_gets_only_changes_after_it_subscribed() -> None:
    reg = ServiceRegistry()
    seen: list[TopologyChange] = []

    def subscribe_on_first(change: TopologyChange) -> None:
        if not seen:
            reg.subscribe(seen.append)  # while two changes of this write are still to come
            seen.append(change)

    reg.subscribe(subscribe_on_first)
    reg.register_many("users", ["127.0.0.1:1", "127.0.0.1:2"])
    reg.register("users", "127.0.0.1:3")
    assert [c.sequence for c in seen] == [1, 3]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_writable_in_a_child_forked_while_its_lock_was_held() -> None:
    reg = ServiceRegistry()
    reg.register("users", "10.0.0.1:80")

    def child() -> dict[str, Any]:
        reg.register("users", "10.0.0.2:80")
        return {"addresses": [e.address for e in reg.endpoints("users")]}

    reg._lock.acquire()  # as if another thread were writing at the moment of the fork
    report = in_forked_child(child, reg._lock.release, timeout=10)
    assert report["addresses"] == ["10.0.0.1:80", "10.0.0.2:80"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_child_forked_during_a_delivery_gets_the_changes_being_delivered() -> None:
    # The thread that delivers a change is not in a child forked meanwhile: the child must still
    # hand that change to the subscribers that had not got it, once (a balancer's health checks
    # are updated from these changes, and never again from the whole set).
    reg = ServiceRegistry()
    inside, release = threading.Event(), threading.Event()
    batches: list[int] = []
    singles: list[int] = []

    def slow(changes: list[TopologyChange]) -> None:
        batches.extend(c.sequence for c in changes)
        if not inside.is_set():
            inside.set()
            release.wait(10)

    reg.subscribe_batches(slow)  # batch subscribers are handed a batch first
    reg.subscribe(lambda change: singles.append(change.sequence))
    writer = threading.Thread(target=reg.register, args=("users", "10.0.0.1:80"))
    writer.start()
    try:
        assert inside.wait(10)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                reg.register("users", "10.0.0.2:80")
                code = 0 if (batches, singles) == ([1, 2], [1, 2]) else 3
            finally:
                os._exit(code)
    finally:
        release.set()
        writer.join()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert (batches, singles) == ([1], [1])


def test_a_batch_subscriber_that_reorders_its_changes_affects_no_other_subscriber() -> None:
    reg = ServiceRegistry()
    singles: list[int] = []
    others: list[int] = []

    def reorder(changes: list[TopologyChange]) -> None:
        changes.reverse()  # its own business, as long as it stays its own

    reg.subscribe_batches(reorder)
    reg.subscribe_batches(lambda changes: others.extend(c.sequence for c in changes))
    reg.subscribe(lambda change: singles.append(change.sequence))
    reg.register_many("users", ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    assert singles == others == [1, 2, 3]


def replay(changes: list[TopologyChange]) -> dict[str, Endpoint]:
    """The endpoint set that ``changes`` lead to, checking each against the one before."""
    state: dict[str, Endpoint] = {}
    for change in changes:
        address = change.endpoint.address
        if change.kind == "added":
            assert address not in state
            state[address] = change.endpoint
        elif change.kind == "changed":
            assert state[address] == change.previous
            state[address] = change.endpoint
        else:
            assert state.pop(address) == change.endpoint
    return state


def test_racing_writers_deliver_every_change_once_in_order_to_every_kind_of_subscriber() -> None:
    reg = ServiceRegistry()
    reg.add_service("users")
    batched: list[TopologyChange] = []
    singles: list[TopologyChange] = []
    failing: list[TopologyChange] = []

    def fails_now_and_then(change: TopologyChange) -> None:
        failing.append(change)
        if change.sequence % 7 == 0:
            raise RuntimeError("a subscriber's own bug")

    reg.subscribe_batches(batched.extend)
    reg.subscribe(singles.append)
    reg.subscribe(fails_now_and_then)
    pool = [f"10.0.0.{i}:80" for i in range(30)]

    def write(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            kind = rng.randrange(4)
            if kind == 0:
                reg.register("users", Endpoint.parse(rng.choice(pool), weight=rng.randrange(1, 3)))
            elif kind == 1:
                reg.deregister("users", rng.choice(pool))
            elif kind == 2:
                reg.set_endpoints("users", [Endpoint.parse(a, weight=rng.randrange(1, 3))
                                            for a in rng.sample(pool, rng.randrange(20))])
            else:
                reg.register_many("users", rng.sample(pool, 4))

    writers = [threading.Thread(target=write, args=(seed,)) for seed in range(6)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    expected = list(range(1, reg._sequence + 1))
    for got in (batched, singles, failing):
        assert [c.sequence for c in got] == expected
        assert replay(got) == dict(reg.snapshot("users").by_address)
    assert reg.callback_errors == len(expected) // 7
