"""Contract tests for the pose model: output shapes, flip test, K-mismatch errors, the Hub round trip.
The heads' key names are checked in test_heads.py."""

import json

import pytest
import torch

from sapiens_lite.codec import flip_heatmaps
from sapiens_lite.errors import UserError
from sapiens_lite.models.heads import HeadConfig
from sapiens_lite.models.pose import (
    PoseConfig,
    PoseModel,
    build_pose_model,
    check_head_keypoints,
    head_num_keypoints,
)
from sapiens_lite.models.vit import ViTConfig

INPUT = (64, 48)


def tiny(kind="sapiens", scheme="coco17", channels=None, flip_test=True):
    cfg = PoseConfig(
        backbone=ViTConfig(arch="vit_test", img_size=INPUT, patch_padding=2),
        head=HeadConfig(kind=kind, channels=channels),
        scheme=scheme,
        input_size=INPUT,
        sigma=2.0,
        flip_test=flip_test,
    )
    torch.manual_seed(0)
    return PoseModel(cfg).eval()


@pytest.mark.parametrize("kind", ["sapiens", "vitpose", "simple"])
def test_output_is_quarter_resolution(kind):
    model = tiny(kind, channels=None if kind == "simple" else 16)
    assert model.config.heatmap_size == (16, 12)
    out = model(torch.randn(2, 3, *INPUT))
    assert out.shape == (2, 17, 16, 12)
    assert model.predict(torch.randn(1, 3, *INPUT)).shape == (1, 17, 16, 12)


def test_flip_test_is_flip_equivariant_and_differs_from_plain_forward():
    torch.manual_seed(0)
    model = tiny()
    with torch.no_grad():  # make the head non-trivial
        model.head.final_layer.weight.normal_(std=1.0)
    x = torch.randn(1, 3, *INPUT)
    flip_index = model.scheme.flip_index
    p = model.predict(x)
    # One batched pass vs two single passes differ by float rounding, relative to the heatmaps' scale.
    atol = 1e-5 * float(p.abs().max())
    p_mirror = model.predict(x.flip(-1))
    # Averaging with the mirror view makes the prediction commute with mirroring.
    torch.testing.assert_close(p_mirror, flip_heatmaps(p, flip_index), atol=atol, rtol=1e-4)
    plain = model.predict(x, flip_test=False)
    torch.testing.assert_close(plain, model(x))
    assert not torch.allclose(plain, p, atol=100 * atol)
    expected = 0.5 * (model(x) + flip_heatmaps(model(x.flip(-1)), flip_index))
    torch.testing.assert_close(p, expected, atol=atol, rtol=1e-4)


def test_checkpoint_with_wrong_keypoint_count_is_a_user_error():
    model = tiny(scheme="coco17")
    other = build_pose_model("vit_test", "coco_wholebody133", input_size=INPUT)
    sd = other.state_dict()
    assert head_num_keypoints(sd, "sapiens") == 133
    with pytest.raises(UserError, match=r"ckpt\.pth.*133 keypoints.*'coco17' has 17"):
        model.load_weights(sd, source="ckpt.pth")
    with pytest.raises(
        UserError, match=r"17: coco17, 133: coco_wholebody133, 308: goliath308, or a scheme JSON"
    ):
        model.load_weights(sd, source="ckpt.pth")
    with pytest.raises(UserError, match="133"):
        check_head_keypoints(sd, model.config, "x")


def test_config_validation():
    with pytest.raises(ValueError, match="img_size"):
        PoseConfig(backbone=ViTConfig(img_size=(256, 192)), input_size=(1024, 768))
    with pytest.raises(ValueError, match="multiples of 16"):
        PoseConfig(input_size=(250, 192))
    with pytest.raises(UserError, match="unknown keypoint scheme"):
        PoseConfig(scheme="nope")
    with pytest.raises(UserError, match="nope.json: keypoint scheme file not found"):
        PoseConfig(scheme="nope.json")
    assert PoseConfig().heatmap_size == (256, 192)


def test_hub_round_trip(tmp_path):
    model = tiny("vitpose", scheme="coco17", channels=8)
    folder = model.save_pretrained(tmp_path / "pose")
    loaded = PoseModel.from_pretrained(folder)
    assert loaded.config == model.config
    x = torch.randn(1, 3, *INPUT)
    torch.testing.assert_close(loaded(x), model(x))
    info = json.loads((folder / "config.json").read_text())
    assert info["model_type"] == "pose" and info["num_keypoints"] == 17 and info["input_size"] == [64, 48]


def test_a_scheme_file_travels_inside_the_checkpoint(tmp_path, monkeypatch):
    """save_pretrained writes a scheme file's definition into config.json; from_pretrained needs no file."""
    from sapiens_lite import keypoints

    monkeypatch.setattr(keypoints, "_REGISTERED", {})  # as in a fresh process
    toy = {
        "names": ["head", "left_hand", "right_hand"],
        "flip_index": [0, 2, 1],
        "sigmas": [0.05, 0.06, 0.06],
        "skeleton": [[0, 1], [0, 2]],
    }
    path = tmp_path / "toy3.json"
    path.write_text(json.dumps(toy))
    model = tiny("simple", scheme=str(path))
    assert model.scheme.num_keypoints == 3 and model.scheme.name == "toy3"
    folder = model.save_pretrained(tmp_path / "pose")
    info = json.loads((folder / "config.json").read_text())
    assert info["keypoint_scheme"] == "toy3" and info["num_keypoints"] == 3
    assert info["keypoint_scheme_definition"] == keypoints.get_scheme(str(path)).to_dict()
    path.unlink()
    loaded = PoseModel.from_pretrained(folder)
    assert loaded.scheme == model.scheme and loaded.config == model.config
    x = torch.randn(1, 3, *INPUT)
    torch.testing.assert_close(loaded.predict(x), model.predict(x))
    # A built-in scheme is not copied into the checkpoint.
    plain = tiny("simple").save_pretrained(tmp_path / "coco")
    assert "keypoint_scheme_definition" not in json.loads((plain / "config.json").read_text())
