"""Compiling our kernel modules (NVRTC, or prebuilt by nvcc) and launching them on the GPU."""

from __future__ import annotations

import functools
import os

import lib.engine.kernels.cache as kernel_cache
from lib.engine.kernels.plan import (NUM_THREADS, NUM_WARPS, SOURCE, LaunchPlan, compile_options,
                                     instantiations, kernel_name, reduce_name)


def get_module(dtype: str, block_size: int, head_size: int, tile: int):
    """Compile (once per process and set of options) the module for one (dtype, block, head, tile)."""
    return _module(dtype, block_size, head_size, tile, compile_options())


@functools.lru_cache(maxsize=None)
def _module(dtype: str, block_size: int, head_size: int, tile: int, options: tuple):
    import cupy

    prebuilt = kernel_cache.load((dtype, block_size, head_size, tile), options)
    if prebuilt is not None:  # built ahead by nvcc from this very source (lib.engine.kernels.cache)
        return prebuilt
    return cupy.RawModule(
        code=SOURCE.read_text(), options=options,
        name_expressions=instantiations(dtype, block_size, head_size, tile),
    )


class OwnDecode:
    """A prepared launch of our kernel on fixed buffers (classic layout): `launch()` enqueues it
    (graph-safe: scratch for partitions is allocated here, never inside `launch`)."""

    def __init__(self, plan: LaunchPlan, *, q, k_cache, v_cache, block_tables, seq_first,
                 seq_lens, out, scale: float):
        import cupy
        import numpy as np

        self.plan = plan
        mod = get_module(plan.dtype, plan.block_size, plan.head_size, plan.tile)
        self._decode = mod.get_function(kernel_name(plan))
        if plan.shared_bytes > 48 * 1024:
            self._decode.max_dynamic_shared_size_bytes = plan.shared_bytes
        num_seqs = q.shape[0]
        self._grid = (plan.num_kv_heads * plan.head_tiles, num_seqs, plan.max_partitions)
        # v2 always merges partials (even one); v3 only when it splits sequences
        self._reduces = plan.version == 2 or (plan.version == 3 and plan.max_partitions > 1)
        if self._reduces:
            shape = (num_seqs, plan.num_heads, plan.max_partitions)
            self._part_max = cupy.empty(shape, dtype=cupy.float32)
            self._part_sum = cupy.empty(shape, dtype=cupy.float32)
            self._part_out = cupy.empty(shape + (plan.head_size,), dtype=cupy.float32)
            self._reduce = mod.get_function(reduce_name(plan.dtype, plan.head_size))
            self._reduce_args = (out, self._part_out, self._part_max, self._part_sum, seq_lens,
                                 np.int32(plan.num_heads), np.int32(plan.partition_size),
                                 np.int32(plan.max_partitions))
            self._reduce_smem = 4 * (plan.max_partitions + NUM_WARPS)
            parts = (self._part_out, self._part_max, self._part_sum)
        else:
            nothing = cupy.empty(1, dtype=cupy.float32)
            parts = (nothing, nothing, nothing)
        self._keep = (q, k_cache, v_cache, block_tables, seq_first, seq_lens, out) + parts
        self._args = (out, *parts, q, k_cache, v_cache, block_tables, seq_first, seq_lens,
                      np.int32(plan.num_heads), np.int32(plan.num_kv_heads),
                      np.int32(block_tables.shape[1]), np.float32(scale),
                      np.int32(plan.partition_size), np.int32(plan.max_partitions),
                      np.int32(0 if self._reduces else 1))
        self._num_seqs = num_seqs

    def launch(self) -> None:
        self._decode(self._grid, (NUM_THREADS,), self._args, shared_mem=self.plan.shared_bytes)
        if self._reduces:
            self._reduce((self.plan.num_heads, self._num_seqs), (NUM_THREADS,),
                         self._reduce_args, shared_mem=self._reduce_smem)

    __call__ = launch


def precompile(keys, workers: int | None = None) -> float:
    """Compile modules (dtype, block, head, tile) in parallel processes; returns seconds. NVRTC is
    single-threaded and takes seconds a module; CuPy's on-disk cache then makes each load instant."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import time

    t0 = time.perf_counter()
    options = compile_options()
    keys = [k for k in sorted(set(keys)) if kernel_cache.load(k, options) is None]
    if not keys:
        return time.perf_counter() - t0
    jobs = int(os.environ.get("UVM_STUDY_COMPILE_JOBS", "0")) or os.cpu_count() or 1
    workers = workers or min(len(keys), jobs, 16)
    if workers <= 1 or len(keys) == 1:
        for k in keys:
            _compile_one(k)
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            list(pool.map(_compile_one, keys))
    return time.perf_counter() - t0


def _compile_one(key):
    mod = get_module(*key)
    for name in instantiations(*key):
        mod.get_function(name)
    return key
