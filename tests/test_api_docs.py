"""docs/api.rst documents every public module and every public name, and builds without warnings.

The documentation is built (as scripts/test.sh does, warnings as errors) into a temporary
directory, and its object inventory (``objects.inv``, every name Sphinx documented) is read back.
Every module of ``tai_lb`` whose path has no part starting with ``_`` must be there, and so must
every name of its ``__all__``: under that module, under the module that defines it, or, for a
name re-exported by a package, under another module where the same object is documented with the
same name. An old name kept as an alias (``RetryPolicy`` for ``RetryConfig``) counts when the
object it names is documented.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

import tai_lb

ROOT = Path(__file__).resolve().parent.parent

#: public names documented in prose only (a version string has nothing for autodoc to show)
PROSE_ONLY = {("tai_lb", "__version__")}


def public_modules() -> list[str]:
    names = ["tai_lb"]
    for info in pkgutil.walk_packages(tai_lb.__path__, "tai_lb."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return sorted(names)


def read_inventory(path: Path) -> dict[str, str]:
    """Sphinx's objects.inv as {name: role}: four header lines, then zlib-compressed lines."""
    data = path.read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    found: dict[str, str] = {}
    for line in zlib.decompress(data[header_end:]).decode("utf-8").splitlines():
        name, role = line.split(" ", 2)[:2]
        found[name] = role
    return found


def resolve(name: str) -> Any:
    """The object a documented dotted name stands for (a module, or an attribute of one)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr)
        return value
    raise LookupError(name)


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("docs")
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"the docs build failed or warned:\n{build.stderr[-4000:]}"
    return read_inventory(out / "objects.inv")


@pytest.mark.slow
def test_every_public_module_has_a_section(inventory: dict[str, str]) -> None:
    missing = [name for name in public_modules() if inventory.get(name) != "py:module"]
    assert not missing, f"modules with no automodule in docs/api.rst: {missing}"


@pytest.mark.slow
def test_every_public_name_is_documented(inventory: dict[str, str]) -> None:
    by_last: dict[str, list[str]] = {}
    documented_ids: set[int] = set()
    for name, role in inventory.items():
        if not role.startswith("py:"):
            continue
        by_last.setdefault(name.rpartition(".")[2], []).append(name)
        if role in ("py:class", "py:exception", "py:function"):
            documented_ids.add(id(resolve(name)))
    missing = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            if (module_name, name) in PROSE_ONLY:
                continue
            value = getattr(module, name)
            home = getattr(value, "__module__", None)
            if f"{module_name}.{name}" in inventory or f"{home}.{name}" in inventory:
                continue
            if any(resolve(other) is value for other in by_last.get(name, ())):
                continue  # re-exported: documented with the same name elsewhere
            if (isinstance(value, type) or callable(value)) and id(value) in documented_ids:
                continue  # an old name of a documented class
            missing.append(f"{module_name}.{name}")
    assert not missing, f"public names docs/api.rst does not document: {missing}"
