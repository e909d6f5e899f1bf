"""The H100-beside-H200 comparisons: block-size resemblance, the lookup against its spread, one
card's time over the other's, and the factorial on the committed H200 data; synthetic frames
where the answer is known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lib.book import frame
from lib.chapters.seed import tables as S
from lib.chapters.seed_repro import analysis as SR
from lib.chapters.seed_repro import figures as F

H100, H200 = "h100-80gb-hbm3", "h200"


@pytest.fixture(scope="module")
def seed():
    return S.load_seed()


def curve_times(seed_curve: dict, curves: dict) -> pd.DataFrame:
    """A times_long-like frame: one device series (table 1, 4096 x 1), the seed's curve and each
    card's seed-protocol v1/v2 curve (block -> time)."""
    rows = []
    at = dict(table=1, memory="device", seq_len=4096, batch_size=1)
    for gpu, curve in curves.items():
        for b, t in seed_curve.items():
            rows.append({**at, "gpu_slug": gpu, "source": SR.SEED_SOURCE, "block_size": b, "time_us": t})
        for v in SR.VERSIONS:
            for b, t in curve.items():
                rows.append({**at, "gpu_slug": gpu, "source": SR.source_label(v, "seed"),
                             "block_size": b, "time_us": t})
    return pd.DataFrame(rows)


BLOCKS = (1, 2, 4, 8, 16, 32)


def test_block_resemblance_ignores_level_and_sees_shape():
    seed_curve = {b: 1000.0 / b for b in BLOCKS}
    # the H100 is the seed's curve at a tenth of its level: the same shape, miss factor 1;
    # the H200 is twice as steep between every pair of blocks: a clear miss
    t = curve_times(seed_curve, {H100: {b: 100.0 / b for b in BLOCKS},
                                 H200: {b: 100.0 / b ** 2 for b in BLOCKS}})
    rel = SR.block_relative(t)
    assert np.allclose(rel[rel.block_size == 16]["rel"], 1.0)
    r = SR.block_resemblance(t)
    assert len(r) == 2 and set(r.version) == set(SR.VERSIONS)
    assert np.allclose(r[H100], 1.0)
    assert (r[H200] > 2).all() and np.allclose(r["between_cards"], r[H200])
    s = SR.resemblance_summary(r).set_index("version")
    # one series of table 1 only (no managed twin): no repeat noise, so any lead counts
    assert (s["repeat_noise"] == 1.0).all()
    assert (s[f"closer_{H100}"] == 1).all() and (s[f"closer_{H200}"] == 0).all()


def test_resemblance_lead_must_exceed_the_repeat_noise():
    seed_curve = {b: 1000.0 / b for b in BLOCKS}
    t = curve_times(seed_curve, {H100: {b: 100.0 / b ** 1.02 for b in BLOCKS},
                                 H200: {b: 100.0 / b ** 1.04 for b in BLOCKS}})
    # a managed twin of table 1 whose H100 curve differs from the device one by far more than
    # the two cards differ: the H100's small lead is then inside the noise
    twin = t.assign(memory="managed")
    twin.loc[(twin.gpu_slug == H100) & (twin.source != SR.SEED_SOURCE), "time_us"] *= \
        twin["block_size"].map(lambda b: (b / 16) ** -0.3)
    r = SR.block_resemblance(pd.concat([t, twin]))
    s = SR.resemblance_summary(r).set_index("version")
    assert (r[r.memory == "device"][H100] < r[r.memory == "device"][H200]).all()
    assert (s["repeat_noise"] > 1.1).all()
    assert (s[f"closer_{H100}"] == 0).all()
    # in the twin the H200 leads, but by less than the noise the twin itself defines
    assert (s[f"closer_{H200}"] == 0).all()
    with pytest.raises(ValueError, match="two cards"):
        SR.resemblance_summary(r.drop(columns=[H200]))


def lookup_rows(paged_us, contiguous_us, spread):
    rows = []
    for backend, t in (("own-v1-paged", paged_us), ("own-v1-contiguous", contiguous_us)):
        rows.append({"gpu_slug": "g", "backend": backend, "protocol": "rigorous", "tables": "distinct",
                     "memory_kind": "device", "seq_len": 1024, "batch_size": 1, "block_size": 16,
                     "median_us": t, "p10_us": t * (1 - spread), "p90_us": t * (1 + spread)})
    return pd.DataFrame(rows)


def test_lookup_slowdown_is_beyond_spread_only_when_the_bands_do_not_overlap():
    slower = SR.lookup_slowdown(lookup_rows(100.0, 105.0, 0.01)).iloc[0]
    assert slower["ratio"] == pytest.approx(1.05) and bool(slower["beyond_spread"])
    assert slower["band_lo"] == pytest.approx(105 * 0.99 / (100 * 1.01))
    within = SR.lookup_slowdown(lookup_rows(100.0, 105.0, 0.05)).iloc[0]
    assert not bool(within["beyond_spread"])
    faster = SR.lookup_slowdown(lookup_rows(100.0, 90.0, 0.01)).iloc[0]
    assert bool(faster["beyond_spread"]) and faster["band_hi"] < 1
    with pytest.raises(ValueError, match="no paged/contiguous pairs"):
        SR.lookup_slowdown(lookup_rows(100.0, 90.0, 0.01), protocol="seed")


def test_card_ratio_divides_the_second_card_by_the_first():
    rows = []
    for gpu, f in ((H100, 1.0), (H200, 0.8)):
        for b in (1, 16):
            rows.append({"gpu_slug": gpu, "backend": "sdpa_dense", "protocol": "rigorous",
                         "tables": "distinct", "memory_kind": "device", "seq_len": 1024,
                         "batch_size": 1, "block_size": b, "median_us": 10.0 * f,
                         "pct_of_read_ceiling": 50.0 / f})
    cr = SR.card_ratio(pd.DataFrame(rows))
    assert np.allclose(cr["ratio"], 0.8)
    s = SR.card_ratio_summary(cr).iloc[0]
    assert s["geomean"] == pytest.approx(0.8) and s["max_pct"] == pytest.approx(62.5)
    with pytest.raises(ValueError, match="two cards"):
        SR.card_ratio(pd.DataFrame(rows[:2]))


# ----------------------------------------------------------------------------- committed data

@pytest.fixture(scope="module")
def arms():
    return SR.load_arms(None)


def test_committed_h200_has_all_four_arms_and_the_h100_two(arms):
    have = {c: set(zip(g["protocol"], g["tables"])) for c, g in arms.groupby("gpu_slug")}
    assert have[H100] == set(SR.DIAGONAL)
    assert have[H200] == {(p, t) for p, t in SR.ARMS} if hasattr(SR, "ARMS") else len(have[H200]) == 4
    f = SR.factorial(arms)
    h = f[f.gpu_slug == H200]
    assert h[list(SR.FACTORIAL_EFFECTS)].notna().all(axis=None)
    assert np.allclose(h["diagonal"], h["timing_at_seed_tables"] * h["tables_at_rigorous"])
    assert np.allclose(h["diagonal"], h["tables_at_seed_timing"] * h["timing_at_distinct"])


def test_committed_rows_stay_below_the_read_ceiling(arms):
    """A bandwidth above the ceiling measured in the same run would be a bug, not a result."""
    pct = arms["pct_of_read_ceiling"].dropna()
    assert len(pct) and (pct < 100).all()


def test_committed_lookup_and_card_ratio(arms):
    slow = SR.lookup_slowdown(arms)
    assert set(slow.gpu_slug) == {H100, H200} and (slow["band_lo"] <= slow["band_hi"]).all()
    cr = SR.card_ratio(arms)
    assert len(cr) == len(arms[(arms.gpu_slug == H200) & (arms.protocol == "rigorous")
                                & (arms.tables == "distinct")])


def test_card_keys_are_the_glue_suffixes():
    assert SR.card_keys([H100, H200]) == {H100: "h100", H200: "h200"}


# ----------------------------------------------------------------------------- figures and tables

def test_two_card_figures_label_each_card(seed, arms):
    ours = SR.load_ours(None)
    t = SR.times_long(seed, ours)
    fig = F.penalty_figure(SR.block_penalty(t), [(1, "device", 4096, 1), (5, "device", 1024, 16)])
    assert len(fig.axes) == 4
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert sum(x.startswith("H100") for x in titles) == 2 and sum(x.startswith("H200") for x in titles) == 2
    fig = F.protocol_figure(SR.protocol_effect(ours))
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert len(titles) == 8 and sum(x.startswith("H200") for x in titles) == 4
    f = SR.factorial(arms)
    fig = F.factorial_figure(f, gpu=H200)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    with pytest.raises(ValueError, match="no rows for card"):
        F.factorial_figure(f, gpu="nope")
    html = F.style_factorial_summary(SR.factorial_summary(f[f.gpu_slug == H200])).to_html()
    assert "timing alone" in html and "interaction" in html
    html = F.style_resemblance(SR.block_resemblance(t)).to_html()
    assert "H100 vs seed" in html and "H200 vs seed" in html
    html = F.style_card_ratio(SR.card_ratio_summary(SR.card_ratio(arms))).to_html()
    assert "H200 / H100" in html


def test_card_facts_say_which_clock():
    assert frame.card_facts(H100)["sm_clock_label"] == "idle, before the run"
    assert frame.card_facts(H200)["sm_clock_label"] == "under load"
