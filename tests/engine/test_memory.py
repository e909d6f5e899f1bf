"""The Unified Memory layer: guard, kinds and locations on CPU; the rest on a GPU.

No test here opts in to oversubscription.
"""

from __future__ import annotations

import gc
import subprocess
import sys

import numpy as np
import pytest

from lib.engine import memory as M
from lib.engine.gpu import gpu_available

GiB, MiB = M.GiB, M.MiB


# ----------------------------------------------------------------------------- guard arithmetic

def test_guard_allows_up_to_the_limit_and_refuses_beyond():
    free = 10 * GiB
    limit = int(0.8 * free)
    ok = M.check_managed_request(limit - GiB, live_bytes=GiB, free_bytes=free)
    assert ok.allowed and ok.limit == limit and ok.total_after == limit
    no = M.check_managed_request(limit - GiB + 1, live_bytes=GiB, free_bytes=free)
    assert not no.allowed and no.total_after == limit + 1
    # live managed memory counts: the same request passes with nothing live
    assert M.check_managed_request(limit - GiB + 1, live_bytes=0, free_bytes=free).allowed
    # another share moves the limit
    assert M.check_managed_request(6 * GiB, live_bytes=0, free_bytes=free, share=0.5).allowed is False
    assert M.check_managed_request(5 * GiB, live_bytes=0, free_bytes=free, share=0.5).allowed
    assert M.check_managed_request(0, live_bytes=0, free_bytes=0).allowed  # nothing asked, nothing used


def test_guard_message_says_why():
    d = M.check_managed_request(48 * GiB, live_bytes=16 * GiB, free_bytes=70 * GiB)
    assert not d.allowed
    msg = d.message
    for part in ("48.00 GiB", "64.00 GiB", "16.00 GiB already", "80%", "70.00 GiB", "limit 56.00 GiB",
                 "oversubscription", "hang the GPU", "allow_oversubscription=True"):
        assert part in msg, part
    assert M.check_managed_request(GiB, live_bytes=0, free_bytes=70 * GiB).message.startswith("ok:")


@pytest.mark.parametrize("kw", [
    {"nbytes": -1}, {"live_bytes": -5}, {"free_bytes": -1}, {"nbytes": 1.5}, {"nbytes": True},
    {"share": 0}, {"share": 1.01}, {"share": float("nan")}, {"share": -0.2}, {"share": "0.8"},
])
def test_guard_validates_arguments(kw):
    args = {"nbytes": GiB, "live_bytes": 0, "free_bytes": 8 * GiB, "share": 0.8, **kw}
    with pytest.raises(ValueError):
        M.check_managed_request(args.pop("nbytes"), **args)


def test_guard_managed_raises_or_warns_without_a_gpu(monkeypatch):
    monkeypatch.setattr(M, "free_bytes", lambda device=None: 4 * GiB)
    monkeypatch.setattr(M, "_managed_live", GiB)
    with pytest.raises(M.OversubscriptionRefused, match="refusing to allocate 3.00 GiB"):
        M.guard_managed(3 * GiB, device=0)
    assert M.guard_managed(2 * GiB, device=0).allowed  # 1 + 2 <= 0.8 * 4 = 3.2
    with pytest.warns(UserWarning, match="allocating anyway"):
        assert not M.guard_managed(3 * GiB, device=0, allow_oversubscription=True).allowed


# ----------------------------------------------------------------------------- kinds and arguments

def test_kinds_are_consistent():
    assert set(M.KINDS) >= {"device", "managed", "managed_gpu", "managed_host", "managed_host_touched",
                            "managed_readmostly", "managed_preferred_gpu", "managed_preferred_cpu",
                            "managed_accessed_by_gpu", "managed_host_mapped", "pinned"}
    mapped = M.KINDS["managed_host_mapped"]
    assert mapped.preferred == "cpu" and mapped.accessed_by_gpu and mapped.home == "host"
    assert M.KINDS["managed_host_touched"].home == "host"
    assert M.KINDS["managed"].home is None and M.KINDS["managed_gpu"].home == "gpu"
    table = M.kinds_table()
    assert list(table["kind"]) == list(M.KINDS)
    assert (table.loc[table["kind"] == "pinned", "allocation"] == "cudaHostAlloc (mapped)").all()


def test_unknown_kind_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean 'managed_host'"):
        M.spec_of("managed_hots")
    with pytest.raises(ValueError, match="unknown memory kind"):
        M.allocator("nope")
    assert M.spec_of(M.KINDS["pinned"]) is M.KINDS["pinned"]


@pytest.mark.parametrize("kw", [
    {"base": "host"}, {"base": "managed", "preferred": "disk"}, {"base": "managed", "prefetch": "cpu"},
    {"base": "managed", "touch": "gpu"}, {"base": "device", "read_mostly": True},
    {"base": "pinned", "prefetch": "gpu"}, {"base": "device", "accessed_by_gpu": True},
])
def test_spec_validation(kw):
    with pytest.raises(ValueError):
        M.Spec(**kw)


def test_with_spec_changes_one_field():
    s = M.with_spec("managed", read_mostly=True)
    assert s.base == "managed" and s.read_mostly and s.prefetch is None
    with pytest.raises(ValueError):
        M.with_spec("device", prefetch="host")


def test_locations():
    assert M.parse_location("gpu", 3) == (1, 3)
    assert M.parse_location("GPU:1", 0) == (1, 1)
    assert M.parse_location(2, 0) == (1, 2)
    assert M.parse_location(np.int64(0), 5) == (1, 0)
    assert M.parse_location("host", 0) == (2, 0) == M.parse_location("cpu", 1)
    for bad in (-1, "gpu:x", "disk", None, 1.0, True):
        with pytest.raises(ValueError):
            M.parse_location(bad, 0)
    assert M.decode_location(-1) == "host" and M.decode_location(0) == "gpu:0"
    assert M.decode_location(-2) is None
    assert M.decode_typed_location(1, 2) == "gpu:2"
    assert M.decode_typed_location(2, 0) == M.decode_typed_location(3, 1) == "host"
    assert M.decode_typed_location(0, 0) is None


def test_signature_style_follows_the_version():
    assert M.signature_style("runtime", 13000) == "location"
    assert M.signature_style("runtime", 13020) == "location"
    assert M.signature_style("runtime", 12080) == "ordinal"
    assert M.signature_style("runtime", 11080) == "ordinal"
    assert M.signature_style("driver", 13000, has_v2=True) == "location"
    assert M.signature_style("driver", 12010, has_v2=False) == "ordinal"
    with pytest.raises(ValueError):
        M.signature_style("runtime", 0)
    with pytest.raises(ValueError):
        M.signature_style("nvrtc", 13000)


def test_advice_names_are_checked_before_any_cuda_call():
    with pytest.raises(ValueError, match="unknown advice"):
        M.advise(0x1000, "readmostly", nbytes=4096)


def test_span_arguments():
    assert M._span(0x1000, 4096) == (0x1000, 4096)
    with pytest.raises(ValueError, match="needs nbytes"):
        M._span(0x1000, None)
    with pytest.raises(ValueError):
        M._span("x", None)
    assert M._sub(0x1000, 4096, 1024, None) == (0x1400, 3072)
    assert M._sub(0x1000, 4096, 0, 512) == (0x1000, 512)
    for off, n in ((4096, None), (-1, None), (0, 0), (1024, 4096)):
        with pytest.raises(ValueError):
            M._sub(0x1000, 4096, off, n)


def test_module_imports_without_gpu_libraries():
    code = ("import sys, lib.engine.memory, lib.engine.transfer, lib.chapters.uvm.measure, "
            "lib.chapters.uvm.analysis, lib.chapters.uvm.figures, lib.chapters.kv_offload.residency; "
            "print('cupy' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.skipif(gpu_available(), reason="checks the CPU-machine message")
def test_allocate_on_a_cpu_machine_says_a_gpu_is_needed():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        M.allocate(16, "uint8", "managed")


# ----------------------------------------------------------------------------- on a GPU

def _cp():
    import cupy

    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(M.KINDS))
def test_every_kind_allocates_and_round_trips_through_cupy_and_torch(kind):
    cp = _cp()
    a = M.allocate((4, 1024), "float32", kind)
    assert a.shape == (4, 1024) and a.dtype == np.float32 and a.flags.c_contiguous
    assert M.kind_of(a) == kind and M.allocation_of(a).kind == kind
    a[...] = cp.arange(4096, dtype=cp.float32).reshape(4, 1024)
    assert (a.get().ravel() == np.arange(4096)).all()
    torch = pytest.importorskip("torch")
    t = M.as_torch(a)
    assert t.data_ptr() == a.data.ptr and t.shape == (4, 1024) and t.dtype == torch.float32
    t += 1  # torch writes, CuPy sees it: the same memory
    torch.cuda.synchronize()
    assert float(a[2, 5]) == 2 * 1024 + 5 + 1
    if M.KINDS[kind].base != "device":
        v = M.host_view(a)
        assert v[2, 5] == 2 * 1024 + 5 + 1  # the CPU reads the same bytes
        v[0, 0] = -7.0
        assert float(a[0, 0]) == -7.0
    else:
        with pytest.raises(ValueError, match="managed or pinned"):
            M.host_view(a)


@pytest.mark.gpu
def test_settle_puts_pages_back_where_the_kind_says():
    cp = _cp()
    a = M.allocate(4 * MiB, "uint8", "managed_host")
    assert M.range_info(a).last_prefetch_location == "host"
    a.fill(3)  # a GPU write; the pages move to the GPU
    cp.cuda.Device().synchronize()
    M.settle(a)
    assert M.range_info(a).last_prefetch_location == "host"
    assert int(M.host_view(a)[123]) == 3
    with pytest.raises(ValueError):
        M.settle(cp.zeros(4))


@pytest.mark.gpu
def test_prefetch_advise_and_introspection():
    cp = _cp()
    dev = cp.cuda.runtime.getDevice()
    a = M.allocate(8 * MiB, "uint8", "managed")
    M.prefetch(a, "host")
    cp.cuda.get_current_stream().synchronize()
    assert M.range_info(a).last_prefetch_location == "host"
    M.prefetch(a, "gpu")
    cp.cuda.get_current_stream().synchronize()
    info = M.range_info(a)
    assert info.last_prefetch_location == f"gpu:{dev}"
    assert not info.read_mostly and info.preferred_location is None and info.accessed_by == ()
    M.advise(a, "read_mostly")
    M.advise(a, "preferred_location", "host")
    M.advise(a, "accessed_by", "gpu")
    info = M.range_info(a)
    assert info.read_mostly and info.preferred_location == "host" and f"gpu:{dev}" in info.accessed_by
    M.advise(a, "unset_read_mostly")
    M.advise(a, "preferred_location", "gpu")
    M.advise(a, "unset_accessed_by", "gpu")
    info = M.range_info(a)
    assert not info.read_mostly and info.preferred_location == f"gpu:{dev}" and info.accessed_by == ()
    # a sub-range: only the first half goes to the host
    M.prefetch(a, "host", nbytes=4 * MiB)
    cp.cuda.get_current_stream().synchronize()
    assert M.range_info(a, nbytes=4 * MiB).last_prefetch_location == "host"
    assert M.range_info(a, offset=4 * MiB).last_prefetch_location == f"gpu:{dev}"
    assert M.range_info(a).last_prefetch_location is None  # not the same over the range
    api = M.cuda_api().info()
    assert api["flavor"] in ("runtime", "driver") and api["signature"] in ("location", "ordinal")


@pytest.mark.gpu
def test_kinds_record_their_advice():
    dev = _cp().cuda.runtime.getDevice()
    info = M.range_info(M.allocate(4 * MiB, "uint8", "managed_host_mapped"))
    assert info.preferred_location == "host" and f"gpu:{dev}" in info.accessed_by
    assert info.last_prefetch_location == "host"
    info = M.range_info(M.allocate(4 * MiB, "uint8", "managed_readmostly"))
    assert info.read_mostly and info.last_prefetch_location == f"gpu:{dev}"
    assert M.range_info(M.allocate(4 * MiB, "uint8", "managed_preferred_gpu")).preferred_location == f"gpu:{dev}"


@pytest.mark.gpu
def test_guard_refuses_more_than_free_memory_without_allocating(monkeypatch):
    calls = []
    monkeypatch.setattr(M, "_malloc_managed", lambda n: calls.append(n) or 0)
    before = M.managed_bytes_in_use()
    too_big = M.free_bytes() + GiB
    with pytest.raises(M.OversubscriptionRefused, match="refusing to allocate"):
        M.allocate(too_big, "uint8", "managed")
    with pytest.raises(M.OversubscriptionRefused):
        M.allocator("managed_host")((too_big,), "uint8")
    assert calls == [] and M.managed_bytes_in_use() == before


@pytest.mark.gpu
def test_managed_total_tracks_live_allocations():
    gc.collect()
    before = M.managed_bytes_in_use()
    a = M.allocate(3 * MiB, "uint8", "managed")
    b = M.allocate(MiB, "uint8", "device")
    assert M.managed_bytes_in_use() == before + 3 * MiB
    view = a[1024:]  # a view keeps the allocation alive
    del a
    gc.collect()
    assert M.managed_bytes_in_use() == before + 3 * MiB
    del view, b
    gc.collect()
    assert M.managed_bytes_in_use() == before


@pytest.mark.gpu
def test_pinned_memory_is_read_by_the_gpu_in_place():
    cp = _cp()
    p = M.allocate(1 << 16, "int32", "pinned")
    attrs = cp.cuda.runtime.pointerGetAttributes(p.data.ptr)
    assert attrs.type == 1  # cudaMemoryTypeHost: zero-copy, not a device copy
    M.host_view(p)[:] = np.arange(1 << 16, dtype=np.int32)
    assert int(p.sum()) == int(np.arange(1 << 16, dtype=np.int64).sum())


@pytest.mark.gpu
def test_device_facts_report_managed_support():
    facts = M.device_facts()
    assert facts["managed_memory"] == 1 and facts["concurrent_managed_access"] in (0, 1)
    assert facts["cuda_api"]["flavor"] in ("runtime", "driver")
