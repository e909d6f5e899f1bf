"""The kernel chapter's section on vLLM's FlashAttention 3 (the ``vllm-fa3`` backend): its speed at
kernel_speed's shapes beside FlashInfer, dense SDPA and our own-auto, all timed in one process on
the same points (the experiment's FA3 sub-grid), and its correctness-matrix checks."""

from __future__ import annotations

import pandas as pd

from lib.book.plots import require_columns

FA3 = "vllm-fa3"
#: the backends of the FA3 sub-grid, in reading order
COLUMNS = (FA3, "flashinfer", "sdpa_dense", "own-auto-paged")


def fa3_points(speed: pd.DataFrame) -> pd.DataFrame:
    """The rows of the kernel_speed points that timed FA3 (its own sub-grid)."""
    require_columns(speed, ["point_key", "backend"], "fa3_points")
    keys = set(speed.loc[speed["backend"] == FA3, "point_key"])
    return speed[speed["point_key"].isin(keys)]


def speed_table(speed: pd.DataFrame) -> pd.DataFrame:
    """Per shape (one run's FA3 points): each backend's median µs, FA3 over SDPA and over
    FlashInfer, and FA3's % of the run's read ceiling. ValueError on rows of several runs."""
    require_columns(speed, ["backend", "run_id", "batch_size", "seq_len", "num_heads", "num_kv_heads",
                            "median_us", "pct_of_read_ceiling"], "fa3.speed_table")
    d = fa3_points(speed)
    if d.empty:
        raise ValueError("fa3.speed_table: no vllm-fa3 rows")
    if d["run_id"].nunique() != 1:
        raise ValueError(f"fa3.speed_table: rows of {d['run_id'].nunique()} runs; pass one run's")
    d = d.assign(shape=[f"{int(b)} × {int(n)}, {int(h)}:{int(k)}" for b, n, h, k in
                        zip(d["batch_size"], d["seq_len"], d["num_heads"], d["num_kv_heads"])],
                 order=list(zip(d["num_heads"] // d["num_kv_heads"], d["num_heads"],
                                d["batch_size"] * d["seq_len"], d["seq_len"])))
    if d.duplicated(["shape", "backend"]).any():
        raise ValueError("fa3.speed_table: a backend timed twice at one shape in one run")
    t = d.pivot(index=["order", "shape"], columns="backend", values="median_us")
    out = t[[c for c in COLUMNS if c in t.columns]].copy()
    for peer, name in (("sdpa_dense", "FA3 / SDPA"), ("flashinfer", "FA3 / FlashInfer"),
                       ("own-auto-paged", "FA3 / own-auto")):
        if peer in t.columns:
            out[name] = t[FA3] / t[peer]
    out["FA3 % of ceiling"] = d[d["backend"] == FA3].set_index(["order", "shape"])["pct_of_read_ceiling"]
    return out.sort_index().reset_index(level="order", drop=True)


def claims(table: pd.DataFrame) -> dict[str, float | int | str]:
    """The numbers the prose quotes, read from :func:`speed_table`'s result."""
    out: dict[str, float | int | str] = {"n": len(table)}
    for col, key in (("FA3 / SDPA", "sdpa"), ("FA3 / FlashInfer", "fi"), ("FA3 / own-auto", "own")):
        if col in table:
            out[f"{key}_lo"], out[f"{key}_hi"] = float(table[col].min()), float(table[col].max())
            out[f"{key}_median"] = float(table[col].median())
            out[f"{key}_hi_shape"] = str(table[col].idxmax())
    out["faster_than_fi"] = int((table["FA3 / FlashInfer"] < 1).sum()) if "FA3 / FlashInfer" in table else 0
    out["pct_max"] = float(table["FA3 % of ceiling"].max())
    out["pct_max_shape"] = str(table["FA3 % of ceiling"].idxmax())
    return out
