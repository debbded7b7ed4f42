"""One entry point for foreign checkpoints, in the spirit of timm's `checkpoint_filter_fn`.

    sd = load_checkpoint_file("sapiens_0.3b_epoch_1600_clean.pth")
    conv = convert_state_dict(sd)                       # source found from its keys: "sapiens_pretrain"
    model = build_backbone(conv, img_size=(1024, 768), cls_token=False)   # a pose backbone from it

Steps: unwrap the container (`{"state_dict": ...}`, `{"model": ...}`, a `module.` prefix), find the
source in `SOURCES` by its signature keys (or take `source=`), run that source's converter (one file
per source: a declarative key map + explicit transforms), then check the exact key set and shapes
against the model the checkpoint describes. `adapt_to` fits the backbone to another `ViTConfig`:
it drops the cls slot of the position embedding when the target has no cls token and resamples the
grid (bicubic, timm's `resample_abs_pos_embed`) when the target grid differs. `build_model` builds
what the checkpoint holds: `build_pose_model` when it has a pose head, else `build_backbone`.
Files, transformers folders and Hub repos are read by `read.py` (`read_checkpoint`), which calls this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from sapiens_lite.convert import mae, sapiens, transformers_vitmae, transformers_vitpose
from sapiens_lite.convert import timm as timm_vit
from sapiens_lite.convert.common import (
    CheckpointKeyError,
    Converted,
    backbone_shapes,
    check_keys,
    decoder_shapes,
    model_shapes,
)
from sapiens_lite.errors import UserError
from sapiens_lite.hub import build_with_weights


@dataclass(frozen=True)
class Source:
    signatures: tuple[frozenset[str], ...]
    """The source matches when every key of any one of these sets is present..."""
    convert: Callable[..., Converted]
    description: str
    excludes: frozenset[str] = frozenset()
    """...and none of these is."""

    def matches(self, keys: set[str]) -> bool:
        return any(sig <= keys for sig in self.signatures) and not (self.excludes & keys)


# source name -> signature keys and converter. Every checkpoint must match exactly one entry.
SOURCES: dict[str, Source] = {
    "sapiens_pretrain": Source(
        sapiens.PRETRAIN_SIGNATURES,
        sapiens.convert_pretrain,
        "Sapiens v1 pretrain *_clean.pth (mmpretrain ViT)",
    ),
    "sapiens_pose": Source(
        sapiens.POSE_SIGNATURES, sapiens.convert_pose, "Sapiens v1 pose .pth (mmpose backbone.* + head.*)"
    ),
    "mae": Source(
        mae.SIGNATURES, mae.convert, "facebookresearch/mae pretraining checkpoint (timm + decoder_*)"
    ),
    "timm": Source(
        timm_vit.SIGNATURES, timm_vit.convert, "timm VisionTransformer state dict", excludes=timm_vit.EXCLUDES
    ),
    "transformers_vitmae": Source(
        transformers_vitmae.SIGNATURES,
        transformers_vitmae.convert,
        "transformers ViTMAEForPreTraining / ViTMAEModel",
    ),
    "transformers_vitpose": Source(
        transformers_vitpose.SIGNATURES,
        transformers_vitpose.convert,
        "transformers VitPoseForPoseEstimation / VitPoseBackbone",
    ),
}

# Containers around a state dict, unwrapped in this order: mmengine, facebookresearch/mae, DeepSpeed.
CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict")


def unwrap(obj: Mapping) -> dict[str, torch.Tensor]:
    """A checkpoint's top-level dict -> its flat state dict (tensors only; `meta`, optimizer etc. left behind)."""
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise UserError(
                f"no state dict found: top-level keys are {_preview(list(obj))}; "
                f"expected tensors or one of {', '.join(CONTAINER_KEYS)}"
            )
        obj = inner
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):  # DistributedDataParallel
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def detect_source(sd: Mapping[str, torch.Tensor]) -> str:
    keys = set(sd)
    found = [name for name, src in SOURCES.items() if src.matches(keys)]
    if len(found) == 1:
        return found[0]
    known = "; ".join(f"{n} ({s.description})" for n, s in SOURCES.items())
    if not found:
        raise UserError(
            f"unrecognised checkpoint format; keys seen: {_preview(sorted(keys), 6)}. Known formats: {known}"
        )
    raise UserError(
        f"checkpoint matches several formats ({', '.join(found)}); pick one with source=/--source"
    )


def convert_state_dict(
    state_dict: Mapping, *, source: str | None = None, grid: tuple[int, int] | None = None
) -> Converted:
    """A foreign checkpoint (state dict or container) -> `Converted` (backbone / head / decoder / hints).

    source: force a format (a key of `SOURCES`) instead of recognising it from the keys.
    grid: (gh, gw) of the checkpoint's position embedding when it is neither square nor 4:3.
    Raises `UserError` (unknown format) or `CheckpointKeyError` (a key set that doesn't fit the model).
    """
    sd = unwrap(state_dict)
    if source is None:
        source = detect_source(sd)
    elif source not in SOURCES:
        raise UserError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    conv = SOURCES[source].convert(sd, grid=grid)
    check_keys(conv.backbone, backbone_shapes(conv.hints), f"{source}: backbone")
    if conv.head is not None:
        check_keys(conv.head, model_shapes(lambda: _build_head(conv)), f"{source}: pose head")
    if conv.decoder is not None:
        check_keys(conv.decoder, decoder_shapes(conv.decoder, source), f"{source}: MAE decoder")
    return conv


def check_fits(
    conv: Converted, cfg, *, checkpoint: str | None = None, target: str = "the target config"
) -> None:
    """UserError unless the converted backbone's width, depth and patch size are those of `cfg` (a `ViTConfig`):
    the weights' shapes, which no resampling changes."""
    cfg = cfg.resolved()
    for name in ("embed_dim", "depth", "patch_size"):
        ours, theirs = getattr(cfg, name), getattr(conv.hints, name)
        if ours != theirs:
            raise UserError(
                f"{checkpoint or conv.source}: checkpoint has {name}={theirs}, {target} ({cfg.arch}) has {name}={ours}"
            )


def adapt_to(conv: Converted, cfg) -> dict[str, torch.Tensor]:
    """The converted backbone as a state dict for `VisionTransformer(cfg)` (a `ViTConfig`).

    The width, depth, patch size and MLP must match; the cls token and the position-embedding grid
    may differ: a cls slot is dropped for a target without cls token (Sapiens pretrain -> pose) and
    the grid is resampled bicubically (64x64 -> 64x48).
    """
    from sapiens_lite.models.vit import VisionTransformer
    from sapiens_lite.pos_embed import resample_pos_embed

    cfg = cfg.resolved()
    h = conv.hints
    check_fits(conv, cfg)
    if cfg.cls_token and not h.cls_token:
        raise UserError(f"{conv.source}: the target has a cls token, the checkpoint has none to give it")

    sd = dict(conv.backbone)
    pos = sd["pos_embed"]  # [1, (1) + gh*gw, C]
    patches = pos[:, 1:] if h.cls_token else pos  # [1, gh*gw, C]
    patches = resample_pos_embed(patches, cfg.grid_size, h.grid, num_prefix_tokens=0)  # [1, nh*nw, C]
    if cfg.cls_token:
        sd["pos_embed"] = torch.cat([pos[:, :1], patches], dim=1)
    else:
        sd["pos_embed"] = patches
        sd.pop("cls_token", None)
    check_keys(sd, model_shapes(lambda: VisionTransformer(cfg)), f"{conv.source}: backbone for {cfg.arch}")
    return sd


def build_backbone(conv: Converted, **overrides):
    """`VisionTransformer` with the converted weights, in eval mode, fp32 (the default dtype).

    `overrides` are `ViTConfig` fields (arch, img_size, cls_token, patch_padding, ...).
    """
    from sapiens_lite.models.vit import VisionTransformer, ViTConfig

    try:
        cfg = ViTConfig(**_vit_kwargs(conv, overrides))
    except ValueError as e:
        raise UserError(f"{conv.source}: {e}") from None
    return build_with_weights(lambda: VisionTransformer(cfg), adapt_to(conv, cfg), source=conv.source)


def head_config(conv: Converted):
    """`HeadConfig` of the converted pose head (kind and width read off the weights)."""
    from sapiens_lite.models.pose import HeadConfig

    return HeadConfig(kind=conv.hints.head.kind, channels=conv.hints.head.channels)


def _build_head(conv: Converted):
    from sapiens_lite.models.pose import build_head

    return build_head(head_config(conv), conv.hints.embed_dim, conv.hints.head.num_keypoints)


def build_pose_model(conv: Converted, *, scheme: str | None = None, **backbone_overrides):
    """`PoseModel` with the converted backbone and head, in eval mode; `backbone_overrides` are `ViTConfig` fields.

    scheme: keypoint scheme; by default the one with the head's number of keypoints (17 / 133 / 308).
    """
    from sapiens_lite.keypoints import scheme_for_num_keypoints
    from sapiens_lite.models.pose import PoseConfig, PoseModel, check_head_keypoints
    from sapiens_lite.models.vit import ViTConfig

    if conv.head is None:
        raise UserError(f"{conv.source}: the checkpoint has no pose head")
    if scheme is None:
        try:
            scheme = scheme_for_num_keypoints(conv.hints.head.num_keypoints).name
        except UserError as e:
            raise UserError(
                f"{conv.source}: the pose head predicts {conv.hints.head.num_keypoints} heatmaps; {e}"
            ) from None
    try:
        backbone = ViTConfig(**_vit_kwargs(conv, backbone_overrides))
        cfg = PoseConfig(
            backbone=backbone, head=head_config(conv), scheme=scheme, input_size=backbone.img_size
        )
    except ValueError as e:
        raise UserError(f"{conv.source}: {e}") from None
    sd = {f"backbone.{k}": v for k, v in adapt_to(conv, backbone).items()}
    sd.update({f"head.{k}": v for k, v in conv.head.items()})
    check_head_keypoints(sd, cfg, conv.source)  # a clearer message than the shape mismatch below
    check_keys(sd, model_shapes(lambda: PoseModel(cfg)), f"{conv.source}: pose model")
    return build_with_weights(lambda: PoseModel(cfg), sd, source=conv.source)


def build_model(conv: Converted, *, arch: str | None = None, scheme: str | None = None, **vit_overrides):
    """The model a converted checkpoint describes, in eval mode: a `PoseModel` when it has a pose head,
    else a `VisionTransformer` (an MAE decoder is not kept).

    arch: name the backbone's arch (a key of `ARCHS`) instead of taking it from the hints.
    scheme: keypoint scheme of a pose head (default: the one with its keypoint count); refused without one.
    vit_overrides: other `ViTConfig` fields (img_size, cls_token, ...), fitted as `adapt_to` allows.
    """
    if arch is not None:
        vit_overrides["arch"] = arch
    if conv.head is not None:
        return build_pose_model(conv, scheme=scheme, **vit_overrides)
    if scheme is not None:
        raise UserError(f"{conv.source}: scheme={scheme!r} given, but the checkpoint has no pose head")
    return build_backbone(conv, **vit_overrides)


def _vit_kwargs(conv: Converted, overrides: dict) -> dict:
    kw = conv.hints.vit_kwargs(**overrides)
    if kw.get("num_heads", 0) is None:
        raise UserError(
            f"{conv.source}: no arch has embed_dim={conv.hints.embed_dim}, depth={conv.hints.depth}; "
            "the number of heads can't be read from weights: pass num_heads (--num-heads N)"
        )
    return kw


def _preview(items: list[str], n: int = 8) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


__all__ = [
    "SOURCES",
    "Source",
    "CheckpointKeyError",
    "Converted",
    "convert_state_dict",
    "detect_source",
    "unwrap",
    "adapt_to",
    "build_backbone",
    "build_pose_model",
    "build_model",
    "head_config",
]
