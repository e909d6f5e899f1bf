"""Which KV blocks of a managed pool stay in host memory, and the advice that keeps them there.

:func:`host_block_mask` chooses blocks (tail, head, evenly spread or seeded random);
:func:`apply_block_residency` gives the chosen ones PreferredLocation CPU + AccessedBy GPU on the
host (the GPU then reads them over PCIe without migrating them) and the rest PreferredLocation GPU.
Pinned zero-copy is all-or-nothing per allocation; a pool split between pinned host and device
memory needs the virtual-memory driver API (:class:`lib.engine.vmm.SplitMapping`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lib.engine import memory
from lib.engine.validation import _positive_int


def host_block_mask(num_blocks: int, fraction: float, *, pattern: str = "tail", seed: int = 0) -> np.ndarray:
    """Which of ``num_blocks`` KV-pool blocks to keep host-side: a bool mask, True = host.

    ``round(fraction * num_blocks)`` blocks (halves round up). pattern: ``tail`` (the last
    blocks), ``head`` (the first), ``spread`` (evenly interleaved: each prefix of k blocks holds
    ``floor(k * fraction + 1/2)`` host blocks), ``random`` (a seeded choice).
    """
    n = _positive_int("num_blocks", num_blocks)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) \
            or not math.isfinite(fraction) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    k = int(math.floor(fraction * n + 0.5))
    mask = np.zeros(n, dtype=bool)
    if pattern == "tail":
        mask[n - k:] = k > 0
    elif pattern == "head":
        mask[:k] = True
    elif pattern == "spread":
        cum = np.floor(np.arange(1, n + 1) * (k / n) + 0.5).astype(np.int64)
        mask = np.diff(np.concatenate([[0], cum])) > 0
    elif pattern == "random":
        mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    else:
        raise ValueError(f"pattern must be 'tail', 'head', 'spread' or 'random', got {pattern!r}")
    return mask


def block_runs(mask) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal entries: ``[(start, stop, host), ...]`` covering the mask in order."""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    if m.size == 0:
        return []
    edges = np.flatnonzero(m[1:] != m[:-1]) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [m.size]])
    return [(int(a), int(b), bool(m[a])) for a, b in zip(starts, stops)]


@dataclass(frozen=True)
class Residency:
    """What :func:`apply_block_residency` did."""

    num_blocks: int
    host_blocks: int
    block_bytes: int
    runs: int

    @property
    def host_bytes(self) -> int:
        return self.host_blocks * self.block_bytes

    @property
    def host_fraction(self) -> float:
        return self.host_blocks / self.num_blocks


def apply_block_residency(pool, host_mask, *, device: int | None = None, stream=None) -> Residency:
    """Keep the masked blocks of a managed pool ``[num_blocks, ...]`` host-side, the rest on the GPU.

    Host blocks: PreferredLocation CPU + AccessedBy GPU, prefetched to the host (the GPU then
    reads them over PCIe without migrating them). GPU blocks: PreferredLocation GPU, AccessedBy
    unset, prefetched to the GPU. Advice works on whole pages, so a page shared by a host block
    and a GPU block gets the advice applied last (runs are applied in order). Waits until done.
    """
    import cupy as cp

    mask = np.asarray(host_mask, dtype=bool).reshape(-1)
    if pool.ndim < 1 or pool.shape[0] != mask.size:
        raise ValueError(f"mask has {mask.size} entries but the pool has shape {pool.shape}")
    if not pool.flags.c_contiguous:
        raise ValueError("the pool must be C-contiguous (blocks are consecutive byte ranges)")
    kind = memory.kind_of(pool)
    alloc = memory.allocation_of(pool)
    if (alloc.spec.base if alloc is not None else kind) != "managed":
        raise ValueError(
            f"block residency needs a managed pool, this one is {kind!r}; pinned zero-copy is "
            "all-or-nothing per array (allocate the pool with kind='pinned')"
        )
    dev = device if device is not None else (alloc.device if alloc else None)  # None: the current one
    block_bytes = pool.nbytes // mask.size
    s = stream if stream is not None else cp.cuda.get_current_stream()
    runs = block_runs(mask)
    for start, stop, host in runs:
        off, size = start * block_bytes, (stop - start) * block_bytes
        if host:
            memory.advise(pool, "preferred_location", "host", offset=off, nbytes=size, device=dev)
            memory.advise(pool, "accessed_by", "gpu", offset=off, nbytes=size, device=dev)
            memory.prefetch(pool, "host", offset=off, nbytes=size, device=dev, stream=s)
        else:
            memory.advise(pool, "preferred_location", "gpu", offset=off, nbytes=size, device=dev)
            memory.advise(pool, "unset_accessed_by", "gpu", offset=off, nbytes=size, device=dev)
            memory.prefetch(pool, "gpu", offset=off, nbytes=size, device=dev, stream=s)
    s.synchronize()
    return Residency(int(mask.size), int(mask.sum()), int(block_bytes), len(runs))
