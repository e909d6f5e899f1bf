"""Some sub-grids of the correctness matrix alone, as points of the committed experiment (so
their rows merge into its results): `python scripts/device/correctness_part.py OUT_ROOT KIND...`.

A sub-grid's kind is its `backends` entry (flashinfer, flex_paged, ...), else its `variant`
(v3), else `own` (our v1/v2 through the registry's own choice). 16 workers share the GPU (the
matrix is untimed)."""

import dataclasses
import sys

from lib.chapters.kernel.experiment import CORRECTNESS
from lib.harness.experiments import check
from lib.harness.sweep import run_sweep


def kind_of(subgrid: dict) -> str:
    if subgrid.get("backends"):
        return ",".join(subgrid["backends"])
    if subgrid.get("variant"):
        return ",".join(subgrid["variant"])
    return "own"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    root, kinds = argv[0], set(argv[1:])
    known = {kind_of(g) for g in CORRECTNESS.grid}
    if not kinds <= known:
        print(f"unknown kinds {sorted(kinds - known)}; the matrix has {sorted(known)}", file=sys.stderr)
        return 2
    grid = [g for g in CORRECTNESS.grid if kind_of(g) in kinds]
    exp = check(dataclasses.replace(CORRECTNESS, grid=grid))
    print(f"{exp.size()} points of {sorted(kinds)}", flush=True)
    print(run_sweep(exp, {}, out_dir=root, workers_per_device=16, progress=False).line())
    return 0


if __name__ == "__main__":  # sweep workers are spawned: they re-import this file
    sys.exit(main(sys.argv[1:]))
