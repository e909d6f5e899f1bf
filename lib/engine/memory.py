"""Where an array's bytes live: device, managed (Unified Memory) in chosen states, pinned host.

Every *memory kind* is a named :class:`Spec` in :data:`KINDS` (:func:`kinds_table` lists them).
:func:`allocate` returns a ``cupy.ndarray`` over memory of that kind; :func:`as_torch` shares it
with torch without a copy.

Why a guard. Managed memory can be *oversubscribed* (more than the GPU has, pages evicted and
faulted back), and on a shared GPU a process that does that can hang the GPU itself. So
:func:`allocate` refuses a managed allocation that would bring this process's managed total above
``share`` (default 80%) of the GPU's free memory *now*, unless ``allow_oversubscription=True``.

CUDA 12 and 13. CUDA 13's ``cudaMemPrefetchAsync`` and ``cudaMemAdvise`` take a
``cudaMemLocation`` instead of a device ordinal, and CuPy has no ``cudaMemRangeGetAttribute``. So
prefetch, advice and :func:`range_info` go through a small ctypes binding (:func:`cuda_api`) to
``libcudart`` when one loads, else ``libcuda``, with the signature picked from the library's
version. :func:`range_info` reports the driver's *intentions* (ReadMostly, preferred location,
AccessedBy, last prefetch), not a page census. CuPy and torch are imported inside functions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import difflib
import glob
import math
import os
import threading
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from lib.engine.gpu import require_cupy as _cupy

GiB = 1 << 30
MiB = 1 << 20

#: Default safety share: managed memory may use at most this fraction of the GPU's free memory.
DEFAULT_SAFETY_SHARE = 0.8

# CUDA enum values (identical in the runtime and the driver API, CUDA 12 and 13).
_ADVICE = {
    "read_mostly": 1, "unset_read_mostly": 2,
    "preferred_location": 3, "unset_preferred_location": 4,
    "accessed_by": 5, "unset_accessed_by": 6,
}
_ATTR_READ_MOSTLY = 1
_ATTR_PREFERRED = 2
_ATTR_ACCESSED_BY = 3
_ATTR_LAST_PREFETCH = 4
_ATTR_PREFERRED_TYPE = 5
_ATTR_PREFERRED_ID = 6
_ATTR_LAST_PREFETCH_TYPE = 7
_ATTR_LAST_PREFETCH_ID = 8
_LOC_DEVICE = 1
_LOC_HOST = 2
_CPU_DEVICE_ID = -1  # cudaCpuDeviceId
_HOST_ALLOC_PORTABLE = 0x01
_HOST_ALLOC_MAPPED = 0x02
_MEM_ATTACH_GLOBAL = 0x01
_MEMORY_TYPE = {0: "unregistered", 1: "host", 2: "device", 3: "managed"}


# ----------------------------------------------------------------------------- kinds

@dataclass(frozen=True)
class Spec:
    """A memory kind: the allocation call plus, for managed memory, advice and placement.

    base:     "device" | "managed" | "pinned"
    read_mostly, preferred ("gpu" | "cpu" | None), accessed_by_gpu: ``cudaMemAdvise`` hints
    touch:    "host" writes every page from the CPU once (pages created in host memory)
    prefetch: "gpu" | "host" | None, applied last (and again by :func:`settle`)
    """

    base: str
    read_mostly: bool = False
    preferred: str | None = None
    accessed_by_gpu: bool = False
    touch: str | None = None
    prefetch: str | None = None
    description: str = ""

    def __post_init__(self):
        if self.base not in ("device", "managed", "pinned"):
            raise ValueError(f"base must be 'device', 'managed' or 'pinned', got {self.base!r}")
        if self.preferred not in (None, "gpu", "cpu"):
            raise ValueError(f"preferred must be 'gpu', 'cpu' or None, got {self.preferred!r}")
        if self.touch not in (None, "host"):
            raise ValueError(f"touch must be 'host' or None, got {self.touch!r}")
        if self.prefetch not in (None, "gpu", "host"):
            raise ValueError(f"prefetch must be 'gpu', 'host' or None, got {self.prefetch!r}")
        managed_only = self.read_mostly or self.preferred or self.accessed_by_gpu or self.touch or self.prefetch
        if managed_only and self.base != "managed":
            raise ValueError(
                f"advice, touch and prefetch apply to managed memory only, not to {self.base!r} "
                "(device memory is always on the GPU, pinned memory always on the host)"
            )

    @property
    def home(self) -> str | None:
        """Where :func:`settle` puts the pages: the prefetch target, or the host for touched pages."""
        return self.prefetch or ("host" if self.touch == "host" else None)


KINDS: dict[str, Spec] = {
    "device": Spec("device", description="cudaMalloc: ordinary GPU memory"),
    "managed": Spec("managed", description="cudaMallocManaged only: pages appear where first touched"),
    "managed_gpu": Spec("managed", prefetch="gpu", description="managed, prefetched to the GPU"),
    "managed_host": Spec("managed", prefetch="host", description="managed, prefetched to the host"),
    "managed_host_touched": Spec("managed", touch="host",
                                 description="managed, first written by the CPU (pages in host memory)"),
    "managed_readmostly": Spec("managed", read_mostly=True, prefetch="gpu",
                               description="managed + ReadMostly, prefetched to the GPU (read-only copies)"),
    "managed_preferred_gpu": Spec("managed", preferred="gpu", prefetch="gpu",
                                  description="managed + PreferredLocation GPU, prefetched there"),
    "managed_preferred_cpu": Spec("managed", preferred="cpu", prefetch="host",
                                  description="managed + PreferredLocation CPU, prefetched to the host"),
    "managed_accessed_by_gpu": Spec("managed", accessed_by_gpu=True,
                                    description="managed + AccessedBy GPU (a mapping wherever pages are)"),
    "managed_host_mapped": Spec("managed", preferred="cpu", accessed_by_gpu=True, prefetch="host",
                                description="managed + PreferredLocation CPU + AccessedBy GPU, on the "
                                            "host: the GPU reads it over PCIe without migrating"),
    "pinned": Spec("pinned", description="cudaHostAlloc(Mapped): page-locked host memory, zero-copy"),
}


#: States a managed allocation is put in before each timed call, with the prefetches that make
#: each (in order). A row says its state in ``memory_state`` beside ``memory_kind = "managed"``;
#: grids name the pair as one label, ``managed_cold`` (:func:`split_kind`).
MANAGED_STATES = {"cold": ("host",), "prefetched": ("host", "gpu")}


def split_kind(label: str) -> tuple[str, str | None]:
    """A grid's memory label as (memory kind, managed state): ``managed_cold`` -> (managed, cold)."""
    kind, _, state = str(label).rpartition("_")
    return (kind, state) if kind == "managed" and state in MANAGED_STATES else (label, None)


def spec_of(kind: str | Spec) -> Spec:
    """The :class:`Spec` of a kind name (or the Spec itself); unknown names get suggestions."""
    if isinstance(kind, Spec):
        return kind
    if not isinstance(kind, str) or kind not in KINDS:
        close = difflib.get_close_matches(str(kind), list(KINDS), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown memory kind {kind!r}{hint} (known: {', '.join(KINDS)})")
    return KINDS[kind]


def kinds_table():
    """The kinds as a DataFrame (kind, base, advice, placement, description) for the book."""
    import pandas as pd

    rows = []
    for name, s in KINDS.items():
        advice = [a for a, on in (("ReadMostly", s.read_mostly),
                                  (f"PreferredLocation {s.preferred.upper()}" if s.preferred else "", bool(s.preferred)),
                                  ("AccessedBy GPU", s.accessed_by_gpu)) if on]
        place = {"gpu": "prefetched to GPU", "host": "prefetched to host"}.get(s.prefetch or "", "")
        if s.touch == "host":
            place = "written by the CPU"
        rows.append({"kind": name, "allocation": {"device": "cudaMalloc", "managed": "cudaMallocManaged",
                                                  "pinned": "cudaHostAlloc (mapped)"}[s.base],
                     "advice": ", ".join(advice) or "—", "placement": place or "—",
                     "description": s.description})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the guard

class OversubscriptionRefused(MemoryError):
    """A managed allocation was refused because it could oversubscribe the GPU."""


@dataclass(frozen=True)
class GuardDecision:
    """The guard's arithmetic for one request (bytes)."""

    allowed: bool
    request: int
    live: int
    free: int
    share: float
    limit: int
    message: str

    @property
    def total_after(self) -> int:
        return self.live + self.request


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def check_managed_request(nbytes: int, *, live_bytes: int, free_bytes: int,
                          share: float = DEFAULT_SAFETY_SHARE) -> GuardDecision:
    """Would ``nbytes`` more managed memory keep this process within ``share`` of free GPU memory
    (``live_bytes + nbytes <= share * free_bytes``)? Conservative on purpose: live managed pages
    already on the GPU count twice (in ``live`` and as used memory)."""
    for name, v in (("nbytes", nbytes), ("live_bytes", live_bytes), ("free_bytes", free_bytes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer number of bytes, got {v!r}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) \
            or not 0 < share <= 1:
        raise ValueError(f"share must be a fraction in (0, 1], got {share!r}")
    nbytes, live, free = int(nbytes), int(live_bytes), int(free_bytes)
    limit = int(share * free)
    allowed = live + nbytes <= limit
    if allowed:
        msg = (f"ok: {_gib(nbytes)} managed would bring this process to {_gib(live + nbytes)}, "
               f"within {share:.0%} of the {_gib(free)} free on the GPU ({_gib(limit)})")
    else:
        msg = (
            f"refusing to allocate {_gib(nbytes)} of managed memory: this process would then hold "
            f"{_gib(live + nbytes)} of managed memory ({_gib(live)} already), more than {share:.0%} "
            f"of the {_gib(free)} the GPU has free now (limit {_gib(limit)}). More managed memory "
            "than the GPU can hold is oversubscription: pages get evicted and faulted back, and on a "
            "shared GPU a process that oversubscribes can hang the GPU itself, not only this "
            "program. Ask for less or free GPU memory; pass allow_oversubscription=True only if "
            "you mean it and the GPU is yours alone."
        )
    return GuardDecision(allowed, nbytes, live, free, float(share), limit, msg)


_lock = threading.Lock()
_managed_live = 0


def managed_bytes_in_use() -> int:
    """Managed bytes this process holds through :func:`allocate` (all devices)."""
    return _managed_live


def _count_managed(delta: int) -> None:
    global _managed_live
    with _lock:
        _managed_live += delta


def host_available_bytes() -> int:
    """Host memory available for new allocations (MemAvailable: free plus reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def free_bytes(device: int | None = None) -> int:
    """The GPU's free memory now (``cudaMemGetInfo``), in bytes."""
    cp = _cupy()
    with cp.cuda.Device(_device_id(device)):
        free, _ = cp.cuda.runtime.memGetInfo()
    return int(free)


def guard_managed(nbytes: int, *, device: int | None = None, share: float = DEFAULT_SAFETY_SHARE,
                  allow_oversubscription: bool = False) -> GuardDecision:
    """Raise :class:`OversubscriptionRefused` unless ``nbytes`` more managed memory is safe.

    With ``allow_oversubscription=True`` a refusal becomes a warning. Allocates nothing.
    """
    decision = check_managed_request(nbytes, live_bytes=managed_bytes_in_use(),
                                     free_bytes=free_bytes(device), share=share)
    if not decision.allowed:
        if not allow_oversubscription:
            raise OversubscriptionRefused(decision.message + _pool_hint())
        warnings.warn("allow_oversubscription=True: " + decision.message.replace("refusing to allocate",
                                                                                 "allocating anyway"))
    return decision


def _pool_hint() -> str:
    """Where CuPy's pool holds free-but-cached GPU memory, say how to give it back."""
    try:
        import cupy

        cached = cupy.get_default_memory_pool().free_bytes()
    except Exception:
        return ""
    return (f" (CuPy's memory pool caches {_gib(cached)}: "
            "cupy.get_default_memory_pool().free_all_blocks() returns it)") if cached else ""


# ----------------------------------------------------------------------------- the CUDA binding

class CudaError(RuntimeError):
    """A CUDA call through the ctypes binding failed."""


class _Location(ctypes.Structure):
    """cudaMemLocation / CUmemLocation: {type, id}."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def signature_style(flavor: str, version: int, has_v2: bool = False) -> str:
    """'location' (cudaMemLocation argument) or 'ordinal' (device number) for prefetch/advise: the
    runtime's plain names take a location from CUDA 13.0, the driver's ``_v2`` entry points (>= 12.2)."""
    if flavor == "runtime":
        if version <= 0:
            raise ValueError(f"runtime version must be positive, got {version}")
        return "location" if version >= 13000 else "ordinal"
    if flavor == "driver":
        return "location" if has_v2 else "ordinal"
    raise ValueError(f"flavor must be 'runtime' or 'driver', got {flavor!r}")


class _Api:
    """prefetch / advise / range attributes over one loaded CUDA library."""

    def __init__(self, lib: ctypes.CDLL, flavor: str, path: str):
        self.lib, self.flavor, self.path = lib, flavor, path
        v = ctypes.c_int(0)
        P, S, I, U = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint
        if flavor == "runtime":
            lib.cudaGetErrorString.restype = ctypes.c_char_p
            self._check(lib.cudaRuntimeGetVersion(ctypes.byref(v)), "cudaRuntimeGetVersion")
            self.version = v.value
            self.style = signature_style("runtime", self.version)
            self._prefetch, self._advise = lib.cudaMemPrefetchAsync, lib.cudaMemAdvise
            self._range = lib.cudaMemRangeGetAttribute
            self._range.argtypes = [P, S, I, P, S]
            lib.cudaSetDevice.argtypes = [I]
        else:
            self._check(lib.cuInit(0), "cuInit")
            self._check(lib.cuDriverGetVersion(ctypes.byref(v)), "cuDriverGetVersion")
            self.version = v.value
            has_v2 = hasattr(lib, "cuMemPrefetchAsync_v2") and hasattr(lib, "cuMemAdvise_v2")
            self.style = signature_style("driver", self.version, has_v2)
            self._prefetch = lib.cuMemPrefetchAsync_v2 if has_v2 else lib.cuMemPrefetchAsync
            self._advise = lib.cuMemAdvise_v2 if has_v2 else lib.cuMemAdvise
            self._range = lib.cuMemRangeGetAttribute
            self._range.argtypes = [P, S, I, ctypes.c_uint64, S]
            P = ctypes.c_uint64  # CUdeviceptr
        if self.style == "location":
            self._prefetch.argtypes = [P, S, _Location, U, ctypes.c_void_p]
            self._advise.argtypes = [P, S, I, _Location]
        else:
            self._prefetch.argtypes = [P, S, I, ctypes.c_void_p]
            self._advise.argtypes = [P, S, I, I]
        for f in (self._prefetch, self._advise, self._range):
            f.restype = ctypes.c_int

    def info(self) -> dict:
        return {"flavor": self.flavor, "version": self.version, "signature": self.style, "path": self.path}

    def _check(self, status: int, what: str) -> None:
        if status == 0:
            return
        if self.flavor == "runtime":
            # A failed runtime call also leaves its code as the runtime's "last error", which the
            # next library to check it (torch, after its next kernel launch) would report as its
            # own failure: it is raised here, so clear it there.
            self.lib.cudaGetLastError()
            name = self.lib.cudaGetErrorString(status)
            text = name.decode() if name else "unknown error"
        else:
            s = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(s))
            text = s.value.decode() if s.value else "unknown error"
        raise CudaError(f"{what} failed with CUDA error {status}: {text}")

    def _on(self, device: int) -> None:
        if self.flavor == "runtime":  # this library keeps its own current device
            self._check(self.lib.cudaSetDevice(device), "cudaSetDevice")

    def prefetch(self, ptr: int, nbytes: int, loc: tuple[int, int], stream: int, device: int) -> None:
        self._on(device)
        if self.style == "location":
            st = self._prefetch(ptr, nbytes, _Location(*loc), 0, stream)
        else:
            st = self._prefetch(ptr, nbytes, _ordinal(loc), stream)
        self._check(st, "prefetch (cudaMemPrefetchAsync)")

    def advise(self, ptr: int, nbytes: int, advice: int, loc: tuple[int, int], device: int) -> None:
        self._on(device)
        arg = _Location(*loc) if self.style == "location" else _ordinal(loc)
        self._check(self._advise(ptr, nbytes, advice, arg), "advise (cudaMemAdvise)")

    def range_ints(self, ptr: int, nbytes: int, attr: int, count: int = 1, device: int = 0) -> list[int]:
        self._on(device)
        buf = (ctypes.c_int * count)()
        self._check(self._range(ctypes.addressof(buf), 4 * count, attr, ptr, nbytes),
                    f"cudaMemRangeGetAttribute({attr})")
        return list(buf)


def _ordinal(loc: tuple[int, int]) -> int:
    return loc[1] if loc[0] == _LOC_DEVICE else _CPU_DEVICE_ID


def _runtime_candidates() -> list[str]:
    """libcudart files or names to try, the ones most likely to match this process first."""
    out: list[str] = []
    try:  # already loaded in this process (torch loads one)
        with open("/proc/self/maps") as f:
            out += sorted({line.split()[-1] for line in f if "libcudart.so" in line})
    except OSError:
        pass
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
        for loc in (spec.submodule_search_locations if spec else []) or []:
            out += sorted(glob.glob(os.path.join(loc, "*", "lib", "libcudart.so*")), reverse=True)
    except (ImportError, ValueError):
        pass
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            out += sorted(glob.glob(os.path.join(root, "lib64", "libcudart.so*")), reverse=True)
    found = ctypes.util.find_library("cudart")
    out += [x for x in (found, "libcudart.so.13", "libcudart.so.12", "libcudart.so") if x]
    return list(dict.fromkeys(out))


_API: _Api | None = None


def cuda_api() -> _Api:
    """The ctypes binding for prefetch, advice and range attributes (loaded once): a CUDA runtime
    library if one loads (preferring CuPy's major version), else the driver; ``.info()`` says which."""
    global _API
    if _API is not None:
        return _API
    cp = _cupy()
    cp.cuda.runtime.free(0)  # makes CuPy's (primary) context current on this thread
    want_major = cp.cuda.runtime.runtimeGetVersion() // 1000
    dev = int(cp.cuda.runtime.getDevice())
    loaded = []
    for cand in _runtime_candidates():
        try:
            lib = ctypes.CDLL(cand)
            api = _Api(lib, "runtime", cand)
            api._on(dev)  # a runtime newer than the driver loads but fails here
        except (OSError, AttributeError, CudaError):
            continue
        loaded.append(api)
        if api.version // 1000 == want_major:
            break
    if loaded:
        match = [a for a in loaded if a.version // 1000 == want_major]
        _API = (match or loaded)[0]
    else:
        _API = _Api(ctypes.CDLL("libcuda.so.1"), "driver", "libcuda.so.1")
    return _API


# ----------------------------------------------------------------------------- locations

def _device_id(device: int | None) -> int:
    if device is None:
        return int(_cupy().cuda.runtime.getDevice())
    if isinstance(device, bool) or not isinstance(device, (int, np.integer)) or device < 0:
        raise ValueError(f"device must be a CUDA device number >= 0, got {device!r}")
    return int(device)


def parse_location(where: Any, device: int) -> tuple[int, int]:
    """('gpu' | 'gpu:N' | N >= 0 | 'host' | 'cpu') -> (location type, id); 'gpu' means ``device``."""
    if isinstance(where, (int, np.integer)) and not isinstance(where, bool):
        if where < 0:
            raise ValueError(f"a device number must be >= 0, got {where}; say 'host' for the CPU")
        return (_LOC_DEVICE, int(where))
    if isinstance(where, str):
        w = where.strip().lower()
        if w in ("host", "cpu"):
            return (_LOC_HOST, 0)
        if w == "gpu":
            return (_LOC_DEVICE, int(device))
        if w.startswith("gpu:") and w[4:].isdigit():
            return (_LOC_DEVICE, int(w[4:]))
    raise ValueError(f"location must be 'gpu', 'gpu:N', a device number, 'host' or 'cpu'; got {where!r}")


def decode_location(value: int) -> str | None:
    """A device ordinal as CUDA reports it -> 'gpu:N', 'host', or None (not set / not uniform)."""
    if value == _CPU_DEVICE_ID:
        return "host"
    if value >= 0:
        return f"gpu:{value}"
    return None


def decode_typed_location(loc_type: int, loc_id: int) -> str | None:
    """A (cudaMemLocationType, id) pair -> 'gpu:N', 'host', or None."""
    if loc_type == _LOC_DEVICE:
        return f"gpu:{loc_id}"
    if loc_type in (_LOC_HOST, 3, 4):  # host, host NUMA node, host NUMA current
        return "host"
    return None


# ----------------------------------------------------------------------------- allocations

class Allocation:
    """One CUDA allocation and its kind; frees itself when the last array over it is gone."""

    def __init__(self, ptr: int, nbytes: int, device: int, kind: str, spec: Spec, free: Callable[[int], None],
                 device_ptr: int | None = None):
        self.ptr, self.nbytes, self.device, self.kind, self.spec = ptr, nbytes, device, kind, spec
        self.device_ptr = ptr if device_ptr is None else device_ptr
        managed = nbytes if spec.base == "managed" else 0
        if managed:
            _count_managed(managed)
        self._finalizer = weakref.finalize(self, _release, free, ptr, managed)
        self._finalizer.atexit = False  # the process's exit frees it; CUDA may be shutting down

    def __repr__(self) -> str:
        return f"Allocation({self.kind}, {self.nbytes} bytes, device {self.device}, ptr=0x{self.ptr:x})"


def _release(free: Callable[[int], None], ptr: int, managed: int) -> None:
    try:
        free(ptr)
    finally:
        if managed:
            _count_managed(-managed)


_LIVE: "weakref.WeakValueDictionary[int, Allocation]" = weakref.WeakValueDictionary()


def _malloc_managed(nbytes: int) -> int:
    """cudaMallocManaged (global attach); a seam for tests that must prove nothing was allocated."""
    return int(_cupy().cuda.runtime.mallocManaged(nbytes, _MEM_ATTACH_GLOBAL))


def _nbytes(shape, dtype) -> tuple[tuple[int, ...], np.dtype, int]:
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative extent")
    dt = np.dtype(dtype)
    return shape, dt, int(np.prod(shape, dtype=np.int64)) * dt.itemsize


def allocate(shape, dtype="uint8", kind: str | Spec = "device", *, device: int | None = None,
             allow_oversubscription: bool = False, share: float = DEFAULT_SAFETY_SHARE):
    """A C-contiguous ``cupy.ndarray`` in memory of ``kind`` (a name in :data:`KINDS`).

    Managed kinds pass the guard first, then get their advice, CPU touch and prefetch, in that
    order; the call returns when the placement is done. Contents are unspecified.
    """
    spec = spec_of(kind)
    name = kind if isinstance(kind, str) else "custom"
    shape, dt, nbytes = _nbytes(shape, dtype)
    if not isinstance(allow_oversubscription, bool):
        raise ValueError("allow_oversubscription must be True or False")
    cp = _cupy()
    dev = _device_id(device)
    size = max(nbytes, 1)  # CUDA refuses zero-byte allocations; an empty array still owns one byte
    rt = cp.cuda.runtime
    with cp.cuda.Device(dev):
        if spec.base == "managed":
            guard_managed(size, device=dev, share=share, allow_oversubscription=allow_oversubscription)
            ptr = _malloc_managed(size)
            alloc = Allocation(ptr, size, dev, name, spec, rt.free)
        elif spec.base == "pinned":
            ptr = int(rt.hostAlloc(size, _HOST_ALLOC_MAPPED | _HOST_ALLOC_PORTABLE))
            try:
                dptr = int(rt.pointerGetAttributes(ptr).devicePointer)
            except Exception:
                rt.freeHost(ptr)
                raise
            alloc = Allocation(ptr, size, dev, name, spec, rt.freeHost, device_ptr=dptr)
        else:
            ptr = int(rt.malloc(size))
            alloc = Allocation(ptr, size, dev, name, spec, rt.free)
        _LIVE[alloc.device_ptr] = alloc
        mem = cp.cuda.UnownedMemory(alloc.device_ptr, size, alloc, dev)
        arr = cp.ndarray(shape, dtype=dt, memptr=cp.cuda.MemoryPointer(mem, 0))
        if spec.base == "managed":
            _place(arr, spec, dev)
    return arr


def allocator(kind: str | Spec = "device", **kwargs) -> Callable:
    """``alloc(shape, dtype)`` for :meth:`lib.engine.backends.DecodeCase.build` and the like. Filling
    the arrays on the GPU moves managed pages there: :func:`settle` puts them back."""
    spec_of(kind)  # fail early on an unknown kind

    def alloc(shape, dtype):
        return allocate(shape, dtype, kind, **kwargs)

    return alloc


def allocation_of(arr) -> Allocation | None:
    """The :class:`Allocation` behind an array made by :func:`allocate` (None for others)."""
    mem = getattr(getattr(arr, "data", None), "mem", None)
    return _LIVE.get(int(mem.ptr)) if mem is not None else None


def kind_of(arr) -> str:
    """The memory kind of an array: ours by record, others from ``cudaPointerGetAttributes``."""
    alloc = allocation_of(arr)
    if alloc is not None:
        return alloc.kind
    return _MEMORY_TYPE.get(int(_cupy().cuda.runtime.pointerGetAttributes(arr.data.ptr).type), "unknown")


def _place(arr, spec: Spec, device: int) -> None:
    if spec.read_mostly:
        advise(arr, "read_mostly", device=device)
    if spec.preferred:
        advise(arr, "preferred_location", "host" if spec.preferred == "cpu" else "gpu", device=device)
    if spec.accessed_by_gpu:
        advise(arr, "accessed_by", "gpu", device=device)
    if spec.touch == "host":
        view = host_view(arr)
        view.reshape(-1).view(np.uint8)[:] = 0
    if spec.prefetch:
        prefetch(arr, spec.prefetch, device=device)
        _cupy().cuda.get_current_stream().synchronize()


def settle(arr, *, stream=None) -> None:
    """Put a managed array's pages back where its kind says (e.g. after filling it on the GPU)."""
    alloc = allocation_of(arr)
    if alloc is None:
        raise ValueError("settle() needs an array made by lib.engine.memory.allocate")
    if alloc.spec.base == "managed" and alloc.spec.home:
        prefetch(arr, alloc.spec.home, device=alloc.device, stream=stream)
        (stream or _cupy().cuda.get_current_stream()).synchronize()


# ----------------------------------------------------------------------------- prefetch, advice

def _span(target, nbytes: int | None) -> tuple[int, int]:
    """(pointer, bytes) of an array's span, an Allocation, or a raw pointer with nbytes."""
    if isinstance(target, Allocation):
        ptr, n = target.device_ptr, target.nbytes
    elif isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if nbytes is None:
            raise ValueError("a raw pointer needs nbytes")
        ptr, n = int(target), int(nbytes)
        nbytes = None
    elif hasattr(target, "data") and hasattr(target, "nbytes"):
        if not (target.flags.c_contiguous or target.flags.f_contiguous):
            raise ValueError("prefetch/advise/range_info need a contiguous array (its bytes are one range)")
        ptr, n = int(target.data.ptr), int(target.nbytes)
    else:
        raise ValueError(f"expected a CuPy array, an Allocation or a pointer, got {type(target).__name__}")
    if nbytes is not None:
        if not 0 < int(nbytes) <= n:
            raise ValueError(f"nbytes must be in 1..{n}, got {nbytes}")
        n = int(nbytes)
    if n <= 0:
        raise ValueError("the range is empty")
    return ptr, n


def prefetch(target, where: Any = "gpu", *, nbytes: int | None = None, offset: int = 0,
             device: int | None = None, stream=None) -> None:
    """``cudaMemPrefetchAsync`` of a managed range (``offset``/``nbytes`` in bytes) to ``where``
    ('gpu', 'gpu:N', N, 'host'), asynchronous on ``stream`` (default: CuPy's current stream)."""
    cp = _cupy()
    dev = _device_id(device)
    loc = parse_location(where, dev)
    ptr, n = _span(target, None)
    ptr, n = _sub(ptr, n, offset, nbytes)
    s = stream if stream is not None else cp.cuda.get_current_stream()
    cuda_api().prefetch(ptr, n, loc, int(s.ptr), dev)


def _sub(ptr: int, n: int, offset: int, nbytes: int | None) -> tuple[int, int]:
    if offset < 0 or offset >= n:
        raise ValueError(f"offset must be in 0..{n - 1}, got {offset}")
    size = n - offset if nbytes is None else int(nbytes)
    if not 0 < size <= n - offset:
        raise ValueError(f"nbytes must be in 1..{n - offset} at offset {offset}, got {nbytes}")
    return ptr + offset, size


def advise(target, advice: str, where: Any = "gpu", *, nbytes: int | None = None, offset: int = 0,
           device: int | None = None) -> None:
    """``cudaMemAdvise`` on a managed range (``advice``: a key of ``_ADVICE``; ``where`` names the
    processor, ignored for read_mostly)."""
    if advice not in _ADVICE:
        raise ValueError(f"unknown advice {advice!r} (known: {', '.join(_ADVICE)})")
    dev = _device_id(device)
    loc = parse_location(where, dev)
    ptr, n = _span(target, None)
    ptr, n = _sub(ptr, n, offset, nbytes)
    cuda_api().advise(ptr, n, _ADVICE[advice], loc, dev)


@dataclass(frozen=True)
class RangeInfo:
    """What the driver records for a managed range (None: not set, or not the same over the range)."""

    read_mostly: bool
    preferred_location: str | None
    accessed_by: tuple[str, ...]
    last_prefetch_location: str | None


def range_info(target, *, nbytes: int | None = None, offset: int = 0, device: int | None = None) -> RangeInfo:
    """``cudaMemRangeGetAttribute`` for ReadMostly, PreferredLocation, AccessedBy, last prefetch."""
    cp = _cupy()
    dev = _device_id(device)
    ptr, n = _span(target, None)
    ptr, n = _sub(ptr, n, offset, nbytes)
    api = cuda_api()
    q = lambda attr, count=1: api.range_ints(ptr, n, attr, count, dev)  # noqa: E731
    pref = decode_location(q(_ATTR_PREFERRED)[0])
    last = decode_location(q(_ATTR_LAST_PREFETCH)[0])
    if api.version >= 12020 and (pref is None or last is None):  # host NUMA locations only show in the typed form
        try:
            if pref is None:
                pref = decode_typed_location(q(_ATTR_PREFERRED_TYPE)[0], q(_ATTR_PREFERRED_ID)[0])
            if last is None:
                last = decode_typed_location(q(_ATTR_LAST_PREFETCH_TYPE)[0], q(_ATTR_LAST_PREFETCH_ID)[0])
        except CudaError:
            pass
    ndev = int(cp.cuda.runtime.getDeviceCount())
    accessed = tuple(x for x in (decode_location(v) for v in q(_ATTR_ACCESSED_BY, ndev + 1)) if x)
    return RangeInfo(bool(q(_ATTR_READ_MOSTLY)[0]), pref, accessed, last)


def device_facts(device: int | None = None) -> dict:
    """The device attributes that decide what managed memory can do on this machine."""
    cp = _cupy()
    dev = _device_id(device)
    attrs = {"managed_memory": 83, "concurrent_managed_access": 89, "pageable_memory_access": 88,
             "pageable_memory_access_uses_host_page_tables": 100,
             "direct_managed_mem_access_from_host": 101, "can_map_host_memory": 19,
             "unified_addressing": 41, "host_native_atomic_supported": 86}
    out = {}
    for name, code in attrs.items():
        try:
            out[name] = int(cp.cuda.runtime.deviceGetAttribute(code, dev))
        except Exception:
            out[name] = None
    try:
        out["cuda_api"] = cuda_api().info()
    except Exception as e:  # provenance never stops a run
        out["cuda_api"] = {"error": f"{type(e).__name__}: {e}"}
    return out


# ----------------------------------------------------------------------------- views

class _HostView(np.ndarray):
    """A NumPy view of managed or pinned memory that keeps its allocation alive."""

    _keep: Any = None


def host_view(arr) -> np.ndarray:
    """A NumPy array over the same bytes (no copy), for CPU access to managed or pinned memory.

    CPU reads and writes of managed pages that sit on the GPU fault them back to the host.
    """
    alloc = allocation_of(arr)
    kind = alloc.spec.base if alloc is not None else kind_of(arr)
    if kind not in ("managed", "pinned", "host"):
        raise ValueError(f"host_view needs managed or pinned memory; this array is {kind!r} memory")
    if not arr.flags.c_contiguous:
        raise ValueError("host_view needs a C-contiguous array")
    ptr = int(arr.data.ptr)
    if alloc is not None and alloc.spec.base == "pinned":
        ptr = alloc.ptr + (ptr - alloc.device_ptr)  # the host address (equal under UVA)
    n = int(arr.nbytes)
    buf = (ctypes.c_byte * max(n, 1)).from_address(ptr)
    view = np.frombuffer(buf, dtype=np.uint8, count=n).view(arr.dtype).reshape(arr.shape).view(_HostView)
    view._keep = (alloc, arr)
    return view


def as_torch(arr):
    """A torch tensor over the same memory as a CuPy array (no copy; checked), through
    ``__cuda_array_interface__``: ``torch.from_dlpack`` rejects managed memory (kDLCUDAManaged)."""
    import torch

    t = torch.as_tensor(arr, device=f"cuda:{arr.device.id}")
    if arr.size and t.data_ptr() != int(arr.data.ptr):
        raise RuntimeError("torch.as_tensor copied the array instead of sharing its memory")
    return t


def with_spec(kind: str | Spec, **changes) -> Spec:
    """A kind with some fields changed, e.g. ``with_spec("managed", prefetch="host")``."""
    return replace(spec_of(kind), **changes)
