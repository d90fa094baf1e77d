"""Endpoint: construction, validation that names the field, immutability and hashing."""

from __future__ import annotations

import pickle

import pytest

from tai_lb import ConfigError, Endpoint, Labels


def test_parse_host_port() -> None:
    e = Endpoint.parse("127.0.0.1:8001")
    assert (e.host, e.port, e.address) == ("127.0.0.1", 8001, "127.0.0.1:8001")
    assert (e.weight, e.zone, e.priority, dict(e.labels)) == (1, None, 0, {})


def test_parse_ipv6_keeps_brackets_in_address_only() -> None:
    e = Endpoint.parse("[::1]:8443")
    assert e.host == "::1"
    assert e.address == "[::1]:8443"
    assert Endpoint("0:0:0:0:0:0:0:1", 8443).address == "[::1]:8443"  # normalised


def test_from_dict_with_metadata() -> None:
    e = Endpoint.from_value({"address": "10.0.0.1:80", "weight": 3, "zone": "eu-1a",
                             "region": "eu-1", "version": "1.4", "labels": {"canary": "no"},
                             "priority": 1})
    assert (e.weight, e.zone, e.region, e.version, e.priority) == (3, "eu-1a", "eu-1", "1.4", 1)
    assert e.labels == {"canary": "no"}
    assert Endpoint.from_value({"host": "10.0.0.1", "port": 80}).address == "10.0.0.1:80"


def test_keywords_and_from_value_of_an_endpoint() -> None:
    e = Endpoint("users-1.internal", 8001, zone="eu-1a", labels={"canary": "no"})
    assert Endpoint.from_value(e) is e
    assert e.address == "users-1.internal:8001"


def test_immutable() -> None:
    e = Endpoint("127.0.0.1", 8001)
    with pytest.raises(AttributeError):
        e.port = 9  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del e.host
    with pytest.raises(TypeError):
        e.labels["x"] = "y"  # type: ignore[index]


def test_hashable_with_labels_and_equal_by_value() -> None:
    a = Endpoint("127.0.0.1", 8001, labels={"b": "2", "a": "1"})
    b = Endpoint("127.0.0.1", 8001, labels={"a": "1", "b": "2"})
    c = Endpoint("127.0.0.1", 8001, labels={"a": "1"})
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    assert isinstance(a.labels, Labels)


def test_equal_endpoints_built_different_ways_hash_alike() -> None:
    ways = [
        Endpoint("::1", 80, zone="z", labels={"b": "2", "a": "1"}),
        Endpoint("0:0::1", 80, zone="".join(["z"]), labels=Labels([("a", "1"), ("b", "2")])),
        Endpoint.from_value({"address": "[::1]:80", "zone": "z", "labels": {"a": "1", "b": "2"}}),
        Endpoint.parse("[::1]:80").replace(zone="z", labels={"a": "1", "b": "2"}),
    ]
    ways.append(pickle.loads(pickle.dumps(ways[0])))
    assert all(e == ways[0] and hash(e) == hash(ways[0]) for e in ways)
    assert len(set(ways)) == 1
    assert ways[0] != ways[0].replace(labels={"a": "1"})


def test_labels_are_copied_from_the_dict_given() -> None:
    given = {"canary": "no"}
    e = Endpoint("127.0.0.1", 8001, labels=given)
    given["canary"] = "yes"  # the caller's dict is theirs; the endpoint's labels do not move
    assert e.labels == {"canary": "no"}
    assert Endpoint("127.0.0.1", 8001, labels=given).labels == {"canary": "yes"}


def test_replace_returns_a_checked_copy() -> None:
    e = Endpoint("127.0.0.1", 8001)
    heavier = e.replace(weight=5)
    assert heavier.weight == 5 and e.weight == 1
    with pytest.raises(ConfigError, match="weight"):
        e.replace(weight=0)


def test_pickle_round_trip() -> None:
    e = Endpoint("127.0.0.1", 8001, zone="z", labels={"a": "1"})
    assert pickle.loads(pickle.dumps(e)) == e


def test_to_dict_round_trips() -> None:
    e = Endpoint("127.0.0.1", 8001, weight=2, zone="z", labels={"a": "1"}, priority=1)
    assert Endpoint.from_value(e.to_dict()) == e


def test_repr_shows_address_and_metadata() -> None:
    assert repr(Endpoint("127.0.0.1", 8001, weight=2, zone="z")) == (
        "Endpoint('127.0.0.1:8001', weight=2, zone='z')")


@pytest.mark.parametrize(("value", "path", "fragment"), [
    ("127.0.0.1", "address", "host:port"),
    ("127.0.0.1:http", "address", "port must be a number"),
    ("127.0.0.1:0", "port", "1 to 65535"),
    ("127.0.0.1:70000", "port", "1 to 65535"),
    ("::1:80", "address", "[addr]:port"),
    ("[::1]80", "address", "[ipv6]:port"),
    ("[nothex::zz]:80", "host", "not a valid IPv6"),
    ("bad host:80", "host", "host name or IP"),
    (":80", "host", "non-empty"),
    ({"address": "a:1", "weight": 0}, "weight", "1 to 1000000"),
    ({"address": "a:1", "weight": True}, "weight", "integer"),
    ({"address": "a:1", "weight": 1.5}, "weight", "integer"),
    ({"address": "a:1", "zone": ""}, "zone", "non-empty string"),
    ({"address": "a:1", "region": 3}, "region", "non-empty string"),
    ({"address": "a:1", "version": ""}, "version", "non-empty string"),
    ({"address": "a:1", "priority": -1}, "priority", "0 to 1000"),
    ({"address": "a:1", "labels": ["x"]}, "labels", "mapping"),
    ({"address": "a:1", "labels": {"k": 1}}, "labels.k", "strings"),
    ({"address": "a:1", "labels": {"bad key": "v"}}, "labels", "label names"),
    ({"address": "a:1", "labels": {"key\n": "v"}}, "labels", "label names"),
    ({"host": "a\n", "port": 1}, "host", "host name or IP"),
    ({"address": "a:1", "tls_name": "a\n"}, "tls_name", "host name or IP"),
    ({"address": "a:1", "colour": "red"}, "colour", "unknown key"),
    ({"address": "a:1", "host": "a"}, "", "either address or host and port"),
    ({"host": "a"}, "", "needs address"),
    (42, "", "host:port"),
])
def test_bad_values_name_the_field(value: object, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Endpoint.from_value(value, path="")  # type: ignore[arg-type]
    assert caught.value.path == path
    assert fragment in str(caught.value)


def test_path_prefix_is_kept() -> None:
    with pytest.raises(ConfigError) as caught:
        Endpoint.from_value({"address": "a:1", "weight": -2}, path="services.users.endpoints[1]")
    assert str(caught.value) == (
        "services.users.endpoints[1].weight: must be an integer from 1 to 1000000, got -2")
