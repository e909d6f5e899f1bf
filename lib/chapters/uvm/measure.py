"""The measurements of the chapter "Unified Memory in practice", one point at a time.

The experiment ``uvm`` (registered in :mod:`lib.harness.experiments`) is a union of four grids, told
apart by the point parameter ``measurement``:

``gpu_read``  A GPU kernel reads every byte of a buffer once, for each memory kind and state:
    *warm* states do not change when read (device memory; managed memory prefetched to the GPU;
    ReadMostly copies; managed pages kept on the host and mapped for the GPU; pinned zero-copy),
    so they are timed with the study's method (``lib.engine.timing.time_graph``: CUDA-graph replays,
    L2 flushed, median of many). *Cold* states change when read (pages migrate on first touch),
    so each sample is one kernel between two CUDA events on a freshly made buffer, and the
    buffer is freed and made again for the next sample: ``managed`` (never touched: the GPU's
    first touch creates the pages), ``managed_host_touched`` (written by the CPU: every page
    migrates on a GPU page fault), ``managed_host`` (filled on the GPU, then prefetched to the
    host), ``managed_readmostly`` (ReadMostly, written by the CPU: the first read makes GPU
    copies), and ``prefetch_then_read`` (a host-written buffer prefetched to the GPU and then
    read, both inside the timed region).
``cpu_read``  The CPU reads (NumPy sum) a managed buffer the GPU has just written (its pages
    fault back to the host), the same buffer again (now on the host), a buffer prefetched to the
    host first, and pageable and pinned host memory for reference. Host clock; fresh buffers.
``granularity``  A kernel touches one 4-byte word every ``stride_bytes`` of a host-written
    managed buffer. What moved is measured two ways, both observable from outside the driver:
    (1) the drop in the GPU's free memory across the touch (``cudaMemGetInfo``; migrated pages
    must occupy GPU memory) and (2) the time a prefetch of the whole buffer still takes after the
    touch, against the time it takes on an untouched buffer (a prefetch moves only what is not
    yet on the GPU), scaled to bytes. Both are reported; neither is a page census.
``transfer``  Bandwidth of ``cudaMemcpyAsync`` from pinned and from pageable host memory, and of
    ``cudaMemPrefetchAsync`` of managed memory, both directions, in the same run, so prefetch
    bandwidth is read against the PCIe bandwidth of the same machine.

Every buffer is checked against the GPU's free memory before it is made (at most
:data:`GPU_SHARE` of it) and host buffers against available host memory; managed buffers also
pass :mod:`lib.engine.memory`'s guard. Sums of what was read are checked against what was written.
Rows follow :mod:`lib.harness.results`; point parameters that are not schema columns land in ``extra``.

CuPy is imported inside functions: this module imports on a CPU.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any, Callable

import numpy as np

from lib.engine import memory

MiB = 1 << 20
GiB = 1 << 30

#: A point's GPU buffers may use at most this share of the GPU's free memory ("far below").
GPU_SHARE = 0.25
#: ... and its host buffers at most this share of the host's available memory.
HOST_SHARE = 0.5
#: Fresh-buffer samples per cold point; repeated copies per transfer point.
COLD_REPEATS = 3
COPY_REPEATS = 10
#: Every buffer is filled with this byte, so each 32-bit word is 0x01010101.
FILL_BYTE = 1
WORD = 0x01010101

SIZES = [64 * MiB, 256 * MiB, GiB, 4 * GiB, 8 * GiB]
CPU_SIZES = [64 * MiB, 256 * MiB, GiB]
TRANSFER_SIZES = [64 * MiB, 256 * MiB, GiB, 4 * GiB]
GRANULARITY_SIZES = [GiB]
STRIDES = [4 * 1024, 64 * 1024, 2 * MiB]
#: --quick: every size parameter replaced by these.
QUICK_SIZES = [64 * MiB, 256 * MiB]

WARM_KINDS = ["device", "managed_gpu", "managed_readmostly", "managed_host_mapped", "pinned"]
COLD_KINDS = ["managed", "managed_host_touched", "managed_host", "managed_readmostly"]
MEASUREMENTS = ("gpu_read", "cpu_read", "granularity", "transfer")
TRANSFER_METHODS = ["memcpy_pinned", "memcpy_pageable", "prefetch"]

GRID = [
    {"measurement": ["gpu_read"], "phase": ["warm"], "memory_kind": WARM_KINDS, "nbytes": SIZES},
    {"measurement": ["gpu_read"], "phase": ["cold"], "memory_kind": COLD_KINDS, "nbytes": SIZES},
    {"measurement": ["gpu_read"], "phase": ["prefetch_then_read"],
     "memory_kind": ["managed_host_touched"], "nbytes": SIZES},
    {"measurement": ["cpu_read"], "nbytes": CPU_SIZES},
    {"measurement": ["granularity"], "stride_bytes": STRIDES, "nbytes": GRANULARITY_SIZES},
    {"measurement": ["transfer"], "method": TRANSFER_METHODS, "nbytes": TRANSFER_SIZES},
]

#: How each (memory_kind, phase) of ``gpu_read`` is named in the book.
READ_LABELS = {
    ("device", "warm"): "device memory",
    ("managed_gpu", "warm"): "managed, prefetched to GPU",
    ("managed_readmostly", "warm"): "managed, ReadMostly copy on GPU",
    ("managed_host_mapped", "warm"): "managed on host, mapped (AccessedBy)",
    ("pinned", "warm"): "pinned host, zero-copy",
    ("managed", "cold"): "managed, first touch on GPU",
    ("managed_host_touched", "cold"): "managed on host (CPU-written): faults",
    ("managed_host", "cold"): "managed on host (prefetched): faults",
    ("managed_readmostly", "cold"): "managed, ReadMostly: first read",
    ("managed_host_touched", "prefetch_then_read"): "managed on host: prefetch, then read",
}

_SOURCE = r"""
// Read every 16-byte vector once; sum the 32-bit words (so the loads stay) into *out.
extern "C" __global__ void uvm_read(const uint4* __restrict__ src, unsigned long long n_vec,
                                    unsigned long long* __restrict__ out) {
    const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long acc = 0;
    while (i + 3 * step < n_vec) {          // four loads in flight per thread
        uint4 v[4];
        #pragma unroll
        for (int k = 0; k < 4; ++k) v[k] = src[i + k * step];
        #pragma unroll
        for (int k = 0; k < 4; ++k) acc += (unsigned long long)v[k].x + v[k].y + v[k].z + v[k].w;
        i += 4 * step;
    }
    for (; i < n_vec; i += step) {
        const uint4 v = src[i];
        acc += (unsigned long long)v.x + v.y + v.z + v.w;
    }
    #pragma unroll
    for (int d = 16; d > 0; d >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, d);
    if ((threadIdx.x & 31) == 0) atomicAdd(out, acc);
}

// Write `value` to every 32-bit word.
extern "C" __global__ void uvm_fill(unsigned int* __restrict__ dst, unsigned long long n,
                                    unsigned int value) {
    const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += step)
        dst[i] = value;
}

// Thread t reads the word at t * stride_words: one touch per stride.
extern "C" __global__ void uvm_touch(const unsigned int* __restrict__ src, unsigned long long n_touch,
                                     unsigned long long stride_words,
                                     unsigned long long* __restrict__ out) {
    const unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n_touch) atomicAdd(out, (unsigned long long)src[t * stride_words]);
}
"""

_THREADS = 256
_KERNELS: dict[int, "_Kernels"] = {}


class _Kernels:
    """The three kernels, compiled once per device, launched on CuPy's current stream."""

    def __init__(self, device: int):
        import cupy as cp

        props = cp.cuda.runtime.getDeviceProperties(device)
        self.sms = int(props["multiProcessorCount"])
        mod = cp.RawModule(code=_SOURCE, options=("-std=c++17",))
        self._read = mod.get_function("uvm_read")
        self._fill = mod.get_function("uvm_fill")
        self._touch = mod.get_function("uvm_touch")

    def _grid(self, n: int) -> int:
        return max(1, min(self.sms * 8, -(-n // _THREADS)))

    def read(self, buf, out) -> None:
        if buf.nbytes % 16:
            raise ValueError("read needs a size that is a multiple of 16 bytes")
        n = buf.nbytes // 16
        self._read((self._grid(n),), (_THREADS,), (buf, np.uint64(n), out))

    def fill(self, buf, value: int = WORD) -> None:
        n = buf.nbytes // 4
        self._fill((self._grid(n),), (_THREADS,), (buf, np.uint64(n), np.uint32(value)))

    def touch(self, buf, stride_bytes: int, out) -> int:
        if stride_bytes % 4 or stride_bytes < 4:
            raise ValueError(f"stride_bytes must be a positive multiple of 4, got {stride_bytes}")
        n = buf.nbytes // stride_bytes
        self._touch((-(-n // _THREADS),), (_THREADS,), (buf, np.uint64(n), np.uint64(stride_bytes // 4), out))
        return n


def _kernels():
    import cupy as cp

    dev = cp.cuda.runtime.getDevice()
    if dev not in _KERNELS:
        _KERNELS[dev] = _Kernels(dev)
    return _KERNELS[dev]


# ----------------------------------------------------------------------------- budget

def budget_problem(gpu_bytes: int, host_bytes: int, *, free_gpu: int, free_host: int,
                   gpu_share: float = GPU_SHARE, host_share: float = HOST_SHARE) -> str | None:
    """Why a point's buffers are too big for this machine now, or None when they fit."""
    if min(gpu_bytes, host_bytes, free_gpu, free_host) < 0:
        raise ValueError("byte counts must be >= 0")
    if not (0 < gpu_share <= 1 and 0 < host_share <= 1):
        raise ValueError("shares must be in (0, 1]")
    if gpu_bytes > gpu_share * free_gpu:
        return (f"this point needs {gpu_bytes / GiB:.2f} GiB of GPU memory, more than "
                f"{gpu_share:.0%} of the {free_gpu / GiB:.2f} GiB free now; the study keeps every "
                "buffer far below free memory (managed memory beyond it oversubscribes the GPU)")
    if host_bytes > host_share * free_host:
        return (f"this point needs {host_bytes / GiB:.2f} GiB of host memory, more than "
                f"{host_share:.0%} of the {free_host / GiB:.2f} GiB available now")
    return None


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


def _check_budget(gpu_bytes: int, host_bytes: int = 0) -> None:
    import cupy as cp

    cp.get_default_memory_pool().free_all_blocks()
    why = budget_problem(gpu_bytes, host_bytes, free_gpu=memory.free_bytes(),
                         free_host=host_available_bytes() if host_bytes else 0)
    if why:
        raise RuntimeError(why)


# ----------------------------------------------------------------------------- helpers

def expected_word_sum(nbytes: int) -> int:
    """The sum of a filled buffer's 32-bit words, as the read kernel computes it."""
    return (nbytes // 4) * WORD


def expected_u64_sum(nbytes: int) -> int:
    """The sum (mod 2^64) of a filled buffer's 64-bit words, as the CPU read computes it."""
    return ((nbytes // 8) * int.from_bytes(bytes([FILL_BYTE]) * 8, "little")) % (1 << 64)


def _time_events(stream, enqueue: Callable[[], Any]) -> float:
    """Microseconds between two events around what ``enqueue`` puts on ``stream``."""
    import cupy as cp

    a, b = cp.cuda.Event(), cp.cuda.Event()
    with stream:
        a.record(stream)
        enqueue()
        b.record(stream)
    b.synchronize()
    return cp.cuda.get_elapsed_time(a, b) * 1e3


def _cpu_sum(view: np.ndarray) -> int:
    return int(np.add.reduce(view.reshape(-1).view(np.uint64), dtype=np.uint64))


def _host_fill(arr) -> None:
    memory.host_view(arr).reshape(-1).view(np.uint8).fill(FILL_BYTE)


def _gpu_fill(arr, stream) -> None:
    with stream:
        _kernels().fill(arr)
    stream.synchronize()


def _row(backend: str, memory_kind: str, times_us: list[float], nbytes: int, *, protocol: str | None,
         check: bool | None, extra: dict) -> dict:
    from lib.engine.timing import summarize

    t = summarize(times_us, protocol or "host_clock")
    row = {"backend": backend, "memory_kind": memory_kind, "median_us": t.median_us,
           "p10_us": t.p10_us, "p90_us": t.p90_us, "samples": t.samples, "bytes_moved": int(nbytes),
           "protocol": protocol, "check_passed": check,
           "extra": {"timer": "cuda_events" if protocol else "host_clock",
                     "samples_us": [round(x, 3) for x in times_us], **extra}}
    return row


def _release() -> None:
    import cupy as cp

    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()


# ----------------------------------------------------------------------------- gpu_read

def _make_read_buffer(kind: str, phase: str, nbytes: int, stream):
    """A buffer in the state a gpu_read point names, and the word sum a read must give (None:
    not defined, e.g. pages no one wrote)."""
    if phase == "warm":
        arr = memory.allocate(nbytes, "uint8", kind)
        _gpu_fill(arr, stream)
        if memory.allocation_of(arr).spec.base == "managed":
            memory.settle(arr, stream=stream)
        return arr, expected_word_sum(nbytes)
    if kind == "managed":  # never touched: the GPU's read creates the pages
        return memory.allocate(nbytes, "uint8", "managed"), None
    if kind == "managed_host_touched":
        arr = memory.allocate(nbytes, "uint8", "managed")
        _host_fill(arr)
        return arr, expected_word_sum(nbytes)
    if kind == "managed_host":  # written on the GPU (pages created there), then prefetched out
        arr = memory.allocate(nbytes, "uint8", "managed")
        _gpu_fill(arr, stream)
        memory.prefetch(arr, "host", stream=stream)
        stream.synchronize()
        return arr, expected_word_sum(nbytes)
    if kind == "managed_readmostly":
        arr = memory.allocate(nbytes, "uint8", memory.with_spec("managed", read_mostly=True))
        _host_fill(arr)
        return arr, expected_word_sum(nbytes)
    raise ValueError(f"no gpu_read state for memory_kind={kind!r}, phase={phase!r}")


def measure_gpu_read(point: dict) -> dict:
    """One gpu_read point: warm states by the study's method, cold ones one fresh buffer per sample."""
    import cupy as cp

    from lib.engine import timing

    kind, phase, nbytes = point["memory_kind"], point["phase"], int(point["nbytes"])
    if (kind, phase) not in READ_LABELS:
        raise ValueError(f"no gpu_read state for memory_kind={kind!r}, phase={phase!r}")
    host = nbytes if kind in ("pinned", "managed_host_mapped") or phase != "warm" else 0
    _check_budget(nbytes, host)
    k = _kernels()
    stream = cp.cuda.Stream(non_blocking=True)
    sink = cp.zeros(1, dtype=cp.uint64)
    extra: dict = {"label": READ_LABELS[(kind, phase)]}
    if phase == "warm":
        arr, want = _make_read_buffer(kind, phase, nbytes, stream)
        with stream:
            k.read(arr, sink)
        stream.synchronize()
        got = int(sink.get()[0])
        t = timing.time_graph(lambda: k.read(arr, sink))
        row = _row("gpu_read", kind, list(t.raw_us), nbytes, protocol=t.method, check=got == want,
                   extra={**extra, "sum": got})
        arr = None
        _release()
        return row
    times, checks, sums = [], [], []
    for _ in range(COLD_REPEATS):
        arr, want = _make_read_buffer(kind, phase, nbytes, stream)
        sink.fill(0)
        cp.cuda.Device().synchronize()

        def enqueue():
            if phase == "prefetch_then_read":
                memory.prefetch(arr, "gpu", stream=stream)
            k.read(arr, sink)

        times.append(_time_events(stream, enqueue))
        got = int(sink.get()[0])
        sums.append(got)
        if want is not None:
            checks.append(got == want)
        arr = None
        _release()
    return _row("gpu_read", kind, times, nbytes, protocol="direct",
                check=all(checks) if checks else None, extra={**extra, "sums": sums})


# ----------------------------------------------------------------------------- cpu_read

def measure_cpu_read(point: dict) -> list[dict]:
    """CPU reads after GPU writes (pages fault back), again (resident), after a prefetch, and of
    pageable and pinned host memory."""
    import cupy as cp

    nbytes = int(point["nbytes"])
    _check_budget(nbytes, 2 * nbytes)
    want = expected_u64_sum(nbytes)
    stream = cp.cuda.Stream(non_blocking=True)
    t: dict[str, list[float]] = {k: [] for k in ("after_gpu_write", "host_resident", "prefetch_d2h",
                                                 "after_prefetch", "pageable", "pinned")}
    ok: dict[str, list[bool]] = {k: [] for k in t}

    def cpu(view, key):
        t0 = time.perf_counter()
        s = _cpu_sum(view)
        t[key].append((time.perf_counter() - t0) * 1e6)
        ok[key].append(s == want)

    for _ in range(COLD_REPEATS):
        arr = memory.allocate(nbytes, "uint8", "managed")
        _gpu_fill(arr, stream)
        view = memory.host_view(arr)
        cpu(view, "after_gpu_write")
        cpu(view, "host_resident")
        view = arr = None
        _release()
        arr = memory.allocate(nbytes, "uint8", "managed")
        _gpu_fill(arr, stream)
        t["prefetch_d2h"].append(_time_events(stream, lambda: memory.prefetch(arr, "host", stream=stream)))
        ok["prefetch_d2h"].append(True)
        cpu(memory.host_view(arr), "after_prefetch")
        arr = None
        _release()
        page = np.full(nbytes, FILL_BYTE, dtype=np.uint8)
        cpu(page, "pageable")
        del page
        pin = memory.allocate(nbytes, "uint8", "pinned")
        _host_fill(pin)
        cpu(memory.host_view(pin), "pinned")
        del pin
        _release()

    def r(key, backend, kind, phase, protocol=None):
        return _row(backend, kind, t[key], nbytes, protocol=protocol, check=all(ok[key]),
                    extra={"phase": phase, "direction": "d2h" if backend == "prefetch" else None})

    return [
        r("after_gpu_write", "cpu_read", "managed", "after_gpu_write"),
        r("host_resident", "cpu_read", "managed", "host_resident"),
        r("prefetch_d2h", "prefetch", "managed", "prefetch_to_host", protocol="direct"),
        r("after_prefetch", "cpu_read", "managed", "after_prefetch_to_host"),
        r("pageable", "cpu_read", "pageable", "baseline"),
        r("pinned", "cpu_read", "pinned", "baseline"),
    ]


# ----------------------------------------------------------------------------- granularity

def resident_from_prefetch(nbytes: int, rest_us: float, full_us: float) -> int:
    """Bytes already on the GPU, judged by how much shorter a whole-buffer prefetch has become."""
    if nbytes < 0 or rest_us < 0 or full_us <= 0:
        raise ValueError("want nbytes >= 0, rest_us >= 0, full_us > 0")
    return int(round(nbytes * min(1.0, max(0.0, 1.0 - rest_us / full_us))))


def measure_granularity(point: dict) -> dict:
    """Touch one word every ``stride_bytes`` of a host-written managed buffer; what moved?"""
    import cupy as cp

    nbytes, stride = int(point["nbytes"]), int(point["stride_bytes"])
    if stride < 4 or stride % 4 or nbytes % stride:
        raise ValueError(f"stride_bytes={stride} must be a multiple of 4 dividing nbytes={nbytes}")
    _check_budget(nbytes, nbytes)
    k = _kernels()
    stream = cp.cuda.Stream(non_blocking=True)
    sink = cp.zeros(1, dtype=cp.uint64)
    touch_us, full_us, rest_us, moved_meminfo, checks = [], [], [], [], []
    touches = nbytes // stride
    for _ in range(COLD_REPEATS):
        ref = memory.allocate(nbytes, "uint8", "managed")
        _host_fill(ref)
        full_us.append(_time_events(stream, lambda: memory.prefetch(ref, "gpu", stream=stream)))
        ref = None
        _release()
        arr = memory.allocate(nbytes, "uint8", "managed")
        _host_fill(arr)
        sink.fill(0)
        cp.cuda.Device().synchronize()
        before = memory.free_bytes()
        touch_us.append(_time_events(stream, lambda: k.touch(arr, stride, sink)))
        after = memory.free_bytes()
        moved_meminfo.append(before - after)
        checks.append(int(sink.get()[0]) == touches * WORD)
        rest_us.append(_time_events(stream, lambda: memory.prefetch(arr, "gpu", stream=stream)))
        arr = None
        _release()
    med = lambda xs: float(np.median(xs))  # noqa: E731
    meminfo = max(0, int(med(moved_meminfo)))
    by_prefetch = resident_from_prefetch(nbytes, med(rest_us), med(full_us))
    row = _row("gpu_touch", "managed_host_touched", touch_us, meminfo, protocol="direct",
               check=all(checks), extra={
                   "touches": touches,
                   "touched_pages_bytes": touches * 4096,
                   "moved_meminfo_bytes": moved_meminfo,
                   "moved_meminfo_median": meminfo,
                   "moved_prefetch_estimate": by_prefetch,
                   "prefetch_full_us": full_us,
                   "prefetch_rest_us": rest_us,
                   "bytes_moved_from": "cudaMemGetInfo drop across the touch (median)",
               })
    return row


# ----------------------------------------------------------------------------- transfer

def measure_transfer(point: dict) -> list[dict]:
    """Host-to-device and device-to-host bandwidth of one method, ``COPY_REPEATS`` times each."""
    import cupy as cp

    method, nbytes = point["method"], int(point["nbytes"])
    if method not in TRANSFER_METHODS:
        raise ValueError(f"method must be one of {TRANSFER_METHODS}, got {method!r}")
    stream = cp.cuda.Stream(non_blocking=True)
    rt = cp.cuda.runtime
    k = _kernels()
    sink = cp.zeros(1, dtype=cp.uint64)
    h2d, d2h = [], []
    if method == "prefetch":
        _check_budget(nbytes, nbytes)
        arr = memory.allocate(nbytes, "uint8", "managed")
        _host_fill(arr)
        for _ in range(COPY_REPEATS):
            h2d.append(_time_events(stream, lambda: memory.prefetch(arr, "gpu", stream=stream)))
            d2h.append(_time_events(stream, lambda: memory.prefetch(arr, "host", stream=stream)))
        memory.prefetch(arr, "gpu", stream=stream)
        dev, kind, backend = arr, "managed", "prefetch"
    else:
        _check_budget(nbytes, 2 * nbytes)
        dev = memory.allocate(nbytes, "uint8", "device")
        if method == "memcpy_pinned":
            host = memory.allocate(nbytes, "uint8", "pinned")
            _host_fill(host)
            hptr, kind = int(memory.allocation_of(host).ptr), "pinned"
        else:
            host = np.full(nbytes, FILL_BYTE, dtype=np.uint8)
            hptr, kind = int(host.ctypes.data), "pageable"
        backend = "memcpy"
        copy = lambda dst, src, direction: rt.memcpyAsync(dst, src, nbytes, direction, stream.ptr)  # noqa: E731
        with stream:
            copy(dev.data.ptr, hptr, rt.memcpyHostToDevice)  # warm-up: first-use costs out
        stream.synchronize()
        for _ in range(COPY_REPEATS):
            h2d.append(_time_events(stream, lambda: copy(dev.data.ptr, hptr, rt.memcpyHostToDevice)))
            d2h.append(_time_events(stream, lambda: copy(hptr, dev.data.ptr, rt.memcpyDeviceToHost)))
    with stream:
        k.read(dev, sink)
    stream.synchronize()
    ok = int(sink.get()[0]) == expected_word_sum(nbytes)
    rows = [_row(backend, kind, ts, nbytes, protocol="direct", check=ok, extra={"direction": d})
            for d, ts in (("h2d", h2d), ("d2h", d2h))]
    dev = host = None
    _release()
    return rows


# ----------------------------------------------------------------------------- the experiment

def measure_point(point: dict):
    """The experiment's measure function: dispatch on ``point['measurement']``."""
    m = point.get("measurement")
    fns = {"gpu_read": measure_gpu_read, "cpu_read": measure_cpu_read,
           "granularity": measure_granularity, "transfer": measure_transfer}
    if m not in fns:
        raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {m!r}")
    from lib.engine.gpu import require_gpu

    require_gpu()
    try:
        return fns[m](point)
    finally:
        _release()


def overrides(*, quick: bool = False, only: str | list[str] = "") -> dict:
    """Grid overrides for the chapter's ``quick`` (the two smallest sizes) and ``only`` (some
    measurements: "gpu_read,transfer") parameters; a bad name is refused before anything runs."""
    names = [m for m in (only.split(",") if isinstance(only, str) else only) if m]
    bad = [m for m in names if m not in MEASUREMENTS]
    if bad:
        raise ValueError(f"unknown measurement(s) {bad}; choose from {', '.join(MEASUREMENTS)}")
    out: dict = {"nbytes": QUICK_SIZES} if quick else {}
    if names:
        out["measurement"] = names
    return out


# ----------------------------------------------------------------------------- loading for the book

def load(root=None):
    """All ``uvm`` rows (``extra`` expanded into columns), or None when there are none yet."""
    from lib.harness import results as R

    try:
        df = R.load("uvm", root=root, expand_extra=True)
    except FileNotFoundError:
        return None
    return df if len(df) else None


def gpu_read_table(df):
    """gpu_read rows with a label, the size in MiB and bandwidth spread (GB/s at p90/p10 time)."""
    d = df[df["measurement"] == "gpu_read"].copy()
    d["label"] = [READ_LABELS.get((k, p), f"{k} ({p})") for k, p in zip(d["memory_kind"], d["phase"])]
    d["size_mib"] = d["nbytes"].astype(float) / MiB
    d["bw_low"] = d["bytes_moved"].astype(float) / d["p90_us"] / 1e3
    d["bw_high"] = d["bytes_moved"].astype(float) / d["p10_us"] / 1e3
    return d


CPU_LABELS = {
    ("cpu_read", "managed", "after_gpu_write"): "managed, just written by GPU (faults back)",
    ("cpu_read", "managed", "host_resident"): "managed, read again (on host)",
    ("prefetch", "managed", "prefetch_to_host"): "prefetch GPU → host",
    ("cpu_read", "managed", "after_prefetch_to_host"): "managed, after prefetch to host",
    ("cpu_read", "pageable", "baseline"): "pageable host (NumPy)",
    ("cpu_read", "pinned", "baseline"): "pinned host",
}


def cpu_read_table(df):
    d = df[df["measurement"] == "cpu_read"].copy()
    d["label"] = [CPU_LABELS.get(k, " ".join(map(str, k)))
                  for k in zip(d["backend"], d["memory_kind"], d["phase"])]
    d["size_mib"] = d["nbytes"].astype(float) / MiB
    return d


def granularity_table(df):
    """One row per (GPU, size, stride): touches, bytes moved by both observations, times."""
    d = df[df["measurement"] == "granularity"].copy()
    d["stride_kib"] = d["stride_bytes"].astype(float) / 1024
    d["moved_meminfo_mib"] = d["moved_meminfo_median"].astype(float) / MiB
    d["moved_prefetch_mib"] = d["moved_prefetch_estimate"].astype(float) / MiB
    d["touched_pages_mib"] = d["touched_pages_bytes"].astype(float) / MiB
    d["amplification"] = d["moved_meminfo_median"].astype(float) / d["touched_pages_bytes"].astype(float)
    d["per_touch_us"] = d["median_us"] / d["touches"].astype(float)
    return d.sort_values(["gpu_slug", "nbytes", "stride_bytes"])


TRANSFER_LABELS = {("memcpy", "pinned"): "cudaMemcpy, pinned host",
                   ("memcpy", "pageable"): "cudaMemcpy, pageable host",
                   ("prefetch", "managed"): "cudaMemPrefetchAsync, managed"}


def transfer_table(df):
    d = df[df["measurement"] == "transfer"].copy()
    d["label"] = [TRANSFER_LABELS.get(k, " ".join(k)) for k in zip(d["backend"], d["memory_kind"])]
    d["size_mib"] = d["nbytes"].astype(float) / MiB
    return d


def _pick(d, **eq):
    for k, v in eq.items():
        d = d[d[k] == v]
    return d


def _at_largest(d, col: str = "bandwidth_gbps") -> float:
    if d.empty:
        return float("nan")
    return float(d.loc[d["nbytes"].astype("int64").idxmax(), col])


def headline(df, gpu_slug: str) -> dict[str, float]:
    """The numbers the chapter quotes for one GPU, each at the largest size measured (NaN if absent).

    Bandwidths in GB/s; ``*_size_gib`` say at which size; granularity values per stride in MiB.
    """
    d = df[df["gpu_slug"] == gpu_slug]
    g = d[d["measurement"] == "gpu_read"]
    out: dict[str, float] = {}
    for key, kind, phase in [("device", "device", "warm"), ("managed_gpu", "managed_gpu", "warm"),
                             ("readmostly_warm", "managed_readmostly", "warm"),
                             ("mapped", "managed_host_mapped", "warm"), ("pinned", "pinned", "warm"),
                             ("first_touch", "managed", "cold"),
                             ("fault_touched", "managed_host_touched", "cold"),
                             ("fault_prefetched", "managed_host", "cold"),
                             ("readmostly_cold", "managed_readmostly", "cold"),
                             ("prefetch_then_read", "managed_host_touched", "prefetch_then_read")]:
        out[f"read_{key}"] = _at_largest(_pick(g, memory_kind=kind, phase=phase))
    out["read_size_gib"] = float(g["nbytes"].max()) / GiB if len(g) else float("nan")
    out["read_pct_ceiling_device"] = _at_largest(_pick(g, memory_kind="device", phase="warm"),
                                                 "pct_of_read_ceiling")
    out["managed_over_device"] = out["read_managed_gpu"] / out["read_device"]
    out["device_over_fault"] = out["read_device"] / out["read_fault_touched"]
    t = d[d["measurement"] == "transfer"]
    for key, backend, kind in [("prefetch", "prefetch", "managed"), ("pinned", "memcpy", "pinned"),
                               ("pageable", "memcpy", "pageable")]:
        for direction in ("h2d", "d2h"):
            out[f"{key}_{direction}"] = _at_largest(_pick(t, backend=backend, memory_kind=kind, direction=direction))
    out["transfer_size_gib"] = float(t["nbytes"].max()) / GiB if len(t) else float("nan")
    out["prefetch_over_pinned_h2d"] = out["prefetch_h2d"] / out["pinned_h2d"]
    out["fault_over_pinned_h2d"] = out["read_fault_touched"] / out["pinned_h2d"]
    c = d[d["measurement"] == "cpu_read"]
    for key, backend, kind, phase in [("cpu_after_gpu_write", "cpu_read", "managed", "after_gpu_write"),
                                      ("cpu_host_resident", "cpu_read", "managed", "host_resident"),
                                      ("cpu_after_prefetch", "cpu_read", "managed", "after_prefetch_to_host"),
                                      ("cpu_prefetch_d2h", "prefetch", "managed", "prefetch_to_host"),
                                      ("cpu_pageable", "cpu_read", "pageable", "baseline")]:
        out[key] = _at_largest(_pick(c, backend=backend, memory_kind=kind, phase=phase))
    out["cpu_size_gib"] = float(c["nbytes"].max()) / GiB if len(c) else float("nan")
    gr = d[d["measurement"] == "granularity"]
    if len(gr):
        gr = gr[gr["nbytes"] == gr["nbytes"].max()]
        out["gran_size_gib"] = float(gr["nbytes"].iloc[0]) / GiB
        for _, r in gr.iterrows():
            s = int(r["stride_bytes"])
            tag = f"{s // MiB}m" if s >= MiB else f"{s // 1024}k"
            out[f"gran_{tag}_meminfo_mib"] = float(r["moved_meminfo_median"]) / MiB
            out[f"gran_{tag}_prefetch_mib"] = float(r["moved_prefetch_estimate"]) / MiB
            out[f"gran_{tag}_touched_mib"] = float(r["touched_pages_bytes"]) / MiB
            out[f"gran_{tag}_ms"] = float(r["median_us"]) / 1e3
    return out


def verdicts(h: dict[str, float]) -> dict[str, str]:
    """Comparisons the chapter states in words, decided by the data (a dash where it is missing)."""
    def ok(*keys):
        return all(np.isfinite(h.get(k, float("nan"))) and h.get(k, 0) > 0 for k in keys)

    out = {"managed": "—", "prefetch": "—", "cpu": "—"}
    if ok("read_managed_gpu", "read_device"):
        r = h["read_managed_gpu"] / h["read_device"]
        out["managed"] = ("the same as device memory to within 3%" if abs(r - 1) <= 0.03
                          else f"{abs(1 - r):.0%} {'slower' if r < 1 else 'faster'} than device memory")
    if ok("read_prefetch_then_read", "read_fault_touched"):
        r = h["read_prefetch_then_read"] / h["read_fault_touched"]
        out["prefetch"] = (f"{r:.1f} times the fault-driven bandwidth: one bulk copy replaces many "
                           "batches of faults" if r > 1.05 else
                           "no better than letting the pages fault: here the bulk copy did not pay off")
    if ok("cpu_after_gpu_write", "cpu_prefetch_d2h", "cpu_after_prefetch"):
        both = 1.0 / (1.0 / h["cpu_prefetch_d2h"] + 1.0 / h["cpu_after_prefetch"])
        a = h["cpu_after_gpu_write"]
        if both > 1.05 * a:
            out["cpu"] = (f"together {both:.1f} GB/s, so prefetching GPU results to the host before the "
                          "CPU reads them is the faster way to hand them over")
        elif both < 0.95 * a:
            out["cpu"] = (f"together {both:.1f} GB/s, so here letting the CPU fault the pages back was "
                          "faster than a prefetch followed by the read")
        else:
            out["cpu"] = (f"together {both:.1f} GB/s, about what letting the CPU fault the pages back "
                          "costs")
    return out
