"""Checks that run before anything launches on a GPU.

A kernel given a bad block table reads out of bounds or crashes the context; a wrong shape gives
plausible garbage. So each check raises a ``ValueError`` naming the argument, its value and what
is allowed, where the mistake was made. Arrays are duck-typed (NumPy, CuPy, torch).
"""

from __future__ import annotations

import numbers

import numpy as np

from lib.engine.kvcache import DTYPES as SUPPORTED_DTYPES
from lib.engine.kvcache import SUPPORTED_BLOCK_SIZES, blocks_needed

SUPPORTED_HEAD_SIZES = (64, 80, 96, 112, 128, 256)
LAYOUTS = ("classic", "vllm", "dense")


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")
    return value


def dtype_name(dtype) -> str:
    """A dtype name from a string, NumPy dtype or torch dtype ("torch.bfloat16" → "bfloat16")."""
    if isinstance(dtype, str):
        return dtype.replace("torch.", "")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).replace("torch.", "")


def _host(a) -> np.ndarray:
    """Host copy of a small index array (NumPy, CuPy, torch, lists)."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if hasattr(a, "get") and not isinstance(a, np.ndarray):
        return a.get()
    return np.asarray(a)


def validate_decode_problem(*, num_seqs, num_heads, num_kv_heads, head_size, block_size, dtype,
                            seq_lens, tables=None, num_blocks=None, max_seq_len=None) -> None:
    """Check a decode problem's sizes, lengths and block tables; raise ValueError on the first fault.

    `tables`: a BlockTables (its `num_blocks` used when `num_blocks` is None) or a bare int32
    array. Only the entries a sequence uses must be valid; padding is ignored.
    """
    num_seqs, num_heads, num_kv_heads, head_size, block_size = (
        _positive_int(n, v) for n, v in (("num_seqs", num_seqs), ("num_heads", num_heads),
                                         ("num_kv_heads", num_kv_heads), ("head_size", head_size),
                                         ("block_size", block_size)))
    _one_of("block_size", block_size, SUPPORTED_BLOCK_SIZES)
    _one_of("head_size", head_size, SUPPORTED_HEAD_SIZES)
    _one_of("dtype", dtype_name(dtype), SUPPORTED_DTYPES)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}: the "
                         "GQA ratio must be an integer (allowed: num_kv_heads dividing num_heads)")

    lens = _host(seq_lens)
    if lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens has shape {lens.shape}; expected (num_seqs,) = ({num_seqs},)")
    if not np.issubdtype(lens.dtype, np.integer):
        raise ValueError(f"seq_lens must be integers, got dtype {lens.dtype}")
    if (lens < 1).any():
        s = int(np.argmin(lens))
        raise ValueError(f"seq_lens[{s}]={int(lens[s])}: every sequence length must be >= 1")
    if max_seq_len is not None:
        max_seq_len = _positive_int("max_seq_len", max_seq_len)
        s = int(np.argmax(lens))
        if lens[s] > max_seq_len:
            raise ValueError(f"seq_lens[{s}]={int(lens[s])} exceeds max_seq_len={max_seq_len}")

    if num_blocks is None and tables is not None:
        num_blocks = getattr(tables, "num_blocks", None)
    if num_blocks is not None:
        num_blocks = _positive_int("num_blocks", num_blocks)
    if tables is None:
        return
    table = _host(getattr(tables, "tables", tables))
    if table.dtype != np.int32:
        raise ValueError(f"block tables must have dtype int32, got {table.dtype}")
    if table.ndim != 2 or table.shape[0] != num_seqs:
        raise ValueError(f"block tables have shape {table.shape}; expected 2-D (num_seqs={num_seqs}, max_blocks)")
    needed = blocks_needed(lens, block_size)
    s = int(np.argmax(needed))
    if needed[s] > table.shape[1]:
        raise ValueError(f"sequence longer than its table: seq_lens[{s}]={int(lens[s])} needs "
                         f"{int(needed[s])} blocks of {block_size} tokens, but block tables have "
                         f"{table.shape[1]} columns")
    used = np.arange(table.shape[1])[None, :] < needed[:, None]
    bad = used & ((table < 0) | (table >= (num_blocks if num_blocks is not None else np.inf)))
    if bad.any():
        s, j = (int(i) for i in np.argwhere(bad)[0])
        upper = f"< num_blocks={num_blocks}" if num_blocks is not None else "non-negative"
        raise ValueError(f"block tables[{s}, {j}]={int(table[s, j])} is out of range; entries must "
                         f"be >= 0 and {upper}")


def device_of(a) -> str:
    """"cpu" or "cuda:<index>" for NumPy, CuPy and torch arrays alike (duck-typed)."""
    dev = getattr(a, "device", None)
    if dev is None or (isinstance(dev, str) and dev == "cpu"):
        return "cpu"
    if hasattr(dev, "type"):  # torch.device
        return f"cuda:{dev.index or 0}" if dev.type == "cuda" else str(dev.type)
    if hasattr(dev, "id"):  # cupy.cuda.Device
        return f"cuda:{int(dev.id)}"
    return str(dev)


def _storage_name(a) -> str:
    """Array dtype name, with bf16 storage (uint16 in NumPy/CuPy) reported as bfloat16."""
    name = dtype_name(a.dtype)
    return "bfloat16" if name == "uint16" else name


def validate_cache_arrays(q, k, v, out, *, layout, num_kv_heads=None, block_size=None,
                          dtype=None, num_blocks=None, require_contiguous=False) -> None:
    """Check q, the cache (in `layout`, see :mod:`lib.engine.kvcache`) and the output agree
    before a launch: shapes, one dtype, one device; optional keywords cross-check the sizes."""
    _one_of("layout", layout, LAYOUTS)
    arrays = {"q": q, "k": k, "v": v, "out": out}
    for name, a in arrays.items():
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise ValueError(f"{name} must be an array, got {type(a).__name__}")
    if len(q.shape) != 3:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected 3-D (num_seqs, num_heads, head_size)")
    num_seqs, num_heads, head_size = (int(n) for n in q.shape)
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected q's shape {tuple(q.shape)}")

    names = {n: _storage_name(a) for n, a in arrays.items()}
    if len(set(names.values())) != 1:
        raise ValueError(f"dtypes differ: {names}; q, k, v and out must share one dtype")
    if dtype is not None and names["q"] != dtype_name(dtype):
        raise ValueError(f"arrays have dtype {names['q']}, but dtype={dtype_name(dtype)!r}")
    _one_of("dtype", names["q"], SUPPORTED_DTYPES)
    devices = {n: device_of(a) for n, a in arrays.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"devices differ: {devices}; q, k, v and out must be on one device")

    ks, vs = tuple(int(n) for n in k.shape), tuple(int(n) for n in v.shape)
    if layout == "classic":
        x = 16 // int(k.dtype.itemsize)
        if len(ks) != 5 or len(vs) != 4:
            raise ValueError(f"classic layout: k {ks} must be 5-D [NB, KVH, D/x, BS, x] and v {vs} "
                             "4-D [NB, KVH, D, BS]")
        expected_k = (vs[0], vs[1], head_size // x, vs[3], x)
        if ks != expected_k or vs[2] != head_size or head_size % x:
            raise ValueError(f"classic layout: k {ks} and v {vs} do not fit head_size={head_size} with "
                             f"x={x}; expected k {expected_k}, v {(vs[0], vs[1], head_size, vs[3])}")
        nb, kvh, bs = vs[0], vs[1], vs[3]
    elif layout == "vllm":
        if len(ks) != 4 or ks != vs or ks[3] != head_size:
            raise ValueError(f"vllm layout: k {ks} and v {vs} must both be [NB, BS, KVH, D={head_size}]")
        nb, bs, kvh = ks[0], ks[1], ks[2]
    else:
        if len(ks) != 4 or ks != vs or ks[0] != num_seqs or ks[3] != head_size:
            raise ValueError(f"dense layout: k {ks} and v {vs} must both be "
                             f"[num_seqs={num_seqs}, KVH, max_len, D={head_size}]")
        nb, bs, kvh = None, None, ks[1]

    if kvh < 1 or num_heads % kvh:
        raise ValueError(f"q has num_heads={num_heads}, cache has num_kv_heads={kvh}: the GQA ratio "
                         "must be an integer")
    if num_kv_heads is not None and kvh != num_kv_heads:
        raise ValueError(f"cache has num_kv_heads={kvh}, expected num_kv_heads={num_kv_heads}")
    if block_size is not None and bs is not None and bs != block_size:
        raise ValueError(f"cache has block_size={bs}, expected block_size={block_size}")
    if num_blocks is not None and nb is not None and nb != num_blocks:
        raise ValueError(f"cache has num_blocks={nb}, expected num_blocks={num_blocks}")
    if require_contiguous:
        for name, a in arrays.items():
            if not (a.is_contiguous() if hasattr(a, "is_contiguous") else a.flags.c_contiguous):
                raise ValueError(f"{name} must be C-contiguous (use ascontiguousarray)")


def validate_contiguous_range(seq_start, seq_lens, block_size, num_blocks) -> None:
    """`contiguous` addressing reads blocks ``seq_start[s] + j``: every one must exist."""
    start = np.asarray(seq_start, dtype=np.int64)
    nb = -(-np.asarray(seq_lens, dtype=np.int64) // int(block_size))
    if start.shape != nb.shape:
        raise ValueError(f"seq_start has shape {start.shape}, seq_lens {nb.shape}: one per sequence")
    if (start < 0).any():
        raise ValueError(f"seq_start has a negative entry ({int(start.min())})")
    last = start + nb
    if last.size and int(last.max()) > int(num_blocks):
        s = int(last.argmax())
        raise ValueError(f"contiguous addressing: sequence {s} would read blocks {int(start[s])}.."
                         f"{int(last[s]) - 1} of a pool of {num_blocks} blocks (seq_start + logical "
                         "block out of range)")
