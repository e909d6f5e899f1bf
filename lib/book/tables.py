"""The book's one table style: compact, right-aligned tabular numbers, captions on top, so that
styled tables read alike in every chapter (and columns never touch)."""

from __future__ import annotations

#: the table style of every styled table of the book
COMPACT = [
    {"selector": "th", "props": [("text-align", "center"), ("font-size", "0.75em"),
                                 ("padding", "2px 5px"), ("vertical-align", "bottom")]},
    {"selector": "td", "props": [("text-align", "right"), ("font-size", "0.78em"),
                                 ("padding", "2px 6px"), ("font-variant-numeric", "tabular-nums"),
                                 ("white-space", "nowrap")]},
    {"selector": "th.row_heading", "props": [("white-space", "nowrap"), ("text-align", "left")]},
    {"selector": "caption", "props": [("caption-side", "top"), ("font-size", "0.9em")]},
]


def compact(styler, caption: str | None = None, extra=()):
    """`styler` (a pandas Styler) in the book's compact style, captioned if a caption is given."""
    styler = styler.set_table_styles(COMPACT + list(extra))
    return styler.set_caption(caption) if caption else styler
