"""The price of the page table: frames of the `page_table` experiment for its chapter.

Two grids (lib/harness/experiments.py): at block 16, batch 1-256 x 512-32768 tokens with our kernel
paged and contiguous on identity placement (the same bytes, only the addressing differs), paged
on shuffled placement, vLLM's kernel and dense SDPA; and at 1024 tokens, block sizes 1-256 x
batch 1-128 with the ``no_offset`` floor (every K/V read goes to block 0, so DRAM traffic mostly
disappears and what is left is the kernel's arithmetic, its L2 traffic and its fixed costs).
"""

from __future__ import annotations

import pandas as pd

from lib.harness import results as R
from lib.chapters.uvm_decode.analysis import shape_name

EXPERIMENT = "page_table"
PAGED, CONTIGUOUS, NO_OFFSET = "own-auto-paged", "own-auto-contiguous", "own-auto-no_offset"
SHAPE_PARAM = {"llama": "Llama-like (32 heads)", "seed": "seed (64 q / 8 kv heads)"}
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
    """The ok rows, tagged with ``shape`` and ``subgrid`` (``grid`` or ``blocks``); all checked."""
    rows = R.load(EXPERIMENT, gpu, root=root)
    bad = rows[~rows["check_passed"].astype(bool)]
    if len(bad):
        raise ValueError(f"{len(bad)} page_table rows failed their correctness check")
    rows = rows.copy()
    rows["shape"] = [shape_name(h, k) for h, k in zip(rows["num_heads"], rows["num_kv_heads"])]
    rows["subgrid"] = ["blocks" if NO_OFFSET in key else "grid" for key in rows["point_key"]]
    return rows


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
