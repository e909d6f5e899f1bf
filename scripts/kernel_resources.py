#!/usr/bin/env python3
"""Write the per-instantiation resource table of our decode kernels (no GPU needed).

    python scripts/kernel_resources.py [--archs sm_80 sm_90] [--jobs N] [--out data/kernels]

Compiles every kernel the registry can launch with nvcc at full optimisation (what NVRTC gives
at run time) and writes `resources.csv` (one row per arch x kernel: registers, stack, spills,
shared memory) and `resources.json` (provenance: nvcc, git commit, source hash, command, time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.engine.kernels import resources as kr  # noqa: E402
from lib.engine import kernels  # noqa: E402


def git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=list(kr.ARCHS), help="e.g. sm_80 sm_90")
    ap.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (all cores)")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "kernels",
                    help="folder for resources.csv and resources.json")
    args = ap.parse_args(argv)

    nvcc = kr.nvcc_path()
    if nvcc is None:
        print("nvcc not found: set CUDA_HOME or put nvcc on PATH", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    df = kr.compile_all(args.archs, args.jobs, nvcc=nvcc)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "resources.csv", index=False)
    rel = kernels.SOURCE.relative_to(ROOT).as_posix()
    committed = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True)
    matches = (hashlib.sha256(committed.stdout).hexdigest() == df.attrs["source_sha256"]
               if committed.returncode == 0 else None)
    prov = {
        "what": "ptxas -v resources of every decode/reduce kernel instantiation the registry "
                "can launch (lib.engine.kernels.all_modules x addressing modes)",
        "command": "python " + " ".join(shlex.quote(a) for a in [
            os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)]),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "kernel_source_is_committed": matches,  # compiled source == the file at git_commit
        "kernel_source_sha256": df.attrs["source_sha256"],
        "nvcc": kr.nvcc_version(nvcc),
        "nvcc_flags": ["-cubin", "-arch=<arch>", "-Xptxas", "-v", *kr.nvcc_flags()],
        "archs": list(args.archs),
        "rows": len(df),
        "kernels_per_arch": len(kr.expected()),
        "dynamic_smem_assumes": {
            "decode": f"v2 launch, {kr.PARTITION_TOKENS}-token partitions "
                      "(lib.engine.kernels.smem_bytes(tile, head_size, partition))",
            "reduce": f"{kr.REDUCE_SEQ_TOKENS}-token sequences, {kr.PARTITION_TOKENS}-token "
                      "partitions (4 * (partitions + warps))",
        },
        "compile_seconds": round(seconds, 1),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
    }
    (args.out / "resources.json").write_text(json.dumps(prov, indent=2) + "\n")
    worst = df.sort_values(["spill_stores", "registers"], ascending=False).head(3)
    print(f"{len(df)} rows in {seconds:.0f} s -> {args.out / 'resources.csv'}")
    print(f"threads per block {kernels.NUM_THREADS}; most spilling:\n{worst.to_string(index=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
