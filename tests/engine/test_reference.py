"""The float64 reference against textbook attention, and the error metric."""

import math

import numpy as np
import pytest

from lib.engine import kvcache as kc
from lib.engine.reference import decode_attention_reference, dense_attention, relative_error

LENS = [1, 7, 16, 33]  # length 1, non-multiples of the block size, an exact multiple


def _problem(num_heads, num_kv_heads, dtype, block_size=4, head_size=64, lens=LENS,
             placement="shuffled", seed=0, num_blocks=80):
    rng = np.random.default_rng(seed)
    bt = kc.make_block_tables(lens, block_size, placement, rng, num_blocks=num_blocks)
    kpool = kc.random_pool(bt.num_blocks, block_size, num_kv_heads, head_size, dtype, rng)
    vpool = kc.random_pool(bt.num_blocks, block_size, num_kv_heads, head_size, dtype, rng)
    q = kc.random_array((len(lens), num_heads, head_size), dtype, rng)
    return q, kpool, vpool, bt


def _textbook(q, kpool, vpool, bt, lens, dtype, scale=None):
    ks = [kc.as_float64(kc.gather_sequence(kpool, bt, n, s), dtype) for s, n in enumerate(lens)]
    vs = [kc.as_float64(kc.gather_sequence(vpool, bt, n, s), dtype) for s, n in enumerate(lens)]
    return dense_attention(kc.as_float64(q, dtype), ks, vs, scale=scale)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)], ids=["MHA", "GQA4to1", "MQA"])
def test_reference_matches_textbook(heads, dtype):
    q, kpool, vpool, bt = _problem(*heads, dtype)
    ref = decode_attention_reference(q, kpool, vpool, bt, LENS, dtype_name=dtype)
    assert ref.dtype == np.float64 and ref.shape == q.shape
    want = _textbook(q, kpool, vpool, bt, LENS, dtype)
    assert relative_error(ref, want) < 1e-13
    # a length-1 sequence returns its single value row (softmax over one token is 1)
    group = heads[0] // heads[1]
    v0 = kc.as_float64(kc.gather_sequence(vpool, bt, 1, 0), dtype)[0]
    assert np.allclose(ref[0], np.repeat(v0, group, axis=0), rtol=0, atol=1e-15)


def test_dtype_inferred_from_storage():
    q, kpool, vpool, bt = _problem(4, 2, "bfloat16")
    a = decode_attention_reference(q, kpool, vpool, bt, LENS)  # uint16 → bfloat16
    b = decode_attention_reference(q, kpool, vpool, bt.tables, LENS, dtype_name="bfloat16")
    assert np.array_equal(a, b)


def test_gqa_heads_read_their_own_kv_head():
    q, kpool, vpool, bt = _problem(8, 2, "float32")
    ref = decode_attention_reference(q, kpool, vpool, bt, LENS)
    # heads 0-3 use kv head 0, 4-7 kv head 1: recompute head 5 as MHA over kv head 1 alone
    one = decode_attention_reference(q[:, 5:6], kpool[:, :, 1:2], vpool[:, :, 1:2], bt, LENS)
    assert np.array_equal(ref[:, 5:6], one)
    other = decode_attention_reference(q[:, 5:6], kpool[:, :, 0:1], vpool[:, :, 0:1], bt, LENS)
    assert not np.allclose(ref[:, 5:6], other)


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_only_own_tokens_count(block_size):
    """Data past a sequence's length (rest of its last block) must not change the output."""
    lens = [5, 70]
    q, kpool, vpool, bt = _problem(4, 4, "float32", block_size=block_size, lens=lens,
                                   placement="identity")
    ref = decode_attention_reference(q, kpool, vpool, bt, lens)
    k2 = kpool.copy()
    last = bt.tables[0, (lens[0] - 1) // block_size]
    k2[last, (lens[0] - 1) % block_size + 1:] = 50.0  # no-op when the block is full
    k2[bt.num_blocks - 1] = 50.0  # an unused block
    assert np.array_equal(decode_attention_reference(q, k2, vpool, bt, lens), ref)
    k2[bt.tables[1, 0], 0] = 50.0  # a used token does change it
    assert not np.allclose(decode_attention_reference(q, k2, vpool, bt, lens)[1], ref[1])


def test_scale_and_stability():
    q, kpool, vpool, bt = _problem(4, 2, "float32")
    ref = decode_attention_reference(q, kpool, vpool, bt, LENS, scale=0.3)
    assert relative_error(ref, _textbook(q, kpool, vpool, bt, LENS, "float32", scale=0.3)) < 1e-13
    assert not np.allclose(ref, decode_attention_reference(q, kpool, vpool, bt, LENS))
    # scores of ~1e4 overflow exp() in the textbook form; the reference stays finite and the
    # output collapses to the value row of the top-scoring token
    big = decode_attention_reference(q, kpool, vpool, bt, LENS, scale=1e3)
    assert np.isfinite(big).all()
    k = kc.gather_sequence(kpool, bt, LENS[3], 3).astype(np.float64)
    v = kc.gather_sequence(vpool, bt, LENS[3], 3).astype(np.float64)
    top = np.argmax(k[:, 0] @ q[3, 0].astype(np.float64))
    assert np.allclose(big[3, 0], v[top, 0], atol=1e-6)


def test_reference_rejects_inconsistent_inputs():
    q, kpool, vpool, bt = _problem(6, 4, "float32")
    with pytest.raises(ValueError, match="num_kv_heads"):
        decode_attention_reference(q, kpool, vpool, bt, LENS)
    q, kpool, vpool, bt = _problem(4, 2, "float32")
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention_reference(q, kpool, vpool, bt, LENS[:2])


def test_relative_error():
    ref = np.array([[3.0, 4.0]])
    assert relative_error(ref, ref) == 0.0
    assert relative_error(np.array([[3.0, 4.5]]), ref) == pytest.approx(0.1)
    assert relative_error(np.array([[np.nan, 4.0]]), ref) == math.inf
    assert relative_error(np.array([[np.inf, 4.0]]), ref) == math.inf
    assert relative_error(np.zeros((1, 2)), np.zeros((1, 2))) == 0.0
    assert relative_error(np.ones((1, 2)), np.zeros((1, 2))) == math.inf
    with pytest.raises(ValueError, match="shape"):
        relative_error(np.ones(3), np.ones(2))
    # storage forms are decoded: bf16 bits, float16
    bits = kc.to_storage(ref, "bfloat16")
    assert bits.dtype == np.uint16 and relative_error(bits, ref) == 0.0
    assert relative_error(ref.astype(np.float16), ref) == 0.0
    assert relative_error(np.full((1, 2), 0x7FC0, np.uint16), ref) == math.inf  # bf16 NaN


def test_the_reference_reads_the_pool_on_its_own(monkeypatch):
    """SDPA's input (kvcache.to_dense) goes through gather_sequence; a bug there must not also be
    in the answer SDPA is checked against: the reference shares no code with it."""
    from lib.engine import reference as Ref

    q, kpool, vpool, bt = _problem(8, 2, "float16", block_size=16, placement="shuffled")
    want = decode_attention_reference(q, kpool, vpool, bt, LENS)
    for s, n in enumerate(LENS):  # two independent addressings agree
        assert np.array_equal(Ref.token_rows(kpool, bt.tables, n, s), kc.gather_sequence(kpool, bt, n, s))

    def broken(pool, tables, seq_len, s, *, xp=np):
        raise AssertionError("the reference used gather_sequence")

    monkeypatch.setattr(kc, "gather_sequence", broken)
    assert np.array_equal(decode_attention_reference(q, kpool, vpool, bt, LENS), want)
    # ... and a dense input built wrongly (a shifted table) is caught against it
    wrong = bt.tables.copy()
    wrong[3] = np.roll(wrong[3], 1)
    assert relative_error(decode_attention_reference(q, kpool, vpool, wrong, LENS), want) > 1e-3


def test_the_reference_refuses_tables_outside_the_pool():
    from lib.engine import reference as Ref

    q, kpool, vpool, bt = _problem(4, 4, "float32", block_size=4)
    bad = bt.tables.copy()
    bad[3, 0] = kpool.shape[0]
    with pytest.raises(ValueError, match="outside the pool"):
        Ref.token_rows(kpool, bad, LENS[3], 3)
    with pytest.raises(ValueError, match="needs"):
        Ref.token_rows(kpool, bt.tables[:, :1], LENS[3], 3)
