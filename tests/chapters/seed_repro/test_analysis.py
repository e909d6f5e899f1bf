"""The seed-versus-ours joins and ratios: on the committed H100 data and on small synthetic frames
whose every number is known, so each ratio can be checked by hand."""

from __future__ import annotations

import math
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lib.book import frame
from lib import ROOT
from lib.chapters.seed import tables as S
from lib.chapters.seed_repro import analysis as SR
from lib.chapters.seed_repro import figures as F

H100 = "h100-80gb-hbm3"


@pytest.fixture(scope="module")
def seed():
    return S.load_seed()


@pytest.fixture(scope="module")
def ours():
    return SR.load_ours(H100)


@pytest.fixture(scope="module")
def joined(seed, ours):
    return SR.join(seed, ours)


# ----------------------------------------------------------------------------- synthetic data

def synth_ours(seed: pd.DataFrame, *, gpu="gpu-a", factor=None, drop=()) -> pd.DataFrame:
    """Rows of ours for every point of `seed`: every backend, both protocols, both memories.

    time = seed-cell-independent formula so each ratio is known: base(backend) * proto * block.
    `drop`: (backend, protocol, memory, block) keys to leave out.
    """
    base = {"own-v1-paged": 100.0, "own-v1-contiguous": 90.0, "own-v1-no_offset": 50.0,
            "own-v2-paged": 40.0, "own-v2-contiguous": 38.0, "own-v2-no_offset": 30.0,
            "vllm": 20.0, "sdpa_dense": 10.0}
    proto = {"seed": 0.5, "rigorous": 1.0}
    mem = {"device": 1.0, "managed": 1.1}
    points = seed[["seq_len", "batch_size"]].drop_duplicates().itertuples(index=False)
    rows = []
    for seq, batch in points:
        for b in S.BLOCK_SIZES:
            for backend, t in base.items():
                for p, pf in proto.items():
                    for m, mf in mem.items():
                        if (backend, p, m, b) in drop:
                            continue
                        rows.append({"gpu_slug": gpu, "backend": backend, "protocol": p,
                                     "memory_kind": m, "seq_len": seq, "batch_size": batch,
                                     "block_size": b, "median_us": t * pf * mf * (64 / b),
                                     "check_passed": True, "rel_error": 1e-4})
    return pd.DataFrame(rows)


def synth_time(backend, protocol, memory, block):
    base = {"own-v1-paged": 100.0, "own-v1-contiguous": 90.0, "own-v1-no_offset": 50.0,
            "own-v2-paged": 40.0, "own-v2-contiguous": 38.0, "own-v2-no_offset": 30.0}[backend]
    return base * {"seed": 0.5, "rigorous": 1.0}[protocol] * {"device": 1.0, "managed": 1.1}[memory] * 64 / block


# ----------------------------------------------------------------------------- small helpers

def test_backend_for_and_versions():
    assert SR.backend_for("original", "v1") == "own-v1-paged"
    assert SR.backend_for("no_lookup", "v2") == "own-v2-contiguous"
    assert SR.backend_for("no_offset", "v1") == "own-v1-no_offset"
    with pytest.raises(ValueError, match="variant"):
        SR.backend_for("paged", "v1")
    with pytest.raises(ValueError, match="version"):
        SR.backend_for("original", "v3")
    assert SR.parse_versions("both") == ("v1", "v2")
    assert SR.parse_versions("V2") == ("v2",)
    assert SR.parse_versions("v2,v1") == ("v1", "v2")
    for bad in ("", "v3", "all", "v1,v4"):
        with pytest.raises(ValueError, match="variant_version"):
            SR.parse_versions(bad)


def test_one_and_value_range():
    df = pd.DataFrame({"a": [1, 1, 2], "b": ["x", "y", "x"], "v": [10.0, 20.0, 30.0]})
    assert frame.one(df, "v", a=1, b="y") == 20.0
    with pytest.raises(ValueError, match="2 rows"):
        frame.one(df, "v", a=1)
    with pytest.raises(ValueError, match="0 rows"):
        frame.one(df, "v", a=3)
    with pytest.raises(ValueError, match="no column"):
        frame.one(df, "v", c=1)
    assert frame.value_range(df, "v", b="x") == (10.0, 30.0)
    assert frame.value_range(df, "v", a=[1, 2]) == (10.0, 30.0)
    with pytest.raises(ValueError):
        frame.value_range(df, "v", a=5)
    assert repr(frame.Plain("NVIDIA H100")) == "NVIDIA H100"


def test_check_ours_refuses_ambiguous_or_foreign_rows(seed):
    o = synth_ours(seed)
    with pytest.raises(ValueError, match="duplicated"):
        SR.check_ours(pd.concat([o, o.iloc[:1]]))
    with pytest.raises(ValueError, match="protocols"):
        SR.check_ours(o.assign(protocol="hot"))
    with pytest.raises(ValueError, match="lack columns"):
        SR.check_ours(o.drop(columns="median_us"))
    with pytest.raises(ValueError, match="no rows"):
        SR.check_ours(o.iloc[:0])


# ----------------------------------------------------------------------------- join

def test_join_synthetic_arithmetic(seed):
    o = synth_ours(seed)
    j = SR.join(seed, o)
    assert len(j) == len(seed) * 2
    r = j[(j.table == 1) & (j.memory == "managed") & (j.block_size == 4) & (j.version == "v2")]
    assert len(r) == 1
    r = r.iloc[0]
    assert r.backend == "own-v2-paged"
    assert r.seed_us == pytest.approx(1464.686)
    assert r.seed_protocol_us == pytest.approx(synth_time("own-v2-paged", "seed", "managed", 4))
    assert r.rigorous_us == pytest.approx(synth_time("own-v2-paged", "rigorous", "managed", 4))
    assert r.seed_protocol_over_seed == pytest.approx(r.seed_protocol_us / 1464.686)
    assert r.rigorous_over_seed == pytest.approx(r.rigorous_us / 1464.686)
    assert r.rigorous_over_seed_protocol == pytest.approx(2.0)  # proto factor 1.0 / 0.5
    # no_offset cells join the no_offset backend, in device memory
    r6 = j[(j.table == 6) & (j.block_size == 16) & (j.version == "v1")].iloc[0]
    assert r6.backend == "own-v1-no_offset"
    assert r6.rigorous_us == pytest.approx(synth_time("own-v1-no_offset", "rigorous", "device", 16))


def test_join_keeps_cells_we_did_not_measure(seed):
    o = synth_ours(seed, drop={("own-v1-contiguous", "rigorous", "device", 8)})
    j = SR.join(seed, o)
    assert len(j) == len(seed) * 2  # the cell stays, with a gap
    gap = j[(j.backend == "own-v1-contiguous") & (j.block_size == 8)]
    assert len(gap) == 4  # table 2 (two series) and table 4 (two series) at block 8
    assert gap["rigorous_us"].isna().all() and gap["rigorous_over_seed"].isna().all()
    assert gap["seed_protocol_us"].notna().all()


def test_join_one_row_per_card(seed):
    o = pd.concat([synth_ours(seed, gpu="gpu-a"), synth_ours(seed, gpu="gpu-b")])
    j = SR.join(seed, o, versions="v1")
    assert len(j) == 2 * len(seed)
    assert set(j.gpu_slug) == {"gpu-a", "gpu-b"} and set(j.version) == {"v1"}


def test_join_subset_of_seed(seed):
    sub = S.select_tables(seed, "6")
    j = SR.join(sub, synth_ours(seed))
    assert set(j.table) == {6} and len(j) == 12


def test_join_committed_every_cell(seed, ours, joined):
    assert len(joined) == len(seed) * len(SR.VERSIONS) * len(SR.cards(ours))
    cell = ["table", "memory", "block_size", "seq_len", "batch_size"]
    for v in SR.VERSIONS:
        mine = joined[(joined.version == v) & (joined.gpu_slug == H100)]
        assert set(map(tuple, mine[cell].to_numpy())) == set(map(tuple, seed[cell].to_numpy()))
        merged = mine.merge(seed, on=cell)
        assert np.allclose(merged["seed_us"], merged["time_us"])
    # every cell has both of our times, and both passed their correctness check
    assert joined[["seed_protocol_us", "rigorous_us"]].notna().all().all()
    assert joined["check_passed"].all()


def test_join_committed_matches_raw_rows(joined, ours):
    r = joined[(joined.table == 5) & (joined.block_size == 4) & (joined.version == "v1")].iloc[0]
    raw = ours[(ours.backend == "own-v1-paged") & (ours.memory_kind == "device")
               & (ours.seq_len == 1024) & (ours.batch_size == 16) & (ours.block_size == 4)]
    assert r.seed_protocol_us == raw[raw.protocol == "seed"]["median_us"].item()
    assert r.rigorous_us == raw[raw.protocol == "rigorous"]["median_us"].item()


# ----------------------------------------------------------------------------- tables

def test_reproduction_table_layout(joined):
    t = SR.reproduction_table(joined, 2, H100)
    assert len(t) == 8  # 6 block sizes at 4096 x 1, 2 at 1024 x 1
    assert t.index.names == ["series", "block size"]
    assert list(t.index.get_level_values(0).unique()) == ["device 4096×1", "device 1024×1"]
    assert t[("seed (2024)", "time (µs)")].tolist()[:2] == [816.158, 1297.227]
    assert ("ours v1", "rigorous / seed protocol") in t.columns
    assert ("ours v2", "seed protocol / seed") in t.columns
    t1 = SR.reproduction_table(joined, 1, H100, versions="v1")
    assert {c[0] for c in t1.columns} == {"seed (2024)", "ours v1"}
    assert list(t1.index.get_level_values(0).unique()) == ["device 4096×1", "managed 4096×1"]
    with pytest.raises(ValueError, match="no joined rows"):
        SR.reproduction_table(joined, 1, "no-such-card")


def test_every_seed_table_has_a_reproduction_table(seed, joined):
    for table in S.TABLE_IDS:
        t = SR.reproduction_table(joined, table, H100)
        assert len(t) == (seed["table"] == table).sum()
        assert t.notna().all().all()


def test_styled_tables_render(joined):
    html = F.style_reproduction_table(SR.reproduction_table(joined, 5, H100), caption="c").to_html()
    assert "461.0" in html and "rigorous / seed protocol" in html and "background-color" in html
    fit = SR.shape_mismatch(joined)
    assert "shape spread" in F.style_fit_table(fit).to_html()
    with pytest.raises(ValueError):
        F.style_reproduction_table(pd.DataFrame())


# ----------------------------------------------------------------------------- derived ratios

def test_derived_ratios_synthetic(seed):
    d = SR.derived_ratios(seed, synth_ours(seed))
    # the seed's own rows are lib.chapters.seed.tables's ratios, unchanged
    theirs = d[(d.source == SR.SEED_SOURCE) & (d.comparison == "no lookup / original")]
    want = S.no_lookup_over_original(seed)
    assert np.allclose(np.sort(theirs["ratio"]), np.sort(want["ratio"]))
    # ours: managed / device = 1.1 at every point, both versions, both protocols
    md = d[(d.comparison == "managed / device") & (d.source != SR.SEED_SOURCE)]
    assert len(md) == 6 * 4 and np.allclose(md["ratio"], 1.1)
    nl = d[(d.comparison == "no lookup / original") & (d.source == "v2, rigorous")]
    assert np.allclose(nl["ratio"], 38.0 / 40.0)
    assert set(nl["series"]) == {"seq 4096 × batch 1", "seq 1024 × batch 1", "seq 1024 × batch 16"}
    no = d[(d.comparison == "no offset / original") & (d.source == "v1, seed protocol")]
    assert np.allclose(no["ratio"], 0.5) and len(no) == 6
    assert np.allclose(d["ratio"], d["num_us"] / d["den_us"])


def test_ratio_summary(seed):
    d = SR.derived_ratios(seed, synth_ours(seed))
    s = SR.ratio_summary(d)
    r = s[(s.comparison == "managed / device") & (s.source == "v1, rigorous")].iloc[0]
    assert r["min"] == pytest.approx(1.1) and r["max_dev"] == pytest.approx(0.1) and r["n"] == 6
    seed_md = s[(s.comparison == "managed / device") & (s.source == SR.SEED_SOURCE)].iloc[0]
    assert seed_md["max_dev"] == pytest.approx(float((S.managed_over_device(seed)["ratio"] - 1).abs().max()))


def test_derived_ratios_committed_managed_equals_device(seed, ours):
    d = SR.derived_ratios(seed, ours)
    md = d[(d.comparison == "managed / device") & (d.source.str.endswith("rigorous"))]
    assert len(md) == 12
    assert ((md["ratio"] - 1).abs() < 0.05).all()  # resident managed memory: no cost


# ----------------------------------------------------------------------------- patterns

def test_block_penalty_and_shape_synthetic(seed):
    o = synth_ours(seed)
    t = SR.times_long(seed, o)
    p = SR.block_penalty(t)
    r = p[(p.table == 5) & (p.source == "v1, rigorous")].iloc[0]
    assert r.small_over_ref == pytest.approx(16.0)  # time ~ 1 / block
    assert r.slowest_block == 1 and r.fastest_block == 32 and r.slowest_over_fastest == pytest.approx(32)
    s5 = p[(p.table == 5) & (p.source == SR.SEED_SOURCE)].iloc[0]
    assert s5.small_over_ref == pytest.approx(461.034 / 321.019) and s5.slowest_block == 4
    partial = p[(p.table == 3) & (p.seq_len == 1024) & (p.source == SR.SEED_SOURCE)].iloc[0]
    assert math.isnan(partial.small_over_ref) and partial.blocks == 1

    # ours = 2 x the seed at every cell: scale 2, no shape mismatch
    j = SR.join(seed, o)
    j["seed_protocol_over_seed"] = 2.0
    j["rigorous_over_seed"] = 0.5
    f = SR.shape_mismatch(j)
    assert np.allclose(f.loc[f.protocol == "seed", "scale"], 2.0)
    assert np.allclose(f.loc[f.protocol == "rigorous", "scale"], 0.5)
    assert np.allclose(f["spread"], 1.0)
    # series with fewer than 3 seed cells (1024 x 1 of tables 2 and 3) are left out
    assert not ((f.seq_len == 1024) & (f.batch_size == 1)).any()


def test_shape_spread_is_geometric_sd():
    j = pd.DataFrame({"gpu_slug": "g", "table": 1, "memory": "device", "seq_len": 4096,
                      "batch_size": 1, "version": "v1", "seed_protocol_over_seed": [1.0, 4.0],
                      "rigorous_over_seed": [2.0, 2.0]})
    f = SR.shape_mismatch(j, min_points=2)
    seedp = f[f.protocol == "seed"].iloc[0]
    assert seedp.scale == pytest.approx(2.0) and seedp.spread == pytest.approx(2.0)
    assert f[f.protocol == "rigorous"].iloc[0].spread == pytest.approx(1.0)


def test_times_long_covers_every_block_and_references(seed, ours):
    t = SR.times_long(seed, ours)
    v1 = t[(t.source == "v1, rigorous") & (t.table == 2) & (t.seq_len == 1024)]
    assert sorted(v1.block_size) == list(S.BLOCK_SIZES)  # the seed has only blocks 1 and 8 here
    refs = t[t.source.isin(SR.REFERENCE_LABELS.values())]
    assert set(refs.table) == {1, 3, 5}  # the "original" tables only
    assert len(t[t.source == SR.SEED_SOURCE]) == len(seed)


def test_protocol_effect_and_repeat_spread(seed):
    o = synth_ours(seed)
    e = SR.protocol_effect(o)
    assert np.allclose(e["rigorous_over_seed_protocol"], 2.0)
    assert set(e.backend) == {"own-v1-paged", "own-v2-paged", "vllm", "sdpa_dense"}
    s = SR.repeat_spread(o, "rigorous")
    assert np.allclose(s["max_dev"], 0.1)
    with pytest.raises(ValueError):
        SR.protocol_effect(o, backends=["nope"])


def test_card_facts():
    f = frame.card_facts(H100)
    assert f["name"].startswith("NVIDIA H100") and f["sm_count"] == 132 and f["l2_mib"] > 0
    with pytest.raises(ValueError, match="no provenance"):
        frame.card_facts("no-such-card")


# ----------------------------------------------------------------------------- figures

def test_figures(seed, ours):
    t = SR.times_long(seed, ours)
    fig = F.times_figure(t, [1, 3, 5])
    assert isinstance(fig, Figure) and fig.number not in plt.get_fignums()
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 5
    fig = F.times_figure(t, [2, 4, 6])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 5
    with pytest.raises(ValueError):
        F.times_figure(t, [7])
    d = SR.derived_ratios(seed, ours)
    assert len([ax for ax in F.ratios_figure(d, versions="v1").axes if ax.get_visible()]) == 5
    assert len(F.protocol_figure(SR.protocol_effect(ours)).axes) == 4
    pen = SR.block_penalty(t)
    fig = F.penalty_figure(pen, [(1, "device", 4096, 1), (5, "device", 1024, 16)])
    assert len(fig.axes) == 2
    # a series where the seed lacks block 1 or 16 draws ours only
    fig = F.penalty_figure(pen, [(3, "device", 1024, 1)])
    assert SR.SEED_SOURCE not in [t.get_text() for t in fig.axes[0].get_yticklabels()]
    with pytest.raises(ValueError, match="no block 1"):
        F.penalty_figure(pen, [(3, "managed", 1024, 1)])


def test_figures_need_one_card(seed):
    o = pd.concat([synth_ours(seed, gpu="a"), synth_ours(seed, gpu="b")])
    t = SR.times_long(seed, o)
    with pytest.raises(ValueError, match="several cards"):
        F.times_figure(t, [1])
    assert isinstance(F.times_figure(t, [1], gpu="b"), Figure)


def test_outliers_are_the_few_points_that_would_set_the_scale_alone():
    assert list(F.outliers([1.0, 1.01, 0.99, 1.02, 5.0])) == [False, False, False, False, True]
    assert list(F.outliers([1.0, 1.01, 0.99, 5.0, 0.34])) == [False, False, False, True, True]
    # a wide but continuous spread (the seed's own no-lookup ratios) keeps every point
    assert not F.outliers([0.43, 0.61, 0.86, 1.84, 1.1, 1.06]).any()
    assert not F.outliers([1.0, 1.0, 1.0]).any() and not F.outliers([1.0]).any()


def test_ratios_figure_fits_the_bulk_and_marks_an_outlier(seed):
    d = SR.derived_ratios(seed, synth_ours(seed))
    panel = d[d["comparison"] == "managed / device"]
    assert len(panel) and panel["ratio"].between(0.5, 2.0).all()
    hit = panel.index[(panel["source"] == "v2, seed protocol")][0]
    d.loc[hit, "ratio"] = 5.0
    series = d.loc[hit, "series"]
    fig = F.ratios_figure(d)
    ax, = [a for a in fig.axes if a.get_visible() and a.get_title(loc="left").startswith("managed / device")
           and series in a.get_title(loc="left")]
    lo, hi = ax.get_ylim()
    bulk = d[(d["comparison"] == "managed / device") & (d["series"] == series)].drop(index=hit)["ratio"]
    assert hi < 5.0 and hi < max(bulk.max(), 1.0) + 0.6 * (max(bulk.max(), 1.0) - min(bulk.min(), 1.0)) + 0.1
    assert lo <= bulk.min() and hi >= bulk.max()  # the bulk stays in view
    labels = [t.get_text() for t in ax.texts]
    assert "5.00" in labels, labels  # the outlier is still shown: an arrow at the edge, with its value
    arrows = [t for t in ax.texts if getattr(t, "arrow_patch", None) is not None]
    assert arrows and all(t.xy[1] > 0.9 for t in arrows)  # at the top edge: it lies above


def test_source_styles():
    assert F.source_style(SR.SEED_SOURCE)["color"] == "black"
    assert F.source_style("v1, seed protocol")["linestyle"] == "--"
    assert F.source_style("v2, rigorous")["linestyle"] == "-"
    with pytest.raises(ValueError):
        F.source_style("v3, rigorous")


# ----------------------------------------------------------------------------- the chapter

def test_chapter_parameters_and_toc():
    text = (ROOT / "chapters" / "seed_repro.md").read_text()
    cell = re.search(r":tags: \[parameters\]\n\n(.*?)```", text, re.S).group(1)
    assert 'mode = "replay"' in cell and 'gpu = ""' in cell and 'variant_version = "both"' in cell
    assert "frame.measure_if_asked(EXPERIMENT, mode, root)" in text
    assert "What did not reproduce, and why" in text
    files = re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())
    assert "chapters/seed_repro" in files
    assert files.index("chapters/seed_repro") == files.index("chapters/uvm") + 1


# ----------------------------------------------------------------------------- the 2 x 2 factorial

def synth_arms(*, timing=(1.0, 2.0), tables=(1.0, 1.5), interaction=1.0) -> pd.DataFrame:
    """All four arms of two points: time = 10 x timing factor x tables factor (x interaction in
    the rigorous-on-distinct arm), so every effect is known."""
    rows = []
    for block in (1, 16):
        for (proto, ft), (tab, fd) in [((p, t), (d, u)) for p, t in zip(SR.PROTOCOLS, timing)
                                       for d, u in zip(SR.TABLES_LABELS, tables)]:
            extra = interaction if (proto, tab) == ("rigorous", "distinct") else 1.0
            rows.append({"gpu_slug": "g", "backend": "own-v2-paged", "protocol": proto, "tables": tab,
                         "memory_kind": "device", "seq_len": 1024, "batch_size": 1, "block_size": block,
                         "median_us": 10.0 * ft * fd * extra})
    return pd.DataFrame(rows)


def test_the_factorial_splits_the_diagonal_into_timing_and_tables():
    f = SR.factorial(synth_arms(timing=(1.0, 2.0), tables=(1.0, 1.5)))
    assert len(f) == 2
    assert f["timing_at_seed_tables"].tolist() == [2.0, 2.0] and f["timing_at_distinct"].tolist() == [2.0, 2.0]
    assert f["tables_at_seed_timing"].tolist() == [1.5, 1.5] and f["tables_at_rigorous"].tolist() == [1.5, 1.5]
    assert f["diagonal"].tolist() == [3.0, 3.0] and f["interaction"].tolist() == [1.0, 1.0]
    assert np.allclose(f["diagonal"], f["timing_at_seed_tables"] * f["tables_at_rigorous"])
    g = SR.factorial(synth_arms(interaction=1.2))
    assert g["interaction"].tolist() == pytest.approx([1.2, 1.2])
    s = SR.factorial_summary(f).set_index("effect")
    assert s.loc["diagonal", "geomean"] == pytest.approx(3.0) and s.loc["diagonal", "points"] == 2


def test_the_factorial_leaves_missing_arms_empty_and_refuses_repeats():
    two = synth_arms()
    diag = two[[(p, t) in SR.DIAGONAL for p, t in zip(two["protocol"], two["tables"])]]
    f = SR.factorial(diag)
    assert f["diagonal"].notna().all() and f["timing_at_seed_tables"].isna().all()
    with pytest.raises(ValueError, match="repeat one arm"):
        SR.factorial(pd.concat([two, two.iloc[:1]]))
    with pytest.raises(ValueError, match="needs columns"):
        SR.factorial(two.drop(columns="tables"))


def test_committed_rows_are_the_diagonal_arms_and_the_comparisons_keep_them(ours):
    arms = SR.load_arms(H100)
    assert set(zip(arms["protocol"], arms["tables"])) == set(SR.DIAGONAL)
    assert len(ours) == len(arms)  # load_ours keeps exactly the diagonal arms
    f = SR.factorial(arms)
    assert f["diagonal"].notna().all() and f["interaction"].isna().all()  # two arms still to measure


def test_load_ours_ignores_the_other_arms_once_they_exist(tmp_path):
    """Rows of the two new arms must not change what the seed comparisons read."""
    import shutil

    from lib.harness import results as R

    src = R.csv_path("seed_tables", H100)
    dst = R.csv_path("seed_tables", H100, root=tmp_path)
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    shutil.copy(R.provenance_path(src), R.provenance_path(dst))
    before = SR.load_ours(H100, root=tmp_path)
    rows = R.load("seed_tables", H100, root=tmp_path)
    new = rows[rows["protocol"] == "seed"].head(8).copy()  # the same points, seed timing, distinct blocks
    new["point_key"] = new["point_key"].str.replace("placement=random", "placement=identity") \
                                       .str.replace("physical_blocks=1024", "physical_blocks=0")
    new["placement"], new["run_id"] = "identity", "20991231T000000Z-ffffff"
    new["median_us"] = new["p10_us"] = new["p90_us"] = 1.0
    new = new.drop(columns=["memory_state", "provenance_issues", "bandwidth_gbps", "pct_of_read_ceiling"])
    R.append_rows(dst, [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                         for k, v in r.items()} for r in new.to_dict("records")])
    after = SR.load_ours(H100, root=tmp_path)
    pd.testing.assert_frame_equal(before, after)
    f = SR.factorial(SR.load_arms(H100, root=tmp_path))
    assert f["tables_at_seed_timing"].notna().sum() == 8
