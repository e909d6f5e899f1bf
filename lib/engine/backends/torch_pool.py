"""A launcher's own torch memory pool: what lets a torch op that allocates on every call (SDPA's
output, FA3's log-sum-exp) be captured in a CUDA graph without an allocation in it."""

from __future__ import annotations


def mem_pool_context(torch):
    """``torch.cuda.use_mem_pool`` (torch >= 2.6), or a clear error."""
    use = getattr(torch.cuda, "use_mem_pool", None) or getattr(torch.cuda.memory, "use_mem_pool", None)
    if use is None or not hasattr(torch.cuda, "MemPool"):
        raise RuntimeError(f"a launcher with its own memory pool needs torch.cuda.MemPool and "
                           f"use_mem_pool (torch >= 2.6); this torch is {torch.__version__}")
    return use
