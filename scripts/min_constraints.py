"""Print pip constraints that pin every dependency of setup.cfg to its declared minimum.

Usage: python scripts/min_constraints.py [EXTRA ...] > constraints.txt

The lower-bounds job of the test command installs tai-lb with these constraints and runs the unit
tests, so a floor in setup.cfg is one the code really works with.  Only the runtime dependencies
(``install_requires`` and the extras named on the command line) are pinned; the test tools are not.
"""

from __future__ import annotations

import configparser
import pathlib
import re
import sys

_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(;.*)?$")


def requirements(text: str) -> list[str]:
    """The requirement lines of a setup.cfg list value, comments and blanks left out."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def floors(setup_cfg: pathlib.Path, extras: list[str]) -> list[str]:
    """``name==minimum`` (with its environment marker) for each runtime requirement."""
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    wanted = requirements(config["options"]["install_requires"])
    for extra in extras:
        wanted += requirements(config["options.extras_require"][extra])
    pins: dict[str, str] = {}
    for requirement in wanted:
        match = _FLOOR.match(requirement)
        if match is None:
            raise SystemExit(f"no '>=' floor to pin in {requirement!r}")
        name, version, marker = match.groups()
        pins[name.lower()] = f"{name}=={version}{' ' + marker if marker else ''}"
    return list(pins.values())


def main() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    print("\n".join(floors(root / "setup.cfg", sys.argv[1:])))


if __name__ == "__main__":
    main()
