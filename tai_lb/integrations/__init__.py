"""Web framework integrations: :mod:`tai_lb.integrations.flask` and
:mod:`tai_lb.integrations.django`.

Each gives a web app one balancer per worker process, made on first use (so a pre-fork server's
master, ``gunicorn --preload``, never owns one its workers share) and closed at exit; mounts the
status page in one line; and makes each incoming request's client address, user and cookies the
routing context (:mod:`tai_lb.context`), so ``hash_key`` and ``affinity`` keys work with no
plumbing.  Importing this package imports neither framework.
"""

from __future__ import annotations

from ._common import WebSettings

__all__ = ["WebSettings"]
