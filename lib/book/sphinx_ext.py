"""The book's own Sphinx extension (``_config.yml``: ``sphinx.extra_extensions``).

It does two things at build time and writes nothing outside the build's output:

* Notebook downloads. The chapters are MyST-markdown notebooks, and sphinx-book-theme offers an
  ``.ipynb`` in its download menu only where a launch service (Binder, Colab, ...) is configured,
  which this book has none of. For every chapter with code cells this writes the chapter's source
  as a notebook (jupytext, no outputs, the ``parameters`` cell as it is) to
  ``_sources/<page>.ipynb`` beside the ``.md`` the theme already offers, with one leading note on
  how to run it, and tells the theme (``ipynb_source``) to list it.
* Links from the bibliography to a page of the book. pybtex renders a ``url`` field as the
  publication's address; an entry whose copy lives in the book names that page instead in a
  ``bookpage`` field (``doc:<docname>``) with a ``bookpagetitle``, and the ``study`` style (the
  plain style plus that link) renders it. The ``doc:`` address is resolved to the page's relative
  address once the page is written, and a missing page is a build warning (so an error under -W).
"""

from __future__ import annotations

from pathlib import Path

#: How a chapter's notebook is made and named: the theme downloads ``_sources/<page>.ipynb``.
NOTEBOOK_SUFFIX = ".ipynb"
#: The prefix of a ``bookpage`` address (``doc:chapters/seed_post``).
DOC_PREFIX = "doc:"


def _note(source_rel: str, has_parameters: bool) -> str:
    params = (" Its `parameters` cell is the chapter's own: `mode = \"replay\"` draws from the data "
              "committed under `data/results/` on any machine, and `mode = \"run\"` measures on an "
              "NVIDIA GPU first (the book's rerun guide says what each chapter measures and costs)."
              if has_parameters else "")
    return ("*This notebook is `" + source_rel + "` of the book \"What Unified Memory and the page "
            "table cost a decode kernel\", converted from the chapter's MyST-markdown source when the "
            "book was built (no outputs). It imports the study's package `lib`: run it from a clone "
            "of the repository with the package installed (`make book` once, or "
            "`pip install -e '.[book]'`)." + params + " The book's own markup (`{glue:text}` roles, "
            "figure directives) renders only in the book, and so do the numbers and figures the cells "
            "hand to `glue(..., display=False)`: to see one in Jupyter, display the value passed to "
            "`glue`.*")


def has_tag(cell, tag: str) -> bool:
    return tag in (cell.get("metadata", {}).get("tags") or [])


def chapter_notebook(md_path: Path, source_rel: str | None = None):
    """The chapter at ``md_path`` as a notebook to download, or None if it has no code cells.

    The cells are jupytext's reading of the source, unchanged, after one markdown note; the
    notebook keeps the kernelspec and drops jupytext's pairing metadata (a download is no
    longer paired with a text file)."""
    import jupytext
    from nbformat import v4

    nb = jupytext.read(md_path)
    if not any(c.cell_type == "code" for c in nb.cells):
        return None
    rel = source_rel or md_path.name
    note = v4.new_markdown_cell(_note(rel, any(has_tag(c, "parameters") for c in nb.cells)))
    note.metadata["tags"] = ["download-note"]
    nb.cells.insert(0, note)
    nb.metadata.pop("jupytext", None)
    return nb


def add_notebook_download(app, pagename, templatename, context, doctree) -> None:
    """html-page-context, before the theme's header buttons (priority 501): write the page's
    notebook into ``_sources/`` and name it for the download menu."""
    if doctree is None or pagename not in app.env.found_docs:
        return
    src = Path(app.env.doc2path(pagename))
    if src.suffix != ".md":
        return
    import nbformat

    nb = chapter_notebook(src, src.relative_to(app.srcdir).as_posix())
    if nb is None:
        return
    out = Path(app.outdir) / "_sources" / f"{pagename}{NOTEBOOK_SUFFIX}"
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.validate(nb)
    nbformat.write(nb, out)
    context["ipynb_source"] = f"{pagename}{NOTEBOOK_SUFFIX}"


def study_style():
    """pybtex's plain style, plus a link to the book's own copy of an entry (``bookpage``)."""
    from pybtex.style.formatting.plain import Style as Plain
    from pybtex.style.template import field, href, join, sentence

    class Study(Plain):
        def format_web_refs(self, e):
            refs = super().format_web_refs(e)
            if "bookpage" not in e.fields:
                return refs
            link = href(field("bookpage", raw=True))[field("bookpagetitle")]
            return join[refs, sentence[join["In this book: ", link]]]

    return Study


def resolve_doc_links(app, doctree, docname) -> None:
    """doctree-resolved: ``doc:<docname>`` references (the bibliography's) to relative addresses."""
    from docutils import nodes
    from sphinx.util import logging

    for node in doctree.findall(nodes.reference):
        uri = node.get("refuri", "")
        if not uri.startswith(DOC_PREFIX):
            continue
        target = uri[len(DOC_PREFIX):]
        if target not in app.env.found_docs:
            logging.getLogger(__name__).warning(f"{docname}: link to a page that is not in the book: {uri}",
                                                location=node)
            continue
        node["refuri"] = app.builder.get_relative_uri(docname, target)
        node["internal"] = True


def setup(app):
    from pybtex.plugin import register_plugin

    register_plugin("pybtex.style.formatting", "study", study_style(), force=True)
    app.connect("html-page-context", add_notebook_download, priority=400)
    app.connect("doctree-resolved", resolve_doc_links)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
