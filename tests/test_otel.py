"""OpenTelemetry (tai_lb.otel): each attempt of a balanced request is a child span of the
current span, exported by the SDK's in-memory exporter; real backends on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tai_lb import LoadBalancer

from .backends import Backend
from .backends import status as backend_status

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The exporter of the process's tracer provider (set once: OpenTelemetry allows one)."""
    provider = trace.get_tracer_provider()
    if not getattr(provider, "_tai_lb_test", False):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._tai_lb_test = True  # type: ignore[attr-defined]
        trace.set_tracer_provider(provider)
    assert getattr(trace.get_tracer_provider(), "_tai_lb_test", False)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def attempts_of(exporter: InMemorySpanExporter, parent: Any) -> list[Any]:
    """The attempt spans under ``parent``, in the order they started."""
    children = [span for span in exporter.get_finished_spans()
                if span.parent is not None and span.parent.span_id == parent.context.span_id]
    return sorted(children, key=lambda span: span.start_time)


def test_a_retried_request_shows_both_attempts_in_order(spans: InMemorySpanExporter) -> None:
    flaky, good = Backend("flaky"), Backend("good")
    flaky.behaviour = backend_status(503)
    tracer = trace.get_tracer("test")
    try:
        with LoadBalancer.from_config({"services": {"users": {
                "endpoints": [flaky.address, good.address], "strategy": "round_robin"}}}) as lb:
            session = lb.session()
            retried, singles = [], []
            for _ in range(8):  # until one request started on flaky and one on good
                with tracer.start_as_current_span("handle") as parent:
                    response = session.get("http://users/x")
                assert response.status_code == 200
                attempts = attempts_of(spans, parent)
                assert len(attempts) == len(response.lb_trace.attempts)
                (retried if len(attempts) == 2 else singles).append((parent, attempts))
                if retried and singles:
                    break
                if not singles:  # every request took two picks: one more shifts round robin
                    with lb.pick("users"):
                        pass
            assert retried and singles
            parent, (first, second) = retried[0]
            assert first.name == second.name == "GET"
            assert first.kind == second.kind == trace.SpanKind.CLIENT
            assert first.end_time <= second.start_time
            assert first.context.trace_id == second.context.trace_id == parent.context.trace_id
            assert dict(first.attributes) == {
                "tai_lb.service": "users", "tai_lb.endpoint": flaky.address,
                "tai_lb.attempt": 1, "http.request.method": "GET",
                "server.address": "127.0.0.1", "server.port": flaky.port,
                "tai_lb.pick_reason": "picked by round_robin", "tai_lb.outcome": "response",
                "tai_lb.decision": "retry: status 503", "tai_lb.retry_reason": "status 503",
                "http.response.status_code": 503, "error.type": "503"}
            assert first.status.status_code == trace.StatusCode.ERROR
            assert dict(second.attributes) == {
                "tai_lb.service": "users", "tai_lb.endpoint": good.address,
                "tai_lb.attempt": 2, "http.request.method": "GET",
                "server.address": "127.0.0.1", "server.port": good.port,
                "http.request.resend_count": 1,
                "tai_lb.pick_reason": "picked by round_robin, excluding 1 tried",
                "tai_lb.outcome": "response", "tai_lb.decision": "done",
                "http.response.status_code": 200}
            assert second.status.status_code == trace.StatusCode.UNSET
            # a request with one attempt has one span, with no resend count
            single = singles[0][1]
            assert len(single) == 1 and "http.request.resend_count" not in single[0].attributes
            assert single[0].attributes["tai_lb.endpoint"] == good.address
            assert single[0].attributes["tai_lb.decision"] == "done"
    finally:
        flaky.stop()
        good.stop()


def test_connection_errors_are_recorded_with_their_type(spans: InMemorySpanExporter) -> None:
    dead = Backend("dead")
    dead.stop()  # connections to its port are refused
    tracer = trace.get_tracer("test")
    lb = LoadBalancer.from_config({"services": {"users": {
        "endpoints": [dead.address], "retries": {"attempts": 2}}}})
    with lb, tracer.start_as_current_span("handle") as parent, pytest.raises(
            requests.ConnectionError) as caught:
        lb.session().get("http://users/x")
    attempts = attempts_of(spans, parent)
    assert [span.attributes["tai_lb.attempt"] for span in attempts] == [1, 2]
    first, last = attempts
    assert first.attributes["tai_lb.retry_reason"] == "not sent"
    assert first.attributes["error.type"] == last.attributes["error.type"] == (
        type(caught.value).__name__)
    assert last.attributes["tai_lb.decision"] == "stop: no attempts left"
    assert "tai_lb.retry_reason" not in last.attributes
    assert last.status.status_code == trace.StatusCode.ERROR


def test_no_span_is_made_outside_a_recording_span(spans: InMemorySpanExporter) -> None:
    backend = Backend("one")
    try:
        with LoadBalancer.from_config({"services": {"users": {
                "endpoints": [backend.address]}}}) as lb:
            assert lb.session().get("http://users/x").status_code == 200  # no span current
            assert spans.get_finished_spans() == ()
            with trace.get_tracer("test").start_as_current_span("handle"):
                assert lb.session().get("http://users/x").status_code == 200
            assert [span.name for span in spans.get_finished_spans()] == ["GET", "handle"]
    finally:
        backend.stop()


def test_without_opentelemetry_nothing_is_recorded() -> None:
    """With opentelemetry not importable, the tracer is None and requests work as before."""
    script = """
import sys
sys.modules["opentelemetry"] = None  # an import of it raises ImportError
import tai_lb, tai_lb.attempts, tai_lb.otel
from tests.backends import Backend
assert tai_lb.otel.TRACER is None and tai_lb.attempts.TRACER is None
backend = Backend("one")
config = {"services": {"users": {"endpoints": [backend.address]}}}
with tai_lb.LoadBalancer.from_config(config) as lb:
    assert lb.session().get("http://users/x").status_code == 200
backend.stop()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
