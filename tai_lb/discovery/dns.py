"""DNS discovery: a service's A, AAAA or SRV records, read again when their TTL runs out.

Queries go through dnspython (the ``dns`` extra: ``pip install 'tai-lb[dns]'``), imported only
when a DNS source is configured, to one name server (``nameserver`` and ``port``) or to those of
the system's resolver configuration (``/etc/resolv.conf``, with its search list, as a pod in
Kubernetes expects).  dnspython's own cache is off: every read asks the server.

* **SRV**: one endpoint per address of each target, on the record's port.  Priorities become
  endpoint priorities by rank (the lowest SRV priority that gives endpoints is group 0, the
  next group 1, and so on); SRV weight becomes the endpoint weight, 0 becoming 1 (tai-lb
  weights start at 1; RFC 2782 gives weight 0 the smallest share, which 1 is).  A target's
  addresses come from the answer's additional section, else from A and AAAA queries of it.
* **A** / **AAAA**: one endpoint per address, on ``endpoint_port``.

The next read is due after the answer's TTL (the smallest TTL of the records used), clamped to
``[min_ttl, max_ttl]``, plus up to 10% of it at random so that many processes do not ask in step;
after a failure, after the watcher's ``interval``.  A read may take ``timeout`` seconds, shared
between the name servers (so that a server that does not answer leaves time to ask the next);
stopping the provider cuts it short.  A server that times out, fails (SERVFAIL),
refuses (REFUSED) or cannot be reached raises :class:`~tai_lb.discovery.SourceError`: the last good
set stays.  A name that does not exist (NXDOMAIN) or has no records is an empty set, which the
watcher applies only once confirmed.  A record that cannot become an endpoint (port 0, a target
without an address) is skipped, counted and logged once while it stays in the answers, in one
warning per answer however many there are.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from .._settings import MIN_INTERVAL, Settings, check_number, check_port, doc, shown
from ..endpoint import Endpoint
from ..exceptions import ConfigError
from .base import Provider, Skipped, SourceError

if TYPE_CHECKING:
    import dns.message
    import dns.name
    import dns.resolver

__all__ = ["DnsConfig", "DnsProvider", "DnsSettings"]

log = logging.getLogger(__name__)

_RECORDS = ("SRV", "A", "AAAA")
_JITTER = 0.1  # share of the wait added at random, at most
_MAX_PRIORITY = 1000  # the highest Endpoint.priority
_INSTALL = "DNS discovery needs dnspython: pip install 'tai-lb[dns]'"


@dataclass(frozen=True)
class DnsConfig(Settings):
    """``{"type": "dns", "name": ..., "record": "SRV" | "A" | "AAAA", ...}``: DNS records.

    :param name: the name to query, such as ``_http._tcp.users.default.svc.cluster.local`` (SRV)
        or ``users.service.consul``.
    :param record: ``SRV`` (the default; ports and weights come from the records), ``A`` or
        ``AAAA`` (any case).
    :param nameserver: the IP address of the name server to ask; None: those of the system's
        resolver configuration, whose search list then applies to ``name``.
    :param port: the name server's port (with ``nameserver`` omitted, the system's servers').
    :param endpoint_port: the port the endpoints listen on; required for A and AAAA records, an
        error with SRV records, which carry their own ports.
    :param min_ttl: the shortest wait between reads, whatever the TTL says (Consul answers with
        TTL 0 by default).
    :param max_ttl: the longest wait between reads, whatever the TTL says: how long a change can
        go unseen.
    :param timeout: seconds one read may take, retries included.
    :param resolv_conf: the resolver configuration read when ``nameserver`` is omitted (Python
        only; for tests).
    """

    name: str = field(default="", metadata=doc(allowed="a DNS name",
                                               default="required"))
    record: str = field(default="SRV", metadata=doc(allowed='"SRV", "A" or "AAAA" (any case)'))
    nameserver: Optional[str] = field(default=None, metadata=doc(
        allowed="an IP address, or null (the system's name servers)"))
    port: int = field(default=53, metadata=doc("port", low=1, high=65535))
    endpoint_port: Optional[int] = field(default=None, metadata=doc(
        "port", "required for A and AAAA, refused for SRV", low=1, high=65535))
    min_ttl: float = field(default=1.0, metadata=doc("seconds", low=MIN_INTERVAL, high=3600))
    max_ttl: float = field(default=60.0, metadata=doc(
        "seconds", "at least min_ttl", low=0, high=86400, low_open=True))
    timeout: float = field(default=2.0, metadata=doc("seconds", low=0, high=60, low_open=True))
    resolv_conf: str = "/etc/resolv.conf"

    python_only = ("resolv_conf",)

    def __post_init__(self) -> None:
        try:
            import dns.exception  # noqa: PLC0415 - dnspython is an optional extra
            import dns.name  # noqa: PLC0415
            import dns.resolver  # noqa: PLC0415 - fail here, not at the first read
        except ImportError:
            raise ConfigError("type", _INSTALL) from None
        if not isinstance(self.name, str) or not self.name.strip(". "):
            raise ConfigError("name", f"DNS discovery needs a name to query, "
                                      f"got {shown(self.name)}")
        try:
            dns.name.from_text(self.name)
        except dns.exception.DNSException as error:
            raise ConfigError("name", f"not a valid DNS name ({error}), got "
                                      f"{shown(self.name)}") from None
        record = self.record.upper() if isinstance(self.record, str) else self.record
        if record not in _RECORDS:
            raise ConfigError("record", f"must be SRV, A or AAAA, got {shown(self.record)}")
        object.__setattr__(self, "record", record)
        if self.nameserver is not None:
            try:
                if not isinstance(self.nameserver, str):
                    raise ValueError(self.nameserver)  # ip_address() takes an int as well
                ipaddress.ip_address(self.nameserver)
            except ValueError:
                raise ConfigError("nameserver", f"must be an IP address (leave it out to use the "
                                                f"system's resolver), got "
                                                f"{shown(self.nameserver)}") from None
        check_port(self.port, "port")
        if record == "SRV":
            if self.endpoint_port is not None:
                raise ConfigError("endpoint_port", "SRV records carry their own ports; remove "
                                                   "endpoint_port or query A or AAAA records")
        elif self.endpoint_port is None:
            raise ConfigError("endpoint_port", f"{record} records carry no port: give "
                                               f"endpoint_port, the port the endpoints listen on")
        else:
            check_port(self.endpoint_port, "endpoint_port")
        check_number(self.min_ttl, "min_ttl", MIN_INTERVAL, 3600.0, low_open=False)
        check_number(self.max_ttl, "max_ttl", 0.0, 86400.0)
        if self.max_ttl < self.min_ttl:
            raise ConfigError("max_ttl", f"must not be below min_ttl ({self.min_ttl:g}), got "
                                         f"{shown(self.max_ttl)}")
        check_number(self.timeout, "timeout", 0.0, 60.0)
        if not isinstance(self.resolv_conf, str) or not self.resolv_conf:
            raise ConfigError("resolv_conf", f"must be a file path, "
                                             f"got {shown(self.resolv_conf)}")

    def provider(self, service: str = "") -> Provider:
        """A provider reading the records when their TTL runs out (``service`` is unused: the
        records are found by ``name``)."""
        return DnsProvider(self)


DnsSettings = DnsConfig  #: old name of :class:`DnsConfig`


class DnsProvider(Provider):
    """Reads one service's A, AAAA or SRV records; the next read is due when their TTL runs out.

    Fetched from the watcher's thread only; :meth:`stop`, from any thread, makes a read in
    flight give up within a tenth of a second.

    :param rng: returns a number in [0, 1) that sets the jitter (tests pass a fixed one).
    """

    def __init__(self, settings: DnsConfig, rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.skipped = 0
        self._rng = rng
        self._resolver: Optional[dns.resolver.Resolver] = None
        self._last: Optional[frozenset[Endpoint]] = None
        self._wait: Optional[float] = None
        self._ttl: Optional[int] = None
        self._reported: frozenset[str] = frozenset()  # malformed records already counted
        self._stopping = threading.Event()  # set by stop(): queries in flight give up

    def start(self, notify: Callable[[], None]) -> None:
        """Allow queries again after :meth:`stop`."""
        self._stopping.clear()

    def stop(self) -> None:
        """Make the query in flight, if any, give up within a tenth of a second."""
        self._stopping.set()

    def __repr__(self) -> str:
        return f"DnsProvider({self.settings.record} {self.settings.name})"

    def wait_hint(self) -> Optional[float]:
        """Seconds until the next read: the last answer's TTL, clamped, plus jitter; None
        after a failure or an answer without a TTL (the watcher's ``interval`` then)."""
        return self._wait

    def snapshot(self) -> dict[str, Any]:
        """What was asked and the last answer's TTL, for ``status()``."""
        wait = self._wait
        return {"name": self.settings.name, "record": self.settings.record,
                "nameserver": self.settings.nameserver, "ttl": self._ttl,
                "next_read_after": None if wait is None else round(wait, 3)}

    def fetch(self) -> Optional[list[Endpoint]]:
        """The endpoints the records give now, or None if they are the same as last time."""
        self._wait = None
        problems: list[str] = []
        if self.settings.record == "SRV":
            endpoints, ttl = self._read_srv(problems)
        else:
            port = self.settings.endpoint_port
            assert port is not None  # DnsConfig requires it for A and AAAA
            records, ttl, _ = self._query(self.settings.name, self.settings.record)
            endpoints = [Endpoint(_ip(r.address), port) for r in records]
        self._report(problems)
        self._ttl = ttl
        if ttl is not None:
            wait = min(max(float(ttl), self.settings.min_ttl), self.settings.max_ttl)
            self._wait = wait + wait * _JITTER * self._rng()
        endpoints.sort(key=lambda e: (e.priority, e.host, e.port))
        current = frozenset(endpoints)
        if current == self._last:
            return None
        self._last = current
        return endpoints

    # -- queries ----------------------------------------------------------------------------------

    def _get_resolver(self) -> dns.resolver.Resolver:
        if self._resolver is None:
            import dns.exception  # noqa: PLC0415 - dnspython is an optional extra
            import dns.resolver  # noqa: PLC0415

            settings = self.settings
            if settings.nameserver is None:
                try:
                    resolver = dns.resolver.Resolver(filename=settings.resolv_conf)
                except (dns.exception.DNSException, OSError) as error:
                    raise SourceError(f"cannot use the resolver configuration "
                                      f"{settings.resolv_conf}: {error}") from None
            else:
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = [settings.nameserver]
            resolver.port = settings.port
            resolver.nameservers = self._stoppable(resolver.nameservers)
            resolver.cache = None  # every read asks the server; the TTL sets when
            resolver.lifetime = settings.timeout
            # Each server gets its share of the read's time: one that does not answer at all
            # must leave time to ask the next (the first would otherwise wait out it all).
            resolver.timeout = settings.timeout / max(1, len(resolver.nameservers))
            self._resolver = resolver
        return self._resolver

    def _stoppable(self, nameservers: Sequence[Any]) -> list[Any]:
        """The name servers, as ones whose queries :meth:`stop` cuts short."""
        try:
            from ._nameserver import StoppableNameserver  # noqa: PLC0415 - needs dnspython
        except ImportError:  # dnspython < 2.4: a query in flight runs to its timeout
            return list(nameservers)
        return [StoppableNameserver(server, self.settings.port, self._stopping)
                if isinstance(server, str) and _is_ip(server) else server
                for server in nameservers]

    def _query(self, name: Union[str, dns.name.Name], record: str,
               search: Optional[bool] = None,
               ) -> tuple[list[Any], Optional[int], Optional[dns.message.Message]]:
        """The records of ``name`` (none for NXDOMAIN or an empty answer), their TTL, the
        response; raises SourceError when no server answers usefully."""
        import dns.exception  # noqa: PLC0415 - dnspython is an optional extra
        import dns.resolver  # noqa: PLC0415

        if self._stopping.is_set():
            raise SourceError(f"DNS {record} query for {name}: discovery is stopping")
        resolver = self._get_resolver()
        if search is None:  # the system's search list applies to the configured name only
            search = self.settings.nameserver is None
        try:
            answer = resolver.resolve(name, record, lifetime=self.settings.timeout,
                                      raise_on_no_answer=False, search=search)
        except dns.resolver.NXDOMAIN as error:
            responses: dict[Any, dns.message.Message]
            responses = error.responses()  # type: ignore[no-untyped-call]
            ttls = [t for t in map(_ttl, responses.values()) if t is not None]
            return [], min(ttls, default=None), None
        except (dns.exception.DNSException, OSError) as error:
            raise SourceError(f"DNS {record} query for {name}: {error}") from None
        return list(answer.rrset or ()), _ttl(answer.response), answer.response

    def _read_srv(self, problems: list[str]) -> tuple[list[Endpoint], Optional[int]]:
        import dns.name  # noqa: PLC0415 - dnspython is an optional extra
        import dns.rdatatype  # noqa: PLC0415

        records, ttl, response = self._query(self.settings.name, "SRV")
        ttls = [] if ttl is None else [ttl]  # of every record used
        additional: dict[dns.name.Name, tuple[list[str], int]] = {}  # name -> addresses, TTL
        for rrset in response.additional if response is not None else ():
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                ips, least = additional.get(rrset.name, ([], rrset.ttl))
                additional[rrset.name] = ([*ips, *(_ip(r.address) for r in rrset)],
                                          min(least, rrset.ttl))
        addresses: dict[dns.name.Name, list[str]] = {}  # target -> its addresses
        found: dict[tuple[str, int], tuple[int, int]] = {}  # (ip, port) -> (priority, weight)
        for record in sorted(records, key=lambda r: (r.priority, -r.weight, str(r.target),
                                                     r.port)):
            shown = f"SRV {record.priority} {record.weight} {record.port} {record.target}"
            if record.target == dns.name.root:  # RFC 2782: "decidedly not available here"
                continue
            if record.port == 0:
                problems.append(f"{shown}: port 0")
                continue
            if record.target not in addresses:
                if record.target in additional:
                    addresses[record.target], least = additional[record.target]
                    ttls.append(least)
                else:
                    addresses[record.target] = self._addresses_of(record.target, ttls)
            if not addresses[record.target]:
                problems.append(f"{shown}: the target has no address")
                continue
            for ip in addresses[record.target]:
                if (ip, record.port) in found:
                    problems.append(f"{shown}: {ip} port {record.port} is listed already")
                    continue
                found[(ip, record.port)] = (record.priority, record.weight)
        ranks = {p: min(rank, _MAX_PRIORITY)
                 for rank, p in enumerate(sorted({p for p, _ in found.values()}))}
        # RFC 2782's weight 0 means "the smallest share"; tai-lb weights start at 1.
        endpoints = [Endpoint(ip, port, weight=max(weight, 1), priority=ranks[priority])
                     for (ip, port), (priority, weight) in found.items()]
        return endpoints, min(ttls, default=None)

    def _addresses_of(self, target: dns.name.Name, ttls: list[int]) -> list[str]:
        """A target's A and AAAA addresses (an IP address written as the target is taken as
        is, though RFC 2782 does not allow it)."""
        text = target.to_text(omit_final_dot=True)
        try:
            return [_ip(text)]
        except ValueError:
            pass
        found: list[str] = []
        for record in ("A", "AAAA"):
            records, ttl, _ = self._query(target, record, search=False)
            found.extend(_ip(r.address) for r in records)
            if ttl is not None:
                ttls.append(ttl)
        return found

    def _report(self, problems: list[str]) -> None:
        """Count malformed records once while they stay in the answers, in one warning an
        answer (with a few examples), however many records it holds."""
        skipped = Skipped()
        for problem in dict.fromkeys(problems):
            if problem not in self._reported:
                skipped.add(problem)
        self._reported = frozenset(problems)
        skipped.report(log, self, f"DNS {self.settings.record} {self.settings.name}",
                       "malformed record(s)")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ip(text: str) -> str:
    """An address as an endpoint host: the compressed form of an IPv6 address."""
    return ipaddress.ip_address(text).compressed


def _ttl(response: dns.message.Message) -> Optional[int]:
    """The smallest TTL of an answer; for an empty answer, the negative-caching TTL of the SOA
    in the authority section (RFC 2308), if any."""
    import dns.rdatatype  # noqa: PLC0415 - dnspython is an optional extra

    if response.answer:
        return min(rrset.ttl for rrset in response.answer)
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            minimum: int = rrset[0].minimum
            return min(rrset.ttl, minimum)
    return None
