"""Pose distillation through the real trainer on tiny models: bad input is one line before any work, a
short run brings the student towards the teacher and leaves the teacher untouched, resume is exact (and
refused with another teacher), a cached teacher gives the online losses, stage 2 trains only the head."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch
import yaml

from finetune.distill_config import BackboneDistillConfig, DistillConfig
from sapiens_lite.config import load_config
from sapiens_lite.errors import UserError
from sapiens_lite.loading import load_model
from sapiens_lite.models.pose import HeadConfig, PoseModel, build_pose_model
from sapiens_lite.models.vit import VisionTransformer, ViTConfig

ROOT = Path(__file__).resolve().parents[2]


# ---- shared data and teacher ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 synthesized 128x96 images (one person each), a val set, the same images packed into shards, and a
    tiny teacher at 128x96 (random weights: the tests are about the machinery, not about accuracy)."""
    from sapiens_train.shards import PackOptions, collect_coco, pack
    from sapiens_train.synth import synthesize

    root = tmp_path_factory.mktemp("distill")
    train = synthesize(
        root / "train", 12, seed=0, size=(128, 96), scheme="coco17", people=(1, 1), progress=False
    )
    val = synthesize(root / "val", 3, seed=7, size=(128, 96), scheme="coco17", people=(1, 1), progress=False)
    items, source = collect_coco(train, train.parent / "images")
    pack(items, source, root / "shards", PackOptions(max_samples=5), progress=False)
    torch.manual_seed(0)
    teacher = build_pose_model("vit_test", "coco17", input_size=(128, 96), head=HeadConfig("vitpose", 32))
    for (
        m
    ) in teacher.head.modules():  # heatmaps of the size of real ones (order 1), not an initialisation's ~0
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(m.weight)
    teacher.save_pretrained(root / "teacher")
    return {"root": root, "train": train, "val": val, "shards": root / "shards", "teacher": root / "teacher"}


def overrides(data, run_dir, *extra) -> list[str]:
    """A 64x48 student (vit_test, simple head) of the 128x96 teacher, 4 people per step, no workers."""
    return [
        f"teacher.path={data['teacher']}",
        "teacher.precision=fp32",
        f"data.train_ann={data['train']}",
        f"data.train_images={data['train'].parent / 'images'}",
        "data.num_workers=0",
        "model.input_size=[64, 48]",
        "model.backbone.img_size=[64, 48]",
        "model.sigma=1.0",
        "model.head.kind=simple",
        f"engine.run_dir={run_dir}",
        "engine.total_steps=6",
        "engine.micro_batch_size=4",
        "engine.checkpoint_every=3",
        "engine.log_every=1",
        "engine.progress=false",
        "engine.tensorboard=false",
        "optim.lr=2e-3",
        "optim.warmup_steps=1",
        "optim.layer_decay=null",
        *extra,
    ]


def log_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


# ---- configs and bad input --------------------------------------------------------------------------


def test_the_distill_configs_resolve(monkeypatch):
    import huggingface_hub.constants

    # Run dirs that do not exist here read like Hub repo ids: look them up offline (a quick miss).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    files = sorted(glob.glob(str(ROOT / "configs/distill/*.yaml")))
    assert len(files) >= 4
    for f in files:
        cls = BackboneDistillConfig if "backbone" in Path(f).name else DistillConfig
        cfg = load_config(cls, [f])
        assert cfg.teacher.path, f
        if cls is DistillConfig:
            PoseModel(cfg.model)  # the student builds
            assert cfg.distill.stage == (2 if "stage2" in Path(f).name else 1), f
        raw = Path(f).read_text()
        assert "betas" not in raw and not any(line.startswith("_base_") for line in raw.splitlines()), f


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.scheme=coco_wholebody133"], r"predicts 17 keypoints \(coco17\) but the student's model.scheme"),
        (["distill.feature_weight=1", "distill.student_layers=[5]", "distill.teacher_layers=[1]"],
         r"distill.student_layers: block index 5 is out of range for the student \(vit_test\)'s 2 blocks"),
        (["distill.feature_weight=1", "distill.teacher_layers=[-3]"], r"distill.teacher_layers: block index -3"),
        (["distill.feature_weight=1", "distill.projection=false"],
         r"projection=false, but the student's feature maps are \[64, 4, 3\].*teacher's \[64, 8, 6\]"),
        (["teacher.input_size=[128, 128]"], r"different aspect ratios"),
        (["distill.stage=2", "teacher.path={teacher}"], r"distill.stage=2 trains a copy of teacher.path .*teacher, but model.backbone.img_size=\(64, 48\) differs"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_work(data, tmp_path, capsys, extra, message):
    from sapiens_lite.cli import main as sapiens

    run_dir = tmp_path / "run"
    extra = [e.format(teacher=data["teacher"]) for e in extra]
    assert sapiens(["distill", *overrides(data, run_dir, *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sapiens distill: error: "), err
    assert __import__("re").search(message, err), err
    assert not run_dir.exists()


def test_a_teacher_that_is_not_a_pose_model_is_refused(data, tmp_path, capsys):
    from sapiens_lite.cli import main as sapiens

    VisionTransformer(ViTConfig("vit_test", img_size=(128, 96))).save_pretrained(tmp_path / "backbone")
    args = overrides(data, tmp_path / "run", f"teacher.path={tmp_path / 'backbone'}")
    assert sapiens(["distill", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a 'vit' model (a backbone), not a pose model" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="teacher.path is required"):
        from finetune.distill import validate

        validate(load_config(DistillConfig, [], overrides(data, tmp_path / "run", "teacher.path=")))


def test_dry_run_prints_the_plan(data, tmp_path, capsys):
    from sapiens_lite.cli import main as sapiens

    args = overrides(data, tmp_path / "run", "distill.feature_weight=0.1", "distill.student_layers=[0, -1]",
                     "distill.teacher_layers=[1, 1]")  # fmt: skip
    assert sapiens(["distill", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("# resolved config\n")[1].split("# DeepSpeed config")[0])
    assert resolved["distill"]["student_layers"] == [0, -1]
    assert "student 64x48 crops (sigma 1.0), teacher 128x96" in out and "12 people" in out
    assert "stage 1: GT mse + 1 x mse + 0.1 x features [0, -1] -> [1, 1], linear decay" in out
    assert not (tmp_path / "run").exists()


# ---- training ---------------------------------------------------------------------------------------


def _agreement(student: PoseModel, teacher: PoseModel, data) -> float:
    """MSE between the student's heatmaps and the teacher's (resampled) on the val people's crops."""
    from finetune.data import TopDownDataset
    from finetune.distill_losses import resample_heatmaps

    crops = {}
    for size in ((64, 48), (128, 96)):
        ds = TopDownDataset.from_coco(data["val"], data["val"].parent / "images", scheme="coco17",
                                      input_size=size, train=False)  # fmt: skip
        crops[size] = torch.stack([ds[i]["img"] for i in range(len(ds))])
    with torch.no_grad():
        t = resample_heatmaps(teacher.eval()(crops[(128, 96)]), (16, 12))
        return float(((student.eval()(crops[(64, 48)]) - t) ** 2).mean())


def test_short_run_moves_the_student_towards_the_teacher_and_leaves_the_teacher_alone(data, tmp_path):
    from finetune.distill import flops_per_sample, train, validate
    from sapiens_lite.flops import forward_flops

    run_dir = tmp_path / "run"
    cfg = load_config(
        DistillConfig,
        [],
        overrides(data, run_dir, "engine.total_steps=12", "loss.loss_weight=0.01", "distill.feature_weight=0.1",
                  "distill.student_layers=[0, -1]", "distill.teacher_layers=[1, 1]"),
    )  # fmt: skip
    torch.manual_seed(cfg.engine.seed)  # the engine builds the student after this same seeding
    before = PoseModel(cfg.model)
    teacher_disk = load_model(data["teacher"])
    plan = validate(cfg)
    engine, summary, teacher = train(cfg, plan, resume=False)

    # The teacher in memory is bit-identical to the one on disk, and only the student's weights are saved.
    for k, v in teacher_disk.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[k], v), k
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    states = torch.load(
        next((run_dir / "checkpoints").glob("step_*/mp_rank_00_model_states.pt")), weights_only=False
    )
    assert {k.split(".")[0] for k in states["module"]} == {"student", "projections"}
    assert json.loads((run_dir / "teacher.json").read_text())["checksum"] == summary["teacher_checksum"]

    final = load_model(run_dir)  # run_dir/final, a PoseModel folder
    assert isinstance(final, PoseModel) and final.config == cfg.model
    assert _agreement(final, teacher_disk, data) < 0.75 * _agreement(
        before, teacher_disk, data
    )  # 0.051 vs 0.079
    for k, v in engine.module.student.state_dict().items():
        assert torch.equal(final.state_dict()[k], v), k

    log = log_of(run_dir)
    assert [r["kd_scale"] for r in log] == pytest.approx([1 - s / 12 for s in range(12)])  # DWPose's decay
    assert all(r["kd_feature"] > 0 and r["kd_heatmap"] > 0 for r in log)
    # MFU counts the student's training (3x forward) and the teacher's forward (1x).
    student_flops, teacher_flops = (
        forward_flops(cfg.model.backbone),
        forward_flops(plan.config.backbone, (128, 96)),
    )
    assert flops_per_sample(cfg, plan) == pytest.approx(student_flops + teacher_flops / 3)
    assert all(r["mfu"] > 0 for r in log)


def test_resume_is_exact_and_refused_with_another_teacher(data, tmp_path, monkeypatch):
    from finetune import distill

    extra = ("distill.feature_weight=0.1", "distill.heatmap_loss=kl", f"data.val_ann={data['val']}",
             f"data.val_images={data['val'].parent / 'images'}", "eval.every_steps=2")  # fmt: skip
    ref = load_config(DistillConfig, [], overrides(data, tmp_path / "ref", *extra))
    distill.main(ref, resume=False)

    cfg = load_config(DistillConfig, [], overrides(data, tmp_path / "run", *extra))
    calls = {"n": 0}
    forward = distill.TeacherNet.forward

    def crash_on_step_5(self, x):  # the checkpoint of step 3 is on disk by then
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return forward(self, x)

    monkeypatch.setattr(distill.TeacherNet, "forward", crash_on_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill.main(cfg)
    monkeypatch.setattr(distill.TeacherNet, "forward", forward)

    # Another teacher (other weights at the same path) is refused before any checkpoint is loaded.
    other = tmp_path / "other_teacher"
    torch.manual_seed(123)
    build_pose_model(
        "vit_test", "coco17", input_size=(128, 96), head=HeadConfig("vitpose", 32)
    ).save_pretrained(other)
    bad = load_config(DistillConfig, [], overrides(data, tmp_path / "run", *extra, f"teacher.path={other}"))
    with pytest.raises(UserError, match=r"was trained with the teacher .*teacher .*other_teacher .* differs"):
        distill.main(bad)

    summary = distill.main(cfg)  # resumes at step 3
    assert summary["resumed_from"] == "step_00000003"
    keys = ("loss", "gt", "kd_heatmap", "kd_feature", "kd_scale", "lr")
    got = {r["step"]: [r[k] for k in keys] for r in log_of(tmp_path / "run")}  # the resumed steps' lines last
    want = {r["step"]: [r[k] for k in keys] for r in log_of(tmp_path / "ref")}
    assert got == want
    a, b = load_model(tmp_path / "run"), load_model(tmp_path / "ref")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # the evaluation of step 4 ran before the crash and again after the resume from step 3: listed once
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    ref_evals = [json.loads(line) for line in (tmp_path / "ref" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert [e["AP"] for e in evals] == [e["AP"] for e in ref_evals]


def test_a_cached_teacher_gives_the_online_losses(data, tmp_path, capsys):
    """Online and cached runs over the same shards with 2 augmentation views: 12 steps of 4 over 12 images
    are 4 epochs, so both views are used twice; every logged loss is the same."""
    from finetune.distill import main
    from sapiens_lite.cli import main as sapiens

    shards = [f"data.train_shards={data['shards']}", "data.train_ann=", "data.train_images=", "data.views=2",
              "engine.total_steps=12", "distill.feature_weight=0.1", "distill.teacher_layers=[0]",
              f"teacher.cache={tmp_path / 'cache'}", "teacher.batch_size=3"]  # fmt: skip
    online = load_config(DistillConfig, [], overrides(data, tmp_path / "online", *shards, "teacher.cache="))
    main(online, resume=False)
    assert sapiens(["distill-cache", "--no-progress", *overrides(data, tmp_path / "unused", *shards)]) == 0
    cached = load_config(DistillConfig, [], overrides(data, tmp_path / "cached", *shards, "teacher.path="))
    summary = main(cached, resume=False)
    assert (
        summary["teacher_checksum"]
        == json.loads((tmp_path / "online" / "teacher.json").read_text())["checksum"]
    )
    a, b = log_of(tmp_path / "online"), log_of(tmp_path / "cached")
    assert len(a) == len(b) == 12 and {r["epoch"] for r in a} == {0, 1, 2, 3}
    for x, y in zip(a, b):
        for k in ("loss", "gt", "kd_heatmap", "kd_feature"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), (x["step"], k)

    # A cache made for other settings is refused, naming the setting.
    capsys.readouterr()
    args = overrides(data, tmp_path / "x", *shards, "teacher.path=", "data.views=3")
    assert sapiens(["distill", *args]) == 2
    assert "was written for views=2, this run has 3" in capsys.readouterr().err


def test_stage_two_trains_only_the_head_of_the_teacher_copy(data, tmp_path):
    from finetune.distill import main

    stage1 = load_config(DistillConfig, [], overrides(data, tmp_path / "s1"))
    main(stage1, resume=False)
    # Stage 2: the teacher is the stage-1 run; `model` follows it (its settings here agree with it).
    stage2 = load_config(
        DistillConfig,
        [],
        overrides(data, tmp_path / "s2", f"teacher.path={tmp_path / 's1'}", "distill.stage=2",
                  "distill.heatmap_loss=kl", "engine.total_steps=3"),
    )  # fmt: skip
    assert stage2.model == stage1.model and not stage2.distill.decays
    summary = main(stage2, resume=False)
    assert {r["kd_scale"] for r in log_of(tmp_path / "s2")} == {1.0}
    assert summary["steps"] == 3
    before, after = load_model(tmp_path / "s1").state_dict(), load_model(tmp_path / "s2").state_dict()
    for k, v in before.items():
        if k.startswith("backbone."):
            assert torch.equal(after[k], v), k
    assert not torch.equal(after["head.conv.weight"], before["head.conv.weight"])
