"""The page-table chapter's experiment: the batch x length grid and the block sizes."""

from lib.harness.experiments import Experiment, check
from lib.harness.grids import ALL_BLOCKS, LLAMA_SHAPE, RIGOROUS_DEVICE, SEED_SHAPE

#: Largest K+V cache (one copy) the page-table grid builds: the case holds the pool, the classic
#: copy and the dense copy at once, so three of these must fit beside the driver's share.
MAX_KV_BYTES = 8 << 30
GRID_BACKENDS = "own-auto-paged+own-auto-contiguous+own-v1-paged+own-v2-paged+vllm+sdpa_dense"
NO_OFFSET_BACKENDS = "own-auto-paged+own-auto-contiguous+own-auto-no_offset+vllm"
#: The page table under FlashInfer, a memory-bound paged GQA decode: its time by block size and
#: placement beside dense SDPA (no table at all) and our own, on the same points
FLASHINFER_BACKENDS = "flashinfer+own-auto-paged+sdpa_dense"
#: ... and under vLLM's FlashAttention 3 at the block sizes it takes (multiples of 16), FlashInfer
#: and SDPA re-measured on the same points
FA3_BACKENDS = "vllm-fa3+flashinfer+sdpa_dense"
FA3_BLOCKS = [16, 32, 64, 128, 256]


def kv_fits(point: dict) -> bool:
    """Whether one copy of the point's K and V stays within :data:`MAX_KV_BYTES`."""
    kv = (2 * point["batch_size"] * point["seq_len"] * point["num_kv_heads"] * point["head_size"]
          * {"float16": 2, "bfloat16": 2, "float32": 4}[point["dtype"]])
    return kv <= MAX_KV_BYTES


EXPERIMENT = check(Experiment(
    name="page_table",
    description="The price of the page table: batch 1-256 x 512-32768 tokens at block 16 (paged vs "
                "contiguous on identity placement, same bytes; paged on shuffled placement; vLLM; "
                "dense SDPA; caches above 8 GiB of K+V skipped), and block sizes 1-256 x batch "
                "1-128 at 1024 tokens with the no_offset floor; FlashInfer's paged decode at block sizes 1-256 "
                "x identity/shuffled placement x batch 8-128 at 4096 tokens beside dense SDPA; vLLM's "
                "FlashAttention 3 the same way at block sizes 16-256",
    chapter="chapters/page_table.md",
    measure="lib.engine.measure:measure_decode",
    prepare="lib.engine.measure:precompile_points",
    grid=[{**shape, **RIGOROUS_DEVICE, "batch_size": [1, 2, 4, 8, 16, 32, 64, 128, 256],
           "seq_len": [512, 1024, 2048, 4096, 8192, 16384, 32768], "block_size": [16],
           "placement": [place], "backends": [backends]}
          for shape in (LLAMA_SHAPE, SEED_SHAPE)
          for place, backends in [("identity", GRID_BACKENDS),
                                  ("shuffled", "own-auto-paged+vllm+sdpa_dense")]]
    + [{**shape, **RIGOROUS_DEVICE, "batch_size": [1, 8, 32, 128], "seq_len": [1024],
        "block_size": ALL_BLOCKS, "backends": [NO_OFFSET_BACKENDS]}
       for shape in (LLAMA_SHAPE, SEED_SHAPE)]
    + [{**shape, **RIGOROUS_DEVICE, "batch_size": [8, 32, 128], "seq_len": [4096],
        "block_size": ALL_BLOCKS, "placement": ["identity", "shuffled"],
        "backends": [FLASHINFER_BACKENDS]}
       for shape in (LLAMA_SHAPE, SEED_SHAPE)]
    + [{**shape, **RIGOROUS_DEVICE, "batch_size": [8, 32, 128], "seq_len": [4096],
        "block_size": FA3_BLOCKS, "placement": ["identity", "shuffled"], "backends": [FA3_BACKENDS]}
       for shape in (LLAMA_SHAPE, SEED_SHAPE)],
    where=kv_fits,
    # `-p backends=...` picks the sub-grids with those backends (e.g. FA3_BACKENDS: that sub-grid alone)
    selectors=("backends",),
))
