"""The cards chapter on the committed data (CPU): every glued name its prose refers to exists, it
refuses to measure, and what its prose says about the data holds."""

import pytest

from lib import DATA
from lib.chapters.cards import analysis as A

CHAPTER = "chapters/cards.md"


@pytest.fixture(scope="module")
def parts():
    return A.build(DATA / "results")


@pytest.fixture(scope="module")
def h(parts):
    return A.headline(parts)


def test_the_chapter_runs_on_committed_data_and_glues_every_name_it_quotes(run_chapter_cells):
    glued = run_chapter_cells(CHAPTER, DATA / "results")
    refs = run_chapter_cells.refs(CHAPTER)
    assert refs and refs <= set(glued), sorted(refs - set(glued))


def test_the_chapter_refuses_to_measure(run_chapter_cells):
    with pytest.raises(ValueError, match="only replays"):
        run_chapter_cells(CHAPTER, DATA / "results", {"mode": "run"})


def test_what_the_prose_says_about_the_ceilings_holds(h):
    band = h["band_pct"] / 100
    assert h["read_pct_o"] > h["read_pct_b"]                      # "the H200 comes closer to its datasheet"
    assert h["within_b"] < h["between_b"] and h["within_o"] < h["between_o"]
    assert abs(h["copy_ratio"] / h["hbm_ratio"] - 1) <= band      # the comparable copy ratio: close to HBM
    assert h["copy_ratio_old"] > h["hbm_ratio"] * (1 + 4 * band)  # the naive one would be an artefact
    for key in ("u_pinned_h2d_r", "u_pinned_d2h_r", "u_read_mapped_r", "ko_t1_r"):
        assert abs(h[key] - 1) <= band, key                       # "the link moved nothing"


def test_what_the_prose_says_about_the_kernels_holds(h):
    band = h["band_pct"] / 100
    assert abs(h["k_big_auto_r"] / h["read_ratio"] - 1) <= band   # at the ceiling: the ceilings' ratio
    assert h["k_big_vllm_pct_o"] < h["k_big_vllm_pct_b"] - 5      # vLLM falls behind
    assert h["k_small_v1_r"] < 1 + band and h["k_gqa_v1_r"] < 1.1
    assert h["k_gqa_plan_b"].startswith("v2") and h["k_gqa_plan_o"].startswith("v3")
    assert h["sc_90"] > h["sc_50"] > h["sc_0"]                    # "one rule": closer to the ceiling, more speed-up
    assert abs(h["sc_floor"] - 1) <= band
    assert h["sc_slow_n"] > 0 and h["sc_slow_gqa"] + h["sc_slow_mha"] == h["sc_slow_n"]
    assert h["sc_slow_gqa"] >= 0.95 * h["sc_slow_n"]              # nearly every slower point is grouped-query
    assert h["sc_slow_backends"] == "own-v1-paged, own-v2-paged"  # "v1/v2 on the 64:8 shape"
    assert "GQA 64:8" in h["sc_slow_shapes"]


def test_only_own_auto_on_grouped_heads_changed_its_plan(parts):
    k = parts["kernel"]
    differs = k[~k["same_code"].astype(bool)]
    assert set(differs["backend"]) <= {"own-auto-paged", "own-auto-contiguous"}
    assert set(differs["num_kv_heads"]) == {8}


def test_the_uvm_runs_h100_is_the_slowest_h100(parts):
    """uvm.md's device reads scale a little above the ceilings' ratio: its H100 reads slowest."""
    cards = parts["cards"][parts["cards"]["gpu_slug"] == A.BASE].set_index("card_id")["read_gbps"]
    uvm_card = parts["uvm_rows"].query("gpu_slug == @A.BASE")["card_id"].iloc[0]
    assert cards.idxmin() == uvm_card
    u = parts["uvm"].set_index("key")
    assert u.loc["read_device", "ratio"] > parts["models"].set_index("gpu_slug")["read_gbps"].pipe(
        lambda r: r[A.OTHER] / r[A.BASE])


def test_what_the_prose_says_about_costs_and_offload_holds(h):
    band = h["band_pct"] / 100
    for key in ("pt_pc_r", "pt_sh_r", "ud_res_r", "ud_pre_r"):
        assert abs(h[key] - 1) <= band, key                       # costs within a card do not move
    assert abs(h["ko_s1_r"] / h["read_ratio"] - 1) <= band        # the slowdown grows by the ceilings' ratio
    assert abs(h["ko_f_r"] * h["hbm_ratio"] - 1) <= band          # the break-even shrinks by the HBM ratio
    for t in ("b", "o"):
        assert h[f"ko_err_{t}"] < 5                               # the line fits a copy then a kernel
        assert abs(h[f"ko_fmodel_{t}"] / h[f"ko_f_{t}"] - 1) < 0.05
    assert h["ko_remote_err"] > 10                                # and not the in-place reads


def test_what_the_prose_says_about_the_spread_holds(h):
    assert h["sp_proc_o"] < h["sp_cards_pt_o"] < h["band_pct"]
    n = h["sp_ks_n"]                                              # the two slow cards show through:
    top = {h[f"sp_ks_card{n - 1}"], h[f"sp_ks_card{n - 2}"]}      # the two largest differences are theirs
    assert top == {h["slow_pt_card"], h["slow2_pt_card"]}   # the slowest-reading page_table cards
    assert h[f"sp_ks_signed{n - 2}"] - max(h[f"sp_ks_signed{i}"] for i in range(n - 2)) > 0.5
    assert h["slow2_pct"] > 1
    assert h["sp_uvm_res_o"] < 1 < h["sp_uvm_link_o"]
    assert h["n_athbm"] + h["n_atinv"] + h["n_at1"] + h["n_between"] == h["n_quantities"]
