"""The kernel chapter's experiments: the correctness matrix and kernel_speed."""

from lib.harness.experiments import Experiment, check

CORRECTNESS = check(Experiment(
    name="correctness",
    description="Correctness matrix: every backend x variant x block x dtype x head size x "
                "head layout, fresh inputs, NaN-poisoned outputs, float64 reference",
    measure="lib.chapters.kernel.correctness:measure_point",
    prepare="lib.chapters.kernel.correctness:precompile_points",
    concurrent_ok=True,
    grid=[
        {"dtype": ["float16", "bfloat16", "float32"], "block_size": [1, 2, 4, 8, 16, 32, 64, 128, 256],
         "head_size": [64, 80, 96, 112, 128, 256], "heads": ["MHA", "GQA4", "MQA"],
         "placement": ["identity", "shuffled", "single_content"], "lengths": ["ragged"]},
        {"dtype": ["float16"], "block_size": [1, 16, 256], "head_size": [128],
         "heads": ["MHA", "GQA4"], "placement": ["shuffled"], "lengths": ["long"]},
        # v3, the matrix-unit kernel (fp16/bf16): every block and head size, GQA 2:1 to 16:1, MQA
        {"dtype": ["float16", "bfloat16"], "block_size": [1, 2, 4, 8, 16, 32, 64, 128, 256],
         "head_size": [64, 80, 96, 112, 128, 256],
         "heads": ["MHA", "GQA2", "GQA4", "GQA6", "GQA8", "GQA16", "MQA", "MQA32"],
         "placement": ["identity", "shuffled", "single_content"], "lengths": ["ragged"],
         "variant": ["v3"]},
        {"dtype": ["float16", "bfloat16"], "block_size": [1, 16, 256], "head_size": [128],
         "heads": ["GQA8", "MQA32"], "placement": ["shuffled"], "lengths": ["long64k"],
         "variant": ["v3"]},
        # group 12: v3's wide tile of 16 heads with 4 padding rows (groups 16 and 32 fill it)
        {"dtype": ["float16", "bfloat16"], "block_size": [1, 2, 4, 8, 16, 32, 64, 128, 256],
         "head_size": [64, 80, 96, 112, 128, 256], "heads": ["GQA12"],
         "placement": ["identity", "shuffled", "single_content"], "lengths": ["ragged"],
         "variant": ["v3"]},
        # FlashInfer's paged decode (JIT-compiled per dtype, head size and tensor-core use); the
        # same blocks as scripts/device/flashinfer_check.sh runs by default
        {"dtype": ["float16", "bfloat16"], "block_size": [1, 2, 4, 8, 16, 32, 64, 128, 256],
         "head_size": [64, 128, 256], "heads": ["MHA", "GQA2", "GQA4", "GQA6", "GQA8", "MQA", "MQA32"],
         "placement": ["identity", "shuffled"], "lengths": ["ragged"], "backends": ["flashinfer"]},
        {"dtype": ["float16"], "block_size": [16, 256], "head_size": [128], "heads": ["MHA", "GQA4"],
         "placement": ["shuffled"], "lengths": ["long"], "backends": ["flashinfer"]},
        # vLLM's FlashAttention 3 (the block sizes vLLM's FlashAttention backend takes: multiples of 16)
        {"dtype": ["float16", "bfloat16"], "block_size": [16, 32, 64, 128, 256],
         "head_size": [64, 80, 96, 112, 128, 256],
         "heads": ["MHA", "GQA2", "GQA4", "GQA6", "GQA8", "MQA", "MQA32"],
         "placement": ["identity", "shuffled"], "lengths": ["ragged"], "backends": ["vllm-fa3"]},
        {"dtype": ["float16"], "block_size": [16, 256], "head_size": [128], "heads": ["MHA", "GQA4"],
         "placement": ["shuffled"], "lengths": ["long"], "backends": ["vllm-fa3"]},
        # vLLM's 2024 CUDA kernels, the seed's (`python -m lib vllm2024-kernel`): the block sizes
        # built (1-32) and the head sizes its launcher had; at block 1 a key is split over 32
        # threads, so only head sizes that are multiples of 32
        {"dtype": ["float16", "bfloat16", "float32"], "block_size": [2, 4, 8, 16, 32],
         "head_size": [64, 80, 96, 112, 128, 256],
         "heads": ["MHA", "GQA2", "GQA4", "GQA6", "GQA8", "MQA"],
         "placement": ["identity", "shuffled"], "lengths": ["ragged"],
         "backends": ["vllm2024-v1+vllm2024-v2"]},
        {"dtype": ["float16", "bfloat16", "float32"], "block_size": [1], "head_size": [64, 96, 128, 256],
         "heads": ["MHA", "GQA2", "GQA4", "GQA6", "GQA8", "MQA"],
         "placement": ["identity", "shuffled"], "lengths": ["ragged"],
         "backends": ["vllm2024-v1+vllm2024-v2"]},
        {"dtype": ["float16"], "block_size": [1, 16, 32], "head_size": [128], "heads": ["MHA", "GQA8"],
         "placement": ["shuffled"], "lengths": ["long"], "backends": ["vllm2024-v1+vllm2024-v2"]},
        # FlexAttention compiles one kernel per shape: a smaller grid, block sizes it supports
        {"dtype": ["float16", "bfloat16", "float32"], "block_size": [16, 256], "head_size": [64, 128],
         "heads": ["MHA", "GQA4", "MQA"], "placement": ["identity", "shuffled"], "lengths": ["ragged"],
         "backends": ["flex_paged"]},
    ],
))

#: kernel_speed's shapes (batch, tokens, query heads, KV heads): MHA 32:32, Llama-3-8B's 32:8,
#: the seed's (and Llama-70B's) 64:8, 40:8, MQA 32:1, at batch 1-128 x 4096, 1 x 32768, 256 x 1024
SPEED_SHAPES = [(b, n, h, kv) for h, kv in [(32, 32), (32, 8), (64, 8), (40, 8), (32, 1)]
                for b, n in [(1, 4096), (8, 4096), (32, 4096), (128, 4096), (1, 32768), (256, 1024)]]
SPEED_BACKENDS = ("own-auto-paged+own-auto-contiguous+own-v1-paged+own-v2-paged+own-v3-paged"
                  "+own-v3-contiguous+vllm+sdpa_dense+flashinfer+flex_paged")

#: vLLM's FlashAttention 3 at kernel_speed's shapes, with the peers it is compared with re-measured
#: on the same points (a sub-grid of its own, so the earlier points keep their keys)
FA3_SPEED_BACKENDS = "vllm-fa3+flashinfer+sdpa_dense+own-auto-paged"

#: the first grid (the committed H100 runs): six shapes, the backends of then; kept so those rows
#: stay points of the grid, and so a new card can be compared with them point for point
H100_SHAPES = [(1, 4096, 32, 32), (16, 1024, 32, 32), (32, 1024, 32, 32), (32, 4096, 32, 32),
               (128, 4096, 32, 32), (32, 4096, 32, 8)]
H100_BACKENDS = ("own-auto-paged+own-auto-contiguous+own-v1-paged+own-v2-paged+vllm+sdpa_dense"
                 "+flex_paged")

KERNEL_SPEED = check(Experiment(
    name="kernel_speed",
    description="Decode time of our kernels, vLLM's, FlashInfer's and dense SDPA's from MHA to MQA "
                "(fp16, head 128, block 16, identity placement, rigorous protocol)",
    measure="lib.engine.measure:measure_decode",
    prepare="lib.engine.measure:precompile_points",
    grid=[{"batch_size": [b], "seq_len": [n], "num_heads": [h], "num_kv_heads": [kv],
           "head_size": [128], "block_size": [16], "dtype": ["float16"],
           "placement": ["identity"], "memory_kind": ["device"], "protocol": ["rigorous"],
           "partition_size": [0], "seed": [0],
           "backends": [backends]}
          for shapes, backends in ((SPEED_SHAPES, SPEED_BACKENDS), (H100_SHAPES, H100_BACKENDS),
                                   (SPEED_SHAPES, FA3_SPEED_BACKENDS))
          for b, n, h, kv in shapes],
))
