"""PyTorch FlexAttention decode over the paged (vLLM-layout) KV cache: the `flex_paged` backend.

FlexAttention has no page table but a *block mask*: per query row, a list of KV blocks to visit.
With the mask's KV block size set to the page size, that list is the page table. The pool
``[num_blocks, block_size, kv_heads, D]`` is viewed, without a copy, as one physical sequence per
KV head (batch 1, broadcast over the queries); :func:`plan_pages` turns the block tables into the
block lists; a mask_mod keeps physical token ``p`` for sequence ``s`` iff ``owner[page] == s`` and
``p % block_size < valid[page]``. The mask is exact on its own (eager ``flex_attention`` ignores
the lists, so the slow reference is right), but needs each physical page used at most once: the
seed protocol's random tables are refused.

Block sizes: the decode kernel walks a sparse block in power-of-two tiles that divide it, the
reduction dimension of a ``tl.dot``, which Triton needs >= 16 for 16-bit inputs: pages of 16-256
tokens; 1-8 raise ValueError before launch.

The call is ``torch.compile``-d once in `prepare_decode`, outside any timed region (eager is only
a slow reference, ``compiled=False``). It allocates split-K scratch through torch's caching
allocator and does not sync with the host, so it is CUDA-graph capturable like ``sdpa_dense``.
Each distinct shape compiles once; preparing lifts dynamo's recompile limit (it would fall back
to eager after 8 shapes), and a prepared call that would recompile raises.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from lib.engine import kvcache
from lib.engine.validation import _host

#: The sparse-block (page) sizes FlexAttention's Triton decode kernel can walk (see module doc).
MIN_BLOCK_SIZE = 16
#: FlexAttention's default sparse Q block; a multiple of the decode kernel's BLOCK_M for GQA
#: groups up to 128 query heads per KV head.
Q_BLOCK_SIZE = 128
#: Recompile budget while preparing: every distinct shape compiles once, and a sweep prepares many.
_RECOMPILE_LIMIT = 4096


def check_block_size(block_size) -> int:
    """The page size FlexAttention can use as its KV sparse block size; ValueError otherwise."""
    bs = int(block_size)
    if bs != block_size or bs < MIN_BLOCK_SIZE or bs & (bs - 1):
        raise ValueError(
            f"block_size={block_size} is not supported by flex_paged: FlexAttention walks each "
            "page (its KV sparse block) in power-of-two tiles that divide it, and Triton's tl.dot "
            f"needs tiles of >= {MIN_BLOCK_SIZE} tokens; allowed: powers of two >= {MIN_BLOCK_SIZE} "
            "(16, 32, 64, 128, 256)")
    return bs


# ------------------------------------------------------------------------------ plan (NumPy)


@dataclass(frozen=True)
class PagePlan:
    """The page table in FlexAttention's terms, on the host (int32 arrays).

    kv_num_blocks/kv_indices: pages visited with the mask_mod; full_*: without it (None unless
    `full_blocks`). owner: the sequence using each physical page (-1: unused); valid: how many
    of its tokens that sequence uses.
    """

    block_size: int
    num_blocks: int
    kv_num_blocks: np.ndarray
    kv_indices: np.ndarray
    full_kv_num_blocks: np.ndarray | None
    full_kv_indices: np.ndarray | None
    owner: np.ndarray
    valid: np.ndarray

    @property
    def num_tokens(self) -> int:
        """Length of the flat physical sequence the pool is viewed as."""
        return self.num_blocks * self.block_size

    def token_mask(self, seq: int) -> np.ndarray:
        """What the mask_mod computes for sequence `seq`, over every physical token (bool)."""
        p = np.arange(self.num_tokens)
        page = p // self.block_size
        return (self.owner[page] == seq) & (p % self.block_size < self.valid[page])


def plan_pages(block_tables, seq_lens, *, block_size: int, num_blocks: int,
               full_blocks: bool = False) -> PagePlan:
    """Turn block tables (int ``[S, W]``) and lengths into block lists plus the mask's arrays;
    only the first ceil(len / block_size) entries of a row are read.

    `full_blocks` puts every completely used page in the "full" lists (no mask_mod). Off by
    default: with full lists, FlexAttention's decode kernel sizes its KV splits by the pool's
    length instead of each sequence's, so most splits find no work (read in torch's flex_decode
    template); without them, the mask costs two small table reads per key.
    """
    bs = check_block_size(block_size)
    tables = _host(block_tables)
    lens = _host(seq_lens)
    num_blocks = int(num_blocks)
    if num_blocks * bs > np.iinfo(np.int32).max:
        raise ValueError(f"{num_blocks} pages of {bs} tokens overflow FlexAttention's int32 "
                         "token indices")
    lens, pages, used, entries = kvcache.used_pages(tables, lens, bs, num_blocks)
    width = tables.shape[1]
    if np.unique(entries).size != entries.size:
        raise ValueError("a physical page appears more than once in block_tables (e.g. the seed "
                         "protocol's random tables): flex_paged's mask marks each page with one "
                         "owner, so shared or repeated pages cannot be expressed")

    seq_of = np.broadcast_to(np.arange(lens.size)[:, None], used.shape)[used]
    col = np.broadcast_to(np.arange(width)[None, :], used.shape)[used]
    owner = np.full(num_blocks, -1, dtype=np.int32)
    valid = np.zeros(num_blocks, dtype=np.int32)
    owner[entries] = seq_of
    valid[entries] = np.minimum(lens[seq_of] - col * bs, bs)

    rows = np.where(used, tables, 0).astype(np.int32)  # padding entries: page 0, never visited
    if not full_blocks:
        return PagePlan(bs, num_blocks, pages.astype(np.int32), rows, None, None, owner, valid)
    tail = lens - (pages - 1) * bs                     # tokens used in the last page, 1..bs
    partial = tail < bs
    n_full = pages - partial
    full_rows = np.where(np.arange(width)[None, :] < n_full[:, None], tables, 0).astype(np.int32)
    masked_rows = np.zeros_like(rows)
    last = tables[np.arange(lens.size), pages - 1]
    masked_rows[:, 0] = np.where(partial, last, 0)
    return PagePlan(bs, num_blocks, partial.astype(np.int32), masked_rows,
                    n_full.astype(np.int32), full_rows, owner, valid)


# ------------------------------------------------------------------------------ torch side


def unavailable_reason() -> str | None:
    """None when flex_paged can run here, else why not (never raises)."""
    import importlib.util

    from lib.engine.gpu import gpu_available

    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError as exc:
        return f"this torch has no torch.nn.attention.flex_attention ({exc})"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (torch.compile needs it for FlexAttention on CUDA)"
    if not gpu_available():
        return "no CUDA GPU / CuPy here"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU (a CPU-only torch build?)"
    return None


def pool_as_sequence(pool):
    """``[NB, BS, KVH, D]`` → ``[1, KVH, NB*BS, D]``, a view of the same memory (never a copy)."""
    nb, bs, kvh, d = pool.shape
    try:
        flat = pool.view(nb * bs, kvh, d)
    except RuntimeError as exc:  # strides that cannot merge pages into one token axis
        raise ValueError(f"the KV pool (strides {tuple(pool.stride())}) cannot be viewed as one "
                         f"token sequence without a copy: {exc}") from None
    return flat.permute(1, 0, 2).unsqueeze(0)


def _decode_step(q, k, v, out, block_mask, scale, enable_gqa, kernel_options):
    """One decode step: q ``[S, H, 1, D]`` over the paged view, written into out ``[S, H, D]``."""
    from torch.nn.attention.flex_attention import flex_attention

    o = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                       kernel_options=kernel_options)
    out.copy_(o.squeeze(2))


_COMPILED = None


def _compiled_step():
    """`_decode_step` under torch.compile (one object; dynamo keeps one entry per shape)."""
    global _COMPILED
    if _COMPILED is None:
        import torch

        _COMPILED = torch.compile(_decode_step, fullgraph=True, dynamic=False)
    return _COMPILED


def _dynamo_patch(**settings):
    """torch._dynamo.config.patch with only the settings this torch knows."""
    import torch._dynamo

    cfg = torch._dynamo.config
    return cfg.patch(**{k: v for k, v in settings.items() if hasattr(cfg, k)})


def make_block_mask(plan: PagePlan, device):
    """The BlockMask of a plan: block lists from the table, the tail mask from owner/valid."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    def dev(a):
        return torch.as_tensor(a, dtype=torch.int32, device=device)

    owner, valid, bs = dev(plan.owner), dev(plan.valid), plan.block_size

    def paged_mask(b, h, q_idx, kv_idx):
        page = kv_idx // bs
        return (owner[page] == b) & (kv_idx % bs < valid[page])

    s, w = plan.kv_indices.shape
    kv_indices, full_indices = plan.kv_indices, plan.full_kv_indices
    if torch.device(device).type == "cpu":
        # Inductor's CPU template wants lists as wide as the pool (the GPU ones do not).
        w = plan.num_blocks
        kv_indices, full_indices = (None if a is None else np.pad(a, ((0, 0), (0, w - a.shape[1])))
                                    for a in (kv_indices, full_indices))
    kwargs = dict(BLOCK_SIZE=(Q_BLOCK_SIZE, bs), mask_mod=paged_mask,
                  seq_lengths=(1, plan.num_tokens))
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # the backward's transposed lists: not needed
    full = (None, None)
    if full_indices is not None:
        full = (dev(plan.full_kv_num_blocks).view(s, 1, 1), dev(full_indices).view(s, 1, 1, w))
    return BlockMask.from_kv_blocks(dev(plan.kv_num_blocks).view(s, 1, 1),
                                    dev(kv_indices).view(s, 1, 1, w), *full, **kwargs)


class FlexDecode:
    """A prepared flex_paged decode: calling it runs one step on torch's current stream. A call
    that would need a recompilation raises (RecompileError) instead of compiling inside a timed
    region."""

    def __init__(self, fn, args, plan: PagePlan, block_mask, compiled: bool):
        self._fn, self._args = fn, args
        self.plan, self.block_mask, self.compiled = plan, block_mask, compiled

    def __call__(self) -> None:
        if not self.compiled:
            self._fn(*self._args)
            return
        with _dynamo_patch(error_on_recompile=True):
            self._fn(*self._args)


def prepare_decode(q, k_cache, v_cache, out, block_tables, seq_lens, *, scale: float,
                   full_blocks: bool = False, compiled: bool = True) -> FlexDecode:
    """Validate, plan, build the block mask and compile once; return the zero-argument call.

    q, out: ``[num_seqs, num_heads, head_size]``; k_cache, v_cache: vLLM layout, one dtype and
    device. block_tables and seq_lens are read once on the host. The compiling call's result is
    discarded: `out` keeps what it held (a NaN-poisoned output stays poisoned).
    """
    import torch

    if q.dim() != 3 or tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"q {tuple(q.shape)} and out {tuple(out.shape)} must both be "
                         "[num_seqs, num_heads, head_size]")
    if k_cache.dim() != 4 or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must "
                         "both be [num_blocks, block_size, num_kv_heads, head_size]")
    num_seqs, num_heads, head_size = q.shape
    num_blocks, block_size, num_kv_heads, kd = k_cache.shape
    if kd != head_size or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}: head "
                         "sizes must match and num_kv_heads must divide num_heads")
    if len({t.dtype for t in (q, k_cache, v_cache, out)}) != 1:
        raise ValueError("q, k_cache, v_cache and out must share one dtype")
    if len({t.device for t in (q, k_cache, v_cache, out)}) != 1:
        raise ValueError("q, k_cache, v_cache and out must be on one device")
    plan = plan_pages(block_tables, seq_lens, block_size=block_size, num_blocks=num_blocks,
                      full_blocks=full_blocks)
    if plan.kv_indices.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {plan.kv_indices.shape[0]} rows for {num_seqs} "
                         "sequences")

    block_mask = make_block_mask(plan, q.device)
    group = num_heads // num_kv_heads
    kernel_options = None
    if group & (group - 1):
        # Not a power of two: FlexAttention leaves its decode kernel for the general one, whose
        # default KV tiles (64-128) may not divide a page; make them fit it.
        kernel_options = {"BLOCK_M": 16, "BLOCK_N": min(block_size, 64)}
    args = (q.unsqueeze(2), pool_as_sequence(k_cache), pool_as_sequence(v_cache), out, block_mask,
            float(scale), group > 1, kernel_options)
    fn = _compiled_step() if compiled else _decode_step

    kept = out.clone()
    limits = dict(recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=_RECOMPILE_LIMIT)
    with _dynamo_patch(**limits):
        fn(*args)  # compile (and autotune) now, not inside a timed call
    out.copy_(kept)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return FlexDecode(fn, args, plan, block_mask, compiled)
