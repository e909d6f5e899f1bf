"""The kernel chapter's section on v3, the grouped-query kernel on the matrix units: its tile
diagram, its launch plans, its ptxas resources (paged against contiguous) and its speed table.

Everything here is computed from `lib.engine.kernels.plan` (the plans the launcher uses), the
committed ptxas table and committed kernel_speed rows; nothing is typed in.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lib import DATA
from lib.book.plots import diagram_canvas, require_columns
from lib.engine import kernels

#: the peers own-auto is held against (whichever of them is fastest at a shape)
PEERS = ("sdpa_dense", "vllm", "flashinfer")
#: kernel_speed columns of the speed table, in reading order
SPEED_COLUMNS = ("own-auto-paged", "own-v3-paged", "own-v3-contiguous", "own-v2-paged",
                 "own-v1-paged", "vllm", "flashinfer", "sdpa_dense", "flex_paged")


def _box(ax, x, y, w, h, label="", *, color="0.85", hatch=None, fs=7.5, lw=0.8):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="0.25", lw=lw, hatch=hatch))
    if label:
        box = dict(facecolor="white", edgecolor="none", pad=1.0) if hatch else None
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=fs, bbox=box)


def tile_figure(heads: int = kernels.MMA_TILE, tokens: int = kernels.MMA_CHUNK) -> Figure:
    """How one thread block's query heads share each K/V element: the two matrix products of one
    warp step, drawn in rows of heads and tokens (the head dimension d is schematic)."""
    fig, ax = diagram_canvas(72, 21, (9.0, 2.9))
    c_q, c_k, c_v, c_s, c_o = "#9ecae1", "#fdae6b", "#a1d99b", "#dadaeb", "#fdd0a2"
    d, u, y0 = 10, 0.62, 5.0  # drawn head dimension, one head/token row, baseline
    tw, hw = tokens * u, heads * u
    # ---- S = Q Kᵀ ----
    _box(ax, 1, y0 + hw, d, hw, f"Q: the {heads} query\nheads of a KV head", color=c_q)
    _box(ax, 1, y0, d, hw, "rows 8-15: zero\n(wide tile: heads 8-15)", color="white", hatch="///")
    ax.text(1 + d / 2, y0 + 2 * hw + 0.7, "A operand (16 × d)", ha="center", fontsize=7.5)
    kx = 1 + d + 2.5
    _box(ax, kx, y0 + 2 * hw - d, tw, d, f"Kᵀ: {tokens} tokens\n(two n-tiles of 8)", color=c_k)
    ax.text(kx + tw / 2, y0 + 2 * hw + 0.7, f"B operand (d × {tokens})", ha="center", fontsize=7.5)
    sx = kx + tw + 2.5
    _box(ax, sx, y0 + hw, tw, hw, f"S: {heads} heads\n× {tokens} tokens", color=c_s)
    _box(ax, sx, y0, tw, hw, "not used\n(wide tile: heads 8-15)", color="white", hatch="///")
    ax.text(kx - 1.25, y0 + 1.5 * hw, "×", ha="center", va="center", fontsize=12)
    ax.text(sx - 1.25, y0 + 1.5 * hw, "=", ha="center", va="center", fontsize=12)
    mid1 = (1 + sx + tw) / 2
    ax.text(mid1, 1.8, "S = Q Kᵀ on mma.sync m16n8k16 (fp32 accumulators),\nthen an online "
            "softmax per head", ha="center", va="center", fontsize=7.8)
    # ---- Oᵀ += Vᵀ Pᵀ ----
    x0 = sx + tw + 5
    _box(ax, x0, y0, tw, d + 2, f"Vᵀ: d × {tokens}\ntokens (A, d/16\nm-tiles)", color=c_v)
    px = x0 + tw + 2.5
    _box(ax, px, y0 + d + 2 - tw, hw, tw, f"Pᵀ\n{tokens} × {heads}", color=c_s)
    ox = px + hw + 3.0
    _box(ax, ox, y0, hw, d + 2, f"Oᵀ\nd × {heads}\nheads", color=c_o)
    ax.text(px - 1.25, y0 + (d + 2) / 2, "×", ha="center", va="center", fontsize=12)
    ax.text(ox - 1.5, y0 + (d + 2) / 2, "+=", ha="center", va="center", fontsize=11)
    mid2 = (x0 + ox + hw) / 2
    ax.text(mid2, 1.8, "Oᵀ += Vᵀ Pᵀ: S's accumulator registers are Pᵀ's B\noperand as they are "
            "(wide tile: a second Pᵀ, the same Vᵀ)", ha="center", va="center", fontsize=7.8)
    ax.text(36, 19.6, f"One warp step: each K and V element of {tokens} tokens is loaded once and "
            f"used by all {heads} query heads of a tile ({2 * heads} in the wide tile)",
            ha="center", fontsize=8.5, weight="bold")
    fig.tight_layout()
    plt.close(fig)
    return fig


def plan_table(shapes, *, num_sms: int = 132, head_size: int = 128, block_size: int = 16,
               dtype: str = "float16") -> pd.DataFrame:
    """v3's launch plan at each (batch, tokens, heads, kv_heads): blocks before splitting,
    partitions, grid, and the grid in waves of resident blocks (`mma_blocks_per_sm` per SM)."""
    rows = []
    for b, n, h, kv in shapes:
        p = kernels.plan_launch(dtype=dtype, block_size=block_size, head_size=head_size,
                                num_heads=h, num_kv_heads=kv, num_seqs=b, max_seq_len=n,
                                version=3, num_sms=num_sms)
        auto = kernels.plan_launch(dtype=dtype, block_size=block_size, head_size=head_size,
                                   num_heads=h, num_kv_heads=kv, num_seqs=b, max_seq_len=n,
                                   num_sms=num_sms)
        base = b * kv * p.head_tiles
        grid = base * p.max_partitions
        rows.append({"batch × tokens": f"{b} × {n}", "heads": f"{h}:{kv}",
                     "heads per block": p.tile, "blocks per KV head": p.head_tiles, "blocks unsplit": base,
                     "partitions": p.max_partitions, "partition (tokens)": p.partition_size,
                     "grid": grid,
                     "waves": f"{grid / (kernels.mma_blocks_per_sm(p.tile) * num_sms):.2f}",
                     "own-auto runs": f"v{auto.version}"})
    return pd.DataFrame(rows)


def resource_pairs(res: pd.DataFrame, arch: str = "sm_90") -> pd.DataFrame:
    """v3's registers and spills per (dtype, head size, block size, head tile), one column per
    addressing mode, and the largest register difference between the three."""
    require_columns(res, ["arch", "kernel", "dtype", "head_size", "block_size", "tile", "addressing",
                          "registers", "spill_stores"], "resource_pairs")
    m = res[(res["kernel"] == "mma") & (res["arch"] == arch)]
    if m.empty:
        raise ValueError(f"resource_pairs: no v3 (kernel 'mma') rows for {arch} in the ptxas table")
    key = ["dtype", "head_size", "block_size", "tile"]
    regs = m.pivot_table(index=key, columns="addressing", values="registers", aggfunc="first")
    spills = m.groupby(key)["spill_stores"].max()
    out = regs[list(kernels.ADDRESSING)].copy()
    out["max difference"] = out.max(axis=1) - out.min(axis=1)
    out["paged - contiguous"] = out["paged"] - out["contiguous"]
    out["spill bytes"] = spills
    out = out.reset_index()
    out["block_size"] = out["block_size"].astype(int)
    out["tile"] = out["tile"].astype(int)
    return out


def resource_summary(pairs: pd.DataFrame) -> dict:
    """Counts for the prose: kernels, spilling ones, the widest register gaps."""
    wide = pairs["block_size"] >= 4
    spill = pairs[pairs["spill bytes"] > 0]
    return {"modules": len(pairs), "spilling": len(spill),
            "wide_modules": int((pairs["tile"] == kernels.MMA_WIDE_TILE).sum()),
            "spilling_where": ", ".join(sorted({f"head {int(h)} block {int(b)} tile {int(t)}" for h, b, t in
                                                zip(spill["head_size"], spill["block_size"], spill["tile"])}))
            or "none",
            "max_pc_gap": int(pairs["paged - contiguous"].abs().max()),
            "max_pc_gap_b4": int(pairs.loc[wide, "paged - contiguous"].abs().max()),
            "max_gap": int(pairs["max difference"].max()),
            "max_gap_b4": int(pairs.loc[wide, "max difference"].max()),
            "regs_lo": int(pairs["paged"].min()), "regs_hi": int(pairs["paged"].max())}


def v3_points(speed: pd.DataFrame) -> pd.DataFrame:
    """The rows of kernel_speed points that timed v3 (the grid's 30 shapes), not the older
    six-shape block that shares some shapes with them."""
    require_columns(speed, ["point_key", "backend"], "v3_points")
    keys = set(speed.loc[speed["backend"] == "own-v3-paged", "point_key"])
    return speed[speed["point_key"].isin(keys)]


def _shape_order(batch: int, seq_len: int, heads: int, kv_heads: int) -> tuple:
    """Where a shape goes in the chapter's tables: by group size, heads, then tokens."""
    return (heads // kv_heads, heads, batch * seq_len, seq_len)


def speed_table(speed: pd.DataFrame) -> pd.DataFrame:
    """Per kernel_speed shape: each backend's median µs, own-auto-paged over the fastest peer
    (SDPA, vLLM, FlashInfer: whichever ran), and own-auto's % of the run's read ceiling."""
    require_columns(speed, ["backend", "batch_size", "seq_len", "num_heads", "num_kv_heads",
                            "median_us", "pct_of_read_ceiling", "bytes_moved"], "speed_table")
    d = speed.copy()
    d["shape"] = [f"{int(b)} × {int(n)}, {int(h)}:{int(k)}" for b, n, h, k in
                  zip(d["batch_size"], d["seq_len"], d["num_heads"], d["num_kv_heads"])]
    d["order"] = [_shape_order(b, n, h, k) for b, n, h, k in
                  zip(d["batch_size"], d["seq_len"], d["num_heads"], d["num_kv_heads"])]
    t = d.pivot_table(index=["order", "shape"], columns="backend", values="median_us",
                      aggfunc="first")
    peers = [p for p in PEERS if p in t.columns]
    if "own-auto-paged" not in t.columns or not peers:
        raise ValueError("speed_table needs own-auto-paged and at least one of " + ", ".join(PEERS))
    pct = d[d["backend"] == "own-auto-paged"].set_index(["order", "shape"])["pct_of_read_ceiling"]
    mib = d[d["backend"] == "own-auto-paged"].set_index(["order", "shape"])["bytes_moved"] / 2**20
    out = t[[c for c in SPEED_COLUMNS if c in t.columns]].copy()
    fastest = t[peers].min(axis=1)
    out["fastest peer"] = t[peers].idxmin(axis=1)
    out["auto / fastest peer"] = t["own-auto-paged"] / fastest
    out["auto % of ceiling"] = pct
    out["MiB moved"] = mib
    out = out.sort_index().reset_index(level="order", drop=True)
    return out


def with_run_spread(table: pd.DataFrame, speed_all: pd.DataFrame) -> pd.DataFrame:
    """`table` plus, per shape, the spread (largest minus smallest) of own-auto over the fastest
    peer across every run in `speed_all` (separate processes on one card), and the run count."""
    ratios = []
    for _, run in speed_all.groupby("run_id"):
        ratios.append(speed_table(v3_points(run))["auto / fastest peer"])
    r = pd.concat(ratios, axis=1)
    out = table.copy()
    out["spread between runs"] = (r.max(axis=1) - r.min(axis=1)).reindex(out.index)
    out.attrs["runs"] = r.shape[1]
    return out


#: which v3 source each committed kernel_speed run's commit holds (from `git log --
#: lib/engine/kernels/`): 7d9dd42 moved the block-table reads two warp steps ahead of the loads,
#: ec4f13a added the wide head tile; 1698623 and f3b188e hold the same first source, a67a71c and
#: 0851e2b the same wide-tile source (0851e2b after the cp.async ring was tried and reverted)
KERNEL_OF_COMMIT = {"1698623": "first v3", "f3b188e": "first v3",
                    "fbbee38": "+ lookahead (7d9dd42)", "a67a71c": "+ wide tile (ec4f13a)",
                    "0851e2b": "+ wide tile (ec4f13a)"}


def run_commits(provenance: dict) -> dict[str, str]:
    """run id -> the commit (7 characters) its provenance names; "" where it names none."""
    return {run: ((p.get("git") or {}).get("commit") or "")[:7] for run, p in provenance.items()}


def newest_kernel_runs(speed_all: pd.DataFrame, provenance: dict) -> pd.DataFrame:
    """The rows of every run made at the commit of the newest run that timed v3: the repeats of
    one kernel source, so that older kernels do not count as run-to-run noise."""
    require_columns(speed_all, ["run_id", "backend"], "newest_kernel_runs")
    commits = run_commits(provenance)
    timed = speed_all.loc[speed_all["backend"] == "own-v3-paged", "run_id"]
    if timed.empty:
        raise ValueError("newest_kernel_runs: no run timed own-v3-paged")
    newest = commits.get(timed.max(), "")
    if not newest:
        raise ValueError(f"newest_kernel_runs: run {timed.max()} records no commit")
    return speed_all[[commits.get(r, "") == newest for r in speed_all["run_id"]]]


def kernel_history(speed_all: pd.DataFrame, provenance: dict, shapes=()) -> pd.DataFrame:
    """One row per run that timed v3, oldest first: its commit and card, how far paged v3 is
    from contiguous v3 (largest ratio over the shapes), own-auto over the fastest peer (median
    over the shapes and worst at batch 8 or more), and own-auto over the fastest peer at each
    of `shapes` (speed-table labels such as "128 × 4096, 32:1"): what each kernel change moved."""
    require_columns(speed_all, ["run_id", "backend", "card_id"], "kernel_history")
    commits = run_commits(provenance)
    rows = []
    for run, d in speed_all.groupby("run_id"):
        if not (d["backend"] == "own-v3-paged").any():
            continue
        t = speed_table(v3_points(d))
        batch = t.index.str.split(" × ").str[0].astype(int)
        r = t["auto / fastest peer"]
        commit = commits.get(run, "")
        rows.append({"run": run, "commit": commit, "kernel": KERNEL_OF_COMMIT.get(commit, "?"),
                     "card": d["card_id"].iloc[0],
                     "paged / contiguous, largest": float((t["own-v3-paged"] / t["own-v3-contiguous"]).max()),
                     "auto / fastest peer, median": float(r.median()),
                     "auto / fastest peer, worst at batch ≥ 8": float(r[batch >= 8].max()),
                     **{f"auto / fastest peer at {sh}": float(r.get(sh, math.nan)) for sh in shapes}})
    if not rows:
        raise ValueError("kernel_history: no run timed own-v3-paged")
    return pd.DataFrame(rows).sort_values("run").reset_index(drop=True)


def speed_claims(table: pd.DataFrame) -> dict:
    """How the speed table stands against the kernel's targets (batch >= 8 within 1.05x of the
    fastest peer; 90% of the read ceiling where K+V >= 256 MiB; batch 1 within 1.15x)."""
    batch = table.index.str.split(" × ").str[0].astype(int)
    heads = table.index.str.split(", ").str[1].str.split(":")
    grouped = heads.str[0].astype(int) > heads.str[1].astype(int)
    big = table["MiB moved"] >= 256
    r = table["auto / fastest peer"]
    return {"shapes": len(table),
            "b8_within": int((r[batch >= 8] <= 1.05).sum()), "b8_n": int((batch >= 8).sum()),
            "b8_worst": float(r[batch >= 8].max()),
            "b8_worst_shape": str(r[batch >= 8].idxmax()),
            "big_90": int((table.loc[big, "auto % of ceiling"] >= 90).sum()), "big_n": int(big.sum()),
            "b1_within": int((r[batch == 1] <= 1.15).sum()), "b1_n": int((batch == 1).sum()),
            "best_ratio": float(r.min()), "best_shape": str(r.idxmin()),
            **_v3_over_v2(table, grouped),
            "mha_n": int((~grouped).sum()),
            "mha_v3_faster": int((table["own-v3-paged"] < table["own-auto-paged"])[~grouped].sum())
            if "own-v3-paged" in table.columns else 0,
            **_paged_cost(table)}


def _v3_over_v2(table: pd.DataFrame, grouped) -> dict:
    """v2's time over v3's on the grouped-query shapes: how often v3 is the faster, by how much,
    and where it is not."""
    if not {"own-v2-paged", "own-v3-paged"} <= set(table.columns):
        return {"v3_over_v2_lo": math.nan}
    r = (table["own-v2-paged"] / table["own-v3-paged"])[grouped]
    slower = r[r < 1]
    return {"v3_over_v2_lo": float(r.min()), "v3_over_v2_hi": float(r.max()),
            "v3_faster_n": int((r > 1).sum()), "grouped_n": len(r),
            "v3_slower_where": ", ".join(slower.index) or "none"}


def _paged_cost(table: pd.DataFrame) -> dict:
    """v3 paged over v3 contiguous: the page table's cost to v3, at its largest."""
    if not {"own-v3-paged", "own-v3-contiguous"} <= set(table.columns):
        return {}
    r = table["own-v3-paged"] / table["own-v3-contiguous"]
    return {"pc_max": float(r.max()), "pc_max_shape": str(r.idxmax()), "pc_min": float(r.min())}


def style_history(history: pd.DataFrame, caption: str | None = None):
    """The kernel history in the chapter's compact style: ratios to three decimals."""
    from lib.chapters.kernel.figures import _compact

    fmt = {c: "{:.3f}" for c in history.columns if "/" in c}
    return _compact(history.style.format(fmt, na_rep="–").hide(axis="index"), caption)


def style_speed_table(table: pd.DataFrame, caption: str | None = None):
    """The speed table in the chapter's compact style: µs to one decimal, ratios to two."""
    from lib.chapters.kernel.figures import _compact

    fmt = {c: "{:.1f}" for c in table.columns if c in SPEED_COLUMNS}
    fmt.update({"auto / fastest peer": "{:.2f}", "auto % of ceiling": "{:.0f}",
                "MiB moved": "{:.0f}", "spread between runs": "{:.3f}"})
    st = table.style.format(fmt, na_rep="–")
    st = st.map(lambda v: "font-weight: bold; color: #b2182b" if isinstance(v, float) and v > 1.05
                else "", subset=["auto / fastest peer"])
    return _compact(st, caption)


#: the ring probe's rows (development probe, not kernel_speed data: data/probes/v3_ring/README.md)
RING_PROBE = DATA / "probes" / "v3_ring" / "variants-7bb9d12.jsonl"
#: the correctness slice the first ring (faad5d8) passed
RING_CHECK = DATA / "probes" / "v3_ring" / "check-faad5d8.jsonl"


def ring_card(path=RING_PROBE) -> str:
    """The card the ring probe ran on, as its provenance file names it (the probe's own hash)."""
    import json

    prov = json.loads(path.with_name("provenance.json").read_text())
    return prov["runs"][path.name]["card"]


#: the backends the ring table compares (the probe also timed v1 and v2 beside them)
RING_BACKENDS = ("own-v3-paged", "sdpa_dense")


def load_ring_probe(path) -> pd.DataFrame:
    """The ring probe's rows of RING_BACKENDS (one JSON object a line); refuses a file where any
    of them did not pass the check that ran beside its timing."""
    d = pd.read_json(path, lines=True)
    require_columns(d, ["label", "shape", "backend", "median_us", "check_passed"], "load_ring_probe")
    d = d[d["backend"].isin(RING_BACKENDS)]
    failed = d[d["check_passed"] != True]  # noqa: E712
    if len(failed):
        raise ValueError(f"{path}: {len(failed)} rows failed their check: "
                         f"{failed[['label', 'shape', 'backend']].to_dict('records')[:3]}")
    return d


def _probe_shape(b, n, h, k) -> str:
    return f"{int(b)}x{int(n)} {int(h)}:{int(k)}"


def ring_probe_table(probe: pd.DataFrame, kernel_runs: pd.DataFrame) -> pd.DataFrame:
    """Per shape of the ring probe: paged v3 over SDPA in the same run, for the register kernel
    (median over `kernel_runs`, the newest kernel_speed runs) and for the ring at each stage
    count. Each over SDPA of its own run, since the probe ran on another card."""
    require_columns(probe, ["label", "shape", "backend", "median_us"], "ring_probe_table")
    sdpa = probe[probe["backend"] == "sdpa_dense"].groupby("shape")["median_us"].median()
    ring = probe[probe["backend"] == "own-v3-paged"].pivot_table(
        index="shape", columns="label", values="median_us", aggfunc="median")
    ring = ring.div(sdpa, axis=0)
    ring = ring[sorted(ring.columns)]
    ring.columns = [f"ring, {c.lstrip('s')} stages" for c in ring.columns]
    k = v3_points(kernel_runs)
    k = k[k["backend"].isin(["own-v3-paged", "sdpa_dense"])]
    k = k.assign(shape=[_probe_shape(*x) for x in zip(k["batch_size"], k["seq_len"],
                                                      k["num_heads"], k["num_kv_heads"])])
    reg = k.pivot_table(index="shape", columns="backend", values="median_us", aggfunc="median")
    out = ring.copy()
    out.insert(0, "registers", (reg["own-v3-paged"] / reg["sdpa_dense"]).reindex(out.index))
    out["best ring / registers"] = out.filter(like="ring,").min(axis=1) / out["registers"]

    def order(label):  # "8x4096 64:8", as _probe_shape writes it
        bn, hk = label.split(" ")
        return _shape_order(*map(int, bn.split("x")), *map(int, hk.split(":")))
    out = out.loc[sorted(out.index, key=order)]
    out.index.name = "shape (batch x tokens, heads)"
    return out


def ring_claims(table: pd.DataFrame) -> dict:
    """What the chapter says of the ring probe: best ring over the register kernel at batch 8 or
    more (lowest, highest), and how far 2 and 3 stages lie apart there (largest relative gap)."""
    batch = table.index.str.split("x").str[0].astype(int)
    big = table[batch >= 8]
    s2, s3 = big["ring, 2 stages"], big["ring, 3 stages"]
    return {"b8_lo": float(big["best ring / registers"].min()),
            "b8_hi": float(big["best ring / registers"].max()),
            "s23_spread": float(((s2 - s3).abs() / pd.concat([s2, s3], axis=1).min(axis=1)).max())}


def ring_checks(path=RING_CHECK) -> tuple[int, int]:
    """(passed, total) of the correctness slice the first ring ran."""
    d = pd.read_json(path, lines=True)
    return int(d["passed"].astype(bool).sum()), len(d)


def style_ring_table(table: pd.DataFrame, caption: str | None = None):
    """The ring probe's table in the chapter's compact style: shapes as rows, ratios to three
    decimals, "best ring / registers" red where the ring was slower."""
    from lib.chapters.kernel.figures import _compact

    st = table.style.format("{:.3f}", na_rep="–")
    st = st.map(lambda v: "font-weight: bold; color: #b2182b" if isinstance(v, float) and v > 1
                else "", subset=["best ring / registers"])
    return _compact(st, caption)
