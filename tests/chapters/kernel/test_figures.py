"""The kernel chapter's figures and tables draw what they are given (small synthetic frames)."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lib.chapters.kernel import anatomy as A
from lib.chapters.kernel import figures as F
from lib.engine import kvcache


def _closed(fig):
    assert isinstance(fig, Figure)
    assert fig.number not in plt.get_fignums()  # shown only where a notebook glues it


def test_paged_cache_figure_draws_every_entry():
    tables = kvcache.make_block_tables([7, 10, 3], 4, "shuffled", rng=3, num_blocks=8)
    fig = F.paged_cache_figure(tables)
    _closed(fig)
    texts = [t.get_text() for t in fig.axes[0].texts]
    # one arrow per used table entry (2 + 3 + 1) plus one per sequence row
    arrows = [p for p in fig.axes[0].patches if type(p).__name__ == "FancyArrowPatch"]
    assert len(arrows) == 6 + 3
    assert texts.count("free") == 2  # blocks 6 and 7 hold nothing
    for s, row in enumerate(tables.tables):
        for j, b in enumerate(row[: kvcache.blocks_needed([tables.seq_lens[s]], 4)[0]]):
            assert f"seq {s}, logical {j}" in texts  # the pool labels who owns each block
    with pytest.raises(ValueError, match="small examples"):
        F.paged_cache_figure(kvcache.make_block_tables([400], 16, "identity"))
    with pytest.raises(ValueError, match="needs BlockTables"):
        F.paged_cache_figure(kvcache.BlockTables(np.zeros((1, 1), np.int32),
                                                 np.zeros(1, np.int32), 1, "identity"))


def test_layout_order_reads_back_to_classic():
    order = F.layout_order(block_size=4, head_size=16)
    assert order["x"] == 8
    tok, dim = order["classic K"]
    # first 16 bytes: token 0, dims 0-7; then token 1's dims 0-7
    assert list(tok[:9]) == [0] * 8 + [1] and list(dim[:9]) == list(range(8)) + [0]
    tok, dim = order["classic V"]
    assert list(tok[:5]) == [0, 1, 2, 3, 0] and list(dim[:5]) == [0, 0, 0, 0, 1]
    tok, dim = order["pool (vLLM) K and V"]
    assert list(tok[:17]) == [0] * 16 + [1]
    with pytest.raises(ValueError, match="2048"):
        F.layout_order(block_size=256, head_size=128)


def test_layout_figure():
    fig = F.layout_figure(block_size=4, head_size=16)
    _closed(fig)
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "8 threads share a token" in texts and "2 B" in texts  # from kernel_anatomy
    with pytest.raises(ValueError, match="per_row"):
        F.layout_figure(per_row=12)


def test_mapping_figure_and_table():
    t = A.mapping_table((1, 4, 16, 32, 256))
    fig = F.mapping_figure(t)
    _closed(fig)
    left, right = fig.axes
    assert len(left.lines) == 2 and len(right.lines) == 4
    shuffles = np.asarray(right.lines[2].get_ydata(), dtype=float)
    assert np.isnan(shuffles[-2:]).all() and shuffles[0] == 5  # zeros are gaps on a log axis
    html = F.style_mapping_table(t, caption="cap").to_html()
    assert "TG (threads per token)" in html and "cap" in html
    with pytest.raises(ValueError, match="needs columns"):
        F.mapping_figure(pd.DataFrame({"block_size": [1]}))


def _matrix():
    rows = []
    for backend, dtype, err, ok, tol in [
        ("own-v1-paged", "float16", 1e-4, True, 2e-3),
        ("own-v1-paged", "float32", 1e-7, True, 1e-5),
        ("vllm", "float32", 4e-4, False, 1e-5),
        ("vllm", "float16", 2e-4, True, 2e-3),
        ("own-v1-contiguous", "float16", 1e-4, True, 2e-3),
        ("own-v1-paged", "float16", 1e-16, True, 2e-3),
    ]:
        rows.append(dict(backend=backend, dtype=dtype, rel_error=err, check_passed=ok,
                         tolerance=tol, placement="identity", bit_identical_to="",
                         bit_identical=None))
    df = pd.DataFrame(rows)
    df.loc[4, ["bit_identical_to", "bit_identical"]] = ["own-v1-paged", True]
    return df


def test_correctness_summary_and_style():
    s = F.correctness_summary(_matrix())
    assert list(s.index) == ["own-v1-paged", "own-v1-contiguous", "vllm"]  # BACKEND_ORDER
    assert s.loc["vllm", ("float32", "passed")] == 0 and s.loc["vllm", ("float32", "total")] == 1
    assert s.loc["vllm", ("float32", "worst")] == pytest.approx(40)
    assert s.loc["own-v1-paged", ("float16", "total")] == 2
    html = F.style_correctness_summary(s).to_html()
    assert "0 / 1" in html and "#c0392b" in html  # the failure is marked
    assert "—" in html  # own-v1-contiguous has no float32 rows here


def test_bit_identity():
    b = F.bit_identity(_matrix())
    assert b.to_dict("records") == [{"backend": "own-v1-contiguous",
                                     "bit_identical_to": "own-v1-paged",
                                     "identical": 1, "compared": 1}]
    with pytest.raises(ValueError, match="bit for bit"):
        F.bit_identity(_matrix().assign(bit_identical_to=""))


def test_correctness_figure_one_panel_per_dtype():
    fig = F.correctness_figure(_matrix())
    _closed(fig)
    axes = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in axes] == ["float16", "float32"]
    # the tolerance line of each dtype is drawn
    tol_lines = [l for l in axes[1].lines if list(l.get_xdata()) == [1e-5, 1e-5]]
    assert tol_lines
    with pytest.raises(ValueError, match="no rows"):
        F.correctness_figure(_matrix().iloc[0:0])


def _resources():
    rows = []
    for arch in ("sm_80", "sm_90"):
        for bs in (1, 16, 32):
            for tile in (1, 4):
                regs = 60 + bs + 30 * tile if bs < 32 else 250
                spill = 8 if (arch == "sm_90" and bs == 32 and tile == 4) else 0
                for addr in ("paged", "contiguous"):
                    rows.append(dict(arch=arch, kernel="decode", dtype="float16", block_size=bs,
                                     head_size=128, tile=tile, addressing=addr, registers=regs,
                                     stack_bytes=spill, spill_stores=spill, spill_loads=2 * spill,
                                     static_smem_bytes=0, dynamic_smem_bytes=1000))
    return pd.DataFrame(rows)


def test_register_pivot_and_spills():
    regs, spills = F.register_pivot(_resources())
    assert regs.shape == (3, 4) and list(regs.index) == [1, 16, 32]
    assert regs.loc[16, ("sm_90", 4)] == 60 + 16 + 120
    assert spills.loc[32, ("sm_90", 4)] and not spills.loc[32, ("sm_80", 4)]
    html = F.style_register_pivot(regs, spills, caption="c").to_html()
    assert "250*" in html and "outline" in html
    with pytest.raises(ValueError, match="no decode kernel"):
        F.register_pivot(_resources(), head_size=64)
    with pytest.raises(ValueError, match="shape"):
        F.style_register_pivot(regs, spills.iloc[:1])
    sl = F.spill_list(_resources(), "sm_90")
    assert sl.to_dict("records") == [{
        "dtype": "float16", "head size": 128, "tile": 4, "block sizes": "32",
        "addressing": "paged, contiguous", "registers": 250,
        "spilled (B), stores / loads": "8 / 16"}]
    assert F.spill_list(_resources(), "sm_80").empty


def _speed():
    rows = []
    for (b, n, h, kv), times in {(1, 4096, 32, 32): (30.0, 90.0, 33.0),
                                 (32, 4096, 32, 8): (225.0, 240.0, 180.0)}.items():
        for backend, t in zip(("own-auto-paged", "own-v1-paged", "sdpa_dense"), times):
            rows.append(dict(backend=backend, batch_size=b, seq_len=n, num_heads=h,
                             num_kv_heads=kv, median_us=t, pct_of_read_ceiling=3000.0 / t))
    return pd.DataFrame(rows)


def test_speed_table_figure_and_ratios():
    t = F.speed_table(_speed())
    assert list(dict.fromkeys(t["shape"])) == ["1 × 4096, MHA 32:32", "32 × 4096, GQA 32:8"]
    gqa = t[(t["shape"] == "32 × 4096, GQA 32:8") & (t["backend"] == "own-auto-paged")]
    assert gqa["over_baseline"].iloc[0] == pytest.approx(1.25)
    fig = F.speed_figure(t)
    _closed(fig)
    left, right = fig.axes[:2]
    assert right.get_xscale() == "log"
    assert sum(len(c.get_offsets()) for c in left.collections) == len(t)
    html = F.style_speed_ratios(t).to_html()
    assert "1.25×" in html and "180.0" in html and "sdpa_dense (µs)" in html
    with pytest.raises(ValueError, match="no sdpa_dense"):
        F.speed_table(_speed()[lambda d: d["backend"] != "sdpa_dense"])
    assert F.shape_label(16, 1024, 64, 8) == "16 × 1024, GQA 64:8"


def test_ratio_ticks_keep_their_labels_apart():
    """On a wide ratio axis 1.25x goes (it met 1.5x); on a narrow one the fine ticks come back; every
    pair of ticks is at least a sixth of the axis apart (in log)."""
    assert F.ratio_ticks(0.9, 3.2) == [1, 1.5, 2, 3]
    assert F.ratio_ticks(0.9, 1.4) == [0.9, 1, 1.1, 1.25]
    for lo, hi in ((0.9, 3.2), (0.85, 1.4), (0.5, 5.0), (0.95, 1.5)):
        ticks = F.ratio_ticks(lo, hi)
        assert ticks and all(lo <= t <= hi for t in ticks)
        gaps = np.diff(np.log2(ticks))
        assert (gaps >= np.log2(hi / lo) / 6 - 1e-12).all(), (lo, hi, ticks)
