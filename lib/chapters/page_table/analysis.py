"""The `page_table` rows (both grids: lib/chapters/page_table/experiment.py) as its chapter's
frames; the ``no_offset`` floor reads every K/V from block 0, so what is left of its time is
arithmetic, L2 traffic and fixed costs."""

from __future__ import annotations

import pandas as pd

from lib.book import frame

EXPERIMENT = "page_table"
PAGED, CONTIGUOUS, NO_OFFSET = "own-auto-paged", "own-auto-contiguous", "own-auto-no_offset"
#: The chapter's ``shape`` parameter -> the label of its head layout.
SHAPE_PARAM = {"llama": frame.shape_label(32, 32), "seed": frame.shape_label(64, 8)}
#: (name, numerator (backend, placement), denominator (backend, placement)), all on one grid point
GRID_RATIOS = [
    ("paged / contiguous", (PAGED, "identity"), (CONTIGUOUS, "identity")),
    ("shuffled / identity", (PAGED, "shuffled"), (PAGED, "identity")),
    ("vLLM / ours", ("vllm", "identity"), (PAGED, "identity")),
    ("SDPA dense / ours", ("sdpa_dense", "identity"), (PAGED, "identity")),
]


def shape_of(param: str) -> str:
    try:
        return SHAPE_PARAM[param]
    except KeyError:
        raise ValueError(f"shape must be one of {sorted(SHAPE_PARAM)}, got {param!r}") from None


def load(gpu=None, root=None) -> pd.DataFrame:
    """The checked ok rows, tagged with ``shape`` and ``subgrid`` (``grid``, ``blocks``,
    ``flashinfer`` or ``fa3``)."""
    rows = frame.with_shape(frame.load_checked(EXPERIMENT, gpu, root=root))
    rows["subgrid"] = [subgrid_of(key) for key in rows["point_key"]]
    return rows


def subgrid_of(point_key: str) -> str:
    """Which of the experiment's sub-grids a point belongs to, read from its backends."""
    if NO_OFFSET in point_key:
        return "blocks"
    if "vllm-fa3" in point_key:
        return "fa3"
    return "flashinfer" if "flashinfer" in point_key else "grid"


def errors(gpu, root=None) -> pd.DataFrame:
    """The rows that did not run (status not ok), for the chapter to list."""
    rows = frame.load_checked(EXPERIMENT, gpu, root=root, include_errors=True)
    return rows[rows["status"] != "ok"]


def grid_ratios(rows: pd.DataFrame) -> pd.DataFrame:
    """Per grid point (block 16): the four ratios of :data:`GRID_RATIOS` (tidy, one per row)."""
    g = rows[rows["subgrid"] == "grid"]
    t = g.pivot_table(index=["gpu_slug", "shape", "seq_len", "batch_size"],
                      columns=["backend", "placement"], values="median_us", aggfunc="first")
    out = []
    for name, num, den in GRID_RATIOS:
        if num in t.columns and den in t.columns:
            r = (t[num] / t[den]).dropna().rename("ratio").reset_index()
            r["ratio_name"] = name
            out.append(r)
    if not out:
        raise ValueError("no grid point has the backends a ratio needs")
    return pd.concat(out, ignore_index=True)


def ratio_summary(ratios: pd.DataFrame) -> pd.DataFrame:
    """min / median / max of each ratio per card and shape."""
    return (ratios.groupby(["gpu_slug", "shape", "ratio_name"])["ratio"]
            .agg(points="size", min="min", median="median", max="max").reset_index())


def block_sizes(rows: pd.DataFrame) -> pd.DataFrame:
    """The block-size grid, one row per (card, shape, batch, block): times and the floor's share.

    ``traffic_share`` = 1 - no_offset / paged: the share of the paged kernel's time that goes
    away when its reads stop reaching DRAM (an upper bound on what memory traffic costs it).
    ``lookup_share`` = 1 - contiguous / paged: the share the block-table reads cost.
    """
    b = rows[rows["subgrid"] == "blocks"]
    t = b.pivot_table(index=["gpu_slug", "shape", "seq_len", "batch_size", "block_size"],
                      columns="backend", values="median_us", aggfunc="first")
    need = [PAGED, CONTIGUOUS, NO_OFFSET]
    missing = [c for c in need if c not in t.columns]
    if missing:
        raise ValueError(f"block-size grid lacks backends {missing}")
    t = t.reset_index()
    t.columns.name = None
    t["traffic_share"] = 1 - t[NO_OFFSET] / t[PAGED]
    t["lookup_share"] = 1 - t[CONTIGUOUS] / t[PAGED]
    if "vllm" in t.columns:
        t["vllm_vs_ours"] = t["vllm"] / t[PAGED]
    return t


def small_block_penalty(blocks: pd.DataFrame, backend: str, *, small: int = 1, reference: int = 16) -> pd.DataFrame:
    """time(block = small) / time(block = reference) per card, shape and batch."""
    if backend not in blocks.columns:
        raise ValueError(f"no column {backend!r} in the block-size frame")
    idx = ["gpu_slug", "shape", "seq_len", "batch_size"]
    s = blocks[blocks["block_size"] == small].set_index(idx)[backend]
    r = blocks[blocks["block_size"] == reference].set_index(idx)[backend]
    return (s / r).rename("penalty").reset_index()


def roofline(rows: pd.DataFrame) -> pd.DataFrame:
    """Identity-placement grid rows with the percent of the read ceiling they reached."""
    g = rows[(rows["subgrid"] == "grid") & (rows["placement"] == "identity")]
    cols = ["gpu_slug", "shape", "seq_len", "batch_size", "backend", "median_us", "bytes_moved",
            "bandwidth_gbps", "pct_of_read_ceiling", "read_ceiling_gbps"]
    return g[cols].reset_index(drop=True)


# --- two cards, two runs, and FlashInfer (issue 16 item 2, issue 13 item 4) -------------------

def card_key(slug: str) -> str:
    """The suffix of a card's glued names: ``h100`` / ``h200`` for the book's cards, else the slug
    with every non-alphanumeric character as ``_`` (glue names are identifiers)."""
    label = frame.card_label(slug).lower()
    return "".join(ch if ch.isalnum() else "_" for ch in label)


def load_runs(root=None) -> pd.DataFrame:
    """Every run's checked ok rows (not only the newest per point), tagged with ``shape``,
    ``subgrid`` and ``card_id`` (the physical card): what a between-run spread needs."""
    rows = frame.with_shape(frame.load_checked(EXPERIMENT, None, root=root, dedupe=False))
    rows["subgrid"] = [subgrid_of(key) for key in rows["point_key"]]
    return frame.with_physical_card(rows, EXPERIMENT, root=root)


def run_ratios(runs: pd.DataFrame) -> pd.DataFrame:
    """:func:`grid_ratios` of each run separately, with its ``run_id`` and ``card_id``."""
    out = []
    for (run, card_id), g in runs.groupby(["run_id", "card_id"], sort=True):
        if (g["subgrid"] == "grid").any():
            try:
                r = grid_ratios(g)
            except ValueError:
                continue
            out.append(r.assign(run_id=run, card_id=card_id))
    if not out:
        raise ValueError("no run has grid points with the backends a ratio needs")
    return pd.concat(out, ignore_index=True)


def between_runs(rr: pd.DataFrame) -> pd.DataFrame:
    """Per card, shape and ratio measured by two runs or more on the same points: how far the
    runs' ratios lie apart (max / min - 1 at each point; median and largest over the points)
    and how many points each run and all runs together find below 1. A difference between runs
    is the noise a between-card difference must beat."""
    out = []
    for (slug, shape, name), g in rr.groupby(["gpu_slug", "shape", "ratio_name"]):
        w = g.pivot_table(index=["seq_len", "batch_size"], columns="run_id", values="ratio").dropna()
        if w.shape[1] < 2 or w.empty:
            continue
        gap = w.max(axis=1) / w.min(axis=1) - 1
        out.append({"gpu_slug": slug, "shape": shape, "ratio_name": name, "runs": w.shape[1],
                    "cards": g["card_id"].nunique(), "points": len(w),
                    "gap_median": float(gap.median()), "gap_max": float(gap.max()),
                    "below1_each": "/".join(str(int((w[c] < 1).sum())) for c in w.columns),
                    "below1_all": int((w < 1).all(axis=1).sum())})
    return pd.DataFrame(out, columns=["gpu_slug", "shape", "ratio_name", "runs", "cards", "points",
                                      "gap_median", "gap_max", "below1_each", "below1_all"])


def within_run_spread(rows: pd.DataFrame, backends=(PAGED, CONTIGUOUS)) -> pd.DataFrame:
    """Median over points of a row's own p10-p90 width, relative to its median, per card, shape
    and backend: the noise inside one measurement, beside :func:`between_runs`."""
    d = rows[rows["backend"].isin(backends)]
    w = (d["p90_us"] - d["p10_us"]) / d["median_us"]
    return (d.assign(width=w).groupby(["gpu_slug", "shape", "backend"])["width"].median()
            .rename("p10_p90").reset_index())


def count_below(ratios: pd.DataFrame, name: str, *, margin: float = 0.0) -> pd.Series:
    """Points per (card, shape) where ratio ``name`` is below ``1 - margin`` (margin 0: any)."""
    r = ratios[ratios["ratio_name"] == name]
    return (r["ratio"] < 1 - margin).groupby([r["gpu_slug"], r["shape"]]).sum().astype(int)


#: (name, numerator (backend, placement), denominator (backend, placement)) on the FlashInfer
#: sub-grid. SDPA reads a dense cache, so its shuffled row is a second measurement of the very
#: same call: its ratio to the identity row is the run's noise, the floor the others must beat.
FLASHINFER_RATIOS = [
    ("FlashInfer / SDPA", ("flashinfer", "identity"), ("sdpa_dense", "identity")),
    ("FlashInfer shuffled / identity", ("flashinfer", "shuffled"), ("flashinfer", "identity")),
    ("ours / SDPA", (PAGED, "identity"), ("sdpa_dense", "identity")),
    ("ours shuffled / identity", (PAGED, "shuffled"), (PAGED, "identity")),
    ("SDPA repeat / SDPA", ("sdpa_dense", "shuffled"), ("sdpa_dense", "identity")),
]


#: the same on the FA3 sub-grid (block sizes 16-256), FlashInfer and SDPA re-measured beside it
FA3_RATIOS = [
    ("FA3 / SDPA", ("vllm-fa3", "identity"), ("sdpa_dense", "identity")),
    ("FA3 shuffled / identity", ("vllm-fa3", "shuffled"), ("vllm-fa3", "identity")),
    ("FA3 / FlashInfer", ("vllm-fa3", "identity"), ("flashinfer", "identity")),
    ("FlashInfer / SDPA", ("flashinfer", "identity"), ("sdpa_dense", "identity")),
    ("SDPA repeat / SDPA", ("sdpa_dense", "shuffled"), ("sdpa_dense", "identity")),
]


#: each peer sub-grid's ratios
PEER_RATIOS = {"flashinfer": FLASHINFER_RATIOS, "fa3": FA3_RATIOS}


def flashinfer_ratios(rows: pd.DataFrame, *, subgrid: str = "flashinfer") -> pd.DataFrame:
    """Per point of a peer's sub-grid (card, shape, batch, block): the ratios of
    :data:`PEER_RATIOS` for that sub-grid (FlashInfer's by default, or ``"fa3"``), tidy; empty
    (with its columns) where a card has no such rows."""
    ratios = PEER_RATIOS[subgrid]
    cols = ["gpu_slug", "shape", "seq_len", "batch_size", "block_size", "ratio_name", "ratio"]
    f = rows[rows["subgrid"] == subgrid]
    if f.empty:
        return pd.DataFrame(columns=cols)
    t = f.pivot_table(index=cols[:5], columns=["backend", "placement"], values="median_us", aggfunc="first")
    out = []
    for name, num, den in ratios:
        if num in t.columns and den in t.columns:
            r = (t[num] / t[den]).dropna().rename("ratio").reset_index()
            out.append(r.assign(ratio_name=name))
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def flashinfer_summary(fr: pd.DataFrame) -> pd.DataFrame:
    """min / median / max of each FlashInfer-sub-grid ratio per card and shape, over blocks and
    batches."""
    return (fr.groupby(["gpu_slug", "shape", "ratio_name"])["ratio"]
            .agg(points="size", min="min", median="median", max="max").reset_index())


def summary_wide(summary: pd.DataFrame, subgrid: str = "flashinfer") -> pd.DataFrame:
    """:func:`flashinfer_summary` of one card as the chapter's table: a row per ratio (in
    :data:`PEER_RATIOS` order), min / median / max under each shape."""
    t = summary.pivot_table(index="ratio_name", columns="shape", values=["min", "median", "max"])
    t = t.reorder_levels([1, 0], axis=1).sort_index(axis=1, level=0, sort_remaining=False)
    t = t[[(shp, w) for shp in SHAPE_PARAM.values() for w in ("min", "median", "max")]]
    t = t.loc[[n for n, *_ in PEER_RATIOS[subgrid]]]
    t.index.name, t.columns.names = "ratio", ["shape", ""]
    return t


def ceiling_check(rows: pd.DataFrame, datasheet_gbps: float) -> dict:
    """The largest percent of the measured read ceiling and the largest bandwidth against the
    datasheet's peak, over every row that reads its cache (``no_offset`` reads block 0 from L2,
    so its "bandwidth" is not DRAM's). The measured ceiling is one copy kernel's speed, so a
    kernel may pass it by its noise; passing the datasheet peak would be a bug in the byte
    count or the timing: refused."""
    d = rows[(rows["backend"] != NO_OFFSET) & rows["bandwidth_gbps"].notna()]
    if d.empty:
        raise ValueError("no rows with a bandwidth")
    peak = float(d["bandwidth_gbps"].max())
    if datasheet_gbps and peak > datasheet_gbps:
        worst = d.loc[d["bandwidth_gbps"].idxmax(), [c for c in ("backend", "point_key") if c in d.columns]].to_dict()
        raise ValueError(f"{peak:.0f} GB/s is above the datasheet's {datasheet_gbps:.0f} GB/s: {worst}")
    return {"max_pct": float(d["pct_of_read_ceiling"].max()),
            "max_of_datasheet": peak / datasheet_gbps if datasheet_gbps else float("nan")}


def block_flatness(rows: pd.DataFrame, backends=("flashinfer", "sdpa_dense"), *,
                   subgrid: str = "flashinfer") -> pd.DataFrame:
    """A peer's sub-grid (FlashInfer's, or ``subgrid="fa3"``): per card, shape, placement, batch
    and backend, how much the time moves over the block sizes (max / min - 1). SDPA never sees a
    block size, so its value is the run's noise over the same measurements."""
    f = rows[(rows["subgrid"] == subgrid) & rows["backend"].isin(backends)]
    g = f.groupby(["gpu_slug", "shape", "placement", "batch_size", "backend"])["median_us"]
    return (g.max() / g.min() - 1).rename("spread").reset_index()


def value_or_nan(df: pd.DataFrame, col: str, **where) -> float:
    """The single value of ``col`` where every ``column=value`` holds, NaN where no row does (a
    card without that sub-grid: the chapter glues every card's names either way); several
    matching rows are an error, as in :func:`lib.book.frame.one`."""
    if df.empty or col not in df.columns or any(k not in df.columns for k in where):
        return float("nan")
    mask = pd.Series(True, index=df.index)
    for k, v in where.items():
        mask &= df[k] == v
    if mask.sum() == 0:
        return float("nan")
    return float(frame.one(df, col, **where))


#: Cards whose committed page_table rows predate v3 (commit 7b8e773): the H100's run of
#: 2026-11-28 ran tree 15ef247 (data/results/RUNS.md), where ``own-auto`` was v1/v2 everywhere.
def auto_kernels(rows: pd.DataFrame) -> pd.DataFrame:
    """Which of our kernels ``own-auto`` ran, per card and shape, read from each row's launch plan
    (``extra.plan``): the H100 runs predate v3, so a card-to-card ratio of ``ours`` at a GQA shape
    is a kernel-to-kernel one."""
    auto = rows[rows["backend"] == PAGED]
    return (auto.groupby(["gpu_slug", "shape"])
            .apply(lambda g: frame.kernels_used(g, PAGED), include_groups=False)
            .rename("kernel").reset_index())


def card_time_ratio(rows: pd.DataFrame, new: str, old: str, *, min_bytes: int = 2**30) -> pd.DataFrame:
    """time on ``new`` / time on ``old`` per shape and backend, median over the identity-placement
    grid points both cards ran that read at least ``min_bytes``: a memory-bound kernel should
    move by the ratio of the cards' read ceilings, a compute-bound one not at all (same chip,
    same clocks)."""
    g = rows[(rows["subgrid"] == "grid") & (rows["placement"] == "identity") & (rows["bytes_moved"] >= min_bytes)]
    t = g.pivot_table(index=["shape", "seq_len", "batch_size", "backend"], columns="gpu_slug",
                      values="median_us", aggfunc="first")
    if new not in t.columns or old not in t.columns:
        return pd.DataFrame(columns=["shape", "backend", "points", "ratio"])
    r = (t[new] / t[old]).dropna().rename("ratio").reset_index()
    return r.groupby(["shape", "backend"])["ratio"].agg(points="size", ratio="median").reset_index()
