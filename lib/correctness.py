"""The correctness matrix: every backend x variant x block size x dtype x head size x head layout.

Each case draws fresh random inputs, poisons the output with NaN before every call, and
compares with the float64 reference computed on the same data. Three placements, each with the
backends it is meaningful for:

* identity: every backend; `paged` and `contiguous` must also be bit-identical;
* shuffled: backends that read a page table (own paged, vLLM) and SDPA (gathers through it);
* single_content: `no_offset` (exact only here), which must equal `paged` bit for bit.

`run_matrix` yields one row per (case, backend); a failure (exception) is a row too.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5}
HEAD_LAYOUTS = {"MHA": (4, 4), "GQA4": (8, 2), "MQA": (8, 1)}

IDENTITY_BACKENDS = ("own-v1-paged", "own-v2-paged", "own-auto-paged", "own-v1-contiguous",
                     "own-v2-contiguous", "vllm", "sdpa_dense")
SHUFFLED_BACKENDS = ("own-v1-paged", "own-v2-paged", "vllm", "sdpa_dense")
SINGLE_BACKENDS = ("own-v1-paged", "own-v2-paged", "own-v1-no_offset", "own-v2-no_offset")
#: long sequences: v1 cannot hold 32k logits per head tile in shared memory, so it is left out
LONG_BACKENDS = ("own-v2-paged", "own-auto-paged", "vllm", "sdpa_dense")
#: pairs that must agree bit for bit on the same case
BIT_IDENTICAL = {"own-v1-contiguous": "own-v1-paged", "own-v2-contiguous": "own-v2-paged",
                 "own-v1-no_offset": "own-v1-paged", "own-v2-no_offset": "own-v2-paged"}


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

    def problem(self, seed: int):
        from lib.backends import DecodeProblem

        nh, nkv = HEAD_LAYOUTS[self.heads]
        return DecodeProblem(num_seqs=len(self.seq_lens), num_heads=nh, num_kv_heads=nkv,
                             head_size=self.head_size, block_size=self.block_size,
                             dtype=self.dtype, seq_lens=self.seq_lens, placement=self.placement,
                             seed=seed)

    @property
    def backends(self) -> tuple[str, ...]:
        if max(self.seq_lens) > 4096:
            return LONG_BACKENDS
        return {"identity": IDENTITY_BACKENDS, "shuffled": SHUFFLED_BACKENDS,
                "single_content": SINGLE_BACKENDS}[self.placement]


def matrix_cases(*, dtypes=None, block_sizes=None, head_sizes=None, heads=None,
                 placements=("identity", "shuffled", "single_content"), long_len=32768):
    """The full matrix, plus long-sequence cases (v2 only; v1 cannot hold 32k logits)."""
    from lib.kvcache import SUPPORTED_BLOCK_SIZES
    from lib.validation import SUPPORTED_DTYPES, SUPPORTED_HEAD_SIZES

    dtypes = dtypes or SUPPORTED_DTYPES
    block_sizes = block_sizes or SUPPORTED_BLOCK_SIZES
    head_sizes = head_sizes or SUPPORTED_HEAD_SIZES
    heads = heads or tuple(HEAD_LAYOUTS)
    for dt, bs, d, h, pl in itertools.product(dtypes, block_sizes, head_sizes, heads, placements):
        yield MatrixCase(dt, bs, d, h, pl, ragged_lengths(bs))
    if long_len:
        for bs, h in itertools.product((1, 16, 256), ("MHA", "GQA4")):
            if bs in block_sizes:
                yield MatrixCase("float16", bs, 128, h, "shuffled", (long_len, 3001))


def run_case(case: MatrixCase, seed: int, *, backends=None) -> list[dict]:
    """Run every backend of one case on fresh inputs; one row each."""
    import cupy

    from lib.backends import DecodeCase, get_backend
    from lib.reference import relative_error

    problem = case.problem(seed)
    data = DecodeCase.build(problem)
    ref = data.reference()
    outs, rows = {}, []
    for name in backends or case.backends:
        if name in BIT_IDENTICAL and name.endswith("no_offset") and case.placement != "single_content":
            continue
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
            launch = backend.prepare(data, out)
            launch()
            cupy.cuda.get_current_stream().synchronize()
            err = relative_error(out, ref, dtype_name=problem.dtype)
            row["rel_error"] = err
            row["passed"] = bool(err <= TOLERANCE[case.dtype])
            outs[name] = out
            partner = BIT_IDENTICAL.get(name)
            if partner and partner in outs:
                same = bool(cupy.array_equal(out.view(cupy.uint8), outs[partner].view(cupy.uint8)))
                row["bit_identical_to"], row["bit_identical"] = partner, same
                row["passed"] = row["passed"] and same
        except Exception as exc:  # a crash is a failed row, recorded with its message
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
    return rows


def precompile(cases, workers: int = 8) -> float:
    """Compile every module the cases need, in parallel processes (fills CuPy's disk cache)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from lib import kernels

    keys = set()
    for c in cases:
        nh, nkv = HEAD_LAYOUTS[c.heads]
        keys.add((c.dtype, c.block_size, c.head_size, kernels.head_tile(nh, nkv, c.head_size)))
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_compile_one, sorted(keys)))
    return time.perf_counter() - t0


def _compile_one(key):
    from lib import kernels

    mod = kernels.get_module(*key)
    for name in kernels.instantiations(*key):
        mod.get_function(name)
    return key
