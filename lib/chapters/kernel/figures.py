"""Figures and tables of the chapter "How the decode kernel works".

The two diagrams are drawn from real `lib.engine.kvcache` objects, not by hand (the layout order is
read back from `kvcache.to_classic` itself). Each function returns a closed `Figure` or a `Styler`.
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
from lib.book import tables
from lib.engine import kvcache
from lib.book.plots import _block_axis, set_house_style
from lib.book.plots import require_columns as _need, diagram_canvas as _canvas

#: Backends of the correctness matrix, in reading order (ours by version, then the references).
BACKEND_ORDER = (
    "own-v1-paged", "own-v1-contiguous", "own-v1-no_offset",
    "own-v2-paged", "own-v2-contiguous", "own-v2-no_offset",
    "own-auto-paged", "own-auto-contiguous", "vllm", "sdpa_dense",
)
DTYPE_ORDER = ("float16", "bfloat16", "float32")
FREE_C = "0.93"
#: relative errors below this are drawn at it (log axis; exact outputs have errors near 1e-16)
ERROR_FLOOR = 1e-9


def _ordered(values, order) -> list:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + sorted(v for v in present if v not in order)


def _cell(ax, x, y, w, h, color, text="", *, hatch=None, fontsize=6.5, lw=0.6, tc="0.1", zorder=2):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="0.3", linewidth=lw,
                           hatch=hatch, zorder=zorder))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, color=tc,
                zorder=zorder + 1)


def _token_cells(ax, x0, y, c, block: int, bs: int, n_tokens: int, color) -> None:
    """The `bs` slots of logical block `block`: numbered tokens, hatched where no token is yet."""
    for t in range(bs):
        tok = block * bs + t
        if tok < n_tokens:
            _cell(ax, x0 + t * c, y, c, c, color, str(tok), tc="white", fontsize=6.5)
        else:
            _cell(ax, x0 + t * c, y, c, c, "white", hatch="////")


def _compact(styler, caption: str | None, extra=()):
    """`styler` in the book's compact table style (:func:`lib.book.tables.compact`)."""
    return tables.compact(styler, caption, extra)


# ----------------------------------------------------------------------------- diagrams

def paged_cache_figure(tables: kvcache.BlockTables) -> Figure:
    """Logical tokens of each sequence -> its block-table row -> blocks of the physical pool.

    `tables` is a real `kvcache.BlockTables`; hatched slots are block tails no token uses yet, grey
    pool blocks are free.
    """
    if tables.seq_lens is None or not tables.block_size:
        raise ValueError("paged_cache_figure needs BlockTables made by kvcache (seq_lens, block_size)")
    lens = [int(n) for n in tables.seq_lens]
    bs, tab = int(tables.block_size), np.asarray(tables.tables)
    nseq, width = tab.shape
    if nseq > 8 or tables.num_blocks > 24 or bs > 8:
        raise ValueError("paged_cache_figure draws small examples only (<= 8 sequences, "
                         "<= 24 blocks, block size <= 8)")
    nblocks = kvcache.blocks_needed(lens, bs)
    colors = sns.color_palette("colorblind", nseq)
    c, gap = 0.34, 0.16                      # token cell, gap between blocks
    blk_w = bs * c
    logical_w = width * blk_w + (width - 1) * gap
    row_h = 1.25
    x_tab = 1.7 + logical_w + 0.9            # block table column
    tab_w = 0.62
    x_pool = x_tab + width * tab_w + 2.2     # physical pool column
    pool_step = 0.56
    top = max(nseq * row_h + 0.4, tables.num_blocks * pool_step) + 1.3
    W = x_pool + blk_w + 1.6
    fig, ax = _canvas(W, top + 0.1, (0.5 * W, 0.5 * (top + 0.1)))

    for x_mid, title in ((1.7 + logical_w / 2, "logical view\n(tokens in order)"),
                         (x_tab + width * tab_w / 2, "block table\n(one row per sequence)"),
                         (x_pool + blk_w / 2, "physical pool\n(block id: tokens)")):
        ax.text(x_mid, top - 0.05, title, ha="center", va="top", fontsize=8.5, weight="bold", color="0.15")

    owner = {}
    for s in range(nseq):
        for j in range(int(nblocks[s])):
            owner[int(tab[s, j])] = (s, j)

    for s, n in enumerate(lens):
        y = top - 1.6 - s * row_h
        ax.text(1.55, y + c / 2, f"seq {s}\n{n} tokens", ha="right", va="center", fontsize=7.5, color="0.15")
        for j in range(width):
            x0 = 1.7 + j * (blk_w + gap)
            tx = x_tab + j * tab_w  # the table row: logical block j -> physical id
            if j < nblocks[s]:
                _token_cells(ax, x0, y, c, j, bs, n, colors[s])
                ax.text(x0 + blk_w / 2, y - 0.08, f"logical {j}", ha="center", va="top",
                        fontsize=6, color="0.35")
                _cell(ax, tx, y - 0.05, tab_w, c + 0.1, "white", str(int(tab[s, j])), fontsize=8, lw=0.9)
                ax.text(tx + tab_w / 2, y + c + 0.1, f"[{s},{j}]", ha="center", va="bottom",
                        fontsize=5.5, color="0.45")
            else:  # the real table holds 0 here; the kernel never reads it
                _cell(ax, tx, y - 0.05, tab_w, c + 0.1, FREE_C, str(int(tab[s, j])), fontsize=8,
                      lw=0.9, tc="0.6")
        ax.add_patch(FancyArrowPatch((1.7 + logical_w + 0.1, y + c / 2), (x_tab - 0.1, y + c / 2),
                                     arrowstyle="-|>", mutation_scale=9, color="0.55", lw=0.9))

    for b in range(tables.num_blocks):
        y = top - 1.35 - b * pool_step
        ax.text(x_pool - 0.12, y + c / 2, f"{b}", ha="right", va="center", fontsize=7.5,
                weight="bold", color="0.2")
        if b not in owner:
            for t in range(bs):
                _cell(ax, x_pool + t * c, y, c, c, FREE_C)
            ax.text(x_pool + blk_w + 0.1, y + c / 2, "free", ha="left", va="center", fontsize=6.5,
                    color="0.45")
            continue
        s, j = owner[b]
        _token_cells(ax, x_pool, y, c, j, bs, lens[s], colors[s])
        ax.text(x_pool + blk_w + 0.1, y + c / 2, f"seq {s}, logical {j}", ha="left", va="center",
                fontsize=6.5, color="0.3")
        # from the entry (a dot right of its number) to the block; drawn under the table cells
        ty = top - 1.6 - s * row_h
        start = (x_tab + j * tab_w + 0.78 * tab_w, ty + c / 2)
        ax.plot(*start, marker="o", markersize=3, color=colors[s], zorder=5)
        ax.add_patch(FancyArrowPatch(start, (x_pool - 0.5, y + c / 2), arrowstyle="-|>",
                                     mutation_scale=8, color=colors[s], lw=1.0, alpha=0.9,
                                     shrinkA=0, zorder=1))
    plt.close(fig)
    return fig


def layout_order(block_size: int = 4, head_size: int = 16, dtype: str = "float16") -> dict:
    """Memory order of one (block, KV head) of K and V in the pool and classic layouts.

    A one-block pool whose element (token t, dim d) holds the code t * D + d goes through
    `kvcache.to_classic`; returns {layout name: (tokens, dims) in address order} plus "x"
    (elements per 16 bytes).
    """
    if dtype not in ("float16", "float32"):
        raise ValueError("layout_order draws float16 or float32 caches")
    np_dtype = np.float16 if dtype == "float16" else np.float32
    if block_size * head_size > 2048:
        raise ValueError("layout_order codes t * D + d exactly only up to 2048 elements")
    code = np.arange(block_size * head_size).reshape(1, block_size, 1, head_size).astype(np_dtype)
    k, v = kvcache.to_classic(code, code)
    out = {}
    for name, arr in (("pool (vLLM) K and V", code), ("classic K", k), ("classic V", v)):
        flat = np.asarray(arr).reshape(-1).astype(np.int64)
        out[name] = (flat // head_size, flat % head_size)
    out["x"] = 16 // np.dtype(np_dtype).itemsize
    return out


def layout_figure(block_size: int = 4, head_size: int = 16, dtype: str = "float16",
                  per_row: int = 32) -> Figure:
    """One block of one KV head, element by element in address order, for each layout.

    Colour is the token, the number the head dimension; thick ticks mark 16-byte boundaries.
    Under each classic layout, how our kernel reads it at this block size (`lib.chapters.kernel.anatomy`).
    """
    from lib.chapters.kernel.anatomy import ITEMSIZE, WARP, thread_mapping

    order = layout_order(block_size, head_size, dtype)
    x = order.pop("x")
    n = block_size * head_size
    if per_row % x:
        raise ValueError(f"per_row={per_row} must be a multiple of the 16-byte vector ({x})")
    m = thread_mapping(block_size, head_size=head_size, dtype=dtype)
    size = ITEMSIZE[dtype]
    rows = -(-n // per_row)
    colors = sns.color_palette("colorblind", block_size)
    c = 0.3
    band = rows * c + 1.45
    W = 1.0 + per_row * c + 0.3
    H = len(order) * band + 0.6
    fig, ax = _canvas(W, H, (0.7 * W, 0.7 * H))
    notes = {
        "pool (vLLM) K and V": (
            "[block, token, kv head, dim]: each token's head is contiguous",
            "vLLM's current kernel reads this layout; SDPA reads a dense copy, token-major too"),
        "classic K": (
            f"[block, kv head, dim/{x}, token, {x}]: 16-byte pieces of consecutive tokens side by side",
            f"phase 1 at block size {block_size}: {m.tg} threads share a token, each loading "
            f"{m.key_load_bytes} B; one warp-wide load reads {WARP * m.key_load_bytes} contiguous bytes"),
        "classic V": (
            "[block, kv head, dim, token]: one dimension of every token of the block in a row",
            f"phase 2: a thread loads V_VEC = {m.v_vec} tokens of one dimension "
            f"({m.value_load_bytes} B) at once"),
    }
    for i, (name, (tok, dim)) in enumerate(order.items()):
        y0 = H - 0.3 - i * band
        ax.text(0.1, y0, name, ha="left", va="top", fontsize=9, weight="bold", color="0.15")
        ax.text(1.0, y0 - 0.3, notes[name][0], ha="left", va="top", fontsize=8, color="0.3")
        for e in range(n):
            r, col = divmod(e, per_row)
            xx, yy = 1.0 + col * c, y0 - 0.7 - (r + 1) * c
            _cell(ax, xx, yy, c, c, colors[int(tok[e])], str(int(dim[e])), fontsize=6, tc="white", lw=0.3)
            if col % x == 0 or col == per_row - 1 or e == n - 1:
                edge = xx if col % x == 0 else xx + c
                ax.plot([edge, edge], [yy - 0.06, yy + c + 0.06], color="0.1", lw=1.4, zorder=4)
        for r in range(rows):
            ax.text(0.9, y0 - 0.7 - (r + 0.5) * c, f"+{r * per_row * size} B", ha="right", va="center",
                    fontsize=7, color="0.4")
        ax.text(1.0, y0 - 0.8 - rows * c, notes[name][1], ha="left", va="top", fontsize=7.5,
                color="0.25", style="italic")
    handles = [Rectangle((0, 0), 1, 1, facecolor=colors[t], edgecolor="0.3") for t in range(block_size)]
    ax.legend(handles, [f"token {t}" for t in range(block_size)], loc="lower center",
              bbox_to_anchor=(0.5, -0.06), ncol=block_size, fontsize=8, handlelength=1.2)
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- thread mapping

def mapping_figure(table: pd.DataFrame) -> Figure:
    """Load width and per-token warp instructions against block size (`lib.chapters.kernel.anatomy`)."""
    _need(table, ["block_size", "key_load_bytes", "value_load_bytes", "key_loads_per_token",
                  "value_loads_per_token", "shuffles_per_token", "table_entries_per_token"], "mapping_figure")
    set_house_style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.6, 2.9))
    pal = sns.color_palette("colorblind", 4)
    t = table.sort_values("block_size")
    bs = t["block_size"]
    left.plot(bs, t["key_load_bytes"], marker="o", color=pal[0], label="key (phase 1)")
    left.plot(bs, t["value_load_bytes"], marker="s", color=pal[1], label="value (phase 2)", linestyle="--")
    left.set_yscale("log", base=2)
    left.yaxis.set_major_locator(mticker.FixedLocator([1, 2, 4, 8, 16]))
    left.yaxis.set_major_formatter(mticker.FixedFormatter(["1", "2", "4", "8", "16"]))
    left.yaxis.set_minor_locator(mticker.NullLocator())
    left.set_ylim(1.5, 22)
    left.set_ylabel("bytes per thread per load")
    left.set_title("Width of each load", loc="left")
    _block_axis(left, bs)
    left.legend(loc="lower right", fontsize=7.5)

    series = [("key_loads_per_token", "key loads", "o", pal[0]),
              ("value_loads_per_token", "value loads", "s", pal[1]),
              ("shuffles_per_token", "reduction shuffles", "D", pal[2]),
              ("table_entries_per_token", "block-table entries", "^", pal[3])]
    for col, label, m, colr in series:
        y = t[col].astype(float).where(t[col] > 0)  # 0 shuffles cannot sit on a log axis
        right.plot(bs, y, marker=m, color=colr, label=label)
    right.set_yscale("log", base=2)
    right.set_ylabel("per token, per warp")
    right.set_title("Instructions per token", loc="left")
    _block_axis(right, bs)
    if (t["shuffles_per_token"] == 0).any():
        first0 = int(t.loc[t["shuffles_per_token"] == 0, "block_size"].min())
        right.text(0.98, 0.97, f"no shuffles from block {first0} up", transform=right.transAxes,
                   ha="right", va="top", fontsize=7, color=pal[2])
    right.legend(loc="lower left", fontsize=7.5)
    fig.tight_layout()
    plt.close(fig)
    return fig


def style_mapping_table(table: pd.DataFrame, caption: str | None = None):
    """The thread-mapping table with the kernel's names as headers."""
    cols = {
        "block_size": "block size", "tg": "TG (threads per token)",
        "tok_per_step": "tokens per warp step", "steps_per_block": "warp steps per block",
        "vec": "VEC (elements)", "key_load_bytes": "key bytes per load",
        "shuffle_levels": "shuffle rounds per step", "v_vec": "V_VEC (tokens)",
        "value_load_bytes": "value bytes per load", "rows_per_thread": "value rows per thread",
    }
    _need(table, list(cols), "style_mapping_table")
    shown = table[list(cols)].rename(columns=cols)
    styler = shown.style.hide(axis="index").background_gradient(
        cmap="Oranges_r", subset=["key bytes per load", "value bytes per load"], vmin=0, vmax=24)
    return _compact(styler, caption)


# ----------------------------------------------------------------------------- correctness

def correctness_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per backend (rows, in `BACKEND_ORDER`) and dtype: `passed`, `total` and `worst` (the largest
    rel_error / tolerance)."""
    _need(df, ["backend", "dtype", "rel_error", "check_passed", "tolerance"], "correctness_summary")
    d = df.assign(passed=df["check_passed"].fillna(False).astype(bool),
                  over=df["rel_error"] / df["tolerance"].astype(float))
    g = d.groupby(["backend", "dtype"]).agg(passed=("passed", "sum"), total=("passed", "size"),
                                            worst=("over", "max"))
    wide = g.unstack("dtype").swaplevel(axis=1)  # columns (dtype, measure)
    dts = _ordered(wide.columns.get_level_values(0), DTYPE_ORDER)
    wide = wide[[(dt, k) for dt in dts for k in ("passed", "total", "worst")]]
    return wide.reindex(_ordered(wide.index, BACKEND_ORDER))


def style_correctness_summary(summary: pd.DataFrame, caption: str | None = None):
    """`correctness_summary` as "passed / total" cells and worst error / tolerance, failures red."""
    if summary.empty:
        raise ValueError("style_correctness_summary got an empty table")
    dts = list(dict.fromkeys(summary.columns.get_level_values(0)))
    out = pd.DataFrame(index=summary.index)
    fail = pd.DataFrame(False, index=summary.index, columns=[])
    for dt in dts:
        p, t, w = summary[(dt, "passed")], summary[(dt, "total")], summary[(dt, "worst")]
        out[(dt, "passed / total")] = ["—" if pd.isna(b) else f"{int(a)} / {int(b)}"
                                       for a, b in zip(p, t)]  # — : not in the matrix
        out[(dt, "worst error / tolerance")] = ["—" if pd.isna(v) else f"{v:.2g}" for v in w]
        fail[(dt, "passed / total")] = (p < t).fillna(False)
        fail[(dt, "worst error / tolerance")] = (w > 1).fillna(False)
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    fail.columns = out.columns
    out.index.name = "backend"
    styler = out.style.apply(lambda _: np.where(fail, "color: #c0392b; font-weight: bold", ""), axis=None)
    return _compact(styler, caption)


def bit_identity(df: pd.DataFrame) -> pd.DataFrame:
    """Rows compared bit for bit with a partner: identical / compared, by backend and partner."""
    _need(df, ["backend", "bit_identical_to", "bit_identical"], "bit_identity")
    d = df[df["bit_identical_to"].fillna("") != ""]
    if d.empty:
        raise ValueError("bit_identity: no row was compared bit for bit")
    same = d["bit_identical"].astype("boolean").fillna(False).astype(bool)
    g = d.assign(same=same).groupby(["backend", "bit_identical_to"])["same"].agg(["sum", "size"])
    g = g.rename(columns={"sum": "identical", "size": "compared"}).reset_index()
    g["identical"] = g["identical"].astype(int)
    return g


def correctness_figure(df: pd.DataFrame) -> Figure:
    """Relative error of every checked row, one panel per dtype, its tolerance drawn in."""
    _need(df, ["backend", "dtype", "rel_error", "tolerance", "placement"], "correctness_figure")
    set_house_style()
    d = df.dropna(subset=["rel_error"]).copy()
    d["shown_error"] = d["rel_error"].clip(lower=ERROR_FLOOR)
    dts = _ordered(d["dtype"], DTYPE_ORDER)
    order = _ordered(d["backend"], BACKEND_ORDER)
    places = _ordered(d["placement"], ("identity", "shuffled", "single_content"))
    pal = dict(zip(places, sns.color_palette("colorblind", len(places))))
    fig, axes = plt.subplots(1, len(dts), figsize=(2.3 * len(dts) + 1.3, 0.3 * len(order) + 1.8),
                             sharey=True, squeeze=False)
    for ax, dt in zip(axes[0], dts):
        sub = d[d["dtype"] == dt]
        tol = float(sub["tolerance"].max())
        # fixed limits before drawing: autoscaling a first group of one point warns
        ax.set_xscale("log")
        ax.set_xlim(float(sub["shown_error"].min()) / 3, max(float(sub["shown_error"].max()) * 3, tol * 4))
        ax.set_autoscalex_on(False)
        sns.stripplot(data=sub, x="shown_error", y="backend", order=order, hue="placement",
                      hue_order=places, palette=pal, size=2.2, alpha=0.5, jitter=0.28,
                      ax=ax, legend=ax is axes[0][-1])
        ax.axvline(tol, color="#c0392b", linestyle="--", linewidth=1.2)
        ax.axvspan(tol, ax.get_xlim()[1], color="#c0392b", alpha=0.07, zorder=0)
        ax.set_title(dt, loc="left")
        ax.set_title(f"tolerance {tol:g}", loc="right", color="#c0392b", fontsize=8, fontweight="normal")
        ax.set_xlabel("relative error")
        ax.set_ylabel("")
    leg = axes[0][-1].get_legend()
    if leg is not None:
        handles, labels = axes[0][-1].get_legend_handles_labels()
        leg.remove()
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=len(labels),
                   title="placement", markerscale=3)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- resources

def register_pivot(res: pd.DataFrame, *, dtype: str = "float16", head_size: int = 128,
                   addressing: str = "paged", archs=("sm_80", "sm_90")) -> pd.DataFrame:
    """Registers per thread of the decode kernel, block size (rows) x (arch, tile): returns
    (registers, spills), the second True where ptxas reported spill stores or loads."""
    _need(res, ["arch", "kernel", "dtype", "block_size", "head_size", "tile", "addressing",
                "registers", "spill_stores", "spill_loads"], "register_pivot")
    d = res[(res["kernel"] == "decode") & (res["dtype"] == dtype) & (res["head_size"] == head_size)
            & (res["addressing"] == addressing) & (res["arch"].isin(archs))].copy()
    if d.empty:
        raise ValueError(f"no decode kernel for {dtype}, head {head_size}, {addressing}, {archs}")
    d["block_size"] = d["block_size"].astype(int)
    d["tile"] = d["tile"].astype(int)
    d["spills"] = (d["spill_stores"] > 0) | (d["spill_loads"] > 0)
    regs = d.pivot_table(index="block_size", columns=["arch", "tile"], values="registers", aggfunc="max")
    spills = d.pivot_table(index="block_size", columns=["arch", "tile"], values="spills",
                           aggfunc="max").astype(bool)
    return regs, spills


def style_register_pivot(regs: pd.DataFrame, spills: pd.DataFrame | None = None, caption: str | None = None):
    """Registers shaded from few (light) to 255 (dark); spilling kernels boxed in red with '*'."""
    if spills is None:
        spills = pd.DataFrame(False, index=regs.index, columns=regs.columns)
    if spills.shape != regs.shape:
        raise ValueError(f"spills {spills.shape} and registers {regs.shape} differ in shape")
    shown = regs.copy()
    shown.columns = pd.MultiIndex.from_tuples([(a, f"tile {t}") for a, t in regs.columns])
    spills = spills.copy()
    spills.columns = shown.columns
    shown.index.name = "block size"
    text = shown.astype(object).where(~spills, shown.astype(str) + "*")
    outline = "outline: 2px solid #c0392b; outline-offset: -2px;"
    styler = (text.style.background_gradient(cmap="Purples", vmin=32, vmax=300, gmap=shown, axis=None)
              .apply(lambda _: np.where(spills, outline, ""), axis=None))
    return _compact(styler, caption)


def spill_list(res: pd.DataFrame, arch: str = "sm_90") -> pd.DataFrame:
    """Every decode instantiation that spills on `arch`, grouped by (dtype, head size, tile)."""
    _need(res, ["arch", "kernel", "dtype", "block_size", "head_size", "tile", "addressing",
                "registers", "stack_bytes", "spill_stores", "spill_loads"], "spill_list")
    d = res[(res["arch"] == arch) & ((res["spill_stores"] > 0) | (res["spill_loads"] > 0))]
    cols = ["dtype", "head size", "tile", "block sizes", "addressing", "registers",
            "spilled (B), stores / loads"]
    if d.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (dt, hs, tile), g in d.groupby(["dtype", "head_size", "tile"]):
        rows.append({
            "dtype": dt, "head size": int(hs), "tile": int(tile),
            "block sizes": ", ".join(str(int(b)) for b in sorted(g["block_size"].unique())),
            "addressing": ", ".join(a for a in ("paged", "contiguous", "no_offset")
                                    if a in set(g["addressing"])),
            "registers": int(g["registers"].max()),
            "spilled (B), stores / loads": f"{_span(g['spill_stores'])} / {_span(g['spill_loads'])}",
        })
    out = pd.DataFrame(rows, columns=cols)
    order = {dt: i for i, dt in enumerate(DTYPE_ORDER)}
    return out.sort_values(["dtype", "head size", "tile"],
                           key=lambda s: s.map(order) if s.name == "dtype" else s).reset_index(drop=True)


def _span(values) -> str:
    lo, hi = int(values.min()), int(values.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def style_compact(df: pd.DataFrame, caption: str | None = None):
    """Any small table in the chapter's compact style, without the index."""
    return _compact(df.style.hide(axis="index"), caption)


# ----------------------------------------------------------------------------- speed

SPEED_BACKENDS = ("own-auto-paged", "own-auto-contiguous", "own-v1-paged", "own-v2-paged",
                  "vllm", "sdpa_dense", "flex_paged")


def shape_label(batch: int, seq_len: int, heads: int, kv_heads: int) -> str:
    """'32 × 4096, GQA 32:8' (batch × tokens, head layout)."""
    return f"{int(batch)} × {int(seq_len)}, {frame.shape_label(heads, kv_heads, model=False)}"


def _with_shape(d: pd.DataFrame) -> pd.DataFrame:
    d = d.copy()
    d["shape"] = [shape_label(b, n, h, k) for b, n, h, k in
                  zip(d["batch_size"], d["seq_len"], d["num_heads"], d["num_kv_heads"])]
    return d


def speed_table(df: pd.DataFrame, baseline: str = "sdpa_dense") -> pd.DataFrame:
    """Kernel-speed rows with a shape label and each backend's time over the baseline's."""
    _need(df, ["backend", "batch_size", "seq_len", "num_heads", "num_kv_heads", "median_us",
               "pct_of_read_ceiling"], "speed_table")
    d = _with_shape(df)
    base = d[d["backend"] == baseline].set_index("shape")["median_us"]
    if base.empty:
        raise ValueError(f"speed_table: no {baseline} rows to compare with")
    d["over_baseline"] = d["median_us"] / d["shape"].map(base)
    d["order"] = d["batch_size"].astype(int) * d["seq_len"].astype(int) * 1000 + d["num_kv_heads"].astype(int)
    return d.sort_values(["order", "backend"]).drop(columns="order").reset_index(drop=True)


#: Ratio ticks of the speed figure, the most telling first; each is kept only if it sits far
#: enough (on the log axis) from those already kept, so that labels like 1.25x and 1.5x never meet.
RATIO_TICKS = (1, 2, 1.5, 3, 4, 0.8, 1.25, 0.9, 1.1)


def ratio_ticks(lo: float, hi: float, min_share: float = 1 / 6) -> list[float]:
    """Ticks for a log ratio axis from ``lo`` to ``hi``: :data:`RATIO_TICKS` inside the range,
    each at least ``min_share`` of the axis (in log) from every tick already taken; sorted."""
    span = np.log2(hi / lo)
    kept: list[float] = []
    for t in RATIO_TICKS:
        if lo <= t <= hi and all(abs(np.log2(t / k)) >= min_share * span for k in kept):
            kept.append(t)
    return sorted(kept)


def speed_figure(table: pd.DataFrame, baseline: str = "sdpa_dense") -> Figure:
    """Two dot plots per shape: percent of the run's read ceiling, and time over the baseline."""
    _need(table, ["shape", "backend", "pct_of_read_ceiling", "over_baseline"], "speed_figure")
    set_house_style()
    shapes = list(dict.fromkeys(table["shape"]))
    backs = _ordered(table["backend"], SPEED_BACKENDS)
    pal = dict(zip(backs, sns.color_palette("colorblind", len(backs))))
    markers = dict(zip(backs, ["o", "s", "v", "^", "D", "P", "X", "*"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.4, 0.48 * len(shapes) + 1.7), sharey=True,
                                      gridspec_kw={"width_ratios": [1.15, 1]})
    step = 0.6 / max(len(backs) - 1, 1)
    for i, shape in enumerate(shapes):
        for ax in (left, right):
            ax.axhspan(i - 0.42, i + 0.42, color="0.96" if i % 2 else "white", zorder=0)
        for k, b in enumerate(backs):
            row = table[(table["shape"] == shape) & (table["backend"] == b)]
            if row.empty:
                continue
            y = i - 0.3 + k * step
            kw = dict(color=pal[b], marker=markers[b], s=30, zorder=3, edgecolor="white",
                      linewidth=0.4, label=b if i == 0 else None)
            left.scatter(row["pct_of_read_ceiling"], [y] * len(row), **kw)
            right.scatter(row["over_baseline"], [y] * len(row), **kw)
    left.axvline(100, color="0.25", linestyle="--", linewidth=1)
    # two-line axis labels: on one line each, the two ran into each other under the gap
    left.set_xlabel("% of the run's measured\nread ceiling")
    left.set_xlim(0, max(110.0, float(table["pct_of_read_ceiling"].max()) + 5))
    right.axvline(1.0, color="0.25", linestyle="--", linewidth=1)
    right.set_xscale("log", base=2)
    lo = min(0.9, float(table["over_baseline"].min()) * 0.95)
    hi = max(1.4, float(table["over_baseline"].max()) * 1.08)
    right.set_xlim(lo, hi)
    shown = ratio_ticks(lo, hi)
    right.xaxis.set_major_locator(mticker.FixedLocator(shown))
    right.xaxis.set_major_formatter(mticker.FixedFormatter([f"{t:g}×" for t in shown]))
    right.xaxis.set_minor_locator(mticker.NullLocator())
    right.set_xlabel(f"time over {baseline}\n(lower is faster)")
    left.set_yticks(range(len(shapes)))
    left.set_yticklabels(shapes)
    left.set_ylim(len(shapes) - 0.5, -0.5)
    left.grid(axis="y", visible=False)
    right.grid(axis="y", visible=False)
    left.set_ylabel("")
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.55, -0.01),
               ncol=min(len(backs), 3), fontsize=8, handletextpad=0.2, columnspacing=1.2,
               markerscale=1.3)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    plt.close(fig)
    return fig


def style_speed_ratios(table: pd.DataFrame, baseline: str = "sdpa_dense", caption: str | None = None):
    """The baseline's median time (µs), then every other backend's time over it, per shape."""
    _need(table, ["shape", "backend", "median_us", "over_baseline"], "style_speed_ratios")
    backs = [b for b in _ordered(table["backend"], SPEED_BACKENDS) if b != baseline]
    shapes = list(dict.fromkeys(table["shape"]))
    t = table.pivot_table(index="shape", columns="backend", values="median_us").reindex(shapes)
    r = table.pivot_table(index="shape", columns="backend", values="over_baseline").reindex(shapes)
    if baseline not in t.columns:
        raise ValueError(f"style_speed_ratios: no {baseline} rows")
    shown = r[backs].copy()
    shown.insert(0, f"{baseline} (µs)", t[baseline])
    shown.index.name = "batch × tokens, heads"
    shown.columns.name = None
    styler = (shown.style.format("{:.2f}×", subset=backs, na_rep="–")
              .format("{:.1f}", subset=[f"{baseline} (µs)"])
              .background_gradient(cmap="RdYlGn_r", subset=backs, axis=None, vmin=0.7, vmax=1.3)
              .highlight_null(color="white", subset=backs))
    return _compact(styler, caption)


def launch_with_times(launch: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """`anatomy.launch_table` rows beside the measured time of the backend they launch (own-*-paged)."""
    _need(launch, ["batch_size", "seq_len", "num_heads", "num_kv_heads", "asked", "version", "tile",
                   "partition_size", "partitions", "grid_blocks", "blocks_per_sm"], "launch_with_times")
    _need(speed, ["shape", "backend", "median_us", "over_baseline"], "launch_with_times")
    d = _with_shape(launch)
    d["backend"] = d["asked"].map({"1": "own-v1-paged", "2": "own-v2-paged", "auto": "own-auto-paged"})
    t = speed[["shape", "backend", "median_us", "over_baseline"]]
    out = d.merge(t, on=["shape", "backend"], how="left")
    out = out[["shape", "asked", "version", "tile", "partition_size", "partitions", "grid_blocks",
               "blocks_per_sm", "median_us", "over_baseline"]]
    return out.rename(columns={
        "shape": "batch × tokens, heads", "version": "runs", "partition_size": "partition (tokens)",
        "grid_blocks": "thread blocks", "blocks_per_sm": "blocks per SM", "median_us": "time (µs)",
        "over_baseline": "time / SDPA"})


def style_launch_table(table: pd.DataFrame, caption: str | None = None):
    """`launch_with_times` with one row group per shape (the shape label shown once)."""
    _need(table, ["batch × tokens, heads", "asked"], "style_launch_table")
    styler = table.set_index(["batch × tokens, heads", "asked"]).style.format(
        {"blocks per SM": "{:.2f}", "time (µs)": "{:.1f}", "time / SDPA": "{:.2f}"}, na_rep="—")
    group_rule = {"selector": "th.row_heading.level0",
                  "props": [("vertical-align", "top"), ("border-top", "1px solid #bbb")]}
    return _compact(styler, caption, [group_rule])


def plan_cell(plans: pd.DataFrame, shape: str, asked: str, col: str):
    """One cell of `launch_with_times`: the plan of one shape and version asked."""
    return frame.one(plans, col, **{"batch × tokens, heads": shape, "asked": asked})


def speed_targets(speed: pd.DataFrame, blocks: pd.DataFrame | None, gqa: str) -> tuple[pd.DataFrame, dict]:
    """The chapter's speed targets against the measurements: (the table, the numbers the prose
    glues). ``blocks`` is the page-table chapter's block-size frame, None where not measured."""
    from lib.chapters.page_table import analysis as PT

    t = speed.pivot_table(index="shape", columns="backend", values="median_us")
    mha = [sh for sh in t.index if "GQA" not in sh]
    own_sdpa, own_vllm = t["own-auto-paged"] / t["sdpa_dense"], t["own-auto-paged"] / t["vllm"]
    own_contig = t["own-auto-paged"] / t["own-auto-contiguous"]
    pc_text, pc_max, pc_mha = "not measured", float("nan"), float("nan")
    if blocks is not None:
        b16 = blocks[blocks["block_size"] >= 16]
        pc = b16[PT.PAGED] / b16[PT.CONTIGUOUS]
        worst = b16.loc[pc.idxmax()]
        pc_max = float(pc.max())
        pc_mha = float(pc[b16["shape"] == PT.SHAPE_PARAM["llama"]].max())
        pc_text = (f"{pc_max:.3f} (worst: {worst['shape']}, batch {int(worst['batch_size'])}, "
                   f"block {int(worst['block_size'])})")
    rows = [("own paged within 10% of SDPA dense, every MHA shape", f"{own_sdpa[mha].max():.3f} (worst)",
             own_sdpa[mha].max() <= 1.10),
            ("own paged faster than vLLM's kernel, every shape", f"{own_vllm.max():.3f} (worst)", own_vllm.max() < 1.0),
            ("own paged within 5% of own contiguous, block 16 (this run)", f"{own_contig.max():.3f} (worst)",
             own_contig.max() <= 1.05),
            ("own paged within 5% of own contiguous, blocks 16-256", pc_text, pc_max <= 1.05),
            ("GQA 32:8 within 15% of SDPA dense", f"{own_sdpa[gqa]:.3f}", own_sdpa[gqa] <= 1.15)]
    table = pd.DataFrame([{"target": a, "measured": b, "met": "yes" if met else "no"} for a, b, met in rows])
    return table, {"tg_gqa": float(own_sdpa[gqa]), "tg_pc_max": pc_max, "tg_pc_mha_max": pc_mha}
