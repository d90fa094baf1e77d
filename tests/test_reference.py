"""The generated configuration reference (docs/reference.rst) against the loader and the checks.

Every key the loader accepts must be in the reference: the keys are read off the loader's own
"unknown key; allowed: ..." errors, mapping by mapping, so a key added to the loader without
its documentation fails here.  And the bounds the reference shows must be those the settings
classes check: each bound is tried against the class.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import pytest

from tai_lb import ConfigError, config
from tai_lb._reference import Row, Section, sections
from tai_lb.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
BOGUS = "zzz_not_a_key"
SECTIONS = {section.id: section for section in sections()}


def _service(**keys: Any) -> dict[str, Any]:
    return {"services": {"users": {"endpoints": ["127.0.0.1:8001"], **keys}}}


def _probes() -> list[tuple[str, str, dict[str, Any]]]:
    """(section id, prefix of its keys, a configuration with an unknown key in that mapping)."""
    probes: list[tuple[str, str, dict[str, Any]]] = [
        ("top", "", {**_service(), BOGUS: 1}),
        ("service", "", _service(**{BOGUS: 1})),
        ("endpoint", "", _service(endpoints=[{"address": "127.0.0.1:1", BOGUS: 1}])),
        ("health_check", "", _service(health_check={"path": "/", BOGUS: 1})),
        ("affinity", "", _service(affinity={"key": "source_ip", BOGUS: 1})),
        ("subset", "", _service(subset={"key": "source_ip", BOGUS: 1})),
        ("retries", "backoff.", _service(retries={"backoff": {BOGUS: 1}})),
        ("retries", "budget.", _service(retries={"budget": {BOGUS: 1}})),
        ("backups", "", _service(backups={"endpoints": [], BOGUS: 1})),
        ("metrics", "", {**_service(), "metrics": {BOGUS: 1}}),
        ("metrics.statsd", "", {**_service(), "metrics": {"statsd": {BOGUS: 1}}}),
        ("metrics.prometheus", "", {**_service(), "metrics": {"prometheus": {BOGUS: 1}}}),
    ]
    for key in ("outlier_detection", "circuit_breaker", "retries", "pool", "timeout",
                "locality", "rebalance", "slow_start"):
        probes.append((key, "", _service(**{key: {BOGUS: 1}})))
    for name in STRATEGIES:
        probes.append((f"strategy.{name}", "", _service(strategy={"name": name, BOGUS: 1})))
    for kind in ("static", "file", "dns", "etcd"):
        probes.append((f"discovery.{kind}", "", _service(discovery={"type": kind, BOGUS: 1})))
    return probes


def _allowed(configuration: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse_config(configuration)
    assert info.value.path.endswith(BOGUS), str(info.value)
    listed = info.value.reason.split("allowed: ", 1)[1]
    return [] if listed == "none" else listed.split(", ")


def _documented(section_id: str) -> set[str]:
    keys = set()
    for candidate in (section_id, section_id.split(".", 1)[0]):  # discovery.dns: and discovery
        if candidate in SECTIONS:
            keys.update(row.key for row in SECTIONS[candidate].rows)
    if section_id.startswith("strategy."):
        keys.add("name")
    return keys


@pytest.mark.parametrize(("section_id", "prefix", "configuration"), _probes(),
                         ids=[f"{p[0]}:{p[1]}" for p in _probes()])
def test_every_key_the_loader_accepts_is_in_the_reference(
        section_id: str, prefix: str, configuration: dict[str, Any]) -> None:
    accepted = _allowed(configuration)
    assert accepted or section_id.startswith("strategy."), "the loader's error lists no key"
    documented = _documented(section_id)
    missing = [key for key in accepted
               if prefix + key not in documented
               and not any(row.startswith(f"{prefix}{key}.") for row in documented)]
    assert missing == [], f"keys of {section_id} missing from the reference: {missing}"


def test_the_key_lists_of_the_loader_are_in_the_reference() -> None:
    assert [row.key for row in SECTIONS["service"].rows] == list(config.SERVICE_KEYS)
    assert {row.key for row in SECTIONS["top"].rows} == set(config.TOP_LEVEL_KEYS)
    assert {row.key for row in SECTIONS["strategy"].rows} == {f'"{n}"' for n in STRATEGIES}


def test_every_mapping_the_loader_reads_has_a_probe() -> None:
    probed = {probe[0] for probe in _probes()}
    # "strategy" lists the names, "discovery" the keys of every type: both are probed through
    # their variants; strategies with no options have no section of their own
    assert set(SECTIONS) - {"strategy", "discovery"} <= probed


@pytest.mark.parametrize("section", sections(), ids=lambda s: s.id)
def test_every_key_has_a_meaning_and_a_default_or_says_it_is_required(section: Section) -> None:
    assert section.intro
    for row in section.rows:
        assert row.meaning.strip(), f"{section.id}.{row.key} has no meaning"
        if row.low is not None or row.high is not None:
            assert row.unit, f"{section.id}.{row.key}: a number without a unit"
        if section.id != "strategy":
            assert row.default, f"{section.id}.{row.key} has no default"


#: keys a bound probe must set besides the one probed, where the classes compare two keys
COMPANIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("outlier_detection", "base_ejection_time"): {"max_ejection_time": 86400},
    ("outlier_detection", "max_ejection_time"): {"base_ejection_time": 1e-9},
    ("backups", "failover_below"): {"failback_at": 1},
    ("backups", "failback_at"): {"failover_below": 1e-9},
    ("discovery.dns", "min_ttl"): {"max_ttl": 86400},
    ("discovery.dns", "max_ttl"): {"min_ttl": 0.001},
}
#: the least value just above an open low bound that the class can accept
ABOVE_LOW: dict[tuple[str, str], float] = {("discovery.dns", "max_ttl"): 0.001}
BUILD_BASE: dict[str, dict[str, Any]] = {
    "discovery.dns": {"name": "users.example", "record": "A", "endpoint_port": 80},
    "discovery.etcd": {"urls": ["http://127.0.0.1:2379"]},
}


def _accepts(section: Section, row: Row, value: float) -> bool:
    assert section.build is not None
    keywords = {**BUILD_BASE.get(section.id, {}), **COMPANIONS.get((section.id, row.field), {}),
                row.field: value}
    try:
        section.build(**keywords)
    except ConfigError:
        return False
    return True


def _bounded() -> list[tuple[Section, Row]]:
    return [(section, row) for section in sections() for row in section.rows
            if row.low is not None or row.high is not None]


@pytest.mark.parametrize(("section", "row"), _bounded(),
                         ids=[f"{s.id}.{r.key}" for s, r in _bounded()])
def test_the_bounds_shown_are_the_bounds_checked(section: Section, row: Row) -> None:
    assert section.build is not None, f"{section.id} has bounds but nothing to check them on"
    def step(bound: float) -> float:
        return 1 if row.integer else 1e-6 * max(1.0, abs(bound))

    low: Optional[float] = row.low
    high: Optional[float] = row.high
    if low is not None:
        if row.low_open:
            assert not _accepts(section, row, low), f"{row.key} takes {low}, shown as open"
            above = ABOVE_LOW.get((section.id, row.field), low + step(low))
            assert _accepts(section, row, above), f"{row.key} refuses {above}"
        else:
            assert _accepts(section, row, int(low) if row.integer else low), \
                f"{row.key} refuses its low bound {low}"
            assert not _accepts(section, row, low - step(low)), f"{row.key} takes below {low}"
    if high is not None:
        top = int(high) if row.integer else high
        assert _accepts(section, row, top), f"{row.key} refuses its high bound {high}"
        assert not _accepts(section, row, top + step(high)), f"{row.key} takes above {high}"
    assert not _accepts(section, row, math.nan), f"{row.key} takes NaN"


def test_the_reference_page_renders_every_section() -> None:
    page = (ROOT / "docs" / "reference.rst").read_text(encoding="utf-8")
    assert re.search(r"^\.\. tai-lb-config-reference::\s*$", page, re.M)
    conf = (ROOT / "docs" / "conf.py").read_text(encoding="utf-8")
    assert '"config_reference"' in conf
    guide = (ROOT / "docs" / "configuration.rst").read_text(encoding="utf-8")
    assert ":doc:`reference`" in guide
