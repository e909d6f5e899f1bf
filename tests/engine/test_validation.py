"""Bad input is refused with a ValueError that names the argument, the value and what is allowed."""

import numpy as np
import pytest

from lib.engine import kvcache as kc
from lib.engine.validation import device_of, validate_cache_arrays, validate_decode_problem

LENS = np.array([5, 33], dtype=np.int32)


def good_problem(**changes):
    bt = kc.make_block_tables(LENS, 16, "identity")
    kw = dict(num_seqs=2, num_heads=8, num_kv_heads=2, head_size=128, block_size=16,
              dtype="float16", seq_lens=LENS, tables=bt.tables, num_blocks=bt.num_blocks,
              max_seq_len=64)
    kw.update(changes)
    return kw


def _table(*rows):
    return np.array(rows, dtype=np.int32)


BAD_PROBLEMS = [
    ("block_size_3", dict(block_size=3), "block_size=3 is not supported; allowed: 1, 2, 4"),
    ("block_size_512", dict(block_size=512), "block_size=512 is not supported"),
    ("head_size_100", dict(head_size=100), "head_size=100 is not supported; allowed: 64, 80"),
    ("dtype_int8", dict(dtype="int8"), "dtype='int8' is not supported; allowed: float16, bfloat16"),
    ("dtype_float64", dict(dtype=np.float64), "dtype='float64' is not supported"),
    ("gqa_ratio", dict(num_kv_heads=3), "num_heads=8 is not a multiple of num_kv_heads=3"),
    ("more_kv_than_q", dict(num_kv_heads=16), "GQA ratio must be an integer"),
    ("zero_heads", dict(num_heads=0), "num_heads must be >= 1, got 0"),
    ("float_seqs", dict(num_seqs=2.0), "num_seqs must be an integer"),
    ("bool_heads", dict(num_kv_heads=True), "num_kv_heads must be an integer"),
    ("seq_lens_shape", dict(seq_lens=np.array([5, 33, 4])), "seq_lens has shape (3,); expected (num_seqs,) = (2,)"),
    ("seq_len_zero", dict(seq_lens=np.array([5, 0])), "seq_lens[1]=0: every sequence length must be >= 1"),
    ("seq_len_float", dict(seq_lens=np.array([5.0, 3.0])), "seq_lens must be integers"),
    ("over_max_len", dict(max_seq_len=32), "seq_lens[1]=33 exceeds max_seq_len=32"),
    ("table_dtype", dict(tables=_table([0, 0, 0], [1, 2, 3]).astype(np.int64)), "must have dtype int32, got int64"),
    ("table_rows", dict(tables=_table([0, 1, 2])), "expected 2-D (num_seqs=2, max_blocks)"),
    ("table_1d", dict(tables=np.array([0, 1], np.int32)), "expected 2-D"),
    ("table_negative", dict(tables=_table([0, 0, 0], [1, -2, 3])), "tables[1, 1]=-2 is out of range"),
    ("table_too_big", dict(tables=_table([4, 0, 0], [1, 2, 3])), "tables[0, 0]=4 is out of range; entries must be >= 0 and < num_blocks=4"),
    ("seq_longer_than_table", dict(tables=_table([0, 0], [1, 2])), "sequence longer than its table: seq_lens[1]=33 needs 3 blocks"),
    ("num_blocks_zero", dict(num_blocks=0), "num_blocks must be >= 1, got 0"),
]


@pytest.mark.parametrize("changes, fragment", [c[1:] for c in BAD_PROBLEMS],
                         ids=[c[0] for c in BAD_PROBLEMS])
def test_bad_problem_rejected(changes, fragment):
    with pytest.raises(ValueError) as err:
        validate_decode_problem(**good_problem(**changes))
    assert fragment in str(err.value)


def test_good_problems_pass():
    validate_decode_problem(**good_problem())
    validate_decode_problem(**good_problem(dtype="torch.bfloat16", max_seq_len=None))
    bt = kc.make_block_tables(LENS, 16, "shuffled", 0, num_blocks=9)
    validate_decode_problem(**good_problem(tables=bt, num_blocks=None))  # num_blocks from bt
    # padding entries past a sequence's blocks are not checked
    validate_decode_problem(**good_problem(tables=_table([0, -7, 99], [1, 2, 0])))
    for bs in kc.SUPPORTED_BLOCK_SIZES:
        validate_decode_problem(**good_problem(block_size=bs, tables=None, num_blocks=None))


def _arrays(layout, dtype="float16", nb=6, bs=16, kvh=2, heads=8, d=128, seqs=2):
    rng = np.random.default_rng(0)
    kpool = kc.random_pool(nb, bs, kvh, d, dtype, rng)
    q = kc.random_array((seqs, heads, d), dtype, rng)
    out = np.empty_like(q)
    if layout == "classic":
        k, v = kc.to_classic(kpool, kpool)
    elif layout == "vllm":
        k, v = kc.to_vllm(kpool, kpool)
    else:
        k, v = kc.to_dense(kpool, kpool, kc.make_block_tables([5, 33], bs, "identity"), [5, 33])
    return dict(q=q, k=k, v=v, out=out)


class FakeDevice:
    """Stands in for cupy.cuda.Device (duck-typed: an `id`)."""
    id = 0


class OnGPU(np.ndarray):
    """A NumPy array that claims to live on GPU 0, to test the device check without a GPU."""
    @property
    def device(self):
        return FakeDevice()


@pytest.mark.parametrize("layout", ["classic", "vllm", "dense"])
@pytest.mark.parametrize("dtype", kc.DTYPES)
def test_good_cache_arrays_pass(layout, dtype):
    validate_cache_arrays(**_arrays(layout, dtype), layout=layout, num_kv_heads=2, dtype=dtype,
                          block_size=None if layout == "dense" else 16, require_contiguous=True)


def _bad_cache_cases():
    a = _arrays("classic")
    v = _arrays("vllm")
    d = _arrays("dense")
    f32 = _arrays("vllm", "float32")
    return [
        ("layout_name", dict(v, layout="paged"), "layout='paged' is not supported; allowed: classic, vllm, dense"),
        ("q_2d", dict(v, q=v["q"][0], layout="vllm"), "q has shape (8, 128); expected 3-D"),
        ("out_shape", dict(v, out=v["out"][:1], layout="vllm"), "out has shape (1, 8, 128); expected q's shape (2, 8, 128)"),
        ("dtype_mix", dict(v, k=f32["k"], layout="vllm"), "dtypes differ"),
        ("dtype_kw", dict(v, layout="vllm", dtype="bfloat16"), "arrays have dtype float16, but dtype='bfloat16'"),
        ("unsupported_dtype", dict({n: x.astype(np.float64) for n, x in v.items()}, layout="vllm"), "dtype='float64' is not supported"),
        ("device_mix", dict(v, out=v["out"].view(OnGPU), layout="vllm"), "devices differ"),
        ("classic_wrong_x", dict(a, k=a["k"].reshape(6, 2, 8, 16, 16), layout="classic"), "classic layout: k (6, 2, 8, 16, 16)"),
        ("classic_given_vllm", dict(v, layout="classic"), "must be 5-D"),
        ("vllm_head_size", dict(v, q=v["q"][:, :, :64], out=v["out"][:, :, :64], layout="vllm"), "must both be [NB, BS, KVH, D=64]"),
        ("vllm_kv_differ", dict(v, v=v["v"][:3], layout="vllm"), "must both be"),
        ("dense_num_seqs", dict(d, q=d["q"][:1], out=d["out"][:1], layout="dense"), "[num_seqs=1, KVH, max_len, D=128]"),
        ("gqa_ratio", dict(v, q=v["q"][:, :3], out=v["out"][:, :3], layout="vllm"), "num_heads=3, cache has num_kv_heads=2"),
        ("kv_heads_kw", dict(v, layout="vllm", num_kv_heads=1), "cache has num_kv_heads=2, expected num_kv_heads=1"),
        ("block_size_kw", dict(a, layout="classic", block_size=32), "cache has block_size=16, expected block_size=32"),
        ("num_blocks_kw", dict(v, layout="vllm", num_blocks=7), "cache has num_blocks=6, expected num_blocks=7"),
        ("not_contiguous", dict(v, k=v["k"][:, :, :, ::-1].copy()[:, :, :, ::-1], layout="vllm", require_contiguous=True), "k must be C-contiguous"),
        ("not_array", dict(v, out=[1, 2], layout="vllm"), "out must be an array"),
    ]


@pytest.mark.parametrize("case", _bad_cache_cases(), ids=lambda c: c[0])
def test_bad_cache_arrays_rejected(case):
    _, kwargs, fragment = case
    with pytest.raises(ValueError) as err:
        validate_cache_arrays(**kwargs)
    assert fragment in str(err.value)


def test_device_of_duck_types():
    assert device_of(np.zeros(2)) == "cpu"
    assert device_of(np.zeros(2).view(OnGPU)) == "cuda:0"

    class TorchLike:
        class device:
            type, index = "cuda", 1
    assert device_of(TorchLike()) == "cuda:1"


def test_contiguous_range_must_stay_inside_the_pool():
    from lib.engine.validation import validate_contiguous_range

    validate_contiguous_range([0, 4], [64, 64], 16, 8)  # blocks 0..3 and 4..7 of 8: fine
    with pytest.raises(ValueError, match="sequence 1 would read blocks 4..8 of a pool of 8"):
        validate_contiguous_range([0, 4], [64, 65], 16, 8)
    with pytest.raises(ValueError, match="negative"):
        validate_contiguous_range([-1, 4], [16, 16], 16, 8)


def test_seed_protocol_pool_covers_contiguous_reads():
    import numpy as np

    from lib.engine.kvcache import make_random_block_tables
    from lib.engine.validation import validate_contiguous_range

    t = make_random_block_tables([4096, 4096], 1, 1024, np.random.default_rng(0))
    assert t.tables.max() < 1024 and t.num_blocks == 4096
    validate_contiguous_range(t.seq_start, [4096, 4096], 1, t.num_blocks)
