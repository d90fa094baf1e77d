"""docs/architecture.rst's module tables name every module and subpackage of tai_lb.

The tables ("The modules") are where a reader finds what each file does; a module added
without its row would go unseen, as ``_config_files.py``, ``_reference.py`` and ``profiles/``
did.  A module counts as named when its path under ``tai_lb/`` is written as a literal in the
tables (``routing/affinity.py``) or as a ``:mod:`` reference (``tai_lb.integrations.flask``);
a subpackage when ``name/`` or ``name/__init__.py`` is.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tai_lb"
PAGE = ROOT / "docs" / "architecture.rst"


def module_tables() -> str:
    """The text of the page's "The modules" section."""
    text = PAGE.read_text(encoding="utf-8")
    heading = "\nThe modules\n-----------\n"
    start = text.index(heading) + len(heading)
    following = re.search(r"\n[^\n]+\n-{3,}\n", text[start:])  # the next section's heading
    return text[start:start + following.start()] if following else text[start:]


def named_paths(section: str) -> set[str]:
    """The paths under tai_lb/ the section names: literals, and :mod: references as paths."""
    names = set(re.findall(r"``([^`\s]+)``", section))
    for module in re.findall(r":mod:`~?tai_lb\.([\w.]+)`", section):
        names.add(module.replace(".", "/") + ".py")
    return names


def package_paths() -> list[str]:
    """Every module of tai_lb as ``path.py`` and every subpackage as ``path/``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py" and path.parent != PACKAGE:
            found.append(relative[:-len("__init__.py")])
        else:
            found.append(relative)
    return found


def test_the_module_tables_name_every_module_and_subpackage() -> None:
    named = named_paths(module_tables())
    missing = [path for path in package_paths()
               if path not in named and f"{path}__init__.py" not in named]
    assert missing == [], f"docs/architecture.rst's module tables lack rows for {missing}"


def test_the_check_sees_the_modules_it_must() -> None:
    # The walk finds modules at every depth, and the section is the tables and nothing else.
    paths = package_paths()
    assert {"balancer.py", "_config_files.py", "profiles/", "discovery/etcd/",
            "discovery/etcd/provider.py", "routing/affinity.py"} <= set(paths)
    section = module_tables()
    assert "list-table" in section and "The pick path" not in section
