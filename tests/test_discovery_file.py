"""Discovery from a watched file and from a static list, with the last-good-set guards."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tai_lb import ConfigError, LoadBalancer, load_config

from .conftest import wait_for


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
        watcher = lb._watchers["users"]
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
    ({"type": "file"}, "path", "needs a path"),
    ({"type": "file", "path": "x.json", "endpoints": []}, "endpoints", "unknown key"),
    ({"type": "static", "endpoints": "10.0.0.1:80"}, "endpoints", "needs a list"),
    ({"type": "static", "endpoints": ["10.0.0.1:0"]}, "endpoints[0].port", "1 to 65535"),
    ({"type": "file", "path": "x.json", "interval": 0}, "interval", "> 0"),
    ({"type": "file", "path": "x.json", "confirmations": 0}, "confirmations", "1 to 100"),
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
        assert lb._watchers["users"].held_back == 2  # 2 of 2 discovered removed: confirmed


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
        assert lb._watchers["users"].held_back == 1
