"""The status page: a WSGI app showing :meth:`LoadBalancer.status() <tai_lb.LoadBalancer.status>`.

:func:`status_app` returns a WSGI callable with no framework behind it, in the spirit of
HAProxy's stats page: one table per service (strategy, panic, active priority, retry budget,
discovery, requests, errors and p99 latency) with a row per endpoint (address, zone, weight,
priority, health, ejection, breaker, in flight, EWMA latency, p99 latency, requests, successes,
failures) and its recent rebalancing events, then the recent failovers.  The page
reloads itself every ``refresh`` seconds (a ``<meta http-equiv="refresh">``: no script), its
CSS is inline and it loads nothing else.  Every value is escaped: endpoint labels and discovery
details are user data.

``GET /`` is the HTML page, ``GET /?format=json`` the same figures as JSON (``lb.status()``
itself).  ``HEAD`` answers as ``GET`` without a body; other methods get 405, other paths 404.
"""

from __future__ import annotations

import html
import json
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional

from .exceptions import ConfigError

if TYPE_CHECKING:
    from .balancer import LoadBalancer

__all__ = ["DEFAULT_REFRESH", "StartResponse", "StatusApp", "render_html", "status_app"]

DEFAULT_REFRESH = 5.0
"""Seconds between two reloads of the HTML page."""

StartResponse = Callable[..., Any]
"""The ``start_response`` callable a WSGI server passes (PEP 3333)."""

_EVENTS_SHOWN = 20
_COLUMNS = ("address", "zone", "weight", "priority", "health", "ejection", "breaker",
            "in flight", "EWMA ms", "p99 ms", "requests", "successes", "failures")

_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:1em;color:#222;background:#fafafa}
h1{font-size:18px}h2{font-size:15px;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin-bottom:.5em}
th,td{border:1px solid #bbb;padding:2px 6px;text-align:left}
th{background:#dde}td.num{text-align:right}
tr.healthy td.health{background:#bfb}tr.unhealthy td.health{background:#f99}
tr.unchecked td.health{background:#eee}td.bad{background:#fc8}
.summary{margin:.2em 0;color:#444}
"""


def _text(value: Any) -> str:
    """``value`` as escaped HTML text; ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        value = ", ".join(f"{k}={v}" for k, v in value.items())
    return html.escape(str(value), quote=True)


def _ms(value: Any) -> str:
    """A latency in milliseconds as escaped text with its unit; ``-`` for None."""
    return "-" if value is None else f"{_text(value)} ms"


def _cell(value: Any, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{_text(value)}</td>"


def _ejection(outlier: Optional[Mapping[str, Any]]) -> tuple[str, str]:
    if not outlier or not outlier.get("ejected"):
        return "no", ""
    return f"ejected, {outlier.get('seconds_left')} s left", "bad"


def _endpoint_row(address: str, entry: Mapping[str, Any]) -> str:
    health = str(entry.get("health", "unchecked"))
    breaker = (entry.get("breaker") or {}).get("state")
    ejection, ejection_cls = _ejection(entry.get("outlier"))
    labels = entry.get("labels")
    title = f' title="{_text(labels)}"' if labels else ""
    cells = [
        f"<td{title}>{_text(address)}</td>",
        _cell(entry.get("zone")),
        _cell(entry.get("weight"), "num"),
        _cell(entry.get("priority", 0), "num"),
        _cell(health, "health"),
        _cell(ejection, ejection_cls),
        _cell(breaker, "bad" if breaker not in (None, "closed") else ""),
        _cell(entry.get("in_flight"), "num"),
        _cell(entry.get("latency_ewma_ms"), "num"),
        _cell(entry.get("p99_ms"), "num"),
        _cell(entry.get("requests"), "num"),
        _cell(entry.get("successes"), "num"),
        _cell(entry.get("failures"), "num"),
    ]
    return f'<tr class="endpoint {_text(health)}">{"".join(cells)}</tr>'


def _service(name: str, service: Mapping[str, Any]) -> str:
    budget = service.get("retry_budget")
    budget_text = (None if not budget else
                   f"{budget.get('retries_left')} retries left, {budget.get('refused')} refused")
    summary = (
        f"strategy <b>{_text(service.get('strategy'))}</b>"
        f" &middot; panic <b>{_text(service.get('panic'))}</b>"
        f" &middot; active priority <b>{_text(service.get('active_priority'))}</b>"
        f" &middot; pickable <b>{_text(service.get('endpoints_pickable'))}"
        f"/{_text(service.get('endpoints_total'))}</b>"
        f" &middot; in flight <b>{_text(service.get('in_flight'))}</b>"
        f" &middot; requests <b>{_text(service.get('requests'))}</b>"
        f" &middot; errors <b>{_text(service.get('errors'))}</b>"
        f" &middot; p99 <b>{_ms(service.get('p99_ms'))}</b>"
        f" &middot; retry budget <b>{_text(budget_text)}</b>"
        f" &middot; discovery <b>{_text(service.get('discovery'))}</b>")
    header = "".join(f"<th>{_text(column)}</th>" for column in _COLUMNS)
    rows = "".join(_endpoint_row(address, entry)
                   for address, entry in (service.get("endpoints") or {}).items())
    rebalance = service.get("rebalance") or {}
    if rebalance:
        summary += (f" &middot; rebalance <b>{_text(rebalance.get('mode'))}</b>"
                    f" (ramping {_text(rebalance.get('ramping'))},"
                    f" held {_text(rebalance.get('held'))})")
    return (f'<section class="service" id="service-{_text(name)}">'
            f"<h2>{_text(name)}</h2><p class=\"summary\">{summary}</p>"
            f"<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>"
            f"{_changes(list(service.get('events') or []))}</section>")


def _changes(events: list[Mapping[str, Any]]) -> str:
    # A service's rebalancing events, newest first: the kind, then the other figures.
    if not events:
        return ""
    rows = "".join(
        "<tr>" + _cell(time.strftime("%H:%M:%S", time.localtime(e.get("at") or 0)))
        + _cell(e.get("kind"))
        + _cell({k: v for k, v in e.items() if k not in ("at", "kind")}) + "</tr>"
        for e in reversed(events[-_EVENTS_SHOWN:]))
    return ('<table class="changes"><thead><tr><th>at</th><th>change</th><th>figures</th>'
            f"</tr></thead><tbody>{rows}</tbody></table>")


def _events(events: list[Mapping[str, Any]]) -> str:
    if not events:
        return "<p>No failover yet.</p>"
    rows = "".join(
        "<tr>" + _cell(e.get("at"), "num") + _cell(e.get("service")) + _cell(e.get("kind"))
        + _cell(f"{e.get('from_priority')} -> {e.get('to_priority')}")
        + _cell(e.get("usable_shares")) + "</tr>"
        for e in reversed(events[-_EVENTS_SHOWN:]))
    return ('<table class="events"><thead><tr><th>at</th><th>service</th><th>kind</th>'
            f"<th>priority</th><th>usable shares</th></tr></thead><tbody>{rows}</tbody></table>")


def render_html(status: Mapping[str, Any], refresh: float = DEFAULT_REFRESH) -> str:
    """The status page for ``status`` (a :meth:`LoadBalancer.status` dict), as an HTML string."""
    meta = f'<meta http-equiv="refresh" content="{refresh:g}">' if refresh > 0 else ""
    services = "".join(_service(name, service)
                       for name, service in (status.get("services") or {}).items())
    overall = (f"balancer {'closed' if status.get('closed') else 'open'}"
               f" &middot; health checks {_text(status.get('health_checker'))}"
               f" &middot; outlier detection {_text(status.get('outlier_detection'))}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}'
            '<link rel="icon" href="data:,"><title>tai-lb status</title>'
            f"<style>{_CSS}</style></head><body><h1>tai-lb status</h1>"
            f'<p class="summary">{overall} &middot; at {_text(time.strftime("%H:%M:%S"))}</p>'
            f"{services}<h2>Recent failovers</h2>"
            f"{_events(list(status.get('failover_events') or []))}</body></html>")


class StatusApp:
    """The WSGI app :func:`status_app` returns; :meth:`render` serves frameworks without WSGI.

    :param lb: the balancer to show.
    :param refresh: seconds between reloads of the HTML page; 0 turns reloading off.
    """

    def __init__(self, lb: LoadBalancer, refresh: float = DEFAULT_REFRESH) -> None:
        if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or not (
                0 <= refresh <= 86400):
            raise ConfigError("refresh", f"must be a number of seconds from 0 to 86400, got "
                                         f"{refresh!r}")
        self.lb = lb
        self.refresh = float(refresh)

    def render(self, method: str = "GET", path: str = "/",
               query: str = "") -> tuple[int, list[tuple[str, str]], bytes]:
        """Answer one request: ``(status code, headers, body)``; HEAD gets an empty body."""
        if method not in ("GET", "HEAD"):
            code, headers, body = 405, [("Allow", "GET, HEAD")], b"405 method not allowed\n"
        elif path not in ("", "/"):
            code, headers, body = 404, [], b"404 not found\n"
        else:
            code, headers, body = self._page(urllib.parse.parse_qs(query).get("format", ["html"]))
        if not any(name == "Content-Type" for name, _ in headers):
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        headers += [("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
        return code, headers, b"" if method == "HEAD" else body

    def _page(self, formats: list[str]) -> tuple[int, list[tuple[str, str]], bytes]:
        wanted = formats[-1]
        if wanted not in ("html", "json"):
            return 400, [], f"400 unknown format {wanted!r}: html or json\n".encode()
        status = self.lb.status()
        if wanted == "json":
            return 200, [("Content-Type", "application/json")], json.dumps(
                status, default=str).encode()
        return 200, [("Content-Type", "text/html; charset=utf-8")], render_html(
            status, self.refresh).encode()

    def __call__(self, environ: Mapping[str, Any],
                 start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI entry point (PEP 3333)."""
        code, headers, body = self.render(str(environ.get("REQUEST_METHOD", "GET")).upper(),
                                          str(environ.get("PATH_INFO", "")),
                                          str(environ.get("QUERY_STRING", "")))
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[code]
        start_response(f"{code} {reason}", headers)
        return [body]


def status_app(lb: LoadBalancer, refresh: float = DEFAULT_REFRESH) -> StatusApp:
    """A WSGI app serving ``lb``'s status page at ``/`` and its JSON at ``/?format=json``.

    :param lb: the balancer to show.
    :param refresh: seconds between reloads of the HTML page (default 5); 0 turns them off.
    :raises ConfigError: ``refresh`` is not a number of seconds from 0 to 86400.
    """
    return StatusApp(lb, refresh)
