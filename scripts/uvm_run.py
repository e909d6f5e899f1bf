#!/usr/bin/env python3
"""Run every measurement of the chapter "Unified Memory in practice" on this machine's GPU.

    python scripts/uvm_run.py --out data/results            # everything (a few minutes on an H100)
    python scripts/uvm_run.py --out /tmp/uvm --quick        # smoke run: the two smallest sizes
    python scripts/uvm_run.py --out data/results --only gpu_read,transfer
    python scripts/uvm_run.py --list [--quick]              # the points, no GPU needed

Rows go to ``<out>/uvm/<gpu-slug>.csv`` (the study's results schema, appended point by point, so an
interrupted run resumes where it stopped; ``--force`` measures everything again), provenance to
``<out>/uvm/<gpu-slug>.json`` under the run's id. Needs CuPy, NumPy and pandas (nvidia-ml-py for
clocks in the provenance); not cuda-python, torch or Jupyter. Quick runs are best written to a
scratch directory: their 64 and 256 MiB granularity points are not part of the full grid.

Exit status: 0 when every point succeeded, 1 when some point failed (its error is in the CSV and
the next run retries it), 2 when no GPU is visible or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _report(out: str, slug: str) -> None:
    """The numbers worth quoting: fault-driven migration and prefetch against the PCIe copy."""
    from lib import uvm_bench as U

    df = U.load(out)
    if df is None:
        return
    h = U.headline(df, slug)
    lines = [
        ("GPU read, device memory", "read_device"),
        ("GPU read, managed prefetched to GPU", "read_managed_gpu"),
        ("GPU read, managed on host, fault-driven (CPU-written)", "read_fault_touched"),
        ("GPU read, managed on host, fault-driven (prefetched there)", "read_fault_prefetched"),
        ("prefetch to GPU, then read", "read_prefetch_then_read"),
        ("GPU read, pinned zero-copy", "read_pinned"),
        ("cudaMemPrefetchAsync host -> GPU", "prefetch_h2d"),
        ("cudaMemPrefetchAsync GPU -> host", "prefetch_d2h"),
        ("cudaMemcpy pinned host -> GPU", "pinned_h2d"),
        ("cudaMemcpy GPU -> pinned host", "pinned_d2h"),
        ("CPU read of GPU-written managed memory", "cpu_after_gpu_write"),
    ]
    print(f"\nkey numbers on {slug} (GB/s, at the largest size measured):")
    for label, key in lines:
        v = h.get(key, float("nan"))
        print(f"  {label:<58} {v:10.1f}" if v == v else f"  {label:<58} {'-':>10}")
    checks = df[(df["gpu_slug"] == slug) & (df["check_passed"] == False)]  # noqa: E712
    if len(checks):
        print(f"WARNING: {len(checks)} row(s) failed their data check:\n"
              + checks[["point_key", "backend", "memory_kind"]].to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="results root: rows go to OUT/uvm/<gpu-slug>.csv")
    ap.add_argument("--quick", action="store_true", help="only the two smallest sizes (64 and 256 MiB)")
    ap.add_argument("--only", default="", help="comma-separated: gpu_read,cpu_read,granularity,transfer")
    ap.add_argument("--force", action="store_true", help="measure points again even if already in the CSV")
    ap.add_argument("--device", type=int, default=None, help="CUDA device number (default: the current one)")
    ap.add_argument("--list", action="store_true", help="print the points and exit")
    args = ap.parse_args(argv)

    from lib import experiments as E
    from lib import uvm_bench as U

    only = [m.strip() for m in args.only.split(",") if m.strip()] or None
    try:
        pts = U.points(args.quick, only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for p in pts:
            print(E.point_key(p))
        print(f"{len(pts)} points", file=sys.stderr)
        return 0
    if not args.out:
        print("error: --out DIR is required (e.g. --out data/results)", file=sys.stderr)
        return 2

    from lib.gpu import gpu_available

    if not gpu_available():
        print("error: no CUDA GPU visible (CuPy finds none); these measurements need one", file=sys.stderr)
        return 2
    import cupy

    if args.device is not None:
        cupy.cuda.Device(args.device).use()
    t0 = time.perf_counter()
    res = U.run(args.out, quick=args.quick, only=only, force=args.force, progress=True)
    print(f"\n{res['points']} points measured ({res['rows']} rows, {res['errors']} errors), "
          f"{res['skipped_done']} already done, in {time.perf_counter() - t0:.0f} s -> {res['csv']} "
          f"(run {res['run_id']})")
    _report(args.out, res["gpu_slug"])
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
