"""vLLM's own FlashAttention 3 (``vllm.vllm_flash_attn``, compiled into the vLLM wheel) as a paged
decode peer: the ``vllm-fa3`` backend, the kernel vLLM's FLASH_ATTN backend runs on Hopper.

It comes from the same kernel-only vLLM install as the Triton kernel, made with
``python -m lib vllm-kernel --flash-attn`` (:mod:`lib.tools.vllm_install`): vLLM's two Python
files of ``vllm_flash_attn`` and its compiled ``_vllm_fa3_C`` (172 MB, sm_90 code; FA2's library,
308 MB, is left out: FA3 is what vLLM runs on Hopper). That library is built against torch's
stable C ABI (``aoti_torch_*``, ``torch_*``: no C++ symbols of torch), which is what lets it load
beside a torch other than the one vLLM pins. Whether it loads is reported as the library's own
error (``FA3_UNAVAILABLE_REASON``), never guessed.

The call is vLLM's: ``flash_attn_varlen_func`` with one query token per sequence, the page table
as ``block_table`` and the lengths as ``seqused_k``, on the same NHD pool as the ``vllm`` and
``flashinfer`` backends. As vLLM does for CUDA graphs, the scheduler metadata (FA3's split and
GQA-packing decision) is made once, in :func:`prepare_decode`. FA3 allocates its log-sum-exp and
split scratch with torch on every call; the launcher makes those allocations from a memory pool of
its own (as the SDPA launcher does), so a captured graph holds no allocation and its memory is
never handed to anything else. Block sizes: vLLM's FlashAttention backend asks for multiples of 16
(``get_supported_kernel_block_sizes``); others are refused here with that reason.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from lib.engine.backends.vllm import _check_decode_args, load_unified_attention, vllm_status

#: The module holding vLLM's FlashAttention wrappers and the call this backend makes.
INTERFACE_MODULE = "vllm.vllm_flash_attn.flash_attn_interface"
INTERFACE_ATTR = "flash_attn_varlen_func"
#: What a kernel-only install keeps of vllm_flash_attn (`python -m lib vllm-kernel --flash-attn`).
FLASH_ATTN_FILES = ("vllm/vllm_flash_attn/__init__.py",
                    "vllm/vllm_flash_attn/flash_attn_interface.py",
                    "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so")
FA_VERSION = 3
SUPPORTED_DTYPES = ("torch.float16", "torch.bfloat16")
#: vLLM's FlashAttention backend's kernel block sizes: multiples of this.
BLOCK_MULTIPLE = 16


def check_block_size(block_size: int) -> None:
    """ValueError unless vLLM's FlashAttention backend takes this block size."""
    if block_size < BLOCK_MULTIPLE or block_size % BLOCK_MULTIPLE:
        raise ValueError(f"block size {block_size}: vLLM's FlashAttention backend takes multiples of "
                         f"{BLOCK_MULTIPLE} only (its get_supported_kernel_block_sizes)")


def load_interface(kernel_dir=None):
    """vLLM's ``flash_attn_interface`` module, imported from the vLLM install the ``vllm`` backend
    uses; RuntimeError with FA3's own load error when its library does not load here."""
    load_unified_attention(kernel_dir, module=INTERFACE_MODULE, attr=INTERFACE_ATTR)
    mod = sys.modules[INTERFACE_MODULE]
    if not getattr(mod, "FA3_AVAILABLE", False):
        raise RuntimeError(f"vLLM's FA3 library does not load here: {getattr(mod, 'FA3_UNAVAILABLE_REASON', '?')}")
    return mod


def status(kernel_dir=None, *, deep: bool = False) -> dict[str, Any]:
    """Is vLLM's FA3 usable here? Never raises. Without `deep` only files are looked at (the
    install has vllm_flash_attn); `deep=True` loads the library (torch, CUDA)."""
    st = vllm_status(kernel_dir)
    st = {**st, "fa3": False}
    if not st["available"]:
        return st
    try:
        if st["source"] == "kernel-only":
            missing = [f for f in FLASH_ATTN_FILES if not (Path(st["path"]) / f).is_file()]
            if missing:
                raise FileNotFoundError(f"the kernel-only vLLM install at {st['path']} has no "
                                        f"vllm_flash_attn (make it with `python -m lib vllm-kernel "
                                        f"--flash-attn`); missing {', '.join(missing)}")
        if deep:
            load_interface(kernel_dir)
        st["fa3"] = True
    except Exception as exc:
        st.update(available=False, reason=f"{type(exc).__name__}: {exc}")
    return st


def unavailable_reason() -> str | None:
    """None when the vllm-fa3 backend can run here, else why not (never raises)."""
    import importlib.util

    from lib.engine.gpu import gpu_available

    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    st = status()
    if not st["available"]:
        return st["reason"]
    if not gpu_available():
        return "no CUDA GPU / CuPy here"
    import torch

    major, _ = torch.cuda.get_device_capability()
    if major != 9:
        return f"FA3 runs on compute capability 9.x only (this GPU: {major}.x)"
    st = status(deep=True)
    return None if st["available"] else st["reason"]


def _check_args(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len) -> None:
    _check_decode_args(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len)
    if str(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype}: FA3 takes float16 and bfloat16 only")
    check_block_size(int(k_pool.shape[1]))


class FlashAttnDecode:
    """One prepared decode: each call runs vLLM's FA3 on torch's current stream into `out`, its
    scratch allocated from this launcher's own memory pool (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any], pool, use_pool, metadata):
        self.fn, self.kwargs, self.metadata = fn, kwargs, metadata
        self._pool, self._use_pool = pool, use_pool

    def __call__(self) -> None:
        with self._use_pool(self._pool):
            self.fn(**self.kwargs)  # its lse and split scratch go back to the pool on return


def prepare_decode(q, k_pool, v_pool, out, block_table, seq_lens, *, scale: float, max_seq_len: int,
                   interface=None) -> FlashAttnDecode:
    """Validate, make the scheduler metadata once and warm up; return the zero-arg launcher.
    Tensors as for :func:`lib.engine.backends.vllm.prepare_decode` (`out` is written by the
    warm-up call; the harness poisons it afterwards)."""
    _check_args(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len)
    mod = interface or load_interface()
    import torch

    from lib.engine.backends.torch_pool import mem_pool_context

    num_seqs, num_heads, head_size = (int(n) for n in q.shape)
    num_kv_heads, block_size = int(k_pool.shape[2]), int(k_pool.shape[1])
    cu_seqlens_q = torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device)
    metadata = mod.get_scheduler_metadata(
        num_seqs, 1, max_seq_len, num_heads, num_kv_heads, head_size, seq_lens, qkv_dtype=q.dtype,
        cu_seqlens_q=cu_seqlens_q, page_size=block_size, causal=True)
    kwargs = dict(q=q, k=k_pool, v=v_pool, max_seqlen_q=1, cu_seqlens_q=cu_seqlens_q,
                  max_seqlen_k=max_seq_len, seqused_k=seq_lens, softmax_scale=float(scale),
                  causal=True, block_table=block_table, out=out, scheduler_metadata=metadata,
                  fa_version=FA_VERSION)
    use_pool = mem_pool_context(torch)
    launch = FlashAttnDecode(getattr(mod, INTERFACE_ATTR), kwargs, torch.cuda.MemPool(), use_pool, metadata)
    launch()  # warm-up outside any capture: the pool gets its blocks
    torch.cuda.synchronize(q.device)
    return launch
