"""Sphinx configuration for the tai-lb documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html`` from the project root.
The build needs no network: there is no intersphinx.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))  # config_reference: the generated reference

import tai_lb

project = "tai-lb"
author = "tai-lb contributors"
copyright = "tai-lb contributors"
release = tai_lb.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "config_reference",
]

exclude_patterns = ["_build", "_ext", "examples", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# The docstrings use Sphinx ``:param:`` fields; type hints are shown next to them.
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True

nitpicky = False
default_role = "py:obj"

html_theme = "furo"
html_title = f"tai-lb {release}"
html_static_path: list[str] = []


def _drop_exception_return_type(app: object, domain: str, objtype: str,
                                contentnode: object) -> None:
    """Remove the "Return type: None" that autodoc adds to exception classes.

    With ``autodoc_typehints = "description"`` autodoc suppresses the ``__init__`` return type
    for classes but not for exceptions (Sphinx checks for the object type ``class`` only).
    """
    from docutils import nodes  # noqa: PLC0415 - only needed while Sphinx runs

    if domain != "py" or objtype != "exception":
        return
    for field_list in [n for n in contentnode.children if isinstance(n, nodes.field_list)]:
        for field in list(field_list.children):
            if field[0].astext() == "rtype" and field[1].astext().strip() == "None":
                field_list.remove(field)
        if not field_list.children:
            contentnode.remove(field_list)


def setup(app: object) -> dict[str, bool]:
    # After autodoc's own handler (priority 500), which adds the field.
    app.connect("object-description-transform", _drop_exception_return_type, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
