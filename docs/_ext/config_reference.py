"""The ``tai-lb-config-reference`` directive: the configuration reference, rendered at build time.

Every section and row comes from :func:`tai_lb._reference.sections`, which reads the settings
classes (their fields, defaults, ``:param`` lines and ``doc()`` metadata), so the page cannot
drift from the code.  ``docs/reference.rst`` holds the directive; ``tests/test_reference.py``
checks that every key the loader accepts is in the sections.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

from tai_lb import _reference

_SPECIAL = re.compile(r"([\\*`|_])")
_QUOTED = re.compile(r'("[^"]*")')
_IN_WORDS = ("required", "the defaults below", "the default")


def plain(text: str) -> str:
    """``text`` with its quoted values as literals and the characters reStructuredText would
    read as markup escaped elsewhere."""
    return "".join(f"``{part}``" if index % 2 else _SPECIAL.sub(r"\\\1", part)
                   for index, part in enumerate(_QUOTED.split(text)))


def _default(text: str) -> str:
    """A default as a literal value, or in words (*required*, *the defaults below*)."""
    if not text:
        return ""
    return f"*{text}*" if text in _IN_WORDS else f"``{text}``"


def section_lines(section: _reference.Section) -> list[str]:
    """One section as reStructuredText: a label, a title, the intro and a table of its keys."""
    title = section.title
    lines = [f".. _config-{section.id}:", "", title, "-" * len(title), "", section.intro, "",
             ".. list-table::", "   :header-rows: 1", "   :widths: 20 12 11 27 30", "",
             "   * - Key", "     - Default", "     - Unit", "     - Allowed values",
             "     - Meaning"]
    for row in section.rows:
        cells = (f"``{row.key}``", _default(row.default),
                 plain(row.unit), plain(row.allowed), row.meaning)
        lines.append(f"   * - {cells[0]}")
        lines.extend(f"     - {cell}" if cell else "     -" for cell in cells[1:])
    return [*lines, ""]


_SECTIONS: list[_reference.Section] = []


def _read_sections(app: Sphinx) -> None:
    # Read before any page: autodoc_preserve_defaults replaces the defaults of the functions
    # it documents with their source text ("1 << 16"), and the reference reads some defaults
    # from signatures (an endpoint's keys, a strategy's options).
    _SECTIONS[:] = _reference.sections()


class ConfigReference(SphinxDirective):
    """Renders every section of the configuration reference."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        lines = StringList()
        for section in _SECTIONS or _reference.sections():
            for line in section_lines(section):
                lines.append(line, "<tai-lb configuration reference>")
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, lines, container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("tai-lb-config-reference", ConfigReference)
    app.connect("builder-inited", _read_sections)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
