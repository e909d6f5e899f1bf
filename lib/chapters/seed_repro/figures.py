"""Figures and styled tables of the chapter "The seed's six tables on an H100 and an H200" (frames of
:mod:`lib.chapters.seed_repro.analysis`). Every source keeps one style in every figure: the seed
black, our v1 blue, our v2 orange; the seed's protocol dashed, the rigorous one solid.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lib.book import frame
from lib.book.tables import compact
from lib.chapters.seed_repro import analysis as SR
from lib.book.plots import _block_axis, panel_grid, set_house_style
from lib.book.plots import require_columns as _need

_CB = sns.color_palette("colorblind")
VERSION_COLOR = {"v1": _CB[0], "v2": _CB[1]}
REFERENCE_STYLE = {
    SR.REFERENCE_LABELS["vllm"]: dict(color=_CB[2], linestyle="-", marker="^"),
    SR.REFERENCE_LABELS["sdpa_dense"]: dict(color=_CB[4], linestyle="-", marker="v"),
}
BACKEND_LABELS = {**{f"own-{v}-{a}": f"ours {v} ({a})" for v in SR.VERSIONS
                     for a in ("paged", "contiguous", "no_offset")}, **SR.REFERENCE_LABELS}
BACKEND_STYLE = {"own-v1-paged": dict(color=_CB[0], marker="s"),
                 "own-v2-paged": dict(color=_CB[1], marker="D"),
                 "vllm": dict(color=_CB[2], marker="^"), "sdpa_dense": dict(color=_CB[4], marker="v")}


def source_style(source: str) -> dict:
    """Colour, line style, marker and width of one source (the seed, ours, a reference)."""
    if source == SR.SEED_SOURCE:
        return dict(color="black", linestyle="-", marker="o", linewidth=2.2, markersize=6, zorder=5)
    if source in REFERENCE_STYLE:
        return dict(**REFERENCE_STYLE[source], linewidth=1.2, markersize=5, alpha=0.9)
    version, _, protocol = source.partition(", ")
    if version not in VERSION_COLOR or protocol not in SR.PROTOCOL_LABELS.values():
        raise ValueError(f"unknown source {source!r}")
    seed_proto = protocol == SR.PROTOCOL_LABELS["seed"]
    return dict(color=VERSION_COLOR[version], linestyle="--" if seed_proto else "-",
                marker="s" if version == "v1" else "D", linewidth=1.5, markersize=5,
                markerfacecolor="white" if seed_proto else VERSION_COLOR[version])


def _one_card(df: pd.DataFrame, gpu: str | None, what: str) -> pd.DataFrame:
    have = sorted(df["gpu_slug"].unique())
    if gpu is None:
        if len(have) != 1:
            raise ValueError(f"{what}: rows from several cards {have}; pass gpu=")
        return df
    out = df[df["gpu_slug"] == gpu]
    if out.empty:
        raise ValueError(f"{what}: no rows for card {gpu!r} (have {have})")
    return out


def _log_axis(ax) -> None:
    ax.set_yscale("log")
    # 1-2-5 ticks: a panel spanning less than a decade still gets labelled ticks.
    ax.yaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(mticker.NullLocator())


def _legend_below(fig: Figure, handles, labels, ncol: int) -> None:
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
               frameon=False, fontsize=8.5)


def _source_legend(fig: Figure, shown) -> None:
    """One legend entry per source drawn, in legend order."""
    order = _order(shown)
    _legend_below(fig, [Line2D([], [], **source_style(s)) for s in order], order, ncol=min(3, len(order)))


def _order(sources) -> list[str]:
    rank = {s: i for i, s in enumerate(SR.sources(SR.VERSIONS) + list(SR.REFERENCE_LABELS.values()))}
    return sorted(set(sources), key=lambda s: rank.get(s, len(rank)))


def times_figure(times: pd.DataFrame, tables, *, gpu: str | None = None, ncols: int = 2) -> Figure:
    """`times_long`'s time against block size, one panel per series of the seed `tables`, log scale."""
    _need(times, ["gpu_slug", *SR.SERIES, "table_title", "block_size", "source", "time_us"], "times_figure")
    data = _one_card(times, gpu, "times_figure")
    data = data[data["table"].isin(list(tables))]
    if data.empty:
        raise ValueError(f"times_figure: no rows for tables {list(tables)}")
    set_house_style()
    panels = (data[["table", "table_title", "memory", "seq_len", "batch_size"]].drop_duplicates()
              .sort_values(["table", "memory", "seq_len", "batch_size"],
                           ascending=[True, True, False, True]))
    fig, axes = panel_grid(len(panels), ncols, 3.5, 2.6)
    shown = []
    for ax, (_, p) in zip(axes.flat, panels.iterrows()):
        rows = data[(data["table"] == p["table"]) & (data["memory"] == p["memory"])
                    & (data["seq_len"] == p["seq_len"]) & (data["batch_size"] == p["batch_size"])]
        for src in _order(rows["source"]):
            s = rows[rows["source"] == src].groupby("block_size")["time_us"].first().sort_index()
            ax.plot(s.index, s.to_numpy(), label=src, **source_style(src))
            shown.append(src)
        _block_axis(ax, data["block_size"])
        _log_axis(ax)
        mem = f"{p['memory']}, " if p["table"] == 1 else ""
        ax.set_title(f"Table {p['table']}: {p['table_title']}\n{mem}seq {p['seq_len']} × batch "
                     f"{p['batch_size']}", loc="left", fontsize=9)
        ax.set_ylabel("time (µs)")
    fig.tight_layout(h_pad=1.2)
    _source_legend(fig, shown)
    plt.close(fig)
    return fig


def penalty_figure(penalty: pd.DataFrame, series: list[tuple[int, str, int, int]], *,
                   gpu: str | list[str] | None = None) -> Figure:
    """`block_penalty`'s time at block 1 over block 16 as bars per source, one panel per
    (table, memory, seq_len, batch_size) in `series` (columns) and card (rows, titled H100/H200;
    `gpu` a slug, a list of slugs, or None for every card); above 1, small blocks are slower."""
    _need(penalty, ["gpu_slug", *SR.SERIES, "source", "small_over_ref"], "penalty_figure")
    gpus = [gpu] if isinstance(gpu, str) else (list(gpu) if gpu is not None else frame.card_slugs(penalty))
    set_house_style()
    fig, axes = plt.subplots(len(gpus), len(series), figsize=(3.4 * len(series), 2.8 * len(gpus)),
                             squeeze=False, sharex=True)
    top = float(np.nanmax(penalty[penalty["gpu_slug"].isin(gpus)]["small_over_ref"]))
    for row, g in zip(axes, gpus):
        data = _one_card(penalty, g, "penalty_figure")
        for ax, (table, memory, seq, batch) in zip(row, series):
            rows = data[(data["table"] == table) & (data["memory"] == memory)
                        & (data["seq_len"] == seq) & (data["batch_size"] == batch)]
            rows = rows.dropna(subset=["small_over_ref"])
            if rows.empty:
                raise ValueError(f"penalty_figure: no block 1 / block 16 ratio for table {table}, "
                                 f"{memory}, seq {seq} × batch {batch}")
            order = _order(rows["source"])
            vals = rows.set_index("source").loc[order, "small_over_ref"]
            y = np.arange(len(order))[::-1]
            for yi, src in zip(y, order):
                st = source_style(src)
                hatch = "///" if st.get("linestyle") == "--" else None
                ax.barh(yi, vals[src], color=st["color"], alpha=0.85 if hatch is None else 0.45,
                        hatch=hatch, edgecolor=st["color"], height=0.7)
                ax.text(vals[src] + 0.08, yi, f"{vals[src]:.1f}×", va="center", fontsize=8)
            ax.axvline(1.0, color="0.35", linewidth=1, linestyle="--", zorder=0)
            ax.set_yticks(y)
            ax.set_yticklabels(order, fontsize=8)
            ax.set_xlim(0, top * 1.18)
            ax.set_title(f"{frame.card_label(g)}: table {table}, seq {seq} × batch {batch}",
                         loc="left", fontsize=9)
            ax.grid(axis="y", visible=False)
        for ax in row[1:]:
            ax.tick_params(labelleft=False)
    for ax in axes[-1]:
        ax.set_xlabel("time at block 1 / time at block 16")
    fig.tight_layout(w_pad=0.8, h_pad=1.0)
    plt.close(fig)
    return fig


def outliers(values, *, gap: float = 4.0, most: int = 2) -> np.ndarray:
    """The few points (at most ``most``) that would set a ratio panel's scale on their own: sorted by
    distance from 1 in log, the largest ``k`` whose nearest is ``gap`` times as far from 1 as the
    next point (or as 2 %, if that is further); none when no such break exists."""
    v = np.asarray(values, dtype=float)
    dev = np.where(np.isfinite(v) & (v > 0), np.abs(np.log(np.where(v > 0, v, 1.0))), 0.0)
    order = np.argsort(-dev)
    mask = np.zeros(v.shape, dtype=bool)
    floor = math.log(1.02)
    for k in range(min(most, len(v) - 1), 0, -1):  # the widest break first
        if dev[order[k - 1]] > gap * max(dev[order[k]], floor):
            mask[order[:k]] = True
            break
    return mask


def _mark_clipped(ax, x: float, value: float, color) -> None:
    """An outlier outside the panel's limits: an arrow at the edge it lies beyond, with its value."""
    up = value > ax.get_ylim()[1]
    edge, tail = (0.99, 0.86) if up else (0.01, 0.14)
    ax.annotate("", xy=(x, edge), xytext=(x, tail), xycoords=("data", "axes fraction"),
                arrowprops=dict(arrowstyle="-|>", color=color, lw=1.4, mutation_scale=10), zorder=6)
    ax.annotate(f"{value:.2f}", xy=(x, tail), xycoords=("data", "axes fraction"), xytext=(4, 0),
                textcoords="offset points", ha="left", va="center", fontsize=7.5, color=color,
                fontweight="bold", zorder=6,
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.8))


def ratios_figure(derived: pd.DataFrame, *, gpu: str | None = None, versions=SR.VERSIONS,
                  ncols: int = 2) -> Figure:
    """`derived_ratios`: one panel per (comparison, series), one line per source, 1.0 drawn in.
    A panel's limits fit its bulk; the few points that would set them alone (:func:`outliers`)
    are drawn as an arrow at the edge, with their value."""
    _need(derived, ["gpu_slug", "comparison", "seq_len", "batch_size", "series", "block_size",
                    "source", "ratio"], "ratios_figure")
    data = _one_card(derived, gpu, "ratios_figure")
    keep = set(SR.sources(SR.parse_versions(versions)))
    data = data[data["source"].isin(keep)]
    set_house_style()
    names = list(SR.COMPARISONS)
    panels = (data[["comparison", "seq_len", "batch_size", "series"]].drop_duplicates()
              .assign(rank=lambda d: d["comparison"].map(names.index))
              .sort_values(["rank", "seq_len", "batch_size"], ascending=[True, False, True]))
    fig, axes = panel_grid(len(panels), ncols, 3.5, 2.6)
    shown = []
    for ax, (_, p) in zip(axes.flat, panels.iterrows()):
        rows = data[(data["comparison"] == p["comparison"]) & (data["series"] == p["series"])]
        for src in _order(rows["source"]):
            s = rows[rows["source"] == src].groupby("block_size")["ratio"].first().sort_index()
            ax.plot(s.index, s.to_numpy(), label=src, **source_style(src))
            shown.append(src)
        ax.axhline(1.0, color="0.35", linewidth=1, linestyle=":", zorder=0)
        _block_axis(ax, data["block_size"])
        out = outliers(rows["ratio"])
        bulk = rows.loc[~out, "ratio"]
        lo, hi = float(bulk.min()), float(bulk.max())
        pad = max(0.03, 0.08 * (max(hi, 1.0) - min(lo, 1.0)))
        y0, y1 = min(lo, 1.0) - pad, max(hi, 1.0) + pad
        room = 0.3 * (y1 - y0)  # empty space at the edge an outlier lies beyond, for its arrow
        above, below = (rows.loc[out, "ratio"] > y1).any(), (rows.loc[out, "ratio"] < y0).any()
        ax.set_ylim(y0 - room * below, y1 + room * above)
        for _, r in rows[out].sort_values("block_size").iterrows():
            _mark_clipped(ax, float(r["block_size"]), float(r["ratio"]), source_style(r["source"])["color"])
        ax.set_title(f"{p['comparison']}\n{p['series']}", loc="left", fontsize=9)
        ax.set_ylabel("time ratio")
    fig.tight_layout(h_pad=1.2)
    _source_legend(fig, shown)
    plt.close(fig)
    return fig


def protocol_figure(effect: pd.DataFrame, *, gpu: str | list[str] | None = None) -> Figure:
    """`protocol_effect` by block size, one row of panels per (seq, batch) and one column per
    card (titled H100/H200; `gpu` a slug, a list, or None for every card), one line per backend,
    log scale: above 1 the seed's method made the kernel look faster, below 1 slower."""
    _need(effect, ["gpu_slug", "backend", "seq_len", "batch_size", "series", "block_size",
                   "rigorous_over_seed_protocol"], "protocol_figure")
    gpus = [gpu] if isinstance(gpu, str) else (list(gpu) if gpu is not None else frame.card_slugs(effect))
    datas = {g: _one_card(effect, g, "protocol_figure") for g in gpus}
    set_house_style()
    both = pd.concat(datas.values())
    panels = (both[["seq_len", "batch_size", "series"]].drop_duplicates()
              .sort_values(["seq_len", "batch_size"], ascending=[False, True]))
    fig, axes = plt.subplots(len(panels), len(gpus), figsize=(3.6 * len(gpus), 2.3 * len(panels)),
                             squeeze=False, sharey=True)
    backends = [b for b in BACKEND_STYLE if b in set(both["backend"])]
    for j, g in enumerate(gpus):
        for i, (_, p) in enumerate(panels.iterrows()):
            ax = axes[i, j]
            rows = datas[g][datas[g]["series"] == p["series"]]
            for b in backends:
                s = rows[rows["backend"] == b].groupby("block_size")["rigorous_over_seed_protocol"].first()
                ax.plot(s.index, s.to_numpy(), linewidth=1.5, markersize=5, **BACKEND_STYLE[b])
            ax.axhline(1.0, color="0.35", linewidth=1, linestyle=":", zorder=0)
            _block_axis(ax, both["block_size"])
            _log_axis(ax)
            ax.set_title(f"{frame.card_label(g)}: {p['series']}", loc="left", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("rigorous / seed protocol")
    fig.tight_layout(h_pad=1.0, w_pad=0.6)
    _legend_below(fig, [Line2D([], [], linewidth=1.5, **BACKEND_STYLE[b]) for b in backends],
                  [BACKEND_LABELS[b] for b in backends], ncol=2)
    plt.close(fig)
    return fig


#: The factorial figure's rows: (column of `SR.factorial`, what it holds fixed, y label).
FACTORIAL_ROWS = (
    ("timing_at_seed_tables", "timing alone (the seed's tables held)", "rigorous / seed timing"),
    ("tables_at_rigorous", "data alone (rigorous timing held)", "distinct / seed's tables"),
    ("interaction", "interaction (1: the two multiply)", "timing effect, distinct / seed's tables"),
)
POINT_COLORS = {(4096, 1): _CB[0], (1024, 1): _CB[1], (1024, 16): _CB[2], (1024, 32): _CB[3]}


def factorial_figure(f: pd.DataFrame, *, gpu: str,
                     backends=("own-v1-paged", "own-v2-paged")) -> Figure:
    """`SR.factorial` on one card: rows = timing alone, data alone, interaction; columns = kernel
    (`backends`); x = block size; colour = (seq_len, batch); solid device, dashed managed. Linear y: the ratios stay
    within a factor of two."""
    _need(f, ["gpu_slug", "backend", "memory_kind", "seq_len", "batch_size", "block_size",
              *[r[0] for r in FACTORIAL_ROWS]], "factorial_figure")
    data = _one_card(f, gpu, "factorial_figure")
    set_house_style()
    fig, axes = plt.subplots(len(FACTORIAL_ROWS), len(backends),
                             figsize=(3.8 * len(backends), 2.4 * len(FACTORIAL_ROWS)),
                             squeeze=False, sharey="row")
    for j, b in enumerate(backends):
        rows = data[data["backend"] == b]
        for i, (col, title, ylabel) in enumerate(FACTORIAL_ROWS):
            ax = axes[i, j]
            for (seq, batch), color in POINT_COLORS.items():
                for mem, ls, face in (("device", "-", color), ("managed", "--", "white")):
                    s = rows[(rows["seq_len"] == seq) & (rows["batch_size"] == batch)
                             & (rows["memory_kind"] == mem)].groupby("block_size")[col].first().dropna()
                    if len(s):
                        ax.plot(s.index, s.to_numpy(), color=color, linestyle=ls, marker="o",
                                markersize=4, markerfacecolor=face, linewidth=1.3)
            ax.axhline(1.0, color="0.35", linewidth=1, linestyle=":", zorder=0)
            _block_axis(ax, data["block_size"])
            ax.set_title(f"{frame.card_label(gpu)}, {BACKEND_LABELS.get(b, b)}\n{title}",
                         loc="left", fontsize=8.5)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    fig.tight_layout(h_pad=1.0, w_pad=0.6)
    handles = [Line2D([], [], color=c, marker="o", linewidth=1.3) for c in POINT_COLORS.values()]
    labels = [f"seq {s} × batch {b}" for s, b in POINT_COLORS]
    handles += [Line2D([], [], color="0.3", linestyle="-", marker="o"),
                Line2D([], [], color="0.3", linestyle="--", marker="o", markerfacecolor="white")]
    labels += ["device memory", "managed memory"]
    _legend_below(fig, handles, labels, ncol=3)
    plt.close(fig)
    return fig


def style_factorial_summary(summary: pd.DataFrame, caption: str | None = None):
    """`SR.factorial_summary` of one card as a table: per backend (rows) and effect (columns),
    the geometric mean with the range over the points, shaded like the ratio cells."""
    _need(summary, ["backend", "effect", "geomean", "min", "max"], "style_factorial_summary")
    effects = [e for e in SR.FACTORIAL_EFFECTS if e in set(summary["effect"])]
    geo = summary.pivot_table(index="backend", columns="effect", values="geomean").reindex(columns=effects)
    text = summary.assign(cell=[f"{g:.2f} ({lo:.2f}–{hi:.2f})" for g, lo, hi in
                                zip(summary["geomean"], summary["min"], summary["max"])]
                          ).pivot(index="backend", columns="effect", values="cell").reindex(columns=effects)
    order = [b for b in SR.SEED_BACKEND_ORDER if b in text.index]
    text, geo = text.loc[order], geo.loc[order]
    names = {e: SR.FACTORIAL_LABELS[e] for e in effects}
    styler = (text.rename(columns=names).style
              .apply(lambda _: _ratio_shade(geo.rename(columns=names)).to_numpy(), axis=None))
    return compact(styler, caption)


def style_resemblance(r: pd.DataFrame, caption: str | None = None):
    """`SR.block_resemblance` as a table: per seed series and version, each card's miss factor
    against the seed's block-size curve and the two cards' own gap."""
    cards_ = [c for c in frame.CARDS if c in r.columns]
    show = r.assign(series=[f"table {t}, {SR.series_name(m, s, b)}" for t, m, s, b in
                            zip(r["table"], r["memory"], r["seq_len"], r["batch_size"])])
    cols = {c: f"{frame.card_label(c)} vs seed" for c in cards_}
    if "between_cards" in show.columns:
        cols["between_cards"] = "between the cards"
    out = show.set_index(["series", "version"])[list(cols)].rename(columns=cols)
    styler = (out.style.format("{:.2f}", na_rep="—")
              .background_gradient(cmap="Greens_r", vmin=1.0, vmax=3.0, axis=None))
    return compact(styler, caption)


# ----------------------------------------------------------------------------- tables

_TABLE_STYLES = [
    {"selector": "th", "props": [("text-align", "center"), ("font-size", "0.7em"),
                                 ("padding", "2px 3px"), ("white-space", "normal")]},
    {"selector": "td", "props": [("text-align", "right"), ("font-size", "0.72em"),
                                 ("padding", "2px 4px"), ("font-variant-numeric", "tabular-nums")]},
    {"selector": "caption", "props": [("caption-side", "top"), ("font-size", "0.9em"),
                                      ("text-align", "left")]},
    # the first column holds row labels: left-aligned, never wrapped
    {"selector": "td:first-child, th:first-child",
     "props": [("text-align", "left"), ("white-space", "nowrap")]},
]


def _ratio_shade(values: pd.DataFrame) -> pd.DataFrame:
    """CSS per ratio cell: blue below 1 (ours faster), red above, by log2 distance, capped."""
    def css(v):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            return ""
        x = max(-1.0, min(1.0, math.log2(v) / 3))
        r, g, b = ((0.99, 0.55, 0.42) if x > 0 else (0.42, 0.62, 0.86))
        a = 0.08 + 0.55 * abs(x)
        return f"background-color: rgba({int(r * 255)}, {int(g * 255)}, {int(b * 255)}, {a:.2f})"

    return values.map(css)


def reproduction_tables(seed: pd.DataFrame, joined: pd.DataFrame, table: int, cards, versions) -> list:
    """One styled reproduction table per card: seed table ``table`` beside ours."""
    title = seed.loc[seed["table"] == table, "table_title"].iloc[0]
    return [style_reproduction_table(SR.reproduction_table(joined, table, c, versions),
                                     caption=f"Seed table {table} ({title}) beside ours on the {frame.card_label(c)}")
            for c in cards]


def style_reproduction_table(wide: pd.DataFrame, caption: str | None = None):
    """`reproduction_table` for reading: ratio cells shaded blue below 1 and red above, gaps as a dash."""
    if wide.empty:
        raise ValueError("style_reproduction_table got an empty table")
    flat = wide.reset_index()
    flat.columns = pd.MultiIndex.from_tuples([("", "series"), ("", "block size")] + list(wide.columns))
    # The series repeats on every row of its block sizes; name it once, on its first row.
    label = ("", "series")
    flat.loc[flat[label].duplicated(), label] = ""
    times = [c for c in flat.columns if "(µs)" in c[1]]
    ratios = [c for c in flat.columns if " / " in c[1]]
    styler = (
        flat.style.hide(axis="index")
        .format("{:.1f}", subset=times, na_rep="—")
        .format("{:.2f}", subset=ratios, na_rep="—")
        .apply(_ratio_shade, axis=None, subset=ratios)
        .set_table_styles(_TABLE_STYLES)
    )
    return styler.set_caption(caption) if caption else styler


def style_fit_table(shape: pd.DataFrame, versions=SR.VERSIONS, caption: str | None = None):
    """`shape_mismatch` as a table: per seed series (rows) and source, the shape spread and the scale."""
    _need(shape, ["table", "memory", "seq_len", "batch_size", "source", "scale", "spread"], "style_fit_table")
    keep = [s for s in SR.sources(SR.parse_versions(versions))[1:] if s in set(shape["source"])]
    data = shape[shape["source"].isin(keep)].assign(
        series=lambda d: [f"table {t}, {SR.series_name(m, s, b)}" for t, m, s, b in
                          zip(d["table"], d["memory"], d["seq_len"], d["batch_size"])])
    wide = data.pivot_table(index="series", columns="source", values=["spread", "scale"],
                            aggfunc="first", sort=False)
    cols = [(m, s) for s in keep for m in ("spread", "scale")]
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(cols))
    wide.columns = pd.MultiIndex.from_tuples(
        [(s, "shape spread" if m == "spread" else "ours / seed (geo. mean)") for m, s in cols])
    flat = wide.reset_index()
    flat.columns = pd.MultiIndex.from_tuples([("", "seed table and series")] + list(wide.columns))
    spread_cols = [c for c in flat.columns if c[1] == "shape spread"]
    scale_cols = [c for c in flat.columns if c[1].startswith("ours / seed")]
    styler = (
        flat.style.hide(axis="index")
        .format("{:.2f}", subset=spread_cols + scale_cols, na_rep="—")
        .background_gradient(cmap="Greens_r", subset=spread_cols, vmin=1.0, vmax=3.0)
        .set_table_styles(_TABLE_STYLES)
    )
    return styler.set_caption(caption) if caption else styler


def style_card_ratio(summary: pd.DataFrame, caption: str | None = None):
    """`SR.card_ratio_summary` as a table: per backend the second card's time over the first's,
    geometric mean (min–max), shaded blue below 1 (faster on the second card) and red above,
    and the largest share of the read ceiling either card reached."""
    _need(summary, ["backend", "geomean", "min", "max", "max_pct"], "style_card_ratio")
    out = pd.DataFrame({
        "backend": [BACKEND_LABELS.get(b, b) for b in summary["backend"]],
        "H200 / H100": [f"{g:.2f} ({lo:.2f}–{hi:.2f})" for g, lo, hi in
                        zip(summary["geomean"], summary["min"], summary["max"])],
        "max % of read ceiling": [f"{p:.0f}" for p in summary["max_pct"]]}).set_index("backend")
    shade = pd.DataFrame({"H200 / H100": summary["geomean"].to_numpy(),
                          "max % of read ceiling": np.nan}, index=out.index)
    styler = out.style.apply(lambda _: _ratio_shade(shade).to_numpy(), axis=None)
    return compact(styler, caption)


#: vLLM's 2024 kernels beside the post and ours: the post black, vLLM 2024 green (v1 solid, v2
#: dashed), ours in the chapter's version colours.
VLLM2024_STYLE = {"post": dict(color="black", marker="o", linewidth=2.2, markersize=6, zorder=5),
                  "vLLM 2024 v1": dict(color=_CB[2], marker="^", linewidth=1.6),
                  "vLLM 2024 v2": dict(color=_CB[2], marker="v", linewidth=1.6, linestyle="--"),
                  "ours v1": dict(color=VERSION_COLOR["v1"], marker="s", linewidth=1.4),
                  "ours v2": dict(color=VERSION_COLOR["v2"], marker="D", linewidth=1.4, linestyle="--")}


def vllm2024_panels(side: pd.DataFrame, gpu: str, series=((1, "device", 4096, 1), (5, "device", 1024, 16))) -> Figure:
    """Time by block size for the post, vLLM's 2024 v1/v2 and ours, one panel per seed series (the
    seed's arm: host clock, the seed's tables), log scale: where each curve bends, not how high."""
    _need(side, ["table", "memory_kind", "seq_len", "batch_size", "block_size", *VLLM2024_STYLE], "vllm2024_panels")
    set_house_style()
    fig, axes = panel_grid(len(series), len(series), 4.6, 3.4)
    for ax, (table, memory, n, b) in zip(np.ravel(axes), series):
        s = side[(side["table"] == table) & (side["memory_kind"] == memory) & (side["seq_len"] == n)
                 & (side["batch_size"] == b)].sort_values("block_size")
        if s.empty:
            raise ValueError(f"vllm2024_panels: no table {table} series {memory} {n} × {b}")
        for src, style in VLLM2024_STYLE.items():
            ax.plot(s["block_size"], s[src], label=src, **style)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        _block_axis(ax, s["block_size"].unique())
        ax.set_title(f"table {table}: {memory}, {n} × batch {b} ({frame.card_label(gpu)})", fontsize=10)
        ax.set_ylabel("time (µs, log)")
    np.ravel(axes)[0].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


#: Row headings of a two-level index at the top of their group, not its middle.
TOP_HEADINGS = [{"selector": "th.row_heading", "props": "vertical-align: top"}]


def vllm2024_table(side: pd.DataFrame, caption: str):
    """The post's cells beside vLLM 2024's and ours (one row per cell), styled."""
    _need(side, ["table", "variant", "memory_kind", "seq_len", "batch_size", "block_size"], "vllm2024_table")
    t = side.assign(series=[f"{t} ({v}): {m}, {n} × {b}" for t, v, m, n, b in
                            zip(side["table"], side["variant"], side["memory_kind"], side["seq_len"], side["batch_size"])])
    t = t.set_index(["series", "block_size"]).rename_axis(["table (post's variant): series", "block"])
    times = ["post", "vLLM 2024 v1", "vLLM 2024 v2", "ours v1", "ours v2"]
    ratios = ["ours v1 / vLLM v1", "ours v2 / vLLM v2"]
    st = t[times + ratios].style.format("{:.1f}", subset=times).format("{:.2f}", subset=ratios)
    return compact(st, caption, extra=TOP_HEADINGS)
