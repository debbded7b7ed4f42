"""`sapiens demo --quick` end to end, as a user runs it: a stage that fails, the rerun that resumes, the report.

One test, because the chain is the expensive part (about two minutes on 2 cores): it first runs only the
data stages, breaks the shards so that pretraining fails, checks the one-line error, repairs them and lets
the demo continue to the end, then reruns it once more (nothing left to do).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from sapiens_train.demo import STAGE_NAMES


def demo(out, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sapiens_lite.cli", "demo", "--quick", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_quick_demo_fails_resumes_and_reports(tmp_path):
    out = tmp_path / "demo"
    later = [s for s in STAGE_NAMES if s not in ("synth", "pack")]

    # 1. Only the data stages: the others are reported as skipped.
    r = demo(out, "--skip", *later)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pretrain: MAE pretraining from the shards (DeepSpeed) ... skipped" in r.stdout
    state = json.loads((out / "demo.json").read_text())
    assert set(state["stages"]) == set(STAGE_NAMES)
    assert state["stages"]["synth"]["result"]["train_images"] == 48
    assert state["stages"]["pack"]["result"]["samples"] == 48

    # 2. Damaged shards: pretraining fails; the error names the stage, its log and the command to rerun.
    index = out / "shards" / "index.json"
    good = index.read_text()
    index.write_text("{not json")
    r = demo(out)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("sapiens demo: error: stage 'pretrain' failed"), last
    assert str(out / "logs" / "pretrain.log") in last
    assert (
        "torchrun --standalone --nproc_per_node" in last and "pretrain --config configs/pretrain.yaml" in last
    )
    assert "synth: procedural people: training and held-out val sets ... done before" in r.stdout
    assert "result" not in json.loads((out / "demo.json").read_text())["stages"]["pretrain"]

    # 3. Repaired: the demo continues from pretraining to the end.
    index.write_text(good)
    r = demo(out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pack: training images -> webdataset shards ... done before" in r.stdout
    state = json.loads((out / "demo.json").read_text())
    results = {name: state["stages"][name]["result"] for name in STAGE_NAMES}
    for stage in ("pretrain", "finetune", "scratch", "distill", "baseline"):
        assert results[stage]["final_loss"] < results[stage]["first_loss"], (stage, results[stage])
    assert results["pretrain"]["processes"] == (2 if (os.cpu_count() or 1) >= 2 else 1)
    assert 0.0 <= results["eval"]["finetune"]["AP"] <= 1.0
    assert results["export"]["max_diff"] < 1e-4
    assert results["predict"]["images"] == 2 and results["predict"]["img_per_s"] > 0

    # The summary table: every stage's row, with the figures of demo.json.
    table = r.stdout.split("sapiens demo: done in", 1)[1]
    for label in (
        "MAE loss",
        "pose AP with pretraining",
        "pose AP without pretraining",
        "pose AP student, distilled",
        "pose AP student, ground truth only",
        "distillation gain",
        "exported student",
        "predictions",
    ):
        assert label in table, label
    gain = results["distill"]["AP"] - results["baseline"]["AP"]
    assert re.search(r"distillation gain\s+" + re.escape(f"{gain:+.3f}") + " AP", table)

    # The files the report shows, and the report itself: every picture inlined, nothing fetched.
    assert (out / "export" / "student.onnx").stat().st_size > 0
    photos = sorted((out / "predict" / "photos").glob("*.json"))
    assert [p.stem for p in photos] == ["astronaut", "grace_hopper"]
    assert (out / "predict" / "video" / "people.mp4").stat().st_size > 0
    report = (out / "report.html").read_text()
    assert "http://" not in report and "https://" not in report
    assert report.count("data:image/") >= 5  # MAE grid, loss curves, overlays, photos, video frame
    assert "MAE reconstructions" in report and "Predictions on real photos" in report

    # 4. Once more: every stage done before, only the report redrawn.
    t0 = time.perf_counter()
    r = demo(out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("... done before") == len(STAGE_NAMES)
    assert time.perf_counter() - t0 < 60


def test_demo_refuses_a_folder_of_the_other_mode(tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"mode": "full", "stages": {}}))
    r = demo(tmp_path, timeout=120)
    assert r.returncode == 2
    assert "holds a full demo; run without --quick to continue it" in r.stderr
    assert "Traceback" not in r.stderr
