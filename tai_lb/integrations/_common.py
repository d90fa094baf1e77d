"""What the Flask and Django integrations share: the process's balancer, the web settings, the
client's address behind trusted proxies, and the status page made on demand."""

from __future__ import annotations

import atexit
import ipaddress
import logging
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union, cast

from .. import _forksafe
from .._settings import check_int, check_number, shown
from ..balancer import LoadBalancer
from ..config import TOKEN_PATTERN, LoadBalancerConfig, load_config
from ..exceptions import ConfigError, LoadBalancerError
from ..web import DEFAULT_REFRESH, StatusApp

log = logging.getLogger(__name__)

ConfigSource = Union[Mapping[str, Any], str, LoadBalancerConfig]
"""What ``TAI_LB`` may be: a config dict, the path of a config file, or a built config."""

SETTING = "TAI_LB"
TRUSTED_PROXY_HEADER = "TAI_LB_TRUSTED_PROXY_HEADER"
TRUSTED_PROXIES = "TAI_LB_TRUSTED_PROXIES"
USER_ID = "TAI_LB_USER_ID"


def balancer_config(source: object) -> LoadBalancerConfig:
    """``TAI_LB`` built and checked, with the setting's name on the path of any error."""
    if source is None:
        raise ConfigError(SETTING, "must be set: a config dict or the path of a config file")
    try:
        return load_config(source)  # type: ignore[arg-type]  # load_config checks its type
    except ConfigError as error:
        path = f"{SETTING}.{error.path}" if error.path else SETTING
        raise ConfigError(path, error.reason) from None


@dataclass(frozen=True)
class WebSettings:
    """How an integration reads the incoming request (the ``TAI_LB_...`` settings).

    :param trusted_proxy_header: the header your own proxies write the client's address to
        (``X-Forwarded-For``, ``X-Real-IP``), or None to use the peer's address.
    :param trusted_proxies: how many proxies of yours append to that header: the client is the
        address that many hops from the right.
    :param user_id: a function of the framework's request that returns the user's id or None,
        called only when a ``user_id`` key is needed; None for the integration's default.
    """

    trusted_proxy_header: Optional[str] = None
    trusted_proxies: int = 1
    user_id: Optional[Callable[[Any], Optional[Any]]] = None

    def __post_init__(self) -> None:
        header = self.trusted_proxy_header
        if header is not None and (not isinstance(header, str) or not TOKEN_PATTERN.match(header)):
            raise ConfigError(TRUSTED_PROXY_HEADER,
                              f"must be a header name (an HTTP token) or None, got {shown(header)}")
        check_int(self.trusted_proxies, TRUSTED_PROXIES, 1, 64)
        if self.user_id is not None and not callable(self.user_id):
            raise ConfigError(USER_ID, f"must be a function of the request or None, "
                                       f"got {shown(self.user_id)}")

    @classmethod
    def read(cls, get: Callable[[str, Any], Any]) -> WebSettings:
        """Built from a framework's settings: ``get(name, default)``."""
        return cls(get(TRUSTED_PROXY_HEADER, None), get(TRUSTED_PROXIES, 1), get(USER_ID, None))

    def client_ip(self, remote_addr: Optional[str], header: Callable[[str], Optional[str]],
                  ) -> Optional[str]:
        """The client's address: ``trusted_proxies`` hops from the right of the trusted header,
        or ``remote_addr`` when there is no such header, too few hops or no address there."""
        if self.trusted_proxy_header is not None:
            value = header(self.trusted_proxy_header)
            hops = [hop.strip() for hop in value.split(",")] if value else []
            if len(hops) >= self.trusted_proxies:
                hop = hops[-self.trusted_proxies]
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    pass  # not an address: a client's forgery, or a proxy we do not know
        return remote_addr or None


class Deferred(Mapping[str, str]):
    """A mapping read from ``make()`` on its first use: a request's cookies or headers, parsed
    only when a routing key needs them."""

    __slots__ = ("_made", "_make")

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._made: Optional[Mapping[str, str]] = None

    def _mapping(self) -> Mapping[str, str]:
        if self._made is None:
            self._made = cast(Mapping[str, str], self._make())
        return self._made

    def __getitem__(self, key: str) -> str:
        return self._mapping()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())


class ProcessBalancer:
    """The balancer of this process: made from the config on first use, one per process.

    A forked child (a gunicorn or uWSGI worker) never uses its parent's balancer: it makes its
    own on first use, and closes the copy it inherited (whose threads the fork restarted) on the
    first call of :meth:`get` or :meth:`drop_inherited`.  Closed at interpreter exit.
    """

    def __init__(self, config: Callable[[], LoadBalancerConfig]) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._balancer: Optional[LoadBalancer] = None
        self._inherited: list[LoadBalancer] = []
        self._closed = False
        _forksafe.after_fork_in_child(self, ProcessBalancer._reset_after_fork)
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def created(self) -> bool:
        """True when this process has made its balancer."""
        return self._balancer is not None

    def get(self) -> LoadBalancer:
        """The process's balancer, made now if it is the first use in this process."""
        lb = self._balancer
        if lb is not None:
            return lb
        self.drop_inherited()
        with self._lock:
            if self._closed:
                raise LoadBalancerError("the balancer of this app was closed")
            if self._balancer is None:
                self._balancer = LoadBalancer.from_config(self._config())
            return self._balancer

    def drop_inherited(self) -> None:
        """Close the parent's balancer inherited by a fork, if any (cheap when there is none)."""
        if not self._inherited:
            return
        with self._lock:
            inherited, self._inherited = self._inherited, []
        for lb in inherited:  # its locks were replaced in the child: closing it is safe
            lb.close()

    def close(self) -> None:
        """Close the balancer; a later :meth:`get` raises :class:`~tai_lb.LoadBalancerError`."""
        with self._lock:
            self._closed = True
            lb, self._balancer = self._balancer, None
        self.drop_inherited()
        if lb is not None:
            lb.close()

    def _reset_after_fork(self) -> None:
        # Never close here: this runs inside os.fork(), maybe before the balancer's own reset.
        _forksafe.inherited(self._lock)
        self._lock = threading.Lock()
        if self._balancer is not None:
            self._inherited.append(self._balancer)
            self._balancer = None


def _close_at_exit(ref: weakref.ReferenceType[ProcessBalancer]) -> None:
    process = ref()
    if process is not None:
        try:
            process.close()
        except Exception:  # at exit, nobody is left to handle it
            log.exception("tai-lb: closing the balancer at exit failed")


class LazyStatusPage:
    """The status page (:mod:`tai_lb.web`) of the process's balancer, which it makes on demand.

    Mounting it makes no balancer: a ``--preload`` master that mounts the page owns none.
    """

    def __init__(self, balancer: Callable[[], LoadBalancer],
                 refresh: float = DEFAULT_REFRESH) -> None:
        self._balancer = balancer
        self.refresh = check_number(refresh, "refresh", 0, 86400, low_open=False)

    def render(self, method: str, query: str) -> tuple[int, list[tuple[str, str]], bytes]:
        """Answer one request for the page: ``(status code, headers, body)``."""
        return StatusApp(self._balancer(), self.refresh).render(method, "/", query)
