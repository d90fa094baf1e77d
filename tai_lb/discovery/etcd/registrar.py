"""Self-registration: :class:`EtcdRegistrar` keeps this instance's key in etcd under a lease.

It puts the key with a lease, keeps the lease alive on a named daemon thread, registers again
when the lease is lost, and deletes the key on close and at interpreter exit; a forked child
neither renews nor deletes its parent's registration.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from ... import _forksafe
from ..._settings import check_int
from ...endpoint import Endpoint
from .client import EtcdClient, interrupt
from .errors import EtcdError
from .provider import EtcdConfig, service_prefix

__all__ = ["EtcdRegistrar"]

log = logging.getLogger(__name__)


class EtcdRegistrar:
    """Registers this instance in etcd under a lease, and keeps it registered.

    The key ``<prefix>/<service>/<instance_id>`` is put with a lease of ``ttl`` seconds, kept
    alive every third of the TTL on a named daemon thread. When the lease is lost (etcd was down
    for longer than the TTL, or the lease was revoked), a new lease is granted and the key put
    again. :meth:`close`, and interpreter exit, delete the key.

    A forked child neither keeps the registration alive nor deletes it: the registration
    belongs to the process that made it (the master of a pre-fork server, typically). A child
    may :meth:`start` the registrar again, which makes a registration (and a lease) of its own.

    :param urls: client URLs of etcd's members.
    :param service: the service this instance serves.
    :param endpoint: this instance's address (and metadata), as clients should reach it.
    :param instance_id: the last part of the key; by default the endpoint's address, so a
        restarted instance takes over its own key rather than adding a second one.
    """

    def __init__(self, urls: Sequence[str], service: str,
                 endpoint: Union[str, Mapping[str, Any], Endpoint], *,
                 prefix: str = "/services", ttl: int = 10, instance_id: Optional[str] = None,
                 timeout: float = 2.0) -> None:
        check_int(ttl, "ttl", 1, 3600, what="an integer number of seconds")
        # The checks (and messages) of the etcd discovery setting: a ConfigError naming the
        # argument, rather than a string of URLs taken as a list of one-letter URLs.
        urls = EtcdConfig(urls=urls, prefix=prefix, timeout=timeout).urls  # type: ignore[arg-type]
        self.endpoint = Endpoint.from_value(endpoint)
        self.service = service
        self.key = service_prefix(prefix, service) + (instance_id or self.endpoint.address)
        self.ttl = ttl
        self.client = EtcdClient(urls, min(timeout, ttl / 3))
        self.lease = 0
        self.registrations = 0
        self.keepalives = 0
        self.errors = 0
        self.last_error: Optional[str] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._owner = os.getpid()
        ref = weakref.ref(self)
        self._exit_hook = lambda: _close_ref(ref)
        _forksafe.after_fork_in_child(self, EtcdRegistrar._forget_after_fork)

    def value(self) -> str:
        """The JSON stored under the key (SPEC's layout)."""
        endpoint = self.endpoint
        data: dict[str, Any] = {"address": endpoint.address, "weight": endpoint.weight}
        for name in ("zone", "region", "version", "tls_name"):
            if getattr(endpoint, name) is not None:
                data[name] = getattr(endpoint, name)
        if endpoint.priority:
            data["priority"] = endpoint.priority
        if endpoint.labels:
            data["labels"] = dict(endpoint.labels)
        return json.dumps(data, sort_keys=True)

    def start(self) -> EtcdRegistrar:
        """Register now if etcd answers (else keep trying), and keep the registration alive."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self._owner = os.getpid()  # the process whose registration this is
        try:
            self._register()
        except EtcdError as error:
            self._error(error)
        atexit.register(self._exit_hook)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"tai-lb-etcd-registrar-{self.service}")
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop keeping the lease alive and delete the key (revoking the lease)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            interrupt(thread)
            thread.join(1.0)
        atexit.unregister(self._exit_hook)
        with self._lock:
            lease, self.lease = self.lease, 0
        if os.getpid() == self._owner and lease:
            try:
                self.client.revoke(lease)  # deletes the key with it
            except EtcdError as error:
                log.warning("tai-lb: cannot revoke the lease of %s (it expires in %d s): %s",
                            self.key, self.ttl, error)
        self.client.close()

    def __enter__(self) -> EtcdRegistrar:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _forget_after_fork(self) -> None:
        _forksafe.inherited(self._thread, self._stop, self._lock)  # never freed in the child
        self._thread = None
        self._stop = threading.Event()  # its lock may have been held by the parent's thread
        self._stop.set()
        self._lock = threading.Lock()
        self.lease = 0  # the parent's, which the child must neither renew nor revoke

    def _register(self) -> None:
        lease = self.client.grant(self.ttl)
        self.client.put(self.key, self.value(), lease)
        with self._lock:
            self.lease = lease
        self.registrations += 1
        log.info("tai-lb: registered %s in etcd (lease %x, %d s)", self.key, lease, self.ttl)

    def _error(self, error: Exception) -> None:
        if self._stop.is_set():  # a call cut short by close(): not etcd's failure
            return
        self.errors += 1
        # One warning when etcd starts failing, not one every third of the TTL while it is
        # down; the rest at DEBUG, and the return at INFO.
        level = logging.DEBUG if self.last_error is not None else logging.WARNING
        self.last_error = str(error)
        log.log(level, "tai-lb: etcd registration of %s: %s", self.key, error)

    def _succeeded(self) -> None:
        if self.last_error is not None:
            log.info("tai-lb: etcd registration of %s works again", self.key)
            self.last_error = None

    def _run(self) -> None:
        period = self.ttl / 3
        while not self._stop.wait(period):
            try:
                with self._lock:
                    lease = self.lease
                if lease and self.client.keepalive(lease) > 0:
                    self.keepalives += 1
                    self._succeeded()
                    continue
                if lease:
                    log.warning("tai-lb: the etcd lease of %s was lost; registering again",
                                self.key)
                self._register()
                self._succeeded()
            except EtcdError as error:
                self._error(error)
            except Exception:  # the thread must outlive any bug
                self.errors += 1
                log.exception("tai-lb: etcd registration of %s failed unexpectedly", self.key)

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state of the registration."""
        return {"key": self.key, "lease": self.lease, "ttl": self.ttl,
                "registrations": self.registrations, "keepalives": self.keepalives,
                "errors": self.errors,
                "last_error": self.last_error, "running": self._thread is not None}


def _close_ref(ref: weakref.ReferenceType[EtcdRegistrar]) -> None:
    registrar = ref()
    if registrar is not None:
        registrar.close()
