"""The kernel chapter's v3 section: its plan table, resource pairs and speed table (CPU)."""

import pandas as pd
import pytest
from matplotlib.figure import Figure

from lib.chapters.kernel import v3
from lib.engine import kernels


def test_plan_table_is_the_launchers_plan():
    t = v3.plan_table([(8, 4096, 64, 8), (4, 4096, 32, 1), (32, 4096, 32, 32)])
    p = kernels.plan_launch(dtype="float16", block_size=16, head_size=128, num_heads=64,
                            num_kv_heads=8, num_seqs=8, max_seq_len=4096, version=3)
    row = t.iloc[0]
    assert (row["partitions"], row["partition (tokens)"]) == (p.max_partitions, p.partition_size)
    assert row["grid"] == 8 * 8 * p.max_partitions and row["own-auto runs"] == "v3"
    assert t.iloc[1]["blocks per KV head"] == 2          # MQA 32:1: two wide tiles of 16 heads
    assert t.iloc[2]["own-auto runs"] in ("v1", "v2")     # MHA stays on v1/v2


def _res(regs):
    rows = []
    for (dt, d, bs, *tile), by_mode in regs.items():
        tile = tile[0] if tile else 8
        for mode, (r, spill) in by_mode.items():
            rows.append(dict(arch="sm_90", kernel="mma", dtype=dt, head_size=d, block_size=bs,
                             tile=tile, addressing=mode, registers=r, spill_stores=spill))
    rows.append(dict(arch="sm_90", kernel="decode", dtype="float16", head_size=128, block_size=16,
                     tile=4, addressing="paged", registers=255, spill_stores=64))
    return pd.DataFrame(rows)


def test_resource_pairs_compare_the_addressing_modes_of_v3_only():
    res = _res({("float16", 128, 16): {"paged": (165, 0), "contiguous": (167, 0), "no_offset": (160, 0)},
                ("float16", 128, 16, 16): {"paged": (209, 0), "contiguous": (212, 0), "no_offset": (206, 0)},
                ("bfloat16", 256, 1): {"paged": (240, 0), "contiguous": (240, 8), "no_offset": (238, 0)}})
    pairs = v3.resource_pairs(res)
    assert len(pairs) == 3 and sorted(pairs["tile"]) == [8, 8, 16]  # the two tiles stay apart
    s = v3.resource_summary(pairs)
    assert s == {"modules": 3, "spilling": 1, "wide_modules": 1, "spilling_where": "head 256 block 1 tile 8",
                 "max_pc_gap": 3, "max_pc_gap_b4": 3, "max_gap": 7, "max_gap_b4": 7, "regs_lo": 165, "regs_hi": 240}
    with pytest.raises(ValueError, match="no v3"):
        v3.resource_pairs(res[res["kernel"] == "decode"])


def _speed(times):
    rows = []
    for (b, n, h, kv), by_backend in times.items():
        for backend, us in by_backend.items():
            mib = 300 if b >= 8 else 10
            rows.append(dict(backend=backend, batch_size=b, seq_len=n, num_heads=h,
                             num_kv_heads=kv, median_us=us, bytes_moved=mib * 2**20,
                             pct_of_read_ceiling=100.0 * 40 / us))
    return pd.DataFrame(rows)


def test_speed_table_holds_auto_against_the_fastest_peer_that_ran():
    speed = _speed({(8, 4096, 64, 8): {"own-auto-paged": 44.0, "own-v3-paged": 44.0,
                                       "own-v2-paged": 110.0, "sdpa_dense": 40.0, "vllm": 70.0},
                    (1, 4096, 32, 32): {"own-auto-paged": 27.0, "own-v3-paged": 36.0,
                                        "own-v2-paged": 27.0, "sdpa_dense": 30.0, "vllm": 25.0}})
    t = v3.speed_table(speed)
    assert list(t.index) == ["1 × 4096, 32:32", "8 × 4096, 64:8"]  # MHA first, then by group
    assert t.loc["8 × 4096, 64:8", "fastest peer"] == "sdpa_dense"
    assert t.loc["8 × 4096, 64:8", "auto / fastest peer"] == pytest.approx(1.1)
    assert t.loc["1 × 4096, 32:32", "fastest peer"] == "vllm"
    c = v3.speed_claims(t)
    assert (c["b8_within"], c["b8_n"], c["b1_within"], c["b1_n"]) == (0, 1, 1, 1)
    assert (c["big_90"], c["big_n"]) == (1, 1)          # 40/44 = 91% of the ceiling
    assert c["v3_over_v2_lo"] == pytest.approx(2.5)    # grouped shapes only (MHA's v3 is slower)
    assert (c["v3_faster_n"], c["grouped_n"], c["v3_slower_where"]) == (1, 1, "none")
    with pytest.raises(ValueError, match="own-auto-paged"):
        v3.speed_table(speed[speed["backend"] != "own-auto-paged"])


def test_tile_figure_draws():
    assert isinstance(v3.tile_figure(), Figure)


def test_run_spread_is_the_ratio_range_over_runs():
    rows = []
    for run, auto in (("r1", 44.0), ("r2", 48.0)):
        d = _speed({(8, 4096, 64, 8): {"own-auto-paged": auto, "own-v3-paged": auto, "sdpa_dense": 40.0}})
        d["run_id"], d["point_key"] = run, "p"
        rows.append(d)
    speed = pd.concat(rows)
    t = v3.with_run_spread(v3.speed_table(v3.v3_points(speed[speed.run_id == "r2"])), speed)
    assert t.attrs["runs"] == 2
    assert t["spread between runs"].iloc[0] == pytest.approx(0.1)


def _runs(spec):
    """kernel_speed rows and provenance for runs given as (run, commit, card, auto µs)."""
    rows, prov = [], {}
    for run, commit, card, auto in spec:
        d = _speed({(8, 4096, 64, 8): {"own-auto-paged": auto, "own-v3-paged": auto,
                                       "own-v3-contiguous": 40.0, "sdpa_dense": 40.0},
                    (1, 4096, 32, 1): {"own-auto-paged": auto / 4, "own-v3-paged": auto / 4,
                                       "own-v3-contiguous": 10.0, "sdpa_dense": 10.0}})
        d["run_id"], d["point_key"], d["card_id"] = run, d["batch_size"].astype(str), card
        rows.append(d)
        prov[run] = {"git": {"commit": commit + "0" * 33}}
    return pd.concat(rows, ignore_index=True), prov


def test_newest_kernel_runs_keep_the_repeats_of_the_newest_source_only():
    speed, prov = _runs([("r1", "1698623", "a", 48.0), ("r2", "fbbee38", "b", 44.0),
                         ("r3", "fbbee38", "b", 46.0)])
    assert sorted(v3.newest_kernel_runs(speed, prov)["run_id"].unique()) == ["r2", "r3"]
    with pytest.raises(ValueError, match="no run timed"):
        v3.newest_kernel_runs(speed[speed["backend"] != "own-v3-paged"], prov)
    with pytest.raises(ValueError, match="records no commit"):
        v3.newest_kernel_runs(speed, {**prov, "r3": {}})


def test_kernel_history_names_each_runs_kernel_and_its_ratios():
    speed, prov = _runs([("r2", "fbbee38", "b", 44.0), ("r1", "1698623", "a", 48.0),
                         ("r9", "abcdef0", "c", 40.0)])
    h = v3.kernel_history(speed, prov, shapes=("1 × 4096, 32:1", "2 × 2, 2:1"))
    assert list(h["run"]) == ["r1", "r2", "r9"]  # oldest first
    assert list(h["kernel"]) == ["first v3", "+ lookahead (7d9dd42)", "?"]  # unknown commit: "?"
    assert h.loc[0, "paged / contiguous, largest"] == pytest.approx(1.2)
    assert h.loc[0, "auto / fastest peer, worst at batch ≥ 8"] == pytest.approx(1.2)
    assert h.loc[1, "auto / fastest peer at 1 × 4096, 32:1"] == pytest.approx(1.1)
    assert h["auto / fastest peer at 2 × 2, 2:1"].isna().all()  # a shape not measured
    with pytest.raises(ValueError, match="no run timed"):
        v3.kernel_history(speed[speed["backend"] != "own-v3-paged"], prov)


def test_every_committed_v3_run_names_its_kernel():
    """Each H200 kernel_speed run that timed v3 has its commit in KERNEL_OF_COMMIT, so the
    kernel chapter's history never shows a run of unknown source."""
    from lib.book import frame
    from lib.harness import results as R

    speed = frame.with_physical_card(frame.load_checked("kernel_speed", "h200", dedupe=False), "kernel_speed")
    h = v3.kernel_history(speed, R.load_provenance("kernel_speed", "h200"))
    assert len(h) >= 10 and "?" not in set(h["kernel"]), h[["run", "commit", "kernel"]]
    assert set(h["kernel"]) == set(v3.KERNEL_OF_COMMIT.values())


def _probe(rows):
    return pd.DataFrame([dict(label=lab, shape=sh, backend=be, median_us=us, check_passed=True, error="")
                         for lab, sh, be, us in rows])


def test_ring_probe_table_compares_each_to_sdpa_of_its_own_run():
    probe = _probe([("s3", "8x4096 64:8", "sdpa_dense", 40.0), ("s3", "8x4096 64:8", "own-v3-paged", 60.0),
                    ("s2", "8x4096 64:8", "own-v3-paged", 62.0), ("s4", "8x4096 64:8", "own-v3-paged", 66.0),
                    ("s3", "1x4096 32:1", "sdpa_dense", 10.0), ("s3", "1x4096 32:1", "own-v3-paged", 15.0),
                    ("s2", "1x4096 32:1", "own-v3-paged", 14.0), ("s4", "1x4096 32:1", "own-v3-paged", 16.0)])
    runs = pd.DataFrame([dict(batch_size=b, seq_len=4096, num_heads=h, num_kv_heads=k, backend=be,
                              median_us=us, point_key=f"{b}{h}")
                         for b, h, k, be, us in [(8, 64, 8, "own-v3-paged", 22.0), (8, 64, 8, "sdpa_dense", 20.0),
                                                 (1, 32, 1, "own-v3-paged", 30.0), (1, 32, 1, "sdpa_dense", 10.0)]])
    t = v3.ring_probe_table(probe, runs)
    assert list(t.index) == ["8x4096 64:8", "1x4096 32:1"]  # group 8 before MQA 32:1
    assert list(t.columns) == ["registers", "ring, 2 stages", "ring, 3 stages", "ring, 4 stages",
                               "best ring / registers"]
    assert t.loc["8x4096 64:8", "registers"] == pytest.approx(1.1)
    assert t.loc["8x4096 64:8", "ring, 3 stages"] == pytest.approx(1.5)
    assert t.loc["8x4096 64:8", "best ring / registers"] == pytest.approx(1.5 / 1.1)
    assert t.loc["1x4096 32:1", "best ring / registers"] == pytest.approx(1.4 / 3.0)
    c = v3.ring_claims(t)  # batch >= 8: the one 8 x 4096 row
    assert (c["b8_lo"], c["b8_hi"]) == (pytest.approx(1.5 / 1.1), pytest.approx(1.5 / 1.1))
    assert c["s23_spread"] == pytest.approx((62 - 60) / 40 / 1.5)


def test_load_ring_probe_refuses_failed_checks(tmp_path):
    f = tmp_path / "p.jsonl"
    _probe([("s3", "8x4096 64:8", "own-v3-paged", 60.0)]).assign(check_passed=False).to_json(f, orient="records", lines=True)
    with pytest.raises(ValueError, match="failed their check"):
        v3.load_ring_probe(f)


def test_committed_ring_probe_says_what_the_chapter_says():
    """The kernel chapter: at batch 8 or more the ring is slower than the register kernel at
    every shape, and four stages slower than two and three; its correctness slice all passed."""
    from lib.book import frame
    from lib.harness import results as R

    speed = frame.with_physical_card(frame.load_checked("kernel_speed", "h200", dedupe=False), "kernel_speed")
    runs = v3.newest_kernel_runs(speed, R.load_provenance("kernel_speed", "h200"))
    t = v3.ring_probe_table(v3.load_ring_probe(v3.RING_PROBE), runs)
    big = t[t.index.str.split("x").str[0].astype(int) >= 8]
    assert len(big) >= 6 and (big["best ring / registers"] > 1).all(), big
    assert (big["ring, 4 stages"] > big[["ring, 2 stages", "ring, 3 stages"]].max(axis=1)).all(), big
    assert not t["registers"].isna().any()
    ok, n = v3.ring_checks()
    assert ok == n > 900
    assert v3.ring_card() == "cb3b4798fbf5f2bc"  # the card the probe's provenance names


def test_committed_v3_profiles_say_what_the_chapter_says():
    """The kernel chapter: at 128 x 4096 MQA neither DRAM nor the SM is saturated (both under
    half busy) and the wide tile leaves fewer warp slots filled than the tile of 8 at 64:8."""
    from lib.chapters.kernel import ncu

    gqa = ncu.metrics("h200/ncu_128x4096_64to8_b16_own-v3-paged.txt")
    mqa = ncu.metrics("h200/ncu_128x4096_32to1_b16_own-v3-paged.txt")
    assert mqa["DRAM Throughput"] < 50 and mqa["Compute (SM) Throughput"] < 50, mqa
    assert mqa["Achieved Occupancy"] < gqa["Achieved Occupancy"] < 25
    assert gqa["DRAM Throughput"] > mqa["DRAM Throughput"]
