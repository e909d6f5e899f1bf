"""Figures of the chapter "Contiguous KV without fragmentation: CUDA virtual memory".

One diagram (an arena: a reservation of equal slots, each backed by physical chunks only as far as
its sequence has grown) and four data figures over the frames of :mod:`lib.chapters.vmm.analysis`. Each
function returns a closed ``Figure``, like :mod:`lib.book.plots`, so a notebook shows it once, where it
glues it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from lib.book import frame
from lib.chapters.vmm import analysis as A
from lib.book.plots import diagram_canvas as _canvas
from lib.book.plots import require_columns as _need
from lib.book.plots import set_house_style
from lib.chapters.vmm.measure import MAP_LABELS, MAP_OPERATIONS

_CB = sns.color_palette("colorblind")
SERIES_COLORS = {"paged": _CB[3], "device_contiguous": "0.55", "vmm": _CB[0]}
OP_STYLE = {"grow_new": dict(color=_CB[3], marker="o"), "unmap": dict(color=_CB[2], marker="s"),
            "grow_reuse": dict(color=_CB[0], marker="D"), "release_handle": dict(color=_CB[4], marker="^")}
SEQ_COLORS = [_CB[0], _CB[1], _CB[2], _CB[4]]


# ----------------------------------------------------------------------------- the diagram

def arena_diagram() -> Figure:
    """One VA reservation in equal slots; each slot's prefix mapped to physical chunks on demand."""
    fig, ax = _canvas(12, 7.2, (8.6, 5.2))
    ax.text(6, 7.15, "one virtual-address reservation (cuMemAddressReserve), one slot per sequence",
            ha="center", va="top", fontsize=9.5, weight="bold", color="0.15")
    ax.text(6, 6.68, "the kernel reads block  s × blocks_per_slot + j  from one base pointer (no block table); "
            "hatched: reserved, not mapped, costs no memory",
            ha="center", va="top", fontsize=7.8, color="0.3", style="italic")
    slots, per_slot = 4, 5            # chunks of virtual space per slot
    grown = [3, 1, 5, 0]              # chunks each sequence has grown into
    x0, y_va, cw, ch, gap = 0.55, 5.0, 0.5, 0.62, 0.22
    phys_y, pw, pgap = 1.0, 0.5, 0.36
    # where each mapped chunk happens to live in GPU memory (any order), and two free-list chunks
    where = [6, 1, 9, 3, 0, 10, 4, 8, 2]
    free_at = [5, 7]
    k = 0
    for s in range(slots):
        sx = x0 + s * (per_slot * cw + gap)
        ax.text(sx + per_slot * cw / 2, y_va + ch + 0.1, f"slot {s}: sequence {s}",
                ha="center", va="bottom", fontsize=7.5, color="0.25")
        for c in range(per_slot):
            mapped = c < grown[s]
            ax.add_patch(Rectangle((sx + c * cw, y_va), cw, ch, facecolor=SEQ_COLORS[s] if mapped else "white",
                                   alpha=0.8 if mapped else 1.0, edgecolor="0.35", lw=0.8,
                                   hatch=None if mapped else "////"))
            if not mapped:
                continue
            px = 1.3 + where[k] * (pw + pgap)
            ax.add_patch(Rectangle((px, phys_y), pw, ch, facecolor=SEQ_COLORS[s], alpha=0.8,
                                   edgecolor="0.3", lw=0.9))
            ax.add_patch(FancyArrowPatch((sx + c * cw + cw / 2, y_va), (px + pw / 2, phys_y + ch),
                                         arrowstyle="-|>", mutation_scale=8, lw=0.7, color=SEQ_COLORS[s],
                                         alpha=0.8))
            k += 1
    for i in free_at:
        px = 1.3 + i * (pw + pgap)
        ax.add_patch(Rectangle((px, phys_y), pw, ch, facecolor="white", edgecolor="0.3", lw=0.9,
                               linestyle="--"))
    ax.text(6, 3.3, "grow: cuMemCreate (or take a free chunk) + cuMemMap + cuMemSetAccess\n"
                    "at the end of the slot's mapped prefix\n"
                    "release: cuMemUnmap the slot's chunks onto the free list",
            ha="center", va="center", fontsize=7.8, color="0.15",
            bbox=dict(boxstyle="round,pad=0.35", facecolor="white", edgecolor="0.6", lw=0.8))
    ax.text(6, phys_y - 0.18, "physical chunks in GPU memory (cuMemCreate, a multiple of the granularity), "
            "in any order;\ndashed: unmapped, on the arena's free list, held for the next growth",
            ha="center", va="top", fontsize=7.5, color="0.3")
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- kernel

#: The series the kernel figure divides by: the layout VMM must match (see the chapter).
BASELINE = "device_contiguous"
SERIES_MARKERS = {"paged": "o", "device_contiguous": "s", "vmm": "D"}


def kernel_figure(ktab: pd.DataFrame, *, gpu: str | None = None) -> Figure:
    """Each series' decode time over the contiguous cudaMalloc pool's (:data:`BASELINE`) per point,
    one panel per card (rows, labelled H100/H200) and batch x tokens (columns): the median ratio
    as a dot, whiskers the series' p10 and p90 over the baseline's median, a line at 1.0, one y
    scale for all. Differences of a few percent show as such, not as bars of hundreds of
    microseconds that differ in their tops only."""
    cols = ["gpu_slug", "batch_size", "seq_len", "shape", "block_size"]
    cols += [f"{s}{suffix}" for s in A.SERIES.values() for suffix in ("_us", "_p10_us", "_p90_us")]
    _need(ktab, cols, "kernel_figure")
    set_house_style()
    d = ktab if gpu is None else ktab[ktab["gpu_slug"] == gpu]
    if d.empty:
        raise ValueError(f"kernel_figure: no rows for gpu {gpu!r}")
    cards = frame.card_slugs(d)
    groups = list(dict.fromkeys(zip(d["batch_size"], d["seq_len"])))
    fig, axes = plt.subplots(len(cards), len(groups), figsize=(4.6 * len(groups), 3.3 * len(cards) + 0.3),
                             squeeze=False, sharey=True)
    series = [s for s in A.SERIES.values() if s != BASELINE] + [BASELINE]
    width = 0.8 / len(series)  # wide enough that two value labels side by side do not meet
    for r, card in enumerate(cards):
        for c, (b, n) in enumerate(groups):
            ax = axes[r, c]
            g = d[(d["gpu_slug"] == card) & (d["batch_size"] == b) & (d["seq_len"] == n)]
            g = g.sort_values(["shape", "block_size"])
            x = np.arange(len(g))
            base = g[f"{BASELINE}_us"].to_numpy(float)
            ax.axhline(1.0, color="0.3", lw=1.0, ls="--", zorder=1)
            for i, s in enumerate(series):
                med = g[f"{s}_us"].to_numpy(float) / base
                lo, hi = g[f"{s}_p10_us"].to_numpy(float) / base, g[f"{s}_p90_us"].to_numpy(float) / base
                err = np.clip(np.vstack([med - lo, hi - med]), 0, None)
                xs = x + (i - (len(series) - 1) / 2) * width
                ax.errorbar(xs, med, yerr=err, fmt=SERIES_MARKERS[s], color=SERIES_COLORS[s], ms=6, capsize=2,
                            elinewidth=0.9,
                            label=A.SERIES_LABELS[s] + (" (= 1, baseline)" if s == BASELINE else ""), zorder=3)
                if s != BASELINE:
                    for xi, yi, top in zip(xs, med, hi):
                        ax.annotate(f"{yi:.3f}", (xi, top), textcoords="offset points", xytext=(0, 3),
                                    ha="center", va="bottom", fontsize=6.5, color=SERIES_COLORS[s])
            ax.set_xticks(x)
            ax.set_xticklabels([f"{sh}\nblock {int(bs)}" for sh, bs in zip(g["shape"], g["block_size"])],
                               fontsize=7.5)
            ax.set_xlim(-0.5, max(len(g), 1) - 0.5)
            ax.grid(axis="x", visible=False)
            ax.set_title(f"{frame.card_label(card)}: {b} sequences × {n} tokens", fontsize=10)
        axes[r, 0].set_ylabel(f"{frame.card_label(card)}: time / time on the\ncontiguous cudaMalloc pool (median)")
    lo, hi = axes.flat[0].get_ylim()
    axes.flat[0].set_ylim(min(lo, 0.99), max(hi, 1.01) + 0.1 * (hi - lo))  # room for the value labels
    # ticks on steps of 1, 2 or 5 hundredths, so that two decimals label them exactly (a default
    # step of 0.025 printed 1.025 as "1.03" beside 1.05)
    axes.flat[0].yaxis.set_major_locator(mticker.MaxNLocator(nbins=7, steps=[1, 2, 5, 10]))
    axes.flat[0].yaxis.set_major_formatter(mticker.FormatStrFormatter("%.2f"))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.1 / len(cards), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=3, bbox_to_anchor=(0.5, 0.0))
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- map

#: Line style per card in :func:`map_figure` (the colour is the operation's).
CARD_LINES = {"h100-80gb-hbm3": dict(ls="--", mfc="white"), "h200": dict(ls="-")}


def map_figure(mtab: pd.DataFrame, *, gpu: str | None = None) -> Figure:
    """Per-chunk time of each operation against chunk size (left), and the same per MiB (right);
    one line per operation (colour) and card (dashed, hollow: H100; solid: H200)."""
    _need(mtab, ["gpu_slug", "operation", "chunk_mib", "median_us", "p10_us", "p90_us", "us_per_mib"],
          "map_figure")
    set_house_style()
    d = mtab if gpu is None else mtab[mtab["gpu_slug"] == gpu]
    if d.empty:
        raise ValueError(f"map_figure: no rows for gpu {gpu!r}")
    cards = frame.card_slugs(d)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.4, 3.9))
    for card in cards:
        line = CARD_LINES.get(card, dict(ls=":")) if len(cards) > 1 else dict(ls="-")
        for op in MAP_OPERATIONS:
            g = d[(d["operation"] == op) & (d["gpu_slug"] == card)].sort_values("chunk_mib")
            if g.empty:
                continue
            st = {**OP_STYLE[op], **line}
            label = MAP_LABELS[op] + (f" ({frame.card_label(card)})" if len(cards) > 1 else "")
            a.plot(g["chunk_mib"], g["median_us"], lw=1.4, ms=4, label=label, **st)
            a.fill_between(g["chunk_mib"], g["p10_us"], g["p90_us"], color=st["color"], alpha=0.12, lw=0)
            b.plot(g["chunk_mib"], g["us_per_mib"], lw=1.4, ms=4, **st)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted(d["chunk_mib"].unique())
        ax.xaxis.set_major_locator(mticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(mticker.FixedFormatter([f"{t:g}" for t in ticks]))
        ax.xaxis.set_minor_locator(mticker.NullLocator())
        ax.set_xlabel("chunk size (MiB)")
        # labels at 1, 2 and 5 times a power of ten only; the other minor ticks unlabelled (labelled,
        # 6-9 and 60-90 ran into each other and into the decades)
        ax.yaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=30))
        ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(mticker.LogLocator(base=10, subs=tuple(range(2, 10)), numticks=30))
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    a.set_ylabel("time per chunk (µs, log)")
    a.set_title("one call per chunk", fontsize=10)
    b.set_ylabel("time per MiB (µs, log)")
    b.set_title("the same, per MiB mapped", fontsize=10)
    handles, labels = a.get_legend_handles_labels()
    rows = -(-len(labels) // 2)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.0), fontsize=8)
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- the trace and its waste

def _kib(v: float, _pos=None) -> str:
    """An axis value in KiB as a size: 1 KiB, 256 KiB, 4 MiB, 1 GiB."""
    for unit, name in ((1 << 20, "GiB"), (1 << 10, "MiB"), (1, "KiB")):
        if v >= unit:
            return f"{v / unit:g} {name}"
    return f"{v:g} KiB"


def trace_figure(trace: pd.DataFrame) -> Figure:
    """Histograms of prompt, output and total lengths (log-spaced bins)."""
    _need(trace, ["prompt_tokens", "output_tokens", "total_tokens"], "trace_figure")
    set_house_style()
    fig, ax = plt.subplots(figsize=(7.2, 3.0))
    hi = float(trace[["prompt_tokens", "output_tokens", "total_tokens"]].max().max())
    bins = np.logspace(0, np.log10(max(hi, 2)) + 0.05, 40)
    for col, label, c in (("prompt_tokens", "prompt", _CB[0]), ("output_tokens", "output", _CB[1]),
                          ("total_tokens", "prompt + output (final KV length)", "0.25")):
        ax.hist(trace[col], bins=bins, histtype="step" if col == "total_tokens" else "stepfilled",
                alpha=1.0 if col == "total_tokens" else 0.45, color=c, lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("tokens (log)")
    ax.set_ylabel("requests")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def waste_figure(w: pd.DataFrame) -> Figure:
    """Waste fraction against the allocation unit in bytes, one panel per shape: paged blocks,
    VMM chunks (dotted below the stock driver's granularity) and the max-length reservation."""
    _need(w, ["shape", "scheme", "granule_bytes", "waste_fraction", "stock_driver", "block_tokens"],
          "waste_figure")
    set_house_style()
    shapes = list(dict.fromkeys(w["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.7 * len(shapes), 3.6), squeeze=False, sharey=True)
    for ax, shape in zip(axes.flat, shapes):
        d = w[w["shape"] == shape]
        p = d[d["scheme"] == "paged"].sort_values("granule_bytes")
        ax.plot(p["granule_bytes"] / 1024, 100 * p["waste_fraction"], color=_CB[3], marker="o", ms=4,
                label="paged blocks (1-256 tokens)")
        for bt, gx, gy in zip(p["block_tokens"], p["granule_bytes"] / 1024, 100 * p["waste_fraction"]):
            if int(bt) in (1, 16, 256):
                ax.annotate(f"{int(bt)} tok", (gx, gy), textcoords="offset points", xytext=(0, 6),
                            fontsize=6.5, ha="center", color=_CB[3])
        v = d[d["scheme"] == "vmm"].sort_values("granule_bytes")
        small, stock = v[~v["stock_driver"]], v[v["stock_driver"]]
        if len(small):  # dotted, joined to the first stock chunk, drawn first so stock markers stay on top
            joined = pd.concat([small, stock.head(1)])
            ax.plot(joined["granule_bytes"] / 1024, 100 * joined["waste_fraction"], color=_CB[0], ls=":",
                    marker="d", ms=4, mfc="white", label="VMM pages < granularity (modified driver)")
        ax.plot(stock["granule_bytes"] / 1024, 100 * stock["waste_fraction"], color=_CB[0], marker="D", ms=4,
                label="VMM chunks (stock driver)")
        m = d[d["scheme"] == "max_reservation"]
        if len(m):
            ax.axhline(100 * float(m["waste_fraction"].iloc[0]), color="0.3", ls="--", lw=1,
                       label="reserve the longest length")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(mticker.LogLocator(base=16))
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(_kib))
        ax.xaxis.set_minor_locator(mticker.LogLocator(base=2, subs=(1.0,), numticks=40))
        ax.xaxis.set_minor_formatter(mticker.NullFormatter())
        ax.set_xlabel("allocation unit of one layer's K or V (log)")
        ax.set_title(shape, fontsize=10)
        ax.set_ylim(0, 100)
    axes.flat[0].set_ylabel("memory wasted (% of allocated)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.0), fontsize=8)
    plt.close(fig)
    return fig
