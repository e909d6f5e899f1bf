"""Check-then-time, the one way every decode row is measured, and the kernel experiments' measure.

A point's memory_kind is ``device``, a kind of :mod:`lib.engine.memory`, or managed memory in a
*state* the first call changes, re-made before every sample (:data:`MANAGED_STATES`):
``managed_cold`` sends K/V to the host (the timed call faults them in); ``managed_prefetched`` sends
them to the host and back with ``cudaMemPrefetchAsync`` (not timed). Rows split such a label into
``memory_kind = "managed"`` and ``memory_state`` (``cold``, ``prefetched``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lib.engine import backends as B
from lib.engine import memory
from lib.engine.kvcache import poison

#: A grid's managed-state labels -> where the K/V pages are sent before each sample (in order).
MANAGED_STATES = {f"managed_{state}": steps for state, steps in memory.MANAGED_STATES.items()}
#: A state costs a migration per sample; the sampler stops after this many seconds per backend.
STATE_MAX_SECONDS = 1.0


def _sync(out) -> None:
    if not isinstance(out, np.ndarray):  # a GPU array: wait for every stream (a backend may use its own)
        import cupy

        cupy.cuda.Device().synchronize()


def check_then_time(step: Callable[[], object], out, reference, *, dtype: str,
                    protocol: str | None = "rigorous", before: Callable[[], object] | None = None,
                    max_seconds: float | None = None, row: dict | None = None,
                    timer: Callable | None = None) -> dict:
    """Poison ``out``, run ``step`` once, check it against the float64 ``reference`` within
    ``TOLERANCE[dtype]``, then time ``step`` with ``protocol`` (None: check only).

    A launcher whose result lands in an array of its own (SDPA's, :func:`lib.engine.backends.
    output_of`) is checked there, and its held result poisoned first (``poison_output``).
    ``before`` re-makes a memory state before the checked call and every timed sample. ``row`` is
    filled as each field is known, so a failed timing still leaves the check's verdict in it; how
    the stopping rule ended goes to ``row["extra"]["timing"]``.
    """
    from lib.engine.reference import TOLERANCE, relative_error

    row = {} if row is None else row
    poison(out)
    poison_own = getattr(step, "poison_output", None)
    if callable(poison_own):
        poison_own()
    if before is not None:
        before()
    _sync(out)
    step()
    _sync(out)
    result = B.output_of(step, out)
    if result is None:
        raise RuntimeError("the launcher wrote no output array (its output() returned None)")
    err = relative_error(result, reference, dtype_name=dtype)
    row.update(rel_error=err, check_passed=bool(err <= TOLERANCE[dtype]))
    if protocol is not None:
        if timer is None:
            from lib.engine.timing import time_fn as timer
        kw = {k: v for k, v in (("before", before), ("max_seconds", max_seconds)) if v is not None}
        t = timer(step, protocol, **kw)
        row.update(t.as_row())
        how = t.as_extra() if hasattr(t, "as_extra") else {}
        if how:
            row["extra"] = {**(row.get("extra") or {}), "timing": how}
    return row


def effective_tables(case: B.DecodeCase, addressing: str) -> np.ndarray:
    """The block table an addressing mode effectively reads (for its reference output):
    paged the table, contiguous ``seq_start[s] + j``, no_offset block 0 everywhere."""
    t = case.tables.tables
    if addressing in ("paged", ""):
        return t
    if addressing == "contiguous":
        return (case.tables.seq_start[:, None] + np.arange(t.shape[1])[None, :]).astype(np.int32)
    if addressing == "no_offset":
        return np.zeros_like(t)
    raise ValueError(f"unknown addressing {addressing!r}")


def reference_for(case: B.DecodeCase, addressing: str, cache: dict):
    """The float64 reference of the blocks ``addressing`` reads on the case's pool (cached by table)."""
    import cupy

    from lib.engine.reference import decode_attention_reference

    tables = effective_tables(case, addressing)
    key = tables.tobytes()
    if key not in cache:
        cache[key] = decode_attention_reference(case.q, case.kpool, case.vpool, tables, case.problem.seq_lens,
                                                scale=case.scale, dtype_name=case.problem.dtype, xp=cupy)
    return cache[key]


def _allocator(memory_kind: str):
    if memory_kind in ("device", "", None):
        return B._default_alloc
    return memory.allocator("managed" if memory_kind in MANAGED_STATES else memory_kind)


def state_hook(memory_kind: str, arrays) -> "Callable[[], None] | None":
    """The ``before`` hook that puts ``arrays`` (managed) into a :data:`MANAGED_STATES` state, or
    None. Run on the timing stream, its migrations finish before the timed call starts."""
    if memory_kind not in MANAGED_STATES:
        return None
    steps = MANAGED_STATES[memory_kind]

    def before() -> None:
        for where in steps:
            for a in arrays:
                memory.prefetch(a, where)

    return before


def problem_of(point: dict) -> B.DecodeProblem:
    return B.DecodeProblem.uniform(
        int(point["batch_size"]), int(point["seq_len"]), num_heads=int(point["num_heads"]),
        num_kv_heads=int(point["num_kv_heads"]), head_size=int(point["head_size"]),
        block_size=int(point["block_size"]), dtype=point.get("dtype", "float16"),
        placement=point.get("placement", "identity"), seed=int(point.get("seed", 0)))


def precompile_points(points: list[dict]) -> None:
    """Experiment `prepare` hook: compile every own-kernel module the sweep needs, in parallel."""
    from lib.engine import kernels

    keys = set()
    for p in points:
        if "own-" in str(p.get("backends", "")):
            keys |= kernels.modules_for(p.get("dtype", "float16"), int(p["block_size"]),
                                        int(p["head_size"]), int(p["num_heads"]),
                                        int(p["num_kv_heads"]))
    kernels.precompile(keys)


def measure_decode(point: dict) -> list[dict]:
    """Build the point's cache once, then check and time every backend ('+'-joined) on it: one
    row each, an error row for a backend that fails, so it never hides the others."""
    protocol = point.get("protocol", "rigorous")
    kind = point.get("memory_kind", "device")
    if kind in MANAGED_STATES and protocol not in ("rigorous", "hot", "eager", "eager-hot"):
        raise ValueError(f"memory_kind={kind!r} is re-established before every sample, which the "
                         f"{protocol!r} protocol cannot do (use rigorous or hot)")
    problem = problem_of(point)
    case = B.DecodeCase.build(problem, alloc=_allocator(kind),
                              physical_blocks=point.get("physical_blocks") or None)
    refs: dict = {}
    rows = []
    for name in [n for n in str(point["backends"]).split("+") if n]:
        backend = B.get_backend(name)
        row_kind, state = memory.split_kind(kind)
        row = {"backend": name, "version": str(backend.version or ""),
               "addressing": backend.addressing or "", "protocol": protocol,
               "bytes_moved": problem.bytes_moved, "memory_kind": row_kind,
               "extra": {"memory_state": state} if state else {}}
        try:
            out = case.poisoned_output()
            options = {}
            if backend.family == "own" and point.get("partition_size"):
                options["partition_size"] = int(point["partition_size"])
            launch = backend.prepare(case, out, **options)
            if backend.family == "own":
                row["extra"]["plan"] = plan_text(launch.plan)
            elif callable(getattr(launch, "describe", None)):  # a peer's own launch plan
                row["extra"]["plan"] = launch.describe()
            before = state_hook(kind, case.layout(backend.layout))
            check_then_time(launch, out, reference_for(case, backend.addressing or "paged", refs),
                            dtype=problem.dtype, protocol=protocol, before=before,
                            max_seconds=STATE_MAX_SECONDS if before else None, row=row)
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


def plan_text(plan) -> str:
    """How an own-kernel launch was planned (version, head tile, partitioning)."""
    return (f"v{plan.version} tile={plan.tile} partition={plan.partition_size} "
            f"parts={plan.max_partitions}")
