"""Shared fixtures, and the session-wide check that no test leaves a tai_lb thread running."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING, Any, Callable, Optional

import pytest

from .backends import Backend, Factory

if TYPE_CHECKING:
    from tai_lb import Endpoint, LoadBalancer

THREAD_PREFIX = "tai-lb"


class FakeClock:
    """A monotonic clock that moves only when told (as cachetools' tests' Timer)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def picks_by(lb: LoadBalancer, of: Callable[[Endpoint], Hashable], picks: int,
             threads: int = 4, key: Any = None, service: str = "svc",
             ) -> collections.Counter[Any]:
    """``of(endpoint)`` counted over ``picks`` picks (and releases) of ``service`` from
    ``threads`` threads, each run in a copy of the caller's routing context."""
    counts: collections.Counter[Any] = collections.Counter()
    lock = threading.Lock()

    def run() -> None:
        mine: collections.Counter[Any] = collections.Counter()
        for _ in range(picks // threads):
            lease = lb.pick(service, key)
            mine[of(lease.endpoint)] += 1
            lease.done()
        with lock:
            counts.update(mine)

    workers = [threading.Thread(target=contextvars.copy_context().run, args=(run,),
                                name=f"test-picker-{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return counts


def end_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> str:
    """Stop ``process``: SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds.
    Returns its standard error when that was piped ("" when not)."""
    process.terminate()
    try:
        errors = process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        errors = process.communicate()[1]
    return errors.decode(errors="replace") if isinstance(errors, bytes) else errors or ""


def open_descriptors() -> dict[int, str]:
    """The file descriptors open in this process, with what each is (Linux: /proc/self/fd).

    Taken after a ``gc.collect()``, so that garbage of earlier tests is not in it; compare one
    taken later without collecting again, so that a socket dropped rather than closed shows.
    """
    found = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own descriptor, closed by now
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


def functions_on_stack(thread: threading.Thread) -> set[str]:
    """The names of the Python functions ``thread`` is in now."""
    frame = sys._current_frames().get(thread.ident or 0)
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return names


def in_forked_child(child: Callable[[], dict[str, Any]],
                    parent: Callable[[], object] = lambda: None,
                    timeout: Optional[float] = None) -> dict[str, Any]:
    """Run ``child()`` in a forked child and return what it returned (JSON, through a pipe).

    ``parent()`` runs in this process meanwhile. The test fails if the child does not exit
    cleanly, or (with ``timeout``) if it has not answered within ``timeout`` seconds of the
    fork; the child is then killed, so a child that hangs inside ``os.fork()`` is not left over.
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(reader)
            os.write(writer, json.dumps(child()).encode())
            code = 0
        finally:
            os._exit(code)
    deadline = None if timeout is None else time.monotonic() + timeout
    os.close(writer)
    parent()
    chunks = []
    with os.fdopen(reader, "rb") as pipe:
        while True:
            if deadline is not None and not select.select(
                    [pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the forked child did not answer within {timeout} s")
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
    report: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    assert os.waitpid(pid, 0)[1] == 0, "the forked child failed"
    return report


@pytest.fixture
def backend_factory() -> Iterator[Factory]:
    """Makes real HTTP backends on 127.0.0.1 (:class:`tests.backends.Backend`), stopped after
    the test."""
    made: list[Backend] = []

    def make(name: str = "", **kwargs: Any) -> Backend:
        backend = Backend(name or f"b{len(made) + 1}", **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        with contextlib.suppress(OSError):
            backend.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _tai_lb_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


@pytest.fixture(scope="session", autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 2.0
    while _tai_lb_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    left = _tai_lb_threads()
    assert not left, f"tests left tai_lb threads running: {[t.name for t in left]}"
