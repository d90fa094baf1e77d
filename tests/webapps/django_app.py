"""A Django app (settings.configure, no project) using tai_lb.integrations.django, served by
gunicorn in tests/test_integrations.py; the same routes as :mod:`tests.webapps.flask_app`."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any, Callable

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="tests only",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[],
    DATABASES={},
    MIDDLEWARE=[f"{__name__}.login", "tai_lb.integrations.django.RoutingContextMiddleware"],
    TAI_LB=json.loads(os.environ["TAI_LB_TEST_CONFIG"]),
    TAI_LB_TRUSTED_PROXY_HEADER="X-Forwarded-For",
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402 - after settings.configure
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from tai_lb.integrations.django import session, status_urls  # noqa: E402


def login(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], Any]:
    """Sets ``request.user`` as AuthenticationMiddleware would, from a test header."""
    def middleware(request: HttpRequest) -> HttpResponse:
        name = request.headers.get("X-Test-User")
        request.user = SimpleNamespace(pk=name, is_authenticated=name is not None)
        return get_response(request)
    return middleware


def call(request: HttpRequest, service: str) -> HttpResponse:
    response = session().get(f"http://{service}/echo", timeout=5)
    response.raise_for_status()
    return JsonResponse({"pid": os.getpid(), "backend": response.json()["backend"]})


urlpatterns = [path("call/<str:service>", call), *status_urls("lb-status/")]
application = get_wsgi_application()
