"""``tai_lb.__all__`` and the real public exports agree (as httpx's test of the same name), and
no module reads another package's private names."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import tai_lb

PACKAGE = Path(tai_lb.__file__).resolve().parent


def test_all_matches_public_names() -> None:
    exported = set(tai_lb.__all__)
    public = {
        name for name, value in vars(tai_lb).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("tai_lb")
    }
    public.add("__version__")
    assert exported == public


def test_every_exported_name_resolves_and_has_a_docstring() -> None:
    for name in tai_lb.__all__:
        value = getattr(tai_lb, name)
        if callable(value):
            assert value.__doc__, f"tai_lb.{name} has no docstring"


def test_spec_names_are_exported() -> None:
    for name in ("LoadBalancer", "ServiceRegistry", "Endpoint", "LoadBalancerError", "ConfigError",
                 "ConnectionPool", "NoEndpointAvailable", "PoolExhausted", "UnknownService"):
        assert name in tai_lb.__all__


def _module_of(dotted: str) -> bool:
    """Whether ``dotted`` (``tai_lb.x.y``) names a module or package of tai_lb."""
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _package_of(dotted: str) -> str:
    """The package of the module ``dotted``: itself when it is one."""
    is_package = (PACKAGE.parent.joinpath(*dotted.split(".")) / "__init__.py").is_file()
    return dotted if is_package else dotted.rpartition(".")[0]


def _private_reads(path: Path) -> Iterator[str]:
    """``module: name`` for each private name of a module outside ``path``'s own package that
    ``path`` imports (``from ..endpoint import _X``) or reads (``context._y``)."""
    package = path.relative_to(PACKAGE.parent).parts[:-1]
    modules: dict[str, str] = {}  # local name -> the tai_lb module it is bound to
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        source = ".".join((*package[:len(package) - node.level + 1],
                           *([node.module] if node.module else [])))
        for alias in node.names:
            if _module_of(f"{source}.{alias.name}"):
                modules[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif _private(alias.name) and _package_of(source) != ".".join(package):
                yield f"{source}: {alias.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and _private(node.attr)
                and _package_of(modules[node.value.id]) != ".".join(package)):
            yield f"{modules[node.value.id]}: {node.attr}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_reads_the_private_names_of_another_package() -> None:
    # A module's private names may change with it; its own package's modules move with it, the
    # rest of the library reads its public names (maglev may share hashing's _md5, routing may
    # not import endpoint's private pattern).
    found = sorted(f"{path.relative_to(PACKAGE.parent)} reads {read}"
                   for path in sorted(PACKAGE.rglob("*.py")) for read in _private_reads(path))
    assert not found, "\n".join(found)
