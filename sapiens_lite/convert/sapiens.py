"""Sapiens v1 checkpoints (facebookresearch/sapiens): mmpretrain ViT names, mmpose heatmap head.

Pretraining, `sapiens_<size>_epoch_<n>_clean.pth`: the bare encoder of the MAE run, flat keys,
a cls token and a 64x64 (+1 cls) position embedding for 1024x1024 inputs.

Pose, `sapiens_<size>_<dataset>_best_*.pth`: an mmengine checkpoint `{"state_dict": ..., "meta": ...}`
holding `backbone.*` (the same ViT with `with_cls_token=False`, `patch_cfg=dict(padding=2)`, a 64x48
position embedding for 1024x768 inputs) and `head.*` (mmpose `HeatmapHead`: two stride-2 deconvs and
two convs, each followed by a parameter-free InstanceNorm + SiLU, then a 1x1 `final_layer`).

mmpretrain `TransformerEncoderLayer`: `ln1` -> attn -> `ln2` -> `ffn`, where mmcv's FFN is
`layers = Sequential(Sequential(fc1, act, drop), fc2, drop)`: `ffn.layers.0.0` is fc1, `ffn.layers.1`
is fc2. The encoder's final LayerNorm is also called `ln1` (its optional pre-norm would be `pre_norm`).
"""

from __future__ import annotations

import torch

from sapiens_lite.convert.common import Converted, HeadHints, rename, strip_prefix, vit_hints
from sapiens_lite.errors import UserError

# mmpretrain VisionTransformer -> timm names
BACKBONE_KEYS: dict[str, str | None] = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "patch_embed.projection.weight": "patch_embed.proj.weight",
    "patch_embed.projection.bias": "patch_embed.proj.bias",
    "layers.{}.ln1.weight": "blocks.{}.norm1.weight",
    "layers.{}.ln1.bias": "blocks.{}.norm1.bias",
    "layers.{}.attn.qkv.weight": "blocks.{}.attn.qkv.weight",
    "layers.{}.attn.qkv.bias": "blocks.{}.attn.qkv.bias",
    "layers.{}.attn.proj.weight": "blocks.{}.attn.proj.weight",
    "layers.{}.attn.proj.bias": "blocks.{}.attn.proj.bias",
    "layers.{}.ln2.weight": "blocks.{}.norm2.weight",
    "layers.{}.ln2.bias": "blocks.{}.norm2.bias",
    "layers.{}.ffn.layers.0.0.weight": "blocks.{}.mlp.fc1.weight",
    "layers.{}.ffn.layers.0.0.bias": "blocks.{}.mlp.fc1.bias",
    "layers.{}.ffn.layers.1.weight": "blocks.{}.mlp.fc2.weight",
    "layers.{}.ffn.layers.1.bias": "blocks.{}.mlp.fc2.bias",
    "ln1.weight": "norm.weight",
    "ln1.bias": "norm.bias",
}

# mmpose HeatmapHead -> our Sapiens head: the same names, relative to the head (`head.` stripped).
# `{}` is the Sequential index: deconvs at 0, 3 and convs at 0, 3 (each followed by norm + act).
HEAD_KEYS: dict[str, str | None] = {
    "deconv_layers.{}.weight": "deconv_layers.{}.weight",
    "conv_layers.{}.weight": "conv_layers.{}.weight",
    "conv_layers.{}.bias": "conv_layers.{}.bias",
    "final_layer.weight": "final_layer.weight",
    "final_layer.bias": "final_layer.bias",
}

# Everything outside backbone.* / head.*: mmpose's data-preprocessor constants, if saved (ours live in the config).
OTHER_KEYS: dict[str, str | None] = {"data_preprocessor.mean": None, "data_preprocessor.std": None}

PRETRAIN_SIGNATURES = (frozenset({"patch_embed.projection.weight", "layers.0.attn.qkv.weight"}),)
POSE_SIGNATURES = (frozenset({"backbone.patch_embed.projection.weight", "head.final_layer.weight"}),)


def convert_pretrain(sd: dict[str, torch.Tensor], grid: tuple[int, int] | None = None) -> Converted:
    backbone, dropped = rename(sd, BACKBONE_KEYS, "sapiens_pretrain")
    hints = vit_hints(backbone, cls_token="cls_token" in backbone, grid=grid, source="sapiens_pretrain")
    return Converted("sapiens_pretrain", backbone, hints, dropped=dropped)


def convert_pose(sd: dict[str, torch.Tensor], grid: tuple[int, int] | None = None) -> Converted:
    backbone, dropped = rename(strip_prefix(sd, "backbone."), BACKBONE_KEYS, "sapiens_pose backbone")
    head, _ = rename(strip_prefix(sd, "head."), HEAD_KEYS, "sapiens_pose head")
    rest = {k: v for k, v in sd.items() if not k.startswith(("backbone.", "head."))}
    _, dropped_rest = rename(rest, OTHER_KEYS, "sapiens_pose")
    hints = vit_hints(
        backbone,
        cls_token="cls_token" in backbone,
        grid=grid,
        source="sapiens_pose",
        patch_padding=2,  # patch_cfg=dict(padding=2) in every Sapiens pose config
        head=head_hints(head),
    )
    return Converted("sapiens_pose", backbone, hints, head=head, dropped=dropped + dropped_rest)


def head_hints(head: dict[str, torch.Tensor]) -> HeadHints:
    """Our Sapiens head from a HeatmapHead's weights: one width, 4x4 deconvs and 1x1 convs, or a UserError."""

    def layers(name):
        idx = sorted({int(k.split(".")[1]) for k in head if k.startswith(name + ".")})
        return [head[f"{name}.{i}.weight"] for i in idx]

    deconvs = layers("deconv_layers")  # ConvTranspose2d weight: [in, out, k, k]
    convs = layers("conv_layers")  # Conv2d weight: [out, in, k, k]
    final = head["final_layer.weight"]  # [K, in, 1, 1]
    widths = {w.shape[1] for w in deconvs} | {w.shape[0] for w in convs}
    if len(widths) > 1:
        raise UserError(f"sapiens_pose: head layers of different widths {sorted(widths)} are not supported")
    kernels = [(w.shape[-1], 4) for w in deconvs] + [(w.shape[-1], 1) for w in convs]
    if any(k != expected for k, expected in kernels):
        raise UserError(
            "sapiens_pose: only 4x4 deconvs and 1x1 convs are supported in the head, got kernel sizes "
            f"{[w.shape[-1] for w in deconvs]} (deconv) and {[w.shape[-1] for w in convs]} (conv)"
        )
    return HeadHints("sapiens", num_keypoints=final.shape[0], channels=widths.pop() if widths else None)
