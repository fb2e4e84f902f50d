"""Sphinx configuration: numpydoc API reference generated from ``__all__``, and a sphinx-gallery
built (and executed) from ``examples/``.

Build from the repository root with ``python -m sphinx -W -b html docs docs/_build/html``.
The API pages are written at build time (``docs/api/``, not tracked) from each module's
``__all__``, so a name another change adds to ``__all__`` gets its page with no edit here.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))

# Executed examples must not open windows, whatever the environment says.
os.environ["MPLBACKEND"] = "Agg"

import sphinx.ext.autosummary  # noqa: E402
from sphinx.errors import PycodeError  # noqa: E402
from sphinx.pycode import ModuleAnalyzer  # noqa: E402

import sparseconv  # noqa: E402

# autosummary's one-line summaries end at the first ". "; an ellipsis is not the end of a
# sentence (``W_L ... W_1`` would be cut inside the literal).
sphinx.ext.autosummary.periods_re = re.compile(r"(?<!\.)\.(?:\s+)")

project = "sparseconv"
author = "the sparseconv authors"
copyright = "sparseconv authors, BSD-3-Clause"
release = sparseconv.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {"description": "convolutions as exact tied-parameter sparse matrices", "fixed_sidebar": True}

# ---------------------------------------------------------------- autodoc / numpydoc
autosummary_generate = True
autosummary_imported_members = False
autodoc_typehints = "none"  # the numpydoc Parameters sections give the types
autodoc_member_order = "bysource"
numpydoc_show_class_members = False  # the class template lists members through autodoc
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

# ---------------------------------------------------------------- gallery
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    # Executed: every plot_*.py and the README's example. plot_pattern.py is the script that
    # regenerates the README's figure (it writes docs/conv_pattern.png), so it stays out.
    "filename_pattern": r"/(plot_|readme_example)",
    "ignore_pattern": r"(__init__|plot_pattern)\.py",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "reset_modules": ("matplotlib",),
    "show_memory": False,
    "plot_gallery": "True",
    "capture_repr": ("_repr_html_", "__repr__"),
    "min_reported_time": 1,
}

# ---------------------------------------------------------------- the API pages, from __all__
from apigen import write_api_pages  # noqa: E402  (docs/apigen.py, next to this file)

# ---------------------------------------------------------------- docstring fixes before numpydoc
#: A ``*`` that opens a spatial-shape wildcard, as in ``(N, C, *in)``: after "(" or ", ", before
#: a name, and not the start of an ``*emphasis*``.
_SHAPE_STAR = re.compile(r"(?:(?<=\()|(?<=, ))\*(?=\w)(?!\w+\*)")
_LITERAL = re.compile(r"(``.*?``|`[^`]*`_?)")


def _escape_shape_stars(app, what, name, obj, options, lines) -> None:
    """Escape the ``*`` of shapes such as ``ndarray of shape (N, C, *in)`` outside literals.

    The project's docstrings write "any number of spatial dimensions" as ``*in``/``*kernel``;
    in plain text (and in the types numpydoc copies into reStructuredText as they are) that
    ``*`` would start an emphasis that never ends. Inline literals and roles are left alone.
    """
    in_math = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(".. math::"):
            in_math, math_indent = True, len(line) - len(line.lstrip())
            continue
        if in_math:
            if stripped and len(line) - len(line.lstrip()) <= math_indent:
                in_math = False
            else:
                continue
        parts = _LITERAL.split(line)
        lines[i] = "".join(part if k % 2 else _SHAPE_STAR.sub(r"\\*", part) for k, part in enumerate(parts))


_BORROWED: set[str] = set()


def _find_borrowed_docstrings(app, what, name, obj, options, lines) -> None:
    """Note module constants (an ndarray, a dict) that have no ``#:`` comment of their own:
    autodoc would show their type's docstring (numpy's ndarray documentation) instead."""
    if what != "data" or type(obj).__module__.startswith("sparseconv"):
        return
    module, _, attr = name.rpartition(".")
    try:
        comments = ModuleAnalyzer.for_module(module).find_attr_docs()
    except PycodeError:
        comments = {}
    if ("", attr) not in comments:
        _BORROWED.add(name)


def _drop_borrowed_docstrings(app, what, name, obj, options, lines) -> None:
    if name in _BORROWED:
        lines[:] = []


def setup(app) -> None:
    # numpydoc's handler (priority 500) turns the sections into reStructuredText: escape the
    # shapes before it, and drop borrowed docstrings after it (it re-reads an empty docstring
    # from the object).
    app.connect("autodoc-process-docstring", _escape_shape_stars, priority=100)
    app.connect("autodoc-process-docstring", _find_borrowed_docstrings, priority=100)
    app.connect("autodoc-process-docstring", _drop_borrowed_docstrings, priority=900)


write_api_pages()
