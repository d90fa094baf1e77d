"""OpenTelemetry: every attempt of a balanced HTTP request as a child span of the current span.

When ``opentelemetry-api`` is importable (the ``otel`` extra), each attempt the HTTP path makes
(:mod:`tai_lb.attempts`) is a span of kind ``CLIENT``, named after the method, child of the span
current when the request was sent (the one ``opentelemetry-instrumentation-requests`` opens for
``session.get()``, say, or the application's own).  A child span per attempt, rather than an
event per attempt on the current span, is what OpenTelemetry's HTTP semantic conventions ask of
a client that resends a request itself: each physical request is its own client span, a resend
carries ``http.request.resend_count``, so a trace shows how long each attempt took and where it
went, and what an instrumented transport records under it nests inside the right attempt.
Attempts are recorded only inside a recording span (a trace being sampled): with no span
current, or without an SDK (a tracer provider), the attempt loop makes no span at all, so an
untraced request pays one ``get_current_span()`` per attempt.

Attributes of each attempt's span:

==============================  ===================================================================
``tai_lb.service``              the service
``tai_lb.endpoint``             the endpoint's address (``host:port``)
``tai_lb.attempt``              the attempt's number, from 1
``tai_lb.pick_reason``          why this endpoint (``picked by round_robin, excluding 1 tried``)
``tai_lb.outcome``              ``response`` or ``error``
``tai_lb.decision``             what came next: ``done``, ``retry: <why>`` or ``stop: <why>``
``tai_lb.retry_reason``         for an attempt that was retried, why: ``status 503``, ``not sent``
                                (no connection), ``sent`` (failed after sending)
``http.request.method``         the method
``server.address``              the endpoint's host, and ``server.port`` its port
``http.request.resend_count``   on a resend, how many attempts came before it
``http.response.status_code``   the status, when a response came back
``error.type``                  the exception's class name, or the status for a 5xx or retried
                                status; the span's status is then ``ERROR``
==============================  ===================================================================

When OpenTelemetry is not installed, :data:`TRACER` is None and the attempt loop checks that
and nothing else: no cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .lease import Lease
    from .trace import Attempt

__all__ = ["TRACER", "end_attempt", "start_attempt"]

try:
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
except ImportError:  # the otel extra is not installed: nothing is recorded, nothing is paid
    _context = _trace = None  # type: ignore[assignment]

TRACER: Any = None if _trace is None else _trace.get_tracer("tai_lb")
"""The tracer of the attempts' spans (a proxy that follows the tracer provider set later), or
None when ``opentelemetry-api`` is not importable."""


def start_attempt(method: str, service: str, number: int,
                  lease: Lease) -> Optional[tuple[Any, Any]]:
    """Open the span of attempt ``number`` (from 1) of a ``method`` request to ``lease``'s
    endpoint, a child of the current span, and make it current; :func:`end_attempt` ends it.
    Returns the span and the token that restores the context before it, or None when no
    recording span is current (no trace to record the attempt in)."""
    if not _trace.get_current_span().is_recording():
        return None
    endpoint = lease.endpoint
    attributes: dict[str, Any] = {
        "tai_lb.service": service, "tai_lb.endpoint": endpoint.address,
        "tai_lb.attempt": number, "http.request.method": method,
        "server.address": endpoint.host, "server.port": endpoint.port}
    if number > 1:
        attributes["http.request.resend_count"] = number - 1
    span = TRACER.start_span(method, kind=_trace.SpanKind.CLIENT, attributes=attributes)
    return span, _context.attach(_trace.set_span_in_context(span))


def end_attempt(opened: tuple[Any, Any], record: Attempt) -> None:
    """Set what attempt ``record`` came to on the span :func:`start_attempt` ``opened``, end
    it and restore the context."""
    span, token = opened
    try:
        if span.is_recording():
            decision = record.decision
            span.set_attribute("tai_lb.pick_reason", record.reason)
            span.set_attribute("tai_lb.outcome", record.outcome)
            span.set_attribute("tai_lb.decision", decision)
            if decision.startswith("retry: "):
                span.set_attribute("tai_lb.retry_reason", decision[len("retry: "):])
            failed_status = record.status is not None and (
                record.status >= 500 or decision.startswith("retry: "))
            if record.status is not None:
                span.set_attribute("http.response.status_code", record.status)
            if record.outcome == "error" or failed_status:
                kind = (str(record.status) if failed_status else
                        (record.error or "_OTHER").partition(":")[0])
                span.set_attribute("error.type", kind)
                span.set_status(_trace.Status(_trace.StatusCode.ERROR, record.error))
    finally:
        span.end()
        _context.detach(token)
