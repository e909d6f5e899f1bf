"""The measurements of the chapter "Contiguous KV without fragmentation: CUDA virtual memory".

Experiment ``vmm_kv``, two grids told apart by ``measurement``. ``kernel``: one decode problem
three ways (:data:`PAGED`, :data:`DEVICE_CONTIGUOUS`, and :data:`VMM_CONTIGUOUS` on two
:class:`lib.engine.vmm.KVArena` giving every sequence a slot of virtual addresses for
``reserve_tokens`` tokens, grown only as far as it needs: the vAttention idea). ``map``: the host
time per chunk of every driver call of :data:`MAP_OPERATIONS`, for chunks of 1-32 x the
granularity; a reused chunk must still hold its bytes, which checks the mappings.

:func:`build_arenas` and :func:`map_cycle` take any :class:`lib.engine.vmm.VmmDriver`, so the
tests run them on a fake driver without a GPU; CuPy is imported only inside functions.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from lib.engine.validation import _positive_int
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
#: A map point never holds more than MAP_MAX_BYTES at once, and by default stops at MAP_BUDGET_MIB
#: (or MAP_MAX_CHUNKS chunks, whichever comes first).
MAP_MAX_BYTES = 2 * GiB
MAP_BUDGET_MIB = 1024
MAP_MAX_CHUNKS = 64
#: Samples of the two overhead floors (an arena call that maps nothing; one wrapped driver call).
FLOOR_SAMPLES = 200

#: A kernel point needs about this many times its K+V bytes free: the pool, its classic copy
#: (plus the transposed temporary that makes it), and the two arenas.
KERNEL_MEMORY_FACTOR = 5

#: The kernel grid's (batch, tokens) points: the issue's 32 x 4096, and as many tokens in 8 sequences.
KERNEL_POINTS = [(32, 4096), (8, 16384)]
#: Kernel: fp16, head 128, MHA 32:32 and GQA 32:8, blocks 16 and 64, chunks of one granularity
#: (2 MiB on H100/H200), slots for 32k tokens. Map: chunks of 1-32 x the granularity.
KERNEL_GRID = [{
    "measurement": ["kernel"], "batch_size": [b], "seq_len": [n], "num_heads": [32],
    "num_kv_heads": [32, 8], "head_size": [128], "block_size": [16, 64], "dtype": ["float16"],
    "chunk_multiple": [1], "reserve_tokens": [32768], "protocol": ["rigorous"], "seed": [0],
} for b, n in KERNEL_POINTS]
MAP_GRID = {"measurement": ["map"], "chunk_multiple": [1, 2, 4, 8, 16, 32], "rounds": [4],
            "max_chunks": [MAP_MAX_CHUNKS], "budget_mib": [MAP_BUDGET_MIB]}
GRID = [*KERNEL_GRID, MAP_GRID]


def _int(point: dict, key: str, minimum: int = 1) -> int:
    v = point.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{key} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _positive(**values) -> list[int]:
    return [_positive_int(k, v) for k, v in values.items()]


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


def classic_block_bytes(num_kv_heads: int, head_size: int, block_size: int, itemsize: int) -> int:
    """Bytes of one block of K (or of V) in the classic layout: KV heads x head x block x element."""
    return math.prod(_positive(num_kv_heads=num_kv_heads, head_size=head_size, block_size=block_size,
                               itemsize=itemsize))


def slot_geometry(slot_blocks: int, block_bytes: int, chunk_bytes: int) -> tuple[int, int]:
    """(slot_bytes, blocks_per_slot) of a slot holding at least ``slot_blocks`` blocks.

    Whole chunks (the arena maps chunks) *and* whole blocks (the kernel addresses block
    ``s * blocks_per_slot + j`` from one base pointer): rounded up to their least common multiple.
    """
    slot_blocks, block_bytes, chunk_bytes = _positive(slot_blocks=slot_blocks, block_bytes=block_bytes,
                                                      chunk_bytes=chunk_bytes)
    slot_bytes = round_up(slot_blocks * block_bytes, math.lcm(block_bytes, chunk_bytes))
    return slot_bytes, slot_bytes // block_bytes


def check_mapped_reads(seq_first: Sequence[int], seq_lens: Sequence[int], block_size: int,
                       blocks_per_slot: int, mapped_blocks: Sequence[int]) -> None:
    """Every block the contiguous kernel reads must lie in its sequence's slot and be mapped:
    an unmapped read is an illegal-address fault that ends the CUDA context, so check on the host.
    Slot ``s`` starts at block ``s * blocks_per_slot`` and has ``mapped_blocks[s]`` mapped."""
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
    def seq_first(self) -> np.ndarray:  # int32: each sequence's first block (its slot's first)
        return (np.arange(self.seq_blocks.size, dtype=np.int64) * self.blocks_per_slot).astype(np.int32)

    def mapped_blocks(self) -> np.ndarray:  # per slot, the same in K and V
        return np.array([self.k.mapped_bytes(s) // self.block_bytes for s in range(self.k.num_slots)],
                        dtype=np.int64)

    def close(self) -> None:
        """Close both arenas, even if the first close fails (then raise its error)."""
        try:
            self.k.close()
        finally:
            self.v.close()

    def stats(self) -> dict:  # both arenas' counts summed; geometry fields are the same in both
        a, b = self.k.stats(), self.v.stats()
        same = ("num_slots", "slot_bytes", "chunk_bytes", "granularity")
        return {k: (a[k] if k in same else a[k] + b[k]) for k in a}


def build_arenas(driver: Any, seq_lens: Sequence[int], *, block_size: int, block_bytes: int,
                 chunk_bytes: int, reserve_tokens: int, device: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> ArenaPair:
    """Reserve one slot per sequence for ``reserve_tokens`` tokens in two arenas, grow each to its
    sequence's blocks; on any failure both arenas are closed before the error propagates."""
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


def map_chunks(chunk_bytes: int, *, budget_bytes: int = MAP_BUDGET_MIB * MiB,
               max_chunks: int = MAP_MAX_CHUNKS) -> int:
    """Chunks a map point holds at once: as many as fit the budget (<= :data:`MAP_MAX_BYTES`),
    at most ``max_chunks``."""
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

    ``idle()`` runs before each phase (driver calls are timed on an idle GPU); ``after_grow``
    may write the fresh chunks, ``after_regrow`` says whether the reused ones still hold it. The
    arena is always closed, and ``check`` needs its counters to show every handle released.
    """
    if num_chunks < 1 or rounds < 1:
        raise ValueError("num_chunks and rounds must be >= 1")
    idle = idle or (lambda: None)
    samples: dict[str, list[float]] = {op: [] for op in MAP_OPERATIONS}
    checks: list[bool] = []

    def each(op: str, fn: Callable[[int], Any], order=range(num_chunks)) -> None:
        samples[op].extend(_timed(lambda: fn(i), clock) for i in order)

    def grow(s: int) -> None:
        arena.grow(s, chunk_bytes)

    t0 = clock()
    arena = KVArena(driver, num_chunks, chunk_bytes, chunk_bytes, device=device)
    reserve_us = (clock() - t0) * 1e6
    try:
        for _ in range(rounds):
            idle()
            each("grow_new", grow)
            if after_grow is not None:
                after_grow(arena)
            idle()
            each("unmap", arena.release)
            each("grow_reuse", grow)
            if after_regrow is not None:
                checks.append(bool(after_regrow(arena)))
            idle()
            each("unmap", arena.release)
            each("release_handle", lambda left: arena.trim(keep=left), range(num_chunks - 1, -1, -1))
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
    check = ok_counts and all(checks)
    return {"samples_us": samples, "reserve_us": reserve_us,
            "floors_us": {"noop_grow": float(np.median(noop)), "driver_call": float(np.median(call))},
            "counts": counts, "check": check, "data_checked": bool(checks)}


def _time_own(case, spec: tuple[str, str, str], protocol: str, refs: dict) -> dict:
    """Our kernel through the backend registry on the case's own (device) pool: check, then time."""
    from lib.engine import backends as B
    from lib.engine import measure as bench

    name, memory_kind, placement = spec
    p = case.problem
    backend = B.get_backend(name)
    out = case.poisoned_output()
    launch = backend.prepare(case, out)
    row = {"backend": name, "version": str(backend.version), "addressing": backend.addressing,
           "memory_kind": memory_kind, "placement": placement, "bytes_moved": p.bytes_moved}
    bench.check_then_time(launch, out, bench.reference_for(case, backend.addressing, refs),
                          dtype=p.dtype, protocol=protocol, row=row)
    row["extra"] = {"plan": bench.plan_text(launch.plan),
                    "pool_bytes": int(case.kpool.nbytes + case.vpool.nbytes)}
    return row


def measure_kernel(point: dict) -> list[dict]:
    """One kernel point: paged on a fragmented pool, contiguous on device memory, contiguous on VMM."""
    import cupy as cp

    from lib.engine import backends as B
    from lib.engine import measure as bench
    from lib.engine import kernels
    from lib.engine import kvcache
    from lib.engine import timing
    from lib.engine import validation
    from lib.engine.vmm import CudaVmmDriver

    sh = kernel_shape(point)
    if sh["protocol"] not in ("rigorous", "hot"):
        raise ValueError(f"protocol must be rigorous or hot, got {sh['protocol']!r}")
    problem = bench.problem_of({**sh, "placement": "shuffled"})
    kv_bytes = kvcache.cache_bytes(problem.seq_lens, problem.num_kv_heads, problem.head_size, problem.dtype)
    cp.get_default_memory_pool().free_all_blocks()
    timing.check_free(KERNEL_MEMORY_FACTOR * kv_bytes, f"vmm_kv kernel point ({kv_bytes / GiB:.2f} GiB of K+V)")

    case = B.DecodeCase.build(problem)
    refs: dict = {}
    rows = [_time_own(case, PAGED, sh["protocol"], refs),
            _time_own(case, DEVICE_CONTIGUOUS, sh["protocol"], refs)]

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
        row = {"backend": VMM_CONTIGUOUS[0], "version": "auto", "addressing": "contiguous",
               "memory_kind": VMM_CONTIGUOUS[1], "placement": VMM_CONTIGUOUS[2],
               "bytes_moved": problem.bytes_moved}
        # the slots hold each sequence's blocks in logical order: the paged (logical) reference
        bench.check_then_time(launch, out, bench.reference_for(case, "paged", refs),
                              dtype=problem.dtype, protocol=sh["protocol"], row=row)
        st = pair.stats()
        row["extra"] = {"plan": bench.plan_text(plan), "granularity": gran, "chunk_bytes": chunk,
                        "block_bytes": block_bytes, "blocks_per_slot": pair.blocks_per_slot,
                        **{k: st[k] for k in ("slot_bytes", "reserved_bytes", "mapped_bytes",
                                              "used_bytes", "internal_waste_bytes")},
                        "kv_bytes": int(kv_bytes), "grow_ms": 1e3 * pair.grow_s,
                        "copy_ms": 1e3 * copy_s, "arena_stats": st}
        rows.append(row)
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
    import cupy as cp

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

        def after_grow(arena: KVArena) -> None:
            for s in range(arena.num_slots):
                arena.slot_view(s, cp.int32).fill(s + 1)
            cp.cuda.Device().synchronize()

        def after_regrow(arena: KVArena) -> bool:  # each reused chunk holds one fill value, all of them
            views = [arena.slot_view(s, cp.int32) for s in range(arena.num_slots)]
            seen = [int(v.min()) if int(v.min()) == int(v.max()) else -1 for v in views]
            return sorted(seen) == list(range(1, arena.num_slots + 1))

        res = map_cycle(driver, chunk, n, rounds, device=dev, idle=cp.cuda.Device().synchronize,
                        after_grow=after_grow, after_regrow=after_regrow)
    finally:
        driver.close()
    rows = []
    for op in MAP_OPERATIONS:
        xs = res["samples_us"][op]
        t = summarize(xs, "direct")  # protocol "direct": host clock around each call
        rows.append({  # a driver call moves no bytes over any link: no bytes_moved, no bandwidth
            "backend": op, "memory_kind": "vmm", **t.as_row(),
            "check_passed": bool(res["check"]),
            "extra": {"timer": "host_clock", "granularity": gran, "chunk_bytes": chunk, "chunks": n,
                      "operation": MAP_LABELS[op], "reserve_us": res["reserve_us"],
                      "noop_grow_us": res["floors_us"]["noop_grow"],
                      "driver_call_us": res["floors_us"]["driver_call"],
                      "counts": res["counts"], "samples_us": [round(x, 2) for x in xs]}})
    return rows


def measure_point(point: dict):
    """The experiment's measure function: dispatch on ``point['measurement']``."""
    m = point.get("measurement")
    if m not in MEASUREMENTS:
        raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {m!r}")
    from lib.engine.gpu import require_gpu

    require_gpu()  # measure_kernel and measure_map import CuPy: only after this guard
    try:
        return measure_kernel(point) if m == "kernel" else measure_map(point)
    finally:
        import cupy

        gc.collect()
        cupy.get_default_memory_pool().free_all_blocks()


def precompile_points(points: list[dict]) -> None:
    """Experiment ``prepare`` hook: compile the kernel modules the kernel points need, in parallel."""
    from lib.engine import kernels

    shapes = [kernel_shape(p) for p in points if p.get("measurement") == "kernel"]
    keys = {(sh["dtype"], sh["block_size"], sh["head_size"],
             kernels.head_tile(sh["num_heads"], sh["num_kv_heads"], sh["head_size"])) for sh in shapes}
    if keys:
        kernels.precompile(keys)
