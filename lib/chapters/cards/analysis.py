"""The chapter "One chip, two memories": the H100 and the H200 side by side.

The chapter has no experiment of its own. It reads the other experiments' committed rows and
provenance (through their chapters' loaders and analyses) and pairs each quantity across the two
cards. Four rules run through it:

* **The same code only.** Our kernels record their launch plan (``extra["plan"]``); at the H200's
  commit ``own-auto`` picks the v3 kernel for grouped heads where the H100's commit had only v1/v2,
  so a pair whose plans differ is a different kernel, not a different card (:func:`same_plan`).
* **Rates from times.** For the same bytes, H200 / H100 of a rate is t(H100) / t(H200); its
  interval takes the p10 and p90 of both (:func:`time_ratios`).
* **Each model's primary run.** Where a model ran an experiment more than once, the run with the
  most rows (the newest of equals) is its data; the other runs serve the spread (:func:`primary`).
* **The spread decides.** A difference is a finding only beyond the spread: within a run
  (p10 to p90), between processes on one card, between physical cards of one model
  (:func:`spread_cases`).
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd

from lib.book import frame
from lib.harness import provenance
from lib.harness import results as R

#: The card compared against (the one all chapters were first measured on) and the new one.
BASE, OTHER = "h100-80gb-hbm3", "h200"
#: What makes two decode rows the same measurement, whatever experiment they came from.
DECODE_KEYS = ["backend", "batch_size", "seq_len", "num_heads", "num_kv_heads", "head_size",
               "block_size", "dtype", "placement", "memory_kind", "protocol", "plan"]
#: The groups of the summary figure: what should bound a quantity if the cards differ only in HBM.
GROUPS = {"hbm": "on the GPU: reads and decode steps", "link": "across the host link: copies, faults, remote reads",
          "cost": "a cost within one card (a time over a time)"}
#: Run ids of a sharded sweep: several worker processes sharing one card (``...-d0w3``).
WORKER_RUN = re.compile(r"-d\d+w\d+$")


# ----------------------------------------------------------------------------- shared pieces

def with_plan(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``plan`` column: our kernels' launch plan from ``extra`` ("" where none is
    recorded, e.g. vLLM and SDPA), so that plans can be compared and merged on."""
    out = rows.copy()
    out["plan"] = [str(e.get("plan") or "") if isinstance(e, dict) else "" for e in out["extra"]]
    return out


def primary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per card model, the rows of its primary run: the one with the most rows (the newest of
    equals). Repeats in other runs are kept for the spread, not mixed into the comparison."""
    keep = []
    for _, g in rows.groupby("gpu_slug"):
        n = g.groupby("run_id").size().reset_index(name="n").sort_values(["n", "run_id"])
        keep.append(g[g["run_id"] == n["run_id"].iloc[-1]])
    if not keep:
        raise ValueError("no rows to pick a primary run from")
    return pd.concat(keep)


def time_ratios(base: pd.DataFrame, other: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    """Per matching row: ``ratio`` = base time / other time (the other card's rate over the base
    card's, for the same bytes), ``lo`` and ``hi`` from the p10 and p90 of both."""
    cols = ["median_us", "p10_us", "p90_us"]
    m = base[on + cols].merge(other[on + cols], on=on, suffixes=("_b", "_o"))
    m["ratio"] = m["median_us_b"] / m["median_us_o"]
    m["lo"] = m["p10_us_b"] / m["p90_us_o"]
    m["hi"] = m["p90_us_b"] / m["p10_us_o"]
    return m


def same_plan(base: pd.DataFrame, other: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    """The keys ``on`` with ``same_code``: whether the launch plans recorded on the two cards are
    the same (rows with no plan, such as vLLM's, compare equal)."""
    b = base.groupby(on)["plan"].agg(lambda s: tuple(sorted(set(s)))).rename("plan_b")
    o = other.groupby(on)["plan"].agg(lambda s: tuple(sorted(set(s)))).rename("plan_o")
    m = pd.concat([b, o], axis=1, join="inner").reset_index()
    m["same_code"] = m["plan_b"] == m["plan_o"]
    return m


def short_id(card_id: str) -> str:
    """The first six hex digits of a card's uuid hash: enough to tell this study's cards apart
    (two of them share their first four)."""
    return f"{str(card_id)[:6]}…" if card_id else "unrecorded"


def two_cards(rows: pd.DataFrame, base: str, other: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of each card; ValueError naming what is there when one has none."""
    have = sorted(rows["gpu_slug"].unique())
    if base not in have or other not in have:
        raise ValueError(f"need rows of both {base!r} and {other!r}, have {have}")
    return rows[rows["gpu_slug"] == base], rows[rows["gpu_slug"] == other]


def summarize(points: pd.DataFrame) -> dict:
    """One quantity from its per-point ratios: the median; the bar is the point's p10-p90
    interval where there is one point, else the 25th to 75th percentile over the points."""
    r = points["ratio"].dropna()
    if r.empty:
        return {"n": 0, "ratio": math.nan, "lo": math.nan, "hi": math.nan, "values": []}
    if len(r) == 1:
        i = r.index[0]
        return {"n": 1, "ratio": float(r.iloc[0]), "lo": float(points.loc[i, "lo"]),
                "hi": float(points.loc[i, "hi"]), "values": [float(r.iloc[0])]}
    return {"n": int(len(r)), "ratio": float(r.median()), "lo": float(r.quantile(0.25)),
            "hi": float(r.quantile(0.75)), "values": [float(v) for v in r]}


# ----------------------------------------------------------------------------- ceilings

def experiments_with_runs(root=None) -> list[str]:
    """Every experiment of the results directory with run provenance."""
    base = R.results_root(root)
    return sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob("*.json")))


def run_ceilings(root=None) -> pd.DataFrame:
    """One row per run that measured ceilings: its card (model and physical ``card_id``), the read
    and copy ceilings (GB/s; ``*_lo``/``*_hi`` at the p90/p10 time) and the datasheet peak.

    ``copy_split``: the copy ran as graph memcpy nodes of at most 256 MiB. The harness split its
    copies (commit 316e795) after a single graph node of 512 MiB or more had run at ~80 % of a
    stream copy on the H100; the same commit started recording ``ceilings.measure_s``, which is
    how an older run is told apart. Only split copies are comparable across cards.
    ``shared``: a sharded sweep's worker (several processes timing on one card at once, so its
    p90 holds the other workers' kernels); kept in the table, left out of the spreads."""
    rows = []
    for exp in experiments_with_runs(root):
        for run_id, p in R.load_provenance(exp, root=root).items():
            c, g = p.get("ceilings") or {}, p.get("gpu") or {}
            if not c.get("read_gbps"):
                continue
            read, copy = c.get("read") or {}, c.get("copy") or {}
            nbytes, copied = float(c.get("nbytes") or math.nan), 2.0 * float(copy.get("bytes_copied") or math.nan)
            sheet = p.get("datasheet") or provenance.datasheet(g.get("name"), g.get("pcie"))
            rows.append({
                "experiment": exp, "run_id": run_id, "gpu_slug": R.gpu_slug(g.get("name") or "unknown"),
                "card_id": g.get("uuid_sha16") or "", "shared": bool(WORKER_RUN.search(run_id)),
                "read_gbps": float(c["read_gbps"]),
                "read_lo": nbytes / float(read.get("p90_us") or math.nan) / 1e3,
                "read_hi": nbytes / float(read.get("p10_us") or math.nan) / 1e3,
                "copy_gbps": float(c.get("copy_gbps") or math.nan),
                "copy_lo": copied / float(copy.get("p90_us") or math.nan) / 1e3,
                "copy_hi": copied / float(copy.get("p10_us") or math.nan) / 1e3,
                "copy_split": "measure_s" in c,
                "read_nbytes": nbytes, "copy_nbytes": float(copy.get("bytes_copied") or math.nan),
                "pcie_link": sheet.get("pcie_link") or "",
                "datasheet_hbm_gbps": float(sheet.get("hbm_gbps") or math.nan),
                "datasheet_pcie_gbps": float(sheet.get("pcie_gbps_per_direction") or math.nan)})
    if not rows:
        raise frame.NoData(f"no run in {R.results_root(root)} recorded ceilings")
    return pd.DataFrame(rows).sort_values(["gpu_slug", "card_id", "run_id"]).reset_index(drop=True)


def card_ceilings(ceil: pd.DataFrame) -> pd.DataFrame:
    """Per physical card (runs of sharded sweeps left out): runs, experiments, the read ceiling's
    median and range over its runs, its median within-run spread (p10-p90 over the median), and
    the median split-copy ceiling (NaN where no run split its copy)."""
    c = ceil[~ceil["shared"]].copy()
    c["read_width"] = (c["read_hi"] - c["read_lo"]) / c["read_gbps"]
    out = c.groupby(["gpu_slug", "card_id"]).agg(
        runs=("run_id", "size"), experiments=("experiment", lambda e: ", ".join(sorted(set(e)))),
        read_gbps=("read_gbps", "median"), read_min=("read_gbps", "min"), read_max=("read_gbps", "max"),
        read_width=("read_width", "median"), datasheet_hbm_gbps=("datasheet_hbm_gbps", "first")).reset_index()
    split = c[c["copy_split"]].groupby(["gpu_slug", "card_id"])["copy_gbps"].median().rename("copy_gbps")
    out = out.join(split, on=["gpu_slug", "card_id"])
    out["read_pct_datasheet"] = 100 * out["read_gbps"] / out["datasheet_hbm_gbps"]
    return out


def model_ceilings(cards: pd.DataFrame) -> pd.DataFrame:
    """Per card model: physical cards, the read ceiling's median over cards, its spread between
    cards (largest over smallest card, minus 1) and within a run (median p10-p90 width)."""
    g = cards.groupby("gpu_slug")
    out = pd.DataFrame({"cards": g.size(), "read_gbps": g["read_gbps"].median(),
                        "between_cards": g["read_gbps"].max() / g["read_gbps"].min() - 1,
                        "within_run": g["read_width"].median(),
                        "datasheet_hbm_gbps": g["datasheet_hbm_gbps"].first(),
                        "copy_gbps": g["copy_gbps"].median()})
    out["read_pct_datasheet"] = 100 * out["read_gbps"] / out["datasheet_hbm_gbps"]
    return out.reset_index()


def datasheet_ratio(ceil: pd.DataFrame, base: str = BASE, other: str = OTHER) -> float:
    """The datasheets' HBM bandwidth of ``other`` over ``base`` (4.8 / 3.35 for H200 / H100)."""
    d = ceil.groupby("gpu_slug")["datasheet_hbm_gbps"].first()
    return float(d[other] / d[base])


def ceiling_points(ceil: pd.DataFrame, col: str, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """One point for the summary: the ratio of the two models' median ``col`` over their cards,
    the bar from the smallest to the largest card of each (the between-card spread)."""
    c = ceil[~ceil["shared"]]
    if col == "copy_gbps":
        c = c[c["copy_split"]]
    per = c.groupby(["gpu_slug", "card_id"])[col].median()
    b, o = per.get(base), per.get(other)
    if b is None or o is None or b.empty or o.empty:
        return pd.DataFrame({"ratio": [math.nan], "lo": [math.nan], "hi": [math.nan]})
    return pd.DataFrame({"ratio": [o.median() / b.median()], "lo": [o.min() / b.max()],
                         "hi": [o.max() / b.min()]})


# ----------------------------------------------------------------------------- kernel_speed

def kernel_rows(root=None) -> pd.DataFrame:
    """Every run's kernel_speed rows, with ``plan``, ``card_id`` and a ``shape`` label."""
    from lib.chapters.kernel.figures import shape_label

    rows = with_plan(frame.with_physical_card(frame.load_checked("kernel_speed", root=root, dedupe=False),
                                              "kernel_speed", root))
    rows["shape"] = [shape_label(b, n, h, k) for b, n, h, k in
                     zip(rows["batch_size"], rows["seq_len"], rows["num_heads"], rows["num_kv_heads"])]
    return rows


def kernel_table(rows: pd.DataFrame, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """The points both cards measured (same point keys): per shape, backend and card, the % of the
    run's read ceiling in the primary run and its range over every run of that card, the time's
    p10-p90, the plan, ``same_code`` and ``speed_ratio`` (other over base, with ``lo``/``hi``)."""
    b, o = two_cards(rows, base, other)
    common = set(b["point_key"]) & set(o["point_key"])
    if not common:
        raise ValueError("the two cards share no kernel_speed point")
    d = rows[rows["point_key"].isin(common)]
    key = ["shape", "batch_size", "seq_len", "num_heads", "num_kv_heads", "backend"]
    spread = d.groupby(["gpu_slug"] + key)["pct_of_read_ceiling"].agg(pct_min="min", pct_max="max", runs="size")
    p = primary(d).set_index(["gpu_slug"] + key)[["pct_of_read_ceiling", "median_us", "p10_us", "p90_us", "plan"]]
    t = p.join(spread).reset_index()
    pb, po = t[t["gpu_slug"] == base], t[t["gpu_slug"] == other]
    code = same_plan(pb, po, key)[key + ["same_code"]]
    ratio = time_ratios(pb, po, key)[key + ["ratio", "lo", "hi"]].rename(columns={"ratio": "speed_ratio"})
    return t.merge(code, on=key, how="left").merge(ratio, on=key, how="left")


def kernel_speed_points(table: pd.DataFrame, backends, base: str = BASE) -> pd.DataFrame:
    """The same-code speed ratios of ``backends`` (one row per shape and backend)."""
    t = table[(table["gpu_slug"] == base) & table["same_code"].fillna(False) & table["backend"].isin(list(backends))]
    return t.rename(columns={"speed_ratio": "ratio"})[["shape", "backend", "ratio", "lo", "hi"]]


def other_only_shapes(rows: pd.DataFrame, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """The other card's kernel_speed shapes the base card never measured: own-auto's % of the read
    ceiling per shape (primary run)."""
    b, o = two_cards(rows, base, other)
    seen = set(zip(b["batch_size"], b["seq_len"], b["num_heads"], b["num_kv_heads"]))
    o = primary(o)
    o = o[o["backend"] == "own-auto-paged"]
    keep = [s not in seen for s in zip(o["batch_size"], o["seq_len"], o["num_heads"], o["num_kv_heads"])]
    return o[keep][["shape", "pct_of_read_ceiling", "plan"]].drop_duplicates("shape").reset_index(drop=True)


# ----------------------------------------------------------------------------- page_table

def page_table_rows(root=None) -> pd.DataFrame:
    """Every run's page_table rows (not only the newest per point), tagged as its chapter tags
    them (``shape``, ``subgrid``), with ``plan`` and ``card_id``."""
    from lib.chapters.page_table import analysis as P

    rows = frame.load_checked(P.EXPERIMENT, root=root, dedupe=False)
    rows = with_plan(frame.with_physical_card(frame.with_shape(rows), P.EXPERIMENT, root))
    rows["subgrid"] = [P.subgrid_of(k) for k in rows["point_key"]]
    return rows


def page_table_ratios(rows: pd.DataFrame, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """The page_table chapter's grid ratios (:func:`lib.chapters.page_table.analysis.grid_ratios`)
    of every run, with its ``run_id`` and ``card_id``, and ``same_code``: whether our kernels'
    plans at that point are the same on both models."""
    from lib.chapters.page_table import analysis as P

    out = []
    for (run, card), g in rows.groupby(["run_id", "card_id"]):
        r = P.grid_ratios(g)
        out.append(r.assign(run_id=run, card_id=card))
    ratios = pd.concat(out, ignore_index=True)
    key = ["shape", "seq_len", "batch_size"]
    grid = rows[(rows["subgrid"] == "grid") & rows["backend"].isin([P.PAGED, P.CONTIGUOUS])]
    b, o = two_cards(grid, base, other)
    code = same_plan(b, o, key)[key + ["same_code"]]
    return ratios.merge(code, on=key, how="left")


def page_table_summary(ratios: pd.DataFrame) -> pd.DataFrame:
    """Per card model, physical card, shape and ratio: points, median and range over the block-16
    grid (the page_table chapter's :func:`ratio_summary`, per physical card), and whether every
    point ran the same code as on the other model."""
    from lib.chapters.page_table import analysis as P

    out = []
    for card, g in ratios.groupby("card_id"):
        s = P.ratio_summary(g)
        same = g.groupby(["gpu_slug", "shape", "ratio_name"])["same_code"].all().rename("same_code")
        out.append(s.join(same, on=["gpu_slug", "shape", "ratio_name"]).assign(card_id=card))
    return pd.concat(out, ignore_index=True)


def page_table_points(ratios: pd.DataFrame, name: str, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """Ratio ``name`` on the other model over the base model, per same-code grid point of the
    primary runs: 1 means the page table costs the same on both cards."""
    r = ratios[(ratios["ratio_name"] == name) & ratios["same_code"].fillna(False)]
    key = ["shape", "seq_len", "batch_size"]
    prim = []
    for slug, g in r.groupby("gpu_slug"):
        n = g.groupby("run_id").size().reset_index(name="n").sort_values(["n", "run_id"])
        prim.append(g[g["run_id"] == n["run_id"].iloc[-1]])
    if not prim:
        return pd.DataFrame(columns=key + ["ratio", "lo", "hi"])
    p = pd.concat(prim)
    m = p[p["gpu_slug"] == base].merge(p[p["gpu_slug"] == other], on=key, suffixes=("_b", "_o"))
    m["ratio"] = m["ratio_o"] / m["ratio_b"]
    m["lo"] = m["hi"] = m["ratio"]
    return m[key + ["ratio", "lo", "hi"]]


# ----------------------------------------------------------------------------- uvm

#: key -> (label, group, measurement, backend, memory_kind, phase, direction); None: any.
UVM_QUANTITIES = {
    "read_device": ("GPU read, device memory", "hbm", "gpu_read", None, "device", "warm", None),
    "read_managed_gpu": ("GPU read, managed, resident on the GPU", "hbm", "gpu_read", None, "managed_gpu", "warm",
                         None),
    "read_mapped": ("GPU read, managed, mapped on the host", "link", "gpu_read", None, "managed_host_mapped", "warm",
                    None),
    "read_fault": ("GPU read, fault-driven migration", "link", "gpu_read", None, "managed_host_touched", "cold", None),
    "read_prefetched": ("prefetch, then GPU read", "link", "gpu_read", None, "managed_host_touched",
                        "prefetch_then_read", None),
    "read_first_touch": ("first touch of managed memory", "link", "gpu_read", None, "managed", "cold", None),
    "pinned_h2d": ("pinned cudaMemcpy, host to GPU", "link", "transfer", "memcpy", "pinned", None, "h2d"),
    "pinned_d2h": ("pinned cudaMemcpy, GPU to host", "link", "transfer", "memcpy", "pinned", None, "d2h"),
    "prefetch_h2d": ("managed prefetch, host to GPU", "link", "transfer", "prefetch", "managed", None, "h2d"),
    "prefetch_d2h": ("managed prefetch, GPU to host", "link", "transfer", "prefetch", "managed", None, "d2h"),
}


def uvm_rows(root=None) -> pd.DataFrame:
    """Every run's uvm rows, ``extra`` expanded, through the uvm chapter's link guard (a rate above
    the measured link is no rate), with ``card_id``."""
    from lib.chapters.uvm import analysis as U

    try:
        rows = R.load("uvm", root=root, expand_extra=True, dedupe=False)
    except FileNotFoundError as exc:
        raise frame.NoData(f"no uvm measurements: {frame.rerun_hint('uvm')} ({exc})") from None
    return frame.with_physical_card(U.with_link_guard(rows), "uvm", root)


def _uvm_select(rows: pd.DataFrame, spec) -> pd.DataFrame:
    _, _, measurement, backend, kind, phase, direction = spec
    m = rows["measurement"] == measurement
    for col, v in (("backend", backend), ("memory_kind", kind), ("phase", phase), ("direction", direction)):
        if v is not None:
            m &= rows[col] == v
    return rows[m & rows["bandwidth_gbps"].notna()]


def uvm_table(rows: pd.DataFrame, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """Per :data:`UVM_QUANTITIES` key, at the largest size both models measured, from each
    model's primary run: the rate on each card (GB/s) and the ratio other / base."""
    prim = primary(rows)
    out = []
    for key, spec in UVM_QUANTITIES.items():
        s = _uvm_select(prim, spec)
        b, o = s[s["gpu_slug"] == base], s[s["gpu_slug"] == other]
        sizes = set(b["nbytes"]) & set(o["nbytes"])
        if not sizes:
            continue
        n = max(sizes)
        b, o = b[b["nbytes"] == n], o[o["nbytes"] == n]
        r = time_ratios(b.assign(k=key), o.assign(k=key), ["k"]).iloc[0]
        out.append({"key": key, "quantity": spec[0], "group": spec[1], "nbytes": int(n),
                    f"{base}_gbps": float(b["bandwidth_gbps"].iloc[0]),
                    f"{other}_gbps": float(o["bandwidth_gbps"].iloc[0]),
                    "ratio": r["ratio"], "lo": r["lo"], "hi": r["hi"]})
    if not out:
        raise ValueError("the two cards share no uvm quantity")
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- uvm_decode

def uvm_decode_pairs(root=None, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """The uvm_decode chapter's :func:`wide` frame of both cards, matched per point and backend
    where the plans are the same: each card's times and the ratios other / base of the device and
    cold speeds and of the managed and prefetched costs (time over device time)."""
    from lib.chapters.uvm_decode import analysis as D

    rows = with_plan(D.load(root=root))
    point = [c for c in D.POINT if c != "gpu_slug"]
    b, o = two_cards(rows, base, other)
    code = same_plan(b, o, point)[point + ["same_code"]]
    w = D.wide(primary(rows))
    m = w[w["gpu_slug"] == base].merge(w[w["gpu_slug"] == other], on=point, suffixes=("_b", "_o"))
    m = m.merge(code, on=point, how="left")
    m["device_speed"] = m["device_b"] / m["device_o"]
    m["cold_speed"] = m["managed_cold_b"] / m["managed_cold_o"]
    for k in ("managed", "managed_prefetched", "managed_cold"):
        m[f"{k}_cost"] = m[f"{k}_vs_device_o"] / m[f"{k}_vs_device_b"]
    return m


def decode_points(pairs: pd.DataFrame, col: str) -> pd.DataFrame:
    """The same-code points of one uvm_decode ratio, as summary points."""
    p = pairs[pairs["same_code"].fillna(False)]
    return pd.DataFrame({"ratio": p[col], "lo": p[col], "hi": p[col]})


# ----------------------------------------------------------------------------- kv_offload

def offload_frame(root=None) -> pd.DataFrame:
    """The kv_offload chapter's decode frame with its baselines (device time, slowdown, bus rate)."""
    from lib.chapters.kv_offload import figures as KF

    return KF.with_baselines(KF.decode_frame(KF.load_rows(root=root)))


def break_even(d: pd.DataFrame) -> pd.DataFrame:
    """Per card, layout, backend and variant that moves host bytes on every step: the device step,
    the step with every block on the host (``t1_us``, ``s1`` = t1 / device), and the host share at
    which the step takes twice its all-GPU time.

    ``f_linear`` = 1 / (s1 - 1) is that share if the step's time grows linearly with the share
    (a copy then a kernel does: t = t_dev + f (t1 - t_dev)); ``linear_err`` is the largest
    relative miss of that line against the measured slowdowns (0 < f < 1), which says whether
    the model holds for the variant. ``below``/``above``: the largest measured share with a
    slowdown under 2 and the smallest with at least 2 (the measured bracket)."""
    from lib.chapters.kv_offload import figures as KF

    out = []
    keys = ["gpu_slug", "heads", "backend", "variant"]
    for k, g in d[d["variant"].isin(KF.BUS_VARIANTS)].groupby(keys):
        g = g.sort_values("fraction")
        one = g[np.isclose(g["fraction"], 1.0)]
        if one.empty:
            continue
        s1, dev = float(one["slowdown"].iloc[0]), float(one["device_us"].iloc[0])
        mid = g[(g["fraction"] > 0) & (g["fraction"] < 1)]
        err = ((1 + mid["fraction"] * (s1 - 1)) / mid["slowdown"] - 1).abs().max() if len(mid) else math.nan
        under, over = g[g["slowdown"] < 2]["fraction"], g[g["slowdown"] >= 2]["fraction"]
        z = d[(d["gpu_slug"] == k[0]) & (d["heads"] == k[1]) & (d["backend"] == k[2])
              & (d["variant"] == "explicit_copy") & (d["fraction"] == 0)]
        out.append({**dict(zip(keys, k)), "device_us": dev, "t1_us": float(one["median_us"].iloc[0]),
                    "device_p10_us": float(z["p10_us"].min()) if len(z) else math.nan,
                    "device_p90_us": float(z["p90_us"].max()) if len(z) else math.nan,
                    "t1_p10_us": float(one["p10_us"].iloc[0]), "t1_p90_us": float(one["p90_us"].iloc[0]),
                    "s1": s1, "f_linear": 1 / (s1 - 1) if s1 > 1 else math.inf, "linear_err": float(err),
                    "below": float(under.max()) if len(under) else math.nan,
                    "above": float(over.min()) if len(over) else math.nan})
    if not out:
        raise ValueError("no kv_offload variant with every block on the host")
    return pd.DataFrame(out)


def offload_points(be: pd.DataFrame, col: str, *, heads: str, backend: str, variants,
                   base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """One summary point per variant: ``col`` (``device_us`` and ``t1_us`` as speeds, base over
    other; ``s1`` and ``f_linear`` as other over base)."""
    s = be[(be["heads"] == heads) & (be["backend"] == backend) & be["variant"].isin(list(variants))]
    m = s[s["gpu_slug"] == base].merge(s[s["gpu_slug"] == other], on=["heads", "backend", "variant"],
                                       suffixes=("_b", "_o"))
    if col in ("device_us", "t1_us"):
        r = m[f"{col}_b"] / m[f"{col}_o"]
    else:
        r = m[f"{col}_o"] / m[f"{col}_b"]
    out = pd.DataFrame({"variant": m["variant"], "ratio": r, "lo": r, "hi": r})
    if col == "t1_us":
        out["lo"] = m["t1_p10_us_b"] / m["t1_p90_us_o"]
        out["hi"] = m["t1_p90_us_b"] / m["t1_p10_us_o"]
    if col == "device_us":
        out["lo"] = m["device_p10_us_b"] / m["device_p90_us_o"]
        out["hi"] = m["device_p90_us_b"] / m["device_p10_us_o"]
    return out


def link_model(ceil: pd.DataFrame, uvm: pd.DataFrame, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """Per model, what the link and HBM alone predict: N, the device bytes one host byte costs
    (read ceiling over pinned host-to-GPU copy), and the host share that doubles a serial step,
    1 / (N - 1) (:func:`lib.chapters.primer.concepts.doubling_fraction`)."""
    from lib.chapters.primer import concepts as C

    read = model_ceilings(card_ceilings(ceil)).set_index("gpu_slug")["read_gbps"]
    h2d = uvm.set_index("key").loc["pinned_h2d"]
    out = []
    for slug in (base, other):
        n = float(read[slug]) / float(h2d[f"{slug}_gbps"])
        out.append({"gpu_slug": slug, "read_gbps": float(read[slug]), "h2d_gbps": float(h2d[f"{slug}_gbps"]),
                    "N": n, "f_double": C.doubling_fraction(n)})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- the summary

#: kv_offload's ways of reaching host blocks that move them on every step (not the first call's
#: faults, which are the driver's, nor the resident pool, which moves nothing).
OFFLOAD_WAYS = ("explicit_copy", "remote", "zero_copy", "zero_copy_hostalloc", "prefetch_serial", "overlap")
#: Bands of the base card's % of its read ceiling that split the decode points of the summary.
PCT_BANDS = ((90.0, math.inf, "at 90 % of the read ceiling or more"), (50.0, 90.0, "at 50 to 90 %"),
             (0.0, 50.0, "below 50 %"))
T1_LABEL = "decode step, every block on the host (ways that move bytes each step)"
S1_LABEL = "slowdown, every block on the host (same ways)"
#: Backends that read through real addresses (the no_offset floor reads one block: an ablation).
FLOOR = "no_offset"


def scaling_points(scaling: pd.DataFrame, *, vllm: bool, lo: float, hi: float) -> pd.DataFrame:
    """The decode points (no floor) whose base-card % of the read ceiling lies in [lo, hi), of vLLM
    or of every other backend."""
    s = scaling[~scaling["backend"].str.contains(FLOOR)]
    s = s[(s["backend"] == "vllm") == vllm]
    return s[(s["pct_of_read_ceiling_b"] >= lo) & (s["pct_of_read_ceiling_b"] < hi)]


def summary(parts: dict, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """Every headline quantity as other / base, one row each: ``group`` (:data:`GROUPS`),
    ``quantity``, ``source``, ``n`` points, ``ratio`` (median), ``lo``/``hi`` (see
    :func:`summarize`) and the per-point ``values``. Rates are other over base (above 1: the
    other card is faster); costs (a time over a time on the same card) are other over base too.

    ``parts`` holds the frames built above: ``ceil`` (:func:`run_ceilings`), ``uvm``
    (:func:`uvm_table`), ``scaling`` (:func:`decode_scaling`), ``decode``
    (:func:`uvm_decode_pairs`), ``pt`` (:func:`page_table_ratios`), ``offload``
    (:func:`break_even`); a missing one leaves its rows out."""
    rows = []

    def add(group, quantity, source, points):
        rows.append({"group": group, "quantity": quantity, "source": source, **summarize(points)})

    def offload(col, variants):
        return offload_points(parts["offload"], col, heads="MHA 32:32", backend="own-auto-paged",
                              variants=variants, base=base, other=other)

    if "ceil" in parts:
        ceil = parts["ceil"]
        add("hbm", "read ceiling (every run's provenance)", "all", ceiling_points(ceil, "read_gbps", base, other))
        add("hbm", "copy ceiling (split-node copies only)", "all", ceiling_points(ceil, "copy_gbps", base, other))
    if "uvm" in parts:
        u = parts["uvm"]
        for _, r in u[u["group"] == "hbm"].iterrows():
            add("hbm", f"{r['quantity']}, {r['nbytes'] / 2**30:.0f} GiB", "uvm", pd.DataFrame([r]))
    if "scaling" in parts:
        sc = parts["scaling"]
        for lo, hi, name in PCT_BANDS:
            add("hbm", f"decode {name} on the {frame.card_label(base)}", "kernel_speed, page_table, uvm_decode",
                scaling_points(sc, vllm=False, lo=lo, hi=hi))
        add("hbm", f"decode, vLLM, at 90 % or more on the {frame.card_label(base)}", "kernel_speed, page_table",
            scaling_points(sc, vllm=True, lo=90.0, hi=math.inf))
        add("hbm", "no_offset floor (no DRAM traffic)", "page_table", sc[sc["backend"].str.contains(FLOOR)])
    if "offload" in parts:
        add("hbm", "decode step on device memory (kv_offload, MHA)", "kv_offload",
            offload("device_us", ["explicit_copy"]))
    if "uvm" in parts:
        u = parts["uvm"]
        for _, r in u[u["group"] == "link"].iterrows():
            add("link", f"{r['quantity']}, {r['nbytes'] / 2**30:.0f} GiB", "uvm", pd.DataFrame([r]))
    if "decode" in parts:
        add("link", "decode on cold managed memory (first call)", "uvm_decode",
            decode_points(parts["decode"], "cold_speed"))
    if "offload" in parts:
        add("link", T1_LABEL, "kv_offload", offload("t1_us", OFFLOAD_WAYS))
    if "pt" in parts:
        for name in ("paged / contiguous", "shuffled / identity"):
            add("cost", f"page table: {name}", "page_table", page_table_points(parts["pt"], name, base, other))
    if "decode" in parts:
        add("cost", "managed, resident / device", "uvm_decode", decode_points(parts["decode"], "managed_cost"))
        add("cost", "managed, prefetched / device", "uvm_decode",
            decode_points(parts["decode"], "managed_prefetched_cost"))
        add("cost", "managed, cold / device", "uvm_decode", decode_points(parts["decode"], "managed_cold_cost"))
    if "offload" in parts:
        add("cost", S1_LABEL, "kv_offload", offload("s1", OFFLOAD_WAYS))
        add("cost", "break-even host share, copy then kernel", "kv_offload", offload("f_linear", ["explicit_copy"]))
    out = pd.DataFrame(rows)
    return out[out["n"] > 0].reset_index(drop=True)


def place(row: pd.Series, hbm: float, band: float) -> str:
    """Where a summary quantity sits: "1" (nothing moved), "hbm" (the HBM ratio), "1/hbm" (its
    inverse), or "between 1 and hbm", "above hbm", "below 1". A line counts where the quantity's
    bar, widened by ``band`` (the between-card spread), reaches it; the nearest such line wins."""
    r, lo, hi = row["ratio"], row["lo"], row["hi"]
    lines = {"1": 1.0, "hbm": hbm, "1/hbm": 1 / hbm}
    near = [(abs(math.log(r / v)), k) for k, v in lines.items() if lo * (1 - band) <= v <= hi * (1 + band)]
    if near:
        return min(near)[1]
    if 1 < r < hbm:
        return "between 1 and hbm"
    return "above hbm" if r > hbm else "below 1"


# ----------------------------------------------------------------------------- the spread

def decode_rows(root=None) -> pd.DataFrame:
    """Every run's decode rows that different experiments share a definition for: kernel_speed,
    page_table and uvm_decode on device memory, with ``plan``, ``card_id`` and ``experiment``;
    launches of v3 left out (its source changed between runs)."""
    parts = []
    for exp in ("kernel_speed", "page_table", "uvm_decode"):
        try:
            r = frame.load_checked(exp, root=root, dedupe=False)
        except frame.NoData:
            continue
        r = with_plan(frame.with_physical_card(r, exp, root))
        # v3's source changed between the H200 runs (the kernel chapter's history): its rows
        # would count code changes as card-to-card spread, so only unchanged kernels pair up
        r = r[~r["plan"].fillna("").astype(str).str.startswith("v3")]
        if exp == "uvm_decode":
            r = r[(r["memory_kind"] == "device") & r["memory_state"].isna()]
        parts.append(r.assign(experiment=exp))
    if not parts:
        raise frame.NoData("no decode rows in kernel_speed, page_table or uvm_decode")
    return pd.concat(parts, ignore_index=True)


def decode_pairs(rows: pd.DataFrame) -> pd.DataFrame:
    """Every pair of runs of one card model that timed the same decode (:data:`DECODE_KEYS`):
    per matched point ``diff`` = |t_b / t_a - 1|, with ``kind`` "between cards" or "between
    processes, one card" and the two experiments. Duplicates within a run are medianed."""
    keys = DECODE_KEYS
    r = rows.dropna(subset=[k for k in keys if k != "plan"])
    per = (r.groupby(["gpu_slug", "experiment", "run_id", "card_id"] + keys, dropna=False)["median_us"]
           .median().reset_index())
    out = []
    for slug, g in per.groupby("gpu_slug"):
        runs = g[["experiment", "run_id", "card_id"]].drop_duplicates().values.tolist()
        for (ea, ra, ca), (eb, rb, cb) in itertools.combinations(sorted(runs, key=lambda x: x[1]), 2):
            a, b = g[g["run_id"] == ra], g[g["run_id"] == rb]
            m = a.merge(b, on=keys, suffixes=("_a", "_b"))
            if m.empty:
                continue
            out.append(pd.DataFrame({
                "gpu_slug": slug, "kind": "between cards" if ca != cb else "between processes, one card",
                "experiments": " vs ".join(dict.fromkeys([ea, eb])), "run_a": ra, "run_b": rb,
                "card_a": ca, "card_b": cb, "backend": m["backend"],
                "signed": m["median_us_b"] / m["median_us_a"] - 1}))
    if not out:
        return pd.DataFrame(columns=["gpu_slug", "kind", "experiments", "run_a", "run_b", "card_a", "card_b",
                                     "backend", "signed", "diff"])
    p = pd.concat(out, ignore_index=True)
    p["diff"] = p["signed"].abs()
    return p


def uvm_pairs(rows: pd.DataFrame) -> pd.DataFrame:
    """The uvm rows measured by two runs of one model (the same point keys): |t_b / t_a - 1| per
    row, ``what`` "resident reads" (device or GPU-resident managed memory) or "across the link"."""
    from lib.chapters.uvm import analysis as U

    out = []
    for slug, g in rows.groupby("gpu_slug"):
        runs = sorted(g["run_id"].unique())
        for ra, rb in itertools.combinations(runs, 2):
            a, b = g[g["run_id"] == ra], g[g["run_id"] == rb]
            m = a.merge(b, on="point_key", suffixes=("_a", "_b"))
            if m.empty:
                continue
            resident = [(k, p) in U.RESIDENT_READS and k != "managed"
                        for k, p in zip(m["memory_kind_a"], m["phase_a"])]
            out.append(pd.DataFrame({
                "gpu_slug": slug, "kind": "between cards" if m["card_id_a"].iloc[0] != m["card_id_b"].iloc[0]
                else "between processes, one card", "run_a": ra, "run_b": rb,
                "what": np.where(resident, "resident reads", "across the link"),
                "signed": m["median_us_b"] / m["median_us_a"] - 1}))
    if not out:
        return pd.DataFrame(columns=["gpu_slug", "kind", "run_a", "run_b", "what", "signed", "diff"])
    p = pd.concat(out, ignore_index=True)
    p["diff"] = p["signed"].abs()
    return p


def within_run(rows: pd.DataFrame) -> pd.Series:
    """Each row's p10-p90 width over its median: the spread of one measurement within its run."""
    return ((rows["p90_us"] - rows["p10_us"]) / rows["median_us"]).dropna()


def spread_cases(decode: pd.DataFrame, dpairs: pd.DataFrame, uvm: pd.DataFrame, upairs: pd.DataFrame,
                 cards: pd.DataFrame) -> pd.DataFrame:
    """One long frame for the spread figure: ``gpu_slug``, ``case`` (a label), ``kind`` (within a
    run / between processes / between cards) and ``value`` (a relative difference, 0.01 = 1 %)."""
    parts = []

    def add(slug, case, kind, values):
        v = pd.Series(values, dtype=float).dropna()
        if len(v):
            parts.append(pd.DataFrame({"gpu_slug": slug, "case": case, "kind": kind, "value": v.to_numpy()}))

    for slug, g in decode.groupby("gpu_slug"):
        add(slug, "decode times: p10-p90 of each row", "within a run", within_run(g))
    for (slug, kind, exps), g in dpairs.groupby(["gpu_slug", "kind", "experiments"]):
        add(slug, f"decode times: {exps}", kind, g["diff"])
    for slug, g in uvm[uvm["measurement"] == "gpu_read"].groupby("gpu_slug"):
        add(slug, "uvm GPU reads: p10-p90 of each row", "within a run", within_run(g))
    for (slug, kind, what), g in upairs.groupby(["gpu_slug", "kind", "what"]):
        add(slug, f"uvm GPU reads, {what}", kind, g["diff"])
    for slug, g in cards.groupby("gpu_slug"):
        v = g["read_gbps"].tolist()
        add(slug, "read ceiling: every pair of cards", "between cards",
            [abs(a / b - 1) for a, b in itertools.combinations(v, 2)])
    if not parts:
        raise ValueError("no spread to show")
    return pd.concat(parts, ignore_index=True)


def spread_table(cases: pd.DataFrame) -> pd.DataFrame:
    """Per case: points, median and 90th percentile of the relative difference (in %)."""
    g = cases.groupby(["gpu_slug", "kind", "case"], sort=False)["value"]
    return pd.DataFrame({"points": g.size(), "median %": 100 * g.median(),
                         "p90 %": 100 * g.quantile(0.9)}).reset_index()


# ----------------------------------------------------------------------------- decode scaling

def decode_scaling(decode: pd.DataFrame, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """Every decode point both models timed with the same code (:data:`DECODE_KEYS`, the plan
    included), per experiment from each model's primary run: the speed ratio other / base with
    its p10-p90 interval, and the % of the read ceiling each card reached."""
    out = []
    for exp, g in decode.groupby("experiment"):
        if set(g["gpu_slug"]) < {base, other}:
            continue
        p = primary(g)
        cols = ["median_us", "p10_us", "p90_us", "pct_of_read_ceiling", "bytes_moved"]
        per = p.groupby(["gpu_slug"] + DECODE_KEYS)[cols].median().reset_index()
        b, o = per[per["gpu_slug"] == base], per[per["gpu_slug"] == other]
        m = time_ratios(b, o, DECODE_KEYS)
        pct = b[DECODE_KEYS + ["pct_of_read_ceiling", "bytes_moved"]].merge(
            o[DECODE_KEYS + ["pct_of_read_ceiling"]], on=DECODE_KEYS, suffixes=("_b", "_o"))
        out.append(m.merge(pct, on=DECODE_KEYS).assign(experiment=exp))
    if not out:
        raise ValueError(f"no decode point timed on both {base} and {other}")
    return pd.concat(out, ignore_index=True)


# ----------------------------------------------------------------------------- the chapter's frames

def build(root=None, base: str = BASE, other: str = OTHER) -> dict:
    """Every frame the chapter draws, from the committed rows under ``root``: a dict of the
    frames above (``ceil``, ``cards``, ``models``, ``kernel``, ``kernel_rows``, ``scaling``,
    ``pt``, ``pt_summary``, ``uvm_rows``, ``uvm``, ``decode``, ``offload``, ``be``, ``link``,
    ``summary``, ``dec``, ``dpairs``, ``upairs``, ``cases``) and ``hbm`` (the datasheet ratio)
    and ``band`` (the larger between-card spread of the read ceiling)."""
    out: dict = {}
    out["ceil"] = run_ceilings(root)
    out["cards"] = card_ceilings(out["ceil"])
    out["models"] = model_ceilings(out["cards"])
    for slug in (base, other):
        if slug not in set(out["models"]["gpu_slug"]):
            raise frame.NoData(f"no run on {slug!r} recorded ceilings; have {sorted(out['models']['gpu_slug'])}")
    out["hbm"] = datasheet_ratio(out["ceil"], base, other)
    out["band"] = float(out["models"]["between_cards"].max())
    out["kernel_rows"] = kernel_rows(root)
    out["kernel"] = kernel_table(out["kernel_rows"], base, other)
    out["dec"] = decode_rows(root)
    out["scaling"] = decode_scaling(out["dec"], base, other)
    pt_rows = page_table_rows(root)
    out["pt"] = page_table_ratios(pt_rows, base, other)
    out["pt_summary"] = page_table_summary(out["pt"])
    out["uvm_rows"] = uvm_rows(root)
    out["uvm"] = uvm_table(out["uvm_rows"], base, other)
    out["decode"] = uvm_decode_pairs(root, base, other)
    out["offload"] = offload_frame(root)
    out["be"] = break_even(out["offload"])
    out["link"] = link_model(out["ceil"], out["uvm"], base, other)
    out["summary"] = summary({"ceil": out["ceil"], "uvm": out["uvm"], "scaling": out["scaling"],
                              "decode": out["decode"], "pt": out["pt"], "offload": out["be"]}, base, other)
    out["summary"]["place"] = [place(r, out["hbm"], out["band"]) for _, r in out["summary"].iterrows()]
    out["dpairs"] = decode_pairs(out["dec"])
    out["upairs"] = uvm_pairs(out["uvm_rows"])
    out["cases"] = spread_cases(out["dec"], out["dpairs"], out["uvm_rows"], out["upairs"], out["cards"])
    return out


def _row(df: pd.DataFrame, **where) -> pd.Series:
    """The one row of ``df`` that matches every ``column=value`` (ValueError otherwise)."""
    m = pd.Series(True, index=df.index)
    for k, v in where.items():
        m &= df[k] == v
    hit = df[m]
    if len(hit) != 1:
        raise ValueError(f"{len(hit)} rows match {where} (want one)")
    return hit.iloc[0]


def headline(parts: dict, base: str = BASE, other: str = OTHER) -> dict:
    """The numbers and words the chapter's prose quotes, by name (glued as ``cd_<name>``)."""
    h: dict = {}
    B, O = frame.card_label(base), frame.card_label(other)
    h["base"], h["other"] = frame.Plain(B), frame.Plain(O)
    ceil, cards, models = parts["ceil"], parts["cards"], parts["models"]
    mb, mo = _row(models, gpu_slug=base), _row(models, gpu_slug=other)
    h["hbm_ratio"] = parts["hbm"]
    h["band_pct"] = 100 * parts["band"]
    for tag, m in (("b", mb), ("o", mo)):
        slug = base if tag == "b" else other
        h[f"sheet_{tag}"] = float(m["datasheet_hbm_gbps"])
        h[f"read_{tag}"] = float(m["read_gbps"])
        h[f"read_pct_{tag}"] = float(m["read_pct_datasheet"])
        h[f"between_{tag}"] = 100 * float(m["between_cards"])
        h[f"within_{tag}"] = 100 * float(m["within_run"])
        h[f"cards_{tag}"] = int(ceil.loc[ceil["gpu_slug"] == slug, "card_id"].nunique())
        h[f"cards_used_{tag}"] = int(m["cards"])
        h[f"copy_{tag}"] = float(m["copy_gbps"])
    h["read_ratio"] = h["read_o"] / h["read_b"]
    co = cards[cards["gpu_slug"] == other]
    lows = co.sort_values("read_gbps", kind="stable")
    for tag, (_, slow) in zip(("slow", "slow2"), lows.head(2).iterrows()):  # the two slowest H200s
        h[f"{tag}_card"] = frame.Plain(short_id(slow["card_id"]))
        h[f"{tag}_read"] = float(slow["read_gbps"])
        h[f"{tag}_pct"] = 100 * (1 - float(slow["read_gbps"]) / float(co["read_gbps"].median()))
        h[f"{tag}_runs"] = int(slow["runs"])
        h[f"{tag}_experiments"] = frame.Plain(str(slow["experiments"]))
    pt_lows = lows[lows["experiments"].astype(str).str.contains("page_table")]
    for tag, (_, slow) in zip(("slow_pt", "slow2_pt"), pt_lows.head(2).iterrows()):  # of page_table's cards
        h[f"{tag}_card"] = frame.Plain(short_id(slow["card_id"]))
        h[f"{tag}_pct"] = 100 * (1 - float(slow["read_gbps"]) / float(co["read_gbps"].median()))
    from lib.engine.timing import MEMCPY_PIECE

    h["piece_mib"] = MEMCPY_PIECE / 2**20
    h["read_gib"] = float(ceil["read_nbytes"].median()) / 2**30
    h["copy_gib"] = float(ceil["copy_nbytes"].median()) / 2**30
    links = ceil.loc[ceil["gpu_slug"] == other, "pcie_link"]
    h["pcie_link"] = frame.Plain(next((x for x in links if x), "a link not recorded"))
    old = ceil[(ceil["gpu_slug"] == base) & ~ceil["copy_split"] & ~ceil["shared"]]["copy_gbps"]
    h["copy_old_b"] = float(old.median())
    h["copy_old_share"] = 100 * h["copy_old_b"] / h["copy_b"]
    h["copy_ratio"] = h["copy_o"] / h["copy_b"]
    h["copy_ratio_old"] = h["copy_o"] / h["copy_old_b"]
    pcie = ceil.loc[ceil["gpu_slug"] == other, "datasheet_pcie_gbps"].dropna()
    h["pcie_sheet"] = float(pcie.iloc[0]) if len(pcie) else math.nan
    u = parts["uvm"].set_index("key")
    for key in u.index:
        h[f"u_{key}_b"] = float(u.loc[key, f"{base}_gbps"])
        h[f"u_{key}_o"] = float(u.loc[key, f"{other}_gbps"])
        h[f"u_{key}_r"] = float(u.loc[key, "ratio"])
    h["h2d_pct_sheet"] = 100 * h["u_pinned_h2d_o"] / h["pcie_sheet"]
    h["u_transfer_gib"] = float(u.loc["pinned_h2d", "nbytes"]) / 2**30
    # kernel_speed
    k = parts["kernel"]
    kb = k[k["gpu_slug"] == base]
    h["k_shapes"] = int(kb["shape"].nunique())
    extra = other_only_shapes(parts["kernel_rows"], base, other)
    h["k_other_only"] = int(len(extra))
    h["k_other_only_lo"] = float(extra["pct_of_read_ceiling"].min())
    h["k_other_only_hi"] = float(extra["pct_of_read_ceiling"].max())
    for tag, shape in (("big", "128 × 4096, MHA 32:32"), ("small", "1 × 4096, MHA 32:32"),
                       ("gqa", "32 × 4096, GQA 32:8")):
        for b, btag in (("own-auto-paged", "auto"), ("vllm", "vllm"), ("sdpa_dense", "sdpa"), ("own-v1-paged", "v1"),
                        ("own-v2-paged", "v2")):
            hit = k[(k["shape"] == shape) & (k["backend"] == b)]
            if len(hit) < 2:
                continue
            h[f"k_{tag}_{btag}_r"] = float(hit["speed_ratio"].iloc[0])
            h[f"k_{tag}_{btag}_pct_b"] = float(_row(hit, gpu_slug=base)["pct_of_read_ceiling"])
            h[f"k_{tag}_{btag}_pct_o"] = float(_row(hit, gpu_slug=other)["pct_of_read_ceiling"])
    g = k[(k["shape"] == "32 × 4096, GQA 32:8") & (k["backend"] == "own-auto-paged")]
    h["k_gqa_plan_b"] = frame.Plain(str(_row(g, gpu_slug=base)["plan"]))
    h["k_gqa_plan_o"] = frame.Plain(str(_row(g, gpu_slug=other)["plan"]))
    h["k_runs_o"] = int(k.loc[k["gpu_slug"] == other, "runs"].max())
    # decode scaling
    sc = parts["scaling"]
    h["sc_points"] = int((~sc["backend"].str.contains(FLOOR)).sum())
    s = parts["summary"].set_index("quantity")
    for lo, hi, name in PCT_BANDS:
        q = f"decode {name} on the {B}"
        tag = {90.0: "90", 50.0: "50", 0.0: "0"}[lo]
        h[f"sc_{tag}"] = float(s.loc[q, "ratio"])
        h[f"sc_{tag}_n"] = int(s.loc[q, "n"])
    h["pct_hi"], h["pct_lo"] = PCT_BANDS[0][0], PCT_BANDS[1][0]
    h["sc_vllm"] = float(s.loc[f"decode, vLLM, at 90 % or more on the {B}", "ratio"])
    h["sc_floor"] = float(s.loc["no_offset floor (no DRAM traffic)", "ratio"])
    own = sc[sc["backend"].str.startswith("own") & ~sc["backend"].str.contains(FLOOR)]
    worst = own.loc[own["ratio"].idxmin()]
    h["sc_worst"] = float(worst["ratio"])
    h["sc_worst_what"] = frame.Plain(f"{worst['backend']} at {int(worst['batch_size'])} × {int(worst['seq_len'])}, "
                                     f"{frame.shape_label(worst['num_heads'], worst['num_kv_heads'], model=False)}, "
                                     f"block {int(worst['block_size'])} ({worst['experiment']})")
    slow = own[own["ratio"] < 1 - parts["band"]]
    h["sc_slow_n"] = int(len(slow))
    h["sc_slow_gqa"] = int((slow["num_heads"] != slow["num_kv_heads"]).sum())
    mha = slow[slow["num_heads"] == slow["num_kv_heads"]]
    h["sc_slow_mha"] = int(len(mha))
    h["sc_slow_mha_what"] = frame.Plain("; ".join(
        f"{r.backend} at {int(r.batch_size)} × {int(r.seq_len)}, block {int(r.block_size)} ({r.experiment}, "
        f"{r.ratio:.3f})" for r in mha.itertuples()) or "none")
    h["sc_slow_shapes"] = frame.Plain(" and ".join(sorted({frame.shape_label(a, b, model=False) for a, b in
                                                          zip(slow["num_heads"], slow["num_kv_heads"])})) or "none")
    h["sc_slow_backends"] = frame.Plain(", ".join(sorted(set(slow["backend"]))) or "none")
    h["sc_slow_pct_hi"] = float(slow["pct_of_read_ceiling_b"].max()) if len(slow) else math.nan
    # page table
    pts = parts["pt_summary"]
    for name, tag in (("paged / contiguous", "pc"), ("shuffled / identity", "sh")):
        mha = pts[(pts["ratio_name"] == name) & (pts["shape"] == frame.shape_label(32, 32))]
        h[f"pt_{tag}_b"] = float(mha.loc[mha["gpu_slug"] == base, "median"].iloc[0])
        h[f"pt_{tag}_o"] = float(mha.loc[mha["gpu_slug"] == other, "median"].median())
        seed = pts[(pts["ratio_name"] == name) & (pts["shape"] == frame.shape_label(64, 8))]
        so = seed[seed["gpu_slug"] == other]
        h[f"pt_{tag}_seed_b"] = float(seed.loc[seed["gpu_slug"] == base, "median"].iloc[0])
        h[f"pt_{tag}_seed_o1"] = float(so["median"].min())
        h[f"pt_{tag}_seed_o2"] = float(so["median"].max())
        h[f"pt_{tag}_r"] = float(s.loc[f"page table: {name}", "ratio"])
    h["pt_points"] = int(s.loc["page table: paged / contiguous", "n"])
    h["pt_pc_seed_spread"] = 100 * (h["pt_pc_seed_o2"] / h["pt_pc_seed_o1"] - 1)
    # uvm_decode
    for key, q in (("res", "managed, resident / device"), ("pre", "managed, prefetched / device"),
                   ("cold", "managed, cold / device")):
        h[f"ud_{key}_r"] = float(s.loc[q, "ratio"])
        h[f"ud_{key}_lo"] = float(s.loc[q, "lo"])
        h[f"ud_{key}_hi"] = float(s.loc[q, "hi"])
    d = parts["decode"]
    for key, col in (("res", "managed_vs_device"), ("pre", "managed_prefetched_vs_device"),
                     ("cold", "managed_cold_vs_device")):
        h[f"ud_{key}_b"] = float(d[f"{col}_b"].median())
        h[f"ud_{key}_o"] = float(d[f"{col}_o"].median())
    h["ud_points"] = int(len(d))
    h["ud_backends"] = int(d["backend"].nunique())
    h["ud_cold_speed"] = float(s.loc["decode on cold managed memory (first call)", "ratio"])
    # kv_offload
    be = parts["be"]
    for tag, slug in (("b", base), ("o", other)):
        c = _row(be, gpu_slug=slug, heads="MHA 32:32", backend="own-auto-paged", variant="explicit_copy")
        h[f"ko_dev_{tag}"] = float(c["device_us"])
        h[f"ko_t1_{tag}"] = float(c["t1_us"]) / 1e3
        h[f"ko_s1_{tag}"] = float(c["s1"])
        h[f"ko_f_{tag}"] = 100 * float(c["f_linear"])
        h[f"ko_err_{tag}"] = 100 * float(c["linear_err"])
        lm = _row(parts["link"], gpu_slug=slug)
        h[f"ko_n_{tag}"] = float(lm["N"])
        h[f"ko_fmodel_{tag}"] = 100 * float(lm["f_double"])
    h["ko_f_r"] = h["ko_f_o"] / h["ko_f_b"]
    h["ko_t1_r"] = float(s.loc[T1_LABEL, "ratio"])
    h["ko_ways"] = int(s.loc[T1_LABEL, "n"])
    h["ko_s1_r"] = float(s.loc[S1_LABEL, "ratio"])
    rem = be[(be["heads"] == "MHA 32:32") & (be["backend"] == "own-auto-paged")
             & be["variant"].isin(["remote", "zero_copy"])]
    h["ko_remote_err"] = 100 * float(rem["linear_err"].min())
    # the summary's verdicts
    pl = parts["summary"]["place"]
    h["n_quantities"] = int(len(pl))
    for name, tag in (("1", "at1"), ("hbm", "athbm"), ("1/hbm", "atinv")):
        h[f"n_{tag}"] = int((pl == name).sum())
    off = parts["summary"][pl.isin(["between 1 and hbm", "above hbm", "below 1"])]
    h["n_between"] = int(len(off))
    h["between_names"] = frame.Plain("; ".join(off["quantity"]))
    # the spread
    t = spread_table(parts["cases"]).set_index(["gpu_slug", "kind", "case"])

    def med(slug, kind, case):
        return float(t.loc[(slug, kind, case), "median %"]) if (slug, kind, case) in t.index else math.nan

    h["sp_within_b"] = med(base, "within a run", "decode times: p10-p90 of each row")
    h["sp_within_o"] = med(other, "within a run", "decode times: p10-p90 of each row")
    h["sp_proc_o"] = med(other, "between processes, one card", "decode times: kernel_speed")
    h["sp_cards_b"] = med(base, "between cards", "decode times: page_table vs kernel_speed")
    h["sp_cards_pt_o"] = med(other, "between cards", "decode times: page_table")
    h["sp_cards_ks_o"] = med(other, "between cards", "decode times: kernel_speed vs page_table")
    h["sp_uvm_res_o"] = med(other, "between cards", "uvm GPU reads, resident reads")
    h["sp_uvm_link_o"] = med(other, "between cards", "uvm GPU reads, across the link")
    key = (other, "between cards", "uvm GPU reads, across the link")
    h["sp_uvm_link_p90"] = float(t.loc[key, "p90 %"]) if key in t.index else math.nan
    h["band_over_proc"] = h["band_pct"] / h["sp_proc_o"]
    h["sp_uvm_within_o"] = med(other, "within a run", "uvm GPU reads: p10-p90 of each row")
    dp = parts["dpairs"]
    ks = dp[(dp["gpu_slug"] == other) & (dp["experiments"] == "kernel_speed vs page_table")]
    ordered = sorted(ks.groupby("card_b"), key=lambda x: x[1]["signed"].median())
    for i, (card, g) in enumerate(ordered):
        h[f"sp_ks_card{i}"] = frame.Plain(short_id(card))
        h[f"sp_ks_signed{i}"] = 100 * float(g["signed"].median())
    h["sp_ks_n"] = len(ordered)
    h["sp_ks_list"] = frame.Plain("; ".join(f"{100 * float(g['signed'].median()):+.2f} % against card "
                                            f"{short_id(card)}" for card, g in ordered))
    pt2 = dp[(dp["gpu_slug"] == other) & (dp["experiments"] == "page_table") & (dp["kind"] == "between cards")]
    if len(pt2):
        first = pt2.iloc[0]
        h["sp_pt_cards"] = frame.Plain(f"{short_id(first['card_a'])} and {short_id(first['card_b'])}")
        h["sp_pt_signed"] = 100 * float(pt2["signed"].median())
        h["sp_pt_n"] = int(len(pt2))
    return h


def facts_table(parts: dict, root=None, base: str = BASE, other: str = OTHER) -> pd.DataFrame:
    """The two models side by side (one column each): what the provenance says about the chip
    (:func:`lib.book.frame.card_facts` of their uvm runs), the datasheet, the physical cards and
    the read ceiling measured."""
    cols = {}
    models = parts["models"].set_index("gpu_slug")
    for slug in (base, other):
        f = frame.card_facts(slug, root=root, experiment="uvm")
        c = parts["ceil"][parts["ceil"]["gpu_slug"] == slug]
        m = models.loc[slug]
        cols[frame.card_label(slug)] = {
            "name": f["name"], "SMs": f["sm_count"], "L2 (MiB)": f"{f['l2_mib']:.0f}",
            "SM clock, max (MHz)": f["sm_clock_max_mhz"], "driver": f["driver"],
            "HBM, datasheet (GB/s)": f"{m['datasheet_hbm_gbps']:.0f}",
            "read ceiling, median card (GB/s)":
                f"{m['read_gbps']:.0f} ({m['read_pct_datasheet']:.1f} % of the datasheet)",
            "physical cards (with ceilings outside sharded sweeps)": f"{c['card_id'].nunique()} ({int(m['cards'])})",
            "runs": int(c["run_id"].nunique()),
            "PCIe link (recorded)": "not recorded" if not np.isfinite(c["datasheet_pcie_gbps"]).any()
            else f"{c['datasheet_pcie_gbps'].dropna().iloc[0]:.0f} GB/s per direction, signalling"}
    return pd.DataFrame(cols)
