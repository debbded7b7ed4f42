"""Plain ViT backbone (Sapiens / MAE / timm flavour) with timm's key names.

    model = build_vit("sapiens_0.3b")                   # 1024x768 input -> 64x48 tokens, no cls token
    x = torch.randn(1, 3, 1024, 768)
    feats = model(x)                                    # [1, 1024, 64, 48]
    tokens, maps = model.forward_intermediates(x, indices=4)   # last 4 blocks: [1, 1024, 64, 48] each

Pre-norm transformer blocks (timm `Block`: LayerNorm eps 1e-6, qkv bias, MLP ratio 4, GELU, attention
through `F.scaled_dot_product_attention`), a 16x16 patch convolution (optionally padded: the Sapiens
pose checkpoints use padding 2, which keeps the 64x48 grid), an optional cls token, and learned or
fixed 2D sin-cos position embeddings for a non-square (gh, gw) grid. Any input whose sides are
multiples of the patch size works; the position embedding is resized to the new grid.

Key names follow timm's `VisionTransformer` (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`) so timm and MAE checkpoints
load without renaming; `sapiens_lite.convert` maps the other formats onto these names.
`forward_intermediates` / `prune_intermediate_layers` are timm's API for the outputs of inner blocks
(distillation students, multi-level dense heads).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
import torch.utils.checkpoint

from sapiens_lite.hub import HubMixin
from sapiens_lite.pos_embed import get_2d_sincos_pos_embed, resample_pos_embed

# arch -> width / depth / heads. The Sapiens sizes are the encoders of Khirodkar et al. (2024).
ARCHS: dict[str, dict] = {
    "sapiens_0.3b": dict(embed_dim=1024, depth=24, num_heads=16),
    "sapiens_0.6b": dict(embed_dim=1280, depth=32, num_heads=16),
    "sapiens_1b": dict(embed_dim=1536, depth=40, num_heads=24),
    "sapiens_2b": dict(embed_dim=1920, depth=48, num_heads=32),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_test": dict(embed_dim=64, depth=2, num_heads=2),  # for unit tests and CPU smoke runs
}


@dataclass
class ViTConfig:
    arch: str = "vit_test"
    """Key of `ARCHS`; fills embed_dim / depth / num_heads where those are None."""
    img_size: tuple[int, int] = (1024, 768)
    """(H, W) the position embedding is made for; multiples of patch_size. Other sizes are resampled."""
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    cls_token: bool = False
    """Sapiens pose backbones have none; MAE and timm checkpoints have one."""
    pos_embed: Literal["learned", "sincos"] = "learned"
    """sincos: fixed 2D sin-cos (MAE pretraining), stored as a parameter with requires_grad=False."""
    patch_padding: int = 0
    """Zero padding of the patch convolution; the Sapiens pose checkpoints use 2 (same grid, wider view)."""
    drop_path_rate: float = 0.0
    """Stochastic depth, rising linearly from 0 at the first block to this value at the last."""
    final_norm: bool = True
    norm_eps: float = 1e-6
    """eps of every LayerNorm: 1e-6 in timm / MAE / Sapiens; transformers' ViTs default to 1e-12."""
    grad_checkpointing: bool = False
    """Recompute each block in the backward pass (saves activation memory, costs one more forward)."""

    def __post_init__(self):
        self.img_size = tuple(self.img_size)
        if len(self.img_size) != 2 or any(s % self.patch_size for s in self.img_size):
            raise ValueError(
                f"img_size must be (H, W), multiples of patch_size {self.patch_size}, got {self.img_size}"
            )
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.patch_padding < 0 or 2 * self.patch_padding >= self.patch_size:
            raise ValueError(f"patch_padding must be in [0, patch_size/2), got {self.patch_padding}")
        if self.arch not in ARCHS and None in (self.embed_dim, self.depth, self.num_heads):
            raise ValueError(f"arch: unknown arch {self.arch!r}; choose one of: {', '.join(ARCHS)}")

    def resolved(self) -> ViTConfig:
        """A copy with embed_dim / depth / num_heads filled from `ARCHS[arch]`."""
        if self.arch not in ARCHS and None in (self.embed_dim, self.depth, self.num_heads):
            raise ValueError(f"arch: unknown arch {self.arch!r}; choose one of: {', '.join(ARCHS)}")
        sizes = {k: v for k, v in ARCHS.get(self.arch, {}).items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **sizes)
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not a multiple of num_heads {cfg.num_heads}")
        return cfg

    def token_grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of an input image -> (gh, gw) of its patch grid: the patch convolution's output size."""
        k, p = self.patch_size, self.patch_padding
        return tuple((s + 2 * p - k) // k + 1 for s in hw)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(gh, gw) of the `img_size` grid, the one the position embedding is stored for."""
        return self.token_grid(self.img_size)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided convolution (padding allowed, unlike timm's)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, padding: int = 0):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, C, gh, gw]
        # Contiguous [B, L, C]: the transposed view would otherwise carry its strides through every residual
        # add, each LayerNorm copying it (about 20% of a bf16 forward on an H200).
        return x.flatten(2).transpose(1, 2).contiguous()  # [B, gh*gw, C]


class VisionTransformer(nn.Module, HubMixin):
    model_type = "vit"
    config_class = ViTConfig

    def __init__(self, cfg: ViTConfig):
        # timm is imported when a model is built: importing it loads every timm model (~1.5 s), which
        # `sapiens info`, `sapiens --help` and config handling do not need.
        from timm.models.vision_transformer import Block

        super().__init__()
        cfg = cfg.resolved()
        self.config = cfg
        self.embed_dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.num_prefix_tokens = 1 if cfg.cls_token else 0
        self.grid_size = cfg.grid_size
        self.grad_checkpointing = cfg.grad_checkpointing

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.patch_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.cls_token else None
        num_pos = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_pos, cfg.embed_dim), requires_grad=cfg.pos_embed == "learned"
        )

        # plain floats: torch.linspace would land on the meta device inside `with torch.device("meta")`
        drop_path = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                drop_path=drop_path[i],
                norm_layer=norm_layer,
            )
            for i in range(cfg.depth)
        )
        for blk in self.blocks:
            # Always attend through F.scaled_dot_product_attention (flash / memory-efficient kernels),
            # whatever timm's TIMM_FUSED_ATTN environment setting says.
            blk.attn.fused_attn = True
        self.norm = norm_layer(cfg.embed_dim) if cfg.final_norm else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE / timm initialisation: xavier-uniform Linear (and patch conv as a Linear), trunc-normal tokens."""
        from timm.layers import trunc_normal_

        if self.config.pos_embed == "sincos":
            pe = get_2d_sincos_pos_embed(self.embed_dim, self.grid_size, cls_token=self.cls_token is not None)
            self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        else:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.apply(_init_linear_and_norm)

    # ---- stages, in data-flow order ----

    def token_grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of an input image -> (gh, gw) of its patch grid (`ViTConfig.token_grid`)."""
        return self.config.token_grid(hw)

    def patchify_embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> patch tokens [B, gh*gw, C], without position embedding."""
        return self.patch_embed(x)

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embedding [1, prefix + gh*gw, C] for a (gh, gw) grid.

        Learned embeddings are resized bicubically (timm); fixed sin-cos ones are recomputed for the
        grid, which is what they would have been had the model been built for it.
        """
        grid = tuple(grid)
        if grid == self.grid_size:
            return self.pos_embed
        if self.config.pos_embed == "sincos":
            pe = get_2d_sincos_pos_embed(self.embed_dim, grid, cls_token=self.cls_token is not None)
            return torch.from_numpy(pe).to(self.pos_embed).unsqueeze(0)
        return resample_pos_embed(self.pos_embed, grid, self.grid_size, self.num_prefix_tokens)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> the blocks' input [B, prefix + gh*gw, C]: patch tokens + position, cls first."""
        grid = self.token_grid(x.shape[-2:])
        x = self.patchify_embed(x)  # [B, L, C]
        pos = self.pos_embed_for(grid)  # [1, prefix + L, C]
        x = x + pos[:, self.num_prefix_tokens :]
        if self.cls_token is not None:
            cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # [B, 1, C]
            x = torch.cat([cls, x], dim=1)
        return x

    def run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One block; recomputed in the backward pass when grad checkpointing is on and grads are needed."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer blocks on any token sequence [B, N, C] (checkpointed when enabled)."""
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> all tokens after the final norm [B, prefix + gh*gw, C]."""
        return self.norm(self.forward_blocks(self.embed(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] (H, W multiples of the patch size) -> feature map [B, C, H/16, W/16]."""
        grid = self.token_grid(x.shape[-2:])
        return self.tokens_to_map(self.forward_tokens(x)[:, self.num_prefix_tokens :], grid)

    def tokens_to_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens [B, gh*gw, C] in row-major order -> feature map [B, C, gh, gw]."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    # ---- inner blocks (timm's API) ----

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """The outputs of chosen blocks, as timm's `VisionTransformer.forward_intermediates`.

        x: [B, 3, H, W]. indices: an int n takes the last n blocks, a list takes those blocks (negative
        ones count from the end), None takes all. Each intermediate is a block's output without the
        prefix (cls) token, passed through the final norm if `norm`: [B, C, gh, gw] for "NCHW" (any
        grid, square or not), [B, gh*gw, C] for "NLC"; in block order. With `return_prefix_tokens` (and
        a cls token) each is a pair (intermediate, prefix tokens [B, prefix, C]). `stop_early` skips the
        blocks after the last one taken.

        Returns the intermediates (`intermediates_only`), else (final, intermediates) where final is the
        normed token sequence [B, prefix + gh*gw, C] of the last block run: `forward_tokens(x)` unless
        stop_early cut the loop short.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        grid = self.token_grid(x.shape[-2:])

        x = self.embed(x)  # [B, prefix + L, C]
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self.run_block(blk, x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]  # [B, prefix, C] each
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]  # [B, L, C] each
        if output_fmt == "NCHW":
            intermediates = [self.tokens_to_map(y, grid) for y in intermediates]  # [B, C, gh, gw] each
        if return_prefix_tokens and self.num_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False
    ) -> list[int]:
        """Drop the blocks after the last one `indices` takes (and the final norm if `prune_norm`), as timm.

        Returns the kept indices (absolute, as `forward_intermediates` takes them). The config follows
        (depth, final_norm), so a pruned model saves and reloads with save_pretrained / from_pretrained.
        timm's `prune_head` has no counterpart here: this backbone has no classifier.
        """
        from timm.models._features import feature_take_indices

        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        self.config = dataclasses.replace(self.config, depth=len(self.blocks))
        if prune_norm:
            self.norm = nn.Identity()
            self.config = dataclasses.replace(self.config, final_norm=False)
        return take_indices

    # ---- training helpers ----

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def hub_metadata(self) -> dict:
        """Extra config.json entries (see sapiens_lite.hub): input size and parameter count."""
        return {
            "input_size": list(self.config.img_size),
            "num_params": sum(p.numel() for p in self.parameters()),
        }


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_vit(arch: str = "vit_test", **overrides) -> VisionTransformer:
    """`build_vit("sapiens_1b", img_size=(1024, 768), cls_token=True)`; keywords are `ViTConfig` fields."""
    return VisionTransformer(ViTConfig(arch=arch, **overrides))


def sapiens_0_3b(**kw) -> VisionTransformer:
    return build_vit("sapiens_0.3b", **kw)


def sapiens_0_6b(**kw) -> VisionTransformer:
    return build_vit("sapiens_0.6b", **kw)


def sapiens_1b(**kw) -> VisionTransformer:
    return build_vit("sapiens_1b", **kw)


def sapiens_2b(**kw) -> VisionTransformer:
    return build_vit("sapiens_2b", **kw)
