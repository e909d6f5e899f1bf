"""The CUDA virtual memory chapter's experiment."""

from lib.harness.experiments import Experiment, check
from lib.chapters.vmm.measure import GRID

EXPERIMENT = check(Experiment(
    name="vmm_kv",
    description="Contiguous KV on CUDA virtual memory (the vAttention idea): our kernel paged on a "
                "fragmented pool vs contiguous on per-sequence VMM slots (32x4096 and 8x16384, MHA "
                "and GQA, blocks 16/64), and per-chunk map/unmap/create/release latency for chunks "
                "of 1-32 x the granularity (lib.chapters.vmm.measure)",
    chapter="chapters/vmm.md",
    measure="lib.chapters.vmm.measure:measure_point",
    prepare="lib.chapters.vmm.measure:precompile_points",
    grid=GRID,
))
