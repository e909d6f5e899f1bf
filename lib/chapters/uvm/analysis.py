"""Analysis of the chapter "Unified Memory in practice": the rows as tables, the numbers the
prose quotes (:func:`headline`) and the comparisons it states in words (:func:`verdicts`).

Physical guards (:func:`with_link_guard`, applied by :func:`load`): a bandwidth over the link
only from bytes that crossed it. A granularity row's ``bytes_moved`` (older rows: the drop in
free GPU memory) is memory the driver reserved, not bytes that crossed, so those rows carry no
bandwidth; any link-crossing row whose rate exceeds the link's measured limit (the fastest
pinned ``cudaMemcpy`` of the same card) is flagged ``above_link_limit`` and its bandwidth blanked.
"""

from __future__ import annotations

import numpy as np

from lib.chapters.uvm.measure import READ_LABELS
from lib.harness import guards

MiB = 1 << 20
GiB = 1 << 30

#: gpu_read states whose bytes do not cross the link (all others do): resident in GPU memory, or
#: never written (managed first touch: the pages are created on the GPU).
RESIDENT_READS = {("device", "warm"), ("managed_gpu", "warm"), ("managed_readmostly", "warm"),
                  ("managed", "cold")}
#: cpu_read phases whose bytes cross the link (the others read host memory in place).
CROSSING_CPU_PHASES = {"after_gpu_write", "prefetch_to_host"}


def load(root=None):
    """All ``uvm`` rows (``extra`` expanded into columns, :func:`with_link_guard` applied), or
    None when there are none yet."""
    from lib.harness import results as R

    try:
        df = R.load("uvm", root=root, expand_extra=True)
    except FileNotFoundError:
        return None
    return with_link_guard(df) if len(df) else None


def crosses_link(df) -> np.ndarray:
    """Rows whose measured bytes cross the host-GPU link."""
    m = df["measurement"]
    phase = df["phase"] if "phase" in df.columns else np.full(len(df), None)
    pairs = list(zip(df["memory_kind"], phase))
    read = (m == "gpu_read").to_numpy() & np.array([p not in RESIDENT_READS for p in pairs], dtype=bool)
    cpu = (m == "cpu_read").to_numpy() & np.array([ph in CROSSING_CPU_PHASES for ph in phase], dtype=bool)
    return read | cpu | (m == "transfer").to_numpy() | (m == "granularity").to_numpy()


def with_link_guard(df):
    """``df`` with ``above_link_limit`` (per card, against the fastest pinned memcpy measured) and
    no bandwidth where the bytes are not bytes that crossed the link (granularity rows) or the rate
    is above the limit (see the module docstring)."""
    out = df.copy()
    out[guards.FLAG] = False
    crosses = crosses_link(out)
    for slug, idx in out.groupby("gpu_slug").groups.items():
        sub = out.loc[idx]
        limit = guards.link_limit_gbps(sub[sub["measurement"] == "transfer"])
        flagged = guards.flag_above_link_limit(sub, "bandwidth_gbps", limit, crosses=crosses[out.index.get_indexer(idx)])
        out.loc[idx, guards.FLAG] = flagged[guards.FLAG].to_numpy()
    over = out[guards.FLAG].to_numpy(dtype=bool)
    return guards.drop_bandwidth(out, over | (out["measurement"] == "granularity").to_numpy())


def gpu_read_table(df):
    """gpu_read rows with a label, the size in MiB and bandwidth spread (GB/s at p90/p10 time)."""
    d = df[df["measurement"] == "gpu_read"].copy()
    d["label"] = [READ_LABELS.get((k, p), f"{k} ({p})") for k, p in zip(d["memory_kind"], d["phase"])]
    d["size_mib"] = d["nbytes"].astype(float) / MiB
    d["bw_low"] = d["bytes_moved"].astype(float) / d["p90_us"] / 1e3
    d["bw_high"] = d["bytes_moved"].astype(float) / d["p10_us"] / 1e3
    return d


CPU_LABELS = {
    ("cpu_read", "managed", "after_gpu_write"): "managed, just written by GPU (faults back)",
    ("cpu_read", "managed", "host_resident"): "managed, read again (on host)",
    ("prefetch", "managed", "prefetch_to_host"): "prefetch GPU → host",
    ("cpu_read", "managed", "after_prefetch_to_host"): "managed, after prefetch to host",
    ("cpu_read", "pageable", "baseline"): "pageable host (NumPy)",
    ("cpu_read", "pinned", "baseline"): "pinned host",
}


def cpu_read_table(df):
    d = df[df["measurement"] == "cpu_read"].copy()
    d["label"] = [CPU_LABELS.get(k, " ".join(map(str, k)))
                  for k in zip(d["backend"], d["memory_kind"], d["phase"])]
    d["size_mib"] = d["nbytes"].astype(float) / MiB
    return d


def granularity_table(df):
    """One row per (GPU, size, stride): touches, bytes moved by both observations, times."""
    d = df[df["measurement"] == "granularity"].copy()
    d["stride_kib"] = d["stride_bytes"].astype(float) / 1024
    d["moved_meminfo_mib"] = d["moved_meminfo_median"].astype(float) / MiB
    d["moved_prefetch_mib"] = d["moved_prefetch_estimate"].astype(float) / MiB
    d["touched_pages_mib"] = d["touched_pages_bytes"].astype(float) / MiB
    d["amplification"] = d["moved_meminfo_median"].astype(float) / d["touched_pages_bytes"].astype(float)
    d["per_touch_us"] = d["median_us"] / d["touches"].astype(float)
    return d.sort_values(["gpu_slug", "nbytes", "stride_bytes"])


TRANSFER_LABELS = {("memcpy", "pinned"): "cudaMemcpy, pinned host",
                   ("memcpy", "pageable"): "cudaMemcpy, pageable host",
                   ("prefetch", "managed"): "cudaMemPrefetchAsync, managed"}


def transfer_table(df):
    d = df[df["measurement"] == "transfer"].copy()
    d["label"] = [TRANSFER_LABELS.get(k, " ".join(k)) for k in zip(d["backend"], d["memory_kind"])]
    d["size_mib"] = d["nbytes"].astype(float) / MiB
    return d


def _pick(d, **eq):
    for k, v in eq.items():
        d = d[d[k] == v]
    return d


def _at_largest(d, col: str = "bandwidth_gbps") -> float:
    if d.empty:
        return float("nan")
    return float(d.loc[d["nbytes"].astype("int64").idxmax(), col])


def headline(df, gpu_slug: str) -> dict[str, float]:
    """The numbers the chapter quotes for one GPU, each at the largest size measured (NaN if absent).

    Bandwidths in GB/s; ``*_size_gib`` say at which size; granularity values per stride in MiB.
    """
    d = df[df["gpu_slug"] == gpu_slug]
    g = d[d["measurement"] == "gpu_read"]
    out: dict[str, float] = {}
    for key, kind, phase in [("device", "device", "warm"), ("managed_gpu", "managed_gpu", "warm"),
                             ("readmostly_warm", "managed_readmostly", "warm"),
                             ("mapped", "managed_host_mapped", "warm"), ("pinned", "pinned", "warm"),
                             ("first_touch", "managed", "cold"),
                             ("fault_touched", "managed_host_touched", "cold"),
                             ("fault_prefetched", "managed_host", "cold"),
                             ("readmostly_cold", "managed_readmostly", "cold"),
                             ("prefetch_then_read", "managed_host_touched", "prefetch_then_read")]:
        out[f"read_{key}"] = _at_largest(_pick(g, memory_kind=kind, phase=phase))
    out["read_size_gib"] = float(g["nbytes"].max()) / GiB if len(g) else float("nan")
    out["read_pct_ceiling_device"] = _at_largest(_pick(g, memory_kind="device", phase="warm"),
                                                 "pct_of_read_ceiling")
    out["managed_over_device"] = out["read_managed_gpu"] / out["read_device"]
    out["device_over_fault"] = out["read_device"] / out["read_fault_touched"]
    t = d[d["measurement"] == "transfer"]
    for key, backend, kind in [("prefetch", "prefetch", "managed"), ("pinned", "memcpy", "pinned"),
                               ("pageable", "memcpy", "pageable")]:
        for direction in ("h2d", "d2h"):
            out[f"{key}_{direction}"] = _at_largest(_pick(t, backend=backend, memory_kind=kind, direction=direction))
    out["transfer_size_gib"] = float(t["nbytes"].max()) / GiB if len(t) else float("nan")
    out["prefetch_over_pinned_h2d"] = out["prefetch_h2d"] / out["pinned_h2d"]
    out["fault_over_pinned_h2d"] = out["read_fault_touched"] / out["pinned_h2d"]
    c = d[d["measurement"] == "cpu_read"]
    for key, backend, kind, phase in [("cpu_after_gpu_write", "cpu_read", "managed", "after_gpu_write"),
                                      ("cpu_host_resident", "cpu_read", "managed", "host_resident"),
                                      ("cpu_after_prefetch", "cpu_read", "managed", "after_prefetch_to_host"),
                                      ("cpu_prefetch_d2h", "prefetch", "managed", "prefetch_to_host"),
                                      ("cpu_pageable", "cpu_read", "pageable", "baseline")]:
        out[key] = _at_largest(_pick(c, backend=backend, memory_kind=kind, phase=phase))
    out["cpu_size_gib"] = float(c["nbytes"].max()) / GiB if len(c) else float("nan")
    gr = d[d["measurement"] == "granularity"]
    if len(gr):
        gr = gr[gr["nbytes"] == gr["nbytes"].max()]
        out["gran_size_gib"] = float(gr["nbytes"].iloc[0]) / GiB
        for _, r in gr.iterrows():
            s = int(r["stride_bytes"])
            tag = f"{s // MiB}m" if s >= MiB else f"{s // 1024}k"
            out[f"gran_{tag}_meminfo_mib"] = float(r["moved_meminfo_median"]) / MiB
            out[f"gran_{tag}_prefetch_mib"] = float(r["moved_prefetch_estimate"]) / MiB
            out[f"gran_{tag}_touched_mib"] = float(r["touched_pages_bytes"]) / MiB
            out[f"gran_{tag}_ms"] = float(r["median_us"]) / 1e3
    return out


def verdicts(h: dict[str, float]) -> dict[str, str]:
    """Comparisons the chapter states in words, decided by the data (a dash where it is missing)."""
    def ok(*keys):
        return all(np.isfinite(h.get(k, float("nan"))) and h.get(k, 0) > 0 for k in keys)

    out = {"managed": "—", "prefetch": "—", "cpu": "—"}
    if ok("read_managed_gpu", "read_device"):
        r = h["read_managed_gpu"] / h["read_device"]
        out["managed"] = ("the same as device memory to within 3%" if abs(r - 1) <= 0.03
                          else f"{abs(1 - r):.0%} {'slower' if r < 1 else 'faster'} than device memory")
    if ok("read_prefetch_then_read", "read_fault_touched"):
        r = h["read_prefetch_then_read"] / h["read_fault_touched"]
        out["prefetch"] = (f"{r:.1f} times the fault-driven bandwidth: one bulk copy replaces many "
                           "batches of faults" if r > 1.05 else
                           "no better than letting the pages fault: here the bulk copy did not pay off")
    if ok("cpu_after_gpu_write", "cpu_prefetch_d2h", "cpu_after_prefetch"):
        both = 1.0 / (1.0 / h["cpu_prefetch_d2h"] + 1.0 / h["cpu_after_prefetch"])
        a = h["cpu_after_gpu_write"]
        if both > 1.05 * a:
            out["cpu"] = (f"together {both:.1f} GB/s, so prefetching GPU results to the host before the "
                          "CPU reads them is the faster way to hand them over")
        elif both < 0.95 * a:
            out["cpu"] = (f"together {both:.1f} GB/s, so here letting the CPU fault the pages back was "
                          "faster than a prefetch followed by the read")
        else:
            out["cpu"] = (f"together {both:.1f} GB/s, about what letting the CPU fault the pages back "
                          "costs")
    return out
