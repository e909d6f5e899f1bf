"""Is a device-to-device copy slower as one CUDA-graph memcpy node than on a stream? (GPU only)

Prints, per size (MiB), the median time (us) of the copy as one graph node, as graph nodes of
256 MiB, as one stream memcpy, and as an elementwise copy kernel in a graph and on a stream, all
through lib.engine.timing. The harness's `MEMCPY_PIECE` rests on a run of its first version (the same
timings, written inline) on 2026-11-28 on an H100
(sizes 508, 512, 516, 1024, 1028 and 2048 MiB): one node was ~20% slower from 512 MiB on, except
at 508/516 MiB; split nodes and kernels matched the stream. Usage: python scripts/graph_copy_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1 << 20
SIZES_MIB = (508, 512, 516, 1024, 1028, 2048)


def probe(nbytes: int) -> dict[str, float]:
    import cupy as cp

    from lib.engine import timing as T

    T.check_free(2 * nbytes, "graph copy probe")
    src = cp.ones(nbytes // 4, dtype=cp.uint32)
    dst = cp.empty_like(src)
    try:
        one = lambda: T._memcpy_d2d(dst.data.ptr, src.data.ptr, nbytes, piece=None)  # noqa: E731
        split = lambda: T._memcpy_d2d(dst.data.ptr, src.data.ptr, nbytes, piece=256 * MiB)  # noqa: E731
        k = T._copy_kernel()
        kernel = lambda: k(src, dst)  # noqa: E731
        return {"graph_one_node": T.time_graph(one).median_us,
                "graph_256MiB_nodes": T.time_graph(split).median_us,
                "stream_one": T.time_graph(one, graph=False).median_us,
                "graph_kernel": T.time_graph(kernel).median_us,
                "stream_kernel": T.time_graph(kernel, graph=False).median_us}
    finally:
        del src, dst
        cp.get_default_memory_pool().free_all_blocks()


def main() -> int:
    for mib in SIZES_MIB:
        r = probe(mib * MiB)
        print(mib, "MiB", {k: round(v, 1) for k, v in r.items()}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
