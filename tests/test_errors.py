"""The error tree of SPEC: every error is a LoadBalancerError with the right extra bases."""

from __future__ import annotations

import pickle

import pytest
import requests

from tai_lb import (
    ConfigError,
    LoadBalancerError,
    NoEndpointAvailable,
    PoolExhausted,
    UnknownService,
)


def test_tree() -> None:
    for cls in (ConfigError, NoEndpointAvailable, PoolExhausted, UnknownService):
        assert issubclass(cls, LoadBalancerError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(NoEndpointAvailable, requests.exceptions.ConnectionError)
    assert issubclass(UnknownService, LookupError)


def test_messages_and_attributes() -> None:
    e = NoEndpointAvailable("users", "3 of 3 unhealthy")
    assert (e.service, e.reason) == ("users", "3 of 3 unhealthy")
    assert str(e) == "no endpoint available for service 'users': 3 of 3 unhealthy"
    c = ConfigError("services.users.strategy", "unknown strategy 'x'")
    assert (c.path, str(c)) == ("services.users.strategy",
                                "services.users.strategy: unknown strategy 'x'")
    p = PoolExhausted("127.0.0.1:8001", 5.0, service="users")
    assert (p.endpoint, p.service, p.timeout) == ("127.0.0.1:8001", "users", 5.0)
    assert "within 5 s" in str(p)
    assert UnknownService("billing").service == "billing"


@pytest.mark.parametrize("error", [
    ConfigError("a.b", "bad"), NoEndpointAvailable("users", "why"),
    PoolExhausted("h:1", 1.0, "users"), UnknownService("users"),
])
def test_errors_pickle(error: LoadBalancerError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)


def test_requests_handlers_catch_no_endpoint_available() -> None:
    with pytest.raises(requests.exceptions.RequestException):
        raise NoEndpointAvailable("users", "no endpoints registered")
