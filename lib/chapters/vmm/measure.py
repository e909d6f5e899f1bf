"""The measurements of the chapter "Contiguous KV without fragmentation: CUDA virtual memory".

The experiment ``vmm_kv`` (registered in :mod:`lib.harness.experiments`) is a union of two grids, told
apart by the point parameter ``measurement``:

``kernel``  One decode problem, three ways. The KV cache is built as a fragmented block pool in
    device memory (placement ``shuffled``: every sequence's blocks scattered over the pool) and
    our kernel reads it through the block table (``own-auto-paged``: what PagedAttention does).
    The same kernel with ``contiguous`` addressing then reads the pool at consecutive positions
    (``own-auto-contiguous`` on device memory: the layout a max-length reservation gives, here
    for free because every sequence has the same length; on a shuffled pool those positions hold
    other blocks than the sequence's own, so its output is checked against the reference of the
    blocks it reads, :func:`lib.engine.measure.effective_tables`). Finally two :class:`lib.engine.vmm.KVArena`
    (one for K, one for V, classic layout) give every sequence a slot of virtual addresses
    reserved for ``reserve_tokens`` tokens; each slot is grown (physical chunks mapped on
    demand) only as far as its sequence needs, the sequence's blocks are copied in in logical
    order, and the contiguous kernel reads both arenas through one base pointer each, sequence
    ``s`` starting at block ``s * blocks_per_slot`` (the vAttention idea). Every output is
    NaN-poisoned, checked against the float64 reference, then timed with the study's rigorous
    protocol (:func:`lib.engine.timing.time_fn`).
``map``  What the driver calls cost per chunk, for chunks of 1-32 times the allocation
    granularity. An arena with one chunk per slot is grown slot by slot (``grow_new``:
    ``cuMemCreate`` + ``cuMemMap`` + ``cuMemSetAccess``), released slot by slot (``unmap``:
    ``cuMemUnmap``, the handle parked on the arena's free list), grown again from the free list
    (``grow_reuse``: ``cuMemMap`` + ``cuMemSetAccess``, no create), released again, and its
    handles given back one at a time (``release_handle``: ``cuMemRelease``). Each call is timed
    with the host clock (these are synchronous host calls; the GPU is idle while they run).
    Data written before a release must be read back after the regrowth (a reused chunk keeps its
    bytes), which checks the mappings.

Rows follow :mod:`lib.harness.results`; point parameters that are not schema columns land in ``extra``.
The arena logic that needs no GPU (:func:`build_arenas`, :func:`map_cycle`) takes any driver of
the :class:`lib.engine.vmm.VmmDriver` protocol, so tests run it on :class:`lib.engine.vmm.FakeVmmDriver`.

CuPy and cuda-python are imported inside functions: this module imports on a CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from lib.engine.vmm import KVArena, round_up

MiB = 1 << 20
GiB = 1 << 30

EXPERIMENT = "vmm_kv"
MEASUREMENTS = ("kernel", "map")

#: The three ways the kernel point reads the cache: (backend, memory_kind, placement).
PAGED = ("own-auto-paged", "device", "shuffled")
DEVICE_CONTIGUOUS = ("own-auto-contiguous", "device", "contiguous")
VMM_CONTIGUOUS = ("own-auto-contiguous", "vmm", "contiguous")

#: The map measurement's operations, in the order each round performs them.
MAP_OPERATIONS = ("grow_new", "unmap", "grow_reuse", "release_handle")
MAP_LABELS = {
    "grow_new": "grow, new chunk (cuMemCreate + cuMemMap + cuMemSetAccess)",
    "unmap": "release to the free list (cuMemUnmap)",
    "grow_reuse": "grow from the free list (cuMemMap + cuMemSetAccess)",
    "release_handle": "give the chunk back (cuMemRelease)",
}
#: A map point never holds more than this much physical memory at once ...
MAP_MAX_BYTES = 2 * GiB
#: ... and by default stops at this much (or MAP_MAX_CHUNKS chunks, whichever comes first).
MAP_BUDGET_MIB = 1024
MAP_MAX_CHUNKS = 64
#: Samples of the two overhead floors (an arena call that maps nothing; one wrapped driver call).
FLOOR_SAMPLES = 200

#: A kernel point needs about this many times its K+V bytes free: the pool, its classic copy
#: (plus the transposed temporary that makes it), and the two arenas.
KERNEL_MEMORY_FACTOR = 5

#: The kernel grid's (batch, tokens) points: the issue's 32 x 4096, and the same number of tokens
#: as 8 longer sequences.
KERNEL_POINTS = [(32, 4096), (8, 16384)]
#: The grid. Kernel: fp16, head 128, MHA 32:32 and GQA 32:8, block sizes 16 and 64, chunks of one
#: granularity (2 MiB on H100/H200), slots reserved for 32k tokens. Map: chunks of 1-32 x the
#: granularity.
KERNEL_GRID = [{
    "measurement": ["kernel"],
    "batch_size": [b],
    "seq_len": [n],
    "num_heads": [32],
    "num_kv_heads": [32, 8],
    "head_size": [128],
    "block_size": [16, 64],
    "dtype": ["float16"],
    "chunk_multiple": [1],
    "reserve_tokens": [32768],
    "protocol": ["rigorous"],
    "seed": [0],
} for b, n in KERNEL_POINTS]
MAP_GRID = {
    "measurement": ["map"],
    "chunk_multiple": [1, 2, 4, 8, 16, 32],
    "rounds": [4],
    "max_chunks": [MAP_MAX_CHUNKS],
    "budget_mib": [MAP_BUDGET_MIB],
}
GRID = [*KERNEL_GRID, MAP_GRID]


# ----------------------------------------------------------------------------- point parameters

def _int(point: dict, key: str, minimum: int = 1) -> int:
    v = point.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{key} must be an int >= {minimum}, got {v!r}")
    return int(v)


def kernel_shape(point: dict) -> dict:
    """The kernel point's parameters as plain numbers (validated)."""
    sh = {k: _int(point, k) for k in ("batch_size", "seq_len", "num_heads", "num_kv_heads", "head_size",
                                      "block_size", "chunk_multiple", "reserve_tokens")}
    if sh["num_heads"] % sh["num_kv_heads"]:
        raise ValueError(f"num_heads={sh['num_heads']} must be a multiple of num_kv_heads={sh['num_kv_heads']}")
    if sh["reserve_tokens"] < sh["seq_len"]:
        raise ValueError(f"reserve_tokens={sh['reserve_tokens']} is shorter than the sequences "
                         f"({sh['seq_len']} tokens): each slot must reserve at least a whole sequence")
    sh["dtype"] = str(point.get("dtype", "float16"))
    sh["protocol"] = str(point.get("protocol", "rigorous"))
    sh["seed"] = _int(point, "seed", minimum=0)
    return sh


# ----------------------------------------------------------------------------- arena geometry

def classic_block_bytes(num_kv_heads: int, head_size: int, block_size: int, itemsize: int) -> int:
    """Bytes of one block of K (or of V) in the classic layout: KV heads x head x block x element."""
    for name, v in (("num_kv_heads", num_kv_heads), ("head_size", head_size),
                    ("block_size", block_size), ("itemsize", itemsize)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(num_kv_heads) * int(head_size) * int(block_size) * int(itemsize)


def slot_geometry(slot_blocks: int, block_bytes: int, chunk_bytes: int) -> tuple[int, int]:
    """(slot_bytes, blocks_per_slot) of a slot holding at least ``slot_blocks`` blocks.

    A slot must be whole chunks (the arena maps chunks) *and* whole blocks (the kernel addresses
    block ``s * blocks_per_slot + j`` from one base pointer), so it is rounded up to a multiple
    of both: to their least common multiple.
    """
    for name, v in (("slot_blocks", slot_blocks), ("block_bytes", block_bytes), ("chunk_bytes", chunk_bytes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    unit = math.lcm(int(block_bytes), int(chunk_bytes))
    slot_bytes = round_up(int(slot_blocks) * int(block_bytes), unit)
    return slot_bytes, slot_bytes // int(block_bytes)


def check_mapped_reads(seq_first: Sequence[int], seq_lens: Sequence[int], block_size: int,
                       blocks_per_slot: int, mapped_blocks: Sequence[int]) -> None:
    """Every block the contiguous kernel reads must lie in its sequence's slot and be mapped.

    Sequence ``s`` reads blocks ``seq_first[s] .. seq_first[s] + ceil(len / block_size) - 1``;
    its slot starts at block ``s * blocks_per_slot`` and has ``mapped_blocks[s]`` blocks mapped.
    A read of an unmapped address is not a wrong answer but an illegal-address fault that ends
    the CUDA context, so this is checked on the host before any launch.
    """
    first = np.asarray(seq_first, dtype=np.int64)
    lens = np.asarray(seq_lens, dtype=np.int64)
    mapped = np.asarray(mapped_blocks, dtype=np.int64)
    if not (first.shape == lens.shape == mapped.shape) or first.ndim != 1:
        raise ValueError(f"seq_first {first.shape}, seq_lens {lens.shape} and mapped_blocks "
                         f"{mapped.shape} must be 1-D, one entry per sequence")
    if block_size < 1 or blocks_per_slot < 1:
        raise ValueError("block_size and blocks_per_slot must be >= 1")
    need = -(-lens // int(block_size))
    start = np.arange(first.size, dtype=np.int64) * int(blocks_per_slot)
    bad = (first < start) | (first + need > start + np.minimum(mapped, blocks_per_slot))
    if bad.any():
        s = int(np.argmax(bad))
        raise ValueError(
            f"sequence {s} would read blocks {int(first[s])}..{int(first[s] + need[s]) - 1}, but its "
            f"slot maps only blocks {int(start[s])}..{int(start[s] + mapped[s]) - 1}: an unmapped read "
            "would end the CUDA context")


@dataclass
class ArenaPair:
    """Two arenas (K and V) with one slot per sequence, grown to each sequence's length."""

    k: KVArena
    v: KVArena
    block_bytes: int
    blocks_per_slot: int
    seq_blocks: np.ndarray  # blocks each sequence uses
    grow_s: float           # host time of every grow call, both arenas

    @property
    def seq_first(self) -> np.ndarray:
        """int32: the first block of each sequence in the full view (its slot's first block)."""
        return (np.arange(self.seq_blocks.size, dtype=np.int64) * self.blocks_per_slot).astype(np.int32)

    def mapped_blocks(self) -> np.ndarray:
        """Blocks mapped per slot (the same in K and V)."""
        return np.array([self.k.mapped_bytes(s) // self.block_bytes for s in range(self.k.num_slots)],
                        dtype=np.int64)

    def close(self) -> None:
        """Close both arenas, even if the first close fails (then raise its error)."""
        try:
            self.k.close()
        finally:
            self.v.close()

    def stats(self) -> dict:
        """Both arenas' counts summed (the geometry fields are the same in both)."""
        a, b = self.k.stats(), self.v.stats()
        same = ("num_slots", "slot_bytes", "chunk_bytes", "granularity")
        return {k: (a[k] if k in same else a[k] + b[k]) for k in a}


def build_arenas(driver: Any, seq_lens: Sequence[int], *, block_size: int, block_bytes: int,
                 chunk_bytes: int, reserve_tokens: int, device: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> ArenaPair:
    """Reserve one slot per sequence for ``reserve_tokens`` tokens in two arenas; grow each slot
    to its sequence's blocks. On any failure both arenas are closed before the error propagates.
    """
    lens = np.asarray(list(seq_lens), dtype=np.int64)
    if lens.ndim != 1 or lens.size == 0 or (lens < 1).any():
        raise ValueError("seq_lens must be a non-empty list of positive lengths")
    if reserve_tokens < int(lens.max()):
        raise ValueError(f"reserve_tokens={reserve_tokens} < the longest sequence ({int(lens.max())})")
    slot_bytes, per_slot = slot_geometry(-(-int(reserve_tokens) // block_size), block_bytes, chunk_bytes)
    blocks = -(-lens // block_size)
    arenas: list[KVArena] = []
    try:
        for _ in ("k", "v"):
            arenas.append(KVArena(driver, int(lens.size), slot_bytes, chunk_bytes, device=device))
        t0 = clock()
        for a in arenas:
            for s, nb in enumerate(blocks.tolist()):
                a.grow(s, nb * block_bytes)
        grow_s = clock() - t0
    except BaseException:
        for a in arenas:
            try:
                a.close()
            except Exception:
                pass
        raise
    return ArenaPair(arenas[0], arenas[1], block_bytes, per_slot, blocks, grow_s)


# ----------------------------------------------------------------------------- map timing (any driver)

def map_chunks(chunk_bytes: int, *, budget_bytes: int = MAP_BUDGET_MIB * MiB,
               max_chunks: int = MAP_MAX_CHUNKS) -> int:
    """How many chunks a map point holds at once: as many as fit the budget, at most ``max_chunks``.

    Raises if the budget is above :data:`MAP_MAX_BYTES` or cannot hold one chunk.
    """
    if chunk_bytes < 1 or max_chunks < 1:
        raise ValueError("chunk_bytes and max_chunks must be >= 1")
    if budget_bytes > MAP_MAX_BYTES:
        raise ValueError(f"a map point may hold at most {MAP_MAX_BYTES // GiB} GiB at once; "
                         f"budget {budget_bytes / GiB:.2f} GiB is more")
    if chunk_bytes > budget_bytes:
        raise ValueError(f"one chunk of {chunk_bytes / MiB:.0f} MiB exceeds the budget of "
                         f"{budget_bytes / MiB:.0f} MiB")
    return int(min(max_chunks, budget_bytes // chunk_bytes))


def _timed(fn: Callable[[], Any], clock: Callable[[], float]) -> float:
    t0 = clock()
    fn()
    return (clock() - t0) * 1e6


def map_cycle(driver: Any, chunk_bytes: int, num_chunks: int, rounds: int, *, device: int = 0,
              clock: Callable[[], float] = time.perf_counter,
              idle: Callable[[], None] | None = None,
              after_grow: Callable[[KVArena], None] | None = None,
              after_regrow: Callable[[KVArena], bool] | None = None) -> dict:
    """Time every map operation per chunk over ``rounds`` rounds of ``num_chunks`` chunks.

    ``idle()`` runs before each phase (the GPU must be idle when driver calls are timed);
    ``after_grow(arena)`` may write to the freshly mapped chunks; ``after_regrow(arena)`` checks
    that the chunks grown from the free list still hold those bytes and returns the verdict.
    Returns ``{"samples_us": {op: [...]}, "floors_us": {...}, "counts": {...}, "check": bool|None}``.
    The arena is always closed; its counters must show every handle created was released.
    """
    if num_chunks < 1 or rounds < 1:
        raise ValueError("num_chunks and rounds must be >= 1")
    idle = idle or (lambda: None)
    samples: dict[str, list[float]] = {op: [] for op in MAP_OPERATIONS}
    checks: list[bool] = []
    t0 = clock()
    arena = KVArena(driver, num_chunks, chunk_bytes, chunk_bytes, device=device)
    reserve_us = (clock() - t0) * 1e6
    try:
        for _ in range(rounds):
            idle()
            for s in range(num_chunks):
                samples["grow_new"].append(_timed(lambda: arena.grow(s, chunk_bytes), clock))
            if after_grow is not None:
                after_grow(arena)
            idle()
            for s in range(num_chunks):
                samples["unmap"].append(_timed(lambda: arena.release(s), clock))
            for s in range(num_chunks):
                samples["grow_reuse"].append(_timed(lambda: arena.grow(s, chunk_bytes), clock))
            if after_regrow is not None:
                checks.append(bool(after_regrow(arena)))
            idle()
            for s in range(num_chunks):
                samples["unmap"].append(_timed(lambda: arena.release(s), clock))
            for left in range(num_chunks - 1, -1, -1):
                samples["release_handle"].append(_timed(lambda: arena.trim(keep=left), clock))
        # the two floors: an arena grow that maps nothing, and one wrapped driver call
        arena.grow(0, chunk_bytes)
        noop = [_timed(lambda: arena.grow(0, chunk_bytes), clock) for _ in range(FLOOR_SAMPLES)]
        call = [_timed(lambda: driver.granularity(device), clock) for _ in range(FLOOR_SAMPLES)]
        arena.release(0)
    finally:
        arena.close()
    st = arena.stats()  # after close: every handle must have come back
    counts = {k: st[k] for k in ("handles_created", "handles_reused", "handles_released",
                                 "chunks_mapped", "chunks_unmapped", "failed_grows", "live_handles")}
    want_created = rounds * num_chunks + 1  # +1: the floor's chunk
    ok_counts = (counts["handles_created"] == want_created
                 and counts["handles_reused"] == rounds * num_chunks
                 and counts["handles_released"] == want_created
                 and counts["live_handles"] == 0 and counts["failed_grows"] == 0)
    check = ok_counts and (all(checks) if checks else True)
    return {"samples_us": samples, "reserve_us": reserve_us,
            "floors_us": {"noop_grow": float(np.median(noop)), "driver_call": float(np.median(call))},
            "counts": counts, "check": check, "data_checked": bool(checks)}


# ----------------------------------------------------------------------------- on the GPU

def _cupy():
    from lib.engine.gpu import require_gpu

    require_gpu()
    import cupy

    return cupy


def _plan_text(plan) -> str:
    return (f"v{plan.version} tile={plan.tile} partition={plan.partition_size} "
            f"parts={plan.max_partitions}")


def _reference(case, addressing: str, refs: dict):
    """Float64 reference of the blocks an addressing mode reads on the case's pool (cached)."""
    cp = _cupy()
    from lib.engine import measure as bench
    from lib.engine.reference import decode_attention_reference

    if addressing not in refs:
        p = case.problem
        refs[addressing] = decode_attention_reference(
            case.q, case.kpool, case.vpool, bench.effective_tables(case, addressing), p.seq_lens,
            scale=case.scale, dtype_name=p.dtype, xp=cp)
    return refs[addressing]


def _time_own(case, name: str, protocol: str, placement: str, memory_kind: str, refs: dict) -> dict:
    """Our kernel through the backend registry on the case's own (device) pool: check, then time."""
    cp = _cupy()
    from lib.engine import backends as B
    from lib.engine import measure as bench
    from lib.engine import timing
    from lib.engine.reference import relative_error

    p = case.problem
    backend = B.get_backend(name)
    out = case.poisoned_output()
    launch = backend.prepare(case, out)
    launch()
    cp.cuda.Device().synchronize()
    err = relative_error(out, _reference(case, backend.addressing, refs), dtype_name=p.dtype)
    t = timing.time_fn(launch, protocol)
    return {"backend": name, "version": str(backend.version), "addressing": backend.addressing,
            "memory_kind": memory_kind, "placement": placement, "bytes_moved": p.bytes_moved,
            "rel_error": err, "check_passed": bool(err <= bench.TOLERANCE[p.dtype]), **t.as_row(),
            "extra": {"plan": _plan_text(launch.plan),
                      "pool_bytes": int(case.kpool.nbytes + case.vpool.nbytes)}}


def measure_kernel(point: dict) -> list[dict]:
    """One kernel point: paged on a fragmented pool, contiguous on device memory, contiguous on VMM."""
    cp = _cupy()
    from lib.engine import backends as B
    from lib.engine import measure as bench
    from lib.engine import kernels
    from lib.engine import kvcache
    from lib.engine import timing
    from lib.engine import validation
    from lib.engine.reference import relative_error
    from lib.engine.vmm import CudaVmmDriver

    sh = kernel_shape(point)
    if sh["protocol"] not in ("rigorous", "hot"):
        raise ValueError(f"protocol must be rigorous or hot, got {sh['protocol']!r}")
    problem = B.DecodeProblem.uniform(
        sh["batch_size"], sh["seq_len"], num_heads=sh["num_heads"], num_kv_heads=sh["num_kv_heads"],
        head_size=sh["head_size"], block_size=sh["block_size"], dtype=sh["dtype"],
        placement="shuffled", seed=sh["seed"])
    kv_bytes = kvcache.cache_bytes(problem.seq_lens, problem.num_kv_heads, problem.head_size, problem.dtype)
    cp.get_default_memory_pool().free_all_blocks()
    timing.check_free(KERNEL_MEMORY_FACTOR * kv_bytes, f"vmm_kv kernel point ({kv_bytes / GiB:.2f} GiB of K+V)")

    case = B.DecodeCase.build(problem)
    refs: dict = {}
    rows = [_time_own(case, PAGED[0], sh["protocol"], PAGED[2], PAGED[1], refs),
            _time_own(case, DEVICE_CONTIGUOUS[0], sh["protocol"], DEVICE_CONTIGUOUS[2], DEVICE_CONTIGUOUS[1],
                      refs)]

    k_cl, v_cl = case.layout("classic")
    dev = cp.cuda.Device().id
    block_bytes = classic_block_bytes(problem.num_kv_heads, problem.head_size, problem.block_size,
                                      problem.itemsize)
    driver = CudaVmmDriver(dev)
    pair = None
    try:
        gran = driver.granularity()
        chunk = gran * sh["chunk_multiple"]
        pair = build_arenas(driver, problem.seq_lens, block_size=problem.block_size,
                            block_bytes=block_bytes, chunk_bytes=chunk,
                            reserve_tokens=sh["reserve_tokens"], device=dev)
        t0 = time.perf_counter()
        for s, nb in enumerate(pair.seq_blocks.tolist()):  # each sequence's blocks, in logical order
            idx = cp.asarray(case.tables.tables[s, :nb].astype(np.int64))
            pair.k.slot_view(s, k_cl.dtype, (nb,) + tuple(k_cl.shape[1:]))[...] = k_cl[idx]
            pair.v.slot_view(s, v_cl.dtype, (nb,) + tuple(v_cl.shape[1:]))[...] = v_cl[idx]
        cp.cuda.Device().synchronize()
        copy_s = time.perf_counter() - t0
        total_blocks = problem.num_seqs * pair.blocks_per_slot
        k_vmm = pair.k.full_view(k_cl.dtype, (total_blocks,) + tuple(k_cl.shape[1:]))
        v_vmm = pair.v.full_view(v_cl.dtype, (total_blocks,) + tuple(v_cl.shape[1:]))
        out = case.poisoned_output()
        # the same checks a backend makes before it launches, and the one only VMM needs
        validation.validate_cache_arrays(case.q, k_vmm, v_vmm, out, layout="classic",
                                         num_kv_heads=problem.num_kv_heads,
                                         block_size=problem.block_size, dtype=problem.dtype)
        seq_first = pair.seq_first
        validation.validate_contiguous_range(seq_first, problem.seq_lens, problem.block_size, total_blocks)
        check_mapped_reads(seq_first, problem.seq_lens, problem.block_size, pair.blocks_per_slot,
                           pair.mapped_blocks())
        plan = kernels.plan_launch(
            dtype=problem.dtype, block_size=problem.block_size, head_size=problem.head_size,
            num_heads=problem.num_heads, num_kv_heads=problem.num_kv_heads, num_seqs=problem.num_seqs,
            max_seq_len=problem.max_seq_len, addressing="contiguous", version="auto",
            num_sms=cp.cuda.Device().attributes["MultiProcessorCount"])
        launch = kernels.OwnDecode(plan, q=case.q, k_cache=k_vmm, v_cache=v_vmm,
                                   block_tables=case.device_tables, seq_first=cp.asarray(seq_first),
                                   seq_lens=case.device_seq_lens, out=out, scale=case.scale)
        cp.cuda.Device().synchronize()
        launch()
        cp.cuda.Device().synchronize()
        # the slots hold each sequence's blocks in logical order: the paged (logical) reference
        err = relative_error(out, _reference(case, "paged", refs), dtype_name=problem.dtype)
        t = timing.time_fn(launch, sh["protocol"])
        st = pair.stats()
        rows.append({
            "backend": VMM_CONTIGUOUS[0], "version": "auto", "addressing": "contiguous",
            "memory_kind": VMM_CONTIGUOUS[1], "placement": VMM_CONTIGUOUS[2],
            "bytes_moved": problem.bytes_moved, "rel_error": err,
            "check_passed": bool(err <= bench.TOLERANCE[problem.dtype]), **t.as_row(),
            "extra": {"plan": _plan_text(plan), "granularity": gran, "chunk_bytes": chunk,
                      "block_bytes": block_bytes, "blocks_per_slot": pair.blocks_per_slot,
                      "slot_bytes": st["slot_bytes"], "reserved_bytes": st["reserved_bytes"],
                      "mapped_bytes": st["mapped_bytes"], "used_bytes": st["used_bytes"],
                      "internal_waste_bytes": st["internal_waste_bytes"],
                      "kv_bytes": int(kv_bytes), "grow_ms": 1e3 * pair.grow_s, "copy_ms": 1e3 * copy_s,
                      "arena_stats": st}})
    finally:
        cp.cuda.Device().synchronize()  # no kernel may still read the arenas
        try:
            if pair is not None:
                pair.close()
        finally:
            driver.close()
    return rows


def measure_map(point: dict) -> list[dict]:
    """One map point: per-chunk times of every operation for one chunk size."""
    cp = _cupy()
    from lib.engine import timing
    from lib.engine.timing import summarize
    from lib.engine.vmm import CudaVmmDriver

    multiple = _int(point, "chunk_multiple")
    rounds = _int(point, "rounds")
    budget = _int(point, "budget_mib") * MiB
    dev = cp.cuda.Device().id
    driver = CudaVmmDriver(dev)
    try:
        gran = driver.granularity()
        chunk = gran * multiple
        n = map_chunks(chunk, budget_bytes=budget, max_chunks=_int(point, "max_chunks"))
        cp.get_default_memory_pool().free_all_blocks()  # VMM memory comes from outside CuPy's pool
        timing.check_free(n * chunk, f"vmm_kv map point ({n} chunks of {chunk / MiB:.0f} MiB)")

        def idle() -> None:
            cp.cuda.Device().synchronize()

        def after_grow(arena: KVArena) -> None:
            for s in range(arena.num_slots):
                arena.slot_view(s, cp.int32).fill(s + 1)
            cp.cuda.Device().synchronize()

        def after_regrow(arena: KVArena) -> bool:
            seen = []
            for s in range(arena.num_slots):
                v = arena.slot_view(s, cp.int32)
                lo, hi = int(v.min()), int(v.max())
                seen.append(lo if lo == hi else -1)
            return sorted(seen) == list(range(1, arena.num_slots + 1))

        res = map_cycle(driver, chunk, n, rounds, device=dev, idle=idle, after_grow=after_grow,
                        after_regrow=after_regrow)
    finally:
        driver.close()
    rows = []
    for op in MAP_OPERATIONS:
        xs = res["samples_us"][op]
        t = summarize(xs, "direct")
        rows.append({
            "backend": op, "memory_kind": "vmm", "protocol": "direct", "median_us": t.median_us,
            "p10_us": t.p10_us, "p90_us": t.p90_us, "samples": t.samples, "bytes_moved": chunk,
            "check_passed": bool(res["check"]),
            "extra": {"timer": "host_clock", "granularity": gran, "chunk_bytes": chunk, "chunks": n,
                      "operation": MAP_LABELS[op], "reserve_us": res["reserve_us"],
                      "noop_grow_us": res["floors_us"]["noop_grow"],
                      "driver_call_us": res["floors_us"]["driver_call"],
                      "counts": res["counts"], "samples_us": [round(x, 2) for x in xs]}})
    return rows


# ----------------------------------------------------------------------------- the experiment

def measure_point(point: dict):
    """The experiment's measure function: dispatch on ``point['measurement']``."""
    m = point.get("measurement")
    if m not in MEASUREMENTS:
        raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {m!r}")
    from lib.engine.gpu import require_gpu

    require_gpu()
    try:
        return measure_kernel(point) if m == "kernel" else measure_map(point)
    finally:
        import gc

        import cupy

        gc.collect()
        cupy.get_default_memory_pool().free_all_blocks()


def precompile_points(points: list[dict]) -> None:
    """Experiment ``prepare`` hook: compile the kernel modules the kernel points need, in parallel."""
    from lib.engine import kernels

    keys = set()
    for p in points:
        if p.get("measurement") != "kernel":
            continue
        sh = kernel_shape(p)
        keys.add((sh["dtype"], sh["block_size"], sh["head_size"],
                  kernels.head_tile(sh["num_heads"], sh["num_kv_heads"], sh["head_size"])))
    if keys:
        kernels.precompile(keys)
