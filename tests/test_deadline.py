"""``retries.deadline`` bounds the whole request, whatever the server does, against real servers.

Each backend here trickles its response: every wait for data is far shorter than the read
timeout, so before the deadline was enforced on every socket read these requests ran until the
server was done (3 s and more), and then succeeded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import trustme
import urllib3

from tai_lb import LoadBalancer, trace_of

from .backends import Factory, Trickle, balancer, sni_recording_context
from .conftest import wait_for

TIMEOUT = (1, 2)  # each wait for data is at most 0.05 s: the read timeout never fires
SLOW = 60  # bytes trickled 0.05 s apart: 3 s for the whole response


def assert_cut_at_the_deadline(trickle: Trickle, lb: LoadBalancer, *addresses: str) -> None:
    """The server saw its connection closed before the end, and no lease stayed open."""
    assert wait_for(trickle.cut.is_set, timeout=5)  # closed, not given back to the pool
    assert not trickle.finished.is_set()
    stats = lb.stats("users")
    assert sum(stats[address].in_flight for address in addresses) == 0
    assert sum(stats[address].failures for address in addresses) == 1


@pytest.mark.parametrize("where", ["status", "body", "chunked"])
def test_a_trickling_response_ends_at_the_deadline_without_a_retry(
        backend_factory: Factory, where: str) -> None:
    a, b = backend_factory(), backend_factory()
    trickle = Trickle(where, size=SLOW)
    a.behaviour = b.behaviour = trickle
    with balancer(a, b, retries={"deadline": 0.5}) as lb:
        with pytest.raises((requests.exceptions.Timeout,
                            requests.exceptions.ConnectionError)) as caught:
            lb.session().get("http://users/", timeout=TIMEOUT)
        trace = trace_of(caught.value)
        assert trace is not None and len(trace.attempts) == 1, trace
        assert "deadline" in trace.attempts[0].decision
        assert_cut_at_the_deadline(trickle, lb, a.address, b.address)


def test_a_streamed_body_read_after_send_ends_at_the_deadline(backend_factory: Factory) -> None:
    backend = backend_factory()
    trickle = Trickle("body", size=SLOW)
    backend.behaviour = trickle
    with balancer(backend, retries={"deadline": 0.5}) as lb:
        with lb.session().get("http://users/", stream=True, timeout=TIMEOUT) as r:
            assert r.status_code == 200  # the headers came at once
            with pytest.raises(requests.exceptions.ConnectionError):
                for _ in r.iter_content(1):
                    pass
        assert_cut_at_the_deadline(trickle, lb, backend.address)


def test_a_streamed_body_read_raw_ends_at_the_deadline(backend_factory: Factory) -> None:
    backend = backend_factory()
    trickle = Trickle("chunked", size=SLOW)
    backend.behaviour = trickle
    with balancer(backend, retries={"deadline": 0.5}) as lb:
        r = lb.session().get("http://users/", stream=True, timeout=TIMEOUT)
        with r, pytest.raises(urllib3.exceptions.ReadTimeoutError):  # as plain requests' raw
            r.raw.read()
        assert_cut_at_the_deadline(trickle, lb, backend.address)


def test_the_connection_cut_at_the_deadline_is_not_reused(backend_factory: Factory) -> None:
    backend = backend_factory()
    trickle = Trickle("body", size=SLOW)
    with balancer(backend, retries={"deadline": 0.5}) as lb:
        s = lb.session()
        assert s.get("http://users/first").status_code == 200  # one pooled connection
        backend.behaviour = trickle
        with pytest.raises(requests.exceptions.ConnectionError):
            s.get("http://users/", timeout=TIMEOUT)
        backend.behaviour = backend.ok
        assert s.get("http://users/after").json()["path"] == "/after"
        assert wait_for(trickle.cut.is_set, timeout=5)
        # The next request went out on a new connection and was answered in full.
        assert lb.stats("users")[backend.address].in_flight == 0


def test_a_trickling_https_response_ends_at_the_deadline(backend_factory: Factory,
                                                         tmp_path: Path) -> None:
    # The issue's target over TLS (DeadlineHTTPSConnection): an 80-byte body at 4 bytes a second
    # would take 20 s; a 1 s deadline cuts it before the body is all sent (checked below).  A
    # wait of 0.25 s is under any read timeout the deadline sets (1 s at the start): at a byte a
    # second, the read timeout alone would end the request at the first byte.
    ca = trustme.CA()
    backend = backend_factory(tls_context=sni_recording_context(ca.issue_cert("users")))
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    trickle = Trickle("body", size=80, interval=0.25)
    backend.behaviour = trickle
    with balancer(backend, retries={"deadline": 1}) as lb:
        with pytest.raises((requests.exceptions.Timeout,
                            requests.exceptions.ConnectionError)) as caught:
            lb.session().get("https://users/", timeout=TIMEOUT, verify=str(bundle))
        assert backend.received[-1]["sni"] == "users"  # it went over TLS
        trace = trace_of(caught.value)
        assert trace is not None and len(trace.attempts) == 1, trace
        assert "deadline" in trace.attempts[0].decision
        assert_cut_at_the_deadline(trickle, lb, backend.address)


def test_without_a_deadline_a_trickling_response_is_read_to_the_end(
        backend_factory: Factory) -> None:
    backend = backend_factory()
    trickle = Trickle("chunked", size=4, interval=0.02)
    backend.behaviour = trickle
    with balancer(backend) as lb:
        r = lb.session().get("http://users/", timeout=TIMEOUT)
        assert r.content == b"tttt"
        # The server thread marks the end just after its last send, maybe after the client read it.
        assert wait_for(trickle.finished.is_set, timeout=5) and not trickle.cut.is_set()



class SlowReader:
    """A raw server on 127.0.0.1 that reads each request 64 KiB at a time, 0.02 s apart."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="test-slow-reader", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self.listener.accept()
            with client:
                while not self.stopped.wait(0.02):
                    data = client.recv(65536)
                    if not data:
                        return
                    if data.endswith(b"0\r\n\r\n"):  # the last chunk: the whole body came
                        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        return

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.thread.join(5)


def test_a_slowly_read_upload_ends_at_the_deadline() -> None:
    server = SlowReader()
    chunks = 256
    sent = []

    def body() -> Iterator[bytes]:  # 16 MiB: each send is quick, the whole upload takes 5 s
        for number in range(chunks):
            sent.append(number)
            yield b"u" * 65536

    try:
        config = {"services": {"users": {"endpoints": [server.address],
                                         "retries": {"deadline": 0.5}}}}
        with LoadBalancer.from_config(config) as lb:
            with pytest.raises(requests.exceptions.ConnectionError) as caught:
                lb.session().post("http://users/upload", data=body(), timeout=TIMEOUT)
            trace = trace_of(caught.value)
            assert trace is not None and len(trace.attempts) == 1
            assert len(sent) < chunks  # the upload stopped at the deadline, not at its end
            assert lb.stats("users")[server.address].in_flight == 0
    finally:
        server.stop()
