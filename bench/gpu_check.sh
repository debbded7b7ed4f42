#!/usr/bin/env bash
# The GPU figures of MAE pretraining in one go, sized for one short device session (about 8 minutes on an
# H100/H200): run it through the device tool from the repo root, carrying the wheels that machine lacks:
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# .whl/ (git-ignored: `echo /.whl/ >> .git/info/exclude`) holds the py3.12 wheels the GPU image lacks; the
# rest (torch, timm, transformers, opencv, ...) is there. Build them here once (no registry over there):
#   pip wheel --no-deps -w .whl deepspeed==0.19.8 hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5
# Every part has its own time limit and log under $OUT, so one failure leaves the others' figures:
#   1. mae.txt      ours vs transformers ViTMAEForPreTraining, sapiens_0.3b 1024x768 bf16 (mae_compile.txt:
#                   the same with compiled rows)
#   2. largest.txt  largest batch of each Sapiens size within 79.1 GiB (an 80 GB H100), activation checkpointing
#   3. engine.txt   `sapiens pretrain` of sapiens_2b: DeepSpeed ZeRO-3, bf16, activation checkpointing,
#                   compiled blocks, capped at 79.1 GiB; engine_log.jsonl holds img/s, MFU and memory
#
# A CPU dry run of the same commands on a tiny model (what tests/bench/test_gpu_check.py runs):
#   SAPIENS_GPU_CHECK_DRY=1 OUT=/tmp/out bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

if [[ -n "${SAPIENS_GPU_CHECK_DRY:-}" ]]; then
    DEVICE=cpu
    MAE_ARGS=(--arch vit_test --size 64 48 --batch 2 --dtype fp32 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2)
    LARGEST_ARGS=(--archs vit_test vit_tiny --size 64 48 --max-batch 2 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2)
    ENGINE_CFG=(engine.zero_stage=2 engine.precision=fp32 "data.img_size=[64,48]" model.encoder.arch=vit_test
        model.decoder_dim=32 model.decoder_depth=1 model.decoder_heads=2 engine.micro_batch_size=2
        data.synthetic=8 data.num_workers=0 engine.total_steps=4 engine.log_every=2)
    T_MAE=120 T_COMPILE=300 T_LARGEST=120 T_ENGINE=300
else
    DEVICE=cuda
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    MAE_ARGS=(--arch sapiens_0.3b --size 1024 768 --batch 32 --dtype bf16 --steps 8 --warmup 3)
    LARGEST_ARGS=(--max-batch 64)
    ENGINE_CFG=(engine.micro_batch_size=8 data.synthetic=96 data.num_workers=12 engine.total_steps=8 engine.log_every=2)
    T_MAE=100 T_COMPILE=170 T_LARGEST=110 T_ENGINE=140  # 520 s in all, under the 600 s of one call
fi

section() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

# Every part imports the engine, hence DeepSpeed: install the carried wheels before the first one.
if ! "$PY" -c "import deepspeed, webdataset" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(not any(e.name == 'pretrain' for e in m.entry_points(group='sapiens.commands')))"; then
    # the `sapiens` command table lives in the distribution's metadata: install it (no dependencies) beside the wheels
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site_pkg . &&
        export PYTHONPATH=$PWD:/tmp/site_pkg${PYTHONPATH:+:$PYTHONPATH}
fi

# Eager first and on its own: a compile that outlasts its limit must not take the headline figure with it.
section "1a. MAE training throughput, ours vs transformers, eager" | tee "$OUT/mae.txt"
timeout "$T_MAE" "$PY" bench/mae_throughput.py --device "$DEVICE" "${MAE_ARGS[@]}" 2>&1 | tee -a "$OUT/mae.txt"
section "1b. the same with compiled rows" | tee "$OUT/mae_compile.txt"
timeout "$T_COMPILE" "$PY" bench/mae_throughput.py --device "$DEVICE" "${MAE_ARGS[@]}" --compile 2>&1 |
    tee -a "$OUT/mae_compile.txt"

section "2. largest batch per Sapiens size in 79.1 GiB" | tee "$OUT/largest.txt"
timeout "$T_LARGEST" "$PY" bench/mae_throughput.py --device "$DEVICE" --find-largest "${LARGEST_ARGS[@]}" 2>&1 |
    tee -a "$OUT/largest.txt"

section "3. sapiens pretrain: sapiens_2b, ZeRO-3, bf16, activation checkpointing, compiled blocks" | tee "$OUT/engine.txt"
RUN_DIR="$OUT/engine_run"
# The 79.1 GiB cap holds an H200 to what an 80 GB H100 offers; on a CPU it is a no-op. A file, not stdin:
# data-loader workers may need to re-import the main module.
CAPPED=$(mktemp --suffix=.py)
trap 'rm -f "$CAPPED"' EXIT
cat > "$CAPPED" <<'EOF'
import sys

import torch

if torch.cuda.is_available():
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 79.1 * 2**30 / total), 0)
from sapiens_lite.cli import main

sys.exit(main(sys.argv[1:]))
EOF
timeout "$T_ENGINE" "$PY" "$CAPPED" pretrain --config configs/pretrain/sapiens_2b.yaml \
    engine.run_dir="$RUN_DIR" engine.grad_accum_steps=1 engine.global_batch_size=null engine.checkpoint_every=0 \
    engine.compile=true engine.tensorboard=false engine.progress=false optim.warmup_steps=2 viz.every=0 \
    "${ENGINE_CFG[@]}" 2>&1 | tee -a "$OUT/engine.txt"
cp "$RUN_DIR/log.jsonl" "$OUT/engine_log.jsonl" 2>/dev/null
section "done"
