"""The cost ladder: every way this book measured a KV cache living, as decode time relative to the
same kernel on device memory, per card.

Each *rung* is one placement; its ratios come from one experiment's own device-memory baseline
(same kernel, same point, same run), so rungs from different experiments compare like with like:

* ``uvm_decode`` (:mod:`lib.chapters.uvm_decode.analysis`): managed memory resident, after a
  prefetch, and cold (every page on the host), over block sizes 1-256, three (tokens, batch)
  points, two shapes and three kernels;
* ``vmm_kv`` (:mod:`lib.chapters.vmm.analysis`): contiguous slots mapped with the CUDA VMM API;
* ``kv_offload`` (:mod:`lib.chapters.kv_offload.figures`): a share *f* of every sequence's blocks
  in host memory, reached five ways, two head layouts and two kernels; the ladder shows one share
  in the middle (:data:`PART`) and all of it.

:func:`samples` gives the ratios long-form (``gpu_slug, rung, ratio``), :func:`summarize` one row
per card and rung (median, min, max, how many). An experiment without committed rows adds no rungs.
"""

from __future__ import annotations

from fractions import Fraction

import pandas as pd

from lib.book import frame

#: The share of each sequence's blocks the ladder's middle group keeps on the host.
PART = 1 / 8
PART_LABEL = str(Fraction(PART).limit_denominator(1024))

GPU, SOME, ALL = "all on the GPU", f"{PART_LABEL} of each sequence on the host", "all on the host"
GROUPS = (GPU, SOME, ALL)

#: rung -> (label, group, experiment), in ladder order within each group.
RUNGS = {
    "device": ("device memory (cudaMalloc): the baseline", GPU, "every experiment"),
    "vmm": ("contiguous slots, CUDA VMM (cuMemCreate + cuMemMap)", GPU, "vmm_kv"),
    "managed": ("managed, resident (written by the GPU)", GPU, "uvm_decode"),
    "managed_prefetched": ("managed, prefetched back to the GPU", GPU, "uvm_decode"),
    "migrate_resident": ("managed, after its pages faulted back", GPU, "kv_offload"),
    "remote@part": ("managed + AccessedBy: read in place", SOME, "kv_offload"),
    "zero_copy@part": ("pinned host in a VMM split range: zero-copy", SOME, "kv_offload"),
    "explicit_copy@part": ("cudaMemcpy to the GPU, then the kernel", SOME, "kv_offload"),
    "prefetch_serial@part": ("prefetch, then the kernel", SOME, "kv_offload"),
    "overlap@part": ("prefetch \u2016 kernel (two streams)", SOME, "kv_offload"),
    "migrate_first@part": ("managed, pages fault in during the step", SOME, "kv_offload"),
    "zero_copy_hostalloc@all": ("pinned host (cudaHostAlloc): zero-copy", ALL, "kv_offload"),
    "zero_copy@all": ("pinned host in a VMM split range: zero-copy", ALL, "kv_offload"),
    "remote@all": ("managed + AccessedBy: read in place", ALL, "kv_offload"),
    "explicit_copy@all": ("cudaMemcpy to the GPU, then the kernel", ALL, "kv_offload"),
    "prefetch_serial@all": ("prefetch, then the kernel", ALL, "kv_offload"),
    "overlap@all": ("prefetch \u2016 kernel (two streams)", ALL, "kv_offload"),
    "migrate_first@all": ("managed, pages fault in during the step", ALL, "kv_offload"),
    "managed_cold": ("managed, cold: pages fault in (block sizes 1-256)", ALL, "uvm_decode"),
}

#: kv_offload variants on the ladder (migrate_resident is placed with the GPU rungs).
OFFLOAD_VARIANTS = ("remote", "zero_copy", "zero_copy_hostalloc", "explicit_copy", "prefetch_serial",
                    "overlap", "migrate_first")


def _long(df: pd.DataFrame, rung: str, col: str) -> pd.DataFrame:
    s = df[["gpu_slug", col]].dropna()
    return pd.DataFrame({"gpu_slug": s["gpu_slug"].to_numpy(), "rung": rung,
                         "ratio": s[col].astype(float).to_numpy()})


def uvm_decode_samples(w: pd.DataFrame) -> pd.DataFrame:
    """From :func:`lib.chapters.uvm_decode.analysis.wide`: one ratio per point and kernel."""
    parts = [_long(w, k, f"{k}_vs_device") for k in ("managed", "managed_prefetched", "managed_cold")
             if f"{k}_vs_device" in w.columns]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["gpu_slug", "rung", "ratio"])


def vmm_samples(k: pd.DataFrame) -> pd.DataFrame:
    """From :func:`lib.chapters.vmm.analysis.kernel_table`: VMM slots over the cudaMalloc pool."""
    return _long(k, "vmm", "vmm_over_device")


def kv_offload_samples(d: pd.DataFrame, *, part: float = PART) -> pd.DataFrame:
    """From :func:`lib.chapters.kv_offload.figures.with_baselines`: the slowdown of every variant at
    ``part`` and at 1 (all on the host); the resident pool at every share above 0."""
    out = []
    for v in OFFLOAD_VARIANTS:
        for tag, f in (("part", part), ("all", 1.0)):
            rung = f"{v}@{tag}"
            if rung in RUNGS:
                s = d[(d["variant"] == v) & ((d["fraction"].astype(float) - f).abs() < 1e-9)]
                out.append(_long(s, rung, "slowdown"))
    res = d[(d["variant"] == "migrate_resident") & (d["fraction"].astype(float) > 0)]
    out.append(_long(res, "migrate_resident", "slowdown"))
    return pd.concat(out, ignore_index=True)


def _try(load):
    try:
        return load()
    except (FileNotFoundError, ValueError):  # NoData is a FileNotFoundError
        return None


def samples(root=None) -> pd.DataFrame:
    """Every ratio of every rung on every card, from the committed rows under ``root``."""
    from lib.chapters.kv_offload import figures as KO
    from lib.chapters.uvm_decode import analysis as UD
    from lib.chapters.vmm import analysis as V

    parts = []
    w = _try(lambda: UD.wide(UD.load(root=root)))
    if w is not None:
        parts.append(uvm_decode_samples(w))
    k = _try(lambda: V.kernel_table(V.load(root=root)))
    if k is not None:
        parts.append(vmm_samples(k))
    d = _try(lambda: KO.with_baselines(KO.decode_frame(KO.load_rows(root=root))))
    if d is not None:
        parts.append(kv_offload_samples(d))
    if not parts:
        raise frame.NoData(f"no uvm_decode, vmm_kv or kv_offload rows under {root or 'data/results'}: "
                           "the conclusions draw on those chapters' committed measurements")
    s = pd.concat(parts, ignore_index=True)
    device = pd.DataFrame({"gpu_slug": sorted(s["gpu_slug"].unique()), "rung": "device", "ratio": 1.0})
    return pd.concat([device, s], ignore_index=True)


def summarize(s: pd.DataFrame) -> pd.DataFrame:
    """One row per card and rung: median, min, max and count of its ratios, with label, group,
    source and the rung's place in the ladder (groups in :data:`GROUPS` order, then by median)."""
    unknown = sorted(set(s["rung"]) - set(RUNGS))
    if unknown:
        raise ValueError(f"unknown rungs {unknown}")
    g = s.groupby(["gpu_slug", "rung"])["ratio"]
    t = pd.DataFrame({"median": g.median(), "min": g.min(), "max": g.max(), "n": g.size()}).reset_index()
    t["label"] = [RUNGS[r][0] for r in t["rung"]]
    t["group"] = [RUNGS[r][1] for r in t["rung"]]
    t["source"] = [RUNGS[r][2] for r in t["rung"]]
    first = sorted(t["gpu_slug"].unique())[0]
    rank = t[t["gpu_slug"] == first].set_index("rung")["median"]
    t["gi"] = [GROUPS.index(x) for x in t["group"]]
    t["rank"] = [0.0 if r == "device" else rank.get(r, float("inf")) for r in t["rung"]]
    return t.sort_values(["gi", "rank", "gpu_slug"]).drop(columns=["gi", "rank"]).reset_index(drop=True)


def ladder(root=None) -> pd.DataFrame:
    """:func:`summarize` of :func:`samples`."""
    return summarize(samples(root))


def card_names(slugs, root=None) -> dict[str, str]:
    """Each card's name from the provenance of whichever ladder experiment measured it."""
    out = {}
    for slug in slugs:
        for exp in ("uvm_decode", "kv_offload", "vmm_kv", "uvm"):
            try:
                out[slug] = frame.card_facts(slug, root=root, experiment=exp)["name"]
                break
            except (FileNotFoundError, ValueError):
                continue
        out.setdefault(slug, slug)
    return out


def _times(r: float) -> str:
    return f"{r:.2f}\u00d7" if r < 2 else (f"{r:.1f}\u00d7" if r < 20 else f"{r:.0f}\u00d7")


def table(t: pd.DataFrame, names: dict | None = None) -> pd.DataFrame:
    """The ladder as a table: one row per rung (group, placement, experiment), and per card its
    median, range and number of ratios, in words (``7.4×``, ``6.4× to 8.1×``)."""
    names = names or {}
    rungs = list(dict.fromkeys(t["rung"]))
    first = t.drop_duplicates("rung").set_index("rung")
    out = pd.DataFrame({"where": [first.loc[r, "group"] for r in rungs],
                        "placement": [first.loc[r, "label"] for r in rungs],
                        "experiment": [first.loc[r, "source"] for r in rungs]}, index=rungs)
    slugs = sorted(t["gpu_slug"].unique())
    for slug in slugs:
        d = t[t["gpu_slug"] == slug].set_index("rung")
        tag = f"{names.get(slug, slug)}: " if len(slugs) > 1 else ""
        out[f"{tag}median"] = [_times(d.loc[r, "median"]) if r in d.index else "\u2014" for r in rungs]
        out[f"{tag}range"] = [f"{_times(d.loc[r, 'min'])} to {_times(d.loc[r, 'max'])}" if r in d.index
                              else "\u2014" for r in rungs]
        out[f"{tag}ratios"] = [int(d.loc[r, "n"]) if r in d.index else 0 for r in rungs]
    return out.reset_index(drop=True)
