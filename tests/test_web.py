"""The status page (tai_lb.web): served by wsgiref on 127.0.0.1 for a balancer of real backends,
read over HTTP and in a real headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import socketserver
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import requests
from selenium import webdriver
from werkzeug.middleware import dispatcher

import tai_lb
from tai_lb.web import render_html, status_app

from .backends import Backend
from .conftest import wait_for

HOSTILE = "<script>window.hostile = 1</script>"


class _Handler(WSGIRequestHandler):
    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


@pytest.fixture
def balancer() -> Iterator[tuple[tai_lb.LoadBalancer, list[Backend]]]:
    """Two live backends (one with a hostile label) and a backup whose backend has stopped."""
    live, other, dead = Backend("live"), Backend("other"), Backend("dead")
    dead.stop()
    lb = tai_lb.LoadBalancer.from_config({"services": {"users": {
        "endpoints": [{"address": live.address, "zone": "z1", "labels": {"team": HOSTILE}},
                      {"address": other.address, "zone": "z2", "weight": 3}],
        "backups": [dead.address],
        "strategy": "peak_ewma",
        "health_check": {"path": "/", "interval": 0.05},
        "circuit_breaker": {"fail_max": 3},
    }}})
    try:
        session = lb.session()
        for _ in range(6):
            assert session.get("http://users/x").status_code == 200
        assert wait_for(lambda: {e["health"] for e in
                                 lb.status()["services"]["users"]["endpoints"].values()}
                        == {"healthy", "unhealthy"})
        yield lb, [live, other, dead]
    finally:
        lb.close()
        live.stop()
        other.stop()


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    """``app`` served by wsgiref on 127.0.0.1, on a port of its own; yields the base URL."""
    server = make_server("127.0.0.1", 0, app, server_class=_Server, handler_class=_Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-status-page", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)


@pytest.fixture
def served(balancer: tuple[tai_lb.LoadBalancer, list[Backend]]) -> Iterator[str]:
    """The status page of ``balancer`` (reloading every second); its base URL."""
    with _serve(status_app(balancer[0], refresh=1)) as url:
        yield url


def _shape(value: Any) -> Any:
    """The structure of a JSON value: dict keys kept, leaves replaced by their type's name."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return "list"
    return type(value).__name__ if value is not None else None


def test_html_has_every_endpoint_row_and_state(
        balancer: tuple[tai_lb.LoadBalancer, list[Backend]], served: str) -> None:
    lb, (live, other, dead) = balancer
    response = requests.get(served + "/", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    page = response.text
    assert '<meta http-equiv="refresh" content="1">' in page
    assert page.count('<tr class="endpoint ') == 3
    assert '<tr class="endpoint healthy"><td title="team=' in page
    for backend, health in ((live, "healthy"), (other, "healthy"), (dead, "unhealthy")):
        row = page.split(f">{backend.address}</td>", 1)[1].split("</tr>", 1)[0]
        assert f'<td class="health">{health}</td>' in row
        assert "<td>closed</td>" in row  # the breaker
    live_row = page.split(f">{live.address}</td>", 1)[1].split("</tr>", 1)[0]
    requests_served = lb.status()["services"]["users"]["endpoints"][live.address]["requests"]
    assert f'<td class="num">{requests_served}</td>' in live_row and requests_served > 0
    p99 = lb.status()["services"]["users"]["endpoints"][live.address]["p99_ms"]
    assert p99 is not None and p99 > 0
    # the p99 figure sits in the column the header names
    cells = live_row.split("</td>")
    header = page.split("<thead><tr>", 1)[1].split("</tr>", 1)[0].split("</th>")
    assert header.index("<th>p99 ms") - 1 == next(  # live_row starts after the address
        i for i, cell in enumerate(cells) if cell.endswith(f'<td class="num">{p99}'))
    service = lb.status()["services"]["users"]
    assert f"requests <b>{service['requests']}</b>" in page
    assert f"errors <b>{service['errors']}</b>" in page
    assert f"p99 <b>{service['p99_ms']} ms</b>" in page  # health checks are not requests
    assert "p99 <b>-</b>" in render_html({"services": {"idle": {"endpoints": {}}}})
    assert "strategy <b>peak_ewma</b>" in page and "panic <b>no</b>" in page
    assert "active priority <b>0</b>" in page and "No failover yet." in page
    assert "<script" not in page and "<link" in page  # no script at all, the icon is inline


def test_hostile_label_is_escaped(
        balancer: tuple[tai_lb.LoadBalancer, list[Backend]], served: str) -> None:
    page = requests.get(served, timeout=5).text
    assert HOSTILE not in page
    assert "team=&lt;script&gt;window.hostile = 1&lt;/script&gt;" in page


def test_json_parses_and_has_the_structure_of_status(
        balancer: tuple[tai_lb.LoadBalancer, list[Backend]], served: str) -> None:
    lb = balancer[0]
    response = requests.get(served + "/?format=json", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    data = response.json()
    assert _shape(data) == _shape(json.loads(json.dumps(lb.status())))
    assert data["services"]["users"]["endpoints"].keys() == lb.stats("users").keys()
    labels = [e.get("labels") for e in data["services"]["users"]["endpoints"].values()]
    assert {"team": HOSTILE} in labels  # JSON carries the data as it is


def test_head_other_methods_and_paths(served: str) -> None:
    head = requests.head(served + "/", timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) > 0
    for method in ("POST", "PUT", "DELETE"):
        refused = requests.request(method, served + "/", timeout=5)
        assert refused.status_code == 405
        assert refused.headers["Allow"] == "GET, HEAD"
    assert requests.get(served + "/other", timeout=5).status_code == 404
    assert requests.get(served + "/?format=xml", timeout=5).status_code == 400


def test_closed_balancer_no_refresh_and_bad_refresh(
        balancer: tuple[tai_lb.LoadBalancer, list[Backend]]) -> None:
    lb = balancer[0]
    app = status_app(lb, refresh=0)
    assert b"http-equiv" not in app.render()[2]
    lb.close()
    code, _, body = app.render()
    assert code == 200 and b"balancer closed" in body
    for bad in (-1, "5", True, 1e9):
        with pytest.raises(tai_lb.ConfigError, match=r"^refresh: "):
            status_app(lb, refresh=bad)  # type: ignore[arg-type]


def test_failover_events_newest_first_and_escaped() -> None:
    events = [{"service": "users", "kind": "failover", "from_priority": 0, "to_priority": 1,
               "usable_shares": [0.2, 1.0], "at": 10.0},
              {"service": HOSTILE, "kind": "failback", "from_priority": 1, "to_priority": 0,
               "usable_shares": [1.0, 1.0], "at": 20.0}]
    page = render_html({"services": {}, "failover_events": events})
    table = page.split('<table class="events">', 1)[1]
    assert table.index("failback") < table.index("failover")
    assert "<td>0 -&gt; 1</td>" in table and HOSTILE not in page


def test_rebalancing_events_are_listed_under_their_service_newest_first() -> None:
    clock_events = [{"at": 1.0, "kind": "added", "addresses": ["10.0.0.9:80"], "count": 1},
                    {"at": 2.0, "kind": "drain_began", "address": HOSTILE, "in_flight": 2,
                     "timeout": 30.0}]
    page = render_html({"services": {"users": {
        "endpoints": {}, "events": clock_events,
        "rebalance": {"mode": "gradual", "ramping": 1, "held": 0}}}})
    section = page.split('<section class="service" id="service-users">', 1)[1]
    table = section.split('<table class="changes">', 1)[1]
    assert table.index("drain_began") < table.index("added")
    assert "in_flight=2" in table and "count=1" in table and HOSTILE not in page
    assert "rebalance <b>gradual</b> (ramping 1, held 0)" in section


def test_mounts_in_a_wsgi_dispatcher(
        balancer: tuple[tai_lb.LoadBalancer, list[Backend]]) -> None:

    def main_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"main"]

    app = dispatcher.DispatcherMiddleware(main_app, {"/lb-status": status_app(balancer[0])})
    with _serve(app) as url:
        assert requests.get(url + "/", timeout=5).text == "main"
        page = requests.get(url + "/lb-status/", timeout=5)
        assert page.status_code == 200 and page.text.count('<tr class="endpoint ') == 3
        data = requests.get(url + "/lb-status?format=json", timeout=5).json()
        assert data["services"]["users"]["strategy"] == "peak_ewma"
        assert requests.get(url + "/lb-status/other", timeout=5).status_code == 404


# -- a real headless browser --------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered rows of an 8-bit RGB(A) PNG, decoded with zlib only."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, header = 8, b"", b""
    while position < len(png):
        length, kind = struct.unpack(">I4s", png[position:position + 8])
        data = png[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = data
        elif kind == b"IDAT":
            idat += data
        position += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6)
    step = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * step
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind_, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - step] if i >= step else 0
            up, corner = previous[i], previous[i - step] if i >= step else 0
            if kind_ == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind_ == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind_ == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind_ == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else
                                      up if pb <= pc else corner)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        # The test command installs them: in CI their absence is a failure, never a skip.
        missing = "Debian's chromium and chromium-driver are not installed"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1000,700",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


def test_page_renders_in_headless_chromium(
        balancer: tuple[tai_lb.LoadBalancer, list[Backend]], served: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    backends = balancer[1]
    browser.get(served + "/")
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.endpoint")
    assert len(rows) == 3
    addresses = {row.find_elements(By.TAG_NAME, "td")[0].text for row in rows}
    assert addresses == {backend.address for backend in backends}
    table = browser.find_element(By.CSS_SELECTOR, "section.service table")
    assert table.size["width"] > 300 and table.size["height"] > 3 * 10
    assert browser.execute_script("return window.hostile === undefined")  # the label did not run
    width, height, pixels = _png_pixels(browser.get_screenshot_as_png())
    assert width > 0 and height > 0 and len(pixels) == height
    assert len(set(pixels)) > 10  # many different rows: text and table, not a blank page
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    # The page reloads itself (refresh=1): the browser fetches it again with no script.
    browser.execute_script("window.before_reload = 1")
    assert wait_for(lambda: browser.execute_script("return window.before_reload") is None,
                    timeout=10)
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.endpoint")) == 3
