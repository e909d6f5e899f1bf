"""The seed reproduction's experiment: the seed's six tables' points, as a 2 x 2 factorial.

The seed's numbers differ from a rigorous measurement in two ways at once: the timing (host clock
around 100 eager launches, no L2 flush) and the data (1024 physical blocks, every table entry
drawn from them at random, with replacement: a cache of a few MB that repeats). Each point is
measured in all four arms of {seed timing, rigorous timing} x {the seed's tables, distinct
blocks}, so each effect can be told apart (:data:`ARMS`). The two arms of the first committed run
(seed timing with the seed's tables, rigorous timing with distinct blocks) keep their point keys.
"""

from lib.harness.experiments import Experiment, check
from lib.harness.grids import LLAMA_SHAPE, SEED_SHAPE

#: Every kernel variant the seed's ablations map to, plus today's references.
SEED_BACKENDS = "+".join([
    "own-v1-paged", "own-v1-contiguous", "own-v1-no_offset",
    "own-v2-paged", "own-v2-contiguous", "own-v2-no_offset", "vllm", "sdpa_dense"])
#: vLLM's own 2024 kernels (the ones the seed profiled, built from vLLM 0.3.3's source: `python -m
#: lib vllm2024-kernel`) beside our re-implementation, timed in one process at every point: a
#: sub-grid of its own, so the first grid's points keep their keys.
VLLM2024_BACKENDS = "vllm2024-v1+vllm2024-v2+own-v1-paged+own-v2-paged"
#: The seed tables' (seq_len, batch) points.
SEED_POINTS = [(4096, 1), (1024, 1), (1024, 16), (1024, 32)]
#: The timing factor: the seed's protocol or the rigorous one (lib.engine.timing).
TIMINGS = ("seed", "rigorous")
#: The data factor: (placement, physical_blocks) of the seed's tables (1024 reused random blocks)
#: and of distinct blocks (the identity table: every block once).
TABLES = {"seed_tables": ("random", 1024), "distinct": ("identity", 0)}
#: The four arms, (timing, tables); the first and the last are the committed run's two.
ARMS = [("seed", "seed_tables"), ("seed", "distinct"), ("rigorous", "seed_tables"), ("rigorous", "distinct")]

EXPERIMENT = check(Experiment(
    name="seed_tables",
    description="The seed's six tables' points (block 1-32; 4096x1, 1024x1, 1024x16, 1024x32), "
                "device and managed memory, our variants, vLLM and SDPA, in a 2 x 2 factorial: "
                "{seed timing (host clock, eager, no flush), rigorous timing} x {the seed's "
                "tables (1024 reused random blocks), distinct blocks (identity)}; and vLLM's 2024 "
                "kernels (vllm2024-v1/v2) beside our v1/v2 on the same points",
    chapter="chapters/seed_repro.md",
    measure="lib.engine.measure:measure_decode",
    prepare="lib.engine.measure:precompile_points",
    selectors=("backends",),  # `-p backends=...` picks a sub-grid
    grid=[{**shape, "seq_len": [n], "batch_size": [b], "block_size": [1, 2, 4, 8, 16, 32],
           "memory_kind": ["device", "managed"], "protocol": [proto], "placement": [place],
           "physical_blocks": [phys], "partition_size": [0], "seed": [0],
           "backends": [backends]}
          for backends in (SEED_BACKENDS, VLLM2024_BACKENDS)
          for shape in (SEED_SHAPE, LLAMA_SHAPE)
          for n, b in SEED_POINTS
          for proto, place, phys in [(timing, *TABLES[tables]) for timing, tables in ARMS]],
))
