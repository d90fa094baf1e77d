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


def test_discovery_errors_are_in_the_tree() -> None:
    from tai_lb.discovery import SourceError
    from tai_lb.discovery.etcd import EtcdError

    assert issubclass(SourceError, LoadBalancerError)
    assert issubclass(EtcdError, SourceError)
    copy = pickle.loads(pickle.dumps(EtcdError("etcd at http://127.0.0.1:1: refused")))
    assert type(copy) is EtcdError and "refused" in str(copy)


@pytest.mark.parametrize("ttl", [0, 3601, 2.5, True, "10"])
def test_a_bad_registrar_ttl_is_a_config_error_naming_it(ttl: object) -> None:
    from tai_lb import EtcdRegistrar

    with pytest.raises(ConfigError, match=r"^ttl: must be an integer") as caught:
        EtcdRegistrar(["http://127.0.0.1:1"], "users", "127.0.0.1:8001",
                      ttl=ttl)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


def test_an_etcd_client_with_no_url_is_a_config_error() -> None:
    from tai_lb.discovery.etcd import EtcdClient

    with pytest.raises(ConfigError, match=r"^urls: etcd needs at least one URL"):
        EtcdClient([])
