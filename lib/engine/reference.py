"""The float64 reference every decode kernel is checked against, and the tolerance it allows.

``out[s, h] = softmax(scale * K_s q[s, h]) V_s``, query head h reading KV head
``h // (num_heads // num_kv_heads)``. Inputs are decoded to float64 first, so a kernel is compared
with the exact attention of the *stored* values.

The reference reads the pool on its own, token by token (:func:`token_rows`: token ``t`` of
sequence ``s`` is row ``t % block_size`` of block ``tables[s, t // block_size]``), and shares no
code with the layouts the backends are fed (:func:`lib.engine.kvcache.gather_sequence`,
``to_dense``, ``to_classic``): a bug in the path that builds dense SDPA's input cannot also be in
the answer SDPA is checked against.
"""

from __future__ import annotations

import math

import numpy as np

from lib.engine.kvcache import as_float64, infer_dtype_name

#: Largest relative error (:func:`relative_error`) a kernel's output may have, per storage dtype.
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5}


def _dtype_for(arr, dtype_name):
    return dtype_name if dtype_name is not None else infer_dtype_name(arr)


def _table(tables) -> np.ndarray:
    """The bare int table of a BlockTables or an array (host NumPy; small)."""
    t = getattr(tables, "tables", tables)
    if hasattr(t, "get") and not isinstance(t, np.ndarray):  # CuPy
        t = t.get()
    return np.asarray(t)


def token_rows(pool, table: np.ndarray, seq_len: int, s: int, *, xp=np):
    """Sequence ``s``'s K or V rows ``[seq_len, KVH, D]``, addressed one token at a time: token t
    is row ``t % BS`` of physical block ``table[s, t // BS]`` (independent of kvcache's gather)."""
    bs = int(pool.shape[1])
    t = np.arange(int(seq_len), dtype=np.int64)
    logical = t // bs
    if seq_len and int(logical[-1]) >= table.shape[1]:
        raise ValueError(f"sequence {s} of length {seq_len} needs {int(logical[-1]) + 1} blocks; "
                         f"its table has {table.shape[1]}")
    blocks = table[s, logical].astype(np.int64)
    if blocks.size and (blocks.min() < 0 or blocks.max() >= pool.shape[0]):
        raise ValueError(f"sequence {s}: block table entries outside the pool of {pool.shape[0]} blocks")
    return pool[xp.asarray(blocks), xp.asarray(t % bs)]


def decode_attention_reference(q, kpool, vpool, tables, seq_lens, *, scale=None,
                               dtype_name=None, xp=np):
    """Reference decode attention over a paged cache (pools ``[NB, BS, KVH, D]``), float64
    ``[num_seqs, num_heads, head_size]``; softmax subtracts the row max, so scores cannot overflow."""
    num_seqs, num_heads, head_size = q.shape
    num_kv_heads = kpool.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if kpool.shape[3] != head_size or tuple(vpool.shape) != tuple(kpool.shape):
        raise ValueError(f"q {tuple(q.shape)}, kpool {tuple(kpool.shape)} and vpool "
                         f"{tuple(vpool.shape)} disagree on head_size or pool shape")
    lens = np.asarray(seq_lens, dtype=np.int64)
    if lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens shape {lens.shape} != (num_seqs,) = ({num_seqs},)")
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_size) if scale is None else float(scale)

    qf = as_float64(q, _dtype_for(q, dtype_name), xp=xp).reshape(num_seqs, num_kv_heads, group, head_size)
    kname, vname = _dtype_for(kpool, dtype_name), _dtype_for(vpool, dtype_name)
    table = _table(tables)
    out = xp.empty((num_seqs, num_kv_heads, group, head_size), dtype=xp.float64)
    for s, n in enumerate(lens.tolist()):
        k = as_float64(token_rows(kpool, table, n, s, xp=xp), kname, xp=xp)  # [n, KVH, D]
        v = as_float64(token_rows(vpool, table, n, s, xp=xp), vname, xp=xp)
        scores = xp.einsum("kgd,nkd->kgn", qf[s], k) * scale
        p = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
        p = p / xp.sum(p, axis=-1, keepdims=True)
        out[s] = xp.einsum("kgn,nkd->kgd", p, v)
    return out.reshape(num_seqs, num_heads, head_size)


def dense_attention(q, k_list, v_list, *, scale=None):
    """Textbook attention, head by head, for tests: independent of the paged machinery.
    k_list[s], v_list[s]: ``[len_s, KVH, D]``."""
    q = np.asarray(q, dtype=np.float64)
    num_seqs, num_heads, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = np.zeros((num_seqs, num_heads, d))
    for s in range(num_seqs):
        k = np.asarray(k_list[s], dtype=np.float64)
        v = np.asarray(v_list[s], dtype=np.float64)
        num_kv_heads = k.shape[1]
        for h in range(num_heads):
            kv = h * num_kv_heads // num_heads  # = h // group
            weights = np.array([math.exp(scale * float(np.dot(q[s, h], k[t, kv])))
                                for t in range(k.shape[0])])
            weights /= weights.sum()
            for t in range(k.shape[0]):
                out[s, h] += weights[t] * v[t, kv]
    return out


def _to_host_float64(a, dtype_name):
    if hasattr(a, "detach"):  # torch, any dtype including bfloat16
        return a.detach().double().cpu().numpy()
    host = a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)  # CuPy
    return as_float64(host, dtype_name)


def relative_error(out, ref, *, dtype_name=None) -> float:
    """||out - ref|| / ||ref|| (Frobenius, float64); NumPy, CuPy or torch, any storage dtype. NaN or
    infinity anywhere gives ``inf``: a poisoned or unwritten output never passes."""
    o = _to_host_float64(out, dtype_name)
    r = _to_host_float64(ref, None)
    if o.shape != r.shape:
        raise ValueError(f"out shape {o.shape} != ref shape {r.shape}")
    if not (np.isfinite(o).all() and np.isfinite(r).all()):
        return math.inf
    diff = float(np.linalg.norm(o - r))
    norm = float(np.linalg.norm(r))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm
