"""Discovery from a watched file and from a static list, with the last-good-set guards."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import pytest

from tai_lb import ConfigError, Endpoint, LoadBalancer, ServiceRegistry, load_config
from tai_lb.discovery import DiscoveryWatcher, FileProvider, Provider, WatchConfig

from .conftest import FakeClock, in_forked_child, wait_for


def write(path: Path, data: Any) -> None:
    """Write atomically, as deployment tools do (a temporary file renamed over the old one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else json.dumps(data))
    os.replace(tmp, path)


def lb_for(path: Path, **settings: Any) -> LoadBalancer:
    return LoadBalancer.from_config({"services": {"users": {"discovery": {
        "type": "file", "path": str(path), "interval": 0.02, **settings}}}})


def addresses(lb: LoadBalancer) -> set[str]:
    return {e.address for e in lb.registry.endpoints("users")}


def test_add_remove_and_change_reach_picks(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.1:80", "10.0.0.2:80"])
    with lb_for(path) as lb:
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"}  # read at start, synchronously
        write(path, ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])
        assert wait_for(lambda: "10.0.0.3:80" in {lb.pick("users").address for _ in range(30)})
        write(path, ["10.0.0.1:80", {"address": "10.0.0.3:80", "weight": 5}])
        assert wait_for(lambda: addresses(lb) == {"10.0.0.1:80", "10.0.0.3:80"})
        assert lb.registry.snapshot("users").by_address["10.0.0.3:80"].weight == 5
        assert "10.0.0.2:80" not in {lb.pick("users").address for _ in range(30)}
        assert lb.status()["services"]["users"]["discovery"]["updates"] >= 3


def test_yaml_file_with_an_endpoints_key(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    write(path, "endpoints:\n  - 10.0.0.1:80\n  - {address: '10.0.0.2:80', zone: a}\n")
    with lb_for(path) as lb:
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"}


def test_malformed_entries_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.1:80", "not an endpoint", {"address": "10.0.0.2:0"}, "10.0.0.3:80",
                 "10.0.0.3:80"])
    with lb_for(path) as lb:
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.3:80"}
        assert lb.status()["services"]["users"]["discovery"]["skipped_entries"] == 3


def test_entries_with_overlong_metadata_are_skipped_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A 1 MB version made status() 2 MB: values longer than 253 characters are malformed.
    path = tmp_path / "users.json"
    write(path, [{"address": "10.0.0.1:80", "version": "1" * 1_000_000},
                 {"address": "10.0.0.2:80", "zone": "z" * 254},
                 {"address": "10.0.0.3:80", "labels": {"team": "t" * 100_000}},
                 {"address": "10.0.0.4:80", "version": "1" * 253, "region": "r" * 253}])
    with caplog.at_level(logging.WARNING, logger="tai_lb.discovery"), lb_for(path) as lb:
        assert addresses(lb) == {"10.0.0.4:80"}
        status = lb.status()
        assert status["services"]["users"]["discovery"]["skipped_entries"] == 3
        assert len(json.dumps(status)) < 50_000
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("skipping 3 malformed" in w for w in warnings), warnings
    assert all(len(w) < 2_000 for w in warnings)


def test_a_broken_or_missing_file_keeps_the_last_good_set(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.1:80", "10.0.0.2:80"])
    with lb_for(path) as lb:
        write(path, '["10.0.0.1:80", "10.0.')  # half written
        assert wait_for(lambda: lb.status()["services"]["users"]["discovery"]["errors"] >= 2)
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"}
        path.unlink()
        status = lb.status()["services"]["users"]["discovery"]
        assert wait_for(lambda: "No such file" in (
            lb.status()["services"]["users"]["discovery"]["last_error"] or ""))
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"}
        assert status["staleness_seconds"] is not None
        write(path, ["10.0.0.2:80"])  # back, and a removal of half: not more than the share
        assert wait_for(lambda: addresses(lb) == {"10.0.0.2:80"})


def test_a_mass_removal_is_held_back_until_confirmed(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    write(path, [f"10.0.0.{i}:80" for i in range(1, 11)])
    with lb_for(path, confirmations=3, max_removal_share=0.5) as lb:
        watcher = lb.watcher("users")
        watcher.stop()  # drive the rounds by hand
        write(path, ["10.0.0.1:80"])  # 9 of 10 removed at once
        assert watcher.poll() and len(addresses(lb)) == 10  # seen once: held back
        os.utime(path, ns=(1, 1))  # same content, seen again
        assert watcher.poll() and len(addresses(lb)) == 10
        os.utime(path, ns=(2, 2))
        assert watcher.poll() and addresses(lb) == {"10.0.0.1:80"}  # third time: applied
        assert watcher.held_back == 2
        write(path, [])  # emptying the service is held back too
        assert watcher.poll() and addresses(lb) == {"10.0.0.1:80"}


def test_the_last_good_set_is_saved_and_used_to_start_warm(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    cache = tmp_path / "cache" / "users.json"
    cache.parent.mkdir()
    write(path, ["10.0.0.1:80", "10.0.0.2:80"])
    with lb_for(path, cache_path=str(cache)) as lb:
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"}
    assert json.loads(cache.read_text())["service"] == "users"
    path.unlink()  # the source is down when the process restarts
    with lb_for(path, cache_path=str(cache)) as lb:
        assert addresses(lb) == {"10.0.0.1:80", "10.0.0.2:80"}
        assert lb.pick("users").address in {"10.0.0.1:80", "10.0.0.2:80"}


def test_static_discovery_and_the_thread_stopping_on_close(tmp_path: Path) -> None:
    lb = LoadBalancer.from_config({"services": {"users": {"discovery": {
        "type": "static", "endpoints": ["10.0.0.1:80"]}}}})
    assert addresses(lb) == {"10.0.0.1:80"}
    assert any(t.name == "tai-lb-discovery-users" for t in threading.enumerate())
    lb.close()
    assert not any(t.name == "tai-lb-discovery-users" for t in threading.enumerate())


@pytest.mark.parametrize(("discovery", "path", "fragment"), [
    ({"type": "consul"}, "type", "static, file, dns or etcd"),
    ({"type": "etcd", "urls": []}, "urls", "needs a list of URLs"),
    ({"type": "etcd", "urls": ["127.0.0.1:2379"]}, "urls[0]", "http:// or https://"),
    ({"type": "etcd", "urls": ["http://e:2379"], "prefix": "services"}, "prefix", "start"),
    ({"type": "etcd", "urls": "http://e:2379"}, "urls", "needs a list of URLs"),
    ({"type": "etcd", "urls": ["http://e:port"]}, "urls[0]", "http://10.0.0.5:2379"),
    ({"type": "etcd", "urls": ["http://e:99999"]}, "urls[0]", "http://10.0.0.5:2379"),
    ({"type": "etcd", "urls": ["http://e:2379", 2379]}, "urls[1]", "http:// or https://"),
    ({"type": "etcd", "urls": ["http://e:2379"], "timeout": 0}, "timeout", "> 0 and <= 60"),
    ({"type": "etcd", "urls": ["http://e:2379"], "timeout": 61}, "timeout", "> 0 and <= 60"),
    ({"type": "etcd", "urls": ["http://e:2379"], "ttl": 10}, "ttl", "unknown key"),
    ({"type": ["etcd"]}, "type", "static, file, dns or etcd"),
    ({"type": "file"}, "path", "needs a path"),
    ({"type": "file", "path": "x.json", "endpoints": []}, "endpoints", "unknown key"),
    ({"type": "static", "endpoints": "10.0.0.1:80"}, "endpoints", "needs a list"),
    ({"type": "static", "endpoints": ["10.0.0.1:0"]}, "endpoints[0].port", "1 to 65535"),
    ({"type": "file", "path": "x.json", "interval": 0}, "interval", "from 0.001"),
    ({"type": "file", "path": "x.json", "confirmations": 0}, "confirmations", "1 to 100"),
    ({"type": "file", "path": "x.json", "empty_hold": -1}, "empty_hold", "0 to 86400"),
    ({"type": "file", "path": "x.json", "empty_hold": float("nan")}, "empty_hold",
     "0 to 86400"),
    ({"type": "file", "path": "x.json", "empty_hold": "30s"}, "empty_hold", "0 to 86400"),
    ({"type": "file", "path": "x.json", "max_removal_share": 2}, "max_removal_share",
     "0 to 1"),
    ("file", "", "must be a mapping"),
])
def test_config_errors_name_the_key(discovery: Any, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"services": {"users": {"discovery": discovery}}})
    expected = "services.users.discovery" + (f".{path}" if path else "")
    assert caught.value.path == expected
    assert fragment in str(caught.value)


def test_configured_backups_stay_after_the_discovered_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.1:80", {"address": "10.0.0.2:80", "priority": 2}])
    with LoadBalancer.from_config({"services": {"users": {
            "discovery": {"type": "file", "path": str(path), "interval": 0.02},
            "backups": ["10.0.9.1:80", {"address": "10.0.9.2:80", "priority": 1}]}}}) as lb:
        priorities = {e.address: e.priority for e in lb.registry.endpoints("users")}
        assert priorities == {"10.0.0.1:80": 0, "10.0.0.2:80": 2, "10.0.9.1:80": 3,
                              "10.0.9.2:80": 4}
        write(path, ["10.0.0.3:80"])  # every discovered endpoint replaced: backups untouched
        assert wait_for(lambda: {e.address: e.priority for e in lb.registry.endpoints("users")}
                        == {"10.0.0.3:80": 0, "10.0.9.1:80": 1, "10.0.9.2:80": 2})
        assert lb.watcher("users").held_back == 2  # 2 of 2 discovered removed: confirmed


def test_the_first_answer_replaces_the_configured_endpoints_at_once(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.7:80", "10.0.0.8:80"])
    with LoadBalancer.from_config({"services": {"users": {
            "endpoints": ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
            "discovery": {"type": "file", "path": str(path)}}}}) as lb:
        assert addresses(lb) == {"10.0.0.7:80", "10.0.0.8:80"}
    write(path, [])  # but an empty first answer does not empty the service
    with LoadBalancer.from_config({"services": {"users": {
            "endpoints": ["10.0.0.1:80"],
            "discovery": {"type": "file", "path": str(path)}}}}) as lb:
        assert addresses(lb) == {"10.0.0.1:80"}
        assert lb.watcher("users").held_back == 1


def test_one_warning_per_outage_however_its_errors_differ(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.1:80"])
    with caplog.at_level(logging.DEBUG, logger="tai_lb.discovery"), lb_for(path) as lb:
        watcher = lb.watcher("users")
        watcher.stop()  # drive the rounds by hand
        write(path, '["10.0.0.1:80", "10.0.')  # half written...
        assert not watcher.poll() and not watcher.poll()
        path.unlink()  # ...then gone: the same outage, with another message
        assert not watcher.poll() and not watcher.poll()
        write(path, ["10.0.0.1:80", "10.0.0.2:80"])
        assert watcher.poll()  # back: said once, at INFO
        path.unlink()  # a new outage: a new warning
        assert not watcher.poll()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "not valid" in warnings[0] or "cannot be read" in warnings[0]
    assert "No such file" in warnings[1]
    assert sum("works again" in r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO) == 1
    assert watcher.errors == 5


def test_an_empty_or_foreign_cache_is_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    missing = tmp_path / "missing.json"  # the source is down at start
    seed = ["10.0.0.1:80", "10.0.0.2:80"]
    for saved in ({"service": "users", "endpoints": []},  # an emptying once confirmed
                  {"service": "orders", "endpoints": ["10.0.9.9:80"]}):  # a shared path
        cache.write_text(json.dumps(saved))
        with LoadBalancer.from_config({"services": {"users": {
                "endpoints": seed,
                "discovery": {"type": "file", "path": str(missing),
                              "cache_path": str(cache)}}}}) as lb:
            assert addresses(lb) == set(seed)


class _BrokenProvider(Provider):
    """A provider with a bug: every fetch raises something that is not a SourceError."""

    def fetch(self) -> Optional[list[Endpoint]]:
        raise RuntimeError("a bug")


def test_a_provider_bug_is_counted_and_does_not_fail_the_start(tmp_path: Path) -> None:
    applied: list[Sequence[Endpoint]] = []
    watcher = DiscoveryWatcher("users", _BrokenProvider(), WatchConfig(interval=0.01),
                               applied.append, lambda: [])
    watcher.start()  # raised before: a balancer with such a watcher could not be built
    try:
        assert wait_for(lambda: watcher.errors >= 3)  # and the thread keeps going
        assert watcher.snapshot()["running"] and applied == []
    finally:
        watcher.stop()


class _RecordingProvider(Provider):
    """Records the process and thread of each fetch; answers with the endpoints it holds."""

    def __init__(self) -> None:
        self.endpoints = [Endpoint("10.0.0.1", 80)]
        self.fetches: list[tuple[int, str]] = []

    def fetch(self) -> Optional[list[Endpoint]]:
        self.fetches.append((os.getpid(), threading.current_thread().name))
        return list(self.endpoints)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_reads_the_source_on_its_own_thread_not_in_the_fork() -> None:
    registry = ServiceRegistry()
    registry.add_service("users")
    provider = _RecordingProvider()
    watcher = DiscoveryWatcher(
        "users", provider, WatchConfig(interval=0.01),
        lambda endpoints: registry.set_endpoints("users", endpoints),
        lambda: registry.endpoints("users"))
    watcher.start()
    def child() -> dict[str, Any]:
        provider.endpoints = [Endpoint("10.0.0.2", 80)]
        found = wait_for(lambda: {e.address for e in registry.endpoints("users")}
                         == {"10.0.0.2:80"})
        threads = {name for pid, name in provider.fetches if pid == os.getpid()}
        watcher.stop()
        return {"found": found, "threads": sorted(threads)}

    try:
        report = in_forked_child(child)
    finally:
        watcher.stop()
    assert report["found"]  # the child's watcher runs
    # and reads on its own thread, never in the fork hooks (the child's main thread), where
    # a source that is down would hold os.fork() for its whole timeout
    assert report["threads"] == ["tai-lb-discovery-users"]


def test_a_yaml_file_without_pyyaml_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` fail
    with pytest.raises(ConfigError) as caught:
        load_config({"services": {"users": {"discovery": {"type": "file", "path": "u.yaml"}}}})
    assert caught.value.path == "services.users.discovery.path"
    assert "tai-lb[yaml]" in str(caught.value)
    load_config({"services": {"users": {"discovery": {"type": "file", "path": "u.json"}}}})


def watched_file(path: Path, clock: FakeClock, **settings: Any
                 ) -> tuple[DiscoveryWatcher, ServiceRegistry]:
    """A watcher of ``path`` into a registry, driven by hand (poll()) on ``clock``."""
    registry = ServiceRegistry()
    registry.add_service("users")
    watcher = DiscoveryWatcher(
        "users", FileProvider(str(path)), WatchConfig(**settings),
        lambda endpoints: registry.set_endpoints("users", endpoints),
        lambda: registry.endpoints("users"), clock=clock)
    return watcher, registry


def test_an_emptied_source_is_held_for_a_time_not_a_count_of_reads(
        tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.1:80", "10.0.0.2:80"])
    watcher, registry = watched_file(path, clock)  # the defaults: 3 reads and 30 s
    assert watcher.poll() and len(registry.endpoints("users")) == 2
    write(path, [])  # the source empties (a truncated file, a wiped prefix)
    for _ in range(30):  # 30 reads, one a second: still held at 29 s
        assert watcher.poll() and len(registry.endpoints("users")) == 2
        clock.advance(1.0)
    assert watcher.held_back == 30
    assert watcher.poll() and not registry.endpoints("users")  # 30 s after it showed


def test_an_empty_hold_restarts_when_the_update_changes_and_needs_its_reads_too(
        tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.1:80", "10.0.0.2:80"])
    watcher, registry = watched_file(path, clock, empty_hold=10.0, confirmations=3)
    assert watcher.poll()
    write(path, [])
    assert watcher.poll()
    clock.advance(8.0)
    write(path, ["10.0.0.1:80", "10.0.0.2:80"])  # back for a moment...
    assert watcher.poll()
    write(path, [])  # ...then empty again: held from now on
    assert watcher.poll()
    clock.advance(9.0)
    assert watcher.poll() and len(registry.endpoints("users")) == 2
    clock.advance(1.0)  # 10 s held, and read 3 times: applied
    assert watcher.poll() and not registry.endpoints("users")
    write(path, ["10.0.0.1:80"])
    assert watcher.poll()
    write(path, [])
    assert watcher.poll()
    clock.advance(60.0)  # the time has passed but it was read twice only
    assert watcher.poll() and len(registry.endpoints("users")) == 1
    assert watcher.poll() and not registry.endpoints("users")


def test_empty_hold_0_holds_an_emptying_update_for_its_reads_alone(
        tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.1:80"])
    watcher, registry = watched_file(path, clock, empty_hold=0, confirmations=2)
    assert watcher.poll()
    write(path, [])
    assert watcher.poll() and len(registry.endpoints("users")) == 1
    assert watcher.poll() and not registry.endpoints("users")


def test_a_file_that_failed_is_not_read_again_until_it_changes(
        tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.1:80"])
    watcher, registry = watched_file(path, clock)
    assert watcher.poll()
    write(path, '["10.0.0.1:80", "10.0.')  # half written
    for _ in range(5):
        assert not watcher.poll()  # still a failed read each round, with its message...
    snapshot = watcher.snapshot()
    assert snapshot["source"]["reads"] == 2  # ...but read and parsed once
    assert snapshot["errors"] == 5 and "not valid JSON" in snapshot["last_error"]
    os.chmod(path, 0o644)  # a change of the file's status alone: read again
    assert not watcher.poll() and watcher.snapshot()["source"]["reads"] == 3
    write(path, ["10.0.0.1:80", "10.0.0.2:80"])
    assert watcher.poll() and len(registry.endpoints("users")) == 2
    assert watcher.poll() and watcher.snapshot()["source"]["reads"] == 4  # unchanged: no read


@pytest.mark.parametrize("name", ["users.json", "users.yaml"])
def test_a_file_nested_too_deep_is_reported_as_such(tmp_path: Path, clock: FakeClock,
                                                    name: str) -> None:
    path = tmp_path / name
    write(path, "[" * 100_000 + "]" * 100_000)  # JSON, and YAML's flow style too
    watcher, _ = watched_file(path, clock)
    assert not watcher.poll()
    error = watcher.snapshot()["last_error"]
    assert "nested too deep" in error, error
    assert name.endswith(".yaml") or "YAML" not in error


def test_many_malformed_entries_log_one_warning_with_a_count_and_examples(
        tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "users.json"
    write(path, ["10.0.0.1:80"] + [f"bad entry {i}" for i in range(10_000)] + ["10.0.0.1:80"])
    watcher, registry = watched_file(path, clock)
    with caplog.at_level(logging.DEBUG, logger="tai_lb.discovery"):
        assert watcher.poll()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings[:5]
    assert "10001" in warnings[0] and "bad entry 0" in warnings[0]
    assert "bad entry 3" not in warnings[0]  # a few examples, not all of them
    assert watcher.snapshot()["skipped_entries"] == 10_001  # each one still counted
    assert [e.address for e in registry.endpoints("users")] == ["10.0.0.1:80"]


@pytest.mark.timeout(10)
def test_a_fifo_as_the_file_or_the_cache_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "users.json"
    os.mkfifo(fifo)  # no writer: a plain open() waits for one forever
    cache_fifo = tmp_path / "cache.json"
    os.mkfifo(cache_fifo)
    with LoadBalancer.from_config({"services": {"users": {
            "endpoints": ["10.0.0.1:80"],
            "discovery": {"type": "file", "path": str(fifo), "interval": 0.02,
                          "cache_path": str(cache_fifo)}}}}) as lb:
        status = lb.status()["services"]["users"]["discovery"]
        assert "not a regular file" in status["last_error"]
        assert addresses(lb) == {"10.0.0.1:80"}  # the configured set stays
        assert wait_for(lambda: lb.status()["services"]["users"]["discovery"]["errors"] >= 3)
    directory = tmp_path / "users.d"
    directory.mkdir()
    with lb_for(directory) as lb:
        assert "not a regular file" in lb.status()["services"]["users"]["discovery"][
            "last_error"]
