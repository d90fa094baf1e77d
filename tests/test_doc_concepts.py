"""The Python code blocks of docs/concepts.rst run as printed, and do what the page says.

Each block runs in a fresh Python process with this checkout's tai_lb.  The first starts its own
loopback backend and points a service at it and at an address where nothing listens: every
request must succeed and the dead address must end up ejected, as the page's printed output
shows.  The second only picks (no I/O), so its addresses need not exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "concepts.rst"


def python_blocks(text: str) -> list[str]:
    """The bodies of the page's ``.. code-block:: python`` directives, dedented."""
    blocks = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.strip() != ".. code-block:: python":
            continue
        body: list[str] = []
        for following in lines[index + 1:]:
            if following.strip() and not following.startswith(" "):
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return blocks


def run(source: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_page_has_its_two_examples() -> None:
    assert len(python_blocks(PAGE.read_text(encoding="utf-8"))) == 2


def test_the_traced_example_retries_past_the_dead_endpoint_and_ejects_it() -> None:
    output = run(python_blocks(PAGE.read_text(encoding="utf-8"))[0])
    statuses = re.findall(r"^(\d{3}) users GET /hello", output, re.MULTILINE)
    assert statuses == ["200"] * 4, output
    assert "retry: not sent" in output, output
    assert "excluding 1 tried" in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("{'ejected': True, 'times_ejected': 1"), output


def test_the_pick_example_leases_one_of_the_endpoints() -> None:
    source = python_blocks(PAGE.read_text(encoding="utf-8"))[1]
    output = run(source + "print(host, port)\n")
    assert output.split() in (["10.0.0.21", "6379"], ["10.0.0.22", "6379"]), output
