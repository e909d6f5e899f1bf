"""The book's key findings, computed from the committed data (the intro glues them).

Each finding is one number (or short string) with the card it came from; a finding whose data is
missing is left out, so the intro never states what no committed run measured.
"""

from __future__ import annotations

from lib.book import frame
from lib.harness import results as R


def _pick(df, **eq):
    for k, v in eq.items():
        df = df[df[k] == v]
    return df


def _loaded(load, *args, **kw):
    """``load(*args, **kw)``, or None when there is no committed data for it (a finding whose data
    is missing is left out, never an error)."""
    try:
        return load(*args, **kw)
    except (FileNotFoundError, ValueError):
        return None


#: the card the intro's findings are quoted from by default
FINDINGS_GPU = "h100-80gb-hbm3"
#: the cards the intro quotes, each with the suffix of its glue keys (``kf_<name><suffix>``)
CARDS = {"h100-80gb-hbm3": "", "h200": "_h200"}


def key_numbers(gpu: str | None = FINDINGS_GPU) -> dict[str, object]:
    """{name: value} for the intro, from one card's data; names are stable glue keys."""
    out: dict[str, object] = {}
    ks = _loaded(R.load, "kernel_speed", gpu)
    if ks is not None and len(ks):
        out["gpu"] = ks.gpu_slug.iloc[0]
        big = frame.single_point(_pick(ks, batch_size=32, seq_len=4096, num_heads=32, num_kv_heads=32))
        t = big.set_index("backend").median_us
        if {"own-auto-paged", "sdpa_dense", "vllm"} <= set(t.index):
            out["own_us"] = round(float(t["own-auto-paged"]), 1)
            out["own_over_sdpa"] = round(float(t["own-auto-paged"] / t["sdpa_dense"]), 3)
            out["own_over_vllm"] = round(float(t["own-auto-paged"] / t["vllm"]), 3)
            out["own_pct_ceiling"] = round(float(
                big.set_index("backend").pct_of_read_ceiling["own-auto-paged"]), 1)
            out["paged_over_contiguous"] = round(float(t["own-auto-paged"] / t["own-auto-contiguous"]), 3)
            out["own_kernel"] = frame.kernels_used(big)
        gqa = frame.single_point(_pick(ks, batch_size=32, seq_len=4096, num_heads=32, num_kv_heads=8))
        g = gqa.set_index("backend").median_us
        if {"own-auto-paged", "sdpa_dense"} <= set(g.index):
            out["gqa_over_sdpa"] = round(float(g["own-auto-paged"] / g["sdpa_dense"]), 3)
            out["gqa_kernel"] = frame.kernels_used(gqa)
    cm = _loaded(R.load, "correctness", gpu)
    if cm is not None and len(cm):
        own = cm[cm.backend.str.startswith("own-")]
        out["own_checks_passed"] = int(own.check_passed.sum())
        out["own_checks_total"] = int(len(own))
        flex = cm[cm.backend == "flex_paged"]
        if len(flex):
            out["flex_checks_passed"] = int(flex.check_passed.sum())
            out["flex_checks_total"] = int(len(flex))
        fi = cm[cm.backend == "flashinfer"]
        if len(fi):
            out["fi_checks_passed"] = int(fi.check_passed.sum())
            out["fi_checks_total"] = int(len(fi))
        fa3 = cm[cm.backend == "vllm-fa3"]
        if len(fa3):
            out["fa3_checks_passed"] = int(fa3.check_passed.sum())
            out["fa3_checks_total"] = int(len(fa3))
        v32 = _pick(cm, backend="vllm", dtype="float32")
        if len(v32):
            out["vllm_fp32_worst"] = f"{float(v32.rel_error.max()):.1e}"
    uvm = _loaded(R.load, "uvm", gpu, expand_extra=True)
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
    out.update(_decode_findings(gpu))
    out.update(_beyond_findings(gpu))
    return out


def _decode_findings(gpu: str | None) -> dict[str, object]:
    """From the uvm_decode and page_table experiments (chapters uvm_decode and page_table)."""
    from lib.chapters.page_table import analysis as P
    from lib.chapters.uvm_decode import analysis as U

    out: dict[str, object] = {}
    ud = _loaded(U.load, gpu)
    w = None if ud is None else U.wide(ud)
    if w is not None and len(w):
        v = U.resident_verdict(w)
        out["ud_resident_worst_pct"] = round(100 * v["managed"]["worst"], 1)
        out["ud_cold_median_x"] = round(float(w["managed_cold_vs_device"].median()))
        out["ud_cold_gbps"] = round(float(w["cold_gbps"].median()), 1)
    rows = _loaded(P.load, gpu)
    if rows is not None and len(rows):
        summ = P.ratio_summary(P.grid_ratios(rows)).set_index(["shape", "ratio_name"])
        grid = rows[rows["subgrid"] == "grid"]
        for key, (h, kv) in [("llama", (32, 32)), ("seed", (64, 8))]:
            out[f"pt_kernel_{key}"] = frame.kernels_used(grid[(grid["num_heads"] == h) & (grid["num_kv_heads"] == kv)])
        for key, shape in P.SHAPE_PARAM.items():
            for rkey, name in [("pc", "paged / contiguous"), ("sh", "shuffled / identity")]:
                if (shape, name) in summ.index:
                    out[f"pt_{rkey}_{key}_median"] = round(float(summ.loc[(shape, name), "median"]), 3)
                    out[f"pt_{rkey}_{key}_max"] = round(float(summ.loc[(shape, name), "max"]), 3)
        blocks = P.block_sizes(rows)
        for b_key, backend in [("ours", P.PAGED), ("vllm", "vllm")]:
            pen = P.small_block_penalty(blocks, backend)["penalty"]
            out[f"pt_pen_{b_key}_lo"] = round(float(pen.min()), 2)
            out[f"pt_pen_{b_key}_hi"] = round(float(pen.max()), 2)
        at16 = blocks[blocks["block_size"] == 16]["traffic_share"]
        out["pt_share_lo"] = round(100 * float(at16.min()))
        out["pt_share_hi"] = round(100 * float(at16.max()))
    return out


def _beyond_findings(gpu: str | None) -> dict[str, object]:
    """From the vmm_kv and kv_offload experiments (chapters vmm and kv_offload)."""
    from lib.chapters.kv_offload import figures as KO
    from lib.chapters.vmm import analysis as V

    out: dict[str, object] = {}
    vr = _loaded(V.load, gpu)
    k = None if vr is None else V.kernel_table(vr)
    if k is not None and len(k):
        out["vmm_dev_worst_pct"] = round(100 * float((k["vmm_over_device"] - 1).abs().max()), 1)
        out["vmm_paged_lo"] = round(float(k["paged_over_vmm"].min()), 3)
        out["vmm_paged_hi"] = round(float(k["paged_over_vmm"].max()), 3)
        chunks = sorted(set(k["chunk_bytes"].dropna()))
        if chunks:
            out["vmm_chunk_mib"] = ", ".join(f"{c / 2**20:g}" for c in chunks)
    rows = _loaded(KO.load_rows, gpu)
    h = None
    if rows is not None:
        d = KO.with_baselines(KO.decode_frame(rows))
        h = KO.headline(d, KO.yardsticks(rows), backend="own-auto-paged")
    if h is not None:
        for key in ("mha_remote_bus", "mha_copy_bus", "mha_first_bus", "ys_pinned_h2d", "first_over_serial"):
            out[f"ko_{key}"] = round(float(h[key]), 1)
    return out
