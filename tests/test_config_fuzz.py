"""Property: whatever the configuration, building a balancer either works or raises ConfigError,
and a construction that fails leaves no tai-lb thread running.

The configurations come from the generators of ``benchmarks/fuzz_config.py`` (mutations of
valid configurations, and random structures), driven by hypothesis's random source so that a
failure shrinks and replays.  ``python benchmarks/fuzz_config.py`` runs 26,000 of them.
Most failing configurations are refused before anything starts, so valid configurations with
a part that fails when started, after others started, are tried too.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_config import (
    FAILED_AFTER_STARTING,
    failing_start,
    fuzzed_config,
    mutate,
    try_config,
    try_failing_start,
    valid_configs,
)

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def test_the_valid_configurations_build() -> None:
    # The mutations start from these: each must build as it is.
    for config in valid_configs():
        outcome = try_config(config)
        assert outcome.result == "built", outcome.error
        assert outcome.threads_left == []
        assert outcome.metrics_left == []  # closed, the Prometheus export is unregistered


@FUZZ
@given(st.sampled_from(range(len(valid_configs()))), st.randoms(use_true_random=False))
def test_mutated_configurations_build_or_raise_config_error(index: int,
                                                            rng: random.Random) -> None:
    outcome = try_config(mutate(valid_configs()[index], rng))
    assert outcome.result in ("built", "ConfigError"), repr(outcome.error)
    assert outcome.threads_left == []
    assert outcome.metrics_left == []


@FUZZ
@given(st.randoms(use_true_random=False))
def test_fuzzed_configurations_build_or_raise_config_error(rng: random.Random) -> None:
    outcome = try_config(fuzzed_config(rng))
    assert outcome.result in ("built", "ConfigError"), repr(outcome.error)
    assert outcome.threads_left == []


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_a_part_failing_to_start_after_others_started_leaves_nothing_open(
        rng: random.Random) -> None:
    # A custom discovery source raising in start() (after the StatsD thread and the discovery
    # threads of the services before it), or a Prometheus namespace already registered (after
    # the StatsD socket opened): the error is raised, and what started is stopped and closed.
    case = failing_start(rng)
    outcome = try_failing_start(case)
    assert outcome.result == FAILED_AFTER_STARTING, repr(outcome.error)
    if case.part == "custom discovery source":
        assert "tai-lb-metrics" in outcome.threads_at_failure  # something had started
    assert outcome.threads_left == []
    assert outcome.descriptors_left == 0
    assert outcome.metrics_left == []
