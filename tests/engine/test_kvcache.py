"""Cache construction: placements, layouts round-trip exactly, bf16 storage, random contents."""

import numpy as np
import pytest

from lib.engine import kvcache as kc

LENS = [1, 5, 16, 17, 40]  # 1, non-multiples and an exact multiple of block sizes used below


@pytest.mark.parametrize("block_size", kc.SUPPORTED_BLOCK_SIZES)
def test_blocks_needed_is_ceil(block_size):
    lens = np.array([1, block_size, block_size + 1, 3 * block_size - 1])
    expected = [int(np.ceil(n / block_size)) for n in lens]
    assert kc.blocks_needed(lens, block_size).tolist() == expected


def test_identity_tables_are_consecutive():
    bt = kc.make_block_tables(LENS, 4, "identity")
    nb = kc.blocks_needed(LENS, 4)
    assert bt.tables.dtype == np.int32 and bt.tables.shape == (5, nb.max())
    assert bt.seq_start.tolist() == [0, 1, 3, 7, 12]
    assert bt.num_blocks == nb.sum() == 22
    for s, n in enumerate(nb):
        assert bt.tables[s, :n].tolist() == list(range(bt.seq_start[s], bt.seq_start[s] + n))
        assert (bt.tables[s, n:] == 0).all()


def test_shuffled_is_seeded_permutation_of_identity_blocks():
    a = kc.make_block_tables(LENS, 2, "shuffled", np.random.default_rng(7))
    b = kc.make_block_tables(LENS, 2, "shuffled", np.random.default_rng(7))
    c = kc.make_block_tables(LENS, 2, "shuffled", np.random.default_rng(8))
    ident = kc.make_block_tables(LENS, 2, "identity")
    nb = kc.blocks_needed(LENS, 2)
    used = np.concatenate([a.tables[s, :n] for s, n in enumerate(nb)])
    assert sorted(used.tolist()) == list(range(nb.sum()))  # each block exactly once
    assert np.array_equal(a.tables, b.tables)
    assert not np.array_equal(a.tables, c.tables)
    assert not np.array_equal(a.tables, ident.tables)
    assert np.array_equal(a.seq_start, ident.seq_start)
    for s, n in enumerate(nb):
        assert (a.tables[s, n:] == 0).all()


def test_single_content_tables_equal_identity_and_num_blocks_rules():
    ident = kc.make_block_tables(LENS, 8, "identity")
    single = kc.make_block_tables(LENS, 8, "single_content")
    assert np.array_equal(ident.tables, single.tables)
    assert kc.make_block_tables(LENS, 8, "identity", num_blocks=100).num_blocks == 100
    with pytest.raises(ValueError, match="too small"):
        kc.make_block_tables(LENS, 8, "identity", num_blocks=3)
    with pytest.raises(ValueError, match="placement"):
        kc.make_block_tables(LENS, 8, "scattered")


def test_random_tables_follow_seed_protocol():
    bt = kc.make_random_block_tables([64, 33], 16, 5, np.random.default_rng(0))
    assert bt.tables.dtype == np.int32 and bt.tables.shape == (2, 4)
    assert bt.tables.min() >= 0 and bt.tables.max() < 5
    assert bt.tables[1, 3] == 0  # past the 3 blocks of sequence 1
    many = kc.make_random_block_tables([16 * 40], 16, 5, np.random.default_rng(1))
    assert sorted(np.unique(many.tables).tolist()) == [0, 1, 2, 3, 4]  # drawn with replacement
    again = kc.make_random_block_tables([64, 33], 16, 5, np.random.default_rng(0))
    assert np.array_equal(bt.tables, again.tables)


@pytest.mark.parametrize("dtype", kc.DTYPES)
def test_random_pool_values_and_seeding(dtype):
    pool = kc.random_pool(6, 4, 2, 16, dtype, np.random.default_rng(1))
    assert pool.shape == (6, 4, 2, 16) and pool.dtype == kc.storage_dtype(dtype)
    f = kc.as_float64(pool, dtype)
    assert f.min() >= -1 and f.max() <= 1 and (f != 0).all()
    assert f.min() < -0.9 and f.max() > 0.9  # really spans [-1, 1]
    assert np.array_equal(pool, kc.random_pool(6, 4, 2, 16, dtype, np.random.default_rng(1)))
    assert not np.array_equal(pool[0], pool[1])


def test_random_array_chunks_do_not_repeat():
    a = kc.random_array((4, 10), "float32", 3, chunk_elements=7)
    assert len(np.unique(a)) == a.size


@pytest.mark.parametrize("dtype", kc.DTYPES)
def test_single_content_pool_blocks_identical(dtype):
    pool = kc.random_pool(5, 8, 2, 64, dtype, np.random.default_rng(2), single_content=True)
    for b in range(1, 5):
        assert np.array_equal(pool[b], pool[0])
    assert not np.array_equal(pool[0, 0], pool[0, 1])  # tokens inside a block differ


def test_bf16_encode_matches_round_to_nearest_even():
    cases = np.array([1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 3.14159, 1e-30,
                      np.inf, -np.inf], dtype=np.float32)
    # 1+2^-8 is halfway between 1 and 1+2^-7: ties to even → 1; 1+3*2^-8 → 1+2^-6
    expected = np.array([1.0, -2.5, 1.0, 1 + 2**-6, 1 + 2**-7, 3.140625, 1e-30, np.inf, -np.inf])
    bits = kc.float32_to_bf16_bits(cases)
    assert bits.dtype == np.uint16
    got = kc.as_float64(bits, "bfloat16")
    assert np.array_equal(got[:6], expected[:6])
    assert abs(got[6] - 1e-30) / 1e-30 < 2**-8
    assert np.array_equal(got[7:], expected[7:])
    assert np.isnan(kc.as_float64(kc.float32_to_bf16_bits(np.array([np.nan], np.float32)), "bfloat16")).all()


def test_bf16_relative_accuracy_on_random_values():
    x = np.random.default_rng(4).uniform(-1, 1, 100_000).astype(np.float32)
    y = kc.as_float64(kc.to_storage(x, "bfloat16"), "bfloat16")
    rel = np.abs(y - x) / np.abs(x)
    assert rel.max() <= 2.0**-8  # unit roundoff of an 8-bit significand (7 stored + implicit)
    assert rel.max() > 2.0**-9  # and it really rounds to 8 bits (not a float32 pass-through)
    # decoding is exact: re-encoding the decoded values gives the same bits
    assert np.array_equal(kc.to_storage(y, "bfloat16"), kc.to_storage(x, "bfloat16"))


def test_as_float64_rejects_mismatched_storage():
    with pytest.raises(ValueError, match="uint16"):
        kc.as_float64(np.zeros(3, np.float16), "bfloat16")
    with pytest.raises(ValueError, match="dtype"):
        kc.as_float64(np.zeros(3, np.int8))


def _logical(pool, bt, lens):
    return [kc.gather_sequence(pool, bt, n, s) for s, n in enumerate(lens)]


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_classic_round_trip_exact(dtype, block_size):
    kpool = kc.random_pool(7, block_size, 2, 64, dtype, np.random.default_rng(5))
    vpool = kc.random_pool(7, block_size, 2, 64, dtype, np.random.default_rng(6))
    k, v = kc.to_classic(kpool, vpool)
    x = 16 // kpool.dtype.itemsize
    assert k.shape == (7, 2, 64 // x, block_size, x) and v.shape == (7, 2, 64, block_size)
    assert k.flags.c_contiguous and v.flags.c_contiguous
    # element-level meaning of the layout, one spot check
    b, t, h, d = 3, block_size - 1, 1, 37
    assert k[b, h, d // x, t, d % x] == kpool[b, t, h, d]
    assert v[b, h, d, t] == vpool[b, t, h, d]
    k2, v2 = kc.from_classic(k, v)
    assert np.array_equal(k2, kpool) and np.array_equal(v2, vpool)


@pytest.mark.parametrize("placement", kc.PLACEMENTS)
@pytest.mark.parametrize("layout", ["classic", "vllm", "dense"])
def test_logical_physical_round_trip(placement, layout):
    rng = np.random.default_rng(9)
    lens, bs, kvh, d = LENS, 4, 2, 64
    bt = kc.make_block_tables(lens, bs, placement, rng, num_blocks=25)
    single = placement == "single_content"
    kpool = kc.random_pool(bt.num_blocks, bs, kvh, d, "float16", rng, single_content=single)
    vpool = kc.random_pool(bt.num_blocks, bs, kvh, d, "float16", rng, single_content=single)
    want_k, want_v = _logical(kpool, bt, lens), _logical(vpool, bt, lens)
    # the logical content really is what the table says, token by token
    s, t = 3, 13
    assert np.array_equal(want_k[s][t], kpool[bt.tables[s, t // bs], t % bs])
    if layout == "classic":
        k2, v2 = kc.from_classic(*kc.to_classic(kpool, vpool))
        got_k, got_v = _logical(k2, bt, lens), _logical(v2, bt, lens)
    elif layout == "vllm":
        k2, v2 = kc.to_vllm(kpool, vpool)
        assert k2 is kpool and v2 is vpool
        got_k, got_v = _logical(k2, bt, lens), _logical(v2, bt, lens)
    else:
        kd, vd = kc.to_dense(kpool, vpool, bt, lens)
        assert kd.shape == (5, kvh, max(lens), d)
        for s, n in enumerate(lens):
            assert (kd[s, :, n:] == 0).all() and (vd[s, :, n:] == 0).all()
        got_k = [kd[s, :, :n].transpose(1, 0, 2) for s, n in enumerate(lens)]
        got_v = [vd[s, :, :n].transpose(1, 0, 2) for s, n in enumerate(lens)]
        # and back into a fresh pool through the same tables
        k3, v3 = kc.dense_to_pool(kd, vd, bt, lens, bt.num_blocks)
        assert all(np.array_equal(a, b) for a, b in zip(_logical(k3, bt, lens), want_k))
        assert all(np.array_equal(a, b) for a, b in zip(_logical(v3, bt, lens), want_v))
    for a, b in zip(got_k + got_v, want_k + want_v):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_shuffled_and_identity_hold_same_logical_content_after_relabel():
    """Writing the same logical sequences through shuffled tables moves blocks, not content."""
    lens, bs = [9, 30], 8
    ident = kc.make_block_tables(lens, bs, "identity")
    shuf = kc.make_block_tables(lens, bs, "shuffled", 11)
    kpool = kc.random_pool(ident.num_blocks, bs, 1, 64, "float32", 0)
    kd, vd = kc.to_dense(kpool, kpool, ident, lens)
    k_sh, _ = kc.dense_to_pool(kd, vd, shuf, lens, shuf.num_blocks)
    assert not np.array_equal(k_sh, kpool)
    kd2, _ = kc.to_dense(k_sh, k_sh, shuf, lens)
    assert np.array_equal(kd2, kd)


def test_byte_counts():
    assert kc.cache_bytes([4096], 8, 128, 2) == 2 * 4096 * 8 * 128 * 2
    assert kc.cache_bytes([3, 5], 2, 64, "float32") == 2 * 8 * 2 * 64 * 4
    assert kc.decode_bytes([3, 5], 8, 2, 64, "bfloat16") == 2 * 8 * 2 * 64 * 2 + 2 * 2 * 8 * 64 * 2
