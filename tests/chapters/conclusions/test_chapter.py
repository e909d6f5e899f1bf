"""The conclusions page on the committed data (CPU): every glued name exists, the ladder covers the
committed experiments, and what its prose says about the data holds."""

import math

import pytest

from lib import DATA
from lib.chapters.conclusions import ladder as L
from lib.chapters.conclusions import summary as S

CHAPTER = "chapters/conclusions.md"


def test_conclusions_run_on_committed_data(run_chapter_cells):
    glued = run_chapter_cells(CHAPTER, DATA / "results")
    refs = run_chapter_cells.refs(CHAPTER)
    assert refs and refs <= set(glued), sorted(refs - set(glued))
    assert "cc_fig_ladder" in glued and glued["cc_n_cards"] >= 1


def test_without_data_the_page_says_what_it_needs(tmp_path, run_chapter_cells):
    with pytest.raises(FileNotFoundError, match="conclusions draw on"):
        run_chapter_cells(CHAPTER, tmp_path)


@pytest.fixture(scope="module")
def c():
    return S.conclusions_numbers()


def test_every_rung_has_committed_data():
    t = L.ladder()
    card = sorted(t["gpu_slug"].unique())[0]
    assert set(t[t["gpu_slug"] == card]["rung"]) == set(L.RUNGS)


def test_the_three_floors_hold(c):
    """conclusions.md: on the GPU within a few per cent; part on the host bounded by the bus, with
    in-place reads, zero-copy and copies close together; faults far above every bulk mechanism."""
    assert c["gpu_worst_pct"] < 5
    part = [c[f"r_{v}_part"] for v in ("remote", "zero_copy", "explicit_copy")]
    assert max(part) / min(part) < 1.05
    assert c["r_migrate_first_part"] > 2 * c["part_worst"]
    assert c["r_migrate_first_all"] > 2 * c["all_worst"] and c["r_managed_cold"] > c["all_worst"]
    # "about what the link's rate predicts": all-on-host bulk steps near the host-byte cost
    assert 0.7 * c["host_byte_cost"] < c["all_best"] <= c["all_worst"] < 1.3 * c["host_byte_cost"]


def test_rules_quote_finite_numbers(c):
    for key in ("host_byte_cost", "first_over_serial", "u_read_fault_touched", "u_prefetch_h2d",
                "pt_pc_llama", "pt_pc_seed", "pt_pen_hi", "pt_vllm_pen_hi", "k_gqa_over_sdpa", "r_vmm"):
        assert math.isfinite(c[key]), key
    assert c["first_over_serial"] > 1  # "never let a decode step fault its cache in"
    assert c["pt_pen_hi"] > 1.2 and c["pt_vllm_pen_hi"] < 1.2  # small blocks cost in one design only
    assert str(c["double_at"]).startswith("1/")
