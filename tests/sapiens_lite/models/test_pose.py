"""Contract tests for the pose model: head key names (so Sapiens / transformers VitPose heads load
strictly), output shapes, flip test, K-mismatch errors, and the Hub round trip."""

import pytest
import torch

from sapiens_lite.codec import flip_heatmaps
from sapiens_lite.errors import UserError
from sapiens_lite.models.pose import (
    HeadConfig,
    PoseConfig,
    PoseModel,
    SapiensHead,
    VitPoseClassicHead,
    VitPoseSimpleHead,
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


def test_sapiens_head_keys_match_the_sapiens_checkpoints():
    """Sapiens pose `.pth` head: deconv (no bias) / InstanceNorm (affine=False: no keys) / SiLU, x2; conv1x1 x2; final 1x1."""
    head = SapiensHead(in_channels=1024, num_keypoints=308, channels=768)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "deconv_layers.0.weight": (1024, 768, 4, 4),
        "deconv_layers.3.weight": (768, 768, 4, 4),
        "conv_layers.0.weight": (768, 768, 1, 1),
        "conv_layers.0.bias": (768,),
        "conv_layers.3.weight": (768, 768, 1, 1),
        "conv_layers.3.bias": (768,),
        "final_layer.weight": (308, 768, 1, 1),
        "final_layer.bias": (308,),
    }
    deconv = head.deconv_layers[0]
    assert (deconv.kernel_size, deconv.stride, deconv.padding, deconv.output_padding) == (
        (4, 4),
        (2, 2),
        (1, 1),
        (0, 0),
    )
    assert isinstance(head.deconv_layers[1], torch.nn.InstanceNorm2d) and not head.deconv_layers[1].affine
    assert isinstance(head.conv_layers[2], torch.nn.SiLU)
    # A state dict with exactly these keys loads strictly into the whole model under `head.`.
    model = build_pose_model("vit_test", "goliath308", input_size=INPUT)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model.load_weights(sd, source="sapiens.pth")


def _transformers_config(kind):
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    bc = VitPoseBackboneConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=list(INPUT),
        patch_size=[16, 16],
    )
    return VitPoseConfig(backbone_config=bc, num_labels=17, use_simple_decoder=kind == "simple")


@pytest.mark.parametrize("kind", ["vitpose", "simple"])
def test_vitpose_heads_match_transformers(kind):
    """Our heads take transformers' VitPose decoder state dicts as they are (pure rename under `head.`)."""
    from transformers.models.vitpose.modeling_vitpose import VitPoseClassicDecoder, VitPoseSimpleDecoder

    cfg = _transformers_config(kind)
    torch.manual_seed(1)
    ref = (VitPoseSimpleDecoder if kind == "simple" else VitPoseClassicDecoder)(cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for name, buf in ref.named_buffers():
        if "running_var" in name:
            buf.uniform_(0.5, 2.0)
        elif "running_mean" in name:
            buf.normal_()
    ours = (VitPoseSimpleHead(64, 17) if kind == "simple" else VitPoseClassicHead(64, 17)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    feats = torch.randn(2, 64, 4, 3)
    torch.testing.assert_close(ours(feats), ref(feats))


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
    with pytest.raises(UserError, match="133"):
        check_head_keypoints(sd, model.config, "x")


def test_config_validation():
    with pytest.raises(ValueError, match="img_size"):
        PoseConfig(backbone=ViTConfig(img_size=(256, 192)), input_size=(1024, 768))
    with pytest.raises(ValueError, match="multiples of 16"):
        PoseConfig(input_size=(250, 192))
    with pytest.raises(ValueError, match="channels"):
        HeadConfig(kind="simple", channels=8)
    with pytest.raises(UserError, match="unknown keypoint scheme"):
        PoseConfig(scheme="nope")
    assert PoseConfig().heatmap_size == (256, 192)
    assert HeadConfig("vitpose").width == 256 and HeadConfig("sapiens").width == 768


def test_hub_round_trip(tmp_path):
    model = tiny("vitpose", scheme="coco17", channels=8)
    folder = model.save_pretrained(tmp_path / "pose")
    loaded = PoseModel.from_pretrained(folder)
    assert loaded.config == model.config
    x = torch.randn(1, 3, *INPUT)
    torch.testing.assert_close(loaded(x), model(x))
    import json

    info = json.loads((folder / "config.json").read_text())
    assert info["model_type"] == "pose" and info["num_keypoints"] == 17 and info["input_size"] == [64, 48]
