"""The house style and the helpers every chapter's figure module draws with, so pictures read alike.

Chapter figure functions return a `Figure` closed from pyplot, so that notebooks show it once,
where they glue or display it, and never twice.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure


#: Block sizes get a base-2 axis with these ticks (the sizes the seed and vLLM use).
BLOCK_TICKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def set_house_style() -> None:
    """One look for every figure: white grid, colour-blind palette, readable at book width."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85, palette="colorblind",
                  rc={"figure.dpi": 110, "savefig.dpi": 110, "savefig.bbox": "tight", "axes.spines.top": False,
                      "axes.spines.right": False, "axes.titleweight": "bold", "axes.titlesize": 11,
                      "legend.frameon": False})


def _block_axis(ax, sizes) -> None:
    """A log2 block-size axis labelled with the plain sizes (1, 2, 4, ...), not powers."""
    ax.set_xscale("log", base=2)
    ticks = [t for t in BLOCK_TICKS if min(sizes) <= t <= max(sizes)]
    ax.xaxis.set_major_locator(mticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(mticker.FixedFormatter([str(t) for t in ticks]))
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.set_xlabel("block size (tokens)")


def panel_grid(n: int, ncols: int, panel_w: float, panel_h: float):
    """A figure with ``n`` panels in rows of ``ncols`` (unused cells hidden): (fig, 2-D axes);
    ``axes.flat[:n]`` are the panels to draw in."""
    if n < 1 or ncols < 1:
        raise ValueError(f"want n >= 1 and ncols >= 1, got n={n}, ncols={ncols}")
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols, panel_h * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def require_columns(df: pd.DataFrame, cols, what: str) -> None:
    """A figure or table function's input check: the columns it reads, and at least one row."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing}")
    if df.empty:
        raise ValueError(f"{what} got no rows to draw")


def diagram_canvas(w: float, h: float, figsize) -> tuple[Figure, plt.Axes]:
    """An empty, equal-aspect axes of w x h data units for drawing a diagram."""
    set_house_style()
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_xlim(0, w)
    ax.set_ylim(0, h)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def _text_boxes(fig: Figure, renderer) -> list[tuple[str, object]]:
    """(name, window extent) of every visible, non-empty label of a drawn figure: tick labels
    (minor ones included), axis labels, titles, texts and annotations (a suptitle is one of the
    figure's texts), legends (one box each)."""
    boxes = []

    def add(name, artist):
        if artist is not None and artist.get_visible() and (not hasattr(artist, "get_text") or artist.get_text()):
            box = artist.get_window_extent(renderer)
            if box.width > 0 and box.height > 0:
                boxes.append((name, box))

    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if not (ax.axison and axis.get_visible()):  # a diagram's axes drawn without axes
                continue
            # the ticks the axis draws (inside its view), major and minor; get_ticklabels would
            # also return labels of ticks the locator placed outside the view, which are not drawn
            for tick in axis._update_ticks():
                for t in (tick.label1, tick.label2):
                    add(f"axes {i} {name} tick {t.get_text()!r}", t)
            add(f"axes {i} {name} label {axis.label.get_text()!r}", axis.label)
        for t in (ax.title, ax._left_title, ax._right_title, *ax.texts):
            add(f"axes {i} text {t.get_text()!r}", t)
        add(f"axes {i} legend", ax.get_legend())
    for t in fig.texts:
        add(f"figure text {t.get_text()!r}", t)
    for k, lg in enumerate(fig.legends):
        add(f"figure legend {k}", lg)
    return boxes


def label_overlaps(fig: Figure, gap_px: float = 2.0) -> list[str]:
    """Pairs of a figure's labels that overlap on the rendered figure ("a / b"), none if it is clean.

    The figure is drawn as the book saves it (Agg, at its own dpi); two labels count as
    overlapping when they are less than ``gap_px`` pixels apart both across and up, so labels that
    touch or all but touch are caught too."""
    from itertools import combinations

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    fig.draw(renderer)
    found = []
    for (a, ba), (b, bb) in combinations(_text_boxes(fig, renderer), 2):
        w = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)  # > 0: they share columns; > -gap: all but
        h = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
        if w > -gap_px and h > -gap_px:
            found.append(f"{a} / {b}")
    return found
