"""The attempt loop of one balanced request, from the first pick to a response or an error.

:class:`~tai_lb.LoadBalancedAdapter` hands every request to a service to :func:`balanced_send`:
per-request set-up (settings, timeouts, ``Host``, whether the body can be sent again, TLS
paths), then attempts, each picking an endpoint not tried yet and sending on its urllib3 pool,
with retries decided here and run by tenacity.  A streamed response's lease is released when
its body has been read; an abandoned one's connection is closed when it is collected.

Errors are translated by :func:`~tai_lb.adapter.to_requests_error` (in ``translate.py``), into
the same requests exceptions plain requests raises; when every attempt fails the last attempt's
exception is raised with the decision trace attached as ``error.lb_trace``.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional, Union

import requests
import tenacity
from requests.exceptions import ChunkedEncodingError, ContentDecodingError, ReadTimeout
from requests.utils import DEFAULT_CA_BUNDLE_PATH, extract_zipped_paths
from urllib3.util.retry import Retry
from urllib3.util.timeout import Timeout

from . import context
from ._deadline import DEADLINE
from .config import KeySource
from .exceptions import NoEndpointAvailable
from .lease import Lease
from .otel import TRACER, end_attempt, start_attempt
from .pool import failed_while_connecting, on_release
from .request_metrics import RequestFigures, error_kind
from .retry import RetryConfig, classify
from .routing.subsets import pick_reason
from .strategies import RoutingKey
from .trace import Attempt, DecisionTrace
from .translate import to_requests_error

if TYPE_CHECKING:
    from .adapter import LoadBalancedAdapter
    from .balancer import LoadBalancer

__all__ = ["CertArg", "KeyOf", "TimeoutArg", "balanced_send"]

# The decision traces are logged as the adapter's, the logger the documentation names.
log = logging.getLogger("tai_lb.adapter")

_NO_RETRIES = Retry(0, read=False)  # what requests passes: urllib3 never retries by itself
_MIN_TIMEOUT = 0.001  # an attempt started just before the deadline still gets a valid timeout
_MIN_ATTEMPT_TIME = 0.005  # no retry starts with less time than this left before the deadline
_REPLACED_HEADERS = frozenset(("host", "proxy-authorization"))  # lower case
TimeoutArg = Union[float, tuple[Optional[float], Optional[float]], Timeout, None]
"""What requests passes as ``timeout``: seconds, ``(connect, read)`` or a urllib3 `Timeout`."""
CertArg = Union[bytes, str, tuple[Union[bytes, str], Union[bytes, str]], None]
"""What requests passes as ``cert``: a client certificate file, or ``(certificate, key)``."""
KeyOf = Callable[[Optional[KeySource], requests.PreparedRequest], Optional[RoutingKey]]
"""How a request's routing key is found (:func:`tai_lb.adapter.routing_key`)."""


class _RetryAttempt(Exception):
    """Raised inside the attempt loop to ask tenacity for another attempt (why, as its text)."""


def _explained(lb: LoadBalancer, service: str, lease: Lease) -> str:
    # Which subset and zone the pick was in, for the trace: never an error with a lease open.
    try:
        return pick_reason(lb.route(service, wait=False), lease.endpoint)
    except Exception:  # the route changed under us: the trace goes without
        log.debug("tai-lb: explaining a pick of %s failed", service, exc_info=True)
        return ""


def _resolve_timeout(timeout: TimeoutArg) -> Timeout:
    if isinstance(timeout, Timeout):
        return timeout
    if isinstance(timeout, tuple):
        try:
            connect, read = timeout
        except ValueError:
            raise ValueError(f"Invalid timeout {timeout}. Pass a (connect, read) timeout tuple, "
                             "or a single float to set both timeouts to the same value.") from None
        return Timeout(connect=connect, read=read)
    return Timeout(connect=timeout, read=timeout)


def _seconds_of(value: object) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) else None


def _clip(value: Optional[float], limit: Optional[float]) -> Optional[float]:
    if limit is None:
        return value
    return limit if value is None else min(value, limit)


def _close_raw(raw: Any) -> None:
    """Close an abandoned streamed response: the connection is closed, its pool slot freed."""
    try:
        raw.close()
        raw.release_conn()
    except Exception:  # a finaliser must not raise
        log.debug("tai-lb: closing an abandoned response failed", exc_info=True)


def _check_tls_paths(verify: Union[bool, str], cert: CertArg) -> None:
    """Raise the OSError plain requests raises for a missing CA bundle or client certificate."""
    if isinstance(verify, str) and not os.path.exists(verify):
        raise OSError("Could not find a suitable TLS CA certificate bundle, invalid path: "
                      f"{verify}")
    files = cert if isinstance(cert, (tuple, list)) else ((cert,) if cert else ())
    for kind, path in zip(("certificate", "key"), files):
        if not os.path.exists(os.fsdecode(path)):
            raise OSError(f"Could not find the TLS {kind} file, invalid path: "
                          f"{os.fsdecode(path)}")


def _release_when_read(raw: Any, lease: Lease, success: bool, status: Optional[int]) -> None:
    """Release a streamed response's lease when its connection goes back to the pool.

    The connection goes back when the body has been read or the response closed, and also when a
    read breaks; so reads are watched, and a read that raised makes the release a failure.
    """
    connection = getattr(raw, "_connection", None)
    if connection is None:  # nothing left to read: the connection is back already
        lease.done(success=success, status=status)
        return
    state = {"reading": False, "released": False, "failed": False}

    def finish() -> None:
        if state["released"] and not lease.released:
            if state["failed"]:  # the body broke off: a local-origin failure
                lease.done(success=False)
            else:
                lease.done(success=success, status=status)

    def released() -> None:
        state["released"] = True
        if not state["reading"]:  # closed by the caller, or read outside read()
            finish()

    original_read = raw.read
    original_read_chunked = raw.read_chunked

    def read(*args: Any, **kwargs: Any) -> Any:
        state["reading"] = True
        try:
            return original_read(*args, **kwargs)
        except BaseException:
            state["failed"] = True
            raise
        finally:
            state["reading"] = False
            finish()

    def read_chunked(*args: Any, **kwargs: Any) -> Any:
        state["reading"] = True
        try:
            yield from original_read_chunked(*args, **kwargs)
        except GeneratorExit:  # the caller stopped early: not the endpoint's fault
            raise
        except BaseException:
            state["failed"] = True
            raise
        finally:
            state["reading"] = False
            finish()

    # urllib3's stream() and requests' iter_content() call self.read() (self.read_chunked()
    # for chunked bodies).
    raw.read = read
    raw.read_chunked = read_chunked
    on_release(connection, released)


def _body_rewinder(body: Any) -> tuple[bool, Optional[int]]:
    """Whether ``body`` can be sent again, and the position to rewind a file to."""
    if body is None or isinstance(body, (bytes, str, bytearray)):
        return True, None
    seek = getattr(body, "seek", None)
    tell = getattr(body, "tell", None)
    if seek is not None and tell is not None:
        try:
            if isinstance(body, io.IOBase) and not body.seekable():
                return False, None
            return True, tell()
        except (OSError, ValueError):
            return False, None
    return False, None  # a generator or iterator: it can be consumed only once


def balanced_send(adapter: LoadBalancedAdapter, request: requests.PreparedRequest,
                  service: str, scheme: str, netloc: str, stream: bool, timeout: TimeoutArg,
                  verify: Union[bool, str], cert: CertArg, key_of: KeyOf) -> requests.Response:
    """Send ``request`` to an endpoint of ``service``, retrying as its settings allow.

    :param adapter: the adapter sending it: its balancer picks, its ``build_response`` builds.
    :param service: the URL's host, a service of the adapter's balancer.
    :param scheme: ``"http"`` or ``"https"``.
    :param netloc: the URL's network location, from which ``Host`` is set.
    :param stream: leave the body unread (requests' ``stream=``).
    :param timeout: the request's timeout; None: the service's ``timeout`` setting.
    :param verify: requests' ``verify=``: check certificates, against this CA bundle if a path.
    :param cert: requests' ``cert=``: the client certificate.
    :param key_of: finds the request's routing key from the service's ``hash_key`` setting.
    :returns: the response of the last attempt; its trace is ``response.lb_trace``.
    :raises requests.RequestException: the last attempt's error, with ``lb_trace``.
    """
    return _BalancedSend(adapter, request, service, scheme, netloc, stream, timeout, verify,
                         cert, key_of).run()


class _BalancedSend:
    """One balanced request: the attempt loop and its decisions (slots: one per request)."""

    __slots__ = ("adapter", "budget", "cert", "clock", "deadline", "explained", "figures",
                 "finished", "headers", "idempotent", "key", "last_error", "lb", "method",
                 "next_backoff", "policy", "replayable", "request", "rewind_to", "scheme",
                 "service", "settings", "started", "strategy_name", "stream", "subset_value",
                 "timeout", "trace", "tried", "verify")

    def __init__(self, adapter: LoadBalancedAdapter, request: requests.PreparedRequest,
                 service: str, scheme: str, netloc: str, stream: bool, timeout: TimeoutArg,
                 verify: Union[bool, str], cert: CertArg, key_of: KeyOf) -> None:
        lb = adapter.balancer
        self.adapter = adapter
        self.lb = lb
        self.request = request
        self.service = service
        self.scheme = scheme
        self.stream = stream
        self.verify = verify
        self.cert = cert
        self.settings = lb.service_config(service)
        self.policy: RetryConfig = self.settings.retries
        self.budget = lb.retry_budget(service)
        self.clock = lb.clock
        self.started = self.clock()
        self.deadline = (None if self.policy.deadline is None
                         else self.started + self.policy.deadline)
        self.timeout = _resolve_timeout(timeout if timeout is not None
                                        else self.settings.timeout)
        self.method = (request.method or "GET").upper()
        # Host first, as http.client sends it; a caller's "host" (any case) is replaced, and
        # proxies are bypassed for services, so their credentials never reach an endpoint.
        self.headers = {"Host": netloc.rpartition("@")[2]}  # (a CaseInsensitiveDict: 2.7 us)
        self.headers.update((name, value) for name, value in request.headers.items()
                            if name.lower() not in _REPLACED_HEADERS)
        self.idempotent = (self.method in self.policy.methods
                           or "Idempotency-Key" in request.headers)
        self.replayable, self.rewind_to = _body_rewinder(request.body)
        affinity = self.settings.affinity  # its key is the routing key when it is set
        self.key = key_of(self.settings.hash_key if affinity is None else affinity.source, request)
        if scheme == "https":
            _check_tls_paths(verify, cert)
        self.tried: list[str] = []
        self.trace = DecisionTrace(service, self.method, request.path_url)  # urlopen's too
        self.last_error: Optional[BaseException] = None
        self.finished = False
        self.next_backoff = 0.0
        self.strategy_name = self.settings.strategy.name
        subset = self.settings.subset  # its value is read from the routing context by picks
        value = key_of(subset.source, request) if subset is not None else None
        self.subset_value = (value.decode("utf-8", "replace") if isinstance(value, bytes)
                             else None if value is None else str(value))
        #: the trace says which subset and zone when the service routes by them
        self.explained = subset is not None or self.settings.locality is not None
        self.figures: Optional[RequestFigures] = None  # the current attempt's endpoint's

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> requests.Response:
        self.budget.request()
        try:
            # _attempt() raises _RetryAttempt only when another attempt is allowed, so each
            # loop ends with a response or with the last attempt's error.
            try:
                return self._attempt(1)  # the common case: no retry machinery at all
            except _RetryAttempt:
                pass
            time.sleep(self.next_backoff)
            retrying = tenacity.Retrying(
                stop=tenacity.stop_after_attempt(self.policy.attempts - 1),
                wait=lambda state: self.next_backoff,  # decided with the retry, in _may_retry
                retry=tenacity.retry_if_exception_type(_RetryAttempt),
                reraise=True,
                sleep=time.sleep,
            )
            for attempt in retrying:
                with attempt:
                    return self._attempt(attempt.retry_state.attempt_number + 1)
        finally:
            self._finish_trace()
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _remaining(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - self.clock()

    def _may_retry(self, number: int, kind: str) -> Optional[str]:
        """None if another attempt may run, else why not."""
        if number >= self.policy.attempts:
            return "no attempts left"
        if kind != "not_sent" and not self.idempotent:
            return f"{self.method} may have reached the server and is not idempotent"
        if not self.replayable:
            return "the body cannot be sent again"
        self.next_backoff = self.policy.backoff(number, random.random())
        remaining = self._remaining()
        if remaining is not None and remaining <= self.next_backoff + _MIN_ATTEMPT_TIME:
            return ("deadline passed" if remaining <= 0
                    else "too little time left before the deadline")
        refused = not self.budget.try_retry()  # taken only for a retry that will run
        if self.figures is not None:
            self.figures.retried(refused)
        return "retry budget exhausted" if refused else None

    def _attempt(self, number: int) -> requests.Response:
        excluded = len(self.tried)
        remaining = self._remaining()
        if remaining is not None and remaining <= 0 and number > 1:
            # The backoff used up the deadline: no attempt starts after it.
            self.trace.attempts[-1].decision = "stop: deadline passed"
            raise self._with_trace(self.last_error or ReadTimeout(
                f"deadline of {self.policy.deadline:g} s passed", request=self.request)) from None
        where = ""
        try:
            if self.lb.closed:
                raise NoEndpointAvailable(self.service, "the load balancer is closed")
            if self.subset_value is None:  # the common case: no context to set up
                lease = self.lb.pick(self.service, self.key, exclude=self.tried)
                if self.explained:
                    where = _explained(self.lb, self.service, lease)
            else:  # the pick and its explanation read the request's subset value
                with context.subset_value(self.subset_value):
                    lease = self.lb.pick(self.service, self.key, exclude=self.tried)
                    if self.explained:
                        where = _explained(self.lb, self.service, lease)
        except NoEndpointAvailable as error:
            self.trace.attempts.append(Attempt(None, "no endpoint", "no_endpoint",
                                               error=str(error), decision="stop"))
            error.request = self.request
            raise self._with_trace(self.last_error or error) from None
        reason = f"picked by {self.strategy_name}" + (
            f", excluding {excluded} tried" if excluded else "") + (f", {where}" if where else "")
        if lease.address in self.tried:
            reason += ", every endpoint tried already"
        record = Attempt(lease.address, reason)
        self.trace.attempts.append(record)
        self.tried.append(lease.address)
        self.figures = lease.stats.figures
        span = None if TRACER is None else start_attempt(self.method, self.service, number, lease)
        begun = self.clock()
        try:
            return self._exchange(number, lease, record)
        except (_RetryAttempt, requests.exceptions.RequestException):
            raise
        except BaseException:  # a bug or an interrupt: never leave the lease open
            lease.done(success=False)
            raise
        finally:
            record.elapsed = self.clock() - begun
            if span is not None:  # OpenTelemetry is installed (tai_lb/otel.py)
                end_attempt(span, record)

    def _exchange(self, number: int, lease: Lease, record: Attempt) -> requests.Response:
        endpoint = lease.endpoint
        remaining = self._remaining()
        if remaining is not None:
            remaining = max(remaining, _MIN_TIMEOUT)
        connect = _seconds_of(self.timeout.connect_timeout)
        timeout = self.timeout if remaining is None else Timeout(
            connect=_clip(connect, remaining),
            read=_clip(_seconds_of(self.timeout.read_timeout), remaining))
        pool_wait = _clip(_clip(self.settings.pool.timeout, connect), remaining)
        cert = tuple(self.cert) if isinstance(self.cert, list) else self.cert
        tls_key = ((self.verify, cert, endpoint.tls_name or self.service)
                   if self.scheme == "https" else None)
        pool = self.lb.pools.pool_for(endpoint.host, endpoint.port, self.scheme,
                                       self.settings.pool, tls_key,
                                       lambda: self._tls(endpoint.tls_name))
        body = self.request.body
        if self.rewind_to is not None:
            body.seek(self.rewind_to)  # type: ignore[union-attr]
        chunked = not (body is None or "Content-Length" in self.request.headers)
        # Every read and send of this attempt, and of a streamed body read later, ends by the
        # deadline (see _deadline.py): a read timeout alone bounds only each wait for data.
        token = DEADLINE.set(None if remaining is None else time.monotonic() + remaining)
        try:
            raw = pool.urlopen(method=self.method, url=self.trace.path, body=body,
                               headers=self.headers, redirect=False, assert_same_host=False,
                               preload_content=False, decode_content=False,
                               retries=_NO_RETRIES, timeout=timeout, chunked=chunked,
                               pool_timeout=pool_wait)  # type: ignore[arg-type]
        except Exception as error:
            lease.done(success=False, kind=error_kind(error))
            kind = "not_sent" if failed_while_connecting(error) else classify(error)
            translated = to_requests_error(error, self.request, self.service, lease.address,
                                           pool_wait)
            return self._failed(number, record, kind, translated)
        finally:
            DEADLINE.reset(token)

        response = self.adapter.build_response(self.request, raw)
        record.outcome, record.status = "response", response.status_code
        status_failed = response.status_code >= 500
        if response.status_code in self.policy.statuses:
            why_not = self._may_retry(number, "status")
            if why_not is None:
                record.decision = f"retry: status {response.status_code}"
                raw.drain_conn()  # keep the connection for the next request
                raw.release_conn()
                lease.done(success=False, status=response.status_code)
                self.last_error = None
                raise _RetryAttempt(record.decision)
            record.decision = f"stop: {why_not}"
        # A redirect's body is left to requests, as a streamed one: resolve_redirects() reads it
        # and, like plain requests, falls back to the raw bytes when it is cut off or cannot be
        # decoded, so a broken redirect body never fails (or retries) the request.
        if not (self.stream or response.is_redirect):
            try:
                response.content  # noqa: B018 - read the body inside the loop
            except (ChunkedEncodingError, requests.exceptions.ConnectionError) as error:
                lease.done(success=False)  # cut off: a transport failure, retried as such
                record.outcome, record.status = "error", None
                return self._failed(number, record, "sent", error)
            except (ContentDecodingError, requests.exceptions.RequestException) as error:
                lease.done(success=False)  # the endpoint sent a body that cannot be decoded
                record.outcome = "error"
                record.error = f"{type(error).__name__}: {error}"
                record.decision = "stop: the response body is invalid"
                raise self._with_trace(error) from None
            lease.done(success=not status_failed,
                       status=response.status_code if status_failed else None)
        else:
            _release_when_read(raw, lease, not status_failed,
                               response.status_code if status_failed else None)
            # A streamed response dropped unread would hold its connection (and, with
            # block=True, its pool slot) and its lease for ever: give both back when it goes.
            weakref.finalize(response, _close_raw, raw)
        if not record.decision:
            record.decision = "done"
        response.lb_trace = self.trace  # type: ignore[attr-defined]
        return response

    def _failed(self, number: int, record: Attempt, kind: str,
                error: BaseException) -> requests.Response:
        record.outcome = "error"
        record.error = f"{type(error).__name__}: {error}"
        self.last_error = error
        why_not = self._may_retry(number, kind)
        if why_not is None:
            record.decision = f"retry: {kind.replace('_', ' ')}"
            raise _RetryAttempt(record.decision)
        record.decision = f"stop: {why_not}"
        raise self._with_trace(error) from None

    def _with_trace(self, error: BaseException) -> BaseException:
        self._finish_trace()
        error.lb_trace = self.trace  # type: ignore[attr-defined]
        return error

    def _finish_trace(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.trace.elapsed = self.clock() - self.started
        self.trace.budget = self.budget.snapshot()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tai-lb: %s", self.trace)

    def _tls(self, tls_name: Optional[str]) -> dict[str, Any]:
        if self.scheme != "https":
            return {}
        name = tls_name or self.service
        tls: dict[str, Any] = {"server_hostname": name}
        if self.verify is False:
            tls["cert_reqs"] = "CERT_NONE"
            tls["assert_hostname"] = False
        else:
            tls["cert_reqs"] = "CERT_REQUIRED"
            tls["assert_hostname"] = name
            if isinstance(self.verify, str):
                where = "ca_cert_dir" if os.path.isdir(self.verify) else "ca_certs"
                tls[where] = self.verify
            else:
                tls["ca_certs"] = extract_zipped_paths(  # type: ignore[no-untyped-call]
                    DEFAULT_CA_BUNDLE_PATH)
        if self.cert is not None:
            if isinstance(self.cert, tuple):
                tls["cert_file"], tls["key_file"] = (os.fsdecode(p) for p in self.cert)
            else:
                tls["cert_file"] = os.fsdecode(self.cert)
        return tls

