"""The measurement method: how every time in the book is taken.

``rigorous`` (the default, :func:`time_graph`): the call is captured once into a CUDA graph and
replayed; each sample is ``[flush L2] -> event -> graph replay -> event`` on one stream, so the
CPU's launch cost is out of the number (vLLM decodes under CUDA graphs too) and every sample starts
with a cold L2. The flush *reads* a buffer twice the L2 size: a write-based flush would leave dirty
lines whose write-back the next timed kernel would pay for. One call per graph (N calls would hide
per-call costs and allow no flush between them); the price is a floor of a few microseconds, which
:func:`graph_floor_us` measures with the same method (every sweep records it in its run's
provenance, ``graph_floor``).

The stopping rule (:func:`sample_adaptively`, in nvbench's spirit): samples come in batches until
a *minimum* is reached, ``min_samples`` (25) samples or ``min_seconds`` (0.5 s) of sampling,
whichever comes first, and the relative noise, the p10-p90 spread over the median, is within
``rel_spread`` (5%); or until ``max_samples`` samples or ``max_seconds`` (the time-out). The
:class:`Timing` says which of the three stopped it (``stop``) and the noise reached; rows carry
both in ``extra["timing"]`` beside the ``samples`` column.

While timed work runs, an optional *load probe* (:func:`set_load_probe`; the sweep installs one
that reads the GPU's clocks through NVML) is called once per batch, right after the batch was
enqueued, so clocks are sampled under load rather than idle.

``hot``: the same without the flush. ``seed``: the 2024 post's protocol
(:func:`time_seed_protocol`), kept to show how much the method alone moves the numbers.
Ceilings (:func:`measure_ceilings`): read bandwidth of a read-only reduction over >= 2 GiB and
device-to-device ``cudaMemcpyAsync`` bandwidth (read + write bytes); rows report bandwidth as a
percent of the read ceiling.

Rules for ``fn``: a zero-argument callable that enqueues GPU work on CuPy's *current* stream
without synchronizing with the host. It runs once eagerly (compilation, autotuning, lazy buffers)
before capture. CuPy allocations during capture come from a private pool kept alive with the
graph; other allocators (torch) must not allocate inside ``fn``. If ``fn`` cannot be captured,
pass ``graph=False`` (protocol ``eager``). CuPy is imported inside functions.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

from lib.engine.gpu import require_cupy as _cp

GiB = 1 << 30
MiB = 1 << 20
_THREADS = 256
_READ_THREADS = 1024
_HASH = 2654435761  # Knuth's multiplicative hash: fill() without a word

_KERNELS = r"""
// Sum a buffer as 32-bit words with 16-byte loads: every byte is read exactly once, nothing is
// written except one atomic per block (the sum, so the loads cannot be optimised away). The sum
// wraps modulo 2^32 (32-bit adds: a 64-bit accumulator cost enough integer instructions per
// byte to keep this kernel below what decode kernels reach); callers compare modulo 2^32.
extern "C" __global__ void read_sum_u32x4(const uint4* __restrict__ src, unsigned long long n_vec,
                                          unsigned long long* __restrict__ out) {
    unsigned int acc = 0;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    // four independent loads in flight per thread, grid-stride
    for (; i + 3 * stride < n_vec; i += 4 * stride) {
        const uint4 a = src[i];
        const uint4 b = src[i + stride];
        const uint4 c = src[i + 2 * stride];
        const uint4 d = src[i + 3 * stride];
        acc += (a.x + a.y) + (a.z + a.w) + (b.x + b.y) + (b.z + b.w);
        acc += (c.x + c.y) + (c.z + c.w) + (d.x + d.y) + (d.z + d.w);
    }
    for (; i < n_vec; i += stride) {
        const uint4 a = src[i];
        acc += (a.x + a.y) + (a.z + a.w);
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    __shared__ unsigned int warp_sum[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) warp_sum[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < (int)(blockDim.x >> 5) ? warp_sum[lane] : 0u;
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) atomicAdd(out, (unsigned long long)acc);
    }
}

// Fill 32-bit words with `word ^ (index * mult)`: a constant (mult = 0) or a cheap hash of the
// index (no temporaries for a multi-GiB buffer).
extern "C" __global__ void fill_u32(unsigned int* __restrict__ dst, unsigned long long n,
                                    unsigned int word, unsigned int mult) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        dst[i] = word ^ ((unsigned int)i * mult);
    }
}

extern "C" __global__ void empty_kernel() {}
"""


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Timing:
    """One measurement: percentiles of per-call times in microseconds; ``method`` is the results'
    ``protocol``. For ``seed``, ``samples`` counts repetitions of the whole protocol."""

    median_us: float
    p10_us: float
    p90_us: float
    samples: int
    method: str
    raw_us: tuple[float, ...] = field(default=(), repr=False, compare=False)
    #: what ended the sampling: "noise" (target reached), "max_samples", "timeout", "fixed" (a
    #: protocol with a fixed count, e.g. the seed's); "" where no stopping rule ran
    stop: str = field(default="", compare=False)
    #: the noise target the rule aimed for (None where no rule ran)
    target: float | None = field(default=None, compare=False)

    @property
    def rel_spread(self) -> float:
        """The relative noise: (p90 - p10) / median."""
        return (self.p90_us - self.p10_us) / self.median_us if self.median_us > 0 else math.inf

    def as_row(self) -> dict:
        """The result-row columns this timing fills."""
        return {"protocol": self.method, "median_us": self.median_us, "p10_us": self.p10_us,
                "p90_us": self.p90_us, "samples": self.samples}

    def as_extra(self) -> dict:
        """What a row keeps in ``extra["timing"]``: how the stopping rule ended (empty: no rule)."""
        if not self.stop:
            return {}
        return {"stop": self.stop, "noise": self.rel_spread, "noise_target": self.target}

    def as_dict(self) -> dict:
        return {**self.as_row(), "method": self.method, **self.as_extra()}


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (NumPy's default), without needing NumPy."""
    n = len(sorted_vals)
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(samples_us: Sequence[float], method: str, *, stop: str = "",
              target: float | None = None) -> Timing:
    if not samples_us:
        raise ValueError("no samples to summarize")
    s = sorted(float(x) for x in samples_us)
    return Timing(_percentile(s, 50), _percentile(s, 10), _percentile(s, 90), len(s), method,
                  tuple(samples_us), stop=stop, target=target)


#: The stopping rule's defaults (module docstring): shared by every timing function.
MIN_SAMPLES = 25
MIN_SECONDS = 0.5
MAX_SAMPLES = 400
REL_SPREAD = 0.05
MAX_SECONDS = 5.0


class Sampled(list):
    """The samples :func:`sample_adaptively` took (a list) and, in ``stop``, what stopped it."""

    stop: str = ""


def sample_adaptively(take: Callable[[int], list[float]], *, min_samples: int = MIN_SAMPLES,
                      max_samples: int = MAX_SAMPLES, rel_spread: float = REL_SPREAD,
                      min_seconds: float = MIN_SECONDS, max_seconds: float = MAX_SECONDS,
                      batch: int = 10, clock: Callable[[], float] = time.perf_counter) -> Sampled:
    """Call ``take(k)`` (returns k samples) in batches of at most ``batch`` until the minimum is
    reached (``min_samples`` samples, or ``min_seconds`` since the start, whichever first) and
    (p90-p10)/median <= ``rel_spread``; or until ``max_samples`` samples; or, once a batch is in,
    ``max_seconds`` since the start. ``min_samples == max_samples`` asks for exactly that many
    (no early stop). The result is a list with ``.stop`` naming the reason ("noise",
    "max_samples", "timeout", "fixed")."""
    if not 1 <= min_samples <= max_samples:
        raise ValueError(f"want 1 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
    if rel_spread < 0 or max_seconds <= 0 or min_seconds < 0 or batch < 1:
        raise ValueError("rel_spread must be >= 0, min_seconds >= 0, max_seconds > 0, batch >= 1")
    t0 = clock()
    samples = Sampled()
    fixed = min_samples == max_samples
    while len(samples) < max_samples:
        n = len(samples)
        if n and not fixed:
            elapsed = clock() - t0
            if (n >= min_samples or elapsed >= min_seconds) and summarize(samples, "").rel_spread <= rel_spread:
                samples.stop = "noise"
                return samples
            if elapsed > max_seconds:
                samples.stop = "timeout"
                return samples
        k = batch if n >= min_samples else min(batch, min_samples - n)
        samples.extend(take(min(k, max_samples - n)))
    samples.stop = "fixed" if fixed else "max_samples"
    return samples


# ----------------------------------------------------------------------------- load probe

_LOAD_PROBE: list[Callable[[], object]] = []


def set_load_probe(probe: Callable[[], object] | None) -> None:
    """Install ``probe`` (or None: remove it), called once per batch of timed samples right after
    the batch is enqueued, while the GPU runs it (the sweep reads the clocks under load there).
    It must not touch the GPU's streams; an exception in it is ignored."""
    _LOAD_PROBE.clear()
    if probe is not None:
        _LOAD_PROBE.append(probe)


def _probe_load() -> None:
    for probe in _LOAD_PROBE:
        try:
            probe()
        except Exception:  # a probe never stops a measurement
            pass


# ----------------------------------------------------------------------------- per-device state

class InsufficientMemory(RuntimeError):
    """Not enough free GPU memory for a harness buffer."""


_STATE: dict[int, "_Device"] = {}


class _Device:
    """Stream, kernels and the L2-flush buffer of one device, created once."""

    def __init__(self, dev: int):
        cp = _cp()
        props = cp.cuda.runtime.getDeviceProperties(dev)
        self.dev = dev
        self.l2_bytes = int(props["l2CacheSize"])
        self.sm_count = int(props["multiProcessorCount"])
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.module = cp.RawModule(code=_KERNELS, options=("-std=c++17",))
        self.read_sum = self.module.get_function("read_sum_u32x4")
        self.fill_u32 = self.module.get_function("fill_u32")
        self.empty = self.module.get_function("empty_kernel")
        self.sink = cp.zeros(1, dtype=cp.uint64)
        self._flush_buf = None

    def grid(self, n_items: int) -> int:
        return max(1, min(self.sm_count * 8, -(-n_items // _THREADS)))

    def launch_read(self, buf, out) -> None:
        """Read every byte of ``buf`` (size a multiple of 16) on the current stream."""
        import numpy as np

        if buf.nbytes % 16:
            raise ValueError(f"the read kernel needs a multiple of 16 bytes, got {buf.nbytes}")
        n_vec = buf.nbytes // 16
        # 2 blocks of 1024 threads per SM: on H100 this read 2 GiB at 3138 GB/s against 3077 for
        # 8 blocks of 256 (a probe of both shapes, 2026-11-28); decode kernels reached 3148.
        blocks = max(1, min(2 * self.sm_count, -(-n_vec // _READ_THREADS)))
        self.read_sum((blocks,), (_READ_THREADS,), (buf, np.uint64(n_vec), out))

    def fill(self, buf, word: int | None = None) -> None:
        import numpy as np

        n = buf.nbytes // 4
        w, mult = (0, _HASH) if word is None else (word, 0)
        self.fill_u32((self.grid(n),), (_THREADS,), (buf, np.uint64(n), np.uint32(w), np.uint32(mult)))

    def flush_buffer(self):
        if self._flush_buf is None:
            cp = _cp()
            nbytes = -(-max(2 * self.l2_bytes, 8 * MiB) // MiB) * MiB
            check_free(nbytes, "L2 flush buffer")
            with self.stream:
                self._flush_buf = cp.empty(nbytes, dtype=cp.uint8)
                self.fill(self._flush_buf)  # touch every page once
            self.stream.synchronize()
        return self._flush_buf

    def flush(self) -> None:
        """Evict L2 by reading 2x its size (on the current stream)."""
        self.launch_read(self.flush_buffer(), self.sink)


def _device() -> _Device:
    cp = _cp()
    dev = cp.cuda.runtime.getDevice()
    if dev not in _STATE:
        _STATE[dev] = _Device(dev)
    return _STATE[dev]


def read_sum(buf, out) -> None:
    """The study's one read kernel, on the current stream: every byte of ``buf`` read once, its
    32-bit words summed (each block's partial sum wraps mod 2^32) and added to ``out[0]`` (uint64).
    The read ceiling and the Unified Memory chapter's GPU reads both time this kernel."""
    _device().launch_read(buf, out)


def fill(buf, word: int | None = None) -> None:
    """The one fill kernel, on the current stream: every 32-bit word set to ``word``, or (None)
    to a hash of its index."""
    _device().fill(buf, word)


def available_bytes() -> tuple[int, int]:
    """(bytes free for new allocations incl. CuPy's cached blocks, total bytes) of the device."""
    cp = _cp()
    free, total = cp.cuda.runtime.memGetInfo()
    return int(free) + int(cp.get_default_memory_pool().free_bytes()), int(total)


def _margin(total: int) -> int:
    return max(256 * MiB, total // 50)


def check_free(nbytes: int, what: str) -> None:
    """Raise InsufficientMemory unless ``nbytes`` fit with a safety margin."""
    avail, total = available_bytes()
    margin = _margin(total)
    if nbytes + margin > avail:
        raise InsufficientMemory(
            f"{what} needs {nbytes / GiB:.2f} GiB but only {avail / GiB:.2f} GiB of "
            f"{total / GiB:.1f} GiB are free (keeping {margin / GiB:.2f} GiB spare); "
            "free GPU memory (other processes?) or ask for less"
        )


# ----------------------------------------------------------------------------- timing

class CaptureError(RuntimeError):
    """``fn`` could not be captured into a CUDA graph."""


def _capture(fn: Callable[[], object], stream):
    cp = _cp()
    pool = cp.cuda.MemoryPool()
    with cp.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        try:
            fn()
        except BaseException as e:
            try:
                stream.end_capture()
            except Exception:
                pass
            raise CaptureError(
                f"capturing the call into a CUDA graph failed ({type(e).__name__}: {e}); "
                "it must not synchronize with the host or allocate through torch; "
                "use graph=False to time it eagerly"
            ) from e
        graph = stream.end_capture()
    return graph, pool


def time_graph(fn: Callable[[], object], *, flush: bool = True, warmup: int = 3,
               min_samples: int = MIN_SAMPLES, max_samples: int = MAX_SAMPLES,
               rel_spread: float = REL_SPREAD, min_seconds: float = MIN_SECONDS,
               max_seconds: float = MAX_SECONDS, graph: bool = True,
               before: Callable[[], object] | None = None) -> Timing:
    """Time ``fn`` with the study's method (module docstring); ``flush=False`` is ``hot``.

    ``before`` runs eagerly before every sample, outside the timed region, on the same stream
    (e.g. to move managed pages back to the host before a first-touch measurement). The sampling
    keywords are :func:`sample_adaptively`'s.
    """
    cp = _cp()
    st = _device()
    s = st.stream
    if flush:
        st.flush_buffer()
    with s:
        fn()  # compile, autotune, create lazy buffers
    s.synchronize()
    g, pool = _capture(fn, s) if graph else (None, None)

    def call() -> None:
        if g is not None:
            g.launch(s)
        else:
            fn()

    def take(k: int) -> list[float]:
        pairs = []
        with s:
            for _ in range(k):
                if before is not None:
                    before()
                if flush:
                    st.flush()
                start, end = cp.cuda.Event(), cp.cuda.Event()
                start.record(s)
                call()
                end.record(s)
                pairs.append((start, end))
        _probe_load()  # the batch is queued and running: clocks under load
        pairs[-1][1].synchronize()
        return [cp.cuda.get_elapsed_time(a, b) * 1e3 for a, b in pairs]

    try:
        with s:
            for _ in range(warmup):
                call()
        s.synchronize()
        samples = sample_adaptively(take, min_samples=min_samples, max_samples=max_samples,
                                    rel_spread=rel_spread, min_seconds=min_seconds,
                                    max_seconds=max_seconds)
    finally:
        s.synchronize()
        g = None  # release the graph before its memory pool
        if pool is not None:
            pool.free_all_blocks()
    method = ("rigorous" if flush else "hot") if graph else ("eager" if flush else "eager-hot")
    return summarize(samples, method, stop=samples.stop, target=rel_spread)


def time_seed_protocol(fn: Callable[[], object], *, warmup: int = 3, iters: int = 100, repeats: int = 1) -> Timing:
    """The 2024 seed's protocol: host clock around ``iters`` back-to-back eager launches after
    ``warmup``, one synchronize at the end, no L2 flush. Each repetition gives one per-launch mean
    (us); with ``repeats=1`` p10 = median = p90."""
    if iters < 1 or repeats < 1 or warmup < 0:
        raise ValueError("want iters >= 1, repeats >= 1, warmup >= 0")
    cp = _cp()
    s = _device().stream
    dev = cp.cuda.Device()
    means = []
    with s:
        for _ in range(warmup):
            fn()
        dev.synchronize()
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            dev.synchronize()
            means.append((time.perf_counter() - t0) / iters * 1e6)
        if _LOAD_PROBE:  # one more, untimed burst: the probe's host time stays out of the clock
            for _ in range(iters):
                fn()
            _probe_load()
            dev.synchronize()
    return summarize(means, "seed", stop="fixed")


def time_fn(fn: Callable[[], object], protocol: str = "rigorous", **kw) -> Timing:
    """Dispatch on a protocol name (``rigorous``, ``hot``, ``seed``, ``eager``, ``eager-hot``)."""
    if protocol == "rigorous":
        return time_graph(fn, flush=True, **kw)
    if protocol == "hot":
        return time_graph(fn, flush=False, **kw)
    if protocol == "eager":
        return time_graph(fn, flush=True, graph=False, **kw)
    if protocol == "eager-hot":
        return time_graph(fn, flush=False, graph=False, **kw)
    if protocol == "seed":
        return time_seed_protocol(fn, **kw)
    raise ValueError(f"unknown protocol {protocol!r} (rigorous, hot, seed, eager, eager-hot)")


def graph_floor_us(**kw) -> Timing:
    """The method's floor: an empty kernel timed like any call (hot, nothing to flush). Every
    sweep measures it once per run and records it in the run's provenance (``graph_floor``)."""
    st = _device()
    return time_graph(lambda: st.empty((1,), (32,), ()), flush=False, **kw)


def graph_floor_record(**kw) -> dict:
    """:func:`graph_floor_us` as a provenance entry: the timing plus what it is."""
    t = graph_floor_us(**kw)
    return {**t.as_dict(), "what": "an empty kernel in a CUDA graph, replayed between two events "
                                   "(the rigorous method without the L2 flush): the method's floor"}


# ----------------------------------------------------------------------------- ceilings

#: Largest single memcpy the harness puts in a CUDA graph. On the H100 (CUDA 13.0, driver 580) a
#: graph memcpy node of 512 MiB ran at 81% of the speed of the same cudaMemcpyAsync on a stream,
#: and nodes of 1 GiB and more at 80%, while 508 and 516 MiB nodes, copies split into 256 MiB
#: nodes, and copy *kernels* ran alike in graphs and on streams (scripts/graph_copy_probe.py, run
#: 2026-11-28; the same size-specific effect is reported for GB200 in pytorch/pytorch#191284).
#: Splitting keeps a graph's copy the same operation as the stream's.
MEMCPY_PIECE = 256 * MiB


def _memcpy_d2d(dst_ptr: int, src_ptr: int, nbytes: int, *, piece: int | None = MEMCPY_PIECE) -> None:
    """``cudaMemcpyAsync`` device to device on the current stream, in pieces of at most ``piece``
    bytes (None: one call)."""
    cp = _cp()
    rt = cp.cuda.runtime
    stream = cp.cuda.get_current_stream().ptr
    step = nbytes if not piece else int(piece)
    for off in range(0, nbytes, max(step, 1)):
        n = min(step, nbytes - off)
        rt.memcpyAsync(dst_ptr + off, src_ptr + off, n, rt.memcpyDeviceToDevice, stream)


def _fit_size(nbytes: int, floor: int, what: str) -> int:
    """``nbytes`` if it fits in free memory, else the largest power of two that does (>= floor)."""
    avail, total = available_bytes()
    room = avail - _margin(total)
    if nbytes <= room:
        return nbytes
    shrunk = 1 << (max(room, 1).bit_length() - 1)
    if shrunk < floor:
        check_free(floor, what)  # raises with the numbers
    warnings.warn(f"{what}: {nbytes / GiB:.2f} GiB do not fit in free GPU memory; using {shrunk / GiB:.2f} GiB")
    return shrunk


#: The read-ceiling kernel is checked on this many bytes (a fixed size, so CuPy's reduction that
#: checks it compiles once per machine, in the sweep's start-up, and not once per buffer size).
CHECK_BYTES = 64 * MiB


def check_read_kernel(buf) -> None:
    """Raise unless the read kernel's sum of ``buf`` (bytes, size a multiple of 16) equals CuPy's."""
    cp = _cp()
    st = _device()
    total = cp.zeros(1, dtype=cp.uint64)
    st.launch_read(buf, total)
    want = buf.view(cp.uint32).sum(dtype=cp.uint64)
    st.stream.synchronize()
    cp.cuda.get_current_stream().synchronize()
    got, want = int(total.get()[0]) % 2**32, int(want.get()) % 2**32  # wraps mod 2^32
    if got != want:
        raise RuntimeError(f"read-ceiling kernel summed {got}, cupy.sum says {want}: kernel is wrong")


def measure_ceilings(nbytes: int = 2 * GiB, **timing_kw) -> dict:
    """Read and copy bandwidth of this GPU in GB/s (10^9 bytes/s), measured now.

    Read: one read-only pass over ``nbytes`` (the kernel checked against ``cupy.sum`` on the first
    :data:`CHECK_BYTES`). Copy: ``nbytes/2`` into the other half of the buffer, counting bytes read
    plus written. ``nbytes`` that do not fit in free memory are shrunk (with a warning), to no
    less than 16x the L2 size.
    """
    cp = _cp()
    st = _device()
    if nbytes < 32:
        raise ValueError(f"nbytes must be at least 32, got {nbytes}")
    nbytes = _fit_size(int(nbytes), max(16 * st.l2_bytes, 256 * MiB), "ceiling buffer")
    nbytes -= nbytes % 32  # two halves, each a whole number of 16-byte vectors
    s = st.stream
    out = {}
    with s:
        buf = cp.empty(nbytes, dtype=cp.uint8)
        total = None
        try:
            st.fill(buf)
            check_read_kernel(buf[:CHECK_BYTES])
            read = time_graph(lambda: st.launch_read(buf, st.sink), **timing_kw)
            half = nbytes // 2
            ptr = buf.data.ptr
            copy = time_graph(lambda: _memcpy_d2d(ptr + half, ptr, half), **timing_kw)
            out = {"read_gbps": nbytes / read.median_us / 1e3, "copy_gbps": 2 * half / copy.median_us / 1e3,
                   "nbytes": nbytes, "read": read.as_dict(), "copy": {**copy.as_dict(), "bytes_copied": half},
                   "l2_bytes": st.l2_bytes}
        finally:
            s.synchronize()
            buf = total = None
            cp.get_default_memory_pool().free_all_blocks()
    return out


def _copy_buffers(nbytes: int):
    """Source (filled) and destination of a device-to-device copy, after a free-memory check."""
    cp = _cp()
    check_free(2 * nbytes, "memcpy buffers")
    with _device().stream:
        src = cp.empty(nbytes, dtype=cp.uint8)
        dst = cp.empty(nbytes, dtype=cp.uint8)
        src.fill(1)
    return src, dst


def time_memcpy_direct(nbytes: int, *, repeats: int = 20, warmup: int = 3) -> Timing:
    """One device-to-device ``cudaMemcpyAsync`` timed with plain events (no graph, no flush): the
    reference the harness is checked against."""
    cp = _cp()
    if nbytes < 1 or repeats < 1:
        raise ValueError("want nbytes >= 1 and repeats >= 1")
    s = _device().stream
    src, dst = _copy_buffers(nbytes)
    with s:
        try:
            for _ in range(warmup):
                _memcpy_d2d(dst.data.ptr, src.data.ptr, nbytes, piece=None)
            pairs = []
            for _ in range(repeats):
                a, b = cp.cuda.Event(), cp.cuda.Event()
                a.record(s)
                _memcpy_d2d(dst.data.ptr, src.data.ptr, nbytes, piece=None)
                b.record(s)
                pairs.append((a, b))
            pairs[-1][1].synchronize()
            times = [cp.cuda.get_elapsed_time(a, b) * 1e3 for a, b in pairs]
        finally:
            s.synchronize()
            del src, dst
            cp.get_default_memory_pool().free_all_blocks()
    return summarize(times, "direct")


_COPY_KERNEL = None


def _copy_kernel():
    """A plain elementwise copy kernel (``cupy.copyto`` of contiguous arrays is a memcpy)."""
    global _COPY_KERNEL
    if _COPY_KERNEL is None:
        _COPY_KERNEL = _cp().ElementwiseKernel("uint32 x", "uint32 y", "y = x", "uvm_study_copy_u32")
    return _COPY_KERNEL


def harness_selfcheck(nbytes: int = GiB) -> dict:
    """The harness against cudaMemcpy timed directly, and against itself: medians (us) and relative
    differences. ``vs_direct`` (rigorous protocol, memcpy nodes of at most :data:`MEMCPY_PIECE`)
    should be within 5% of events around one plain ``cudaMemcpyAsync``, ``repeat`` (the same
    point twice) within 3%. ``one_node`` (one graph node, slower from 512 MiB on), ``eager`` (no
    graph) and a copy *kernel* in a graph and with plain events separate method from operation.
    """
    cp = _cp()
    direct = time_memcpy_direct(nbytes)
    s = _device().stream
    src, dst = _copy_buffers(nbytes)
    try:
        fn = lambda: _memcpy_d2d(dst.data.ptr, src.data.ptr, nbytes)  # noqa: E731
        one = lambda: _memcpy_d2d(dst.data.ptr, src.data.ptr, nbytes, piece=None)  # noqa: E731
        first = time_graph(fn)
        second = time_graph(fn)
        hot = time_graph(fn, flush=False)
        one_node = time_graph(one)
        eager = time_graph(one, graph=False)
        src32, dst32 = src.view(cp.uint32), dst.view(cp.uint32)
        k = _copy_kernel()
        kernel = lambda: k(src32, dst32)  # noqa: E731
        kernel_graph = time_graph(kernel)
        kernel_direct = time_graph(kernel, graph=False, flush=False)
    finally:
        s.synchronize()
        src = dst = src32 = dst32 = None
        cp.get_default_memory_pool().free_all_blocks()
    vs_direct = first.median_us / direct.median_us - 1
    repeat = second.median_us / first.median_us - 1
    return {
        "nbytes": nbytes,
        "piece_bytes": MEMCPY_PIECE,
        "direct_us": direct.median_us,
        "harness_us": first.median_us,
        "harness_again_us": second.median_us,
        "harness_hot_us": hot.median_us,
        "harness_one_node_us": one_node.median_us,
        "harness_eager_us": eager.median_us,
        "copy_kernel_graph_us": kernel_graph.median_us,
        "copy_kernel_events_us": kernel_direct.median_us,
        "vs_direct": vs_direct,
        "hot_vs_direct": hot.median_us / direct.median_us - 1,
        "one_node_vs_direct": one_node.median_us / direct.median_us - 1,
        "eager_vs_direct": eager.median_us / direct.median_us - 1,
        "kernel_graph_vs_events": kernel_graph.median_us / kernel_direct.median_us - 1,
        "repeat": repeat,
        "vs_direct_ok": abs(vs_direct) <= 0.05,
        "repeat_ok": abs(repeat) <= 0.03,
        "floor_us": graph_floor_us().median_us,
    }
