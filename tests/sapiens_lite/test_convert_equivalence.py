"""Converted checkpoints compute what their originals compute (fp32, max abs diff <= 1e-5).

References are randomly initialised tiny models of transformers (ViTMAE, VitPose simple and classic)
and timm (VisionTransformer); we convert their state dicts, build our model from the hints and
compare features / heatmaps. transformers is imported inside the tests (a dev dependency only).

ViTMAE is checked in the three namings a user can meet: transformers 5 in memory
(`vit.layers.N.attention.q_proj`), what transformers 5 `save_pretrained` writes (v4 encoder names,
`decoder.decoder_encoder.layer.N` decoder), and the Hub files written by transformers 4
(`vit.encoder.layer.N.attention.attention.query`, `decoder.decoder_layers.N...`), the latter confirmed
by transformers itself loading that file with no missing or unexpected key.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sapiens_lite.convert import build_backbone, build_pose_model, convert_state_dict

TOL = 1e-5
DIM, DEPTH, HEADS = 64, 2, 2  # = ARCHS["vit_test"]


def _max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---- transformers ViTMAE ----


def _vitmae(**kw):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    cfg = ViTMAEConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        image_size=64, patch_size=16, decoder_hidden_size=32, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4, decoder_intermediate_size=128,
        mask_ratio=0.0, layer_norm_eps=1e-6,  # keep every patch; our LayerNorm eps (ViTMAE's default is 1e-12)
        **kw,
    )  # fmt: skip
    return ViTMAEForPreTraining(cfg).eval()


def _vitmae_encoder_tokens(ref, x):
    """ViTMAE encoder output [B, 1 + L, C] with masking as the identity (noise = arange, mask_ratio 0)."""
    noise = torch.arange(16.0).expand(x.shape[0], 16)  # argsort(noise) = identity order
    with torch.no_grad():
        return ref.vit(x, noise=noise).last_hidden_state


def _check_vitmae(ref, sd):
    conv = convert_state_dict(sd)
    assert conv.source == "transformers_vitmae"
    assert (conv.hints.arch, conv.hints.grid, conv.hints.cls_token) == ("vit_test", (4, 4), True)
    assert conv.hints.decoder == {"embed_dim": 32, "depth": 2}
    model = build_backbone(conv).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_tokens(x)
    assert _max_diff(ours, _vitmae_encoder_tokens(ref, x)) <= TOL
    # the decoder's fused qkv is q, k, v stacked, in that order
    q = ref.decoder.decoder_layers[1].attention
    qkv = conv.decoder["decoder_blocks.1.attn.qkv.weight"]
    for i, proj in enumerate(_qkv_modules(q)):
        torch.testing.assert_close(qkv[i * 32 : (i + 1) * 32], proj.weight)
    torch.testing.assert_close(conv.decoder["decoder_pred.weight"], ref.decoder.decoder_pred.weight)
    return conv


def _qkv_modules(attn):
    if hasattr(attn, "q_proj"):
        return attn.q_proj, attn.k_proj, attn.v_proj
    return attn.attention.query, attn.attention.key, attn.attention.value


def test_vitmae_in_memory_transformers5_names():
    ref = _vitmae()
    sd = ref.state_dict()
    assert "vit.layers.0.attention.q_proj.weight" in sd  # the naming this test is about
    _check_vitmae(ref, sd)


def test_vitmae_file_written_by_transformers5(tmp_path):
    ref = _vitmae()
    ref.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in sd
    _check_vitmae(ref, sd)


def test_vitmae_hub_file_transformers4_names(tmp_path):
    from transformers import ViTMAEForPreTraining

    ref = _vitmae()
    ref.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = {
        k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v
        for k, v in load_file(path).items()
    }
    assert "decoder.decoder_layers.1.attention.attention.query.weight" in sd
    from safetensors.torch import save_file

    save_file(sd, path, metadata={"format": "pt"})
    # transformers accepts these names exactly (they are the Hub files' names)
    reloaded, info = ViTMAEForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _check_vitmae(ref, sd)


def test_vitmae_model_without_vit_prefix():
    from transformers import ViTMAEModel

    ref = _vitmae()
    enc = ViTMAEModel(ref.config).eval()
    enc.load_state_dict(ref.vit.state_dict())
    conv = convert_state_dict(enc.state_dict())
    assert conv.decoder is None and conv.hints.decoder is None
    model = build_backbone(conv).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(model.forward_tokens(x), _vitmae_encoder_tokens(ref, x)) <= TOL


# ---- transformers VitPose ----


def _vitpose(simple: bool, num_labels=17):
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    torch.manual_seed(1)
    backbone = VitPoseBackboneConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        image_size=[64, 48], patch_size=[16, 16], out_indices=[DEPTH],
    )  # fmt: skip
    ref = VitPoseForPoseEstimation(
        VitPoseConfig(backbone_config=backbone, use_simple_decoder=simple, num_labels=num_labels)
    )
    with torch.no_grad():  # make every parameter and BN statistic matter
        for name, p in ref.named_parameters():
            if "position_embeddings" in name:
                p.normal_(0, 0.2)
            elif name.startswith("head."):  # heatmaps of order 1, so that 1e-5 is a fp32-level tolerance
                p.normal_(0, 0.05)
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return ref.eval()


@pytest.mark.parametrize("simple", [True, False], ids=["simple", "classic"])
def test_vitpose_heatmaps(simple):
    ref = _vitpose(simple)
    conv = convert_state_dict(ref.state_dict())
    h = conv.hints
    assert conv.source == "transformers_vitpose"
    assert (h.grid, h.cls_token, h.patch_padding) == ((4, 3), False, 2)
    assert h.head.kind == ("simple" if simple else "vitpose") and h.head.num_keypoints == 17
    model = build_pose_model(conv).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref_out = ref(x)
        feats = ref.backbone(x).feature_maps[-1]  # [B, L, C] after the final LayerNorm
        ours_feats = model.backbone.forward_features(x)  # [B, C, gh, gw]
        ours = model(x)
    assert _max_diff(ours_feats.flatten(2).transpose(1, 2), feats) <= TOL
    assert _max_diff(ours, ref_out.heatmaps) <= TOL
    assert ours.abs().max() > 1e-3  # not trivially zero


def test_vitpose_folds_cls_position_into_every_patch():
    ref = _vitpose(simple=True)
    pos = ref.state_dict()["backbone.embeddings.position_embeddings"]  # [1, 1 + 12, C]
    conv = convert_state_dict(ref.state_dict())
    torch.testing.assert_close(conv.backbone["pos_embed"], pos[:, 1:] + pos[:, :1])
    assert "cls_token" not in conv.backbone


def test_vitpose_bare_backbone_and_moe_rejected():
    ref = _vitpose(simple=True)
    bare = {k.removeprefix("backbone."): v for k, v in ref.state_dict().items() if k.startswith("backbone.")}
    conv = convert_state_dict(bare)
    assert conv.source == "transformers_vitpose" and conv.head is None
    moe = {**ref.state_dict(), "backbone.encoder.layer.0.mlp.experts.0.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=r"experts\.0\.weight"):
        convert_state_dict(moe)


# ---- timm ----


def test_timm_vit_features():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(2)
    ref = VisionTransformer(
        img_size=(64, 48), patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=5
    )
    ref.eval()
    with torch.no_grad():
        for p in (ref.pos_embed, ref.cls_token):
            p.normal_(0, 0.2)
    conv = convert_state_dict(ref.state_dict())
    assert conv.source == "timm" and conv.hints.grid == (4, 3) and conv.hints.cls_token
    model = build_backbone(conv).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert _max_diff(model.forward_tokens(x), ref.forward_features(x)) <= TOL
