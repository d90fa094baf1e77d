"""A one-file Django app whose views call balanced services, with the status page mounted.

It uses the Django integration (``pip install 'tai-lb[django]'``): the ``TAI_LB`` setting is the
balancer's configuration; ``RoutingContextMiddleware`` makes each incoming request the routing
context of the outgoing ones; ``session()`` is a balanced ``requests.Session`` of the worker's
balancer (one per thread), made on first use in each worker process.  The views are the same as
``examples/flask_app.py``'s:

``GET /users/<id>``
    calls ``http://users/api/users/<id>`` (``peak_ewma``, retries, a health check) and answers
    which backend served it and in how many attempts;
``GET /cart``
    calls ``http://carts/api/cart``; ``carts`` uses ``consistent_hash`` keyed by the *incoming*
    request's ``session`` cookie (``"hash_key": "cookie:session"``), so one browser session
    always reaches the same backend, with no code in the view;
``GET /lb-status/``
    the status page of the worker's balancer (``?format=json`` for JSON).

A project of your own puts the settings in ``settings.py``, the patterns in ``urls.py`` and the
views in ``views.py``; here ``settings.configure()`` does it all in one file.  Run it from the root
of the source tree::

    python examples/django_app.py                 # a threaded wsgiref server, port 8000
    python examples/django_app.py --port 0        # any free port (it prints the URL)
    python examples/django_app.py runserver --noreload 8000   # any manage.py command
    gunicorn --preload -w 2 --threads 4 --chdir examples django_app:application

then ``curl http://127.0.0.1:8000/users/42``, ``curl -b session=abc
http://127.0.0.1:8000/cart``, or open ``http://127.0.0.1:8000/lb-status/``.

With the environment variable ``TAI_LB_CONFIG`` set to a configuration file (JSON, TOML or YAML)
that names the services ``users`` and ``carts``, the app balances over the endpoints it lists.
Without it, the process that loads the app starts two demo HTTP backends on 127.0.0.1 (alpha and
bravo) and balances over them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socketserver
import sys
from typing import Any, Union
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import django
from _backends import start_backends  # the examples' demo HTTP backends
from django.conf import settings

import tai_lb


def demo_config() -> dict[str, Any]:
    """Start two demo backends; a configuration of ``users`` and ``carts`` over them."""
    endpoints = [backend.address for backend in start_backends("alpha", "bravo")]
    return {"services": {
        "users": {"endpoints": endpoints, "strategy": "peak_ewma", "retries": {"attempts": 3},
                  "health_check": {"path": "/healthz", "interval": 2}},
        "carts": {"endpoints": endpoints, "strategy": "consistent_hash",
                  "hash_key": "cookie:session"},
    }}


config: Union[str, dict[str, Any]] = os.environ.get("TAI_LB_CONFIG") or demo_config()

settings.configure(
    DEBUG=False,
    SECRET_KEY="an example: set your own",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[],
    DATABASES={},
    # After AuthenticationMiddleware, in a project that has it (for "user_id" keys).
    MIDDLEWARE=["tai_lb.integrations.django.RoutingContextMiddleware"],
    TAI_LB=config,                      # checked when the middleware loads: tai_lb.ConfigError
)
django.setup()

# Django's own modules import the settings: after settings.configure().
from django.core.management import execute_from_command_line  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from tai_lb.integrations.django import session, status_urls  # noqa: E402


def user(request: HttpRequest, user_id: int) -> JsonResponse:
    response = session().get(f"http://users/api/users/{user_id}", timeout=5)
    response.raise_for_status()
    trace = tai_lb.trace_of(response)
    return JsonResponse({"user": user_id, "served_by": response.json()["backend"],
                         "attempts": len(trace.attempts) if trace is not None else None})


def cart(request: HttpRequest) -> JsonResponse:
    # The routing key is the incoming request's "session" cookie: nothing to pass here.
    response = session().get("http://carts/api/cart", timeout=5)
    response.raise_for_status()
    return JsonResponse({"session": request.COOKIES.get("session"),
                         "served_by": response.json()["backend"]})


urlpatterns = [
    path("users/<int:user_id>", user),
    path("cart", cart),
    *status_urls("lb-status/"),        # protect it as the rest of your site in production
]

application = get_wsgi_application()


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does


def main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):  # a management command: runserver, check...
        execute_from_command_line([sys.argv[0], *argv])
        return 0
    parser = argparse.ArgumentParser(description="Serve the example app.")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    port = parser.parse_args(argv).port
    server = make_server("127.0.0.1", port, application, server_class=ThreadingWSGIServer,
                         handler_class=QuietHandler)
    print(f"serving on http://127.0.0.1:{server.server_port}/ "
          f"(try /users/42, /cart, /lb-status/)", flush=True)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        server.serve_forever()  # until Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
