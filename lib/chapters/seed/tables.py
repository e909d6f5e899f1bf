"""The seed blog post's six tables: load, validate, and the ratios the book discusses.

The post (2024-03-25, "Profile VLLM Performance") timed vLLM's paged-attention kernel by KV-cache
block size in six small tables; `data/seed/seed_tables.csv` holds one row per table cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from lib import DATA

SEED_CSV = DATA / "seed" / "seed_tables.csv"

#: The seed table's columns and the dtype kind each must have ("i" integer, "f" float, "O" text).
COLUMNS: dict[str, str] = {"table": "i", "table_title": "O", "variant": "O", "memory": "O", "block_size": "i",
                           "seq_len": "i", "batch_size": "i", "time_us": "f", "source_column": "O"}

#: The post has exactly this many numbers (its tables hold 51 filled cells).
N_ROWS = 51
TABLE_IDS = (1, 2, 3, 4, 5, 6)
VARIANTS = ("original", "no_lookup", "no_offset")
MEMORY_KINDS = ("managed", "device")
BLOCK_SIZES = (1, 2, 4, 8, 16, 32)

#: The configuration key that identifies one measurement besides its table.
POINT = ["block_size", "seq_len", "batch_size"]


def validate_seed(df: pd.DataFrame) -> pd.DataFrame:
    """Check the seed table's schema and contents; return it unchanged or raise ValueError (every later
    comparison relies on these facts: a silently edited CSV would change the book's conclusions)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"seed table lacks columns {missing}; expected {list(COLUMNS)}")
    for col, kind in COLUMNS.items():
        actual = df[col].dtype.kind
        ok = actual == kind or (kind == "O" and pd.api.types.is_string_dtype(df[col]))
        if not ok:
            raise ValueError(f"seed column {col!r} has dtype {df[col].dtype}, expected kind {kind!r}")
    if len(df) != N_ROWS:
        raise ValueError(f"seed table has {len(df)} rows, expected {N_ROWS}")
    if df.isna().any().any():
        bad = df.columns[df.isna().any()].tolist()
        raise ValueError(f"seed table has empty cells in columns {bad}")
    tables = sorted(df["table"].unique().tolist())
    if tables != list(TABLE_IDS):
        raise ValueError(f"seed table ids are {tables}, expected {list(TABLE_IDS)}")
    for col, allowed in (("variant", VARIANTS), ("memory", MEMORY_KINDS), ("block_size", BLOCK_SIZES)):
        extra = sorted(set(df[col]) - set(allowed))
        if extra:
            raise ValueError(f"seed column {col!r} has unexpected values {extra}; allowed {list(allowed)}")
    if not (df["time_us"] > 0).all():
        raise ValueError("seed times must all be positive microseconds")
    if (df[["seq_len", "batch_size"]] <= 0).any().any():
        raise ValueError("seed seq_len and batch_size must be positive")
    dup = df.duplicated(["table", "memory", *POINT])
    if dup.any():
        raise ValueError(f"seed table has {int(dup.sum())} duplicated cells (same table, memory, point)")
    per_table = df.groupby("table")[["table_title", "variant"]].nunique()
    if (per_table > 1).any().any():
        raise ValueError("each seed table must have one title and one variant")
    return df


def load_seed(path: str | Path | None = None) -> pd.DataFrame:
    """Read and validate the tidy seed table (default: the committed `data/seed/seed_tables.csv`)."""
    path = Path(path) if path is not None else SEED_CSV
    if not path.is_file():
        raise ValueError(f"no seed table at {path}")
    return validate_seed(pd.read_csv(path))


def parse_tables(tables: str | int | Iterable[int]) -> list[int]:
    """Turn a chapter parameter like "1,2,3" (or 4, or [1, 5]) into sorted, checked table ids."""
    if isinstance(tables, str):
        parts = [p.strip() for p in tables.split(",") if p.strip()]
        try:
            ids = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"tables must be comma-separated integers, got {tables!r}") from None
    elif isinstance(tables, int):
        ids = [tables]
    else:
        ids = [int(t) for t in tables]
    if not ids:
        raise ValueError("choose at least one seed table (1-6)")
    unknown = sorted(set(ids) - set(TABLE_IDS))
    if unknown:
        raise ValueError(f"unknown seed tables {unknown}; the post has tables {list(TABLE_IDS)}")
    return sorted(set(ids))


def select_tables(df: pd.DataFrame, tables: str | int | Iterable[int]) -> pd.DataFrame:
    """Rows of the chosen tables only (the seed chapter's `tables` parameter)."""
    return df[df["table"].isin(parse_tables(tables))].reset_index(drop=True)


def series_label(df: pd.DataFrame) -> pd.Series:
    """A short legend label per row: memory kind plus the (seq_len, batch) the row measured."""
    return df["memory"] + ", seq " + df["seq_len"].astype(str) + " × batch " + df["batch_size"].astype(str)


def wide_table(df: pd.DataFrame) -> pd.DataFrame:
    """The seed as the post laid it out: one row per table and series, block sizes as columns
    (cells the post left empty are NaN)."""
    wide = df.pivot_table(index=["table", "variant", "memory", "seq_len", "batch_size"], columns="block_size",
                          values="time_us", aggfunc="first")
    wide = wide.reindex(columns=sorted(wide.columns))
    # The post's order: "uvm" before "normal", the longer context and bigger batch first.
    wide = wide.sort_index(ascending=[True, True, False, False, False])
    wide.columns.name = "block size"
    wide.index.names = ["table", "variant", "memory", "seq len", "batch"]
    return wide


def ratio(df: pd.DataFrame, num_table: int, den_table: int, *, num_memory: str = "device",
          den_memory: str = "device") -> pd.DataFrame:
    """Time of `num_table` over time of `den_table`, one row per point both measured (`POINT`)."""
    for t in (num_table, den_table):
        if t not in TABLE_IDS:
            raise ValueError(f"unknown seed table {t}")
    num = df[(df["table"] == num_table) & (df["memory"] == num_memory)]
    den = df[(df["table"] == den_table) & (df["memory"] == den_memory)]
    if num.empty or den.empty:
        raise ValueError(f"no rows for table {num_table} ({num_memory}) or table {den_table} ({den_memory})")
    out = num[POINT + ["time_us"]].merge(den[POINT + ["time_us"]], on=POINT, suffixes=("_num", "_den"),
                                         validate="one_to_one")
    out = out.rename(columns={"time_us_num": "num_us", "time_us_den": "den_us"})
    out["ratio"] = out["num_us"] / out["den_us"]
    what = (f"{num_memory} / {den_memory}" if num_table == den_table
            else f"table {num_table} / table {den_table}")
    out["comparison"] = [f"{what}, seq {s} × batch {b}" for s, b in zip(out["seq_len"], out["batch_size"])]
    return out.sort_values(POINT).reset_index(drop=True)


def managed_over_device(df: pd.DataFrame) -> pd.DataFrame:
    """Table 1: the post's "uvm" (cudaMallocManaged) time over its "normal" (cudaMalloc) time."""
    return ratio(df, 1, 1, num_memory="managed", den_memory="device")


def no_lookup_over_original(df: pd.DataFrame) -> pd.DataFrame:
    """"Without page table lookup" over original vLLM: tables 2/3 (batch 1) and 4/5 (batch 16).

    Table 4's batch-32 column has no baseline (table 5's is empty), so it is not in the result.
    """
    return pd.concat([ratio(df, 2, 3), ratio(df, 4, 5)], ignore_index=True)


def no_offset_over_original(df: pd.DataFrame) -> pd.DataFrame:
    """"No offset" (table 6) over original vLLM (table 5), both at seq 1024 × batch 16."""
    return ratio(df, 6, 5)


def repeat_agreement(df: pd.DataFrame) -> pd.DataFrame:
    """Table 3 over table 1 (device): the same kernel and point timed twice in the post, so their
    spread is the post's run-to-run noise, the yardstick any ablation effect has to beat."""
    return ratio(df, 3, 1)


def _one_series(df, table, memory, seq_len, batch_size) -> pd.DataFrame:
    """The rows of one series (one seq_len x batch column) of a seed table, or a clear error."""
    rows = df[(df["table"] == table) & (df["memory"] == memory)]
    if seq_len is not None:
        rows = rows[rows["seq_len"] == seq_len]
    if batch_size is not None:
        rows = rows[rows["batch_size"] == batch_size]
    if rows.empty:
        raise ValueError(f"no rows for table {table} ({memory}, seq {seq_len}, batch {batch_size})")
    if len(rows[["seq_len", "batch_size"]].drop_duplicates()) != 1:
        raise ValueError(f"table {table} has several series: pass seq_len and batch_size")
    return rows


def slowest_over_fastest(df: pd.DataFrame, table: int, *, memory: str = "device", seq_len: int | None = None,
                         batch_size: int | None = None) -> float:
    """Within one table's series, how much slower the slowest block size is than the fastest (a table
    with several seq_len x batch series needs `seq_len` and `batch_size`)."""
    rows = _one_series(df, table, memory, seq_len, batch_size)
    return float(rows["time_us"].max() / rows["time_us"].min())


def slowest_block(df: pd.DataFrame, table: int, *, memory: str = "device", seq_len: int | None = None,
                  batch_size: int | None = None) -> int:
    """The block size at which one series of a table is slowest (selected as in `slowest_over_fastest`)."""
    rows = _one_series(df, table, memory, seq_len, batch_size)
    return int(rows.loc[rows["time_us"].idxmax(), "block_size"])


#: vLLM's kernel micro-benchmark (benchmarks/kernels/benchmark_paged_attention.py) as of the
#: seed's date: its defaults and fixed constants. The seed most likely used it (see NOTES), with
#: some flags changed; the chapter quotes these values from here, never by hand.
LIKELY_METHOD: dict[str, int | str] = {
    "version": 2,             # --version (choices 1, 2)
    "batch_size": 8,          # --batch-size
    "context_len": 4096,      # --context-len
    "num_query_heads": 64,    # --num-query-heads
    "num_kv_heads": 8,        # --num-kv-heads
    "head_size": 128,         # --head-size
    "block_size": 16,         # --block-size (choices 16, 32 only)
    "dtype": "half",          # --dtype
    "dtype_bytes": 2,
    "num_blocks": 1024,       # NUM_BLOCKS: physical blocks allocated, whatever the context
    "warmup_launches": 3,
    "timed_launches": 100,    # timed back to back with time.perf_counter, one sync at the end
}


def likely_cache_bytes(block_size: int, *, num_blocks: int | None = None, num_kv_heads: int | None = None,
                       head_size: int | None = None, dtype_bytes: int | None = None) -> int:
    """Bytes of K plus V in the cache vLLM's benchmark script most likely allocated (unset arguments:
    `LIKELY_METHOD`). It is `num_blocks * block_size` tokens however long the context is, which is
    why small block sizes give a cache that fits in a GPU's L2."""
    m = LIKELY_METHOD
    values = {
        "block_size": block_size,
        "num_blocks": m["num_blocks"] if num_blocks is None else num_blocks,
        "num_kv_heads": m["num_kv_heads"] if num_kv_heads is None else num_kv_heads,
        "head_size": m["head_size"] if head_size is None else head_size,
        "dtype_bytes": m["dtype_bytes"] if dtype_bytes is None else dtype_bytes,
    }
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return (2 * values["num_blocks"] * values["block_size"] * values["num_kv_heads"]
            * values["head_size"] * values["dtype_bytes"])


def likely_cache_table(block_sizes: Iterable[int] = BLOCK_SIZES,
                       context_len: int | None = None) -> pd.DataFrame:
    """Per block size: the likely cache's size and how often each physical block is reused (a
    sequence needs `context_len / block_size` logical blocks drawn from `num_blocks` physical ones)."""
    m = LIKELY_METHOD
    ctx = int(m["context_len"] if context_len is None else context_len)
    if ctx <= 0:
        raise ValueError(f"context_len must be positive, got {ctx}")
    rows = []
    for b in block_sizes:
        nbytes = likely_cache_bytes(int(b))
        logical = -(-ctx // int(b))
        rows.append({"block_size": int(b), "cache_tokens": int(m["num_blocks"]) * int(b),
                     "cache_MiB": nbytes / 2**20, "logical_blocks_per_seq": logical,
                     "logical_per_physical": logical / int(m["num_blocks"])})
    return pd.DataFrame(rows)
