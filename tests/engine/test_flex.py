"""flex_paged: the page table as FlexAttention block lists plus an exact tail mask.

CPU, no torch: block-size rule, the plan (lists and mask arrays), the mask selecting exactly
each sequence's tokens, a NumPy walk of the lists the way the kernel walks them (masked lists
with the mask, full lists without) against the float64 reference, bad tables, the registry.
CPU with torch (skipped without it): eager flex_attention through `prepare_decode`, which
applies the mask to the whole pool (the slow reference path) against the float64 reference.
GPU: the compiled kernel through the registry (MHA/GQA/MQA, ragged, block sizes 16-256, three
dtypes), full lists, a non-power-of-two group, CUDA-graph capture and replay, no KV copy, no
recompilation for a repeated shape, and that block size 8 really does not compile.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lib.engine import backends as B
from lib.engine.backends import flex as fp
from lib.engine import kvcache
from lib.chapters.kernel.correctness import TOLERANCE, ragged_lengths
from lib.engine.gpu import gpu_available
from lib.engine.reference import decode_attention_reference, relative_error


def _case(lens, bs, placement="shuffled", spare=3, seed=0, heads=(8, 2), d=64, dtype="float32"):
    """Host data: tables (with `spare` unused pages in the pool), pools, q, float64 reference."""
    rng = np.random.default_rng(seed)
    nb = int(kvcache.blocks_needed(lens, bs).sum()) + spare
    t = kvcache.make_block_tables(lens, bs, placement, rng, num_blocks=nb)
    nh, nkv = heads
    kp = kvcache.random_pool(nb, bs, nkv, d, dtype, rng)
    vp = kvcache.random_pool(nb, bs, nkv, d, dtype, rng)
    q = kvcache.random_array((len(lens), nh, d), dtype, rng)
    ref = decode_attention_reference(q, kp, vp, t, lens, dtype_name=dtype)
    return t, kp, vp, q, ref


# ------------------------------------------------------------------------------ CPU, no torch


@pytest.mark.parametrize("bs", [1, 2, 4, 8, 12, 24, 48, 0, -16])
def test_block_sizes_flex_cannot_walk_are_refused(bs):
    with pytest.raises(ValueError, match=f"block_size={bs} is not supported by flex_paged"):
        fp.check_block_size(bs)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        fp.plan_pages([[0]], [1], block_size=bs, num_blocks=4)


@pytest.mark.parametrize("bs", [16, 32, 64, 128, 256])
def test_power_of_two_pages_of_16_or_more_are_accepted(bs):
    assert fp.check_block_size(bs) == bs


@pytest.mark.parametrize("placement", ["identity", "shuffled"])
def test_masked_lists_are_the_block_table(placement):
    lens = [1, 17, 47, 100, 64]
    t = kvcache.make_block_tables(lens, 16, placement, np.random.default_rng(3), num_blocks=30)
    plan = fp.plan_pages(t.tables, lens, block_size=16, num_blocks=30)
    pages = kvcache.blocks_needed(lens, 16)
    assert plan.kv_num_blocks.tolist() == pages.tolist()
    for s, n in enumerate(pages):
        assert plan.kv_indices[s, :n].tolist() == t.tables[s, :n].tolist()
    assert plan.full_kv_indices is None and plan.num_tokens == 30 * 16
    assert plan.kv_indices.dtype == plan.owner.dtype == plan.valid.dtype == np.int32


def test_full_lists_hold_every_fully_used_page_and_the_masked_list_the_partial_tail():
    lens = [16, 17, 32, 1, 47]
    t = kvcache.make_block_tables(lens, 16, "shuffled", np.random.default_rng(5))
    plan = fp.plan_pages(t.tables, lens, block_size=16, num_blocks=t.num_blocks, full_blocks=True)
    assert plan.full_kv_num_blocks.tolist() == [1, 1, 2, 0, 2]
    assert plan.kv_num_blocks.tolist() == [0, 1, 0, 1, 1]
    for s, n in enumerate(plan.full_kv_num_blocks):
        assert plan.full_kv_indices[s, :n].tolist() == t.tables[s, :n].tolist()
    assert plan.kv_indices[1, 0] == t.tables[1, 1] and plan.kv_indices[4, 0] == t.tables[4, 2]
    assert plan.kv_indices.shape == plan.full_kv_indices.shape  # the kernel shares their strides


@pytest.mark.parametrize("bs", [16, 64])
def test_mask_keeps_exactly_the_tokens_each_sequence_reads(bs):
    """The mask alone is exact (what eager flex_attention applies to the whole pool)."""
    lens = [1, bs - 1, bs, bs + 1, 5 * bs + 3]
    t = kvcache.make_block_tables(lens, bs, "shuffled", np.random.default_rng(7),
                                  num_blocks=int(kvcache.blocks_needed(lens, bs).sum()) + 2)
    plan = fp.plan_pages(t.tables, lens, block_size=bs, num_blocks=t.num_blocks)
    for s, n in enumerate(lens):
        pos = np.arange(n)
        expected = t.tables[s, pos // bs].astype(np.int64) * bs + pos % bs
        assert np.array_equal(np.flatnonzero(plan.token_mask(s)), np.sort(expected))
    pages = kvcache.blocks_needed(lens, bs)
    used = np.concatenate([t.tables[s, :n] for s, n in enumerate(pages)])
    unused = np.setdiff1d(np.arange(t.num_blocks), used)
    assert unused.size == 2 and (plan.owner[unused] == -1).all() and (plan.valid[unused] == 0).all()


def _walk(plan, q, kpool, vpool, scale):
    """The kernel's walk in NumPy float64: masked lists with the mask, full lists without."""
    num_seqs, num_heads, d = q.shape
    kvh = kpool.shape[2]
    k = kvcache.as_float64(kpool).reshape(-1, kvh, d)
    v = kvcache.as_float64(vpool).reshape(-1, kvh, d)
    qf = kvcache.as_float64(q)
    kv_head = np.arange(num_heads) // (num_heads // kvh)
    out = np.zeros(qf.shape)
    for s in range(num_seqs):
        lists = [(plan.kv_indices[s, :plan.kv_num_blocks[s]], True)]
        if plan.full_kv_indices is not None:
            lists.append((plan.full_kv_indices[s, :plan.full_kv_num_blocks[s]], False))
        keep = plan.token_mask(s)
        toks = []
        for pages, masked in lists:
            for page in pages:
                t = page * plan.block_size + np.arange(plan.block_size)
                toks.extend(t[keep[t]] if masked else t)
        toks = np.asarray(toks)
        scores = np.einsum("hd,hnd->hn", qf[s], k[toks][:, kv_head].transpose(1, 0, 2)) * scale
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[s] = np.einsum("hn,hnd->hd", p, v[toks][:, kv_head].transpose(1, 0, 2))
    return out


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("full_blocks", [False, True])
@pytest.mark.parametrize("placement", ["identity", "shuffled"])
def test_walking_the_lists_gives_the_reference(heads, full_blocks, placement):
    lens = [1, 17, 47, 100, 32]
    t, kp, vp, q, ref = _case(lens, 16, placement, heads=heads)
    plan = fp.plan_pages(t.tables, lens, block_size=16, num_blocks=t.num_blocks,
                         full_blocks=full_blocks)
    assert relative_error(_walk(plan, q, kp, vp, 1 / math.sqrt(64)), ref) < 1e-12


def test_walk_catches_a_wrong_tail():
    """The walk check can fail: an off-by-one in `valid` is seen."""
    lens = [20, 35]
    t, kp, vp, q, ref = _case(lens, 16)
    plan = fp.plan_pages(t.tables, lens, block_size=16, num_blocks=t.num_blocks)
    bad = fp.PagePlan(**{**plan.__dict__, "valid": plan.valid + (plan.valid < 16)})
    assert relative_error(_walk(bad, q, kp, vp, 0.125), ref) > 1e-3


def test_bad_tables_are_refused_before_any_launch():
    lens = [40, 20]
    t = kvcache.make_block_tables(lens, 16, "identity")
    with pytest.raises(ValueError, match="more than once"):
        seed = kvcache.make_random_block_tables([16 * 64], 16, 4, np.random.default_rng(0))
        fp.plan_pages(seed.tables, [16 * 64], block_size=16, num_blocks=seed.num_blocks)
    with pytest.raises(ValueError, match="outside the pool's 4 pages"):
        fp.plan_pages(t.tables, lens, block_size=16, num_blocks=4)
    with pytest.raises(ValueError, match="needs 4 pages"):
        fp.plan_pages(t.tables, [64, 20], block_size=16, num_blocks=5)
    with pytest.raises(ValueError, match="seq_lens must be 2 integers"):
        fp.plan_pages(t.tables, [40], block_size=16, num_blocks=5)
    with pytest.raises(ValueError, match=">= 1"):
        fp.plan_pages(t.tables, [40, 0], block_size=16, num_blocks=5)
    with pytest.raises(ValueError, match="2-D integer"):
        fp.plan_pages(t.tables.astype(float), lens, block_size=16, num_blocks=5)


def test_registry_lists_flex_paged_with_the_adapter():
    backend = B.get_backend("flex_paged")
    assert backend.layout == "vllm" and backend._prepare is not None
    reason = backend.unavailable_reason()
    assert reason is None or "no adapter" not in reason
    if not gpu_available():
        assert isinstance(reason, str) and reason


# ------------------------------------------------------------------------------ CPU, torch


def _torch(a):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if a.dtype == np.uint16 else t


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1), (6, 2)])
@pytest.mark.parametrize("bs, full_blocks", [(16, False), (32, True)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_eager_flex_attention_matches_the_reference_on_cpu(heads, bs, full_blocks, dtype):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch.nn.attention.flex_attention")
    lens = ragged_lengths(bs)[:3] + (100,)
    t, kp, vp, q, ref = _case(lens, bs, heads=heads, dtype=dtype)
    k = _torch(kp)
    out = torch.full(q.shape, float("nan"), dtype=k.dtype)
    launch = fp.prepare_decode(_torch(q), k, _torch(vp), out, t.tables, lens,
                               scale=1 / math.sqrt(64), full_blocks=full_blocks, compiled=False)
    assert torch.isnan(out).all()  # preparing never writes the output
    assert launch._args[1].data_ptr() == k.data_ptr()  # K is a view of the pool
    launch()
    assert relative_error(out, ref) <= TOLERANCE[dtype]


def test_prepare_refuses_block_size_8_before_launch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch.nn.attention.flex_attention")
    t, kp, vp, q, _ = _case([9, 30], 8)
    out = torch.full(q.shape, float("nan"))
    with pytest.raises(ValueError, match="block_size=8"):
        fp.prepare_decode(_torch(q), _torch(kp), _torch(vp), out, t.tables, [9, 30], scale=0.125)
    assert torch.isnan(out).all()


# ------------------------------------------------------------------------------ GPU

STANDARD = dict(num_heads=8, num_kv_heads=2, head_size=128, block_size=16, dtype="float16",
                seq_lens=(1, 17, 47, 700, 1537, 4096, 3001), placement="shuffled")


def _problem(seed=0, **kw):
    spec = {**STANDARD, **kw}
    return B.DecodeProblem(num_seqs=len(spec["seq_lens"]), seed=seed, **spec)


def _run(case, **options):
    import cupy

    out = case.poisoned_output()
    launch = B.get_backend("flex_paged").prepare(case, out, **options)
    launch()
    cupy.cuda.Device().synchronize()
    return out, launch


def _direct(case, **options):
    """prepare_decode without the registry (for options the registry does not pass)."""
    import cupy

    out = case.poisoned_output()
    k, v = case.layout("vllm")
    launch = fp.prepare_decode(B.torch_view(case.q), B.torch_view(k), B.torch_view(v),
                               B.torch_view(out), case.tables.tables, case.problem.seq_lens,
                               scale=case.scale, **options)
    B._on_cupy_stream(launch)()
    cupy.cuda.Device().synchronize()
    return out


GPU_CASES = [  # heads, block size, dtype, placement, head size
    ((4, 4), 16, "float16", "shuffled", 128),
    ((8, 2), 16, "bfloat16", "shuffled", 128),
    ((8, 1), 16, "float16", "identity", 64),
    ((8, 2), 32, "float32", "shuffled", 128),
    ((8, 2), 256, "float16", "shuffled", 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("heads, bs, dtype, placement, d", GPU_CASES)
def test_compiled_flex_matches_the_reference(heads, bs, dtype, placement, d):
    case = B.DecodeCase.build(_problem(num_heads=heads[0], num_kv_heads=heads[1], block_size=bs,
                                       dtype=dtype, placement=placement, head_size=d,
                                       seq_lens=ragged_lengths(bs)))
    out, _ = _run(case)
    assert relative_error(out, case.reference(), dtype_name=dtype) <= TOLERANCE[dtype]


@pytest.mark.gpu
def test_full_lists_and_a_group_of_three_match_the_reference():
    case = B.DecodeCase.build(_problem())
    err = relative_error(_direct(case, full_blocks=True), case.reference(), dtype_name="float16")
    assert err <= TOLERANCE["float16"]
    odd = B.DecodeCase.build(_problem(num_heads=6, num_kv_heads=2, seq_lens=(5, 33, 700)))
    out, _ = _run(odd)
    assert relative_error(out, odd.reference(), dtype_name="float16") <= TOLERANCE["float16"]


@pytest.mark.gpu
def test_block_size_1_is_refused_before_launch():
    import cupy

    case = B.DecodeCase.build(_problem(block_size=1, seq_lens=(5, 40)))
    out = case.poisoned_output()
    with pytest.raises(ValueError, match="block_size=1"):
        B.get_backend("flex_paged").prepare(case, out)
    assert bool(cupy.isnan(out.astype(cupy.float32)).all())


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_write_the_output():
    import cupy

    from lib.engine import timing

    case = B.DecodeCase.build(_problem())
    out, launch = _run(case)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        launch()
        graph = stream.end_capture()
        out.fill(np.nan)
        graph.launch(stream)
    stream.synchronize()
    assert relative_error(out, case.reference(), dtype_name="float16") <= TOLERANCE["float16"]
    t = timing.time_graph(launch, min_samples=3, max_samples=5, max_seconds=2.0)
    assert t.median_us > 0


@pytest.mark.gpu
def test_a_call_copies_no_kv_and_a_repeated_shape_does_not_recompile():
    import torch
    from torch._dynamo.utils import counters

    case = B.DecodeCase.build(_problem())
    _, launch = _run(case)
    k_bytes = case.kpool.nbytes
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    launch()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < k_bytes / 4, f"a call allocated {extra} bytes; K alone is {k_bytes}"

    graphs = counters["stats"]["unique_graphs"]
    again = B.DecodeCase.build(_problem(seed=1))  # same shapes, new data
    out, _ = _run(again)
    assert counters["stats"]["unique_graphs"] == graphs
    assert relative_error(out, again.reference(), dtype_name="float16") <= TOLERANCE["float16"]


@pytest.mark.gpu
def test_block_size_8_really_does_not_compile(monkeypatch):
    """Backs the block-size rule: with the check bypassed, FlexAttention cannot build the kernel.

    If this fails, this torch/Triton can walk 8-token pages and the rule may be relaxed.
    """
    monkeypatch.setattr(fp, "check_block_size", int)
    case = B.DecodeCase.build(_problem(block_size=8, seq_lens=(9, 40)))
    with pytest.raises(Exception):
        _direct(case)
