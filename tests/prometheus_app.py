"""A tiny WSGI app for the multiprocess Prometheus test, served by gunicorn with 4 workers.

Each worker makes its own balancer on its first request (the configuration is the JSON in the
``TAI_LB_TEST_CONFIG`` environment variable) with ``metrics.prometheus`` on;
``PROMETHEUS_MULTIPROC_DIR`` is set, so the figures go to the shared files.  ``/call`` sends one
request through the balancer to the ``users`` service and answers the worker's pid;
``/metrics`` is the scrape of every worker's files through a ``MultiProcessCollector``.  With
``TAI_LB_TEST_PRELOAD`` set (and gunicorn's ``--preload``), the balancer is made in the master
at import, which sends :data:`PRELOADED` requests before forking the workers.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from typing import Any, Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

import tai_lb

_lock = threading.Lock()
_balancer: Optional[tai_lb.LoadBalancer] = None


PRELOADED = 5
"""Requests the preloaded balancer makes in gunicorn's master, before the fork."""


def balancer() -> tai_lb.LoadBalancer:
    """This worker's balancer, made on first use."""
    global _balancer
    with _lock:
        if _balancer is None:
            _balancer = tai_lb.LoadBalancer.from_config(
                json.loads(os.environ["TAI_LB_TEST_CONFIG"]))
        return _balancer


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``/call`` and ``/metrics``; 404 for anything else."""
    path = environ.get("PATH_INFO", "")
    if path == "/call":
        lb = balancer()
        response = lb.session().get("http://users/ok", timeout=5)
        body = json.dumps({"pid": os.getpid(), "status": response.status_code,
                           "export": lb.metrics.snapshot()["prometheus"]}).encode()
        content_type = "application/json"
    elif path == "/metrics":
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body, content_type = generate_latest(registry), CONTENT_TYPE_LATEST
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    start_response("200 OK", [("Content-Type", content_type),
                              ("Content-Length", str(len(body)))])
    return [body]


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn's hook (``--config python:tests.prometheus_app``): a dead worker's gauges go."""
    multiprocess.mark_process_dead(worker.pid)


if os.environ.get("TAI_LB_TEST_PRELOAD"):  # gunicorn --preload: made in the master, then forked
    for _ in range(PRELOADED):
        balancer().session().get("http://users/ok", timeout=5)
