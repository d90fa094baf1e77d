"""Fuzzes configurations: each one either builds a balancer or raises ``ConfigError``, and a
construction that fails leaves no tai-lb thread running.

::

    python benchmarks/fuzz_config.py            # 26,000 configurations; updates RESULTS.md
    python benchmarks/fuzz_config.py --quick    # 300 configurations; never writes RESULTS.md
    python benchmarks/fuzz_config.py -n 2000 --seed 7

The configurations are mutations of valid ones (a leaf or a whole part replaced by a huge
integer, inf, nan, a list nested a thousand deep, a long string, an alias bomb, an unhashable
value, non-ASCII digits...; keys deleted; unknown keys added) and random JSON-like structures.
``tests/test_config_fuzz.py`` drives the same generators from hypothesis.

Nearly every configuration that fails is refused by ``load_config``, before anything starts.
So one in twenty is instead a valid configuration, loaded, with a part that fails when the
balancer starts it, after other parts started (validate first, start last, undo on failure):
a custom discovery source (a ``SourceConfig`` of the Python API) whose provider raises in
``start()``, placed anywhere among the services, so after the StatsD export's thread and the
discovery threads of the services before it; or a Prometheus namespace whose names are already
registered, after the StatsD client opened its socket.  Each must raise what failed and leave
no tai-lb thread and no file descriptor open.

It prints a table of outcomes (built / ConfigError / failed after starting / any other
exception, by type) and the tai-lb threads and descriptors left behind, writes it to the
"fuzz_config.py" section of RESULTS.md (not with ``--quick`` or ``--no-write``), and exits 1 if
anything but ``ConfigError`` was raised (or what failed to start did not raise) or a thread or
descriptor was left.  No network is needed: endpoints are on 127.0.0.1, discovery is static or
a file that does not exist, and a StatsD host is 127.0.0.1 or a name that fails before any DNS
query.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import errno
import faulthandler
import gc
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import tai_lb
from tai_lb import (
    ConfigError,
    Endpoint,
    LoadBalancer,
    LoadBalancerConfig,
    LoadBalancerError,
    ServiceConfig,
    load_config,
)
from tai_lb.discovery import DiscoveryConfig, Provider

THREAD_PREFIX = "tai-lb"
DEFAULT_COUNT = 26_000
QUICK_COUNT = 300
SECTION = "## fuzz_config.py"
HANG_SECONDS = 60  # one configuration taking longer is a hang

Container = Union[dict[Any, Any], list[Any]]

#: a StatsD host that fails in IDNA encoding (a label over 63 characters), before any DNS query
UNRESOLVABLE_HOST = "x" * 64 + ".invalid"
NO_SHARE_DIRECTORY = "/nonexistent/tai-lb-fuzz/share"


def valid_configs() -> list[dict[str, Any]]:
    """Fresh copies of valid configurations that between them use every key."""
    return [
        {"services": {"users": {"endpoints": ["127.0.0.1:8001", "127.0.0.1:8002"]}}},
        {
            "defaults": {"strategy": "least_connections", "timeout": 2,
                         "retries": {"attempts": 2}, "pool": {"maxsize": 4}},
            "services": {
                "users": {
                    "endpoints": [
                        "127.0.0.1:8001",
                        {"address": "127.0.0.1:8002", "weight": 3, "zone": "eu-1a",
                         "region": "eu", "version": "1.4", "labels": {"tier": "gold"},
                         "priority": 1, "tls_name": "users.internal"},
                        {"host": "::1", "port": 8003},
                    ],
                    "strategy": {"name": "consistent_hash", "vnodes": 100, "load_bound": 1.25,
                                 "max_ring_size": 4096},
                    "hash_key": "header:X-User-Id",
                    "scheme": "http",
                    "timeout": {"connect": 0.5, "read": 5},
                    "retries": {"attempts": 3, "statuses": [502, 503], "methods": ["GET", "PUT"],
                                "backoff": {"base": 0.01, "max": 0.1}, "deadline": 2,
                                "budget": {"percent": 0.2, "min_per_second": 10, "ttl": 10}},
                    "pool": {"maxsize": 8, "block": True, "timeout": 1, "idle_timeout": 1.5},
                    "backups": {"endpoints": ["127.0.0.1:9001"], "failover_below": 0.5,
                                "failback_at": 0.7},
                    "rebalance": {"mode": "gradual", "drain_timeout": 10},
                    "slow_start": {"window": 60, "aggression": 1.5, "min_weight_percent": 5},
                },
                "billing": {
                    "endpoints": ["127.0.0.1:8101"],
                    "strategy": {"name": "peak_ewma", "decay": 10, "default_latency": 0.03},
                    "health_check": {"type": "http", "path": "/healthz",
                                     "expected_statuses": [200, "204-206"], "interval": 1,
                                     "jitter": 0.1, "timeout": 0.5, "healthy_threshold": 2,
                                     "unhealthy_threshold": 2, "grace": 0, "history": 10,
                                     "skip_if_traffic": True, "panic_threshold": 0.5,
                                     "verify": True, "share": False},
                    "outlier_detection": {"consecutive_5xx": 5, "consecutive_gateway_failure": 5,
                                          "consecutive_local_origin_failure": 5,
                                          "base_ejection_time": 30, "max_ejection_time": 300,
                                          "max_ejection_percent": 10},
                    "circuit_breaker": {"fail_max": 5, "reset_timeout": 30,
                                        "success_threshold": 1},
                    "timeout": [1, 2],
                    "backups": ["127.0.0.1:9101"],
                },
            },
            "metrics": {"statsd": {"host": "127.0.0.1", "port": 8125, "prefix": "fuzz",
                                   "tags": {"env": "fuzz", "team": "lb"}},
                        "prometheus": {"namespace": "fuzz"}},
        },
        {
            "services": {
                "search": {"discovery": {"type": "static", "endpoints": ["127.0.0.1:8201"],
                                         "interval": 1, "max_removal_share": 0.5,
                                         "confirmations": 3}},
                "orders": {"discovery": {"type": "file",
                                         "path": "/nonexistent/tai-lb-fuzz/orders.json",
                                         "interval": 5},
                           "health_check": {"type": "tcp", "interval": 2},
                           "strategy": "weighted_round_robin",
                           "rebalance": {"mode": "manual", "drain_timeout": 0}},
                "echo": {"endpoints": ["127.0.0.1:8301"], "strategy": "peak_ewma",
                         "health_check": {"type": "grpc", "service": "demo.Echo",
                                          "interval": 2, "timeout": 0.5}},
            },
        },
        {
            "zone": "eu-1a",
            "services": {
                "users": {
                    "endpoints": [{"address": "127.0.0.1:8301", "zone": "eu-1a", "version": "2"},
                                  {"address": "127.0.0.1:8302", "zone": "eu-1b",
                                   "labels": {"track": "canary"}}],
                    "locality": {"enabled": True, "min_cluster_size": 6,
                                 "caller_distribution": {"eu-1a": 2, "eu-1b": 1}},
                    "subset": {"key": "header:X-Version", "by": "version", "fallback": "fail"},
                },
                "orders": {"endpoints": ["127.0.0.1:8303"], "locality": {},
                           "subset": {"key": "cookie:track", "by": "label:track",
                                      "fallback": "any"}},
            },
        },
        {
            # a tuning profile under the configuration's own defaults; null turns a part off
            "profile": "production_unstable",
            "defaults": {"retries": {"attempts": 2}, "timeout": {"read": 2}},
            "services": {
                "users": {"endpoints": ["127.0.0.1:8401", "127.0.0.1:8402"],
                          "health_check": {"type": "http", "path": "/healthz"}},
                "orders": {"endpoints": ["127.0.0.1:8403"], "circuit_breaker": None,
                           "slow_start": None, "rebalance": None},
            },
        },
    ]


def nested(levels: int) -> list[Any]:
    """A list nested ``levels`` deep: ``[[[...]]]``."""
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


def alias_bomb(levels: int = 8) -> list[Any]:
    """What a YAML alias bomb loads as: 9 references to 9 references... (9**levels leaves)."""
    value: list[Any] = ["x"] * 9
    for _ in range(levels):
        value = [value] * 9
    return value


#: makers of the values a leaf may be replaced with
REPLACEMENTS: tuple[Callable[[random.Random], Any], ...] = (
    lambda rng: 10 ** rng.choice((20, 400, 5000)),   # past a float, past str()'s 4300 digits
    lambda rng: -(10 ** 400),
    lambda rng: rng.choice((float("inf"), float("-inf"), float("nan"), 1e300, -1e300, 5e-324)),
    lambda rng: rng.choice((-1, 0, 1, 2, 65536, 1_000_000, 0.5, -0.5, True, False, None)),
    lambda rng: nested(rng.choice((10, 1000))),
    lambda rng: alias_bomb(),
    lambda rng: "x" * rng.choice((0, 64, 10_000)),
    lambda rng: rng.choice(("\u00b200-399", "\u0663", "\uff11\uff12\uff13", "200-999999999",
                            "599-100", "1e999", "header:bad name", "127.0.0.1:" + "9" * 5000,
                            "http://[::1", "\x00", "\udcff", "/")),
    lambda rng: rng.choice(({}, [], {"a": 1}, [[1]], [{}], [[], {}], (1, [2]), {1: 2})),
    lambda rng: {rng.choice((1, None, 1.5, 10 ** 5000, "x" * 300)): 1},
    lambda rng: random_structure(rng, 3),
)

#: keys added next to the real ones (unknown, of every type a YAML key can have)
UNKNOWN_KEYS: tuple[Any, ...] = ("colour", "", 1, None, 1.5, True, 10 ** 5000, "x" * 10_000,
                                 ("a", "b"), "\u00b2")


def random_structure(rng: random.Random, depth: int = 4) -> Any:
    """A random JSON-like value: mappings, lists, strings, numbers, booleans and null."""
    kind = rng.randrange(8 if depth > 0 else 5)
    if kind == 0:
        return rng.choice(("", "users", "127.0.0.1:8001", "round_robin", "static", "/h", "GET",
                           "x" * rng.randrange(1, 20), "\u00e9", "200-399"))
    if kind == 1:
        return rng.choice((0, 1, -1, 80, 503, 2 ** 63, 10 ** 30))
    if kind == 2:
        return rng.choice((0.0, 0.5, -2.5, 1e20, float("inf"), float("nan")))
    if kind == 3:
        return rng.choice((True, False))
    if kind == 4:
        return None
    if kind in (5, 6):
        keys = ("services", "endpoints", "strategy", "name", "type", "path", "host", "port",
                "weight", "retries", "timeout", "users", "health_check", "discovery", "x", 1)
        return {rng.choice(keys): random_structure(rng, depth - 1)
                for _ in range(rng.randrange(4))}
    return [random_structure(rng, depth - 1) for _ in range(rng.randrange(4))]


def _containers(value: Any, out: list[Container], seen: set[int], depth: int = 0,
                ) -> list[Container]:
    # Each container once (an alias bomb's items are all the same list), and not too deep
    # (a list made a thousand deep by an earlier mutation is left as it is).
    if depth > 12 or id(value) in seen or not isinstance(value, (dict, list)):
        return out
    seen.add(id(value))
    out.append(value)
    for item in list(value.values() if isinstance(value, dict) else value):
        _containers(item, out, seen, depth + 1)
    return out


def mutate(config: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """``config`` (copied) with one to three random mutations."""
    config = copy.deepcopy(config)
    for _ in range(rng.randrange(1, 4)):
        containers = _containers(config, [], set())
        target = rng.choice(containers)
        operation = rng.randrange(10)
        if isinstance(target, dict):
            keys = list(target)
            if operation == 0 or not keys:
                target[rng.choice(UNKNOWN_KEYS)] = rng.choice(REPLACEMENTS)(rng)
            elif operation == 1:
                del target[rng.choice(keys)]
            else:
                target[rng.choice(keys)] = rng.choice(REPLACEMENTS)(rng)
        elif operation == 0 or not target:
            target.append(rng.choice(REPLACEMENTS)(rng))
        elif operation == 1:
            del target[rng.randrange(len(target))]
        else:
            target[rng.randrange(len(target))] = rng.choice(REPLACEMENTS)(rng)
    _keep_statsd_offline(config)
    _keep_shares_off_disk(config)
    return config


def _keep_statsd_offline(config: Any) -> None:
    # A StatsD host is resolved when the balancer is built: keep the fuzz off the network.
    metrics = config.get("metrics") if isinstance(config, dict) else None
    statsd = metrics.get("statsd") if isinstance(metrics, dict) else None
    host = statsd.get("host") if isinstance(statsd, dict) else None
    if isinstance(statsd, dict) and isinstance(host, str) and host not in ("127.0.0.1", "::1"):
        statsd["host"] = UNRESOLVABLE_HOST


def _keep_shares_off_disk(config: Any) -> None:
    # Shared health checks write a file in their directory: a mutation to True or "/" must
    # not litter this machine, so every share that is on names a directory that is not there.
    services = config.get("services") if isinstance(config, dict) else None
    for service in services.values() if isinstance(services, dict) else ():
        checks = service.get("health_check") if isinstance(service, dict) else None
        if isinstance(checks, dict) and checks.get("share", False) is not False:
            checks["share"] = NO_SHARE_DIRECTORY


def fuzzed_config(rng: random.Random) -> Any:
    """A mutated valid configuration (most often) or a random structure."""
    draw = rng.random()
    if draw < 0.85:
        return mutate(rng.choice(valid_configs()), rng)
    if draw < 0.95:  # random services under a valid top level
        config = {"services": random_structure(rng)}
        _keep_statsd_offline(config)
        _keep_shares_off_disk(config)
        return config
    config = random_structure(rng)
    _keep_statsd_offline(config)
    _keep_shares_off_disk(config)
    return config


def tai_lb_threads(but: Collection[threading.Thread] = ()) -> list[str]:
    """Names of the tai-lb threads alive now, but those of ``but``."""
    return [t.name for t in threading.enumerate()
            if t.name.startswith(THREAD_PREFIX) and t.is_alive() and t not in but]


def _running() -> frozenset[threading.Thread]:
    # The tai-lb threads alive before a run: one left by an earlier run is counted once, there.
    return frozenset(t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX))


@dataclass
class Outcome:
    """What building a balancer from one configuration did."""

    result: str  # "built", "ConfigError", "failed after starting", or another exception's type
    error: Optional[BaseException] = None
    threads_left: list[str] = field(default_factory=list)
    threads_at_failure: list[str] = field(default_factory=list)  # of a failing start
    descriptors_left: int = 0  # after a failing start
    metrics_left: list[str] = field(default_factory=list)  # Prometheus families left registered


def registered_metrics() -> frozenset[str]:
    """The metric families in prometheus_client's default registry (none without it)."""
    try:
        from prometheus_client import REGISTRY  # an optional extra
    except ImportError:
        return frozenset()
    return frozenset(family.name for family in REGISTRY.collect())


def try_config(config: Any) -> Outcome:
    """Build a balancer from ``config``, use and close it; what happened, and the tai-lb
    threads and Prometheus metrics it left after a failed construction or after close()."""
    before, metrics = _running(), registered_metrics()
    try:
        lb = LoadBalancer.from_config(config)
    except ConfigError:
        outcome = Outcome("ConfigError", threads_left=_threads_after_stop(before))
    except Exception as error:
        outcome = Outcome(type(error).__name__, error, _threads_after_stop(before))
    else:
        try:
            for name in lb.config.services:  # a configuration that loads never breaks a pick
                # NoEndpointAvailable (nothing healthy, discovery failing) is an answer
                with contextlib.suppress(LoadBalancerError):
                    lb.pick(name).done()
            lb.status()
        except Exception as error:
            lb.close()
            outcome = Outcome(f"after load: {type(error).__name__}", error,
                              _threads_after_stop(before))
        else:
            lb.close()
            outcome = Outcome("built", threads_left=_threads_after_stop(before))
    outcome.metrics_left = sorted(registered_metrics() - metrics)
    return outcome


def _threads_after_stop(before: Collection[threading.Thread], timeout: float = 2.0,
                        ) -> list[str]:
    # Stopped threads have been joined, so this is normally empty at once.
    deadline = time.monotonic() + timeout
    left = tai_lb_threads(but=before)
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = tai_lb_threads(but=before)
    return left


#: share of the configurations with a part that fails when started
FAILING_START_SHARE = 0.05
FAILED_AFTER_STARTING = "failed after starting"
#: what a custom discovery source raises when started (a source that is down, a bug...)
START_ERRORS: tuple[Callable[[], Exception], ...] = (
    lambda: RuntimeError("the source is broken"),
    lambda: OSError(errno.ECONNREFUSED, "connection refused"),
    lambda: ValueError("a bad answer"),
    lambda: ConfigError("discovery", "refused when started"),
)
#: a Prometheus namespace whose names the fuzz registers itself, so that a balancer's clash
CLASH_NAMESPACE = "tai_lb_fuzz_clash"


class BrokenProvider(Provider):
    """A custom discovery provider whose ``start()`` raises ``error``, after noting the tai-lb
    threads running at that moment (what the failed construction must stop)."""

    def __init__(self, error: Exception, running: list[str],
                 before: Collection[threading.Thread]) -> None:
        self.error = error
        self.running = running
        self.before = before

    def fetch(self) -> Optional[list[Endpoint]]:
        """Nothing new (never reached: start() fails first)."""
        return None

    def start(self, notify: Callable[[], None]) -> None:
        """Fail, as a source that cannot be reached would."""
        self.running.extend(tai_lb_threads(but=self.before))
        raise self.error


@dataclass(eq=False)
class BrokenSource:
    """A custom discovery source (a ``SourceConfig``) whose providers fail to start."""

    error: Exception
    running: list[str] = field(default_factory=list)
    before: Collection[threading.Thread] = field(default_factory=_running)

    def provider(self, service: str) -> Provider:
        """A provider of ``service`` that fails when started."""
        return BrokenProvider(self.error, self.running, self.before)


@dataclass
class FailingStart:
    """A valid configuration, loaded, with a part that fails when the balancer starts it."""

    config: LoadBalancerConfig
    part: str  # what fails
    expected: Callable[[BaseException], bool]  # whether an exception is that failure
    running: list[str] = field(default_factory=list)  # tai-lb threads when the source failed


def _register_clashing_names() -> None:
    # Once per process: a metric of the application with a name of CLASH_NAMESPACE's.
    from prometheus_client import Counter

    with contextlib.suppress(ValueError):  # registered already
        Counter(f"{CLASH_NAMESPACE}_requests", "An application's own metric.")


def failing_start(rng: random.Random) -> FailingStart:
    """A valid configuration with StatsD on (its thread starts first) and a part that fails
    when started: a custom discovery source at a random place among the services (three in
    four), or a Prometheus namespace already registered."""
    mapping = rng.choice(valid_configs())
    metrics = mapping.setdefault("metrics", {})
    metrics.setdefault("statsd", {"host": "127.0.0.1"})
    if rng.random() < 0.25:
        _register_clashing_names()
        metrics["prometheus"] = {"namespace": CLASH_NAMESPACE}
        return FailingStart(load_config(mapping), "Prometheus namespace", lambda error: (
            isinstance(error, ConfigError) and error.path == "metrics.prometheus.namespace"))
    config = load_config(mapping)
    source = BrokenSource(rng.choice(START_ERRORS)())
    services = list(config.services.items())
    services.insert(rng.randrange(len(services) + 1),
                    ("broken", ServiceConfig(discovery=DiscoveryConfig("custom", source))))
    return FailingStart(dataclasses.replace(config, services=dict(services)),
                        "custom discovery source", lambda error: error is source.error,
                        source.running)


def open_descriptors() -> set[tuple[int, str]]:
    """The file descriptors open in this process, with what each is (none where
    /proc/self/fd does not exist)."""
    found = set()
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
                found.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
    return found


def try_failing_start(case: FailingStart) -> Outcome:
    """Build a balancer whose start fails; what happened, and the tai-lb threads, file
    descriptors and Prometheus metrics left after the failure.  Descriptors are listed after a
    ``gc.collect()`` before and without one after, so that garbage of earlier runs closing
    meanwhile cannot hide a leak, and a socket dropped in a reference cycle rather than closed
    counts."""
    gc.collect()
    before, descriptors, metrics = _running(), open_descriptors(), registered_metrics()
    try:
        lb = LoadBalancer(config=case.config)
    except Exception as error:
        threads = _threads_after_stop(before)
        left = len(open_descriptors() - descriptors)
        result = FAILED_AFTER_STARTING if case.expected(error) else type(error).__name__
        return Outcome(result, None if case.expected(error) else error, threads,
                       list(case.running), left, sorted(registered_metrics() - metrics))
    lb.close()
    return Outcome("built though a part failed to start", None, _threads_after_stop(before))


@dataclass
class Tally:
    """What a run of the fuzz found."""

    count: int
    seed: int
    seconds: float = 0.0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    leaks: int = 0  # runs leaving tai-lb threads
    metric_leaks: int = 0  # runs leaving Prometheus metrics registered
    #: failing starts by the part that failed, of them with tai-lb threads running at the
    #: failure, and of them leaving threads or file descriptors
    failing_starts: collections.Counter[str] = field(default_factory=collections.Counter)
    started_threads: int = 0
    start_thread_leaks: int = 0
    descriptor_leaks: int = 0

    @property
    def others(self) -> int:
        """Configurations that raised anything but ConfigError, or anything but what failed
        to start (target 0)."""
        return sum(n for result, n in self.outcomes.items()
                   if result not in ("built", "ConfigError", FAILED_AFTER_STARTING))

    @property
    def failed(self) -> bool:
        """Whether a target was missed."""
        return bool(self.others or self.leaks or self.descriptor_leaks or self.metric_leaks)

    def add(self, outcome: Outcome) -> None:
        """Count one configuration's outcome."""
        self.outcomes[outcome.result] += 1
        if outcome.error is not None and outcome.result not in self.examples:
            self.examples[outcome.result] = str(outcome.error)[:200]
        if outcome.threads_left:
            self.leaks += 1
            self.examples.setdefault("threads left", ", ".join(outcome.threads_left)[:200])
        if outcome.metrics_left:
            self.metric_leaks += 1
            self.examples.setdefault("metrics left", ", ".join(outcome.metrics_left)[:200])


def run(count: int, seed: int) -> Tally:
    """Try ``count`` fuzzed configurations drawn from ``seed``."""
    rng = random.Random(seed)
    tally = Tally(count, seed)
    started = time.perf_counter()
    for _ in range(count):
        # A configuration that hangs the balancer (a scheduler spinning...) ends the run with
        # every thread's stack rather than a run that never ends.
        if rng.random() < FAILING_START_SHARE:
            case = failing_start(rng)
            faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
            outcome = try_failing_start(case)
            faulthandler.cancel_dump_traceback_later()
            tally.failing_starts[case.part] += 1
            tally.started_threads += bool(outcome.threads_at_failure)
            tally.start_thread_leaks += bool(outcome.threads_left)
            tally.descriptor_leaks += bool(outcome.descriptors_left)
        else:
            config = fuzzed_config(rng)
            faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
            outcome = try_config(config)
            faulthandler.cancel_dump_traceback_later()
        tally.add(outcome)
    tally.seconds = time.perf_counter() - started
    return tally


def outcome_rows(tally: Tally) -> tuple[list[str], list[list[str]]]:
    """The outcome table: what the configurations did, with the targets."""
    from picks import verdict  # see main()

    header = ["outcome", "configurations", "target", "verdict"]
    rows = [["configurations tried", f"{tally.count:,}", "", ""],
            ["built (picked from, then closed)", f"{tally.outcomes['built']:,}", "", ""],
            ["ConfigError", f"{tally.outcomes['ConfigError']:,}", "", ""],
            ["failed after starting", f"{tally.outcomes[FAILED_AFTER_STARTING]:,}", "", ""]]
    rows += [[f"- failing part: {part}", f"{n:,}", "", ""]
             for part, n in sorted(tally.failing_starts.items())]
    rows += [["- tai-lb threads running at the failure", f"{tally.started_threads:,}", "", ""],
             ["- tai-lb threads left after it", f"{tally.start_thread_leaks:,}", "0",
              verdict(tally.start_thread_leaks == 0)],
             ["- file descriptors left after it", f"{tally.descriptor_leaks:,}", "0",
              verdict(tally.descriptor_leaks == 0)]]
    rows += [[f"other: {result}", f"{n:,}", "", ""]
             for result, n in sorted(tally.outcomes.items())
             if result not in ("built", "ConfigError", FAILED_AFTER_STARTING)]
    rows += [["other exceptions", f"{tally.others:,}", "0", verdict(tally.others == 0)],
             ["runs leaving tai-lb threads", f"{tally.leaks:,}", "0", verdict(tally.leaks == 0)],
             ["runs leaving Prometheus metrics registered", f"{tally.metric_leaks:,}", "0",
              verdict(tally.metric_leaks == 0)],
             ["seed", str(tally.seed), "", ""],
             ["time (s)", f"{tally.seconds:,.0f}", "", ""]]
    return header, rows


def markdown_report(tally: Tally) -> str:
    """The Markdown section for RESULTS.md (without its heading)."""
    from picks import environment_line, markdown_table  # see main()

    examples = [f"- {result}: `{text}`" for result, text in tally.examples.items()]
    return "\n".join([
        environment_line(f"{tally.count:,} configurations (seed {tally.seed}) in "
                         f"{tally.seconds:.0f} s"),
        "",
        "Each configuration is a mutation of a valid one (85% of those drawn by fuzzed_config(): "
        "a leaf or a part replaced by a "
        "huge integer, inf, nan, a list nested 1,000 deep, an alias bomb, an unhashable value, "
        "non-ASCII digits...; keys deleted; unknown keys added) or a random JSON-like "
        "structure.  `LoadBalancer.from_config()` must build it (then every service is picked "
        "from, `status()` read and the balancer closed) or raise `ConfigError`, and leave no "
        "tai-lb thread running either way.  One in twenty is instead a valid configuration "
        "(StatsD on) with a part that fails when started, after others started: a custom "
        "discovery source raising in `start()` (a `RuntimeError`, `OSError`, `ValueError` or "
        "`ConfigError`) at a random place among the services, or a Prometheus namespace "
        "already registered (a `ConfigError` after the StatsD socket opened); it must raise "
        "that error and leave no tai-lb thread and no file descriptor open (listed in "
        "/proc/self/fd after a `gc.collect()` before and without one after: a socket dropped "
        "in a reference cycle rather than closed counts).  No run may leave a metric family "
        "registered in prometheus_client's default registry.",
        "",
        markdown_table(*outcome_rows(tally)),
        *(["", "First message of each failure:", "", *examples] if examples else []),
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the fuzz, print its table and, unless told not to, update RESULTS.md; 1 if anything
    but ConfigError was raised or a thread was left."""
    # picks.py is on the path only when this runs as a script; the tests import this module
    # as benchmarks.fuzz_config for its generators, which need nothing from it.
    from picks import benchmark_parser, publish, verdict


    parser = benchmark_parser(__doc__, f"{QUICK_COUNT} configurations (smoke test); no write",
                              "random seed (default 2026)",
                              f"the file whose '{SECTION}' section is replaced")
    parser.set_defaults(seed=2026)
    parser.add_argument("-n", "--count", type=int,
                        help=f"configurations to try (default {DEFAULT_COUNT:,}; "
                             f"{QUICK_COUNT} with --quick)")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    logging.getLogger("tai_lb").setLevel(logging.CRITICAL)  # failing discovery logs a lot
    tally = run(count, args.seed)
    summary = [f"tai-lb {tai_lb.__version__}: {count:,} fuzzed configurations (seed "
               f"{args.seed}) in {tally.seconds:.0f} s: {tally.others:,} other exceptions, "
               f"{tally.leaks:,} runs leaving threads, {tally.descriptor_leaks:,} leaving "
               f"descriptors, {tally.metric_leaks:,} leaving metrics: "
               f"{verdict(not tally.failed)}"]
    publish(args, "--quick: a smoke test of a few hundred configurations; no write", summary,
            [outcome_rows(tally)], markdown_report(tally), SECTION)
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
