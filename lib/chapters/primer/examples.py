"""Unified Memory by hand, with CuPy and NumPy only, on any NVIDIA GPU.

This file stands alone: copy it anywhere and run ``python examples.py``.
It imports nothing from the rest of the study. The tour touches managed
buffers from the host and from the device, prefetches them, advises the
driver about them and times every step, then prints one line per step.
Each buffer is at most an eighth of the memory the GPU has free
(``cudaMemGetInfo``) and never more than 256 MiB, so the tour is safe on a
GPU that other programs share.

``python examples.py --thrash --yes`` adds the thrashing demo: the CPU and
the GPU take turns writing the same managed pages, so every turn migrates
them. It refuses to run without both flags and asks for at most a quarter
of the free GPU memory: it thrashes between the two processors, never by
oversubscribing the GPU (that can hang a shared GPU; do not).

The CuPy calls are thin wrappers of the CUDA runtime:
``runtime.memPrefetchAsync(ptr, nbytes, device, stream)`` and
``runtime.memAdvise(ptr, nbytes, advice, device)`` take a device number,
with -1 (``cudaCpuDeviceId``) for the host.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np

try:
    import cupy as cp
except ImportError:  # the book is built without CuPy; only running needs it
    cp = None

MiB = 1 << 20
GiB = 1 << 30
CPU = -1  # cudaCpuDeviceId: "the host" wherever CUDA takes a device number
PAGE = 4096  # the smallest page: one word per page touches every page

# cudaMemoryAdvise values (the same in CUDA 12 and 13)
SET_READ_MOSTLY, UNSET_READ_MOSTLY = 1, 2
SET_PREFERRED_LOCATION, UNSET_PREFERRED_LOCATION = 3, 4
SET_ACCESSED_BY, UNSET_ACCESSED_BY = 5, 6

# cudaDeviceAttr values that decide what managed memory can do here
ATTRIBUTES = {"managed_memory": 83, "pageable_memory_access": 88,
              "concurrent_managed_access": 89,
              "pageable_memory_access_uses_host_page_tables": 100}


def _need_cupy():
    if cp is None:
        raise RuntimeError(
            "these examples need CuPy and an NVIDIA GPU: pip install "
            "cupy-cuda12x (or cupy-cuda13x, to match your CUDA driver)")
    return cp


# -------------------------------------------------------- building blocks

def device_facts() -> dict:
    """The GPU's name, its managed-memory attributes, its free memory."""
    _need_cupy()
    dev = cp.cuda.runtime.getDevice()
    name = cp.cuda.runtime.getDeviceProperties(dev)["name"]
    if isinstance(name, bytes):
        name = name.decode()
    facts = {"name": str(name), "device": dev}
    for key, code in ATTRIBUTES.items():
        facts[key] = cp.cuda.runtime.deviceGetAttribute(code, dev)
    facts["free_bytes"], facts["total_bytes"] = cp.cuda.runtime.memGetInfo()
    return facts


def safe_size(want: int, share: float) -> int:
    """``want`` bytes, cut to ``share`` of the GPU's free memory now, in
    whole 2 MiB blocks."""
    _need_cupy()
    free, _ = cp.cuda.runtime.memGetInfo()
    n = min(int(want), int(free * share)) // (2 * MiB) * (2 * MiB)
    if n < 2 * MiB:
        raise MemoryError(f"the GPU has only {free / MiB:.0f} MiB free: "
                          "too little to run this safely")
    return n


def managed_array(nbytes: int):
    """A float32 CuPy array over ``nbytes`` of new managed memory
    (cudaMallocManaged). No page is backed yet: the first processor to
    touch a page decides where it lives."""
    _need_cupy()
    ptr = cp.cuda.malloc_managed(nbytes)  # freed with its last array
    return cp.ndarray((nbytes // 4,), dtype=np.float32, memptr=ptr)


def host_view(a) -> np.ndarray:
    """A NumPy array over the same bytes as the managed CuPy array ``a``
    (no copy). The CPU reads and writes it directly; pages that sit on the
    GPU fault back to the host as it does."""
    buf = (ctypes.c_byte * a.nbytes).from_address(a.data.ptr)
    return np.frombuffer(buf, dtype=a.dtype)


def gpu_ms(work) -> float:
    """Milliseconds the GPU spends on ``work()``: two CUDA events."""
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    work()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end)


def cpu_ms(work) -> float:
    """Milliseconds of host time for ``work()``, GPU work included."""
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    work()
    cp.cuda.Device().synchronize()
    return 1e3 * (time.perf_counter() - t0)


def gpu_read(a):
    """Read every byte of ``a`` on the GPU (a sum; its value is not the
    point)."""
    return a.sum()


def gpu_touch(a, page_bytes: int = PAGE):
    """Read one float per ``page_bytes`` of ``a`` on the GPU."""
    return a[:: page_bytes // a.itemsize].sum()


def prefetch(a, where: int) -> None:
    """cudaMemPrefetchAsync of all of ``a`` to ``where`` (a device number,
    or CPU), ordered on the current stream."""
    stream = cp.cuda.get_current_stream()
    cp.cuda.runtime.memPrefetchAsync(a.data.ptr, a.nbytes, where, stream.ptr)


def advise(a, advice: int, where: int) -> None:
    """cudaMemAdvise on all of ``a`` (one of the SET_/UNSET_ values)."""
    cp.cuda.runtime.memAdvise(a.data.ptr, a.nbytes, advice, where)


def _row(step: str, nbytes: int, ms: float) -> dict:
    gbps = nbytes / (ms * 1e6) if ms > 0 else float("nan")
    return {"step": step, "ms": ms, "gbps": gbps}


# --------------------------------------------------------------- the tour

def first_touch_and_resident(nbytes: int) -> list[dict]:
    """A new managed buffer read by the GPU twice: the first read creates
    the pages on the GPU, the second finds them resident."""
    a = managed_array(nbytes)
    first = gpu_ms(lambda: gpu_read(a))
    again = gpu_ms(lambda: gpu_read(a))
    d = cp.ones(nbytes // 4, dtype=np.float32)  # device memory, to compare
    device = gpu_ms(lambda: gpu_read(d))
    return [_row("managed, first GPU touch", nbytes, first),
            _row("managed, resident", nbytes, again),
            _row("device memory", nbytes, device)]


def faults_from_host(nbytes: int) -> list[dict]:
    """The CPU writes every page, so they live in host memory; the GPU
    then reads them and each miss faults its page over the link. Then the
    same pages once more, moved by a prefetch first."""
    a = managed_array(nbytes)
    h = host_view(a)
    h[:] = 1.0  # the CPU's first touch creates every page in host memory
    faults = gpu_ms(lambda: gpu_read(a))
    h[:] = 2.0  # the CPU writes again: the pages fault back to the host
    dev = cp.cuda.runtime.getDevice()
    move = gpu_ms(lambda: prefetch(a, dev))
    read = gpu_ms(lambda: gpu_read(a))
    return [_row("GPU reads host pages (faults)", nbytes, faults),
            _row("prefetch host -> GPU", nbytes, move),
            _row("read after prefetch", nbytes, read)]


def gpu_writes_cpu_reads(nbytes: int) -> list[dict]:
    """The GPU writes a managed buffer; the CPU reads it, faulting every
    page back; reads it again, now in host memory; and once more after a
    prefetch to the host."""
    a = managed_array(nbytes)
    h = host_view(a)
    a.fill(3.0)
    back = cpu_ms(lambda: h.sum())
    again = cpu_ms(lambda: h.sum())
    a.fill(4.0)
    move = gpu_ms(lambda: prefetch(a, CPU))
    after = cpu_ms(lambda: h.sum())
    return [_row("CPU reads GPU-written pages (faults)", nbytes, back),
            _row("CPU reads again", nbytes, again),
            _row("prefetch GPU -> host", nbytes, move),
            _row("CPU reads after prefetch", nbytes, after)]


def read_mostly(nbytes: int) -> list[dict]:
    """ReadMostly: the GPU's first read makes a read-only copy on the GPU,
    later reads use it, and the host keeps its own copy, so a CPU read
    does not fault."""
    a = managed_array(nbytes)
    h = host_view(a)
    h[:] = 5.0
    advise(a, SET_READ_MOSTLY, cp.cuda.runtime.getDevice())
    cold = gpu_ms(lambda: gpu_read(a))
    warm = gpu_ms(lambda: gpu_read(a))
    host = cpu_ms(lambda: h.sum())
    return [_row("ReadMostly, first GPU read (copies)", nbytes, cold),
            _row("ReadMostly, GPU reads again", nbytes, warm),
            _row("ReadMostly, CPU reads its copy", nbytes, host)]


def remote_reads(nbytes: int) -> list[dict]:
    """PreferredLocation host + AccessedBy GPU: the pages stay in host
    memory and the GPU reads them in place over the link, every time;
    nothing migrates, nothing faults."""
    a = managed_array(nbytes)
    h = host_view(a)
    h[:] = 6.0
    advise(a, SET_PREFERRED_LOCATION, CPU)
    advise(a, SET_ACCESSED_BY, cp.cuda.runtime.getDevice())
    first = gpu_ms(lambda: gpu_read(a))
    again = gpu_ms(lambda: gpu_read(a))
    return [_row("host-preferred + AccessedBy, read", nbytes, first),
            _row("host-preferred + AccessedBy, again", nbytes, again)]


def sparse_touch(nbytes: int, stride: int = 64 * 1024) -> list[dict]:
    """Touch one word per ``stride`` bytes of host-resident pages. How much
    the GPU's memory use grows (cudaMemGetInfo) shows how much the driver
    moved: often far more than the pages touched."""
    a = managed_array(nbytes)
    host_view(a)[:] = 7.0
    cp.cuda.Device().synchronize()
    free_before, _ = cp.cuda.runtime.memGetInfo()
    ms = gpu_ms(lambda: gpu_touch(a, stride))
    free_after, _ = cp.cuda.runtime.memGetInfo()
    moved = max(free_before - free_after, 0) / MiB
    touched = (nbytes // stride) * PAGE / MiB
    step = (f"touch per {stride // 1024} KiB: {touched:.1f} MiB of pages, "
            f"GPU use +{moved:.0f} MiB")
    return [{"step": step, "ms": ms, "gbps": float("nan")}]


def tour(nbytes: int = 256 * MiB) -> list[dict]:
    """Every example above on one safe size; returns the rows it prints."""
    f = device_facts()
    n = safe_size(nbytes, 1 / 8)
    print(f"{f['name']}: ConcurrentManagedAccess "
          f"{f['concurrent_managed_access']}, PageableMemoryAccess "
          f"{f['pageable_memory_access']}; {f['free_bytes'] / GiB:.1f} of "
          f"{f['total_bytes'] / GiB:.1f} GiB free; buffers of {n / MiB:.0f} MiB")
    if not f["concurrent_managed_access"]:
        print("this GPU cannot fault on managed memory (Windows, WSL, some "
              "Jetson releases): the CPU-touch examples may fail here")
    gpu_read(cp.ones(1024, dtype=np.float32))  # load the kernels first
    gpu_touch(cp.ones(1 << 20, dtype=np.float32))
    rows = []
    for example in (first_touch_and_resident, faults_from_host,
                    gpu_writes_cpu_reads, read_mostly, remote_reads,
                    sparse_touch):
        rows += example(n)
        cp.get_default_memory_pool().free_all_blocks()
    for r in rows:
        rate = "" if r["gbps"] != r["gbps"] else f"{r['gbps']:8.1f} GB/s"
        print(f"{r['step']:<44} {r['ms']:9.2f} ms {rate}")
    return rows


# ------------------------------------------------------ thrashing, gated

def ping_pong(nbytes: int = 64 * MiB, rounds: int = 6, *,
              i_know_this_thrashes: bool = False) -> list[dict]:
    """Thrashing between two processors: the CPU and the GPU take turns
    writing every page of one managed buffer, so each turn migrates all
    of it. Compare a round with the GPU's own time for the same writes on
    resident pages. Later rounds may get cheaper: the driver notices pages
    that bounce and may map them remotely or throttle instead.

    Refuses unless ``i_know_this_thrashes`` is true, and asks for at most
    a quarter of the GPU's free memory, checked with cudaMemGetInfo before
    anything is allocated."""
    if not i_know_this_thrashes:
        raise PermissionError(
            "ping_pong migrates the same pages back and forth on purpose: "
            "call it with i_know_this_thrashes=True (or --thrash --yes)")
    _need_cupy()
    free, _ = cp.cuda.runtime.memGetInfo()
    if nbytes > free // 4:
        raise MemoryError(
            f"asked for {nbytes / MiB:.0f} MiB of managed memory; the limit "
            f"is a quarter of the {free / MiB:.0f} MiB free: ask for less")
    a = managed_array(nbytes)
    h = host_view(a)
    step = PAGE // a.itemsize

    def gpu_writes():
        a[::step] += 1.0  # one word per page, on the GPU

    def turn():
        h[::step] += 1.0  # the CPU writes: every page faults to the host
        gpu_writes()  # then the GPU does: every page faults back

    a.fill(0.0)
    rows = [_row("GPU writes, pages resident", nbytes, gpu_ms(gpu_writes))]
    for r in range(rounds):
        label = f"round {r + 1}: CPU, then GPU, write every page"
        rows.append(_row(label, nbytes, cpu_ms(turn)))
    if not np.allclose(h[::step], 1.0 + 2.0 * rounds):
        raise RuntimeError("the buffer lost a write: this should not happen")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256,
                   help="buffer size for the tour (cut to 1/8 of free memory)")
    p.add_argument("--thrash", action="store_true",
                   help="also run the ping-pong thrashing demo")
    p.add_argument("--yes", action="store_true",
                   help="confirm the thrashing demo")
    args = p.parse_args(argv)
    if args.thrash and not args.yes:
        p.error("--thrash migrates the same pages back and forth on "
                "purpose; add --yes to run it")
    tour(args.mib * MiB)
    if args.thrash:
        n = safe_size(64 * MiB, 1 / 4)
        for r in ping_pong(n, i_know_this_thrashes=True):
            print(f"{r['step']:<44} {r['ms']:9.2f} ms {r['gbps']:8.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
