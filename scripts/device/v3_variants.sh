#!/bin/bash
# Development probe on a GPU node: v3 built with several sets of tuning defines
# (scripts/device/v3_variants.py), timed beside SDPA and v1/v2. Writes under $OUT.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,clocks.max.mem --format=csv > $OUT/gpu.txt
cat $OUT/gpu.txt
EXTRA='[{"batch_size":8,"seq_len":4096,"num_heads":64,"num_kv_heads":8,"partition_size":1024},
{"batch_size":8,"seq_len":4096,"num_heads":64,"num_kv_heads":8,"partition_size":704},
{"batch_size":1,"seq_len":32768,"num_heads":32,"num_kv_heads":8,"partition_size":1024},
{"batch_size":1,"seq_len":32768,"num_heads":32,"num_kv_heads":8,"partition_size":704}]'
EXTRA=$(python3 -c "import json,sys;b=dict(head_size=128,block_size=16,dtype='float16',placement='identity',memory_kind='device',protocol='rigorous',seed=0,backends='own-v3-paged+own-v3-contiguous');print(json.dumps([dict(b,**e) for e in json.loads(sys.argv[1])]))" "$EXTRA")
export V3_EXTRA="$EXTRA"
timeout ${VARIANTS_S:-300} python3 scripts/device/v3_variants.py $OUT "$@" 2>&1 | tee $OUT/variants.log
