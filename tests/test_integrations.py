"""Flask and Django integrations: real apps (tests/webapps) served by gunicorn ``--preload -w 4
--threads 4``, each request making an outgoing call through the worker's balancer to real backends;
and, in this process, the settings, the per-process balancer and its life across a fork."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import flask
import pytest
import requests

from tai_lb import ConfigError, LoadBalancerError
from tai_lb.context import current
from tai_lb.integrations import WebSettings
from tai_lb.integrations.flask import TaiLB

from .backends import Backend
from .conftest import end_process, in_forked_child, wait_for

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4
APPS = {"flask": "tests.webapps.flask_app:app", "django": "tests.webapps.django_app:application"}


def _backend(name: str) -> Backend:
    """A backend whose ``/health`` answers 503 once ``backend.failing`` is set."""
    backend = Backend(name)
    backend.failing = False  # type: ignore[attr-defined]

    def behaviour(handler: Any, record: dict[str, Any]) -> None:
        if record["path"].startswith("/health") and backend.failing:  # type: ignore[attr-defined]
            handler.reply(503, b"draining")
        else:
            backend.ok(handler, record)

    backend.behaviour = behaviour
    return backend


class Served:
    """An app under gunicorn, with the backends its balancer calls."""

    def __init__(self, url: str, users: list[Backend], keyed: list[Backend],
                 process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.users = users
        self.keyed = keyed
        self.process = process

    def call(self, service: str, headers: Optional[dict[str, str]] = None) -> dict[str, Any]:
        """One request to the app (a new connection, so that every worker takes some)."""
        response = requests.get(f"{self.url}/call/{service}",
                                headers={"Connection": "close", **(headers or {})}, timeout=10)
        assert response.status_code == 200, response.text[:500]
        answer: dict[str, Any] = response.json()
        return answer

    def calls(self, service: str, headers: list[dict[str, str]]) -> list[dict[str, Any]]:
        """One request per item of ``headers``, 16 at a time."""
        with ThreadPoolExecutor(16, thread_name_prefix="test-client") as pool:
            return list(pool.map(lambda h: self.call(service, h), headers))


def _config(users: list[Backend], keyed: list[Backend]) -> dict[str, Any]:
    keyed_endpoints = [b.address for b in keyed]
    return {"services": {
        "users": {"endpoints": [b.address for b in users],
                  "health_check": {"path": "/health", "interval": 0.1, "unhealthy_threshold": 2,
                                   "skip_if_traffic": False}},
        "by_cookie": {"endpoints": keyed_endpoints, "strategy": "consistent_hash",
                      "hash_key": "cookie:session"},
        "by_ip": {"endpoints": keyed_endpoints, "strategy": "consistent_hash",
                  "hash_key": "source_ip"},
        "by_user": {"endpoints": keyed_endpoints, "strategy": "consistent_hash",
                    "hash_key": "user_id"},
        "by_header": {"endpoints": keyed_endpoints, "strategy": "consistent_hash",
                      "hash_key": "header:X-User"},
        "pinned": {"endpoints": keyed_endpoints, "affinity": {"key": "cookie:session"}},
        "pinned_ip": {"endpoints": keyed_endpoints, "affinity": {"key": "source_ip"}},
    }}


@contextlib.contextmanager
def _gunicorn(target: str, config: dict[str, Any]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``target`` served by gunicorn on a socket bound here (no port race); yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    env = {**os.environ, "TAI_LB_TEST_CONFIG": json.dumps(config), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "-w", str(WORKERS), "--threads", "4",
         "--bind", f"fd://{listener.fileno()}", "--graceful-timeout", "5",
         "--log-level", "warning", target],
        cwd=ROOT, env=env, pass_fds=(listener.fileno(),), stderr=subprocess.PIPE)
    listener.close()  # gunicorn has its own copy
    try:
        yield url, process
    finally:
        errors = end_process(process, 15)
    assert process.returncode == 0, f"gunicorn exited with {process.returncode}: {errors}"
    assert "Traceback" not in errors, errors  # no worker failed, at exit included


@pytest.fixture(scope="module", params=sorted(APPS))
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    users = [_backend(f"u{i}") for i in range(1, 4)]
    keyed = [_backend(f"k{i}") for i in range(1, 5)]
    try:
        with _gunicorn(APPS[request.param], _config(users, keyed)) as (url, process):
            def up() -> bool:
                with contextlib.suppress(requests.ConnectionError):
                    return requests.get(f"{url}/lb-status/?format=json", timeout=5).ok
                assert process.poll() is None, process.communicate()[1].decode()[-2000:]
                return False
            assert wait_for(up, timeout=30)
            yield Served(url, users, keyed, process)
    finally:
        for backend in users + keyed:
            backend.stop()


def _echo_count(backend: Backend) -> int:
    with backend.lock:
        return sum(1 for r in backend.received if r["path"] == "/echo")


@pytest.mark.slow  # gunicorn or forked workers: the main run only
def test_2000_requests_then_every_worker_routes_around_a_backend_failing_its_checks(
        served: Served) -> None:
    answers = served.calls("users", [{}] * 2000)  # each asserts a 200
    assert len(answers) == 2000
    pids = {a["pid"] for a in answers}
    assert len(pids) == WORKERS and served.process.pid not in pids
    assert {a["backend"] for a in answers} == {"u1", "u2", "u3"}

    draining = served.users[2]
    draining.failing = True  # type: ignore[attr-defined] - after the fork, in every worker
    recent: dict[int, list[str]] = {pid: [] for pid in pids}

    def every_worker_stopped() -> bool:
        for a in served.calls("users", [{}] * 64):
            recent[a["pid"]] = [*recent[a["pid"]], a["backend"]][-30:]
        return all(len(seen) == 30 and "u3" not in seen for seen in recent.values())

    assert wait_for(every_worker_stopped, timeout=20), recent
    before = _echo_count(draining)
    after = served.calls("users", [{}] * 400)
    assert {a["pid"] for a in after} == pids  # all four workers answered...
    assert Counter(a["backend"] for a in after).keys() == {"u1", "u2"}  # ...and none used u3
    assert _echo_count(draining) == before
    draining.failing = False  # type: ignore[attr-defined]


@pytest.mark.slow  # gunicorn or forked workers: the main run only
@pytest.mark.parametrize(("service", "header"), [
    ("by_cookie", lambda key: {"Cookie": f"session={key}"}),
    ("by_user", lambda key: {"X-Test-User": key}),
    ("by_header", lambda key: {"X-User": key}),
    # the client's own X-Forwarded-For part (left) is forged; the proxy's hop (right) counts
    ("by_ip", lambda key: {"X-Forwarded-For": f"10.{random.randrange(256)}.0.1, "
                                              f"198.51.100.{key[1:]}"}),
])
def test_a_key_from_the_incoming_request_routes_with_no_plumbing(
        served: Served, service: str, header: Any) -> None:
    keys = [f"k{i}" for i in range(1, 25)] * 5
    answers = served.calls(service, [header(k) for k in keys])
    homes: dict[str, set[str]] = {}
    for key, answer in zip(keys, answers):
        homes.setdefault(key, set()).add(answer["backend"])
    assert all(len(v) == 1 for v in homes.values()), homes  # one endpoint per key, every worker
    assert len({next(iter(v)) for v in homes.values()}) > 1  # yet the keys spread
    assert len({a["pid"] for a in answers}) > 1


@pytest.mark.slow  # gunicorn or forked workers: the main run only
@pytest.mark.parametrize(("service", "header"), [
    ("pinned", lambda key: {"Cookie": f"session={key}"}),
    ("pinned_ip", lambda key: {"X-Forwarded-For": f"198.51.100.{key[1:]}"}),
])
def test_affinity_by_an_incoming_cookie_or_address_pins_each_key_in_each_worker(
        served: Served, service: str, header: Any) -> None:
    keys = [f"s{i}" for i in range(1, 13)] * 10
    answers = served.calls(service, [header(k) for k in keys])
    pinned: dict[tuple[int, str], list[str]] = {}
    for key, answer in zip(keys, answers):
        pinned.setdefault((answer["pid"], key), []).append(answer["backend"])
    assert all(len(set(v)) == 1 for v in pinned.values()), pinned
    assert sum(len(v) for v in pinned.values() if len(v) > 1) >= 60  # mostly repeat visits
    assert len({v[0] for v in pinned.values()}) > 1  # round robin spread the first visits


@pytest.mark.slow  # gunicorn or forked workers: the main run only
def test_the_status_page_shows_the_answering_workers_balancer(served: Served) -> None:
    page = requests.get(f"{served.url}/lb-status/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "users" in page.text
    figures = requests.get(f"{served.url}/lb-status/?format=json", timeout=10).json()
    assert set(figures["services"]) == {"users", "by_cookie", "by_ip", "by_user", "by_header",
                                        "pinned", "pinned_ip"}


# -- in this process ----------------------------------------------------------------------------

def _app(**config: Any) -> Any:
    app = flask.Flask("test")
    app.config.update(config)
    return app


def test_settings_are_checked_when_the_app_is_set_up_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^TAI_LB: must be set"):
        TaiLB(_app())
    with pytest.raises(ConfigError, match=r"^TAI_LB\.services\.users\.strategy: "):
        TaiLB(_app(TAI_LB={"services": {"users": {"endpoints": ["h:1"], "strategy": "nope"}}}))
    with pytest.raises(ConfigError, match=r"^TAI_LB_TRUSTED_PROXIES: "):
        TaiLB(_app(TAI_LB={"services": {}}, TAI_LB_TRUSTED_PROXIES=0))
    with pytest.raises(ConfigError, match=r"^TAI_LB_TRUSTED_PROXY_HEADER: "):
        TaiLB(_app(TAI_LB={"services": {}}, TAI_LB_TRUSTED_PROXY_HEADER="X Forwarded"))
    with pytest.raises(ConfigError, match=r"^TAI_LB_USER_ID: "):
        TaiLB(_app(TAI_LB={"services": {}}, TAI_LB_USER_ID="g.user"))
    with pytest.raises(ConfigError, match=r"^refresh: "):
        TaiLB(_app(TAI_LB={"services": {}})).mount_status("/s", refresh=-1)


@pytest.mark.parametrize(("header", "proxies", "expected"), [
    (None, 1, "192.0.2.1"),  # no trusted header: the peer
    ("203.0.113.5", 1, "203.0.113.5"),
    ("10.0.0.1, 203.0.113.5", 1, "203.0.113.5"),  # the right hop: the left is the client's word
    ("203.0.113.5, 10.0.0.9", 2, "203.0.113.5"),  # two proxies of ours
    ("203.0.113.5", 2, "192.0.2.1"),  # fewer hops than proxies: the peer
    ("not-an-ip", 1, "192.0.2.1"),
    ("2001:db8::1", 1, "2001:db8::1"),
])
def test_the_client_is_the_trusted_hop_of_the_proxy_header(
        header: Optional[str], proxies: int, expected: str) -> None:
    settings = WebSettings("X-Forwarded-For", proxies)
    got = settings.client_ip("192.0.2.1", {"X-Forwarded-For": header}.get)
    assert got == expected
    assert WebSettings().client_ip("192.0.2.1", {"X-Forwarded-For": "203.0.113.5"}.get) == (
        "192.0.2.1")  # no header configured: never read


def test_the_balancer_is_made_on_first_use_and_a_forked_child_makes_its_own() -> None:
    backend = _backend("f1")
    app = _app(TAI_LB={"services": {"users": {
        "endpoints": [backend.address], "health_check": {"path": "/health", "interval": 0.1}}}})
    ext = TaiLB(app)
    ext.mount_status("/lb-status")
    try:
        assert app.extensions["tai_lb"] is ext
        assert not ext._state().process.created  # set up and mounted: nothing made yet
        parent = ext.balancer
        assert ext.balancer is parent and parent.health_checker.running

        def child() -> dict[str, Any]:
            inherited_running = parent.health_checker.running  # the fork restarted its threads
            mine = ext.balancer
            return {"new": mine is not parent, "inherited_closed": parent.closed,
                    "inherited_running": inherited_running,
                    "inherited_stopped": not parent.health_checker.running,
                    "answer": ext.session().get("http://users/echo").json()["backend"]}

        report = in_forked_child(child, timeout=30)
        assert report == {"new": True, "inherited_closed": True, "inherited_running": True,
                          "inherited_stopped": True, "answer": "f1"}
        assert not parent.closed  # the parent's own is untouched
        with app.test_client() as client:
            figures = client.get("/lb-status?format=json").get_json()
        assert list(figures["services"]) == ["users"]
    finally:
        ext.close()
        backend.stop()
    assert parent.closed and not parent.health_checker.running
    with pytest.raises(LoadBalancerError, match="closed"):
        ext.balancer  # noqa: B018 - the property raises


def test_the_flask_context_lives_for_the_request_and_reads_it_only_when_asked() -> None:
    looked_up: list[str] = []

    def user_id(request: Any) -> Optional[str]:
        looked_up.append(request.path)
        return request.args.get("u")  # type: ignore[no-any-return]

    app = _app(TAI_LB={"services": {}}, TAI_LB_USER_ID=user_id,
               TAI_LB_TRUSTED_PROXY_HEADER="X-Forwarded-For")
    ext = TaiLB(app)
    seen: list[Any] = []

    @app.get("/keys")
    def keys() -> str:
        ctx = current()
        seen.append((ctx.source(), ctx.cookie("session"), ctx.header("x-test"), ctx.user()))
        return "ok"

    @app.get("/none")
    def none() -> str:
        return "ok"

    try:
        with app.test_client() as client:
            client.set_cookie("session", "abc")
            client.get("/none?u=1")
            client.get("/keys?u=42", headers={"X-Test": "yes", "X-Forwarded-For": "203.0.113.8"},
                       environ_base={"REMOTE_ADDR": "198.51.100.4"})
            client.get("/keys", environ_base={"REMOTE_ADDR": "198.51.100.4"})
        assert seen == [("203.0.113.8", "abc", "yes", "42"), ("198.51.100.4", "abc", None, None)]
        assert looked_up == ["/keys", "/keys"]  # never for the request that needed no key
        assert current().source() is None  # reset after the request
    finally:
        ext.close()


def test_an_extension_made_first_and_set_up_later_serves_the_app_as_its_balancer() -> None:
    # The app factory pattern: TaiLB() at import, init_app(app) in the factory; SPEC: "the
    # balancer at app.extensions['tai_lb']".
    backend = _backend("f2")
    ext = TaiLB()
    app = _app(TAI_LB={"services": {"users": {"endpoints": [backend.address]}}})
    ext.init_app(app)
    seen: list[Any] = []

    @app.get("/call")
    def call() -> str:
        seen.append(current().header("x-test"))
        lb = flask.current_app.extensions["tai_lb"]
        with lb.pick("users") as lease:  # the balancer's own API, through the extension
            seen.append(lease.address)
        seen.append(list(lb.status()["services"]))
        return ext.session().get("http://users/echo").json()["backend"]  # type: ignore[no-any-return]

    try:
        with app.test_client() as client:
            answer = client.get("/call", headers={"X-Test": "yes"}).get_data(as_text=True)
        assert answer == "f2"
        assert seen == ["yes", backend.address, ["users"]]
        with app.app_context():
            assert app.extensions["tai_lb"].route("users") is ext.balancer.route("users")
        with pytest.raises(AttributeError):
            app.extensions["tai_lb"]._services  # noqa: B018 - private names are not passed on
    finally:
        ext.close(app)  # no app of its own: which app's balancer is said
        backend.stop()


_DJANGO_SETUP = """
import json, sys
from django.conf import settings
settings.configure(TAI_LB=json.loads(sys.argv[1]), TAI_LB_TRUSTED_PROXIES=int(sys.argv[2]))
import django
django.setup()
from tai_lb import ConfigError
from tai_lb.integrations import django as integration
try:
    middleware = integration.RoutingContextMiddleware(lambda request: None)
except ConfigError as error:
    print(json.dumps({"error": str(error)}))
else:
    made_by_middleware = integration._process.created
    lb = integration.balancer()
    same = lb is integration.balancer()
    print(json.dumps({"made_by_middleware": made_by_middleware, "same": same,
                      "services": list(lb.registry.services())}))
"""


@pytest.mark.parametrize(("config", "proxies", "expected"), [
    ({"services": {"users": {"endpoints": ["h:1"]}}}, 1,
     {"made_by_middleware": False, "same": True, "services": ["users"]}),
    ({"services": {"users": {"endpoints": ["h:1"], "strategy": "nope"}}}, 1,
     {"error": "TAI_LB.services.users.strategy: "}),
    ({"services": {}}, 0, {"error": "TAI_LB_TRUSTED_PROXIES: "}),
])
def test_django_settings_are_checked_when_the_middleware_loads(
        config: dict[str, Any], proxies: int, expected: dict[str, Any]) -> None:
    run = subprocess.run([sys.executable, "-c", _DJANGO_SETUP, json.dumps(config), str(proxies)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(run.stdout)
    if "error" in expected:
        assert report["error"].startswith(expected["error"]), report
    else:
        assert report == expected
