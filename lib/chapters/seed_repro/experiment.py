"""The seed reproduction's experiment: the seed's six tables' points."""

from lib.harness.experiments import Experiment, check
from lib.harness.grids import LLAMA_SHAPE, SEED_SHAPE

#: Every kernel variant the seed's ablations map to, plus today's references.
SEED_BACKENDS = "+".join([
    "own-v1-paged", "own-v1-contiguous", "own-v1-no_offset",
    "own-v2-paged", "own-v2-contiguous", "own-v2-no_offset", "vllm", "sdpa_dense"])
#: The seed tables' (seq_len, batch) points.
SEED_POINTS = [(4096, 1), (1024, 1), (1024, 16), (1024, 32)]

EXPERIMENT = check(Experiment(
    name="seed_tables",
    description="The seed's six tables' points (block 1-32; 4096x1, 1024x1, 1024x16, 1024x32), "
                "device and managed memory, our variants, vLLM and SDPA, under the seed's "
                "protocol (1024 reused random blocks, host clock, no flush) and the rigorous one",
    chapter="chapters/seed_repro.md",
    measure="lib.engine.measure:measure_decode",
    prepare="lib.engine.measure:precompile_points",
    grid=[{**shape, "seq_len": [n], "batch_size": [b], "block_size": [1, 2, 4, 8, 16, 32],
           "memory_kind": ["device", "managed"], "protocol": [proto], "placement": [place],
           "physical_blocks": [phys], "partition_size": [0], "seed": [0],
           "backends": [SEED_BACKENDS]}
          for shape in (SEED_SHAPE, LLAMA_SHAPE)
          for n, b in SEED_POINTS
          for proto, place, phys in [("seed", "random", 1024), ("rigorous", "identity", 0)]],
))
