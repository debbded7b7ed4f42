"""transformers `VitPoseForPoseEstimation` (and bare `VitPoseBackbone`) state dicts.

transformers 5 kept the transformers-4 layer names for VitPose (`backbone.encoder.layer.N.attention.
attention.query`, ..., `mlp.fc1`), so the map has one naming. Two facts of `modeling_vitpose_backbone.py`
shape the conversion:

- the patch convolution always has padding 2 (as the original ViTPose), hence `patch_padding=2`;
- there is no cls token, yet `position_embeddings` has a cls row, added to EVERY patch:
  `patches + pos[:, 1:] + pos[:, :1]`. We fold it in exactly: our `pos_embed = pos[:, 1:] + pos[:, :1]`;
- `VitPoseBackbone.forward` runs every layer, takes `hidden_states[i]` for each stage i of the config's
  `out_indices` (0 = the embeddings, i = the output of layer i) and applies its one final `layernorm`
  to each; the pose model's head reads the last of them (`feature_maps[-1]`). Stage i < depth is thus
  exactly our ViT truncated to depth i (whose `norm` is that LayerNorm): `read_checkpoint` converts a
  folder whose config.json says so with `keep_blocks`. A bare state dict does not carry out_indices.

Heads keep transformers' names (relative to `head`), so our PoseModel heads are named to match:
classic ("vitpose"): `deconv1.weight`, `batchnorm1.{weight,bias,running_mean,running_var,
num_batches_tracked}`, `deconv2.weight`, `batchnorm2.*`, `conv.{weight,bias}`;
simple: `conv.{weight,bias}` (after ReLU and a x4 bilinear upsample).
ViTPose+ mixture-of-experts backbones (`mlp.experts.*`) are not supported and fail with those keys listed.
"""

from __future__ import annotations

import re

import torch

from sapiens_lite.convert.common import (
    Converted,
    HeadHints,
    fuse_qkv,
    prefixed,
    rename,
    strip_prefix,
    vit_hints,
)
from sapiens_lite.convert.transformers_vitmae import with_params
from sapiens_lite.errors import UserError

LAYER_KEYS: dict[str, str | None] = {
    "attention.attention.query": "attn.q",
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}

BACKBONE_KEYS: dict[str, str | None] = {
    "embeddings.position_embeddings": "pos_embed",  # cls row folded in by `fold_cls_position`
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    **prefixed(with_params(LAYER_KEYS), "encoder.layer.{}.", "blocks.{}."),
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
HEAD_KEYS: dict[str, str | None] = {
    "deconv1.weight": "deconv1.weight",  # ConvTranspose2d, no bias
    **{f"batchnorm1.{p}": f"batchnorm1.{p}" for p in _BN},
    "deconv2.weight": "deconv2.weight",
    **{f"batchnorm2.{p}": f"batchnorm2.{p}" for p in _BN},
    "conv.weight": "conv.weight",
    "conv.bias": "conv.bias",
}

SIGNATURES = (
    frozenset(
        {"backbone.embeddings.patch_embeddings.projection.weight", "backbone.encoder.layer.0.mlp.fc1.weight"}
    ),
    frozenset(
        {"embeddings.patch_embeddings.projection.weight", "encoder.layer.0.mlp.fc1.weight"}
    ),  # VitPoseBackbone
)


def fold_cls_position(pos: torch.Tensor) -> torch.Tensor:
    """[1, 1 + L, C] with a cls row that VitPose adds to every patch -> [1, L, C] (computed in fp32)."""
    folded = pos[:, 1:].float() + pos[:, :1].float()
    return folded.to(pos.dtype)


def convert(sd: dict[str, torch.Tensor], grid: tuple[int, int] | None = None) -> Converted:
    if "embeddings.patch_embeddings.projection.weight" in sd:  # a bare VitPoseBackbone
        sd = {f"backbone.{k}": v for k, v in sd.items()}
    unknown = {k: v for k, v in sd.items() if not k.startswith(("backbone.", "head."))}
    rename(unknown, {}, "transformers_vitpose")  # raises, listing them, if there are any
    backbone, dropped = rename(strip_prefix(sd, "backbone."), BACKBONE_KEYS, "transformers_vitpose backbone")
    backbone = fuse_qkv(backbone)
    backbone["pos_embed"] = fold_cls_position(backbone["pos_embed"])
    head, _ = rename(strip_prefix(sd, "head."), HEAD_KEYS, "transformers_vitpose head")
    hints = vit_hints(
        backbone,
        cls_token=False,
        grid=grid,
        source="transformers_vitpose",
        patch_padding=2,  # VitPoseBackbonePatchEmbeddings: Conv2d(..., padding=2)
        head=head_hints(head) if head else None,
    )
    return Converted("transformers_vitpose", backbone, hints, head=head or None, dropped=dropped)


def head_hints(head: dict[str, torch.Tensor]) -> HeadHints:
    conv = head["conv.weight"]  # [K, in, k, k]
    if "deconv1.weight" in head:
        return HeadHints("vitpose", num_keypoints=conv.shape[0], channels=conv.shape[1])
    return HeadHints("simple", num_keypoints=conv.shape[0])


_LAYER_INDEX = re.compile(r"^(?:backbone\.)?encoder\.layer\.(\d+)\.")


def depth_for_out_indices(out_indices: tuple[int, ...], *, has_head: bool, where: str) -> int:
    """The depth whose output (after the final LayerNorm) is what `out_indices` (stages >= 0) feed on.

    A pose model uses only the last stage. A bare backbone returns one feature map per stage, which a
    single-output ViT cannot reproduce, so several stages are refused; so is stage 0, which no block
    computes.
    """
    if len(out_indices) > 1 and not has_head:
        raise UserError(
            f"{where}: a VitPoseBackbone with several outputs (out_indices {list(out_indices)}) has no "
            "single-feature-map equivalent; only one stage (or a VitPoseForPoseEstimation) converts"
        )
    last = max(out_indices)
    if last == 0:
        raise UserError(
            f"{where}: out_indices {list(out_indices)} reads stage 0 (the patch embeddings, before any "
            "layer); such a backbone is not supported"
        )
    return last


def keep_blocks(sd: dict[str, torch.Tensor], depth: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop the layers from `depth` on (VitPose keys, with or without `backbone.`); returns (kept, dropped)."""
    kept: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in sd.items():
        m = _LAYER_INDEX.match(k)
        if m and int(m.group(1)) >= depth:
            dropped.append(k)
        else:
            kept[k] = v
    return kept, dropped
