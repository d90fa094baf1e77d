"""The Prometheus export (tai_lb.prometheus): the text format scraped from prometheus_client's
default registry in one process, and gunicorn's multiprocess mode with 4 real workers."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tai_lb import ConfigError, LoadBalancer
from tai_lb.histogram import BOUNDS
from tai_lb.prometheus import DURATION_BUCKETS, EndpointRow, MultiprocessWriter
from tai_lb.request_metrics import ERROR_KINDS

from .backends import Backend
from .backends import status as backend_status
from .conftest import end_process, wait_for
from .prometheus_app import PRELOADED

NAMES = ("requests", "retries", "retry_refusals", "request_duration_seconds",
         "endpoint_healthy", "endpoint_in_flight", "breaker_open")


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text-format scrape, by (name, sorted labels)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def backends() -> Iterator[tuple[Backend, Backend]]:
    good, flaky = Backend("good"), Backend("flaky")
    try:
        yield good, flaky
    finally:
        good.stop()
        flaky.stop()


def test_every_name_is_scraped_from_the_default_registry(
        backends: tuple[Backend, Backend]) -> None:
    good, flaky = backends
    config = {"metrics": {"prometheus": {"namespace": "tlb_one"}},
              "services": {"users": {"endpoints": [good.address, flaky.address],
                                     "circuit_breaker": {"fail_max": 3}}}}
    with LoadBalancer.from_config(config) as lb:
        session = lb.session()
        for _ in range(20):
            assert session.get("http://users/ok").status_code == 200
        flaky.behaviour = backend_status(503)  # each failure is retried on the good one
        for _ in range(6):
            assert session.get("http://users/ok").status_code == 200
        assert lb.status()["metrics"]["prometheus"] == {"namespace": "tlb_one",
                                                         "multiprocess": False}
        assert not any(t.name == "tai-lb-metrics" for t in threading.enumerate())  # no thread
        status = lb.status()["services"]["users"]
        samples = scrape(prometheus_client.generate_latest().decode())
        for name in NAMES:  # each family is there, with its HELP line
            assert any(key[0].startswith(f"tlb_one_{name}") for key in samples), name
        g, f = good.address, flaky.address
        failed = status["endpoints"][f]["errors_by_kind"]["status_5xx"]
        assert failed == 3  # the breaker opened after three 503s, the rest went to the good one
        assert value(samples, "tlb_one_requests_total", service="users", endpoint=f,
                     outcome="status_5xx") == failed
        assert value(samples, "tlb_one_requests_total", service="users", endpoint=f,
                     outcome="success") == 10
        assert value(samples, "tlb_one_requests_total", service="users", endpoint=g,
                     outcome="success") == status["endpoints"][g]["requests"] == 16
        assert value(samples, "tlb_one_requests_total", service="users", endpoint=g,
                     outcome="connect") == 0
        assert value(samples, "tlb_one_retries_total", service="users", endpoint=f) == failed
        assert value(samples, "tlb_one_retry_refusals_total", service="users", endpoint=f) == 0
        assert value(samples, "tlb_one_breaker_open", service="users", endpoint=f) == 1
        assert value(samples, "tlb_one_breaker_open", service="users", endpoint=g) == 0
        assert value(samples, "tlb_one_endpoint_healthy", service="users", endpoint=g) == 1
        assert value(samples, "tlb_one_endpoint_in_flight", service="users", endpoint=g) == 0
        # the histogram: cumulative buckets at every fourth bound, +Inf, _count and _sum
        total = status["requests"]
        assert total == 29
        assert value(samples, "tlb_one_request_duration_seconds_count", service="users") == total
        buckets = [v for (name, labels), v in samples.items()
                   if name == "tlb_one_request_duration_seconds_bucket"]
        assert len(buckets) == len(DURATION_BUCKETS) + 1 and max(buckets) == total
        assert buckets == sorted(buckets)  # parsed in le order: cumulative, never decreasing
        assert [dict(labels)["le"] for (name, labels) in samples
                if name == "tlb_one_request_duration_seconds_bucket"] == [
            *(repr(bound) for bound in DURATION_BUCKETS), "+Inf"]
        assert value(samples, "tlb_one_request_duration_seconds_bucket", service="users",
                     le="+Inf") == total
        latency_sum = value(samples, "tlb_one_request_duration_seconds_sum", service="users")
        p99 = status["p99_ms"] / 1000
        assert 0 < latency_sum <= total * p99 * 1.2  # an estimate from the buckets
        in_flight_seen = []
        with lb.pick("users", exclude={f}):
            in_flight_seen.append(value(scrape(prometheus_client.generate_latest().decode()),
                                        "tlb_one_endpoint_in_flight", service="users",
                                        endpoint=g))
        assert in_flight_seen == [1]
    # closing the balancer unregisters the collector
    assert b"tlb_one_" not in prometheus_client.generate_latest()


def test_unhealthy_endpoints_and_balancers_sharing_a_namespace(
        backends: tuple[Backend, Backend]) -> None:
    good, flaky = backends
    flaky.behaviour = backend_status(500)
    config = {"metrics": {"prometheus": {"namespace": "tlb_two"}},
              "services": {"users": {"endpoints": [good.address, flaky.address],
                                     "health_check": {"path": "/", "interval": 0.05}}}}
    first = LoadBalancer.from_config(config)
    second = LoadBalancer.from_config(config)
    try:
        for lb in (first, second):
            with lb.pick("users"):
                pass

        def healthy(endpoint: str) -> float:
            return value(scrape(prometheus_client.generate_latest().decode()),
                         "tlb_two_endpoint_healthy", service="users", endpoint=endpoint)

        assert wait_for(lambda: healthy(flaky.address) == 0)
        assert healthy(good.address) == 1
        samples = scrape(prometheus_client.generate_latest().decode())
        # the two balancers' figures are summed under one set of labels
        assert value(samples, "tlb_two_request_duration_seconds_count", service="users") == 2
        first.close()
        samples = scrape(prometheus_client.generate_latest().decode())
        assert value(samples, "tlb_two_request_duration_seconds_count", service="users") == 1
    finally:
        first.close()
        second.close()
    assert b"tlb_two_" not in prometheus_client.generate_latest()


def test_a_namespace_clashing_with_registered_metrics_is_a_config_error() -> None:
    counter = prometheus_client.Counter("tlb_three_requests", "someone else's")
    try:
        with pytest.raises(ConfigError) as caught:
            LoadBalancer.from_config({"metrics": {"prometheus": {"namespace": "tlb_three"}},
                                      "services": {"users": {"endpoints": ["10.0.0.1:80"]}}})
        assert caught.value.path == "metrics.prometheus.namespace"
    finally:
        prometheus_client.REGISTRY.unregister(counter)
    with LoadBalancer.from_config({"metrics": {"prometheus": {"namespace": "tlb_three"}},
                                   "services": {"users": {"endpoints": ["10.0.0.1:80"]}}}):
        assert b"# HELP tlb_three_requests_total" in prometheus_client.generate_latest()


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["lazy", "preload"])
def test_gunicorn_multiprocess_mode_sums_the_workers(backends: tuple[Backend, Backend],
                                                     tmp_path: Path, preload: bool) -> None:
    """4 workers, each with its balancer (made in the worker, or made in the master before the
    fork with --preload: then the master's requests are counted once, by the master)."""
    good, other = backends
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    config = {"metrics": {"prometheus": {"namespace": "tai_lb"}},
              "services": {"users": {"endpoints": [good.address, other.address]}}}
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
           "TAI_LB_TEST_CONFIG": json.dumps(config)}
    if preload:
        env["TAI_LB_TEST_PRELOAD"] = "1"
    preloaded = PRELOADED if preload else 0
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "4", "-b", f"fd://{listener.fileno()}",
         *(["--preload"] if preload else []),
         "--config", "python:tests.prometheus_app", "--log-level", "warning",
         "tests.prometheus_app:app"],
        env=env, cwd=Path(__file__).resolve().parent.parent, pass_fds=[listener.fileno()])
    listener.close()  # gunicorn has its own copy

    def up() -> bool:
        try:
            return requests.get(url + "/metrics", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        assert wait_for(up, timeout=30)
        calls = 200
        pids: list[int] = []

        def call(_: int) -> int:
            with requests.Session() as session:
                answer = session.get(url + "/call", timeout=10).json()
            assert answer["status"] == 200
            assert answer["export"] == {"namespace": "tai_lb", "multiprocess": True}
            return int(answer["pid"])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            pids = list(pool.map(call, range(calls)))
        assert len(set(pids)) > 1  # the requests went through more than one worker

        def summed() -> dict[str, float]:
            scraped = requests.get(url + "/metrics", timeout=5)
            if scraped.status_code != 200:
                # prometheus_client's MultiProcessCollector fails on a file a worker is creating
                # (empty for a moment: client_python issue 1199): not yet, scrape again
                return {}
            samples = scrape(scraped.text)
            figures = {"requests": 0.0, "count": 0.0, "in_flight": 0.0}
            for (name, _labels), number in samples.items():
                if name == "tai_lb_requests_total":
                    figures["requests"] += number
                elif name == "tai_lb_request_duration_seconds_count":
                    figures["count"] += number
                elif name == "tai_lb_endpoint_in_flight":
                    figures["in_flight"] += number
            return figures

        total = calls + preloaded
        assert wait_for(lambda: summed().get("requests") == total, timeout=15)
        figures = summed()
        assert figures["count"] == total and figures["in_flight"] == 0
        samples = scrape(requests.get(url + "/metrics", timeout=5).text)
        per_endpoint = {dict(labels)["endpoint"]: number for (name, labels), number
                        in samples.items() if name == "tai_lb_requests_total"
                        and dict(labels)["outcome"] == "success"}
        assert per_endpoint.keys() == {good.address, other.address}
        assert sum(per_endpoint.values()) == total
        assert good.requests_count() + other.requests_count() == total  # none counted twice
        le = {dict(labels)["le"] for (name, labels) in samples
              if name == "tai_lb_request_duration_seconds_bucket"}
        assert le == {*(repr(bound) for bound in DURATION_BUCKETS), "+Inf"}
        healthy = [number for (name, _), number in samples.items()
                   if name == "tai_lb_endpoint_healthy"]
        assert healthy == [1.0, 1.0]
        # each worker wrote its own files (and the master, with --preload): more than one
        # worker's counters are in the sum
        assert len(list(multiproc.glob("counter_*.db"))) == len(set(pids)) + (1 if preload
                                                                               else 0)
    finally:
        end_process(server)


def test_without_prometheus_client_the_key_is_a_config_error() -> None:
    script = """
import sys
sys.modules["prometheus_client"] = None  # an import of it raises ImportError
import threading
import tai_lb
try:
    tai_lb.LoadBalancer.from_config({"metrics": {"prometheus": {}}, "services": {}})
except tai_lb.ConfigError as error:
    print(error.path, "|", error.reason)
assert not any(t.name.startswith("tai-lb-") for t in threading.enumerate())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("metrics.prometheus | Prometheus export needs "
                                   "prometheus_client: pip install 'tai-lb[prometheus]'")


def test_a_missing_multiprocess_directory_is_logged_once_until_it_works_again(
        backends: tuple[Backend, Backend], tmp_path: Path) -> None:
    # prometheus_client picks its multiprocess values at import: a process of its own.
    script = """
import json, logging, os, shutil, sys
from tai_lb import LoadBalancer
logged = []
class Keep(logging.Handler):
    def emit(self, record):
        if record.name == "tai_lb.metrics":
            logged.append(record.levelname)
logging.getLogger("tai_lb").addHandler(Keep())
logging.getLogger("tai_lb").setLevel(logging.INFO)
directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
config = {"metrics": {"prometheus": {"namespace": "tlb_gone"}},
          "services": {"users": {"endpoints": [sys.argv[1]]}}}
figures = {}
with LoadBalancer.from_config(config) as lb, lb.session() as session:
    session.get("http://users/", timeout=5)  # the endpoint has figures from now on
    for _ in range(20):  # ten seconds of the metrics thread's passes
        lb.metrics.flush()
    figures["missing"] = lb.status()["metrics"]
    os.mkdir(directory)
    lb.metrics.flush()  # only the gauges' files (no new request): open from now on
    figures["made"] = lb.status()["metrics"]
    shutil.rmtree(directory)
    session.get("http://users/", timeout=5)  # the counters' file: made now
    lb.metrics.flush()
    figures["removed"] = lb.status()["metrics"]
    figures["logged"] = logged[:]
print(json.dumps(figures))
"""
    directory = tmp_path / "multiproc"
    done = subprocess.run([sys.executable, "-c", script, backends[0].address],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)})
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    # once while missing, INFO when it worked again, once when it failed again
    assert figures["logged"] == ["WARNING", "INFO", "WARNING"]
    assert figures["missing"]["errors"] >= 20  # every failed pass is counted
    assert "FileNotFoundError" in figures["missing"]["failing"]["prometheus"]
    assert figures["made"]["failing"] == {}
    assert "prometheus" in figures["removed"]["failing"]


def test_the_multiprocess_writer_adds_increases_and_zeroes_a_removed_endpoint() -> None:
    """The writer's objects (in memory here: PROMETHEUS_MULTIPROC_DIR is not set in this
    process) get each pass's increases; an endpoint gone since the last pass has in_flight 0."""
    writer = MultiprocessWriter("tlb_four")

    def row(in_flight: int, healthy: bool = True) -> EndpointRow:
        return EndpointRow("users", "10.0.0.1:80", {"in_flight": in_flight}, healthy, False)

    counters = {"requests": 5, "errors": 2, "retries": 1, "refusals": 0,
                **{f"errors.{kind}": 0 for kind in ERROR_KINDS}}
    counters["errors.timeout"] = 2
    writer.write([(row(3), counters, {0: 1, 40: 4, len(BOUNDS): 0})])
    writer.write([(row(2, healthy=False), {**counters, "requests": 1, "errors": 0,
                                           "errors.timeout": 0, "retries": 0}, {40: 1})])

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for metric in writer.metrics.values() for family in metric.collect()
                for sample in family.samples}

    found = samples()
    endpoint = {"service": "users", "endpoint": "10.0.0.1:80"}
    assert value(found, "tlb_four_requests_total", outcome="success", **endpoint) == 4
    assert value(found, "tlb_four_requests_total", outcome="timeout", **endpoint) == 2
    assert value(found, "tlb_four_retries_total", **endpoint) == 1
    assert value(found, "tlb_four_request_duration_seconds_count", service="users") == 6
    # bucket 40 (86 to 102 ms) is inside le=0.1024, not 0.0512; bucket 0 inside le=0.0001
    assert value(found, "tlb_four_request_duration_seconds_bucket", service="users",
                 le="0.0001") == 1
    assert value(found, "tlb_four_request_duration_seconds_bucket", service="users",
                 le="0.0512") == 1
    assert value(found, "tlb_four_request_duration_seconds_bucket", service="users",
                 le="0.1024") == 6
    assert value(found, "tlb_four_endpoint_in_flight", **endpoint) == 2
    assert value(found, "tlb_four_endpoint_healthy", **endpoint) == 0
    writer.write([])  # the endpoint was removed
    assert value(samples(), "tlb_four_endpoint_in_flight", **endpoint) == 0
