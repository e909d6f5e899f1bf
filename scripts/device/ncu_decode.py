"""One decode backend launched a few times on one shape, for Nsight Compute to profile (the
third launch, by `scripts/device/ncu_profiles.sh`). The first launch is checked against the
float64 reference on fresh random inputs with a poisoned output, so a profile is never of a
kernel that computes the wrong thing:

    python scripts/device/ncu_decode.py BATCH TOKENS HEADS KV_HEADS BACKEND [BLOCK] [LAUNCHES]

fp16, head 128, identity placement (the shapes of data/profiles/README.md)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) not in (5, 6, 7):
        print(__doc__, file=sys.stderr)
        return 2
    batch, tokens, heads, kv_heads = (int(x) for x in argv[:4])
    backend = argv[4]
    block = int(argv[5]) if len(argv) > 5 else 16
    launches = int(argv[6]) if len(argv) > 6 else 3
    if launches < 1:
        raise ValueError(f"LAUNCHES={launches}: need at least 1")

    from lib.engine.backends import DecodeCase, DecodeProblem, get_backend
    from lib.engine.measure import check_then_time

    problem = DecodeProblem(num_seqs=batch, num_heads=heads, num_kv_heads=kv_heads, head_size=128,
                            block_size=block, dtype="float16", seq_lens=(tokens,) * batch,
                            placement="identity", seed=0)
    b = get_backend(backend)
    reason = b.unavailable_reason()
    if reason:
        raise SystemExit(f"{backend} is unavailable here: {reason}")
    data = DecodeCase.build(problem)
    out = data.poisoned_output()
    step = b.prepare(data, out)
    check = check_then_time(step, out, data.reference(), dtype="float16", protocol=None)  # launch 1
    if not check["check_passed"]:
        raise SystemExit(f"{backend} failed its check (relative error {check['rel_error']:.3g})")
    for _ in range(launches - 1):
        step()
    import cupy
    cupy.cuda.runtime.deviceSynchronize()
    print(f"{backend} {batch}x{tokens} {heads}:{kv_heads} block {block}: checked "
          f"(relative error {check['rel_error']:.2g}), {launches} launches", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
