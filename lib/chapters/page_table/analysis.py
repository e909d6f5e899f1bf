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
    """The checked ok rows, tagged with ``shape`` and ``subgrid`` (``grid``, ``blocks`` or
    ``flashinfer``)."""
    rows = frame.with_shape(frame.load_checked(EXPERIMENT, gpu, root=root))
    rows["subgrid"] = [subgrid_of(key) for key in rows["point_key"]]
    return rows


def subgrid_of(point_key: str) -> str:
    """Which of the experiment's sub-grids a point belongs to, read from its backends."""
    if NO_OFFSET in point_key:
        return "blocks"
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
