"""The page-table chapter's comparisons between cards and runs, and its FlashInfer sub-grid, on
small frames whose answers are known."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lib.chapters.page_table import analysis as P
from lib.chapters.page_table import figures as F

SEED = P.shape_of("seed")


def _ratios(slug, run, card_id, values, name="paged / contiguous"):
    return pd.DataFrame([{"gpu_slug": slug, "shape": SEED, "seq_len": 512, "batch_size": b, "ratio_name": name,
                          "ratio": v, "run_id": run, "card_id": card_id} for b, v in enumerate(values)])


def test_card_key_is_an_identifier():
    assert P.card_key("h100-80gb-hbm3") == "h100" and P.card_key("h200") == "h200"
    assert P.card_key("a100-sxm4-40gb") == "a100_sxm4_40gb"


def test_between_runs_measures_the_gap_and_counts_agreement():
    rr = pd.concat([_ratios("h200", "r1", "A", [1.00, 1.10, 0.98]), _ratios("h200", "r2", "B", [1.02, 1.10, 0.99]),
                    _ratios("h100", "r0", "C", [0.9, 0.9, 0.9])])
    b = P.between_runs(rr)
    assert list(b["gpu_slug"]) == ["h200"], "a card with one run has no between-run spread"
    row = b.iloc[0]
    assert row["runs"] == 2 and row["cards"] == 2 and row["points"] == 3
    assert row["gap_max"] == pytest.approx(0.02) and row["gap_median"] == pytest.approx(0.99 / 0.98 - 1)
    assert row["below1_each"] == "1/1" and row["below1_all"] == 1


def test_count_below_with_a_margin():
    r = _ratios("h100", "r0", "C", [0.97, 0.99, 1.01])
    assert P.count_below(r, "paged / contiguous")[("h100", SEED)] == 2
    assert P.count_below(r, "paged / contiguous", margin=0.02)[("h100", SEED)] == 1


def _fi_rows():
    rows = []
    for place in ("identity", "shuffled"):
        for bs in (1, 16):
            for backend, us in (("flashinfer", 110.0 if place == "identity" else 121.0 + bs),
                                (P.PAGED, 300.0 / bs), ("sdpa_dense", 100.0 if place == "identity" else 101.0)):
                rows.append({"gpu_slug": "h200", "shape": SEED, "seq_len": 4096, "batch_size": 8, "block_size": bs,
                             "placement": place, "backend": backend, "median_us": us, "subgrid": "flashinfer"})
    return pd.DataFrame(rows)


def test_flashinfer_ratios_against_sdpa_and_the_noise():
    fr = P.flashinfer_ratios(_fi_rows())
    get = lambda name, bs: float(fr[(fr["ratio_name"] == name) & (fr["block_size"] == bs)]["ratio"].iloc[0])  # noqa: E731
    assert get("FlashInfer / SDPA", 1) == pytest.approx(1.1)
    assert get("FlashInfer shuffled / identity", 16) == pytest.approx(137 / 110)
    assert get("SDPA repeat / SDPA", 1) == pytest.approx(1.01)
    assert get("ours / SDPA", 16) == pytest.approx(300 / 16 / 100)
    assert P.flashinfer_ratios(_fi_rows().assign(subgrid="grid")).empty  # a card without the sub-grid
    flat = P.block_flatness(_fi_rows()).set_index(["placement", "backend"])["spread"]
    assert flat[("shuffled", "flashinfer")] == pytest.approx(137 / 122 - 1) and flat[("identity", "sdpa_dense")] == 0


def test_ceiling_check_refuses_more_than_the_datasheet():
    rows = pd.DataFrame({"backend": [P.PAGED, P.NO_OFFSET], "bandwidth_gbps": [3100.0, 9000.0],
                         "pct_of_read_ceiling": [100.5, 290.0]})
    c = P.ceiling_check(rows, 3350.0)
    assert c["max_pct"] == pytest.approx(100.5), "no_offset reads L2, not DRAM: left out"
    assert c["max_of_datasheet"] == pytest.approx(3100 / 3350)
    with pytest.raises(ValueError, match="above the datasheet"):
        P.ceiling_check(rows, 3000.0)


def test_value_or_nan_and_card_time_ratio():
    df = pd.DataFrame({"a": [1, 2], "v": [10.0, 20.0]})
    assert P.value_or_nan(df, "v", a=2) == 20.0 and math.isnan(P.value_or_nan(df, "v", a=3))
    with pytest.raises(ValueError):
        P.value_or_nan(pd.concat([df, df]), "v", a=1)
    g = pd.DataFrame([{"gpu_slug": s, "subgrid": "grid", "placement": "identity", "bytes_moved": 2**31,
                       "shape": SEED, "seq_len": 1, "batch_size": 1, "backend": "x", "median_us": us}
                      for s, us in (("old", 100.0), ("new", 70.0))])
    r = P.card_time_ratio(g, "new", "old")
    assert float(r["ratio"].iloc[0]) == pytest.approx(0.7)
    assert P.card_time_ratio(g, "new", "absent").empty


def test_auto_kernels_read_the_launch_plans_of_the_committed_rows():
    k = P.auto_kernels(P.load()).set_index(["gpu_slug", "shape"])["kernel"]
    seed = P.SHAPE_PARAM["seed"]
    assert k[("h200", seed)] == "v3" and "v3" not in k[("h100-80gb-hbm3", seed)]
    assert "v3" not in k[("h200", P.SHAPE_PARAM["llama"])]

def test_heatmaps_draw_one_column_per_card_labelled():
    from tests.chapters.page_table.test_figures import SHAPE, fake_ratios

    two = pd.concat([fake_ratios(), fake_ratios().assign(gpu_slug="h200", ratio=lambda d: d["ratio"] * 1.1)])
    two.loc[two["gpu_slug"] == "h100", "gpu_slug"] = "h100-80gb-hbm3"
    fig = F.ratio_heatmaps(two, SHAPE)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 8 and titles[0] == "H100: paged / contiguous" and titles[1] == "H200: paged / contiguous"


def test_flashinfer_figure_says_when_a_card_has_none():
    fig = F.flashinfer_figure(_fi_rows().assign(subgrid="grid"), gpu="h100-80gb-hbm3")
    assert "no FlashInfer" in fig.axes[0].texts[0].get_text()
    fig = F.flashinfer_figure(_fi_rows())
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert {"FlashInfer, identity", "FlashInfer, shuffled", "SDPA measured again (the noise)"} <= labels
