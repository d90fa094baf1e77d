"""A request's deadline enforced on every socket read and send, not only per timeout.

urllib3's read timeout bounds each wait for data, so a server that trickles a byte now and then
(in the status line, the headers or the body) keeps a request going past any deadline.  The
connections of the balancer's pools therefore read their responses through a buffered reader
whose raw reads shorten the socket's timeout to the time left before the deadline, and fail
with ``socket.timeout`` once it has passed; sends are shortened the same way.  urllib3 turns
that timeout into its ``ReadTimeoutError`` (or a ``ProtocolError``) and closes the connection,
so a connection cut at the deadline is never reused.

No thread is involved: the deadline of the request being sent is passed down in a context
variable, set by the adapter around ``urlopen``, and the response's reader keeps it, so a
streamed body read after ``send()`` returned is bounded by the same deadline.  Without a
deadline nothing changes: responses are read as http.client reads them.
"""

from __future__ import annotations

import contextvars
import http.client
import io
import socket
import time
from typing import Any, Optional

from urllib3.connection import HTTPConnection, HTTPSConnection

__all__ = ["DEADLINE", "DeadlineHTTPConnection", "DeadlineHTTPSConnection"]

DEADLINE: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar(
    "tai_lb_deadline", default=None)
"""The ``time.monotonic()`` deadline of the request being sent in this context, or None."""


def _shorten(sock: Any, deadline: float) -> None:
    """Cut ``sock``'s timeout to the time left before ``deadline``; raise if none is left."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise socket.timeout("the request's deadline passed")
    timeout = sock.gettimeout()
    if timeout is None or timeout > remaining:
        sock.settimeout(remaining)


class _DeadlineRaw(io.RawIOBase):
    """A socket's raw reader whose every read ends by the deadline."""

    def __init__(self, sock: Any, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # counts as one of the socket's files
        self._deadline = deadline

    def readinto(self, buffer: Any) -> Optional[int]:
        _shorten(self._sock, self._deadline)
        return self._raw.readinto(buffer)  # type: ignore[no-any-return]

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()  # type: ignore[no-any-return]

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """What http.client's response needs of its socket: ``makefile``, bounded by a deadline."""

    def __init__(self, sock: Any, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineRaw(self._sock, self._deadline))


class _DeadlineHTTPResponse(http.client.HTTPResponse):
    """http.client's response, read through a deadline-bound reader when a deadline is set."""

    def __init__(self, sock: Any, debuglevel: int = 0, method: Optional[str] = None,
                 url: Optional[str] = None) -> None:
        deadline = DEADLINE.get()
        # http.client calls only sock.makefile("rb"), which _DeadlineSocket provides.
        reader: Any = sock if deadline is None else _DeadlineSocket(sock, deadline)
        super().__init__(reader, debuglevel, method, url)


class _DeadlineSendMixin:
    """Sends that end by the deadline of the request being sent."""

    response_class: type[http.client.HTTPResponse] = _DeadlineHTTPResponse

    def send(self, data: Any) -> None:
        deadline = DEADLINE.get()
        sock = getattr(self, "sock", None)
        if deadline is not None and sock is not None:
            _shorten(sock, deadline)
        super().send(data)  # type: ignore[misc]


class DeadlineHTTPConnection(_DeadlineSendMixin, HTTPConnection):
    """urllib3's HTTP connection, bounded by the request's deadline."""


class DeadlineHTTPSConnection(_DeadlineSendMixin, HTTPSConnection):
    """urllib3's HTTPS connection, bounded by the request's deadline."""
