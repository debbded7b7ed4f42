"""bench/inference.py on tiny sizes: every row runs and prints its figure (not a timing test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_inference_bench_smoke():
    args = ["--archs", "vit_test", "--size", "64", "48", "--batch", "2", "--steps", "1", "--warmup", "1",
            "--image-size", "96", "128", "--decode-batch", "1", "--decode-steps", "1"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "inference.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for line in (
        "ours: decode + to image (torch, batched), fp32 heatmaps",
        "reference: mmpose DARK-UDP per keypoint",
        "reference: transformers post_process_pose_estimation",
        "speed-up ours / transformers (e2e):",
        "speed-up ours / transformers (model):",
    ):
        assert line in out, out
    assert "failed" not in out, out
    # same weights in both models: the parity line reports a fp32-level difference
    diff = float(out.split("max rel diff ")[1].split()[0])
    assert diff < 1e-4, out
