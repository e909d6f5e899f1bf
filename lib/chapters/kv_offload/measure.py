"""When the KV cache leaves the GPU: decode time with a fraction of the cache in host memory.

Experiment ``kv_offload``: a fraction ``f`` of every sequence's KV blocks lives in host memory and
one decode step (our ``own-auto-paged`` kernel, and vLLM's) is timed while those blocks are
reached in one of five ways (:data:`MODES`; each row names its *variant*, :data:`VARIANTS`).

Which blocks go to the host (:class:`OffloadPlan`): the oldest ``ceil(f * n)`` of each sequence,
because an offloading server evicts by recency (recent tokens are re-read the most), and the same
share of every sequence, so no sequence's thread blocks carry the whole bus cost. The pool is
``[host region | device region]``, each a multiple of 2 MiB: the same tables and bytes in every
mode, only the memory differs. Every decode row is checked against the float64 reference in the
variant's own state; ``measurement=yardstick`` is the bus yardstick
(:func:`lib.engine.transfer.measure_transfer`). True oversubscription is
:func:`run_oversubscribed`, behind an explicit opt-in and never run by the experiment.

CuPy, torch and the CUDA driver bindings are imported inside functions: this module imports on
a CPU.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np

from lib.engine import memory, transfer, vmm
from lib.engine.validation import _positive_int
from lib.chapters.kv_offload.residency import apply_block_residency

MiB = 1 << 20
GiB = 1 << 30

EXPERIMENT = "kv_offload"
#: Host and device regions of the pool are multiples of this (the VMM granularity on H100/H200,
#: and the large-page size managed memory migrates in).
ALIGN_BYTES = 2 * MiB
FRACTIONS = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
MODES = ("managed_remote", "pinned_zero_copy", "managed_migrate", "prefetch_overlap", "explicit_copy")
#: variant -> (mode, what the row measures)
VARIANTS = {
    "remote": ("managed_remote", "managed, host blocks mapped for the GPU: read over the bus"),
    "zero_copy": ("pinned_zero_copy", "pinned host chunks in one VMM range: read over the bus"),
    "zero_copy_hostalloc": ("pinned_zero_copy", "whole pool in cudaHostAlloc memory (f = 1)"),
    "migrate_first": ("managed_migrate", "managed: host blocks fault over in the timed call"),
    "migrate_resident": ("managed_migrate", "managed: after the migration, all on the GPU"),
    "overlap": ("prefetch_overlap", "prefetch on a second stream, kernel at once"),
    "prefetch_serial": ("prefetch_overlap", "prefetch, then the kernel, one stream"),
    "explicit_copy": ("explicit_copy", "cudaMemcpy of the host blocks, then the kernel"),
}
#: variant -> (memory kind of the host blocks, how the pool is assembled: ``extra["pool"]``).
POOL = {"remote": ("managed_host_mapped", "managed"), "zero_copy": ("pinned", "vmm_host_split"),
        "zero_copy_hostalloc": ("pinned", "pinned"), "migrate_first": ("managed", "managed"),
        "migrate_resident": ("managed", "managed"), "overlap": ("managed", "managed"),
        "prefetch_serial": ("managed", "managed"), "explicit_copy": ("pinned", "device+pinned")}
BACKENDS = "own-auto-paged+vllm"
#: (query heads, KV heads): Llama-like MHA and a GQA 4:1 layout.
HEADS = ((32, 32), (32, 8))
YARDSTICK_BYTES = GiB
#: Sampling cap (seconds per row) of steady states; states re-made before every sample use
#: lib.engine.measure.STATE_MAX_SECONDS.
MAX_SECONDS = 1.5

GRID = [
    {"measurement": ["yardstick"], "method": ["memcpy_pinned", "prefetch"], "nbytes": [YARDSTICK_BYTES]},
] + [
    {"measurement": ["decode"], "mode": list(MODES), "fraction": list(FRACTIONS), "batch_size": [32],
     "seq_len": [4096], "num_heads": [h], "num_kv_heads": [kv], "head_size": [128], "block_size": [16],
     "dtype": ["float16"], "backends": [BACKENDS], "seed": [0]}
    for h, kv in HEADS
]


# ----------------------------------------------------------------------------- fractions

def check_fraction(fraction) -> float:
    """``fraction`` as a float in [0, 1]; anything else (NaN, a bool, a string) is a ValueError."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    f = float(fraction)
    if not math.isfinite(f) or not 0.0 <= f <= 1.0:
        raise ValueError(f"fraction must be in [0, 1] (the share of KV blocks kept in host memory), "
                         f"got {fraction!r}")
    return f


def host_blocks_per_seq(blocks_per_seq: int, fraction) -> int:
    """How many of a sequence's ``blocks_per_seq`` blocks go to the host: ``ceil(f * n)``.

    Computed on ``f`` as a ratio of small integers, so 0.1 x 30 gives 3 (the float product is
    3.0000000000000004); any ``f > 0`` moves at least one block, ``f = 1`` all of them.
    """
    n = _positive_int("blocks_per_seq", blocks_per_seq)
    f = check_fraction(fraction)
    k = math.ceil(Fraction(f).limit_denominator(1 << 20) * n)
    if f > 0:
        k = max(k, 1)
    return min(k, n)


def fraction_label(fraction) -> str:
    """'0', '1/64', '1', ... for the book (a decimal when no small denominator fits)."""
    f = check_fraction(fraction)
    r = Fraction(f).limit_denominator(1024)
    if abs(float(r) - f) > 1e-12:
        return f"{f:g}"
    return str(r.numerator) if r.denominator == 1 else f"{r.numerator}/{r.denominator}"


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class OffloadPlan:
    """Which blocks live in host memory, and the block tables that say so (pure arithmetic).

    ``num_seqs`` sequences of ``seq_len`` tokens in blocks of ``block_size``; ``token_bytes`` is
    one token's K (or V) bytes over all KV heads. The pool (per K and per V array) is
    ``[host region | device region]``; each region is a whole number of ``align_bytes``.
    """

    num_seqs: int
    seq_len: int
    block_size: int
    token_bytes: int
    fraction: float
    align_bytes: int = ALIGN_BYTES

    def __post_init__(self):
        for name in ("num_seqs", "seq_len", "block_size", "token_bytes", "align_bytes"):
            _positive_int(name, getattr(self, name))
        object.__setattr__(self, "fraction", check_fraction(self.fraction))

    @classmethod
    def for_problem(cls, problem, fraction, *, align_bytes: int = ALIGN_BYTES) -> "OffloadPlan":
        """The plan for a uniform-length :class:`lib.engine.backends.DecodeProblem`."""
        if len(set(problem.seq_lens)) != 1:
            raise ValueError("the offload plan needs sequences of one length (DecodeProblem.uniform)")
        return cls(problem.num_seqs, problem.seq_lens[0], problem.block_size,
                   problem.num_kv_heads * problem.head_size * problem.itemsize, fraction, align_bytes)

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def host_per_seq(self) -> int:
        return host_blocks_per_seq(self.blocks_per_seq, self.fraction)

    @property
    def host_fraction(self) -> float:
        """The share of blocks actually on the host (``f`` after rounding to whole blocks)."""
        return self.host_per_seq / self.blocks_per_seq

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.token_bytes

    @property
    def align_blocks(self) -> int:
        return math.lcm(self.align_bytes, self.block_bytes) // self.block_bytes

    @property
    def host_region_blocks(self) -> int:
        return vmm.round_up(self.num_seqs * self.host_per_seq, self.align_blocks)

    @property
    def device_region_blocks(self) -> int:
        return vmm.round_up(self.num_seqs * (self.blocks_per_seq - self.host_per_seq), self.align_blocks)

    @property
    def num_blocks(self) -> int:
        return self.host_region_blocks + self.device_region_blocks

    @property
    def host_region_bytes(self) -> int:
        """Bytes of one array (K or V) in the host region, padding included."""
        return self.host_region_blocks * self.block_bytes

    @property
    def device_region_bytes(self) -> int:
        return self.device_region_blocks * self.block_bytes

    @property
    def host_tokens(self) -> int:
        """Tokens whose K and V the kernel reads from host memory in one step."""
        return self.num_seqs * min(self.host_per_seq * self.block_size, self.seq_len)

    @property
    def host_kv_bytes(self) -> int:
        """K + V bytes the step must bring over the bus (tokens, not padding)."""
        return 2 * self.host_tokens * self.token_bytes

    @property
    def device_kv_bytes(self) -> int:
        return 2 * (self.num_seqs * self.seq_len - self.host_tokens) * self.token_bytes

    def tables(self) -> np.ndarray:
        """int32 ``[num_seqs, blocks_per_seq]``: logical block j of sequence s -> physical block.

        j < k (the oldest k): ``s * k + j`` in the host region; the rest: ``H + s * (n - k) +
        (j - k)`` in the device region (H = host region blocks).
        """
        n, k = self.blocks_per_seq, self.host_per_seq
        s = np.arange(self.num_seqs, dtype=np.int64)[:, None]
        j = np.arange(n, dtype=np.int64)[None, :]
        host = s * k + j
        dev = self.host_region_blocks + s * (n - k) + (j - k)
        return np.where(j < k, host, dev).astype(np.int32)

    def block_tables(self):
        """The tables as a :class:`lib.engine.kvcache.BlockTables` (placement ``offload``)."""
        from lib.engine.kvcache import BlockTables

        t = self.tables()
        return BlockTables(tables=t, seq_start=t[:, 0].copy(), num_blocks=self.num_blocks,
                           placement="offload", block_size=self.block_size,
                           seq_lens=np.full(self.num_seqs, self.seq_len, dtype=np.int32))

    def host_mask(self) -> np.ndarray:
        """bool ``[num_blocks]``: True for every block of the host region."""
        mask = np.zeros(self.num_blocks, dtype=bool)
        mask[: self.host_region_blocks] = True
        return mask

    def describe(self) -> dict:
        """The plan's numbers for a result row's ``extra``."""
        return {"blocks_per_seq": self.blocks_per_seq, "host_blocks_per_seq": self.host_per_seq,
                "host_fraction": self.host_fraction, "host_kv_bytes": self.host_kv_bytes,
                "device_kv_bytes": self.device_kv_bytes, "host_region_bytes": self.host_region_bytes,
                "pool_blocks": self.num_blocks}


# ----------------------------------------------------------------------------- measuring

def _source_case(problem, plan: OffloadPlan):
    """The point's data in device memory, laid out and tabled by ``plan`` (and its reference)."""
    import cupy

    from lib.engine import backends as B
    from lib.engine import kvcache
    from lib.engine import validation

    p = problem
    rng = np.random.default_rng(p.seed)
    tables = plan.block_tables()
    validation.validate_decode_problem(
        num_seqs=p.num_seqs, num_heads=p.num_heads, num_kv_heads=p.num_kv_heads,
        head_size=p.head_size, block_size=p.block_size, dtype=p.dtype,
        seq_lens=np.asarray(p.seq_lens), tables=tables)
    q = kvcache.random_array((p.num_seqs, p.num_heads, p.head_size), p.dtype, rng, xp=cupy)
    k, v = (kvcache.random_pool(plan.num_blocks, p.block_size, p.num_kv_heads, p.head_size, p.dtype,
                                rng, xp=cupy) for _ in range(2))
    return B.DecodeCase(p, q, k, v, tables)


def _mode_case(src, backend, alloc, *, shared: bool = True):
    """A case whose arrays for ``backend``'s layout live in ``alloc``'s memory: (case, k, v).

    ``shared``: a torch-based backend must read the very memory under test, not a copy torch made.
    """
    import cupy

    from lib.engine import backends as B

    pools = [src.kpool, src.vpool]
    if backend.layout == "vllm":  # the pool itself is what the kernel reads
        pools = [alloc(a.shape, a.dtype) for a in pools]
        for b, a in zip(pools, (src.kpool, src.vpool)):
            b[...] = a
    # derived layouts are copied into `alloc`'s memory by DecodeCase.layout
    case = B.DecodeCase(src.problem, src.q, pools[0], pools[1], src.tables, alloc)
    k, v = case.layout(backend.layout)
    cupy.cuda.Device().synchronize()
    if shared and backend.family != "own":
        for a in (k, v):
            if B.torch_view(a).data_ptr() != int(a.data.ptr):
                raise RuntimeError(f"torch copied the {backend.name} cache instead of sharing its memory: "
                                   "this memory kind cannot be measured through torch here")
    return case, k, v


def _row_base(backend, problem, variant: str, plan: OffloadPlan) -> dict:
    return {"backend": backend.name, "version": str(backend.version or ""),
            "addressing": backend.addressing or "paged", "memory_kind": POOL[variant][0],
            "bytes_moved": problem.bytes_moved,
            "extra": {"variant": variant, "pool": POOL[variant][1], **plan.describe()}}


def _measure(base: dict, problem, out, ref, step: Callable, *, protocol: str = "rigorous",
             state: Callable | None = None, extra: dict | None = None) -> dict:
    """:func:`lib.engine.measure.check_then_time` with the variant's ``state`` as ``before``."""
    from lib.engine.measure import STATE_MAX_SECONDS, check_then_time

    return check_then_time(step, out, ref, dtype=problem.dtype, protocol=protocol, before=state,
                           max_seconds=STATE_MAX_SECONDS if state is not None else MAX_SECONDS,
                           row={**base, "extra": {**base["extra"], **(extra or {})}})


def _guarded(base: dict, fn: Callable[[], dict]) -> dict:
    """One variant's row, or an error row naming why it could not be measured."""
    from lib.engine.measure import error_text

    try:
        return fn()
    except Exception as exc:
        return {**base, "status": "error", "error": error_text(exc)}


def _check_host_memory(nbytes: int) -> None:
    """MemoryError unless ``nbytes`` of host memory fit :func:`lib.engine.transfer.budget_problem`."""
    why = transfer.budget_problem(0, nbytes, free_gpu=0, free_host=memory.host_available_bytes())
    if why:
        raise MemoryError(why)


def _prefetch_region(arrays, where: str, nbytes: int, stream=None) -> None:
    for a in arrays:
        memory.prefetch(a, where, nbytes=nbytes, stream=stream)


def _mode_managed_remote(backend, src, plan, ref, opts) -> list[dict]:
    case, k, v = _mode_case(src, backend, memory.allocator("managed"))
    for a in (k, v):
        apply_block_residency(a, plan.host_mask())
    extra = {}
    if plan.host_region_bytes:
        info = memory.range_info(k, nbytes=plan.host_region_bytes)
        extra["host_region_preferred"] = info.preferred_location
    out = case.poisoned_output()
    launch = backend.prepare(case, out, **opts)
    base = _row_base(backend, src.problem, "remote", plan)
    return [_guarded(base, lambda: _measure(base, src.problem, out, ref, launch, extra=extra))]


def _mode_pinned_zero_copy(backend, src, plan, ref, opts) -> list[dict]:
    import cupy

    def split() -> dict:
        if plan.host_region_bytes:
            why = vmm.host_memory_unavailable()
            if why:
                raise RuntimeError(why)
            _check_host_memory(2 * plan.host_region_bytes)
        dev = int(cupy.cuda.runtime.getDevice())
        alloc = vmm.split_allocator(vmm.vmm_driver(dev), plan.host_region_blocks, device=dev)
        case, k, v = _mode_case(src, backend, alloc)
        out = case.poisoned_output()
        launch = backend.prepare(case, out, **opts)
        loc = vmm.vmm_driver(dev).host_location() if plan.host_region_bytes else None
        return _measure(base, src.problem, out, ref, launch, extra={"host_location": loc})

    def hostalloc() -> dict:
        _check_host_memory(2 * plan.num_blocks * plan.block_bytes)
        case, k, v = _mode_case(src, backend, memory.allocator("pinned"))
        out = case.poisoned_output()
        launch = backend.prepare(case, out, **opts)
        return _measure(base2, src.problem, out, ref, launch)

    base = _row_base(backend, src.problem, "zero_copy", plan)
    rows = [_guarded(base, split)]
    gc.collect()
    if plan.host_per_seq == plan.blocks_per_seq:  # f = 1: the whole pool pinned, the classic way
        base2 = _row_base(backend, src.problem, "zero_copy_hostalloc", plan)
        rows.append(_guarded(base2, hostalloc))
    return rows


def _mode_managed_migrate(backend, src, plan, ref, opts) -> list[dict]:
    case, k, v = _mode_case(src, backend, memory.allocator("managed"))  # written on the GPU: resident
    out = case.poisoned_output()
    launch = backend.prepare(case, out, **opts)
    nbytes = plan.host_region_bytes
    to_host = (lambda: _prefetch_region((k, v), "host", nbytes)) if nbytes else None
    first = _row_base(backend, src.problem, "migrate_first", plan)
    resident = _row_base(backend, src.problem, "migrate_resident", plan)
    return [_guarded(first, lambda: _measure(first, src.problem, out, ref, launch, state=to_host)),
            # the last sample above faulted every host block back: now all of it is on the GPU
            _guarded(resident, lambda: _measure(resident, src.problem, out, ref, launch))]


_CAPTURE_PROBE: dict[str, str] = {}


def probe_prefetch_capture(arr, nbytes: int) -> str:
    """Can ``cudaMemPrefetchAsync`` be captured into a CUDA graph here? Tried once per process
    on a stream of its own: 'captured', or 'refused: <the error>'. Informs the chapter only:
    the overlap variants are timed eagerly either way."""
    if "result" in _CAPTURE_PROBE:
        return _CAPTURE_PROBE["result"]
    import cupy

    s = cupy.cuda.Stream(non_blocking=True)
    err = None
    try:
        s.begin_capture()
        try:
            memory.prefetch(arr, "gpu", nbytes=nbytes, stream=s)
        except Exception as exc:
            err = exc
        finally:
            try:
                s.end_capture()
            except Exception as exc:
                err = err or exc
    except Exception as exc:
        err = err or exc
    s.synchronize()
    _CAPTURE_PROBE["result"] = "captured" if err is None else f"refused: {type(err).__name__}: {err}"[:300]
    return _CAPTURE_PROBE["result"]


def _mode_prefetch_overlap(backend, src, plan, ref, opts) -> list[dict]:
    import cupy

    case, k, v = _mode_case(src, backend, memory.allocator("managed"))
    out = case.poisoned_output()
    launch = backend.prepare(case, out, **opts)
    nbytes = plan.host_region_bytes
    side = cupy.cuda.Stream(non_blocking=True)
    fork, join = cupy.cuda.Event(disable_timing=True), cupy.cuda.Event(disable_timing=True)

    def overlap() -> None:
        s = cupy.cuda.get_current_stream()
        if nbytes:  # the side stream starts after what s did so far, s waits for it at the end
            fork.record(s)
            side.wait_event(fork)
            _prefetch_region((k, v), "gpu", nbytes, stream=side)
        launch()  # at once: pages the prefetch has not brought yet fault in
        if nbytes:
            join.record(side)
            s.wait_event(join)

    def serial() -> None:
        if nbytes:
            _prefetch_region((k, v), "gpu", nbytes)
        launch()

    to_host = (lambda: _prefetch_region((k, v), "host", nbytes)) if nbytes else None
    extra = {"prefetch_capture": probe_prefetch_capture(k, min(nbytes, ALIGN_BYTES)) if nbytes else None}
    rows = []
    for variant, step in (("overlap", overlap), ("prefetch_serial", serial)):
        base = _row_base(backend, src.problem, variant, plan)
        rows.append(_guarded(base, lambda: _measure(base, src.problem, out, ref, step, protocol="eager",
                                                    state=to_host, extra=extra)))
    return rows


def _mode_explicit_copy(backend, src, plan, ref, opts) -> list[dict]:
    import cupy

    from lib.engine import backends as B
    from lib.engine import timing

    case, k, v = _mode_case(src, backend, B._default_alloc, shared=False)  # device memory
    out = case.poisoned_output()
    launch = backend.prepare(case, out, **opts)
    nbytes = plan.host_region_bytes
    rt = cupy.cuda.runtime
    staged = []
    for a in (k, v):  # the host blocks' true bytes, in pinned memory
        if not nbytes:
            break
        h = memory.allocate(nbytes, "uint8", "pinned")
        hptr = memory.allocation_of(h).ptr
        rt.memcpy(hptr, a.data.ptr, nbytes, rt.memcpyDeviceToHost)
        staged.append((a, h, hptr))

    def state() -> None:  # garbage (NaN bits) where the copy must land: only the copy makes it right
        for a, _, _ in staged:
            a.reshape(-1).view(cupy.uint8)[:nbytes].fill(0xFF)

    piece = timing.MEMCPY_PIECE  # graph memcpy nodes of 512 MiB and more ran slower (lib.engine.timing)

    def step() -> None:
        s = cupy.cuda.get_current_stream()
        for a, _, hptr in staged:
            for off in range(0, nbytes, piece):
                rt.memcpyAsync(a.data.ptr + off, hptr + off, min(piece, nbytes - off),
                               rt.memcpyHostToDevice, s.ptr)
        launch()

    base = _row_base(backend, src.problem, "explicit_copy", plan)
    if staged:
        state()  # the checked call starts from garbage; timed samples need no re-poisoning
    return [_guarded(base, lambda: _measure(base, src.problem, out, ref, step))]


_MODE_FUNCS = {"managed_remote": _mode_managed_remote, "pinned_zero_copy": _mode_pinned_zero_copy,
               "managed_migrate": _mode_managed_migrate, "prefetch_overlap": _mode_prefetch_overlap,
               "explicit_copy": _mode_explicit_copy}


def measure_decode(point: dict) -> list[dict]:
    """One decode point: build the plan's cache once, then each backend in the point's mode."""
    from lib.engine import backends as B
    from lib.engine import measure as bench
    from lib.engine.gpu import require_gpu

    mode = point.get("mode")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    problem = bench.problem_of({**point, "placement": "identity"})
    plan = OffloadPlan.for_problem(problem, point["fraction"])
    names = [n for n in str(point["backends"]).split("+") if n]
    backends = [B.get_backend(n) for n in names]  # unknown names fail before any GPU work
    require_gpu()
    src = _source_case(problem, plan)
    ref = src.reference()
    rows = []
    for backend in backends:
        opts = {}
        if backend.family == "own" and point.get("partition_size"):
            opts["partition_size"] = int(point["partition_size"])
        first = next(v for v, (m, _) in VARIANTS.items() if m == mode)
        try:
            reason = backend.unavailable_reason()
            if reason:
                raise RuntimeError(f"backend {backend.name} is unavailable: {reason}")
            rows.extend(_MODE_FUNCS[mode](backend, src, plan, ref, opts))
        except Exception as exc:  # set-up failed: one error row for the mode's first variant
            base = _row_base(backend, problem, first, plan)
            rows.append({**base, "status": "error", "error": bench.error_text(exc),
                         "extra": {**base["extra"], "stage": "setup"}})
        finally:
            transfer.release()
    return rows


def measure_yardstick(point: dict) -> list[dict]:
    """The bus yardstick: pinned memcpy or managed prefetch bandwidth, both directions."""
    rows = transfer.measure_transfer(point["method"], point["nbytes"])
    for r in rows:
        r["extra"] = {**r["extra"], "variant": "yardstick"}
    return rows


def measure_point(point: dict):
    """The experiment's measure function: dispatch on ``point['measurement']``."""
    m = point.get("measurement", "decode")
    if m == "decode":
        return measure_decode(point)
    if m == "yardstick":
        return measure_yardstick(point)
    raise ValueError(f"measurement must be 'decode' or 'yardstick', got {m!r}")


# ----------------------------------------------------------------------------- oversubscription

def run_oversubscribed(*, factor: float = 1.25, seq_len: int = 4096, num_heads: int = 32,
                       num_kv_heads: int = 8, head_size: int = 128, block_size: int = 16,
                       samples: int = 3, allow_oversubscription: bool = False) -> dict:
    """Decode over a managed KV cache ``factor`` times the GPU's memory: true oversubscription.

    Never run by the experiment, the tests or CI. Without ``allow_oversubscription=True`` it
    refuses before touching the GPU: pages are evicted and faulted back on every step, which on
    a shared GPU can thrash or hang the device and evict other processes' memory. Run it only on
    a GPU that is yours alone, with host memory to hold what is evicted. Checks two sequences
    against the float64 reference; times ``samples`` eager calls.
    """
    if allow_oversubscription is not True:
        raise memory.OversubscriptionRefused(
            "run_oversubscribed allocates more managed memory than the GPU has: every decode step "
            "then evicts pages and faults them back, which can thrash or hang a shared GPU and evict "
            "other processes' memory. Pass allow_oversubscription=True only on a GPU that is yours "
            "alone.")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1.0 < factor <= 4.0:
        raise ValueError(f"factor must be in (1, 4] (cache size / GPU memory), got {factor!r}")
    import cupy

    from lib.engine import backends as B
    from lib.engine import kernels
    from lib.engine import kvcache
    from lib.engine import timing
    from lib.engine.reference import TOLERANCE, decode_attention_reference, relative_error

    total = int(cupy.cuda.runtime.memGetInfo()[1])
    token_bytes = num_kv_heads * head_size * 2  # fp16
    batch = math.ceil(factor * total / (2 * seq_len * token_bytes))
    kv_bytes = 2 * batch * seq_len * token_bytes
    _check_host_memory(kv_bytes)  # evicted pages live in host RAM
    problem = B.DecodeProblem.uniform(batch, seq_len, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                      head_size=head_size, block_size=block_size, dtype="float16")
    tables = kvcache.make_block_tables(problem.seq_lens, block_size, "identity")
    nb, x = tables.num_blocks, 8  # fp16 keys in 16-byte vectors of 8
    alloc = memory.allocator("managed", allow_oversubscription=True)  # the opt-in, passed on
    k = alloc((nb, num_kv_heads, head_size // x, block_size, x), "float16")
    v = alloc((nb, num_kv_heads, head_size, block_size), "float16")
    rng = np.random.default_rng(0)
    step = max(1, (256 * MiB) // (block_size * token_bytes))  # fill in 256 MiB pieces
    for a in (k, v):
        for i in range(0, nb, step):
            a[i:i + step] = kvcache.random_array(a[i:i + step].shape, "float16", rng, xp=cupy)
    q = kvcache.random_array((batch, num_heads, head_size), "float16", rng, xp=cupy)
    out = cupy.full((batch, num_heads, head_size), np.nan, dtype=cupy.float16)
    plan = kernels.plan_launch(dtype="float16", block_size=block_size, head_size=head_size,
                               num_heads=num_heads, num_kv_heads=num_kv_heads, num_seqs=batch,
                               max_seq_len=seq_len,
                               num_sms=cupy.cuda.Device().attributes["MultiProcessorCount"])
    launch = kernels.OwnDecode(plan, q=q, k_cache=k, v_cache=v,
                               block_tables=cupy.asarray(tables.tables),
                               seq_first=cupy.asarray(tables.seq_start),
                               seq_lens=cupy.asarray(np.asarray(problem.seq_lens, dtype=np.int32)),
                               out=out, scale=1.0 / math.sqrt(head_size))
    launch()
    cupy.cuda.Device().synchronize()
    errs = []
    n = tables.tables.shape[1]
    for s in (0, batch - 1):  # the whole cache cannot be checked at once: two sequences
        blocks = cupy.asarray(tables.tables[s, :n].astype(np.int64))
        kp, vp = kvcache.from_classic(k[blocks], v[blocks], xp=cupy)
        ref = decode_attention_reference(q[s:s + 1], kp, vp, np.arange(n, dtype=np.int32)[None],
                                         [seq_len], dtype_name="float16", xp=cupy)
        errs.append(relative_error(out[s:s + 1], ref, dtype_name="float16"))
    t = timing.time_fn(launch, "eager", warmup=1, min_samples=samples, max_samples=samples)
    return {"factor": factor, "batch_size": batch, "kv_bytes": kv_bytes, "gpu_total_bytes": total,
            "median_ms": t.median_us / 1e3, "p10_ms": t.p10_us / 1e3, "p90_ms": t.p90_us / 1e3,
            "kv_gbps": kv_bytes / (t.median_us * 1e3), "rel_error": max(errs),
            "check_passed": max(errs) <= TOLERANCE["float16"]}
