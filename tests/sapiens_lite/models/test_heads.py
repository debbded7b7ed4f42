"""Contract tests for the dense heads (sapiens_lite/models/heads.py): key names, so Sapiens `.pth` and
transformers VitPose heads load strictly; the `DenseHead` interface (out_channels, upsample) on
non-square grids."""

import pytest
import torch

from sapiens_lite.models.heads import (
    FINAL_LAYER_KEYS,
    DenseHead,
    HeadConfig,
    SapiensHead,
    VitPoseClassicHead,
    VitPoseSimpleHead,
    build_head,
)
from sapiens_lite.models.pose import build_pose_model

INPUT = (64, 48)


@pytest.mark.parametrize("kind", ["sapiens", "vitpose", "simple"])
def test_every_head_is_a_dense_head_with_the_output_it_announces(kind):
    cfg = HeadConfig(kind, None if kind == "simple" else 8)
    head = build_head(cfg, in_channels=32, num_keypoints=5)
    assert isinstance(head, DenseHead) and isinstance(head, torch.nn.Module)
    assert head.out_channels == 5 and head.upsample == 4
    for grid in [(4, 3), (5, 7)]:  # non-square grids, either orientation
        out = head(torch.randn(2, 32, *grid))
        assert out.shape == (2, head.out_channels, grid[0] * head.upsample, grid[1] * head.upsample)
    # The final layer named in FINAL_LAYER_KEYS is the one that sets K.
    assert head.state_dict()[FINAL_LAYER_KEYS[kind]].shape[0] == 5


def test_head_config_validation():
    with pytest.raises(ValueError, match="channels"):
        HeadConfig(kind="simple", channels=8)
    with pytest.raises(ValueError, match="kind must be one of"):
        HeadConfig(kind="upernet")
    assert HeadConfig("vitpose").width == 256 and HeadConfig("sapiens").width == 768


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
