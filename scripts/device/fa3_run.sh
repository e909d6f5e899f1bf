#!/usr/bin/env bash
# vLLM's FlashAttention 3 on a GPU node, then more sweeps: load FA3 (its own load error is printed
# and its sweeps skipped if it does not load), run the correctness matrix's vllm-fa3 sub-grids
# (with CORRECTNESS_KINDS beside them), then `study_run.sh` with EXPERIMENTS (FA3's sweeps only
# when it loaded, the others in any case). The kernel-only installs come from the wheelhouse
# first (`sh wheelhouse/install.sh`, made with `--vllm-flash-attn`). From the repository root:
#
#   OUT=/tmp/o FA3_EXPERIMENTS="kernel_speed" EXPERIMENTS="uvm" bash scripts/device/fa3_run.sh
#
# CORRECTNESS_KINDS: more correctness sub-grids for the same 16-worker run (e.g. "own flex_paged").
# Other knobs as for study_run.sh (ROOT, DEADLINE_S, FORCE, REPEAT_TAG, FI_JIT).
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT}"; PY="${PYTHON:-python3}"; ROOT="${ROOT:-/tmp/study-results}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
mkdir -p "$OUT" "$ROOT"
"$PY" - > "$OUT/fa3-status.json" 2> "$OUT/fa3-status.err" <<'PYEOF'
import json, sys
from lib.engine.backends import get_backend, vllm_fa
st = vllm_fa.status(deep=True)
st["backend_unavailable"] = get_backend("vllm-fa3").unavailable_reason()
import torch
st["torch"] = torch.__version__
print(json.dumps(st, indent=1))
sys.exit(0 if st["backend_unavailable"] is None else 3)
PYEOF
fa3=$?
cat "$OUT/fa3-status.json"; tail -n 5 "$OUT/fa3-status.err"
runs="${EXPERIMENTS:-}"
kinds="${CORRECTNESS_KINDS:-}"
if [ "$fa3" -eq 0 ]; then
  kinds="vllm-fa3 $kinds"
  runs="${FA3_EXPERIMENTS:-} $runs"
else
  echo "vllm-fa3 unavailable: its sweeps are skipped"
fi
[ -n "${runs// /}${kinds// /}" ] || exit "$fa3"
DEADLINE_S=$(( ${DEADLINE_S:-565} - ($(date +%s) - t0) )) EXPERIMENTS="$runs" CORRECTNESS_KINDS="$kinds" \
  OUT="$OUT" ROOT="$ROOT" bash scripts/device/study_run.sh
