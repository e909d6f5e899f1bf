#!/usr/bin/env bash
# The Nsight Compute reports of data/profiles/, regenerated on a GPU node: for each shape, the
# third launch of the decode kernel of one backend (scripts/device/ncu_decode.py checks the first
# against the reference), with the sections data/profiles/README.md names. Run from the
# repository root; writes OUT/ncu_<name>.txt and OUT/ncu.log:
#
#   OUT=/tmp/prof bash scripts/device/ncu_profiles.sh            # the default shapes below
#   OUT=/tmp/prof SHAPES="32x4096_32to8:own-auto-paged:16" bash scripts/device/ncu_profiles.sh
#
# A shape is BATCHxTOKENS_HEADStoKV:BACKEND:BLOCK. Needs `ncu` (NCU=/path/to/ncu) and access to
# the GPU's performance counters.
set -u
OUT="${OUT:?set OUT to a folder for the reports}"
PY="${PYTHON:-python3}"
NCU="${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}"
SHAPES="${SHAPES:-32x4096_32to8:own-auto-paged:16 32x4096_32to32:own-auto-paged:16 16x1024_32to32:own-auto-paged:16 32x1024_64to8:own-auto-paged:256 32x1024_64to8:own-auto-contiguous:256 128x4096_64to8:own-v3-paged:16 128x4096_32to1:own-v3-paged:16 1x4096_64to8:own-v3-paged:16}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
[ -x "$NCU" ] || { echo "ncu not found (set NCU)" | tee "$OUT/ncu.log"; exit 2; }
"$NCU" --version | tail -n 1 | tee "$OUT/ncu.log"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/ncu.log"
fail=0
for spec in $SHAPES; do
  IFS=: read -r shape backend block <<< "$spec"
  b="${shape%%x*}"; rest="${shape#*x}"; n="${rest%%_*}"; hk="${rest#*_}"; h="${hk%%to*}"; kv="${hk#*to}"
  name="ncu_${shape}_b${block}_${backend}"
  echo "== $name" | tee -a "$OUT/ncu.log"
  "$NCU" --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section MemoryWorkloadAnalysis --section WarpStateStats \
    -k "regex:paged_attention_(decode|mma)" --launch-skip 2 --launch-count 1 \
    "$PY" scripts/device/ncu_decode.py "$b" "$n" "$h" "$kv" "$backend" "$block" 3 \
    > "$OUT/$name.txt" 2>> "$OUT/ncu.log" || { echo "  failed (see ncu.log)" | tee -a "$OUT/ncu.log"; fail=1; }
  grep -E "DRAM Throughput|Duration|Registers Per Thread|Achieved Occupancy" "$OUT/$name.txt" | head -n 4 | tee -a "$OUT/ncu.log"
done
exit $fail
