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
        flagged = guards.flag_above_link_limit(sub, "bandwidth_gbps", limit,
                                               crosses=crosses[out.index.get_indexer(idx)])
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


def coinciding_reads(table, tol: float = 0.05) -> list[dict]:
    """The gpu_read states whose lines lie on top of each other in the read figure.

    Labels join a group (in :data:`READ_LABELS` order) when every bandwidth of theirs is within
    ``tol`` of the group's at the same card and size, on every card and size both have. Returns
    one dict per group of two or more: ``labels``, ``spread`` (the largest max/min - 1 over all
    points) and ``spread_largest`` (the same at each card's largest size)."""
    p = table.pivot_table(index=["gpu_slug", "size_mib"], columns="label", values="bandwidth_gbps")
    order = [lab for lab in READ_LABELS.values() if lab in p.columns]
    groups: list[list[str]] = []

    def spread(cols, rows=None):
        q = p[cols] if rows is None else p.loc[rows, cols]
        q = q.dropna()
        return float((q.max(axis=1) / q.min(axis=1) - 1).max()) if len(q) else np.inf

    for lab in order:
        for g in groups:
            if spread(g + [lab]) <= tol:
                g.append(lab)
                break
        else:
            groups.append([lab])
    largest = [(slug, float(p.loc[slug].index.max())) for slug in p.index.get_level_values(0).unique()]
    return [{"labels": g, "spread": spread(g), "spread_largest": spread(g, largest)}
            for g in groups if len(g) > 1]


def coinciding_sentence(groups: list[dict]) -> str:
    """The read figure's caption note on its coinciding lines, from :func:`coinciding_reads`."""
    if not groups:
        return "No two lines coincide."
    parts = []
    for g in groups:
        names = [f"“{lab}”" for lab in g["labels"]]  # quoted: the labels have commas of their own
        who = ", ".join(names[:-1]) + " and " + names[-1]
        parts.append(f"{who} read within {100 * g['spread']:.1f}% of each other at every size "
                     f"({100 * g['spread_largest']:.1f}% at the largest)")
    return ("Some lines lie on top of each other; their markers are drawn side by side: "
            + "; ".join(parts) + ".")


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


# ----------------------------------------------------------------------------- two cards

#: The ceilings compared across cards: headline key, label, and what bounds it. "HBM": bytes that
#: stay in GPU memory, so it should scale with the memory bandwidth (H200/H100 = 1.43 by datasheet);
#: "link": bytes that cross PCIe Gen5 x16, the same on both hosts, so it should not move;
#: "fault": the driver's fault handling on the host CPU sets it (it crosses the link too, far below
#: its limit), so it follows the host and driver, not the card.
CARD_RATES = [
    ("read_device", "read, device memory", "HBM"),
    ("read_managed_gpu", "read, managed prefetched to GPU", "HBM"),
    ("read_readmostly_warm", "read, ReadMostly copy", "HBM"),
    ("pinned_h2d", "cudaMemcpy pinned host → GPU", "link"),
    ("pinned_d2h", "cudaMemcpy GPU → pinned host", "link"),
    ("prefetch_h2d", "prefetch host → GPU", "link"),
    ("read_pinned", "read, pinned zero-copy", "link"),
    ("read_mapped", "read, managed on host (AccessedBy)", "link"),
    ("read_prefetch_then_read", "prefetch to GPU, then read", "link"),
    ("read_fault_touched", "read, fault-driven (CPU-written)", "fault"),
    ("read_fault_prefetched", "read, fault-driven (prefetched to host)", "fault"),
    ("read_readmostly_cold", "read, ReadMostly first touch", "fault"),
    ("read_first_touch", "read, first touch (pages created on GPU)", "fault"),
    ("prefetch_d2h", "prefetch GPU → host", "fault"),
]
BOUND_ORDER = ("HBM", "link", "fault")


def card_comparison(heads: dict[str, dict[str, float]], cards: list[str]) -> "pd.DataFrame":
    """One row per :data:`CARD_RATES` entry: each card's rate (GB/s) and, with two cards, the
    second over the first: what the chapter's "which ceiling moves with the card" rests on."""
    import pandas as pd

    rows = []
    for key, label, bound in CARD_RATES:
        r = {"key": key, "label": label, "bound": bound}
        for c in cards:
            r[c] = float(heads.get(c, {}).get(key, float("nan")))
        if len(cards) >= 2:
            r["ratio"] = r[cards[1]] / r[cards[0]]
        rows.append(r)
    return pd.DataFrame(rows)


def load_runs(root=None):
    """Every run's rows (no dedupe: repeats kept), guarded, with ``card_id`` (the physical card);
    None without data."""
    from lib.book import frame
    from lib.harness import results as R

    try:
        df = R.load("uvm", root=root, expand_extra=True, dedupe=False)
    except FileNotFoundError:
        return None
    if not len(df):
        return None
    return frame.with_physical_card(with_link_guard(df), "uvm", root=root)


#: The headline rates whose spread between physical cards the chapter shows (the repeat run
#: re-measured gpu_read only).
SPREAD_RATES = ["read_device", "read_managed_gpu", "read_fault_touched", "read_fault_prefetched",
                "read_readmostly_cold", "read_first_touch", "read_prefetch_then_read"]


def run_headlines(runs, keys=SPREAD_RATES):
    """``keys`` of :func:`headline` per run (one column each, labelled by card model and physical
    card): the between-card spread, which a difference between models must exceed to be one."""
    import pandas as pd

    from lib.book import frame

    cols = {}
    for run_id, g in runs.groupby("run_id", sort=True):
        slug = g["gpu_slug"].iloc[0]
        h = headline(g, slug)
        cid = g["card_id"].iloc[0] if "card_id" in g.columns else ""
        cols[(frame.card_label(slug), cid or run_id)] = {k: h.get(k, float("nan")) for k in keys}
    out = pd.DataFrame(cols)
    out.columns = pd.MultiIndex.from_tuples(out.columns, names=["card", "physical card"])
    return out


def spread_within(table, card_label: str) -> "pd.Series":
    """(max - min) / min of each rate over one model's physical cards (NaN with fewer than two)."""
    sub = table.xs(card_label, axis=1, level="card") if card_label in table.columns.get_level_values(0) else None
    if sub is None or sub.shape[1] < 2:
        return table.iloc[:, 0] * float("nan")
    return (sub.max(axis=1) - sub.min(axis=1)) / sub.min(axis=1)


def raw_granularity_bandwidth(root=None) -> dict[str, float]:
    """The largest bandwidth each card's granularity rows *stored* (before :func:`with_link_guard`
    blanks it; NaN where none was stored): the issue-14 check that no such number reaches a page."""
    from lib.harness import results as R

    df = R.load("uvm", root=root, expand_extra=True, dedupe=False)
    g = df[df["measurement"] == "granularity"]
    return {s: float(x["bandwidth_gbps"].astype(float).max()) for s, x in g.groupby("gpu_slug")}


# ----------------------------------------------------------------------------- exercises

def exercise_solutions(h: dict, card: str, root=None) -> dict:
    """The chapter's worked solutions on ``card`` (the primer's :func:`uvm_solutions`, its offload
    exercise read from that card's kv_offload rows)."""
    from lib.chapters.primer import exercises as X

    return X.uvm_solutions(h, root=root, card=card or None)


def within_run_spread(df, gpu_slug: str, memory_kind: str, phase: str) -> float:
    """(p90 - p10) / median time of one gpu_read state at the largest size on ``gpu_slug``: the
    noise inside a run, below which no difference between cards is a finding."""
    g = _pick(df[(df["gpu_slug"] == gpu_slug) & (df["measurement"] == "gpu_read")],
              memory_kind=memory_kind, phase=phase)
    if g.empty:
        return float("nan")
    r = g.loc[g["nbytes"].astype("int64").idxmax()]
    return float((r["p90_us"] - r["p10_us"]) / r["median_us"])


def comparison_numbers(df, runs, cards: list[str], sheet_gbps: dict[str, float]) -> dict[str, float]:
    """What the two-card section quotes (NaN where a card or a run is missing):

    ``r_<key>``: second card over first for each :data:`CARD_RATES` key; ``hbm_lo/hi``,
    ``link_lo/hi``: the range of those ratios per bound; ``sheet_ratio`` and ``pct_sheet_<i>``: the
    datasheet HBM ratio and each card's device read as a share of its datasheet peak (``i`` = 0, 1);
    ``noise_<key>_<i>``: p10-p90 spread inside card i's run; ``spread_<key>``, ``lo_<key>``,
    ``hi_<key>``: the spread and range over the second card's physical cards (its repeat)."""
    from lib.book import frame

    nan = float("nan")
    heads = {c: headline(df, c) for c in cards}
    cmp = card_comparison(heads, cards)
    out: dict[str, float] = {}
    two = len(cards) >= 2
    for _, r in cmp.iterrows():
        out[f"r_{r['key']}"] = float(r["ratio"]) if two else nan
    for b in ("HBM", "link"):
        rr = cmp.loc[cmp["bound"] == b, "ratio"] if two else None
        out[f"{b.lower()}_lo"] = float(rr.min()) if two else nan
        out[f"{b.lower()}_hi"] = float(rr.max()) if two else nan
    s = [float(sheet_gbps.get(c) or nan) for c in cards]  # None: no datasheet for that card
    out["sheet_ratio"] = s[1] / s[0] if two else nan
    for i, c in enumerate(cards[:2]):
        out[f"pct_sheet_{i}"] = 100 * heads[c]["read_device"] / s[i]
        for key, kind, phase in (("fault_touched", "managed_host_touched", "cold"),
                                 ("fault_prefetched", "managed_host", "cold"),
                                 ("first_touch", "managed", "cold")):
            out[f"noise_{key}_{i}"] = 100 * within_run_spread(df, c, kind, phase)
    if two and runs is not None:
        t = run_headlines(runs)
        lab = frame.card_label(cards[1])
        spread = spread_within(t, lab)
        sub = t.xs(lab, axis=1, level="card") if lab in t.columns.get_level_values(0) else None
        for key in SPREAD_RATES:
            out[f"spread_{key}"] = 100 * float(spread.get(key, nan))
            out[f"lo_{key}"] = float(sub.loc[key].min()) if sub is not None else nan
            out[f"hi_{key}"] = float(sub.loc[key].max()) if sub is not None else nan
        out["physical_cards"] = float(sub.shape[1]) if sub is not None else nan
    return out


def cpu_noise(df, gpu_slug: str) -> float:
    """The widest (p90 - p10) / median of the CPU-side rows at their largest size on one card's
    host: how far apart two hosts' CPU rates must be before they differ."""
    c = df[(df["gpu_slug"] == gpu_slug) & (df["measurement"] == "cpu_read")]
    if c.empty:
        return float("nan")
    c = c[c["nbytes"] == c["nbytes"].max()]
    return float(((c["p90_us"] - c["p10_us"]) / c["median_us"]).max())
