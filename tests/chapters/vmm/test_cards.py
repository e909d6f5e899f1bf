"""The VMM chapter's two-card comparison (issue 16): per-card numbers, spreads, speedups and the
figures that draw both cards, on synthetic rows of the two compared slugs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.chapters.vmm import analysis as A
from lib.chapters.vmm import figures as F
from tests.chapters.vmm.test_measure import write_fake

H100, H200 = A.CARD_TAGS["h100"], A.CARD_TAGS["h200"]


@pytest.fixture(scope="module")
def two_cards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vmm_two_cards")
    write_fake(root, slugs=(H100, H200))  # the second card's times are 1.5 x the first's
    rows = A.load(root=root)
    k, m = A.kernel_table(rows), A.map_table(rows)
    return k, m, A.growth_cost(k, m)


def test_card_tags_name_the_two_compared_cards():
    assert A.CARD_TAGS == {"h100": "h100-80gb-hbm3", "h200": "h200"}


def test_separated_needs_the_bands_apart():
    k = pd.DataFrame({"a_p10_us": [10.0, 10.0, 8.0], "a_p90_us": [11.0, 11.0, 9.0],
                      "b_p10_us": [10.5, 11.5, 9.5], "b_p90_us": [12.0, 12.0, 10.0]})
    assert list(A.separated(k, "a", "b")) == [False, True, True]  # overlap; a below; a below


def test_card_summary_and_numbers(two_cards):
    k, m, g = two_cards
    s = A.card_summary(k, m, g, {H100: 3000.0, H200: None})
    assert list(s["gpu_slug"]) == [H100, H200]
    one = s.set_index("gpu_slug")
    # fake rows: paged 1.08 x, VMM 1.003 x the pool, p10-p90 = 0.98-1.03 x the median: paged's band
    # (1.058-1.112) clears VMM's (0.983-1.033) at all 8 points; VMM's overlaps the pool's
    assert one.loc[H100, "paged_over_vmm_max"] == pytest.approx(1.08 / 1.003)
    assert one.loc[H100, "paged_vmm_apart"] == 8 and one.loc[H100, "vmm_device_apart"] == 0
    assert one.loc[H200, "grow_new_us"] == pytest.approx(1.5 * 48.0)
    # the ceiling: a share of it where known, NaN where the provenance has none
    mha = k[(k["gpu_slug"] == H100) & (k["shape"] == "MHA 32:32")]
    assert one.loc[H100, "mha_vmm_pct_ceiling"] == pytest.approx(100 * mha["vmm_gbps"].median() / 3000.0)
    assert math.isnan(one.loc[H200, "mha_vmm_pct_ceiling"])
    n = A.card_numbers(s, k)
    assert n["grow_new_us_h100"] == pytest.approx(48.0) and n["grow_new_us_h200"] == pytest.approx(72.0)
    assert n["speedup_mha_lo"] == pytest.approx(1 / 1.5) == n["speedup_gqa_hi"]  # the "H200" is slower here
    assert n["say_paged_vs_vmm_h100"].startswith("slower at every point")
    assert n["paged_over_vmm_gqa_short_lo_h200"] == pytest.approx(1.08 / 1.003)
    shown = A.card_display(s)
    assert list(shown.columns) == ["H100", "H200"] and shown.loc["kernel points", "H100"] == "8"
    assert shown.loc["GQA on VMM slots, % of the read ceiling", "H200"] == "–"


def test_card_numbers_with_one_card_give_dashes_not_missing_keys(two_cards):
    k, m, g = two_cards
    k1 = k[k["gpu_slug"] == H100]
    n = A.card_numbers(A.card_summary(k1, m, g, {}), k1)
    assert math.isnan(n["grow_new_us_h200"]) and n["say_paged_vs_vmm_h200"] == "—"
    assert math.isnan(n["speedup_mha_lo"]) and n["worst_paged_point_h200"] == "—"
    with pytest.raises(ValueError, match="no kernel point measured on both"):
        A.card_speedup(k1, H100, H200)


def test_kernel_figure_draws_one_row_per_card_labelled(two_cards):
    k, _, _ = two_cards
    fig = F.kernel_figure(k)
    assert len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split(":")[0] for t in titles] == ["H100", "H100", "H200", "H200"]
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert 0.9 < lo < 1.0 < hi < 1.2  # ratios, not microseconds
        assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], ax)


def test_map_figure_tells_the_cards_apart(two_cards):
    _, m, _ = two_cards
    fig = F.map_figure(m)
    left = fig.axes[0]
    labels = [ln.get_label() for ln in left.get_lines()]
    assert len(labels) == 8 and sum("(H100)" in x for x in labels) == 4 and sum("(H200)" in x for x in labels) == 4
    styles = {ln.get_label().rsplit("(", 1)[1]: ln.get_linestyle() for ln in left.get_lines()}
    assert styles["H100)"] != styles["H200)"]
    y200 = [ln for ln in left.get_lines() if ln.get_label().startswith("grow, new") and "H200" in ln.get_label()]
    assert np.allclose(y200[0].get_ydata(), m[(m["gpu_slug"] == H200) & (m["operation"] == "grow_new")]
                       .sort_values("chunk_mib")["median_us"])
