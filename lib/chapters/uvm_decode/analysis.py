"""Table 1 extended: what managed memory costs a decode kernel, state by state.

The seed's table 1 compared a KV cache in device memory with one in managed memory and found no
difference. That holds only while the managed pages sit on the GPU. The `uvm_decode` experiment
times our v1/v2 kernels and vLLM's on four placements of the same cache (block sizes 1-256):

* ``device``: ``cudaMalloc``;
* ``managed``: ``cudaMallocManaged``, written by the GPU, so resident (the seed's case);
* ``managed_cold``: the same pages sent to the host before every sample, so the timed call is the
  first touch after an eviction and migrates them on demand (page faults inside the kernel);
* ``managed_prefetched``: sent to the host and back with ``cudaMemPrefetchAsync`` before every
  sample, so the timed call reads pages an explicit prefetch placed.

This module turns the rows into the chapter's frames: one row per point and backend with the
four times side by side, ratios to device memory, and the bandwidth the cold call achieved.
"""

from __future__ import annotations

import pandas as pd

from lib.harness import results as R

EXPERIMENT = "uvm_decode"
KINDS = ("device", "managed", "managed_cold", "managed_prefetched")
KIND_LABELS = {"device": "device (cudaMalloc)", "managed": "managed, resident",
               "managed_cold": "managed, cold (pages on the host)",
               "managed_prefetched": "managed, after a prefetch"}
SHORT = {"device": "device", "managed": "managed", "managed_cold": "cold",
         "managed_prefetched": "prefetched"}
BACKENDS = ("own-v1-paged", "own-v2-paged", "vllm")
SHAPES = {(64, 8): "seed (64 q / 8 kv heads)", (32, 32): "Llama-like (32 heads)"}
POINT = ["gpu_slug", "shape", "seq_len", "batch_size", "block_size", "backend"]


def shape_name(num_heads: int, num_kv_heads: int) -> str:
    return SHAPES.get((int(num_heads), int(num_kv_heads)), f"{num_heads} q / {num_kv_heads} kv heads")


def load(gpu=None, root=None) -> pd.DataFrame:
    """The experiment's ok rows with a ``shape`` column; every row must have passed its check."""
    rows = R.load(EXPERIMENT, gpu, root=root)
    bad = rows[~rows["check_passed"].astype(bool)]
    if len(bad):
        raise ValueError(f"{len(bad)} uvm_decode rows failed their correctness check: "
                         f"{bad[['backend', 'memory_kind', 'block_size']].head().to_dict('records')}")
    rows = rows.copy()
    rows["shape"] = [shape_name(h, k) for h, k in zip(rows["num_heads"], rows["num_kv_heads"])]
    return rows


def wide(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per point and backend: the median time of each kind and its ratio to device."""
    need = {"memory_kind", "median_us", *POINT}
    missing = need - set(rows.columns)
    if missing:
        raise ValueError(f"wide() needs columns {sorted(missing)}")
    w = rows.pivot_table(index=POINT, columns="memory_kind", values="median_us", aggfunc="first")
    w = w.reindex(columns=[k for k in KINDS if k in w.columns])
    bytes_moved = rows.groupby(POINT)["bytes_moved"].first()
    w = w.join(bytes_moved).reset_index()
    w.columns.name = None
    for k in KINDS[1:]:
        if k in w.columns and "device" in w.columns:
            w[f"{k}_vs_device"] = w[k] / w["device"]
    if "managed_cold" in w.columns:
        # what the first call after eviction achieved, counting every byte it had to read
        w["cold_gbps"] = w["bytes_moved"] / (w["managed_cold"] * 1e-6) / 1e9
        w["cold_extra_us"] = w["managed_cold"] - w["device"]
    return w


def ratio_summary(w: pd.DataFrame) -> pd.DataFrame:
    """Per kind and backend: min / median / max of the ratio to device memory over all points."""
    out = []
    for k in KINDS[1:]:
        col = f"{k}_vs_device"
        if col not in w.columns:
            continue
        for b, g in w.groupby("backend"):
            r = g[col].dropna()
            out.append({"memory_kind": k, "backend": b, "points": len(r), "min": r.min(),
                        "median": r.median(), "max": r.max()})
    return pd.DataFrame(out)


def resident_verdict(w: pd.DataFrame, *, tolerance: float = 0.05) -> dict:
    """Does "managed costs nothing" hold for resident and prefetched pages (within ``tolerance``)?"""
    out = {}
    for k in ("managed", "managed_prefetched"):
        r = (w[f"{k}_vs_device"] - 1).abs()
        out[k] = {"worst": float(r.max()), "within": bool((r <= tolerance).all()),
                  "outside": int((r > tolerance).sum()), "points": int(r.notna().sum())}
    return out


def table1(w: pd.DataFrame, seed: pd.DataFrame, backend: str, *, gpu: str) -> pd.DataFrame:
    """The seed's table 1 (vLLM, 4096 x 1, device vs managed) beside ours on every placement.

    One row per block size the seed or we measured, seed shape; our times for ``backend``.
    """
    if backend not in set(w["backend"]):
        raise ValueError(f"no rows for backend {backend!r} (have {sorted(set(w['backend']))})")
    ours = w[(w["gpu_slug"] == gpu) & (w["backend"] == backend) & (w["shape"] == SHAPES[(64, 8)])
             & (w["seq_len"] == 4096) & (w["batch_size"] == 1)].set_index("block_size")
    s = seed[seed["table"] == 1].pivot_table(index="block_size", columns="memory", values="time_us")
    out = pd.DataFrame(index=sorted(set(ours.index) | set(s.index)))
    out.index.name = "block size"
    out["seed: device"] = s.get("device")
    out["seed: managed"] = s.get("managed")
    for k in KINDS:
        out[f"ours: {SHORT[k]}"] = ours.get(k)
    for k in KINDS[1:]:
        out[f"{SHORT[k]} / device"] = ours.get(f"{k}_vs_device")
    return out
