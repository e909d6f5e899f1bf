"""Figures of the chapter "The price of the page table" (frames of lib.chapters.page_table.analysis)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from lib.book import frame
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


#: The colour bar's label of :func:`ratio_heatmaps`.
HEAT_CBAR_LABEL = "ratio of decode times (numerator / denominator)\nred: numerator slower, blue: faster"


def _card_cells(items, cards, one_card_size, per_card_size):
    """Panels for ``items`` (one per ratio, batch, ...): two columns of them for one card, else one
    row per item and one column per card. Returns (fig, axes, [(ax, card, item), ...])."""
    if len(cards) == 1:
        fig, axes = panel_grid(len(items), 2, *one_card_size)
        return fig, axes, [(ax, cards[0], it) for ax, it in zip(axes.flat, items)]
    w, h = per_card_size
    fig, axes = plt.subplots(len(items), len(cards), figsize=(w * len(cards), h * len(items)), squeeze=False)
    return fig, axes, [(axes[i, j], c, it) for i, it in enumerate(items) for j, c in enumerate(cards)]


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


def _cards(df: pd.DataFrame, shape: str | None, gpu: str | None, what: str) -> tuple[pd.DataFrame, list[str]]:
    """The rows of ``shape`` (all shapes if None) on ``gpu`` (every card if None), and their
    cards in book order (H100 first): one column of panels per card."""
    d = df if shape is None else df[df["shape"] == shape]
    if gpu is not None:
        d = d[d["gpu_slug"] == gpu]
    if d.empty:
        raise ValueError(f"{what}: no rows for shape {shape!r} on {gpu or 'any card'}")
    return d, frame.card_slugs(d)


def ratio_heatmaps(ratios: pd.DataFrame, shape: str, *, gpu: str | None = None) -> Figure:
    """One heatmap per ratio over tokens x batch (block 16), one column per card (``gpu=None``:
    every card in the frame), all on one colour scale (:func:`heat_norm`) with one colour bar;
    white = 1, red = numerator slower."""
    _need(ratios, ["gpu_slug", "shape", "seq_len", "batch_size", "ratio_name", "ratio"], "ratio_heatmaps")
    set_house_style()
    d, cards = _cards(ratios, shape, gpu, "ratio_heatmaps")
    names = [n for n, *_ in P.GRID_RATIOS if n in set(d["ratio_name"])]
    norm = heat_norm(d.loc[d["ratio_name"].isin(names), "ratio"])
    fig, axes, cells = _card_cells(names, cards, (5.0, 3.6), (5.0, 3.4))
    for ax, card, name in cells:
        m = d[(d["ratio_name"] == name) & (d["gpu_slug"] == card)].pivot(
            index="batch_size", columns="seq_len", values="ratio")
        if m.empty:
            ax.set_visible(False)
            continue
        sns.heatmap(m, ax=ax, cmap="RdBu_r", norm=norm, annot=True, fmt=".2f", cbar=False,
                    annot_kws={"fontsize": 7}, linewidths=0.5, linecolor="white")
        ax.invert_yaxis()
        ax.grid(False)
        ax.set_title(name if len(cards) == 1 else f"{frame.card_label(card)}: {name}", fontsize=10)
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel("batch")
    fig.suptitle(f"{shape}, block 16: ratios of decode times (blank: cache above 8 GiB, not run)", y=1.0)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.915, 0.12, 0.018, 0.76))
    first = next(ax for ax, *_ in cells if ax.collections)
    cbar = fig.colorbar(first.collections[0], cax=cax)
    ticks = heat_ticks(norm)
    cbar.set_ticks(ticks)
    cbar.set_ticklabels([f"{t:g}" for t in ticks])
    cbar.set_label(HEAT_CBAR_LABEL, fontsize=8.5)
    cbar.ax.tick_params(labelsize=8)
    plt.close(fig)
    return fig


def roofline_figure(roof: pd.DataFrame, shape: str, *, gpu: str | None = None) -> Figure:
    """Percent of the measured read ceiling against the bytes a call must move, per backend, one
    panel per card (each against its own run's ceiling)."""
    _need(roof, ["gpu_slug", "shape", "backend", "bytes_moved", "pct_of_read_ceiling"], "roofline_figure")
    set_house_style()
    d, cards = _cards(roof, shape, gpu, "roofline_figure")
    fig, axes = plt.subplots(1, len(cards), figsize=(5.6 * len(cards) + 2.4, 4.0), squeeze=False, sharey=True)
    for ax, card in zip(axes.flat, cards):
        for backend, g in d[d["gpu_slug"] == card].groupby("backend"):
            st = BACKEND_STYLE.get(backend, dict(color="black", marker="o", label=backend))
            ax.scatter(g["bytes_moved"] / 2**20, g["pct_of_read_ceiling"], s=18, color=st["color"],
                       marker=st["marker"], label=st["label"], alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.axhline(100, color="black", lw=0.8)
        ax.set_xlabel("bytes one decode step must read (MiB, log)")
        ax.set_title(frame.card_label(card), fontsize=10)
    axes.flat[0].set_ylabel("% of the read ceiling (of its run)")
    axes.flat[0].set_ylim(0, max(105, float(d["pct_of_read_ceiling"].max()) * 1.05))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{shape}, block 16, identity placement")
    fig.tight_layout()
    plt.close(fig)
    return fig


def blocks_figure(blocks: pd.DataFrame, shape: str, *, gpu: str | None = None) -> Figure:
    """Time against block size per batch (rows) and card (columns): paged, contiguous, the
    no_offset floor and vLLM."""
    _need(blocks, ["gpu_slug", "shape", "batch_size", "block_size", P.PAGED], "blocks_figure")
    set_house_style()
    d, cards = _cards(blocks, shape, gpu, "blocks_figure")
    batches = sorted(d["batch_size"].unique())
    fig, axes, cells = _card_cells(batches, cards, (4.2, 3.0), (4.4, 2.9))
    nrows = axes.shape[0]
    for ax, card, b in cells:
        g = d[(d["batch_size"] == b) & (d["gpu_slug"] == card)].sort_values("block_size")
        for backend in (P.PAGED, P.CONTIGUOUS, P.NO_OFFSET, "vllm"):
            if backend in g.columns and g[backend].notna().any():
                ax.plot(g["block_size"], g[backend], lw=1.4, ms=4, **BACKEND_STYLE[backend])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
        _block_axis(ax, g["block_size"])
        ax.set_title(f"batch {b}" if len(cards) == 1 else f"{frame.card_label(card)}, batch {b}", fontsize=10)
        ax.set_ylabel("decode time (µs, log)")
    handles, labels = cells[0][0].get_legend_handles_labels()
    fig.suptitle(f"{shape}, {int(d['seq_len'].iloc[0])} tokens per sequence", y=1.02)
    fig.tight_layout(rect=(0, 0.1 / nrows, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=4, bbox_to_anchor=(0.5, 0.0))
    plt.close(fig)
    return fig


#: line style per card where cards share a panel: the H100 solid, the H200 dashed
CARD_LINE = {"h100-80gb-hbm3": "-", "h200": "--"}


def share_figure(blocks: pd.DataFrame, *, gpu: str | None = None) -> Figure:
    """The no_offset floor's complement (1 - floor / paged) by block size, per batch (colour),
    shape (panel) and card (line style: H100 solid, H200 dashed)."""
    _need(blocks, ["gpu_slug", "shape", "batch_size", "block_size", "traffic_share"], "share_figure")
    set_house_style()
    d, cards = _cards(blocks, None, gpu, "share_figure")
    shapes = sorted(d["shape"].unique())
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 3.6), squeeze=False, sharey=True)
    batches = sorted(d["batch_size"].unique())
    pal = dict(zip(batches, sns.color_palette("viridis", n_colors=len(batches))))
    for ax, shape in zip(axes.flat, shapes):
        for card in cards:
            g = d[(d["shape"] == shape) & (d["gpu_slug"] == card)]
            for b, gb in g.groupby("batch_size"):
                gb = gb.sort_values("block_size")
                ax.plot(gb["block_size"], 100 * gb["traffic_share"], marker="o", ms=3.5, color=pal[b],
                        linestyle=CARD_LINE.get(card, ":"),
                        label=f"batch {b}" if len(cards) == 1 else f"{frame.card_label(card)}, batch {b}")
        _block_axis(ax, d["block_size"])
        ax.set_title(shape, fontsize=10)
        ax.axhline(0, color="black", lw=0.8)
    axes.flat[0].set_ylabel("share of the paged time that\nno_offset removes (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    ncol = len(batches)
    fig.tight_layout(rect=(0, 0.1 * max(1, len(cards)), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, bbox_to_anchor=(0.5, 0.0))
    plt.close(fig)
    return fig


#: the FlashInfer figure's lines: ratio name -> (colour, line style, label)
FLASHINFER_LINES = {
    "FlashInfer / SDPA": (_CB[0], "-", "FlashInfer, identity"),
    ("FlashInfer shuffled", "SDPA"): (_CB[0], "--", "FlashInfer, shuffled"),
    "ours / SDPA": (_CB[1], "-", "ours (auto, paged), identity"),
    ("ours shuffled", "SDPA"): (_CB[1], "--", "ours (auto, paged), shuffled"),
    "SDPA repeat / SDPA": ("grey", ":", "SDPA measured again (the noise)"),
}


def flashinfer_figure(rows: pd.DataFrame, *, gpu: str | None = None) -> Figure:
    """The FlashInfer sub-grid: each paged kernel's time over dense SDPA's on the same point
    (1 = no cost of paging at all) against block size; columns per shape, rows per batch,
    identity placement solid, shuffled dashed; SDPA's second measurement dotted, the noise."""
    _need(rows, ["gpu_slug", "shape", "subgrid", "backend", "placement", "batch_size", "block_size",
                 "median_us"], "flashinfer_figure")
    set_house_style()
    fi = rows[(rows["subgrid"] == "flashinfer") & ((rows["gpu_slug"] == gpu) if gpu is not None else True)]
    if fi.empty:  # a card measured before the sub-grid existed (the H100): say so, in the figure
        fig, ax = plt.subplots(figsize=(6.0, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no FlashInfer sub-grid rows on {frame.card_label(gpu) if gpu else 'any card'}",
                ha="center", va="center")
        plt.close(fig)
        return fig
    f, cards = _cards(fi, None, gpu, "flashinfer_figure")
    if len(cards) > 1:
        raise ValueError("flashinfer_figure: rows from several cards; pass gpu=")
    shapes, batches = sorted(f["shape"].unique()), sorted(f["batch_size"].unique())
    t = f.pivot_table(index=["shape", "batch_size", "block_size"], columns=["backend", "placement"],
                      values="median_us", aggfunc="first")
    sdpa = t[("sdpa_dense", "identity")]
    lines = [(("flashinfer", "identity"), "FlashInfer / SDPA"), (("flashinfer", "shuffled"), ("FlashInfer shuffled", "SDPA")),
             ((P.PAGED, "identity"), "ours / SDPA"), ((P.PAGED, "shuffled"), ("ours shuffled", "SDPA")),
             (("sdpa_dense", "shuffled"), "SDPA repeat / SDPA")]
    fig, axes = plt.subplots(len(batches), len(shapes), figsize=(5.0 * len(shapes), 2.8 * len(batches)),
                             squeeze=False, sharex=True)
    for j, shape in enumerate(shapes):
        for i, b in enumerate(batches):
            ax = axes[i, j]
            for col, key in lines:
                if col not in t.columns:
                    continue
                r = (t[col] / sdpa).loc[(shape, b)].dropna()
                colour, ls, label = FLASHINFER_LINES[key]
                ax.plot(r.index, r.values, color=colour, linestyle=ls, marker="o", ms=3, lw=1.3, label=label)
            ax.axhline(1, color="black", lw=0.8)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_locator(mticker.FixedLocator([0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 2.5]))
            ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(mticker.NullFormatter())
            _block_axis(ax, f["block_size"])
            ax.set_title(f"{shape}, batch {b}", fontsize=9.5)
            if j == 0:
                ax.set_ylabel("time / SDPA dense (log)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    n = int(f["seq_len"].iloc[0])
    fig.suptitle(f"{frame.card_label(cards[0])}, {n} tokens per sequence: the paged kernels over dense SDPA", y=1.0)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=3, bbox_to_anchor=(0.5, 0.0))
    plt.close(fig)
    return fig
