#!/usr/bin/env bash
# The inputs docs/projection-h100.md still lacks, in one device call (~5 min on one H100/H200):
#   1. error feedback's cost, gather and two-shot, for int8 (never run on the GPU) next to the
#      group codecs and mxfp4, at worlds 2 and 8 (scripts/gpu_feedback_cost.py);
#   2. the world-8 decode-and-sum at 256 and 1024 rows (the per-chunk path's shapes: the H100
#      files start at 2048 rows, so the projection's chunked rows are priced by scaling);
#   3. the owner stage at TP 16, fused against split (scripts/gpu_reduce_split.py), and the
#      group codecs' owner stage at TP 16 (gpu_feedback_cost's two_shot_reduce_us), which the
#      projection models today.
# Results: OUT/feedback, OUT/w8_small, OUT/split16 (each a .json and .md).
#
#   scripts/gpu_projection_gaps.sh OUT                       # on the GPU machine
#   DRY=1 scripts/gpu_projection_gaps.sh /tmp/gaps_dry       # dry run on the CPU (interpreter, tiny shapes)
# FB_BUDGET, W8_BUDGET, SPLIT_BUDGET (seconds; default 120, 60, 45) stop each run starting new rows.
set -u
OUT=${1:?usage: scripts/gpu_projection_gaps.sh OUTDIR}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-.}
PY=${PYTHON:-python3}
if [ "${DRY:-0}" = 1 ]; then
    DEV=(--device cpu); FB_SHAPES=3x96; W8_SHAPES=5x96; SPLIT_SHAPES=7x96
else
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    DEV=(); FB_SHAPES=2048x8192; W8_SHAPES=256x8192,1024x8192; SPLIT_SHAPES=2048x8192
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
mkdir -p "$OUT/feedback" "$OUT/w8_small" "$OUT/split16"
timeout 200 $PY scripts/gpu_feedback_cost.py --out "$OUT/feedback" "${DEV[@]}" --shapes "$FB_SHAPES" \
    --codecs int8,int4-g128,int4-g32,mxfp4 --worlds 2,8,16 --budget-s "${FB_BUDGET:-120}"
echo "feedback rc=$?"
timeout 120 $PY scripts/gpu_check.py --out "$OUT/w8_small" "${DEV[@]}" --world 8 --shapes "$W8_SHAPES" \
    --codecs int4-g128,int4-g32,int8,int4-outlier --budget-s "${W8_BUDGET:-60}" --two-shot-tokens 0
echo "w8_small rc=$?"
timeout 100 $PY scripts/gpu_reduce_split.py --out "$OUT/split16" "${DEV[@]}" --shapes "$SPLIT_SHAPES" \
    --worlds 16 --codecs int8,int4-outlier,rot-lm4-g64-lg8-k4 --budget-s "${SPLIT_BUDGET:-45}"
echo "split16 rc=$?"
