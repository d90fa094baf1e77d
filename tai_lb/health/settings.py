"""The ``health_check`` settings of a service: :class:`HealthCheckConfig`.

What to probe (an HTTP path and the statuses that pass, a TCP connect, a gRPC health service or
a Python function), how often and how long a probe may take, the thresholds that flip an
endpoint's health, the grace of new endpoints, traffic-proven health and the panic threshold;
every value is checked when the settings are built, and a bad one is a
:class:`~tai_lb.ConfigError` naming its key.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from .._settings import (
    MAX_SECONDS,
    MIN_INTERVAL,
    Settings,
    check_bool,
    check_int,
    check_number,
    doc,
    is_int,
    shown,
)
from ..endpoint import Endpoint
from ..exceptions import ConfigError

__all__ = ["HealthCheckConfig", "ProbeFunction"]

ProbeFunction = Callable[[Endpoint], bool]
"""A ``function`` check: called with the endpoint, it returns whether the endpoint passes
(raising counts as a failure)."""

_STATUS_RANGE = re.compile(r"\s*([0-9]{3})\s*-\s*([0-9]{3})\s*")  # ASCII digits only


def _statuses(value: Any, path: str) -> frozenset[int]:
    items = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
    result: set[int] = set()
    for item in items:
        if isinstance(item, str):
            match = _STATUS_RANGE.fullmatch(item)
            if match is None:
                raise ConfigError(path, f"must be statuses (200) or ranges (\"200-399\"), got "
                                        f"{shown(item)}")
            low, high = int(match[1]), int(match[2])
            # Checked before the range is built: "200-999999999" would take gigabytes.
            if not 100 <= low <= high <= 599:
                raise ConfigError(path, f"a range must go up from 100 to at most 599, got "
                                        f"{shown(item)}")
            result.update(range(low, high + 1))
        elif not is_int(item):
            raise ConfigError(path, f"must be statuses (200) or ranges (\"200-399\"), got "
                                    f"{shown(item)}")
        else:
            result.add(item)
    if not result or min(result) < 100 or max(result) > 599:
        raise ConfigError(path, f"must be HTTP statuses from 100 to 599, got {shown(value)}")
    return frozenset(result)


def _grpc_installed() -> bool:
    """True if grpcio and grpcio-health-checking can be imported (neither is imported here)."""
    return all(importlib.util.find_spec(name) is not None for name in ("grpc", "grpc_health"))


@dataclass(frozen=True)
class HealthCheckConfig(Settings):
    """The ``health_check`` settings of a service.

    :param type: ``"http"`` (GET ``path``), ``"tcp"`` (connect), ``"grpc"`` (the standard
        ``grpc.health.v1`` Health/Check call; needs the ``grpc`` extra) or ``"function"``
        (Python only).
    :param path: the path an HTTP check requests; required for ``"http"``.
    :param service: the name a gRPC check asks about (``""``, the default: the whole server).
    :param expected_statuses: statuses that pass an HTTP check (default 200-399, as HAProxy).
    :param interval: seconds between checks of one endpoint.
    :param jitter: each wait is ``interval`` times a random factor in ``1 +- jitter``.
    :param timeout: seconds a check may take.
    :param healthy_threshold: passed checks in a row that make an unhealthy endpoint healthy.
    :param unhealthy_threshold: failed checks in a row that make a healthy endpoint unhealthy.
    :param grace: seconds after an endpoint appears during which failed checks do not count.
    :param history: checks remembered per endpoint (shown by ``status()``).
    :param skip_if_traffic: skip the probe of an endpoint that answered real traffic
        successfully within the last interval (at most ``max_skips`` times in a row).
    :param max_skips: probes in a row that real traffic may replace; the next one runs whatever
        the traffic, so an endpoint failing its health endpoint while it serves is out within
        ``interval x (max_skips + unhealthy_threshold)``.  0 probes at every interval.
    :param panic_threshold: when the healthy share of a service falls strictly below this, balance
        over all its endpoints (Envoy's panic mode); 0 never does, failing closed instead.
    :param verify: for ``https`` services: verify the certificate (True), not (False), or
        against this CA bundle path.  gRPC checks always verify (False fails them).
    :param function: for ``"function"`` checks: called with the endpoint; True passes.
    :param share: share the checks with the other processes of this host
        (:mod:`tai_lb.health.sharing`): False (the default) probes alone, True shares through
        files in ``/dev/shm/tai-lb-<uid>/``, an absolute path through files in that (existing)
        directory.
    """

    type: Literal["http", "tcp", "grpc", "function"] = field(default="http", metadata=doc(
        allowed='"http", "tcp" or "grpc" ("function" from Python only)'))
    path: Optional[str] = field(default=None, metadata=doc(
        allowed="a path starting with /; required for http"))
    service: str = field(default="", metadata=doc(allowed="a string of at most 1000 "
                                                          "characters"))
    expected_statuses: frozenset[int] = field(default=frozenset(range(200, 400)), metadata=doc(
        allowed='a list of statuses (200) and ranges ("200-399"), 100 to 599',
        default='"200-399"'))
    interval: float = field(default=1.0, metadata=doc("seconds", low=MIN_INTERVAL,
                                                      high=MAX_SECONDS))
    jitter: float = field(default=0.1, metadata=doc("share", low=0, high=1))
    timeout: float = field(default=0.5, metadata=doc("seconds", low=0, high=MAX_SECONDS,
                                                     low_open=True))
    healthy_threshold: int = field(default=2, metadata=doc("checks", low=1, high=1000))
    unhealthy_threshold: int = field(default=2, metadata=doc("checks", low=1, high=1000))
    grace: float = field(default=0.0, metadata=doc("seconds", low=0, high=MAX_SECONDS))
    history: int = field(default=10, metadata=doc("checks", low=1, high=1000))
    skip_if_traffic: bool = field(default=True, metadata=doc(allowed="true or false"))
    max_skips: int = field(default=2, metadata=doc("probes", low=0, high=1000))
    panic_threshold: float = field(default=0.5, metadata=doc("share", low=0, high=1))
    verify: Union[bool, str] = field(default=True, metadata=doc(
        allowed="true, false or a CA bundle path"))
    function: Optional[ProbeFunction] = None
    share: Union[bool, str] = field(default=False, metadata=doc(
        allowed="true, false or an absolute directory path"))

    def __post_init__(self) -> None:
        if self.type not in ("http", "tcp", "grpc", "function"):
            raise ConfigError("type", f"must be http, tcp, grpc or function, got "
                                      f"{shown(self.type)}")
        if not isinstance(self.service, str) or len(self.service) > 1000:
            raise ConfigError("service", f"must be a gRPC service name (a string of at most 1000 "
                                         f"characters), got {shown(self.service)}")
        if self.type == "grpc" and not _grpc_installed():
            raise ConfigError("type", "a grpc check needs grpcio and grpcio-health-checking: "
                                      "pip install 'tai-lb[grpc]'")
        if self.type == "http" and (not isinstance(self.path, str)
                                    or not self.path.startswith("/")):
            raise ConfigError("path", f"an http check needs a path starting with '/', got "
                                      f"{shown(self.path)}")
        if self.type == "function" and not callable(self.function):
            raise ConfigError("function", f"a function check needs a callable, got "
                                          f"{shown(self.function)}")
        object.__setattr__(self, "expected_statuses",
                           _statuses(self.expected_statuses, "expected_statuses"))
        check_number(self.interval, "interval", MIN_INTERVAL, low_open=False)
        check_number(self.jitter, "jitter", 0.0, 1.0, low_open=False, what="a share")
        check_number(self.timeout, "timeout")
        check_number(self.grace, "grace", low_open=False)
        check_number(self.panic_threshold, "panic_threshold", 0.0, 1.0, low_open=False,
                     what="a share")
        for name in ("healthy_threshold", "unhealthy_threshold", "history"):
            check_int(getattr(self, name), name, 1, 1000)
        check_int(self.max_skips, "max_skips", 0, 1000)
        check_bool(self.skip_if_traffic, "skip_if_traffic")
        if not isinstance(self.verify, (bool, str)):
            raise ConfigError("verify", f"must be true, false or a CA bundle path, got "
                                        f"{shown(self.verify)}")
        self._check_share()

    def _check_share(self) -> None:
        share: Any = self.share
        if isinstance(share, os.PathLike):
            share = os.fspath(share)
            object.__setattr__(self, "share", share)
        if isinstance(share, bool):
            return
        if (not isinstance(share, str) or not os.path.isabs(share) or "\0" in share
                or len(share) > 4096):
            raise ConfigError("share", f"must be true, false or an absolute directory path, "
                                       f"got {shown(share)}")

    python_only = ("function",)

    @classmethod
    def from_config(cls, value: Any) -> HealthCheckConfig:
        """Build from the ``health_check`` mapping of a configuration."""
        if isinstance(value, Mapping) and value.get("type") == "function":
            raise ConfigError("type", "function checks are set from Python "
                                      "(HealthCheckConfig(type='function', function=...))")
        return super().from_config(value)
