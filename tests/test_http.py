"""The requests adapter against real HTTP(S) servers on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import trustme

import tai_lb
from tai_lb import HTTPPoolExhausted, LoadBalancer, NoEndpointAvailable, trace_of

from . import backends
from .backends import Backend, Factory, balancer
from .conftest import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_balanced_get_sends_the_service_name_as_host(backend_factory: Factory) -> None:
    a, b = backend_factory(), backend_factory()
    with balancer(a, b) as lb:
        s = lb.session()
        seen = {s.get("http://users/api/users/42").json()["backend"] for _ in range(4)}
        assert seen == {"b1", "b2"}
        r = s.get("http://users:8080/x?q=1")
        assert r.json()["host"] == "users:8080"  # the URL's port stays in Host only
        assert r.json()["path"] == "/x?q=1"
        assert r.url == "http://users:8080/x?q=1"  # requests sees the logical URL
    assert {rec["headers"]["Host"] for rec in a.received + b.received} == {"users", "users:8080"}


def test_other_hosts_pass_through(backend_factory: Factory) -> None:
    plain = backend_factory("plain")
    with balancer(backend_factory()) as lb:
        s = lb.session()
        r = s.get(f"http://localhost:{plain.port}/direct")
        assert r.json() == {"backend": "plain", "path": "/direct",
                            "host": f"localhost:{plain.port}"}
        assert trace_of(r) is None
        with pytest.raises(requests.exceptions.ConnectionError) as caught:
            s.get(f"http://localhost:{free_port()}/")  # not a service: plain requests' error
        assert not isinstance(caught.value, tai_lb.LoadBalancerError)


def test_mount_on_one_service_prefix(backend_factory: Factory) -> None:
    a = backend_factory()
    with balancer(a) as lb:
        s = requests.Session()
        s.mount("http://users/", tai_lb.LoadBalancedAdapter(lb))
        assert s.get("http://users/ping").json()["backend"] == "b1"


def test_decision_trace_on_response_is_readable_and_serialisable(
        backend_factory: Factory) -> None:
    a = backend_factory()
    with balancer(a) as lb:
        r = lb.session().get("http://users/api")
        trace = trace_of(r)
        assert trace is not None and trace.service == "users"
        assert [(t.endpoint, t.status, t.decision) for t in trace.attempts] == [
            (a.address, 200, "done")]
        assert "picked by round_robin" in str(trace)
        assert json.loads(json.dumps(trace.to_dict()))["attempts"][0]["endpoint"] == a.address


def test_no_endpoint_is_a_requests_connection_error() -> None:
    with LoadBalancer.from_config({"services": {"users": {"endpoints": []}}}) as lb:
        with pytest.raises(requests.exceptions.ConnectionError) as caught:
            lb.session().get("http://users/")
        assert isinstance(caught.value, NoEndpointAvailable)
        assert trace_of(caught.value) is not None


# -- retries ----------------------------------------------------------------------------------


def test_refused_connection_is_retried_on_another_endpoint_even_for_post(
        backend_factory: Factory) -> None:
    live = backend_factory("live")
    dead = f"127.0.0.1:{free_port()}"
    lb = LoadBalancer.from_config({"services": {"users": {
        "endpoints": [dead, live.address], "strategy": {"name": "round_robin"}}}})
    with lb:
        s = lb.session()
        for _ in range(4):
            r = s.post("http://users/orders", data=b"payload")
            assert r.status_code == 200
        assert [rec["body"] for rec in live.received] == [b"payload"] * 4
        refused = [t for t in itertools.chain.from_iterable(
            trace_of(s.post("http://users/o", data=b"x")).attempts  # type: ignore[union-attr]
            for _ in range(2)) if t.endpoint == dead]
        assert refused and all(t.decision == "retry: not sent" for t in refused)


def test_post_reset_after_reading_is_not_retried_but_get_is(backend_factory: Factory) -> None:
    bad, good = backend_factory("bad"), backend_factory("good")
    bad.behaviour = backends.reset_connection
    lb = LoadBalancer.from_config({"services": {"users": {
        "endpoints": [bad.address, good.address], "strategy": {"name": "round_robin"}}}})
    with lb:
        s = lb.session()
        # Find the order: send GETs until one went to the bad endpoint first.
        outcomes = []
        for _ in range(4):
            r = s.get("http://users/item")
            outcomes.append([t.endpoint for t in trace_of(r).attempts])  # type: ignore[union-attr]
            assert r.status_code == 200 and r.json()["backend"] == "good"
        assert [bad.address, good.address] in outcomes  # a GET survived the reset
        bad.received.clear()
        good.received.clear()
        errors = 0
        for _ in range(4):
            try:
                s.post("http://users/orders", data=b"pay-once")
            except requests.exceptions.ConnectionError as error:
                errors += 1
                trace = trace_of(error)
                assert trace is not None and "not idempotent" in trace.attempts[-1].decision
        assert errors == 2  # the two POSTs that met the bad endpoint failed...
        assert len(bad.received) == 2  # ...which received each exactly once
        assert len(good.received) == 2


def test_idempotency_key_makes_a_post_retryable(backend_factory: Factory) -> None:
    bad, good = backend_factory("bad"), backend_factory("good")
    bad.behaviour = backends.reset_connection
    with balancer(bad, good) as lb:
        s = lb.session()
        for i in range(4):
            r = s.post("http://users/orders", data=b"x", headers={"Idempotency-Key": f"k{i}"})
            assert r.json()["backend"] == "good"


def test_unreplayable_body_is_never_retried(backend_factory: Factory) -> None:
    bad, good = backend_factory("bad"), backend_factory("good")
    bad.behaviour = backends.reset_connection
    with balancer(bad, good) as lb:
        s = lb.session()
        failures = 0
        for _ in range(4):
            try:
                s.put("http://users/upload", data=(chunk for chunk in [b"a", b"b"]))
            except requests.exceptions.ConnectionError as error:
                failures += 1
                assert "cannot be sent again" in trace_of(error).attempts[-1].decision  # type: ignore[union-attr]
        assert failures == 2


def test_body_cut_off_mid_response_is_retried_for_get(backend_factory: Factory) -> None:
    bad, good = backend_factory("bad"), backend_factory("good")
    bad.behaviour = backends.cut_off_body
    with balancer(bad, good) as lb:
        s = lb.session()
        for _ in range(4):
            assert s.get("http://users/big").json()["backend"] == "good"
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in range(2):
                s.post("http://users/big", data=b"x")


def test_retryable_status_goes_to_another_endpoint(backend_factory: Factory) -> None:
    bad, good = backend_factory("bad"), backend_factory("good")
    bad.behaviour = backends.status(503)
    with balancer(bad, good) as lb:
        s = lb.session()
        for _ in range(4):
            assert s.get("http://users/").status_code == 200
        # POST gets the 503 itself: it reached a server
        codes = {s.post("http://users/", data=b"x").status_code for _ in range(4)}
        assert codes == {200, 503}


def test_every_attempt_failing_raises_the_last_requests_error(backend_factory: Factory) -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    with LoadBalancer.from_config({"services": {"users": {"endpoints": dead}}}) as lb:
        with pytest.raises(requests.exceptions.ConnectionError) as caught:
            lb.session().get("http://users/")
        assert not isinstance(caught.value, NoEndpointAvailable)
        trace = trace_of(caught.value)
        assert trace is not None
        assert sorted(t.endpoint for t in trace.attempts) == sorted(dead)  # each tried once
        assert trace.attempts[-1].decision == "stop: no attempts left"


def test_retry_budget_caps_upstream_attempts(backend_factory: Factory) -> None:
    failing = [backend_factory(f"f{i}") for i in range(3)]
    for backend in failing:
        backend.behaviour = backends.status(503)
    lb = balancer(*failing, retries={"attempts": 3, "backoff": {"base": 0},
                                     "budget": {"percent": 0.2, "min_per_second": 1, "ttl": 10}})
    with lb:
        s = lb.session()
        requests_sent = 150
        for _ in range(requests_sent):
            assert s.get("http://users/").status_code == 503
        attempts = sum(b.requests_count() for b in failing)
        floor = 1 * 10
        assert attempts <= 1.2 * requests_sent + floor
        assert attempts >= requests_sent
        budget = lb.status()["services"]["users"]["retry_budget"]
        assert budget["refused"] > 0


def test_deadline_bounds_all_attempts(backend_factory: Factory) -> None:
    slow = [backend_factory(f"s{i}") for i in range(3)]
    for backend in slow:
        backend.behaviour = backends.slow(0.5)
    with balancer(*slow, retries={"deadline": 0.3}) as lb:
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout) as caught:
            lb.session().get("http://users/", timeout=5)
        trace = trace_of(caught.value)
        assert trace is not None and len(trace.attempts) == 1
        assert "deadline" in trace.attempts[0].decision
        assert time.monotonic() - started < 2.5  # not 3 x 5 s


def test_read_timeout_is_retried_for_get(backend_factory: Factory) -> None:
    slow, good = backend_factory("slow"), backend_factory("good")
    slow.behaviour = backends.slow(1.0)
    with balancer(slow, good) as lb:
        s = lb.session()
        for _ in range(2):
            assert s.get("http://users/", timeout=(1, 0.2)).json()["backend"] == "good"


# -- connections ------------------------------------------------------------------------------


def test_idle_keep_alive_close_never_fails_a_post(backend_factory: Factory) -> None:
    # The backend drops (reads, then closes unanswered) a request that arrives on a connection
    # idle for more than 0.3 s: the race between its idle close and our reuse, made certain.
    backend = backend_factory(drop_idle_after=0.3)
    with balancer(backend, pool={"idle_timeout": 0.2}, retries={"attempts": 1}) as lb:
        s = lb.session()
        assert s.post("http://users/a", data=b"1").status_code == 200
        time.sleep(0.4)  # idle past both limits: our pool reconnects before sending
        assert s.post("http://users/b", data=b"2").status_code == 200
    assert backend.dropped == 0
    assert [r["body"] for r in backend.received] == [b"1", b"2"]
    # The control: with an idle limit above the backend's, the same POST fails.
    with balancer(backend, pool={"idle_timeout": 10}, retries={"attempts": 1}) as lb:
        s = lb.session()
        assert s.post("http://users/c", data=b"3").status_code == 200
        time.sleep(0.4)
        with pytest.raises(requests.exceptions.ConnectionError):
            s.post("http://users/d", data=b"4")
    assert backend.dropped == 1


def test_pool_bounds_sockets_and_times_out_clearly(backend_factory: Factory) -> None:
    backend = backend_factory()
    backend.behaviour = backends.slow(0.2)
    lb = balancer(backend, pool={"maxsize": 8, "timeout": 0.05}, retries={"attempts": 1})
    peers: set[Any] = set()
    original = backend.behaviour

    def record_peer(handler: Any, record: dict[str, Any]) -> None:
        with backend.lock:
            peers.add(handler.client_address)
        original(handler, record)

    backend.behaviour = record_peer
    results: list[Any] = []
    with lb:
        barrier = threading.Barrier(64)

        def call() -> None:
            s = lb.session()
            barrier.wait()
            try:
                results.append(s.get("http://users/").status_code)
            except Exception as error:
                results.append(error)

        threads = [threading.Thread(target=call) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(peers) <= 8  # never more than maxsize sockets to the endpoint
    exhausted = [r for r in results if isinstance(r, Exception)]
    assert exhausted and all(isinstance(e, HTTPPoolExhausted) for e in exhausted)
    assert all(isinstance(e, requests.exceptions.ConnectionError) for e in exhausted)
    assert "became free within 0.05 s" in str(exhausted[0])
    assert results.count(200) >= 8


def test_streaming_keeps_the_lease_until_the_body_is_read(backend_factory: Factory) -> None:
    backend = backend_factory()
    backend.behaviour = backends.streamed(chunks=5, size=1000)
    with balancer(backend) as lb:
        s = lb.session()
        stats = lb.stats("users")[backend.address]
        r = s.get("http://users/stream", stream=True)
        assert stats.in_flight == 1 and stats.requests == 0
        assert sum(len(c) for c in r.iter_content(1000)) == 5000
        assert stats.in_flight == 0 and stats.successes == 1
        r2 = s.get("http://users/stream", stream=True)
        assert stats.in_flight == 1
        r2.close()  # closed unread
        assert stats.in_flight == 0 and stats.requests == 2


def test_removed_endpoint_drains_then_its_pool_closes(backend_factory: Factory) -> None:
    a, b = backend_factory("a"), backend_factory("b")
    a.behaviour = backends.streamed(chunks=3, size=100, pause=0.05)
    lb = LoadBalancer.from_config({"services": {"users": {
        "endpoints": [a.address], "strategy": "round_robin"}}})
    with lb:
        s = lb.session()
        r = s.get("http://users/", stream=True)
        lb.registry.register("users", b.address)
        lb.registry.deregister("users", a.address)
        assert ("127.0.0.1", a.port) in lb.pools.endpoints()  # still in flight: kept
        assert len(r.content) == 300  # no ClosedPoolError for the request in flight
        assert ("127.0.0.1", a.port) not in lb.pools.endpoints()
        assert s.get("http://users/").json()["backend"] == "b"


def test_redirect_to_another_host_carries_no_credentials(backend_factory: Factory) -> None:
    other = backend_factory("other")
    service = backend_factory("svc")

    def login_then_redirect(handler: Any, record: dict[str, Any]) -> None:
        if record["path"] == "/login":
            handler.reply(200, b"ok", {"Set-Cookie": "session=secret; Path=/"})
        else:
            handler.reply(302, b"", {"Location": f"http://localhost:{other.port}/landing"})

    service.behaviour = login_then_redirect
    with balancer(service) as lb:
        s = lb.session()
        s.get("http://users/login")
        # cookielib files a dotless host's cookie under "<host>.local": the logical name
        assert [(c.name, c.domain) for c in s.cookies] == [("session", "users.local")]
        r = s.get("http://users/go", auth=("alice", "pw"))
        assert r.json()["backend"] == "other"
    sent_to_service = service.received[-1]["headers"]
    assert "Authorization" in sent_to_service and "session=secret" in sent_to_service["Cookie"]
    landed = other.received[-1]["headers"]
    assert "Authorization" not in landed
    assert "Cookie" not in landed


def outcome(session: requests.Session, url: str, **options: Any) -> tuple[Any, ...]:
    """What a GET ended with: its statuses, final path and body, or its exception's type."""
    try:
        r = session.get(url, **options)
    except requests.exceptions.RequestException as error:
        return ("raised", type(error).__name__)
    return ("answered", [h.status_code for h in r.history], r.status_code,
            urlsplit(r.url).path, r.content if r.is_redirect else r.json()["path"])


@pytest.mark.parametrize("kind", ["bad_gzip", "chunked_cut_off"])
def test_a_redirect_with_a_broken_body_is_followed_as_plain_requests_does(
        backend_factory: Factory, kind: str) -> None:
    backend = backend_factory()
    backend.behaviour = backends.redirect_with_broken_body(kind)
    with balancer(backend) as lb, requests.Session() as plain:
        s = lb.session()
        direct = f"http://127.0.0.1:{backend.port}/start"
        for options in ({}, {"stream": True}):
            expected = outcome(plain, direct, **options)
            assert expected == ("answered", [302], 200, "/target", "/target")  # followed
            assert outcome(s, "http://users/start", **options) == expected
        # Not followed: requests still reads the 3xx body in resolve_redirects (for r.next).
        expected = outcome(plain, direct, allow_redirects=False)
        assert outcome(s, "http://users/start", allow_redirects=False) == expected
        assert lb.stats("users")[backend.address].in_flight == 0
    balanced = [r["path"] for r in backend.received if r["headers"]["Host"] == "users"]
    assert balanced == ["/start", "/target", "/start", "/target", "/start"]  # never retried


def test_environment_proxies_are_bypassed_for_services(
        backend_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backend_factory()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    with balancer(backend) as lb:
        assert lb.session().get("http://users/").status_code == 200


def test_concurrent_requests_through_one_endpoint_overlap(backend_factory: Factory) -> None:
    backend = backend_factory()
    backend.behaviour = backends.slow(0.3)
    with balancer(backend) as lb:
        barrier = threading.Barrier(4)

        def call() -> None:
            s = lb.session()
            barrier.wait()
            s.get("http://users/")

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert backend.requests_count() == 4
    assert backend.max_active == 4  # all four were at the backend at once: nothing serialised


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_backend(factory: Factory, ca: trustme.CA, *names: str) -> Backend:
    cert = ca.issue_cert(*names)
    return factory(tls_context=backends.sni_recording_context(cert))


def test_tls_verifies_the_service_name_and_sends_it_as_sni(
        backend_factory: Factory, ca: trustme.CA, tmp_path: Any) -> None:
    backend = tls_backend(backend_factory, ca, "users")
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with balancer(backend) as lb:
        r = lb.session().get("https://users/secure", verify=str(bundle))
        assert r.status_code == 200 and r.url == "https://users/secure"
    assert backend.received[-1]["sni"] == "users"
    assert backend.received[-1]["headers"]["Host"] == "users"


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_wrong_name_fails_and_verify_false_never_weakens_the_next_request(
        backend_factory: Factory, ca: trustme.CA, tmp_path: Any) -> None:
    backend = tls_backend(backend_factory, ca, "billing")
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with balancer(backend) as lb:
        s = lb.session()
        with pytest.raises(requests.exceptions.SSLError):
            s.get("https://users/", verify=str(bundle))
        assert s.get("https://users/", verify=False).status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            s.get("https://users/", verify=str(bundle))
        with pytest.raises(requests.exceptions.SSLError):
            s.get("https://users/")  # default: the system bundle, which does not know our CA


def test_endpoint_tls_name_and_client_certificate(backend_factory: Factory, ca: trustme.CA,
                                                  tmp_path: Any) -> None:
    server_cert = ca.issue_cert("node-1.internal")
    context = backends.sni_recording_context(server_cert)
    ca.configure_trust(context)
    import ssl
    context.verify_mode = ssl.CERT_REQUIRED  # the server asks for a client certificate
    backend = backend_factory(tls_context=context)
    client = ca.issue_cert("client")
    client_pem = tmp_path / "client.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(client_pem))
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    lb = LoadBalancer.from_config({"services": {"users": {"endpoints": [
        {"address": backend.address, "tls_name": "node-1.internal"}]}}})
    with lb:
        r = lb.session().get("https://users/", verify=str(bundle), cert=str(client_pem))
        assert r.status_code == 200
    assert backend.received[-1]["sni"] == "node-1.internal"


@pytest.mark.parametrize(("hash_key", "make"), [
    ("header:X-User-Id", lambda s, k: s.get("http://users/", headers={"X-User-Id": k})),
    ("cookie:uid", lambda s, k: s.get("http://users/", cookies={"uid": k})),
    ("user_id", None),
])
def test_hash_key_routes_each_key_to_one_endpoint(backend_factory: Factory, hash_key: str,
                                                  make: Any) -> None:
    pool = [backend_factory(f"h{i}") for i in range(4)]
    with balancer(*pool, strategy="consistent_hash", hash_key=hash_key) as lb:
        s = lb.session()
        homes: dict[str, set[str]] = {}
        for _ in range(3):
            for i in range(12):
                key = f"user-{i}"
                if make is None:
                    with tai_lb.context.routing_context(user_id=key):
                        r = s.get("http://users/")
                else:
                    r = make(s, key)
                homes.setdefault(key, set()).add(r.json()["backend"])
        assert all(len(v) == 1 for v in homes.values())  # sticky per key
        assert len({next(iter(v)) for v in homes.values()}) > 1  # yet spread over endpoints


def test_https_pools_never_cross_services_on_one_address(
        backend_factory: Factory, ca: trustme.CA, tmp_path: Any) -> None:
    backend = tls_backend(backend_factory, ca, "users")  # a certificate for users only
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    lb = LoadBalancer.from_config({"services": {"users": {"endpoints": [backend.address]},
                                                "admin": {"endpoints": [backend.address]}}})
    with lb:
        s = lb.session()
        assert s.get("https://users/", verify=str(bundle)).status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            s.get("https://admin/", verify=str(bundle))  # checked against "admin", not reused
    assert [r["sni"] for r in backend.received] == ["users"]


@pytest.mark.parametrize("credentials", ["Proxy-Authorization", "proxy-AUTHORIZATION"])
def test_one_host_header_and_no_proxy_credentials_reach_the_endpoint(
        backend_factory: Factory, credentials: str) -> None:
    backend = backend_factory()
    with balancer(backend) as lb:
        lb.session().get("http://users/", headers={"host": "elsewhere", "X-Kept": "yes",
                                                   credentials: "Basic c2VjcmV0"})
    record = backend.received[-1]
    assert record["host_headers"] == ["users"]
    assert next(iter(record["headers"])) == "Host"  # first, as http.client sends it
    assert {name.lower() for name in record["headers"]} >= {"x-kept", "user-agent"}
    assert "proxy-authorization" not in {name.lower() for name in record["headers"]}


def test_backoff_that_uses_up_the_deadline_ends_cleanly() -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    lb = LoadBalancer.from_config({"services": {"users": {
        "endpoints": dead, "retries": {"deadline": 0.2, "backoff": {"base": 5, "max": 5}}}}})
    with lb:
        with pytest.raises(requests.exceptions.ConnectionError) as caught:
            lb.session().get("http://users/")
        trace = trace_of(caught.value)
        assert trace is not None and "deadline" in trace.attempts[-1].decision
        assert lb.status()["services"]["users"]["in_flight"] == 0


def test_undecodable_body_is_an_error_with_a_trace_and_no_leaked_lease(
        backend_factory: Factory) -> None:
    backend = backend_factory()
    backend.behaviour = backends.bad_gzip
    with balancer(backend) as lb:
        with pytest.raises(requests.exceptions.ContentDecodingError) as caught:
            lb.session().get("http://users/")
        assert trace_of(caught.value) is not None
        stats = lb.stats("users")[backend.address]
        assert (stats.in_flight, stats.failures) == (0, 1)


def test_streamed_body_cut_off_counts_as_a_failure(backend_factory: Factory) -> None:
    backend = backend_factory()
    backend.behaviour = backends.cut_off_body
    with balancer(backend) as lb:
        r = lb.session().get("http://users/", stream=True)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in r.iter_content(100):
                pass
        stats = lb.stats("users")[backend.address]
        assert (stats.in_flight, stats.successes, stats.failures) == (0, 0, 1)


def test_a_failed_request_is_logged_once_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    dead = f"127.0.0.1:{free_port()}"
    lb = LoadBalancer.from_config({"services": {"users": {"endpoints": [dead]}}})
    with lb, caplog.at_level("DEBUG", logger="tai_lb.adapter"), \
            pytest.raises(requests.exceptions.ConnectionError):
        lb.session().get("http://users/")
    traces = [r for r in caplog.records if r.name == "tai_lb.adapter"]
    assert len(traces) == 1 and "users GET /" in traces[0].getMessage()


def test_removing_an_address_from_one_service_keeps_the_others_pools(
        backend_factory: Factory) -> None:
    backend = backend_factory()
    lb = LoadBalancer.from_config({"services": {"users": {"endpoints": [backend.address]},
                                                "admin": {"endpoints": [backend.address]}}})
    with lb:
        s = lb.session()
        s.get("http://admin/")
        lb.registry.deregister("users", backend.address)
        assert ("127.0.0.1", backend.port) in lb.pools.endpoints()
        assert s.get("http://admin/").status_code == 200


def test_pool_wait_is_bounded_by_the_request_timeout(backend_factory: Factory) -> None:
    backend = backend_factory()
    backend.behaviour = backends.slow(0.5)
    with balancer(backend, pool={"maxsize": 1, "timeout": 30}, retries={"attempts": 1}) as lb:
        holder = threading.Thread(target=lambda: lb.session().get("http://users/"))
        holder.start()
        assert wait_for(lambda: backend.active == 1)
        with pytest.raises(HTTPPoolExhausted, match=r"within 0\.1 s"):
            lb.session().get("http://users/", timeout=(0.1, 5))
        holder.join()



def test_unseekable_file_body_is_never_retried(backend_factory: Factory) -> None:
    import os
    bad, good = backend_factory("bad"), backend_factory("good")
    bad.behaviour = backends.reset_connection
    with balancer(bad, good) as lb:
        s = lb.session()
        failures = 0
        for _ in range(2):
            read_end, write_end = os.pipe()
            os.write(write_end, b"streamed upload")
            os.close(write_end)
            with open(read_end, "rb") as body:
                try:
                    s.put("http://users/upload", data=body)  # sent chunked
                except requests.exceptions.ConnectionError as error:
                    failures += 1
                    assert "cannot be sent again" in trace_of(error).attempts[-1].decision  # type: ignore[union-attr]
        assert failures == 1


def test_dropped_unread_stream_gives_back_its_slot_and_lease(backend_factory: Factory) -> None:
    import gc
    backend = backend_factory()
    backend.behaviour = backends.streamed(chunks=4, size=1000)
    with balancer(backend, pool={"maxsize": 2, "timeout": 0.5}) as lb:
        s = lb.session()
        for _ in range(5):
            s.get("http://users/", stream=True)  # dropped at once, never read nor closed
        gc.collect()
        assert lb.stats("users")[backend.address].in_flight == 0
        assert s.get("http://users/").status_code == 200  # no slot was lost


def test_chunked_stream_cut_off_counts_as_a_failure(backend_factory: Factory) -> None:
    backend = backend_factory()
    backend.behaviour = backends.chunked_cut_off
    with balancer(backend) as lb:
        r = lb.session().get("http://users/", stream=True)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in r.iter_content(1):
                pass
        stats = lb.stats("users")[backend.address]
        assert (stats.in_flight, stats.successes, stats.failures) == (0, 0, 1)


def test_deadline_never_turns_a_response_into_a_made_up_timeout(
        backend_factory: Factory) -> None:
    slow503 = [backend_factory(f"u{i}") for i in range(2)]

    def late_503(handler: Any, record: dict[str, Any]) -> None:
        time.sleep(0.2)
        handler.reply(503, b"busy", {})

    for backend in slow503:
        backend.behaviour = late_503
    with balancer(*slow503, retries={"deadline": 0.5, "backoff": {"base": 0.2, "max": 0.2}}) as lb:
        retried = 0
        for _ in range(5):
            try:
                r = lb.session().get("http://users/")
            except requests.exceptions.ReadTimeout as error:
                # Legitimate only if a retry really ran and really timed out at the deadline.
                trace = trace_of(error)
                assert trace is not None and len(trace.attempts) >= 2
                assert "Read timed out" in (trace.attempts[-1].error or "")
                retried += len(trace.attempts) - 1
            else:
                assert r.status_code == 503  # the real answer, never a made-up timeout
                trace = trace_of(r)
                assert trace is not None and trace.attempts[-1].decision.startswith("stop:")
                retried += len(trace.attempts) - 1
        budget = lb.status()["services"]["users"]["retry_budget"]
        assert budget["retries"] == retried  # the budget paid only for retries that ran


def test_missing_ca_bundle_fails_before_sending_like_requests(backend_factory: Factory) -> None:
    backend = backend_factory()
    with balancer(backend) as lb:
        with pytest.raises(OSError, match="Could not find a suitable TLS CA certificate bundle"):
            lb.session().get("https://users/", verify="/nonexistent/ca.pem")
        assert lb.stats("users")[backend.address].requests == 0


def test_closing_a_session_twice_leaves_the_balancer_and_other_sessions_working(
        backend_factory: Factory) -> None:
    backend, plain = backend_factory(), backend_factory("plain")
    with balancer(backend) as lb:
        closing, other = lb.session(), lb.session()
        assert closing.get("http://users/a").status_code == 200
        backend.behaviour = backends.streamed(chunks=3, size=1000)
        streamed = other.get("http://users/stream", stream=True)  # in flight on a shared pool
        closing.close()  # the one adapter is mounted twice: closed twice
        closing.close()
        assert sum(len(c) for c in streamed.iter_content(1000)) == 3000  # not cut under it
        backend.behaviour = backend.ok
        assert lb.session().get("http://users/b").json()["path"] == "/b"
        # As a closed plain requests session, a closed one still works, balanced or not.
        assert closing.get("http://users/c").json()["path"] == "/c"
        assert closing.get(f"http://127.0.0.1:{plain.port}/d").json()["backend"] == "plain"
        assert lb.stats("users")[backend.address].in_flight == 0
        assert not lb.closed


def test_a_closed_balancer_raises_a_requests_error(backend_factory: Factory) -> None:
    backend = backend_factory()
    lb = balancer(backend)
    s = lb.session()
    lb.close()
    with pytest.raises(requests.exceptions.ConnectionError, match="closed"):
        s.get("http://users/")


def test_a_session_pickles_and_keeps_balancing(backend_factory: Factory) -> None:
    import pickle
    a, b = backend_factory(), backend_factory()
    with balancer(a, b, strategy="peak_ewma") as lb:
        copy = pickle.loads(pickle.dumps(lb.session()))
        adapter = copy.get_adapter("http://users/")
        try:
            assert isinstance(adapter, tai_lb.LoadBalancedAdapter)
            assert adapter.balancer is not lb and adapter.balancer.strategy_name("users") == (
                "peak_ewma")
            assert {copy.get("http://users/").json()["backend"] for _ in range(6)} == {"b1", "b2"}
        finally:
            adapter.balancer.close()
