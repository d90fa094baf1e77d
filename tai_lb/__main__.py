"""The ``tai-lb`` command (``python -m tai_lb``).

``demo [--duration S]`` balances live traffic over backends on loopback and kills one midway.
``check CONFIG_FILE`` loads a configuration and exits 0 when it is valid, or prints the
`ConfigError` and exits 2.  ``picks`` shows how every strategy spreads picks.
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Sequence
from typing import Optional

from . import __version__
from .balancer import LoadBalancer
from .config import load_config
from .exceptions import ConfigError
from .strategies import STRATEGIES

__all__ = ["main"]


def _check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as error:
        print(f"tai-lb: invalid configuration: {error}", file=sys.stderr)
        return 2
    services = ", ".join(f"{name} ({len(s.endpoints)} endpoints, {s.strategy.name})"
                         for name, s in config.services.items())
    print(f"{path}: valid; services: {services or 'none'}")
    return 0


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``tai-lb`` command with ``argv`` (default: the process arguments)."""
    parser = argparse.ArgumentParser(prog="tai-lb", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tai-lb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="balance live traffic on loopback, kill a backend")
    demo.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    check = commands.add_parser("check", help="validate a configuration file")
    check.add_argument("config_file")
    picks = commands.add_parser("picks", help="show how each strategy spreads picks")
    picks.add_argument("--count", type=int, default=6000)
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.config_file)
    if args.command == "demo":
        from .demo import run_demo  # noqa: PLC0415 - only the demo needs its servers

        return run_demo(args.duration)
    return _picks(args.count)


if __name__ == "__main__":
    sys.exit(main())
