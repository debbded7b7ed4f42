"""bench/gpu_check.sh, the one-shot GPU script, as a CPU dry run on tiny models: every part runs and
leaves its figures, so the few minutes of a lent GPU are not spent finding a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_writes_every_figure(tmp_path):
    env = {**os.environ, "SAPIENS_GPU_CHECK_DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mae = (tmp_path / "mae.txt").read_text()
    assert "speed-up ours / transformers:" in mae and "failed" not in mae, mae
    compiled = (tmp_path / "mae_compile.txt").read_text()
    assert "speed-up ours+compile / transformers+compile:" in compiled, compiled
    largest = (tmp_path / "largest.txt").read_text()
    assert [line.split()[:2] for line in largest.splitlines() if line.startswith("vit_")] == [
        ["vit_test", "2+"],  # on a CPU nothing runs out of memory: every batch up to --max-batch fits
        ["vit_tiny", "2+"],
    ], largest
    records = [json.loads(line) for line in (tmp_path / "engine_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["mem_gib"] > 0 and r["mfu"] > 0 for r in records)
    assert "nothing saved (engine.checkpoint_every=0)" in (tmp_path / "engine.txt").read_text()
