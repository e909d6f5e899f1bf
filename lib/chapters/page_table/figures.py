"""Figures of the chapter "The price of the page table" (frames of lib.chapters.page_table.analysis)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from lib.chapters.page_table import analysis as P
from lib.book.plots import _block_axis, panel_grid, set_house_style
from lib.book.plots import require_columns as _need

_CB = sns.color_palette("colorblind")
BACKEND_STYLE = {P.PAGED: dict(color=_CB[1], marker="D", linestyle="-", label="ours, paged"),
                 P.CONTIGUOUS: dict(color=_CB[0], marker="s", linestyle="--", label="ours, contiguous"),
                 P.NO_OFFSET: dict(color="grey", marker="x", linestyle=":", label="ours, no_offset (floor)"),
                 "vllm": dict(color=_CB[2], marker="^", linestyle="-", label="vLLM (Triton)"),
                 "sdpa_dense": dict(color=_CB[4], marker="v", linestyle="-", label="SDPA dense"),
                 "own-v1-paged": dict(color=_CB[5], marker=".", linestyle="-", label="ours v1 (forced), paged"),
                 "own-v2-paged": dict(color=_CB[7], marker="+", linestyle="-", label="ours v2 (forced), paged")}


def _select(df: pd.DataFrame, shape: str, gpu: str | None, what: str) -> pd.DataFrame:
    d = df[df["shape"] == shape]
    if gpu is not None:
        d = d[d["gpu_slug"] == gpu]
    if d.empty:
        raise ValueError(f"{what}: no rows for shape {shape!r} on {gpu or 'any card'}")
    if d["gpu_slug"].nunique() > 1:
        raise ValueError(f"{what}: rows from several cards; pass gpu=")
    return d


#: The colour bar's label of :func:`ratio_heatmaps`.
HEAT_CBAR_LABEL = "ratio of decode times (numerator / denominator)\nred: numerator slower, blue: faster"


def heat_norm(values) -> TwoSlopeNorm:
    """One colour scale for every panel of a heat-map figure: white at 1.0, its ends at r and 1/r
    (a ratio and its inverse equally deep), r the most extreme ratio of the figure."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    worst = float(np.max(np.abs(np.log(v)))) if v.size else 0.0
    span = max(worst, np.log(1.01))  # at least +-1 %, so an all-1 grid stays white
    return TwoSlopeNorm(vcenter=1.0, vmin=float(np.exp(-span)), vmax=float(np.exp(span)))


def heat_ticks(norm: TwoSlopeNorm, min_gap: float = 0.07) -> list[float]:
    """Colour-bar ticks: 1, then round ratios (steps of 0.1, then 0.05, 0.02, 0.01) that fall in the
    scale and lie at least ``min_gap`` of the bar's length from every tick already taken."""
    lo, hi = norm.vmin, norm.vmax
    taken = [1.0]
    for step in (0.1, 0.05, 0.02, 0.01):
        for k in range(1, 200):
            for t in (round(1 + k * step, 4), round(1 - k * step, 4)):
                if lo <= t <= hi and all(abs(float(norm(t)) - float(norm(u))) >= min_gap for u in taken):
                    taken.append(t)
    return sorted(taken)


def ratio_heatmaps(ratios: pd.DataFrame, shape: str, *, gpu: str | None = None) -> Figure:
    """One heatmap per ratio over tokens x batch (block 16), all on one colour scale (:func:`heat_norm`)
    with one colour bar; white = 1, red = numerator slower."""
    _need(ratios, ["gpu_slug", "shape", "seq_len", "batch_size", "ratio_name", "ratio"], "ratio_heatmaps")
    set_house_style()
    d = _select(ratios, shape, gpu, "ratio_heatmaps")
    names = [n for n, *_ in P.GRID_RATIOS if n in set(d["ratio_name"])]
    norm = heat_norm(d.loc[d["ratio_name"].isin(names), "ratio"])
    fig, axes = panel_grid(len(names), 2, 5.0, 3.6)
    for ax, name in zip(axes.flat, names):
        m = d[d["ratio_name"] == name].pivot(index="batch_size", columns="seq_len", values="ratio")
        sns.heatmap(m, ax=ax, cmap="RdBu_r", norm=norm, annot=True, fmt=".2f", cbar=False,
                    annot_kws={"fontsize": 7}, linewidths=0.5, linecolor="white")
        ax.invert_yaxis()
        ax.grid(False)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel("batch")
    fig.suptitle(f"{shape}, block 16: ratios of decode times (blank: cache above 8 GiB, not run)", y=1.0)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.915, 0.12, 0.018, 0.76))
    cbar = fig.colorbar(axes.flat[0].collections[0], cax=cax)
    ticks = heat_ticks(norm)
    cbar.set_ticks(ticks)
    cbar.set_ticklabels([f"{t:g}" for t in ticks])
    cbar.set_label(HEAT_CBAR_LABEL, fontsize=8.5)
    cbar.ax.tick_params(labelsize=8)
    plt.close(fig)
    return fig


def roofline_figure(roof: pd.DataFrame, shape: str, *, gpu: str | None = None) -> Figure:
    """Percent of the measured read ceiling against the bytes a call must move, per backend."""
    _need(roof, ["gpu_slug", "shape", "backend", "bytes_moved", "pct_of_read_ceiling"], "roofline_figure")
    set_house_style()
    d = _select(roof, shape, gpu, "roofline_figure")
    fig, ax = plt.subplots(figsize=(8.2, 4.0))
    for backend, g in d.groupby("backend"):
        st = BACKEND_STYLE.get(backend, dict(color="black", marker="o", label=backend))
        ax.scatter(g["bytes_moved"] / 2**20, g["pct_of_read_ceiling"], s=18, color=st["color"],
                   marker=st["marker"], label=st["label"], alpha=0.85)
    ax.set_xscale("log", base=2)
    ax.axhline(100, color="black", lw=0.8)
    ax.set_xlabel("bytes one decode step must read (MiB, log)")
    ax.set_ylabel("% of the read ceiling")
    ax.set_ylim(0, max(105, float(d["pct_of_read_ceiling"].max()) * 1.05))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{shape}, block 16, identity placement")
    fig.tight_layout()
    plt.close(fig)
    return fig


def blocks_figure(blocks: pd.DataFrame, shape: str, *, gpu: str | None = None) -> Figure:
    """Time against block size per batch: paged, contiguous, the no_offset floor and vLLM."""
    _need(blocks, ["gpu_slug", "shape", "batch_size", "block_size", P.PAGED], "blocks_figure")
    set_house_style()
    d = _select(blocks, shape, gpu, "blocks_figure")
    batches = sorted(d["batch_size"].unique())
    fig, axes = panel_grid(len(batches), 2, 4.2, 3.0)
    nrows = axes.shape[0]
    for ax, b in zip(axes.flat, batches):
        g = d[d["batch_size"] == b].sort_values("block_size")
        for backend in (P.PAGED, P.CONTIGUOUS, P.NO_OFFSET, "vllm"):
            if backend in g.columns:
                ax.plot(g["block_size"], g[backend], lw=1.4, ms=4, **BACKEND_STYLE[backend])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
        _block_axis(ax, g["block_size"])
        ax.set_title(f"batch {b}", fontsize=10)
        ax.set_ylabel("decode time (µs, log)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(f"{shape}, {int(d['seq_len'].iloc[0])} tokens per sequence", y=1.02)
    fig.tight_layout(rect=(0, 0.1 / nrows, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=4, bbox_to_anchor=(0.5, 0.0))
    plt.close(fig)
    return fig


def share_figure(blocks: pd.DataFrame, *, gpu: str | None = None) -> Figure:
    """The no_offset floor's complement (1 - floor / paged) by block size, per batch and shape."""
    _need(blocks, ["gpu_slug", "shape", "batch_size", "block_size", "traffic_share"], "share_figure")
    set_house_style()
    d = blocks if gpu is None else blocks[blocks["gpu_slug"] == gpu]
    shapes = sorted(d["shape"].unique())
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 3.4), squeeze=False, sharey=True)
    pal = sns.color_palette("viridis", n_colors=d["batch_size"].nunique())
    for ax, shape in zip(axes.flat, shapes):
        g = d[d["shape"] == shape]
        for colour, (b, gb) in zip(pal, g.groupby("batch_size")):
            gb = gb.sort_values("block_size")
            ax.plot(gb["block_size"], 100 * gb["traffic_share"], marker="o", ms=4, color=colour,
                    label=f"batch {b}")
        _block_axis(ax, g["block_size"])
        ax.set_title(shape, fontsize=10)
        ax.axhline(0, color="black", lw=0.8)
    axes.flat[0].set_ylabel("share of the paged time that\nno_offset removes (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, 0.0))
    plt.close(fig)
    return fig
