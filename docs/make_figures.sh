#!/usr/bin/env bash
# The README's prediction figure, from scratch: train the tiny COCO-17 model of
# configs/finetune/tiny_cpu_coco17.yaml on procedural people (about 10 minutes on 2 quiet CPU cores), then run
# `sapiens predict` on real photos that ship inside installed packages (scikit-image's astronaut and
# cameraman, matplotlib's Grace Hopper) and on a short generated video, and tile the overlays into
# docs/figures/predict_photos.jpg.
#
#   bash docs/make_figures.sh                   # the real run (data in data/synth, run in runs/tiny_cpu_coco17)
#   FIGURES_QUICK=1 bash docs/make_figures.sh   # a 2-minute check of the same commands (tiny data, 20 steps, /tmp)
#   FIGURES_RUN=runs/bench_distill/teacher bash docs/make_figures.sh   # a model trained already (same recipe)
set -euo pipefail
cd "$(dirname "$0")/.."
SAPIENS=${SAPIENS:-.venv/bin/sapiens}
PY=${PYTHON:-.venv/bin/python}

if [[ -n "${FIGURES_QUICK:-}" ]]; then
    DATA=/tmp/sapiens_figures/data RUN=/tmp/sapiens_figures/run FIG=/tmp/sapiens_figures/predict_photos.jpg
    N_TRAIN=64 N_VAL=8 STEPS=(engine.total_steps=20 engine.checkpoint_every=0 eval.every_steps=0 optim.warmup_steps=2)
else
    DATA=data/synth RUN=${FIGURES_RUN:-runs/tiny_cpu_coco17} FIG=docs/figures/predict_photos.jpg
    N_TRAIN=4000 N_VAL=100 STEPS=()
fi
OUT=$(dirname "$FIG")/predict_out
PHOTOS=$(dirname "$FIG")/photos

# 1. procedural people (exact keypoints), then the tiny model trained on them
[[ -f $DATA/coco17_train/annotations.json ]] ||
    $SAPIENS data synth "$DATA/coco17_train" --num-images $N_TRAIN --seed 0 --scheme coco17 --people 1-2 --workers 2
[[ -f $DATA/coco17_val/annotations.json ]] ||
    $SAPIENS data synth "$DATA/coco17_val" --num-images $N_VAL --seed 1001 --scheme coco17 --people 1-2
[[ -f $RUN/final/config.json ]] ||
    $SAPIENS finetune --config configs/finetune/tiny_cpu_coco17.yaml engine.run_dir="$RUN" \
        data.train_ann="$DATA/coco17_train/annotations.json" data.train_images="$DATA/coco17_train/images" \
        data.val_ann="$DATA/coco17_val/annotations.json" data.val_images="$DATA/coco17_val/images" "${STEPS[@]}"

# 2. real photos shipped with scikit-image and matplotlib, and a short video of generated people
mkdir -p "$PHOTOS"
$PY - "$PHOTOS" <<'EOF'
import sys
from pathlib import Path

import cv2
import matplotlib.cbook
import numpy as np
import skimage.data

from sapiens_lite.video import VideoWriter
from sapiens_train.synth import render_sample

out = Path(sys.argv[1])
cv2.imwrite(str(out / "astronaut.jpg"), skimage.data.astronaut()[:, :, ::-1])
cv2.imwrite(str(out / "cameraman.jpg"), skimage.data.camera())
with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
    hopper = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
cv2.imwrite(str(out / "grace_hopper.jpg"), hopper)
with VideoWriter(out / "walk.mp4", fps=10) as video:
    for i in range(30):
        video.write(render_sample(7, i, (192, 256), scheme="coco17", people=(1, 2))[0])
EOF

# 3. predict: the whole photo is the person box (no detector), flip test on
$SAPIENS predict "$PHOTOS" --model "$RUN" --out "$OUT" --flip --kpt-thr 0.2

# 4. one row of overlays
$PY - "$OUT" "$FIG" <<'EOF'
import sys
from pathlib import Path

import cv2

from sapiens_lite.visualize import image_grid

out, fig = Path(sys.argv[1]), Path(sys.argv[2])
names = ["astronaut", "cameraman", "grace_hopper"]
row = [cv2.imread(str(out / f"{n}.jpg"))[:, :, ::-1] for n in names]
grid = image_grid([row], labels=names, height=384)
fig.parent.mkdir(parents=True, exist_ok=True)
cv2.imwrite(str(fig), grid[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
print(f"wrote {fig}")
EOF
