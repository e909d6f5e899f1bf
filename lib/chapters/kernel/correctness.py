"""The correctness matrix: every backend x variant x block size x dtype x head size x head layout.

Each case draws fresh random inputs and checks every backend with
:func:`lib.engine.measure.check_then_time` (NaN-poisoned output, float64 reference). Placements:
identity (every backend; `paged` and `contiguous` must also be bit-identical), shuffled (backends
that read a page table, and SDPA), single_content (`no_offset`, exact only here, must equal
`paged` bit for bit). A failure (exception) is a row too.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from lib.engine.reference import TOLERANCE

#: (query heads, KV heads) of each head layout the matrix names
HEAD_LAYOUTS = {"MHA": (4, 4), "GQA4": (8, 2), "MQA": (8, 1), "GQA2": (4, 2), "GQA6": (12, 2),
                "GQA8": (16, 2), "GQA16": (32, 2), "MQA32": (32, 1), "GQA12": (24, 2)}

IDENTITY_BACKENDS = ("own-v1-paged", "own-v2-paged", "own-auto-paged", "own-v1-contiguous",
                     "own-v2-contiguous", "vllm", "sdpa_dense")
SHUFFLED_BACKENDS = ("own-v1-paged", "own-v2-paged", "vllm", "sdpa_dense")
SINGLE_BACKENDS = ("own-v1-paged", "own-v2-paged", "own-v1-no_offset", "own-v2-no_offset")
#: long sequences: v1 cannot hold 32k logits per head tile in shared memory, so it is left out
LONG_BACKENDS = ("own-v2-paged", "own-auto-paged", "vllm", "sdpa_dense")
#: the head layouts of the v1/v2 matrix (v3's block of the grid adds GQA 2:1 to 16:1, MQA 32:1)
MATRIX_LAYOUTS = ("MHA", "GQA4", "MQA")
#: v3 (the matrix-unit kernel, fp16/bf16) has its own block of the grid (`variant="v3"`)
V3_BACKENDS = {"identity": ("own-v3-paged", "own-v3-contiguous"), "shuffled": ("own-v3-paged",),
               "single_content": ("own-v3-paged", "own-v3-no_offset")}
#: pairs that must agree bit for bit on the same case
BIT_IDENTICAL = {"own-v1-contiguous": "own-v1-paged", "own-v2-contiguous": "own-v2-paged",
                 "own-v1-no_offset": "own-v1-paged", "own-v2-no_offset": "own-v2-paged",
                 "own-v3-contiguous": "own-v3-paged", "own-v3-no_offset": "own-v3-paged"}
#: the lengths of a point's `lengths` value (ragged: `ragged_lengths(block_size)`)
LONG_LENGTHS = {"long": (32768, 3001), "long64k": (65536, 3001)}


def ragged_lengths(block_size: int) -> tuple[int, ...]:
    """Lengths of 1, non-multiples of the block size, and past one v2 partition (512)."""
    return (1, block_size + 1, 3 * block_size - 1, 700, 1537)


@dataclass(frozen=True)
class MatrixCase:
    dtype: str
    block_size: int
    head_size: int
    heads: str
    placement: str
    seq_lens: tuple[int, ...]
    variant: str = ""  # "v3": the matrix-unit kernel's own backend set

    def problem(self, seed: int):
        from lib.engine.backends import DecodeProblem

        nh, nkv = HEAD_LAYOUTS[self.heads]
        return DecodeProblem(num_seqs=len(self.seq_lens), num_heads=nh, num_kv_heads=nkv,
                             head_size=self.head_size, block_size=self.block_size, dtype=self.dtype,
                             seq_lens=self.seq_lens, placement=self.placement, seed=seed)

    @property
    def backends(self) -> tuple[str, ...]:
        if self.variant == "v3":
            return V3_BACKENDS["shuffled" if max(self.seq_lens) > 4096 else self.placement]
        if self.variant:
            raise ValueError(f"variant={self.variant!r}: the matrix knows '' and 'v3'")
        if max(self.seq_lens) > 4096:
            return LONG_BACKENDS
        return {"identity": IDENTITY_BACKENDS, "shuffled": SHUFFLED_BACKENDS,
                "single_content": SINGLE_BACKENDS}[self.placement]


def matrix_cases(*, dtypes=None, block_sizes=None, head_sizes=None, heads=None,
                 placements=("identity", "shuffled", "single_content"), long_len=32768):
    """The full matrix, plus long-sequence cases (v2 only; v1 cannot hold 32k logits)."""
    from lib.engine.kvcache import SUPPORTED_BLOCK_SIZES
    from lib.engine.validation import SUPPORTED_DTYPES, SUPPORTED_HEAD_SIZES

    block_sizes = block_sizes or SUPPORTED_BLOCK_SIZES
    for dt, bs, d, h, pl in itertools.product(dtypes or SUPPORTED_DTYPES, block_sizes,
                                              head_sizes or SUPPORTED_HEAD_SIZES,
                                              heads or MATRIX_LAYOUTS, placements):
        yield MatrixCase(dt, bs, d, h, pl, ragged_lengths(bs))
    if long_len:
        for bs, h in itertools.product((1, 16, 256), ("MHA", "GQA4")):
            if bs in block_sizes:
                yield MatrixCase("float16", bs, 128, h, "shuffled", (long_len, 3001))


def run_case(case: MatrixCase, seed: int, *, backends=None) -> list[dict]:
    """Run every backend of one case on fresh inputs; one row each."""
    import cupy

    from lib.engine.backends import DecodeCase, get_backend
    from lib.engine.measure import check_then_time, error_text

    problem = case.problem(seed)
    data = DecodeCase.build(problem)
    ref = data.reference()
    outs, rows = {}, []
    for name in backends or case.backends:
        backend = get_backend(name)
        row = dict(asdict(case), seq_lens=" ".join(map(str, case.seq_lens)), seed=seed,
                   backend=name, tolerance=TOLERANCE[case.dtype], rel_error=float("nan"),
                   passed=False, bit_identical_to="", bit_identical=None, error="")
        reason = backend.unavailable_reason()
        if reason:
            row["error"] = f"unavailable: {reason}"
            rows.append(row)
            continue
        try:
            out = data.poisoned_output()
            check = check_then_time(backend.prepare(data, out), out, ref, dtype=problem.dtype, protocol=None)
            row["rel_error"], row["passed"] = check["rel_error"], check["check_passed"]
            outs[name] = out
            partner = BIT_IDENTICAL.get(name)
            if partner and partner in outs:
                same = bool(cupy.array_equal(out.view(cupy.uint8), outs[partner].view(cupy.uint8)))
                row["bit_identical_to"], row["bit_identical"] = partner, same
                row["passed"] = row["passed"] and same
        except Exception as exc:  # a crash is a failed row, recorded with its message
            row["error"] = error_text(exc)
        rows.append(row)
    return rows


def precompile(cases, workers: int | None = None) -> float:
    """Compile every module the cases need, in parallel (see `lib.engine.kernels.precompile`)."""
    from lib.engine import kernels

    keys = set()
    for c in cases:
        keys |= kernels.modules_for(c.dtype, c.block_size, c.head_size, *HEAD_LAYOUTS[c.heads])
    return kernels.precompile(keys, workers)


def case_of(point: dict) -> MatrixCase:
    bs = int(point["block_size"])
    kind = point.get("lengths", "ragged")
    if kind != "ragged" and kind not in LONG_LENGTHS:
        raise ValueError(f"lengths={kind!r}: choose ragged or {', '.join(LONG_LENGTHS)}")
    lengths = ragged_lengths(bs) if kind == "ragged" else LONG_LENGTHS[kind]
    return MatrixCase(point["dtype"], bs, int(point["head_size"]), point["heads"],
                      point["placement"], lengths, str(point.get("variant") or ""))


def backends_of(point: dict) -> tuple[str, ...] | None:
    """A point's own backend list (``backends``: names joined by '+'), or None for the case's set."""
    names = tuple(n for n in str(point.get("backends") or "").split("+") if n)
    return names or None


def precompile_points(points: list[dict]) -> None:
    """Experiment `prepare` hook: compile every own-kernel module of the sweep before the first point."""
    cases = [case_of(p) for p in points
             if any(n.startswith("own-") for n in (backends_of(p) or case_of(p).backends))]
    if cases:
        precompile(cases)


def measure_point(point: dict) -> list[dict]:
    """Experiment `measure` hook: one matrix case, as rows of the results schema."""
    from lib.engine.backends import get_backend

    case = case_of(point)
    nh, nkv = HEAD_LAYOUTS[case.heads]
    rows = []
    for r in run_case(case, seed=int(point.get("seed", 0)) or _seed_of(point),
                      backends=backends_of(point)):
        b = get_backend(r["backend"])
        row = {"backend": r["backend"], "version": str(b.version or ""),
               "addressing": b.addressing or "", "num_heads": nh, "num_kv_heads": nkv,
               "batch_size": len(case.seq_lens), "seq_len": max(case.seq_lens),
               "rel_error": r["rel_error"], "check_passed": r["passed"],
               "extra": {"seq_lens": r["seq_lens"], "tolerance": r["tolerance"],
                         "bit_identical_to": r["bit_identical_to"],
                         "bit_identical": r["bit_identical"], "seed": r["seed"]}}
        if r["error"]:
            row.update(status="error", error=r["error"])
        rows.append(row)
    return rows


def _seed_of(point: dict) -> int:
    """A distinct, reproducible seed per point: fresh random inputs for every case."""
    import zlib

    return zlib.crc32(repr(sorted(point.items())).encode()) & 0x7FFFFFFF
