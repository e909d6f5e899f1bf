"""The book's key findings, computed from the committed data (the intro glues them).

Each finding is one number (or short string) with the card it came from; a finding whose data is
missing is left out, so the intro never states what no committed run measured.
"""

from __future__ import annotations

from lib import results as R


def _pick(df, **eq):
    for k, v in eq.items():
        df = df[df[k] == v]
    return df


def key_numbers(gpu: str | None = None) -> dict[str, object]:
    """{name: value} for the intro; names are stable glue keys."""
    out: dict[str, object] = {}
    try:
        ks = R.load("kernel_speed", gpu)
    except (FileNotFoundError, ValueError):
        ks = None
    if ks is not None and len(ks):
        out["gpu"] = ks.gpu_slug.iloc[0]
        big = _pick(ks, batch_size=32, seq_len=4096, num_heads=32, num_kv_heads=32)
        t = big.set_index("backend").median_us
        if {"own-auto-paged", "sdpa_dense", "vllm"} <= set(t.index):
            out["own_us"] = round(float(t["own-auto-paged"]), 1)
            out["own_over_sdpa"] = round(float(t["own-auto-paged"] / t["sdpa_dense"]), 3)
            out["own_over_vllm"] = round(float(t["own-auto-paged"] / t["vllm"]), 3)
            out["own_pct_ceiling"] = round(float(
                big.set_index("backend").pct_of_read_ceiling["own-auto-paged"]), 1)
            out["paged_over_contiguous"] = round(float(
                t["own-auto-paged"] / t["own-auto-contiguous"]), 3)
        gqa = _pick(ks, batch_size=32, seq_len=4096, num_heads=32, num_kv_heads=8)
        g = gqa.set_index("backend").median_us
        if {"own-auto-paged", "sdpa_dense"} <= set(g.index):
            out["gqa_over_sdpa"] = round(float(g["own-auto-paged"] / g["sdpa_dense"]), 3)
    try:
        cm = R.load("correctness", gpu)
    except (FileNotFoundError, ValueError):
        cm = None
    if cm is not None and len(cm):
        own = cm[cm.backend.str.startswith("own-")]
        out["own_checks_passed"] = int(own.check_passed.sum())
        out["own_checks_total"] = int(len(own))
        v32 = _pick(cm, backend="vllm", dtype="float32")
        if len(v32):
            out["vllm_fp32_worst"] = f"{float(v32.rel_error.max()):.1e}"
    try:
        uvm = R.load("uvm", gpu, expand_extra=True)
    except (FileNotFoundError, ValueError):
        uvm = None
    if uvm is not None and len(uvm):
        reads = uvm[(uvm.backend == "gpu_read") & (uvm.nbytes == uvm.nbytes.max())]
        cold = reads[reads.get("phase", "").astype(str) != "prefetch_then_read"]
        bw = cold.groupby("memory_kind").bandwidth_gbps.median()
        if {"device", "managed_gpu"} <= set(bw.index):
            out["managed_resident_over_device"] = round(float(bw["managed_gpu"] / bw["device"]), 3)
        if "managed_host_touched" in bw.index:
            out["fault_gbps"] = round(float(bw["managed_host_touched"]), 1)
        pf = uvm[(uvm.backend == "prefetch") & (uvm["direction"] == "h2d")]
        if len(pf):
            out["prefetch_gbps"] = round(float(pf[pf.nbytes == pf.nbytes.max()].bandwidth_gbps.iloc[0]), 1)
    return out
