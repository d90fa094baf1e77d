"""Every strategy: one contract all must pass, then distribution and hashing properties.

Distribution bounds: chi-square against uniform at p = 0.001 for the uniform strategies;
weighted strategies within 2% (relative) of their weights over 100,000 picks.  Random sources are
seeded, so each run checks the same sample and a failure is a real bias, not bad luck.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import random
import struct
import threading
import time
from collections.abc import Sequence
from typing import Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tai_lb import Endpoint, LoadBalancer, NoEndpointAvailable, ServiceRegistry
from tai_lb.stats import FAILURE_PENALTY_CAP, EndpointStats
from tai_lb.strategies import (
    STRATEGIES,
    ConsistentHash,
    LeastConnections,
    PeakEwma,
    Picker,
    RoundRobin,
    RoutingKey,
    Strategy,
    Weighted,
    WeightedRoundRobin,
    bucket_index,
    build_ring,
    key_hash,
    resolve_strategy,
    ring_of,
    smooth_weighted_order,
    smooth_weighted_sequence,
)

from .conftest import FakeClock

# Chi-square critical values at p = 0.001 (upper tail), by degrees of freedom.
CHI2_CRITICAL_P001 = {4: 18.467, 9: 27.877}


def chi_square(counts: Sequence[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts)


def seeded(name: str, seed: int = 7) -> Strategy:
    return STRATEGIES[name](rng=random.Random(seed))


def first_pick_strategy(candidates: Sequence[EndpointStats], key: Optional[RoutingKey]) -> Endpoint:
    return candidates[0].endpoint


CONTRACT_STRATEGIES = [*STRATEGIES, "function"]


def make(name: str) -> Strategy:
    return resolve_strategy(first_pick_strategy) if name == "function" else seeded(name)


def balancer(name: str, endpoints: Sequence[object], **kwargs: object) -> LoadBalancer:
    reg = ServiceRegistry()
    reg.add_service("users")
    reg.register_many("users", endpoints)  # type: ignore[arg-type]
    return LoadBalancer(reg, strategy=make(name), **kwargs)  # type: ignore[arg-type]


def keys(i: int) -> Optional[str]:
    return f"user-{i}"


@pytest.mark.parametrize("name", CONTRACT_STRATEGIES)
class TestStrategyContract:
    """What every strategy, built in or a plain function, must do."""

    def test_empty_service_raises_no_endpoint_available(self, name: str) -> None:
        lb = balancer(name, [])
        with pytest.raises(NoEndpointAvailable, match="'users': no endpoints registered"):
            lb.pick("users")

    def test_one_endpoint_is_always_picked(self, name: str) -> None:
        lb = balancer(name, ["127.0.0.1:8001"])
        for i in range(50):
            with lb.pick("users", key=keys(i)) as lease:
                assert lease.endpoint.address == "127.0.0.1:8001"

    def test_removed_endpoint_is_never_picked_after_deregister_returns(self, name: str) -> None:
        lb = balancer(name, [f"127.0.0.1:{8000 + i}" for i in range(20)])
        for i in range(200):
            lb.pick("users", key=keys(i)).done()
        for removed in [f"127.0.0.1:{8000 + i}" for i in range(19)]:
            lb.registry.deregister("users", removed)
            for i in range(200):
                with lb.pick("users", key=keys(i)) as lease:
                    assert lease.endpoint.address != removed

    def test_removal_under_concurrent_picks(self, name: str) -> None:
        addresses = [f"127.0.0.1:{8000 + i}" for i in range(10)]
        lb = balancer(name, addresses)
        removed = threading.Event()
        stop = threading.Event()
        violations: list[str] = []
        picked_victim_before: list[bool] = []
        after: list[int] = []
        victim = addresses[0]  # the function strategy always picks the first candidate

        def picker(n: int) -> None:
            i = 0
            while not stop.is_set():
                already_removed = removed.is_set()  # read before the pick starts
                with lb.pick("users", key=keys(i + n)) as lease:
                    if lease.endpoint.address == victim:
                        if already_removed:
                            violations.append(lease.endpoint.address)
                        else:
                            picked_victim_before.append(True)
                    if already_removed:
                        after.append(1)
                i += 1

        threads = [threading.Thread(target=picker, args=(n * 1000,)) for n in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10.0
        while not picked_victim_before and time.monotonic() < deadline:
            time.sleep(0.001)
        lb.registry.deregister("users", victim)
        removed.set()
        while len(after) < 2000 and time.monotonic() < deadline:
            time.sleep(0.001)
        stop.set()
        for t in threads:
            t.join()
        assert picked_victim_before, "the victim was never picked: the test proves nothing"
        assert len(after) >= 2000
        assert violations == []

    def test_sixteen_threads_never_lose_an_in_flight_count(self, name: str) -> None:
        lb = balancer(name, [f"127.0.0.1:{8000 + i}" for i in range(12)])
        barrier = threading.Barrier(16)
        errors: list[BaseException] = []

        def work(n: int) -> None:
            rng = random.Random(n)
            held = []
            try:
                barrier.wait()
                for i in range(10_000):
                    held.append(lb.pick("users", key=keys(i)))
                    if len(held) > rng.randrange(1, 4):  # keep a few open, release out of order
                        held.pop(rng.randrange(len(held))).done(success=i % 5 != 0)
                for lease in held:
                    lease.done()
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        stats = lb.stats("users").values()
        assert all(s.in_flight == 0 for s in stats)
        assert sum(s.requests for s in stats) == 16 * 10_000
        assert lb.status()["services"]["users"]["in_flight"] == 0


# -- distribution ---------------------------------------------------------------------------


def pick_counts(lb: LoadBalancer, n: int, keyed: bool = False) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for i in range(n):
        with lb.pick("users", key=f"k{i}" if keyed else None) as lease:
            counts[lease.endpoint.address] += 1
    return counts


@pytest.mark.parametrize("name", ["round_robin", "random", "least_connections",
                                  "consistent_hash"])
@pytest.mark.parametrize("size", [5, 10])
def test_uniform_strategies_pass_chi_square(name: str, size: int) -> None:
    lb = balancer(name, [f"127.0.0.1:{8000 + i}" for i in range(size)])
    counts = pick_counts(lb, 20_000 * size // 5)
    assert len(counts) == size
    assert chi_square(list(counts.values())) < CHI2_CRITICAL_P001[size - 1]


def test_least_connections_two_choices_is_uniform_when_idle() -> None:
    lb = balancer("least_connections", [f"127.0.0.1:{8000 + i}" for i in range(10)])
    # 10 endpoints use a full scan; 20 use two random choices.
    lb20 = balancer("least_connections", [f"127.0.0.1:{8000 + i}" for i in range(20)])
    for b, size in ((lb, 10), (lb20, 20)):
        counts = pick_counts(b, 40_000)
        # df = 19 critical value at p = 0.001 is 43.820
        assert chi_square(list(counts.values())) < (27.877 if size == 10 else 43.820)


WEIGHTS = [1, 2, 2, 5]


@pytest.mark.parametrize("name", ["weighted_round_robin", "weighted", "least_connections"])
def test_weighted_strategies_follow_weights_within_two_percent(name: str) -> None:
    endpoints = [{"address": f"127.0.0.1:{8000 + i}", "weight": w} for i, w in enumerate(WEIGHTS)]
    lb = balancer(name, endpoints)
    n = 100_000
    counts = pick_counts(lb, n)
    total = sum(WEIGHTS)
    for i, weight in enumerate(WEIGHTS):
        share = counts[f"127.0.0.1:{8000 + i}"] / n
        assert abs(share / (weight / total) - 1) <= 0.02, (i, share)


def test_consistent_hash_keys_follow_weights() -> None:
    endpoints = [{"address": f"127.0.0.1:{8000 + i}", "weight": w} for i, w in enumerate([1, 3])]
    lb = balancer("consistent_hash", endpoints)
    counts = pick_counts(lb, 100_000, keyed=True)
    assert abs(counts["127.0.0.1:8001"] / 100_000 - 0.75) < 0.03


def test_smooth_wrr_gives_nginx_sequence_for_5_1_1() -> None:
    # nginx's documented smooth sequence for weights a=5, b=1, c=1: a a b a c a a
    reg = ServiceRegistry()
    reg.register_many("users", [Endpoint("10.0.0.1", 80, weight=5), Endpoint("10.0.0.2", 80),
                                Endpoint("10.0.0.3", 80)])
    lb = LoadBalancer(reg, strategy=WeightedRoundRobin(start=0))
    names = {"10.0.0.1:80": "a", "10.0.0.2:80": "b", "10.0.0.3:80": "c"}
    seq = "".join(names[lb.pick("users").endpoint.address] for _ in range(14))
    assert seq == "aabacaa" * 2


def nginx_reference(weights: list[int], n: int) -> list[int]:
    """nginx's O(n) loop, written plainly, to check the heap version against."""
    current = [0] * len(weights)
    total = sum(weights)
    out = []
    for _ in range(n):
        best = None
        for i, w in enumerate(weights):
            current[i] += w
            if best is None or current[i] > current[best]:
                best = i
        assert best is not None
        current[best] -= total
        out.append(best)
    return out


@pytest.mark.parametrize("weights", [[5, 1, 1], [3, 3, 2, 1], [1, 1, 1], [7, 4, 4, 2, 2, 9],
                                     [10, 1], [2, 3, 5, 7, 11, 13]])
def test_smooth_sequence_matches_nginx_loop(weights: list[int]) -> None:
    import itertools
    produced = list(itertools.islice(smooth_weighted_sequence(weights), 3 * sum(weights)))
    assert produced == nginx_reference(weights, 3 * sum(weights))


@given(st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=12),
       st.integers(min_value=0, max_value=3))
def test_smooth_order_run_by_run_matches_nginx_loop(weights: list[int], periods: int) -> None:
    count = periods * sum(weights) + len(weights) // 2
    assert smooth_weighted_order(weights, count) == nginx_reference(weights, count)


def test_smooth_order_of_a_large_service_with_one_heavier_endpoint() -> None:
    weights = [1] * 2000 + [7] + [1] * 999
    assert smooth_weighted_order(weights, sum(weights)) == nginx_reference(weights, sum(weights))


def test_wrr_past_max_period_steps_online_with_the_same_order() -> None:
    weights = [97, 89, 83]
    reg = ServiceRegistry()
    reg.register_many("users", [Endpoint("10.0.0.1", 80 + i, weight=w)
                                for i, w in enumerate(weights)])
    lb = LoadBalancer(reg, strategy=WeightedRoundRobin(start=0, max_period=16))
    got = [lb.pick("users").endpoint.port - 80 for _ in range(600)]
    assert got == nginx_reference(weights, 600)


# -- consistent hash ------------------------------------------------------------------------


def owners(lb: LoadBalancer, keys_: Sequence[str]) -> list[str]:
    return [lb.pick("users", key=k).endpoint.address for k in keys_]


KEYS = [f"user-{i}" for i in range(20_000)]


def test_same_key_same_endpoint_across_instances_and_orders() -> None:
    addresses = [f"10.0.0.{i}:80" for i in range(1, 9)]
    a = balancer("consistent_hash", addresses)
    b = balancer("consistent_hash", list(reversed(addresses)))  # another process, other order
    first = owners(a, KEYS)
    assert owners(a, KEYS) == first
    assert owners(b, KEYS) == first


def test_key_types() -> None:
    assert key_hash("42") == key_hash(b"42") == key_hash(42)
    with pytest.raises(TypeError):
        key_hash(4.2)  # type: ignore[arg-type]
    # Known value: stable across processes and Python versions (MD5, not hash()).
    assert key_hash("user-42") == int.from_bytes(
        __import__("hashlib").md5(b"user-42").digest()[:4], "little")


@pytest.mark.parametrize("n", [10, 100, 300])
def test_removing_one_endpoint_moves_only_its_keys(n: int) -> None:
    # 100 and 300 endpoints overflow the default ring, whose points per endpoint are halved
    addresses = [f"10.0.{i // 250}.{i % 250 + 1}:80" for i in range(n)]
    lb = balancer("consistent_hash", addresses)
    before = owners(lb, KEYS)
    victim = before[0]
    lb.registry.deregister("users", victim)
    after = owners(lb, KEYS)
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert moved and all(b == victim for b, _ in moved)
    assert len(moved) == before.count(victim)


@pytest.mark.parametrize("n", [4, 10, 25, 100])
def test_adding_one_endpoint_moves_at_most_its_share(n: int) -> None:
    addresses = [f"10.1.{i // 250}.{i % 250 + 1}:80" for i in range(n)]
    lb = balancer("consistent_hash", addresses)
    before = owners(lb, KEYS)
    lb.registry.register("users", "10.9.9.9:80")
    after = owners(lb, KEYS)
    moved = [a for b, a in zip(before, after) if b != a]
    assert all(a == "10.9.9.9:80" for a in moved)  # keys only move to the new one
    assert len(moved) / len(KEYS) <= 1.1 / (n + 1)


def test_ten_endpoints_hundred_thousand_keys_max_over_mean() -> None:
    lb = balancer("consistent_hash", [f"192.168.7.{i}:8080" for i in range(10, 20)])
    counts = collections.Counter(owners(lb, [f"session-{i}" for i in range(100_000)]))
    assert max(counts.values()) / (100_000 / 10) <= 1.10


def test_bounded_load_passes_over_a_full_endpoint() -> None:
    reg = ServiceRegistry()
    reg.register_many("users", [f"10.0.0.{i}:80" for i in range(1, 5)])
    lb = LoadBalancer(reg, strategy=ConsistentHash(load_bound=1.25))
    home = lb.pick("users", key="hot-key")
    home.done()
    held = [lb.pick("users", key="hot-key") for _ in range(2)]
    # capacity = ceil(1.25 * (in flight + 1) / 4) = 1: the home endpoint is full after one
    assert held[0].endpoint.address == home.endpoint.address
    assert held[1].endpoint.address != home.endpoint.address
    for h in held:
        h.done()
    with lb.pick("users", key="hot-key") as lease:
        assert lease.endpoint.address == home.endpoint.address  # back home once load drops


# -- load-aware strategies ------------------------------------------------------------------


def test_least_connections_avoids_busy_endpoints() -> None:
    for size in (3, 20):  # full scan and two choices
        lb = balancer("least_connections", [f"10.0.0.{i}:80" for i in range(size)])
        busy = lb.pick("users")
        others = [a for a in lb.stats("users") if a != busy.endpoint.address]
        held = [lb.pick("users", exclude=others) for _ in range(4)]  # five open on one endpoint
        assert {h.endpoint.address for h in held} == {busy.endpoint.address}
        hits = 0
        for _ in range(500):
            with lb.pick("users") as lease:
                hits += lease.endpoint.address == busy.endpoint.address
        # the full scan never picks it; two distinct random choices always see a lighter one
        assert hits == 0


def test_peak_ewma_prefers_the_fast_endpoint_and_decays(clock: FakeClock) -> None:
    reg = ServiceRegistry()
    reg.register_many("users", ["10.0.0.1:80", "10.0.0.2:80"])
    lb = LoadBalancer(reg, strategy=PeakEwma(decay=10.0, rng=random.Random(3)), clock=clock)
    latency = {"10.0.0.1:80": 0.010, "10.0.0.2:80": 0.200}
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(400):
        lease = lb.pick("users")
        counts[lease.endpoint.address] += 1
        clock.advance(0.001)
        lease.done(latency=latency[lease.endpoint.address])
    assert counts["10.0.0.1:80"] > 0.9 * 400
    # Without traffic the slow endpoint's cost decays until it is tried again.
    clock.advance(60.0)
    slow = lb.stats("users")["10.0.0.2:80"].peak_cost(clock())
    fast = lb.stats("users")["10.0.0.1:80"].peak_cost(clock())
    assert slow < 0.2 * 0.01 and fast < slow


def test_peak_ewma_peak_takes_over_at_once(clock: FakeClock) -> None:
    reg = ServiceRegistry()
    reg.register("users", "10.0.0.1:80")
    lb = LoadBalancer(reg, strategy="peak_ewma", clock=clock)
    stats = lb.stats("users")["10.0.0.1:80"]
    assert stats.peak_cost(clock()) == 0.0  # unmeasured and idle: free, so it gets tried
    lease = lb.pick("users")
    assert stats.peak_cost(clock()) == pytest.approx(0.030 * 2)  # default while in flight
    lease.done(latency=0.005)
    clock.advance(1.0)
    lb.pick("users").done(latency=0.500)
    assert stats.peak_cost(clock()) == pytest.approx(0.500)
    lb.pick("users").done(latency=0.001, success=False)  # failures are penalised...
    assert stats.peak_cost(clock()) == pytest.approx(FAILURE_PENALTY_CAP)  # ...up to a cap
    assert stats.last_latency == pytest.approx(0.001)  # the reported latency stays real


def test_peak_ewma_stays_finite_after_endless_fast_failures(clock: FakeClock) -> None:
    reg = ServiceRegistry()
    reg.register_many("users", ["10.0.0.1:80", "10.0.0.2:80"])
    lb = LoadBalancer(reg, strategy="peak_ewma", clock=clock)
    stats = lb.stats("users")["10.0.0.1:80"]
    for _ in range(5000):
        lb.pick("users", exclude={"10.0.0.2:80"}).done(latency=0.0001, success=False)
        clock.advance(0.001)
    clock.advance(1e6)  # a very long quiet spell
    assert stats.peak_cost(clock()) == 0.0 or 0.0 < stats.peak_cost(clock()) < 1.0
    json.dumps(lb.status(), allow_nan=False)  # no inf or NaN anywhere
    lb.pick("users").done()


def test_exclusion_on_the_ring_goes_where_removal_would_send_the_key() -> None:
    addresses = [f"10.0.0.{i}:80" for i in range(1, 9)]
    lb = balancer("consistent_hash", addresses)
    keys = KEYS[:300]
    homes = owners(lb, keys)
    retried = [lb.pick("users", key=k, exclude={h}).endpoint.address
               for k, h in zip(keys, homes)]
    lb2 = balancer("consistent_hash", addresses)
    for k, h, r in zip(keys, homes, retried):
        assert r != h
        lb2.registry.deregister("users", h)
        assert r == lb2.pick("users", key=k).endpoint.address
        lb2.registry.register("users", h)


def test_least_connections_breaks_ties_uniformly() -> None:
    lb = balancer("least_connections", [f"10.0.0.{i}:80" for i in range(1, 5)])
    busy = lb.pick("users")
    counts = pick_counts(lb, 30_000)
    assert busy.endpoint.address not in counts
    assert chi_square(list(counts.values())) < 13.816  # df = 2 at p = 0.001


def test_weighted_random_handles_one_dominant_endpoint() -> None:
    lb = balancer("weighted", [{"address": "10.0.0.1:80", "weight": 1_000_000},
                               "10.0.0.2:80"])
    counts = pick_counts(lb, 2000)
    assert counts["10.0.0.1:80"] >= 1990


def test_weighted_least_connections_with_a_dominant_weight() -> None:
    lb = balancer("least_connections", [{"address": "10.0.0.1:80", "weight": 1000},
                                        "10.0.0.2:80", "10.0.0.3:80"])
    counts = pick_counts(lb, 3000)
    assert counts["10.0.0.1:80"] > 2900


# -- resolution -----------------------------------------------------------------------------


def test_resolve_names_dicts_objects_and_functions() -> None:
    assert isinstance(resolve_strategy("round_robin"), RoundRobin)
    assert isinstance(resolve_strategy({"name": "weighted"}), Weighted)
    ring = resolve_strategy({"name": "consistent_hash", "vnodes": 40, "load_bound": 1.5})
    assert isinstance(ring, ConsistentHash) and (ring.vnodes, ring.load_bound) == (40, 1.5)
    obj = LeastConnections()
    assert resolve_strategy(obj) is obj
    assert resolve_strategy(first_pick_strategy).name == "first_pick_strategy"
    assert repr(PeakEwma()) == "PeakEwma(decay=10.0, default_latency=0.03)"


def test_function_strategy_must_return_a_candidate() -> None:
    lb = balancer("round_robin", ["10.0.0.1:80"])
    lb2 = LoadBalancer(lb.registry, strategy=lambda c, k: Endpoint("10.9.9.9", 1))
    with pytest.raises(ValueError, match="not one of the candidates"):
        lb2.pick("users")


@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=1, max_size=300),
       st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=1, max_size=50))
def test_bucket_index_narrows_to_the_same_answer_as_a_full_search(
        points: list[int], probes: list[int]) -> None:
    import bisect
    ring = sorted(points)
    shift, starts = bucket_index(ring)
    for h in [*probes, *ring, 0, 2**32 - 1]:
        bucket = h >> shift
        assert bisect.bisect_right(ring, h, starts[bucket], starts[bucket + 1]) == (
            bisect.bisect_right(ring, h))


def test_ring_never_exceeds_max_ring_size_and_follows_weights() -> None:
    reg = ServiceRegistry()
    reg.register_many("users", [Endpoint("10.0.0.1", 80 + i, weight=1 + i % 3)
                                for i in range(300)])
    lb = LoadBalancer(reg)
    items = tuple(lb.stats("users").values())
    hashes, ring_owners = build_ring(items, vnodes=1000, max_ring_size=4096)
    assert len(hashes) <= 4096 and hashes == sorted(hashes)
    per_weight = collections.Counter(o.endpoint.weight for o in ring_owners)
    assert per_weight[3] > per_weight[2] > per_weight[1]


# -- consistent_hash: a ring updated change by change ----------------------------------------------


def ring_members(addresses: Sequence[str], weights: Optional[Sequence[int]] = None,
                 ) -> list[EndpointStats]:
    load: collections.deque[None] = collections.deque()
    return [EndpointStats(Endpoint.parse(a, weight=w), FakeClock(), service_load=load)
            for a, w in zip(addresses, weights or [1] * len(addresses))]


def test_a_ring_updated_endpoint_by_endpoint_keeps_a_bounded_cache() -> None:
    # Pods replaced one at a time (a rolling restart, over and over): each update hashes the new
    # endpoint's points; those of endpoints long gone must not pile up.
    strategy = ConsistentHash(vnodes=100)
    items = ring_members([f"10.0.0.{i}:80" for i in range(20)])
    picker = strategy.prepare(items)
    for i in range(600):
        items = [*items[:15], *items[16:], *ring_members([f"10.1.{i // 200}.{i % 200}:80"])]
        picker = strategy.prepare_next(items, picker)
        assert len(strategy._points) <= 2 * len(items) + 64 + 1
    hashes, owners = build_ring(items, 100, strategy.max_ring_size)
    ring = ring_of(picker)
    assert ring is not None
    assert (list(ring.hashes), ring.owners) == (hashes, owners)


@pytest.mark.parametrize("seed", range(8))
def test_a_ring_updated_change_by_change_equals_a_ring_built_from_scratch(seed: int) -> None:
    # Endpoints come, go, change weight, swap places or come back as new figures; the total
    # weight crosses powers of two (the ring is then built again) or not (it is patched).
    rng = random.Random(seed)
    vnodes, max_ring_size = rng.choice([(4, 1024), (40, 2048), (100, 4096)])
    strategy = ConsistentHash(vnodes=vnodes, max_ring_size=max_ring_size,
                              load_bound=rng.choice([None, 1.5]))
    pool = [f"10.0.{i // 50}.{i % 50}:80" for i in range(120)]
    load: collections.deque[None] = collections.deque()
    known: dict[str, EndpointStats] = {}

    def member(address: str, weight: int) -> EndpointStats:
        stats = known.get(address)
        if stats is None or rng.random() < 0.1:  # removed, forgotten, back as new figures
            stats = known[address] = EndpointStats(Endpoint.parse(address), FakeClock(),
                                                   service_load=load)
        stats.endpoint = stats.endpoint.replace(weight=weight)  # as the balancer does
        return stats

    items = [member(a, rng.randrange(1, 4)) for a in rng.sample(pool, rng.randrange(1, 40))]
    picker = strategy.prepare(items)
    for _ in range(40):
        for _ in range(rng.choice([0, 1, 1, 2, 3, 10])):
            kind = rng.randrange(4)
            present = {s.endpoint.address for s in items}
            if kind == 0:
                address = rng.choice([a for a in pool if a not in present])
                items.insert(rng.randrange(len(items) + 1), member(address, rng.randrange(1, 4)))
            elif kind == 1 and len(items) > 1:
                del items[rng.randrange(len(items))]
            elif kind == 2:
                index = rng.randrange(len(items))
                items[index] = member(items[index].endpoint.address, rng.randrange(1, 5))
            elif len(items) > 2:
                i, j = rng.sample(range(len(items)), 2)
                items[i], items[j] = items[j], items[i]
        picker = strategy.prepare_next(list(items), picker)
        ring = ring_of(picker)
        assert ring is not None
        hashes, owners = build_ring(items, vnodes, max_ring_size)
        assert (list(ring.hashes), ring.owners) == (hashes, owners)
        assert (ring.shift, list(ring.starts)) == bucket_index(hashes)
        fresh = strategy.prepare(items)
        assert [picker(f"k{i}") for i in range(50)] == [fresh(f"k{i}") for i in range(50)]


def test_a_consistent_hash_subclass_that_prepares_its_own_way_keeps_doing_so() -> None:
    class LocalHash(ConsistentHash):
        """A ring over the zone-"a" endpoints only (a subclass written against prepare())."""

        def prepare(self, candidates: Sequence[EndpointStats]) -> Picker:
            return super().prepare([c for c in candidates if c.endpoint.zone == "a"])

    reg = ServiceRegistry()
    reg.register_many("users", [Endpoint("10.0.0.1", 80 + i, zone="ab"[i % 2]) for i in range(6)])
    lb = LoadBalancer(reg, strategy=LocalHash(vnodes=40))
    for step in range(3):  # the first route, then routes after changes
        zones = set()
        for i in range(200):
            with lb.pick("users", key=f"user-{i}") as lease:
                zones.add(lease.endpoint.zone)
        assert zones == {"a"}, step
        reg.register("users", Endpoint("10.0.0.2", 80 + step, zone="ab"[step % 2]))
    lb.close()


@pytest.mark.parametrize("key", ["user-1", "", "clé-ключ", b"\x00\xff\x10", 42, 2**70])
def test_a_key_s_place_on_the_ring_is_its_md5_as_libketama_computes_it(key: RoutingKey) -> None:
    # Whichever MD5 computes it (CPython's own or OpenSSL's), a key lands where libketama and
    # earlier versions put it: changing this would move every sticky key.
    data = key if isinstance(key, bytes) else str(key).encode()
    expected = struct.unpack_from("<I", hashlib.md5(data).digest())[0]
    assert key_hash(key) == expected
    items = ring_members([f"10.0.0.{i}:80" for i in range(1, 8)])
    picker = ConsistentHash().prepare(items)
    ring = ring_of(picker)
    assert ring is not None
    index = bisect.bisect_right(list(ring.hashes), expected)
    assert picker(key) is ring.owners[index % len(ring.owners)]
