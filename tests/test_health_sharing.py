"""Shared health checks (health_check.share): real forked processes probing real backends."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from tai_lb import LoadBalancer
from tai_lb.health import HealthCheckConfig
from tai_lb.health.sharing import AVAILABLE, ProbeSharing, share_file_name

from .backends import Backend
from .conftest import FakeClock, in_forked_child, wait_for
from .test_health import flag_health, health_paths

pytestmark = [pytest.mark.skipif(not (hasattr(os, "fork") and AVAILABLE),
                                 reason="sharing needs fork and fcntl (POSIX)"),
              pytest.mark.timeout(120)]

CHECKS = {"path": "/healthz", "interval": 0.2, "jitter": 0.1, "timeout": 0.5,
          "healthy_threshold": 2, "unhealthy_threshold": 2, "skip_if_traffic": False}


def config_for(backends: list[Backend], share: Any) -> dict[str, Any]:
    return {"services": {"users": {"endpoints": [b.address for b in backends],
                                   "health_check": {**CHECKS, "share": share}}}}


class Workers:
    """``count`` forked processes, each with its own balancer built from ``config`` after the
    fork (as gunicorn workers without --preload), answering commands over pipes."""

    def __init__(self, count: int, config: dict[str, Any]) -> None:
        self.pids: list[int] = []
        self.pipes: list[tuple[Any, Any]] = []
        for _ in range(count):
            to_child, from_parent = os.pipe()
            to_parent, from_child = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                code = 1
                try:
                    os.close(from_parent)
                    os.close(to_parent)
                    _serve(config, os.fdopen(to_child, "r"), os.fdopen(from_child, "w"))
                    code = 0
                finally:
                    os._exit(code)
            os.close(to_child)
            os.close(from_child)
            self.pids.append(pid)
            self.pipes.append((os.fdopen(from_parent, "w"), os.fdopen(to_parent, "r")))

    def ask(self, index: int, *command: Any) -> Any:
        writer, reader = self.pipes[index]
        writer.write(json.dumps(command) + "\n")
        writer.flush()
        line = reader.readline()
        assert line, f"worker {index} died"
        return json.loads(line)

    def ask_all(self, *command: Any) -> list[Any]:
        return [self.ask(i, *command) for i in self.alive()]

    def alive(self) -> list[int]:
        return [i for i, pid in enumerate(self.pids) if pid]

    def kill(self, index: int) -> None:
        os.kill(self.pids[index], signal.SIGKILL)
        os.waitpid(self.pids[index], 0)
        self.pids[index] = 0

    def close(self) -> None:
        alive = self.alive()
        for index in alive:
            with contextlib.suppress(OSError, ValueError):
                self.pipes[index][0].write('["exit"]\n')
                self.pipes[index][0].flush()
        left = [json.loads(self.pipes[index][1].readline() or "null") for index in alive]
        codes = [os.waitpid(self.pids[index], 0)[1] for index in alive]
        for index in alive:
            self.pids[index] = 0
        for writer, reader in self.pipes:
            writer.close()
            reader.close()
        assert codes == [0] * len(alive), codes
        assert left == [{"threads": []}] * len(alive), left  # close() stopped every thread


def _serve(config: dict[str, Any], commands: Any, answers: Any) -> None:  # pragma: no cover
    """A worker's loop: one balancer, one answer per command."""
    lb = LoadBalancer.from_config(config)
    seen: dict[str, float] = {}

    def watch(address: str) -> None:
        while not lb.closed:
            if not lb.health_checker.is_healthy("users", address):
                seen[address] = time.monotonic()
                return
            time.sleep(0.002)

    for line in commands:
        command, *args = json.loads(line)
        answer: Any = None
        if command == "exit":
            lb.close()
            remaining = [t.name for t in threading.enumerate() if t.name.startswith("tai-lb")]
            answers.write(json.dumps({"threads": remaining}) + "\n")
            answers.flush()
            return
        if command == "pid":
            answer = os.getpid()
        elif command == "checker":
            answer = lb.status()["health_checker"]
        elif command == "healthy":
            answer = lb.health_checker.is_healthy("users", args[0])
        elif command == "checked":
            health = lb.health_checker.health("users", args[0])
            answer = health is not None and health.checked
        elif command == "watch":
            threading.Thread(target=watch, args=(args[0],), name="test-watch",
                             daemon=True).start()
        elif command == "seen":
            answer = seen.get(args[0])
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


@contextlib.contextmanager
def workers(count: int, config: dict[str, Any]) -> Iterator[Workers]:
    made = Workers(count, config)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    made = [Backend(f"h{i}") for i in range(2)]
    yield made
    for backend in made:
        with contextlib.suppress(OSError):
            backend.stop()


def probes_per_interval(backend: Backend, probes: int = 20) -> float:
    """Probes ``backend`` gets per check interval, measured over the next ``probes`` ones."""
    start, started = len(health_paths(backend)), time.monotonic()
    assert wait_for(lambda: len(health_paths(backend)) >= start + probes, timeout=60)
    return probes / (time.monotonic() - started) * CHECKS["interval"]


def share_records(directory: Path) -> dict[str, Any]:
    files = glob.glob(str(directory / "health-users-*.json"))
    assert len(files) == 1, files
    with open(files[0], "rb") as file:
        try:
            records: dict[str, Any] = json.loads(file.read())["endpoints"]
        except ValueError:  # read while being written
            return {}
    return records


@pytest.mark.slow  # gunicorn or forked workers: the main run only
def test_eight_workers_probe_about_as_often_as_one(backends: list[Backend],
                                                  tmp_path: Path) -> None:
    with workers(1, config_for(backends, False)) as alone:
        assert wait_for(lambda: alone.ask(0, "checked", backends[0].address))
        single = [probes_per_interval(b) for b in backends]
    with workers(8, config_for(backends, str(tmp_path))) as group:
        assert wait_for(lambda: all(group.ask_all("checked", backends[1].address)))
        shared = [probes_per_interval(b) for b in backends]
        figures = group.ask_all("checker")
    print(f"probes per endpoint per interval: one worker {single}, 8 sharing {shared}")
    for alone_rate, shared_rate in zip(single, shared):
        assert shared_rate <= 1.5 * alone_rate
    # Every worker follows the shared results; each probe was claimed and published once.
    assert all(f["sharing"]["services"] == ["users"] for f in figures)
    assert all(f["sharing"]["adopted"] > 0 and f["sharing"]["errors"] == 0 for f in figures)
    assert sum(f["sharing"]["published"] for f in figures) >= 2 * 20
    # One small file for the service, whatever the number of workers and endpoints.
    assert [p.name for p in tmp_path.iterdir()] == [share_file_name(
        "users", HealthCheckConfig(**CHECKS, share=str(tmp_path)), "http")]


@pytest.mark.slow  # gunicorn or forked workers: the main run only
def test_a_failing_backend_is_seen_unhealthy_by_every_worker(backends: list[Backend],
                                                            tmp_path: Path) -> None:
    a = backends[0]
    state = {"code": 200}
    flag_health(a, state)
    with workers(8, config_for(backends, str(tmp_path))) as group:
        assert wait_for(lambda: all(group.ask_all("checked", a.address)))
        group.ask_all("watch", a.address)
        failed_at = time.monotonic()
        state["code"] = 503
        assert wait_for(lambda: all(s is not None for s in group.ask_all("seen", a.address)),
                        timeout=20)
        seen = group.ask_all("seen", a.address)
        views = group.ask_all("healthy", a.address)
        other = group.ask_all("healthy", backends[1].address)
    bound = CHECKS["interval"] * CHECKS["unhealthy_threshold"] + 1.0
    print(f"seen unhealthy after {sorted(round(s - failed_at, 3) for s in seen)} s "
          f"(bound {bound} s)")
    assert views == [False] * 8 and other == [True] * 8


@pytest.mark.slow  # gunicorn or forked workers: the main run only
def test_killing_the_prober_lets_another_worker_take_over(backends: list[Backend],
                                                          tmp_path: Path) -> None:
    a = backends[0]
    state = {"code": 200}
    flag_health(a, state)
    with workers(4, config_for(backends, str(tmp_path))) as group:
        pids = group.ask_all("pid")
        assert wait_for(lambda: share_records(tmp_path).get(a.address, {}).get("by") in pids)
        prober = share_records(tmp_path)[a.address]["by"]
        group.kill(pids.index(prober))
        survivors = [pid for pid in pids if pid != prober]
        assert wait_for(lambda: share_records(tmp_path).get(a.address, {}).get("by")
                        in survivors, timeout=10)
        probes = len(health_paths(a))
        assert wait_for(lambda: len(health_paths(a)) >= probes + 5, timeout=10)
        state["code"] = 503  # and the survivors still follow the checks
        assert wait_for(lambda: not any(group.ask_all("healthy", a.address)), timeout=20)
        assert len(group.ask_all("healthy", a.address)) == 3


def test_an_unusable_directory_falls_back_to_probing_alone(
        backends: list[Backend], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    a = backends[0]
    with caplog.at_level(logging.WARNING, "tai_lb"), LoadBalancer.from_config(
            config_for([a], str(not_a_directory))) as lb:
        assert wait_for(lambda: len(health_paths(a)) >= 3)
        assert wait_for(lambda: lb.health_checker.checks >= 3)
        sharing = lb.status()["health_checker"]["sharing"]
    assert sharing["services"] == []
    assert "NotADirectoryError" in sharing["probing_alone"]["users"]
    assert sharing["errors"] >= 1 and sharing["published"] == 0
    warnings = [r for r in caplog.records if "cannot share" in r.getMessage()]
    assert len(warnings) == 1  # logged once, however many rounds failed


def test_two_balancers_of_one_process_share_and_leave_nothing_behind(
        backends: list[Backend], tmp_path: Path) -> None:
    a = backends[0]
    fds_before = _open_fds()
    config = config_for([a], str(tmp_path))
    with LoadBalancer.from_config(config) as one, LoadBalancer.from_config(config) as two:
        assert wait_for(lambda: one.status()["health_checker"]["sharing"]["adopted"] >= 5
                        and two.status()["health_checker"]["sharing"]["adopted"] >= 5)
        figures = [lb.status()["health_checker"]["sharing"] for lb in (one, two)]
    # Each probe was published once and adopted by both balancers.
    assert figures[0]["claimed"] + figures[1]["claimed"] >= 3
    assert not [t for t in threading.enumerate() if t.name.startswith("tai-lb")]
    assert _open_fds() == fds_before
    assert len(list(tmp_path.iterdir())) == 1


def test_a_corrupt_file_is_counted_and_rewritten(backends: list[Backend],
                                                 tmp_path: Path) -> None:
    a = backends[0]
    config = config_for([a], str(tmp_path))
    with LoadBalancer.from_config(config) as lb:
        assert wait_for(lambda: len(list(tmp_path.iterdir())) == 1)
        path = next(tmp_path.iterdir())
        with open(path, "r+b") as file:  # a writer that died in the middle of its write
            fcntl.flock(file, fcntl.LOCK_EX)
            file.truncate()
            file.write(b'{"version": 1, "endpoints": {"127.0.0.1:1": ')
        assert wait_for(lambda: lb.status()["health_checker"]["sharing"]["corrupt_files"] >= 1)
        assert wait_for(lambda: a.address in share_records(tmp_path))
        probes = len(health_paths(a))
        assert wait_for(lambda: len(health_paths(a)) >= probes + 2)
        assert lb.health_checker.is_healthy("users", a.address)


def test_a_corrupt_file_is_logged_at_most_once_a_minute(tmp_path: Path, clock: FakeClock,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    config = HealthCheckConfig(**CHECKS, share=str(tmp_path))
    sharer = ProbeSharing(clock)
    path = tmp_path / share_file_name("users", config, "http")

    def corrupt_and_exchange() -> list[str]:
        path.write_bytes(b'{"version": 1, "endpoints": {"10.0.0.1:80": ')
        sharer.exchange("users", config, "http", [("10.0.0.1:80", True, "HTTP 200")], [])
        return [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]

    with caplog.at_level(logging.WARNING, "tai_lb"):
        warnings = corrupt_and_exchange()
        assert len(warnings) == 1 and str(path) in warnings[0]
        assert json.loads(path.read_bytes())["endpoints"]["10.0.0.1:80"]["ok"] is True
        clock.advance(59)
        assert len(corrupt_and_exchange()) == 1  # counted, not logged again within a minute
        clock.advance(1)
        assert len(corrupt_and_exchange()) == 2
    assert sharer.corrupt == 3


def test_a_default_directory_another_user_could_write_is_refused(
        backends: list[Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared_tmp = tmp_path / "tai-lb-open"
    shared_tmp.mkdir(mode=0o777)
    shared_tmp.chmod(0o777)  # as a directory someone else made in /tmp would be
    monkeypatch.setattr("tai_lb.health.sharing.default_directory", lambda: str(shared_tmp))
    a = backends[0]
    with LoadBalancer.from_config(config_for([a], True)) as lb:
        assert wait_for(lambda: "users" in lb.status()["health_checker"]["sharing"][
            "probing_alone"])
        assert "private directory" in lb.status()["health_checker"]["sharing"][
            "probing_alone"]["users"]
        assert wait_for(lambda: len(health_paths(a)) >= 2)
    assert list(shared_tmp.iterdir()) == []


def _open_fds() -> Optional[int]:
    for where in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(where):
            return len(os.listdir(where))
    return None


def test_a_worker_forked_from_a_preloaded_balancer_shares_with_its_parent(
        backends: list[Backend], tmp_path: Path) -> None:
    a = backends[0]
    with LoadBalancer.from_config(config_for([a], str(tmp_path))) as lb:
        assert wait_for(lambda: lb.status()["health_checker"]["sharing"]["adopted"] >= 1)
        parent = os.getpid()

        def child() -> dict[str, Any]:
            probers: set[Any] = set()

            def adopted_enough() -> bool:
                probers.add(share_records(tmp_path).get(a.address, {}).get("by"))
                return lb.status()["health_checker"]["sharing"]["adopted"] >= 5

            done = wait_for(adopted_enough, timeout=20)
            return {"done": done, "pid": os.getpid(), "probers": sorted(probers - {None}),
                    "sharing": lb.status()["health_checker"]["sharing"],
                    "threads": sorted(t.name for t in lb.health_checker.threads)}

        report = in_forked_child(child, timeout=40)
    assert report["done"] and report["sharing"]["services"] == ["users"]
    assert report["sharing"]["errors"] == 0
    assert set(report["probers"]) <= {parent, report["pid"]}  # the two share one chain
    assert "tai-lb-health-share" in report["threads"]  # restarted in the child


def test_leases_claims_and_the_shared_chain(tmp_path: Path, clock: FakeClock) -> None:
    # Two sharers of one process (as two balancers): a clock the test moves, no threads.
    config = HealthCheckConfig(**CHECKS, share=str(tmp_path))  # interval 0.2, timeout 0.5
    one, two = ProbeSharing(clock), ProbeSharing(clock)
    key = "10.0.0.1:80"

    def exchange(sharer: ProbeSharing, result: Optional[bool] = None,
                 claim: bool = True) -> tuple[dict[str, Any], bool]:
        results = [] if result is None else [(key, result, "HTTP 200" if result else "HTTP 503")]
        records, claimed = sharer.exchange("users", config, "http", results,
                                           [key] if claim else [])
        return records.get(key, {}), key in claimed

    assert exchange(one)[1]  # a new endpoint: claimed at once
    assert not exchange(two)[1]  # a live lease: the other waits
    clock.advance(0.5 + 1.0)  # the lease outlives timeout + 1 s: the check hung
    assert exchange(two)[1]
    record, _ = exchange(two, result=False, claim=False)
    assert (record["failures"], record["healthy"], "lease" in record) == (1, True, False)
    clock.advance(0.1)
    assert not exchange(one)[1]  # checked less than an interval ago
    clock.advance(0.1)
    assert exchange(one)[1]  # an interval since the last check started
    record, _ = exchange(one, result=False, claim=False)
    assert (record["failures"], record["healthy"]) == (2, False)  # two processes, one chain
    clock.advance(0.2)
    assert exchange(two)[1]
    record, _ = exchange(two, result=True, claim=False)
    assert (record["passes"], record["healthy"]) == (1, False)  # rise needs two passes
    clock.advance(2 * 0.2 + 0.5 + 0.01)  # nobody checked for over two intervals
    assert exchange(one)[1]
    record, _ = exchange(one, result=False, claim=False)
    assert (record["failures"], record["healthy"]) == (1, True)  # a new chain: healthy first
    assert one.published + two.published == 4 and one.errors == two.errors == 0


def test_a_lease_of_a_dead_process_is_taken_over_at_once(tmp_path: Path,
                                                         clock: FakeClock) -> None:
    config = HealthCheckConfig(**CHECKS, share=str(tmp_path))
    dead = os.fork()
    if dead == 0:  # pragma: no cover - exits at once
        os._exit(0)
    os.waitpid(dead, 0)
    prober, other = ProbeSharing(clock), ProbeSharing(clock)
    prober.owner = f"{dead}:gone"  # as if the dead process had claimed it
    assert "10.0.0.1:80" in prober.exchange("users", config, "http", [], ["10.0.0.1:80"])[1]
    assert "10.0.0.1:80" in other.exchange("users", config, "http", [], ["10.0.0.1:80"])[1]


@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"endpoints": []}', b'"x"',
                                     b'{"endpoints": {"10.0.0.1:80": {"lease": ["x", "y"], '
                                     b'"started": "z", "seq": null, "healthy": 3}}}',
                                     # pids os.kill cannot take, or int() cannot read
                                     b'{"endpoints": {"10.0.0.1:80": {"lease": '
                                     b'["99999999999999999999:x", 1e18]}}}',
                                     b'{"endpoints": {"10.0.0.1:80": {"lease": '
                                     b'["\\u00b2:x", 1e18]}}}',
                                     # a live pid's lease no process could have written (a
                                     # file from before a reboot: the clock started again)
                                     b'{"endpoints": {"10.0.0.1:80": {"lease": ["%d:x", 1e18]}}}'
                                     % os.getppid()])
def test_any_file_content_is_survived(tmp_path: Path, clock: FakeClock, content: bytes) -> None:
    config = HealthCheckConfig(**CHECKS, share=str(tmp_path))
    sharer = ProbeSharing(clock)
    (tmp_path / share_file_name("users", config, "http")).write_bytes(content)
    records, claimed = sharer.exchange("users", config, "http", [("10.0.0.1:80", False, "x")],
                                       ["10.0.0.1:80"])
    assert claimed == {"10.0.0.1:80"}
    assert records["10.0.0.1:80"]["failures"] == 1


def test_a_file_locked_for_ever_by_another_process_does_not_stop_the_checks(
        backends: list[Backend], tmp_path: Path) -> None:
    a = backends[0]
    flag_health(a, {"code": 503})
    config = config_for([a], str(tmp_path))
    checks = HealthCheckConfig.from_config(config["services"]["users"]["health_check"])
    path = tmp_path / share_file_name("users", checks, "http")
    with open(path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a worker stopped (SIGSTOP, a debugger) holding it
        with LoadBalancer.from_config(config) as lb:
            assert wait_for(lambda: not lb.health_checker.is_healthy("users", a.address))
            assert "users" in lb.status()["health_checker"]["sharing"]["probing_alone"]
        assert not [t for t in threading.enumerate() if t.name.startswith("tai-lb")]


def test_the_share_thread_runs_only_while_a_service_shares(tmp_path: Path) -> None:
    def share_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name == "tai-lb-health-share"]

    checks = {"type": "tcp", "interval": 60}
    lone = {"services": {"users": {"endpoints": ["127.0.0.1:9"], "health_check": checks}}}
    with LoadBalancer.from_config(lone):
        assert share_threads() == []  # nothing shared: no thread for it
    shared = {"services": {**lone["services"], "orders": {
        "endpoints": ["127.0.0.1:9"], "health_check": {**checks, "share": str(tmp_path)}}}}
    with LoadBalancer.from_config(shared):
        assert share_threads() == ["tai-lb-health-share"]
    assert share_threads() == []
