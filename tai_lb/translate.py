"""`to_requests_error`: the one place where urllib3's errors become requests' errors.

Importable as ``tai_lb.adapter.to_requests_error``, where it is documented; the attempt loop
(:mod:`tai_lb.attempts`) calls it for every failed send.
"""

from __future__ import annotations

from typing import Optional

import requests
from requests.exceptions import (
    ConnectTimeout,
    InvalidHeader,
    ProxyError,
    ReadTimeout,
    RetryError,
    SSLError,
)
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    EmptyPoolError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
)
from urllib3.exceptions import InvalidHeader as Urllib3InvalidHeader
from urllib3.exceptions import ProxyError as Urllib3ProxyError
from urllib3.exceptions import SSLError as Urllib3SSLError

from .exceptions import HTTPPoolExhausted

__all__ = ["to_requests_error"]


def to_requests_error(error: BaseException, request: requests.PreparedRequest,
                      service: Optional[str] = None, endpoint: Optional[str] = None,
                      pool_timeout: Optional[float] = None) -> BaseException:
    """The requests exception that plain requests raises for a urllib3 ``error``.

    The one place where tai-lb translates urllib3's errors (as requests' own ``send`` does),
    plus an exhausted pool, which becomes :class:`~tai_lb.exceptions.HTTPPoolExhausted`.
    """
    if isinstance(error, EmptyPoolError):
        exhausted = HTTPPoolExhausted(endpoint or "?", pool_timeout, service)
        exhausted.request = request
        return exhausted
    if isinstance(error, (ProtocolError, OSError)):
        return requests.exceptions.ConnectionError(error, request=request)
    if isinstance(error, MaxRetryError):
        reason = error.reason
        if isinstance(reason, ConnectTimeoutError) and not isinstance(reason, NewConnectionError):
            return ConnectTimeout(error, request=request)
        if isinstance(reason, ResponseError):
            return RetryError(error, request=request)
        if isinstance(reason, Urllib3ProxyError):
            return ProxyError(error, request=request)
        if isinstance(reason, Urllib3SSLError):
            return SSLError(error, request=request)
        return requests.exceptions.ConnectionError(error, request=request)
    if isinstance(error, ClosedPoolError):
        return requests.exceptions.ConnectionError(error, request=request)
    if isinstance(error, Urllib3ProxyError):
        return ProxyError(error)
    if isinstance(error, Urllib3SSLError):
        return SSLError(error, request=request)
    if isinstance(error, ReadTimeoutError):
        return ReadTimeout(error, request=request)
    if isinstance(error, Urllib3InvalidHeader):
        return InvalidHeader(error, request=request)
    return error
