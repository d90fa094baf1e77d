"""The tuning profiles shipped in tai_lb/profiles/ (docs/tuning.rst): each is a valid
configuration for ``tai-lb check`` and ``LoadBalancer.from_config``, and ``"profile": NAME``
gives a configuration its defaults, under the configuration's own."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tai_lb
from tai_lb import ConfigError, LoadBalancer, load_config
from tai_lb.profiles import PROFILES, profile_defaults, profile_path

ROOT = Path(__file__).resolve().parent.parent
USERS = {"endpoints": ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"]}


def test_every_profile_file_is_named_and_every_name_has_a_file() -> None:
    directory = Path(tai_lb.__file__).parent / "profiles"
    assert sorted(p.stem for p in directory.glob("*.toml")) == sorted(PROFILES)
    assert {"high_throughput", "low_latency", "stability", "development", "production_stable",
            "production_unstable"} == set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_a_profile_file_passes_check(name: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tai_lb", "check", profile_path(name)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert f"{profile_path(name)}: valid; services: users" in done.stdout


@pytest.mark.parametrize("name", PROFILES)
def test_a_profile_file_builds_a_balancer(name: str) -> None:
    with LoadBalancer.from_config(profile_path(name)) as lb:
        assert lb.service_config("users").endpoints
        assert lb.status()["services"]["users"]


def _comparable(service: tai_lb.ServiceConfig) -> dict[str, Any]:
    fields = {f.name: getattr(service, f.name) for f in dataclasses.fields(service)}
    strategy = fields.pop("strategy")
    options = getattr(strategy, "options", dict)()
    fields["strategy"] = (strategy.name, options)
    return fields


@pytest.mark.parametrize("name", PROFILES)
def test_the_profile_key_gives_the_profile_files_defaults(name: str) -> None:
    own = load_config(profile_path(name)).services["users"]
    with_key = load_config({"profile": name, "services": {"users": USERS}}).services["users"]
    assert own.endpoints == with_key.endpoints or name == "development"
    expected = _comparable(own)
    got = _comparable(with_key)
    expected.pop("endpoints"), got.pop("endpoints")
    assert got == expected
    assert profile_defaults(name)  # every profile sets something


def test_the_configurations_own_defaults_and_service_keys_win_over_the_profile() -> None:
    config = load_config({
        "profile": "low_latency",
        "defaults": {"retries": {"attempts": 2}},
        "services": {"users": {**USERS, "timeout": {"read": 2},
                               "strategy": {"decay": 20}},
                     "orders": {**USERS, "strategy": "round_robin"}},
    })
    users = config.services["users"]
    assert users.timeout == (0.1, 2.0)  # connect from the profile, read the service's own
    assert users.retries.attempts == 2  # the configuration's defaults
    assert users.retries.deadline == 1.0  # the profile's, merged one level deep
    assert users.strategy.name == "peak_ewma"
    assert (users.strategy.decay, users.strategy.default_latency) == (20.0, 0.01)  # type: ignore[attr-defined]
    assert config.services["orders"].strategy.name == "round_robin"


def test_null_turns_off_a_part_the_profile_sets() -> None:
    config = load_config({"profile": "production_unstable",
                          "services": {"users": {**USERS, "health_check": None,
                                                 "circuit_breaker": None},
                                       "orders": USERS}})
    assert config.services["users"].health_check is None
    assert config.services["users"].circuit_breaker is None
    assert config.services["orders"].health_check is not None
    assert config.services["orders"].health_check.panic_threshold == 0.3


@pytest.mark.parametrize("value", ["fastest", "", ["low_latency"], 3, {"name": "stability"},
                                   "../development", "development.toml"])
def test_an_unknown_profile_is_a_config_error_naming_the_key(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"profile": value, "services": {"users": USERS}})
    assert info.value.path == "profile"
    assert "allowed: development, high_throughput" in info.value.reason


def test_profile_null_is_no_profile() -> None:
    config = load_config({"profile": None, "services": {"users": USERS}})
    plain = load_config({"services": {"users": USERS}})
    assert _comparable(config.services["users"]) == _comparable(plain.services["users"])


@pytest.mark.parametrize("name", PROFILES)
def test_every_setting_of_a_profile_says_why(name: str) -> None:
    # Every group of settings (lines between blank lines) of the defaults has its comment.
    text = Path(profile_path(name)).read_text(encoding="utf-8")
    defaults_part = text.split("[services.", 1)[0]
    for block in re.split(r"\n\s*\n", defaults_part):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if any(re.match(r"^[a-z_0-9]+ = ", line) for line in lines):
            assert any(line.startswith("#") for line in lines), f"{name}: no comment on {lines}"
