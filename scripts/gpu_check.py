"""Run the correctness matrix on this GPU (or a quick subset) and write rows as CSV.

    python scripts/gpu_check.py --quick --out $OUT/correctness.csv
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from lib.chapters.kernel import correctness  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=12)
    a = ap.parse_args()
    kw = dict(dtypes=("float16",), block_sizes=(1, 16, 256), head_sizes=(80, 128)) if a.quick else {}
    cases = list(correctness.matrix_cases(**kw))
    print(f"{len(cases)} cases; precompiling...", flush=True)
    print(f"compiled in {correctness.precompile(cases, a.workers):.1f} s", flush=True)
    rows, t0 = [], time.perf_counter()
    for i, c in enumerate(cases):
        rows += correctness.run_case(c, seed=1000 + i)
        if i % 50 == 0:
            print(f"{i}/{len(cases)} {time.perf_counter()-t0:.0f}s", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(a.out, index=False)
    print(df.groupby("backend").agg(passed=("passed", "sum"), total=("passed", "size"),
                                    worst=("rel_error", "max")))
    bad = df[~df.passed]
    print(bad[["dtype", "block_size", "head_size", "heads", "placement", "backend", "rel_error",
               "bit_identical", "error"]].head(40).to_string())


if __name__ == "__main__":
    main()
