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
    for (dt, d, bs), by_mode in regs.items():
        for mode, (r, spill) in by_mode.items():
            rows.append(dict(arch="sm_90", kernel="mma", dtype=dt, head_size=d, block_size=bs,
                             addressing=mode, registers=r, spill_stores=spill))
    rows.append(dict(arch="sm_90", kernel="decode", dtype="float16", head_size=128, block_size=16,
                     addressing="paged", registers=255, spill_stores=64))
    return pd.DataFrame(rows)


def test_resource_pairs_compare_the_addressing_modes_of_v3_only():
    res = _res({("float16", 128, 16): {"paged": (165, 0), "contiguous": (167, 0), "no_offset": (160, 0)},
                ("bfloat16", 256, 1): {"paged": (240, 0), "contiguous": (240, 8), "no_offset": (238, 0)}})
    pairs = v3.resource_pairs(res)
    assert len(pairs) == 2
    s = v3.resource_summary(pairs)
    assert s == {"modules": 2, "spilling": 1, "spilling_where": "head 256 block 1", "max_pc_gap": 2,
                 "max_pc_gap_b4": 2, "max_gap": 7, "regs_lo": 165, "regs_hi": 240}
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
