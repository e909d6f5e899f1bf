"""The numbers the conclusions quote, each computed from committed rows of the chapter that
measured it: the cost ladder's rungs (:mod:`.ladder`), the bus arithmetic of the offload chapter,
the transfer rates of the Unified Memory chapter, the page table's and the kernels' costs.

:func:`conclusions_numbers` returns a flat dict (glued as ``cc_<key>``). A quantity whose rows are
not committed is NaN (numbers) or a dash (words); nothing is filled in by hand.
"""

from __future__ import annotations

import math

import pandas as pd

from lib.book import frame
from lib.book.frame import Plain
from lib.chapters.conclusions import ladder as L
from lib.engine import memory

DASH = "\u2014"


def _quiet(fn, default):
    try:
        return fn()
    except (FileNotFoundError, ValueError, KeyError, IndexError):
        return default


def ladder_numbers(s: pd.DataFrame, t: pd.DataFrame, card: str) -> dict:
    """Medians of every rung (``r_<rung>``, ``@`` written ``_``) and the spreads the rules quote."""
    out: dict = {}
    c = t[t["gpu_slug"] == card].set_index("rung")
    for rung in L.RUNGS:
        out[f"r_{rung.replace('@', '_')}"] = float(c.loc[rung, "median"]) if rung in c.index else math.nan
    mine = s[s["gpu_slug"] == card]
    gpu = mine[mine["rung"].isin(["vmm", "managed", "managed_prefetched", "migrate_resident"])]
    out["gpu_worst_pct"] = float(100 * (gpu["ratio"] - 1).abs().max()) if len(gpu) else math.nan
    out["gpu_points"] = int(len(gpu))
    cold = mine[mine["rung"] == "managed_cold"]["ratio"]
    out["cold_min"] = float(cold.min()) if len(cold) else math.nan
    out["cold_max"] = float(cold.max()) if len(cold) else math.nan
    out["cold_points"] = int(len(cold))
    for tag in ("part", "all"):
        grp = c[c.index.str.endswith(f"@{tag}") & ~c.index.str.startswith("migrate_first")]
        out[f"{tag}_best"] = float(grp["median"].min()) if len(grp) else math.nan
        out[f"{tag}_worst"] = float(grp["median"].max()) if len(grp) else math.nan
    return out


def offload_numbers(root, card: str, backend: str = "own-auto-paged") -> dict:
    """The offload chapter's bus arithmetic and its verdicts, for one card."""
    from lib.book import frame
    from lib.chapters.kv_offload import figures as KO
    from lib.chapters.primer import concepts as C

    out = {"host_byte_cost": math.nan, "double_at": Plain(DASH), "v_read_vs_copy": Plain(DASH),
           "v_faults": Plain(DASH), "v_overlap": Plain(DASH), "first_over_serial": math.nan,
           "ko_read_gbps": math.nan, "ko_pinned_h2d": math.nan}
    rows = _quiet(lambda: KO.load_rows(card, root=root), None)
    if rows is None:
        return out
    d = KO.with_baselines(KO.decode_frame(rows))
    ys = KO.yardsticks(rows)
    h = KO.headline(d, ys, backend=backend)
    words = KO.verdicts(h)
    read = frame.card_facts(card, root=root, experiment=KO.EXPERIMENT)["read_gbps"] or math.nan
    cost = C.host_byte_cost(read, ys["pinned_h2d"])
    out.update(host_byte_cost=cost, ko_read_gbps=read, ko_pinned_h2d=ys["pinned_h2d"],
               double_at=Plain(f"1/{1 / C.doubling_fraction(cost):.0f}") if cost > 1 else Plain(DASH),
               first_over_serial=h["first_over_serial"], v_read_vs_copy=Plain(words["read_vs_copy"]),
               v_faults=Plain(words["faults"]), v_overlap=Plain(words["overlap"]))
    return out


def uvm_numbers(root, card: str) -> dict:
    """The Unified Memory chapter's link rates on this card."""
    from lib.chapters.uvm import analysis as UA

    keys = ("read_fault_touched", "prefetch_h2d", "pinned_h2d", "read_pinned")
    df = UA.load(root)
    if df is None or card not in set(df["gpu_slug"]):
        return {f"u_{k}": math.nan for k in keys}
    h = UA.headline(df, card)
    return {f"u_{k}": h.get(k, math.nan) for k in keys}


def page_table_numbers(root, card: str) -> dict:
    """The page table's cost at block 16 and the small-block penalty, both shapes."""
    from lib.chapters.page_table import analysis as P

    out = {"pt_pc_llama": math.nan, "pt_pc_seed": math.nan, "pt_pen_lo": math.nan, "pt_pen_hi": math.nan,
           "pt_vllm_pen_lo": math.nan, "pt_vllm_pen_hi": math.nan}
    rows = _quiet(lambda: P.load(card, root=root), None)
    if rows is None:
        return out
    summ = P.ratio_summary(P.grid_ratios(rows)).set_index(["shape", "ratio_name"])
    for key, shape in P.SHAPE_PARAM.items():
        if (shape, "paged / contiguous") in summ.index:
            out[f"pt_pc_{key}"] = float(summ.loc[(shape, "paged / contiguous"), "median"])
    blocks = P.block_sizes(rows)
    for key, backend in (("pt_pen", P.PAGED), ("pt_vllm_pen", "vllm")):
        pen = _quiet(lambda: P.small_block_penalty(blocks, backend)["penalty"], pd.Series(dtype=float))
        if len(pen):
            out[f"{key}_lo"], out[f"{key}_hi"] = float(pen.min()), float(pen.max())
    return out


def kernel_numbers(root, card: str) -> dict:
    """Our paged kernel against dense SDPA at 32 x 4096 tokens, MHA and GQA (kernel chapter)."""
    from lib.harness import results as R

    out = {"k_mha_over_sdpa": math.nan, "k_gqa_over_sdpa": math.nan,
           "k_mha_kernel": Plain("unknown"), "k_gqa_kernel": Plain("unknown")}
    ks = _quiet(lambda: R.load("kernel_speed", card, root=root), None)
    if ks is None:
        return out
    for key, kv in (("mha", 32), ("gqa", 8)):
        point = frame.single_point(ks[(ks["batch_size"] == 32) & (ks["seq_len"] == 4096) & (ks["num_heads"] == 32)
                                  & (ks["num_kv_heads"] == kv) & (ks["status"] == "ok")]).set_index("backend")
        s = point["median_us"]
        if {"own-auto-paged", "sdpa_dense"} <= set(s.index):
            out[f"k_{key}_over_sdpa"] = float(s["own-auto-paged"] / s["sdpa_dense"])
            out[f"k_{key}_kernel"] = Plain(frame.kernels_used(point.reset_index()))
    # vLLM's FA3 and FlashInfer at the GQA point, from FA3's own sub-grid (one process, same point)
    out.update(k_gqa_fa3_over_sdpa=math.nan, k_gqa_fi_over_sdpa=math.nan)
    fa3 = ks[ks["point_key"].str.contains("vllm-fa3", regex=False) & (ks["batch_size"] == 32)
             & (ks["seq_len"] == 4096) & (ks["num_heads"] == 32) & (ks["num_kv_heads"] == 8)
             & (ks["status"] == "ok")]
    if len(fa3):
        s = frame.single_point(fa3).set_index("backend")["median_us"]
        if {"vllm-fa3", "flashinfer", "sdpa_dense"} <= set(s.index):
            out["k_gqa_fa3_over_sdpa"] = float(s["vllm-fa3"] / s["sdpa_dense"])
            out["k_gqa_fi_over_sdpa"] = float(s["flashinfer"] / s["sdpa_dense"])
    return out


def conclusions_numbers(root=None, gpu: str = "") -> dict:
    """Everything the conclusions glue, for one card (empty: the first card of the ladder)."""
    s = L.samples(root)
    t = L.summarize(s)
    cards = sorted(t["gpu_slug"].unique())
    card = gpu or cards[0]
    if card not in cards:
        raise ValueError(f"no ladder rows for {card!r} (have {cards})")
    names = L.card_names(cards, root)
    out: dict = {"card": Plain(names[card]), "cards": Plain(", ".join(names[c] for c in cards)),
                 "n_cards": len(cards), "n_rungs": int(t[t["gpu_slug"] == card]["rung"].nunique()),
                 "guard_pct": 100 * memory.DEFAULT_SAFETY_SHARE, "part": Plain(L.PART_LABEL)}
    out.update(ladder_numbers(s, t, card))
    out.update(offload_numbers(root, card))
    out.update(uvm_numbers(root, card))
    out.update(page_table_numbers(root, card))
    out.update(kernel_numbers(root, card))
    return out
