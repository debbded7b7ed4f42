"""Fine-tuning: the configs resolve, starting weights load (and refuse the wrong head), a short real run learns."""

import glob
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from finetune.config import FinetuneConfig
from sapiens_lite.config import load_config
from sapiens_lite.convert.sapiens import BACKBONE_KEYS, HEAD_KEYS
from sapiens_lite.errors import ConfigError, UserError
from sapiens_lite.loading import init_from, load_pose_model, locate
from sapiens_lite.models.pose import HeadConfig, PoseConfig, PoseModel, build_pose_model
from sapiens_lite.models.vit import VisionTransformer, ViTConfig

ROOT = Path(__file__).resolve().parents[2]
SAPIENS_CONFIGS = sorted(glob.glob(str(ROOT / "configs/finetune/sapiens_*.yaml")))
SCHEMES = {"coco17": "coco17", "wholebody133": "coco_wholebody133", "goliath308": "goliath308"}


def test_the_twelve_sapiens_configs_resolve_consistently():
    assert len(SAPIENS_CONFIGS) == 12
    for f in SAPIENS_CONFIGS:
        size, ds = re.match(r"sapiens_(\d+\.?\d*b)_(\w+)\.yaml", Path(f).name).groups()
        cfg = load_config(FinetuneConfig, [f])
        assert cfg.model.backbone.arch == f"sapiens_{size}" and cfg.model.scheme == SCHEMES[ds], f
        assert cfg.model.input_size == (1024, 768) and cfg.model.backbone.patch_padding == 2, f
        assert cfg.model.sigma == 6.0 and not cfg.model.backbone.cls_token, f
        assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.weight_decay == 0.1, f
        assert cfg.optim.lr == (5e-5 if ds == "goliath308" else 5e-4), f
        assert cfg.optim.layer_decay in (0.85, 0.95) and cfg.optim.warmup_steps == 500, f
        assert cfg.optim.schedule == "step" and cfg.optim.milestones[-1] < cfg.engine.total_steps, f
        # 210 epochs with the lr dropped at epochs 170 and 200.
        assert cfg.optim.milestones[0] / cfg.engine.total_steps == pytest.approx(170 / 210, abs=1e-3), f
        assert cfg.engine.global_batch_size == 512 and cfg.engine.micro_batch_size == 64, f
        assert cfg.eval.every_steps > 0 and cfg.init.path.endswith(".pth"), f
        # Each file holds only differences: no key that repeats the dataclass default.
        raw = Path(f).read_text()
        assert "betas" not in raw and "weight_decay" not in raw and "_base_" not in raw, f
    tiny = sorted(glob.glob(str(ROOT / "configs/finetune/tiny_cpu_*.yaml")))
    assert len(tiny) == 2
    for f in tiny:
        cfg = load_config(FinetuneConfig, [f])
        heatmaps = PoseModel(cfg.model)(torch.zeros(2, 3, *cfg.model.input_size))
        assert heatmaps.shape == (2, cfg.model.num_keypoints, *cfg.model.heatmap_size)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="valid keys"):
        load_config(FinetuneConfig, [], ["eval.every_step=3"])
    with pytest.raises(ConfigError, match="nms_thr"):
        load_config(FinetuneConfig, [], ["eval.nms_thr=0"])


def _pose_cfg(scheme="coco17") -> PoseConfig:
    return build_pose_model("vit_test", scheme, input_size=(64, 48)).config


def _to_sapiens_names(sd: dict, key_map: dict, prefix: str = "") -> dict:
    """Our names -> the Sapiens checkpoint's (the converter's key map read backwards)."""
    inverse = {v: k for k, v in key_map.items() if v is not None}
    out = {}
    for k, v in sd.items():
        m = re.search(r"\.(\d+)\.", k)
        pattern = k.replace(f".{m.group(1)}.", ".{}.", 1) if m else k
        src = inverse[pattern].replace("{}", m.group(1)) if m else inverse[k]
        out[prefix + src] = v
    return out


def test_init_from_sapiens_pretrain_pth_drops_cls_and_resamples_grid(tmp_path):
    torch.manual_seed(0)
    # A Sapiens-style pretraining encoder: cls token, square grid (4x4 here standing in for 64x64).
    vit = VisionTransformer(ViTConfig("vit_test", img_size=(64, 64), cls_token=True))
    torch.save(_to_sapiens_names(vit.state_dict(), BACKBONE_KEYS), tmp_path / "pretrain.pth")
    assert locate(str(tmp_path / "pretrain.pth")) == ("file", str(tmp_path / "pretrain.pth"))
    model = PoseModel(_pose_cfg())
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    init_from(model, str(tmp_path / "pretrain.pth"))
    torch.testing.assert_close(model.backbone.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert model.backbone.pos_embed.shape == (1, 4 * 3, 64)  # 4x4 (+cls) -> 4x3, no cls
    assert not hasattr(model.backbone, "cls_token") or model.backbone.cls_token is None
    for k, v in model.head.state_dict().items():  # a backbone checkpoint leaves the head alone
        torch.testing.assert_close(v, head_before[k])


def test_init_from_backbone_folder_and_pose_folder(tmp_path):
    torch.manual_seed(1)
    vit = VisionTransformer(ViTConfig("vit_test", img_size=(64, 64), cls_token=True))
    vit.save_pretrained(tmp_path / "run" / "backbone")
    model = PoseModel(_pose_cfg())
    assert locate(str(tmp_path / "run")) == ("ours", str(tmp_path / "run" / "backbone"))
    init_from(model, str(tmp_path / "run"))
    torch.testing.assert_close(model.backbone.blocks[0].mlp.fc1.weight, vit.blocks[0].mlp.fc1.weight)

    src = PoseModel(_pose_cfg())
    src.save_pretrained(tmp_path / "pose")
    init_from(model, str(tmp_path / "pose"))
    torch.testing.assert_close(model.head.final_layer.weight, src.head.final_layer.weight)


def test_wrong_head_is_a_clear_error_unless_the_head_is_not_loaded(tmp_path):
    src = PoseModel(_pose_cfg("goliath308"))
    src.save_pretrained(tmp_path / "g308")
    model = PoseModel(_pose_cfg("coco17"))
    with pytest.raises(UserError, match=r"g308.*308 keypoints, expected 17"):
        init_from(model, str(tmp_path / "g308"))
    init_from(model, str(tmp_path / "g308"), load_head=False)  # backbone only: fine
    # A Sapiens pose .pth with a 308 head, into a 17-keypoint config.
    sd = _to_sapiens_names(src.backbone.state_dict(), BACKBONE_KEYS, "backbone.")
    sd.update(_to_sapiens_names(src.head.state_dict(), HEAD_KEYS, "head."))
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "pose308.pth")
    with pytest.raises(UserError, match=r"pose308.pth.*308 keypoints, expected 17"):
        init_from(model, str(tmp_path / "pose308.pth"))
    with pytest.raises(UserError, match=r"g308.*308 keypoints.*expected 17"):
        load_pose_model(str(tmp_path / "g308"), expected_scheme="coco17")
    # Same K, another head kind: named too.
    build_pose_model(
        "vit_test", "coco17", input_size=(64, 48), head=HeadConfig("vitpose", 32)
    ).save_pretrained(tmp_path / "vp")
    with pytest.raises(UserError, match=r"vp: its pose head does not fit model.head \(kind=sapiens"):
        init_from(model, str(tmp_path / "vp"))


def test_bad_init_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        locate(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a model folder"):
        locate(str(tmp_path / "empty"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="export-backbone"):
        locate(str(tmp_path / "run"))


def _custom_backbone(folder, cls_token=True) -> VisionTransformer:
    """A backbone of a size no arch table holds (48 wide, 3 deep, 3 heads), saved as a run's backbone/."""
    torch.manual_seed(2)
    vit = VisionTransformer(
        ViTConfig("custom", img_size=(64, 64), embed_dim=48, depth=3, num_heads=3, cls_token=cls_token)
    )
    vit.save_pretrained(folder)
    return vit


def test_the_init_checkpoint_brings_its_backbone_shape(tmp_path):
    """init.path names a run dir / folder of ours: model.backbone takes its arch unless the config sets it."""
    vit = _custom_backbone(tmp_path / "run" / "backbone")
    size = ["model.input_size=[64, 48]", "model.backbone.img_size=[64, 48]"]
    cfg = load_config(FinetuneConfig, [], [f"init.path={tmp_path / 'run'}", *size])
    b = cfg.model.backbone
    assert (b.arch, b.embed_dim, b.depth, b.num_heads) == ("custom", 48, 3, 3)
    assert not b.cls_token and b.img_size == (64, 48)  # not inherited: the fine-tuning's own choices
    model = PoseModel(cfg.model)
    init_from(model, str(tmp_path / "run"))  # the weights fit the derived shape
    torch.testing.assert_close(model.backbone.blocks[2].attn.proj.weight, vit.blocks[2].attn.proj.weight)
    # The same values set by the user agree: fine.
    same = load_config(FinetuneConfig, [], [f"init.path={tmp_path / 'run'}", "model.backbone.depth=3", *size])
    assert same.model.backbone == cfg.model.backbone
    # A conflict the user did set is one clear line naming both sides.
    with pytest.raises(
        ConfigError, match=r"does not fit init.path .*run \(custom\): depth=2 \(checkpoint 3\)"
    ):
        load_config(FinetuneConfig, [], [f"init.path={tmp_path / 'run'}", "model.backbone.depth=2", *size])
    with pytest.raises(ConfigError, match=r"model.backbone \(vit_test\).*embed_dim=64 \(checkpoint 48\)"):
        load_config(
            FinetuneConfig, [], [f"init.path={tmp_path / 'run'}", "model.backbone.arch=vit_test", *size]
        )
    # A foreign file says nothing about its shape until converted: the config decides, as before.
    cfg = load_config(FinetuneConfig, [], [f"init.path={tmp_path / 'x.pth'}"])
    assert cfg.model.backbone.arch == "vit_test"


def test_the_tiny_pretraining_run_starts_the_tiny_fine_tuning_config(tmp_path):
    """The README's chain: configs/pretrain/tiny_cpu.yaml's encoder, exported as the run's backbone/ (what
    `sapiens pretrain` writes), starts configs/finetune/tiny_cpu_coco17.yaml with no extra setting."""
    import dataclasses

    from pretrain.config import PretrainConfig

    enc = load_config(PretrainConfig, [ROOT / "configs/pretrain/tiny_cpu.yaml"]).model.encoder
    VisionTransformer(dataclasses.replace(enc, pos_embed="learned")).save_pretrained(
        tmp_path / "run" / "backbone"
    )
    cfg = load_config(
        FinetuneConfig, [ROOT / "configs/finetune/tiny_cpu_coco17.yaml"], [f"init.path={tmp_path / 'run'}"]
    )
    init_from(PoseModel(cfg.model), str(tmp_path / "run"))


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    from sapiens_lite.cli import main as sapiens
    from sapiens_train.synth import synthesize

    ann = synthesize(
        tmp_path / "data", 6, seed=0, size=(96, 72), scheme="coco17", people=(1, 1), progress=False
    )
    _custom_backbone(tmp_path / "run" / "backbone")
    args = [
        "finetune",
        "--dry-run",
        f"data.train_ann={ann}",
        f"data.train_images={ann.parent / 'images'}",
        f"init.path={tmp_path / 'run'}",
        "model.input_size=[64, 48]",
        "model.backbone.img_size=[64, 48]",
        f"engine.run_dir={tmp_path / 'ft'}",
        "engine.micro_batch_size=2",
        "engine.total_steps=10",
        "optim.warmup_steps=1",
    ]
    assert sapiens(args) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("# resolved config\n")[1].split("# DeepSpeed config")[0])
    assert resolved["model"]["backbone"]["embed_dim"] == 48  # from the init checkpoint
    assert '"train_batch_size": 2' in out
    assert "layer_4_decay" in out and "lr_scale=0.85" in out  # layer-wise decay over 3 blocks + head
    assert "6 people" in out and "steps = 3.33 epochs" in out
    assert not (tmp_path / "ft").exists()


# ---- a real (short) training run ----------------------------------------------------------------


def _synth(tmp_path, name, n, seed):
    from sapiens_train.synth import synthesize

    return synthesize(
        tmp_path / name, n, seed=seed, size=(256, 192), scheme="coco17", people=(1, 2), progress=False
    )


@pytest.mark.slow
def test_short_training_on_synthetic_people_beats_the_untrained_model(tmp_path):
    """A smaller version of configs/finetune/tiny_cpu_coco17.yaml (300 images, 300 steps of 16) through the
    real trainer; the AP on held-out people (another synth seed) must clear a floor far above an untrained
    model's. Measured with this recipe: untrained AP 0.000 (PCK@0.05 0.013); after training AP 0.020 and
    0.026 (two seeds), PCK 0.26-0.27. Floors: AP > 0.01, PCK > 0.15.
    """
    from finetune.config import EvalConfig
    from finetune.evaluate import evaluate_model
    from finetune.train import main

    train_json = _synth(tmp_path, "train", 300, seed=0)
    val_json = _synth(tmp_path, "val", 50, seed=1001)
    overrides = [
        f"data.train_ann={train_json}",
        f"data.train_images={train_json.parent / 'images'}",
        f"data.val_ann={val_json}",
        f"data.val_images={val_json.parent / 'images'}",
        f"engine.run_dir={tmp_path / 'run'}",
        "engine.total_steps=300",
        "optim.warmup_steps=50",
        "engine.micro_batch_size=16",
        "engine.checkpoint_every=300",
        "engine.progress=false",
        "engine.tensorboard=false",
        "eval.every_steps=0",
    ]
    cfg = load_config(FinetuneConfig, [ROOT / "configs/finetune/tiny_cpu_coco17.yaml"], overrides)
    torch.manual_seed(cfg.engine.seed)
    untrained = evaluate_model(
        PoseModel(cfg.model).eval(), val_json, val_json.parent / "images", EvalConfig(), progress=False
    )
    final = main(cfg)["metrics"]
    assert final["AP"] > max(0.01, 10 * untrained["AP"]), (untrained["AP"], final["AP"])
    assert final["PCK@0.05"] > max(0.15, 5 * untrained["PCK@0.05"]), (untrained, final)
    saved = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    assert saved["AP"] == final["AP"]
    # The final folder is a complete pose model: reloaded, it scores the same.
    reloaded = PoseModel.from_pretrained(tmp_path / "run" / "final").eval()
    again = evaluate_model(reloaded, val_json, val_json.parent / "images", cfg.eval, progress=False)
    assert np.isclose(again["AP"], final["AP"])
