"""Table 1 extended: device vs managed memory under the decode kernels."""

from lib.harness.experiments import Experiment, check
from lib.harness.grids import ALL_BLOCKS, LLAMA_SHAPE, SEED_SHAPE

#: Table 1's memory kinds and managed-memory states (lib.engine.measure.MANAGED_STATES).
KINDS = ["device", "managed", "managed_cold", "managed_prefetched"]

EXPERIMENT = check(Experiment(
    name="uvm_decode",
    description="Table 1 extended: device vs managed memory (resident, cold on the host before "
                "each call, after an explicit prefetch) for block sizes 1-256 at 4096 x 1 and "
                "1024 x 16/32 (seed shape; 4096 x 1 also for the Llama-like shape), our v1/v2 "
                "and vLLM, rigorous protocol",
    chapter="chapters/uvm_decode.md",
    measure="lib.engine.measure:measure_decode",
    prepare="lib.engine.measure:precompile_points",
    grid=[{**shape, "seq_len": [n], "batch_size": [b], "block_size": ALL_BLOCKS,
           "memory_kind": KINDS, "protocol": ["rigorous"], "placement": ["identity"],
           "physical_blocks": [0], "partition_size": [0], "seed": [0],
           "backends": ["own-v1-paged+own-v2-paged+vllm"]}
          for shape, points in ((SEED_SHAPE, [(4096, 1), (1024, 16), (1024, 32)]),
                                (LLAMA_SHAPE, [(4096, 1)]))
          for n, b in points],
))
