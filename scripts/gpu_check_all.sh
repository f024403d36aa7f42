#!/usr/bin/env bash
# Every device check in one call (about 5 minutes on one H100/H200): scripts/gpu_check.py at
# world 2 (every priority codec at [32|2048|8192, 8192]) and at world 8 (decode-and-sum of 8
# payloads, prefill-sized). Results: OUT/w2/gpu_check.{json,md}, OUT/w8/gpu_check.{json,md},
# which docs/bench/gpu_check.* and docs/bench/gpu_check_world8.* are copies of.
#
#   scripts/gpu_check_all.sh OUT                                   # on the GPU machine
#   scripts/gpu_check_all.sh /tmp/dry --device cpu --shapes 5x96   # dry run (interpreter)
# Extra arguments go to both runs, after the defaults (so they override them); W2_BUDGET and
# W8_BUDGET (seconds, default 200 and 75) stop each run starting new rows.
set -u
OUT=${1:?usage: scripts/gpu_check_all.sh OUTDIR [gpu_check.py args...]}
shift
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-.}
command -v nvidia-smi >/dev/null && nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
mkdir -p "$OUT/w2" "$OUT/w8"
# --budget-s stops starting rows, so a slow compile leaves rows listed as skipped, not a dead run
timeout 300 python3 scripts/gpu_check.py --out "$OUT/w2" --budget-s "${W2_BUDGET:-200}" "$@"
echo "w2 rc=$?"
timeout 140 python3 scripts/gpu_check.py --out "$OUT/w8" --world 8 --shapes 2048x8192,8192x8192 \
    --codecs int4-outlier,rot-lm4-g64-lg8-k4,int4-g32,rot-int6-g64-lg8-k4,int4-g128,mxfp4,int8 --budget-s "${W8_BUDGET:-75}" "$@"
echo "w8 rc=$?"
