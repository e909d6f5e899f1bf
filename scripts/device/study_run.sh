#!/usr/bin/env bash
# Several experiments of the study on one GPU node, in one call, each with its GPU time recorded:
# each `python -m lib sweep <experiment> --out $ROOT`, one after another, then a tarball of the
# results root in $OUT after every experiment (a call cut short still returns what finished; a
# rerun of the same sweep into the same root resumes). Run from the repository root:
#
#   OUT=/tmp/o EXPERIMENTS="page_table seed_tables" bash scripts/device/study_run.sh
#
# Knobs (environment): EXPERIMENTS (names, run in order; NAME:k=v,k2=v2 narrows one with -p),
# ROOT (results root, default /tmp/study-results), PYTHON (python3), DEADLINE_S (stop starting a
# sweep this many seconds after the script began, and cut the one running there; default 560),
# FORCE (1: measure points that have rows again, a repeat in a new process: sweep --force),
# REPEAT_TAG (appended to the timing rows, e.g. "repeat 2"), GPU_TEST (1: `make gpu-test` first),
# FI_JIT ("float16:128": FlashInfer JIT-builds these dtype:head pairs first, for sweeps that use it),
# CORRECTNESS_KINDS (correctness sub-grids run first, 16 workers: scripts/device/correctness_part.py).
# Provenance: set UVM_STUDY_GIT_COMMIT, UVM_STUDY_LIB_SHA and UVM_STUDY_GIT_DIRTY as for any run.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT to a folder for the results}"
PY="${PYTHON:-python3}"
ROOT="${ROOT:-/tmp/study-results}"
DEADLINE_S="${DEADLINE_S:-560}"
CORRECTNESS_KINDS="${CORRECTNESS_KINDS:-}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-$PWD/.flashinfer-cache}"
mkdir -p "$ROOT" "$OUT"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
stamp() { echo "== [$(elapsed) s] $*"; }
pack() { tar czf "$OUT/results.tgz" -C "$ROOT" . 2>/dev/null; }
TIMES="$ROOT/gpu_times.tsv"
[ -f "$TIMES" ] || printf 'experiment\targs\tstarted_utc\twall_s\texit\ttag\n' > "$TIMES"
fail=0

stamp "node: $(nvidia-smi --query-gpu=name,uuid,driver_version,memory.used,memory.total --format=csv,noheader 2>/dev/null)"
"$PY" -m lib env 2>&1 | tail -n 25

if [ "${GPU_TEST:-0}" = "1" ]; then
  stamp "GPU tests"
  make gpu-test PYTHON="$PY" PYTEST_ARGS="-q -rfE --timeout=120" > "$OUT/gpu-test.log" 2>&1
  echo "gpu-test exit $?: $(tail -n 1 "$OUT/gpu-test.log")"
fi

if [ -n "${FI_JIT:-}" ]; then
  for pair in $FI_JIT; do
    dt="${pair%%:*}"; hd="${pair##*:}"
    stamp "FlashInfer JIT build: $dt, head $hd"
    "$PY" -m lib flashinfer-kernel --trace "$OUT/fi-trace-$dt-$hd.json" --dtypes "$dt" --head-dims "$hd" \
      > "$OUT/fi-build-$dt-$hd.log" 2>&1 || { echo "FlashInfer build failed: see fi-build-$dt-$hd.log"; fail=1; }
  done
fi

if [ -n "${CORRECTNESS_KINDS// /}" ]; then
  stamp "correctness sub-grids: $CORRECTNESS_KINDS"
  s0=$(date +%s); started=$(date -u +%FT%TZ)
  timeout --signal=INT --kill-after=20 $(( DEADLINE_S - $(elapsed) )) \
    "$PY" scripts/device/correctness_part.py "$ROOT" $CORRECTNESS_KINDS > "$OUT/correctness.log" 2>&1
  rc=$?
  printf 'correctness\t%s (correctness_part.py)\t%s\t%s\t%s\t%s\n' "$CORRECTNESS_KINDS" "$started" \
    $(( $(date +%s) - s0 )) "$rc" "${REPEAT_TAG:-}" >> "$TIMES"
  tail -n 3 "$OUT/correctness.log"
  [ "$rc" -eq 0 ] || { echo "correctness: exit $rc (see correctness.log)"; fail=1; }
  pack
fi

EXPERIMENTS="${EXPERIMENTS:-}"
[ -n "${EXPERIMENTS// /}" ] || [ -n "${CORRECTNESS_KINDS// /}" ] || { echo "name EXPERIMENTS or CORRECTNESS_KINDS"; exit 2; }
for spec in $EXPERIMENTS; do
  exp="${spec%%:*}"
  args=()
  [ "${FORCE:-0}" = "1" ] && args+=(--force)
  if [ "$spec" != "$exp" ]; then
    IFS=';' read -ra kvs <<< "${spec#*:}"
    for kv in "${kvs[@]}"; do args+=(-p "$kv"); done
  fi
  left=$(( DEADLINE_S - $(elapsed) ))
  if [ "$left" -le 10 ]; then
    stamp "$exp: not started, ${left} s left before the deadline"
    printf '%s\t%s\t%s\t\tnot started\t%s\n' "$exp" "${args[*]:-}" "$(date -u +%FT%TZ)" "${REPEAT_TAG:-}" >> "$TIMES"
    continue
  fi
  stamp "$exp ${args[*]:-} (at most ${left} s)"
  s0=$(date +%s); started=$(date -u +%FT%TZ)
  timeout --signal=INT --kill-after=20 "$left" "$PY" -m lib sweep "$exp" "${args[@]}" --out "$ROOT" --no-progress \
    > "$OUT/sweep-$exp${REPEAT_TAG:+-${REPEAT_TAG// /_}}.log" 2>&1
  rc=$?
  wall=$(( $(date +%s) - s0 ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$exp" "${args[*]:-}" "$started" "$wall" "$rc" "${REPEAT_TAG:-}" >> "$TIMES"
  tail -n 3 "$OUT/sweep-$exp${REPEAT_TAG:+-${REPEAT_TAG// /_}}.log"
  [ "$rc" -eq 0 ] || { echo "$exp: exit $rc (see its sweep log)"; fail=1; }
  pack
done

stamp "done (exit $fail)"
cat "$TIMES"
pack
exit $fail
