"""The kernel chapter's first speed grid (the six shapes of the H100 run) on every card that ran
it: each backend's time over dense SDPA's in the same run and its % of that run's read ceiling,
per card, with the range over a card's runs. Same kernels, same points, two memory systems: a
kernel bound by DRAM gains with the H200's bandwidth, one bound by latency or issue slots does
not, and falls further behind SDPA."""

from __future__ import annotations

import pandas as pd

from lib.book import frame
from lib.book.plots import require_columns
from lib.chapters.kernel.experiment import H100_BACKENDS

#: the backends of the first grid, in the table's order (FlexAttention's errors at the largest
#: pools make it a poor cross-card column)
BACKENDS = ("own-auto-paged", "own-v1-paged", "own-v2-paged", "vllm", "sdpa_dense")
BASELINE = "sdpa_dense"


def first_grid(speed_all: pd.DataFrame) -> pd.DataFrame:
    """The ok rows of the first grid's points (its backend list in the point key), every card,
    every run: what both cards measured alike."""
    require_columns(speed_all, ["point_key", "status", "backend", "run_id", "gpu_slug"], "first_grid")
    tag = f"backends={H100_BACKENDS};"
    d = speed_all[speed_all["point_key"].str.startswith(tag) & (speed_all["status"] == "ok")].copy()
    d["shape"] = [f"{int(b)} × {int(n)}, {int(h)}:{int(k)}" for b, n, h, k in
                  zip(d["batch_size"], d["seq_len"], d["num_heads"], d["num_kv_heads"])]
    return d


def by_card(first: pd.DataFrame) -> pd.DataFrame:
    """Per (card, shape, backend): the time over SDPA's (taken within each run, then the median,
    smallest and largest over the card's runs) and the median % of the read ceiling."""
    base = first[first["backend"] == BASELINE].set_index(["run_id", "point_key"])["median_us"]
    d = first[first["backend"].isin(BACKENDS)].copy()
    d["over_sdpa"] = d["median_us"].to_numpy() / base.reindex(
        list(zip(d["run_id"], d["point_key"]))).to_numpy()
    g = d.groupby(["gpu_slug", "shape", "backend"])
    out = g.agg(over_sdpa=("over_sdpa", "median"), lo=("over_sdpa", "min"), hi=("over_sdpa", "max"),
                pct=("pct_of_read_ceiling", "median"), runs=("run_id", "nunique"),
                kernel=("extra", lambda e: frame.kernels_used(pd.DataFrame(
                    {"backend": ["own-auto-paged"] * len(e), "extra": list(e)}))))
    return out.reset_index()


def card_table(cards: pd.DataFrame) -> pd.DataFrame:
    """:func:`by_card` as one row per (shape, backend), one column pair per card."""
    cs = frame.card_slugs(cards)
    t = cards.pivot_table(index=["shape", "backend"], columns="gpu_slug",
                          values=["over_sdpa", "pct"], aggfunc="first")
    out = pd.DataFrame(index=t.index)
    for c in cs:
        out[f"{frame.card_label(c)}: × SDPA"] = t[("over_sdpa", c)]
    for c in cs:
        out[f"{frame.card_label(c)}: % of ceiling"] = t[("pct", c)]
    rng = cards.assign(r=cards["hi"] - cards["lo"]).pivot_table(
        index=["shape", "backend"], columns="gpu_slug", values="r", aggfunc="first")
    for c in cs:
        if int(cards.loc[cards["gpu_slug"] == c, "runs"].max()) > 1:
            out[f"{frame.card_label(c)}: range over runs"] = rng[c]
    order = {b: i for i, b in enumerate(BACKENDS)}
    shapes = sorted(out.index.get_level_values("shape").unique(),
                    key=lambda s: (int(s.split(", ")[1].split(":")[0]) // int(s.split(":")[1]),
                                   int(s.split(" × ")[0]) * int(s.split(" × ")[1].split(",")[0])))
    return out.reindex(sorted(out.index, key=lambda i: (shapes.index(i[0]), order.get(i[1], 99))))


def style_card_table(table: pd.DataFrame, caption: str | None = None):
    from lib.book.tables import compact

    fmt = {c: "{:.2f}" for c in table.columns if "SDPA" in c}
    fmt.update({c: "{:.0f}" for c in table.columns if "ceiling" in c})
    fmt.update({c: "{:.3f}" for c in table.columns if "range" in c})
    return compact(table.style.format(fmt, na_rep="–"), caption)


def card_claims(cards: pd.DataFrame) -> dict:
    """What the chapter says about the two cards, per card label (``h100``, ``h200``): own-auto
    and v2 over SDPA at MHA 32 x 4096 and GQA 32:8, and the kernel own-auto ran at 32:8."""
    out = {}
    for c in frame.card_slugs(cards):
        lab = frame.card_label(c).lower()
        sel = cards[cards["gpu_slug"] == c].set_index(["shape", "backend"])
        for key, shape in (("mha", "32 × 4096, 32:32"), ("gqa", "32 × 4096, 32:8")):
            for b_key, backend in (("auto", "own-auto-paged"), ("v2", "own-v2-paged"), ("vllm", "vllm")):
                if (shape, backend) in sel.index:
                    out[f"{key}_{b_key}_{lab}"] = float(sel.loc[(shape, backend), "over_sdpa"])
            if (shape, "own-auto-paged") in sel.index:
                out[f"{key}_kernel_{lab}"] = frame.Plain(sel.loc[(shape, "own-auto-paged"), "kernel"])
                out[f"{key}_pct_{lab}"] = float(sel.loc[(shape, "own-auto-paged"), "pct"])
    return out
