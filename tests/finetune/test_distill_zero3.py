"""A 2B teacher next to the student: the frozen teacher partitioned with ZeRO-3 across 2 CPU ranks (gloo)
computes what the whole teacher computes, and a ZeRO-3 distillation run with it equals one with the
teacher unpartitioned (the scenarios live in _distill_worker.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from sapiens_lite.loading import load_model
from sapiens_lite.models.pose import HeadConfig, build_pose_model
from tests._launch import clean_env, torchrun

WORKER = Path(__file__).with_name("_distill_worker.py")


@pytest.mark.slow
def test_a_zero3_teacher_equals_the_whole_teacher(tmp_path):
    from sapiens_train.synth import synthesize

    data, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    train = synthesize(
        data / "train", 8, seed=0, size=(128, 96), scheme="coco17", people=(1, 1), progress=False
    )
    torch.manual_seed(0)
    teacher = build_pose_model("vit_test", "coco17", input_size=(128, 96), head=HeadConfig("vitpose", 32))
    teacher.save_pretrained(data / "teacher")
    overrides = [
        f"teacher.path={data / 'teacher'}",
        "teacher.precision=fp32",
        f"data.train_ann={train}",
        f"data.train_images={train.parent / 'images'}",
        "data.num_workers=0",
        "model.input_size=[64, 48]",
        "model.backbone.img_size=[64, 48]",
        "model.head.kind=simple",
        "distill.feature_weight=0.1",
        "distill.teacher_layers=[0]",
        "engine.zero_stage=3",
        "engine.total_steps=3",
        "engine.micro_batch_size=2",
        "engine.checkpoint_every=0",
        "engine.log_every=1",
        "engine.progress=false",
        "engine.tensorboard=false",
        "optim.warmup_steps=1",
    ]
    (data / "overrides.json").write_text(json.dumps(overrides))

    cmd = [*torchrun(2), str(WORKER), str(out), str(data)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))

    for r in (r0, r1):
        assert r["world"] == 2 and r["partitioned"]
        assert 0.45 < r["partition_share"] <= 0.55  # each rank holds half of the teacher
        assert r["teacher_max_diff"] == 0.0
        assert r["plain"] == r["zero3"] and r["plain"]["steps"] == 3
    logs = {
        name: [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
        for name in ("plain", "zero3")
    }
    keys = ("loss", "gt", "kd_heatmap", "kd_feature")
    assert [[r[k] for k in keys] for r in logs["plain"]] == [[r[k] for k in keys] for r in logs["zero3"]]
    # The ZeRO-3 student is consolidated from its checkpoint into a whole fp32 model.
    a, b = load_model(out / "plain").state_dict(), load_model(out / "zero3").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)
