"""The v3 blocks of the correctness matrix alone (the grid's own `variant="v3"` sub-grids, so the
rows are points of the committed experiment): `python scripts/device/v3_correctness.py OUT_ROOT`."""

import dataclasses
import sys

from lib.chapters.kernel.experiment import CORRECTNESS
from lib.harness.experiments import check
from lib.harness.sweep import run_sweep


def main():
    grid = [g for g in CORRECTNESS.grid if g.get("variant") == ["v3"]]
    exp = check(dataclasses.replace(CORRECTNESS, grid=grid))
    print(f"{exp.size()} v3 points", flush=True)
    print(run_sweep(exp, {}, out_dir=sys.argv[1], workers_per_device=16, progress=False).line())


if __name__ == "__main__":  # sweep workers are spawned: they re-import this file
    main()
