"""Backbone distillation through the real trainer: bad input is one line, a short run on unlabeled shards
lowers the token loss, and run_dir/backbone/ is a backbone that `sapiens finetune` starts from."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.distill_config import BackboneDistillConfig
from sapiens_lite.config import load_config
from sapiens_lite.loading import init_from, load_model
from sapiens_lite.models.pose import HeadConfig, PoseModel, build_pose_model
from sapiens_lite.models.vit import VisionTransformer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 synthesized images packed as unlabeled shards, and a tiny pose teacher at 128x96."""
    from sapiens_train.shards import PackOptions, collect_folder, pack
    from sapiens_train.synth import synthesize

    root = tmp_path_factory.mktemp("distill_backbone")
    ann = synthesize(
        root / "synth", 16, seed=3, size=(128, 96), scheme="coco17", people=(1, 1), progress=False
    )
    items, source = collect_folder(ann.parent / "images")
    pack(items, source, root / "shards", PackOptions(max_samples=6), progress=False)
    torch.manual_seed(0)
    build_pose_model("vit_test", "coco17", input_size=(128, 96), head=HeadConfig("simple")).save_pretrained(
        root / "teacher"
    )
    return {"root": root, "shards": root / "shards", "teacher": root / "teacher"}


def overrides(data, run_dir, *extra) -> list[str]:
    """A 48-wide, 3-block student at 64x48 learns blocks 1 and 2 from the teacher's blocks 0 and 1 at 128x96."""
    return [
        f"teacher.path={data['teacher']}",
        "teacher.precision=fp32",
        "teacher.img_size=[128, 96]",
        f"data.shards={data['shards']}",
        "data.img_size=[64, 48]",
        "data.num_workers=0",
        "model.arch=small_test",
        "model.embed_dim=48",
        "model.depth=3",
        "model.num_heads=3",
        "distill.student_layers=[1, 2]",
        "distill.teacher_layers=[0, -1]",
        f"engine.run_dir={run_dir}",
        "engine.total_steps=16",
        "engine.micro_batch_size=4",
        "engine.checkpoint_every=0",
        "engine.log_every=1",
        "engine.progress=false",
        "engine.tensorboard=false",
        "optim.lr=2e-3",
        "optim.warmup_steps=1",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["distill.teacher_layers=[0, 2]"], r"distill.teacher_layers: block index 2 is out of range for the teacher's 2"),
        (["distill.student_layers=[1, -4]"], r"distill.student_layers: block index -4 .* student \(small_test\)'s 3"),
        (["teacher.img_size=[128, 128]"], r"different aspect ratios"),
        (["data.shards={root}/nothing-{{000..001}}.tar"], r"does not exist"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_work(data, tmp_path, capsys, extra, message):
    import re

    from sapiens_lite.cli import main as sapiens

    extra = [e.format(root=data["root"]) for e in extra]
    assert sapiens(["distill-backbone", *overrides(data, tmp_path / "run", *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_short_run_learns_and_exports_a_backbone_that_finetuning_starts_from(data, tmp_path, capsys):
    from finetune.distill_backbone import train
    from sapiens_lite.cli import main as sapiens

    run_dir = tmp_path / "run"
    assert sapiens(["distill-backbone", "--dry-run", *overrides(data, run_dir)]) == 0
    assert "16 images, unlabeled); student 64x48 crops, teacher 128x96" in capsys.readouterr().out

    cfg = load_config(BackboneDistillConfig, [], overrides(data, run_dir))
    assert cfg.model.img_size == (64, 48)  # follows data.img_size
    engine, summary = train(cfg, resume=False)
    losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses

    student = load_model(run_dir)  # run_dir/backbone: a VisionTransformer folder, no projections
    assert isinstance(student, VisionTransformer) and student.config.embed_dim == 48
    for k, v in engine.module.backbone.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k
    assert json.loads((run_dir / "teacher.json").read_text())["checksum"] == summary["teacher_checksum"]

    # `sapiens finetune init.path=run_dir` takes the student's arch and weights.
    ft = load_config(
        FinetuneConfig,
        [],
        [f"init.path={run_dir}", "model.input_size=[64, 48]", "model.backbone.img_size=[64, 48]"],
    )
    assert (ft.model.backbone.embed_dim, ft.model.backbone.depth) == (48, 3)
    pose = PoseModel(ft.model)
    assert "backbone" in init_from(pose, str(run_dir))
    torch.testing.assert_close(pose.backbone.blocks[2].mlp.fc2.weight, student.blocks[2].mlp.fc2.weight)


def test_the_backbone_config_checks_its_sizes():
    from sapiens_lite.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.img_size \[64, 64\] differs from data.img_size"):
        load_config(BackboneDistillConfig, [], ["model.img_size=[64, 64]", "data.img_size=[64, 48]"])
    with pytest.raises(ConfigError, match="must pair up"):
        load_config(BackboneDistillConfig, [], ["distill.student_layers=[1, 2]"])
