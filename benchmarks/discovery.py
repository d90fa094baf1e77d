"""Cost of discovery updates at 10,000 endpoints, with a LoadBalancer subscribed to the registry.

The script is a list of sections (:data:`SECTIONS`); each measures one thing, prints its tables
and writes its own section of RESULTS.md.  ``main()`` runs every section, or those named with
``--only``.  The sections:

``updates``: one service of 10,000 endpoints in a :class:`tai_lb.ServiceRegistry` with a
:class:`tai_lb.LoadBalancer` subscribed.  Each round applies, in this order: a full set of 10,000
to the empty service; a full set with half of the endpoints replaced; the same set again (equal
endpoints, new objects); the set with one endpoint more; with one endpoint's weight changed; with
one endpoint less; ``register()`` of a new endpoint; ``register()`` of an endpoint with a new
weight; and ``deregister()`` of one.  Full sets are built before the timing as a discovery
provider builds them, from JSON-like dicts (equal but never identical objects).  Each change is
timed from the call until it returns, which includes the balancer's handling of the events
(stats, health targets, outlier state, pools); then the first ``pick()`` after it is timed, which
rebuilds the route (the strategy's prepared state), for round_robin, weighted_round_robin,
least_connections, peak_ewma and consistent_hash, and for round_robin on a service with health
checks, outlier detection and circuit breakers (``checked``)::

    python benchmarks/discovery.py            # about 3 minutes; updates its RESULTS.md section
    python benchmarks/discovery.py --quick    # under 30 seconds, 2,000 endpoints; never writes
    python benchmarks/discovery.py --only updates

Targets (printed as PASS/FAIL, never asserted): a full update of 10,000 endpoints is diffed and
applied in at most 50 ms, and one change (one endpoint added, removed or changed, by
``register()``/``deregister()`` or by a full set that differs by one) in at most 5 ms.  The route
rebuild on the next pick has no target; it is reported per strategy.

``etcd``: a one-member etcd (Debian's etcd-server, installed with apt-get when missing) on
loopback and a LoadBalancer with etcd discovery of one service of 10, then 1,000 endpoints; 200
keys changed one at a time (added, changed, deleted in turn), each timed from just before the
put or delete until a registry subscriber receives it, which is when picks see it.  Target: p99
<= 100 ms.

``dns``: dnsmasq (Debian's dnsmasq-base) on loopback serving A records with TTL 1 s from a hosts
file; 20 changes, each at a random point of the TTL, timed until a registry subscriber receives
it.  Target: every change within TTL + 1 s.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from picks import (
    benchmark_parser,
    ensure_programs,
    environment_line,
    markdown_table,
    median,
    publish,
    verdict,
)

import tai_lb
from tai_lb.discovery.etcd import EtcdClient, EtcdError
from tai_lb.failover import BreakerConfig
from tai_lb.outlier import OutlierConfig
from tai_lb.strategies import resolve_strategy

SERVICE = "svc"

TARGET_FULL_S = 0.050  # a full update of 10,000 endpoints, diffed and applied
TARGET_ONE_S = 0.005  # one endpoint added, removed or changed

# -- sections ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What one section measured, ready to print and to put in RESULTS.md."""

    title: str  # one line, printed above the tables
    environment: str
    method: str
    summary: list[str]
    tables: list[tuple[list[str], list[list[str]]]]
    notes: str


@dataclass(frozen=True)
class Section:
    """One benchmark of this script: a name for ``--only``, its RESULTS.md heading, its run.

    ``run(quick, rounds, seed, progress)`` measures and returns a :class:`Report`; ``rounds`` is
    None for the section's own default.
    """

    name: str
    heading: str
    run: Callable[[bool, Optional[int], int, bool], Report]


def run_line(rounds: int, seconds: float, unit: str = "rounds") -> str:
    """The section's environment line (picks.environment_line) for rounds and wall time."""
    return environment_line(f"{rounds} {unit} in {seconds:.0f} s")


def percentile(values: Sequence[float], share: float) -> float:
    """The ``share`` percentile (0 < share < 1) of ``values``, or NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(share * 100) - 1]


# -- section "updates": full and single updates of 10,000 endpoints -------------------------------


@dataclass(frozen=True)
class UpdateSettings:
    """How much the ``updates`` section measures."""

    endpoints: int
    rounds: int


UPDATES_FULL = UpdateSettings(endpoints=10_000, rounds=21)
UPDATES_QUICK = UpdateSettings(endpoints=2_000, rounds=2)
UPDATES_HEADING = f"## Discovery: {UPDATES_FULL.endpoints:,} endpoints (benchmarks/discovery.py)"

PLAIN = "plain"
CHECKED = "checked"
STRATEGY_NAMES = ("round_robin", "weighted_round_robin", "least_connections", "peak_ewma",
                  "consistent_hash")


@dataclass(frozen=True)
class Balancer:
    """One balancer set-up that the changes are applied under: its settings and strategy."""

    config: str  # PLAIN or CHECKED
    strategy: str

    @property
    def label(self) -> str:
        """The column name of the route rebuild table."""
        return self.strategy if self.config == PLAIN else f"{self.strategy}, {self.config}"


BALANCERS = (*(Balancer(PLAIN, name) for name in STRATEGY_NAMES), Balancer(CHECKED, "round_robin"))
APPLY_BALANCERS = (Balancer(PLAIN, "round_robin"), Balancer(CHECKED, "round_robin"))


@dataclass(frozen=True)
class Change:
    """One row of the update table: what is applied and which target it has."""

    name: str
    full: bool  # a full update (target TARGET_FULL_S) rather than one change (TARGET_ONE_S)


def update_changes(count: int) -> tuple[Change, ...]:
    """The changes of one round, in the order they are applied."""
    return (
        Change(f"set_endpoints: {count:,} into an empty service", True),
        Change("set_endpoints: half of the set replaced", True),
        Change("set_endpoints: the same set again (no change)", False),
        Change("set_endpoints: one endpoint more", False),
        Change("set_endpoints: one endpoint's weight changed", False),
        Change("set_endpoints: one endpoint less", False),
        Change("register(): one new endpoint", False),
        Change("register(): one endpoint's weight changed", False),
        Change("deregister(): one endpoint", False),
    )


def addresses(start: int, count: int) -> list[str]:
    """``count`` distinct addresses ``10.x.y.z:80``, from number ``start`` on."""
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:80" for i in range(start, start + count)]


def as_dicts(weights: dict[str, int]) -> list[dict[str, Any]]:
    """The endpoints as a provider reads them from JSON (the etcd value layout)."""
    return [{"address": address, "weight": weight, "zone": "eu-1a", "labels": {"pool": "blue"}}
            for address, weight in weights.items()]


def build(items: Sequence[dict[str, Any]]) -> list[tai_lb.Endpoint]:
    """Endpoints built from dicts, as a provider builds them on every update."""
    return [tai_lb.Endpoint.from_value(item) for item in items]


def always_healthy(endpoint: tai_lb.Endpoint) -> bool:
    """The probe of the checked set-up (its threads are stopped, so it never runs)."""
    return True


def make_balancer(setup: Balancer) -> tuple[tai_lb.ServiceRegistry, tai_lb.LoadBalancer]:
    """A registry with the empty service and a balancer subscribed to it."""
    registry = tai_lb.ServiceRegistry()
    registry.add_service(SERVICE)
    strategy = resolve_strategy(setup.strategy)
    if setup.config == PLAIN:
        return registry, tai_lb.LoadBalancer(registry, strategy=strategy)
    service = tai_lb.ServiceConfig(
        strategy=strategy,
        health_check=tai_lb.HealthCheckConfig(type="function", function=always_healthy,
                                              interval=3600.0),
        outlier_detection=OutlierConfig(), circuit_breaker=BreakerConfig())
    lb = tai_lb.LoadBalancer(registry, config=tai_lb.LoadBalancerConfig({SERVICE: service}))
    # The probes run on the checker's own threads, after the change has been applied; stopping
    # them keeps 10,000 probes from running during the timings.  Each change still updates the
    # checker's targets, which is what is timed.
    lb.health_checker.stop()
    return registry, lb


@dataclass
class UpdateResults:
    """Everything the ``updates`` section measured."""

    settings: UpdateSettings
    changes: tuple[Change, ...]
    apply_s: dict[tuple[Balancer, str], list[float]] = field(default_factory=dict)
    pick_s: dict[tuple[Balancer, str], list[float]] = field(default_factory=dict)
    build_s: list[float] = field(default_factory=list)  # building a full set from dicts
    seconds: float = 0.0


def timed(action: Callable[[], object]) -> float:
    """Seconds ``action()`` takes, after a full garbage collection (not timed)."""
    gc.collect()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def first_pick(lb: tai_lb.LoadBalancer) -> None:
    """One pick and release: the first after a change rebuilds the route."""
    with lb.pick(SERVICE, key="user-42"):
        pass


def update_round(setup: Balancer, results: UpdateResults, rng: random.Random) -> None:
    """Apply one round's changes under ``setup``, timing each and the first pick after it."""
    count = results.settings.endpoints
    registry, lb = make_balancer(setup)
    names = iter(change.name for change in results.changes)

    def record(action: Callable[[], object]) -> None:
        name = next(names)
        results.apply_s.setdefault((setup, name), []).append(timed(action))
        results.pick_s.setdefault((setup, name), []).append(timed(lambda: first_pick(lb)))

    def full_set(weights: dict[str, int], *, provider_timing: bool = False) -> None:
        dicts = as_dicts(weights)
        start = time.perf_counter()
        items = build(dicts)
        if provider_timing and setup == APPLY_BALANCERS[0]:
            results.build_s.append(time.perf_counter() - start)
        record(lambda: registry.set_endpoints(SERVICE, items))

    def one(address: str, weight: int) -> tai_lb.Endpoint:
        return tai_lb.Endpoint.from_value(as_dicts({address: weight})[0])

    try:
        first_pick_or_none(lb)
        weights = dict.fromkeys(addresses(0, count), 1)
        full_set(weights, provider_timing=True)
        # Half replaced: the first half stays, the rest gives way to as many new addresses.
        kept = list(weights)[:count // 2]
        weights = {**dict.fromkeys(kept, 1), **dict.fromkeys(addresses(count, count // 2), 1)}
        full_set(weights)
        full_set(weights)  # the same set again
        extra, new = addresses(2 * count, 2)
        weights[extra] = 1
        full_set(weights)
        changed, reweighted = rng.sample(kept, 2)
        weights[changed] = 2
        full_set(weights)
        del weights[extra]
        full_set(weights)
        endpoint = one(new, 1)
        record(lambda: registry.register(SERVICE, endpoint))
        replacement = one(reweighted, 3)
        record(lambda: registry.register(SERVICE, replacement))
        record(lambda: registry.deregister(SERVICE, new))
    finally:
        lb.close()


def first_pick_or_none(lb: tai_lb.LoadBalancer) -> None:
    """Build the empty service's route, so the first timed pick measures only the change."""
    with contextlib.suppress(tai_lb.NoEndpointAvailable):
        first_pick(lb)


def run_updates_rounds(settings: UpdateSettings, seed: int, progress: bool) -> UpdateResults:
    """Run every balancer set-up in each round, in a shuffled order."""
    began = time.perf_counter()
    rng = random.Random(seed)
    results = UpdateResults(settings, update_changes(settings.endpoints))
    order = list(BALANCERS)
    for number in range(1, settings.rounds + 1):
        rng.shuffle(order)
        for setup in order:
            update_round(setup, results, rng)
        if progress:
            print(f"round {number}/{settings.rounds}: {time.perf_counter() - began:.0f} s so far",
                  file=sys.stderr, flush=True)
    results.seconds = time.perf_counter() - began
    return results


def ms(seconds: float) -> str:
    """Milliseconds with two decimals."""
    return f"{seconds * 1e3:,.2f}"


def update_rows(results: UpdateResults) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the update table: one row per change and balancer set-up."""
    header = ["change", "balancer", "median ms", "p90 ms", "max ms", "target ms", "result"]
    rows: list[list[str]] = []
    for change in results.changes:
        target = TARGET_FULL_S if change.full else TARGET_ONE_S
        for setup in APPLY_BALANCERS:
            values = results.apply_s[setup, change.name]
            rows.append([change.name, setup.config, ms(median(values)),
                         ms(percentile(values, 0.9)), ms(max(values)), ms(target),
                         verdict(median(values) <= target)])
    return header, rows


def rebuild_rows(results: UpdateResults) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the route rebuild table: median ms of the first pick per strategy."""
    header = ["first pick after", *(setup.label for setup in BALANCERS)]
    rows = [[change.name, *(ms(median(results.pick_s[setup, change.name]))
                            for setup in BALANCERS)]
            for change in results.changes]
    worst = ["p90 of the slowest row", *(ms(max(percentile(results.pick_s[setup, c.name], 0.9)
                                                for c in results.changes))
                                         for setup in BALANCERS)]
    return header, [*rows, worst]


def update_summary(results: UpdateResults) -> list[str]:
    """Counts of passing rows per target, and the provider's share of the work."""
    full = [c for c in results.changes if c.full]
    one = [c for c in results.changes if not c.full]

    def passing(changes: Sequence[Change], target: float) -> int:
        return sum(median(results.apply_s[setup, c.name]) <= target
                   for c in changes for setup in APPLY_BALANCERS)

    count = results.settings.endpoints
    return [
        f"Full update of {count:,} endpoints <= {ms(TARGET_FULL_S)} ms: "
        f"{passing(full, TARGET_FULL_S)} of {len(full) * len(APPLY_BALANCERS)} rows pass.",
        f"One change <= {ms(TARGET_ONE_S)} ms: {passing(one, TARGET_ONE_S)} of "
        f"{len(one) * len(APPLY_BALANCERS)} rows pass.",
        f"Building the {count:,} endpoints from dicts (the provider's side, before "
        f"set_endpoints; not in the figures above): median {ms(median(results.build_s))} ms.",
    ]


def update_method(results: UpdateResults) -> str:
    """How the ``updates`` section measures, in a few sentences."""
    s = results.settings
    return (
        f"In each of {s.rounds} rounds, every balancer set-up (in a shuffled order) got a new "
        f"registry holding one empty service, with a `LoadBalancer` subscribed, and the changes "
        "of the table applied in the order shown (half replaced comes second, so the later "
        f"changes apply to a set of {s.endpoints:,} of which half arrived in one update). "
        "Full sets are built before their timing from JSON-like dicts (address, weight, zone, "
        "labels), as a discovery provider builds them, so they are equal to the registered "
        "endpoints but never the same objects. "
        "Each change is timed from the call until it returns, with a garbage collection before "
        "it (not timed): the diff, the new snapshot and the delivery of every event to the "
        "balancer's subscription (its figures, health check targets, outlier state and pools). "
        "Then the first `pick()` is timed: it rebuilds the route (the endpoints' figures, the "
        "healthy set and the strategy's prepared state). "
        "`plain` is a balancer with no checks; `checked` has a function health check, outlier "
        "detection and circuit breakers on the service, with the health checker's threads "
        "stopped so that its probes never run during a timing. "
        "The update table's figures come from the round_robin set-ups; the strategies "
        "differ only in the route rebuild."
    )


def run_updates(quick: bool, rounds: Optional[int], seed: int, progress: bool) -> Report:
    """The ``updates`` section: full and single updates, and the route rebuild after them."""
    settings = UPDATES_QUICK if quick else UPDATES_FULL
    if rounds is not None:
        settings = UpdateSettings(settings.endpoints, rounds)
    results = run_updates_rounds(settings, seed, progress)
    count = settings.endpoints
    return Report(
        title=(f"set_endpoints/register/deregister on {count:,} endpoints with a LoadBalancer "
               "subscribed, and the first pick after each (medians over rounds)"),
        environment=run_line(settings.rounds, results.seconds),
        method=update_method(results),
        summary=update_summary(results),
        tables=[update_rows(results), rebuild_rows(results)],
        notes=(f"Targets: a full update of {count:,} endpoints diffed and applied in <= "
               f"{ms(TARGET_FULL_S)} ms, one change in <= {ms(TARGET_ONE_S)} ms. "
               "The second table is the first pick after each change, in ms (median over "
               "rounds): the route rebuild, which has no target."),
    )


# -- servers for the "etcd" and "dns" sections ----------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 (held together, so never the same twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@contextlib.contextmanager
def etcd_server(directory: Path) -> Iterator[str]:
    """A one-member etcd on loopback for the run; its client URL."""
    (program,) = ensure_programs({"etcd": "etcd-server"}, "discovery.py")
    client_port, peer_port = free_ports(2)
    url, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    with (directory / "etcd.log").open("wb") as log:
        process = subprocess.Popen(
            [program, "--name", "bench", "--data-dir", str(directory / "etcd"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"bench={peer}", "--log-level", "warn"],
            stdout=log, stderr=log)
    try:
        client = EtcdClient([url])
        deadline = time.monotonic() + 20
        while True:
            try:
                client.get_prefix("/")
                break
            except EtcdError:
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"etcd did not start; see {directory / 'etcd.log'}")
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.terminate()
        process.wait(10)


class Dnsmasq:
    """dnsmasq on loopback answering A records for one name from a hosts file; TTL 1 s.

    A change is a new hosts file and SIGHUP, which makes dnsmasq read it again with no gap in
    service (a restart would leave the name server away for a moment).
    """

    def __init__(self, directory: Path, name: str, ttl: int) -> None:
        (self.program,) = ensure_programs({"dnsmasq": "dnsmasq-base"}, "discovery.py")
        self.name = name
        self.port = free_ports(1)[0]
        self.hosts = directory / "hosts"
        self.directory = directory
        self.ttl = ttl
        self._process: Optional[subprocess.Popen[bytes]] = None

    def set_addresses(self, addresses: Sequence[str]) -> None:
        """Serve ``addresses`` for the name from now on."""
        tmp = self.hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{address} {self.name}\n" for address in addresses))
        os.replace(tmp, self.hosts)
        if self._process is not None:
            self._process.send_signal(signal.SIGHUP)

    def __enter__(self) -> Dnsmasq:
        command = [self.program, "--keep-in-foreground", "--pid-file=", "--log-facility=-",
                   f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                   "--no-resolv", "--no-hosts", "--no-poll", "--conf-file=/dev/null",
                   f"--addn-hosts={self.hosts}", f"--local-ttl={self.ttl}",
                   f"--local=/{self.name.split('.', 1)[1]}/"]
        if os.geteuid() == 0:  # stay root rather than nobody, so the hosts file stays readable
            command.append("--user=root")
        with (self.directory / "dnsmasq.log").open("wb") as log:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=log)
        return self

    def __exit__(self, *exc_info: object) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            process.wait(10)


# -- section "etcd": an etcd change visible to picks -----------------------------------------------


@dataclass(frozen=True)
class EtcdSettings:
    """How many changes, on services of which sizes."""

    changes: int
    sizes: tuple[int, ...]


ETCD_FULL = EtcdSettings(changes=200, sizes=(10, 1_000))
ETCD_QUICK = EtcdSettings(changes=12, sizes=(10,))
TARGET_ETCD_P99_S = 0.100


class Arrivals:
    """Records when each address is added, changed or removed in the registry (a subscriber)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self.event = threading.Condition()

    def __call__(self, change: tai_lb.TopologyChange) -> None:
        now = time.perf_counter()
        with self.event:
            self.seen[(change.kind, change.endpoint.address)] = now
            self.event.notify_all()

    def wait(self, kind: str, address: str, timeout: float = 10.0) -> float:
        """When ``kind`` of ``address`` arrived (waiting for it), or NaN after ``timeout``."""
        with self.event:
            if not self.event.wait_for(lambda: (kind, address) in self.seen, timeout):
                return float("nan")
            return self.seen.pop((kind, address))


def etcd_round(url: str, size: int, changes: int, rng: random.Random,
               progress: bool) -> tuple[list[float], list[float]]:
    """Change one key at a time; (seconds until the registry has it, seconds of the put)."""
    prefix = f"/bench{size}"
    client = EtcdClient([url])
    client.delete(prefix + "/", prefix=True)
    live = [f"10.1.{i // 250}.{i % 250 + 1}:80" for i in range(size)]
    weights = dict.fromkeys(live, 1)
    for address in live:
        client.put(f"{prefix}/users/{address}", json.dumps({"address": address}))
    lb = tai_lb.LoadBalancer.from_config({"services": {"users": {"discovery": {
        "type": "etcd", "urls": [url], "prefix": prefix}}}})
    arrivals = Arrivals()
    subscription = lb.registry.subscribe(arrivals)
    visible: list[float] = []
    puts: list[float] = []
    spare = 0
    try:
        assert len(lb.registry.endpoints("users")) == size
        for number in range(changes):
            kind = ("added", "changed", "removed")[number % 3]
            if kind == "added":
                spare += 1
                address = f"10.2.{spare // 250}.{spare % 250 + 1}:80"
                live.append(address)
                weights[address] = 1
            elif kind == "removed":
                address = live.pop(rng.randrange(len(live)))
            else:  # a weight that differs from the endpoint's, or nothing changes
                address = rng.choice(live)
                weights[address] = rng.choice([w for w in range(1, 10) if w != weights[address]])
            key = f"{prefix}/users/{address}"
            start = time.perf_counter()
            if kind == "removed":
                client.delete(key)
            else:
                client.put(key, json.dumps({"address": address, "weight": weights[address]}))
            puts.append(time.perf_counter() - start)
            visible.append(arrivals.wait(kind, address) - start)
            if kind != "removed":  # the change is in the snapshot picks use
                assert address in lb.registry.snapshot("users").by_address
            if progress and number % 50 == 49:
                print(f"  etcd, {size:,} endpoints: {number + 1} changes", file=sys.stderr,
                      flush=True)
    finally:
        subscription.unsubscribe()
        lb.close()
        client.close()
    return visible, puts


def run_etcd(quick: bool, rounds: Optional[int], seed: int, progress: bool) -> Report:
    """The ``etcd`` section: how soon an etcd change reaches the snapshot picks use."""
    settings = ETCD_QUICK if quick else ETCD_FULL
    if rounds is not None:
        settings = EtcdSettings(rounds, settings.sizes)
    rng = random.Random(seed)
    started = time.perf_counter()
    rows: list[list[str]] = []
    summary: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tai-lb-bench-") as directory, \
            etcd_server(Path(directory)) as url:
        for size in settings.sizes:
            seen, puts = etcd_round(url, size, settings.changes, rng, progress)
            visible = [v for v in seen if not math.isnan(v)]  # NaN: never arrived
            lost = len(seen) - len(visible)
            p99 = percentile(visible, 0.99)
            ok = p99 <= TARGET_ETCD_P99_S and not lost
            rows.append([f"{size:,}", str(len(seen)), str(lost), ms(median(puts)),
                         ms(median(visible)),
                         ms(percentile(visible, 0.90)), ms(p99), ms(max(visible)),
                         verdict(ok)])
            summary.append(f"{size:,} endpoints: an etcd change reached picks in "
                           f"{ms(median(visible))} ms (median), {ms(p99)} ms at p99 over "
                           f"{len(seen)} changes, {lost} never arrived (target <= "
                           f"{ms(TARGET_ETCD_P99_S)} ms, none lost): {verdict(ok)}")
    header = ["endpoints", "changes", "lost", "etcd put ms", "visible p50 ms", "p90 ms", "p99 ms",
              "max ms", f"p99 <= {ms(TARGET_ETCD_P99_S)} ms"]
    return Report(
        title="etcd: from a put or delete until the change is in the snapshot picks use",
        environment=run_line(settings.changes, time.perf_counter() - started,
                                     "changes"),
        method=(
            "A one-member etcd (Debian's etcd-server) on loopback; a LoadBalancer with etcd "
            "discovery of one service; one key changed at a time, in turn added, changed "
            "(weight) and deleted, each timed from just before the put or delete until a "
            "registry subscriber receives the change (it is delivered after the new snapshot "
            "is published, so the next pick sees it). The time includes etcd's own commit "
            "(`etcd put ms`, its fsync), the watch, the discovery watcher and the diff of the "
            "full set into the registry."),
        summary=summary,
        tables=[(header, rows)],
        notes=f"Target: p99 <= {ms(TARGET_ETCD_P99_S)} ms over 200 changes on loopback.",
    )


# -- section "dns": a DNS change picked up within TTL + 1 s --------------------------------------


@dataclass(frozen=True)
class DnsSettings:
    """How many changes, with records of which TTL."""

    changes: int
    ttl: int


DNS_FULL = DnsSettings(changes=20, ttl=1)
DNS_QUICK = DnsSettings(changes=3, ttl=1)
DNS_NAME = "users.bench.test"


def run_dns(quick: bool, rounds: Optional[int], seed: int, progress: bool) -> Report:
    """The ``dns`` section: how soon a changed A record reaches the snapshot picks use."""
    settings = DNS_QUICK if quick else DNS_FULL
    if rounds is not None:
        settings = DnsSettings(rounds, settings.ttl)
    rng = random.Random(seed)
    started = time.perf_counter()
    visible: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tai-lb-bench-") as directory:
        server = Dnsmasq(Path(directory), DNS_NAME, settings.ttl)
        live = [f"10.3.0.{i}" for i in range(1, 6)]
        server.set_addresses(live)
        with server:
            lb = tai_lb.LoadBalancer.from_config({"services": {"users": {"discovery": {
                "type": "dns", "name": DNS_NAME, "record": "A", "nameserver": "127.0.0.1",
                "port": server.port, "endpoint_port": 80, "min_ttl": settings.ttl,
                "interval": 0.2}}}})
            arrivals = Arrivals()
            subscription = lb.registry.subscribe(arrivals)
            try:
                deadline = time.monotonic() + 10
                while len(lb.registry.endpoints("users")) < len(live):  # dnsmasq starting
                    if time.monotonic() > deadline:
                        sys.exit("dnsmasq did not answer within 10 s")
                    time.sleep(0.05)
                for number in range(settings.changes):
                    # Changes land at random points of the TTL, as real ones do.
                    time.sleep(rng.uniform(0, settings.ttl))
                    address = f"10.3.1.{number + 1}"
                    live.append(address)
                    start = time.perf_counter()
                    server.set_addresses(live)
                    visible.append(arrivals.wait("added", f"{address}:80") - start)
                    if progress and number % 5 == 4:
                        print(f"  dns: {number + 1} changes", file=sys.stderr, flush=True)
            finally:
                subscription.unsubscribe()
                lb.close()
    target = settings.ttl + 1.0
    lost = sum(1 for v in visible if math.isnan(v))  # NaN: never arrived
    visible = [v for v in visible if not math.isnan(v)] or [float("nan")]
    worst = max(visible)
    ok = worst <= target and not lost
    header = ["TTL s", "changes", "lost", "visible p50 ms", "p90 ms", "max ms",
              "max <= TTL + 1 s"]
    rows = [[str(settings.ttl), str(settings.changes), str(lost), ms(median(visible)),
             ms(percentile(visible, 0.90)), ms(worst), verdict(ok)]]
    return Report(
        title="DNS: from a changed A record until the change is in the snapshot picks use",
        environment=run_line(settings.changes, time.perf_counter() - started,
                                     "changes"),
        method=(
            f"dnsmasq (Debian's dnsmasq-base) on loopback serving A records of {DNS_NAME} "
            f"from a hosts file with TTL {settings.ttl} s; a LoadBalancer with DNS discovery "
            "(`min_ttl` = the TTL, so it reads again when the TTL runs out, plus up to 10% "
            "jitter). Each change adds an address (new hosts file, SIGHUP: dnsmasq serves it "
            "at once), at a random point of the TTL, and is timed until a registry subscriber "
            "receives it."),
        summary=[f"TTL {settings.ttl} s: a DNS change reached picks in {ms(median(visible))} ms "
                 f"(median), {ms(worst)} ms at worst over {settings.changes} changes, {lost} "
                 f"never arrived (target <= "
                 f"TTL + 1 s = {target * 1000:,.0f} ms): {verdict(ok)}"],
        tables=[(header, rows)],
        notes="Target: every change within TTL + 1 s.",
    )


ETCD_HEADING = "## Discovery: etcd changes visible to picks (benchmarks/discovery.py)"
DNS_HEADING = "## Discovery: DNS changes visible to picks (benchmarks/discovery.py)"

SECTIONS: tuple[Section, ...] = (
    Section("updates", UPDATES_HEADING, run_updates),
    Section("etcd", ETCD_HEADING, run_etcd),
    Section("dns", DNS_HEADING, run_dns),
)


# -- reporting -----------------------------------------------------------------------------------


def markdown_report(report: Report) -> str:
    """The Markdown section for RESULTS.md (without its heading)."""
    parts = [report.environment, "", report.method, "",
             *(f"- {line}" for line in report.summary), ""]
    for table in report.tables:
        parts += [markdown_table(*table), ""]
    parts.append(report.notes)
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the sections, print their tables and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(
        __doc__, "under 30 seconds, fewer endpoints and rounds (smoke test); no write",
        "seed of the orders and choices", "the file whose sections are replaced")
    parser.add_argument("--only", action="append", choices=[s.name for s in SECTIONS],
                        help="run only this section (repeatable)")
    parser.add_argument("--rounds", type=int, help="number of rounds of every section run")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")

    sections = [s for s in SECTIONS if not args.only or s.name in args.only]
    for number, section in enumerate(sections):
        if number:
            print()
        report = section.run(args.quick, args.rounds, args.seed, not args.quick)
        print(report.title)
        publish(args,
                "--quick: a smoke test with fewer endpoints and rounds; its figures mean little",
                report.summary, report.tables, markdown_report(report), section.heading)
    return 0


if __name__ == "__main__":
    sys.exit(main())
