#!/usr/bin/env bash
# FlashInfer on a bare GPU node, offline: the kernel-only install (.flashinfer-kernel/, carried),
# its JIT kernels built in parallel, the backend through the correctness harness, a kernel_speed
# against dense SDPA, and a trace of what the decode used (checked against the install's manifest).
# Installs nothing. Run from the repository root; everything it writes goes under $OUT:
#
#   OUT=/tmp/fi bash scripts/device/flashinfer_check.sh
#
# Knobs (environment): PYTHON (python3), FI_DTYPES (float16,bfloat16), FI_HEAD_SIZES (64,128,256),
# FI_BLOCK_SIZES (1,2,4,8,16,32,64,128,256), FI_HEADS (head layouts of the correctness matrix;
# default those of MHA,GQA2,GQA4,GQA6,GQA8,MQA,MQA32 it knows), FI_WORKERS (8 sweep processes),
# FI_SPEED (1: run kernel_speed), MAX_JOBS (3 nvcc per FlashInfer build; 6 builds run at once).
# The JIT cache goes to $FLASHINFER_WORKSPACE_BASE, default <repo>/.flashinfer-cache: an ignored
# build output, so a warm node keeps it between calls and the build step then takes seconds.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT to a folder for the results}"
PY="${PYTHON:-python3}"
export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-$PWD/.flashinfer-cache}"
export MAX_JOBS="${MAX_JOBS:-3}"
export PYTHONUNBUFFERED=1
DTYPES="${FI_DTYPES:-float16,bfloat16}"
HEADS_D="${FI_HEAD_SIZES:-64,128,256}"
mkdir -p "$OUT/build" "$OUT/results"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
fail=0

stamp "preflight"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja: NOT FOUND (FlashInfer's JIT needs it)"
"$PY" - <<'EOF'
import importlib.util, json, sys
from lib.engine.backends import flashinfer as F
print("python", sys.version.split()[0])
st = F.flashinfer_status(deep=True)
print("flashinfer status", json.dumps(st))
try:
    m = F.read_manifest(st["path"]) if st["source"] == "kernel-only" else {}
except Exception:
    m = {}
print("install", {k: m.get(k) for k in ("flashinfer_version", "tvm_ffi_version", "python_tag", "total_bytes")})
need = ["torch", "cupy", "numpy", "pandas", "tqdm"] + [d.replace("-", "_") for d in m.get("probe", {}).get("third_party", [])]
missing = [n for n in need if importlib.util.find_spec(n) is None]
print("missing python packages:", ", ".join(missing) or "none")
sys.exit(0 if st["available"] else 3)
EOF
if [ $? -ne 0 ]; then echo "FlashInfer is unavailable here: see the status above"; exit 3; fi

stamp "JIT build: one process per dtype x head size (MAX_JOBS=$MAX_JOBS nvcc each)"
pids=()
for dt in ${DTYPES//,/ }; do
  for hd in ${HEADS_D//,/ }; do
    "$PY" -m lib flashinfer-kernel --trace "$OUT/build/trace-$dt-$hd.json" --dtypes "$dt" --head-dims "$hd" \
      > "$OUT/build/build-$dt-$hd.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
tail -n 1 "$OUT"/build/build-*.log
[ $fail -eq 0 ] || echo "some builds failed: see $OUT/build/*.log"

stamp "correctness (the project's matrix harness, backend flashinfer)"
cat > "$OUT/fi_correctness.py" <<'EOF'
import dataclasses, os, sys
from lib.chapters.kernel import correctness as C
from lib.chapters.kernel.experiment import CORRECTNESS
from lib.harness.experiments import check
from lib.harness.sweep import run_sweep


def main():

    env = lambda k, d: [v for v in os.environ.get(k, d).split(",") if v]
    heads = [h for h in env("FI_HEADS", "MHA,GQA2,GQA4,GQA6,GQA8,MQA,MQA32") if h in C.HEAD_LAYOUTS]
    grid = [
        {"dtype": env("FI_DTYPES", "float16,bfloat16"),
         "block_size": [int(b) for b in env("FI_BLOCK_SIZES", "1,2,4,8,16,32,64,128,256")],
         "head_size": [int(h) for h in env("FI_HEAD_SIZES", "64,128,256")], "heads": heads,
         "placement": ["identity", "shuffled"], "lengths": ["ragged"], "backends": ["flashinfer"]},
        {"dtype": ["float16"], "block_size": [16, 256], "head_size": [128],
         "heads": [h for h in ("MHA", "GQA4") if h in heads], "placement": ["shuffled"],
         "lengths": ["long"], "backends": ["flashinfer"]},
    ]
    # Only the `backends` sub-grid: `sweep correctness -p backends=flashinfer` would also run the
    # matrix's other sub-grids (no `backends` key there) with their own backends.
    exp = check(dataclasses.replace(CORRECTNESS, grid=grid, prepare=None))
    print(f"{exp.size()} points, heads {heads}")
    s = run_sweep(exp, {}, out_dir=sys.argv[1], workers_per_device=int(os.environ.get("FI_WORKERS", "8")),
                  progress=False)
    print(s.line())


if __name__ == "__main__":  # sweep workers are spawned: they re-import this file
    main()
EOF
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$OUT/fi_correctness.py" "$OUT/results"
[ $? -eq 0 ] || fail=1

if [ "${FI_SPEED:-1}" = "1" ]; then
  stamp "kernel_speed: flashinfer vs sdpa_dense at the experiment's shapes"
  "$PY" -m lib sweep kernel_speed -p backends=flashinfer+sdpa_dense --out "$OUT/results" --no-progress || fail=1
  stamp "kernel_speed: the seed's 64:8 at 8, 32, 128 x 4096"
  "$PY" -m lib sweep kernel_speed -p backends=flashinfer+sdpa_dense -p num_heads=64 -p num_kv_heads=8 \
    -p batch_size=8,32,128 -p seq_len=4096 --out "$OUT/results" --no-progress || fail=1
fi

stamp "trace: what the decode used (every cached JIT module's headers) vs the install"
"$PY" -m lib flashinfer-kernel --trace "$OUT/flashinfer-trace.json" --dtypes "$DTYPES" --head-dims "$HEADS_D" || fail=1

stamp "summary"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from lib.harness import results as R

out = Path(sys.argv[1])
try:
    df = R.load("correctness", root=out / "results")
    fi = df[df["backend"] == "flashinfer"]
    ok = fi["check_passed"].fillna(False).astype(bool)
    print(f"correctness: flashinfer passed {int(ok.sum())} / {len(fi)} "
          f"(error rows {int((fi['status'] == 'error').sum())})")
    keys = [c for c in ("dtype", "block_size", "head_size", "heads", "placement", "num_heads", "num_kv_heads") if c in fi]
    bad = fi[~ok]
    if len(bad):
        print(bad[keys + [c for c in ("rel_error", "error") if c in bad]].head(25).to_string(max_colwidth=120))
        if "block_size" in bad:
            print("failing block sizes:", sorted(bad["block_size"].unique().tolist()))
except Exception as exc:
    print(f"correctness: no rows read ({type(exc).__name__}: {exc})")
try:
    ks = R.load("kernel_speed", root=out / "results")
    ks = ks[ks["status"] == "ok"]
    t = ks.pivot_table(index=["num_heads", "num_kv_heads", "batch_size", "seq_len"], columns="backend",
                       values="median_us", aggfunc="median")
    if {"flashinfer", "sdpa_dense"} <= set(t.columns):
        t["flashinfer/sdpa"] = t["flashinfer"] / t["sdpa_dense"]
    print("kernel_speed median us:")
    print(t.round(2).to_string())
except Exception as exc:
    print(f"kernel_speed: no rows read ({type(exc).__name__}: {exc})")
try:
    tr = json.loads((out / "flashinfer-trace.json").read_text())
    print(f"trace: {len(tr.get('used', []))} files used, missing from the install: {tr.get('missing')}, "
          f"installed but unused: {tr.get('unused')}, runs: {[(r['dtype'], r['head_dim'], r['heads'], r['seconds']) for r in tr.get('runs', [])]}")
except Exception as exc:
    print(f"trace: none ({type(exc).__name__}: {exc})")
EOF
du -sh "$FLASHINFER_WORKSPACE_BASE" 2>/dev/null | sed 's/^/JIT cache: /'
stamp "done (exit $fail)"
exit $fail
