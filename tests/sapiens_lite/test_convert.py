"""Foreign checkpoint conversion: the source table, the Sapiens formats, key checks and `adapt_to`.

Contract: `convert_state_dict` recognises each supported format from its signature keys (exactly one
source per checkpoint), maps it onto our timm-keyed ViT / pose head / MAE decoder names, and raises,
listing the keys, when anything is missing, unexpected or of the wrong shape. Sapiens state dicts are
built here with the exact key names and layouts of the released files (mmpretrain ViT, mmpose head),
at tiny sizes; their numbers are checked against a forward pass written directly on those raw keys.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sapiens_lite.convert import (
    SOURCES,
    CheckpointKeyError,
    HeadHints,
    adapt_to,
    build_backbone,
    build_pose_model,
    convert_state_dict,
    detect_source,
)
from sapiens_lite.errors import UserError
from sapiens_lite.models.vit import ViTConfig
from sapiens_lite.pos_embed import resample_pos_embed

DIM, DEPTH, HEADS = 64, 2, 2  # = ARCHS["vit_test"]


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen) * 0.2


def mmpretrain_vit_sd(grid=(8, 8), cls_token=True, prefix="", seed=0) -> dict[str, torch.Tensor]:
    """A Sapiens/mmpretrain VisionTransformer state dict with the released key names (tiny sizes)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    if cls_token:
        sd["cls_token"] = _randn(1, 1, DIM, gen=g)
    sd["pos_embed"] = _randn(1, int(cls_token) + grid[0] * grid[1], DIM, gen=g)
    sd["patch_embed.projection.weight"] = _randn(DIM, 3, 16, 16, gen=g) * 0.1
    sd["patch_embed.projection.bias"] = _randn(DIM, gen=g)
    for i in range(DEPTH):
        lp = f"layers.{i}."
        sd[lp + "ln1.weight"] = 1 + _randn(DIM, gen=g)
        sd[lp + "ln1.bias"] = _randn(DIM, gen=g)
        sd[lp + "attn.qkv.weight"] = _randn(3 * DIM, DIM, gen=g)
        sd[lp + "attn.qkv.bias"] = _randn(3 * DIM, gen=g)
        sd[lp + "attn.proj.weight"] = _randn(DIM, DIM, gen=g)
        sd[lp + "attn.proj.bias"] = _randn(DIM, gen=g)
        sd[lp + "ln2.weight"] = 1 + _randn(DIM, gen=g)
        sd[lp + "ln2.bias"] = _randn(DIM, gen=g)
        sd[lp + "ffn.layers.0.0.weight"] = _randn(4 * DIM, DIM, gen=g)
        sd[lp + "ffn.layers.0.0.bias"] = _randn(4 * DIM, gen=g)
        sd[lp + "ffn.layers.1.weight"] = _randn(DIM, 4 * DIM, gen=g)
        sd[lp + "ffn.layers.1.bias"] = _randn(DIM, gen=g)
    sd["ln1.weight"] = 1 + _randn(DIM, gen=g)  # the final norm is `ln1` in mmpretrain
    sd["ln1.bias"] = _randn(DIM, gen=g)
    return {prefix + k: v for k, v in sd.items()}


def sapiens_head_sd(channels=32, num_keypoints=17, seed=1) -> dict[str, torch.Tensor]:
    """mmpose HeatmapHead (Sapiens: deconv x2, conv1x1 x2, InstanceNorm without weights) keys."""
    g = torch.Generator().manual_seed(seed)
    return {
        "head.deconv_layers.0.weight": _randn(DIM, channels, 4, 4, gen=g),  # ConvTranspose2d [in, out, k, k]
        "head.deconv_layers.3.weight": _randn(channels, channels, 4, 4, gen=g),
        "head.conv_layers.0.weight": _randn(channels, channels, 1, 1, gen=g),
        "head.conv_layers.0.bias": _randn(channels, gen=g),
        "head.conv_layers.3.weight": _randn(channels, channels, 1, 1, gen=g),
        "head.conv_layers.3.bias": _randn(channels, gen=g),
        "head.final_layer.weight": _randn(num_keypoints, channels, 1, 1, gen=g),
        "head.final_layer.bias": _randn(num_keypoints, gen=g),
    }


def sapiens_pose_checkpoint(grid=(4, 3), num_keypoints=17) -> dict:
    """`{'state_dict': backbone.* + head.*, 'meta': ...}` as the Sapiens pose .pth files (no cls token)."""
    sd = mmpretrain_vit_sd(grid=grid, cls_token=False, prefix="backbone.")
    sd.update(sapiens_head_sd(num_keypoints=num_keypoints))
    return {"state_dict": sd, "meta": {"epoch": 210}}


def timm_vit_sd(grid=(4, 4), seed=2, classifier=True) -> dict[str, torch.Tensor]:
    """A timm VisionTransformer state dict (tiny), with its ImageNet-style classifier."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=(16 * grid[0], 16 * grid[1]), patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        num_classes=10 if classifier else 0,
    )  # fmt: skip
    return model.state_dict()


def mae_decoder_sd(num_positions=17, dim=32, depth=1, seed=3) -> dict[str, torch.Tensor]:
    """facebookresearch/mae decoder keys (timm Blocks under `decoder_blocks`)."""
    from timm.models.vision_transformer import Block

    torch.manual_seed(seed)
    sd = {
        "mask_token": torch.randn(1, 1, dim),
        "decoder_pos_embed": torch.randn(1, num_positions, dim),
        "decoder_embed.weight": torch.randn(dim, DIM),
        "decoder_embed.bias": torch.randn(dim),
        "decoder_norm.weight": torch.randn(dim),
        "decoder_norm.bias": torch.randn(dim),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, dim),
        "decoder_pred.bias": torch.randn(16 * 16 * 3),
    }
    for i in range(depth):
        sd.update(
            {f"decoder_blocks.{i}.{k}": v for k, v in Block(dim, 4, qkv_bias=True).state_dict().items()}
        )
    return sd


def mae_checkpoint() -> dict:
    sd = timm_vit_sd(classifier=False)
    sd.update(mae_decoder_sd())
    return {"model": sd, "epoch": 799}


def mmpretrain_reference_tokens(sd, x, *, padding, cls_token) -> torch.Tensor:
    """mmpretrain ViT forward written on the raw Sapiens keys: tokens after the final norm [B, N, C]."""
    x = F.conv2d(
        x, sd["patch_embed.projection.weight"], sd["patch_embed.projection.bias"], stride=16, padding=padding
    )
    x = x.flatten(2).transpose(1, 2)  # [B, L, C]
    B, _, C = x.shape
    if cls_token:
        x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1)
    x = x + sd["pos_embed"]
    N = x.shape[1]
    for i in range(DEPTH):
        p = f"layers.{i}."
        h = F.layer_norm(x, (C,), sd[p + "ln1.weight"], sd[p + "ln1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (C,), sd[p + "ln2.weight"], sd[p + "ln2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "ffn.layers.0.0.weight"], sd[p + "ffn.layers.0.0.bias"])),
                     sd[p + "ffn.layers.1.weight"], sd[p + "ffn.layers.1.bias"])  # fmt: skip
        x = x + h
    return F.layer_norm(x, (C,), sd["ln1.weight"], sd["ln1.bias"], eps=1e-6)


# ---- the source table ----

FIXTURES = {
    "sapiens_pretrain": lambda: mmpretrain_vit_sd(),
    "sapiens_pose": sapiens_pose_checkpoint,
    "mae": mae_checkpoint,
    "timm": timm_vit_sd,
}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_each_fixture_matches_exactly_one_source(name):
    from sapiens_lite.convert import unwrap

    sd = unwrap(FIXTURES[name]())
    assert [n for n, s in SOURCES.items() if s.matches(set(sd))] == [name]
    assert detect_source(sd) == name


def test_unrecognised_format_lists_known_formats_and_keys():
    with pytest.raises(UserError, match="unrecognised checkpoint format") as e:
        convert_state_dict({"encoder.weird.weight": torch.zeros(1), "foo": torch.zeros(1)})
    msg = str(e.value)
    assert "encoder.weird.weight" in msg
    assert all(name in msg for name in SOURCES)


def test_unknown_source_name_and_no_state_dict():
    with pytest.raises(UserError, match="unknown source 'sapiens3'.*sapiens_pose"):
        convert_state_dict(mmpretrain_vit_sd(), source="sapiens3")
    with pytest.raises(UserError, match="no state dict found.*optimizer"):
        convert_state_dict({"optimizer": {"lr": 1.0}})


def test_forced_wrong_source_lists_unexpected_keys():
    with pytest.raises(CheckpointKeyError, match="timm.*unexpected.*patch_embed.projection"):
        convert_state_dict(mmpretrain_vit_sd(), source="timm")


# ---- Sapiens pretrain ----


def test_sapiens_pretrain_matches_mmpretrain_forward():
    sd = mmpretrain_vit_sd(grid=(4, 4))
    conv = convert_state_dict(sd)
    h = conv.hints
    assert conv.source == "sapiens_pretrain" and conv.head is None and conv.decoder is None
    assert (h.arch, h.grid, h.cls_token, h.patch_padding, h.img_size) == (
        "vit_test",
        (4, 4),
        True,
        0,
        (64, 64),
    )
    model = build_backbone(conv).eval()
    # anchors: a rename that swapped two same-shaped tensors would fail here by name, and below by value
    torch.testing.assert_close(model.norm.weight, sd["ln1.weight"])
    torch.testing.assert_close(model.blocks[1].norm2.bias, sd["layers.1.ln2.bias"])
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, sd["layers.0.ffn.layers.0.0.weight"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_tokens(x)
    ref = mmpretrain_reference_tokens(sd, x, padding=0, cls_token=True)
    assert (ours - ref).abs().max() <= 1e-5


def test_sapiens_pretrain_to_pose_backbone_drops_cls_and_resamples():
    """1024x1024 cls pretrain -> 1024x768 no-cls pose backbone, in miniature: 8x8+cls -> 8x6."""
    sd = mmpretrain_vit_sd(grid=(8, 8))
    conv = convert_state_dict(sd)
    assert conv.hints.grid == (8, 8) and conv.hints.img_size == (128, 128)
    model = build_backbone(conv, img_size=(128, 96), cls_token=False, patch_padding=2)
    assert model.cls_token is None and model.pos_embed.shape == (1, 48, DIM)
    expected = resample_pos_embed(sd["pos_embed"][:, 1:], (8, 6), (8, 8))
    torch.testing.assert_close(model.pos_embed.data, expected)
    # a pose-shaped grid really changed the values (bicubic resampling happened)
    assert not torch.allclose(expected, sd["pos_embed"][:, 1:49])


def test_adapt_to_refuses_other_sizes_and_invented_cls():
    conv = convert_state_dict(mmpretrain_vit_sd(grid=(4, 4)))
    with pytest.raises(UserError, match="embed_dim=64.*embed_dim=384"):
        adapt_to(conv, ViTConfig(arch="vit_small", img_size=(64, 64), cls_token=True))
    pose = convert_state_dict(sapiens_pose_checkpoint())
    with pytest.raises(UserError, match="cls token"):
        adapt_to(pose, ViTConfig(arch="vit_test", img_size=(64, 48), cls_token=True))


def test_missing_unexpected_and_misshaped_keys_are_listed():
    sd = mmpretrain_vit_sd(grid=(4, 4))
    missing = {k: v for k, v in sd.items() if k != "layers.1.ln2.bias"}
    with pytest.raises(CheckpointKeyError, match=r"missing 1: blocks\.1\.norm2\.bias"):
        convert_state_dict(missing)
    layer_scale = {**sd, "layers.0.attn.gamma1.weight": torch.ones(DIM)}
    with pytest.raises(CheckpointKeyError, match=r"unexpected.*layers\.0\.attn\.gamma1\.weight"):
        convert_state_dict(layer_scale)
    bad = {**sd, "layers.0.attn.proj.bias": torch.zeros(DIM + 1)}
    with pytest.raises(CheckpointKeyError, match=r"shape mismatch 1: blocks\.0\.attn\.proj\.bias \(65,\)"):
        convert_state_dict(bad)
    extra_layer = {**sd, "layers.2.ln1.weight": torch.ones(DIM)}  # a layer with one tensor
    with pytest.raises(CheckpointKeyError, match=r"missing .*blocks\.2\."):
        convert_state_dict(extra_layer)


def test_odd_grid_needs_grid_argument():
    sd = mmpretrain_vit_sd(grid=(2, 5))
    with pytest.raises(UserError, match="10-token.*grid="):
        convert_state_dict(sd)
    assert convert_state_dict(sd, grid=(2, 5)).hints.img_size == (32, 80)
    with pytest.raises(UserError, match=r"grid \(3, 3\) has 9 cells, pos_embed has 10"):
        convert_state_dict(sd, grid=(3, 3))


# ---- Sapiens pose ----


def test_sapiens_pose_checkpoint_loads_strictly_into_pose_model():
    ckpt = sapiens_pose_checkpoint(grid=(4, 3))
    sd = ckpt["state_dict"]
    conv = convert_state_dict(ckpt)
    h = conv.hints
    assert conv.source == "sapiens_pose"
    assert (h.grid, h.cls_token, h.patch_padding, h.img_size) == ((4, 3), False, 2, (64, 48))
    assert h.head == HeadHints("sapiens", num_keypoints=17, channels=32)
    assert set(conv.head) == {k.removeprefix("head.") for k in sd if k.startswith("head.")}
    model = build_pose_model(conv).eval()
    assert model.config.scheme == "coco17" and model.config.head.channels == 32
    torch.testing.assert_close(model.head.deconv_layers[3].weight, sd["head.deconv_layers.3.weight"])
    torch.testing.assert_close(model.head.final_layer.bias, sd["head.final_layer.bias"])
    x = torch.randn(2, 3, 64, 48)
    backbone_sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    with torch.no_grad():
        ours = model.backbone.forward_tokens(x)
        heatmaps = model(x)
    ref = mmpretrain_reference_tokens(backbone_sd, x, padding=2, cls_token=False)
    assert (ours - ref).abs().max() <= 1e-5
    assert heatmaps.shape == (2, 17, 16, 12)


def test_sapiens_head_of_mixed_widths_or_other_kernels_is_refused():
    ckpt = sapiens_pose_checkpoint()
    sd = ckpt["state_dict"]
    sd["head.conv_layers.3.weight"] = torch.zeros(16, 32, 1, 1)  # a narrower last conv
    with pytest.raises(UserError, match=r"different widths \[16, 32\]"):
        convert_state_dict(ckpt)
    ckpt = sapiens_pose_checkpoint()
    ckpt["state_dict"]["head.conv_layers.0.weight"] = torch.zeros(32, 32, 3, 3)
    with pytest.raises(UserError, match=r"only 4x4 deconvs and 1x1 convs.*\[3, 1\] \(conv\)"):
        convert_state_dict(ckpt)


def test_sapiens_pose_goliath_scheme_from_keypoint_count():
    conv = convert_state_dict(sapiens_pose_checkpoint(num_keypoints=308))
    assert build_pose_model(conv).config.scheme == "goliath308"
    with pytest.raises(UserError, match="308 keypoints but scheme 'coco17'"):
        build_pose_model(conv, scheme="coco17")


def test_sapiens_pose_head_with_batchnorm_is_rejected_with_its_keys():
    ckpt = sapiens_pose_checkpoint()
    ckpt["state_dict"]["head.deconv_layers.1.running_mean"] = torch.zeros(32)
    with pytest.raises(CheckpointKeyError, match=r"head.*deconv_layers\.1\.running_mean"):
        convert_state_dict(ckpt)


# ---- timm and facebookresearch/mae ----


def test_timm_drops_classifier_and_rejects_fc_norm():
    sd = timm_vit_sd()
    conv = convert_state_dict(sd)
    assert conv.source == "timm" and sorted(conv.dropped) == ["head.bias", "head.weight"]
    assert "head.weight" not in conv.backbone and conv.hints.cls_token
    with pytest.raises(CheckpointKeyError, match="fc_norm.weight"):
        convert_state_dict({**sd, "fc_norm.weight": torch.ones(DIM), "fc_norm.bias": torch.zeros(DIM)})


def test_mae_checkpoint_splits_encoder_and_decoder():
    ckpt = mae_checkpoint()
    conv = convert_state_dict(ckpt)
    dec = mae_decoder_sd()
    assert conv.source == "mae" and conv.hints.pos_embed == "sincos"
    assert conv.hints.decoder == {"embed_dim": 32, "depth": 1}
    assert set(conv.decoder) == set(dec)
    for k, v in dec.items():
        torch.testing.assert_close(conv.decoder[k], v)
    assert not any(k.startswith("decoder") or k == "mask_token" for k in conv.backbone)
    broken = {k: v for k, v in ckpt["model"].items() if k != "decoder_blocks.0.mlp.fc2.bias"}
    with pytest.raises(
        CheckpointKeyError, match=r"MAE decoder: missing 1: decoder_blocks\.0\.mlp\.fc2\.bias"
    ):
        convert_state_dict(broken)
