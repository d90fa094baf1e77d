"""A dnspython name server whose queries a stopping discovery thread can cut short.

dnspython's own waits for an answer block for the query's whole timeout (up to a minute), and a
socket that another thread shuts down does not end them cleanly.  This name server does the same
exchange with dnspython's public send and receive functions, but waits in slices of
:data:`SLICE` seconds and gives up, with :class:`Stopped`, as soon as its ``stopping`` event is
set.  Imported only when DNS discovery is used (dnspython is an optional extra).
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import threading
import time
from typing import Any, Optional

import dns.exception
import dns.inet
import dns.message
import dns.nameserver
import dns.query

__all__ = ["SLICE", "StoppableNameserver", "Stopped"]

#: seconds between two looks at the stopping event while waiting for a name server
SLICE = 0.1


class Stopped(OSError):
    """The query was abandoned because discovery is stopping.

    An ``OSError``, so that dnspython's resolver drops the server and gives up at once instead
    of trying it again.
    """


class StoppableNameserver(dns.nameserver.Do53Nameserver):
    """DNS over UDP (TCP when an answer is truncated), abandoned when ``stopping`` is set."""

    def __init__(self, address: str, port: int, stopping: threading.Event) -> None:
        super().__init__(address, port)
        self.stopping = stopping

    def query(self, request: dns.message.QueryMessage, timeout: float,
              source: Optional[str], source_port: int, max_size: bool,
              one_rr_per_rrset: bool = False,
              ignore_trailing: bool = False) -> dns.message.Message:
        """Send ``request`` and return the answer, as dnspython's ``Do53Nameserver`` does."""
        self._check()
        family = dns.inet.af_for_address(self.address)
        destination: Any = ((self.address, self.port) if family == socket.AF_INET
                            else (self.address, self.port, 0, 0))
        expiration = time.time() + timeout  # dnspython's expirations are wall-clock times
        kind = socket.SOCK_STREAM if max_size else socket.SOCK_DGRAM
        with socket.socket(family, kind) as sock:
            sock.setblocking(False)
            if source is not None or source_port:
                sock.bind(dns.inet.low_level_address_tuple((source or (
                    "0.0.0.0" if family == socket.AF_INET else "::"), source_port), family))
            if max_size:
                return self._tcp(sock, destination, request, expiration, one_rr_per_rrset,
                                 ignore_trailing)
            return self._udp(sock, destination, request, expiration, one_rr_per_rrset,
                             ignore_trailing)

    def _check(self) -> None:
        if self.stopping.is_set():
            raise Stopped("discovery is stopping")

    def _udp(self, sock: socket.socket, destination: Any, request: dns.message.QueryMessage,
             expiration: float, one_rr_per_rrset: bool,
             ignore_trailing: bool) -> dns.message.Message:
        dns.query.send_udp(sock, request, destination, expiration)
        while True:
            self._check()
            # One answer on one socket, waited for in slices: an answer that takes longer
            # than a slice still arrives (a query sent again would get a new ID and socket).
            until = min(expiration, time.time() + SLICE)
            try:
                response, _ = dns.query.receive_udp(
                    sock, destination, until, ignore_unexpected=True,
                    one_rr_per_rrset=one_rr_per_rrset, keyring=request.keyring,
                    request_mac=request.mac, ignore_trailing=ignore_trailing,
                    raise_on_truncation=True, ignore_errors=True, query=request)
            except dns.exception.Timeout:
                if until >= expiration:
                    raise
                continue
            message: dns.message.Message = response
            return message

    def _tcp(self, sock: socket.socket, destination: Any, request: dns.message.QueryMessage,
             expiration: float, one_rr_per_rrset: bool,
             ignore_trailing: bool) -> dns.message.Message:
        error = sock.connect_ex(destination)
        if error in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            self._wait(sock, selectors.EVENT_WRITE, expiration)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        dns.query.send_tcp(sock, request, expiration)
        self._wait(sock, selectors.EVENT_READ, expiration)  # then the answer comes at once
        response, _ = dns.query.receive_tcp(sock, expiration, one_rr_per_rrset,
                                            request.keyring, request.mac, ignore_trailing)
        if not request.is_response(response):
            raise dns.query.BadResponse
        message: dns.message.Message = response
        return message

    def _wait(self, sock: socket.socket, event: int, expiration: float) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(sock, event)
            while True:
                self._check()
                remaining = expiration - time.time()
                if remaining <= 0:
                    raise dns.exception.Timeout
                if selector.select(min(remaining, SLICE)):
                    return
