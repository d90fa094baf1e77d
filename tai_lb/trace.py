"""The decision trace: what the balancer did for one request, attempt by attempt.

Every response of a balanced request carries one as ``response.lb_trace``; when every attempt
fails, the exception raised carries it as ``error.lb_trace``.  :func:`trace_of` finds it on
either.  ``str(trace)`` gives one line per attempt, for logs::

    users GET /api/users/42: 2 attempts, 0.013 s, budget 99 retries left
      1. 127.0.0.1:8001 (picked by peak_ewma) -> ConnectionError: <urllib3's message, which
         names the refused connection>; retry: not sent
      2. 127.0.0.1:8002 (picked by peak_ewma, excluding 1 tried) -> 200 in 0.004 s
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Attempt", "DecisionTrace", "trace_of"]


@dataclass
class Attempt:
    """One attempt of a request: where it went, why, and how it ended.

    :ivar endpoint: the address tried.
    :ivar reason: why this endpoint: the strategy, how many tried endpoints were excluded, and,
        for a service with ``subset`` or ``locality``, the request's subset and the zone with
        why it was chosen (``zone b (spill-over: local keeps 40%, this zone gets 33%)``).
    :ivar outcome: ``"response"``, ``"error"`` or ``"no_endpoint"``.
    :ivar status: the response status, if a response came back.
    :ivar error: the error's type and message, if it failed.
    :ivar decision: what came next: ``"done"``, ``"retry: <why>"`` or ``"stop: <why>"``.
    :ivar elapsed: seconds the attempt took.
    """

    endpoint: Optional[str]
    reason: str
    outcome: str = "pending"
    status: Optional[int] = None
    error: Optional[str] = None
    decision: str = ""
    elapsed: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The attempt as a JSON-serialisable dict."""
        return {"endpoint": self.endpoint, "reason": self.reason, "outcome": self.outcome,
                "status": self.status, "error": self.error, "decision": self.decision,
                "elapsed": round(self.elapsed, 6)}


@dataclass
class DecisionTrace:
    """The balancer's decisions for one request.

    :ivar service: the service the request went to.
    :ivar method: the HTTP method.
    :ivar path: the path and query of the URL.
    :ivar attempts: one :class:`Attempt` per attempt, in order.
    :ivar budget: the service's retry budget when the request finished.
    :ivar elapsed: seconds from the first pick to the end.
    """

    service: str
    method: str
    path: str
    attempts: list[Attempt] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The trace as a JSON-serialisable dict."""
        return {"service": self.service, "method": self.method, "path": self.path,
                "attempts": [a.to_dict() for a in self.attempts], "budget": dict(self.budget),
                "elapsed": round(self.elapsed, 6)}

    def __str__(self) -> str:
        left = self.budget.get("retries_left")
        head = (f"{self.service} {self.method} {self.path}: {len(self.attempts)} "
                f"attempt{'s' if len(self.attempts) != 1 else ''}, {self.elapsed:.3f} s"
                + (f", budget {left} retries left" if left is not None else ""))
        lines = [head]
        for number, attempt in enumerate(self.attempts, 1):
            result = (f"{attempt.status} in {attempt.elapsed:.3f} s" if attempt.status is not None
                      else attempt.error or attempt.outcome)
            decision = f"; {attempt.decision}" if attempt.decision not in ("", "done") else ""
            lines.append(f"  {number}. {attempt.endpoint or '-'} ({attempt.reason}) -> "
                         f"{result}{decision}")
        return "\n".join(lines)


def trace_of(obj: Any) -> Optional[DecisionTrace]:
    """The decision trace of a response or of an exception raised by a balanced request."""
    trace = getattr(obj, "lb_trace", None)
    return trace if isinstance(trace, DecisionTrace) else None
