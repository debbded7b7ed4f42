"""bench/distill_gain.py on its smoke plan: every run of the benchmark (teacher, baseline, stages 1 and 2,
backbone distillation and its fine-tuning) for one seed, its three chains two at a time in processes of
their own, and the results table. Two units side by side must not share a rendezvous port (they did: the teacher's
in-process run left its MASTER_PORT in the environment they inherited)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_plan_two_jobs(tmp_path):  # about a minute
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "distill_gain.py"), "--out", str(tmp_path), "--smoke",
           "--seeds", "0", "--jobs", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["jobs"] == 2 and results["plan"]["seeds"] == [0]
    runs = results["runs"]
    for seed in (0,):
        for kind in ("baseline", "stage1", "stage2", "backbone_ft"):
            assert runs[f"{kind}_s{seed}"]["AP"] is not None, (kind, seed)
            assert (tmp_path / f"{kind}_s{seed}" / "final" / "model.safetensors").is_file()
        assert runs[f"backbone_s{seed}"]["final_loss"] > 0
    # the parallel units ran as separate processes, each leaving its log and figures
    assert sorted(p.name for p in tmp_path.glob("unit_*.json")) == sorted(
        f"unit_{kind}_s0.json" for kind in ("backbone", "stage", "baseline")
    )
    table = (tmp_path / "results.md").read_text()
    assert "| student, distilled: stage 1 + 2 |" in table and "1 seeds" in table
