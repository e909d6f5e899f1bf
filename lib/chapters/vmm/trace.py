"""A seeded synthetic request trace, and how much KV memory each allocation scheme wastes on it.

Synthetic, because waste depends only on the spread of sequence lengths: a generator with named
parameters lets a reader change the spread and watch the waste move. :func:`synthetic_trace`
draws prompt lengths lognormal (median 512 tokens, log-space sigma 1, clipped to [16, 32768]: a
minimal chat turn and a 32k context), output lengths geometric (mean 256: a constant per-token
chance of stopping; clipped to a ``max_tokens`` cap of 4096) and Poisson arrivals (10 per
second). The median and sigma are round numbers of the order public chat traces show, *not* fitted.

:func:`fragmentation_rows` compares, for the same final lengths, what each scheme allocates beyond
the bytes the tokens need: ``paged`` (blocks of 1-256 tokens; the block table is reported as
``metadata_bytes``), ``vmm`` (physical chunks of ``chunk_bytes`` per sequence: paging with a
coarse block) and ``max_reservation`` (every sequence reserves ``max_tokens`` up front, the
pre-PagedAttention baseline; by default the longest sequence, the case most favourable to it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from lib.engine.validation import _positive_int

#: block sizes (tokens) swept by default: the powers of two the page-table chapter uses
DEFAULT_BLOCK_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: VMM chunk sizes swept by default: 2 MiB (the H100/H200 granularity) and a few multiples
DEFAULT_CHUNK_BYTES = (2 << 20, 4 << 20, 8 << 20, 16 << 20)
#: largest block size accounted for (vLLM's kernels and ours take 1-256)
MAX_BLOCK_TOKENS = 256


@dataclass(frozen=True)
class Request:
    """One request: when it arrived and how many tokens it reads (prompt) and writes (output)."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        """Sequence length when the request finishes: the KV it holds at its largest."""
        return self.prompt_tokens + self.output_tokens


def _positive_float(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def synthetic_trace(num_requests: int = 1000, *, seed: int = 0, prompt_median: float = 512,
                    prompt_sigma: float = 1.0, prompt_min: int = 16, prompt_max: int = 32768,
                    output_mean: float = 256, output_max: int = 4096,
                    arrival_rate: float = 10.0) -> list[Request]:
    """``num_requests`` requests drawn as the module docstring describes; same seed, same trace."""
    n = _positive_int("num_requests", num_requests)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    median = _positive_float("prompt_median", prompt_median)
    sigma = _positive_float("prompt_sigma", prompt_sigma)
    lo = _positive_int("prompt_min", prompt_min)
    hi = _positive_int("prompt_max", prompt_max)
    if lo > hi:
        raise ValueError(f"prompt_min ({lo}) must be <= prompt_max ({hi})")
    if not lo <= median <= hi:
        raise ValueError(f"prompt_median ({median}) must lie in [prompt_min, prompt_max] = [{lo}, {hi}]")
    mean_out = _positive_float("output_mean", output_mean)
    if mean_out < 1:
        raise ValueError(f"output_mean must be >= 1 token, got {output_mean!r}")
    out_max = _positive_int("output_max", output_max)
    rate = _positive_float("arrival_rate", arrival_rate)

    rng = np.random.default_rng(int(seed))
    prompts = np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), lo, hi).astype(np.int64)
    outputs = np.clip(rng.geometric(1.0 / mean_out, n), 1, out_max).astype(np.int64)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    return [Request(i, float(arrivals[i]), int(prompts[i]), int(outputs[i])) for i in range(n)]


def trace_rows(requests: Iterable[Request]) -> list[dict[str, Any]]:
    """Tidy rows, one per request, with ``total_tokens`` added."""
    return [{**asdict(r), "total_tokens": r.total_tokens} for r in requests]


def _percentiles(x: np.ndarray, name: str) -> dict[str, float]:
    p10, p50, p90, p99 = np.percentile(x, [10, 50, 90, 99])
    return {f"{name}_mean": float(x.mean()), f"{name}_p10": float(p10), f"{name}_median": float(p50),
            f"{name}_p90": float(p90), f"{name}_p99": float(p99), f"{name}_max": float(x.max())}


def trace_summary(requests: Sequence[Request]) -> dict[str, float]:
    """Mean, p10/median/p90/p99 and max of prompt, output and total lengths; arrival rate seen."""
    if not requests:
        raise ValueError("trace is empty")
    prompts = np.array([r.prompt_tokens for r in requests], dtype=float)
    outputs = np.array([r.output_tokens for r in requests], dtype=float)
    span = requests[-1].arrival_s
    return {"num_requests": float(len(requests)), **_percentiles(prompts, "prompt"),
            **_percentiles(outputs, "output"), **_percentiles(prompts + outputs, "total"),
            "arrival_rate": len(requests) / span if span > 0 else float("inf")}


def sequence_lengths(requests: Iterable[Request], progress: float = 1.0) -> list[int]:
    """KV length of each request after ``progress`` (a fraction in [0, 1]) of its output was decoded.

    ``progress=1`` gives final lengths (prompt + output); ``progress=0`` the prompts alone.
    """
    try:
        p = float(progress)
    except (TypeError, ValueError):
        raise ValueError(f"progress must be a fraction in [0, 1], got {progress!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"progress must be a fraction in [0, 1], got {progress!r}")
    return [r.prompt_tokens + int(math.floor(p * r.output_tokens)) for r in requests]


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_size: int, dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token occupies across all layers (2 x layers x kv_heads x head x dtype)."""
    return 2 * (_positive_int("num_layers", num_layers) * _positive_int("num_kv_heads", num_kv_heads)
                * _positive_int("head_size", head_size) * _positive_int("dtype_bytes", dtype_bytes))


# ----------------------------------------------------------------------------- fragmentation

def _lengths(lengths: Iterable[int]) -> np.ndarray:
    arr = list(lengths)
    if not arr:
        raise ValueError("lengths is empty: need at least one sequence length")
    for x in arr:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x <= 0:
            raise ValueError(f"sequence lengths must be positive ints (tokens), got {x!r}")
    return np.asarray(arr, dtype=np.int64)


def _row(scheme: str, lengths: np.ndarray, bpt: int, allocated: int, granule_bytes: int, **extra: Any) -> dict:
    used = int(lengths.sum()) * bpt
    wasted = allocated - used
    return {"scheme": scheme, "block_tokens": extra.pop("block_tokens", None),
            "chunk_bytes": extra.pop("chunk_bytes", None), "max_tokens": extra.pop("max_tokens", None),
            "granule_bytes": granule_bytes, "bytes_per_token": bpt, "num_sequences": int(lengths.size),
            "used_bytes": used, "allocated_bytes": allocated, "wasted_bytes": wasted,
            "waste_fraction": wasted / allocated, "metadata_bytes": extra.pop("metadata_bytes", 0)}


def paged_allocation(lengths: Iterable[int], block_tokens: int, bytes_per_token: int) -> dict[str, Any]:
    """Blocks of ``block_tokens`` tokens: each sequence gets ceil(L / B) blocks."""
    L = _lengths(lengths)
    b = _positive_int("block_tokens", block_tokens)
    if b > MAX_BLOCK_TOKENS:
        raise ValueError(f"block_tokens must be in [1, {MAX_BLOCK_TOKENS}], got {b}")
    bpt = _positive_int("bytes_per_token", bytes_per_token)
    blocks = -(-L // b)
    return _row("paged", L, bpt, int(blocks.sum()) * b * bpt, b * bpt,
                block_tokens=b, metadata_bytes=int(blocks.sum()) * 4)


def vmm_allocation(lengths: Iterable[int], chunk_bytes: int, bytes_per_token: int) -> dict[str, Any]:
    """Physical chunks of ``chunk_bytes`` per sequence: ceil(L x bytes_per_token / C) chunks each."""
    L = _lengths(lengths)
    c = _positive_int("chunk_bytes", chunk_bytes)
    bpt = _positive_int("bytes_per_token", bytes_per_token)
    chunks = -(-(L * bpt) // c)
    return _row("vmm", L, bpt, int(chunks.sum()) * c, c, chunk_bytes=c)


def max_reservation(lengths: Iterable[int], bytes_per_token: int, max_tokens: int | None = None) -> dict[str, Any]:
    """Every sequence reserves ``max_tokens`` (default: the longest sequence) before it starts."""
    L = _lengths(lengths)
    bpt = _positive_int("bytes_per_token", bytes_per_token)
    m = int(L.max()) if max_tokens is None else _positive_int("max_tokens", max_tokens)
    if m < L.max():
        raise ValueError(f"max_tokens ({m}) is shorter than the longest sequence ({int(L.max())})")
    return _row("max_reservation", L, bpt, int(L.size) * m * bpt, m * bpt, max_tokens=m)


def fragmentation_rows(lengths: Iterable[int], bytes_per_token: int, *,
                       block_tokens: Iterable[int] = DEFAULT_BLOCK_TOKENS,
                       chunk_bytes: Iterable[int] = DEFAULT_CHUNK_BYTES,
                       max_tokens: int | None = None) -> list[dict[str, Any]]:
    """One row per paged block size, per VMM chunk size, and one for the max-length reservation.

    Columns: scheme, block_tokens, chunk_bytes, max_tokens (the scheme's parameter; None where it
    does not apply), granule_bytes (the allocation unit in bytes, a common x axis), bytes_per_token,
    num_sequences, used_bytes, allocated_bytes, wasted_bytes, waste_fraction (wasted / allocated),
    metadata_bytes (paged: the int32 block table).
    """
    L = _lengths(lengths)
    blocks, chunks = list(block_tokens), list(chunk_bytes)
    if not blocks and not chunks:
        raise ValueError("give at least one block size or chunk size")
    rows = [paged_allocation(L, b, bytes_per_token) for b in blocks]
    rows += [vmm_allocation(L, c, bytes_per_token) for c in chunks]
    rows.append(max_reservation(L, bytes_per_token, max_tokens))
    return rows
