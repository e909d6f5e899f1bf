"""The uvm_decode chapter's two-card analysis on the committed rows and on small frames: Table 1
by card, the per-card summary the prose quotes, and whether the H200's faster memory shows."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lib.chapters.seed import tables as S
from lib.chapters.uvm_decode import analysis as U

H100, H200 = "h100-80gb-hbm3", "h200"


@pytest.fixture(scope="module")
def w():
    return U.wide(U.load(None))


def _wide(device, cold, slug):
    return pd.DataFrame({"gpu_slug": slug, "backend": "b", "shape": "s", "seq_len": 1, "batch_size": 1,
                         "block_size": range(len(device)), "device": device, "managed_cold": cold,
                         "bytes_moved": 1e6, "managed": device, "managed_prefetched": device})


def test_table1_cards_has_both_cards_and_seed_columns(w):
    t = U.table1_cards(w, S.load_seed(), "own-v2-paged", [H100, H200])
    assert list(t.index.get_level_values("card").unique()) == ["H100", "H200"]
    # the seed measured one GPU: its column is the same in each card's rows
    assert (t.loc["H100", "seed: device"].dropna() == t.loc["H200", "seed: device"].dropna()).all()
    assert (t.loc["H100", "ours: device"] != t.loc["H200", "ours: device"]).any()
    with pytest.raises(ValueError, match="no rows"):
        U.table1_cards(w, S.load_seed(), "own-v2-paged", ["no-such-card"])


def test_resident_managed_is_free_on_both_cards_and_cold_is_not(w):
    for card in (H100, H200):
        s = U.card_summary(w, card)
        assert s["res_points"] == 108
        assert s["res_worst"] < 5 and s["pre_worst"] < 5  # percent
        assert s["cold_med"] > 50
        # a cold step reads over PCIe: its rate must stay below the link (Gen5 x16: 64 GB/s)
        assert 0 < s["cold_gbps_hi"] < 64
    assert math.isnan(U.card_summary(w, "no-such-card")["cold_med"])


def test_device_ratio_is_second_over_first():
    w = pd.concat([_wide([10.0, 20.0], [400.0, 800.0], H100), _wide([8.0, 30.0], [400.0, 800.0], H200)])
    r = U.device_ratio(w, [H100, H200])
    assert sorted(r.round(3)) == [0.8, 1.5]
    assert U.device_ratio(w, [H100]).empty


def test_the_faster_hbm_does_not_speed_up_these_steps(w):
    """The chapter's note: no step runs near the HBM ceiling, so the H200 is not 1.43x faster."""
    r = U.device_ratio(w, [H100, H200])
    assert len(r) == 108 and 0.9 < r.median() < 1.1
    assert U.step_read_gbps(w, H100) < 3350 and U.step_read_gbps(w, H200) < 4800  # below datasheet


def test_relative_spread_and_cold_noise():
    rows = pd.DataFrame({"gpu_slug": ["a", "a", "b"], "condition": ["managed_cold", "device", "managed_cold"],
                         "median_us": [100.0, 10.0, 50.0], "p10_us": [90.0, 9.9, 40.0],
                         "p90_us": [130.0, 10.1, 60.0]})
    assert U.cold_noise(rows, "a") == pytest.approx(0.4)
    assert U.relative_spread(rows, "a", "device") == pytest.approx(0.02)
    assert math.isnan(U.cold_noise(rows, "c"))


def _run_rows(run, device_us, cold_us, slug="h200"):
    base = dict(gpu_slug=slug, shape="MHA", seq_len=4096, batch_size=1, block_size=16,
                backend="vllm", bytes_moved=1 << 20, run_id=run)
    return [dict(base, condition="device", median_us=device_us),
            dict(base, condition="managed", median_us=device_us * 1.01),
            dict(base, condition="managed_cold", median_us=cold_us)]


def test_run_spread_is_largest_minus_smallest_ratio_over_runs():
    rows = pd.DataFrame(_run_rows("a", 100.0, 1000.0) + _run_rows("b", 100.0, 1200.0)
                        + _run_rows("c", 100.0, 1100.0) + _run_rows("z", 50.0, 5000.0, slug="h100"))
    sp = U.run_spread(rows, "h200").set_index("condition")
    assert sp.loc["managed_cold", "runs"] == 3 and sp.loc["managed_cold", "points"] == 1
    assert sp.loc["managed_cold", "spread_max"] == pytest.approx(2.0)
    assert sp.loc["managed_cold", "rel_max"] == pytest.approx(2.0 / 11.0)
    assert sp.loc["managed", "spread_max"] == pytest.approx(0.0)
    assert U.run_spread(rows, "h100").empty  # one run: no spread to tell
