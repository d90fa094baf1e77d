"""DNS discovery against a real DNS server (dnsmasq): SRV, A and AAAA records, TTLs, faults."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tai_lb import ConfigError, Endpoint, LoadBalancer, load_config
from tai_lb.discovery import DiscoveryWatcher, DnsConfig, DnsProvider, SourceError

from .conftest import functions_on_stack, wait_for
from .dnsserver import ZONE, DnsServer, Srv, dnsmasq_binary, running_dns_server

USERS_SRV = f"_http._tcp.users.{ZONE}"
WEB1 = f"web1.{ZONE}"
WEB2 = f"web2.{ZONE}"


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[DnsServer]:
    """dnsmasq on a free loopback port, records with a TTL of 1 s; stopped after the test."""
    dnsmasq_binary()  # fails the test, saying how to install it, when it is missing
    with running_dns_server(tmp_path) as server:
        yield server


def discovery(server: DnsServer, **settings: Any) -> dict[str, Any]:
    return {"type": "dns", "name": USERS_SRV, "nameserver": server.nameserver,
            "port": server.port, "interval": 0.05, "min_ttl": 0.05, "timeout": 0.5, **settings}


def lb_for(server: DnsServer, endpoints: tuple[str, ...] = (), **settings: Any) -> LoadBalancer:
    service: dict[str, Any] = {"discovery": discovery(server, **settings)}
    if endpoints:
        service["endpoints"] = list(endpoints)
    return LoadBalancer.from_config({"services": {"users": service}})


def addresses(lb: LoadBalancer) -> set[str]:
    return {e.address for e in lb.registry.endpoints("users")}


def watch_status(lb: LoadBalancer) -> dict[str, Any]:
    status: dict[str, Any] = lb.status()["services"]["users"]["discovery"]
    return status


def provider_of(lb: LoadBalancer) -> DnsProvider:
    provider = lb.watcher("users").provider
    assert isinstance(provider, DnsProvider)
    return provider


def by_hand(lb: LoadBalancer) -> DiscoveryWatcher:
    """The service's watcher, its thread stopped so that a test drives the rounds by hand."""
    watcher = lb.watcher("users")
    watcher.stop()
    watcher.provider.start(lambda: None)  # stop() also made the provider refuse to read
    return watcher


def picked(lb: LoadBalancer, times: int = 20) -> set[str]:
    seen = set()
    for _ in range(times):
        with lb.pick("users") as lease:
            seen.add(lease.address)
    return seen


def test_srv_records_become_endpoints_with_priority_weight_and_port(
        dns_server: DnsServer) -> None:
    dns_server.set_host(WEB1, "127.0.0.11", "127.0.0.12")
    dns_server.set_host(WEB2, "127.0.0.21", "fd00::21")
    dns_server.set_srv(USERS_SRV, Srv(WEB1, 8080, priority=10, weight=5),
                       Srv(WEB2, 8081, priority=20, weight=0))
    dns_server.apply()
    with lb_for(dns_server) as lb:
        by_address = lb.registry.snapshot("users").by_address
        # SRV priorities 10 and 20 rank as groups 0 and 1; weight 0 becomes 1
        assert {a: (e.priority, e.weight) for a, e in by_address.items()} == {
            "127.0.0.11:8080": (0, 5), "127.0.0.12:8080": (0, 5),
            "127.0.0.21:8081": (1, 1), "[fd00::21]:8081": (1, 1)}
        assert by_address["[fd00::21]:8081"].host == "fd00::21"  # hosts are IP addresses
        assert picked(lb) == {"127.0.0.11:8080", "127.0.0.12:8080"}  # group 0 takes traffic
        assert provider_of(lb).snapshot()["ttl"] == 1  # status()'s "source"


def test_srv_targets_not_in_the_additional_section_are_looked_up(dns_server: DnsServer) -> None:
    # dnsmasq gives no address for a target that is an alias: the provider asks for A and AAAA
    dns_server.set_host(WEB1, "127.0.0.11", "fd00::11")
    dns_server.set_cname(f"alias.{ZONE}", WEB1)
    dns_server.set_srv(USERS_SRV, Srv(f"alias.{ZONE}", 8080, weight=3),
                       Srv("127.0.0.31", 8081))  # an address as the target: taken as it is
    dns_server.apply()
    provider = DnsProvider(DnsConfig(name=USERS_SRV, nameserver=dns_server.nameserver,
                                       port=dns_server.port, timeout=0.5))
    assert provider.fetch() == [Endpoint("127.0.0.11", 8080, weight=3),
                                Endpoint("127.0.0.31", 8081),
                                Endpoint("fd00::11", 8080, weight=3)]
    assert provider.skipped == 0
    assert provider.fetch() is None  # the same answer again: nothing to apply


@pytest.mark.parametrize(("record", "expected"), [
    ("A", {"127.0.0.11:9000", "127.0.0.12:9000"}),
    ("AAAA", {"[fd00::11]:9000"}),
])
def test_a_and_aaaa_records_listen_on_endpoint_port(dns_server: DnsServer, record: str,
                                                    expected: set[str]) -> None:
    dns_server.set_host(f"users.{ZONE}", "127.0.0.11", "127.0.0.12", "fd00::11")
    dns_server.apply()
    with lb_for(dns_server, name=f"users.{ZONE}", record=record, endpoint_port=9000) as lb:
        assert addresses(lb) == expected
        assert picked(lb) == expected


def test_record_changes_are_followed_within_the_ttl(dns_server: DnsServer) -> None:
    dns_server.set_host(WEB1, "127.0.0.11", "127.0.0.12")
    dns_server.set_srv(USERS_SRV, Srv(WEB1, 8080, weight=2))
    dns_server.apply()
    with lb_for(dns_server) as lb:
        assert addresses(lb) == {"127.0.0.11:8080", "127.0.0.12:8080"}  # read at start
        # TTL 1 s, above min_ttl: the next read is due 1 s later, plus up to 10% of jitter
        assert 1.0 <= (provider_of(lb).wait_hint() or 0) <= 1.1
        dns_server.set_host(WEB1, "127.0.0.11", "127.0.0.12", "127.0.0.13")
        dns_server.apply()
        assert wait_for(lambda: "127.0.0.13:8080" in addresses(lb))
        assert wait_for(lambda: "127.0.0.13:8080" in picked(lb))
        dns_server.set_host(WEB1, "127.0.0.11", "127.0.0.13")  # a removal
        dns_server.set_srv(USERS_SRV, Srv(WEB1, 8080, weight=7))  # and a change of weight
        dns_server.apply()
        assert wait_for(lambda: {(e.address, e.weight) for e in lb.registry.endpoints("users")}
                        == {("127.0.0.11:8080", 7), ("127.0.0.13:8080", 7)})
        assert "127.0.0.12:8080" not in picked(lb)
        assert watch_status(lb)["updates"] == 3


@pytest.mark.parametrize(("ttl", "min_ttl", "max_ttl", "draw", "expected"), [
    (7, 1.0, 60.0, 0.0, 7.0),  # the TTL as it is
    (7, 1.0, 60.0, 0.5, 7.35),  # plus jitter: up to 10% of it
    (7, 1.0, 5.0, 0.5, 5.25),  # clamped to max_ttl, then the jitter
    (1, 2.0, 60.0, 1.0, 2.2),  # raised to min_ttl
])
def test_the_next_read_waits_for_the_ttl_clamped_plus_jitter(
        dns_server: DnsServer, ttl: int, min_ttl: float, max_ttl: float, draw: float,
        expected: float) -> None:
    dns_server.set_host(f"users.{ZONE}", "127.0.0.11", ttl=ttl)
    dns_server.apply()
    settings = DnsConfig(name=f"users.{ZONE}", record="A", endpoint_port=80,
                           nameserver=dns_server.nameserver, port=dns_server.port,
                           min_ttl=min_ttl, max_ttl=max_ttl, timeout=0.5)
    provider = DnsProvider(settings, rng=lambda: draw)
    assert provider.fetch() == [Endpoint("127.0.0.11", 80)]
    assert provider.wait_hint() == pytest.approx(expected)


@pytest.mark.parametrize(("web1_ttl", "web2_ttl", "expected"), [
    (2, 4, 2.0),  # an address from the additional section
    (4, 3, 3.0),  # an address looked up
    (7, 7, 5.0),  # the SRV records (and the alias)
])
def test_the_wait_is_the_smallest_ttl_of_the_records_used(
        dns_server: DnsServer, web1_ttl: int, web2_ttl: int, expected: float) -> None:
    dns_server.ttl = 5  # of the records without their own: the SRV records, the alias
    dns_server.set_host(WEB1, "127.0.0.11", ttl=web1_ttl)  # in the additional section
    dns_server.set_host(WEB2, "127.0.0.21", ttl=web2_ttl)  # looked up, through the alias
    dns_server.set_cname(f"alias.{ZONE}", WEB2)
    dns_server.set_srv(USERS_SRV, Srv(WEB1, 8080), Srv(f"alias.{ZONE}", 8081))
    dns_server.apply()
    settings = DnsConfig(name=USERS_SRV, nameserver=dns_server.nameserver, port=dns_server.port)
    provider = DnsProvider(settings, rng=lambda: 0.0)
    assert provider.fetch() == [Endpoint("127.0.0.11", 8080), Endpoint("127.0.0.21", 8081)]
    assert provider.wait_hint() == expected


def test_a_dns_server_down_keeps_the_last_good_set_then_is_followed_again(
        dns_server: DnsServer) -> None:
    dns_server.set_host(WEB1, "127.0.0.11", "127.0.0.12")
    dns_server.set_srv(USERS_SRV, Srv(WEB1, 8080))
    dns_server.apply()
    with lb_for(dns_server, timeout=0.2) as lb:
        good = {"127.0.0.11:8080", "127.0.0.12:8080"}
        dns_server.stop()
        assert wait_for(lambda: watch_status(lb)["errors"] >= 1)
        status = watch_status(lb)
        assert "timed out" in status["last_error"]
        assert provider_of(lb).wait_hint() is None  # retried at `interval`
        assert wait_for(lambda: watch_status(lb)["staleness_seconds"] > 0)
        assert addresses(lb) == good
        assert picked(lb) == good
        dns_server.set_host(WEB1, "127.0.0.11", "127.0.0.12", "127.0.0.13")
        dns_server.apply()  # written while down, served once it is back
        dns_server.start()
        assert wait_for(lambda: addresses(lb) == good | {"127.0.0.13:8080"})
        assert watch_status(lb)["last_error"] is None


def test_refused_is_a_source_error_not_an_empty_set(dns_server: DnsServer) -> None:
    # dnsmasq refuses names outside its zone (it has no upstream server)
    with lb_for(dns_server, endpoints=("10.0.0.1:80",), name="users.elsewhere.test") as lb:
        status = watch_status(lb)
        assert status["errors"] >= 1
        assert "REFUSED" in status["last_error"]
        assert addresses(lb) == {"10.0.0.1:80"}  # the listed endpoint stays


def test_malformed_records_are_skipped_counted_and_logged_once(
        dns_server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    dns_server.set_host(WEB1, "127.0.0.11")
    dns_server.set_srv(USERS_SRV, Srv(WEB1, 8080), Srv(f"nowhere.{ZONE}", 8081),
                       Srv(WEB1, 0), Srv(".", 1))  # "." is "no service here", not malformed
    dns_server.apply()
    with caplog.at_level(logging.WARNING, logger="tai_lb.discovery.dns"), lb_for(dns_server) as lb:
        assert addresses(lb) == {"127.0.0.11:8080"}
        assert watch_status(lb)["skipped_entries"] == 2
        watcher = by_hand(lb)
        assert watcher.poll()
        assert watch_status(lb)["skipped_entries"] == 2  # still there: not counted again
    warnings = [r.getMessage() for r in caplog.records if "malformed record" in r.getMessage()]
    assert len(warnings) == 1  # one line an answer, with the count and examples
    assert "skipping 2 malformed record(s)" in warnings[0]
    assert "port 0" in warnings[0]
    assert f"nowhere.{ZONE}" in warnings[0] and "no address" in warnings[0]


@pytest.mark.parametrize("emptied", ["nxdomain", "no records"])
def test_an_answer_emptying_the_service_is_held_back_until_confirmed(
        dns_server: DnsServer, emptied: str) -> None:
    name = f"users.{ZONE}"
    dns_server.set_host(name, "127.0.0.11", "127.0.0.12")
    dns_server.apply()
    with lb_for(dns_server, name=name, record="A", endpoint_port=80, confirmations=3,
                empty_hold=0) as lb:
        watcher = by_hand(lb)
        if emptied == "nxdomain":
            dns_server.set_host(name)
        else:
            dns_server.set_host(name, "fd00::11")  # the name stays, without A records
        dns_server.apply()
        assert watcher.poll() and len(addresses(lb)) == 2  # seen once: held back
        assert watcher.poll() and len(addresses(lb)) == 2
        assert watcher.poll() and addresses(lb) == set()  # the third time: applied
        assert (watcher.held_back, watcher.errors) == (2, 0)


def test_without_a_nameserver_the_system_resolver_configuration_applies(
        dns_server: DnsServer, tmp_path: Path) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(f"nameserver 127.0.0.1\nsearch {ZONE}\n")  # as in a Kubernetes pod
    dns_server.set_host(f"users.{ZONE}", "127.0.0.11")
    dns_server.apply()
    settings = DnsConfig(name="users", record="A", endpoint_port=80, port=dns_server.port,
                           resolv_conf=str(resolv_conf), timeout=0.5)
    assert settings.provider().fetch() == [Endpoint("127.0.0.11", 80)]  # the search list applies
    missing = settings.new(resolv_conf=str(tmp_path / "missing.conf")).provider()
    with pytest.raises(SourceError, match="resolver configuration"):
        missing.fetch()


def test_the_watcher_thread_stops_on_close(dns_server: DnsServer) -> None:
    dns_server.set_host(WEB1, "127.0.0.11")
    dns_server.set_srv(USERS_SRV, Srv(WEB1, 8080))
    dns_server.apply()
    lb = lb_for(dns_server)
    assert any(t.name == "tai-lb-discovery-users" for t in threading.enumerate())
    lb.close()
    assert not any(t.name == "tai-lb-discovery-users" for t in threading.enumerate())


def test_close_ends_a_read_in_flight_within_a_second(
        dns_server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    dns_server.set_host(f"users.{ZONE}", "127.0.0.11")
    dns_server.apply()
    with caplog.at_level(logging.WARNING, logger="tai_lb"):
        lb = lb_for(dns_server, name=f"users.{ZONE}", record="A", endpoint_port=80,
                    max_ttl=0.05, timeout=30)
        provider = provider_of(lb)
        thread = lb.watcher("users").thread
        assert thread is not None
        dns_server.stop()  # the next read waits for an answer that never comes...
        assert wait_for(lambda: provider.wait_hint() is None  # ...and it has begun
                        and "receive_udp" in functions_on_stack(thread))
        lb.close()  # joins the thread for one second at most
        assert not thread.is_alive()
    assert watch_status(lb)["errors"] == 0  # a read cut short is not a failure of the source
    assert [r.getMessage() for r in caplog.records] == []


def test_an_answer_too_large_for_udp_is_read_over_tcp(dns_server: DnsServer) -> None:
    addresses = [f"127.0.1.{i}" for i in range(1, 121)]  # about 2 kB of A records
    dns_server.set_host(f"users.{ZONE}", *addresses)
    dns_server.apply()
    settings = DnsConfig(name=f"users.{ZONE}", record="A", endpoint_port=80,
                           nameserver=dns_server.nameserver, port=dns_server.port, timeout=2.0)
    endpoints = settings.provider().fetch()
    assert endpoints is not None
    assert {e.host for e in endpoints} == set(addresses)


def test_a_name_server_that_does_not_answer_leaves_time_for_the_next(
        dns_server: DnsServer, tmp_path: Path) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    # nothing answers on 127.0.0.2 (dnsmasq listens on 127.0.0.1 alone): it is asked first
    resolv_conf.write_text("nameserver 127.0.0.2\nnameserver 127.0.0.1\n")
    dns_server.set_host(f"users.{ZONE}", "127.0.0.11")
    dns_server.apply()
    settings = DnsConfig(name=f"users.{ZONE}", record="A", endpoint_port=80,
                           port=dns_server.port, resolv_conf=str(resolv_conf), timeout=1.0)
    assert settings.provider().fetch() == [Endpoint("127.0.0.11", 80)]


def test_a_dns_setting_has_sensible_defaults() -> None:
    config = load_config({"services": {"users": {"discovery": {"type": "dns", "name": "x"}}}})
    discovery = config.services["users"].discovery
    assert discovery is not None and discovery.type == "dns"
    assert discovery.source == DnsConfig(name="x", record="SRV", nameserver=None, port=53,
                                           endpoint_port=None, min_ttl=1.0, max_ttl=60.0,
                                           timeout=2.0)
    assert DnsConfig(name="x", record="aaaa", endpoint_port=80).record == "AAAA"


def test_without_dnspython_a_dns_setting_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dns.resolver", None)  # makes `import dns.resolver` fail
    with pytest.raises(ConfigError) as caught:
        load_config({"services": {"users": {"discovery": {"type": "dns", "name": "x"}}}})
    assert caught.value.path == "services.users.discovery.type"
    assert "tai-lb[dns]" in str(caught.value)


def test_tai_lb_imports_without_dnspython() -> None:
    code = ("import sys; sys.modules['dns'] = None; import tai_lb; "
            "tai_lb.LoadBalancer.from_config({'services': {'u': {'endpoints': ['10.0.0.1:80']}}})"
            ".close(); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(("discovery", "path", "fragment"), [
    ({"type": "dns"}, "name", "needs a name"),
    ({"type": "dns", "name": "a..b"}, "name", "not a valid DNS name"),
    ({"type": "dns", "name": "x", "record": "MX"}, "record", "SRV, A or AAAA"),
    ({"type": "dns", "name": "x", "record": "A"}, "endpoint_port", "give endpoint_port"),
    ({"type": "dns", "name": "x", "record": "AAAA", "endpoint_port": 0}, "endpoint_port",
     "1 to 65535"),
    ({"type": "dns", "name": "x", "endpoint_port": 80}, "endpoint_port", "carry their own ports"),
    ({"type": "dns", "name": "x", "nameserver": "ns.example"}, "nameserver", "IP address"),
    ({"type": "dns", "name": "x", "nameserver": 127}, "nameserver", "IP address"),
    ({"type": "dns", "name": "x", "port": 0}, "port", "1 to 65535"),
    ({"type": "dns", "name": "x", "min_ttl": 0}, "min_ttl", "from 0.001"),
    ({"type": "dns", "name": "x", "min_ttl": 5, "max_ttl": 2}, "max_ttl", "below min_ttl"),
    ({"type": "dns", "name": "x", "timeout": "2s"}, "timeout", "number of seconds"),
    ({"type": "dns", "name": "x", "resolv_conf": "/tmp/r"}, "resolv_conf", "unknown key"),
    ({"type": "dns", "name": "x", "path": "x.json"}, "path", "unknown key"),
    ({"type": "dns", "name": "x", "interval": 0}, "interval", "from 0.001"),
])
def test_config_errors_name_the_key(discovery: Any, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"services": {"users": {"discovery": discovery}}})
    assert caught.value.path == f"services.users.discovery.{path}"
    assert fragment in str(caught.value)
