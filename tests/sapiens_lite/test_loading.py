"""One way to load a model (sapiens_lite/loading.py): folders, run dirs, Hub repos, foreign files."""

from __future__ import annotations

import re

import pytest
import torch

from sapiens_lite import load_model
from sapiens_lite.convert.sapiens import BACKBONE_KEYS, HEAD_KEYS
from sapiens_lite.errors import UserError
from sapiens_lite.loading import (
    MODEL_CLASSES,
    backbone_config,
    init_from,
    load_pose_model,
    locate,
    model_config,
)
from sapiens_lite.models.pose import PoseModel, build_pose_model
from sapiens_lite.models.vit import VisionTransformer, ViTConfig
from tests.sapiens_lite.test_hub import assert_same_weights, hf_cache, put_in_cache  # noqa: F401


def _sapiens_names(sd: dict, key_map: dict, prefix: str = "") -> dict:
    """Our names -> the Sapiens checkpoint's (the converter's key map read backwards)."""
    inverse = {v: k for k, v in key_map.items() if v is not None}
    out = {}
    for k, v in sd.items():
        m = re.search(r"\.(\d+)\.", k)
        pattern = k.replace(f".{m.group(1)}.", ".{}.", 1) if m else k
        out[prefix + (inverse[pattern].replace("{}", m.group(1)) if m else inverse[k])] = v
    return out


def _pose(scheme="coco17", seed=0) -> PoseModel:
    torch.manual_seed(seed)
    return build_pose_model("vit_test", scheme, input_size=(64, 48))


def test_the_class_comes_from_model_type(tmp_path):
    pose, vit = _pose(), VisionTransformer(ViTConfig("vit_test", img_size=(64, 48)))
    pose.save_pretrained(tmp_path / "pose")
    vit.save_pretrained(tmp_path / "vit")
    for folder, src in ((tmp_path / "pose", pose), (tmp_path / "vit", vit)):
        model = load_model(folder)
        assert type(model) is type(src) and not model.training
        assert_same_weights(model, src)
    assert set(MODEL_CLASSES) == {"vit", "pose"}
    assert model_config(tmp_path / "pose")[0] == "pose"
    assert backbone_config(tmp_path / "pose") == pose.config.backbone.resolved()


def test_run_dirs_resolve_to_their_exported_model(tmp_path):
    pose = _pose()
    pose.save_pretrained(tmp_path / "ft" / "final")
    (tmp_path / "ft" / "checkpoints").mkdir()
    assert locate(tmp_path / "ft") == ("ours", str(tmp_path / "ft" / "final"))
    assert isinstance(load_model(tmp_path / "ft"), PoseModel)
    VisionTransformer(ViTConfig("vit_test", img_size=(64, 48))).save_pretrained(tmp_path / "pre" / "backbone")
    assert isinstance(load_model(tmp_path / "pre"), VisionTransformer)
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="run dir without an exported model.*export-backbone"):
        load_model(tmp_path / "unfinished")


def test_hub_repo_through_the_offline_cache(hf_cache):  # noqa: F811
    pose = _pose(seed=3)
    put_in_cache(hf_cache, "org/pose-test", pose, "d" * 40, refs=("main",))
    model = load_model("org/pose-test")
    assert isinstance(model, PoseModel)
    assert_same_weights(model, pose)
    assert backbone_config("org/pose-test").depth == 2
    with pytest.raises(UserError, match="org/missing: cannot read config.json from the Hub"):
        load_model("org/missing")


def test_foreign_files_are_converted(tmp_path):
    src = _pose("goliath308", seed=4)
    sd = _sapiens_names(src.backbone.state_dict(), BACKBONE_KEYS, "backbone.")
    sd.update(_sapiens_names(src.head.state_dict(), HEAD_KEYS, "head."))
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "pose308.pth")
    model = load_model(tmp_path / "pose308.pth")
    assert isinstance(model, PoseModel) and model.scheme.name == "goliath308"
    x = torch.randn(1, 3, 64, 48)
    torch.testing.assert_close(model(x), src.eval()(x), rtol=1e-5, atol=1e-5)
    assert model_config(tmp_path / "pose308.pth") is None  # its shape is known only once converted
    with pytest.raises(UserError, match=r"308 keypoints.*expected 17"):
        load_pose_model(tmp_path / "pose308.pth", expected_scheme="coco17")


def test_bad_paths_name_the_problem(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="notes.txt: a file, but not a checkpoint"):
        load_model(tmp_path / "notes.txt")
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        load_model(tmp_path / "bad")
    VisionTransformer(ViTConfig("vit_test", img_size=(64, 48))).save_pretrained(tmp_path / "vit")
    with pytest.raises(UserError, match="holds a backbone, not a pose model"):
        load_pose_model(tmp_path / "vit")
    with pytest.raises(UserError, match="revision='v1' applies to Hub repos"):
        load_model(tmp_path / "vit", revision="v1")


def test_init_from_a_pose_model_into_another_grid(tmp_path):
    src = _pose(seed=5)
    src.save_pretrained(tmp_path / "pose")
    target = build_pose_model("vit_test", "coco17", input_size=(96, 64))  # another grid: resampled
    what = init_from(target, tmp_path / "pose")
    assert what == f"pose checkpoint {tmp_path / 'pose'} (backbone + head)"
    torch.testing.assert_close(target.head.final_layer.weight, src.head.final_layer.weight)
    torch.testing.assert_close(
        target.backbone.blocks[1].mlp.fc2.weight, src.backbone.blocks[1].mlp.fc2.weight
    )
    assert target.backbone.pos_embed.shape == (1, 6 * 4, 64)
