"""A quick probe of v3 (the matrix-unit kernel) on a GPU node: correctness on a slice of the
matrix, then decode times beside v2, vLLM and SDPA, and v3 at several partition sizes. Writes
JSON lines under $OUT (or argv[1]); a development probe, not committed data."""

import itertools
import json
import os
import sys
import time

from lib.chapters.kernel.correctness import MatrixCase, precompile, ragged_lengths, run_case
from lib.engine.measure import measure_decode, precompile_points

def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "/tmp")
    os.makedirs(out_dir, exist_ok=True)
    mode = os.environ.get("PROBE", "all")


    def dump(name, rows):
        with open(os.path.join(out_dir, name), "a") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")


    if mode in ("all", "check"):
        cases = [MatrixCase(dt, bs, d, h, pl, ragged_lengths(bs), "v3")
                 for dt, bs, d, h, pl in itertools.product(
                     ("float16", "bfloat16"), (1, 2, 4, 16, 64, 256), (64, 80, 128, 256),
                     ("MHA", "GQA6", "GQA8", "MQA32"), ("identity", "shuffled", "single_content"))]
        cases += [MatrixCase("float16", bs, 128, h, "shuffled", (65536, 3001), "v3")
                  for bs in (1, 16) for h in ("GQA8", "MQA32")]
        t0 = time.time()
        print(f"compiling: {precompile(cases):.0f} s", flush=True)
        fails = total = 0
        for i, c in enumerate(cases):
            rows = run_case(c, seed=1000 + i)
            for r in rows:
                total += 1
                if not r["passed"]:
                    fails += 1
                    if fails <= 15:
                        print("FAIL", c, r["backend"], r["rel_error"], r["bit_identical"], r["error"][:300], flush=True)
            dump("check.jsonl", rows)
        print(f"correctness: {total - fails}/{total} passed in {time.time() - t0:.0f} s", flush=True)

    if mode in ("all", "speed"):
        base = dict(head_size=128, block_size=16, dtype="float16", placement="identity",
                    memory_kind="device", protocol="rigorous", seed=0)
        shapes = [(8, 4096, 64, 8), (32, 4096, 64, 8), (128, 4096, 64, 8), (32, 4096, 32, 8),
                  (1, 4096, 32, 8), (1, 32768, 32, 8), (1, 4096, 32, 1), (32, 4096, 32, 1),
                  (128, 4096, 32, 1), (8, 4096, 40, 8), (32, 4096, 32, 32), (1, 4096, 32, 32)]
        backs = os.environ.get("PROBE_BACKENDS", "own-v3-paged+own-v3-contiguous+own-v2-paged+vllm+sdpa_dense")
        points = [dict(base, batch_size=b, seq_len=n, num_heads=h, num_kv_heads=kv, backends=backs)
                  for b, n, h, kv in shapes]
        part_sizes = [int(x) for x in os.environ.get("PROBE_PARTS", "128,256,512,1024").split(",")]
        parts = [dict(base, batch_size=b, seq_len=n, num_heads=h, num_kv_heads=kv,
                      backends="own-v3-paged", partition_size=ps)
                 for b, n, h, kv in [(1, 4096, 64, 8), (8, 4096, 64, 8), (1, 32768, 32, 8),
                                     (1, 4096, 32, 1), (8, 4096, 32, 1)]
                 for ps in part_sizes]
        precompile_points(points)
        for p in points + parts:
            rows = measure_decode(p)
            for r in rows:
                r.update({k: p[k] for k in ("batch_size", "seq_len", "num_heads", "num_kv_heads")},
                         partition_size=p.get("partition_size", 0))
                bw = r["bytes_moved"] / (r["median_us"] * 1e3) if r.get("median_us") else None
                print(f"{p['batch_size']:>4} x {p['seq_len']:>5} {p['num_heads']}:{p['num_kv_heads']} "
                      f"{r['backend']:<18} part={p.get('partition_size', 0):<5} "
                      f"{r.get('median_us', float('nan')):9.1f} us  {bw or 0:7.0f} GB/s  "
                      f"ok={r.get('check_passed')} {r.get('extra', {}).get('plan', '')} {r.get('error', '')[:200]}",
                      flush=True)
            dump("speed.jsonl", rows)


if __name__ == "__main__":  # the compile pool spawns processes that re-import this file
    main()
