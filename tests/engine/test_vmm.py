"""KVArena over the fake driver (CPU), and over the real CUDA VMM driver (marked gpu)."""

from __future__ import annotations

import enum
import sys
from types import SimpleNamespace

import pytest

from lib.engine import vmm
from lib.engine.vmm import (
    CudaVmmDriver,
    KVArena,
    VmmDriver,
    VmmDriverError,
    cuda_python_available,
    cupy_view,
    round_up,
)

from tests.engine.fakes_vmm import FakeVmmDriver, FaultInjectingDriver, InjectedFault

G = 4096  # fake granularity: small numbers keep the arithmetic readable


@pytest.fixture
def drv():
    return FakeVmmDriver(granularity=G)


def arena(drv, num_slots=4, chunks_per_slot=4, chunk=G):
    return KVArena(drv, num_slots, chunks_per_slot * chunk, chunk)


def chunk_vas(a: KVArena, slot: int, n: int) -> list[int]:
    return [a.slot_address(slot) + i * a.chunk_bytes for i in range(n)]


# -- construction --------------------------------------------------------------------------------

def test_drivers_satisfy_the_protocol(drv):
    assert isinstance(drv, VmmDriver)
    assert isinstance(FaultInjectingDriver(drv), VmmDriver)


def test_layout_one_reservation_equal_slots(drv):
    a = arena(drv, num_slots=3, chunks_per_slot=2, chunk=2 * G)
    assert a.reserved_bytes == 3 * 4 * G
    assert drv.reservations == {a.base: 3 * 4 * G}
    assert [a.slot_offset(s) for s in range(3)] == [0, 4 * G, 8 * G]
    assert a.slot_address(2) == a.base + 8 * G
    assert a.chunks_per_slot == 2
    assert drv.mappings == {} and drv.handles == {}  # nothing physical until grow


@pytest.mark.parametrize("chunk", [G + 1, G // 2, 3 * G // 2])
def test_chunk_not_multiple_of_granularity(drv, chunk):
    with pytest.raises(ValueError, match="multiple of the driver's allocation granularity"):
        KVArena(drv, 2, 4 * chunk, chunk)
    assert drv.reservations == {}


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_slots=0, slot_bytes=G, chunk_bytes=G), "num_slots"),
    (dict(num_slots=2, slot_bytes=0, chunk_bytes=G), "slot_bytes"),
    (dict(num_slots=2, slot_bytes=G, chunk_bytes=0), "chunk_bytes"),
    (dict(num_slots=2, slot_bytes=G, chunk_bytes=-G), "chunk_bytes"),
    (dict(num_slots=2, slot_bytes=3 * G, chunk_bytes=2 * G), "multiple of chunk_bytes"),
    (dict(num_slots=2.0, slot_bytes=G, chunk_bytes=G), "num_slots"),
])
def test_bad_geometry(drv, kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVArena(drv, **kwargs)
    assert drv.reservations == {}


def test_round_up():
    assert round_up(0, 8) == 0
    assert round_up(1, 8) == 8
    assert round_up(16, 8) == 16
    assert round_up(17, 8) == 24
    with pytest.raises(ValueError):
        round_up(3, 0)


# -- growth, release, accounting -----------------------------------------------------------------

def test_grow_maps_a_prefix_and_accounts(drv):
    a = arena(drv)
    assert a.grow(1, 1) == 1  # one byte needs a whole chunk
    assert a.mapped_bytes(1) == G and a.used_bytes(1) == 1
    assert a.grow(1, 2 * G + 5) == 2  # to three chunks
    assert a.grow(1, 100) == 0  # already covered: no driver call
    assert a.mapped_bytes(1) == 3 * G
    assert a.used_bytes(1) == 2 * G + 5  # the largest request, not the last
    vas = chunk_vas(a, 1, 3)
    assert all(drv.is_mapped(v) and drv.is_accessible(v) for v in vas)
    assert not drv.is_mapped(a.slot_address(1) + 3 * G)
    assert not drv.is_mapped(a.slot_address(0)) and not drv.is_mapped(a.slot_address(2))
    a.grow(3, 4 * G)  # a full slot
    st = a.stats()
    assert st["mapped_bytes"] == 7 * G == a.total_mapped_bytes
    assert st["used_bytes"] == 2 * G + 5 + 4 * G
    assert st["internal_waste_bytes"] == 7 * G - (6 * G + 5)
    assert st["handles_created"] == 7 and st["handles_reused"] == 0
    assert st["live_handles"] == 7 and st["physical_bytes"] == 7 * G
    assert st["active_slots"] == 2 and st["grow_calls"] == 4
    assert drv.calls["create_handle"] == 7 and drv.calls["map"] == 7
    assert drv.calls["set_access"] == 3  # one per grow call that mapped something


def test_release_reuses_handles_without_new_creates(drv):
    a = arena(drv)
    a.grow(0, 3 * G)
    handles = set(drv.handles)
    assert a.release(0) == 3
    assert a.mapped_bytes(0) == 0 and a.used_bytes(0) == 0
    assert drv.mappings == {} and set(drv.handles) == handles  # memory kept, not mapped
    assert a.stats()["free_chunks"] == 3 and a.stats()["physical_bytes"] == 3 * G
    creates = drv.calls["create_handle"]
    a.grow(2, 2 * G)
    assert drv.calls["create_handle"] == creates  # both chunks came from the free list
    assert {drv.mappings[v]["handle"] for v in chunk_vas(a, 2, 2)} <= handles
    a.grow(2, 4 * G)  # one more from the free list, then one new
    st = a.stats()
    assert drv.calls["create_handle"] == creates + 1
    assert st["handles_reused"] == 3 and st["handles_created"] == 4
    assert st["free_chunks"] == 0 and st["live_handles"] == 4


def test_trim_gives_free_chunks_back(drv):
    a = arena(drv)
    a.grow(0, 4 * G)
    a.release(0)
    assert a.trim(keep=1) == 3
    assert len(drv.handles) == 1 and a.stats()["live_handles"] == 1
    assert a.trim() == 1 and drv.handles == {}


def test_grow_beyond_slot_maps_nothing(drv):
    a = arena(drv)
    a.grow(0, G)
    before = (dict(drv.mappings), dict(drv.handles), drv.calls["map"])
    with pytest.raises(ValueError, match="cannot hold"):
        a.grow(0, 4 * G + 1)
    assert (dict(drv.mappings), dict(drv.handles), drv.calls["map"]) == before
    assert a.mapped_bytes(0) == G and a.used_bytes(0) == G


@pytest.mark.parametrize("slot, nbytes", [(-1, G), (4, G), (True, G), (0, -1), (0, 1.5)])
def test_bad_grow_arguments(drv, slot, nbytes):
    a = arena(drv)
    with pytest.raises(ValueError):
        a.grow(slot, nbytes)
    assert drv.mappings == {}


@pytest.mark.parametrize("op, nth", [("map", 1), ("map", 3), ("create_handle", 2), ("set_access", 1)])
def test_failure_mid_growth_rolls_back(drv, op, nth):
    a = arena(drv)
    a.grow(0, G)  # an earlier, unrelated mapping that must survive
    a.grow(1, 2 * G)
    a.release(1)  # two handles on the free list: growth takes them first
    mappings, handles = dict(drv.mappings), set(drv.handles)
    drv.inject_failure(op, nth)
    with pytest.raises(InjectedFault, match=op):
        a.grow(2, 4 * G)  # 2 reused + 2 new chunks
    assert drv.mappings.keys() == mappings.keys()  # no new mappings
    assert set(drv.handles) == handles  # new handles released, reused ones kept
    assert a.mapped_bytes(2) == 0 and a.used_bytes(2) == 0
    st = a.stats()
    assert st["free_chunks"] == 2 and st["live_handles"] == 3 and st["failed_grows"] == 1
    assert st["mapped_bytes"] == G
    assert a.grow(2, 4 * G) == 4  # and the arena still works
    assert all(drv.is_accessible(v) for v in chunk_vas(a, 2, 4))


def test_failure_when_growing_a_partly_mapped_slot(drv):
    a = arena(drv)
    a.grow(0, G)
    drv.inject_failure("map", 2)
    with pytest.raises(InjectedFault):
        a.grow(0, 4 * G)
    assert a.mapped_bytes(0) == G and list(drv.mappings) == [a.slot_address(0)]
    assert len(drv.handles) == 1


def test_roll_back_that_fails_keeps_mapped_chunks_tracked(drv):
    a = arena(drv)
    drv.inject_failure("set_access", 1)
    drv.inject_failure("unmap", 2)  # roll-back unmaps chunk 2, then fails on chunk 1
    with pytest.raises(InjectedFault, match="set_access") as info:
        a.grow(0, 3 * G)
    if sys.version_info >= (3, 11):  # add_note exists
        assert "roll-back stopped" in info.value.__notes__[0]
    assert a.mapped_bytes(0) == 2 * G  # chunks 0-1 still mapped, and known to the arena
    assert set(drv.mappings) == set(chunk_vas(a, 0, 2))
    a.close()
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}


def test_close_releases_everything(drv):
    with arena(drv) as a:
        a.grow(0, 4 * G)
        a.grow(1, G)
        a.release(0)  # leaves four handles on the free list
        a.grow(3, 2 * G)
    assert a.closed
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}
    assert drv.calls["release_handle"] == drv.calls["create_handle"] == 5
    a.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        a.grow(0, G)


def test_close_carries_on_past_a_failure(drv):
    a = arena(drv)
    a.grow(0, G)
    a.grow(1, G)
    drv.inject_failure("unmap", 1)
    with pytest.raises(InjectedFault):
        a.close()
    # slot 0 could not be unmapped, so its handle and the reservation stay; slot 1 was cleaned
    assert list(drv.mappings) == [a.slot_address(0)]
    assert len(drv.handles) == 1 and len(drv.reservations) == 1


# -- the fake enforces CUDA's rules (so the tests above mean something) --------------------------

def test_fake_driver_rules(drv):
    va = drv.reserve_va(4 * G)
    h = drv.create_handle(G, 0)
    with pytest.raises(VmmDriverError, match="cuMemMap"):
        drv.map(va + 1, G, h)  # misaligned
    with pytest.raises(VmmDriverError, match="cuMemMap"):
        drv.map(va + 4 * G, G, h)  # outside the reservation
    with pytest.raises(VmmDriverError, match="cuMemCreate"):
        drv.create_handle(G + 1, 0)
    with pytest.raises(VmmDriverError, match="cuMemSetAccess"):
        drv.set_access(va, G, 0)  # nothing mapped yet
    drv.map(va, G, h)
    with pytest.raises(VmmDriverError, match="cuMemMap"):
        drv.map(va, G, h)  # already mapped
    with pytest.raises(VmmDriverError, match="cuMemRelease"):
        drv.release_handle(h)  # still mapped
    with pytest.raises(VmmDriverError, match="cuMemAddressFree"):
        drv.free_va(va, 4 * G)  # still has a mapping
    with pytest.raises(VmmDriverError, match="cuMemUnmap"):
        drv.unmap(va, 2 * G)  # not a whole mapping
    drv.unmap(va, G)
    drv.release_handle(h)
    drv.free_va(va, 4 * G)
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}


def test_fault_injection_counts_from_arming(drv):
    drv.create_handle(G, 0)
    drv.inject_failure("create_handle", 2)
    drv.create_handle(G, 0)
    with pytest.raises(InjectedFault):
        drv.create_handle(G, 0)
    drv.create_handle(G, 0)  # only the armed call fails
    assert len(drv.handles) == 3 and drv.calls["create_handle"] == 4
    with pytest.raises(ValueError, match="unknown operation"):
        drv.inject_failure("mmap")


def test_wrapper_injects_and_delegates(drv):
    w = FaultInjectingDriver(drv)
    a = KVArena(w, 2, 2 * G, G)
    w.inject_failure("map", 2)
    with pytest.raises(InjectedFault):
        a.grow(0, 2 * G)
    assert drv.mappings == {} and drv.handles == {}
    assert w.is_mapped(a.base) is False  # delegated to the fake
    a.close()
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}


def test_cupy_view_checks_size_before_importing_cupy():
    with pytest.raises(ValueError, match="needs 32 bytes"):
        cupy_view(0x1000, 16, "float32", (8,))
    with pytest.raises(ValueError, match="multiple"):
        cupy_view(0x1000, 6, "float32")


def test_views_need_a_mapped_slot(drv):
    a = arena(drv)
    with pytest.raises(ValueError, match="nothing mapped"):
        a.slot_view(0, "float16")


# -- CudaVmmDriver's own logic on a CPU, over a stand-in for cuda.bindings.driver ------------------

class _Result(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_INVALID_CONTEXT = 201


class _StandInBindings:
    """Mimics the bindings' calling convention ((CUresult, *values) tuples, struct objects) over a
    FakeVmmDriver, and refuses memory calls unless the primary context is current."""

    CUresult = _Result
    CUmemAllocationType = SimpleNamespace(CU_MEM_ALLOCATION_TYPE_PINNED=1)
    CUmemLocationType = SimpleNamespace(CU_MEM_LOCATION_TYPE_DEVICE=1)
    CUmemAccess_flags = SimpleNamespace(CU_MEM_ACCESS_FLAGS_PROT_READWRITE=3)
    CUmemAllocationGranularity_flags = SimpleNamespace(CU_MEM_ALLOC_GRANULARITY_MINIMUM=0,
                                                       CU_MEM_ALLOC_GRANULARITY_RECOMMENDED=1)
    PRIMARY = 0xC0

    def __init__(self):
        self.fake = FakeVmmDriver(granularity=G)
        self.current = 0
        self.retained = 0

    def CUmemAllocationProp(self):
        return SimpleNamespace(type=0, location=SimpleNamespace(type=0, id=-1))

    def CUmemAccessDesc(self):
        return SimpleNamespace(flags=0, location=SimpleNamespace(type=0, id=-1))

    def cuInit(self, flags):
        return (_Result.CUDA_SUCCESS,)

    def cuDeviceGet(self, ordinal):
        return (_Result.CUDA_SUCCESS, ordinal)

    def cuDevicePrimaryCtxRetain(self, dev):
        self.retained += 1
        return (_Result.CUDA_SUCCESS, self.PRIMARY)

    def cuDevicePrimaryCtxRelease(self, dev):
        self.retained -= 1
        return (_Result.CUDA_SUCCESS,)

    def cuCtxGetCurrent(self):
        return (_Result.CUDA_SUCCESS, self.current)

    def cuCtxSetCurrent(self, ctx):
        self.current = int(ctx)
        return (_Result.CUDA_SUCCESS,)

    def _mem(self, fn, *args):
        if self.current != self.PRIMARY:
            return (_Result.CUDA_ERROR_INVALID_CONTEXT,)
        try:
            out = fn(*args)
        except VmmDriverError:
            return (_Result.CUDA_ERROR_INVALID_VALUE,)
        return (_Result.CUDA_SUCCESS,) if out is None else (_Result.CUDA_SUCCESS, out)

    def cuMemGetAllocationGranularity(self, prop, option):
        assert (prop.type, prop.location.type) == (1, 1)
        return self._mem(self.fake.granularity, prop.location.id)

    def cuMemAddressReserve(self, size, alignment, addr, flags):
        return self._mem(self.fake.reserve_va, size, alignment)

    def cuMemAddressFree(self, va, size):
        return self._mem(self.fake.free_va, va, size)

    def cuMemCreate(self, size, prop, flags):
        assert (prop.type, prop.location.type) == (1, 1)
        return self._mem(self.fake.create_handle, size, prop.location.id)

    def cuMemRelease(self, handle):
        if isinstance(handle, tuple):  # a reference taken by cuMemRetainAllocationHandle
            return (_Result.CUDA_SUCCESS,)
        return self._mem(self.fake.release_handle, handle)

    def cuMemMap(self, va, size, offset, handle, flags):
        assert offset == 0 and flags == 0
        return self._mem(self.fake.map, va, size, handle)

    def cuMemUnmap(self, va, size):
        return self._mem(self.fake.unmap, va, size)

    def cuMemSetAccess(self, va, size, descs, count):
        assert count == len(descs) == 1 and descs[0].flags == 3 and descs[0].location.type == 1
        return self._mem(self.fake.set_access, va, size, descs[0].location.id)

    def cuMemRetainAllocationHandle(self, va):
        if self.current == self.PRIMARY and self.fake.is_mapped(va):
            return (_Result.CUDA_SUCCESS, ("ref", va))
        return (_Result.CUDA_ERROR_INVALID_VALUE, None)


@pytest.fixture
def stand_in(monkeypatch):
    b = _StandInBindings()
    monkeypatch.setattr(vmm, "_driver_module", lambda: b)
    return b


@pytest.mark.parametrize("outer_ctx", [0, 0xBEEF])
def test_cuda_driver_logic_without_a_gpu(stand_in, outer_ctx):
    stand_in.current = outer_ctx  # no context, or some other one, current on this thread
    d = CudaVmmDriver(0)
    assert stand_in.retained == 1
    with KVArena(d, 2, 4 * G, G) as a:
        assert stand_in.current == outer_ctx  # restored after every call
        a.grow(0, 3 * G)
        assert d.is_mapped(a.slot_address(0) + 2 * G) and not d.is_mapped(a.slot_address(1))
        assert all(stand_in.fake.is_accessible(v) for v in chunk_vas(a, 0, 3))
        a.release(0)
        a.grow(1, G)
        with pytest.raises(VmmDriverError, match="cuMemMap failed: CUDA_ERROR_INVALID_VALUE"):
            d.map(a.base + 1, G, stand_in.fake.create_handle(G, 0))
        assert stand_in.current == outer_ctx
    assert stand_in.fake.leaks() == {"reservations": 0, "handles": 1, "mappings": 0}  # our stray handle
    d.close()
    d.close()
    assert stand_in.retained == 0
    with pytest.raises(RuntimeError, match="closed"):
        d.granularity()


def test_cuda_driver_context_is_restored_after_a_failure(stand_in):
    stand_in.current = 0xBEEF
    d = CudaVmmDriver(0)
    with pytest.raises(VmmDriverError, match="cuMemCreate"):
        d.create_handle(G + 1)
    assert stand_in.current == 0xBEEF


# -- the real driver (GPU) -----------------------------------------------------------------------

needs_cuda_python = pytest.mark.skipif(not cuda_python_available(),
                                       reason="cuda-python (cuda-bindings) is not installed")


@pytest.fixture
def cuda_drv():
    import cupy

    cupy.zeros(1)  # CuPy creates (or joins) the primary context first, as the experiments do
    d = CudaVmmDriver(0)
    yield d
    d.close()


def _free_bytes() -> int:
    import cupy

    cupy.cuda.Device().synchronize()
    return cupy.cuda.runtime.memGetInfo()[0]


@pytest.mark.gpu
@needs_cuda_python
def test_cuda_granularity_and_context(cuda_drv):
    from lib.engine.vmm import _driver_module

    drv = _driver_module()
    g = cuda_drv.granularity()
    assert g > 0 and g & (g - 1) == 0  # a power of two (2 MiB on H100/H200)
    assert cuda_drv.granularity(recommended=True) % g == 0
    # the runtime's context (CuPy's) is the primary context the driver retained, and stays current
    err, cur = drv.cuCtxGetCurrent()
    assert int(cur) == int(cuda_drv.context)


@pytest.mark.gpu
@needs_cuda_python
def test_cuda_errors_name_the_call(cuda_drv):
    g = cuda_drv.granularity()
    h = cuda_drv.create_handle(g)
    try:
        with pytest.raises(VmmDriverError, match="cuMemMap"):
            cuda_drv.map(g, g, h)  # an address that was never reserved
    finally:
        cuda_drv.release_handle(h)
    with pytest.raises(RuntimeError, match="cuMemCreate"):
        cuda_drv.create_handle(g + 1)


@pytest.mark.gpu
@needs_cuda_python
def test_cuda_grow_release_reuse_and_data(cuda_drv):
    import cupy

    g = cuda_drv.granularity()
    with KVArena(cuda_drv, 4, 4 * g, g) as a:
        a.grow(0, 3 * g)
        a.grow(2, g + 1)
        assert all(cuda_drv.is_mapped(v) for v in chunk_vas(a, 0, 3) + chunk_vas(a, 2, 2))
        assert not cuda_drv.is_mapped(a.slot_address(1))
        assert not cuda_drv.is_mapped(a.slot_address(0) + 3 * g)
        # write through per-slot views, read back through one base-pointer view (seq_start + j)
        x0 = a.slot_view(0, cupy.float32)
        x0[...] = cupy.arange(x0.size, dtype=cupy.float32)
        x2 = a.slot_view(2, cupy.float32)
        x2[...] = -1.0
        full = a.full_view(cupy.float32)
        per_slot = a.slot_bytes // 4
        assert bool((full[: x0.size] == cupy.arange(x0.size, dtype=cupy.float32)).all())
        assert bool((full[2 * per_slot: 2 * per_slot + x2.size] == -1.0).all())
        # release and regrow elsewhere: the same physical chunks, no new cuMemCreate, old bytes kept
        created = a.stats()["handles_created"]
        a.release(0)
        assert not any(cuda_drv.is_mapped(v) for v in chunk_vas(a, 0, 3))
        a.grow(1, g)  # release frees last-to-first, so slot 0's first chunk is reused first
        st = a.stats()
        assert st["handles_created"] == created and st["handles_reused"] == 1
        x1 = a.slot_view(1, cupy.float32)
        assert bool((x1 == cupy.arange(x1.size, dtype=cupy.float32)).all())


@pytest.mark.gpu
@needs_cuda_python
@pytest.mark.parametrize("op, nth", [("map", 3), ("set_access", 1)])
def test_cuda_failure_mid_growth_leaves_nothing_mapped(cuda_drv, op, nth):
    import cupy

    g = cuda_drv.granularity()
    w = FaultInjectingDriver(cuda_drv)
    with KVArena(w, 2, 8 * g, g) as a:
        a.grow(1, g)
        w.inject_failure(op, nth)
        with pytest.raises(InjectedFault):
            a.grow(0, 4 * g)
        assert not any(cuda_drv.is_mapped(v) for v in chunk_vas(a, 0, 4))
        assert cuda_drv.is_mapped(a.slot_address(1))  # the earlier mapping survived
        st = a.stats()
        assert st["mapped_bytes"] == g and st["live_handles"] == 1
        # new handles were released: created == released among the driver calls
        assert w.calls["create_handle"] - 1 == w.calls["release_handle"]
        a.grow(0, 4 * g)  # a fresh grow works and the memory is usable
        v = a.slot_view(0, cupy.uint8)
        v[...] = 7
        assert int(v.sum()) == 7 * 4 * g


@pytest.mark.gpu
@needs_cuda_python
def test_cuda_close_leaks_nothing(cuda_drv):
    g = cuda_drv.granularity()
    n = max(1, (64 << 20) // g)  # 64 MiB of chunks: well above memGetInfo's noise
    before = _free_bytes()
    a = KVArena(cuda_drv, 2, n * g, g)
    a.grow(0, n * g)
    a.grow(1, g)
    a.release(1)
    during = _free_bytes()
    assert before - during >= n * g
    base = a.base
    a.close()
    assert not cuda_drv.is_mapped(base)
    assert before - _free_bytes() < n * g // 2  # the physical memory came back
    # the reservation is gone too: the same size can be reserved and freed again
    va = cuda_drv.reserve_va(a.reserved_bytes)
    cuda_drv.free_va(va, a.reserved_bytes)
