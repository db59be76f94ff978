#!/usr/bin/env bash
# The head-only benchmark at the paper's head shapes on one GPU, in bf16: V = 151,936 (Qwen3), student d = 2048,
# teacher d = 4096, N = 1,024 / 4,096 / 16,384 rows, k = 20%; every flow (ours compiled and eager, Liger and
# torchtune when installed), then our flows at 64 / 256 / 1024 MB per chunk. Writes OUT_DIR/head_benchmark_cuda*.
#   bash experiments/head_gpu.sh [OUT_DIR]          (default results/)
#   TINY=1 bash experiments/head_gpu.sh /tmp/x      rehearses both runs on a CPU at tiny shapes
set -euo pipefail
out=${1:-results}
if [ "${TINY:-0}" = 1 ]; then
    shape=(--device cpu --head-vocab 1000 --head-tokens 64,256 --head-dims 32,64 --head-rounds 1)
    sweep=(--head-tokens 256)
else
    shape=(--device cuda --head-vocab 151936 --head-tokens 1024,4096,16384 --head-dims 2048,4096 --head-rounds 5
           --head-dense-max-gb 100)
    sweep=(--head-tokens 16384)
fi
python -m experiments.benchmark --head-only --head-dtype bfloat16 --k 0.2 "${shape[@]}" --out-dir "$out"
python -m experiments.benchmark --head-only --head-dtype bfloat16 --k 0.2 "${shape[@]}" "${sweep[@]}" \
    --head-chunk-mb 64,256,1024 --out-dir "$out"
