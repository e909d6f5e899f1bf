"""Host <-> GPU transfers timed with CUDA events: the bus yardstick two chapters share.

:func:`measure_transfer` times ``cudaMemcpyAsync`` (device <-> pinned or pageable host) or
``cudaMemPrefetchAsync`` (managed), each direction ``COPY_REPEATS`` times, one call between two
events per sample (a transfer is not replayed in a graph), then reads the device copy back with
:func:`lib.engine.timing.read_sum` to check every byte arrived. Buffers stay far below free memory
(:func:`budget_problem`). CuPy is imported inside functions.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import numpy as np

from lib.engine import memory

GiB = 1 << 30
#: A point's GPU buffers may use at most this share of the GPU's free memory ("far below").
GPU_SHARE = 0.25
#: ... and its host buffers at most this share of the host's available memory.
HOST_SHARE = 0.5
COPY_REPEATS = 10
#: Every buffer is filled with this byte, so each 32-bit word is :data:`WORD`.
FILL_BYTE = 1
WORD = 0x01010101
METHODS = ["memcpy_pinned", "memcpy_pageable", "prefetch"]


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


def check_budget(gpu_bytes: int, host_bytes: int = 0) -> None:
    """Raise unless the buffers fit (:func:`budget_problem`), after emptying CuPy's pool."""
    import cupy as cp

    cp.get_default_memory_pool().free_all_blocks()
    why = budget_problem(gpu_bytes, host_bytes, free_gpu=memory.free_bytes(),
                         free_host=memory.host_available_bytes() if host_bytes else 0)
    if why:
        raise RuntimeError(why)


def expected_word_sum(nbytes: int) -> int:
    """What :func:`lib.engine.timing.read_sum` gives for a filled buffer, modulo 2^32."""
    return (nbytes // 4) * WORD % 2**32


def read_ok(arr, stream, sink) -> bool:
    """Read ``arr`` on ``stream`` (sink zeroed first) and compare the sum with a filled buffer's."""
    from lib.engine import timing

    sink.fill(0)
    with stream:
        timing.read_sum(arr, sink)
    stream.synchronize()
    return int(sink.get()[0]) % 2**32 == expected_word_sum(arr.nbytes)


def time_events(stream, enqueue: Callable[[], Any]) -> float:
    """Microseconds between two events around what ``enqueue`` puts on ``stream``."""
    import cupy as cp

    a, b = cp.cuda.Event(), cp.cuda.Event()
    with stream:
        a.record(stream)
        enqueue()
        b.record(stream)
    b.synchronize()
    return cp.cuda.get_elapsed_time(a, b) * 1e3


def host_fill(arr) -> None:
    """Fill managed or pinned memory from the CPU (managed pages are created on the host)."""
    memory.host_view(arr).reshape(-1).view(np.uint8).fill(FILL_BYTE)


def gpu_fill(arr, stream) -> None:
    """Fill ``arr`` with :data:`WORD` on the GPU and wait."""
    from lib.engine import timing

    with stream:
        timing.fill(arr, WORD)
    stream.synchronize()


def release() -> None:
    """Free what the last measurement left: garbage, then CuPy's cached blocks."""
    import cupy as cp

    gc.collect()
    cp.cuda.Device().synchronize()
    cp.get_default_memory_pool().free_all_blocks()


def event_row(backend: str, memory_kind: str, times_us: list[float], nbytes: int, *,
              protocol: str | None, check: bool | None, extra: dict) -> dict:
    """A result row from per-sample times (``protocol`` None: a host clock took them)."""
    from lib.engine.timing import summarize

    t = summarize(times_us, protocol or "host_clock")
    return {"backend": backend, "memory_kind": memory_kind, "median_us": t.median_us,
            "p10_us": t.p10_us, "p90_us": t.p90_us, "samples": t.samples, "bytes_moved": int(nbytes),
            "protocol": protocol, "check_passed": check,
            "extra": {"timer": "cuda_events" if protocol else "host_clock",
                      "samples_us": [round(x, 3) for x in times_us], **extra}}


def measure_transfer(method: str, nbytes: int) -> list[dict]:
    """Host-to-device and device-to-host rows (in that order) of one method of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    import cupy as cp

    nbytes = int(nbytes)
    stream = cp.cuda.Stream(non_blocking=True)
    rt = cp.cuda.runtime
    h2d, d2h = [], []
    host = None
    if method == "prefetch":
        check_budget(nbytes, nbytes)
        dev = memory.allocate(nbytes, "uint8", "managed")
        host_fill(dev)
        for _ in range(COPY_REPEATS):
            h2d.append(time_events(stream, lambda: memory.prefetch(dev, "gpu", stream=stream)))
            d2h.append(time_events(stream, lambda: memory.prefetch(dev, "host", stream=stream)))
        memory.prefetch(dev, "gpu", stream=stream)
        kind, backend = "managed", "prefetch"
    else:
        check_budget(nbytes, 2 * nbytes)
        dev = memory.allocate(nbytes, "uint8", "device")
        if method == "memcpy_pinned":
            host = memory.allocate(nbytes, "uint8", "pinned")
            host_fill(host)
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
            h2d.append(time_events(stream, lambda: copy(dev.data.ptr, hptr, rt.memcpyHostToDevice)))
            d2h.append(time_events(stream, lambda: copy(hptr, dev.data.ptr, rt.memcpyDeviceToHost)))
    ok = read_ok(dev, stream, cp.zeros(1, dtype=cp.uint64))
    rows = [event_row(backend, kind, ts, nbytes, protocol="direct", check=ok, extra={"direction": d})
            for d, ts in (("h2d", h2d), ("d2h", d2h))]
    dev = host = None
    release()
    return rows
