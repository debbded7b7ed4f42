"""facebookresearch/mae pretraining checkpoints (`mae_pretrain_vit_*.pth`, `{"model": ...}`).

The encoder uses timm's names (so does ours) and the decoder the names our `pretrain/mae.py` keeps:
`decoder_embed`, `mask_token`, `decoder_pos_embed` (fixed sin-cos, 1 + L rows), `decoder_blocks.{i}.*`
(timm `Block`), `decoder_norm`, `decoder_pred`. Both maps are the identity; the encoder's position
embedding is the fixed 2D sin-cos one, hence `pos_embed="sincos"` in the hints.
"""

from __future__ import annotations

import torch

from sapiens_lite.convert.common import Converted, prefixed, rename, vit_hints
from sapiens_lite.convert.timm import BACKBONE_KEYS, BLOCK_KEYS

DECODER_KEYS: dict[str, str | None] = {
    "mask_token": "mask_token",
    "decoder_pos_embed": "decoder_pos_embed",
    "decoder_embed.weight": "decoder_embed.weight",
    "decoder_embed.bias": "decoder_embed.bias",
    **prefixed(BLOCK_KEYS, "decoder_blocks.{}.", "decoder_blocks.{}."),
    "decoder_norm.weight": "decoder_norm.weight",
    "decoder_norm.bias": "decoder_norm.bias",
    "decoder_pred.weight": "decoder_pred.weight",
    "decoder_pred.bias": "decoder_pred.bias",
}

SIGNATURES = (frozenset({"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_embed.weight"}),)


def convert(sd: dict[str, torch.Tensor], grid: tuple[int, int] | None = None) -> Converted:
    decoder_part = {k: v for k, v in sd.items() if k.startswith("decoder_") or k == "mask_token"}
    encoder_part = {k: v for k, v in sd.items() if k not in decoder_part}
    backbone, dropped = rename(encoder_part, BACKBONE_KEYS, "mae")
    decoder, _ = rename(decoder_part, DECODER_KEYS, "mae decoder")
    hints = vit_hints(
        backbone, cls_token=True, grid=grid, source="mae", pos_embed="sincos", decoder=decoder_hints(decoder)
    )
    return Converted("mae", backbone, hints, decoder=decoder, dropped=dropped)


def decoder_hints(decoder: dict[str, torch.Tensor]) -> dict:
    """Width and depth of an MAE decoder (our `pretrain/mae.py` names)."""
    depth = 1 + max((int(k.split(".")[1]) for k in decoder if k.startswith("decoder_blocks.")), default=-1)
    return {"embed_dim": decoder["decoder_embed.weight"].shape[0], "depth": depth}
