"""DecodeCase keeps its tables honest: a table edited after the case was built, on the host or on
the device, is a clear error before anything launches (CPU: NumPy arrays stand in for CuPy's)."""

import numpy as np
import pytest

from lib.engine import backends as B
from lib.engine import kvcache as kc


def _case(placement="shuffled", lens=(5, 33, 16)):
    p = B.DecodeProblem(num_seqs=len(lens), num_heads=4, num_kv_heads=2, head_size=64, block_size=16,
                        dtype="float16", seq_lens=lens, placement=placement)
    rng = np.random.default_rng(0)
    t = kc.make_block_tables(p.seq_lens, p.block_size, placement, rng)
    pool = lambda: kc.random_pool(t.num_blocks, 16, 2, 64, "float16", rng)  # noqa: E731
    q = kc.random_array((p.num_seqs, 4, 64), "float16", rng)
    return B.DecodeCase(p, q, pool(), pool(), t)


def test_an_untouched_case_verifies():
    case = _case()
    case.verify_tables()
    case.__dict__["device_tables"] = case.tables.tables.copy()  # a device copy made from it
    case.verify_tables()


def test_a_host_table_edited_after_the_build_is_refused():
    case = _case()
    case.tables.tables[1, 0] = case.tables.tables[1, 1]  # still in range: only the digest sees it
    with pytest.raises(ValueError, match="changed after it was built"):
        case.verify_tables()


def test_a_device_copy_that_differs_from_the_host_table_is_refused():
    case = _case()
    dev = case.tables.tables.copy()
    dev[0, 0] = 10_000  # what an illegal address would have come from
    case.__dict__["device_tables"] = dev
    with pytest.raises(ValueError, match="device_tables on the GPU no longer equals"):
        case.verify_tables()
    case.__dict__["device_tables"] = case.tables.tables.copy()
    case.__dict__["device_seq_lens"] = np.array([5, 33, 17], dtype=np.int32)
    with pytest.raises(ValueError, match="device_seq_lens"):
        case.verify_tables()


def test_a_case_made_directly_with_a_table_outside_its_pool_is_refused():
    case = _case()
    bad = case.tables.tables.copy()
    bad[2, 0] = case.kpool.shape[0]  # one past the pool
    t = kc.BlockTables(bad, case.tables.seq_start, case.tables.num_blocks, "shuffled", 16)
    direct = B.DecodeCase(case.problem, case.q, case.kpool, case.vpool, t)
    with pytest.raises(ValueError, match="out of range"):
        direct.verify_tables()


def test_every_backends_prepare_checks_the_tables_before_anything_else():
    calls = []
    fake = B.Backend("fake", "own", "vllm", "records its calls", _prepare=lambda *a, **k: calls.append(a),
                     _available=lambda: None)
    case = _case()
    case.tables.tables[0, 0] += 1
    with pytest.raises(ValueError, match="changed after it was built"):
        fake.prepare(case, np.empty((3, 4, 64), np.float16))
    assert calls == []  # nothing was prepared, let alone launched


@pytest.mark.gpu
def test_an_edited_table_never_reaches_the_own_kernel():
    """Issue 14: a block table changed after its case was built reached the kernel (illegal
    address, context lost). Now prepare refuses it, on the host and on the device."""
    import cupy

    p = B.DecodeProblem.uniform(2, 256, num_heads=8, num_kv_heads=8, head_size=128, block_size=16,
                                dtype="float16", placement="shuffled")
    case = B.DecodeCase.build(p)
    backend = B.get_backend("own-v2-paged")
    out = case.poisoned_output()
    backend.prepare(case, out)  # fine as built; the device copy now exists
    case.device_tables[0, 0] = 1 << 30
    with pytest.raises(ValueError, match="device_tables"):
        backend.prepare(case, out)
    case.device_tables[...] = cupy.asarray(case.tables.tables)
    case.tables.tables[0, 0] = 1 << 20
    with pytest.raises(ValueError, match="changed after it was built"):
        backend.prepare(case, out)
