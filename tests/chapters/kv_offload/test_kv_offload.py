"""KV offload: fraction -> host blocks, block residency, the split pool over the VMM API
(:mod:`lib.engine.vmm`), the analysis and the chapter's code on synthetic rows (CPU); one tiny
point per mode on a GPU (marked ``gpu``)."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lib import catalog
from lib import ROOT
from lib.harness import experiments as E
from lib.chapters.kv_offload import measure as K
from lib.chapters.kv_offload import residency as KR
from lib.engine import memory as M
from lib.harness import results as R
from lib.engine import vmm
from lib.engine.vmm import VmmDriverError

from tests.engine.fakes_vmm import FakeVmmDriver

G = 2 << 20
MiB = 1 << 20


# ----------------------------------------------------------------------------- fractions

def test_fraction_splits_of_the_grid():
    assert [K.host_blocks_per_seq(256, f) for f in K.FRACTIONS] == [0, 4, 8, 16, 32, 64, 128, 256]
    assert [K.fraction_label(f) for f in K.FRACTIONS] == ["0", "1/64", "1/32", "1/16", "1/8", "1/4",
                                                          "1/2", "1"]


@pytest.mark.parametrize("n, f, k", [
    (30, 0.1, 3),        # 0.1 * 30 is 3.0000000000000004 in floats: still 3 blocks
    (10, 0.25, 3),       # 2.5 rounds up
    (7, 0.5, 4),
    (100, 1e-9, 1),      # any f > 0 moves at least one block
    (5, 1, 5), (5, 0, 0), (1, 0.5, 1), (3, 2 / 3, 2), (64, 1 / 64, 1), (63, 1 / 64, 1),
])
def test_fraction_rounding(n, f, k):
    assert K.host_blocks_per_seq(n, f) == k


@pytest.mark.parametrize("bad", [-0.01, 1.0000001, 2, float("nan"), float("inf"), -float("inf"),
                                 True, "0.5", None, [0.5]])
def test_fraction_outside_unit_interval_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="fraction"):
        K.check_fraction(bad)
    with pytest.raises(ValueError, match="fraction"):
        K.host_blocks_per_seq(16, bad)
    with pytest.raises(ValueError, match="fraction"):
        K.OffloadPlan(2, 64, 16, 256, bad)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_blocks_per_seq_must_be_positive(n):
    with pytest.raises(ValueError, match="blocks_per_seq"):
        K.host_blocks_per_seq(n, 0.5)


def test_fraction_label_falls_back_to_decimals():
    assert K.fraction_label(0.3) == "3/10" and K.fraction_label(1 / 3) == "1/3"
    assert K.fraction_label(0.123456789) == "0.123457"


# ----------------------------------------------------------------------------- block residency

def test_host_block_mask_counts_and_patterns():
    for n in (1, 7, 16, 1000):
        for f in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
            want = int(np.floor(f * n + 0.5))
            for pattern in ("tail", "head", "spread", "random"):
                m = KR.host_block_mask(n, f, pattern=pattern, seed=3)
                assert m.dtype == bool and m.shape == (n,)
                assert int(m.sum()) == want, (n, f, pattern)
    tail = KR.host_block_mask(10, 0.3)
    assert list(np.flatnonzero(tail)) == [7, 8, 9]
    assert list(np.flatnonzero(KR.host_block_mask(10, 0.3, pattern="head"))) == [0, 1, 2]
    assert not KR.host_block_mask(10, 0.0).any() and KR.host_block_mask(10, 1.0).all()


def test_spread_mask_is_even():
    m = KR.host_block_mask(100, 0.25, pattern="spread")
    idx = np.flatnonzero(m)
    assert len(idx) == 25 and set(np.diff(idx)) == {4}
    # every prefix holds its share, rounded
    for k in range(1, 101):
        assert abs(int(m[:k].sum()) - 0.25 * k) <= 0.5 + 1e-9


def test_random_mask_is_seeded():
    a = KR.host_block_mask(64, 0.5, pattern="random", seed=1)
    assert (a == KR.host_block_mask(64, 0.5, pattern="random", seed=1)).all()
    assert (a != KR.host_block_mask(64, 0.5, pattern="random", seed=2)).any()


@pytest.mark.parametrize("n,f,pattern", [(0, 0.5, "tail"), (-3, 0.5, "tail"), (2.0, 0.5, "tail"),
                                         (10, -0.1, "tail"), (10, 1.1, "tail"), (10, float("nan"), "tail"),
                                         (10, 0.5, "middle"), (True, 0.5, "tail"), (10, True, "tail")])
def test_host_block_mask_validates(n, f, pattern):
    with pytest.raises(ValueError):
        KR.host_block_mask(n, f, pattern=pattern)


def test_block_runs():
    assert KR.block_runs([]) == []
    assert KR.block_runs([True]) == [(0, 1, True)]
    assert KR.block_runs([False, False, True, True, False]) == [(0, 2, False), (2, 4, True), (4, 5, False)]
    m = KR.host_block_mask(37, 0.3, pattern="random", seed=0)
    runs = KR.block_runs(m)
    assert runs[0][0] == 0 and runs[-1][1] == 37
    assert all(a[1] == b[0] and a[2] != b[2] for a, b in zip(runs, runs[1:]))
    assert sum(b - a for a, b, h in runs if h) == int(m.sum())


def test_residency_summary():
    r = KR.Residency(num_blocks=8, host_blocks=2, block_bytes=1024, runs=2)
    assert r.host_bytes == 2048 and r.host_fraction == 0.25




@pytest.mark.gpu
def test_block_residency_on_a_managed_pool():
    import cupy as cp

    dev = cp.cuda.runtime.getDevice()
    block = 2 * MiB // 2  # float16 elements per 2 MiB block
    pool = M.allocate((8, block), "float16", "managed_gpu")
    pool[...] = cp.arange(8, dtype=cp.float16)[:, None]
    mask = KR.host_block_mask(8, 0.25)  # blocks 6 and 7
    r = KR.apply_block_residency(pool, mask)
    assert (r.num_blocks, r.host_blocks, r.block_bytes, r.runs) == (8, 2, 2 * MiB, 2)
    host = M.range_info(pool, offset=6 * 2 * MiB, nbytes=4 * MiB)
    assert host.preferred_location == "host" and f"gpu:{dev}" in host.accessed_by
    assert host.last_prefetch_location == "host"
    gpu = M.range_info(pool, nbytes=6 * 2 * MiB)
    assert gpu.preferred_location == f"gpu:{dev}" and gpu.accessed_by == ()
    assert gpu.last_prefetch_location == f"gpu:{dev}"
    assert (pool.sum(axis=1, dtype=cp.float32).get() == np.arange(8) * block).all()  # data survived
    with pytest.raises(ValueError, match="managed pool"):
        KR.apply_block_residency(M.allocate((8, 16), "uint8", "pinned"), mask)
    with pytest.raises(ValueError, match="entries"):
        KR.apply_block_residency(pool, mask[:4])


# ----------------------------------------------------------------------------- the plan

MHA_TOKEN = 32 * 128 * 2
GQA_TOKEN = 8 * 128 * 2


@pytest.mark.parametrize("token_bytes", [MHA_TOKEN, GQA_TOKEN])
@pytest.mark.parametrize("f", K.FRACTIONS)
def test_plan_tables_put_the_oldest_blocks_in_the_host_region(token_bytes, f):
    p = K.OffloadPlan(32, 4096, 16, token_bytes, f)
    t = p.tables()
    n, k, H = p.blocks_per_seq, p.host_per_seq, p.host_region_blocks
    assert t.shape == (32, n) and t.dtype == np.int32
    assert (t[:, :k] < H).all() and (t[:, k:] >= H).all()
    assert len(np.unique(t)) == t.size and t.max() < p.num_blocks  # every block used once
    assert p.host_region_bytes % K.ALIGN_BYTES == 0 and p.device_region_bytes % K.ALIGN_BYTES == 0
    assert p.host_mask().sum() == H and p.host_mask()[:H].all()
    assert p.host_kv_bytes + p.device_kv_bytes == 2 * 32 * 4096 * token_bytes
    assert p.host_kv_bytes == round(f * 2 * 32 * 4096 * token_bytes)  # exact on this grid
    assert math.isclose(p.host_fraction, f)
    if 0 < f < 1:  # this grid needs no padding: the regions hold exactly the blocks used
        assert H == 32 * k and p.num_blocks == 32 * n


def test_plan_block_tables_validate_and_pad_odd_sizes():
    from lib.engine.validation import validate_decode_problem

    p = K.OffloadPlan(3, 100, 16, 3 * 96, 0.3)  # 7 blocks per sequence, 3 on the host, odd bytes
    assert (p.blocks_per_seq, p.host_per_seq) == (7, 3)
    assert p.host_region_blocks % p.align_blocks == 0 and p.host_region_blocks >= 9
    assert (p.align_blocks * p.block_bytes) % K.ALIGN_BYTES == 0
    bt = p.block_tables()
    validate_decode_problem(num_seqs=3, num_heads=3, num_kv_heads=3, head_size=96, block_size=16,
                            dtype="float16", seq_lens=np.full(3, 100), tables=bt)
    assert bt.num_blocks == p.num_blocks and bt.placement == "offload"
    full = K.OffloadPlan(3, 100, 16, 3 * 96, 1.0)
    assert full.host_tokens == 300 and full.device_kv_bytes == 0 and full.device_region_blocks == 0


def test_plan_for_problem_needs_uniform_lengths():
    from lib.engine import backends as B

    prob = B.DecodeProblem(num_seqs=2, num_heads=4, num_kv_heads=4, head_size=128, block_size=16,
                           dtype="float16", seq_lens=(64, 80))
    with pytest.raises(ValueError, match="one length"):
        K.OffloadPlan.for_problem(prob, 0.5)
    uni = B.DecodeProblem.uniform(2, 64, num_heads=4, num_kv_heads=2, head_size=128, block_size=16,
                                  dtype="float16")
    assert K.OffloadPlan.for_problem(uni, 0.5).token_bytes == 2 * 128 * 2


# ----------------------------------------------------------------------------- split mapping

class HostFake(FakeVmmDriver):
    """The fake VMM driver plus host-located handles (what CudaVmmDriver gained for kv_offload)."""

    def __init__(self, granularity=G, host_granularity=G):
        super().__init__(granularity)
        self._host_gran = host_granularity
        self.host_handles: set = set()

    def host_granularity(self) -> int:
        return self._host_gran

    def create_host_handle(self, size: int):
        h = self.create_handle(size, 0)
        self.host_handles.add(h)
        return h


def test_split_mapping_maps_host_then_device_and_frees_everything():
    drv = HostFake()
    m = vmm.SplitMapping(drv, 3 * G, 2 * G)
    assert drv.calls["create_handle"] == 2 and len(drv.host_handles) == 1
    host_h = next(iter(drv.host_handles))
    assert drv.mappings[m.va]["handle"] == host_h and drv.mappings[m.va]["size"] == 3 * G
    assert drv.mappings[m.va + 3 * G]["handle"] not in drv.host_handles
    assert all(drv.is_accessible(m.va + off) for off in (0, 3 * G - 1, 3 * G, 5 * G - 1))
    m.close()
    m.close()  # idempotent
    assert m.closed and drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}


def test_split_mapping_without_host_part_needs_no_host_memory():
    drv = FakeVmmDriver(G)  # no create_host_handle at all
    m = vmm.SplitMapping(drv, 0, 2 * G)
    assert drv.calls["create_handle"] == 1
    m.close()
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}


@pytest.mark.parametrize("host, dev, match", [
    (G + 4096, G, "host_bytes"), (G, 100, "device_bytes"), (0, 0, "at least one byte"),
    (-G, G, "host_bytes"), (G, 1.5, "device_bytes"),
])
def test_split_mapping_bad_sizes(host, dev, match):
    drv = HostFake()
    with pytest.raises(ValueError, match=match):
        vmm.SplitMapping(drv, host, dev)
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}


def test_split_mapping_uses_the_coarser_granularity():
    drv = HostFake(granularity=G, host_granularity=2 * G)
    with pytest.raises(ValueError, match="granularity"):
        vmm.SplitMapping(drv, 3 * G, G)
    vmm.SplitMapping(drv, 2 * G, 2 * G).close()


@pytest.mark.parametrize("op, nth", [("map", 1), ("map", 2), ("set_access", 1), ("set_access", 2),
                                     ("create_handle", 2)])
def test_split_mapping_rolls_back_a_failure(op, nth):
    drv = HostFake()
    drv.inject_failure(op, nth)
    with pytest.raises(VmmDriverError):
        vmm.SplitMapping(drv, G, G)
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}


def test_split_allocator_puts_the_first_blocks_on_the_host(monkeypatch):
    captured = {}
    monkeypatch.setattr(vmm, "cupy_view", lambda ptr, nbytes, dtype, shape, owner, device:
                        captured.update(ptr=ptr, nbytes=nbytes, shape=shape, owner=owner))
    drv = HostFake()
    alloc = vmm.split_allocator(drv, 128)  # 128 blocks of 16 KiB = 2 MiB on the host
    alloc((256, 4, 16, 16, 8), "float16")
    m = captured["owner"]
    assert (m.host_bytes, m.device_bytes, captured["nbytes"]) == (G, G, 2 * G)
    with pytest.raises(ValueError, match="fewer than 128 blocks"):
        alloc((64, 4, 16, 16, 8), "float16")
    with pytest.raises(ValueError, match="host_blocks"):
        vmm.split_allocator(drv, -1)


# ----------------------------------------------------------------------------- CudaVmmDriver's host memory

class _R:  # CUresult stand-in
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1


class HostBindings:
    """A stand-in for cuda.bindings.driver that accepts only the host locations in ``works``."""

    CUresult = _R
    CUmemAllocationType = SimpleNamespace(CU_MEM_ALLOCATION_TYPE_PINNED=1)
    CUmemLocationType = SimpleNamespace(CU_MEM_LOCATION_TYPE_DEVICE=1, CU_MEM_LOCATION_TYPE_HOST=2,
                                        CU_MEM_LOCATION_TYPE_HOST_NUMA=3)
    CUmemAllocationGranularity_flags = SimpleNamespace(CU_MEM_ALLOC_GRANULARITY_MINIMUM=0)
    CUdevice_attribute = SimpleNamespace(CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID=134)

    def __init__(self, works=(2, 3), numa=-1):
        self.works, self.numa = set(works), numa
        self.created, self.released = [], []

    def CUmemAllocationProp(self):
        return SimpleNamespace(type=0, location=SimpleNamespace(type=0, id=-9))

    def cuInit(self, flags):
        return (_R.CUDA_SUCCESS,)

    def cuDeviceGet(self, ordinal):
        return (_R.CUDA_SUCCESS, ordinal)

    def cuDevicePrimaryCtxRetain(self, dev):
        return (_R.CUDA_SUCCESS, 0xC0)

    def cuDevicePrimaryCtxRelease(self, dev):
        return (_R.CUDA_SUCCESS,)

    def cuCtxGetCurrent(self):
        return (_R.CUDA_SUCCESS, 0xC0)

    def cuCtxSetCurrent(self, ctx):
        return (_R.CUDA_SUCCESS,)

    def cuDeviceGetAttribute(self, attr, dev):
        return (_R.CUDA_SUCCESS, self.numa)

    def cuMemGetAllocationGranularity(self, prop, option):
        return (_R.CUDA_SUCCESS, G)

    def cuMemCreate(self, size, prop, flags):
        if prop.location.type not in self.works:
            return (_R.CUDA_ERROR_INVALID_VALUE,)
        self.created.append((size, prop.location.type, prop.location.id))
        return (_R.CUDA_SUCCESS, len(self.created))

    def cuMemRelease(self, handle):
        self.released.append(handle)
        return (_R.CUDA_SUCCESS,)


@pytest.mark.parametrize("works, numa, loc, loc_id", [
    ((2, 3), 1, "host_numa", 1),    # the GPU's host NUMA node
    ((2, 3), -1, "host_numa", 0),   # no NUMA: id 0, as the API asks
    ((2,), -1, "host", 0),          # only "any host memory" works
])
def test_cuda_driver_host_location_probe(monkeypatch, works, numa, loc, loc_id):
    b = HostBindings(works, numa)
    monkeypatch.setattr(vmm, "_driver_module", lambda: b)
    d = vmm.CudaVmmDriver(0)
    assert d.host_location() == loc and d.host_granularity() == G
    assert b.released == [1]  # the probe gave its allocation back
    d.create_host_handle(4 * G)
    assert b.created[-1] == (4 * G, {"host_numa": 3, "host": 2}[loc], loc_id)
    d.host_location()
    assert len(b.created) == 2  # probed once


def test_cuda_driver_host_location_unsupported_names_every_failure(monkeypatch):
    b = HostBindings(works=())
    monkeypatch.setattr(vmm, "_driver_module", lambda: b)
    d = vmm.CudaVmmDriver(0)
    with pytest.raises(VmmDriverError, match="host_numa: .*host: ") as e:
        d.host_location()
    assert e.value.code == "HOST_LOCATION_UNSUPPORTED"
    with pytest.raises(VmmDriverError):
        d.create_host_handle(G)


# ----------------------------------------------------------------------------- experiment and gates

def test_experiment_is_registered_with_the_issue_grid():
    exp = catalog.get("kv_offload")
    assert exp.chapter == "chapters/kv_offload.md" and exp.measure == "lib.chapters.kv_offload.measure:measure_point"
    assert exp.prepare == "lib.engine.measure:precompile_points"
    pts = E.expand(exp)
    dec = [p for p in pts if p["measurement"] == "decode"]
    yard = [p for p in pts if p["measurement"] == "yardstick"]
    assert len(dec) == len(K.MODES) * len(K.FRACTIONS) * len(K.HEADS) and len(yard) == 2
    assert {(p["num_heads"], p["num_kv_heads"]) for p in dec} == {(32, 32), (32, 8)}
    assert {p["fraction"] for p in dec} == set(K.FRACTIONS)
    assert all(p["batch_size"] == 32 and p["seq_len"] == 4096 and p["block_size"] == 16 for p in dec)
    assert {p["nbytes"] for p in yard} == {K.YARDSTICK_BYTES}
    assert set(K.MODES) == {m for m, _ in K.VARIANTS.values()} and set(K.VARIANTS) == set(K.POOL)
    assert {kind for kind, _ in K.POOL.values()} <= set(M.KINDS)  # memory_kind holds memory kinds only
    # the prepare hook reads only decode points' shapes (yardstick points have none)
    assert all("own-" not in str(p.get("backends", "")) for p in yard)


def _point(**kw):
    p = dict(E.expand(catalog.get("kv_offload"))[2])
    p.update(kw)
    return p


@pytest.mark.parametrize("point, match", [
    ({"measurement": "nope"}, "measurement"),
    ({"mode": "swap"}, "mode"),
    ({"fraction": 1.5}, "fraction"),
    ({"fraction": float("nan")}, "fraction"),
    ({"backends": "own-auto-paged+no-such-kernel"}, "unknown backend"),
])
def test_measure_point_rejects_bad_points_before_any_gpu_work(monkeypatch, point, match):
    def no_gpu():
        raise AssertionError("reached the GPU")

    monkeypatch.setattr("lib.engine.gpu.require_gpu", no_gpu)
    with pytest.raises(ValueError, match=match):
        K.measure_point(_point(**point))


@pytest.mark.parametrize("opt_in", [False, None, 1, "yes"])
def test_oversubscription_refuses_without_the_explicit_opt_in(monkeypatch, opt_in):
    import lib.engine.gpu

    monkeypatch.setattr(lib.engine.gpu, "require_gpu", lambda: (_ for _ in ()).throw(AssertionError("GPU")))
    with pytest.raises(M.OversubscriptionRefused, match="allow_oversubscription=True"):
        K.run_oversubscribed(allow_oversubscription=opt_in)


# ----------------------------------------------------------------------------- synthetic rows

from lib.chapters.kv_offload import figures as F  # noqa: E402  (matplotlib only for the analysis tests)

RATES = {"remote": 20.0, "zero_copy": 25.0, "zero_copy_hostalloc": 25.0, "migrate_first": 8.0,
         "prefetch_serial": 40.0, "overlap": 45.0, "explicit_copy": 50.0}
T0 = {(32, 32): 700.0, (32, 8): 200.0}
YARD = {("memcpy", "pinned", "h2d"): 55.0, ("memcpy", "pinned", "d2h"): 52.0,
        ("prefetch", "managed", "h2d"): 45.0, ("prefetch", "managed", "d2h"): 40.0}
SLUG = "h100-fake"


def fake_rows(*, backends=("own-auto-paged", "vllm"), failed_check=False, error_variant=None) -> list[dict]:
    """Rows as the sweep writes them, from a model: t = (1 - f) t0 + host bytes / rate."""
    rows = []
    for (b, kind, direction), gbps in YARD.items():
        point = {"measurement": "yardstick", "method": "memcpy_pinned" if b == "memcpy" else "prefetch",
                 "nbytes": K.GiB}
        t = K.GiB / (gbps * 1e3)
        rows.append({"backend": b, "memory_kind": kind, "protocol": "direct", "median_us": t,
                     "p10_us": t, "p90_us": t, "samples": 10, "bytes_moved": K.GiB, "check_passed": True,
                     "extra": {"direction": direction, "variant": "yardstick", **point}, "_point": point})
    for (h, kv), t0 in T0.items():
        for mode in K.MODES:
            for f in K.FRACTIONS:
                point = {**_point(mode=mode, fraction=f, num_heads=h, num_kv_heads=kv)}
                plan = K.OffloadPlan(32, 4096, 16, kv * 128 * 2, f)
                for backend in backends:
                    scale = 1.1 if backend == "vllm" else 1.0
                    for v, (m, _) in K.VARIANTS.items():
                        if m != mode or (v == "zero_copy_hostalloc" and f < 1):
                            continue
                        base = {"backend": backend, "memory_kind": K.POOL[v][0], "num_heads": h,
                                "num_kv_heads": kv, "bytes_moved": 10**9, "_point": point,
                                "extra": {"variant": v, "pool": K.POOL[v][1], **plan.describe(),
                                          **{k: point[k] for k in ("measurement", "mode", "fraction")}}}
                        if v == error_variant:
                            rows.append({**base, "status": "error",
                                         "error": "RuntimeError: pinned host memory is not available"})
                            continue
                        if v == "migrate_resident":
                            t = 1.01 * t0 * scale
                        else:
                            t = (1 - plan.host_fraction) * t0 * scale + plan.host_kv_bytes / (RATES[v] * 1e3)
                        rows.append({**base, "protocol": "eager" if m == "prefetch_overlap" else "rigorous",
                                     "median_us": t, "p10_us": 0.98 * t, "p90_us": 1.03 * t, "samples": 10,
                                     "rel_error": 1e-4, "check_passed": not failed_check})
    return rows


def as_frame(rows: list[dict]) -> pd.DataFrame:
    """What load_rows returns: schema columns plus extra's keys (status filled in)."""
    flat = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "_point"}
        flat.append({"gpu_slug": SLUG, "status": "ok", **{k: v for k, v in r.items() if k != "extra"},
                     **r["extra"]})
    return pd.DataFrame(flat)


def write_fake_results(root: Path, **kw) -> None:
    csv = R.csv_path(K.EXPERIMENT, SLUG, root=root)
    done = []
    for r in fake_rows(**kw):
        point = r.pop("_point")
        done.append({"experiment": K.EXPERIMENT, "point_key": E.point_key(point), "run_id": "run1",
                     "gpu_slug": SLUG, "status": "ok", "wall_s": 1.0, **r})
    R.append_rows(csv, done)
    R.write_provenance(csv, "run1", {"gpu": {"name": "NVIDIA H100 (fake)"},
                                     "ceilings": {"read_gbps": 3000.0}, "end": {"wall_s": 150.0}})


@pytest.fixture(scope="module")
def frame():
    return F.with_baselines(F.decode_frame(as_frame(fake_rows())))


def test_baselines_and_bus_rates_recover_the_model(frame):
    d = frame
    assert set(d["variant"]) == set(K.VARIANTS)
    mha = d[(d["heads"] == "MHA 32:32") & (d["backend"] == "own-auto-paged")]
    assert np.allclose(mha["device_us"], 700.0)
    assert F.pick(mha, "slowdown", variant="explicit_copy", fraction=0.0) == pytest.approx(1.0)
    moving = d[d["variant"].isin(F.BUS_VARIANTS) & (d["fraction"] > 0) & (d["backend"] == "own-auto-paged")]
    assert np.allclose(moving["bus_gbps"], moving["variant"].map(RATES))  # exact for this model
    assert d.loc[d["variant"] == "migrate_resident", "bus_gbps"].isna().all()
    assert d.loc[d["fraction"] == 0, "bus_gbps"].isna().all()
    assert (d.loc[d["fraction"] > 0, "step_gbps"].dropna() < d.loc[d["fraction"] > 0, "bus_gbps"].dropna()
            .reindex(d.loc[d["fraction"] > 0, "step_gbps"].dropna().index) + 1e-9).all()


def test_decode_frame_refuses_failed_checks_and_unknown_variants():
    with pytest.raises(ValueError, match="failed their correctness check"):
        F.decode_frame(as_frame(fake_rows(failed_check=True)))
    df = as_frame(fake_rows(backends=("own-auto-paged",)))
    df.loc[df.index[-1], "variant"] = "teleport"
    with pytest.raises(ValueError, match="unknown variants"):
        F.decode_frame(df)
    with pytest.raises(ValueError, match="needs columns"):
        F.decode_frame(df.drop(columns=["host_kv_bytes"]))


def test_yardsticks_and_missing_ones():
    ys = F.yardsticks(as_frame(fake_rows()))
    assert ys["pinned_h2d"] == pytest.approx(55.0) and ys["prefetch_d2h"] == pytest.approx(40.0)
    dec = as_frame(fake_rows())
    none = F.yardsticks(dec[dec["measurement"] == "decode"])
    assert all(math.isnan(v) for v in none.values())


def test_unavailable_groups_error_rows():
    df = as_frame(fake_rows(error_variant="zero_copy"))
    assert F.unavailable(as_frame(fake_rows())).empty
    u = F.unavailable(df.assign(status=np.where(df["variant"] == "zero_copy", "error", "ok")))
    assert len(u) == 2 and set(u["variant"]) == {"zero_copy"}  # one per backend
    assert u["fractions"].iloc[0] == "0, 1/64, 1/32, 1/16, 1/8, 1/4, 1/2, 1"
    assert "not available" in u["reason"].iloc[0]


def test_tables_pick_and_first_fraction(frame):
    t = F.time_table(frame, backend="own-auto-paged", heads="MHA 32:32")
    assert list(t.index) == [K.fraction_label(f) for f in K.FRACTIONS]
    assert list(t.columns) == [F.SHORT_LABELS[v] for v in F.VARIANT_ORDER]
    assert t.loc["0", F.SHORT_LABELS["explicit_copy"]] == pytest.approx(0.7)
    assert math.isnan(t.loc["1/2", F.SHORT_LABELS["zero_copy_hostalloc"]])
    with pytest.raises(ValueError, match="no rows"):
        F.time_table(frame, backend="nope", heads="MHA 32:32")
    assert math.isnan(F.pick(frame, "slowdown", variant="remote", fraction=0.3, backend="vllm",
                             heads="MHA 32:32"))
    with pytest.raises(ValueError, match="expected one"):
        F.pick(frame, "slowdown", variant="remote", fraction=0.5)
    # remote: 1 + f (2 GiB / 20 GB/s) / 700 us - f reaches 2 at f = 700 / (107374 - 700) ~ 1/152
    mha = dict(backend="own-auto-paged", heads="MHA 32:32")
    assert F.first_fraction(frame, threshold=2.0, variant="remote", **mha) == "1/64"
    assert F.first_fraction(frame, threshold=2.0, variant="migrate_resident", **mha) == "not reached"
    bt = F.backend_table(frame, heads="GQA 32:8")
    assert list(bt.columns) == ["own-auto-paged, f = 1/8", "own-auto-paged, f = 1", "vllm, f = 1/8",
                                "vllm, f = 1"]
    assert bt.loc["resident", "vllm, f = 1"] == pytest.approx(1.01)


def test_headline_and_verdicts(frame):
    ys = F.yardsticks(as_frame(fake_rows()))
    h = F.headline(frame, ys, backend="own-auto-paged")
    assert h["mha_dev_us"] == pytest.approx(700.0) and h["gqa_dev_us"] == pytest.approx(200.0)
    hb = 2 * 32 * 4096 * MHA_TOKEN
    assert h["mha_remote_s1"] == pytest.approx(hb / 20e3 / 700.0)
    assert h["mha_zc_bus"] == pytest.approx(25.0) and h["remote_bus_pct"] == pytest.approx(100 * 20 / 55)
    assert h["mha_resident_worst_pct"] == pytest.approx(1.0)
    assert h["best_read_over_copy"] == pytest.approx(50 / 25)
    assert h["hostalloc_over_zc"] == pytest.approx(1.0)
    nan = {k for k, v in h.items() if isinstance(v, float) and math.isnan(v)}
    assert nan == {f"{lay}_{x}" for lay in ("mha", "gqa")  # hostalloc is f = 1 only; resident moves nothing
                   for x in ("hostalloc_s64", "hostalloc_s8", "hostalloc_s2", "resident_bus")}
    w = F.verdicts(h)
    assert "2.00 times as slow as copying" in w["read_vs_copy"] and w["choose"].startswith("copy-then")
    assert w["hostalloc"].startswith("took 1.00 times")
    assert "prefetching first" in w["overlap"] and "as long as prefetching" in w["faults"]
    assert w["move_with"].startswith("an explicit prefetch") and w["resident"].startswith("within 1.0 %")
    assert w["remote_vs_zc"] == "1.25 times as slow as"
    faster = F.verdicts({**h, "best_read_over_copy": 0.5, "best_read_over_copy_8": 1.0,
                         "serial_over_overlap": 0.5, "first_over_serial": 1.0})
    assert "2.00 times as fast as" in faster["read_vs_copy"] and "about as fast as" in faster["read_vs_copy"]
    assert faster["choose"].startswith("reading in place beat") and "slower" in faster["overlap"]
    assert faster["move_with"].startswith("a prefetch or")
    assert F.verdicts({"best_read_over_copy": 1.02, "best_read_over_copy_8": 1.0})["choose"].startswith(
        "reading in place and copy")
    assert set(F.verdicts({}).values()) == {"—", "was not measured here (see the errors below)"}


def test_figures_draw_and_refuse_empty_input(frame):
    import matplotlib.figure

    ys = F.yardsticks(as_frame(fake_rows()))
    fig = F.time_figure(frame, backend="own-auto-paged")
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 2
    assert len(fig.axes[0].get_lines()) == len(F.VARIANT_ORDER) + 1  # + the device-memory line
    fig = F.bus_figure(frame, ys, backend="vllm")
    assert len(fig.axes[0].get_lines()) == len(F.BUS_VARIANTS) + 2  # + two yardsticks
    assert isinstance(F.modes_diagram(), matplotlib.figure.Figure)
    with pytest.raises(ValueError, match="no rows"):
        F.time_figure(frame, backend="nope")
    with pytest.raises(ValueError, match="no bus rates"):
        F.bus_figure(frame[frame["fraction"] == 0], ys, backend="own-auto-paged")


def test_load_rows_fails_clearly_without_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="mode = 'run'"):
        F.load_rows(root=tmp_path)
    write_fake_results(tmp_path)
    rows = F.load_rows(root=tmp_path)
    assert set(rows["measurement"]) == {"decode", "yardstick"} and rows["variant"].notna().all()
    assert set(rows["memory_kind"]) <= set(M.KINDS)
    assert rows.loc[rows["measurement"] == "decode", "pool"].notna().all()


def test_load_rows_maps_the_old_pool_labels(tmp_path):
    """Rows committed before ``extra["pool"]`` named the pool in ``memory_kind``."""
    csv = R.csv_path(K.EXPERIMENT, SLUG, root=tmp_path)
    old = []
    for r in fake_rows(backends=("own-auto-paged",)):
        point = r.pop("_point")
        r["extra"].pop("pool", None)
        v = r["extra"]["variant"]
        r["memory_kind"] = {"zero_copy": "vmm_host_split", "explicit_copy": "device+pinned"}.get(v, r["memory_kind"])
        old.append({"experiment": K.EXPERIMENT, "point_key": E.point_key(point), "run_id": "run0",
                    "gpu_slug": SLUG, "status": "ok", "wall_s": 1.0, **r})
    R.append_rows(csv, old)
    rows = F.load_rows(root=tmp_path)
    dec = rows[rows["measurement"] == "decode"]
    assert set(dec["memory_kind"]) <= set(M.KINDS)
    assert list(dec["pool"]) == [K.POOL[v][1] for v in dec["variant"]]
    assert (rows.loc[rows["measurement"] == "yardstick", "memory_kind"].isin(["pinned", "managed"])).all()


# ----------------------------------------------------------------------------- the chapter's code

CHAPTER = ROOT / "chapters" / "kv_offload.md"


def _code_cells(text: str) -> list[str]:
    return re.findall(r"```\{code-cell\} ipython3\n(.*?)```", text, flags=re.S)


def test_chapter_code_runs_on_synthetic_rows_and_glues_every_reference(tmp_path, monkeypatch):
    pytest.importorskip("IPython")
    import IPython.display

    import lib.book.glue

    write_fake_results(tmp_path, error_variant="zero_copy_hostalloc")
    glued: dict = {}
    monkeypatch.setattr(lib.book.glue, "glue", lambda name, value, display=True: glued.__setitem__(name, value))
    shown = []

    def show(obj, *a, **k):
        shown.append(obj.to_html() if hasattr(obj, "to_html") else obj)  # renders Stylers: formats run

    monkeypatch.setattr(IPython.display, "display", show)
    text = CHAPTER.read_text()
    ns: dict = {}
    for i, cell in enumerate(_code_cells(text)):
        body = "\n".join(line for line in cell.splitlines() if not line.startswith(("%", ":tags:")))
        if i == 0:  # the parameters cell: replay the synthetic results
            body += f"\nresults_root = {str(tmp_path)!r}"
        exec(compile(body, f"kv_offload.md cell {i}", "exec"), ns)
    refs = set(re.findall(r"\{glue:(?:text|figure)\}`([A-Za-z0-9_]+)", text))
    refs |= set(re.findall(r"```\{glue:figure\} ([A-Za-z0-9_]+)", text))
    assert refs and refs <= set(glued), f"referenced but never glued: {sorted(refs - set(glued))}"
    assert glued["ko_card"] == "NVIDIA H100 (fake)" and glued["ko_hbm_over_bus"] == pytest.approx(3000 / 55)
    assert glued["ko_missing"] == 2 and glued["ko_mha_copy_x2"] not in ("", None)
    for key in ("ko_mha_remote_s64", "ko_mha_first_s1", "ko_mha_overlap_bus", "ko_gqa_zc_s1"):
        assert math.isfinite(glued[key]), key
    assert "—" not in {glued[f"ko_v_{k}"] for k in ("read_vs_copy", "overlap", "faults", "choose")}
    assert len(shown) >= 4


def test_chapter_refuses_to_replay_without_data(tmp_path):
    body = _code_cells(CHAPTER.read_text())[1]
    ns = {"mode": "replay", "gpu": "", "backend": "own-auto-paged", "results_root": str(tmp_path)}
    body = "\n".join(line for line in body.splitlines() if not line.startswith(("%", ":tags:")))
    pytest.importorskip("IPython")
    with pytest.raises(FileNotFoundError, match="kv_offload"):
        exec(compile(body, "kv_offload.md cell 1", "exec"), ns)


# ----------------------------------------------------------------------------- GPU: one tiny point per mode

def _tiny(mode: str, fraction: float) -> dict:
    return {"measurement": "decode", "mode": mode, "fraction": fraction, "batch_size": 2,
            "seq_len": 256, "num_heads": 4, "num_kv_heads": 4, "head_size": 128, "block_size": 16,
            "dtype": "float16", "backends": "own-auto-paged", "seed": 0}


@pytest.mark.gpu
@pytest.mark.parametrize("mode, fraction", [(m, 0.5) for m in K.MODES] + [("pinned_zero_copy", 1.0),
                                                                          ("managed_migrate", 0.0)])
def test_gpu_one_tiny_point_per_mode(mode, fraction):
    rows = K.measure_point(_tiny(mode, fraction))
    want = {v for v, (m, _) in K.VARIANTS.items() if m == mode and (v != "zero_copy_hostalloc" or fraction == 1)}
    assert {r["extra"]["variant"] for r in rows} == want
    for r in rows:
        if r.get("status") == "error":  # only a machine without host-located cuMemCreate may say so
            assert r["extra"]["variant"] == "zero_copy" and "not available" in r["error"], r["error"]
            continue
        assert r["check_passed"], r
        assert r["median_us"] > 0 and r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert r["extra"]["host_blocks_per_seq"] == K.host_blocks_per_seq(16, fraction)
        R.finalize_row({"experiment": "kv_offload", "point_key": "k", "run_id": "r", "gpu_slug": "g",
                        "status": "ok", **r})  # a valid results row


@pytest.mark.gpu
def test_gpu_yardstick_rows():
    rows = K.measure_point({"measurement": "yardstick", "method": "memcpy_pinned", "nbytes": 64 * K.MiB})
    assert {r["extra"]["direction"] for r in rows} == {"h2d", "d2h"}
    assert all(r["check_passed"] and r["bytes_moved"] == 64 * K.MiB for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not vmm.cuda_python_available(), reason="cuda-bindings is not installed")
def test_gpu_split_pool_reads_host_and_device_parts():
    import cupy

    cupy.zeros(1)
    if vmm.host_memory_unavailable():
        pytest.skip(vmm.host_memory_unavailable())
    alloc = vmm.split_allocator(vmm.vmm_driver(), 128)
    a = alloc((256, 8192), "uint16")  # 128 blocks of 16 KiB on the host, 128 on the device
    src = cupy.arange(a.size, dtype=cupy.uint32).astype(cupy.uint16).reshape(a.shape)
    a[...] = src
    assert bool((a == src).all()) and int(a[:128].sum(dtype=cupy.uint64)) == int(src[:128].sum(dtype=cupy.uint64))
    attrs = cupy.cuda.runtime.pointerGetAttributes(a.data.ptr)
    assert attrs.devicePointer == a.data.ptr


def _marker_lines(fig):
    """(line, filled) for every line of the figure's panels that draws markers."""
    out = []
    for ax in fig.axes:
        for ln in ax.get_lines():
            if ln.get_marker() in (None, "None", "none", "", " ") or not len(ln.get_ydata()):
                continue
            out.append((ln, str(ln.get_markerfacecolor()).lower() != "none"))
    return out


def test_bus_figure_flags_values_above_the_link_limit(frame):
    ys = F.yardsticks(as_frame(fake_rows()))
    limit = ys[F.BUS_LIMIT]
    d = frame.copy()
    # two points above the pinned host->device rate: extra time shorter than the transfer could take
    fast = (d["backend"] == "own-auto-paged") & (d["heads"] == "MHA 32:32") & (d["variant"] == "remote") \
        & d["fraction"].isin([1 / 64, 1 / 32])
    d.loc[fast, "bus_gbps"] = [1.8 * limit, 1.4 * limit]
    assert F.above_limit(d["bus_gbps"], limit).sum() == 2
    assert not F.above_limit(d["bus_gbps"], float("nan")).any()
    flagged = F.with_link_flag(d, ys)  # the flag is a column, from the harness's one guard
    assert flagged["above_link_limit"].sum() == 2 and flagged.loc[fast, "above_link_limit"].all()
    at1 = (d["backend"] == "own-auto-paged") & (d["heads"] == "MHA 32:32") & (d["variant"] == "remote") \
        & (d["fraction"] == 1.0)
    over = d.copy()
    over.loc[at1, "bus_gbps"] = 2 * limit
    h = F.headline(over, ys, backend="own-auto-paged")
    assert np.isnan(h["mha_remote_bus"]) and np.isfinite(h["mha_zc_bus"])  # never quoted as a rate
    fig = F.bus_figure(d, ys, backend="own-auto-paged")
    lines = _marker_lines(fig)
    # no value above the limit is drawn with a data (filled) marker ...
    for ln, filled in lines:
        if filled:
            y = np.asarray(ln.get_ydata(), dtype=float)
            assert not (y[np.isfinite(y)] > limit).any(), ln.get_label()
    # ... nor at its value at all: each is marked, hollow, on the limit line (issue 17: no rate
    # above the link drawn as if it were one), and the axis does not stretch to reach it
    hollow = sorted(float(y) for ln, filled in lines if not filled for y in ln.get_ydata())
    assert hollow == pytest.approx([limit, limit])
    mha = fig.axes[0]
    assert any(np.allclose(ln.get_ydata(), limit) and ln.get_marker() in ("None", "", None)
               for ln in mha.get_lines()), "the limit is drawn as a line"
    assert limit < mha.get_ylim()[1] < 1.4 * limit
    legend = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert F.ABOVE_LIMIT_LABEL in legend and "not a bandwidth" in F.ABOVE_LIMIT_LABEL
    assert F.LIMIT_LABEL in legend
    # without a point above the limit, no flag in the legend
    fig = F.bus_figure(frame, ys, backend="own-auto-paged")
    assert F.ABOVE_LIMIT_LABEL not in [t.get_text() for lg in fig.legends for t in lg.get_texts()]


@pytest.mark.parametrize("which", ["time", "bus"])
def test_variant_figures_labels_do_not_overlap(frame, which):
    ys = F.yardsticks(as_frame(fake_rows()))
    fig = (F.time_figure(frame, backend="own-auto-paged") if which == "time"
           else F.bus_figure(frame, ys, backend="own-auto-paged"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    r = FigureCanvasAgg(fig).get_renderer()
    fig.draw(r)
    assert all(ax.get_xlabel() == "" for ax in fig.axes)  # said once, below both panels
    label, = [t for t in fig.texts if t.get_text() == F.FRACTION_LABEL]
    boxes = {"x label": label.get_window_extent(r), "legend": fig.legends[0].get_window_extent(r)}
    for i, ax in enumerate(fig.axes):
        boxes[f"panel {i}"] = ax.get_tightbbox(r)
    for (a, ba), (b, bb) in itertools.combinations(boxes.items(), 2):
        assert not ba.overlaps(bb), f"{a} overlaps {b}"
