"""The measurements of the chapter "Unified Memory in practice", one point at a time.

The experiment ``uvm`` is a union of four grids, told apart by ``measurement``:

``gpu_read``  A GPU kernel (:func:`lib.engine.timing.read_sum`) reads every byte of a buffer once,
    for each memory kind and state (:data:`READ_LABELS`). *Warm* states do not change when read
    and are timed with the study's method (``time_graph``); *cold* ones do (pages migrate on first
    touch), so each sample is one kernel between two CUDA events on a buffer made fresh for it.
``cpu_read``  The CPU reads (NumPy sum) a managed buffer the GPU has just written, the same buffer
    again, one prefetched to the host first, and pageable and pinned host memory. Host clock.
``granularity``  A kernel touches one 4-byte word every ``stride_bytes`` of a host-written managed
    buffer. What moved is observed two ways: the drop in the GPU's free memory across the touch,
    and how much shorter a whole-buffer prefetch becomes after it. Neither is a page census.
``transfer``  :func:`lib.engine.transfer.measure_transfer`, both directions, in the same run.

Buffers stay far below free memory (:func:`lib.engine.transfer.budget_problem`); sums of what was
read are checked against what was written. CuPy is imported inside functions: this module imports
on a CPU.
"""

from __future__ import annotations

import time

import numpy as np

from lib.engine import memory
from lib.engine import transfer
from lib.engine.transfer import (FILL_BYTE, WORD, check_budget, event_row, expected_word_sum,
                                 gpu_fill, host_fill, release, time_events)

MiB = 1 << 20
GiB = 1 << 30

#: Fresh-buffer samples per cold point.
COLD_REPEATS = 3

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
TRANSFER_METHODS = transfer.METHODS

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

_TOUCH = r"""
// Thread t reads the word at t * stride_words: one touch per stride.
extern "C" __global__ void uvm_touch(const unsigned int* __restrict__ src, unsigned long long n_touch,
                                     unsigned long long stride_words,
                                     unsigned long long* __restrict__ out) {
    const unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n_touch) atomicAdd(out, (unsigned long long)src[t * stride_words]);
}
"""
_TOUCH_KERNELS: dict = {}


def touch(buf, stride_bytes: int, out) -> int:
    """Launch the touch kernel on the current stream; return how many words it touches."""
    import cupy as cp

    if stride_bytes % 4 or stride_bytes < 4:
        raise ValueError(f"stride_bytes must be a positive multiple of 4, got {stride_bytes}")
    dev = cp.cuda.runtime.getDevice()
    if dev not in _TOUCH_KERNELS:
        _TOUCH_KERNELS[dev] = cp.RawModule(code=_TOUCH, options=("-std=c++17",)).get_function("uvm_touch")
    n = buf.nbytes // stride_bytes
    _TOUCH_KERNELS[dev]((-(-n // 256),), (256,), (buf, np.uint64(n), np.uint64(stride_bytes // 4), out))
    return n


# ----------------------------------------------------------------------------- helpers

def expected_u64_sum(nbytes: int) -> int:
    """The sum (mod 2^64) of a filled buffer's 64-bit words, as the CPU read computes it."""
    return ((nbytes // 8) * int.from_bytes(bytes([FILL_BYTE]) * 8, "little")) % (1 << 64)


def _cpu_sum(view: np.ndarray) -> int:
    return int(np.add.reduce(view.reshape(-1).view(np.uint64), dtype=np.uint64))


# ----------------------------------------------------------------------------- gpu_read

def _make_read_buffer(kind: str, phase: str, nbytes: int, stream):
    """A buffer in the state a gpu_read point names, and the word sum a read must give (None:
    not defined, e.g. pages no one wrote)."""
    if phase == "warm":
        arr = memory.allocate(nbytes, "uint8", kind)
        gpu_fill(arr, stream)
        if memory.allocation_of(arr).spec.base == "managed":
            memory.settle(arr, stream=stream)
        return arr, expected_word_sum(nbytes)
    if kind == "managed":  # never touched: the GPU's read creates the pages
        return memory.allocate(nbytes, "uint8", "managed"), None
    if kind in ("managed_host_touched", "managed_readmostly"):  # written by the CPU
        spec = memory.with_spec("managed", read_mostly=True) if kind == "managed_readmostly" else "managed"
        arr = memory.allocate(nbytes, "uint8", spec)
        host_fill(arr)
        return arr, expected_word_sum(nbytes)
    if kind == "managed_host":  # written on the GPU (pages created there), then prefetched out
        arr = memory.allocate(nbytes, "uint8", "managed")
        gpu_fill(arr, stream)
        memory.prefetch(arr, "host", stream=stream)
        stream.synchronize()
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
    check_budget(nbytes, host)
    stream = cp.cuda.Stream(non_blocking=True)
    sink = cp.zeros(1, dtype=cp.uint64)
    extra: dict = {"label": READ_LABELS[(kind, phase)]}
    if phase == "warm":
        arr, want = _make_read_buffer(kind, phase, nbytes, stream)
        with stream:
            timing.read_sum(arr, sink)
        stream.synchronize()
        got = int(sink.get()[0]) % 2**32
        t = timing.time_graph(lambda: timing.read_sum(arr, sink))
        row = event_row("gpu_read", kind, list(t.raw_us), nbytes, protocol=t.method,
                        check=got == want, extra={**extra, "sum": got})
        arr = None
        release()
        return row
    times, checks, sums = [], [], []
    for _ in range(COLD_REPEATS):
        arr, want = _make_read_buffer(kind, phase, nbytes, stream)
        sink.fill(0)
        cp.cuda.Device().synchronize()

        def enqueue():
            if phase == "prefetch_then_read":
                memory.prefetch(arr, "gpu", stream=stream)
            timing.read_sum(arr, sink)

        times.append(time_events(stream, enqueue))
        got = int(sink.get()[0]) % 2**32
        sums.append(got)
        if want is not None:
            checks.append(got == want)
        arr = None
        release()
    return event_row("gpu_read", kind, times, nbytes, protocol="direct",
                     check=all(checks) if checks else None, extra={**extra, "sums": sums})


# ----------------------------------------------------------------------------- cpu_read

def measure_cpu_read(point: dict) -> list[dict]:
    """CPU reads after GPU writes (pages fault back), again (resident), after a prefetch, and of
    pageable and pinned host memory."""
    import cupy as cp

    nbytes = int(point["nbytes"])
    check_budget(nbytes, 2 * nbytes)
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
        gpu_fill(arr, stream)
        view = memory.host_view(arr)
        cpu(view, "after_gpu_write")
        cpu(view, "host_resident")
        view = arr = None
        release()
        arr = memory.allocate(nbytes, "uint8", "managed")
        gpu_fill(arr, stream)
        t["prefetch_d2h"].append(time_events(stream, lambda: memory.prefetch(arr, "host", stream=stream)))
        ok["prefetch_d2h"].append(True)
        cpu(memory.host_view(arr), "after_prefetch")
        arr = None
        release()
        page = np.full(nbytes, FILL_BYTE, dtype=np.uint8)
        cpu(page, "pageable")
        del page
        pin = memory.allocate(nbytes, "uint8", "pinned")
        host_fill(pin)
        cpu(memory.host_view(pin), "pinned")
        del pin
        release()

    def r(key, backend, kind, phase, protocol=None):
        return event_row(backend, kind, t[key], nbytes, protocol=protocol, check=all(ok[key]),
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
    check_budget(nbytes, nbytes)
    stream = cp.cuda.Stream(non_blocking=True)
    sink = cp.zeros(1, dtype=cp.uint64)
    touch_us, full_us, rest_us, moved_meminfo, checks = [], [], [], [], []
    touches = nbytes // stride
    for _ in range(COLD_REPEATS):
        ref = memory.allocate(nbytes, "uint8", "managed")
        host_fill(ref)
        full_us.append(time_events(stream, lambda: memory.prefetch(ref, "gpu", stream=stream)))
        ref = None
        release()
        arr = memory.allocate(nbytes, "uint8", "managed")
        host_fill(arr)
        sink.fill(0)
        cp.cuda.Device().synchronize()
        before = memory.free_bytes()
        touch_us.append(time_events(stream, lambda: touch(arr, stride, sink)))
        after = memory.free_bytes()
        moved_meminfo.append(before - after)
        checks.append(int(sink.get()[0]) == touches * WORD)
        rest_us.append(time_events(stream, lambda: memory.prefetch(arr, "gpu", stream=stream)))
        arr = None
        release()
    med = lambda xs: float(np.median(xs))  # noqa: E731
    meminfo = max(0, int(med(moved_meminfo)))
    by_prefetch = resident_from_prefetch(nbytes, med(rest_us), med(full_us))
    row = event_row("gpu_touch", "managed_host_touched", touch_us, meminfo, protocol="direct",
                    check=all(checks), extra={
                        "touches": touches, "touched_pages_bytes": touches * 4096,
                        "moved_meminfo_bytes": moved_meminfo, "moved_meminfo_median": meminfo,
                        "moved_prefetch_estimate": by_prefetch, "prefetch_full_us": full_us,
                        "prefetch_rest_us": rest_us,
                        "bytes_moved_from": "none: what crossed the link is not measured (the drop "
                                            "in free GPU memory is memory the driver reserved), so "
                                            "the row has no bandwidth"})
    # a bandwidth only from bytes that crossed the link: neither observation counts them
    for key in ("bytes_moved", "bandwidth_gbps", "pct_of_read_ceiling"):
        row.pop(key, None)
    return row


# ----------------------------------------------------------------------------- transfer

def measure_transfer(point: dict) -> list[dict]:
    """Host-to-device and device-to-host bandwidth of one method (the engine's yardstick)."""
    return transfer.measure_transfer(point["method"], point["nbytes"])


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
        release()


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


