"""The cards chapter's analysis on small synthetic frames (CPU): each rule the chapter relies on
(same code only, rates from times, the primary run, the spread) can fail here."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from lib.chapters.cards import analysis as A

B, O = A.BASE, A.OTHER


def _times(slug, us, p10, p90, **cols):
    return {"gpu_slug": slug, "median_us": us, "p10_us": p10, "p90_us": p90, **cols}


def test_time_ratios_are_the_other_cards_speed_over_the_base_cards():
    base = pd.DataFrame([_times(B, 150.0, 140.0, 160.0, k=1)])
    other = pd.DataFrame([_times(O, 100.0, 95.0, 110.0, k=1)])
    r = A.time_ratios(base, other, ["k"]).iloc[0]
    assert r["ratio"] == pytest.approx(1.5)
    assert r["lo"] == pytest.approx(140 / 110) and r["hi"] == pytest.approx(160 / 95)
    assert r["lo"] < r["ratio"] < r["hi"]


def test_same_plan_tells_a_different_kernel_from_a_different_card():
    base = pd.DataFrame({"k": [1, 2, 3], "plan": ["v2 tile=4", "v1 tile=1", ""]})
    other = pd.DataFrame({"k": [1, 2, 3], "plan": ["v3 tile=8", "v1 tile=1", ""]})
    m = A.same_plan(base, other, ["k"]).set_index("k")["same_code"]
    assert list(m) == [False, True, True]


def test_primary_takes_the_fullest_run_and_the_newest_of_equals():
    rows = pd.DataFrame({"gpu_slug": [O] * 5 + [B] * 4,
                         "run_id": ["r1", "r1", "r1", "r2", "r2", "a", "a", "b", "b"]})
    p = A.primary(rows)
    assert set(p.loc[p["gpu_slug"] == O, "run_id"]) == {"r1"}
    assert set(p.loc[p["gpu_slug"] == B, "run_id"]) == {"b"}


def test_summarize_uses_the_points_own_interval_for_one_point_and_the_quartiles_for_many():
    one = A.summarize(pd.DataFrame({"ratio": [1.2], "lo": [1.1], "hi": [1.3]}))
    assert (one["n"], one["ratio"], one["lo"], one["hi"]) == (1, 1.2, 1.1, 1.3)
    many = A.summarize(pd.DataFrame({"ratio": [1.0, 2.0, 3.0, 4.0, 5.0], "lo": 0.0, "hi": 9.0}))
    assert (many["n"], many["ratio"], many["lo"], many["hi"]) == (5, 3.0, 2.0, 4.0)
    assert A.summarize(pd.DataFrame({"ratio": [np.nan], "lo": [1], "hi": [1]}))["n"] == 0


@pytest.mark.parametrize("ratio, lo, hi, want", [
    (1.43, 1.42, 1.44, "hbm"), (1.005, 1.0, 1.01, "1"), (0.70, 0.69, 0.71, "1/hbm"),
    (1.24, 0.96, 1.28, "1"),           # a bar that reaches 1 puts the quantity at 1
    (1.22, 1.20, 1.24, "between 1 and hbm"), (1.60, 1.58, 1.62, "above hbm"), (0.85, 0.84, 0.86, "below 1")])
def test_place_sorts_a_quantity_by_the_line_its_bar_reaches(ratio, lo, hi, want):
    assert A.place(pd.Series({"ratio": ratio, "lo": lo, "hi": hi}), 4.8 / 3.35, 0.01) == want


def _prov(name, card, read_us, copy_us, *, split):
    c = {"nbytes": 2 << 30, "read_gbps": (2 << 30) / read_us / 1e3,
         "read": {"median_us": read_us, "p10_us": read_us * 0.99, "p90_us": read_us * 1.01},
         "copy": {"bytes_copied": 1 << 30, "median_us": copy_us, "p10_us": copy_us, "p90_us": copy_us},
         "copy_gbps": 2 * (1 << 30) / copy_us / 1e3}
    if split:
        c["measure_s"] = 1.0
    return {"gpu": {"name": name, "uuid_sha16": card}, "ceilings": c}


def test_ceilings_per_card_keep_only_comparable_copies_and_leave_shared_runs_out(tmp_path):
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    for exp, runs in {"one": {"20261128T0000Z-a": _prov(h100, "c1", 700.0, 880.0, split=False),
                              "20261202T0000Z-b": _prov(h200, "c3", 460.0, 507.0, split=True)},
                      "two": {"20261128T0100Z-c": _prov(h100, "c2", 686.0, 710.0, split=True),
                              "20261128T0200Z-d-d0w1": _prov(h100, "c9", 1400.0, 710.0, split=True),
                              "20261202T0100Z-e": _prov(h200, "c4", 470.0, 507.0, split=True)}}.items():
        (tmp_path / exp).mkdir()
        (tmp_path / exp / "x.json").write_text(json.dumps(runs))
    ceil = A.run_ceilings(tmp_path)
    assert list(ceil["shared"]) == [False, False, True, False, False]
    cards = A.card_ceilings(ceil)
    assert set(cards["card_id"]) == {"c1", "c2", "c3", "c4"}          # the worker's card is left out
    assert math.isnan(cards.set_index("card_id").loc["c1", "copy_gbps"])  # one graph node: not comparable
    m = A.model_ceilings(cards).set_index("gpu_slug")
    assert m.loc[B, "between_cards"] == pytest.approx(700 / 686 - 1)
    assert A.datasheet_ratio(ceil) == pytest.approx(4800 / 3350)
    cp = A.ceiling_points(ceil, "copy_gbps").iloc[0]
    assert cp["ratio"] == pytest.approx(710 / 507)                     # the split copies only


def _offload(slug, s1, fractions=(0.0, 1 / 64, 1 / 8, 1.0), bend=0.0):
    rows = []
    for f in fractions:
        s = 1 + f * (s1 - 1) * (1 - bend * (0 < f < 1))
        rows.append({"gpu_slug": slug, "heads": "MHA 32:32", "backend": "own-auto-paged", "variant": "explicit_copy",
                     "fraction": f, "slowdown": s, "device_us": 100.0, "median_us": 100.0 * s,
                     "p10_us": 99.0 * s, "p90_us": 101.0 * s})
    return rows


def test_break_even_is_exact_for_a_linear_step_and_says_when_the_line_misses():
    d = pd.DataFrame(_offload(B, 57.0) + _offload(O, 84.0, bend=0.3))
    be = A.break_even(d).set_index("gpu_slug")
    assert be.loc[B, "f_linear"] == pytest.approx(1 / 56)
    assert be.loc[B, "linear_err"] == pytest.approx(0, abs=1e-12)
    assert be.loc[O, "linear_err"] > 0.1                                # a bent curve is not a line
    assert (be.loc[B, "below"], be.loc[B, "above"]) == (1 / 64, 1 / 8)  # the measured bracket
    r = A.offload_points(be.reset_index(), "f_linear", heads="MHA 32:32", backend="own-auto-paged",
                         variants=["explicit_copy"])
    assert r["ratio"].iloc[0] == pytest.approx(56 / 83)


def _decode(run, card, us, experiment="kernel_speed", plan="v1 tile=1", slug=O):
    keys = dict(backend="own-auto-paged", batch_size=8, seq_len=4096, num_heads=32, num_kv_heads=32, head_size=128,
                block_size=16, dtype="float16", placement="identity", memory_kind="device", protocol="rigorous")
    return {"gpu_slug": slug, "experiment": experiment, "run_id": run, "card_id": card, "plan": plan,
            "median_us": us, "p10_us": us, "p90_us": us, **keys}


def test_decode_pairs_tell_cards_from_processes_and_never_pair_different_code():
    rows = pd.DataFrame([_decode("r1", "cardA", 100.0), _decode("r2", "cardA", 100.5),
                         _decode("r3", "cardB", 102.0, experiment="page_table"),
                         _decode("r4", "cardB", 150.0, plan="v3 tile=8")])
    p = A.decode_pairs(rows)
    kinds = dict(zip(zip(p["run_a"], p["run_b"]), p["kind"]))
    assert kinds[("r1", "r2")] == "between processes, one card"
    assert kinds[("r1", "r3")] == "between cards"
    assert not any("r4" in pair for pair in kinds)                     # another plan: not the same point
    assert p.set_index(["run_a", "run_b"]).loc[("r1", "r3"), "diff"] == pytest.approx(0.02)


def test_decode_scaling_pairs_each_model_in_its_primary_run_on_the_same_plan():
    rows = pd.DataFrame([
        {**_decode("b1", "h1", 150.0, slug=B), "pct_of_read_ceiling": 99.0, "bytes_moved": 1},
        {**_decode("o1", "g1", 100.0), "pct_of_read_ceiling": 97.0, "bytes_moved": 1},
        {**_decode("o1", "g1", 90.0, plan="v3 tile=8"), "pct_of_read_ceiling": 97.0, "bytes_moved": 1}])
    s = A.decode_scaling(rows)
    assert len(s) == 1 and s["ratio"].iloc[0] == pytest.approx(1.5)
    assert s["pct_of_read_ceiling_b"].iloc[0] == 99.0
