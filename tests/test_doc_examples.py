"""Every Python code block of README.md and docs/quickstart.rst runs, against real backends.

A page runs as a reader follows it: its blocks in order, in one namespace (a later block uses the
``lb`` or ``reg`` an earlier one made), in a fresh Python process, so that whatever the page
leaves open ends with it; the process closes every balancer the page made before it exits. A
block that fails names the page and its line in the traceback.

The blocks name addresses that the test replaces before running them, by this table (and only
by it, so what runs is what the page shows):

=====================================  =========================================================
in a block                             becomes
=====================================  =========================================================
``127.0.0.1:80NN``, and                the address of a real HTTP backend on 127.0.0.1 started
``"127.0.0.1", 80NN`` (``Endpoint``'s  for the test (tests/backends.py), one per NN; it answers
host and port)                         200 with a JSON body to every path
``https://example.org/``               ``http://`` and the address of one more real backend,
                                       which no service names: the request passes through
                                       requests unbalanced without leaving the machine
``{"type": "dns", ``                   ``{"type": "dns", "nameserver": "127.0.0.1", "port": P, ``
                                       where P is a real DNS server (dnsmasq,
                                       tests/dnsserver.py) whose SRV records for the name the
                                       block asks for give two more real backends
=====================================  =========================================================

A block that cannot run here starts with a line ``# not run: REASON``; it is skipped, and each
page may have at most :data:`MAX_NOT_RUN` of them.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

from .backends import Backend, Factory

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/quickstart.rst"]
NOT_RUN = "# not run:"
MAX_NOT_RUN = 1

PLACEHOLDER = re.compile(r'127\.0\.0\.1(:|", )(80\d\d)\b')
OUTSIDE_URL = "https://example.org/"
DNS_SOURCE = '{"type": "dns", '

# What each page must have sent to the backends: (method, path, Host header), to backends that
# stand for placeholders ("service") or to the one no service names ("outside").
EXPECTED_REQUESTS: dict[str, list[tuple[str, str, str, Optional[str]]]] = {
    "README.md": [("service", "GET", "/api/users/42", "users")],
    "docs/quickstart.rst": [("service", "GET", "/api/users/42", "users"),
                            ("outside", "GET", "/", None)],
}


class Block(NamedTuple):
    """A Python code block of a page: the line of its first line of code, and its code."""

    line: int
    source: str


# -- extracting the blocks ------------------------------------------------------------------------


def markdown_blocks(text: str) -> list[Block]:
    """The ```` ```python ```` fences of a Markdown page."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+|~~~+)\s*(python3?|py)\s*$", lines[i])
        i += 1
        if fence is None:
            continue
        indent, marker = fence.group(1), fence.group(2)
        start, body = i, []
        while i < len(lines) and not lines[i].strip().startswith(marker):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        blocks.append(Block(start + 1, "\n".join(body) + "\n"))
    return blocks


_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(code-block|code|sourcecode)::\s*(\S*)\s*$")
_HIGHLIGHT = re.compile(r"^\s*\.\.\s+highlight::\s*(\S+)\s*$")
_PYTHON = {"python", "python3", "py", "default"}


def rst_blocks(text: str) -> list[Block]:
    """The Python blocks of a reStructuredText page.

    ``.. code-block:: python`` (and its aliases ``code`` and ``sourcecode``), and ``::`` literal
    blocks while the highlight language is Python, as Sphinx's default is (``.. highlight::``
    changes it for the blocks after it).
    """
    blocks = []
    lines = text.splitlines()
    highlight = "default"
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        chosen = _HIGHLIGHT.match(line)
        if chosen is not None:
            highlight = chosen.group(1)
            continue
        directive = _DIRECTIVE.match(line)
        if directive is not None:
            indent = len(directive.group(1))
            language = directive.group(3) or highlight
        elif line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            indent = len(line) - len(line.lstrip())
            language = highlight
        else:
            continue
        # the block: every line after, up to the first non-blank one indented no deeper than
        # the line that opened it (a directive's options come first, then a blank line)
        body: list[tuple[int, str]] = []
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append((i + 1, lines[i]))
            i += 1
        if directive is not None:
            while body and re.match(r"^\s*:[\w-]+:", body[0][1]):
                body.pop(0)
        while body and not body[0][1].strip():
            body.pop(0)
        if language in _PYTHON and body:
            source = textwrap.dedent("\n".join(text for _, text in body)).strip("\n") + "\n"
            blocks.append(Block(body[0][0], source))
    return blocks


def page_blocks(page: str) -> list[Block]:
    """The Python blocks of a page of the project."""
    text = (ROOT / page).read_text(encoding="utf-8")
    return markdown_blocks(text) if page.endswith(".md") else rst_blocks(text)


def test_markdown_blocks_are_the_python_fences_only() -> None:
    page = "text\n```sh\nls\n```\n```python\nx = 1\n\ny = 2\n```\n  ```py\n  z = 3\n  ```\n"
    assert markdown_blocks(page) == [Block(6, "x = 1\n\ny = 2\n"), Block(11, "z = 3\n")]


def test_rst_blocks_are_python_directives_and_literal_blocks_while_python_is_highlighted(
        ) -> None:
    page = textwrap.dedent("""\
        Title
        =====

        .. code-block:: python
           :caption: one

           a = 1

           b = 2

        .. code-block:: console

           $ ls

        A literal block, Python by Sphinx's default::

            c = 3

        .. highlight:: text

        A literal block, text now::

            not python

        .. code-block:: py

           d = 4
        after
        """)
    assert rst_blocks(page) == [Block(7, "a = 1\n\nb = 2\n"), Block(17, "c = 3\n"),
                                Block(27, "d = 4\n")]


@pytest.mark.parametrize("page", PAGES)
def test_each_page_has_python_blocks_and_few_not_run(page: str) -> None:
    blocks = page_blocks(page)
    # every "```python" or ".. code-block:: python" line of the page opened a block found
    text = (ROOT / page).read_text(encoding="utf-8")
    openers = len(re.findall(r"^\s*(```python|\.\. code-block:: python)\s*$", text, re.M))
    assert openers and len(blocks) >= openers
    assert sum(block.source.startswith(NOT_RUN) for block in blocks) <= MAX_NOT_RUN


# -- running them ---------------------------------------------------------------------------------

# Runs in the child process: argv[1] is the JSON of the blocks, argv[2] the report to write.
RUNNER = r"""
import gc, json, sys, time
with open(sys.argv[1]) as file:
    page, blocks = json.load(file)
namespace = {"__name__": "__main__"}
try:
    for line, source in blocks:
        # blank lines first, so that a traceback's line numbers are the page's
        exec(compile("\n" * (line - 1) + source, page, "exec"), namespace)
finally:
    import tai_lb
    balancers = [o for o in gc.get_objects() if isinstance(o, tai_lb.LoadBalancer)]
    open_ones = [lb for lb in balancers if not lb.closed]
    # let every discovery source answer once before the report (10 s at most)
    deadline = time.monotonic() + 10
    def read_once(lb):
        found = lb.status()["services"].values()
        return all(s["discovery"] is None or s["discovery"]["updates"] + s["discovery"]["errors"]
                   for s in found)
    while time.monotonic() < deadline and not all(read_once(lb) for lb in open_ones):
        time.sleep(0.01)
    report = [{name: sorted(e.address for e in lb.registry.endpoints(name))
               for name in lb.registry.services()} for lb in open_ones]
    for lb in balancers:
        lb.close()
    with open(sys.argv[2], "w") as file:
        json.dump(report, file)
"""


def replaced(source: str, ports: dict[str, Backend], outside: Backend, dns_port: int) -> str:
    """``source`` with the placeholders of the module's table replaced."""
    def real(match: re.Match[str]) -> str:
        return f"127.0.0.1{match.group(1)}{ports[match.group(2)].port}"

    source = PLACEHOLDER.sub(real, source)
    source = source.replace(OUTSIDE_URL, f"http://{outside.address}/")
    return source.replace(DNS_SOURCE,
                          f'{DNS_SOURCE}"nameserver": "127.0.0.1", "port": {dns_port}, ')


def srv_names(blocks: list[Block]) -> list[str]:
    """The names that DNS sources of the blocks ask for."""
    return [name for block in blocks for name in re.findall(
        re.escape(DNS_SOURCE) + r'"name":\s*"([^"]+)"', block.source)]


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_of_the_page_runs_against_real_backends(
        page: str, backend_factory: Factory, tmp_path: Path) -> None:
    blocks = [block for block in page_blocks(page) if not block.source.startswith(NOT_RUN)]
    placeholders = sorted({port for block in blocks
                           for _, port in PLACEHOLDER.findall(block.source)})
    ports = {port: backend_factory(f"placeholder-{port}") for port in placeholders}
    outside = backend_factory("outside")
    discovered = [backend_factory("discovered-1"), backend_factory("discovered-2")]
    names = srv_names(blocks)
    with dns_records(names, discovered, tmp_path) as dns_port:
        programme = [page, [[block.line, replaced(block.source, ports, outside, dns_port)]
                            for block in blocks]]
        (tmp_path / "blocks.json").write_text(json.dumps(programme))
        result = subprocess.run(
            [sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json"),
             str(tmp_path / "report.json")],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"a block of {page} failed:\n{result.stderr}"
    report: list[dict[str, list[str]]] = json.loads((tmp_path / "report.json").read_text())

    # real work: the requests the page makes reached the backends, with the Host they name
    service_backends = list(ports.values())
    for where, method, path, host in EXPECTED_REQUESTS[page]:
        targets = service_backends if where == "service" else [outside]
        received = [(r["method"], r["path"], r["headers"].get("Host"))
                    for backend in targets for r in backend.received]
        wanted_host = host if host is not None else outside.address
        assert (method, path, wanted_host) in received, (page, received)
    # a pick printed the address of a real backend
    assert any(backend.address in result.stdout for backend in service_backends), result.stdout
    # a DNS source found the backends its SRV records name
    for _ in names:
        addresses = sorted(backend.address for backend in discovered)
        assert any(addresses in balancer.values() for balancer in report), report


@contextlib.contextmanager
def dns_records(names: list[str], backends: list[Backend], directory: Path) -> Iterator[int]:
    """A real DNS server whose SRV records for ``names`` give ``backends``; yields its port.

    With no names, no server runs and the port is 0.
    """
    if not names:
        yield 0
        return
    from .dnsserver import Srv, running_dns_server

    with running_dns_server(directory) as server:
        server.set_host("backends.tai.test", "127.0.0.1")
        for name in names:
            server.set_srv(name, *(Srv("backends.tai.test", b.port) for b in backends))
        server.apply()
        yield server.port
