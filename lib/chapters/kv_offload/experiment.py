"""The KV offload chapter's experiment."""

from lib.harness.experiments import Experiment, check
from lib.chapters.kv_offload.measure import GRID

EXPERIMENT = check(Experiment(
    name="kv_offload",
    description="When the KV cache leaves the GPU: decode time (batch 32 x 4096, block 16, fp16, "
                "MHA 32:32 and GQA 32:8) against the share of each sequence's oldest KV blocks kept "
                "in host memory (0 to 1), reached five ways (managed + AccessedBy, pinned VMM "
                "zero-copy, fault-driven migration, prefetch overlapped with the kernel, explicit "
                "cudaMemcpy), with the pinned-memcpy and prefetch bus yardstick "
                "(lib.chapters.kv_offload.measure)",
    chapter="chapters/kv_offload.md",
    measure="lib.chapters.kv_offload.measure:measure_point",
    prepare="lib.engine.measure:precompile_points",
    grid=GRID,
))
