"""Worked solutions of the Unified Memory exercises (the primer's and the UVM chapter's).

Each solution quotes the book's own numbers: :func:`primer_solutions` works from
:func:`lib.chapters.primer.numbers.primer_numbers`, :func:`uvm_solutions` from the UVM chapter's
headline (:func:`lib.chapters.uvm.analysis.headline`) and, for the offload exercise, the committed
``kv_offload`` rows. Both return ``{name: text}`` ready for ``{glue:text}``; a number that no
committed run measured reads as a dash, so a chapter without data still builds.
"""

from __future__ import annotations

import math

from lib.book.frame import Plain
from lib.chapters.primer import concepts as C

DASH = "\u2014"


def fmt(value, spec: str = ".1f") -> Plain:
    """``value`` formatted with ``spec``, or a dash when it is missing or not finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return Plain(DASH)
    if not math.isfinite(v):
        return Plain(DASH)
    return Plain(format(v, spec).replace(",", "\u202f"))  # Plain keeps "1.000" as it is


def _get(d: dict, key: str) -> float:
    v = d.get(key, math.nan)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def primer_solutions(n: dict) -> dict[str, Plain]:
    """The primer's solutions, from :func:`lib.chapters.primer.numbers.primer_numbers`."""
    out: dict[str, Plain] = {}
    # 1: translations to map all of the card's memory (a KV cache that fills the GPU)
    total = _get(n, "memory_total_bytes")
    known = math.isfinite(total) and total > 0
    out["map_size"] = Plain(C.size_label(total) if known else DASH)
    for label, b, _ in C.PAGE_SIZES:
        out[f"pages_{label.replace(' ', '').lower()}"] = fmt(C.pages_to_map(int(total), b) if known else math.nan,
                                                             ",.0f")
    out["pages_ratio"] = fmt((2 * C.MiB) // (4 * C.KiB), ".0f")
    # 2: the driver's share of a migration
    fault, link, dev = _get(n, "read_fault_touched"), _get(n, "pinned_h2d"), _get(n, "read_device")
    out["gib_fault_ms"] = fmt(1e3 * C.seconds(C.GiB, fault), ".0f")
    out["gib_link_ms"] = fmt(1e3 * C.seconds(C.GiB, link), ".1f")
    out["gib_overhead_share"] = fmt(100 * (1 - C.seconds(C.GiB, link) / C.seconds(C.GiB, fault)), ".0f")
    out["per_2m_us"] = fmt(_get(n, "overhead_us_per_2m"), ".0f")
    out["per_4k_us"] = fmt(_get(n, "overhead_us_per_4k"), ".2f")
    out["blocks_per_gib"] = fmt(C.GiB / (2 * C.MiB), ".0f")
    # 3: granularity
    out["g64_touched"] = fmt(_get(n, "gran_64k_touched_mib"), ".0f")
    out["g64_moved"] = fmt(_get(n, "gran_64k_meminfo_mib"), ".0f")
    out["g64_amp"] = fmt(_get(n, "gran_64k_amplification"), ".0f")
    out["g64_prefetch"] = fmt(_get(n, "gran_64k_prefetch_mib"), ".0f")
    out["density_pct"] = fmt(100 * (4 * C.KiB) / (64 * C.KiB), ".2f")
    out["g2m_touched"] = fmt(_get(n, "gran_2m_touched_mib"), ".0f")
    out["g2m_meminfo"] = fmt(_get(n, "gran_2m_meminfo_mib"), ".0f")
    out["g2m_prefetch"] = fmt(_get(n, "gran_2m_prefetch_mib"), ".0f")
    out["g2m_amp_lo"] = fmt(_get(n, "gran_2m_amp_prefetch"), ".0f")
    out["g2m_amp_hi"] = fmt(_get(n, "gran_2m_amp_meminfo"), ".0f")
    out["gran_gib"] = fmt(_get(n, "gran_size_gib"), ".0f")
    # 4: a decode step 10 % larger than GPU memory
    over = 1.1
    capacity = 400
    ws = round(over * capacity)
    lru = C.scan_misses(ws, capacity, policy="lru")
    keep = C.scan_misses(ws, capacity, policy="keep")
    out["over_pct"] = fmt(100 * (over - 1), ".0f")
    out["lru_miss_pct"] = fmt(100 * lru, ".0f")
    out["keep_miss_pct"] = fmt(100 * keep, ".0f")
    out["lru_slowdown"] = fmt(C.pass_slowdown(lru, dev, fault), ".0f")
    out["keep_slowdown"] = fmt(C.pass_slowdown(keep, dev, fault), ".0f")
    out["dev_over_fault"] = fmt(dev / fault if fault > 0 else math.nan, ".0f")
    # 5: what the tour should show on the committed card
    out["resident_ratio"] = fmt(_get(n, "managed_over_device"), ".3f")
    out["fault_pct_link"] = fmt(_get(n, "fault_pct_of_link"), ".0f")
    out["prefetch_pct_link"] = fmt(_get(n, "prefetch_pct_of_link"), ".0f")
    out["readmostly_cold"] = fmt(_get(n, "read_readmostly_cold"), ".1f")
    out["mapped"] = fmt(_get(n, "read_mapped"), ".1f")
    # 6: the platform
    out["cma"] = fmt(n.get("concurrent_managed_access"), ".0f")
    out["pma"] = fmt(n.get("pageable_memory_access"), ".0f")
    return out


def _offload(root, card: str | None, backend: str = "own-auto-paged") -> dict[str, float]:
    """Slowdowns of reading host blocks in place (MHA), from ``card``'s committed ``kv_offload``
    rows (None: the first card that has them; every card holds its own row of each point)."""
    from lib.chapters.kv_offload import figures as KO

    out = {"s_quarter": math.nan, "s_all": math.nan, "zc_quarter": math.nan, "zc_all": math.nan}
    try:
        d = KO.with_baselines(KO.decode_frame(KO.load_rows(card, root=root)))
    except (FileNotFoundError, ValueError):
        return out
    if d.empty:
        return out
    d = d[d["gpu_slug"] == (card or sorted(d["gpu_slug"].unique())[0])]
    mha = d[(d["backend"] == backend) & (d["heads"] == KO.HEAD_LABELS[(32, 32)])]
    for key, variant in (("s", "remote"), ("zc", "zero_copy")):
        out[f"{key}_quarter"] = KO.pick(mha, "slowdown", variant=variant, fraction=0.25)
        out[f"{key}_all"] = KO.pick(mha, "slowdown", variant=variant, fraction=1.0)
    return out


def uvm_solutions(h: dict, root=None, card: str | None = None) -> dict[str, Plain]:
    """The UVM chapter's solutions, from its headline numbers ``h`` (``{}`` without data) and, for
    the offload exercise, ``card``'s kv_offload rows (None: the first card's)."""
    out: dict[str, Plain] = {}
    pinned, fault = _get(h, "pinned_h2d"), _get(h, "read_fault_touched")
    prefetch, zc, dev = _get(h, "prefetch_h2d"), _get(h, "read_pinned"), _get(h, "read_device")
    mapped = _get(h, "read_mapped")
    # 1: predict, then check
    copy_ms, fault_ms = 1e3 * C.seconds(C.GiB, pinned), 1e3 * C.seconds(C.GiB, fault)
    out["copy_ms"] = fmt(copy_ms, ".1f")
    out["fault_ms"] = fmt(fault_ms, ".0f")
    out["copy_share"] = fmt(100 * copy_ms / fault_ms, ".0f")
    out["handling_ms"] = fmt(fault_ms - copy_ms, ".0f")
    # 2: break-even reads
    r_zc = C.prefetch_break_even(prefetch, zc, dev)
    r_mapped = C.prefetch_break_even(prefetch, mapped, dev)
    out["r_zc"] = fmt(r_zc, ".2f")
    out["r_mapped"] = fmt(r_mapped, ".2f")
    out["r_wins"] = fmt(math.floor(r_zc) + 1 if math.isfinite(r_zc) else math.nan, ".0f")
    # 3: card or link
    link = [v for v in (pinned, prefetch, zc, mapped) if math.isfinite(v)]
    out["link_lo"] = fmt(min(link) if link else math.nan, ".1f")
    out["link_hi"] = fmt(max(link) if link else math.nan, ".1f")
    out["hbm_over_link"] = fmt(dev / pinned if pinned > 0 else math.nan, ".0f")
    # 4: granularity at 16 KiB
    for tag in ("4k", "64k"):
        out[f"g{tag}_moved"] = fmt(_get(h, f"gran_{tag}_meminfo_mib"), ".0f")
        out[f"g{tag}_ms"] = fmt(_get(h, f"gran_{tag}_ms"), ".0f")
    out["g64k_touched"] = fmt(_get(h, "gran_64k_touched_mib"), ".0f")
    out["g16k_touched"] = fmt(_get(h, "gran_size_gib") * 1024 / 4, ".0f")
    # 5: ReadMostly under writes
    out["rm_cold"] = fmt(_get(h, "read_readmostly_cold"), ".1f")
    out["rm_warm"] = fmt(_get(h, "read_readmostly_warm"), ".0f")
    out["refault_64k_us"] = fmt(1e6 * C.seconds(64 * C.KiB, fault), ".1f")
    # 6: a quarter of the cache on the host
    o = _offload(root, card)
    f, n_all, measured = 0.25, o["s_all"], o["s_quarter"]
    serial, overlap = (1 - f) + f * n_all, max(1 - f, f * n_all)
    out["s_quarter"] = fmt(measured, ".1f")
    out["s_all"] = fmt(n_all, ".1f")
    out["s_serial"] = fmt(serial, ".1f")
    out["s_overlap"] = fmt(overlap, ".1f")
    out["zc_quarter"] = fmt(o["zc_quarter"], ".1f")
    if math.isfinite(measured) and math.isfinite(n_all):
        near_overlap = abs(measured - overlap) <= abs(measured - serial)
        out["s_closer"] = Plain(
            "the overlap model: the kernel reads its device blocks while it waits on the bus, so "
            "the host quarter alone sets the step" if near_overlap else
            "the serial model: the two parts add up, the kernel does not hide its device reads "
            "behind the bus")
    else:
        out["s_closer"] = Plain(DASH)
    return out
