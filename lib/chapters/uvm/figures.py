"""Figures of the chapter "Unified Memory in practice": three diagrams and four data figures.

The diagrams are drawn with matplotlib patches (no data): how one managed range maps onto two
memories, what happens on a GPU page fault, and what each placement tool does. The data figures
take the tables of :mod:`lib.chapters.uvm.analysis` (tidy rows) and return a closed ``Figure``, like
:mod:`lib.book.plots`, so a notebook shows each once, where it glues it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from lib.book.frame import Plain, card_label, card_slugs
from lib.book.plots import set_house_style
from lib.book.plots import require_columns as _need, diagram_canvas as _canvas
from lib.chapters.uvm.measure import READ_LABELS

HOST_C = "#0173b2"  # colour-blind palette: host memory blue, GPU memory orange, links grey
GPU_C = "#de8f05"
LINK_C = "0.45"
FAULT_C = "#d55e00"


def _box(ax, x, y, w, h, text, color, *, alpha=0.12, fontsize=9, weight="bold", va="top"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                linewidth=1.4, edgecolor=color, facecolor=color, alpha=alpha))
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                linewidth=1.4, edgecolor=color, facecolor="none"))
    ty = y + h - 0.12 if va == "top" else y + h / 2
    ax.text(x + w / 2, ty, text, ha="center", va="top" if va == "top" else "center",
            fontsize=fontsize, weight=weight, color="0.15")


def _arrow(ax, a, b, *, color=LINK_C, style="-|>", lw=1.6, ls="-", rad=0.0, text=None, tpos=0.5,
           toff=(0, 0.12), fontsize=8):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=12, linewidth=lw, color=color,
                                 linestyle=ls, connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))
    if text:
        mx = a[0] + (b[0] - a[0]) * tpos + toff[0]
        my = a[1] + (b[1] - a[1]) * tpos + toff[1]
        ax.text(mx, my, text, ha="center", va="bottom", fontsize=fontsize, color="0.2")


def _pages(ax, x, y, where, *, size=0.32, gap=0.06, labels=None):
    """A row of pages; ``where[i]`` is 'host', 'gpu', 'both' or None (not yet backed)."""
    for i, w in enumerate(where):
        px = x + i * (size + gap)
        if w == "both":
            ax.add_patch(Rectangle((px, y), size, size / 2, facecolor=HOST_C, edgecolor="0.2", lw=0.8))
            ax.add_patch(Rectangle((px, y + size / 2), size, size / 2, facecolor=GPU_C, edgecolor="0.2", lw=0.8))
        else:
            fc = {"host": HOST_C, "gpu": GPU_C}.get(w, "white")
            ax.add_patch(Rectangle((px, y), size, size, facecolor=fc, edgecolor="0.2", lw=0.8,
                                   hatch=None if w else "///"))
        if labels:
            ax.text(px + size / 2, y - 0.08, labels[i], ha="center", va="top", fontsize=7, color="0.3")


def unified_memory_diagram() -> Figure:
    """One virtual range, pages backed by host or GPU memory, moved by the driver over PCIe."""
    fig, ax = _canvas(12, 6.7, (8.4, 4.7))
    ax.text(6, 6.6, "one managed allocation: the same virtual addresses on CPU and GPU",
            ha="center", va="top", fontsize=9.5, weight="bold", color="0.15")
    ax.text(6, 6.15, "(hatched: not backed yet; the first touch decides where)", ha="center", va="top",
            fontsize=7.5, color="0.35", style="italic")
    where = ["host", "host", "gpu", "gpu", "gpu", None, "host", "gpu", "host", None, "gpu", "gpu"]
    vx, vsize, vgap = 1.1, 0.7, 0.12
    _pages(ax, vx, 4.85, where, size=vsize, gap=vgap, labels=[f"p{i}" for i in range(len(where))])
    _box(ax, 0.3, 0.3, 4.6, 3.1, "CPU + host DRAM", HOST_C)
    _box(ax, 7.1, 0.3, 4.6, 3.1, "GPU + HBM", GPU_C)
    host_pages = [i for i, w in enumerate(where) if w == "host"]
    gpu_pages = [i for i, w in enumerate(where) if w == "gpu"]
    for pages, x0, size, gap, color in ((host_pages, 0.8, 0.62, 0.3, HOST_C),
                                        (gpu_pages, 7.45, 0.52, 0.18, GPU_C)):
        _pages(ax, x0, 1.7, [("host" if color == HOST_C else "gpu")] * len(pages), size=size, gap=gap,
               labels=[f"p{i}" for i in pages])
        for j, i in enumerate(pages):  # each virtual page to its one physical copy
            ax.plot([vx + i * (vsize + vgap) + vsize / 2, x0 + j * (size + gap) + size / 2],
                    [4.85, 1.7 + size], color=color, lw=0.7, alpha=0.6)
    ax.text(2.6, 0.75, "page tables: CPU's (OS)", ha="center", fontsize=8, color="0.3")
    ax.text(9.4, 0.75, "page tables: GPU's (driver)", ha="center", fontsize=8, color="0.3")
    _arrow(ax, (4.95, 1.35), (7.05, 1.35), style="<|-|>", lw=2.2,
           text="PCIe (x86 host):\nthe driver migrates pages", toff=(0, 0.15))
    plt.close(fig)
    return fig


def fault_timeline_diagram() -> Figure:
    """What a GPU access to a page on the host costs: the fault path, step by step."""
    fig, ax = _canvas(12, 6.4, (8.4, 4.5))
    lanes = [("GPU warps", GPU_C), ("GPU MMU,\nfault buffer", GPU_C), ("UVM driver\n(on the CPU)", HOST_C),
             ("copy engine,\nPCIe link", LINK_C)]
    ys = [5.3, 3.95, 2.6, 1.25]
    for (name, c), y in zip(lanes, ys):
        ax.add_patch(Rectangle((0.2, y - 0.5), 11.6, 1.0, facecolor=c, alpha=0.08, edgecolor="none"))
        ax.text(0.35, y, name, ha="left", va="center", fontsize=8.5, weight="bold", color="0.2")
    w, h = 1.46, 0.8
    xs = [2.95 + i * 1.52 for i in range(6)]
    steps = [
        (ys[0], "1 a load misses:\npage not mapped"),
        (ys[1], "2 fault recorded;\nthe warp stalls"),
        (ys[2], "3 driver takes a\nbatch of faults"),
        (ys[3], "4 copy the pages\nhost \u2192 GPU"),
        (ys[2], "5 map on GPU,\nunmap on CPU"),
        (ys[0], "6 replay: the\nload succeeds"),
    ]
    for i, (x, (y, text)) in enumerate(zip(xs, steps)):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.1",
                                    facecolor="white", edgecolor=FAULT_C if i < 5 else "0.3", lw=1.3))
        ax.text(x, y, text, ha="center", va="center", fontsize=6.5, color="0.1")
        if i:
            px, py = xs[i - 1], steps[i - 1][0]
            up = y > py
            _arrow(ax, (px + w / 2 - 0.15, py + (h / 2 if up else -h / 2)),
                   (x - w / 2 + 0.15, y - (h / 2 if up else -h / 2)), color=FAULT_C, lw=1.2)
    ax.text(6.0, 0.3, "every step but 4 is overhead that a prefetch avoids; the driver's prefetcher "
                      "may move more than the page that faulted", ha="center", fontsize=7.5, color="0.3",
            style="italic")
    plt.close(fig)
    return fig


def placement_diagram() -> Figure:
    """Five ways a GPU reaches data: fault, prefetch, ReadMostly, host-preferred mapping, pinned."""
    set_house_style()
    panels = [
        ("fault-driven", "first GPU touch\nmigrates each page", "migrate"),
        ("prefetch", "one bulk copy before\nthe kernel: no faults", "bulk"),
        ("ReadMostly", "read-only copy on\neach reader", "dup"),
        ("PreferredLocation CPU\n+ AccessedBy GPU", "stays on host; GPU\nreads it over PCIe", "remote"),
        ("pinned zero-copy", "page-locked host memory;\nGPU reads over PCIe", "remote"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(9.6, 2.9))
    for ax, (title, note, mode) in zip(axes, panels):
        ax.set_xlim(0, 4)
        ax.set_ylim(0, 4.6)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(title, fontsize=8.5, loc="center")
        _box(ax, 0.1, 2.55, 3.8, 1.45, "", HOST_C, alpha=0.1)
        _box(ax, 0.1, 0.7, 3.8, 1.45, "", GPU_C, alpha=0.1)
        if ax is axes[0]:
            ax.text(-0.1, 3.28, "host", ha="right", va="center", fontsize=8, weight="bold", color=HOST_C)
            ax.text(-0.1, 1.42, "GPU", ha="right", va="center", fontsize=8, weight="bold", color=GPU_C)
        host, gpu = {"migrate": (None, "gpu"), "bulk": (None, "gpu"),
                     "dup": ("host", "gpu")}.get(mode, ("host", None))
        _pages(ax, 0.55, 3.05, [host] * 4, size=0.45, gap=0.3)
        _pages(ax, 0.55, 1.2, [gpu] * 4, size=0.45, gap=0.3)
        if mode == "bulk":
            ax.add_patch(FancyArrowPatch((2.0, 3.03), (2.0, 1.68), mutation_scale=14, color=LINK_C, alpha=0.8,
                                         arrowstyle="simple,head_width=0.9,head_length=0.6,tail_width=0.5"))
        elif mode in ("migrate", "dup"):  # one arrow per page: a fault, or a read-only copy
            style = dict(color=FAULT_C, lw=1.0) if mode == "migrate" else dict(color=LINK_C, lw=0.9, ls="--")
            for i in range(4):
                _arrow(ax, (0.78 + i * 0.75, 3.03), (0.78 + i * 0.75, 1.68), **style)
        else:
            _arrow(ax, (1.2, 1.7), (1.2, 3.0), color=LINK_C, lw=1.4, style="<|-|>")
            _arrow(ax, (2.8, 1.7), (2.8, 3.0), color=LINK_C, lw=1.4, style="<|-|>")
        ax.text(2.0, 0.45, note, ha="center", va="top", fontsize=6.8, color="0.25")
    fig.subplots_adjust(wspace=0.08)
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- data figures

def _size_axis(ax, sizes_mib) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(float(s) for s in sizes_mib))
    ax.xaxis.set_major_locator(mticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(mticker.FixedFormatter(
        [f"{s / 1024:g} GiB" if s >= 1024 else f"{s:g} MiB" for s in ticks]))
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.set_xlabel("buffer size")


#: One marker per gpu_read state, so that lines lying on top of each other stay apart.
READ_MARKERS = ("o", "D", "^", "v", "P", "X", "s", "h", "<", ">")
#: How far apart (in octaves of buffer size) the markers of coinciding lines are drawn.
DODGE_OCTAVES = 0.15


def read_bandwidth_figure(table: pd.DataFrame, coinciding: list[list[str]] = ()) -> Figure:
    """GPU read bandwidth against buffer size: warm states solid, cold (state-changing) dashed.

    ``coinciding``: groups of labels whose lines lie on top of each other
    (:func:`lib.chapters.uvm.analysis.coinciding_reads`); each member is drawn a little to the
    side (:data:`DODGE_OCTAVES`) with its own marker, so every line can be seen."""
    _need(table, ["label", "phase", "size_mib", "bandwidth_gbps", "gpu_slug"], "read_bandwidth_figure")
    set_house_style()
    slugs = card_slugs(table)
    order = [lab for lab in READ_LABELS.values() if lab in set(table["label"])]
    dodge = {lab: (k - (len(g) - 1) / 2) * DODGE_OCTAVES for g in coinciding for k, lab in enumerate(g)}
    fig, axes = plt.subplots(1, len(slugs), figsize=(max(6.6, 4.2 * len(slugs)), 4.4), squeeze=False,
                             sharey=True)
    pal = dict(zip(order, sns.color_palette("colorblind", len(order))))
    marker = dict(zip(order, READ_MARKERS))
    for i, (ax, slug) in enumerate(zip(axes[0], slugs)):
        d = table[table["gpu_slug"] == slug]
        for lab in order:
            s = d[d["label"] == lab].sort_values("size_mib")
            if s.empty:
                continue
            cold = s["phase"].iloc[0] != "warm"
            x = s["size_mib"] * 2.0 ** dodge.get(lab, 0.0)
            ax.plot(x, s["bandwidth_gbps"], marker=marker[lab], ms=6, mec="white", mew=0.4,
                    ls="--" if cold else "-", color=pal[lab], label=lab)
            if {"bw_low", "bw_high"} <= set(s.columns):
                ax.fill_between(x, s["bw_low"], s["bw_high"], color=pal[lab], alpha=0.12, lw=0)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        _size_axis(ax, d["size_mib"])
        if i == 0:  # the panels share the axis: said once
            ax.set_ylabel("read bandwidth (GB/s, log scale)")
        ax.set_title(card_label(slug) if len(slugs) > 1 else "GPU read bandwidth by memory kind and state",
                     loc="left")
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend = fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False,
                        fontsize=8)
    # room below the panels for the legend, measured rather than guessed (it used to cover the x labels)
    legend_h = legend.get_window_extent(fig._get_renderer()).height / fig.bbox.height
    fig.tight_layout(rect=(0, legend_h + 0.01, 1, 1))
    plt.close(fig)
    return fig


def cpu_read_figure(table: pd.DataFrame) -> Figure:
    """CPU-side bandwidth after GPU writes and of the references, one bar group per size."""
    _need(table, ["label", "size_mib", "bandwidth_gbps", "gpu_slug"], "cpu_read_figure")
    set_house_style()
    d = table.copy()
    d["card"] = [card_label(x) for x in d["gpu_slug"]]
    d["size"] = [f"{s / 1024:g} GiB" if s >= 1024 else f"{s:g} MiB" for s in d["size_mib"]]
    sizes = [f"{s / 1024:g} GiB" if s >= 1024 else f"{s:g} MiB" for s in sorted(d["size_mib"].unique())]
    grid = sns.catplot(data=d, kind="bar", y="label", x="bandwidth_gbps", hue="size", hue_order=sizes,
                       row="card" if d["card"].nunique() > 1 else None, orient="h",
                       row_order=[card_label(c) for c in card_slugs(d)] if d["card"].nunique() > 1 else None,
                       palette="crest", height=3.0, aspect=2.2, errorbar=None)
    grid.set_axis_labels("bandwidth (GB/s)", "")
    grid.set_titles("{row_name}")
    sns.move_legend(grid, "lower center", bbox_to_anchor=(0.5, -0.08), ncol=len(sizes), title="buffer size")
    fig = grid.figure
    plt.close(fig)
    return fig


def granularity_figure(table: pd.DataFrame) -> Figure:
    """What one touch per stride moved: two observations against the touched pages' bytes."""
    _need(table, ["stride_kib", "moved_meminfo_mib", "moved_prefetch_mib", "touched_pages_mib",
                  "median_us", "gpu_slug", "nbytes"], "granularity_figure")
    set_house_style()
    names = {"touched_pages_mib": "4 KiB pages touched", "moved_meminfo_mib": "moved: GPU memory used",
             "moved_prefetch_mib": "moved: prefetch-time estimate"}
    fmt = lambda s: f"{s / 1024:g} MiB" if s >= 1024 else f"{s:g} KiB"  # noqa: E731
    slugs = card_slugs(table)
    fig, axes = plt.subplots(len(slugs), 2, figsize=(9.0, 3.0 * len(slugs) + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1.5, 1]})
    for (left, right), slug in zip(axes, slugs):
        d = table[table["gpu_slug"] == slug]
        d = d[d["nbytes"] == d["nbytes"].max()].sort_values("stride_kib")
        strides = [fmt(s) for s in d["stride_kib"]]
        long = d.melt(id_vars=["stride_kib"], value_vars=list(names), var_name="what", value_name="MiB")
        long["what"] = long["what"].map(names)
        long["stride"] = [fmt(s) for s in long["stride_kib"]]
        sns.barplot(data=long, x="stride", y="MiB", hue="what", order=strides,
                    hue_order=list(names.values()), palette=["0.7", GPU_C, HOST_C], ax=left, errorbar=None)
        left.set_yscale("log")
        left.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        left.set_xlabel("one 4-byte touch every")
        left.set_ylabel("MiB (log scale)")
        total = d["nbytes"].iloc[0] / (1 << 20)
        left.axhline(total, color="0.3", lw=1, ls=":")
        where = f"{card_label(slug)}: " if len(slugs) > 1 else ""
        size = f"{total / 1024:g} GiB" if total >= 1024 else f"{total:g} MiB"
        left.set_title(f"{where}what moved, of a {size} buffer", loc="left")
        left.get_legend().remove()
        t = d.assign(stride=strides, ms=d["median_us"] / 1e3)
        sns.barplot(data=t, x="stride", y="ms", order=strides, color=FAULT_C, ax=right, errorbar=None)
        right.set_xlabel("one 4-byte touch every")
        right.set_ylabel("touch kernel time (ms)")
        right.set_title("time of the touching kernel", loc="left")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.33, 0.0), ncol=3, frameon=False,
               fontsize=8)
    plt.close(fig)
    return fig


def transfer_figure(table: pd.DataFrame) -> Figure:
    """Host↔GPU bandwidth of copies and prefetches, both directions, against size."""
    _need(table, ["label", "direction", "size_mib", "bandwidth_gbps", "gpu_slug"], "transfer_figure")
    set_house_style()
    d = table.copy()
    d["card"] = [card_label(x) for x in d["gpu_slug"]]
    d["direction"] = d["direction"].map({"h2d": "host → GPU", "d2h": "GPU → host"}).fillna(d["direction"])
    grid = sns.relplot(data=d, x="size_mib", y="bandwidth_gbps", hue="label", style="label", kind="line",
                       markers=True, dashes=False, col="direction", col_order=["host → GPU", "GPU → host"],
                       row="card" if d["card"].nunique() > 1 else None,
                       row_order=[card_label(c) for c in card_slugs(d)] if d["card"].nunique() > 1 else None,
                       height=3.0, aspect=1.25, palette="colorblind", facet_kws={"sharey": True})
    for ax in grid.axes.flat:
        _size_axis(ax, d["size_mib"])
        ax.set_ylim(bottom=0)
    grid.set_axis_labels("buffer size", "bandwidth (GB/s)")
    grid.set_titles("{col_name}" if d["card"].nunique() == 1 else "{row_name}: {col_name}")
    sns.move_legend(grid, "lower center", bbox_to_anchor=(0.45, -0.12), ncol=3, title=None)
    fig = grid.figure
    plt.close(fig)
    return fig


#: One colour per card, the same in every figure of the book's two-card comparisons.
CARD_COLORS = {"H100": "#0173b2", "H200": "#de8f05"}
BOUND_NAMES = {"HBM": "GPU memory (HBM)", "link": "PCIe link", "fault": "fault handling / driver"}


def cards_figure(comparison: pd.DataFrame, cards: list[str]) -> Figure:
    """Each ceiling on each card (log GB/s), grouped by what bounds it, the second card's ratio to
    the first at the right: HBM-bound rates should move by the bandwidth ratio, link-bound ones not."""
    _need(comparison, ["label", "bound", *cards], "cards_figure")
    set_house_style()
    d = comparison.copy()
    d["bound"] = pd.Categorical(d["bound"], ["HBM", "link", "fault"], ordered=True)
    d = d.sort_values("bound", kind="stable").reset_index(drop=True)
    n, k = len(d), len(cards)
    fig, ax = plt.subplots(figsize=(8.6, 0.34 * n + 1.4))
    h = 0.8 / k
    for j, c in enumerate(cards):
        lab = card_label(c)
        ax.barh(np.arange(n) + (j - (k - 1) / 2) * h, d[c], height=h, label=lab,
                color=CARD_COLORS.get(lab, f"C{j}"))
    ax.set_yticks(np.arange(n), d["label"], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("GB/s (log scale), at the largest size measured")
    top = float(np.nanmax(d[cards].to_numpy(dtype=float)))
    if "ratio" in d.columns:
        for i, r in enumerate(d["ratio"]):
            if np.isfinite(r):
                ax.text(top * 2.2, i, f"×{r:.2f}", va="center", ha="left", fontsize=8, color="0.2")
        ax.text(top * 2.2, -0.9, f"{card_label(cards[1])} / {card_label(cards[0])}", ha="left",
                va="bottom", fontsize=8, weight="bold", color="0.2")
    ax.set_xlim(right=top * 8)
    for b, g in d.groupby("bound", observed=True):
        lo, hi = g.index.min(), g.index.max()
        if lo > 0:
            ax.axhline(lo - 0.5, color="0.6", lw=0.8)
        ax.text(1.02, 1 - (lo + hi + 1) / 2 / n, BOUND_NAMES[b], transform=ax.transAxes, rotation=270,
                va="center", ha="left", fontsize=7.5, color="0.35")
    ax.legend(loc="lower center", bbox_to_anchor=(0.45, 1.02), ncol=k, frameon=False)
    fig.tight_layout()
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- for the chapter

def shown(value, spec: str = ".0f", missing: str = "—") -> Plain:
    """``value`` formatted with ``spec`` for ``{glue:text}``, or a dash when it was not measured."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return Plain(missing)
    return Plain(format(v, spec) if np.isfinite(v) else missing)


def no_data_figure(what: str) -> Figure:
    """A placeholder where a data figure will be once measurements are committed."""
    set_house_style()
    fig, ax = plt.subplots(figsize=(6.0, 1.3))
    ax.axis("off")
    ax.text(0.5, 0.5, f"No measurements committed yet: {what}\n"
                      "(run python -m lib sweep uvm on a GPU)",
            ha="center", va="center", fontsize=9, color="0.35", style="italic", transform=ax.transAxes)
    plt.close(fig)
    return fig


#: The rows of the key-numbers table: headline key, what it is, format.
KEY_NUMBERS = [
    ("read_device", "GPU read, device memory (GB/s)", ".0f"),
    ("read_managed_gpu", "GPU read, managed prefetched to GPU (GB/s)", ".0f"),
    ("read_readmostly_warm", "GPU read, ReadMostly copy (GB/s)", ".0f"),
    ("read_first_touch", "GPU read, managed first touch on GPU (GB/s)", ".1f"),
    ("read_fault_touched", "GPU read, managed on host, fault-driven (GB/s)", ".1f"),
    ("read_fault_prefetched", "GPU read, managed prefetched to host, fault-driven (GB/s)", ".1f"),
    ("read_prefetch_then_read", "prefetch to GPU, then read (GB/s)", ".1f"),
    ("read_mapped", "GPU read, managed on host via AccessedBy (GB/s)", ".1f"),
    ("read_pinned", "GPU read, pinned zero-copy (GB/s)", ".1f"),
    ("prefetch_h2d", "cudaMemPrefetchAsync host → GPU (GB/s)", ".1f"),
    ("prefetch_d2h", "cudaMemPrefetchAsync GPU → host (GB/s)", ".1f"),
    ("pinned_h2d", "cudaMemcpy pinned host → GPU (GB/s)", ".1f"),
    ("pinned_d2h", "cudaMemcpy GPU → pinned host (GB/s)", ".1f"),
    ("cpu_after_gpu_write", "CPU read of GPU-written managed memory (GB/s)", ".1f"),
    ("cpu_host_resident", "CPU read, same buffer again (GB/s)", ".1f"),
]


def key_numbers_table(heads: dict[str, dict[str, float]]):
    """Key numbers, one column per GPU (``heads``: slug -> :func:`lib.chapters.uvm.analysis.headline`)."""
    if not heads:
        raise ValueError("key_numbers_table needs at least one GPU's numbers")
    rows = []
    for key, label, spec in KEY_NUMBERS:
        rows.append({"measurement": label,
                     **{card_label(slug): repr(shown(h.get(key), spec)) for slug, h in heads.items()}})
    table = pd.DataFrame(rows)
    return (table.style.hide(axis="index")
            .set_table_styles([{"selector": "th, td", "props": [("text-align", "right"), ("padding", "2px 10px"),
                                                                 ("font-size", "0.85em")]},
                               {"selector": "td:first-child, th:first-child",
                                "props": [("text-align", "left")]}]))
