"""Grid fragments several experiments share: the study's model shapes and block sizes."""

#: The shape vLLM's 2024 benchmark defaulted to (chapters/seed_repro.md): 64 query heads, 8 KV heads, head 128.
SEED_SHAPE = {"num_heads": [64], "num_kv_heads": [8], "head_size": [128], "dtype": ["float16"]}
#: A Llama-2-7B-like MHA shape (32 heads of 128): the other candidate for the post's model.
LLAMA_SHAPE = {"num_heads": [32], "num_kv_heads": [32], "head_size": [128], "dtype": ["float16"]}
#: Every block size the kernels support (the seed's tables stop at 32).
ALL_BLOCKS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
#: The fixed parameters of a rigorous decode point on device memory, identity placement.
RIGOROUS_DEVICE = {"memory_kind": ["device"], "protocol": ["rigorous"], "placement": ["identity"],
                   "physical_blocks": [0], "partition_size": [0], "seed": [0]}
