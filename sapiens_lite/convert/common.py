"""What every source converter shares: the result type, the key-map renamer, and the checks.

A source file (`sapiens.py`, `mae.py`, ...) holds a declarative key map in torchtitan's style:

    {"layers.{}.ln1.weight": "blocks.{}.norm1.weight",   # `{}` = the layer index
     "head.weight": None}                                # None = dropped on purpose

`rename(state_dict, key_map)` applies it; a key the map does not name is an error listing it (a
checkpoint with an unexpected part, e.g. a MoE ViTPose+, must not load silently without it).
Explicit transforms (q/k/v fusion, the ViTPose cls-position fold) then run on the renamed dict,
and `check_keys` compares the result with the keys and shapes of the model it is meant for.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from sapiens_lite.errors import UserError


class CheckpointKeyError(UserError, ValueError):
    """A state dict whose keys or shapes do not fit the model: names the missing / unexpected / mismatched keys."""


@dataclass(frozen=True)
class HeadHints:
    """A pose head as read off its weights; `HeadConfig(kind, channels)` plus the keypoint count."""

    kind: Literal["sapiens", "vitpose", "simple"]
    num_keypoints: int
    """K heatmaps; the keypoint scheme is the one with K keypoints (17 / 133 / 308) unless named."""
    channels: int | None = None
    """Width of the hidden deconv / conv layers; None for the simple head (it has none)."""


@dataclass
class Hints:
    """What a checkpoint implies about the model it came from (weights alone don't say everything).

    `vit_kwargs()` turns these into `ViTConfig` keywords. `num_heads` can't be read from weights: it
    comes from a transformers config.json or the user (`with_num_heads`), else from the arch found in
    `ARCHS` by (embed_dim, depth), else it stays None and the caller names the arch or the head count.
    `grid` is the patch grid the position embedding was trained for.
    """

    embed_dim: int
    depth: int
    patch_size: int
    grid: tuple[int, int]
    cls_token: bool
    arch: str | None = None
    num_heads: int | None = None
    in_chans: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    final_norm: bool = True
    patch_padding: int = 0
    pos_embed: str = "learned"
    norm_eps: float = 1e-6
    """LayerNorm eps; only a transformers config.json says otherwise (weights don't store it)."""
    head: HeadHints | None = None
    decoder: dict | None = None
    """MAE decoder: {"embed_dim": D', "depth": n} (its number of heads is not in the weights)."""

    @property
    def img_size(self) -> tuple[int, int]:
        # The patch conv with padding p over s pixels gives (s + 2p - k) // k + 1 = s / k tokens for p < k/2.
        return (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)

    def with_num_heads(self, num_heads: int, where: str) -> Hints:
        """A copy with `num_heads`; the arch is kept only if it has that many heads (else explicit sizes)."""
        from sapiens_lite.models.vit import ARCHS

        if num_heads <= 0 or self.embed_dim % num_heads:
            raise UserError(f"{where}: num_heads={num_heads} does not divide embed_dim={self.embed_dim}")
        arch = self.arch if self.arch and ARCHS[self.arch]["num_heads"] == num_heads else None
        return dataclasses.replace(self, arch=arch, num_heads=num_heads)

    def vit_kwargs(self, **overrides) -> dict:
        """Keywords for `ViTConfig(**...)`: the arch when known, else explicit sizes; `overrides` win."""
        kw = dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            cls_token=self.cls_token,
            pos_embed=self.pos_embed,
            patch_padding=self.patch_padding,
            final_norm=self.final_norm,
            norm_eps=self.norm_eps,
        )
        if self.arch is not None:
            kw["arch"] = self.arch
        else:
            kw.update(arch="custom", embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)
        if "arch" in overrides and overrides["arch"] != kw["arch"]:
            for k in ("embed_dim", "depth", "num_heads"):
                kw.pop(k, None)
        kw.update(overrides)
        return kw


@dataclass
class Converted:
    """One foreign checkpoint in our names.

    backbone: timm-keyed `VisionTransformer` state dict, still at the source's grid and cls layout
        (`adapt_to` fits it to another config).
    head: pose head state dict with keys relative to `PoseModel.head` (no `head.` prefix), or None.
    decoder: MAE decoder state dict with the top-level names of `pretrain/mae.py` (`decoder_embed`,
        `mask_token`, `decoder_pos_embed`, `decoder_blocks.{i}.*`, `decoder_norm`, `decoder_pred`), or None.
    """

    source: str
    backbone: dict[str, torch.Tensor]
    hints: Hints
    head: dict[str, torch.Tensor] | None = None
    decoder: dict[str, torch.Tensor] | None = None
    dropped: list[str] = field(default_factory=list)
    """Source keys dropped on purpose (a classifier head, preprocessing buffers, unused blocks)."""
    notes: list[str] = field(default_factory=list)
    """What the conversion changed that a user should hear about (e.g. a VitPose backbone truncated)."""


# ---- renaming ----

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def rename(state_dict: Mapping[str, torch.Tensor], key_map: Mapping[str, str | None], source: str):
    """Apply a torchtitan-style key map; returns (renamed dict, dropped keys).

    A key is looked up as is, then with its first `.N.` component replaced by `.{}.` (the layer index).
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key in key_map:
            target = key_map[key]
        else:
            m = _LAYER_INDEX.search(key)
            abstract = key[: m.start()] + ".{}." + key[m.end() :] if m else None
            if abstract is None or abstract not in key_map:
                unknown.append(key)
                continue
            target = key_map[abstract]
            target = None if target is None else target.format(m.group(1))
        if target is None:
            dropped.append(key)
        else:
            out[target] = value
    if unknown:
        raise CheckpointKeyError(
            f"{source}: {len(unknown)} unexpected key(s) that the {source} key map does not know: {_preview(unknown)}"
        )
    return out, dropped


def prefixed(key_map: Mapping[str, str | None], src: str, dst: str) -> dict[str, str | None]:
    """The same map under a source prefix and a target prefix (both may hold the `{}` layer slot)."""
    return {src + k: (None if v is None else dst + v) for k, v in key_map.items()}


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---- explicit transforms ----

_QKV = re.compile(r"^(.*)\.attn\.q\.(weight|bias)$")


def fuse_qkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Separate `*.attn.{q,k,v}.{weight,bias}` -> timm's fused `*.attn.qkv.*` (rows stacked q, k, v)."""
    out = dict(sd)
    for key in [k for k in sd if _QKV.match(k)]:
        prefix, kind = _QKV.match(key).groups()
        parts = [out.pop(f"{prefix}.attn.{n}.{kind}", None) for n in ("q", "k", "v")]
        if any(p is None for p in parts):
            raise CheckpointKeyError(f"{prefix}.attn: q/k/v {kind} incomplete (need all three to fuse)")
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)  # [3C, C] or [3C]
    return out


# ---- reading the architecture off the weights ----


def guess_grid(num_patches: int, source: str) -> tuple[int, int]:
    """Patch count -> (gh, gw): square, else the 4:3 (H:W) portrait grid of top-down pose models.

    Weights don't store the aspect ratio; Sapiens pose (64x48) and ViTPose (16x12) are 4:3, the MAE /
    timm / Sapiens pretraining checkpoints square. Pass `grid=` to `convert_state_dict` otherwise.
    """
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return (side, side)
    if (num_patches * 4) % 3 == 0:
        gh = math.isqrt(num_patches * 4 // 3)
        if gh * gh == num_patches * 4 // 3 and gh % 4 == 0:
            return (gh, gh * 3 // 4)
    raise UserError(
        f"{source}: can't tell the patch grid of a {num_patches}-token position embedding "
        "(neither square nor 4:3); pass grid=(gh, gw) / --grid GHxGW"
    )


def vit_hints(
    sd: Mapping[str, torch.Tensor], *, cls_token: bool, grid: tuple[int, int] | None, source: str, **kw
):
    """Hints for a timm-keyed backbone state dict (after renaming)."""
    from sapiens_lite.models.vit import ARCHS

    try:
        w = sd["patch_embed.proj.weight"]  # [C, in_chans, p, p]
        pos = sd["pos_embed"]  # [1, prefix + gh*gw, C]
    except KeyError as e:
        raise CheckpointKeyError(f"{source}: no {e.args[0]!r} after conversion") from None
    embed_dim, in_chans, patch_size = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    num_patches = pos.shape[1] - (1 if cls_token else 0)
    if grid is None:
        grid = guess_grid(num_patches, source)
    elif grid[0] * grid[1] != num_patches:
        raise UserError(
            f"{source}: grid {tuple(grid)} has {grid[0] * grid[1]} cells, pos_embed has {num_patches}"
        )
    arch = next((a for a, s in ARCHS.items() if (s["embed_dim"], s["depth"]) == (embed_dim, depth)), None)
    fc1 = sd.get("blocks.0.mlp.fc1.weight")  # [hidden, C]
    return Hints(
        embed_dim=embed_dim,
        depth=depth,
        patch_size=patch_size,
        grid=tuple(grid),
        cls_token=cls_token,
        arch=arch,
        num_heads=ARCHS[arch]["num_heads"] if arch else None,
        in_chans=in_chans,
        mlp_ratio=fc1.shape[0] / embed_dim if fc1 is not None else 4.0,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        final_norm="norm.weight" in sd,
        **kw,
    )


# ---- checks against the target model ----


def check_keys(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size | tuple], what: str) -> None:
    """The exact key set and every shape must match; otherwise list what is missing / unexpected / mismatched."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k])}"
        for k in sorted(set(sd) & set(expected))
        if tuple(sd[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {_preview(mismatched)}")
    if problems:
        raise CheckpointKeyError(f"{what}: " + "; ".join(problems))


def model_shapes(build) -> dict[str, torch.Size]:
    """Key -> shape of the state dict of `build()`, built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        model = build()
    return {k: v.shape for k, v in model.state_dict().items()}


def backbone_shapes(hints: Hints) -> dict[str, torch.Size]:
    """Keys and shapes of the `VisionTransformer` the hints describe (num_heads doesn't change shapes)."""
    from sapiens_lite.models.vit import VisionTransformer, ViTConfig

    kw = hints.vit_kwargs()
    if kw.get("num_heads", 0) is None:
        kw["num_heads"] = 1
    return model_shapes(lambda: VisionTransformer(ViTConfig(**kw)))


def decoder_shapes(decoder: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Size]:
    """Expected MAE decoder keys/shapes, read off its embedding, depth and output (timm `Block` key names)."""
    from timm.models.vision_transformer import Block

    try:
        embed = decoder["decoder_embed.weight"]  # [D', C]
        pred = decoder["decoder_pred.weight"]  # [p*p*3, D']
        pos = decoder["decoder_pos_embed"]  # [1, 1 + L, D']
    except KeyError as e:
        raise CheckpointKeyError(f"{what}: no {e.args[0]!r}") from None
    dim = embed.shape[0]
    depth = 1 + max((int(k.split(".")[1]) for k in decoder if k.startswith("decoder_blocks.")), default=-1)
    fc1 = decoder.get("decoder_blocks.0.mlp.fc1.weight")
    ratio = fc1.shape[0] / dim if fc1 is not None else 4.0
    block = model_shapes(lambda: Block(dim, 1, mlp_ratio=ratio, qkv_bias=True))
    shapes = {
        "decoder_embed.weight": embed.shape,
        "decoder_embed.bias": torch.Size([dim]),
        "mask_token": torch.Size([1, 1, dim]),
        "decoder_pos_embed": pos.shape,
        "decoder_norm.weight": torch.Size([dim]),
        "decoder_norm.bias": torch.Size([dim]),
        "decoder_pred.weight": pred.shape,
        "decoder_pred.bias": pred.shape[:1],
    }
    for i in range(depth):
        shapes.update({f"decoder_blocks.{i}.{k}": s for k, s in block.items()})
    return shapes


def _preview(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
