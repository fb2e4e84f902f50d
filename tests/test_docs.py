"""The documentation's sources, checked without building the site (CI builds it with -W):
every public name gets a page, every gallery example can be executed by sphinx-gallery."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
GALLERY = [p for p in EXAMPLES if p.name.startswith("plot_") and p.name != "plot_pattern.py"]


@pytest.fixture(scope="module")
def apigen():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        yield importlib.import_module("apigen")
    finally:
        sys.path.remove(str(ROOT / "docs"))


def test_every_public_name_is_in_the_api_reference(apigen, tmp_path):
    pages = apigen.write_api_pages(tmp_path)
    assert pages[: len(apigen.API_SECTIONS)] == [m for m, _, _ in apigen.API_SECTIONS]
    assert set(pages) >= set(apigen.public_modules())
    text = {page: (tmp_path / f"{page}.rst").read_text() for page in pages}
    for page in pages:
        module = importlib.import_module(page)
        listed = set(re.findall(r"^   (\w+)$", text[page], flags=re.M))
        linked = dict(re.findall(r"``(\w+)`` \(:obj:`([\w.]+)`\)", text[page]))
        modules = set(re.findall(r":mod:`[\w.]+\.(\w+)`", text[page]))
        for name in module.__all__:
            assert name in listed or name in modules or name in linked, f"{page}.{name} has no entry"
            if name in linked:  # the link goes to the page of the same object
                owner, _, short = linked[name].rpartition(".")
                assert getattr(importlib.import_module(owner), short) is getattr(module, name)
    assert "python -m sparseconv" not in (tmp_path / "cli_help.txt").read_text()
    assert "usage: sparseconv spectrum" in (tmp_path / "cli_help.txt").read_text()


def test_api_pages_are_not_rewritten_when_unchanged(apigen, tmp_path):
    apigen.write_api_pages(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    apigen.write_api_pages(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes


def test_gallery_has_the_planned_examples():
    assert len(GALLERY) >= 11
    numbers = [int(re.match(r"plot_(\d+)_", p.name).group(1)) for p in GALLERY]
    assert numbers == sorted(set(numbers)), "gallery files are ordered by a unique number"


@pytest.mark.parametrize("path", GALLERY + [ROOT / "examples" / "readme_example.py"], ids=lambda p: p.name)
def test_each_example_opens_with_a_gallery_title(path):
    """sphinx-gallery needs a reStructuredText title as the docstring's first lines."""
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    assert doc is not None, path.name
    lines = doc.strip("\n").splitlines()
    assert len(lines) >= 3 and set(lines[1]) == {"="} and len(lines[1]) >= len(lines[0]), path.name
    assert lines[2] == "", path.name


def test_pages_of_names_that_no_longer_exist_are_removed(apigen, tmp_path):
    (tmp_path / "generated").mkdir()
    orphans = [tmp_path / "sparseconv.gone.rst", tmp_path / "generated" / "sparseconv.gone.function.rst"]
    for orphan in orphans:
        orphan.write_text("stale")
    kept = tmp_path / "generated" / "sparseconv.ConvOperator.rst"
    kept.write_text("written by autosummary")
    apigen.write_api_pages(tmp_path)
    assert not any(orphan.exists() for orphan in orphans)
    assert kept.read_text() == "written by autosummary"
