"""``glue`` for the chapters: myst-nb's when it is installed, else a stand-in.

A GPU node may run a chapter (``mode = "run"``) without myst-nb (the wheelhouse's ``--no-book``):
there the stand-in shows the value (when asked to) and keeps it in :data:`GLUED`, so the chapter
runs end to end and its data lands in ``data/results/``; the book is rebuilt where myst-nb is.
"""

from __future__ import annotations

from typing import Any

#: What the stand-in glued in this process (name -> value); empty when myst-nb does the work.
GLUED: dict[str, Any] = {}


def glue(name: str, variable: Any, display: bool = True) -> None:
    """Glue ``variable`` under ``name`` for ``{glue:...}`` roles (see myst_nb.glue)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a glue name must be a non-empty string, got {name!r}")
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        GLUED[name] = variable
        if display:
            from IPython.display import display as show

            show(variable)
        return
    myst_glue(name, variable, display=display)
