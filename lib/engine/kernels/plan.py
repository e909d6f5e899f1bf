"""Which kernel and how it is launched: instantiation rules and the launch plan, plain Python.

Importable and testable without a GPU; the CUDA source is `paged_attention.cu` beside this file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from lib.engine.kvcache import SUPPORTED_BLOCK_SIZES
from lib.engine.validation import SUPPORTED_DTYPES, SUPPORTED_HEAD_SIZES

SOURCE = Path(__file__).with_name("paged_attention.cu")

ADDRESSING = {"paged": 0, "contiguous": 1, "no_offset": 2}
CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
NUM_THREADS = 128
NUM_WARPS = NUM_THREADS // 32
DEFAULT_PARTITION = 512
HEAD_TILES = (4, 2, 1)
#: Head tiles allowed per head size. A tile of 8 needed ~250 registers (one block per SM) and ran
#: slower on H100 than two tiles of 4 that re-read K/V mostly from L2.
MAX_TILE_FOR_HEAD = {64: 4, 80: 4, 96: 4, 112: 4, 128: 4, 256: 4}
#: v1 keeps a whole sequence's logits in shared memory; above this it must be v2.
V1_SMEM_LIMIT = 96 * 1024
#: v3 (the matrix-unit kernel): query heads per thread block (the n dimension of its P V product)
#: and tokens per warp step; its partitions are multiples of NUM_WARPS chunks. A wide tile of 16
#: heads fills all 16 rows of Q K^T's A operand and runs two P V products on the same V operand,
#: so groups above 8 (16:1, MQA 32:1) read each K/V element half as often; at head size 256 it
#: would spill (ptxas), so there v3 keeps tiles of 8.
MMA_TILE = 8
MMA_WIDE_TILE = 16
MMA_TILES = (MMA_TILE, MMA_WIDE_TILE)
MMA_WIDE_MAX_HEAD = 128
MMA_CHUNK = 16
MMA_PARTITION_QUANTUM = NUM_WARPS * MMA_CHUNK
#: the smallest v3 partition worth its partial writes and reduce (tokens)
MMA_MIN_PARTITION = 256
#: v3 splits sequences until the grid has this many thread blocks per SM (3 are resident at
#: ~165 registers a thread, so 3 is one full wave; the wide tile's ~210 registers allow 2)
MMA_BLOCKS_PER_SM = 3
MMA_WIDE_BLOCKS_PER_SM = 2
MMA_DTYPES = ("float16", "bfloat16")


def head_tile(num_heads: int, num_kv_heads: int, head_size: int) -> int:
    """Query heads one thread block serves (sharing each K/V load among them)."""
    group = num_heads // num_kv_heads
    cap = MAX_TILE_FOR_HEAD.get(head_size, 1)
    return next(t for t in HEAD_TILES if t <= cap and group % t == 0)


def mma_head_tile(num_heads: int, num_kv_heads: int, head_size: int) -> int:
    """v3's query heads per thread block: the wide tile where the group exceeds 8 (head size up
    to MMA_WIDE_MAX_HEAD), else 8."""
    group = num_heads // num_kv_heads
    return MMA_WIDE_TILE if group > MMA_TILE and head_size <= MMA_WIDE_MAX_HEAD else MMA_TILE


def mma_blocks_per_sm(tile: int) -> int:
    """Resident v3 blocks per SM that one wave counts on, by head tile."""
    return MMA_WIDE_BLOCKS_PER_SM if tile == MMA_WIDE_TILE else MMA_BLOCKS_PER_SM


def smem_bytes(tile: int, head_size: int, partition_tokens: int) -> int:
    """Dynamic shared memory of the decode kernel: q, output, reduction scratch, logits."""
    return 4 * (2 * tile * head_size + NUM_WARPS * tile + tile * partition_tokens)


def mma_smem_bytes(head_size: int, tile: int = MMA_TILE) -> int:
    """Dynamic shared memory of v3: the block's output, per-warp max and sum, and (head size
    above 128) each warp's padded copy of the tile's queries (2-byte elements)."""
    q = NUM_WARPS * tile * (head_size + 32) * 2 if head_size > 128 else 0
    return 4 * (tile * head_size + 2 * NUM_WARPS * tile) + q


def mma_partition(*, num_seqs: int, num_heads: int, num_kv_heads: int, max_seq_len: int,
                  num_sms: int = 132, tile: int = MMA_TILE) -> int:
    """v3 partition (tokens): split sequences (flash-decoding) into as many partitions as keep the
    grid within one wave of resident blocks (`mma_blocks_per_sm(tile)` per SM), never below
    MMA_MIN_PARTITION tokens; a grid of (KV head, head tile, sequence) blocks that already fills
    a wave keeps whole sequences. Why one wave: in a partition-size probe on an H200
    (scripts/device/v3_probe.py, not committed data) grids of 1.1 to 1.3 waves of these
    long-running blocks ran slower than a grid just under one wave, whose blocks all start at
    once; a partial second wave leaves most of the GPU idle."""
    blocks = num_seqs * num_kv_heads * math.ceil(num_heads // num_kv_heads / tile)
    whole = _round_up(max_seq_len, MMA_PARTITION_QUANTUM)
    fits = mma_blocks_per_sm(tile) * num_sms // blocks
    parts = max(1, min(fits, max_seq_len // MMA_MIN_PARTITION))
    return min(whole, _round_up(math.ceil(max_seq_len / parts), MMA_PARTITION_QUANTUM))


def choose_version(
    *, num_seqs: int, num_heads: int, num_kv_heads: int, head_size: int, block_size: int,
    max_seq_len: int, num_sms: int = 132, partition_size: int | None = None,
) -> int:
    """v1 (one block per sequence) or v2 (partitions + reduce; fills the GPU when there are few
    (sequence, head) blocks and long sequences), like vLLM's rule of thumb."""
    tile = head_tile(num_heads, num_kv_heads, head_size)
    partition_size = partition_size or DEFAULT_PARTITION
    v1_tokens = _round_up(max_seq_len, block_size)
    if smem_bytes(tile, head_size, v1_tokens) > V1_SMEM_LIMIT:
        return 2
    # Measured on H100 (data/results/kernel_speed): v1 wins (no reduce kernel, no partials)
    # once its grid alone gives every SM about three blocks; below that v2's partitions fill
    # the idle SMs (1 x 4096 MHA: v1 3x slower). vLLM's rule of thumb was similar (> 512 rows).
    if max_seq_len <= partition_size or num_seqs * num_heads // tile >= 3 * num_sms:
        return 1
    return 2


def auto_partition(*, num_seqs: int, num_heads: int, num_kv_heads: int, head_size: int,
                   block_size: int, max_seq_len: int, num_sms: int = 132) -> int:
    """v2 partition size: 512 tokens, halved (down to max(block, 128)) until the grid has at
    least 16 thread blocks per SM. A few resident blocks per SM make a wave, so a grid of
    only ~1.3 waves leaves most SMs idle in its last wave; many small waves do not."""
    tile = head_tile(num_heads, num_kv_heads, head_size)
    rows = num_seqs * num_heads // tile
    part = DEFAULT_PARTITION
    while rows * math.ceil(max_seq_len / part) < 16 * num_sms and part // 2 >= max(block_size, 128):
        part //= 2
    return max(part, block_size)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def decode_name(dtype: str, block_size: int, head_size: int, tile: int, addressing: str) -> str:
    return (f"upa::paged_attention_decode<{CTYPE[dtype]}, {block_size}, {head_size}, {tile}, "
            f"{ADDRESSING[addressing]}>")


def mma_name(dtype: str, block_size: int, head_size: int, addressing: str,
             tile: int = MMA_TILE) -> str:
    return (f"upa::paged_attention_mma<{CTYPE[dtype]}, {block_size}, {head_size}, "
            f"{ADDRESSING[addressing]}, {tile}>")


def reduce_name(dtype: str, head_size: int) -> str:
    return f"upa::paged_attention_reduce<{CTYPE[dtype]}, {head_size}>"


def kernel_name(plan: "LaunchPlan") -> str:
    """Name expression of the decode kernel a plan launches."""
    if plan.version == 3:
        return mma_name(plan.dtype, plan.block_size, plan.head_size, plan.addressing, plan.tile)
    return decode_name(plan.dtype, plan.block_size, plan.head_size, plan.tile, plan.addressing)


def modules_for(dtype: str, block_size: int, head_size: int, num_heads: int,
                num_kv_heads: int) -> set[tuple]:
    """The modules (dtype, block, head, tile) any own version may launch for one shape."""
    keys = {(dtype, block_size, head_size, head_tile(num_heads, num_kv_heads, head_size))}
    if dtype in MMA_DTYPES and head_size % 16 == 0:
        keys.add((dtype, block_size, head_size, mma_head_tile(num_heads, num_kv_heads, head_size)))
    return keys


def instantiations(dtype: str, block_size: int, head_size: int, tile: int) -> list[str]:
    """Name expressions of one module: three addressing modes and the reduce kernel. Tiles in
    MMA_TILES are v3's modules (the matrix-unit kernel); 1, 2 and 4 are v1/v2's."""
    if tile in MMA_TILES:
        names = [mma_name(dtype, block_size, head_size, a, tile) for a in ADDRESSING]
    else:
        names = [decode_name(dtype, block_size, head_size, tile, a) for a in ADDRESSING]
    return names + [reduce_name(dtype, head_size)]


def all_modules():
    """Every (dtype, block size, head size, tile) the registry can launch (tiles MMA_TILES: v3)."""
    for dtype in SUPPORTED_DTYPES:
        for head_size in SUPPORTED_HEAD_SIZES:
            for block_size in SUPPORTED_BLOCK_SIZES:
                for tile in HEAD_TILES:
                    if tile <= MAX_TILE_FOR_HEAD[head_size]:
                        yield dtype, block_size, head_size, tile
                if dtype in MMA_DTYPES:
                    yield dtype, block_size, head_size, MMA_TILE
                    if head_size <= MMA_WIDE_MAX_HEAD:
                        yield dtype, block_size, head_size, MMA_WIDE_TILE


def compile_options() -> tuple[str, ...]:
    """NVRTC options; `UVM_STUDY_KERNEL_DEFINES="-DUPA_UNROLL_SINGLE=1 ..."` adds tuning defines."""
    opts = ["-std=c++17"]
    opts += os.environ.get("UVM_STUDY_KERNEL_DEFINES", "").split()
    cuda = os.environ.get("CUDA_PATH") or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if Path(cuda, "include", "cuda_bf16.h").exists():
        opts.append(f"-I{Path(cuda, 'include')}")
    return tuple(opts)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything about one launch that does not depend on the data."""

    dtype: str
    block_size: int
    head_size: int
    num_heads: int
    num_kv_heads: int
    addressing: str
    version: int
    tile: int
    partition_size: int  # tokens per thread block (v1: the whole padded sequence)
    max_partitions: int

    @property
    def shared_bytes(self) -> int:
        if self.version == 3:
            return mma_smem_bytes(self.head_size, self.tile)
        return smem_bytes(self.tile, self.head_size, self.partition_size)

    @property
    def head_tiles(self) -> int:
        """Thread blocks per KV head (each serves `tile` query heads, v3's last one padded)."""
        return math.ceil(self.num_heads // self.num_kv_heads / self.tile)


def plan_launch(
    *, dtype: str, block_size: int, head_size: int, num_heads: int, num_kv_heads: int,
    num_seqs: int, max_seq_len: int, addressing: str = "paged", version: int | str = "auto",
    partition_size: int | None = None, num_sms: int = 132,
) -> LaunchPlan:
    """Decide version, head tile and partitioning; raise ValueError for what cannot run.

    `partition_size=None` picks it (`auto_partition`; v3: `mma_partition`); v1 ignores it.
    `version="auto"` takes v3 where `auto_uses_mma`, else v1 or v2 by `choose_version`.
    """
    if addressing not in ADDRESSING:
        raise ValueError(f"addressing={addressing!r}: choose one of {sorted(ADDRESSING)}")
    if version == "auto" and auto_uses_mma(dtype=dtype, num_heads=num_heads,
                                           num_kv_heads=num_kv_heads):
        version = 3
    if version == 3:
        return _plan_mma(dtype=dtype, block_size=block_size, head_size=head_size,
                         num_heads=num_heads, num_kv_heads=num_kv_heads, num_seqs=num_seqs,
                         max_seq_len=max_seq_len, addressing=addressing,
                         partition_size=partition_size, num_sms=num_sms)
    if partition_size is None:
        partition_size = auto_partition(
            num_seqs=num_seqs, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_size=head_size, block_size=block_size, max_seq_len=max_seq_len, num_sms=num_sms)
    if partition_size % block_size or partition_size <= 0:
        raise ValueError(
            f"partition_size={partition_size} must be a positive multiple of block_size={block_size}")
    tile = head_tile(num_heads, num_kv_heads, head_size)
    if version == "auto":
        version = choose_version(
            num_seqs=num_seqs, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_size=head_size, block_size=block_size, max_seq_len=max_seq_len,
            num_sms=num_sms, partition_size=partition_size)
    if version not in (1, 2):
        raise ValueError(f"version={version!r}: choose 1, 2, 3 or 'auto'")
    if version == 1:
        part, parts = _round_up(max_seq_len, block_size), 1
        if smem_bytes(tile, head_size, part) > 227 * 1024:
            raise ValueError(
                f"v1 keeps all {max_seq_len} logits of a sequence in shared memory "
                f"({smem_bytes(tile, head_size, part)} bytes > 227 KiB): use version 2")
    else:
        part, parts = partition_size, math.ceil(max_seq_len / partition_size)
    return LaunchPlan(dtype, block_size, head_size, num_heads, num_kv_heads, addressing,
                      version, tile, part, parts)




def auto_uses_mma(*, dtype: str, num_heads: int, num_kv_heads: int) -> bool:
    """Whether `own-auto` picks v3 (matrix units): grouped-query and multi-query attention in
    fp16 and bf16, where it reads each K/V byte once for all of a KV head's query heads;
    otherwise v1/v2 by `choose_version`. The kernel chapter's speed table is the evidence."""
    return dtype in MMA_DTYPES and num_heads > num_kv_heads


def _plan_mma(*, dtype, block_size, head_size, num_heads, num_kv_heads, num_seqs, max_seq_len,
              addressing, partition_size, num_sms) -> LaunchPlan:
    if dtype not in MMA_DTYPES:
        raise ValueError(f"v3 (the matrix-unit kernel) takes {' or '.join(MMA_DTYPES)}, not "
                         f"{dtype}: use version 1 or 2 for {dtype}")
    if head_size % 16:
        raise ValueError(f"v3 needs a head size that is a multiple of 16, not {head_size}")
    tile = mma_head_tile(num_heads, num_kv_heads, head_size)
    if partition_size is None:
        partition_size = mma_partition(num_seqs=num_seqs, num_heads=num_heads,
                                       num_kv_heads=num_kv_heads, max_seq_len=max_seq_len,
                                       num_sms=num_sms, tile=tile)
    if partition_size <= 0 or partition_size % MMA_PARTITION_QUANTUM:
        raise ValueError(f"v3 partition_size={partition_size} must be a positive multiple of "
                         f"{MMA_PARTITION_QUANTUM} tokens ({NUM_WARPS} warps x {MMA_CHUNK})")
    parts = math.ceil(max_seq_len / partition_size)
    return LaunchPlan(dtype, block_size, head_size, num_heads, num_kv_heads, addressing,
                      3, tile, partition_size, parts)
