#!/usr/bin/env bash
# The GPU figures of pose inference in one go (about 9 minutes on an H100/H200), through the device tool:
#
#   run(command="bash bench/gpu_inference.sh", timeout_s=590)
#
# Nothing to carry: the GPU image has torch, transformers, timm, opencv, scipy and onnx. Parts, each with its
# own time limit and log under $OUT, so that one failure leaves the others' figures:
#   1. decode.txt    decoding 308 keypoints (fp32 and bf16 heatmaps) on the GPU, with the CPU references
#   2. e2e.txt       sapiens_0.3b and sapiens_1b, 1024x768, bf16, batch 32: ours vs transformers VitPose,
#                    end-to-end and model-only, eager
#   3. compiled.txt  the same for sapiens_0.3b with compiled rows (torch.compile of both models)
#   4. compiled_1b.txt  the same for sapiens_1b, if there is time left
#
# A CPU dry run of the same commands on a tiny model (about 5 minutes on 2 cores; tests/bench/test_inference_bench.py
# smokes bench/inference.py itself):
#   SAPIENS_GPU_CHECK_DRY=1 OUT=/tmp/out bash bench/gpu_inference.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_inference}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

if [[ -n "${SAPIENS_GPU_CHECK_DRY:-}" ]]; then
    DEVICE=cpu
    DECODE=(--decode-batch 1 --decode-steps 1 --decode-dtypes fp32 bf16)
    E2E=(--archs vit_test --size 64 48 --batch 2 --dtype bf16 --image-size 96 128 --e2e-batches 2 --steps 1 --warmup 1)
    E2E_1B=(--archs vit_test --size 64 48 --batch 2 --dtype bf16 --image-size 96 128 --e2e-batches 2 --steps 1 --warmup 1)
    T_DECODE=120 T_E2E=300 T_COMPILE=400 T_COMPILE_1B=0
else
    DEVICE=cuda
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    DECODE=(--decode-batch 16 --decode-steps 10)
    E2E=(--archs sapiens_0.3b --size 1024 768 --batch 32 --dtype bf16 --e2e-batches 2 --steps 3 --warmup 2)
    E2E_1B=(--archs sapiens_1b --size 1024 768 --batch 32 --dtype bf16 --e2e-batches 2 --steps 3 --warmup 2)
    T_DECODE=40 T_E2E=140 T_COMPILE=170 T_COMPILE_1B=210  # 560 s at most: run it with timeout_s=590
fi

section() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

section "1. decoding 308 keypoints" | tee "$OUT/decode.txt"
timeout "$T_DECODE" "$PY" bench/inference.py --device "$DEVICE" --part decode "${DECODE[@]}" 2>&1 | tee -a "$OUT/decode.txt"

section "2. end-to-end and model-only, eager" | tee "$OUT/e2e.txt"
timeout "$T_E2E" "$PY" bench/inference.py --device "$DEVICE" --part e2e --no-compile "${E2E[@]}" \
    --archs "${E2E[1]}" "${E2E_1B[1]}" 2>&1 | tee -a "$OUT/e2e.txt"

section "3. with compiled rows" | tee "$OUT/compiled.txt"
timeout "$T_COMPILE" "$PY" bench/inference.py --device "$DEVICE" --part e2e --compile "${E2E[@]}" 2>&1 |
    tee -a "$OUT/compiled.txt"

if [[ "$T_COMPILE_1B" -gt 0 ]]; then
    section "4. sapiens_1b with compiled rows" | tee "$OUT/compiled_1b.txt"
    timeout "$T_COMPILE_1B" "$PY" bench/inference.py --device "$DEVICE" --part e2e --compile "${E2E_1B[@]}" 2>&1 |
        tee -a "$OUT/compiled_1b.txt"
fi
section "done"
