"""The committed measurements the primer quotes, per card.

Everything comes from the Unified Memory chapter's rows (``data/results/uvm/``, through
:func:`lib.chapters.uvm.analysis.headline`), its provenance (the device attributes each run
recorded), and, where committed, the decode chapter's rows (``uvm_decode``: what a cold cache
costs a real decode step). :func:`primer_numbers` returns one flat dict whose keys the chapter
glues as ``pr_<key>``; a value that no committed run measured is NaN, never a guess.
"""

from __future__ import annotations

import math

import pandas as pd

from lib.book import frame
from lib.chapters.primer import concepts as C
from lib.chapters.uvm import analysis as UA
from lib.engine import memory
from lib.harness import results as R

#: The paths the primer's bandwidth figure shows: (headline key, label, how the bytes get there).
PATHS = (
    ("read_device", "device memory (cudaMalloc)", "GPU memory"),
    ("read_managed_gpu", "managed, resident on the GPU", "GPU memory"),
    ("read_readmostly_warm", "managed, ReadMostly copy on the GPU", "GPU memory"),
    ("read_first_touch", "managed, first touch (pages created on the GPU)", "page creation"),
    ("pinned_h2d", "pinned cudaMemcpy host \u2192 GPU (the link)", "bulk copy"),
    ("prefetch_h2d", "cudaMemPrefetchAsync host \u2192 GPU", "bulk copy"),
    ("read_prefetch_then_read", "prefetch, then read (both timed)", "bulk copy"),
    ("read_pinned", "pinned host, zero-copy reads", "read in place"),
    ("read_mapped", "managed on host + AccessedBy, reads", "read in place"),
    ("read_fault_prefetched", "managed on host, faults (host-prefetched pages)", "page faults"),
    ("read_fault_touched", "managed on host, faults (CPU-written pages)", "page faults"),
    ("read_readmostly_cold", "managed, ReadMostly: first read (faults + copy)", "page faults"),
)
MECHANISMS = ("GPU memory", "page creation", "bulk copy", "read in place", "page faults")


def load_uvm(root=None) -> pd.DataFrame:
    """The ``uvm`` rows, or :class:`lib.book.frame.NoData` saying how to measure them."""
    df = UA.load(root)
    if df is None:
        raise frame.NoData(f"No uvm measurements in {R.results_root(root)}: {frame.rerun_hint('uvm')}")
    return df


def cards(df: pd.DataFrame) -> list[str]:
    """The cards measured, H100s first (the cards the committed prose was written from)."""
    return sorted(df["gpu_slug"].unique(), key=lambda s: ("h100" not in s, s))


def _latest_run(card: str, root=None) -> dict:
    runs = R.load_provenance("uvm", card, root=root)
    return runs[max(runs)] if runs else {}


def device_attributes(card: str, root=None) -> dict:
    """The managed-memory device attributes of the card's latest ``uvm`` run ({} if unrecorded)."""
    p = _latest_run(card, root)
    return dict(p.get("managed_memory") or p.get("uvm_device_facts") or {})


def paths_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per card and path of :data:`PATHS`: label, mechanism, GB/s (at the largest size)."""
    rows = []
    for card in cards(df):
        h = UA.headline(df, card)
        for order, (key, label, mech) in enumerate(PATHS):
            v = h.get(key, float("nan"))
            if isinstance(v, float) and math.isfinite(v):
                rows.append({"gpu_slug": card, "key": key, "label": label, "mechanism": mech,
                             "gbps": v, "order": order})
    if not rows:
        raise ValueError("no uvm read or transfer rows to draw the access paths from")
    return pd.DataFrame(rows)


def _decode_numbers(card: str, root=None) -> dict:
    """What a cold KV cache cost a real decode step on this card (NaN without ``uvm_decode`` rows)."""
    from lib.chapters.uvm_decode import analysis as UD

    out = {"cold_median_x": math.nan, "cold_max_x": math.nan, "resident_worst_pct": math.nan,
           "prefetched_worst_pct": math.nan, "decode_points": 0}
    try:
        w = UD.wide(UD.load(card, root=root))
    except (FileNotFoundError, ValueError):
        return out
    if len(w) and "managed_cold_vs_device" in w:
        out["cold_median_x"] = float(w["managed_cold_vs_device"].median())
        out["cold_max_x"] = float(w["managed_cold_vs_device"].max())
        out["resident_worst_pct"] = float(100 * (w["managed_vs_device"] - 1).abs().max())
        out["prefetched_worst_pct"] = float(100 * (w["managed_prefetched_vs_device"] - 1).abs().max())
        out["decode_points"] = int(w["managed_cold_vs_device"].notna().sum())
    return out


def primer_numbers(root=None, gpu: str = "") -> dict:
    """The primer's numbers for one card (``gpu``; empty: the first card of :func:`cards`)."""
    df = load_uvm(root)
    have = cards(df)
    card = gpu or have[0]
    if card not in have:
        raise ValueError(f"no uvm rows for {card!r} (have {have})")
    h = UA.headline(df, card)
    facts = frame.card_facts(card, root=root, experiment="uvm")
    attrs = device_attributes(card, root)
    out: dict = {"card": facts["name"], "slug": card, "cards": len(have),
                 "guard_pct": 100 * memory.DEFAULT_SAFETY_SHARE}
    out.update({k: h.get(k, math.nan) for k in (
        "read_device", "read_managed_gpu", "read_readmostly_warm", "read_first_touch", "read_pinned",
        "read_mapped", "read_fault_touched", "read_fault_prefetched", "read_readmostly_cold",
        "read_prefetch_then_read", "prefetch_h2d", "pinned_h2d", "pageable_h2d", "read_size_gib",
        "managed_over_device", "device_over_fault", "cpu_after_gpu_write", "cpu_host_resident",
        "gran_size_gib", "gran_4k_meminfo_mib", "gran_64k_meminfo_mib", "gran_2m_meminfo_mib",
        "gran_4k_touched_mib", "gran_64k_touched_mib", "gran_2m_touched_mib",
        "gran_4k_prefetch_mib", "gran_64k_prefetch_mib", "gran_2m_prefetch_mib",
        "gran_4k_ms", "gran_64k_ms", "gran_2m_ms")})
    total = (_latest_run(card, root).get("gpu") or {}).get("memory_total_bytes")
    out["memory_total_bytes"] = float(total) if total else math.nan
    out["concurrent_managed_access"] = attrs.get("concurrent_managed_access")
    out["pageable_memory_access"] = attrs.get("pageable_memory_access")
    out["uses_host_page_tables"] = attrs.get("pageable_memory_access_uses_host_page_tables")
    out["fault_pct_of_link"] = 100 * out["read_fault_touched"] / out["pinned_h2d"]
    out["prefetch_pct_of_link"] = 100 * out["prefetch_h2d"] / out["pinned_h2d"]
    out["overhead_us_per_2m"] = C.fault_overhead_us(2 * C.MiB, out["read_fault_touched"], out["pinned_h2d"])
    out["overhead_us_per_4k"] = C.fault_overhead_us(4 * C.KiB, out["read_fault_touched"], out["pinned_h2d"])
    out["host_byte_cost"] = C.host_byte_cost(out["read_device"], out["pinned_h2d"])
    out["gran_64k_amplification"] = out["gran_64k_meminfo_mib"] / out["gran_64k_touched_mib"]
    out["gran_2m_amp_meminfo"] = out["gran_2m_meminfo_mib"] / out["gran_2m_touched_mib"]
    out["gran_2m_amp_prefetch"] = out["gran_2m_prefetch_mib"] / out["gran_2m_touched_mib"]
    out.update(_decode_numbers(card, root))
    return out
