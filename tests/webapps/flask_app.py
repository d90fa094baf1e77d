"""A Flask app using tai_lb.integrations.flask, served by gunicorn in tests/test_integrations.py.

The balancer's config comes as JSON in the environment variable ``TAI_LB_TEST_CONFIG``.
``GET /call/<service>`` makes one outgoing request to ``http://<service>/echo`` and answers which
worker and which backend served it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flask

from tai_lb.integrations.flask import TaiLB

app = flask.Flask(__name__)
app.config["TAI_LB"] = json.loads(os.environ["TAI_LB_TEST_CONFIG"])
app.config["TAI_LB_TRUSTED_PROXY_HEADER"] = "X-Forwarded-For"
lb = TaiLB(app)
lb.mount_status("/lb-status/")


@app.before_request
def login() -> None:
    """The app's own login, run after the extension's hook: the user id is read lazily."""
    flask.g.user_id = flask.request.headers.get("X-Test-User")


@app.get("/call/<service>")
def call(service: str) -> dict[str, Any]:
    response = lb.session().get(f"http://{service}/echo", timeout=5)
    response.raise_for_status()
    return {"pid": os.getpid(), "backend": response.json()["backend"]}
