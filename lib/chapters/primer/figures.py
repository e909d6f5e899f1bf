"""The primer's figures: two diagrams (page tables, the fault buffer) drawn with matplotlib
patches, the eviction model of :mod:`lib.chapters.primer.concepts`, and the measured bandwidth of
every access path (:func:`lib.chapters.primer.numbers.paths_table`). Each returns a closed
``Figure`` that the chapter glues once."""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from lib.book.plots import diagram_canvas, require_columns, set_house_style
from lib.chapters.primer import concepts as C
from lib.chapters.primer.numbers import MECHANISMS

HOST_C = "#0173b2"  # host memory blue, GPU memory orange, faults red, links grey (as the UVM chapter)
GPU_C = "#de8f05"
FAULT_C = "#d55e00"
LINK_C = "0.45"
_CB = sns.color_palette("colorblind")
MECH_COLORS = dict(zip(MECHANISMS, [GPU_C, _CB[4], "0.35", HOST_C, FAULT_C]))
MECH_HATCH = {"page faults": "////"}
POLICY_STYLE = {"lru": dict(color=FAULT_C, marker="o", label="least recently used"),
                "random": dict(color=_CB[4], marker="s", label="random victim"),
                "keep": dict(color=_CB[2], marker="^", label="keep a fixed set resident")}


def _box(ax, x, y, w, h, color, *, alpha=0.1, lw=1.3):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.1",
                                facecolor=color, alpha=alpha, edgecolor="none"))
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.1",
                                facecolor="none", edgecolor=color, lw=lw))


def _arrow(ax, a, b, *, color=LINK_C, lw=1.4, style="-|>", ls="-", rad=0.0):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=11, lw=lw, color=color,
                                 linestyle=ls, connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))


def _cell(ax, x, y, w, h, text, fill, *, hatch=None, fontsize=7.5, color="0.1"):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=fill, edgecolor="0.25", lw=0.8, hatch=hatch))
    box = dict(facecolor="white", edgecolor="none", pad=1.0) if hatch else None
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, color=color, bbox=box)


# ----------------------------------------------------------------------------- diagrams

#: The diagram's managed range: where each virtual page lives (None: not backed yet).
_WHERE = ("host", "host", "gpu", "gpu", "gpu", None, "host", "gpu")


def page_tables_diagram() -> Figure:
    """One managed range, two page tables: each page is mapped where it lives, invalid elsewhere."""
    fig, ax = diagram_canvas(12, 7.4, (8.8, 5.4))
    ax.text(6, 7.3, "one managed range, two page tables", ha="center", va="top", fontsize=10,
            weight="bold", color="0.15")
    ax.text(6, 6.92, "a virtual address = [ page number | offset ]: 12 offset bits for a 4 KiB page, "
                     "16 for 64 KiB, 21 for 2 MiB", ha="center", va="top", fontsize=7.5, color="0.3")
    ax.text(6, 6.6, "blue: the page lives in host DRAM; orange: in GPU memory; hatched: not backed yet "
                    "(the first touch decides)", ha="center", va="top", fontsize=7.5, color="0.3")
    x0, w, gap, h = 2.75, 0.98, 0.12, 0.55
    rows = [(5.6, "virtual pages\n(CPU and GPU alike)"), (4.75, "CPU page table\n(the OS; CPU TLBs)"),
            (3.8, "GPU page table\n(the driver; GPU TLBs)")]
    for y, label in rows:
        ax.text(2.55, y + h / 2, label, ha="right", va="center", fontsize=7.5, weight="bold", color="0.2")
    for i, where in enumerate(_WHERE):
        x = x0 + i * (w + gap)
        fill = {"host": HOST_C, "gpu": GPU_C}.get(where, "white")
        _cell(ax, x, rows[0][0], w, h, f"v{i}", fill, hatch=None if where else "///",
              color="white" if where else "0.2")
        _cell(ax, x, rows[1][0], w, h, "host" if where == "host" else "\u2014",
              "#cfe3f1" if where == "host" else "white", fontsize=7)
        _cell(ax, x, rows[2][0], w, h, "GPU" if where == "gpu" else "\u2014",
              "#f6dfb4" if where == "gpu" else "white", fontsize=7)
    # physical memory: frames labelled with the virtual page they hold
    _box(ax, 0.3, 0.35, 5.5, 2.5, HOST_C)
    _box(ax, 6.2, 0.35, 5.5, 2.5, GPU_C)
    ax.text(3.05, 2.62, "host DRAM: 4 KiB pages (2 MiB huge pages)", ha="center", va="top", fontsize=8.5, weight="bold", color="0.2")
    ax.text(8.95, 2.62, "GPU memory: 4 KiB, 64 KiB, 2 MiB pages", ha="center", va="top", fontsize=8.5,
            weight="bold", color="0.2")
    for j, i in enumerate([i for i, x in enumerate(_WHERE) if x == "host"]):
        _cell(ax, 0.8 + j * 1.1, 1.2, 0.9, 0.6, f"v{i}", HOST_C, color="white")
    for j, i in enumerate([i for i, x in enumerate(_WHERE) if x == "gpu"]):
        _cell(ax, 6.7 + j * 1.1, 1.2, 0.9, 0.6, f"v{i}", GPU_C, color="white")
    ax.text(3.05, 0.75, "frames the CPU page table points to", ha="center", fontsize=7, color="0.35",
            style="italic")
    ax.text(8.95, 0.75, "pages the GPU page table points to", ha="center", fontsize=7, color="0.35",
            style="italic")
    # the fault: the GPU touches v0, which only the CPU maps
    gx = x0 + w / 2
    ax.text(gx + 0.05, 3.32, "GPU reads v0: no valid entry \u2192 page fault \u2192 the driver moves v0 and "
                             "flips both entries", ha="left", va="center", fontsize=7.2, color=FAULT_C)
    _arrow(ax, (gx, 3.47), (gx, 3.8), color=FAULT_C, lw=1.3)
    plt.close(fig)
    return fig


def fault_buffer_diagram() -> Figure:
    """Warps fault, the GPU writes fault entries to a buffer, the driver serves them in batches."""
    fig, ax = diagram_canvas(12, 6.6, (8.8, 4.85))
    ax.text(6, 6.5, "replayable faults are served in batches", ha="center", va="top", fontsize=10,
            weight="bold", color="0.15")
    # the SM: warps that fault on pages A, B, C
    _box(ax, 0.25, 1.2, 2.6, 4.5, GPU_C)
    ax.text(1.55, 5.5, "an SM's warps", ha="center", va="top", fontsize=8.5, weight="bold", color="0.2")
    faults = ["A", "A", "B", "A", "C", "B"]
    for i, page in enumerate(faults):
        y = 4.75 - i * 0.58
        _cell(ax, 0.5, y, 0.9, 0.42, f"warp {i}", "white", fontsize=6.8)
        ax.text(1.55, y + 0.21, f"load page {page}", ha="left", va="center", fontsize=6.8, color=FAULT_C)
    ax.text(1.55, 1.35, "each stalls on\nits miss", ha="center", va="bottom", fontsize=6.8, color="0.3",
            style="italic")
    # the fault buffer
    _box(ax, 3.35, 1.2, 2.5, 4.5, GPU_C)
    ax.text(4.6, 5.5, "fault buffer", ha="center", va="top", fontsize=8.5, weight="bold", color="0.2")
    ax.text(4.6, 5.18, "written by the GPU's MMU,\nread by the driver", ha="center", va="top", fontsize=6.6,
            color="0.3")
    for i, page in enumerate(faults):
        _cell(ax, 3.75, 4.12 - i * 0.46, 1.7, 0.38, f"page {page}, warp {i}", "#fbe3d6", fontsize=6.6)
    ax.text(4.6, 1.27, "one entry per miss:\nduplicates included", ha="center", va="bottom", fontsize=6.8,
            color="0.3", style="italic")
    _arrow(ax, (2.88, 3.45), (3.32, 3.45), color=FAULT_C)
    # the driver
    _box(ax, 6.35, 1.2, 5.4, 4.5, HOST_C)
    ax.text(9.05, 5.5, "UVM driver, on the CPU", ha="center", va="top", fontsize=8.5, weight="bold", color="0.2")
    steps = ["1  fetch a batch of entries (up to 256 by default)",
             "2  sort by address, drop duplicates: A, B, C",
             "3  per 2 MiB block: which pages, and what to prefetch",
             "4  make room (evict if full), copy over the link",
             "5  map the pages on the GPU, unmap them on the CPU",
             "6  replay: the stalled warps retry their loads"]
    for i, s in enumerate(steps):
        ax.text(6.6, 4.85 - i * 0.56, s, ha="left", va="center", fontsize=7.1,
                color=FAULT_C if i == 3 else "0.15")
    ax.text(9.05, 1.35, "only step 4 moves data; the rest is a fixed\ncost per batch, paid while the warps wait",
            ha="center", va="bottom", fontsize=6.8, color="0.3", style="italic")
    _arrow(ax, (5.88, 3.45), (6.32, 3.45), color=FAULT_C)
    ax.text(6.1, 3.62, "interrupt", ha="center", va="bottom", fontsize=6.3, color="0.3")
    # replay back to the SM
    _arrow(ax, (9.05, 1.15), (1.55, 1.15), color=LINK_C, rad=-0.18, lw=1.2)
    ax.text(5.3, 0.22, "replay", ha="center", va="center", fontsize=7, color="0.3")
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- data figures

def thrashing_figure(curve: pd.DataFrame, *, device_gbps: float, fault_gbps: float) -> Figure:
    """Left: share of page reads that miss per sweep, by eviction policy (simulated). Right: the
    sweep's time relative to an all-resident sweep, modelled from two measured rates."""
    require_columns(curve, ["ratio", "policy", "miss_share"], "thrashing_figure")
    set_house_style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.5))
    for policy, s in curve.groupby("policy", sort=False):
        s = s.sort_values("ratio")
        st = POLICY_STYLE.get(policy, {"label": policy})
        left.plot(s["ratio"], 100 * s["miss_share"], ms=4, lw=1.6, **st)
        slow = [C.pass_slowdown(m, device_gbps, fault_gbps) for m in s["miss_share"]]
        right.plot(s["ratio"], slow, ms=4, lw=1.6, **st)
    for ax in (left, right):
        ax.axvline(1.0, color="0.4", ls="--", lw=1)
        ax.set_xlabel("data swept per pass \u00f7 GPU memory")
    left.text(0.98, 50, "GPU memory full", rotation=90, ha="right", va="center", fontsize=7.5, color="0.35")
    left.set_ylabel("page reads that miss, per pass (%)")
    left.set_ylim(-3, 105)
    left.set_title("simulated: a kernel sweeping its data\nin order, pass after pass", fontsize=9)
    left.legend(loc="lower right", fontsize=7.5)
    right.set_yscale("log")
    right.set_ylabel("time per pass \u00f7 all-resident time")
    right.set_title(f"model: every miss at the fault-driven rate\nmeasured: device {device_gbps:.0f} GB/s, "
                    f"faults {fault_gbps:.1f} GB/s", fontsize=9)
    right.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}\u00d7"))
    fig.tight_layout()
    plt.close(fig)
    return fig


def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def paths_figure(table: pd.DataFrame, *, names: dict | None = None) -> Figure:
    """Measured GB/s of each way to reach data, one panel per card, bars coloured by mechanism."""
    require_columns(table, ["gpu_slug", "label", "mechanism", "gbps", "order"], "paths_figure")
    set_house_style()
    slugs = list(dict.fromkeys(table["gpu_slug"]))
    labels = list(table.sort_values("order").drop_duplicates("label")["label"])
    fig, axes = plt.subplots(1, len(slugs), figsize=(8.8 + 2.2 * (len(slugs) - 1), 0.34 * len(labels) + 1.1),
                             squeeze=False, sharey=True)
    lo, hi = table["gbps"].min(), table["gbps"].max()
    for ax, slug in zip(axes[0], slugs):
        d = table[table["gpu_slug"] == slug].set_index("label")
        y = np.arange(len(labels))
        for yi, lab in zip(y, labels):
            if lab not in d.index:
                continue
            r = d.loc[lab]
            ax.barh(yi, r["gbps"], color=MECH_COLORS.get(r["mechanism"], "0.5"), height=0.66,
                    hatch=MECH_HATCH.get(r["mechanism"]), edgecolor="white", lw=0)
            ax.text(r["gbps"] * 1.08, yi, _rate(r["gbps"]), va="center", ha="left", fontsize=7.2, color="0.15")
        ax.set_yticks(y, labels, fontsize=7.6)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(lo / 2, hi * 4)
        ax.set_xlabel("GB/s (log scale)")
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title((names or {}).get(slug, slug), fontsize=9)
        ax.grid(axis="y", visible=False)
    handles = [Rectangle((0, 0), 1, 1, facecolor=MECH_COLORS[m], hatch=MECH_HATCH.get(m), edgecolor="white")
               for m in MECHANISMS if m in set(table["mechanism"])]
    fig.legend(handles, [m for m in MECHANISMS if m in set(table["mechanism"])], loc="lower center",
               ncol=len(handles), fontsize=7.5, bbox_to_anchor=(0.55, -0.01))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    plt.close(fig)
    return fig
