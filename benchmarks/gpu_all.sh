#!/usr/bin/env bash
# One device call for the GPU figures (needs a CUDA machine; not run in CI).
# Usage on the device: bash benchmarks/gpu_all.sh DATA_ZIP OUT_DIR
# Copy ../shared/data/cifar10-jpeg.zip into a git-ignored folder first (e.g. .data/) and carry it.
set -euo pipefail
DATA=${1:-.data/cifar10-jpeg.zip}
OUT=${2:-benchmarks/results}   # results go to $OUT/<benchmark>/gpu/ (the layout of benchmarks/results)
mkdir -p "$OUT/overhead/gpu" "$OUT/quality/gpu"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/overhead/gpu/gpu.txt" "$OUT/quality/gpu/gpu.txt"
# 1. overhead: CIFAR ResNet-20 @32 b128 and resnet50 @224 b128, bf16 (about 2 minutes); summary.md beside it
O="$OUT/overhead/gpu/$(date +%F)_resnet20@32+resnet50@224_recorder+weight+dnq"
python benchmarks/overhead.py --device cuda --repeats 3 --steps 30 --out "$O.json" 2>&1 | tee "$O.log"
# 2. quality: full CIFAR-10, ResNet-20, plain and the two DNQ recipes, 4 seeds, then every PTQ recipe (min-max,
#    min-max + BN re-estimation, the practitioner's MSE/percentile + BN re-estimation, and that + block
#    reconstruction) at W4A4, W3A3 and W2A4 on the saved models (on the GPU) and the paired summary. Not yet run on a GPU, so its time is unmeasured: 12 fits of 30 epochs at bf16 may not fit one
#    15-minute lease; the runs resume where they stopped (saved models are skipped), so a second call finishes it
#    <variant>/seed<k>.json per run and the generated summary.md beside them
Q="python benchmarks/quality.py --size gpu --data $DATA --epochs 30 --out $OUT/quality/gpu"
$Q --train-only --variants 'plain,dnq_wa,dnq_wa_late@w3a3' --seeds 0,1,2,3 2>&1 | tee -a "$OUT/quality/gpu/train.log"
$Q --evaluate --recipes minmax,minmax_bnre,practical,reconstruct --eval-bits w4a4,w3a3,w2a4 2>&1 | tee -a "$OUT/quality/gpu/evaluate.log"
