"""Contract of the ViT backbone (sapiens_lite/models/vit.py) and its FLOPs / parameter formulas.

Tiny CPU models (arch `vit_test`, 64x48 inputs). Reference checks: timm's VisionTransformer with the
same weights, a hand-written pre-norm block, torch's FlopCounterMode, meta-device parameter counts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sapiens_lite.config import load_config
from sapiens_lite.flops import count_params, forward_flops
from sapiens_lite.models.vit import ARCHS, VisionTransformer, ViTConfig, build_vit
from sapiens_lite.pos_embed import get_2d_sincos_pos_embed

SMALL = (64, 48)  # -> a 4x3 token grid


def tiny(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return build_vit("vit_test", img_size=kw.pop("img_size", SMALL), **kw)


def manual_tokens(model: VisionTransformer, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Reference encoder with an explicit position embedding: conv -> +pos -> [cls] -> blocks -> norm."""
    w, b = model.patch_embed.proj.weight, model.patch_embed.proj.bias
    t = F.conv2d(x, w, b, stride=model.patch_size, padding=model.config.patch_padding)
    t = t.flatten(2).transpose(1, 2) + pos[:, model.num_prefix_tokens :]
    if model.cls_token is not None:
        t = torch.cat([(model.cls_token + pos[:, :1]).expand(len(x), -1, -1), t], dim=1)
    for blk in model.blocks:
        t = blk(t)
    return model.norm(t)


# ---- config ----


def test_config_resolves_sizes_from_arch_and_keeps_explicit_ones():
    cfg = ViTConfig(arch="sapiens_1b").resolved()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (1536, 40, 24)
    cfg = ViTConfig(arch="sapiens_1b", depth=3).resolved()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (1536, 3, 24)
    assert ViTConfig().arch == "vit_test" and ViTConfig().img_size == (1024, 768)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown arch 'vit_huge'.*sapiens_0.3b.*vit_test"):
        ViTConfig(arch="vit_huge")
    with pytest.raises(ValueError, match="img_size"):
        ViTConfig(img_size=(1000, 768))
    with pytest.raises(ValueError, match="drop_path_rate"):
        ViTConfig(drop_path_rate=1.5)
    with pytest.raises(ValueError, match="num_heads"):
        ViTConfig(embed_dim=65, num_heads=2).resolved()
    # a custom size needs no arch entry
    assert ViTConfig(arch="custom", embed_dim=32, depth=1, num_heads=2).resolved().embed_dim == 32


def test_config_loads_from_yaml_with_tuple_coercion(tmp_path):
    f = tmp_path / "vit.yaml"
    f.write_text("arch: vit_small\nimg_size: [256, 192]\npos_embed: sincos\n")
    cfg = load_config(ViTConfig, [f], ["cls_token=true"])
    assert cfg.img_size == (256, 192) and cfg.cls_token and cfg.pos_embed == "sincos"
    with pytest.raises(ValueError, match="pos_embed.*'learned'"):
        load_config(ViTConfig, [], ["pos_embed=rope"])


# ---- architecture ----


def test_block_structure_matches_the_sapiens_vit():
    m = tiny()
    c = m.embed_dim
    assert isinstance(m.blocks, nn.ModuleList) and len(m.blocks) == ARCHS["vit_test"]["depth"]
    proj = m.patch_embed.proj
    assert proj.kernel_size == (16, 16) and proj.stride == (16, 16) and proj.padding == (0, 0)
    for blk in m.blocks:
        assert blk.mlp.fc1.out_features == 4 * c and blk.mlp.fc2.in_features == 4 * c
        assert blk.attn.qkv.bias is not None and blk.attn.qkv.out_features == 3 * c
        assert blk.attn.num_heads == 2
        for norm in (blk.norm1, blk.norm2):
            assert isinstance(norm, nn.LayerNorm) and norm.eps == 1e-6
    assert isinstance(m.norm, nn.LayerNorm) and m.norm.eps == 1e-6
    assert tiny(qkv_bias=False).blocks[0].attn.qkv.bias is None
    assert isinstance(tiny(final_norm=False).norm, nn.Identity)


def test_block_is_prenorm_attention_plus_mlp():
    """One block equals x + attn(ln1(x)); x + mlp(ln2(x)) written out by hand (softmax attention)."""
    blk = tiny().blocks[0].eval()
    x = torch.randn(2, 12, 64)
    b, n, c = x.shape
    h = blk.attn.num_heads
    y = blk.norm1(x)
    q, k, v = blk.attn.qkv(y).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(c // h)).softmax(-1)
    x1 = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
    expected = x1 + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x1))))
    torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_goes_through_sdpa(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    m = tiny()
    assert all(blk.attn.fused_attn for blk in m.blocks)
    m(torch.randn(1, 3, *SMALL))
    assert calls == [torch.Size([1, 2, 12, 32])] * len(m.blocks)  # [B, heads, N, head_dim]


def test_timm_vit_weights_load_and_give_the_same_tokens():
    """Our keys are timm's: a timm VisionTransformer's state dict loads strictly, same outputs."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    for cls_token in (True, False):
        torch.manual_seed(1)
        ref = TimmViT(
            img_size=SMALL, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0,
            class_token=cls_token, global_pool="", qkv_bias=True,
        ).eval()  # fmt: skip
        ours = tiny(cls_token=cls_token).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, 3, *SMALL)
        torch.testing.assert_close(ours.forward_tokens(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)


# ---- shapes, tokens, position embeddings ----


@pytest.mark.parametrize("cls_token", [False, True])
def test_forward_shapes_non_square(cls_token):
    m = tiny(cls_token=cls_token).eval()
    assert m.grid_size == (4, 3) and m.num_prefix_tokens == int(cls_token)
    assert m.pos_embed.shape == (1, int(cls_token) + 12, 64)
    assert (m.cls_token is not None) == cls_token
    x = torch.randn(2, 3, *SMALL)
    tokens = m.forward_tokens(x)
    assert tokens.shape == (2, int(cls_token) + 12, 64)
    feats = m(x)
    assert feats.shape == (2, 64, 4, 3)
    torch.testing.assert_close(feats, m.forward_features(x))
    # the feature map is the patch tokens in row-major order, prefix dropped
    torch.testing.assert_close(feats.flatten(2).transpose(1, 2), tokens[:, int(cls_token) :])
    assert m.patchify_embed(x).shape == (2, 12, 64)


def test_sapiens_grid_1024x768_with_and_without_patch_padding():
    for padding in (0, 2):
        m = build_vit("vit_test", img_size=(1024, 768), patch_padding=padding).eval()
        assert m.grid_size == (64, 48) and m.pos_embed.shape == (1, 64 * 48, 64)
        assert m.patch_embed.proj.padding == (padding, padding)
        assert m.token_grid((512, 384)) == (32, 24)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 1024, 768)).shape == (1, 64, 64, 48)


@pytest.mark.parametrize(
    "patch, padding, hw",
    [(16, 0, (64, 48)), (16, 2, (1024, 768)), (16, 7, (80, 33)), (14, 3, (224, 168)), (8, 1, (31, 17))],
)
def test_config_token_grid_is_the_patch_convs_output_size(patch, padding, hw):
    cfg = ViTConfig("vit_test", patch_size=patch, patch_padding=padding, img_size=(patch * 4, patch * 3))
    conv = nn.Conv2d(1, 1, kernel_size=patch, stride=patch, padding=padding)
    assert cfg.token_grid(hw) == tuple(conv(torch.zeros(1, 1, *hw)).shape[-2:])
    assert cfg.grid_size == cfg.token_grid(cfg.img_size) == (4, 3)


def test_patch_padding_changes_the_patch_view():
    x = torch.randn(1, 3, *SMALL)
    m0, m2 = tiny(patch_padding=0), tiny(patch_padding=2)
    m2.load_state_dict(m0.state_dict())
    p0, p2 = m0.patchify_embed(x), m2.patchify_embed(x)
    assert p0.shape == p2.shape == (1, 12, 64)
    w, b = m0.patch_embed.proj.weight, m0.patch_embed.proj.bias
    ref = F.conv2d(x, w, b, stride=16, padding=2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(p2, ref)
    assert not torch.allclose(p0, p2)


@pytest.mark.parametrize("cls_token", [False, True])
def test_learned_pos_embed_is_resampled_bicubic_for_other_sizes(cls_token):
    from timm.layers import resample_abs_pos_embed

    m = tiny(cls_token=cls_token).eval()
    assert m.pos_embed.requires_grad
    assert m.pos_embed_for((4, 3)) is m.pos_embed
    pos = m.pos_embed_for((6, 4))
    ref = resample_abs_pos_embed(m.pos_embed, [6, 4], old_size=[4, 3], num_prefix_tokens=int(cls_token))
    torch.testing.assert_close(pos, ref)
    assert pos.shape == (1, int(cls_token) + 24, 64)
    if cls_token:  # the prefix row is kept as it is
        torch.testing.assert_close(pos[:, 0], m.pos_embed[:, 0])
    x = torch.randn(1, 3, 96, 64)
    torch.testing.assert_close(m.forward_tokens(x), manual_tokens(m, x, ref))
    assert m(x).shape == (1, 64, 6, 4)


@pytest.mark.parametrize("cls_token", [False, True])
def test_sincos_pos_embed_is_fixed_and_recomputed_for_other_grids(cls_token):
    m = tiny(pos_embed="sincos", cls_token=cls_token).eval()
    expected = torch.from_numpy(get_2d_sincos_pos_embed(64, (4, 3), cls_token=cls_token)).float()
    torch.testing.assert_close(m.pos_embed[0], expected)
    assert not m.pos_embed.requires_grad
    assert "pos_embed" not in {n for n, p in m.named_parameters() if p.requires_grad}
    assert "pos_embed" in m.state_dict()
    pos = m.pos_embed_for((6, 4))
    torch.testing.assert_close(
        pos[0], torch.from_numpy(get_2d_sincos_pos_embed(64, (6, 4), cls_token)).float()
    )
    x = torch.randn(1, 3, 96, 64)
    torch.testing.assert_close(m.forward_tokens(x), manual_tokens(m, x, pos))


# ---- training features ----


def test_drop_path_rises_linearly_and_is_off_in_eval():
    m = tiny(drop_path_rate=0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.2])
    assert isinstance(tiny().blocks[1].drop_path1, nn.Identity)
    x = torch.randn(4, 3, *SMALL)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x))


@pytest.mark.parametrize("cls_token", [False, True])
def test_grad_checkpointing_same_outputs_and_gradients(monkeypatch, cls_token):
    x = torch.randn(2, 3, *SMALL)
    plain = tiny(cls_token=cls_token)
    ckpt = tiny(cls_token=cls_token, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing

    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    outs = []
    for m in (plain, ckpt):
        y = m(x)
        (y.square().mean() + y.mean()).backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    assert calls == [False] * len(ckpt.blocks)  # one non-reentrant checkpoint per block
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys() and len(outs[0][1]) > 10
    for name, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], g, msg=name)

    calls.clear()
    with torch.no_grad():
        ckpt(x)
    assert calls == []  # nothing to save memory for without autograd
    ckpt.set_grad_checkpointing(False)
    ckpt(x).sum().backward()
    assert calls == []


# ---- forward_intermediates / prune_intermediate_layers (timm's API) ----


def _timm_pair(cls_token: bool, depth: int = 4):
    """A timm VisionTransformer (square 4x4 grid) and ours with the same weights (a non-trivial norm)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(2)
    ref = TimmViT(
        img_size=64, patch_size=16, embed_dim=64, depth=depth, num_heads=2, num_classes=0,
        class_token=cls_token, global_pool="", qkv_bias=True,
    ).eval()  # fmt: skip
    with torch.no_grad():
        ref.norm.weight.normal_(1.0, 0.5)
        ref.norm.bias.normal_(0.0, 0.5)
    ours = tiny(img_size=(64, 64), depth=depth, cls_token=cls_token).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _assert_same(a, b):
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls_token", [False, True])
def test_forward_intermediates_equals_timm(cls_token):
    ref, ours = _timm_pair(cls_token)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for indices in [None, 1, 3, [0, 2], [-1, 1], (-3,)]:
            # every value of each flag, without the full product
            for norm, fmt, stop_early in [
                (False, "NCHW", False), (True, "NLC", True), (True, "NCHW", True), (False, "NLC", False),
            ]:  # fmt: skip
                kw = dict(indices=indices, norm=norm, output_fmt=fmt, stop_early=stop_early)
                final, maps = ours.forward_intermediates(x, **kw)
                ref_final, ref_maps = ref.forward_intermediates(x, **kw)
                _assert_same(final, ref_final)
                _assert_same(maps, ref_maps)
            for kw in [
                dict(intermediates_only=True),
                dict(return_prefix_tokens=True, intermediates_only=True),
            ]:
                kw["indices"] = indices
                _assert_same(ours.forward_intermediates(x, **kw), ref.forward_intermediates(x, **kw))
    # Shapes, spelt out: NCHW maps [B, C, gh, gw] without the cls token, in block order.
    final, maps = ours.forward_intermediates(x, indices=[2, 0])
    assert final.shape == (2, int(cls_token) + 16, 64) and [m.shape for m in maps] == [(2, 64, 4, 4)] * 2
    with pytest.raises(AssertionError, match="out of range"):
        ours.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="output_fmt"):
        ours.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("cls_token", [False, True])
def test_forward_intermediates_on_non_square_grids_and_other_sizes(cls_token):
    m = tiny(depth=3, cls_token=cls_token).eval()  # 64x48 -> 4x3 grid
    prefix = int(cls_token)
    with torch.no_grad():
        for hw, grid in [(SMALL, (4, 3)), ((96, 64), (6, 4))]:  # the stored grid and a resampled one
            x = torch.randn(2, 3, *hw)
            final, maps = m.forward_intermediates(x, indices=2, norm=True)
            assert [t.shape for t in maps] == [(2, 64, *grid)] * 2
            torch.testing.assert_close(final, m.forward_tokens(x))
            torch.testing.assert_close(maps[-1], m.forward_features(x))  # the last block, normed
            nlc = m.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)[0]
            assert nlc.shape == (2, grid[0] * grid[1], 64)
            # Block 1's raw output, by hand: embed, two blocks, drop the prefix.
            torch.testing.assert_close(nlc, m.blocks[1](m.blocks[0](m.embed(x)))[:, prefix:])


@pytest.mark.parametrize("cls_token", [False, True])
def test_forward_intermediates_with_grad_checkpointing(monkeypatch, cls_token):
    x = torch.randn(2, 3, *SMALL)
    plain = tiny(depth=3, cls_token=cls_token)
    ckpt = tiny(depth=3, cls_token=cls_token, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    outs = []
    for m in (plain, ckpt):
        final, maps = m.forward_intermediates(x, indices=[0, 1], norm=True, stop_early=True)
        (final.square().mean() + sum(t.mean() for t in maps)).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        outs.append(([final.detach(), *[t.detach() for t in maps]], grads))
    assert calls == [False, False]  # stop_early: blocks 0 and 1 only, each checkpointed
    _assert_same(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys() and "blocks.1.mlp.fc2.weight" in outs[0][1]
    assert "blocks.2.mlp.fc2.weight" not in outs[0][1]  # never run
    for name, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], g, msg=name)


def test_prune_intermediate_layers_as_timm_and_saves(tmp_path):
    ref, ours = _timm_pair(cls_token=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = ours.forward_intermediates(x, indices=[0, -3], intermediates_only=True)
    kept = ours.prune_intermediate_layers([0, -3])
    assert kept == ref.prune_intermediate_layers([0, -3]) == [0, 1]
    assert len(ours.blocks) == len(ref.blocks) == 2 and ours.config.depth == 2
    with torch.no_grad():
        _assert_same(ours.forward_intermediates(x, indices=kept, intermediates_only=True), before)
        _assert_same(ours.forward_intermediates(x, indices=kept), ref.forward_intermediates(x, indices=kept))
    # prune_norm drops the final norm; the config follows, so the pruned model reloads as it is.
    ours.prune_intermediate_layers(1, prune_norm=True)
    assert isinstance(ours.norm, nn.Identity) and not ours.config.final_norm and ours.config.depth == 2
    loaded = VisionTransformer.from_pretrained(ours.save_pretrained(tmp_path / "pruned"))
    assert len(loaded.blocks) == 2 and isinstance(loaded.norm, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_tokens(x), ours.forward_tokens(x))


def test_no_weight_decay_names_the_tokens():
    m = tiny(cls_token=True)
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}
    names = dict(m.named_parameters())
    assert {"pos_embed", "cls_token"} <= names.keys()


def test_init_follows_mae_and_timm():
    m = build_vit("vit_small", img_size=(128, 96), cls_token=True)
    for t in (m.pos_embed, m.cls_token):
        # trunc_normal_(std=0.02) (timm's cut-off at +-2 is ~100 sigma: effectively a normal)
        assert 0.015 < t.std().item() < 0.025 and abs(t.mean().item()) < 0.005
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            bound = math.sqrt(6 / (mod.in_features + mod.out_features))  # xavier_uniform
            assert mod.weight.abs().max().item() <= bound and mod.weight.abs().max().item() > 0.9 * bound
            assert torch.count_nonzero(mod.bias) == 0
        elif isinstance(mod, nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    w = m.patch_embed.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))  # xavier on the [C, 3*16*16] view
    assert 0.9 * bound < w.abs().max().item() <= bound
    assert torch.count_nonzero(m.patch_embed.proj.bias) == 0


# ---- parameter counts and FLOPs ----


@pytest.mark.parametrize(
    "arch,billions",
    [("sapiens_0.3b", 0.307), ("sapiens_0.6b", 0.636), ("sapiens_1b", 1.141), ("sapiens_2b", 2.134)],
)
def test_sapiens_encoder_parameter_counts(arch, billions):
    with torch.device("meta"):
        m = build_vit(arch, img_size=(1024, 768))
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / 1e9 - billions) / billions < 0.005, (arch, n)
    assert count_params(arch) == n


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(cls_token=True, patch_padding=2, pos_embed="sincos"),
        dict(qkv_bias=False, final_norm=False, mlp_ratio=2.5, img_size=(96, 64)),
        dict(arch="vit_base", in_chans=1),
    ],
)
def test_count_params_formula_equals_the_built_model(kw):
    cfg = ViTConfig(**{"arch": "vit_test", "img_size": SMALL, **kw})
    with torch.device("meta"):
        m = VisionTransformer(cfg)
    assert count_params(cfg) == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "kw,img_size",
    [(dict(), SMALL), (dict(cls_token=True, patch_padding=2), SMALL), (dict(cls_token=True), (96, 64))],
)
def test_forward_flops_matches_torch_flop_counter(kw, img_size):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ViTConfig(arch="vit_test", img_size=SMALL, **kw)
    m = VisionTransformer(cfg).eval()
    counter = FlopCounterMode(display=False)
    # the math backend decomposes attention into matmuls the counter sees (the CPU fused kernel isn't counted)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        m(torch.randn(1, 3, *img_size))
    assert forward_flops(cfg, img_size) == counter.get_total_flops()


def test_forward_flops_scale_with_tokens_and_depth():
    f = forward_flops("sapiens_0.3b")  # at the default 1024x768
    assert 2.7e12 < f < 2.9e12
    assert forward_flops(ViTConfig(arch="sapiens_0.3b", depth=48)) == pytest.approx(2 * f, rel=1e-3)
    assert forward_flops("sapiens_0.3b", (512, 384)) < f / 4
