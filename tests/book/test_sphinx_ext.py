"""The book's Sphinx extension, without Sphinx: a chapter as a notebook to download, and the
bibliography style's link to a page of the book."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # the book's packages (not on a measuring node)
pytest.importorskip("jupytext")

from lib import ROOT
from lib.book import sphinx_ext as X

CHAPTER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A chapter

```{code-cell} ipython3
:tags: [parameters]

mode = "replay"
```

Some prose with {glue:text}`x`.

```{code-cell} ipython3
x = 1
```
"""


def test_a_chapter_becomes_its_cells_after_one_note(tmp_path):
    md = tmp_path / "fake.md"
    md.write_text(CHAPTER)
    nb = X.chapter_notebook(md, "chapters/fake.md")
    nbformat.validate(nb)
    note, heading, params, prose, code = nb.cells
    assert note.cell_type == "markdown" and "`chapters/fake.md`" in note.source and "parameters" in note.source
    assert params.metadata["tags"] == ["parameters"] and params.source == 'mode = "replay"'
    assert heading.source == "# A chapter" and prose.cell_type == "markdown" and code.source == "x = 1"
    assert "jupytext" not in nb.metadata and nb.metadata["kernelspec"]["name"] == "python3"


def test_a_page_without_code_gets_no_notebook(tmp_path):
    md = tmp_path / "prose.md"
    md.write_text("# Only prose\n\nNothing to run.\n")
    assert X.chapter_notebook(md) is None
    assert X.chapter_notebook(ROOT / "chapters" / "glossary.md") is None


def test_the_study_style_links_an_entry_to_its_page_in_the_book():
    pybtex = pytest.importorskip("pybtex")
    from pybtex.database import parse_string

    del pybtex
    bib = parse_string((ROOT / "references.bib").read_text(encoding="utf-8"), "bibtex")
    style = X.study_style()()
    entries = {e.key: e for e in style.format_entries(bib.entries.values())}
    seed = entries["seed2024profilevllm"].text.render_as("html")
    assert '<a href="doc:chapters/seed_post">the post as received (appendix)</a>' in seed
    assert "not named in the copy this study received" in seed and "Anonymous" not in seed
    other = entries["kwon2023pagedattention"].text.render_as("html")
    assert "doc:" not in other  # entries without a page in the book are the plain style's
    assert (ROOT / Path("chapters/seed_post.md")).is_file()
