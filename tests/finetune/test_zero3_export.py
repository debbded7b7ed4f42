"""ZeRO-3 on 2 CPU ranks (gloo): what rank 0 evaluates and saves is the whole trained model.

Under ZeRO-3 every rank holds a partition of each parameter. A short fine-tuning run and a short
distillation run (student under ZeRO-3, teacher partitioned too) each evaluate periodically (best/) and at
the end (final/). Every saved folder must hold exactly the fp32 weights DeepSpeed's own `zero_to_fp32`
consolidates from the checkpoint of the same step, and the metrics saved beside final/ must be the ones
`sapiens eval` measures on that folder in a single process.

The backbone is 192 wide so that its largest matrices (qkv, fc1, fc2) exceed DeepSpeed's parameter
persistence threshold (1e5 elements): smaller parameters stay whole on every rank after the first step,
which would hide a missing gather.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._launch import clean_env, torchrun

MODEL = [
    "model.input_size=[64, 48]",
    "model.backbone.img_size=[64, 48]",
    "model.backbone.embed_dim=192",
    "model.backbone.depth=1",
    "model.backbone.num_heads=3",
    "model.head.kind=vitpose",
    "model.head.channels=16",
]
ENGINE = [
    "engine.zero_stage=3",
    "engine.total_steps=3",
    "engine.micro_batch_size=2",
    "engine.checkpoint_every=1",  # every step: best/ (step 2) and final/ (step 3) each have theirs
    "engine.log_every=1",
    "engine.progress=false",
    "engine.tensorboard=false",
    "optim.warmup_steps=1",
    "eval.every_steps=2",  # the hook at step 2, the final evaluation at step 3
    "eval.batch_size=4",
    "eval.pck_thr=0.3",  # 3 steps leave AP at 0; PCK within 0.3 box sizes tells models apart
    "data.num_workers=0",
]


def sapiens(*args: str, log: Path, nproc: int = 0, timeout: float = 180) -> None:
    """`sapiens ARGS` in one process, or under `torchrun --nproc_per_node nproc` (gloo on CPU), output to `log`.

    A run that hangs (ranks waiting on a collective that one rank never joins) is stopped: SIGTERM makes
    torchrun stop its ranks (each in a session of its own), SIGKILL follows if it does not."""
    cmd = ["nice", "-n", "10", *torchrun(nproc), "-m", "sapiens_lite.cli", *args]
    with open(log, "w") as f:  # a file, not a pipe: a rank left behind cannot keep it open
        proc = subprocess.Popen(
            cmd, env=clean_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail(
            f"sapiens {args[0]} did not finish in {timeout:.0f} s (a hang?):\n{log.read_text()[-5000:]}"
        )
    assert proc.returncode == 0, log.read_text()[-8000:]


def zero_to_fp32(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of the ZeRO-3 checkpoint of `step` (every rank's fp32 partition)."""
    from sapiens_train.dist import set_ds_accelerator_env

    set_ds_accelerator_env()  # DeepSpeed's accelerator (CPU here) before its first import
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:08d}")


def assert_same_weights(folder: Path, reference: dict[str, torch.Tensor], prefix: str = "") -> None:
    saved = load_file(folder / "model.safetensors")
    want = {k[len(prefix) :]: v for k, v in reference.items() if k.startswith(prefix)}
    assert sorted(saved) == sorted(want), folder
    for k, v in want.items():
        dtype = torch.float32 if v.is_floating_point() else v.dtype  # BatchNorm's step count is int64
        assert saved[k].dtype == dtype and saved[k].shape == v.shape, (folder, k, saved[k].shape)
        assert torch.equal(saved[k], v), (folder, k)
    assert any(v.numel() > 100_000 for v in saved.values())  # a parameter ZeRO-3 keeps partitioned


def assert_eval_agrees(folder: Path, val: Path, out: Path) -> None:
    """final/metrics.json equals `sapiens eval` (one process) on the folder, metric for metric."""
    sapiens("eval", "--checkpoint", str(folder), "--ann", str(val), "--images", str(val.parent / "images"),
            "--out", str(out), "--device", "cpu", "eval.batch_size=4", "eval.pck_thr=0.3",
            log=out.with_suffix(".log"))  # fmt: skip
    got = json.loads((folder / "metrics.json").read_text())
    want = json.loads((out / "metrics.json").read_text())
    assert {k: v for k, v in got.items() if k != "step"} == want
    assert 0 < want["PCK@0.3"] < 1  # a number the weights decide


def _data(tmp_path: Path) -> tuple[Path, Path]:
    from sapiens_train.synth import synthesize

    kw = dict(size=(128, 96), scheme="coco17", people=(1, 1), progress=False)
    return synthesize(tmp_path / "train", 8, seed=0, **kw), synthesize(tmp_path / "val", 4, seed=1001, **kw)


def _data_args(train: Path, val: Path) -> list[str]:
    return [
        f"data.train_ann={train}",
        f"data.train_images={train.parent / 'images'}",
        f"data.val_ann={val}",
        f"data.val_images={val.parent / 'images'}",
    ]


@pytest.mark.slow
def test_zero3_finetune_saves_and_evaluates_the_whole_model(tmp_path):
    train, val = _data(tmp_path)
    run = tmp_path / "run"
    sapiens("finetune", *MODEL, *ENGINE, *_data_args(train, val), f"engine.run_dir={run}", nproc=2,
            log=tmp_path / "finetune.log")  # fmt: skip

    assert_same_weights(run / "final", zero_to_fp32(run, 3))
    best_step = json.loads((run / "best" / "metrics.json").read_text())["step"]
    assert_same_weights(run / "best", zero_to_fp32(run, best_step))
    assert_eval_agrees(run / "final", val, tmp_path / "eval")
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 3]


@pytest.mark.slow
def test_zero3_distill_saves_and_evaluates_the_whole_student(tmp_path):
    from sapiens_lite.models.pose import HeadConfig, build_pose_model

    train, val = _data(tmp_path)
    torch.manual_seed(0)
    teacher = build_pose_model("vit_test", "coco17", input_size=(128, 96), head=HeadConfig("vitpose", 32))
    teacher.save_pretrained(tmp_path / "teacher")
    run = tmp_path / "run"
    sapiens("distill", *MODEL, *ENGINE, *_data_args(train, val), f"engine.run_dir={run}",
            f"teacher.path={tmp_path / 'teacher'}", "teacher.precision=fp32", "teacher.zero3=true",
            "distill.feature_weight=0.1", "distill.teacher_layers=[0]", nproc=2,
            log=tmp_path / "distill.log")  # fmt: skip

    # The checkpoints hold the DistillStudent: the student and the feature projections.
    assert_same_weights(run / "final", zero_to_fp32(run, 3), prefix="student.")
    best_step = json.loads((run / "best" / "metrics.json").read_text())["step"]
    assert_same_weights(run / "best", zero_to_fp32(run, best_step), prefix="student.")
    assert_eval_agrees(run / "final", val, tmp_path / "eval")
