"""One open etcd watch: the stream of its messages, read line by line.

:class:`WatchStream` turns the gateway's streamed answer into one message at a time and raises
:class:`~tai_lb.discovery.etcd.WatchCompacted`, :class:`~tai_lb.discovery.etcd.WatchIdle` or
:class:`~tai_lb.discovery.etcd.EtcdError` when the watch ends; the client opens it
(:meth:`EtcdClient.watch <tai_lb.discovery.etcd.EtcdClient.watch>`) and
:func:`~tai_lb.discovery.etcd.interrupt` cuts it from another thread.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import urllib3

from .errors import EtcdError, WatchCompacted, WatchIdle

__all__ = ["WATCH_IDLE", "WatchStream"]

#: a watch silent for this long is opened again from the next revision, in case etcd hangs
#: with the connection still up (a connection cut without a word is found by TCP keep-alive)
WATCH_IDLE = 300.0


class WatchStream:
    """One open watch: its messages, one JSON object per line; closable from another thread."""

    def __init__(self, response: urllib3.BaseHTTPResponse, url: str) -> None:
        self.url = url
        self._response = response
        self._chunks = response.stream(65536)
        self._buffer = b""

    def next_message(self) -> Optional[dict[str, Any]]:
        """The next message's ``result``; None when the stream ends.

        Raises :class:`WatchCompacted` on a compaction and :class:`EtcdError` on an error
        message, a cut connection or a silence longer than the idle time.
        """
        while b"\n" not in self._buffer:
            try:
                chunk = next(self._chunks, b"")
            except urllib3.exceptions.ReadTimeoutError:
                raise WatchIdle(f"etcd watch on {self.url} idle; watching again") from None
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise EtcdError(f"etcd watch on {self.url} lost: {error}") from None
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise EtcdError(f"etcd watch on {self.url}: not JSON: {line[:200]!r}") from None
        if "error" in message:
            raise EtcdError(f"etcd watch on {self.url}: {message['error']}")
        result: dict[str, Any] = message.get("result", {})
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            raise WatchCompacted(f"etcd watch on {self.url}: revision compacted (up to "
                                 f"{compacted})")
        if result.get("canceled"):
            raise EtcdError(f"etcd watch on {self.url} cancelled: "
                            f"{result.get('cancel_reason', 'no reason given')}")
        return result

    def close(self) -> None:
        """End the stream (its connection is not reused)."""
        self._response.close()
        self._response.release_conn()

