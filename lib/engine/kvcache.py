"""KV-cache contents, block tables and the physical layouts each backend reads.

The logical K and V live in a token-major block pool ``[num_blocks, block_size, num_kv_heads,
head_size]``; a block table lists each sequence's physical blocks in order. Every layout a backend
reads is an exact reshape/transpose/gather of the pool (vllm: the pool itself; classic: K
``[NB, KVH, D/x, BS, x]``, x = 16 bytes / element, V ``[NB, KVH, D, BS]``; dense), so all read
bit-identical inputs. bfloat16 is stored as ``uint16`` bit patterns. Functions take ``xp`` (numpy
or cupy); block tables are host ``int32`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PLACEMENTS = ("identity", "shuffled", "single_content")
DTYPES = ("float16", "bfloat16", "float32")

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
_VECTOR_BYTES = 16  # the classic layout packs keys in 16-byte vectors


def _check_dtype_name(dtype_name: str) -> str:
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype {dtype_name!r} is not supported; allowed: {', '.join(DTYPES)}")
    return dtype_name


def itemsize(dtype_name: str) -> int:
    return _ITEMSIZE[_check_dtype_name(dtype_name)]


def storage_dtype(dtype_name: str, xp=np):  # bf16 is stored as uint16 bit patterns
    _check_dtype_name(dtype_name)
    return {"float16": xp.float16, "bfloat16": xp.uint16, "float32": xp.float32}[dtype_name]


def infer_dtype_name(arr) -> str:
    """Storage dtype → dtype name; a ``uint16`` array is taken to hold bfloat16 bit patterns."""
    name = str(arr.dtype).replace("torch.", "")
    if name == "uint16":
        return "bfloat16"
    if name in DTYPES:
        return name
    raise ValueError(f"array dtype {name!r} is not a cache storage dtype; allowed: float16, "
                     "uint16 (bfloat16 bit patterns), float32")


def float32_to_bf16_bits(x, *, xp=np):
    """float32 → bfloat16 bit patterns (uint16), nearest-even; NaN stays a (quiet) NaN."""
    x = xp.ascontiguousarray(xp.asarray(x, dtype=xp.float32))
    bits = x.view(xp.uint32)
    rounding = xp.uint32(0x7FFF) + ((bits >> xp.uint32(16)) & xp.uint32(1))
    rounded = ((bits + rounding) >> xp.uint32(16)).astype(xp.uint16)
    quiet_nan = ((bits >> xp.uint32(16)) | xp.uint32(0x0040)).astype(xp.uint16)
    return xp.where(xp.isnan(x), quiet_nan, rounded)


def bf16_bits_to_float32(bits, *, xp=np):
    """Decode uint16 bfloat16 bit patterns to float32 (exact: bf16 is a truncated float32)."""
    wide = xp.ascontiguousarray(xp.asarray(bits, dtype=xp.uint16).astype(xp.uint32) << xp.uint32(16))
    return wide.view(xp.float32)


def to_storage(values, dtype_name: str, *, xp=np):  # real values -> the storage form of dtype_name
    _check_dtype_name(dtype_name)
    if dtype_name == "bfloat16":
        return float32_to_bf16_bits(values, xp=xp)
    return xp.asarray(values).astype(storage_dtype(dtype_name, xp))


def as_float64(arr, dtype_name: str | None = None, *, xp=np):
    """Decode a stored array (float16, bf16-as-uint16, float32, float64) to float64; `dtype_name`
    None infers it (``uint16`` → bfloat16)."""
    if dtype_name is None:
        if str(arr.dtype) == "float64":
            return xp.asarray(arr)
        dtype_name = infer_dtype_name(arr)
    _check_dtype_name(dtype_name)
    if dtype_name == "bfloat16":
        if str(arr.dtype) != "uint16":
            raise ValueError(f"bfloat16 data must be stored as uint16 bit patterns, got dtype {arr.dtype}")
        return bf16_bits_to_float32(arr, xp=xp).astype(xp.float64)
    return xp.asarray(arr).astype(xp.float64)


def poison(out) -> None:
    """Fill ``out`` with NaN (quiet-NaN bits in a bf16 ``uint16`` array): unwritten never passes."""
    out.fill(0x7FC0 if out.dtype == np.uint16 else np.nan)


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise ValueError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def random_array(shape, dtype_name: str, rng, *, xp=np, chunk_elements: int = 1 << 26):
    """Uniform values in [-1, 1] in storage form, never zero (|x| >= 2**-14), drawn in chunks on
    ``xp``'s own generator (seeded from `rng`: a CuPy cache is filled on the GPU, NumPy's differs)."""
    _check_dtype_name(dtype_name)
    rng = _as_rng(rng)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative extent")
    out = xp.empty(shape, dtype=storage_dtype(dtype_name, xp))
    if out.size == 0:
        return out
    gen = xp.random.default_rng(int(rng.integers(0, 2**63 - 1)))
    flat = out.reshape(-1)
    tiny = np.float32(2.0**-14)  # smallest normal float16: survives every storage dtype
    for start in range(0, flat.size, chunk_elements):
        n = min(chunk_elements, flat.size - start)
        u = gen.random(n, dtype=xp.float32) * xp.float32(2) - xp.float32(1)
        u = xp.copysign(xp.maximum(xp.abs(u), tiny), u)
        flat[start:start + n] = to_storage(u, dtype_name, xp=xp)
    return out


def random_pool(num_blocks, block_size, num_kv_heads, head_size, dtype, rng, *,
                single_content=False, xp=np):
    """A random K or V pool ``[num_blocks, block_size, num_kv_heads, head_size]`` (never zero: a
    zero cache would hide addressing bugs). `single_content`: every block a copy of block 0, the
    cache the `no_offset` ablation is exact on."""
    shape = (int(num_blocks), int(block_size), int(num_kv_heads), int(head_size))
    if min(shape) < 1:
        raise ValueError(f"pool shape {shape}: every extent must be >= 1")
    if not single_content:
        return random_array(shape, dtype, rng, xp=xp)
    block = random_array(shape[1:], dtype, rng, xp=xp)
    return xp.ascontiguousarray(xp.broadcast_to(block[None], shape))


def blocks_needed(seq_lens, block_size: int) -> np.ndarray:  # ceil(seq_len / block_size), int64
    lens = np.asarray(seq_lens, dtype=np.int64)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return -(-lens // int(block_size))


@dataclass(frozen=True)
class BlockTables:
    """Block tables (int32 ``[num_seqs, max_blocks_per_seq]``, 0 past a sequence's last block) plus
    ``seq_start``, each sequence's first block in the *identity* layout (`contiguous` reads
    ``seq_start[s] + j``; all zeros for seed-protocol random tables)."""

    tables: np.ndarray
    seq_start: np.ndarray
    num_blocks: int
    placement: str
    block_size: int = 0
    seq_lens: np.ndarray | None = None


def _check_lens(seq_lens) -> np.ndarray:
    lens = np.asarray(seq_lens)
    if lens.ndim != 1 or lens.size == 0:
        raise ValueError(f"seq_lens must be a non-empty 1-D sequence, got shape {lens.shape}")
    if not np.issubdtype(lens.dtype, np.integer):
        raise ValueError(f"seq_lens must be integers, got dtype {lens.dtype}")
    if (lens < 1).any():
        raise ValueError(f"seq_lens must all be >= 1, got min {int(lens.min())}")
    return lens.astype(np.int64)


def make_block_tables(seq_lens, block_size, placement, rng=None, num_blocks=None, *,
                      max_blocks_per_seq=None) -> BlockTables:
    """Block tables for `seq_lens`: identity (sequence s owns blocks ``seq_start[s] + j``),
    shuffled (the same blocks under a seeded permutation, needs `rng`: a fragmented cache) or
    single_content (identity; the pool makes every block equal). `num_blocks` may exceed the
    blocks needed; `max_blocks_per_seq` widens the table (extra columns 0)."""
    lens = _check_lens(seq_lens)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not known; allowed: {', '.join(PLACEMENTS)}")
    nb = blocks_needed(lens, block_size)
    total = int(nb.sum())
    if num_blocks is None:
        num_blocks = total
    if num_blocks < total:
        raise ValueError(f"num_blocks={num_blocks} is too small: these sequences need {total} blocks")
    width = int(nb.max()) if max_blocks_per_seq is None else int(max_blocks_per_seq)
    if width < nb.max():
        raise ValueError(f"max_blocks_per_seq={width} < {int(nb.max())} blocks of the longest sequence")
    if total > np.iinfo(np.int32).max:
        raise ValueError(f"{total} blocks overflow int32 block tables")

    seq_start = np.zeros(lens.size, dtype=np.int64)
    seq_start[1:] = np.cumsum(nb)[:-1]
    cols = np.arange(width, dtype=np.int64)
    used = cols[None, :] < nb[:, None]
    physical = seq_start[:, None] + cols[None, :]
    if placement == "shuffled":
        perm = _as_rng(rng).permutation(total)
        physical = perm[np.where(used, physical, 0)]
    tables = np.where(used, physical, 0).astype(np.int32)
    return BlockTables(tables=tables, seq_start=seq_start.astype(np.int32),
                       num_blocks=int(num_blocks), placement=placement,
                       block_size=int(block_size), seq_lens=lens.astype(np.int32))


def make_random_block_tables(seq_lens, block_size, num_physical_blocks, rng) -> BlockTables:
    """The seed protocol (vLLM's old ``benchmark_paged_attention.py``, NOTES.md): every entry
    drawn uniformly with replacement from `num_physical_blocks`, so a small pool can sit in L2.
    ``seq_start`` is all zeros, so ``num_blocks`` covers the longest sequence for contiguous reads.
    """
    lens = _check_lens(seq_lens)
    if num_physical_blocks < 1:
        raise ValueError(f"num_physical_blocks must be >= 1, got {num_physical_blocks}")
    nb = blocks_needed(lens, block_size)
    width = int(nb.max())
    draws = _as_rng(rng).integers(0, num_physical_blocks, size=(lens.size, width))
    used = np.arange(width)[None, :] < nb[:, None]
    tables = np.where(used, draws, 0).astype(np.int32)
    return BlockTables(tables=tables, seq_start=np.zeros(lens.size, dtype=np.int32),
                       num_blocks=max(int(num_physical_blocks), width), placement="random",
                       block_size=int(block_size), seq_lens=lens.astype(np.int32))


def used_pages(tables: np.ndarray, seq_lens: np.ndarray, block_size: int, num_blocks: int | None = None):
    """The entries a paged kernel reads of host block tables (int ``[S, W]``; only the first
    ceil(len / block_size) of a row), checked: ``(lens, pages, used, entries)`` with ``used`` the
    ``[S, W]`` mask of read entries and ``entries`` them in row-major order (sequence after
    sequence, page order), int64. ValueError for a table a peer library would misread: wrong
    shapes, no sequences, a length < 1, too few columns, a page outside ``num_blocks`` (default:
    the int32 range)."""
    if tables.ndim != 2 or not np.issubdtype(tables.dtype, np.integer):
        raise ValueError(f"block_tables must be a 2-D integer array, got {tables.dtype} {tables.shape}")
    if seq_lens.shape != (tables.shape[0],) or not np.issubdtype(seq_lens.dtype, np.integer):
        raise ValueError(f"seq_lens must be {tables.shape[0]} integers (one per table row), "
                         f"got {seq_lens.dtype} {seq_lens.shape}")
    if seq_lens.size == 0:
        raise ValueError("no sequences: block_tables has no rows")
    if (seq_lens < 1).any():
        raise ValueError(f"seq_lens must all be >= 1, got min {int(seq_lens.min())}")
    lens = seq_lens.astype(np.int64)
    pages = -(-lens // block_size)
    width = tables.shape[1]
    if pages.max() > width:
        s = int(np.argmax(pages))
        raise ValueError(f"sequence {s} of length {int(lens[s])} needs {int(pages[s])} pages of "
                         f"{block_size}; block_tables has {width} columns")
    used = np.arange(width)[None, :] < pages[:, None]
    entries = tables[used].astype(np.int64)
    limit = np.iinfo(np.int32).max if num_blocks is None else int(num_blocks)
    bad = entries[(entries < 0) | (entries >= limit)]
    if bad.size:
        raise ValueError(f"block_tables holds page {int(bad[0])}, outside the pool's {limit} pages")
    return lens, pages, used, entries


def _table_array(tables) -> np.ndarray:  # a BlockTables or a bare 2-D table
    return np.asarray(getattr(tables, "tables", tables))


def to_classic(kpool, vpool, *, xp=np):
    """Pool → the classic vLLM paged-attention layout (our kernels'), as contiguous copies."""
    nb, bs, kvh, d = kpool.shape
    if tuple(vpool.shape) != (nb, bs, kvh, d):
        raise ValueError(f"kpool {tuple(kpool.shape)} and vpool {tuple(vpool.shape)} differ")
    size = int(kpool.dtype.itemsize)
    if _VECTOR_BYTES % size:
        raise ValueError(f"element size {size} bytes does not divide the 16-byte key vector")
    x = _VECTOR_BYTES // size
    if d % x:
        raise ValueError(f"head_size {d} is not a multiple of the key vector width {x}")
    k = xp.ascontiguousarray(kpool.reshape(nb, bs, kvh, d // x, x).transpose(0, 2, 3, 1, 4))
    v = xp.ascontiguousarray(vpool.transpose(0, 2, 3, 1))
    return k, v


def from_classic(k_cache, v_cache, *, xp=np):
    """Classic layout → pool ``[NB, BS, KVH, D]`` (exact inverse of `to_classic`)."""
    nb, kvh, dx, bs, x = k_cache.shape
    if tuple(v_cache.shape) != (nb, kvh, dx * x, bs):
        raise ValueError(f"v_cache {tuple(v_cache.shape)} does not match k_cache {tuple(k_cache.shape)}: "
                         f"expected {(nb, kvh, dx * x, bs)}")
    k = xp.ascontiguousarray(k_cache.transpose(0, 3, 1, 2, 4).reshape(nb, bs, kvh, dx * x))
    v = xp.ascontiguousarray(v_cache.transpose(0, 3, 1, 2))
    return k, v


def to_vllm(kpool, vpool):  # vLLM 0.33's cache is the pool layout: no copy
    return kpool, vpool


def gather_sequence(pool, tables, seq_len, s, *, xp=np):
    """Logical K or V of sequence `s`: ``[seq_len, KVH, D]`` in token order (a copy)."""
    table = _table_array(tables)
    bs = pool.shape[1]
    n = int(blocks_needed([seq_len], bs)[0])
    if n > table.shape[1]:
        raise ValueError(f"sequence {s} of length {seq_len} needs {n} blocks; its table has {table.shape[1]}")
    blocks = xp.take(pool, xp.asarray(table[s, :n].astype(np.int64)), axis=0)
    return blocks.reshape(n * bs, pool.shape[2], pool.shape[3])[: int(seq_len)]


def to_dense(kpool, vpool, block_tables, seq_lens, *, xp=np):
    """Pool + tables → dense K, V ``[num_seqs, KVH, max_len, D]`` (SDPA's no-page-table input)."""
    lens = _check_lens(seq_lens)
    _, _, kvh, d = kpool.shape
    shape = (lens.size, kvh, int(lens.max()), d)
    k, v = (xp.zeros(shape, dtype=a.dtype) for a in (kpool, vpool))
    for s, n in enumerate(lens.tolist()):
        k[s, :, :n] = gather_sequence(kpool, block_tables, n, s, xp=xp).transpose(1, 0, 2)
        v[s, :, :n] = gather_sequence(vpool, block_tables, n, s, xp=xp).transpose(1, 0, 2)
    return k, v


def dense_to_pool(k_dense, v_dense, block_tables, seq_lens, num_blocks, block_size=None, *, xp=np):
    """Dense K, V → pools ``[num_blocks, BS, KVH, D]`` through the tables: `to_dense`'s inverse
    (tails of last blocks stay zero). `block_size` defaults to the BlockTables' own."""
    lens = _check_lens(seq_lens)
    table = _table_array(block_tables)
    bs = int(block_size or getattr(block_tables, "block_size", 0))
    if bs < 1:
        raise ValueError("dense_to_pool needs block_size (or a BlockTables, which carries it)")
    nseq, kvh, _, d = k_dense.shape
    pools = []
    for dense in (k_dense, v_dense):
        pool = xp.zeros((int(num_blocks), bs, kvh, d), dtype=dense.dtype)
        for s, n in enumerate(lens.tolist()):
            nb = int(blocks_needed([n], bs)[0])
            tokens = xp.zeros((nb * bs, kvh, d), dtype=dense.dtype)
            tokens[:n] = dense[s, :, :n].transpose(1, 0, 2)
            pool[xp.asarray(table[s, :nb].astype(np.int64))] = tokens.reshape(nb, bs, kvh, d)
        pools.append(pool)
    return pools[0], pools[1]


def cache_bytes(seq_lens, num_kv_heads, head_size, itemsize) -> int:
    """Bytes of K plus V a decode step must read: every token once (not the tails of last blocks).
    `itemsize`: bytes per element or a dtype name."""
    size = _ITEMSIZE[itemsize] if isinstance(itemsize, str) else int(itemsize)
    tokens = int(np.asarray(seq_lens, dtype=np.int64).sum())
    return 2 * tokens * int(num_kv_heads) * int(head_size) * size


def decode_bytes(seq_lens, num_heads, num_kv_heads, head_size, itemsize) -> int:
    """Bytes one decode step must move, DESIGN.md's bandwidth numerator: K, V, query and output."""
    size = _ITEMSIZE[itemsize] if isinstance(itemsize, str) else int(itemsize)
    qo = 2 * int(np.asarray(seq_lens).size) * int(num_heads) * int(head_size) * size
    return cache_bytes(seq_lens, num_kv_heads, head_size, size) + qo
