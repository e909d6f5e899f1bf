"""The seed chapter's figures and styled tables: the post's numbers as it printed them."""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from lib.book.plots import _block_axis, set_house_style
from lib.book.plots import require_columns as _need
from lib.chapters.seed.tables import series_label


def _gapped_line(data: pd.DataFrame, *, x: str, y: str, xs, color=None, label=None, **kw) -> None:
    """Draw one series, breaking the line where a block size was not measured (seaborn's lineplot
    would join across the gap, and a reader would take that line for a measurement)."""
    series = data.groupby(x)[y].first().reindex(sorted(xs))
    plt.gca().plot(series.index, series.to_numpy(), color=color, label=label, markersize=6, **kw)


def seed_times_figure(df: pd.DataFrame) -> Figure:
    """Kernel time against block size, one panel per seed table, one line per series."""
    _need(df, ["table", "table_title", "memory", "block_size", "seq_len", "batch_size", "time_us"],
          "seed_times_figure")
    set_house_style()
    data = df.assign(panel=[f"Table {t}\n{title}" for t, title in zip(df["table"], df["table_title"])],
                     series=series_label(df))
    panels = list(dict.fromkeys(data.sort_values("table")["panel"]))
    # Managed last and dashed: in table 1 it lies exactly on the device line, and must show.
    series = sorted(data["series"].unique(), key=lambda s: (s.startswith("managed"), s))
    markers = ["o", "s", "D", "^", "v", "P", "X"]
    grid = sns.FacetGrid(
        data, col="panel", col_order=panels, col_wrap=min(3, len(panels)), hue="series",
        hue_order=series, palette=sns.color_palette("colorblind", len(series)),
        hue_kws={"marker": [markers[i % len(markers)] for i in range(len(series))],
                 "linestyle": ["--" if s.startswith("managed") else "-" for s in series]},
        sharey=False, height=2.3, aspect=1.1)
    grid.map_dataframe(_gapped_line, x="block_size", y="time_us", xs=data["block_size"].unique())
    grid.set_titles("{col_name}")
    grid.set_axis_labels("block size (tokens)", "time (µs)")
    for ax in grid.axes.flat:
        _block_axis(ax, data["block_size"])
        ax.set_ylim(bottom=0)
    grid.add_legend(title="")
    sns.move_legend(grid, "upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, title=None, frameon=False)
    fig = grid.figure
    plt.close(fig)
    return fig


def ratio_figure(ratios: pd.DataFrame, *, title: str, ylabel: str, hue: str = "comparison") -> Figure:
    """A ratio against block size, with the line of no difference (1.0) drawn in."""
    _need(ratios, ["block_size", "ratio", hue], "ratio_figure")
    set_house_style()
    fig, ax = plt.subplots(figsize=(5.6, 2.7))
    several = ratios[hue].nunique() > 1
    sns.lineplot(data=ratios, x="block_size", y="ratio", hue=hue, style=hue, markers=True, dashes=False,
                 markersize=8, ax=ax, legend=several)
    ax.axhline(1.0, color="0.35", linewidth=1, linestyle="--", zorder=0)
    _block_axis(ax, ratios["block_size"])
    lo, hi = float(ratios["ratio"].min()), float(ratios["ratio"].max())
    pad = max(0.02, 0.08 * (max(hi, 1.0) - min(lo, 1.0)))
    ax.set_ylim(min(lo, 1.0) - pad, max(hi, 1.0) + pad)
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    if several:  # one series needs no legend: the title says what it is
        sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, title=None, frameon=False)
    plt.close(fig)
    return fig


def style_seed_table(wide: pd.DataFrame, caption: str | None = None):
    """The seed's `wide_table` for reading: the post's three decimals, gaps as a dash, and a light
    shade along each row so that a series' slow block sizes stand out."""
    if wide.empty:
        raise ValueError("style_seed_table got an empty table")
    flat = wide.reset_index()
    time_cols = [("time (µs) at block size (tokens)", f"{c}") for c in wide.columns]
    keys = [("", str(c)) for c in flat.columns[:wide.index.nlevels]]
    flat.columns = pd.MultiIndex.from_tuples(keys + time_cols)
    styler = (
        flat.style.hide(axis="index")
        .format("{:.3f}", subset=time_cols, na_rep="—")
        .background_gradient(cmap="Oranges", axis=1, subset=time_cols, low=0.0, high=0.6)
        # NaN would get the colour map's "bad" colour (black): keep gaps blank instead.
        .highlight_null(props="background-color: transparent; color: #888888;", subset=time_cols)
        .set_table_styles([
            {"selector": "th", "props": [("text-align", "center"), ("font-size", "0.75em"),
                                         ("padding", "2px 4px")]},
            {"selector": "td", "props": [("text-align", "right"), ("font-size", "0.75em"),
                                         ("padding", "2px 4px"),
                                         ("font-variant-numeric", "tabular-nums")]},
            {"selector": "caption", "props": [("caption-side", "top"), ("font-size", "0.9em")]},
        ])
    )
    return styler.set_caption(caption) if caption else styler


def style_likely_cache_table(cache: pd.DataFrame):
    """`lib.chapters.seed.tables.likely_cache_table` with readable headers, for the seed chapter."""
    _need(cache, ["block_size", "cache_tokens", "cache_MiB", "logical_blocks_per_seq",
                  "logical_per_physical"], "style_likely_cache_table")
    shown = cache.rename(columns={
        "block_size": "block size", "cache_tokens": "cache (tokens)", "cache_MiB": "K + V cache (MiB)",
        "logical_blocks_per_seq": "blocks per sequence", "logical_per_physical": "reads per physical block"})
    return (
        shown.style.hide(axis="index")
        .format({"K + V cache (MiB)": "{:.0f}", "reads per physical block": "{:.3g}"})
        .set_table_styles([{"selector": "th, td", "props": [("text-align", "right"), ("padding", "2px 10px"),
                                                            ("font-size", "0.85em")]}])
    )
