"""What one decode step computes (`DecodeProblem`) and its data on the GPU (`DecodeCase`)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np

from lib.engine import kvcache
from lib.engine import validation


@dataclass(frozen=True)
class DecodeProblem:
    """What one decode step computes; validated on construction (pure Python, no GPU)."""

    num_seqs: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: str
    seq_lens: tuple[int, ...]
    placement: str = "identity"
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "seq_lens", tuple(int(n) for n in self.seq_lens))
        validation.validate_decode_problem(
            num_seqs=self.num_seqs, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_size=self.head_size, block_size=self.block_size, dtype=self.dtype,
            seq_lens=np.asarray(self.seq_lens, dtype=np.int64))
        if self.placement not in kvcache.PLACEMENTS + ("random",):
            raise ValueError(f"placement={self.placement!r}: choose one of "
                             f"{', '.join(kvcache.PLACEMENTS + ('random',))}")

    @classmethod
    def uniform(cls, batch: int, seq_len: int, **kw) -> "DecodeProblem":
        return cls(num_seqs=batch, seq_lens=(seq_len,) * batch, **kw)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens)

    @property
    def itemsize(self) -> int:
        return kvcache.itemsize(self.dtype)

    @property
    def bytes_moved(self) -> int:
        return kvcache.decode_bytes(self.seq_lens, self.num_heads, self.num_kv_heads,
                                    self.head_size, self.dtype)


def _default_alloc(shape, dtype):
    import cupy

    return cupy.empty(shape, dtype=dtype)


@dataclass
class DecodeCase:
    """A problem's data on the GPU: q and the K/V pools, plus layouts derived on demand.

    `alloc(shape, dtype)` makes every cache array (pools and layouts), so the KV cache can live in
    managed or pinned memory; q, tables and outputs use device memory.

    The case keeps a digest of its tables as they were when it was made: its derived layouts and
    reference were built from them, and a kernel launched with an edited table reads whatever
    the new entries point at. :meth:`verify_tables` (run by every backend's ``prepare``) raises a
    clear error before any launch when the host tables changed or a device copy differs.
    """

    problem: DecodeProblem
    q: object
    kpool: object
    vpool: object
    tables: kvcache.BlockTables
    alloc: Callable = _default_alloc
    _layouts: dict = field(default_factory=dict, repr=False)
    _tables_digest: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self):
        self._tables_digest = self.tables_digest()

    @classmethod
    def build(cls, problem: DecodeProblem, *, alloc: Callable = _default_alloc,
              physical_blocks: int | None = None) -> "DecodeCase":
        import cupy

        rng = np.random.default_rng(problem.seed)
        p = problem
        if p.placement == "random":
            if not physical_blocks:
                raise ValueError("placement='random' (seed protocol) needs physical_blocks")
            tables = kvcache.make_random_block_tables(p.seq_lens, p.block_size, physical_blocks, rng)
        else:
            tables = kvcache.make_block_tables(p.seq_lens, p.block_size, p.placement, rng)
        validation.validate_decode_problem(
            num_seqs=p.num_seqs, num_heads=p.num_heads, num_kv_heads=p.num_kv_heads,
            head_size=p.head_size, block_size=p.block_size, dtype=p.dtype,
            seq_lens=np.asarray(p.seq_lens), tables=tables)
        q = kvcache.random_array((p.num_seqs, p.num_heads, p.head_size), p.dtype, rng, xp=cupy)
        pools = []
        for _ in ("k", "v"):
            pool = alloc((tables.num_blocks, p.block_size, p.num_kv_heads, p.head_size),
                         kvcache.storage_dtype(p.dtype, cupy))
            # single_content: one random block broadcast into every block of the pool.
            fill = 1 if p.placement == "single_content" else tables.num_blocks
            pool[...] = kvcache.random_pool(fill, p.block_size, p.num_kv_heads, p.head_size,
                                            p.dtype, rng, xp=cupy)
            pools.append(pool)
        return cls(p, q, pools[0], pools[1], tables, alloc)

    # -- table integrity -------------------------------------------------------------------
    def _host_metadata(self) -> dict[str, np.ndarray]:
        """The host arrays the device copies mirror: tables, seq_start, seq_lens."""
        return {"device_tables": np.asarray(self.tables.tables),
                "device_seq_start": np.asarray(self.tables.seq_start),
                "device_seq_lens": np.asarray(self.problem.seq_lens, dtype=np.int32)}

    def tables_digest(self) -> str:
        """SHA-256 of the tables as they are now (entries, dtypes, shapes, pool size, lengths)."""
        h = hashlib.sha256(f"num_blocks={self.tables.num_blocks};".encode())
        for name, a in self._host_metadata().items():
            a = np.ascontiguousarray(a)
            h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def verify_tables(self) -> None:
        """Raise ValueError unless the tables are the ones this case was made with, fit its pools,
        and every device copy made so far still equals its host table (checked on the host)."""
        if self.tables_digest() != self._tables_digest:
            raise ValueError(
                "the block tables of this DecodeCase changed after it was built: its layouts and "
                "reference belong to the old tables, and a kernel would read whatever the new "
                "entries point at. Build a new case (DecodeCase.build or DecodeCase(...)) with the "
                "new tables instead of editing case.tables")
        p = self.problem
        validation.validate_decode_problem(
            num_seqs=p.num_seqs, num_heads=p.num_heads, num_kv_heads=p.num_kv_heads,
            head_size=p.head_size, block_size=p.block_size, dtype=p.dtype,
            seq_lens=np.asarray(p.seq_lens), tables=self.tables.tables,
            num_blocks=min(int(self.tables.num_blocks), int(self.kpool.shape[0])))
        for name, host in self._host_metadata().items():
            dev = self.__dict__.get(name)  # only the copies made so far (cached properties)
            if dev is None:
                continue
            have = validation._host(dev)
            if have.shape != host.shape or not np.array_equal(have, host):
                raise ValueError(
                    f"case.{name} on the GPU no longer equals the case's host table (changed on "
                    "the device after the case was built): refusing to launch with it; build a "
                    "new case")

    # -- device-side metadata --------------------------------------------------------------
    @cached_property
    def device_tables(self):
        import cupy

        return cupy.asarray(self.tables.tables)

    @cached_property
    def device_seq_start(self):
        import cupy

        return cupy.asarray(self.tables.seq_start)

    @cached_property
    def device_seq_lens(self):
        import cupy

        return cupy.asarray(np.asarray(self.problem.seq_lens, dtype=np.int32))

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.problem.head_size)

    # -- layouts ---------------------------------------------------------------------------
    def _copy_into_alloc(self, a):
        out = self.alloc(a.shape, a.dtype)
        out[...] = a
        return out

    def layout(self, name: str):
        """(k, v) in layout `classic`, `vllm` (the pool itself) or `dense`; built once."""
        import cupy

        if name not in self._layouts:
            if name == "vllm":
                self._layouts[name] = kvcache.to_vllm(self.kpool, self.vpool)
            elif name == "classic":
                k, v = kvcache.to_classic(self.kpool, self.vpool, xp=cupy)
                self._layouts[name] = (self._copy_into_alloc(k), self._copy_into_alloc(v))
            elif name == "dense":
                k, v = kvcache.to_dense(self.kpool, self.vpool, self.tables, self.problem.seq_lens,
                                        xp=cupy)
                self._layouts[name] = (self._copy_into_alloc(k), self._copy_into_alloc(v))
            else:
                raise ValueError(f"layout={name!r}: choose classic, vllm or dense")
        return self._layouts[name]

    def poisoned_output(self):
        """A fresh output buffer filled with NaN: an unwritten element can never pass a check."""
        import cupy

        p = self.problem
        out = cupy.empty((p.num_seqs, p.num_heads, p.head_size), kvcache.storage_dtype(p.dtype, cupy))
        kvcache.poison(out)
        return out

    def reference(self):
        """Float64 reference output on the GPU (cached)."""
        import cupy

        if "_ref" not in self._layouts:
            from lib.engine.reference import decode_attention_reference

            self._layouts["_ref"] = decode_attention_reference(
                self.q, self.kpool, self.vpool, self.tables, self.problem.seq_lens,
                scale=self.scale, dtype_name=self.problem.dtype, xp=cupy)
        return self._layouts["_ref"]
