"""Active health checks against real servers, panic mode and fail-closed picking."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from tai_lb import ConfigError, Endpoint, LoadBalancer, NoEndpointAvailable, ServiceRegistry
from tai_lb.config import ServiceConfig, load_config
from tai_lb.health import HealthCheckConfig, HealthChecker

from .backends import Backend, Factory, sni_recording_context
from .conftest import FakeClock, wait_for

FAST = {"interval": 0.05, "jitter": 0.2, "timeout": 0.5, "healthy_threshold": 2,
        "unhealthy_threshold": 2, "skip_if_traffic": False}



@pytest.fixture
def servers() -> Iterator[list[Backend]]:
    made = [Backend(f"s{i}") for i in range(4)]
    yield made
    for backend in made:
        with contextlib.suppress(OSError):
            backend.stop()


def health_paths(backend: Backend) -> list[str]:
    with backend.lock:
        return [r["path"] for r in backend.received if r["path"] == "/healthz"]


def flag_health(backend: Backend, state: dict[str, int]) -> None:
    def behaviour(handler: Any, record: dict[str, Any]) -> None:
        if record["path"] == "/healthz":
            code = state["code"]
            handler.reply(code, b"", {})
        else:
            backend.ok(handler, record)
    backend.behaviour = behaviour


def make_lb(endpoints: list[str], **checks: Any) -> LoadBalancer:
    return LoadBalancer.from_config({"services": {"users": {
        "endpoints": endpoints, "health_check": {"path": "/healthz", **FAST, **checks}}}})


def test_http_check_takes_an_endpoint_out_and_back(servers: list[Backend]) -> None:
    a, b = servers[0], servers[1]
    state = {"code": 200}
    flag_health(a, state)
    with make_lb([a.address, b.address]) as lb:
        assert wait_for(lambda: len(health_paths(a)) >= 2)
        state["code"] = 503
        assert wait_for(lambda: lb.status()["services"]["users"]["endpoints"][a.address][
            "health"] == "unhealthy")
        picks = {lb.pick("users").address for _ in range(20)}
        assert picks == {b.address}
        entry = lb.status()["services"]["users"]["endpoints"][a.address]
        assert entry["health_checks"]["history"][-1] == {"ok": False, "detail": "HTTP 503"}
        state["code"] = 200
        assert wait_for(lambda: a.address in {lb.pick("users").address for _ in range(20)})
    probe = next(r for r in a.received if r["path"] == "/healthz")
    assert probe["headers"]["Host"] == "users"  # probes carry the service name


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def https_lb(address: str, verify: Any) -> LoadBalancer:
    return LoadBalancer.from_config({"services": {"users": {
        "endpoints": [address], "scheme": "https",
        "health_check": {"path": "/healthz", **FAST, "verify": verify}}}})


def endpoint_health(lb: LoadBalancer, address: str) -> str:
    state: str = lb.status()["services"]["users"]["endpoints"][address]["health"]
    return state


def check_details(lb: LoadBalancer, address: str) -> list[tuple[bool, str]]:
    health = lb.health_checker.health("users", address)
    return [] if health is None else [(ok, detail) for _, ok, detail in health.history]


@pytest.mark.parametrize(("cert_name", "verify"), [("users", "bundle"), ("billing", False)],
                         ids=["verified_against_the_ca", "verify_false_accepts_another_name"])
def test_https_check_probes_over_tls_with_the_service_name(
        backend_factory: Factory, ca: trustme.CA, tmp_path: Any, cert_name: str,
        verify: Any) -> None:
    # SPEC: "Health checks probe with the service's scheme and a Host header of the service name"
    backend = backend_factory(tls_context=sni_recording_context(ca.issue_cert(cert_name)))
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with https_lb(backend.address, str(bundle) if verify == "bundle" else verify) as lb:
        assert wait_for(lambda: len(check_details(lb, backend.address)) >= 2)
        assert set(check_details(lb, backend.address)) == {(True, "HTTP 200")}
        assert endpoint_health(lb, backend.address) == "healthy"
    with backend.lock:
        probes = [r for r in backend.received if r["path"] == "/healthz"]
    assert probes and all(r["sni"] == "users" for r in probes)  # over TLS, SNI the service
    assert all(r["host_headers"] == ["users"] for r in probes)


@pytest.mark.parametrize("wrong", ["certificate_for_another_name", "unknown_ca"])
def test_https_check_fails_an_endpoint_whose_certificate_does_not_verify(
        backend_factory: Factory, ca: trustme.CA, tmp_path: Any, wrong: str) -> None:
    name = "billing" if wrong == "certificate_for_another_name" else "users"
    backend = backend_factory(tls_context=sni_recording_context(ca.issue_cert(name)))
    bundle = tmp_path / "ca.pem"
    (ca if wrong == "certificate_for_another_name" else trustme.CA()).cert_pem.write_to_path(
        str(bundle))
    with https_lb(backend.address, str(bundle)) as lb:
        assert wait_for(lambda: endpoint_health(lb, backend.address) == "unhealthy")
        details = check_details(lb, backend.address)
    assert details and all(not ok and detail.startswith("SSLCertVerificationError")
                           for ok, detail in details)
    assert backend.received == []  # no probe got past the handshake


def test_tcp_check_notices_a_dead_endpoint(servers: list[Backend]) -> None:
    a, b = servers[0], servers[1]
    lb = LoadBalancer.from_config({"services": {"users": {
        "endpoints": [a.address, b.address],
        "health_check": {"type": "tcp", **FAST}}}})
    with lb:
        a.stop()
        assert wait_for(lambda: not lb.health_checker.is_healthy("users", a.address))
        assert {lb.pick("users").address for _ in range(20)} == {b.address}


def test_rise_and_fall_thresholds_and_grace() -> None:
    outcomes: collections.deque[bool] = collections.deque([False, True, False, False, True,
                                                           True, True])
    calls: list[float] = []

    def check(endpoint: Endpoint) -> bool:
        calls.append(time.monotonic())
        return outcomes.popleft() if outcomes else True

    config = ServiceConfig(endpoints=(Endpoint("10.0.0.1", 80),), health_check=HealthCheckConfig(
        type="function", function=check, interval=0.02, jitter=0.0, healthy_threshold=2,
        unhealthy_threshold=2, skip_if_traffic=False))
    lb = LoadBalancer(config=load_config({"services": {}}).new(services={"users": config}))
    seen: list[bool] = []
    with lb:
        assert wait_for(lambda: len(calls) >= 7)
        health = lb.health_checker.health("users", "10.0.0.1:80")
        assert health is not None
        seen = [ok for _, ok, _ in health.history]
        flips = lb.health_checker.flips
    assert seen[:7] == [False, True, False, False, True, True, True]
    # F T: one failure, then reset (no flip); F F: down after two; T T: up after two.
    assert flips == 2
    assert health.healthy


def test_failures_during_grace_do_not_count() -> None:
    config = ServiceConfig(endpoints=(Endpoint("10.0.0.1", 80),), health_check=HealthCheckConfig(
        type="function", function=lambda e: False, interval=0.02, jitter=0.0, grace=60.0,
        unhealthy_threshold=1, skip_if_traffic=False))
    with LoadBalancer(config=load_config({"services": {}}).new(services={"users": config})) as lb:
        assert wait_for(lambda: lb.health_checker.checks >= 5)
        assert lb.health_checker.is_healthy("users", "10.0.0.1:80")


def test_panic_spreads_over_all_and_fail_closed_refuses() -> None:
    addresses = [f"10.0.0.{i}:80" for i in range(1, 5)]
    bad = set(addresses[1:])

    def check(endpoint: Endpoint) -> bool:
        return endpoint.address not in bad

    def lb_with(threshold: float) -> LoadBalancer:
        config = ServiceConfig(endpoints=tuple(Endpoint.parse(a) for a in addresses),
                               health_check=HealthCheckConfig(
                                   type="function", function=check, interval=0.02,
                                   unhealthy_threshold=1, healthy_threshold=1,
                                   panic_threshold=threshold, skip_if_traffic=False))
        return LoadBalancer(config=load_config({"services": {}}).new(services={"users": config}))

    with lb_with(0.5) as lb:  # 1 of 4 healthy is below 50%: panic, use all four
        assert wait_for(lambda: lb.status()["services"]["users"]["panic"])
        assert {lb.pick("users").address for _ in range(200)} == set(addresses)
    with lb_with(0.0) as lb:  # fail closed: only the healthy one
        assert wait_for(lambda: lb.status()["services"]["users"]["endpoints_pickable"] == 1)
        assert {lb.pick("users").address for _ in range(50)} == {addresses[0]}
        bad.add(addresses[0])
        assert wait_for(lambda: lb.status()["services"]["users"]["endpoints_pickable"] == 0)
        with pytest.raises(NoEndpointAvailable, match="4 of 4 unhealthy"):
            lb.pick("users")


@pytest.mark.parametrize(("healthy", "panic"), [(2, False), (1, True)],
                         ids=["2_of_4_at_threshold", "1_of_4_below_threshold"])
def test_panic_starts_strictly_below_the_threshold(healthy: int, panic: bool) -> None:
    # SPEC: "Panic starts when the healthy share is strictly below the threshold": 2 of 4 is
    # exactly 0.5, so only the two healthy endpoints are picked; 1 of 4 is below, so all four.
    addresses = [f"10.0.0.{i}:80" for i in range(1, 5)]
    good = set(addresses[:healthy])
    config = ServiceConfig(endpoints=tuple(Endpoint.parse(a) for a in addresses),
                           health_check=HealthCheckConfig(
                               type="function", function=lambda e: e.address in good,
                               interval=0.02, unhealthy_threshold=1, healthy_threshold=1,
                               panic_threshold=0.5, skip_if_traffic=False))
    with LoadBalancer(config=load_config({"services": {}}).new(services={"users": config})) as lb:
        assert wait_for(lambda: all(not lb.health_checker.is_healthy("users", a)
                                    for a in addresses if a not in good))

        def route_is(in_panic: bool, pickable: int) -> bool:
            service = lb.status()["services"]["users"]
            return bool(service["panic"] is in_panic and service["endpoints_pickable"] == pickable)

        # the route is rebuilt off the request path: wait for it to reflect every failed check
        assert wait_for(lambda: route_is(panic, 4 if panic else healthy))
        picked = {lb.pick("users").address for _ in range(200)}
    assert picked == (set(addresses) if panic else good)


def test_a_hanging_check_never_delays_the_others() -> None:
    release = threading.Event()
    counts: collections.Counter[str] = collections.Counter()

    def check(endpoint: Endpoint) -> bool:
        counts[endpoint.address] += 1
        if endpoint.address == "10.0.0.1:80":
            release.wait(5)  # hangs, ignoring any timeout
        return True

    config = ServiceConfig(endpoints=tuple(Endpoint("10.0.0.1", 80 + i) for i in range(3)),
                           health_check=HealthCheckConfig(type="function", function=check,
                                                          interval=0.02, skip_if_traffic=False))
    lb = LoadBalancer(config=load_config({"services": {}}).new(services={"users": config}))
    try:
        assert wait_for(lambda: counts["10.0.0.1:81"] >= 10 and counts["10.0.0.1:82"] >= 10)
        assert counts["10.0.0.1:80"] == 1  # never probed twice at once
    finally:
        release.set()
        lb.close()


def test_exception_in_a_check_is_a_failed_probe_and_the_threads_survive() -> None:
    def check(endpoint: Endpoint) -> bool:
        raise RuntimeError("probe bug")

    config = ServiceConfig(endpoints=(Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)),
                           health_check=HealthCheckConfig(type="function", function=check,
                                                          interval=0.02, unhealthy_threshold=1,
                                                          skip_if_traffic=False))
    with LoadBalancer(config=load_config({"services": {}}).new(services={"users": config})) as lb:
        assert wait_for(lambda: lb.health_checker.checks >= 10)
        health = lb.health_checker.health("users", "10.0.0.1:80")
        assert health is not None and not health.healthy
        assert "RuntimeError: probe bug" in health.history[-1][2]
        assert all(t.is_alive() for t in lb.health_checker.threads)


def test_traffic_proven_health_skips_probes(servers: list[Backend]) -> None:
    a = servers[0]
    lb = LoadBalancer.from_config({"services": {"users": {
        "endpoints": [a.address],
        "health_check": {"path": "/healthz", **FAST, "interval": 0.2,
                         "skip_if_traffic": True, "max_skips": 1000}}}})
    with lb:
        s = lb.session()
        assert wait_for(lambda: len(health_paths(a)) >= 1)  # probed at once on start
        # Traffic for longer than an interval first: a probe due before the first request
        # succeeded (a slow start on a loaded machine) is not the one this test is about.
        warm = time.monotonic() + 0.5
        while time.monotonic() < warm:
            assert s.get("http://users/").status_code == 200
        before = len(health_paths(a))
        ends = time.monotonic() + 1.0
        while time.monotonic() < ends:
            assert s.get("http://users/").status_code == 200
        assert len(health_paths(a)) == before  # busy with real traffic: no probe
        assert lb.status()["health_checker"]["skipped_for_traffic"] >= 3


def test_close_stops_the_health_threads(servers: list[Backend]) -> None:
    lb = make_lb([servers[0].address])
    assert any(t.name.startswith("tai-lb-health") for t in threading.enumerate())
    started = time.monotonic()
    lb.close()
    assert time.monotonic() - started < 1.5
    assert not [t for t in threading.enumerate() if t.name.startswith("tai-lb-health")]


@pytest.mark.parametrize(("checks", "path", "fragment"), [
    ({"path": "healthz"}, "path", "starting with '/'"),
    ({}, "path", "needs a path"),
    ({"type": "udp"}, "type", "http, tcp, grpc or function"),
    ({"type": "grpc", "service": 7}, "service", "a gRPC service name"),
    ({"type": "grpc", "service": "x" * 1001}, "service", "at most 1000"),
    ({"type": "function"}, "type", "set from Python"),
    ({"path": "/h", "interval": 0}, "interval", "from 0.001"),
    ({"path": "/h", "jitter": 2}, "jitter", "from 0 to 1"),
    ({"path": "/h", "timeout": -1}, "timeout", "> 0"),
    ({"path": "/h", "healthy_threshold": 0}, "healthy_threshold", "1 to 1000"),
    ({"path": "/h", "unhealthy_threshold": 1.5}, "unhealthy_threshold", "1 to 1000"),
    ({"path": "/h", "grace": -1}, "grace", "from 0 to 86400"),
    ({"path": "/h", "history": 0}, "history", "1 to 1000"),
    ({"path": "/h", "panic_threshold": 1.5}, "panic_threshold", "from 0 to 1"),
    ({"path": "/h", "expected_statuses": [99]}, "expected_statuses", "100 to 599"),
    ({"path": "/h", "expected_statuses": ["2xx"]}, "expected_statuses", "ranges"),
    ({"path": "/h", "skip_if_traffic": "yes"}, "skip_if_traffic", "true or false"),
    ({"path": "/h", "max_skips": -1}, "max_skips", "0 to 1000"),
    ({"path": "/h", "max_skips": True}, "max_skips", "0 to 1000"),
    ({"path": "/h", "verify": 3}, "verify", "CA bundle"),
    ({"path": "/h", "share": "relative/dir"}, "share", "absolute directory path"),
    ({"path": "/h", "share": 1}, "share", "absolute directory path"),
    ({"path": "/h", "share": "/dir\x00"}, "share", "absolute directory path"),
    ({"path": "/h", "rise": 2}, "rise", "unknown key"),
])
def test_health_check_config_errors_name_the_key(checks: dict[str, Any], path: str,
                                                 fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"services": {"users": {"endpoints": [], "health_check": checks}}})
    assert caught.value.path == f"services.users.health_check.{path}"
    assert fragment in str(caught.value)


def test_expected_status_ranges() -> None:
    config = HealthCheckConfig(path="/h", expected_statuses=["200-204", 301])
    assert config.expected_statuses == {200, 201, 202, 203, 204, 301}


def test_registry_changes_reach_the_checker(servers: list[Backend]) -> None:
    a, b = servers[0], servers[1]
    with make_lb([a.address]) as lb:
        lb.registry.register("users", b.address)
        assert wait_for(lambda: len(health_paths(b)) >= 1)
        lb.registry.deregister("users", a.address)
        assert lb.health_checker.health("users", a.address) is None


def test_services_registered_from_python_stay_unchecked() -> None:
    reg = ServiceRegistry()
    reg.register("users", "10.0.0.1:80")
    with LoadBalancer(reg) as lb:
        assert lb.status()["services"]["users"]["endpoints"]["10.0.0.1:80"]["health"] == (
            "unchecked")
        assert not lb.health_checker.running


def test_removing_and_adding_an_endpoint_again_never_doubles_its_checks(
        servers: list[Backend]) -> None:
    a = servers[0]
    with make_lb([a.address, servers[1].address]) as lb:
        for _ in range(6):
            lb.registry.deregister("users", a.address)
            lb.registry.register("users", a.address)
        assert wait_for(lambda: lb.health_checker.checks >= 20)
        with lb.health_checker._lock:
            entries = [t for _, _, t in lb.health_checker._heap if t.address == a.address]
        live = [t for t in entries if lb.health_checker.target("users", a.address) is t]
        assert len(live) == 1  # one schedule for the endpoint, however often it came back


def test_traffic_counts_as_a_passed_check_but_never_erases_a_failed_probe() -> None:
    results = iter([False] + [True] * 1000)
    config = ServiceConfig(endpoints=(Endpoint("10.0.0.1", 80),), health_check=HealthCheckConfig(
        type="function", function=lambda e: next(results), interval=0.05, jitter=0.0,
        unhealthy_threshold=2, skip_if_traffic=True))
    with LoadBalancer(config=load_config({"services": {}}).new(services={"users": config})) as lb:
        assert wait_for(lambda: lb.health_checker.checks >= 1)
        health = lb.health_checker.health("users", "10.0.0.1:80")
        assert health is not None and health.failures_in_row == 1
        deadline = time.monotonic() + 2
        while lb.health_checker.skipped < 2 and time.monotonic() < deadline:
            lb.pick("users").done()  # real traffic succeeding
            time.sleep(0.01)
        # The failed probe was followed by a probe, not by skips: it passed, and then traffic
        # stood in for the next ones.
        assert lb.health_checker.checks >= 2 and lb.health_checker.skipped >= 2
        assert health.failures_in_row == 0 and health.healthy
        assert [ok for _, ok, _ in health.history][:2] == [False, True]


def checker_driven_by(clock: FakeClock, config: HealthCheckConfig, busy: list[bool]
                      ) -> tuple[HealthChecker, list[str]]:
    """A checker whose scheduler the test runs by hand (no threads): the endpoint served
    real traffic successfully just now whenever ``busy[0]``; returns it and the log of rounds
    ("probe", "skip")."""
    checker = HealthChecker(lambda service: None,
                            lambda service, address: clock() if busy[0] else None,
                            clock=clock)
    checker.set_endpoints("users", [Endpoint("10.0.0.1", 80)], config, "http")
    return checker, []


def run_round(checker: HealthChecker, clock: FakeClock, rounds: list[str], ok: bool) -> None:
    """One scheduler round at the clock's time; a probe that runs gets the result ``ok``."""
    skipped = checker.skipped
    with checker._lock:
        checker._tick()
    probed = []
    while not checker._queue.empty():
        target = checker._queue.get_nowait()
        assert target is not None
        checker._record(target, ok, "HTTP 200" if ok else "HTTP 503")
        target.running = False
        probed.append(target)
    rounds.append("probe" if probed else "skip" if checker.skipped > skipped else "idle")


def test_traffic_replaces_at_most_max_skips_probes_in_a_row(clock: FakeClock) -> None:
    config = HealthCheckConfig(path="/healthz", interval=1.0, jitter=0.0, max_skips=2)
    busy = [False]
    checker, rounds = checker_driven_by(clock, config, busy)
    run_round(checker, clock, rounds, ok=True)  # the first check, before any traffic
    busy[0] = True
    for _ in range(7):
        clock.advance(1.0)
        run_round(checker, clock, rounds, ok=True)
    assert rounds == ["probe"] + ["skip", "skip", "probe"] * 2 + ["skip"]
    assert checker.checks == 3 and checker.skipped == 5


@pytest.mark.parametrize("max_skips", [0, 1, 2, 3])
def test_a_failing_health_endpoint_takes_a_busy_endpoint_out_in_bounded_time(
        clock: FakeClock, max_skips: int) -> None:
    config = HealthCheckConfig(path="/healthz", interval=1.0, jitter=0.0, max_skips=max_skips,
                               unhealthy_threshold=2)
    busy = [False]
    checker, rounds = checker_driven_by(clock, config, busy)
    run_round(checker, clock, rounds, ok=True)  # the first check, before any traffic, passes
    busy[0] = True
    started = clock()
    while checker.is_healthy("users", "10.0.0.1:80") and clock() - started < 100:
        clock.advance(1.0)
        run_round(checker, clock, rounds, ok=False)  # the endpoint starts draining
    # Real traffic kept succeeding all along, yet the endpoint is out within
    # interval x (max_skips + unhealthy_threshold), and its failed probes were never skipped.
    assert not checker.is_healthy("users", "10.0.0.1:80")
    assert clock() - started <= 1.0 * (max_skips + 2)
    assert rounds[1:] == ["skip"] * max_skips + ["probe", "probe"]
    for _ in range(5):  # and it stays out while its probes fail, traffic or not
        clock.advance(1.0)
        run_round(checker, clock, rounds, ok=False)
        assert not checker.is_healthy("users", "10.0.0.1:80")
    assert rounds[-5:] == ["probe"] * 5


def test_a_backend_failing_its_health_endpoint_under_steady_traffic_goes_out(
        servers: list[Backend]) -> None:
    a, b = servers[0], servers[1]
    flag_health(a, {"code": 503})  # /healthz fails, / serves (an instance being drained)
    lb = make_lb([a.address, b.address], interval=0.1, skip_if_traffic=True,
                 unhealthy_threshold=2)  # and the default max_skips
    stop = threading.Event()

    def traffic() -> None:
        session = lb.session()
        while not stop.is_set():
            session.get("http://users/")

    def served_by_a() -> int:
        with a.lock:
            return sum(r["path"] == "/" for r in a.received)

    thread = threading.Thread(target=traffic, name="test-traffic", daemon=True)
    with lb:
        thread.start()
        try:
            assert wait_for(lambda: served_by_a() >= 1)  # real traffic reaches a
            assert wait_for(lambda: not lb.health_checker.is_healthy("users", a.address), timeout=5)
            # It stays out: several more failed probes, no flip back, no new traffic to a.
            probes = len(health_paths(a))
            assert wait_for(lambda: len(health_paths(a)) >= probes + 1, timeout=5)
            served = served_by_a()  # (a request picked just before the flip is in by now)
            assert wait_for(lambda: len(health_paths(a)) >= probes + 4, timeout=5)
            assert not lb.health_checker.is_healthy("users", a.address)
            assert lb.health_checker.flips == 1
            assert served_by_a() == served
        finally:
            stop.set()
            thread.join(5)
