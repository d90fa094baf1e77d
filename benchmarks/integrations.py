"""The Flask and Django integrations' cost per incoming request: the routing context they set.

Each framework's request, through its own test client (in process, no socket), with and without
the integration, in interleaved, shuffled batches over several rounds:

- ``plain``: the app alone;
- ``empty hooks``: the app with a ``before_request`` and a ``teardown_request`` function (Flask)
  or a middleware (Django) that do nothing: what any per-request hook costs in that framework;
- ``integration``: Flask's ``TaiLB(app)`` or Django's ``RoutingContextMiddleware``, with a
  view that reads nothing from the context (most requests: no keyed outgoing call);
- ``integration, keys read``: the view reads the routing keys once (source IP through
  ``X-Forwarded-For``, a cookie, a header and the user), as a keyed outgoing call would.

Every request carries 14 headers and two cookies. The claim is each case's median over rounds of
its ratio to ``plain`` in the same round::

    python benchmarks/integrations.py          # about 20 s; updates its RESULTS.md section
    python benchmarks/integrations.py --quick  # a few seconds; never writes RESULTS.md

Target (printed as PASS/FAIL, never asserted): ``integration`` costs at most 1.10 x ``plain``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any, Callable, Optional

from picks import (
    TimedCase,
    benchmark_parser,
    environment_line,
    interleaved_medians,
    markdown_table,
    publish,
    verdict,
)

import tai_lb.context

SECTION = "## integrations.py"
TARGET = 1.10  # integration / plain at most this
HEADERS = {**{f"X-Extra-{i}": "v" * 20 for i in range(11)},
           "X-Forwarded-For": "10.0.0.1, 203.0.113.5", "X-User": "u1",
           "Cookie": "session=abc; theme=dark"}
CONFIG = {"services": {"users": {"endpoints": ["10.0.0.1:80"]}}}


def read_keys() -> str:
    """What a keyed outgoing call reads from the routing context."""
    ctx = tai_lb.context.current()
    return f"{ctx.source()} {ctx.cookie('session')} {ctx.header('X-User')} {ctx.user()}"


def timed(get: Callable[[str], Any], path: str) -> Callable[[int], float]:
    """A function timing ``n`` requests for ``path``."""
    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            get(path)
        return time.perf_counter() - start
    return run


def flask_cases() -> dict[str, TimedCase]:
    """The Flask cases: a plain app and one with TaiLB."""
    import flask

    from tai_lb.integrations.flask import TaiLB

    def app(hooks: str) -> Callable[[str], Any]:
        made = flask.Flask(f"bench-{hooks}")
        made.config.update(TAI_LB=CONFIG, TAI_LB_TRUSTED_PROXY_HEADER="X-Forwarded-For",
                           TAI_LB_USER_ID=lambda request: "42")
        if hooks == "integration":
            TaiLB(made)
        elif hooks == "empty":
            made.before_request(lambda: None)
            made.teardown_request(lambda error: None)
        made.add_url_rule("/", "none", lambda: "ok")
        made.add_url_rule("/keys", "keys", read_keys)
        client = made.test_client()
        return lambda path: client.get(path, headers=HEADERS)

    plain, empty, integrated = app("none"), app("empty"), app("integration")
    return {"Flask, plain": (timed(plain, "/"), lambda: None),
            "Flask, empty hooks": (timed(empty, "/"), lambda: None),
            "Flask, integration": (timed(integrated, "/"), lambda: None),
            "Flask, integration, keys read": (timed(integrated, "/keys"), lambda: None)}


def django_cases() -> dict[str, TimedCase]:
    """The Django cases: the same URL patterns with and without the middleware."""
    import django
    from django.conf import settings
    from django.http import HttpResponse
    from django.test import Client
    from django.urls import path

    middleware = "tai_lb.integrations.django.RoutingContextMiddleware"
    settings.configure(DEBUG=False, SECRET_KEY="benchmark", ALLOWED_HOSTS=["*"],
                       ROOT_URLCONF=__name__, MIDDLEWARE=[], DATABASES={},
                       TAI_LB=CONFIG, TAI_LB_TRUSTED_PROXY_HEADER="X-Forwarded-For",
                       TAI_LB_USER_ID=lambda request: "42")
    django.setup()
    urlpatterns[:] = [path("", lambda request: HttpResponse("ok")),
                      path("keys", lambda request: HttpResponse(read_keys()))]
    headers = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in HEADERS.items()}

    def client(chain: list[str]) -> Callable[[str], Any]:
        made = Client()
        settings.MIDDLEWARE = chain
        made.handler.load_middleware()  # the chain as the settings say now
        settings.MIDDLEWARE = []
        return lambda url: made.get(url, **headers)

    plain, empty = client([]), client([f"{__name__}.empty_middleware"])
    integrated = client([middleware])
    return {"Django, plain": (timed(plain, "/"), lambda: None),
            "Django, empty hooks": (timed(empty, "/"), lambda: None),
            "Django, integration": (timed(integrated, "/"), lambda: None),
            "Django, integration, keys read": (timed(integrated, "/keys"), lambda: None)}


urlpatterns: list[Any] = []  # Django's ROOT_URLCONF is this module


def empty_middleware(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A Django middleware that does nothing (the ``empty hooks`` case)."""
    return get_response


def run(rounds: int, batch: int, seed: int) -> dict[str, list[float]]:
    """Per case, the microseconds per request of each round (the cases interleaved)."""
    cases = {**flask_cases(), **django_cases()}
    per_round: dict[str, list[float]] = {name: [] for name in cases}
    for number in range(rounds):
        for name, value in interleaved_medians(cases, batch, 1, seed + number).items():
            per_round[name].append(value)
    return per_round


def rows(per_round: dict[str, list[float]]) -> tuple[list[str], list[list[str]]]:
    """One row per case: median us per request, and the median over rounds of the us added
    and of the ratio to the same framework's plain app in that round."""
    table = []
    for name, values in per_round.items():
        framework, _, case = name.partition(", ")
        plain = per_round[f"{framework}, plain"]
        ratio = statistics.median(v / p for v, p in zip(values, plain))
        added = statistics.median(v - p for v, p in zip(values, plain))
        target = verdict(ratio <= TARGET) if case == "integration" else ""
        table.append([framework, case, f"{statistics.median(values):.1f}", f"{added:+.1f}",
                      f"{ratio:.3f}", target])
    return ["framework", "case", "us/request", "us added", "x plain", f"<= {TARGET:g} x"], table


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the table and, unless told not to, update RESULTS.md."""
    parser = benchmark_parser(
        __doc__, "a few seconds, fewer rounds (smoke test); no write",
        "seed of the batch order", f"the file whose '{SECTION}' section is replaced")
    args = parser.parse_args(argv)
    rounds, batch = (3, 100) if args.quick else (60, 200)
    began = time.monotonic()
    table = rows(run(rounds, batch, args.seed))
    environment = environment_line(f"{rounds} rounds in {time.monotonic() - began:.0f} s",
                                   f"Flask {version('flask')}", f"Django {version('django')}")
    method = (f"GET requests through each framework's test client (in process, no socket), "
              f"14 headers and 2 cookies each, in {rounds} rounds in which the cases take turns "
              f"in a shuffled order, {batch:,} requests per case per round; us/request is the "
              "median over rounds, `us added` and `x plain` the medians over rounds of each "
              "round's difference and ratio to the same framework's plain app (the machine is "
              "shared: rounds differ more than cases). `keys read` views read the source IP "
              "(X-Forwarded-For), a cookie, a header and the user from the routing context "
              "once, as a keyed outgoing call does.")
    summary = [f"{row[0]}, {row[1]}: {row[2]} us per request, {row[4]} x plain"
               for row in table[1]]
    report = "\n".join([environment, "", method, "", markdown_table(*table), "",
                        f"Target: the integration costs at most {TARGET:g} x the plain app "
                        "per request. The context is set per request but nothing is read from "
                        "the request until a key needs it."])
    publish(args, "--quick: a smoke test; few rounds, noisy", summary, [table], report, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
