"""The Python mirror of the kernel's thread mapping agrees with hand arithmetic and the kernel."""

import re

import pytest

from lib.chapters.kernel import anatomy as A
from lib.engine import kernels
from lib.engine.kernels import SOURCE


def test_constexprs_match_the_kernel_source():
    """If the kernel's mapping changes, this mirror (and the chapter's table) must be redone."""
    text = SOURCE.read_text()
    found = dict(re.findall(r"constexpr int (\w+) = (.+?);", text))
    for name, expr in A.KERNEL_CONSTEXPRS.items():
        assert found.get(name) == expr, (name, found.get(name))
    assert "constexpr int WARP = 32;" in text and "constexpr int NUM_THREADS = 128;" in text


@pytest.mark.parametrize("bs, want", [
    # fp16, head 128. TG = 32/BS below a warp; VEC = max(16 B / (TG * 2 B), 1) elements;
    # SLOTS = (128/VEC)/TG; V_VEC = min(8, tokens per step); rows = 128 / (32 / (tok/V_VEC)).
    (1, dict(tg=32, tok_per_step=1, steps_per_block=1, vec=1, key_load_bytes=2, slots=4,
             shuffle_levels=5, v_vec=1, value_load_bytes=2, rows_per_iter=32, rows_per_thread=4)),
    (4, dict(tg=8, tok_per_step=4, steps_per_block=1, vec=1, key_load_bytes=2, slots=16,
             shuffle_levels=3, v_vec=4, value_load_bytes=8, rows_per_iter=32, rows_per_thread=4)),
    (8, dict(tg=4, tok_per_step=8, vec=2, key_load_bytes=4, slots=16, shuffle_levels=2, v_vec=8,
             value_load_bytes=16, vecs_per_row=1, rows_per_thread=4)),
    (16, dict(tg=2, tok_per_step=16, vec=4, key_load_bytes=8, nvec=32, slots=16,
              shuffle_levels=1, v_vec=8, vecs_per_row=2, rows_per_iter=16, rows_per_thread=8)),
    (32, dict(tg=1, tok_per_step=32, steps_per_block=1, vec=8, key_load_bytes=16, slots=16,
              shuffle_levels=0, v_vec=8, vecs_per_row=4, rows_per_iter=8, rows_per_thread=16)),
    (256, dict(tg=1, tok_per_step=32, steps_per_block=8, vec=8, key_load_bytes=16,
               rows_per_thread=16)),
])
def test_fp16_head128_by_hand(bs, want):
    m = A.thread_mapping(bs, head_size=128, dtype="float16")
    got = {k: getattr(m, k) for k in want}
    assert got == want


def test_per_token_counts():
    one, sixteen, big = (A.thread_mapping(b) for b in (1, 16, 32))
    # block 1: 4 key loads of 2 B per lane per token; block 32: 16 loads of 16 B per 32 tokens
    assert one.key_loads_per_token == 4 and big.key_loads_per_token == 0.5
    assert one.shuffles_per_token == 5 and sixteen.shuffles_per_token == 1 / 16
    assert big.shuffles_per_token == 0
    assert one.table_entries_per_token == 1 and sixteen.table_entries_per_token == 1 / 16
    # a head tile multiplies the reduction shuffles, not the loads
    tiled = A.thread_mapping(4, tile=4)
    assert tiled.shuffles_per_token == 4 * A.thread_mapping(4).shuffles_per_token
    assert tiled.key_loads_per_token == A.thread_mapping(4).key_loads_per_token


def test_fp32_and_odd_heads():
    m = A.thread_mapping(32, head_size=128, dtype="float32")
    assert (m.x, m.vec, m.key_load_bytes, m.v_vec, m.vecs_per_row, m.rows_per_iter,
            m.rows_per_thread) == (4, 4, 16, 4, 8, 4, 32)
    assert A.thread_mapping(4, dtype="float32").key_load_bytes == 4  # VEC floors at 1 element
    h80 = A.thread_mapping(32, head_size=80)
    assert (h80.nvec, h80.rows_per_thread) == (10, 10)  # 80 / 8 rows per iteration


def test_min_blocks_by_hand():
    # fp16, block 16, head 128, tile 4: rows 8 -> state 4*8 + 8*8*2/4 + 4*8 = 96 -> 4 blocks
    assert A.min_blocks("float16", 16, 128, 4) == 4
    # block 32: 16 rows -> 64 + 64 + 32 = 160 > 96 -> the whole register file
    assert A.min_blocks("float16", 32, 128, 4) == 1
    assert A.min_blocks("float32", 32, 128, 1) == 1  # 32 + 128 + 4
    assert A.min_blocks("float16", 32, 128, 1) == 4  # 16 + 64 + 8


def test_mapping_table_rows():
    t = A.mapping_table((1, 2, 4, 8, 16, 32, 64, 128, 256))
    assert list(t["block_size"]) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert list(t["key_load_bytes"]) == [2, 2, 2, 4, 8, 16, 16, 16, 16]
    assert list(t["shuffle_levels"]) == [5, 4, 3, 2, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="at least one"):
        A.mapping_table(())


@pytest.mark.parametrize("kw, match", [
    (dict(block_size=3), "divisor of 32"),
    (dict(block_size=48), "multiple of 32"),
    (dict(block_size=0), "positive integer"),
    (dict(block_size=16, dtype="int8"), "not supported"),
    (dict(block_size=32, head_size=100), "multiple"),
    (dict(block_size=16, tile=0), "positive integer"),
])
def test_thread_mapping_refuses_what_cannot_compile(kw, match):
    with pytest.raises(ValueError, match=match):
        A.thread_mapping(**kw)


def test_blocks_per_sm_and_occupancy():
    assert A.blocks_per_sm(128) == 4          # 128 x 32 x 4 warps = 16 K registers per block
    assert A.occupancy(128) == 0.25           # 16 of 64 warps
    assert A.blocks_per_sm(64) == 8
    assert A.blocks_per_sm(32) == 16          # warp limit: 16 blocks x 4 warps = 64
    assert A.blocks_per_sm(255) == 2          # 255 x 32 rounds up to 8192 per warp
    assert A.blocks_per_sm(129) == 3          # 129 x 32 = 4128 -> 4352 per warp
    assert A.blocks_per_sm(32, smem_bytes=100 * 1024) == 2
    assert A.blocks_per_sm(32, smem_bytes=100 * 1024, arch="sm_80") == 1
    with pytest.raises(ValueError, match="255"):
        A.blocks_per_sm(300)
    with pytest.raises(ValueError, match="arch"):
        A.blocks_per_sm(64, arch="sm_70")


def test_launch_table_reproduces_the_committed_plans():
    """The kernel-speed run recorded each launch's plan; the pure-Python planner agrees."""
    from lib.harness import results as R

    ks = R.load("kernel_speed", "h100-80gb-hbm3", expand_extra=True)
    own = ks[ks["plan"].notna()]
    cols = ["batch_size", "seq_len", "num_heads", "num_kv_heads", "head_size", "block_size", "dtype"]
    shapes = own[cols].drop_duplicates().to_dict("records")
    table = A.launch_table(shapes, num_sms=132)
    assert len(table) == 3 * len(shapes)
    for _, r in own.iterrows():
        if r["version"] == "auto" and kernels.auto_uses_mma(dtype=r["dtype"], num_heads=int(r["num_heads"]),
                                                            num_kv_heads=int(r["num_kv_heads"])):
            continue  # this H100 run predates v3: own-auto's rule for GQA has changed since
        asked = str(r["version"]) if r["version"] == "auto" else str(int(r["version"]))
        m = table[(table["batch_size"] == r["batch_size"]) & (table["seq_len"] == r["seq_len"])
                  & (table["num_kv_heads"] == r["num_kv_heads"]) & (table["asked"] == asked)]
        (plan,) = m.itertuples()
        want = f"v{plan.version} tile={plan.tile} partition={plan.partition_size} parts={plan.partitions}"
        assert r["plan"] == want, (r["backend"], r["plan"], want)
    # the H200 run (after v3): every own row's recorded plan is what the planner gives today
    from lib.engine.measure import plan_text

    new = R.load("kernel_speed", "h200", expand_extra=True)
    new = new[new["plan"].notna()]
    assert len(new) and (new["plan"].str.startswith("v3")).any()
    for _, r in new.iterrows():
        version = r["version"] if r["version"] == "auto" else int(r["version"])
        p = kernels.plan_launch(dtype=r["dtype"], block_size=int(r["block_size"]),
                                head_size=int(r["head_size"]), num_heads=int(r["num_heads"]),
                                num_kv_heads=int(r["num_kv_heads"]), num_seqs=int(r["batch_size"]),
                                max_seq_len=int(r["seq_len"]), version=version, num_sms=132)
        assert r["plan"] == plan_text(p), (r["backend"], r["plan"], plan_text(p))
    one = table[(table["batch_size"] == 1) & (table["asked"] == "1")].iloc[0]
    assert one["grid_blocks"] == 32  # 32 heads x 1 sequence x 1 partition
    with pytest.raises(ValueError, match="lacks"):
        A.launch_table([{"batch_size": 1}])
