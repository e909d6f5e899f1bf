"""Development probe (not committed data): v3 compiled with several sets of tuning defines (the
source's UPA_* knobs, e.g. UPA_MMA_MIN_BLOCKS) timed beside SDPA and v1/v2 at a few kernel_speed
shapes, each point checked against the reference in the same run. One set per process, since
NVRTC options are per process:

    python scripts/device/v3_variants.py OUT_DIR "base=" "LABEL=-DUPA_MMA_MIN_BLOCKS=2" ...

(2026-12-02 it compared, as temporary knobs since removed, table reads one and two steps ahead,
cp.async staging and early value loads; the two-step read is now the kernel. 2026-12-03, at
commit 7bb9d12, it timed a per-warp cp.async ring with 2, 3 and 4 stages, UPA_MMA_STAGES, which
that commit's source and plan read: data/probes/v3_ring/, not kept.)

Each variant writes OUT_DIR/variants.jsonl rows (label, defines, shape, backend, median_us,
check_passed, plan); a summary table is printed at the end."""

import json
import os
import subprocess
import sys

SHAPES = [(8, 4096, 64, 8), (32, 4096, 64, 8), (128, 4096, 64, 8), (32, 4096, 32, 8),
          (1, 4096, 64, 8), (1, 32768, 32, 8), (1, 4096, 32, 1), (32, 4096, 32, 1),
          (128, 4096, 32, 1), (32, 4096, 32, 32)]
BASE = dict(head_size=128, block_size=16, dtype="float16", placement="identity",
            memory_kind="device", protocol="rigorous", seed=0)


def child(out_dir: str, label: str, backends: str, extra: list) -> None:
    from lib.engine.measure import measure_decode, precompile_points

    points = [dict(BASE, batch_size=b, seq_len=n, num_heads=h, num_kv_heads=kv, backends=backends)
              for b, n, h, kv in SHAPES]
    points += extra
    precompile_points(points)
    with open(os.path.join(out_dir, "variants.jsonl"), "a") as f:
        for p in points:
            for r in measure_decode(p):
                r.update(label=label, defines=os.environ.get("UVM_STUDY_KERNEL_DEFINES", ""),
                         shape=f"{p['batch_size']}x{p['seq_len']} {p['num_heads']}:{p['num_kv_heads']}",
                         partition_size=p.get("partition_size", 0))
                f.write(json.dumps(r, default=str) + "\n")
                print(f"{label:<10} {r['shape']:<16} {r['backend']:<18} "
                      f"{r.get('median_us', float('nan')):9.2f} us ok={r.get('check_passed')} "
                      f"{r.get('extra', {}).get('plan', '')} {str(r.get('error', ''))[:300]}",
                      flush=True)


def main() -> None:
    out_dir, specs = sys.argv[1], sys.argv[2:]
    os.makedirs(out_dir, exist_ok=True)
    if os.environ.get("V3_CHILD"):
        label = os.environ["V3_CHILD"]
        extra = json.loads(os.environ.get("V3_EXTRA", "[]"))
        child(out_dir, label, os.environ["V3_BACKENDS"], extra)
        return
    for i, spec in enumerate(specs):
        label, _, defines = spec.partition("=")
        backs = "own-v3-paged+own-v3-contiguous"
        if i == 0:
            backs += "+sdpa_dense+own-v1-paged+own-v2-paged"
        env = dict(os.environ, V3_CHILD=label, V3_BACKENDS=backs, UVM_STUDY_KERNEL_DEFINES=defines)
        subprocess.run([sys.executable, __file__, out_dir], env=env, check=False)
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "variants.jsonl"))]
    import pandas as pd
    d = pd.DataFrame(rows)
    d["col"] = d["label"] + ":" + d["backend"]
    print(d.pivot_table(index="shape", columns="col", values="median_us", aggfunc="first")
          .round(1).to_string())
    bad = d[d["check_passed"] != True]  # noqa: E712
    print(f"{len(d) - len(bad)}/{len(d)} rows checked and passed")


if __name__ == "__main__":
    main()
