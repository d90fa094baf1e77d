"""The ``tai-lb`` command (``python -m tai_lb``).

``demo [--duration S]`` balances live traffic over backends on loopback and kills one midway.
``check CONFIG_FILE`` loads a configuration, resolves the StatsD host as building a balancer
would, and exits 0 when it is valid, or prints the `ConfigError` and exits 2.
``status CONFIG_FILE`` probes every endpoint once, prints a table and exits 0 when every service
has a healthy endpoint, 1 when one has none (2 for a bad configuration).  ``picks`` shows how
every strategy spreads picks.  ``tai-lb COMMAND --help`` describes each.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Callable, Optional

from . import __version__, cli_status
from .balancer import LoadBalancer
from .cli_status import DEFAULT_DISCOVERY_TIMEOUT, DEFAULT_TIMEOUT, DEFAULT_WORKERS
from .config import LoadBalancerConfig, load_config
from .exceptions import ConfigError
from .metrics import resolve_hosts
from .strategies import STRATEGIES

__all__ = ["main"]


def _load(path: str) -> Optional[LoadBalancerConfig]:
    """The configuration in ``path``, or None after printing why it is not valid."""
    try:
        return load_config(path)
    except ConfigError as error:
        print(f"tai-lb: invalid configuration: {error}", file=sys.stderr)
        return None


def _check(path: str) -> int:
    config = _load(path)
    if config is None:
        return 2
    try:  # the lookup construction makes (load_config makes none)
        resolve_hosts(config.metrics)
    except ConfigError as error:
        print(f"tai-lb: invalid configuration: {error}", file=sys.stderr)
        return 2
    services = ", ".join(f"{name} ({len(s.endpoints)} endpoints, {s.strategy.name})"
                         for name, s in config.services.items())
    print(f"{path}: valid; services: {services or 'none'}")
    return 0


def _status(args: argparse.Namespace) -> int:
    config = _load(args.config_file)
    if config is None:
        return 2
    reports = cli_status.probe_services(config, args.timeout, args.discovery_timeout,
                                        args.workers)
    try:
        if args.json:
            cli_status.print_json(reports, sys.stdout)
        else:
            cli_status.print_table(reports, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # piped into head or less, which quit: the exit status still tells
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if all(report.healthy for report in reports) else 1


def _picks(count: int) -> int:
    endpoints = ["127.0.0.1:8001", {"address": "127.0.0.1:8002", "weight": 2},
                 {"address": "127.0.0.1:8003", "weight": 3}]
    services = {name: {"endpoints": endpoints, "strategy": name} for name in STRATEGIES}
    with LoadBalancer.from_config({"services": services}) as lb:
        print(f"{count} picks per strategy over three endpoints of weight 1, 2 and 3\n")
        addresses = ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"]
        print(f"{'strategy':<22}" + "".join(f"{a:>17}" for a in addresses))
        for name in STRATEGIES:
            counts: collections.Counter[str] = collections.Counter()
            for i in range(count):
                with lb.pick(name, key=f"user-{i}") as lease:
                    counts[lease.endpoint.address] += 1
            print(f"{name:<22}" + "".join(f"{counts[a]:>17}" for a in addresses))
    return 0


def _positive(kind: type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not 0 < value < 1e6:
            raise argparse.ArgumentTypeError(f"must be above 0 and below 1e6, got {text}")
        return value
    return parse


_EXAMPLES = {
    "demo": "examples:\n  tai-lb demo\n  tai-lb demo --duration 30",
    "check": "examples:\n  tai-lb check services.json && ./deploy.sh\n  tai-lb check lb.yaml",
    "status": ("examples:\n  tai-lb status services.json\n"
               "  tai-lb status --json services.json | jq .services.users\n"
               "  tai-lb status --timeout 3 --discovery-timeout 10 services.yaml\n\n"
               "exit status: 0 when every service has a healthy endpoint, 1 when one has\n"
               "none, 2 when the configuration is not valid"),
    "picks": "examples:\n  tai-lb picks\n  tai-lb picks --count 600",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tai-lb", description="tai-lb: client-side load balancing, from the command line.",
        epilog="Run 'tai-lb COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"tai-lb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        # Raw formatting keeps the examples' lines; the description is wrapped here instead.
        return commands.add_parser(name, help=summary, description=textwrap.fill(description, 78),
                                   epilog=_EXAMPLES[name],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    demo = command("demo", "balance live traffic on loopback, kill a backend",
                   "Start four HTTP backends on 127.0.0.1, balance GETs over them from four "
                   "threads, kill one halfway through and show the traffic moving around it. "
                   "Exits 0 when no request failed.")
    demo.add_argument("--duration", type=_positive(float), default=10.0, metavar="SECONDS",
                      help="how long to run (default 10)")
    check = command("check", "validate a configuration file",
                    "Load a configuration file (.json, .toml, .yaml, .yml) with every check "
                    "LoadBalancer.from_config makes, the StatsD host's lookup included. "
                    "Exits 0 when it is valid, 2 with the ConfigError on standard error when "
                    "not.")
    check.add_argument("config_file", metavar="CONFIG_FILE")
    status = command("status", "probe every endpoint once and print its health",
                     "Load a configuration file and probe every endpoint of every service "
                     "once, concurrently: with the service's health_check (HTTP path and "
                     "expected statuses, or TCP), or a TCP connect when it has none. A "
                     "service with discovery asks its source once. Prints one row per "
                     "endpoint (service, endpoint, zone, healthy or unhealthy, detail) and a "
                     "line per service.")
    status.add_argument("config_file", metavar="CONFIG_FILE")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT,
                        metavar="SECONDS", help=f"TCP connect timeout for services with no "
                        f"health_check (default {DEFAULT_TIMEOUT:g})")
    status.add_argument("--discovery-timeout", type=_positive(float),
                        default=DEFAULT_DISCOVERY_TIMEOUT, metavar="SECONDS",
                        help=f"wait for a discovery source's first answer "
                        f"(default {DEFAULT_DISCOVERY_TIMEOUT:g})")
    status.add_argument("--workers", type=_positive(int), default=DEFAULT_WORKERS, metavar="N",
                        help=f"probes at once, at most (default {DEFAULT_WORKERS})")
    picks = command("picks", "show how each strategy spreads picks",
                    "Make N picks with every strategy over three loopback endpoints of weight "
                    "1, 2 and 3 and print how many each got. Sends no request.")
    picks.add_argument("--count", type=_positive(int), default=6000, metavar="N",
                       help="picks per strategy (default 6000)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``tai-lb`` command with ``argv`` (default: the process arguments)."""
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.config_file)
    if args.command == "status":
        return _status(args)
    if args.command == "demo":
        from .demo import run_demo  # noqa: PLC0415 - only the demo needs its servers

        return run_demo(args.duration)
    return _picks(args.count)


if __name__ == "__main__":
    sys.exit(main())
