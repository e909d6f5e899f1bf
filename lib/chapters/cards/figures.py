"""Figures of the chapter "One chip, two memories" (frames of lib.chapters.cards.analysis).

Every figure names the cards (H100, H200: :func:`lib.book.frame.card_label`) and labels its axes
with units; the chapter's captions say what to look at."""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lib.book import frame
from lib.book.plots import panel_grid, require_columns, set_house_style
from lib.chapters.cards import analysis as A

_CB = sns.color_palette("colorblind")
#: One colour and marker per card model, in every figure.
CARD_STYLE = {A.BASE: dict(color=_CB[0], marker="o"), A.OTHER: dict(color=_CB[3], marker="s")}
GROUP_COLOR = {"hbm": _CB[2], "link": _CB[4], "cost": _CB[7]}
FAMILY = {"vllm": ("vLLM (Triton)", _CB[1], "^"), "sdpa_dense": ("SDPA, dense cache", _CB[4], "v"),
          "flex_paged": ("FlexAttention", _CB[5], "P"), "own": ("ours (v1/v2/v3)", _CB[0], "o")}
BACKEND_ORDER = ("own-auto-paged", "own-auto-contiguous", "own-v1-paged", "own-v2-paged", "sdpa_dense",
                 "vllm", "flex_paged")


def _style(slug: str) -> dict:
    return CARD_STYLE.get(slug, dict(color="0.4", marker="D"))


def _family(backend: str) -> str:
    return backend if backend in FAMILY else "own"


def ceilings_figure(ceil: pd.DataFrame) -> Figure:
    """The read and the copy ceiling of every run, by physical card (sharded sweeps' runs left
    out), each run's p10-p90 as a bar; the datasheet's HBM peak per model as a dashed line.
    Copies made as one graph node (before the harness split them) are drawn hollow."""
    require_columns(ceil, ["gpu_slug", "card_id", "shared", "read_nbytes", "copy_nbytes", "read_gbps", "read_lo",
                           "read_hi", "copy_gbps",
                           "copy_lo", "copy_hi", "copy_split", "datasheet_hbm_gbps"], "ceilings_figure")
    set_house_style()
    c = ceil[~ceil["shared"]]
    order = [(s, k) for s in frame.card_slugs(c) for k in sorted(c.loc[c["gpu_slug"] == s, "card_id"].unique())]
    xpos = {key: i for i, key in enumerate(order)}
    # one panel above the other: side by side, each card had too little width for its label
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.55 * len(order) + 1.0), 7.0), sharey=False)
    read_gib, copy_gib = c["read_nbytes"].median() / 2**30, c["copy_nbytes"].median() / 2**30
    for ax, what, title in ((axes[0], "read", f"read ceiling ({read_gib:g} GiB read kernel)"),
                            (axes[1], "copy", f"copy ceiling ({copy_gib:g} GiB device copy, read + write)")):
        for (slug, card), g in c.groupby(["gpu_slug", "card_id"]):
            x0 = xpos[(slug, card)]
            jit = np.linspace(-0.18, 0.18, len(g)) if len(g) > 1 else np.zeros(1)
            for dx, (_, r) in zip(jit, g.iterrows()):
                v, lo, hi = r[f"{what}_gbps"], r[f"{what}_lo"], r[f"{what}_hi"]
                hollow = what == "copy" and not r["copy_split"]
                st = _style(slug)
                ax.errorbar(x0 + dx, v, yerr=[[max(v - lo, 0)], [max(hi - v, 0)]], fmt=st["marker"], ms=5,
                            color=st["color"], mfc="white" if hollow else st["color"], elinewidth=0.8, capsize=2)
        for slug in frame.card_slugs(c):
            xs = [xpos[k] for k in order if k[0] == slug]
            peak = c.loc[c["gpu_slug"] == slug, "datasheet_hbm_gbps"].iloc[0]
            ax.hlines(peak, min(xs) - 0.4, max(xs) + 0.4, color=_style(slug)["color"], linestyles="--", lw=1)
            ax.annotate(f"{frame.card_label(slug)} datasheet", (min(xs) - 0.4, peak), xytext=(0, 3),
                        textcoords="offset points", fontsize=7, color=_style(slug)["color"])
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([f"{frame.card_label(s)}\n{A.short_id(k)}" for s, k in order], fontsize=7.5)
        ax.set_xlabel("physical card (model, start of its uuid hash)")
        ax.set_ylabel("GB/s")
        ax.set_title(title)
        ax.set_xlim(-0.6, len(order) - 0.4)
    axes[1].legend(handles=[Line2D([], [], marker="o", color="0.3", ls="none", label="split copy (comparable)"),
                            Line2D([], [], marker="o", color="0.3", mfc="white", ls="none",
                                   label=f"one {copy_gib:g} GiB graph node (not comparable)")],
                   loc="lower right", fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def kernel_pct_figure(table: pd.DataFrame) -> Figure:
    """Per shape both cards measured: each backend's % of its own run's read ceiling on the two
    cards (primary run; the bar spans every run of that card). Hollow: the plan differs between
    the cards (a different kernel, not a different card)."""
    require_columns(table, ["gpu_slug", "shape", "backend", "pct_of_read_ceiling", "pct_min", "pct_max",
                            "same_code", "batch_size", "seq_len", "num_kv_heads"], "kernel_pct_figure")
    set_house_style()
    shapes = (table.drop_duplicates("shape").sort_values(["num_kv_heads", "seq_len", "batch_size"],
                                                         ascending=[False, True, True])["shape"].tolist())
    backends = [b for b in BACKEND_ORDER if b in set(table["backend"])]
    fig, axes = panel_grid(len(shapes), 3, 3.6, 2.7)
    for ax, shape in zip(axes.flat, shapes):
        s = table[table["shape"] == shape]
        for i, b in enumerate(backends):
            r = s[s["backend"] == b]
            if r.empty:
                continue
            xs = []
            for slug, dy in zip(frame.card_slugs(r), (-0.15, 0.15)):
                q = r[r["gpu_slug"] == slug].iloc[0]
                st = _style(slug)
                same = bool(q["same_code"]) if pd.notna(q["same_code"]) else True
                ax.errorbar(q["pct_of_read_ceiling"], i + dy,
                            xerr=[[q["pct_of_read_ceiling"] - q["pct_min"]], [q["pct_max"] - q["pct_of_read_ceiling"]]],
                            fmt=st["marker"], ms=4.5, color=st["color"], mfc=st["color"] if same else "white",
                            elinewidth=0.8, capsize=1.5)
                xs.append(q["pct_of_read_ceiling"])
            ax.plot(xs, [i - 0.15, i + 0.15][:len(xs)], color="0.6", lw=0.7, zorder=0)
        ax.set_yticks(range(len(backends)))
        ax.set_yticklabels(backends, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 110)
        ax.axvline(100, color="0.5", lw=0.8, ls=":")
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("% of the run's read ceiling")
    handles = [Line2D([], [], ls="none", label=frame.card_label(s), **_style(s)) for s in frame.card_slugs(table)]
    handles.append(Line2D([], [], ls="none", marker="o", color="0.3", mfc="white", label="plan differs"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), bbox_to_anchor=(0.5, 1.03), fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def scaling_figure(scaling: pd.DataFrame, *, hbm: float, read_ratio: float,
                   base: str = A.BASE, other: str = A.OTHER) -> Figure:
    """Every decode point both cards timed with the same code: the speed ratio other / base
    against how close the base card came to its read ceiling; one colour per kernel family,
    reference lines at 1, the datasheet HBM ratio and the measured read-ceiling ratio."""
    require_columns(scaling, ["backend", "pct_of_read_ceiling_b", "ratio", "experiment"], "scaling_figure")
    set_house_style()
    s = scaling[~scaling["backend"].str.contains(A.FLOOR)]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for fam, (label, color, marker) in FAMILY.items():
        g = s[[_family(b) == fam for b in s["backend"]]]
        if len(g):
            ax.scatter(g["pct_of_read_ceiling_b"], g["ratio"], s=12, alpha=0.55, color=color, marker=marker,
                       label=f"{label} ({len(g)})", linewidths=0)
    ax.axhline(1.0, color="0.3", lw=1, label="1: no faster")
    ax.axhline(hbm, color="0.3", lw=1, ls="--", label=f"datasheet HBM ratio ({hbm:.3f})")
    ax.axhline(read_ratio, color="0.3", lw=1, ls=":", label=f"measured read-ceiling ratio ({read_ratio:.3f})")
    ax.set_xlabel(f"% of the read ceiling reached on the {frame.card_label(base)}")
    ax.set_ylabel(f"speed {frame.card_label(other)} / {frame.card_label(base)}\n(time on {frame.card_label(base)} ÷ "
                  f"time on {frame.card_label(other)})")
    ax.set_xlim(0, 105)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    plt.close(fig)
    return fig


def summary_figure(summary: pd.DataFrame, *, hbm: float, band: float,
                   base: str = A.BASE, other: str = A.OTHER) -> Figure:
    """Every headline quantity as other / base on one log axis, grouped by what should bound it:
    the median (marker), its bar (see :func:`lib.chapters.cards.analysis.summarize`), the points
    behind it (grey dots), and the lines 1, the datasheet HBM ratio and its inverse, each with a
    band of the between-card spread."""
    require_columns(summary, ["group", "quantity", "ratio", "lo", "hi", "values", "n"], "summary_figure")
    set_house_style()
    rows = []
    for g in A.GROUPS:
        part = summary[summary["group"] == g]
        if len(part):
            rows.append(("header", g, None))
            rows.extend(("row", g, r) for _, r in part.iterrows())
    fig, ax = plt.subplots(figsize=(8.6, 0.27 * len(rows) + 1.3))
    labels = []
    for y, (kind, g, r) in enumerate(rows):
        if kind == "header":
            labels.append(A.GROUPS[g].upper())
            continue
        labels.append(f"{r['quantity']}  [{r['n']}]")
        vals = np.asarray(r["values"], dtype=float)
        if len(vals) > 1:
            ax.scatter(vals, np.full(len(vals), y) + np.random.default_rng(y).uniform(-0.18, 0.18, len(vals)),
                       s=4, color="0.65", zorder=1, linewidths=0)
        ax.errorbar(r["ratio"], y, xerr=[[max(r["ratio"] - r["lo"], 0)], [max(r["hi"] - r["ratio"], 0)]],
                    fmt="o", ms=5, color=GROUP_COLOR[g], elinewidth=1.4, capsize=2.5, zorder=3)
    for line, ls, name in ((1.0, "-", "1: unchanged"), (hbm, "--", f"datasheet HBM ratio {hbm:.3f}"),
                           (1 / hbm, ":", f"its inverse {1 / hbm:.3f}")):
        ax.axvline(line, color="0.35", lw=1, ls=ls, label=name, zorder=0)
        ax.axvspan(line * (1 - band), line * (1 + band), color="0.85", zorder=0, lw=0)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    for t, (kind, g, _) in zip(ax.get_yticklabels(), rows):
        if kind == "header":
            t.set_fontweight("bold")
            t.set_color(GROUP_COLOR[g])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(mticker.FixedLocator([0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6]))
    ax.xaxis.set_major_formatter(mticker.FormatStrFormatter("%.1f"))
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    lo = min(0.6, float(np.nanmin(summary["lo"])) * 0.95)
    hi = max(1.65, float(np.nanmax(summary["hi"])) * 1.05)
    ax.set_xlim(lo, hi)
    ax.set_xlabel(f"{frame.card_label(other)} ÷ {frame.card_label(base)} (rates: above 1 the "
                  f"{frame.card_label(other)} is faster; costs: the cost's ratio) — log scale")
    ax.legend(fontsize=7, loc="lower right", title=f"grey bands: ±{100 * band:.1f} % (between cards)",
              title_fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


KIND_COLOR = {"within a run": _CB[7], "between processes, one card": _CB[0], "between cards": _CB[3]}


def spread_figure(cases: pd.DataFrame) -> Figure:
    """The relative differences of each spread case on a log axis, one box (and its points) per
    case, coloured by kind: within a run (p10-p90 of one row's samples), between processes on
    one card, between physical cards of one model."""
    require_columns(cases, ["gpu_slug", "case", "kind", "value"], "spread_figure")
    set_house_style()
    c = cases.copy()
    c["label"] = [f"{frame.card_label(s)}: {case}" for s, case in zip(c["gpu_slug"], c["case"])]
    c["pct"] = np.maximum(100 * c["value"], 1e-3)
    kinds = [k for k in KIND_COLOR if k in set(c["kind"])]
    order = []
    for s in frame.card_slugs(c):
        for k in kinds:
            order += list(dict.fromkeys(c[(c["gpu_slug"] == s) & (c["kind"] == k)]["label"]))
    fig, ax = plt.subplots(figsize=(8.6, 0.36 * len(order) + 1.2))
    for y, lab in enumerate(order):
        g = c[c["label"] == lab]
        color = KIND_COLOR[g["kind"].iloc[0]]
        ax.boxplot(g["pct"], positions=[y], orientation="horizontal", widths=0.55, showfliers=False,
                   medianprops=dict(color=color, lw=1.8), boxprops=dict(color=color), whiskerprops=dict(color=color),
                   capprops=dict(color=color), whis=(10, 90))
        jit = np.random.default_rng(y).uniform(-0.2, 0.2, len(g))
        ax.scatter(g["pct"], y + jit, s=3, color=color, alpha=0.35, linewidths=0)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([f"{lab}  [{int((c['label'] == lab).sum())}]" for lab in order], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("relative difference (%, log scale): |time b / time a − 1|, or a row's (p90 − p10) / median")
    ax.legend(handles=[Line2D([], [], color=KIND_COLOR[k], lw=2, label=k) for k in kinds], fontsize=7,
              loc="lower right")
    fig.tight_layout()
    plt.close(fig)
    return fig
