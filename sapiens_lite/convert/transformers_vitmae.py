"""transformers `ViTMAEForPreTraining` / `ViTMAEModel` state dicts, in both of transformers' namings.

Files on the Hub (written by transformers 4) name a layer `vit.encoder.layer.N.attention.attention.query`,
`...attention.output.dense`, `...intermediate.dense`, `...output.dense`. transformers 5 renamed the
modules in memory (`vit.layers.N.attention.q_proj`, `o_proj`, `mlp.fc1`, `mlp.fc2`) and renames old
files while loading (`conversion_mapping.py`), so `model.state_dict()` of a v5 model has the new names.
We accept both, in one map, plus the decoder naming transformers 5 `save_pretrained` writes (below).
`ViTMAEModel` has the same keys without the `vit.` prefix.

Separate q/k/v projections are fused into timm's `attn.qkv` (rows stacked q, k, v). ViTMAE uses
LayerNorm eps 1e-12 by default where ours uses 1e-6; outputs differ by ~1e-7 relative, far below
bf16 resolution. Encoder and decoder position embeddings are fixed sin-cos, with a cls slot.
"""

from __future__ import annotations

import torch

from sapiens_lite.convert.common import Converted, fuse_qkv, prefixed, rename, vit_hints
from sapiens_lite.convert.mae import decoder_hints

# One layer -> one timm Block. The q/k/v targets are fused into attn.qkv afterwards.
LAYER_KEYS_V4: dict[str, str | None] = {
    "attention.attention.query": "attn.q",
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
LAYER_KEYS_V5: dict[str, str | None] = {
    "attention.q_proj": "attn.q",
    "attention.k_proj": "attn.k",
    "attention.v_proj": "attn.v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}


def with_params(key_map: dict[str, str]) -> dict[str, str]:
    """Module map -> parameter map (`.weight` and `.bias` of each module)."""
    return {f"{k}.{p}": f"{v}.{p}" for k, v in key_map.items() for p in ("weight", "bias")}


KEYS: dict[str, str | None] = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    **prefixed(with_params(LAYER_KEYS_V4), "vit.encoder.layer.{}.", "blocks.{}."),
    **prefixed(with_params(LAYER_KEYS_V5), "vit.layers.{}.", "blocks.{}."),
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    **prefixed(with_params(LAYER_KEYS_V4), "decoder.decoder_layers.{}.", "decoder_blocks.{}."),
    **prefixed(with_params(LAYER_KEYS_V5), "decoder.decoder_layers.{}.", "decoder_blocks.{}."),
    # transformers 5.x `save_pretrained` reverses its `encoder.layer.` -> `layers.` rename inside
    # `decoder_layers.` too and writes `decoder.decoder_encoder.layer.N...` (with v4 module names).
    **prefixed(with_params(LAYER_KEYS_V4), "decoder.decoder_encoder.layer.{}.", "decoder_blocks.{}."),
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}

SIGNATURES = (
    frozenset({"vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.cls_token"}),
    frozenset({"embeddings.patch_embeddings.projection.weight", "embeddings.cls_token"}),  # ViTMAEModel
)


def convert(sd: dict[str, torch.Tensor], grid: tuple[int, int] | None = None) -> Converted:
    if "embeddings.cls_token" in sd:  # ViTMAEModel: the encoder alone, without the `vit.` prefix
        sd = {f"vit.{k}": v for k, v in sd.items()}
    renamed, dropped = rename(sd, KEYS, "transformers_vitmae")
    renamed = fuse_qkv(renamed)
    decoder = {k: v for k, v in renamed.items() if k.startswith("decoder_") or k == "mask_token"}
    backbone = {k: v for k, v in renamed.items() if k not in decoder}
    hints = vit_hints(
        backbone,
        cls_token=True,
        grid=grid,
        source="transformers_vitmae",
        pos_embed="sincos",
        decoder=decoder_hints(decoder) if decoder else None,
    )
    return Converted("transformers_vitmae", backbone, hints, decoder=decoder or None, dropped=dropped)
