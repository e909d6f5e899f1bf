"""Measure functions of the kernel experiments: one point = one decode problem, many backends.

For each point the KV cache is built once (fresh random data, seeded by the point), then for
every backend: poison the output with NaN, launch once, check it against the float64 reference
of the blocks that addressing mode actually reads, then time it with the point's protocol.
Each backend gives one row (see `lib.harness.results` for the schema); a backend that fails gives a row
with its error, so one broken backend never hides the others.

Point parameters (grid names double as result columns where the schema has them):
batch_size, seq_len, num_heads, num_kv_heads, head_size, block_size, dtype, placement
(identity | shuffled | single_content | random), physical_blocks (for placement=random: the
seed protocol's pool of reused blocks), memory_kind, protocol (rigorous | hot | seed), backends
(names joined by '+'), seed.

memory_kind is ``device``, any kind of :mod:`lib.engine.memory` (``managed``: pages where the GPU wrote
them, i.e. resident), or one of two *states* of managed memory that must be re-established before
every timed sample, because the first call changes them (:data:`MANAGED_STATES`):
``managed_cold`` moves the K/V arrays to the host before each sample, so the timed call is the
first touch after the pages left the GPU (fault-driven migration inside the kernel);
``managed_prefetched`` moves them to the host and back with ``cudaMemPrefetchAsync`` before each
sample, so the timed call reads pages an explicit prefetch placed (the prefetch is not timed).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lib.engine import backends as B

TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5}


def effective_tables(case: B.DecodeCase, addressing: str) -> np.ndarray:
    """The block table an addressing mode effectively reads (for its reference output).

    paged reads the table; contiguous reads ``seq_start[s] + j``; no_offset reads block 0 for
    every block. On an identity table all three agree with the table only where the design
    says they should (contiguous always, no_offset on a single-content cache).
    """
    t = case.tables.tables
    if addressing in ("paged", ""):
        return t
    if addressing == "contiguous":
        return (case.tables.seq_start[:, None] + np.arange(t.shape[1])[None, :]).astype(np.int32)
    if addressing == "no_offset":
        return np.zeros_like(t)
    raise ValueError(f"unknown addressing {addressing!r}")


def _reference(case: B.DecodeCase, addressing: str, cache: dict):
    import cupy

    from lib.engine.reference import decode_attention_reference

    tables = effective_tables(case, addressing)
    key = tables.tobytes()
    if key not in cache:
        cache[key] = decode_attention_reference(
            case.q, case.kpool, case.vpool, tables, case.problem.seq_lens, scale=case.scale,
            dtype_name=case.problem.dtype, xp=cupy)
    return cache[key]


#: Managed-memory states re-established before every sample: name -> where the K/V pages are
#: sent before the timed call (in order).
MANAGED_STATES = {"managed_cold": ("host",), "managed_prefetched": ("host", "gpu")}
#: A state costs a migration per sample; the sampler stops after this many seconds per backend.
STATE_MAX_SECONDS = 1.0


def _allocator(memory_kind: str):
    if memory_kind in ("device", "", None):
        return B._default_alloc
    from lib.engine import memory  # the Unified Memory layer

    return memory.allocator("managed" if memory_kind in MANAGED_STATES else memory_kind)


def state_hook(memory_kind: str, arrays) -> "Callable[[], None] | None":
    """The `before` hook that puts ``arrays`` (managed) into a :data:`MANAGED_STATES` state.

    None for kinds that need nothing before a sample. Runs on the timing stream, so the
    migrations finish before the timed call starts and are not part of its time.
    """
    if memory_kind not in MANAGED_STATES:
        return None
    from lib.engine import memory

    steps = MANAGED_STATES[memory_kind]

    def before() -> None:
        for where in steps:
            for a in arrays:
                memory.prefetch(a, where)

    return before


def problem_of(point: dict) -> B.DecodeProblem:
    return B.DecodeProblem.uniform(
        int(point["batch_size"]), int(point["seq_len"]),
        num_heads=int(point["num_heads"]), num_kv_heads=int(point["num_kv_heads"]),
        head_size=int(point["head_size"]), block_size=int(point["block_size"]),
        dtype=point.get("dtype", "float16"), placement=point.get("placement", "identity"),
        seed=int(point.get("seed", 0)))


def precompile_points(points: list[dict]) -> None:
    """Experiment `prepare` hook: compile every own-kernel module the sweep needs, in parallel."""
    from lib.engine import kernels

    keys = set()
    for p in points:
        if "own-" in str(p.get("backends", "")):
            keys.add((p.get("dtype", "float16"), int(p["block_size"]), int(p["head_size"]),
                      kernels.head_tile(int(p["num_heads"]), int(p["num_kv_heads"]),
                                        int(p["head_size"]))))
    kernels.precompile(keys)


def measure_decode(point: dict) -> list[dict]:
    """Build the point's cache, then check and time every backend on it."""
    protocol = point.get("protocol", "rigorous")
    kind = point.get("memory_kind", "device")
    if kind in MANAGED_STATES and protocol not in ("rigorous", "hot", "eager", "eager-hot"):
        raise ValueError(f"memory_kind={kind!r} is re-established before every sample, which the "
                         f"{protocol!r} protocol cannot do (use rigorous or hot)")
    import cupy

    from lib.engine import timing
    from lib.engine.reference import relative_error

    problem = problem_of(point)
    case = B.DecodeCase.build(problem, alloc=_allocator(kind),
                              physical_blocks=point.get("physical_blocks") or None)
    names = [n for n in str(point["backends"]).split("+") if n]
    refs: dict = {}
    rows = []
    for name in names:
        backend = B.get_backend(name)
        row = {"backend": name, "version": str(backend.version or ""),
               "addressing": backend.addressing or "", "protocol": protocol,
               "bytes_moved": problem.bytes_moved}
        try:
            out = case.poisoned_output()
            options = {}
            if backend.family == "own" and point.get("partition_size"):
                options["partition_size"] = int(point["partition_size"])
            launch = backend.prepare(case, out, **options)
            launch()
            cupy.cuda.Device().synchronize()
            ref = _reference(case, backend.addressing or "paged", refs)
            err = relative_error(out, ref, dtype_name=problem.dtype)
            row["rel_error"] = err
            row["check_passed"] = bool(err <= TOLERANCE[problem.dtype])
            if backend.family == "own":
                row["extra"] = {"plan": _plan_text(launch)}
            before = state_hook(kind, case.layout(backend.layout))
            if before is None:
                t = timing.time_fn(launch, protocol)
            else:
                t = timing.time_fn(launch, protocol, before=before, max_seconds=STATE_MAX_SECONDS)
            row.update(median_us=t.median_us, p10_us=t.p10_us, p90_us=t.p90_us,
                       samples=t.samples)
        except Exception as exc:
            row.update(status="error", error=error_text(exc))
        rows.append(row)
    return rows


def error_text(exc: BaseException, limit: int = 900) -> str:
    """An exception as one row's error: type, message head and tail (a compiler's root cause is
    often the last line of a long message)."""
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}"
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def _plan_text(launch) -> str:
    """How an own-kernel launcher was planned (version, head tile, partitioning)."""
    plan = launch.plan
    return (f"v{plan.version} tile={plan.tile} partition={plan.partition_size} "
            f"parts={plan.max_partitions}")
