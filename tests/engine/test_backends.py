"""CPU tests of everything that decides what runs: registry, launch plans, matrix, tables."""

import numpy as np
import pytest

from lib.engine import backends as B
from lib.engine import measure as bench
from lib.chapters.kernel import correctness
from lib.engine import kernels
from lib.engine.gpu import gpu_available


def test_registry_lists_every_backend_with_a_reason_when_unusable():
    rows = {r["backend"]: r for r in B.list_backends()}
    own = {f"own-{v}-{a}" for v in ("auto", "v1", "v2") for a in kernels.ADDRESSING}
    assert own | {"vllm", "sdpa_dense", "flashinfer", "flex_paged"} <= set(rows)
    for r in rows.values():
        assert r["unavailable"] is None or isinstance(r["unavailable"], str)
    if not gpu_available():
        assert all(rows[n]["unavailable"] for n in own)
    assert rows["flashinfer"]["unavailable"]  # never an error, always a reason


def test_unknown_backend_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean own-v2-paged"):
        B.get_backend("own-v2-pagd")


@pytest.mark.parametrize("kw, fragment", [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(block_size=3), "block_size"),
    (dict(head_size=100), "head_size"),
    (dict(dtype="float64"), "dtype"),
    (dict(placement="scattered"), "placement"),
])
def test_problem_rejects_bad_sizes_before_any_gpu_work(kw, fragment):
    base = dict(num_heads=8, num_kv_heads=2, head_size=128, block_size=16, dtype="float16")
    with pytest.raises(ValueError, match=fragment):
        B.DecodeProblem.uniform(2, 100, **{**base, **kw})


def test_problem_bytes_count_kv_q_and_output():
    p = B.DecodeProblem.uniform(2, 100, num_heads=8, num_kv_heads=2, head_size=64, block_size=16,
                                dtype="float16")
    assert p.bytes_moved == 2 * (2 * 100 * 2 * 64) * 2 + 2 * (2 * 8 * 64) * 2


def test_head_tiles_share_loads_within_a_group():
    assert kernels.head_tile(32, 32, 128) == 1   # MHA
    assert kernels.head_tile(32, 8, 128) == 4    # GQA 4:1
    assert kernels.head_tile(64, 8, 128) == 4    # group 8 -> two tiles of 4
    assert kernels.head_tile(12, 2, 128) == 2    # group 6
    assert kernels.head_tile(8, 1, 256) == 4


def test_launch_plans_follow_the_measured_rules():
    plan = lambda b, n, h=32, kv=32, **kw: kernels.plan_launch(  # noqa: E731
        dtype="float16", block_size=16, head_size=128, num_heads=h, num_kv_heads=kv,
        num_seqs=b, max_seq_len=n, **kw)
    assert plan(1, 4096).version == 2 and plan(1, 4096).partition_size == 128
    assert plan(16, 1024).version == 1          # 512 rows >= 3 blocks per SM
    assert plan(32, 4096, kv=8, version=2).version == 2
    assert plan(32, 4096, kv=8).version == 3    # GQA in fp16: the matrix-unit kernel
    assert plan(4, 100).version == 1            # one partition: no reduce needed
    long = plan(1, 32768, version="auto")
    assert long.version == 2 and long.max_partitions == 32768 // long.partition_size
    with pytest.raises(ValueError, match="shared memory"):
        plan(1, 32768, h=32, kv=8, version=1)
    with pytest.raises(ValueError, match="multiple of block_size"):
        plan(1, 4096, partition_size=100)
    with pytest.raises(ValueError, match="addressing"):
        plan(1, 4096, addressing="virtual")


def test_every_module_holds_three_addressing_modes_and_a_reduce():
    names = kernels.instantiations("bfloat16", 8, 80, 4)
    assert names == ["upa::paged_attention_decode<__nv_bfloat16, 8, 80, 4, 0>",
                     "upa::paged_attention_decode<__nv_bfloat16, 8, 80, 4, 1>",
                     "upa::paged_attention_decode<__nv_bfloat16, 8, 80, 4, 2>",
                     "upa::paged_attention_reduce<__nv_bfloat16, 80>"]
    # v1/v2: three head tiles for 3 dtypes; v3: a tile of 8 per (fp16/bf16, block, head size)
    # and a wide tile of 16 for the five head sizes up to 128
    assert len(list(kernels.all_modules())) == 3 * 9 * 6 * 3 + 2 * 9 * 6 + 2 * 9 * 5
    assert kernels.instantiations("float16", 1, 256, kernels.MMA_TILE) == [
        "upa::paged_attention_mma<__half, 1, 256, 0, 8>", "upa::paged_attention_mma<__half, 1, 256, 1, 8>",
        "upa::paged_attention_mma<__half, 1, 256, 2, 8>", "upa::paged_attention_reduce<__half, 256>"]
    assert kernels.instantiations("bfloat16", 16, 128, kernels.MMA_WIDE_TILE)[0] == \
        "upa::paged_attention_mma<__nv_bfloat16, 16, 128, 0, 16>"
    assert ("float16", 16, 256, kernels.MMA_WIDE_TILE) not in set(kernels.all_modules())


def test_v3_plans_split_sequences_within_one_wave_of_blocks():
    plan = lambda b, n, h, kv, **kw: kernels.plan_launch(  # noqa: E731
        dtype=kw.pop("dtype", "float16"), block_size=16, head_size=128, num_heads=h,
        num_kv_heads=kv, num_seqs=b, max_seq_len=n, **kw)
    few = plan(8, 4096, 64, 8)                  # 64 blocks: split into 6 -> 384 <= 3 x 132
    assert (few.version, few.tile, few.max_partitions) == (3, 8, 6)
    assert few.partition_size % kernels.MMA_PARTITION_QUANTUM == 0
    assert plan(128, 4096, 64, 8).max_partitions == 1   # 1024 blocks already fill the GPU
    one = plan(1, 32768, 32, 8)
    assert one.max_partitions * 8 <= 3 * 132 and one.max_partitions > 40
    assert plan(1, 300, 32, 8).partition_size == 320    # never below 256 tokens a partition
    mqa = plan(4, 4096, 32, 1)                  # group 32: two wide tiles of 16
    assert (mqa.tile, mqa.head_tiles) == (16, 2) and mqa.shared_bytes == kernels.mma_smem_bytes(128, 16)
    assert mqa.max_partitions == min(2 * 132 // (4 * 2), 4096 // 256)  # a wave of 2 wide blocks per SM
    assert plan(128, 4096, 32, 1).max_partitions == 1   # 256 wide blocks: one wave already
    assert plan(2, 64, 40, 8).head_tiles == 1           # group 5: one padded tile of 8
    assert (plan(2, 64, 96, 8).tile, plan(2, 64, 96, 8).head_tiles) == (16, 1)  # group 12: one padded wide tile
    wide256 = kernels.plan_launch(dtype="float16", block_size=16, head_size=256, num_heads=32,
                                  num_kv_heads=1, num_seqs=1, max_seq_len=64)
    assert (wide256.tile, wide256.head_tiles) == (8, 4)  # head 256: the wide tile would spill
    assert plan(32, 4096, 32, 32).version == 1          # MHA stays on v1/v2
    assert plan(32, 4096, 32, 8, dtype="float32").version == 2   # fp32 stays on v2
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        plan(1, 4096, 32, 8, dtype="float32", version=3)
    with pytest.raises(ValueError, match="multiple of 64"):
        plan(1, 4096, 32, 8, version=3, partition_size=100)


def test_effective_tables_are_what_each_addressing_mode_reads():
    from lib.engine.kvcache import make_block_tables

    t = make_block_tables([40, 17], 16, "shuffled", np.random.default_rng(1))
    case = type("Case", (), {"tables": t})()
    assert (bench.effective_tables(case, "paged") == t.tables).all()
    contiguous = bench.effective_tables(case, "contiguous")
    assert contiguous[0, :3].tolist() == [0, 1, 2] and contiguous[1, 0] == 3
    assert not bench.effective_tables(case, "no_offset").any()


def test_correctness_matrix_covers_the_issue_grid():
    cases = list(correctness.matrix_cases())
    assert len(cases) == 3 * 9 * 6 * 3 * 3 + 6
    for bs in (1, 16, 256):
        lens = correctness.ragged_lengths(bs)
        assert 1 in lens and max(lens) > 512  # crosses a v2 partition
        if bs > 1:
            assert any(n % bs for n in lens)   # a partial last block
    long = [c for c in cases if max(c.seq_lens) > 4096]
    assert long and all(max(c.seq_lens) >= 32768 for c in long)
    assert all("own-v1-paged" not in c.backends for c in long)


def test_correctness_grid_checks_v3_at_every_group_size_and_its_bit_identities():
    from lib.chapters.kernel.experiment import CORRECTNESS
    from lib.harness.experiments import expand

    v3 = [p for p in expand(CORRECTNESS) if p.get("variant") == "v3"]
    groups = {correctness.HEAD_LAYOUTS[p["heads"]][0] // correctness.HEAD_LAYOUTS[p["heads"]][1]
              for p in v3}
    assert groups == {1, 2, 4, 6, 8, 12, 16, 32}
    assert {p["block_size"] for p in v3} == {1, 2, 4, 8, 16, 32, 64, 128, 256}
    assert {p["head_size"] for p in v3} == {64, 80, 96, 112, 128, 256}
    assert {p["dtype"] for p in v3} == {"float16", "bfloat16"}
    assert max(max(correctness.case_of(p).seq_lens) for p in v3) >= 65536
    ident = correctness.case_of(next(p for p in v3 if p["placement"] == "identity"))
    single = correctness.case_of(next(p for p in v3 if p["placement"] == "single_content"))
    assert correctness.BIT_IDENTICAL["own-v3-contiguous"] == "own-v3-paged" in ident.backends
    assert "own-v3-no_offset" in single.backends and "own-v3-paged" in single.backends
    with pytest.raises(ValueError, match="lengths"):
        correctness.case_of({**v3[0], "lengths": "huge"})


def test_kernel_cache_translation_unit_instantiates_the_module():
    from lib.engine.kernels import cache as kernel_cache

    tu = kernel_cache._translation_unit(("float16", 16, 128, 4))
    assert tu.count("template __global__ void upa::paged_attention_decode<__half, 16, 128, 4,") == 3
    assert "paged_attention_reduce<__half, 128>" in tu
    assert kernel_cache.key_name(("float16", 16, 128, 4)) == "float16_b16_d128_t4"


def test_key_findings_come_from_committed_data():
    from lib.chapters.intro.findings import key_numbers

    k = key_numbers()
    assert k["gpu"].startswith("h100")
    assert k["own_checks_passed"] == k["own_checks_total"] > 5000
    assert 0.5 < k["own_over_sdpa"] < 2 and k["fault_gbps"] < k["prefetch_gbps"]


def test_ncu_reports_parse():
    from lib.chapters.kernel import ncu

    m = ncu.metrics("ncu_gqa_32x4096_32to8.txt")
    assert m["Registers Per Thread"] == 128 and 0 < m["DRAM Throughput"] < 100
    with pytest.raises(ValueError, match="no ncu metric"):
        ncu.metrics(__file__)


# ----------------------------------------------------------------------------- managed-memory states

_TINY = dict(batch_size=2, seq_len=40, num_heads=4, num_kv_heads=2, head_size=64, block_size=16,
             dtype="float16", placement="identity", backends="own-v1-paged")


def test_managed_states_refuse_the_seed_protocol_before_building_anything():
    with pytest.raises(ValueError, match="re-established before every sample"):
        bench.measure_decode({**_TINY, "memory_kind": "managed_cold", "protocol": "seed"})


def test_state_hook_only_for_managed_states():
    assert bench.state_hook("device", []) is None
    assert bench.state_hook("managed", []) is None
    assert set(bench.MANAGED_STATES) == {"managed_cold", "managed_prefetched"}
    assert bench.MANAGED_STATES["managed_cold"][-1] == "host"
    assert bench.MANAGED_STATES["managed_prefetched"][-1] == "gpu"


@pytest.mark.gpu
@pytest.mark.parametrize("kind, where", [("managed_cold", "host"), ("managed_prefetched", "gpu")])
def test_state_hook_leaves_the_kv_pages_where_the_state_says(kind, where):
    from lib.engine import memory

    case = B.DecodeCase.build(bench.problem_of(_TINY), alloc=bench._allocator(kind))
    k, v = case.layout("classic")
    assert memory.kind_of(k) == "managed"
    bench.state_hook(kind, (k, v))()
    import cupy

    cupy.cuda.Device().synchronize()
    for a in (k, v):
        loc = memory.range_info(a).last_prefetch_location
        assert loc is not None and loc.startswith(where), (kind, loc)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["managed_cold", "managed_prefetched"])
def test_measure_decode_times_and_checks_managed_states(kind):
    rows = bench.measure_decode({**_TINY, "memory_kind": kind, "protocol": "rigorous"})
    assert len(rows) == 1 and rows[0].get("status") != "error", rows
    assert rows[0]["check_passed"] and rows[0]["median_us"] > 0 and rows[0]["samples"] >= 10


def test_error_text_keeps_the_head_and_the_root_cause_at_the_end():
    exc = RuntimeError("compile failed at line 1\n" + "x " * 2000 + "\nAssertionError('int64 and int32')")
    t = bench.error_text(exc)
    assert len(t) <= 900 and t.startswith("RuntimeError: compile failed") and t.endswith("int64 and int32')")
    assert bench.error_text(ValueError("short")) == "ValueError: short"
