"""The conclusions' summary figure: the cost ladder (:func:`lib.chapters.conclusions.ladder.ladder`)
drawn as one row per placement, grouped by where the cache lives, a dot at the median ratio and a
bar from the smallest to the largest, one colour per card. Returns a closed ``Figure``."""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from lib.book.plots import require_columns, set_house_style
from lib.chapters.conclusions.ladder import GROUPS

GROUP_SHADE = {GROUPS[0]: "#de8f05", GROUPS[1]: "#7f7f7f", GROUPS[2]: "#0173b2"}
MARKERS = ("o", "s", "D", "^", "v")


def times(r: float) -> str:
    """``1.00×``, ``7.4×``, ``313×``: a ratio with as many digits as it needs."""
    return f"{r:.2f}\u00d7" if r < 2 else (f"{r:.1f}\u00d7" if r < 20 else f"{r:.0f}\u00d7")


def ladder_figure(t: pd.DataFrame, *, names: dict | None = None) -> Figure:
    """One row per rung (in ``t``'s order), grouped; x: time relative to device memory, log."""
    require_columns(t, ["gpu_slug", "rung", "label", "group", "source", "median", "min", "max", "n"],
                    "ladder_figure")
    set_house_style()
    slugs = sorted(t["gpu_slug"].unique())
    palette = dict(zip(slugs, sns.color_palette("dark", len(slugs))))
    rungs = list(dict.fromkeys(t["rung"]))
    groups = [g for g in GROUPS if g in set(t["group"])]
    # y positions: a header line per group, then its rungs, top to bottom
    ypos, headers, y = {}, {}, 0.0
    for g in groups:
        headers[g] = y
        y += 1.0
        for r in [r for r in rungs if t.loc[t["rung"] == r, "group"].iloc[0] == g]:
            ypos[r] = y
            y += 1.0
        y += 0.35
    height = 0.29 * y + 1.5
    fig, ax = plt.subplots(figsize=(8.0, height))
    lo, hi = float(t["min"].min()), float(t["max"].max())
    xlim = (min(0.8, lo * 0.9), hi * 4)
    offsets = np.linspace(-0.18, 0.18, len(slugs)) if len(slugs) > 1 else [0.0]
    for off, slug, marker in zip(offsets, slugs, MARKERS * 4):
        d = t[t["gpu_slug"] == slug]
        ys = [ypos[r] + off for r in d["rung"]]
        ax.hlines(ys, d["min"], d["max"], color=palette[slug], lw=2.2, alpha=0.55)
        ax.plot(d["median"], ys, marker, color=palette[slug], ms=6, ls="none",
                label=(names or {}).get(slug, slug))
    # the median beside each bar, for the first card
    first = t[t["gpu_slug"] == slugs[0]].set_index("rung")
    for r, yy in ypos.items():
        if r in first.index:
            row = first.loc[r]
            ax.text(row["max"] * 1.25, yy, times(row["median"]), va="center", ha="left", fontsize=8.8,
                    color="0.1", weight="bold")
    for g, yy in headers.items():
        members = [ypos[r] for r in ypos if t.loc[t["rung"] == r, "group"].iloc[0] == g]
        ax.axhspan(yy - 0.45, max(members) + 0.45, color=GROUP_SHADE[g], alpha=0.06, lw=0)
        ax.text(1.12, yy, g, va="center", ha="left", fontsize=9.5, weight="bold", color=GROUP_SHADE[g])
    ax.axvline(1.0, color="0.3", lw=1, ls="--")
    ax.set_yticks(list(ypos.values()), [t.loc[t["rung"] == r, "label"].iloc[0] for r in ypos], fontsize=8.8)
    ax.set_ylim(y - 0.2, -1.4)
    ax.set_xscale("log")
    ax.set_xlim(*xlim)
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}\u00d7"))
    ax.set_xlabel("decode time \u00f7 the same kernel on device memory (log scale)\n"
                  "dot: median; bar: smallest to largest", fontsize=9.5)
    ax.tick_params(axis="x", labelsize=9)
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.915), fontsize=8.5, title="card", title_fontsize=8.5,
              frameon=True)
    fig.tight_layout()
    plt.close(fig)
    return fig
