"""Subsets: a request's attribute chooses the endpoints whose metadata equals it.

The service key ``subset`` names where a request's value comes from (``key``: the same syntax
as ``hash_key``) and which endpoint attribute it is matched with (``by``: ``version``, ``zone``,
``region`` or ``label:NAME``).  :class:`Subsets` is the stage: once per route build it groups the
candidates by that attribute and prepares, for each value, a picker (zone-aware when the service
has ``locality``) and a route of its own; per request, its :class:`SubsetSelector` looks the
value up in that table, so a pick costs one dict lookup more, never a scan.

* a value with matching candidates: the pick is among them (a hashing strategy hashes within
  them; affinity keeps keys within them, re-picking a key pinned outside);
* a value with none: ``fallback`` ``"any"`` picks over the whole route, ``"fail"`` raises
  :class:`~tai_lb.NoEndpointAvailable` naming the subset and the value;
* no value: the whole route.

Where the value comes from: an HTTP request's header, cookie or function (``key``), else the
routing context (:func:`tai_lb.context.routing_context`: its ``subset``, or its ``user_id`` or
``source_ip`` for those keys).  ``lb.pick()`` reads the routing context.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from .. import context
from .._settings import Settings, doc, keyed_settings, shown
from ..endpoint import LABEL_KEY_PATTERN
from ..exceptions import ConfigError, NoEndpointAvailable
from ..strategies import EXCLUDING
from .picking import excluding, selected
from .route import Route
from .slow_start import ramped_over

if TYPE_CHECKING:
    from ..config import KeySource
    from ..endpoint import Endpoint
    from ..stats import EndpointStats
    from ..strategies import Picker, RoutingKey
    from .locality import Locality, ZoneSplit
    from .route import RouteState, Selector

__all__ = ["SubsetConfig", "SubsetRoute", "SubsetSelector", "Subsets", "pick_reason",
           "subsets_of"]

_KEYS = ("key", "by", "fallback")


@dataclass(frozen=True)
class SubsetConfig(Settings):
    """Routing by endpoint metadata (the service key ``subset``).

    :param key: where a request's value comes from: ``"header:NAME"``, ``"cookie:NAME"``,
        ``"source_ip"``, ``"user_id"`` or (from Python) a function of the request; a
        :class:`~tai_lb.config.KeySource` once built.
    :param by: the endpoint attribute matched: ``"version"``, ``"zone"``, ``"region"`` or
        ``"label:NAME"``.
    :param fallback: a value no candidate has: ``"any"`` (the whole route) or ``"fail"``
        (:class:`~tai_lb.NoEndpointAvailable`).
    """

    key: Union[KeySource, str, Callable[[Any], Optional[RoutingKey]]] = field(metadata=doc(
        allowed='"header:NAME", "cookie:NAME", "source_ip" or "user_id"'))
    by: str = field(default="version", metadata=doc(
        allowed='"version", "zone", "region" or "label:NAME"'))
    fallback: str = field(default="any", metadata=doc(allowed='"any" or "fail"'))

    def __post_init__(self) -> None:
        from ..config import KeySource  # noqa: PLC0415 - config imports this module

        if not isinstance(self.key, KeySource):
            object.__setattr__(self, "key", KeySource.parse(self.key, "key"))
        by = self.by
        if not (isinstance(by, str) and (by in ("version", "zone", "region") or (
                by.startswith("label:") and LABEL_KEY_PATTERN.match(by[6:])))):
            raise ConfigError("by", "must be \"version\", \"zone\", \"region\" or "
                                    f"\"label:NAME\", got {shown(by)}")
        if self.fallback not in ("any", "fail"):
            raise ConfigError("fallback", "must be \"any\" or \"fail\", "
                                          f"got {shown(self.fallback)}")

    @property
    def source(self) -> KeySource:
        """``key`` as built: a :class:`~tai_lb.config.KeySource`."""
        assert not isinstance(self.key, str) and not callable(self.key)
        return self.key

    def attribute(self) -> Callable[[Endpoint], Optional[str]]:
        """The function that reads ``by`` off an endpoint."""
        if self.by.startswith("label:"):
            name = self.by[6:]
            return lambda endpoint: endpoint.labels.get(name)
        by = self.by
        return lambda endpoint: getattr(endpoint, by)

    @classmethod
    def from_config(cls, value: Any) -> SubsetConfig:
        """Build from ``{"key": ..., "by": ..., "fallback": ...}`` (errors name the sub-key)."""
        return cls(**keyed_settings(value, _KEYS))


class SubsetRoute(Route):
    """The route of one subset: its candidates and picker (and the selectors after subsets).

    :ivar addresses: the subset's candidates' addresses (affinity keeps pins within them).
    """

    __slots__ = ("addresses",)

    def __init__(self, state: RouteState, candidates: tuple[EndpointStats, ...],
                 picker: Picker, split: Optional[ZoneSplit] = None) -> None:
        super().__init__(state)
        self.candidates = candidates
        self.picker = picker
        self.locality = split
        self.selectors = state.selectors  # those after subsets: affinity
        self.addresses = frozenset(c.endpoint.address for c in candidates)


class SubsetSelector:
    """Selector of one route: the table of subset values, prepared by :class:`Subsets`.

    :param service: the service's name (for errors).
    :param config: its subset settings.
    :param table: value -> the subset's route.
    """

    __slots__ = ("_from_context", "config", "service", "table")

    def __init__(self, service: str, config: SubsetConfig,
                 table: Mapping[str, SubsetRoute]) -> None:
        self.service = service
        self.config = config
        self.table = table
        kind = config.source.kind
        # RoutingContext.user() / .source(): the integrations set user_id_of / source_ip_of
        # (looked up only when a key needs them), not user_id / source_ip
        self._from_context = {"user_id": "user", "source_ip": "source"}.get(kind)

    def value(self) -> Optional[str]:
        """The current request's subset value (from the routing context), or None."""
        current = context.current()
        value = current.subset
        if value is None and self._from_context is not None:
            value = getattr(current, self._from_context)()
        return value

    def subset(self) -> Optional[SubsetRoute]:
        """The current request's subset; None for the whole route (no value, or no match with
        fallback ``any``).

        :raises NoEndpointAvailable: a value no candidate has, with fallback ``fail``.
        """
        current = context.current()  # value(), inline
        value = current.subset
        if value is None:
            if self._from_context is None:
                return None
            value = getattr(current, self._from_context)()
            if value is None:
                return None
        subset = self.table.get(value)
        if subset is None and self.config.fallback == "fail":
            self._refuse(value)
        return subset

    def _refuse(self, value: str) -> None:
        # shown(): the value is the client's (a header of 1 MB made a message of 1 MB)
        raise NoEndpointAvailable(self.service, f"no endpoint in subset {self.config.by}="
                                                f"{shown(value)} (key {self.config.key})")

    def select(self, route: Route, key: Optional[RoutingKey],
               exclude: Collection[str] = ()) -> Optional[EndpointStats]:
        """A pick within the request's subset (through the selectors after this one: affinity);
        None for the whole route."""
        subset = self.subset()
        if subset is None:
            return None
        stats = selected(subset, key, exclude)
        if exclude and stats.endpoint.address in exclude:
            stats = excluding(subset, key, exclude, stats)
        return stats

    def wrap(self, whole: Picker, candidates: Sequence[EndpointStats]) -> Picker:
        """The route's picker: this selector and the whole route's picker in one function (a
        pick costs two calls less than through the selectors), carrying ``excluding`` (a
        retry stays in the subset) and ``subsets`` (this selector)."""
        table, current, attribute = self.table, context.current, self._from_context
        refuse = self._refuse if self.config.fallback == "fail" else None

        def pick(key: Optional[RoutingKey]) -> EndpointStats:
            found = current()
            value = found.subset
            if value is None and attribute is not None:
                value = getattr(found, attribute)()
            if value is not None:
                subset = table.get(value)
                if subset is not None:
                    return subset.picker(key)  # type: ignore[misc]  # a subset has one
                if refuse is not None:
                    refuse(value)
            return whole(key)

        def avoiding(key: Optional[RoutingKey],
                     exclude: Collection[str]) -> Optional[EndpointStats]:
            subset = self.subset()
            if subset is not None:
                return excluding(subset, key, exclude, subset.picker(key))  # type: ignore[misc]
            own = getattr(whole, EXCLUDING, None)
            if own is not None:
                chosen: Optional[EndpointStats] = own(key, exclude)
                return chosen
            for _ in range(3):
                stats = whole(key)
                if stats.endpoint.address not in exclude:
                    return stats
            remaining = [c for c in candidates if c.endpoint.address not in exclude]
            if not remaining:
                return None
            return random.choices(remaining, weights=[c.endpoint.weight for c in remaining])[0]

        setattr(pick, EXCLUDING, avoiding)
        pick.subsets = self  # type: ignore[attr-defined]
        return pick

    def figures(self) -> dict[str, Any]:
        """The settings and, per value, the subset's candidates (for status())."""
        return {"key": str(self.config.key), "by": self.config.by,
                "fallback": self.config.fallback,
                "values": {v: len(s.candidates) for v, s in sorted(self.table.items())}}


class Subsets:
    """Stage: the subset table of the route; its selector goes before every other.

    It runs last, after :class:`~tai_lb.routing.Prepare` and the affinity stage (so the
    subsets' routes carry affinity's selector).  It wraps the route's picker
    (:meth:`SubsetSelector.wrap`), so picks and retries keep to the subset at the cost of one
    call; only when other selectors exist (affinity) does it put its selector before them.

    :param service: the service's name.
    :param config: its subset settings.
    :param locality: the service's locality stage, when it has one (subsets are zone-aware too).
    """

    def __init__(self, service: str, config: SubsetConfig,
                 locality: Optional[Locality] = None) -> None:
        self.service = service
        self.config = config
        self.locality = locality
        self._attribute = config.attribute()
        self._last: dict[str, Picker] = {}

    def build(self, state: RouteState) -> None:
        """Group the candidates by attribute and prepare each group's picker and route."""
        groups: dict[str, list[EndpointStats]] = {}
        attribute = self._attribute
        for stats in state.candidates:
            value = attribute(stats.endpoint)
            if value is not None:
                groups.setdefault(value, []).append(stats)
        wholes: dict[str, list[EndpointStats]] = {}
        if self.locality is not None and groups:
            priority = state.candidates[0].endpoint.priority
            for stats in state.everyone:
                value = attribute(stats.endpoint)
                if value in groups and stats.endpoint.priority == priority:
                    wholes.setdefault(value, []).append(stats)
        table: dict[str, SubsetRoute] = {}
        strategy = state.strategy
        for value, members in groups.items():
            picker: Optional[Picker] = None
            split = None
            if self.locality is not None:
                split, picker = self.locality.prepare(wholes[value], members, state.panic,
                                                      strategy, part=value, ramp=state.ramp)
            if picker is None:
                last = self._last.get(value)
                picker = (strategy.prepare_next(members, last) if last is not None
                          else strategy.prepare(members))
                self._last[value] = picker
                picker = ramped_over(strategy, picker, members, state.ramp)
            table[value] = SubsetRoute(state, tuple(members), picker, split)
        for gone in [v for v in self._last if v not in groups]:
            del self._last[gone]
        if self.locality is not None:
            self.locality.keep_parts(groups)
        selector = SubsetSelector(self.service, self.config, table)
        if state.picker is not None:  # picks and retries (excluding) keep to the subset
            state.picker = selector.wrap(state.picker, state.candidates)
        if state.selectors:  # affinity: the subset goes first, affinity within it
            first: Selector = selector
            state.selectors = (first, *state.selectors)

    def reset_after_fork(self) -> None:
        """Forget the last pickers: one may hold a lock a parent's thread held at the fork."""
        self._last = {}



def pick_reason(route: Route, endpoint: Endpoint) -> str:
    """Why ``endpoint`` was picked, as far as subsets and zones tell (for the decision trace):
    the request's subset (read from the routing context, as the pick did; its value cut to
    about 60 characters) and the zone."""
    parts = []
    selector = subsets_of(route)
    if selector is not None:
        value = selector.value()
        subset = selector.table.get(value) if value is not None else None
        if value is None:
            parts.append(f"no {selector.config.key} value: any subset")
        elif subset is not None and endpoint.address in subset.addresses:
            parts.append(f"subset {selector.config.by}={shown(value)}")
            route = subset
        else:
            parts.append(f"no endpoint in subset {selector.config.by}={shown(value)}: "
                         f"fallback any")
    if route.locality is not None:
        parts.append(route.locality.explain(endpoint.zone))
    return ", ".join(parts)


def subsets_of(route: Route) -> Optional[SubsetSelector]:
    """The route's subset selector (among its selectors, or carried by its picker), or None."""
    found = getattr(route.picker, "subsets", None)
    if isinstance(found, SubsetSelector):
        return found
    for selector in route.selectors:
        if isinstance(selector, SubsetSelector):
            return selector
    return None
