"""vLLM's 2024 CUDA kernels, ``paged_attention_v1`` and ``paged_attention_v2`` (vLLM 0.3.3, the
release the seed profiled), as the ``vllm2024-v1`` and ``vllm2024-v2`` backends.

vLLM no longer ships them, and its 2024 wheels cannot load beside today's torch. So
``python -m lib vllm2024-kernel`` (:mod:`lib.tools.vllm2024`) takes the release's source from the
package index and compiles only its kernel templates with nvcc into cubins. It instantiates them
at the seed's block sizes 1-32: vLLM's own launcher dispatched only 8, 16 and 32. The cubins and
a manifest go in ``<repo>/.vllm2024-kernel`` (or ``$UVM_STUDY_VLLM2024_DIR``). The manifest
records the version, the sdist's and the compiled sources' hashes, the flags and the mangled name
of every kernel.

This module loads those cubins with CuPy and launches them as vLLM's 2024 launcher did, on the
classic layout our v1/v2 read (K ``[NB, KVH, D/x, BS, x]``, V ``[NB, KVH, D, BS]``):
- 128 threads per thread block, grid (heads, sequences, partitions);
- v1 holds a whole sequence's logits in shared memory;
- v2 splits sequences into partitions of 512 tokens and merges them in a second kernel, with the
  partial outputs in the cache's dtype.
Both kernels are used unmodified; only the launcher is ours. Everything a launch would refuse is
refused here first, with a clear error.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lib import ROOT

#: Where the build lands by default, the variable that moves it, and its manifest's name.
DEFAULT_DIR = ROOT / ".vllm2024-kernel"
ENV_DIR = "UVM_STUDY_VLLM2024_DIR"
MANIFEST = "manifest.json"
#: The release the seed profiled (vLLM 0.3.3, 2024-03-01).
DEFAULT_VERSION = "0.3.3"
#: Block sizes this build instantiates: the seed's tables, 1-32.
BLOCK_SIZES = (1, 2, 4, 8, 16, 32)
#: ... and the ones vLLM's own launcher dispatched ("to reduce the compilation time").
RELEASE_BLOCK_SIZES = (8, 16, 32)
#: Head sizes of vLLM's launcher switch.
HEAD_SIZES = (64, 80, 96, 112, 128, 256)
#: Our dtype names -> the kernel's scalar type (vLLM's fp16 is uint16_t bit patterns).
SCALAR_TYPES = {"float16": "uint16_t", "bfloat16": "__nv_bfloat16", "float32": "float"}
#: vLLM 0.3.3's launcher constants.
NUM_THREADS = 128
WARP_SIZE = 32
PARTITION_SIZE = 512
VERSIONS = (1, 2)


def module_name(dtype: str, block_size: int) -> str:
    """One cubin per (dtype, block size): its v1, v2 and reduce kernels for every head size."""
    return f"{dtype}_b{block_size}"


def kernel_id(kind: str, head_size: int) -> str:
    """A kernel inside a module: ``v1``, ``v2`` or ``reduce``, at one head size."""
    return f"{kind}_d{head_size}"


def thread_group_size(block_size: int) -> int:
    """Threads that share one key (vLLM: ``MAX(WARP_SIZE / BLOCK_SIZE, 1)``)."""
    return max(WARP_SIZE // block_size, 1)


def num_partitions(max_seq_len: int) -> int:
    return -(-max_seq_len // PARTITION_SIZE)


def shared_bytes(version: int, block_size: int, head_size: int, max_seq_len: int) -> int:
    """Dynamic shared memory of one decode launch, as vLLM's launcher sized it: v1 the whole
    padded sequence's float logits, v2 one partition's; at least the cross-warp output buffer."""
    outputs = (NUM_THREADS // WARP_SIZE // 2) * head_size * 4
    if version == 1:
        padded = -(-max_seq_len // block_size) * block_size
        return max(padded * 4, outputs)
    return max(PARTITION_SIZE * 4, outputs)


def check_problem(version: int, *, dtype: str, block_size: int, head_size: int, max_seq_len: int,
                  num_heads: int | None = None, num_kv_heads: int | None = None,
                  max_shared: int | None = None) -> None:
    """ValueError for anything vLLM's 2024 kernels (as built here) cannot run, before any launch."""
    if version not in VERSIONS:
        raise ValueError(f"version={version!r}: vLLM's 2024 kernels are v1 and v2")
    if dtype not in SCALAR_TYPES:
        raise ValueError(f"dtype {dtype!r}: vLLM's 2024 kernels take {', '.join(SCALAR_TYPES)}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block size {block_size}: this build of vLLM's 2024 kernels has block sizes "
            f"{', '.join(map(str, BLOCK_SIZES))} (vLLM's own launcher dispatched only "
            f"{', '.join(map(str, RELEASE_BLOCK_SIZES))}; the seed's 1, 2 and 4 are instantiated here)")
    if head_size not in HEAD_SIZES:
        raise ValueError(f"head size {head_size}: vLLM's 2024 launcher has "
                         f"{', '.join(map(str, HEAD_SIZES))}")
    group = thread_group_size(block_size)
    if head_size % group:
        raise ValueError(
            f"head size {head_size} at block size {block_size}: vLLM's 2024 kernel splits a key "
            f"over {group} threads, so the head size must be a multiple of {group} (its launcher "
            "asserts head_size % thread_group_size == 0)")
    if num_heads is not None and num_kv_heads is not None and num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if max_shared is not None:
        need = shared_bytes(version, block_size, head_size, max_seq_len)
        if need > max_shared:
            raise ValueError(
                f"vLLM's 2024 v{version} needs {need} bytes of shared memory for {max_seq_len} "
                f"tokens (v1 holds a whole sequence's logits), more than this GPU's {max_shared} "
                "per block: use vllm2024-v2")


# --------------------------------------------------------------------------- the build

def kernel_dir(path: Path | str | None = None) -> Path:
    return Path(path or os.environ.get(ENV_DIR) or DEFAULT_DIR)


def read_manifest(path: Path | str | None = None) -> dict:
    """The build's manifest (read once per version of the file); FileNotFoundError saying how to
    make one."""
    d = kernel_dir(path)
    f = d / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(
            f"no build of vLLM's 2024 kernels at {d} (make one with `python -m lib vllm2024-kernel`, "
            "on any machine with nvcc; offline: from the sdist in the wheelhouse)")
    st = f.stat()
    return _parsed(str(f), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _parsed(file: str, mtime_ns: int, size: int) -> dict:  # every backend check reads the manifest
    return json.loads(Path(file).read_text())


def status(path: Path | str | None = None) -> dict:
    """Is a build present, and of what? Never raises (no GPU needed)."""
    try:
        m = read_manifest(path)
    except (OSError, ValueError) as exc:
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {"available": True, "version": m.get("vllm_version"), "arch": m.get("arch"),
            "sdist_sha256": m.get("sdist_sha256"), "source_sha256": m.get("source_sha256"),
            "path": str(kernel_dir(path)), "modules": len(m.get("modules", {}))}


def unavailable_reason() -> str | None:
    """None when the vllm2024 backends can run here, else why not (never raises)."""
    st = status()
    if not st["available"]:
        return st["reason"]
    from lib.engine.gpu import gpu_available

    if not gpu_available():
        return "no CUDA GPU / CuPy here"
    import cupy

    arch = f"sm_{cupy.cuda.Device().compute_capability}"
    if st["arch"] != arch:
        return f"the build at {st['path']} is for {st['arch']}, this GPU is {arch} (rebuild with --arch {arch})"
    return None


@functools.lru_cache(maxsize=None)
def _module(path: str, file: str):
    import cupy

    return cupy.RawModule(path=str(Path(path, file)))


def get_kernel(kind: str, dtype: str, block_size: int, head_size: int, path=None):
    """One compiled kernel of the build (CuPy RawKernel-like), by its manifest name."""
    d = kernel_dir(path)
    entry = read_manifest(d)["modules"].get(module_name(dtype, block_size))
    if entry is None:
        raise FileNotFoundError(f"the build at {d} has no {module_name(dtype, block_size)} module "
                                "(rebuild with that dtype and block size)")
    mangled = entry["kernels"].get(kernel_id(kind, head_size))
    if mangled is None:
        raise FileNotFoundError(f"the build at {d} has no {kind} kernel for head size {head_size}")
    return _module(str(d), entry["file"]).get_function(mangled)


# --------------------------------------------------------------------------- launching

@dataclass(frozen=True)
class Launch2024:
    """How one launch of vLLM's 2024 kernel is configured (what vLLM's launcher computed)."""

    version: int
    dtype: str
    block_size: int
    head_size: int
    num_heads: int
    num_kv_heads: int
    num_seqs: int
    max_seq_len: int

    @property
    def partitions(self) -> int:
        return num_partitions(self.max_seq_len) if self.version == 2 else 1

    @property
    def shared_bytes(self) -> int:
        return shared_bytes(self.version, self.block_size, self.head_size, self.max_seq_len)

    def describe(self) -> str:
        return (f"vllm2024 v{self.version} threads={NUM_THREADS} grid={self.num_heads}x"
                f"{self.num_seqs}x{self.partitions} smem={self.shared_bytes}"
                + (f" partition={PARTITION_SIZE}" if self.version == 2 else ""))


class Vllm2024Decode:
    """A prepared launch of vLLM's 2024 v1 or v2 on fixed buffers; ``launch()`` enqueues it on
    CuPy's current stream (graph-safe: v2's scratch is allocated here, never in ``launch``)."""

    def __init__(self, plan: Launch2024, *, q, k_cache, v_cache, block_tables, seq_lens, out,
                 scale: float, path=None):
        import cupy
        import numpy as np

        self.plan = plan
        item = q.dtype.itemsize
        if k_cache.strides[:2] != v_cache.strides[:2]:
            raise ValueError("vLLM's 2024 kernel reads K and V with K's block and head strides: "
                             f"they differ (K {k_cache.strides[:2]}, V {v_cache.strides[:2]})")
        if q.strides[2] != item or q.strides[1] != plan.head_size * item:
            raise ValueError("vLLM's 2024 kernel needs each query head's vector contiguous")
        if block_tables.dtype != np.int32 or seq_lens.dtype != np.int32:
            raise ValueError("block tables and sequence lengths must be int32")
        null = np.uint64(0)  # alibi_slopes: none
        common = (np.int32(plan.num_kv_heads), np.float32(scale), block_tables, seq_lens,
                  np.int32(block_tables.shape[1]), null, np.int32(q.strides[0] // item),
                  np.int32(k_cache.strides[0] // item), np.int32(k_cache.strides[1] // item))
        self._grid = (plan.num_heads, plan.num_seqs, plan.partitions)
        self._kernel = get_kernel(f"v{plan.version}", plan.dtype, plan.block_size, plan.head_size, path)
        if plan.shared_bytes > 48 * 1024:  # vLLM's launcher raised the limit the same way
            self._kernel.max_dynamic_shared_size_bytes = plan.shared_bytes
        if plan.version == 1:
            self._args = (out, q, k_cache, v_cache) + common
            self._keep = (out, q, k_cache, v_cache, block_tables, seq_lens)
            self._reduce = None
        else:
            shape = (plan.num_seqs, plan.num_heads, plan.partitions)
            exp_sums = cupy.empty(shape, dtype=cupy.float32)
            max_logits = cupy.empty(shape, dtype=cupy.float32)
            tmp_out = cupy.empty(shape + (plan.head_size,), dtype=out.dtype)
            self._args = (exp_sums, max_logits, tmp_out, q, k_cache, v_cache) + common
            self._reduce = get_kernel("reduce", plan.dtype, plan.block_size, plan.head_size, path)
            self._reduce_args = (out, exp_sums, max_logits, tmp_out, seq_lens, np.int32(plan.partitions))
            self._reduce_smem = 2 * plan.partitions * 4
            self._keep = (out, q, k_cache, v_cache, block_tables, seq_lens, exp_sums, max_logits, tmp_out)

    def describe(self) -> str:
        return self.plan.describe()

    def launch(self) -> None:
        self._kernel(self._grid, (NUM_THREADS,), self._args, shared_mem=self.plan.shared_bytes)
        if self._reduce is not None:
            self._reduce((self.plan.num_heads, self.plan.num_seqs), (NUM_THREADS,),
                         self._reduce_args, shared_mem=self._reduce_smem)

    __call__ = launch


def prepare_decode(version: int, *, q, k_cache, v_cache, block_tables, seq_lens, out, scale: float,
                   dtype: str, block_size: int, num_kv_heads: int, max_seq_len: int,
                   path=None) -> Vllm2024Decode:
    """Check the problem against what the kernel and this GPU take, then prepare the launch."""
    import cupy

    num_seqs, num_heads, head_size = (int(n) for n in q.shape)
    max_shared = cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    check_problem(version, dtype=dtype, block_size=block_size, head_size=head_size,
                  max_seq_len=max_seq_len, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  max_shared=max_shared)
    plan = Launch2024(version, dtype, block_size, head_size, num_heads, num_kv_heads, num_seqs,
                      max_seq_len)
    return Vllm2024Decode(plan, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                          seq_lens=seq_lens, out=out, scale=scale, path=path)
