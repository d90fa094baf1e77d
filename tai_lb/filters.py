"""Endpoint filters: small predicates that compose with ``&``, ``|`` and ``~``.

>>> from tai_lb.filters import in_zone, has_labels
>>> wanted = in_zone("eu-1a") & ~has_labels(canary="yes")
>>> registry.find("users", where=wanted)     # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable, Optional

from .endpoint import Endpoint

__all__ = ["EndpointFilter", "any_endpoint", "has_labels", "in_region", "in_zone", "with_version"]


class EndpointFilter:
    """A predicate over endpoints; combine filters with ``&``, ``|`` and ``~``."""

    __slots__ = ("_description", "_predicate")

    def __init__(self, predicate: Callable[[Endpoint], bool], description: str) -> None:
        self._predicate = predicate
        self._description = description

    def __call__(self, endpoint: Endpoint) -> bool:
        return self._predicate(endpoint)

    def __and__(self, other: EndpointFilter) -> EndpointFilter:
        return EndpointFilter(lambda e: self(e) and other(e), f"({self} & {other})")

    def __or__(self, other: EndpointFilter) -> EndpointFilter:
        return EndpointFilter(lambda e: self(e) or other(e), f"({self} | {other})")

    def __invert__(self) -> EndpointFilter:
        return EndpointFilter(lambda e: not self(e), f"~{self}")

    def __repr__(self) -> str:
        return self._description


def any_endpoint() -> EndpointFilter:
    """Match every endpoint."""
    return EndpointFilter(lambda e: True, "any_endpoint()")


def in_zone(zone: str) -> EndpointFilter:
    """Match endpoints in the availability zone ``zone``."""
    return EndpointFilter(lambda e: e.zone == zone, f"in_zone({zone!r})")


def in_region(region: str) -> EndpointFilter:
    """Match endpoints in ``region``."""
    return EndpointFilter(lambda e: e.region == region, f"in_region({region!r})")


def with_version(version: str) -> EndpointFilter:
    """Match endpoints running ``version``."""
    return EndpointFilter(lambda e: e.version == version, f"with_version({version!r})")


def has_labels(**labels: str) -> EndpointFilter:
    """Match endpoints whose labels include every given ``name=value`` pair."""
    wanted = dict(labels)
    return EndpointFilter(lambda e: all(e.labels.get(k) == v for k, v in wanted.items()),
                          f"has_labels({', '.join(f'{k}={v!r}' for k, v in wanted.items())})")


def metadata_filter(zone: Optional[str] = None, region: Optional[str] = None,
                    version: Optional[str] = None,
                    labels: Optional[dict[str, str]] = None) -> EndpointFilter:
    """The conjunction of the given metadata conditions (all of them when none is given)."""
    result = any_endpoint()
    if zone is not None:
        result = result & in_zone(zone)
    if region is not None:
        result = result & in_region(region)
    if version is not None:
        result = result & with_version(version)
    if labels:
        result = result & has_labels(**labels)
    return result
