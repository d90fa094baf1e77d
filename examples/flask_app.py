"""A Flask app whose views call balanced services, with the status page mounted.

It uses the Flask integration (``pip install 'tai-lb[flask]'``): ``TaiLB(app)`` reads the
balancer's configuration from ``app.config["TAI_LB"]``; each worker process makes its own balancer
on first use; ``lb.session()`` is a balanced ``requests.Session`` (one per thread); the incoming
request is the routing context of the outgoing ones.  Its views:

``GET /users/<id>``
    calls ``http://users/api/users/<id>`` (``peak_ewma``, retries, a health check) and answers
    which backend served it and in how many attempts;
``GET /cart``
    calls ``http://carts/api/cart``; ``carts`` uses ``consistent_hash`` keyed by the *incoming*
    request's ``session`` cookie (``"hash_key": "cookie:session"``), so one browser session
    always reaches the same backend, with no code in the view;
``GET /lb-status/``
    the status page of the worker's balancer (``?format=json`` for JSON).

Run it any of these ways, from the root of the source tree::

    python examples/flask_app.py                  # Flask's development server, port 5000
    python examples/flask_app.py --port 0         # any free port (it prints the URL)
    flask --app examples/flask_app.py run
    gunicorn --preload -w 2 --threads 4 --chdir examples flask_app:app

then ``curl http://127.0.0.1:5000/users/42``, ``curl -b session=abc
http://127.0.0.1:5000/cart``, or open ``http://127.0.0.1:5000/lb-status/``.  (gunicorn listens on
port 8000.)

With the environment variable ``TAI_LB_CONFIG`` set to a configuration file (JSON, TOML or YAML)
that names the services ``users`` and ``carts``, the app balances over the endpoints it lists.
Without it, the process that loads the app starts two demo HTTP backends on 127.0.0.1 (alpha and
bravo) and balances over them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Union

import flask
from _backends import start_backends  # the examples' demo HTTP backends
from werkzeug.serving import make_server

import tai_lb
from tai_lb.integrations.flask import TaiLB


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

app = flask.Flask(__name__)
app.config["TAI_LB"] = config           # checked here: a mistake raises tai_lb.ConfigError
lb = TaiLB(app)                         # the balancer itself is made on first use
lb.mount_status("/lb-status/")          # protect it as the rest of your site in production


@app.get("/users/<int:user_id>")
def user(user_id: int) -> dict[str, Any]:
    response = lb.session().get(f"http://users/api/users/{user_id}", timeout=5)
    response.raise_for_status()
    trace = tai_lb.trace_of(response)
    return {"user": user_id, "served_by": response.json()["backend"],
            "attempts": len(trace.attempts) if trace is not None else None}


@app.get("/cart")
def cart() -> dict[str, Any]:
    # The routing key is the incoming request's "session" cookie: nothing to pass here.
    response = lb.session().get("http://carts/api/cart", timeout=5)
    response.raise_for_status()
    return {"session": flask.request.cookies.get("session"),
            "served_by": response.json()["backend"]}


def stop_on_sigterm() -> None:
    """Let SIGTERM stop the server as Ctrl-C does (a process manager's stop)."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Serve the example app.")
    parser.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    port = parser.parse_args(argv).port
    server = make_server("127.0.0.1", port, app, threaded=True)
    print(f"serving on http://127.0.0.1:{server.port}/ (try /users/42, /cart, /lb-status/)",
          flush=True)
    stop_on_sigterm()
    try:
        server.serve_forever()  # until Ctrl-C or SIGTERM
    finally:
        lb.close()  # done at exit anyway: stops the health checks, closes the pools
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
