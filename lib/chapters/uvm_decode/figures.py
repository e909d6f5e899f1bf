"""Figures of the chapter "Managed memory under a decode kernel" (frames of lib.chapters.uvm_decode.analysis)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from lib.chapters.uvm_decode import analysis as U
from lib.book.plots import _block_axis, panel_grid, set_house_style
from lib.book.plots import require_columns as _need
from lib.book.frame import card_label, card_slugs

_CB = sns.color_palette("colorblind")
KIND_STYLE = {"device": dict(color="black", marker="o", linestyle="-"),
              "managed": dict(color=_CB[0], marker="s", linestyle="--"),
              "managed_cold": dict(color=_CB[3], marker="v", linestyle="-"),
              "managed_prefetched": dict(color=_CB[2], marker="D", linestyle=":")}


def kinds_figure(rows: pd.DataFrame, backend: str, *, gpu: str | None = None, ncols: int = 2) -> Figure:
    """Time against block size, one panel per (shape, tokens x batch), one line per memory condition."""
    _need(rows, ["gpu_slug", "backend", "shape", "seq_len", "batch_size", "block_size",
                 "condition", "median_us"], "kinds_figure")
    if backend not in set(rows["backend"]):
        raise ValueError(f"no rows for backend {backend!r} (have {sorted(set(rows['backend']))})")
    set_house_style()
    d = rows[rows["backend"] == backend]
    if gpu is not None:
        d = d[d["gpu_slug"] == gpu]
    panels = list(d.groupby(["shape", "seq_len", "batch_size"], sort=True))
    fig, grid = panel_grid(len(panels), ncols, 4.2, 3.2)
    axes = list(grid.flat)
    for ax, ((shape, n, b), g) in zip(axes, panels):
        for kind in U.KINDS:
            k = g[g["condition"] == kind].sort_values("block_size")
            if len(k):
                ax.plot(k["block_size"], k["median_us"], label=U.KIND_LABELS[kind], lw=1.5, ms=4,
                        **KIND_STYLE[kind])
        ax.set_yscale("log")
        _block_axis(ax, g["block_size"])
        ax.set_ylabel("decode time (µs, log)")
        ax.set_title(f"{shape}\n{n} tokens × batch {b}", fontsize=9.5)
    handles, labels = axes[0].get_legend_handles_labels()
    where = f" on the {card_label(gpu)}" if gpu else ""
    fig.suptitle(f"{backend}{where}: the same KV cache in four places", y=1.0)
    legend = fig.legend(handles, labels, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.0))
    # room below the panels for the legend, measured (a fixed share left it touching the x labels)
    legend_h = legend.get_window_extent(fig._get_renderer()).height / fig.bbox.height
    fig.tight_layout(rect=(0, legend_h + 0.01, 1, 1))
    plt.close(fig)
    return fig


def ratio_figure(w: pd.DataFrame) -> Figure:
    """Every point's time relative to device memory (log scale), per managed state and backend,
    one panel per card (H100 first, titled by card) on a shared axis: where the two cards agree."""
    cols = [f"{k}_vs_device" for k in U.KINDS[1:]]
    _need(w, ["backend", "gpu_slug", *cols], "ratio_figure")
    set_house_style()
    cards = card_slugs(w)
    fig, axes = plt.subplots(1, len(cards), figsize=(8.2 if len(cards) == 1 else 11.0, 3.8), squeeze=False,
                             sharey=True)
    hue_order = sorted(set(w["backend"]))
    for ax, card in zip(axes[0], cards):
        long = w[w["gpu_slug"] == card].melt(id_vars=["backend"], value_vars=cols, var_name="state",
                                             value_name="ratio").dropna()
        long["state"] = long["state"].str.replace("_vs_device", "", regex=False).map(SHORT_LABELS)
        sns.stripplot(data=long, x="state", y="ratio", hue="backend", hue_order=hue_order, dodge=True,
                      jitter=0.25, size=3.5, ax=ax, log_scale=True, order=list(SHORT_LABELS.values()))
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xlabel("")
        ax.set_ylabel("time / time on device memory (log)")
        ax.set_title(card_label(card), loc="left")
        if ax is not axes[0][0]:
            ax.get_legend().remove()
    axes[0][0].legend(title=None, loc="upper center", bbox_to_anchor=(0.5 * len(cards), -0.3), ncol=3)
    fig.tight_layout()
    plt.close(fig)
    return fig


#: Shorter state labels for the two-panel figure.
SHORT_LABELS = {"managed": "managed,\nresident", "managed_cold": "managed, cold\n(pages on the host)",
                "managed_prefetched": "managed, after\na prefetch"}
