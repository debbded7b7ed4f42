"""timm `VisionTransformer` state dicts (e.g. `vit_base_patch16_224`): our names already.

Our `VisionTransformer` uses timm's key names, so the map is the identity; the ImageNet classifier
(`head.*`) is dropped. Variants with parts we don't have (`fc_norm` of global-pool models, register
tokens, layer scale `ls1.gamma`, ...) fail with their keys listed.
"""

from __future__ import annotations

import torch

from sapiens_lite.convert.common import Converted, prefixed, rename, vit_hints

# One timm `Block`, relative names (pre-norm: norm1 -> attn -> norm2 -> mlp).
BLOCK_KEYS: dict[str, str | None] = {
    f"{name}.{p}": f"{name}.{p}"
    for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for p in ("weight", "bias")
}

BACKBONE_KEYS: dict[str, str | None] = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    **prefixed(BLOCK_KEYS, "blocks.{}.", "blocks.{}."),
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}

KEYS: dict[str, str | None] = {**BACKBONE_KEYS, "head.weight": None, "head.bias": None}

SIGNATURES = (frozenset({"patch_embed.proj.weight", "blocks.0.attn.qkv.weight"}),)
EXCLUDES = frozenset({"decoder_embed.weight"})  # that is an MAE checkpoint (mae.py)


def convert(sd: dict[str, torch.Tensor], grid: tuple[int, int] | None = None) -> Converted:
    backbone, dropped = rename(sd, KEYS, "timm")
    hints = vit_hints(backbone, cls_token="cls_token" in backbone, grid=grid, source="timm")
    return Converted("timm", backbone, hints, dropped=dropped)
