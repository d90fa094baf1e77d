"""The package: ``python -m build`` makes an sdist and a wheel that pass ``twine check --strict``,
hold every module, and install into a fresh virtual environment where ``tai-lb demo`` and
``tai-lb check`` work.

The build runs on a copy of the source tree holding what a fresh clone holds (no virtual
environments, build output, ``*.egg-info`` or caches): setuptools would otherwise reuse a stale
``tai_lb.egg-info/SOURCES.txt`` of the checkout, and write into it. The build is isolated, as a
user's is: it installs the ``[build-system]`` requirements of pyproject.toml from the package
index, and so does the install of the wheel's dependencies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional, Union

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "tai_lb"
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("services.*"))
TIMEOUT = 300  # seconds for one build or install: pip may have to download


class Dists(NamedTuple):
    sdist: Path
    wheel: Path


def run(*command: Union[str, Path], cwd: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
    """Run ``command``; fail the test with its output when it exits non-zero."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, (f"{command} exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def clean_copy(destination: Path) -> Path:
    """A copy of the source tree with what a fresh clone has, and nothing built or cached."""
    top_level = {".git", "build", "dist", ".tox", ".nox"}
    anywhere = ("__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
                "_build")

    def left_out(directory: str, names: list[str]) -> set[str]:
        at_top = Path(directory) == ROOT
        return {name for name in names
                if name in anywhere or name.endswith((".egg-info", ".pyc"))
                or (at_top and (name in top_level or name.startswith(".venv")))}

    shutil.copytree(ROOT, destination, ignore=left_out, symlinks=True)
    return destination


def source_modules() -> set[str]:
    """Every module of the package in the source tree, as paths in a wheel."""
    return {path.relative_to(ROOT).as_posix() for path in (ROOT / PACKAGE).rglob("*.py")}


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def modules_in(wheel: Path) -> set[str]:
    return {name for name in wheel_files(wheel) if name.endswith(".py")}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """The sdist and the wheel (built from the sdist, as ``python -m build`` does) of the tree."""
    source = clean_copy(tmp_path_factory.mktemp("source") / "tai-lb")
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, source)
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(out.iterdir())
    return Dists(sdists[0], wheels[0])


def test_twine_check_strict_passes_on_the_sdist_and_the_wheel(dists: Dists) -> None:
    result = run(sys.executable, "-m", "twine", "check", "--strict", dists.sdist, dists.wheel)
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_the_wheel_holds_every_module_of_the_source_tree_and_py_typed(dists: Dists) -> None:
    files = wheel_files(dists.wheel)
    assert modules_in(dists.wheel) == source_modules()
    assert f"{PACKAGE}/py.typed" in files
    profiles = {path.relative_to(ROOT).as_posix()
                for path in (ROOT / PACKAGE).glob("profiles/*.toml")}
    assert profiles and profiles <= files, profiles - files  # "profile": NAME reads them
    assert not [name for name in files if name.startswith(("tests/", "benchmarks/"))]
    licenses = [name for name in files if name.endswith("/LICENSE")]
    assert licenses and all(".dist-info/" in name for name in licenses), licenses


def test_the_sdist_holds_what_a_build_needs(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        names = {name.partition("/")[2] for name in archive.getnames()}
        readme = archive.extractfile(f"{top}/README.md")
        assert readme is not None and readme.read() == (ROOT / "README.md").read_bytes()
    needed = {"README.md", "LICENSE", "pyproject.toml", "setup.cfg", "setup.py", "PKG-INFO",
              f"{PACKAGE}/py.typed"}
    assert needed <= names, needed - names
    assert source_modules() <= names
    # a whole source release: the tests and what they read run from it too
    assert {"tests/conftest.py", "tests/test_package.py", "docs/index.rst",
            "docs/examples/services.json", "benchmarks/picks.py",
            "examples/requests_session.py", "examples/_backends.py"} <= names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_pip_builds_from_the_sdist_a_wheel_with_the_same_modules(
        dists: Dists, tmp_path: Path) -> None:
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", tmp_path, dists.sdist)
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel_files(wheel) == wheel_files(dists.wheel)


def test_the_wheel_installed_in_a_fresh_venv_runs_demo_and_check(
        dists: Dists, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python, command = venv / "bin" / "python", venv / "bin" / "tai-lb"
    # the yaml extra too: check reads the YAML example, and the extras' metadata is exercised
    run(python, "-m", "pip", "install", "--quiet", f"{dists.wheel}[yaml]")

    # from elsewhere than the checkout, the installed package is the one that runs
    where = run(python, "-c", "import tai_lb; print(tai_lb.__file__)", cwd=tmp_path).stdout
    assert where.startswith(str(venv)), where

    demo = run(command, "demo", "--duration", "2", cwd=tmp_path).stdout
    assert "tai-lb demo:" in demo and " 0 failed in " in demo and "KILLED" in demo, demo

    assert EXAMPLES, "docs/examples holds no services.* file"
    for example in EXAMPLES:
        checked = run(command, "check", example, cwd=tmp_path).stdout
        assert f"{example}: valid; services: users (3 endpoints, peak_ewma)" in checked, checked

    broken = tmp_path / "broken.json"
    broken.write_text('{"services": {"users": {"endpoints": ["127.0.0.1:8001"], '
                      '"strategy": "fastest"}}}')
    result = subprocess.run([str(command), "check", str(broken)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 2, result
    assert "services.users.strategy: unknown strategy 'fastest'" in result.stderr

    # a tuning profile is read from the installed package's data files
    profiled = tmp_path / "profiled.json"
    profiled.write_text('{"profile": "production_stable", '
                        '"services": {"users": {"endpoints": ["127.0.0.1:8001"]}}}')
    checked = run(command, "check", profiled, cwd=tmp_path).stdout
    assert f"{profiled}: valid; services: users (1 endpoints, peak_ewma)" in checked, checked
