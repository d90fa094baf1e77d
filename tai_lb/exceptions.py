"""Every error tai-lb raises, in one tree.

::

    LoadBalancerError                     base of everything raised by tai-lb
     +-- ConfigError (ValueError)         bad configuration, raised at load time
     +-- UnknownService (LookupError)     a service name never configured or registered
     +-- NoEndpointAvailable              nothing could be picked for a service
     |    (requests.exceptions.ConnectionError)
     +-- PoolExhausted                    no connection free within the acquire timeout
     |    +-- HTTPPoolExhausted           the same on the HTTP path
     |         (requests.exceptions.ConnectionError)
     +-- SourceError                      a discovery source could not be read
          +-- EtcdError                   etcd unreachable, or answered with an error

``NoEndpointAvailable`` and ``HTTPPoolExhausted`` are also
:class:`requests.exceptions.ConnectionError`, so code that already handles connection failures
from ``requests`` handles them too.  Errors that concern a
service carry ``service``; errors that concern one endpoint carry ``endpoint`` as well.
``SourceError`` lives in :mod:`tai_lb.discovery` and ``EtcdError`` in
:mod:`tai_lb.discovery.etcd`, beside the code that raises them.
"""

from __future__ import annotations

from typing import Any, Optional

import requests

__all__ = [
    "ConfigError",
    "HTTPPoolExhausted",
    "LoadBalancerError",
    "NoEndpointAvailable",
    "PoolExhausted",
    "UnknownService",
]


class LoadBalancerError(Exception):
    """Base class of every error raised by tai-lb."""

    service: Optional[str] = None
    endpoint: Optional[str] = None


class ConfigError(LoadBalancerError, ValueError):
    """A configuration value is wrong; the message names the key path, the value and the rule.

    :param path: dotted key path of the bad value, such as ``services.users.strategy``.
    :param message: what is wrong and what is allowed.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}" if path else message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


class UnknownService(LoadBalancerError, LookupError):
    """The service name was never configured nor registered."""

    def __init__(self, service: str) -> None:
        self.service = service
        super().__init__(f"unknown service {service!r}: it was never configured or registered")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service,))


class NoEndpointAvailable(LoadBalancerError, requests.exceptions.ConnectionError):
    """No endpoint of the service could be picked; ``reason`` says why.

    :param service: the service asked for.
    :param reason: why nothing could be picked, such as ``"no endpoints registered"``.
    """

    def __init__(self, service: str, reason: str) -> None:
        self.service = service
        self.reason = reason
        super().__init__(f"no endpoint available for service {service!r}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service, self.reason))


class PoolExhausted(LoadBalancerError):
    """No connection became free within the pool's acquire timeout.

    :param endpoint: address of the endpoint whose pool is exhausted.
    :param timeout: how long the caller waited, in seconds.
    """

    def __init__(self, endpoint: str, timeout: Optional[float], service: Optional[str] = None):
        self.endpoint = endpoint
        self.service = service
        self.timeout = timeout
        waited = "" if timeout is None else f" within {timeout:g} s"
        super().__init__(f"no connection to {endpoint} became free{waited}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.endpoint, self.timeout, self.service))


class HTTPPoolExhausted(PoolExhausted, requests.exceptions.ConnectionError):
    """An endpoint's HTTP pool had no free connection in time (a requests ConnectionError)."""
