"""Write the API reference pages (``docs/api/``) from each module's ``__all__``.

Called by ``conf.py`` at every build, so a name added to a module's ``__all__`` gets its page
with no edit to the documentation; ``tests/test_docs.py`` checks that every public name is
listed without building the site.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import textwrap
from pathlib import Path

import sparseconv

__all__ = ["API_SECTIONS", "API_SKIP", "public_modules", "write_api_pages"]

DOCS = Path(__file__).resolve().parent

#: (module, heading, one line): the pages of the reference, in this order. A public module of
#: the package that is not listed is added at the end under its own name.
API_SECTIONS = [
    ("sparseconv", "Operators and top-level functions", "Everything ``import sparseconv`` gives."),
    ("sparseconv.nn", "Layers, losses and optimiser", "PyTorch-style modules whose products are the sparse matrices."),
    ("sparseconv.models", "Models", "LeNet-5 with C3's connection table."),
    ("sparseconv.reference", "Independent references",
     "Direct loops, the rot180 rule, im2col and the dense matrix, to check against."),
    ("sparseconv.testing", "Testing helpers", "Dot tests, gradient checks and the one table of tolerances."),
    ("sparseconv.geometry", "Geometry", "Output sizes and validation of every convolution option."),
    ("sparseconv.spectral", "Spectral analysis", "Singular values, spectral norms and Lipschitz bounds."),
    ("sparseconv.data", "Data", "The bundled digits and MNIST IDX files."),
    ("sparseconv.train", "Training", "Mini-batch SGD training and evaluation."),
    ("sparseconv.plotting", "Plotting", "Matrix pictures and training curves."),
    ("sparseconv.parallel", "Threads", "Threaded CSR products and the thread-count context."),
    ("sparseconv.cli", "Command line", "``sparseconv`` / ``python -m sparseconv``."),
    ("sparseconv.prune", "Pruning", "Magnitude pruning whose masks leave the pruned taps out of the matrices."),
    ("sparseconv.prune_cli", "The prune command",
     "``python -m sparseconv prune``: LeNet-5 pruned, fine-tuned and timed."),
    ("sparseconv.torch_bridge", "PyTorch bridge",
     "``torch.nn`` modules in (pruning masks included), ``torch.nn.Module`` out."),
]

#: Modules left out of the reference: the benchmark harness is a program, not a library API.
API_SKIP = ("sparseconv.bench", "sparseconv.__main__")


def public_modules() -> list[str]:
    """Every module of the package whose dotted name has no private part, except :data:`API_SKIP`."""
    names = [name for _, name, _ in pkgutil.walk_packages(sparseconv.__path__, "sparseconv.")
             if not any(part.startswith("_") for part in name.split("."))
             and not any(name == skip or name.startswith(skip + ".") for skip in API_SKIP)]
    return sorted(names)


def _unique(obj: object) -> bool:
    """Whether ``obj`` is one object wherever it is exported (not a shared small int or string)."""
    return not isinstance(obj, (int, float, complex, str, bytes, type(None)))


def _api_page(module: str, heading: str, blurb: str, documented: dict[int, str]) -> tuple[str, list[str]]:
    """One module's page and the full names it documents. A class, function or constant gets
    one page, under the first module (in page order) whose ``__all__`` lists it; later modules
    link to it. ``documented`` maps ``id(obj)`` to that full name and is updated here."""
    mod = importlib.import_module(module)
    objects = [(n, getattr(mod, n)) for n in getattr(mod, "__all__", []) if hasattr(mod, n)]
    entries, shared, modules = [], [], []
    for n, obj in objects:
        if type(obj).__name__ == "module":
            modules.append(n)
        elif _unique(obj) and id(obj) in documented:
            shared.append((n, documented[id(obj)]))
        else:
            entries.append(n)
            if _unique(obj):
                documented[id(obj)] = f"{module}.{n}"
    title = f"``{module}``: {heading}" if heading else f"``{module}``"
    lines = [title, "=" * len(title), "", blurb, "", f".. automodule:: {module}", "   :no-members:", "",
             f".. currentmodule:: {module}", ""]
    if entries:
        lines += [".. autosummary::", "   :toctree: generated", "   :nosignatures:", ""]
        lines += [f"   {n}" for n in entries]
        lines.append("")
    if modules:
        lines += ["Modules: " + ", ".join(f":mod:`{module}.{n}`" for n in modules), ""]
    if shared:
        lines += ["Also here, documented on one page each: "
                  + ", ".join(f"``{n}`` (:obj:`{full}`)" for n, full in shared), ""]
    return "\n".join(lines), [f"{module}.{n}" for n in entries]


def _cli_help() -> str:
    from sparseconv.cli import help_text

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width
    return help_text("sparseconv")


def _write_if_changed(path: Path, text: str) -> None:
    # An unchanged page keeps its mtime, so incremental builds stay incremental.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_api_pages(out: Path = DOCS / "api") -> list[str]:
    """Write the API pages (``docs/api/*.rst``) from the modules' ``__all__``; return the modules.

    Run at every build. Pages and autosummary stubs (``generated/``) of names or modules that
    no longer exist are removed, so a rename elsewhere never leaves an orphan page behind.
    """
    out.mkdir(exist_ok=True)
    listed = [m for m, _, _ in API_SECTIONS]
    sections = list(API_SECTIONS) + [(m, "", "") for m in public_modules() if m not in listed]
    pages: list[str] = []
    names: set[str] = set()
    documented: dict[int, str] = {}
    for module, heading, blurb in sections:
        text, entries = _api_page(module, heading, blurb, documented)
        _write_if_changed(out / f"{module}.rst", text)
        pages.append(module)
        names.update(entries)
    index = textwrap.dedent("""\
        API reference
        =============

        Every public name, module by module, generated from each module's ``__all__``. Names that
        ``import sparseconv`` gives are documented once, at the top level.

        .. toctree::
           :maxdepth: 1

        """) + "".join(f"   {p}\n" for p in pages)
    _write_if_changed(out / "index.rst", index)
    _write_if_changed(out / "cli_help.txt", _cli_help())
    for stale in out.glob("*.rst"):
        if stale.stem not in pages and stale.name != "index.rst":
            stale.unlink()
    for stale in (out / "generated").glob("*.rst"):
        if stale.stem not in names:
            stale.unlink()
    return pages
