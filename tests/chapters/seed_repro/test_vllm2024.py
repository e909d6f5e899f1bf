"""The seed chapter's vLLM 2024 section on synthetic rows (ratios within a run, their spread over
runs, the post's cells beside them) and its claims against the committed H200 data."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from lib.chapters.seed import tables as S
from lib.chapters.seed_repro import figures as F
from lib.chapters.seed_repro import vllm2024 as V


def synthetic_rows(runs=("r1", "r2", "r3")) -> pd.DataFrame:
    """vLLM 2024 at 100 µs everywhere; ours v1 at 50 µs (v2 at 80) times a per-run factor."""
    rows = []
    for i, run in enumerate(runs):
        for arm, (proto, place) in ((V.SEED_ARM, ("seed", "random")),
                                    ("rigorous, distinct blocks", ("rigorous", "identity"))):
            for memory in ("device", "managed"):
                for n, b in ((4096, 1), (1024, 1), (1024, 16), (1024, 32)):
                    for bs in S.BLOCK_SIZES:
                        for backend, t in (("vllm2024-v1", 100.0), ("vllm2024-v2", 100.0),
                                           ("own-v1-paged", 50.0 * (1 + 0.01 * i)), ("own-v2-paged", 80.0)):
                            rows.append(dict(gpu_slug="h200", run_id=run, arm=arm, protocol=proto,
                                             placement=place, num_heads=64, num_kv_heads=8, memory_kind=memory,
                                             seq_len=n, batch_size=b, block_size=bs, backend=backend,
                                             median_us=t, extra={"plan": f"{backend} plan"}))
    return pd.DataFrame(rows)


def test_ratios_are_taken_within_a_run_and_spread_over_runs():
    s = V.ratio_summary(synthetic_rows())
    v1 = s[s.version == "v1"]
    assert v1["median"].round(6).eq(0.505).all() and v1["lo"].round(6).eq(0.5).all()
    assert v1["hi"].round(6).eq(0.51).all() and v1["runs"].eq(3).all()
    assert s[s.version == "v2"]["median"].round(6).eq(0.8).all()
    t = V.ratio_table(s, "h200")
    assert t.shape == (24, 4) and t.iloc[0, 0] == "0.51 (0.50–0.51)"
    assert list(t.index.get_level_values(0)[:6]) == ["4096 × 1"] * 6
    with pytest.raises(ValueError, match="no vLLM 2024 ratios on 'h100'"):
        V.ratio_table(s, "h100")


def test_a_run_without_vllm_gives_no_ratio():
    rows = synthetic_rows()
    with pytest.raises(ValueError, match="no point has both"):
        V.per_run_ratios(rows[~rows.backend.str.startswith("vllm2024")])


def test_side_by_side_puts_every_post_cell_beside_the_same_point():
    seed = S.load_seed()
    side = V.side_by_side(seed, V.median_times(synthetic_rows()), "h200")
    assert len(side) == len(seed) == S.N_ROWS
    assert side["vLLM 2024 v1"].eq(100).all() and side["ours v2 / vLLM v2"].round(6).eq(0.8).all()
    assert (side["post / vLLM v1"] == side["post"] / 100).all()
    curve = V.block_curve(side)
    assert curve.loc[16].eq(1).all()
    assert curve.loc[32, "post"] == pytest.approx(289.02 / 163.37, rel=1e-3)
    fig = F.vllm2024_panels(side, "h200")
    assert len([a for a in fig.axes if a.get_visible()]) == 2
    plt.close(fig)
    assert "ours v1 / vLLM v1" in F.vllm2024_table(side, "c").to_html()


def test_launch_plans_come_from_the_rows():
    p = V.launch_plans(synthetic_rows(), "h200")
    assert set(p["backend"]) == {"vllm2024-v1", "vllm2024-v2", "own-v1-paged", "own-v2-paged"}
    assert (p["launch"] == p["backend"] + " plan").all()


# ----------------------------------------------------------------------- the committed data

def test_committed_h200_runs_and_the_chapters_claims():
    rows = V.load()
    h200 = rows[rows.gpu_slug == "h200"]
    assert h200["run_id"].nunique() >= 3 and h200["point_key"].nunique() == 384
    assert (h200["status"] == "ok").all() and h200["check_passed"].astype(bool).all()
    side = V.side_by_side(S.load_seed(), V.median_times(rows), "h200")
    curve = V.block_curve(side)
    # vLLM's kernel has the post's uptick at block 32; our v1 does not
    assert curve.loc[32, "post"] > 1.3 and curve.loc[32, "vLLM 2024 v1"] > 1.3 > 1 > curve.loc[32, "ours v1"]
    # ... and no hump at block 2: its v1 falls from block 1 to block 2, the post's rises
    assert curve.loc[2, "post"] > curve.loc[1, "post"] and curve.loc[2, "vLLM 2024 v1"] < curve.loc[1, "vLLM 2024 v1"]
    s = V.ratio_summary(rows)
    s = s[(s.gpu_slug == "h200") & (s.num_heads == 64)]
    rig = s[s.arm.str.startswith("rigorous")]
    assert ((rig["hi"] - rig["lo"]) / rig["median"]).max() < 0.05  # the rigorous spread is small
    wide = rig[(rig.seq_len == 1024) & (rig.batch_size >= 16) & (rig.arm == "rigorous, distinct blocks")]
    assert (wide.loc[wide.version == "v1", "median"] < 1).all()
    regs = V.registers()
    assert regs.loc[32, "vLLM 2024 v1"] < regs.loc[16, "vLLM 2024 v1"] < regs.loc[16, "ours (tile 4)"]
    facts = V.build_facts()
    assert facts["version"] == "0.3.3" and not any(m.startswith("float16") for m in facts["spilling_modules"])
