"""vLLM's own 2024 kernels beside the post and our re-implementation (seed_tables' vLLM 2024
sub-grid, :data:`lib.chapters.seed_repro.experiment.VLLM2024_BACKENDS`).

Every point of that sub-grid timed vLLM 0.3.3's ``paged_attention_v1/v2`` (built from its release
source) and our v1/v2 (paged) in one process, in every arm of the factorial, in several runs.
Ratios are taken within a run (ours over vLLM's at the same point), then summarised over runs:
the median and the smallest and largest run, so a reader sees how far the comparison moves
between processes.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from lib import ROOT
from lib.book import frame
from lib.chapters.seed import tables as S
from lib.chapters.seed_repro.experiment import EXPERIMENT as SEED_TABLES, VLLM2024_BACKENDS

VERSIONS = ("v1", "v2")
VLLM = {v: f"vllm2024-{v}" for v in VERSIONS}
OURS = {v: f"own-{v}-paged" for v in VERSIONS}
#: The arms of the factorial by (protocol, placement): the seed's conditions and the rigorous ones.
ARM_OF = {("seed", "random"): "seed timing, seed's tables", ("seed", "identity"): "seed timing, distinct blocks",
          ("rigorous", "random"): "rigorous, seed's tables", ("rigorous", "identity"): "rigorous, distinct blocks"}
#: The arm the post's numbers were made under (NOTES.md: host clock, 1024 reused random blocks).
SEED_ARM = "seed timing, seed's tables"
POINT = ["num_heads", "num_kv_heads", "memory_kind", "seq_len", "batch_size", "block_size"]
#: The build record committed from the node that measured (ptxas resources of every kernel).
BUILD_RECORD = ROOT / "data" / "kernels" / "vllm2024_build.h200-8db7b72a.json"
OWN_RESOURCES = ROOT / "data" / "kernels" / "resources.csv"


def load(root=None) -> pd.DataFrame:
    """Every run's checked rows of the sub-grid (every card that has them), with an ``arm`` column;
    an empty frame where no card measured it."""
    try:
        rows = frame.load_checked(SEED_TABLES.name, None, root=root, dedupe=False)
    except frame.NoData:
        return pd.DataFrame()
    rows = rows[rows["point_key"].str.startswith(f"backends={VLLM2024_BACKENDS};")].copy()
    rows["arm"] = [ARM_OF.get((p, pl)) for p, pl in zip(rows["protocol"], rows["placement"])]
    return rows.reset_index(drop=True)


def per_run_ratios(rows: pd.DataFrame) -> pd.DataFrame:
    """Per card, run, arm, point and version: ours / vLLM 2024's median time (same process)."""
    idx = ["gpu_slug", "run_id", "arm", *POINT]
    w = rows.pivot_table(index=idx, columns="backend", values="median_us", aggfunc="first")
    out = []
    for v in VERSIONS:
        if {OURS[v], VLLM[v]} <= set(w.columns):
            out.append(pd.DataFrame({"version": v, "ratio": w[OURS[v]] / w[VLLM[v]]}).dropna())
    if not out:
        raise ValueError("no point has both our kernel and vLLM 2024's timed in one run")
    return pd.concat(out).reset_index()


def spread(values: pd.Series) -> pd.Series:
    return pd.Series({"median": float(np.median(values)), "lo": float(values.min()),
                      "hi": float(values.max()), "runs": int(values.size)})


def ratio_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per card, arm, point and version: the median ratio over runs, its lowest and highest run."""
    r = per_run_ratios(rows)
    return (r.groupby(["gpu_slug", "arm", "version", *POINT])["ratio"].apply(spread)
            .unstack().reset_index())


def ratio_table(summary: pd.DataFrame, gpu: str, *, heads=(64, 8), memory: str = "device",
                arms=(SEED_ARM, "rigorous, distinct blocks")) -> pd.DataFrame:
    """The chapter's ratio table: rows (point, block size), columns (version, arm), cells
    "median (lowest-highest run)"."""
    s = summary[(summary["gpu_slug"] == gpu) & (summary["num_heads"] == heads[0])
                & (summary["num_kv_heads"] == heads[1]) & (summary["memory_kind"] == memory)
                & summary["arm"].isin(arms)]
    if s.empty:
        raise ValueError(f"no vLLM 2024 ratios on {gpu!r} at {heads} in {memory} memory")
    s = s.assign(point=[f"{n} × {b}" for n, b in zip(s["seq_len"], s["batch_size"])],
                 cell=[f"{m:.2f} ({lo:.2f}–{hi:.2f})" for m, lo, hi in zip(s["median"], s["lo"], s["hi"])])
    t = s.pivot_table(index=["point", "block_size"], columns=["version", "arm"], values="cell", aggfunc="first")
    order = sorted(s["point"].unique(), key=lambda p: tuple(-int(x) for x in p.split(" × ")))
    t = t.reindex(pd.MultiIndex.from_tuples([(p, b) for p in order for b in sorted(s["block_size"].unique())],
                                            names=["tokens × batch", "block size"]))
    return t.reindex(columns=pd.MultiIndex.from_tuples([(v, a) for v in VERSIONS for a in arms]))


def median_times(rows: pd.DataFrame) -> pd.DataFrame:
    """Per card, arm, point and backend: the median over runs of the run's median time, with the
    lowest and highest run."""
    return (rows.groupby(["gpu_slug", "arm", "backend", *POINT])["median_us"].apply(spread)
            .unstack().reset_index())


def side_by_side(seed: pd.DataFrame, times: pd.DataFrame, gpu: str, *, arm: str = SEED_ARM) -> pd.DataFrame:
    """Every one of the post's cells (its 64:8 shape) beside vLLM 2024's and our v1/v2 time at the
    same point and arm on one card (medians over runs). Tables 2, 4 and 6 are the post's modified
    kernels: vLLM's kernel appears there unmodified (the kernel the post changed)."""
    t = times[(times["gpu_slug"] == gpu) & (times["arm"] == arm) & (times["num_heads"] == 64)
              & (times["num_kv_heads"] == 8)]
    if t.empty:
        raise ValueError(f"no vLLM 2024 times on {gpu!r} in arm {arm!r}")
    w = t.pivot_table(index=["memory_kind", "seq_len", "batch_size", "block_size"], columns="backend",
                      values="median", aggfunc="first")
    cells = seed.rename(columns={"memory": "memory_kind", "time_us": "post_us"})
    out = cells.merge(w.reset_index(), on=["memory_kind", "seq_len", "batch_size", "block_size"], how="left")
    cols = {"post_us": "post", VLLM["v1"]: "vLLM 2024 v1", VLLM["v2"]: "vLLM 2024 v2",
            OURS["v1"]: "ours v1", OURS["v2"]: "ours v2"}
    out = out.rename(columns=cols)
    out["ours v1 / vLLM v1"] = out["ours v1"] / out["vLLM 2024 v1"]
    out["ours v2 / vLLM v2"] = out["ours v2"] / out["vLLM 2024 v2"]
    out["post / vLLM v1"] = out["post"] / out["vLLM 2024 v1"]
    return out[["table", "variant", "memory_kind", "seq_len", "batch_size", "block_size", *cols.values(),
                "ours v1 / vLLM v1", "ours v2 / vLLM v2", "post / vLLM v1"]]


def block_curve(side: pd.DataFrame, *, table: int = 1, memory: str = "device", reference: int = 16) -> pd.DataFrame:
    """One series of a table as times relative to block `reference`, per source: the shape of the
    block-size curve (the post's, vLLM 2024's, ours)."""
    s = side[(side["table"] == table) & (side["memory_kind"] == memory)].set_index("block_size")
    srcs = ["post", "vLLM 2024 v1", "vLLM 2024 v2", "ours v1", "ours v2"]
    return (s[srcs] / s.loc[reference, srcs]).rename_axis("block size")


def launch_plans(rows: pd.DataFrame, gpu: str, *, heads=(64, 8), seq_len=4096, batch_size=1,
                 block_size=16) -> pd.DataFrame:
    """How each kernel was launched at one point (from the rows' recorded plans)."""
    r = rows[(rows["gpu_slug"] == gpu) & (rows["num_heads"] == heads[0]) & (rows["num_kv_heads"] == heads[1])
             & (rows["seq_len"] == seq_len) & (rows["batch_size"] == batch_size) & (rows["block_size"] == block_size)]
    plans = {b: (json.loads(e) if isinstance(e, str) else e).get("plan", "")
             for b, e in zip(r["backend"], r["extra"])}
    return pd.DataFrame({"backend": list(plans), "launch": list(plans.values())}).sort_values("backend")


def registers(*, dtype: str = "float16", head_size: int = 128, tile: int = 4, record=BUILD_RECORD,
              own=OWN_RESOURCES) -> pd.DataFrame:
    """ptxas registers per thread by block size: vLLM 2024's v1/v2 (the build record from the node)
    and ours (v1/v2 share one decode kernel; at 64:8 it runs a tile of `tile` query heads)."""
    m = json.loads(record.read_text())
    rows = []
    for b in S.BLOCK_SIZES:
        entry = m["modules"].get(f"{dtype}_b{b}", {})
        for r in entry.get("resources", []):
            if r["head_size"] == head_size and r["kind"] in VERSIONS:
                rows.append({"block size": b, "kernel": f"vLLM 2024 {r['kind']}", "registers": r["registers"],
                             "spill bytes": r["spill_stores"]})
    o = pd.read_csv(own)
    o = o[(o["arch"] == "sm_90") & (o["kernel"] == "decode") & (o["dtype"] == dtype) & (o["head_size"] == head_size)
          & (o["tile"] == tile) & (o["addressing"] == "paged") & o["block_size"].isin(S.BLOCK_SIZES)]
    for b, regs, sp in zip(o["block_size"], o["registers"], o["spill_stores"]):
        rows.append({"block size": int(b), "kernel": f"ours (tile {tile})", "registers": int(regs),
                     "spill bytes": int(sp)})
    return (pd.DataFrame(rows).pivot_table(index="block size", columns="kernel", values="registers",
                                           aggfunc="first").astype(int))


def build_facts(record=BUILD_RECORD) -> dict:
    """The build's version, hashes, flags and time (for the prose), and its total spill bytes."""
    m = json.loads(record.read_text())
    spills = sum(r["spill_stores"] for e in m["modules"].values() for r in e["resources"])
    spilling = sorted({n for n, e in m["modules"].items() for r in e["resources"] if r["spill_stores"]})
    return {"version": m["vllm_version"], "sdist_sha256": m["sdist_sha256"], "source_sha256": m["source_sha256"],
            "nvcc": m["nvcc"], "flags": " ".join(m["nvcc_flags"]), "modules": len(m["modules"]),
            "kernels": sum(len(e["kernels"]) for e in m["modules"].values()),
            "build_seconds": m.get("build_seconds"), "spill_bytes": spills, "spilling_modules": spilling}
