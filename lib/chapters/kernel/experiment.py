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
        # FlexAttention compiles one kernel per shape: a smaller grid, block sizes it supports
        {"dtype": ["float16", "bfloat16", "float32"], "block_size": [16, 256], "head_size": [64, 128],
         "heads": ["MHA", "GQA4", "MQA"], "placement": ["identity", "shuffled"], "lengths": ["ragged"],
         "backends": ["flex_paged"]},
    ],
))

KERNEL_SPEED = check(Experiment(
    name="kernel_speed",
    description="Decode time of our kernels, vLLM's and dense SDPA at the issue's shapes "
                "(fp16, head 128, block 16, identity placement, rigorous protocol)",
    measure="lib.engine.measure:measure_decode",
    prepare="lib.engine.measure:precompile_points",
    grid=[{"batch_size": [b], "seq_len": [n], "num_heads": [h], "num_kv_heads": [kv],
           "head_size": [128], "block_size": [16], "dtype": ["float16"],
           "placement": ["identity"], "memory_kind": ["device"], "protocol": ["rigorous"],
           "partition_size": [0], "seed": [0],
           "backends": ["own-auto-paged+own-auto-contiguous+own-v1-paged+own-v2-paged+vllm+sdpa_dense"
                        "+flex_paged"]}
          for b, n, h, kv in [(1, 4096, 32, 32), (16, 1024, 32, 32), (32, 1024, 32, 32),
                              (32, 4096, 32, 32), (128, 4096, 32, 32), (32, 4096, 32, 8)]],
))
