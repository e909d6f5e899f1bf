"""Development probe: launch one backend at one shape a few times, eagerly, for Nsight Compute
(`ncu --clock-control none ... python scripts/device/ncu_one.py BACKEND B N H KV`); checks the
output against the reference first."""

import sys

from lib.engine import backends as B
from lib.engine.measure import problem_of, reference_for, _sync


def main() -> None:
    name, b, n, h, kv = sys.argv[1], *map(int, sys.argv[2:6])
    point = dict(batch_size=b, seq_len=n, num_heads=h, num_kv_heads=kv, head_size=128,
                 block_size=int(sys.argv[6]) if len(sys.argv) > 6 else 16, dtype="float16")
    case = B.DecodeCase.build(problem_of(point))
    backend = B.get_backend(name)
    out = case.poisoned_output()
    launch = backend.prepare(case, out)
    for _ in range(3):
        launch()
    _sync(out)
    ref = reference_for(case, backend.addressing or "paged", {})
    import numpy as np
    got = np.asarray(out.get() if hasattr(out, "get") else out.cpu().numpy(), dtype=np.float64)
    want = np.asarray(ref.get() if hasattr(ref, "get") else ref, dtype=np.float64)
    print(name, "max abs err", float(np.nanmax(np.abs(got - want))), "nan", int(np.isnan(got).sum()))


if __name__ == "__main__":
    main()
