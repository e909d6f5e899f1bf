"""Frames and numbers of the chapter "Contiguous KV without fragmentation: CUDA virtual memory".

Three questions, three sources: what the kernel gains (the ``kernel`` rows of ``vmm_kv``:
:func:`kernel_table`), what growing costs (the ``map`` rows: :func:`map_table`, and
:func:`growth_cost` per decode step), and what each scheme wastes (no GPU: a seeded synthetic
trace, :mod:`lib.chapters.vmm.trace`, and :func:`waste_frame`).

Growth arithmetic. One layer's K (or V) of one sequence gains ``kv_heads x head x element``
bytes per decode step, so a chunk of ``C`` bytes lasts ``C / that`` steps. A batch of ``B``
sequences maps, on average, ``2 B`` chunks (K and V) every that many steps, per layer; the
attention of that layer takes one kernel time per step. Both scale with the number of layers,
which therefore cancels from the share.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lib.chapters.vmm import trace as T
from lib.book import frame
from lib.chapters.vmm.measure import DEVICE_CONTIGUOUS, EXPERIMENT, MAP_LABELS, MAP_OPERATIONS, PAGED, VMM_CONTIGUOUS

MiB = 1 << 20
GiB = 1 << 30

#: The kernel rows' three series: (backend, memory_kind) -> short name.
SERIES = {PAGED[:2]: "paged", DEVICE_CONTIGUOUS[:2]: "device_contiguous", VMM_CONTIGUOUS[:2]: "vmm"}
SERIES_LABELS = {"paged": "paged, fragmented pool (block table)",
                 "device_contiguous": "contiguous, cudaMalloc pool",
                 "vmm": "contiguous, VMM slots"}
POINT = ["gpu_slug", "shape", "num_heads", "num_kv_heads", "head_size", "batch_size", "seq_len", "block_size"]

#: Chunk sizes below the stock driver's 2 MiB: what vAttention's modified driver allows.
SMALL_PAGES = (64 << 10, 128 << 10, 256 << 10)
#: Multiples of the granularity the waste figure shows for stock-driver chunks.
CHUNK_MULTIPLES = (1, 2, 4, 8, 16, 32)


NoData = frame.NoData


def load(gpu=None, root=None) -> pd.DataFrame:
    """Every checked ok ``vmm_kv`` row, ``extra`` expanded; kernel rows carry a ``shape``. The
    ``map`` rows time driver calls (map, unmap, ...), which move no bytes over any link: they carry
    no bandwidth and no percent of the read ceiling (older rows stored the chunk size as
    ``bytes_moved``, which made both up; they are blanked here, the chunk size stays in
    ``chunk_bytes``)."""
    from lib.harness import guards

    rows = frame.with_shape(frame.load_checked(EXPERIMENT, gpu, root=root, expand_extra=True, what="check",
                                               show=("backend", "memory_kind", "point_key")), model=False)
    calls = (rows["measurement"] == "map").to_numpy() if "measurement" in rows.columns else False
    rows = guards.drop_bandwidth(rows, calls, cols=("bytes_moved", "bandwidth_gbps", "pct_of_read_ceiling"))
    return rows


# ----------------------------------------------------------------------------- kernel

def kernel_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per kernel point: the three series' times (median, p10, p90), ratios, arena facts."""
    need = {"measurement", "backend", "memory_kind", "median_us", "p10_us", "p90_us", *POINT}
    missing = need - set(rows.columns)
    if missing:
        raise ValueError(f"kernel_table needs columns {sorted(missing)}")
    d = rows[rows["measurement"] == "kernel"].copy()
    if d.empty:
        raise ValueError("no kernel rows")
    d["series"] = [SERIES.get((b, m)) for b, m in zip(d["backend"], d["memory_kind"])]
    d = d[d["series"].notna()]
    t = d.pivot_table(index=POINT, columns="series", values=["median_us", "p10_us", "p90_us"],
                      aggfunc="first")
    t.columns = [f"{s}_{v.removesuffix('_us')}_us" if v != "median_us" else f"{s}_us" for v, s in t.columns]
    out = t.reset_index()
    for s in SERIES.values():
        if f"{s}_us" not in out.columns:
            raise ValueError(f"kernel rows lack the {SERIES_LABELS[s]!r} series")
    out["paged_over_vmm"] = out["paged_us"] / out["vmm_us"]
    out["vmm_over_device"] = out["vmm_us"] / out["device_contiguous_us"]
    out["paged_over_device"] = out["paged_us"] / out["device_contiguous_us"]
    vmm = d[d["series"] == "vmm"].set_index(POINT)
    facts = ("bytes_moved", "chunk_bytes", "granularity", "block_bytes", "blocks_per_slot", "slot_bytes",
             "reserved_bytes", "mapped_bytes", "used_bytes", "grow_ms", "copy_ms", "kv_bytes")
    for col in facts:
        if col in vmm.columns:
            out[col] = [vmm[col].get(tuple(k), np.nan) for k in out[POINT].itertuples(index=False)]
    if "bytes_moved" in out.columns:
        for s in SERIES.values():
            out[f"{s}_gbps"] = out["bytes_moved"].astype(float) / out[f"{s}_us"] / 1e3
    return out.sort_values(["gpu_slug", "seq_len", "shape", "block_size"]).reset_index(drop=True)


def kernel_display(ktab: pd.DataFrame) -> pd.DataFrame:
    """The kernel table as the chapter shows it: readable names, µs, ratios."""
    return pd.DataFrame({
        "point": [f"{b} × {n}" for b, n in zip(ktab["batch_size"], ktab["seq_len"])],
        "heads": ktab["shape"], "block": ktab["block_size"].astype(int),
        "paged, pool (µs)": ktab["paged_us"], "contiguous, cudaMalloc (µs)": ktab["device_contiguous_us"],
        "contiguous, VMM (µs)": ktab["vmm_us"], "paged / VMM": ktab["paged_over_vmm"],
        "VMM / cudaMalloc": ktab["vmm_over_device"]})


# ----------------------------------------------------------------------------- map

def map_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (GPU, chunk size, operation): per-chunk median/p10/p90 and µs per MiB."""
    need = {"measurement", "backend", "median_us", "p10_us", "p90_us", "chunk_bytes", "gpu_slug"}
    missing = need - set(rows.columns)
    if missing:
        raise ValueError(f"map_table needs columns {sorted(missing)}")
    d = rows[rows["measurement"] == "map"].copy()
    if d.empty:
        raise ValueError("no map rows")
    d["operation"] = d["backend"]
    unknown = set(d["operation"]) - set(MAP_OPERATIONS)
    if unknown:
        raise ValueError(f"unknown map operations {sorted(unknown)}")
    d["chunk_bytes"] = d["chunk_bytes"].astype("int64")
    d["chunk_mib"] = d["chunk_bytes"] / MiB
    d["label"] = d["operation"].map(MAP_LABELS)
    d["us_per_mib"] = d["median_us"] / d["chunk_mib"]
    d["order"] = d["operation"].map({op: i for i, op in enumerate(MAP_OPERATIONS)})
    keep = ["gpu_slug", "operation", "label", "chunk_bytes", "chunk_mib", "median_us", "p10_us", "p90_us",
            "samples", "us_per_mib", "order"]
    keep += [c for c in ("granularity", "chunks", "noop_grow_us", "driver_call_us", "reserve_us") if c in d]
    return d[keep].sort_values(["gpu_slug", "order", "chunk_bytes"]).reset_index(drop=True)


def map_wide(mtab: pd.DataFrame, gpu: str) -> pd.DataFrame:
    """Per-chunk median (µs) of each operation, one row per chunk size (MiB), for one GPU."""
    d = mtab[mtab["gpu_slug"] == gpu]
    w = d.pivot_table(index="chunk_mib", columns="operation", values="median_us", aggfunc="first")
    w = w.reindex(columns=[op for op in MAP_OPERATIONS if op in w.columns])
    w.columns.name = None
    w.index.name = "chunk (MiB)"
    return w


def map_time(mtab: pd.DataFrame, gpu: str, operation: str, chunk_bytes: int) -> float:
    """Median per-chunk time (µs) of one operation at one chunk size (NaN if not measured)."""
    d = mtab[(mtab["gpu_slug"] == gpu) & (mtab["operation"] == operation)
             & (mtab["chunk_bytes"] == int(chunk_bytes))]
    return float(d["median_us"].iloc[0]) if len(d) else float("nan")


# ----------------------------------------------------------------------------- growth per decode step

def growth_per_step_us(chunk_us: float, chunk_bytes: int, bytes_per_token: int, batch_size: int,
                       buffers: int = 2) -> float:
    """Average mapping time per decode step and layer: ``buffers`` (K, V) x batch chunks, each
    mapped once every ``chunk_bytes / bytes_per_token`` steps."""
    if chunk_bytes <= 0 or bytes_per_token <= 0 or batch_size <= 0 or buffers <= 0:
        raise ValueError("chunk_bytes, bytes_per_token, batch_size and buffers must be positive")
    if not chunk_us >= 0:
        raise ValueError(f"chunk_us must be >= 0, got {chunk_us}")
    return buffers * batch_size * chunk_us * bytes_per_token / chunk_bytes


def growth_cost(ktab: pd.DataFrame, mtab: pd.DataFrame) -> pd.DataFrame:
    """Per kernel point: tokens per chunk, mapping time per step (new chunk; reused chunk) and its
    share of the contiguous-on-VMM kernel time of the same step."""
    out = []
    for _, k in ktab.iterrows():
        bpt = int(k["block_bytes"]) // int(k["block_size"])  # one layer's K (or V) per token
        chunk = int(k["chunk_bytes"])
        row = {c: k[c] for c in POINT}
        row.update(chunk_mib=chunk / MiB, bytes_per_token=bpt, tokens_per_chunk=chunk / bpt,
                   vmm_us=float(k["vmm_us"]))
        for op in ("grow_new", "grow_reuse"):
            t = map_time(mtab, k["gpu_slug"], op, chunk)
            row[f"{op}_chunk_us"] = t
            per = growth_per_step_us(t, chunk, bpt, int(k["batch_size"])) if np.isfinite(t) else np.nan
            row[f"{op}_step_us"] = per
            row[f"{op}_share"] = per / float(k["vmm_us"])
        out.append(row)
    return pd.DataFrame(out)


def growth_display(gtab: pd.DataFrame) -> pd.DataFrame:
    """The growth table as the chapter shows it: readable names, one row per kernel point."""
    return pd.DataFrame({
        "point": [f"{b} × {n}" for b, n in zip(gtab["batch_size"], gtab["seq_len"])],
        "heads": gtab["shape"], "block": gtab["block_size"].astype(int),
        "tokens per chunk": gtab["tokens_per_chunk"], "new chunk (µs)": gtab["grow_new_chunk_us"],
        "mapping per step (µs)": gtab["grow_new_step_us"], "attention per step (µs)": gtab["vmm_us"],
        "share, new chunks": gtab["grow_new_share"], "share, reused chunks": gtab["grow_reuse_share"]})


# ----------------------------------------------------------------------------- the trace and its waste

def trace_frame(num_requests: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The seeded synthetic trace, one row per request (lib.chapters.vmm.trace's defaults)."""
    return pd.DataFrame(T.trace_rows(T.synthetic_trace(num_requests, seed=seed)))


def chunk_sizes(granularity: int) -> list[int]:
    """The VMM chunk sizes the waste figure shows: the small pages of a modified driver, then
    1-32 x the granularity (duplicates removed, ascending)."""
    if granularity <= 0:
        raise ValueError(f"granularity must be positive, got {granularity}")
    return sorted({*SMALL_PAGES, *(m * int(granularity) for m in CHUNK_MULTIPLES)})


def waste_frame(lengths, *, granularity: int = 2 * MiB, head_size: int = 128, itemsize: int = 2,
                kv_heads: dict[str, int] | None = None) -> pd.DataFrame:
    """Fragmentation of the trace's final lengths for each shape, scheme and granule.

    Allocation is counted per buffer (one layer's K or V), as vLLM allocates blocks and a
    per-layer arena maps chunks: the waste *fraction* is then the same for the whole model.
    Chunks smaller than ``granularity`` are flagged ``stock_driver = False``.
    """
    kv_heads = kv_heads or {"MHA 32:32": 32, "GQA 32:8": 8}
    frames = []
    for shape, kvh in kv_heads.items():
        bpt = int(kvh) * int(head_size) * int(itemsize)
        rows = T.fragmentation_rows(lengths, bpt, chunk_bytes=chunk_sizes(granularity))
        f = pd.DataFrame(rows)
        f["shape"] = shape
        frames.append(f)
    d = pd.concat(frames, ignore_index=True)
    d["stock_driver"] = (d["scheme"] != "vmm") | (d["chunk_bytes"].fillna(0) >= granularity)
    d["granule_kib"] = d["granule_bytes"] / 1024
    return d


def waste_at(w: pd.DataFrame, shape: str, scheme: str, **param) -> float:
    """The waste fraction of one scheme and parameter (e.g. ``block_tokens=16``) for one shape."""
    d = w[(w["shape"] == shape) & (w["scheme"] == scheme)]
    for k, v in param.items():
        d = d[d[k] == v]
    if len(d) != 1:
        raise ValueError(f"expected one waste row for {shape}, {scheme}, {param}; got {len(d)}")
    return float(d["waste_fraction"].iloc[0])


# ----------------------------------------------------------------------------- numbers for the prose

HEADLINE_POINT = {"batch_size": 32, "seq_len": 4096, "shape": "MHA 32:32", "block_size": 16}


def _one(d: pd.DataFrame, col: str, **eq) -> float:
    for k, v in eq.items():
        d = d[d[k] == v]
    return float(d[col].iloc[0]) if len(d) else float("nan")


def headline(ktab: pd.DataFrame, mtab: pd.DataFrame, gtab: pd.DataFrame, gpu: str) -> dict[str, float]:
    """The numbers the chapter quotes for one GPU (NaN where a point was not measured)."""
    k = ktab[ktab["gpu_slug"] == gpu]
    m = mtab[mtab["gpu_slug"] == gpu]
    g = gtab[gtab["gpu_slug"] == gpu]
    h: dict[str, float] = {}
    for col in ("paged_over_vmm", "vmm_over_device", "paged_over_device"):
        for stat in ("min", "max", "median"):
            h[f"{col}_{stat}"] = float(getattr(k[col], stat)())
    for col in ("paged_us", "vmm_us", "device_contiguous_us", "paged_over_vmm", "vmm_over_device",
                "reserved_bytes", "mapped_bytes", "used_bytes", "grow_ms", "copy_ms", "kv_bytes",
                "slot_bytes", "chunk_bytes"):
        h[f"issue_{col}"] = _one(k, col, **HEADLINE_POINT) if col in k.columns else float("nan")
    h["points"] = float(len(k))
    gran = m["granularity"].dropna() if "granularity" in m.columns else pd.Series(dtype=float)
    h["granularity"] = float(gran.iloc[0]) if len(gran) else float("nan")
    chunk1 = h["granularity"]
    big = float(m["chunk_bytes"].max()) if len(m) else float("nan")
    h["largest_chunk"] = big
    for op in MAP_OPERATIONS:
        h[f"{op}_us"] = map_time(mtab, gpu, op, int(chunk1)) if np.isfinite(chunk1) else float("nan")
        h[f"{op}_big_us"] = map_time(mtab, gpu, op, int(big)) if np.isfinite(big) else float("nan")
        d = m[m["operation"] == op]
        h[f"{op}_us_per_mib_small"] = _one(d, "us_per_mib", chunk_bytes=int(chunk1)) if len(d) else float("nan")
        h[f"{op}_us_per_mib_big"] = _one(d, "us_per_mib", chunk_bytes=int(big)) if len(d) else float("nan")
    h["map_cycle_us"] = h["grow_new_us"] + h["unmap_us"] + h["release_handle_us"]
    for col in ("noop_grow_us", "driver_call_us"):
        h[col] = float(m[col].median()) if col in m.columns and len(m) else float("nan")
    h["grow_new_share_max"] = float(g["grow_new_share"].max()) if len(g) else float("nan")
    h["grow_new_share_median"] = float(g["grow_new_share"].median()) if len(g) else float("nan")
    h["grow_reuse_share_max"] = float(g["grow_reuse_share"].max()) if len(g) else float("nan")
    h["issue_grow_new_step_us"] = _one(g, "grow_new_step_us", **HEADLINE_POINT) if len(g) else float("nan")
    h["issue_tokens_per_chunk"] = _one(g, "tokens_per_chunk", **HEADLINE_POINT) if len(g) else float("nan")
    return h


def _span(a: float, b: float) -> str:
    """'3% to 8%', or 'about 5%' when both round alike."""
    lo, hi = f"{a:.0%}", f"{b:.0%}"
    return f"about {lo}" if lo == hi else f"{lo} to {hi}"


def _close(r: float, tol: float) -> bool:
    return np.isfinite(r) and abs(r - 1.0) <= tol


def verdicts(h: dict[str, float], *, tol: float = 0.02) -> dict[str, str]:
    """Comparisons the chapter states in words, decided by the data (a dash where it is missing)."""
    out = dict.fromkeys(("paged_vs_vmm", "vmm_vs_device", "growth", "paper", "reuse", "per_mib"), "—")
    lo, hi = h.get("paged_over_vmm_min", np.nan), h.get("paged_over_vmm_max", np.nan)
    if np.isfinite(lo) and np.isfinite(hi):
        if _close(lo, tol) and _close(hi, tol):
            out["paged_vs_vmm"] = (f"the same to within {tol:.0%} at every point: here the block table "
                                   "costs the kernel nothing measurable")
        elif lo > 1.0:
            out["paged_vs_vmm"] = (f"slower at every point, by {_span(lo - 1, hi - 1)}: the "
                                   "fragmented, table-addressed pool costs the kernel time")
        elif hi < 1.0:
            out["paged_vs_vmm"] = (f"faster at every point, by {_span(1 - hi, 1 - lo)}: here the "
                                   "VMM slots cost the kernel time")
        else:
            out["paged_vs_vmm"] = (f"between {lo:.2f} and {hi:.2f} times the VMM time: neither layout "
                                   "wins at every point")
    if np.isfinite(hi):
        out["paper"] = ("So a gap of that size does not come from the block table here: it comes from "
                        "the kernels." if hi < 1.25 else
                        "So here the addressing alone accounts for a gap of that order.")
    lo, hi = h.get("vmm_over_device_min", np.nan), h.get("vmm_over_device_max", np.nan)
    if np.isfinite(lo) and np.isfinite(hi):
        if _close(lo, tol) and _close(hi, tol):
            out["vmm_vs_device"] = (f"within {tol:.0%} of the same kernel on cudaMalloc memory at every "
                                    "point: memory mapped chunk by chunk reads as fast as one allocation")
        else:
            out["vmm_vs_device"] = (f"between {lo:.2f} and {hi:.2f} times the same kernel on cudaMalloc "
                                    "memory: mapping chunk by chunk is not free for the reads")
    new, reuse = h.get("grow_new_us", np.nan), h.get("grow_reuse_us", np.nan)
    if np.isfinite(new) and np.isfinite(reuse) and new > 0:
        r = reuse / new
        out["reuse"] = ("cheaper than a new one, "
                        f"{1 - r:.0%} less time: skipping cuMemCreate pays" if r < 0.95 else
                        "no cheaper than a new one: here cuMemCreate is not the expensive part"
                        if r <= 1.05 else f"{r - 1:.0%} slower than a new one")
    small, big = h.get("grow_new_us_per_mib_small", np.nan), h.get("grow_new_us_per_mib_big", np.nan)
    if np.isfinite(small) and np.isfinite(big) and big > 0:
        out["per_mib"] = (f"falls from {small:.1f} to {big:.1f} µs per MiB: part of each call's cost is "
                          "fixed, so larger chunks amortise it" if big < 0.9 * small else
                          f"stays near {small:.1f} µs per MiB: the cost grows with the bytes mapped"
                          if big <= 1.1 * small else
                          f"rises from {small:.1f} to {big:.1f} µs per MiB: larger chunks cost more per byte")
    share = h.get("grow_new_share_max", np.nan)
    if np.isfinite(share):
        if share < 0.01:
            out["growth"] = "under 1% of the step's attention time at every point"
        elif share < 0.1:
            out["growth"] = f"at most {share:.1%} of the step's attention time"
        else:
            out["growth"] = (f"up to {share:.0%} of the step's attention time: worth hiding off the "
                             "critical path")
    return out


def summary_numbers(trace: pd.DataFrame) -> dict[str, float]:
    """The trace's length distribution (lib.chapters.vmm.trace.trace_summary) from its rows."""
    reqs = [T.Request(int(r.request_id), float(r.arrival_s), int(r.prompt_tokens), int(r.output_tokens))
            for r in trace.itertuples(index=False)]
    return T.trace_summary(reqs)


# ----------------------------------------------------------------------------- the cards side by side

#: Glue tag -> slug of the cards the book compares (lib.book.frame.CARDS): the prose names both
#: always, so a card without rows gets NaN (a dash), not a missing key.
CARD_TAGS = {frame.card_label(slug).lower(): slug for slug in frame.CARDS}


def separated(ktab: pd.DataFrame, a: str, b: str) -> pd.Series:
    """Per kernel point: do series ``a`` and ``b`` differ by more than their p10-p90 spreads
    (the two bands do not overlap)? A difference inside the spread is not a finding."""
    return (ktab[f"{a}_p10_us"] > ktab[f"{b}_p90_us"]) | (ktab[f"{a}_p90_us"] < ktab[f"{b}_p10_us"])


def card_summary(ktab: pd.DataFrame, mtab: pd.DataFrame, gtab: pd.DataFrame,
                 ceilings: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per card: :func:`headline`'s numbers, how many points put paged and VMM (and VMM
    and cudaMalloc) apart by more than their p10-p90 spread, the worst paged/VMM point, and each
    layout's VMM read rate as a share of that card's read ceiling (``ceilings``: slug -> GB/s,
    from the card's provenance)."""
    out = []
    for slug in frame.card_slugs(ktab):
        k = ktab[ktab["gpu_slug"] == slug]
        h = headline(ktab, mtab, gtab, slug)
        h["gpu_slug"] = slug
        h["paged_vmm_apart"] = float(separated(k, "paged", "vmm").sum())
        h["vmm_device_apart"] = float(separated(k, "vmm", "device_contiguous").sum())
        worst = k.loc[k["paged_over_vmm"].idxmax()]
        h["worst_paged_point"] = (f"{worst['shape']}, {int(worst['batch_size'])} × {int(worst['seq_len'])}, "
                                  f"block {int(worst['block_size'])}")
        ceiling = (ceilings or {}).get(slug)
        ceiling = float(ceiling) if ceiling is not None else np.nan  # None: not in the provenance
        h["read_ceiling_gbps"] = ceiling
        for tag, shape in (("mha", "MHA 32:32"), ("gqa", "GQA 32:8")):
            s = k[k["shape"] == shape]
            for series in ("vmm", "paged"):
                col = f"{series}_gbps"
                gbps = float(s[col].median()) if col in s.columns and len(s) else np.nan
                h[f"{tag}_{series}_pct_ceiling"] = 100 * gbps / ceiling if np.isfinite(ceiling) else np.nan
        out.append(h)
    return pd.DataFrame(out)


def card_speedup(ktab: pd.DataFrame, slow: str, fast: str) -> pd.DataFrame:
    """Per kernel point and series: time on card ``slow`` / time on card ``fast`` (> 1: ``fast``
    is faster). Compared with the ratio of the two cards' read ceilings, it says whether a
    kernel's gain is the HBM's (equal), more (the slow card was held back by something else)
    or less."""
    key = ["shape", "batch_size", "seq_len", "block_size"]
    a = ktab[ktab["gpu_slug"] == slow].set_index(key)
    b = ktab[ktab["gpu_slug"] == fast].set_index(key)
    both = a.index.intersection(b.index)
    if not len(both):
        raise ValueError(f"no kernel point measured on both {slow!r} and {fast!r}")
    out = pd.DataFrame({s: a.loc[both, f"{s}_us"] / b.loc[both, f"{s}_us"] for s in SERIES.values()})
    return out.reset_index().sort_values(key).reset_index(drop=True)


def card_display(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-card comparison as the chapter shows it: one column of text per card (H100, H200),
    each row in its own format (ratios to 3 decimals, counts whole, times in µs)."""
    rows = (
        ("paged / VMM, lowest", "paged_over_vmm_min", "{:.3f}"),
        ("paged / VMM, highest", "paged_over_vmm_max", "{:.3f}"),
        ("worst paged point", "worst_paged_point", "{}"),
        ("points where paged and VMM differ beyond p10-p90", "paged_vmm_apart", "{:.0f}"),
        ("VMM / cudaMalloc, lowest", "vmm_over_device_min", "{:.3f}"),
        ("VMM / cudaMalloc, highest", "vmm_over_device_max", "{:.3f}"),
        ("points where VMM and cudaMalloc differ beyond p10-p90", "vmm_device_apart", "{:.0f}"),
        ("kernel points", "points", "{:.0f}"),
        ("MHA on VMM slots, % of the read ceiling", "mha_vmm_pct_ceiling", "{:.0f} %"),
        ("GQA on VMM slots, % of the read ceiling", "gqa_vmm_pct_ceiling", "{:.0f} %"),
        ("new chunk at the granularity (µs)", "grow_new_us", "{:.1f}"),
        ("chunk from the free list (µs)", "grow_reuse_us", "{:.1f}"),
        ("unmap (µs)", "unmap_us", "{:.1f}"),
        ("release (µs)", "release_handle_us", "{:.1f}"),
        ("one no-op driver call through Python (µs)", "driver_call_us", "{:.1f}"),
        ("mapping, largest share of a step's attention", "grow_new_share_max", "{:.1%}"),
    )

    def fmt(spec: str, v) -> str:
        return "–" if isinstance(v, float) and not np.isfinite(v) else spec.format(v)

    t = pd.DataFrame({frame.card_label(r["gpu_slug"]): [fmt(spec, r.get(c, np.nan)) for _, c, spec in rows]
                      for _, r in summary.iterrows()}, index=[name for name, _, _ in rows])
    return t


#: The per-card numbers the chapter quotes as ``vm_<name>_<card tag>``.
CARD_NUMBERS = ("paged_over_vmm_min", "paged_over_vmm_max", "vmm_over_device_min", "vmm_over_device_max",
                "paged_vmm_apart", "vmm_device_apart", "points", "grow_new_us", "grow_reuse_us", "unmap_us",
                "release_handle_us", "driver_call_us", "noop_grow_us", "grow_new_share_max",
                "mha_vmm_pct_ceiling", "gqa_vmm_pct_ceiling", "gqa_paged_pct_ceiling", "read_ceiling_gbps",
                "issue_paged_over_vmm", "issue_grow_ms")


def card_numbers(summary: pd.DataFrame, ktab: pd.DataFrame) -> dict[str, object]:
    """``{name_tag: value}`` for both compared cards (:data:`CARD_TAGS`; NaN and a dash where a card
    has no rows): :data:`CARD_NUMBERS`, the verdicts in words, the worst paged point, paged / VMM
    by layout (MHA; GQA at 32 x 4096, ``gqa_short``, and 8 x 16384, ``gqa_long``), and the
    H200-over-H100 kernel speedup per layout beside the ratio of their read ceilings."""
    out: dict[str, object] = {}
    by = {r["gpu_slug"]: r for _, r in summary.iterrows()}
    for tag, slug in CARD_TAGS.items():
        r = by.get(slug)
        for name in CARD_NUMBERS:
            out[f"{name}_{tag}"] = float(r[name]) if r is not None and name in r else float("nan")
        say = verdicts(dict(r)) if r is not None else verdicts({})
        for name in ("paged_vs_vmm", "vmm_vs_device", "reuse", "growth"):
            out[f"say_{name}_{tag}"] = say[name]
        out[f"worst_paged_point_{tag}"] = r["worst_paged_point"] if r is not None else "—"
        k = ktab[ktab["gpu_slug"] == slug]
        for part, sel in (("mha", k["shape"] == "MHA 32:32"),
                          ("gqa_short", (k["shape"] == "GQA 32:8") & (k["batch_size"] == 32)),
                          ("gqa_long", (k["shape"] == "GQA 32:8") & (k["batch_size"] == 8))):
            v = k.loc[sel, "paged_over_vmm"]
            out[f"paged_over_vmm_{part}_lo_{tag}"] = float(v.min()) if len(v) else float("nan")
            out[f"paged_over_vmm_{part}_hi_{tag}"] = float(v.max()) if len(v) else float("nan")
    slow, fast = CARD_TAGS["h100"], CARD_TAGS["h200"]
    have = set(ktab["gpu_slug"])
    for tag, shape in (("mha", "MHA 32:32"), ("gqa", "GQA 32:8")):
        if {slow, fast} <= have:
            s = card_speedup(ktab, slow, fast)
            v = s.loc[s["shape"] == shape, "vmm"]
            lo, hi = (float(v.min()), float(v.max())) if len(v) else (float("nan"), float("nan"))
        else:
            lo = hi = float("nan")
        out[f"speedup_{tag}_lo"], out[f"speedup_{tag}_hi"] = lo, hi
    out["ceiling_ratio"] = out["read_ceiling_gbps_h200"] / out["read_ceiling_gbps_h100"]
    return out


def sheet_ratio(hbm_gbps: dict[str, float | None]) -> float:
    """The datasheet's H200 / H100 HBM bandwidth ratio from ``{slug: datasheet GB/s}`` (NaN where
    either card or its datasheet value is missing)."""
    a, b = hbm_gbps.get(CARD_TAGS["h100"]), hbm_gbps.get(CARD_TAGS["h200"])
    return float(b) / float(a) if a and b else float("nan")
