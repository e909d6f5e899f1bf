"""How our decode kernel maps work to threads, computed in Python from the kernel's own rules.

The `constexpr`s of `lib/engine/kernels/paged_attention.cu` are restated one for one
(`KERNEL_CONSTEXPRS` holds the C++ text; a test keeps them in step), so the book can tabulate the
mapping for every block size without a GPU. Also: register count -> resident blocks per SM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

WARP = 32
NUM_THREADS = 128  # threads per block of the decode kernel (4 warps)
NUM_WARPS = NUM_THREADS // WARP
VECTOR_BYTES = 16  # the classic key layout packs keys in 16-byte vectors
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}

#: The kernel's compile-time mapping, as written in `paged_attention.cu`: the functions below compute these.
KERNEL_CONSTEXPRS = {
    "X": "16 / sizeof(T)",
    "TG": "BS < WARP ? WARP / BS : 1",
    "TOK_PER_STEP": "BS < WARP ? BS : WARP",
    "STEPS_PER_BLOCK": "BS < WARP ? 1 : BS / WARP",
    "VEC": "(16 / (TG * (int)sizeof(T))) > 0 ? 16 / (TG * (int)sizeof(T)) : 1",
    "NVEC": "D / VEC",
    "SLOTS": "(NVEC + TG - 1) / TG",
    "V_VEC": "(16 / (int)sizeof(T)) < TOK_PER_STEP ? 16 / (int)sizeof(T) : TOK_PER_STEP",
    "VECS_PER_ROW": "TOK_PER_STEP / V_VEC",
    "ROWS_PER_ITER": "WARP / VECS_PER_ROW",
    "ROWS_PER_THREAD": "(D + ROWS_PER_ITER - 1) / ROWS_PER_ITER",
}

#: Register-file rules per SM (sm_80 and sm_90 agree): 64 K 32-bit registers, allocated per warp
#: in units of 256; at most 64 resident warps and 32 resident blocks.
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
#: shared memory per SM usable by blocks, and what the runtime reserves per block (bytes)
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
SMEM_RESERVED_PER_BLOCK = 1024
#: `min_blocks`: blocks per SM asked of the compiler where phase 2's per-thread state (in 32-bit
#: registers) fits in STATE_LIMIT, i.e. at most REGS_PER_SM / (CAP_BLOCKS * NUM_THREADS) each
CAP_BLOCKS = 4
STATE_LIMIT = 96


def _itemsize(dtype: str) -> int:
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(ITEMSIZE)}")
    return ITEMSIZE[dtype]


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_block_size(bs: int) -> int:
    _positive("block_size", bs)
    if (bs < WARP and WARP % bs) or (bs >= WARP and bs % WARP):
        raise ValueError(f"block_size={bs}: the kernel needs a divisor of {WARP} or a multiple "
                         f"of {WARP} (a thread group is {WARP} / block_size threads)")
    return bs


@dataclass(frozen=True)
class ThreadMapping:
    """One instantiation's mapping of work to threads (names as in the kernel, lower case).

    Phase 1 (q.k): `tg` threads share a token, each loading `vec` elements per load, then a
    `shuffle_levels`-round butterfly sums their dot products. Phase 2 (p.v): each thread loads `v_vec`
    consecutive tokens of a value row. `*_per_token`: warp-wide instructions per token of one KV head.
    """

    dtype: str
    block_size: int
    head_size: int
    tile: int
    x: int
    tg: int
    tok_per_step: int
    steps_per_block: int
    vec: int
    key_load_bytes: int
    nvec: int
    slots: int
    shuffle_levels: int
    v_vec: int
    value_load_bytes: int
    vecs_per_row: int
    rows_per_iter: int
    rows_per_thread: int
    min_blocks: int
    key_loads_per_token: float
    value_loads_per_token: float
    shuffles_per_token: float
    table_entries_per_token: float


def min_blocks(dtype: str, block_size: int, head_size: int, tile: int) -> int:
    """The kernel's `min_blocks<T, BS, D, GT>()` (default UPA_MIN_BLOCKS=0): 4 (a cap of 128 registers
    per thread) where phase 2's per-thread state fits in about 96 registers, else 1 (up to 255)."""
    size = _itemsize(dtype)
    _check_block_size(block_size)
    _positive("head_size", head_size)
    _positive("tile", tile)
    tok = min(block_size, WARP)
    v_vec = min(VECTOR_BYTES // size, tok)
    rows_per_iter = WARP // (tok // v_vec)
    rows = -(-head_size // rows_per_iter)
    state = tile * rows + rows * v_vec * size // 4 + tile * v_vec
    return CAP_BLOCKS if state <= STATE_LIMIT else 1


def thread_mapping(block_size: int, *, head_size: int = 128, dtype: str = "float16",
                   tile: int = 1) -> ThreadMapping:
    """The kernel's compile-time mapping for one (dtype, block size, head size, head tile); ValueError
    where the kernel would not compile (its static_asserts) or cannot run."""
    size = _itemsize(dtype)
    bs = _check_block_size(block_size)
    d = _positive("head_size", head_size)
    gt = _positive("tile", tile)
    x = VECTOR_BYTES // size
    tg = WARP // bs if bs < WARP else 1
    tok_per_step = bs if bs < WARP else WARP
    steps_per_block = 1 if bs < WARP else bs // WARP
    vec = max(VECTOR_BYTES // (tg * size), 1)
    if d % vec:
        raise ValueError(f"head_size={d} is not a multiple of the key vector ({vec} elements)")
    if x % vec:
        raise ValueError(f"a key vector of {vec} elements would straddle a {x}-element chunk")
    if d % x:
        raise ValueError(f"head_size={d} is not a multiple of the 16-byte chunk ({x} elements)")
    nvec = d // vec
    slots = -(-nvec // tg)
    v_vec = min(VECTOR_BYTES // size, tok_per_step)
    vecs_per_row = tok_per_step // v_vec
    rows_per_iter = WARP // vecs_per_row
    rows_per_thread = -(-d // rows_per_iter)
    levels = tg.bit_length() - 1  # log2: tg divides the warp, a power of two
    return ThreadMapping(
        dtype=dtype, block_size=bs, head_size=d, tile=gt, x=x, tg=tg, tok_per_step=tok_per_step,
        steps_per_block=steps_per_block, vec=vec, key_load_bytes=vec * size, nvec=nvec,
        slots=slots, shuffle_levels=levels, v_vec=v_vec, value_load_bytes=v_vec * size,
        vecs_per_row=vecs_per_row, rows_per_iter=rows_per_iter, rows_per_thread=rows_per_thread,
        min_blocks=min_blocks(dtype, bs, d, gt),
        key_loads_per_token=slots / tok_per_step,
        value_loads_per_token=rows_per_thread / tok_per_step,
        shuffles_per_token=levels * gt / tok_per_step,
        table_entries_per_token=1 / bs,
    )


def mapping_table(block_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256), *, head_size: int = 128,
                  dtype: str = "float16", tile: int = 1):
    """`thread_mapping` for each block size, one row each (a pandas DataFrame)."""
    import pandas as pd

    sizes = list(block_sizes)
    if not sizes:
        raise ValueError("mapping_table needs at least one block size")
    return pd.DataFrame([asdict(thread_mapping(bs, head_size=head_size, dtype=dtype, tile=tile))
                         for bs in sizes])


def blocks_per_sm(registers: int, *, threads: int = NUM_THREADS, smem_bytes: int = 0,
                  arch: str = "sm_90") -> int:
    """Thread blocks one SM can hold at once, given registers per thread and shared memory."""
    _positive("registers", registers)
    _positive("threads", threads)
    if arch not in SMEM_PER_SM:
        raise ValueError(f"arch={arch!r} is not known; allowed: {', '.join(SMEM_PER_SM)}")
    if registers > 255:
        raise ValueError(f"registers={registers}: a thread has at most 255")
    if smem_bytes < 0:
        raise ValueError(f"smem_bytes must be >= 0, got {smem_bytes}")
    warps = -(-threads // WARP)
    per_warp = -(-registers * WARP // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_warps = MAX_WARPS_PER_SM // warps
    by_smem = SMEM_PER_SM[arch] // (smem_bytes + SMEM_RESERVED_PER_BLOCK)
    return min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM)


def occupancy(registers: int, *, threads: int = NUM_THREADS, smem_bytes: int = 0,
              arch: str = "sm_90") -> float:
    """Theoretical occupancy: resident warps over the SM's 64 (what Nsight Compute reports)."""
    blocks = blocks_per_sm(registers, threads=threads, smem_bytes=smem_bytes, arch=arch)
    return blocks * -(-threads // WARP) / MAX_WARPS_PER_SM


def launch_table(shapes, *, num_sms: int = 132, versions=("auto", 1, 2)):
    """How `lib.engine.kernels.plan_launch` maps each shape (a dict) to a grid, per kernel version
    asked: one row per (shape, version). A v1 request that cannot run raises ValueError.
    """
    import pandas as pd

    from lib.engine import kernels

    _positive("num_sms", num_sms)
    rows = []
    for shape in shapes:
        s = dict(shape)
        need = ("batch_size", "seq_len", "num_heads", "num_kv_heads", "head_size", "block_size", "dtype")
        missing = [k for k in need if k not in s]
        if missing:
            raise ValueError(f"launch_table: shape {s} lacks {missing}")
        for asked in versions:
            plan = kernels.plan_launch(
                dtype=s["dtype"], block_size=int(s["block_size"]), head_size=int(s["head_size"]),
                num_heads=int(s["num_heads"]), num_kv_heads=int(s["num_kv_heads"]),
                num_seqs=int(s["batch_size"]), max_seq_len=int(s["seq_len"]), version=asked,
                num_sms=num_sms)
            grid = int(s["num_kv_heads"]) * plan.head_tiles * int(s["batch_size"]) * plan.max_partitions
            rows.append({**{k: s[k] for k in need}, "asked": str(asked), "version": plan.version,
                         "tile": plan.tile, "partition_size": plan.partition_size,
                         "partitions": plan.max_partitions, "grid_blocks": grid,
                         "blocks_per_sm": grid / num_sms})
    return pd.DataFrame(rows)


def first_v1_blocks_per_sm(num_sms: int, *, num_heads: int = 32, head_size: int = 128,
                           block_size: int = 16, max_seq_len: int = 4096) -> float:
    """Blocks per SM of the smallest grid (MHA, one head per block) the automatic version choice
    runs as v1: where its rule switches from v2 to v1."""
    from lib.engine import kernels

    for seqs in range(1, 1024):
        if kernels.choose_version(num_seqs=seqs, num_heads=num_heads, num_kv_heads=num_heads,
                                  head_size=head_size, block_size=block_size, max_seq_len=max_seq_len,
                                  num_sms=num_sms) == 1:
            return seqs * num_heads / num_sms
    raise ValueError(f"no batch below 1024 runs as v1 on {num_sms} SMs")
