"""The MAE model: non-square patchify, masking semantics, encoder on visible tokens only, masked-only loss,
numerical parity with transformers' ViTMAEForPreTraining, and starting from foreign checkpoints."""

from __future__ import annotations

import pytest
import torch

from pretrain.mae import (
    MAEConfig,
    MaskedAutoencoder,
    load_pretrained,
    mae_config,
    mae_forward_flops,
    mae_sapiens_0_3b_dec512d8b,
)
from sapiens_lite.errors import UserError
from sapiens_lite.models.vit import ViTConfig
from sapiens_lite.pos_embed import get_2d_sincos_pos_embed


def tiny(img_size=(64, 48), **kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(
        mae_config("vit_test", img_size=img_size, decoder_dim=32, decoder_depth=1, decoder_heads=2, **kw)
    )


def test_patchify_non_square_layout_and_roundtrip():
    model = tiny((64, 48))
    assert model.grid_size == (4, 3)
    imgs = torch.randn(2, 3, 64, 48)
    x = model.patchify(imgs)  # [2, 12, 768]
    assert x.shape == (2, 12, 16 * 16 * 3)
    # patch (row 2, col 1) is token 2 * 3 + 1, pixels ordered (p, q, c)
    patch = imgs[:, :, 32:48, 16:32].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(x[:, 7], patch)
    torch.testing.assert_close(model.unpatchify(x, (4, 3)), imgs)
    # the default grid is the model's (4, 3), not a square guess
    torch.testing.assert_close(model.unpatchify(x), imgs)


def test_random_masking_semantics_and_given_noise():
    model = tiny()
    x = torch.arange(2 * 12 * 4, dtype=torch.float32).reshape(2, 12, 4)
    noise = torch.rand(2, 12)
    kept, mask, ids_restore = model.random_masking(x, noise)
    assert kept.shape == (2, 3, 4)  # int(12 * 0.25)
    assert mask.shape == (2, 12) and mask.sum(1).tolist() == [9.0, 9.0]
    for b in range(2):
        keep_idx = torch.argsort(noise[b])[:3]  # the smallest noise is kept
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(keep_idx.tolist())  # 0 is keep
        torch.testing.assert_close(kept[b], x[b, keep_idx])
        # ids_restore inverts the shuffle
        shuffled = x[b, torch.argsort(noise[b])]
        torch.testing.assert_close(shuffled[ids_restore[b]], x[b])
    # same noise -> same mask; the masks differ per sample
    _, mask2, _ = model.random_masking(x, noise)
    assert torch.equal(mask, mask2)


def test_encoder_sees_visible_tokens_only_and_decoder_all():
    model = tiny((64, 48))
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0].shape

        return hook

    model.encoder.blocks[0].register_forward_hook(record("enc"))
    model.decoder_blocks[0].register_forward_hook(record("dec"))
    loss, pred, mask = model(torch.randn(2, 3, 64, 48))
    assert seen["enc"] == (2, 1 + 3, 64)  # cls + 25% of 12 patches
    assert seen["dec"] == (2, 1 + 12, 32)
    assert pred.shape == (2, 12, 768) and mask.shape == (2, 12)
    assert torch.isfinite(loss)


def test_loss_ignores_visible_patches():
    model = tiny()
    imgs = torch.randn(2, 3, 64, 48)
    _, pred, mask = model(imgs)
    loss = model.forward_loss(imgs, pred, mask)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # garbage at kept patches
    torch.testing.assert_close(model.forward_loss(imgs, changed, mask), loss)
    changed[mask == 1] += 1.0
    assert model.forward_loss(imgs, changed, mask) > loss


def test_sincos_tables_non_square():
    model = tiny((64, 48))
    want = torch.from_numpy(get_2d_sincos_pos_embed(32, (4, 3), cls_token=True)).float()
    torch.testing.assert_close(model.decoder_pos_embed[0], want)
    assert not model.decoder_pos_embed.requires_grad and not model.encoder.pos_embed.requires_grad
    # another input size gets the sin-cos table of its own grid
    loss, pred, _ = model(torch.randn(1, 3, 32, 64))
    assert pred.shape == (1, 2 * 4, 768)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="cls_token"):
        MAEConfig(encoder=ViTConfig(arch="vit_test", pos_embed="sincos"))
    with pytest.raises(ValueError, match="pos_embed"):
        MAEConfig(encoder=ViTConfig(arch="vit_test", cls_token=True))
    with pytest.raises(ValueError, match="mask_ratio"):
        mae_config("vit_test", mask_ratio=1.0)


def test_size_factory_and_flops():
    with torch.device("meta"):
        model = mae_sapiens_0_3b_dec512d8b()
    assert model.grid_size == (64, 48)
    assert model.encoder.embed_dim == 1024 and len(model.encoder.blocks) == 24
    assert model.decoder_pos_embed.shape == (1, 1 + 3072, 512) and len(model.decoder_blocks) == 8
    # encoder on 25% of the tokens: far less than a full forward at 1024x768
    from sapiens_lite.flops import forward_flops

    full = forward_flops(model.config.encoder)
    assert 0.2 * full < mae_forward_flops(model.config) < 0.6 * full


def _sincos(dim, grid):
    return torch.from_numpy(get_2d_sincos_pos_embed(dim, grid, cls_token=True)).float().unsqueeze(0)


def _hf_tiny(norm_pix_loss=True):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(1)
    cfg = ViTMAEConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=64,
        patch_size=16,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=128,
        mask_ratio=0.75,
        norm_pix_loss=norm_pix_loss,
    )
    return ViTMAEForPreTraining(cfg).eval()


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_parity_with_transformers_vitmae(norm_pix_loss):
    ref = _hf_tiny(norm_pix_loss)
    # random (not zero) biases and norms, so that a swapped key would show
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
        # the fixed sin-cos tables of a trained checkpoint (transformers 5 leaves them at zero in a fresh model)
        ref.vit.embeddings.position_embeddings.copy_(_sincos(64, (4, 4)))
        ref.decoder.decoder_pos_embed.copy_(_sincos(32, (4, 4)))
    ours = tiny((64, 64), norm_pix_loss=norm_pix_loss).eval()
    report = load_pretrained(ours, ref.state_dict())
    assert report["source"] == "transformers_vitmae"
    assert report["kept"] == []  # everything came from the checkpoint
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    with torch.no_grad():
        out = ref(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, noise)
    torch.testing.assert_close(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)


def test_loads_facebookresearch_mae_checkpoint():
    src = tiny((64, 64))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # models_mae.py keys: the encoder at the top level, decoder_* beside it, inside {"model": ...}
    sd = {k.removeprefix("encoder."): v.clone() for k, v in src.state_dict().items()}
    ckpt = {"model": sd, "epoch": 799}
    dst = tiny((64, 64))
    report = load_pretrained(dst, ckpt)
    assert report["source"] == "mae"
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, msg=k)
    imgs, noise = torch.randn(1, 3, 64, 64), torch.rand(1, 16)
    torch.testing.assert_close(dst(imgs, noise)[1], src(imgs, noise)[1])


def _sapiens_clean_state_dict(vit_sd: dict) -> dict:
    """timm-keyed ViT weights -> the mmpretrain layout of a Sapiens `_clean.pth` (flat keys)."""
    out = {}
    for k, v in vit_sd.items():
        k = k.replace("patch_embed.proj", "patch_embed.projection")
        k = k.replace("blocks.", "layers.").replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
        k = k.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
        k = {"norm.weight": "ln1.weight", "norm.bias": "ln1.bias"}.get(k, k)
        out[k] = v.clone()
    return out


def test_starts_from_sapiens_clean_checkpoint_resampling_the_grid(tmp_path):
    from sapiens_lite.models.vit import VisionTransformer

    # a Sapiens-style encoder at a square 8x8 grid (128x128), learned positions, cls token
    torch.manual_seed(3)
    src = VisionTransformer(ViTConfig(arch="vit_test", img_size=(128, 128), cls_token=True))
    path = tmp_path / "sapiens_test_epoch_1600_clean.pth"
    torch.save(_sapiens_clean_state_dict(src.state_dict()), path)

    model = tiny((128, 96))  # our 8x6 grid
    report = load_pretrained(model, path)
    assert report["source"] == "sapiens_pretrain"
    assert not report["decoder"]  # a bare encoder: the decoder keeps its initialisation
    enc = model.encoder.state_dict()
    torch.testing.assert_close(enc["blocks.1.mlp.fc2.weight"], src.state_dict()["blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(enc["cls_token"], src.state_dict()["cls_token"])
    assert enc["pos_embed"].shape == (1, 1 + 8 * 6, 64)
    # the 8x8 grid resampled to 8x6: rows (height) are unchanged, columns interpolated
    from sapiens_lite.pos_embed import resample_pos_embed

    want = resample_pos_embed(src.pos_embed.data[:, 1:], (8, 6), (8, 8))
    torch.testing.assert_close(enc["pos_embed"][:, 1:], want)
    loss, _, _ = model(torch.randn(1, 3, 128, 96))
    assert torch.isfinite(loss)


def test_wrong_width_checkpoint_is_a_clear_error():
    src = MaskedAutoencoder(
        mae_config("vit_tiny", img_size=(64, 64), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    )
    sd = {k.removeprefix("encoder."): v for k, v in src.state_dict().items()}
    with pytest.raises(UserError, match="embed_dim=192"):
        load_pretrained(tiny((64, 64)), sd)
