"""The seed's six tables against our measurements of the same points (experiment `seed_tables`).

Every seed cell's point was measured with our v1 and v2 kernels under the seed's timing protocol
and the rigorous one (`lib.engine.timing`); this module joins them cell by cell and derives every
comparison `chapters/seed_repro.md` shows. The post never says v1 or v2, so both are kept; vLLM
(`vllm`) and dense SDPA (`sdpa_dense`) are today's references for the "original" tables.

The experiment is a 2 x 2 factorial (`lib.chapters.seed_repro.experiment.ARMS`): {seed timing,
rigorous timing} x {the seed's tables, distinct blocks}. The seed-vs-ours comparisons use the two
*diagonal* arms (:data:`DIAGONAL`: the seed's timing on the seed's tables, rigorous timing on
distinct blocks), which change both factors at once; :func:`load_ours` keeps only those, so the
comparisons are the same whether or not the other two arms were measured. :func:`load_arms` and
:func:`factorial` give all four and split the change into its two factors.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

from lib.book import frame
from lib.chapters.seed import tables as S
from lib.chapters.seed_repro.experiment import SEED_BACKENDS, VLLM2024_BACKENDS

EXPERIMENT = "seed_tables"
VERSIONS = ("v1", "v2")
PROTOCOLS = ("seed", "rigorous")
#: The seed's variant -> our addressing mode ("no_lookup" is the post's "without page table lookup").
ADDRESSING_OF = {"original": "paged", "no_lookup": "contiguous", "no_offset": "no_offset"}
#: Today's kernels, shown beside the seed's "original" tables.
REFERENCE_BACKENDS = ("vllm", "sdpa_dense")
REFERENCE_LABELS = {"vllm": "vLLM (Triton, today)", "sdpa_dense": "SDPA dense (no table)"}
PROTOCOL_LABELS = {"seed": "seed protocol", "rigorous": "rigorous"}
SEED_SOURCE = "seed (2024 post)"
#: The point of one measurement, besides its backend, protocol and card.
KEY = ["memory_kind", "seq_len", "batch_size", "block_size"]
#: The one series key of a seed table: memory kind and (seq_len, batch).
SERIES = ["table", "memory", "seq_len", "batch_size"]
#: The seed's derived ratios: name -> (numerator variant, denominator variant, seed function).
COMPARISONS = {
    "managed / device": ("original", "original", S.managed_over_device),
    "no lookup / original": ("no_lookup", "original", S.no_lookup_over_original),
    "no offset / original": ("no_offset", "original", S.no_offset_over_original),
}
OURS_COLUMNS = ["gpu_slug", "backend", "protocol", "median_us", "check_passed", "rel_error", *KEY]
#: A row's placement -> the data factor of the factorial.
TABLES_OF = {"random": "seed_tables", "identity": "distinct", "shuffled": "distinct"}
TABLES_LABELS = {"seed_tables": "the seed's tables (1024 reused random blocks)",
                 "distinct": "distinct blocks"}
#: The arms the seed comparisons use (protocol, tables): the committed run's two.
DIAGONAL = (("seed", "seed_tables"), ("rigorous", "distinct"))


def backend_for(variant: str, version: str) -> str:
    """Our backend that stands for one of the seed's variants, in kernel version v1 or v2."""
    if variant not in ADDRESSING_OF:
        raise ValueError(f"unknown seed variant {variant!r}; known: {list(ADDRESSING_OF)}")
    if version not in VERSIONS:
        raise ValueError(f"unknown kernel version {version!r}; known: {list(VERSIONS)}")
    return f"own-{version}-{ADDRESSING_OF[variant]}"


def parse_versions(variant_version: str | Iterable[str]) -> tuple[str, ...]:
    """The chapter parameter `variant_version` ("both", "v1", "v2", or "v1,v2") as a tuple."""
    if isinstance(variant_version, str):
        text = variant_version.strip().lower()
        parts = list(VERSIONS) if text == "both" else [p.strip() for p in text.split(",") if p.strip()]
    else:
        parts = [str(p).strip().lower() for p in variant_version]
    bad = [p for p in parts if p not in VERSIONS]
    if not parts or bad:
        raise ValueError(f"variant_version must be 'both', 'v1' or 'v2', got {variant_version!r}")
    return tuple(v for v in VERSIONS if v in parts)


def source_label(version: str, protocol: str) -> str:
    """A legend label for one of our series, e.g. "v1, seed protocol"."""
    if protocol not in PROTOCOL_LABELS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {list(PROTOCOL_LABELS)}")
    return f"{version}, {PROTOCOL_LABELS[protocol]}"


def sources(versions: Iterable[str] = VERSIONS) -> list[str]:
    """Legend order: the seed first, then each version under the seed's and the rigorous protocol."""
    return [SEED_SOURCE] + [source_label(v, p) for v in versions for p in PROTOCOLS]


def series_name(memory: str, seq_len: int, batch_size: int) -> str:
    """A short row label for one seed series: memory kind, then seq_len × batch."""
    return f"{memory} {int(seq_len)}×{int(batch_size)}"


# ----------------------------------------------------------------------------- our rows

def check_ours(ours: pd.DataFrame) -> pd.DataFrame:
    """Our rows with the columns the joins need, one per (card, backend, protocol, point); raises
    ValueError where a join would be ambiguous or impossible."""
    missing = [c for c in OURS_COLUMNS if c not in ours.columns]
    if missing:
        raise ValueError(f"our rows lack columns {missing}")
    if ours.empty:
        raise ValueError("no rows of our own to compare with the seed")
    out = ours[OURS_COLUMNS].copy()
    for c in ("seq_len", "batch_size", "block_size"):
        out[c] = out[c].astype("int64")
    bad = sorted(set(out["protocol"]) - set(PROTOCOLS))
    if bad:
        raise ValueError(f"unexpected protocols {bad}; this chapter compares {list(PROTOCOLS)}")
    keys = ["gpu_slug", "backend", "protocol", *KEY]
    dup = out.duplicated(keys)
    if dup.any():
        raise ValueError(f"{int(dup.sum())} duplicated rows of ours for one card, backend, "
                         f"protocol and point: {out.loc[dup, keys].head(3).to_dict('records')}")
    if not (out["median_us"] > 0).all():
        raise ValueError("our times must all be positive microseconds")
    return out.reset_index(drop=True)


def tables_of(placement) -> str | None:
    """The data factor of a row's placement (None for an unknown one)."""
    return TABLES_OF.get(placement) if isinstance(placement, str) else None


def _load_shape(gpu, root, heads, backends: str = SEED_BACKENDS) -> pd.DataFrame:
    """One shape's checked rows of one sub-grid (its backend list leads the point key)."""
    if isinstance(gpu, str):
        gpu = [g.strip() for g in gpu.split(",") if g.strip()] or None
    df = frame.load_checked(EXPERIMENT, gpu, root=root)
    df = df[(df["num_heads"] == heads[0]) & (df["num_kv_heads"] == heads[1])
            & df["point_key"].str.startswith(f"backends={backends};")]
    return df.assign(tables=[tables_of(p) for p in df["placement"]])


def load_ours(gpu: str | Iterable[str] | None = None, root=None, *,
              heads: tuple[int, int] = (64, 8)) -> pd.DataFrame:
    """Committed `seed_tables` rows (every card, or those named) of one (query heads, KV heads)
    shape, the seed's 64:8 by default or the Llama-2-7B-like (32, 32), in the :data:`DIAGONAL`
    arms only (see the module docstring)."""
    df = _load_shape(gpu, root, heads)
    keep = [(p, t) in DIAGONAL for p, t in zip(df["protocol"], df["tables"])]
    return check_ours(df[keep])


def load_arms(gpu: str | Iterable[str] | None = None, root=None, *,
              heads: tuple[int, int] = (64, 8)) -> pd.DataFrame:
    """Every arm's rows of one shape, with a ``tables`` column (``seed_tables`` or ``distinct``)."""
    df = _load_shape(gpu, root, heads)
    if df["tables"].isna().any():
        bad = sorted(set(df.loc[df["tables"].isna(), "placement"].astype(str)))
        raise ValueError(f"seed_tables rows with placements {bad}: not an arm of the factorial")
    return df.reset_index(drop=True)


#: The factorial's arms as column names of :func:`factorial`: "<timing>__<tables>_us".
def arm_column(timing: str, tables: str) -> str:
    return f"{timing}__{tables}_us"


def factorial(rows: pd.DataFrame) -> pd.DataFrame:
    """Per card, backend and point: the median time of each arm present and the two factors'
    effects, as ratios (NaN where an arm is missing):

    * ``timing_at_seed_tables`` / ``timing_at_distinct``: rigorous over seed timing, holding the
      tables fixed: what the timing method alone moves;
    * ``tables_at_seed_timing`` / ``tables_at_rigorous``: distinct blocks over the seed's tables,
      holding the timing fixed: what the data alone moves;
    * ``diagonal``: rigorous on distinct over seed timing on the seed's tables (both at once, the
      committed comparison), which equals ``timing_at_seed_tables * tables_at_rigorous``;
    * ``interaction``: ``timing_at_distinct / timing_at_seed_tables`` (1: the effects multiply).
    """
    need = {"gpu_slug", "backend", "protocol", "tables", "median_us", *KEY}
    missing = sorted(need - set(rows.columns))
    if missing:
        raise ValueError(f"factorial needs columns {missing}")
    index = ["gpu_slug", "backend", *KEY]
    dup = rows.duplicated(index + ["protocol", "tables"])
    if dup.any():
        raise ValueError(f"{int(dup.sum())} rows repeat one arm of one point")
    r = rows.assign(arm=[arm_column(p, t) for p, t in zip(rows["protocol"], rows["tables"])])
    wide = r.pivot_table(index=index, columns="arm", values="median_us", aggfunc="first")
    cols = [arm_column(p, t) for p in PROTOCOLS for t in TABLES_LABELS]
    wide = wide.reindex(columns=cols)
    a = {c: wide[c] for c in cols}
    ss, sd = a[arm_column("seed", "seed_tables")], a[arm_column("seed", "distinct")]
    rs, rd = a[arm_column("rigorous", "seed_tables")], a[arm_column("rigorous", "distinct")]
    wide["timing_at_seed_tables"] = rs / ss
    wide["timing_at_distinct"] = rd / sd
    wide["tables_at_seed_timing"] = sd / ss
    wide["tables_at_rigorous"] = rd / rs
    wide["diagonal"] = rd / ss
    wide["interaction"] = wide["timing_at_distinct"] / wide["timing_at_seed_tables"]
    wide.columns.name = None
    return wide.reset_index()


FACTORIAL_EFFECTS = ("timing_at_seed_tables", "timing_at_distinct", "tables_at_seed_timing",
                     "tables_at_rigorous", "diagonal", "interaction")


def factorial_summary(f: pd.DataFrame) -> pd.DataFrame:
    """Per card and backend, each effect of :func:`factorial` over the points where it is known:
    geometric mean, min and max."""
    rows = []
    for (gpu, backend), g in f.groupby(["gpu_slug", "backend"], sort=True):
        for eff in FACTORIAL_EFFECTS:
            v = g[eff].dropna().to_numpy(dtype=float)
            if not len(v):
                continue
            rows.append({"gpu_slug": gpu, "backend": backend, "effect": eff, "points": len(v),
                         "geomean": float(np.exp(np.log(v).mean())), "min": float(v.min()),
                         "max": float(v.max())})
    return pd.DataFrame(rows, columns=["gpu_slug", "backend", "effect", "points", "geomean", "min", "max"])


def cards(ours: pd.DataFrame) -> list[str]:
    """The GPUs (slugs) our rows come from, sorted."""
    return sorted(ours["gpu_slug"].dropna().unique().tolist())


def _by_protocol(ours: pd.DataFrame) -> pd.DataFrame:
    """Our times with the protocols side by side: one row per (card, backend, point)."""
    index = ["gpu_slug", "backend", *KEY]
    wide = ours.pivot_table(index=index, columns="protocol", values="median_us", aggfunc="first")
    wide = wide.reindex(columns=list(PROTOCOLS))
    wide.columns = [f"{p}_protocol_us" if p == "seed" else f"{p}_us" for p in wide.columns]
    wide["check_passed"] = ours.groupby(index)["check_passed"].agg(
        lambda s: bool(s.fillna(False).astype(bool).all()))
    wide["max_rel_error"] = ours.groupby(index)["rel_error"].max()
    return wide.reset_index()


# ----------------------------------------------------------------------------- the join

def join(seed: pd.DataFrame, ours: pd.DataFrame, versions: Iterable[str] = VERSIONS) -> pd.DataFrame:
    """Every seed cell beside our times for the same point, once per card and kernel version.

    One row per (card, seed cell, version), also where we have no measurement (times NaN), so a
    missing point shows as a gap instead of vanishing; with the three time ratios `*_over_*`.
    """
    versions = parse_versions(versions)
    _check_seed_columns(seed)
    ours = check_ours(ours)
    wide = _by_protocol(ours)
    cells = seed[["table", "table_title", "variant", "memory", "block_size", "seq_len",
                  "batch_size", "time_us"]].rename(columns={"time_us": "seed_us"})
    out = pd.concat([cells.assign(gpu_slug=gpu, version=v,
                                  backend=[backend_for(var, v) for var in cells["variant"]])
                     for gpu in cards(ours) for v in versions], ignore_index=True)
    out = out.assign(memory_kind=out["memory"]).merge(wide, on=["gpu_slug", "backend", *KEY], how="left",
                                                      validate="many_to_one").drop(columns="memory_kind")
    out["seed_protocol_over_seed"] = out["seed_protocol_us"] / out["seed_us"]
    out["rigorous_over_seed"] = out["rigorous_us"] / out["seed_us"]
    out["rigorous_over_seed_protocol"] = out["rigorous_us"] / out["seed_protocol_us"]
    return out.sort_values(["gpu_slug", "table", "version", "memory", "seq_len", "batch_size",
                            "block_size"], ascending=[True, True, True, False, False, False, True]
                           ).reset_index(drop=True)


def _check_seed_columns(seed: pd.DataFrame) -> None:
    """A subset of the seed (tests, or a chapter's selection) needs the columns, not all 51 rows."""
    missing = [c for c in S.COLUMNS if c not in seed.columns]
    if missing:
        raise ValueError(f"seed rows lack columns {missing}")
    if seed.empty:
        raise ValueError("no seed rows to join")
    dup = seed.duplicated(["table", "memory", *S.POINT])
    if dup.any():
        raise ValueError(f"seed rows repeat {int(dup.sum())} cells (same table, memory, point)")


def reproduction_table(joined: pd.DataFrame, table: int, gpu: str,
                       versions: Iterable[str] = VERSIONS) -> pd.DataFrame:
    """One seed table as the chapter shows it, rows (series, block size): the seed's time, then per
    version ours under both protocols, seed protocol / seed and rigorous / seed protocol."""
    versions = parse_versions(versions)
    rows = joined[(joined["table"] == table) & (joined["gpu_slug"] == gpu) & joined["version"].isin(versions)]
    if rows.empty:
        raise ValueError(f"no joined rows for table {table} on {gpu!r} ({list(versions)})")
    rows = rows.assign(series=[series_name(m, s, b) for m, s, b in
                               zip(rows["memory"], rows["seq_len"], rows["batch_size"])])
    index = ["series", "block_size"]
    seed_col = rows.drop_duplicates(index).set_index(index)[["seed_us"]]
    seed_col.columns = pd.MultiIndex.from_tuples([("seed (2024)", "time (µs)")])
    parts = [seed_col]
    for v in versions:
        r = rows[rows["version"] == v].set_index(index)
        part = r[["seed_protocol_us", "rigorous_us", "seed_protocol_over_seed",
                  "rigorous_over_seed_protocol"]].copy()
        part.columns = pd.MultiIndex.from_tuples([
            (f"ours {v}", "seed protocol (µs)"), (f"ours {v}", "rigorous (µs)"),
            (f"ours {v}", "seed protocol / seed"), (f"ours {v}", "rigorous / seed protocol")])
        parts.append(part)
    out = pd.concat(parts, axis=1)
    # The post's order: managed before device, the longer context and larger batch first.
    order = (rows.drop_duplicates("series")
             .sort_values(["memory", "seq_len", "batch_size"], ascending=[True, False, False])
             ["series"].tolist())
    return out.reindex(pd.MultiIndex.from_tuples(
        [(s, b) for s in order for b in sorted(rows.loc[rows["series"] == s, "block_size"].unique())],
        names=["series", "block size"]))


# ----------------------------------------------------------------------------- long form for figures

def times_long(seed: pd.DataFrame, ours: pd.DataFrame, versions: Iterable[str] = VERSIONS,
               references: bool = True) -> pd.DataFrame:
    """Tidy times for the figures: per seed series, the seed's cells and ours at every block size
    measured at its point (the seed has some points at two block sizes only).

    References (vLLM, SDPA) join the "original" tables under the rigorous protocol only: under the
    seed's protocol their Python wrappers, not their kernels, are timed.
    """
    versions = parse_versions(versions)
    _check_seed_columns(seed)
    ours = check_ours(ours)
    series = seed[["table", "table_title", "variant", "memory", "seq_len", "batch_size"]].drop_duplicates()
    frames = []
    for gpu in cards(ours):
        frames.append(seed[["table", "table_title", "memory", "seq_len", "batch_size", "block_size",
                            "time_us"]].assign(gpu_slug=gpu, source=SEED_SOURCE))
        mine = ours[ours["gpu_slug"] == gpu]
        for _, ser in series.iterrows():
            at = mine[(mine["memory_kind"] == ser["memory"]) & (mine["seq_len"] == ser["seq_len"])
                      & (mine["batch_size"] == ser["batch_size"])]
            wanted = [(backend_for(ser["variant"], v), p, source_label(v, p))
                      for v in versions for p in PROTOCOLS]
            if references and ser["variant"] == "original":
                wanted += [(b, "rigorous", REFERENCE_LABELS[b]) for b in REFERENCE_BACKENDS]
            for backend, protocol, label in wanted:
                r = at[(at["backend"] == backend) & (at["protocol"] == protocol)]
                if r.empty:
                    continue
                frames.append(pd.DataFrame({
                    "table": ser["table"], "table_title": ser["table_title"],
                    "memory": ser["memory"], "seq_len": ser["seq_len"],
                    "batch_size": ser["batch_size"], "block_size": r["block_size"].to_numpy(),
                    "time_us": r["median_us"].to_numpy(), "gpu_slug": gpu, "source": label}))
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["gpu_slug", "table", "memory", "seq_len", "batch_size", "source",
                            "block_size"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- derived ratios

def _our_ratio(ours: pd.DataFrame, num_backend: str, den_backend: str, protocol: str, *,
               num_memory: str, den_memory: str, seq_len: int, batch_size: int) -> pd.DataFrame:
    def pick(backend, memory):
        return ours[(ours["backend"] == backend) & (ours["protocol"] == protocol)
                    & (ours["memory_kind"] == memory) & (ours["seq_len"] == seq_len)
                    & (ours["batch_size"] == batch_size)][["gpu_slug", "block_size", "median_us"]]

    out = pick(num_backend, num_memory).merge(pick(den_backend, den_memory), on=["gpu_slug", "block_size"],
                                              suffixes=("_num", "_den"), validate="one_to_one")
    return out.rename(columns={"median_us_num": "num_us", "median_us_den": "den_us"})


def derived_ratios(seed: pd.DataFrame, ours: pd.DataFrame,
                   versions: Iterable[str] = VERSIONS) -> pd.DataFrame:
    """The seed's three derived ratios (`COMPARISONS`) beside the same ratios of ours, per protocol.

    Ours come at every block size of each (seq_len, batch) series the seed's ratio has; the seed's
    rows are repeated for every card so that one card's slice is complete.
    """
    versions = parse_versions(versions)
    S.validate_seed(seed)
    ours = check_ours(ours)
    frames = []
    for name, (num_var, den_var, fn) in COMPARISONS.items():
        theirs = fn(seed)
        pairs = theirs[["seq_len", "batch_size"]].drop_duplicates().itertuples(index=False)
        mem = ("managed", "device") if name == "managed / device" else ("device", "device")
        for gpu in cards(ours):
            frames.append(theirs[["seq_len", "batch_size", "block_size", "num_us", "den_us", "ratio"]]
                          .assign(gpu_slug=gpu, comparison=name, source=SEED_SOURCE))
        for seq_len, batch in pairs:
            for v in versions:
                for p in PROTOCOLS:
                    r = _our_ratio(ours, backend_for(num_var, v), backend_for(den_var, v), p,
                                   num_memory=mem[0], den_memory=mem[1], seq_len=int(seq_len),
                                   batch_size=int(batch))
                    if r.empty:
                        continue
                    r["ratio"] = r["num_us"] / r["den_us"]
                    frames.append(r.assign(comparison=name, seq_len=int(seq_len),
                                           batch_size=int(batch), source=source_label(v, p)))
    out = pd.concat(frames, ignore_index=True)
    out["series"] = [f"seq {s} × batch {b}" for s, b in zip(out["seq_len"], out["batch_size"])]
    cols = ["gpu_slug", "comparison", "seq_len", "batch_size", "series", "block_size", "source",
            "num_us", "den_us", "ratio"]
    return out[cols].sort_values(["gpu_slug", "comparison", "seq_len", "batch_size", "source",
                                  "block_size"]).reset_index(drop=True)


def ratio_summary(derived: pd.DataFrame) -> pd.DataFrame:
    """Per card, comparison, series and source: min, max and largest distance from 1 of the ratio."""
    g = derived.groupby(["gpu_slug", "comparison", "series", "source"], sort=False)["ratio"]
    out = g.agg(min="min", max="max", n="count").reset_index()
    out["max_dev"] = g.apply(lambda r: float((r - 1).abs().max())).to_numpy()
    return out


def summary_range(summary: pd.DataFrame, gpu: str, comparison: str, source: str,
                  series: str | None = None) -> tuple[float, float, float]:
    """`ratio_summary`'s (min, max, max_dev) of one comparison and source on one card, over its
    series (or the one named)."""
    s = summary[(summary.gpu_slug == gpu) & (summary.comparison == comparison) & (summary.source == source)]
    if series is not None:
        s = s[s.series == series]
    if s.empty:
        raise ValueError(f"no {comparison!r} ratios of {source!r} on {gpu!r}")
    return float(s["min"].min()), float(s["max"].max()), float(s["max_dev"].max())


def b32_over_b16(times: pd.DataFrame, gpu: str, source: str, **where) -> float:
    """time(block 32) / time(block 16) of one series: how much the largest block loses."""
    at = dict(gpu_slug=gpu, source=source, **where)
    return float(frame.one(times, "time_us", block_size=32, **at) / frame.one(times, "time_us", block_size=16, **at))


# ----------------------------------------------------------------------------- block-size pattern

def block_penalty(times: pd.DataFrame, *, small: int = 1, reference: int = 16) -> pd.DataFrame:
    """Per series and source of `times_long`: time at block `small` over time at block `reference`
    (vLLM's default 16; NaN without both), and the slowest and fastest block sizes with their ratio."""
    need = ["gpu_slug", *SERIES, "source", "block_size", "time_us"]
    missing = [c for c in need if c not in times.columns]
    if missing:
        raise ValueError(f"block_penalty needs columns {missing}")
    rows = []
    for key, g in times.groupby(["gpu_slug", *SERIES, "source"], sort=False):
        t = g.groupby("block_size")["time_us"].first()
        rows.append(dict(zip(["gpu_slug", *SERIES, "source"], key)) | {
            "blocks": len(t),
            "small_over_ref": float(t[small] / t[reference]) if {small, reference} <= set(t.index) else math.nan,
            "slowest_block": int(t.idxmax()),
            "fastest_block": int(t.idxmin()),
            "slowest_over_fastest": float(t.max() / t.min()),
        })
    return pd.DataFrame(rows)


def shape_mismatch(joined: pd.DataFrame, *, min_points: int = 3) -> pd.DataFrame:
    """How well each of our series follows the seed's block-size curve, its level aside.

    Per (card, seed series, version, protocol) with at least `min_points` cells: `scale` = geometric
    mean of ours / seed, `spread` = exp(std of log(ours / seed)): 1.0 when ours is the seed's curve
    times a constant, 2.0 when a typical block size is off by a factor of two beyond that.
    """
    rows = []
    for (gpu, table, memory, seq, batch, v), g in joined.groupby(
            ["gpu_slug", *SERIES, "version"], sort=False):
        for p, col in (("seed", "seed_protocol_over_seed"), ("rigorous", "rigorous_over_seed")):
            r = np.log(g[col].dropna().to_numpy(dtype=float))
            if len(r) < min_points:
                continue
            rows.append({"gpu_slug": gpu, "table": table, "memory": memory, "seq_len": seq,
                         "batch_size": batch, "version": v, "protocol": p,
                         "source": source_label(v, p), "points": len(r),
                         "scale": float(np.exp(r.mean())), "spread": float(np.exp(r.std(ddof=0)))})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the method's effect

def protocol_effect(ours: pd.DataFrame, backends: Iterable[str] = (
        "own-v1-paged", "own-v2-paged", *REFERENCE_BACKENDS), memory: str = "device") -> pd.DataFrame:
    """Rigorous time over seed-protocol time, per card, backend and point, in the :data:`DIAGONAL`
    arms: the method *and* the tables change at once (the seed's 1024 reused blocks against
    distinct ones); :func:`factorial` separates the two where all four arms were measured."""
    backends = list(backends)
    wide = _by_protocol(check_ours(ours))
    out = wide[wide["backend"].isin(backends) & (wide["memory_kind"] == memory)].copy()
    if out.empty:
        raise ValueError(f"no rows for backends {backends} in {memory} memory")
    out["rigorous_over_seed_protocol"] = out["rigorous_us"] / out["seed_protocol_us"]
    out["series"] = [f"seq {s} × batch {b}" for s, b in zip(out["seq_len"], out["batch_size"])]
    cols = ["gpu_slug", "backend", "seq_len", "batch_size", "series", "block_size",
            "seed_protocol_us", "rigorous_us", "rigorous_over_seed_protocol"]
    return out[cols].sort_values(["gpu_slug", "backend", "seq_len", "batch_size", "block_size"],
                                 ascending=[True, True, False, True, True]).reset_index(drop=True)


def repeat_spread(ours: pd.DataFrame, protocol: str, *, backends: Iterable[str] | None = None) -> pd.DataFrame:
    """Per card and backend: the largest |managed / device - 1| over all points, under one protocol.

    Resident managed memory reads at device speed, so the two rows of one kernel at one point measure
    the same thing: their disagreement is the protocol's run-to-run noise.
    """
    o = check_ours(ours)
    o = o[o["protocol"] == protocol]
    if backends is not None:
        o = o[o["backend"].isin(list(backends))]
    w = o.pivot_table(index=["gpu_slug", "backend", "seq_len", "batch_size", "block_size"],
                      columns="memory_kind", values="median_us", aggfunc="first")
    if not {"managed", "device"} <= set(w.columns):
        raise ValueError(f"no managed/device pairs under protocol {protocol!r}")
    w = w.dropna(subset=["managed", "device"])
    w["dev"] = (w["managed"] / w["device"] - 1).abs()
    top = w.reset_index().sort_values("dev").groupby(["gpu_slug", "backend"]).tail(1)
    return top.rename(columns={"dev": "max_dev"}).sort_values(["gpu_slug", "backend"]).reset_index(drop=True)


def checks(ours: pd.DataFrame) -> dict[str, float]:
    """Rows, rows whose output passed its check, and the worst relative error (same run)."""
    o = check_ours(ours)
    passed = o["check_passed"].fillna(False).astype(bool)
    return {"rows": int(len(o)), "passed": int(passed.sum()), "max_rel_error": float(o["rel_error"].max())}


def seed_protocol_cache_mib(block_size: int) -> float:
    """MiB of K + V in the seed protocol's 1024 reused blocks (64:8:128 fp16): all a sequence can touch."""
    return S.likely_cache_bytes(int(block_size)) / 2**20


#: The model shapes (query heads, KV heads) `seed_tables` measures.
SHAPES = ((64, 8), (32, 32))


def shape_comparison(seed: pd.DataFrame, gpu: str, root=None) -> pd.DataFrame:
    """Per (shape, version, protocol) on one card, over the seed's series: median and best
    `shape_mismatch` spread and median level (ours / seed). Shapes without committed rows are left out."""
    rows = []
    for heads in SHAPES:
        try:
            ours = load_ours(gpu, root=root, heads=heads)
        except (FileNotFoundError, ValueError):
            continue
        if ours.empty:
            continue
        f = shape_mismatch(join(seed, ours))
        for (version, protocol), g in f.groupby(["version", "protocol"]):
            rows.append({"shape": frame.shape_label(*heads), "version": version, "protocol": protocol,
                         "series": len(g), "median spread": float(g["spread"].median()),
                         "best spread": float(g["spread"].min()), "median level": float(g["scale"].median())})
    if not rows:
        raise ValueError(f"no seed_tables rows for any shape on {gpu!r}")
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- two cards

def card_keys(cards_: Iterable[str]) -> dict[str, str]:
    """card slug -> the suffix of its glue keys ("h100", "h200"): every headline number is glued
    once per card so that the prose can quote both."""
    return {c: frame.card_label(c).lower().replace(" ", "_") for c in cards_}


def block_relative(times: pd.DataFrame, *, reference: int = 16) -> pd.DataFrame:
    """`times_long` as ratios to block `reference` within each (card, series, source): the
    block-size effect without the level, which for the seed comes from an unknown GPU."""
    need = ["gpu_slug", *SERIES, "source", "block_size", "time_us"]
    missing = [c for c in need if c not in times.columns]
    if missing:
        raise ValueError(f"block_relative needs columns {missing}")
    key = ["gpu_slug", *SERIES, "source"]
    ref = (times[times["block_size"] == reference].groupby(key)["time_us"].first()
           .rename("ref_us").reset_index())
    out = times.merge(ref, on=key, how="inner")
    out["rel"] = out["time_us"] / out["ref_us"]
    return out.drop(columns="ref_us")


def _rms_log(a: pd.Series, b: pd.Series) -> float:
    r = np.log((a / b).to_numpy(dtype=float))
    return float(np.exp(np.sqrt(np.mean(r ** 2)))) if len(r) else math.nan


def block_resemblance(times: pd.DataFrame, *, protocol: str = "seed", reference: int = 16,
                      min_points: int = 3) -> pd.DataFrame:
    """Which card the seed's block-size curve resembles: per seed series (with `min_points`
    block sizes besides `reference`) and kernel version, the typical factor by which each card's
    time(b) / time(`reference`) misses the seed's (``exp(rms(log(ours / seed)))``, 1 = the same
    curve), and the same distance between the two cards (``between_cards``; needs exactly two
    cards). Whether a lead counts is :func:`resemblance_summary`'s question."""
    rel = block_relative(times, reference=reference)
    rel = rel[rel["block_size"] != reference]
    cards_ = frame.card_slugs(rel)
    rows = []
    for (table, memory, seq, batch), g in rel.groupby(SERIES, sort=True):
        theirs = (g[(g["source"] == SEED_SOURCE) & (g["gpu_slug"] == cards_[0])]
                  .set_index("block_size")["rel"])
        if len(theirs) < min_points:
            continue
        for v in VERSIONS:
            src = source_label(v, protocol)
            mine = {c: g[(g["gpu_slug"] == c) & (g["source"] == src)].set_index("block_size")["rel"]
                    for c in cards_}
            if any(m.empty for m in mine.values()):
                continue
            blocks = theirs.index.intersection(
                pd.Index(sorted(set.intersection(*(set(m.index) for m in mine.values())))))
            row = {"table": table, "memory": memory, "seq_len": seq, "batch_size": batch,
                   "version": v, "points": len(blocks)}
            for c in cards_:
                row[c] = _rms_log(mine[c].loc[blocks], theirs.loc[blocks])
            if len(cards_) == 2:
                row["between_cards"] = _rms_log(mine[cards_[0]].loc[blocks], mine[cards_[1]].loc[blocks])
            rows.append(row)
    return pd.DataFrame(rows)


def lookup_slowdown(rows: pd.DataFrame, *, protocol: str = "rigorous", tables: str = "distinct",
                    memory: str = "device") -> pd.DataFrame:
    """No-lookup (contiguous) over paged time per card, version and point, with the band the two
    rows' p10-p90 spreads allow (``band_lo`` = p10 of contiguous / p90 of paged, ``band_hi`` the
    other way): ``beyond_spread`` where the whole band lies on one side of 1, i.e. the difference
    is larger than either row's own spread. Under the rigorous protocol on distinct blocks the
    two kernels read the same bytes, so this is the lookup alone."""
    need = {"gpu_slug", "backend", "protocol", "tables", "memory_kind", "median_us", "p10_us",
            "p90_us", *KEY}
    missing = sorted(need - set(rows.columns))
    if missing:
        raise ValueError(f"lookup_slowdown needs columns {missing}")
    r = rows[(rows["protocol"] == protocol) & (rows["tables"] == tables) & (rows["memory_kind"] == memory)]
    frames = []
    for v in VERSIONS:
        p = r[r["backend"] == backend_for("original", v)]
        c = r[r["backend"] == backend_for("no_lookup", v)]
        m = c.merge(p, on=["gpu_slug", *KEY], suffixes=("_c", "_p"), validate="one_to_one")
        if m.empty:
            continue
        frames.append(pd.DataFrame({
            "gpu_slug": m["gpu_slug"], "version": v, "seq_len": m["seq_len"].astype(int),
            "batch_size": m["batch_size"].astype(int), "block_size": m["block_size"].astype(int),
            "ratio": m["median_us_c"] / m["median_us_p"],
            "band_lo": m["p10_us_c"] / m["p90_us_p"], "band_hi": m["p90_us_c"] / m["p10_us_p"]}))
    if not frames:
        raise ValueError(f"no paged/contiguous pairs under {protocol!r} on {tables!r} in {memory}")
    out = pd.concat(frames, ignore_index=True)
    out["beyond_spread"] = (out["band_lo"] > 1) | (out["band_hi"] < 1)
    return out.sort_values(["gpu_slug", "version", "seq_len", "batch_size", "block_size"]).reset_index(drop=True)


#: Backends in the order the factorial table lists them.
SEED_BACKEND_ORDER = ("own-v1-paged", "own-v1-contiguous", "own-v1-no_offset", "own-v2-paged",
                      "own-v2-contiguous", "own-v2-no_offset", "vllm", "sdpa_dense")
#: Column headers of the factorial's effects.
FACTORIAL_LABELS = {
    "timing_at_seed_tables": "timing alone, seed's tables",
    "timing_at_distinct": "timing alone, distinct",
    "tables_at_seed_timing": "data alone, seed timing",
    "tables_at_rigorous": "data alone, rigorous",
    "diagonal": "both (the H100's comparison)",
    "interaction": "interaction",
}


def resemblance_summary(r: pd.DataFrame) -> pd.DataFrame:
    """Per kernel version: the median over the seed's series of each card's miss factor
    (:func:`block_resemblance`) and of the cards' own gap; ``repeat_noise``, how much the miss
    itself moves between two measurements of one curve (table 1's managed and device series:
    the same kernel at the same point, resident managed memory reading at device speed; the
    largest over both cards); and in how many series one card's miss is smaller than the
    other's by more than that noise (a lead within it is no resemblance). The cards' gap is not
    the yardstick: by the triangle inequality no lead can exceed it."""
    cards_ = [c for c in r.columns if c in frame.CARDS]
    if len(cards_) != 2 or "between_cards" not in r.columns:
        raise ValueError(f"resemblance_summary needs two cards' columns, has {cards_}")
    a, b = cards_
    rows = []
    for v, g in r.groupby("version", sort=True):
        t1 = g[g["table"] == 1].set_index(["memory", "seq_len", "batch_size"])
        noise = 0.0
        if {"managed", "device"} <= set(t1.index.get_level_values("memory")):
            m, d = t1.xs("managed", level="memory"), t1.xs("device", level="memory")
            noise = float(np.nanmax(np.abs(np.log((m[[a, b]] / d[[a, b]]).to_numpy(dtype=float)))))
        lead = np.log(g[b]) - np.log(g[a])       # > 0: the first card is closer
        rows.append({"version": v, "series": len(g), a: float(g[a].median()), b: float(g[b].median()),
                     "between_cards": float(g["between_cards"].median()),
                     "repeat_noise": float(np.exp(noise)),
                     f"closer_{a}": int((lead > noise).sum()), f"closer_{b}": int((-lead > noise).sum())})
    return pd.DataFrame(rows)


def card_ratio(rows: pd.DataFrame, *, protocol: str = "rigorous", tables: str = "distinct") -> pd.DataFrame:
    """Per backend and point, the second card's time over the first card's (book order: H200 over
    H100) in one arm, with each row's bandwidth as a share of its run's read ceiling: what a card
    with faster HBM changes where a kernel is (or is not) bandwidth-bound."""
    r = rows[(rows["protocol"] == protocol) & (rows["tables"] == tables)]
    cards_ = frame.card_slugs(r)
    if len(cards_) != 2:
        raise ValueError(f"card_ratio needs two cards' rows, has {cards_}")
    a, b = cards_
    idx = ["backend", *KEY]
    m = r[r["gpu_slug"] == a].merge(r[r["gpu_slug"] == b], on=idx, suffixes=("_a", "_b"),
                                    validate="one_to_one")
    return pd.DataFrame({**{c: m[c] for c in idx}, "first_us": m["median_us_a"], "second_us": m["median_us_b"],
                         "ratio": m["median_us_b"] / m["median_us_a"],
                         "first_pct": m["pct_of_read_ceiling_a"], "second_pct": m["pct_of_read_ceiling_b"]})


def card_ratio_summary(cr: pd.DataFrame) -> pd.DataFrame:
    """`card_ratio` per backend: geometric mean, min and max of the ratio, and the largest share
    of the read ceiling either card reached (far below 100 %: these points are not
    bandwidth-bound, so the H200's faster HBM need not show)."""
    rows = []
    for b in [x for x in SEED_BACKEND_ORDER if x in set(cr["backend"])]:
        g = cr[cr["backend"] == b]
        v = g["ratio"].to_numpy(dtype=float)
        rows.append({"backend": b, "points": len(g), "geomean": float(np.exp(np.log(v).mean())),
                     "min": float(v.min()), "max": float(v.max()),
                     "max_pct": float(np.nanmax(g[["first_pct", "second_pct"]].to_numpy(dtype=float)))})
    return pd.DataFrame(rows)
