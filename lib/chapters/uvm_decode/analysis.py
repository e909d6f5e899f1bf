"""The `uvm_decode` rows as its chapter's frames: per point and backend the four placements'
times side by side (:data:`KIND_LABELS`), their ratios to device memory, and what the cold call
achieved. The seed's table 1 found managed memory free; that holds only while its pages are on the GPU."""

from __future__ import annotations

import pandas as pd

from lib.book import frame

EXPERIMENT = "uvm_decode"
KINDS = ("device", "managed", "managed_cold", "managed_prefetched")
KIND_LABELS = {"device": "device (cudaMalloc)", "managed": "managed, resident",
               "managed_cold": "managed, cold (pages on the host)",
               "managed_prefetched": "managed, after a prefetch"}
SHORT = {"device": "device", "managed": "managed", "managed_cold": "cold", "managed_prefetched": "prefetched"}
BACKENDS = ("own-v1-paged", "own-v2-paged", "vllm")
POINT = ["gpu_slug", "shape", "seq_len", "batch_size", "block_size", "backend"]


def load(gpu=None, root=None, *, dedupe: bool = True) -> pd.DataFrame:
    """The experiment's checked ok rows with a ``shape`` column and a ``condition`` (one of
    :data:`KINDS`: the memory kind, and for managed memory its state before each call);
    ``dedupe=False``: every run's rows (repeats, for :func:`run_spread`)."""
    rows = frame.with_shape(frame.load_checked(EXPERIMENT, gpu, root=root, dedupe=dedupe,
                                               show=("backend", "memory_kind", "block_size")))
    rows["condition"] = [f"{k}_{s}" if isinstance(s, str) else k
                         for k, s in zip(rows["memory_kind"], rows["memory_state"])]
    return rows


def wide(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per point and backend: the median time of each kind and its ratio to device."""
    need = {"condition", "median_us", *POINT}
    missing = need - set(rows.columns)
    if missing:
        raise ValueError(f"wide() needs columns {sorted(missing)}")
    w = rows.pivot_table(index=POINT, columns="condition", values="median_us", aggfunc="first")
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


def run_spread(rows: pd.DataFrame, card: str) -> pd.DataFrame:
    """How far each ratio to device memory moved between repeat runs on ``card`` (rows of every
    run: ``load_checked(..., dedupe=False)``): per condition, the runs, the points every run has,
    and the median and largest spread (largest minus smallest ratio of a point over the runs),
    also relative to the point's median ratio (``rel_*``: the cold ratios are in the hundreds)."""
    cols = ["condition", "runs", "points", "spread_median", "spread_max", "rel_median", "rel_max"]
    d = rows[rows["gpu_slug"] == card]
    runs = sorted(d["run_id"].unique())
    if len(runs) < 2:
        return pd.DataFrame(columns=cols)
    per_run = [wide(d[d["run_id"] == r]).set_index(POINT) for r in runs]
    out = []
    for k in KINDS[1:]:
        col = f"{k}_vs_device"
        if not all(col in w.columns for w in per_run):
            continue
        r = pd.concat([w[col] for w in per_run], axis=1, join="inner").dropna()
        gap = r.max(axis=1) - r.min(axis=1)
        rel = gap / r.median(axis=1)
        out.append({"condition": k, "runs": len(runs), "points": len(r),
                    "spread_median": float(gap.median()), "spread_max": float(gap.max()),
                    "rel_median": float(rel.median()), "rel_max": float(rel.max())})
    return pd.DataFrame(out, columns=cols)


def ratio_summary(w: pd.DataFrame) -> pd.DataFrame:
    """Per kind and backend: min / median / max of the ratio to device memory over all points."""
    out = []
    for k in KINDS[1:]:
        col = f"{k}_vs_device"
        if col not in w.columns:
            continue
        for b, g in w.groupby("backend"):
            r = g[col].dropna()
            out.append({"condition": k, "backend": b, "points": len(r), "min": r.min(),
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
    ours = w[(w["gpu_slug"] == gpu) & (w["backend"] == backend) & (w["shape"] == frame.shape_label(64, 8))
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


# ----------------------------------------------------------------------------- two cards

def table1_cards(w: pd.DataFrame, seed: pd.DataFrame, backend: str, cards: list[str]) -> pd.DataFrame:
    """:func:`table1` for each card in ``cards`` (which have rows), stacked: index (card label,
    block size), so one table shows the seed's numbers beside ours on every card."""
    parts = {frame.card_label(c): table1(w, seed, backend, gpu=c) for c in cards if c in set(w["gpu_slug"])}
    if not parts:
        raise ValueError(f"no rows for any of {cards}")
    out = pd.concat(parts, names=["card", "block size"])
    return out


def card_summary(w: pd.DataFrame, card: str) -> dict[str, float]:
    """What the prose quotes per card, from :func:`wide` rows of ``card`` (NaN where it has none):
    resident and prefetched worst deviation from device memory (%), the cold call's slowdown and
    rate range, the largest cache's times, and how many prefetched points are within 1 %."""
    g = w[w["gpu_slug"] == card]
    nan = float("nan")
    if g.empty:
        return {k: nan for k in ("res_worst", "pre_worst", "res_points", "pre_under1", "cold_min", "cold_med",
                                 "cold_max", "cold_gbps_lo", "cold_gbps_med", "cold_gbps_hi", "big_mib",
                                 "big_cold_ms", "big_dev_us")}
    v = resident_verdict(g)
    big = g[g["bytes_moved"] == g["bytes_moved"].max()]
    return {"res_worst": 100 * v["managed"]["worst"], "pre_worst": 100 * v["managed_prefetched"]["worst"],
            "res_points": v["managed"]["points"],
            "pre_under1": int(((g["managed_prefetched_vs_device"] - 1) < 0.01).sum()),
            "cold_min": float(g["managed_cold_vs_device"].min()),
            "cold_med": float(g["managed_cold_vs_device"].median()),
            "cold_max": float(g["managed_cold_vs_device"].max()),
            "cold_gbps_lo": float(g["cold_gbps"].min()), "cold_gbps_med": float(g["cold_gbps"].median()),
            "cold_gbps_hi": float(g["cold_gbps"].max()),
            "big_mib": float(big["bytes_moved"].iloc[0]) / 2**20,
            "big_cold_ms": float(big["managed_cold"].median()) / 1e3,
            "big_dev_us": float(big["device"].median())}


def device_ratio(w: pd.DataFrame, cards: list[str]) -> pd.Series:
    """Second card's device-memory time over the first's, per point and backend: whether the
    faster HBM shows in these decode steps at all (NaN-free; empty with fewer than two cards)."""
    if len(cards) < 2:
        return pd.Series(dtype=float)
    key = [c for c in POINT if c != "gpu_slug"]
    d = w.pivot_table(index=key, columns="gpu_slug", values="device")
    if not set(cards[:2]) <= set(d.columns):
        return pd.Series(dtype=float)
    return (d[cards[1]] / d[cards[0]]).dropna()


def step_read_gbps(w: pd.DataFrame, card: str) -> float:
    """The largest rate any device-memory step reached on ``card`` (bytes it must read / time):
    how far below the HBM ceiling these decode steps run."""
    g = w[w["gpu_slug"] == card]
    return float((g["bytes_moved"] / (g["device"] * 1e-6) / 1e9).max()) if len(g) else float("nan")


def relative_spread(rows: pd.DataFrame, card: str, condition: str) -> float:
    """Median over points of (p90 - p10) / median time for one condition on ``card``: the noise a
    difference between cards has to beat (NaN without rows)."""
    g = rows[(rows["gpu_slug"] == card) & (rows["condition"] == condition)]
    return float(((g["p90_us"] - g["p10_us"]) / g["median_us"]).median()) if len(g) else float("nan")


def cold_noise(rows: pd.DataFrame, card: str) -> float:
    """:func:`relative_spread` of the cold call, whose every sample migrates the cache again."""
    return relative_spread(rows, card, "managed_cold")
