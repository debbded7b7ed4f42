"""Masked autoencoder (He et al. 2022) on our ViT, for non-square images (Sapiens: 1024x768 -> 64x48 patches).

Reads top to bottom like facebookresearch/mae `models_mae.py`: patchify, unpatchify, random_masking,
forward_encoder, forward_decoder, forward_loss, a 4-line forward, then the size factories.

    model = mae_sapiens_0_3b_dec512d8b()                  # 1024x768, mask ratio 0.75
    loss, pred, mask = model(imgs)                          # imgs: [B, 3, 1024, 768]

The encoder is `sapiens_lite.models.vit.VisionTransformer` with a cls token and fixed 2D sin-cos
position embeddings; its state dict is the timm key layout under `encoder.`. The decoder keeps the
facebookresearch/mae names (`decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.{i}`,
`decoder_norm`, `decoder_pred`), so MAE checkpoints load after `sapiens_lite.convert` (or directly)
and the numbers match transformers' `ViTMAEForPreTraining` for the same weights and noise.

Every grid here is (gh, gw): nothing assumes H == W.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from sapiens_lite.errors import UserError
from sapiens_lite.models.vit import VisionTransformer, ViTConfig
from sapiens_lite.pos_embed import get_2d_sincos_pos_embed, resample_pos_embed


def _mae_encoder(arch: str = "vit_test", **kw) -> ViTConfig:
    """An MAE encoder config: cls token, fixed sin-cos position embedding, final norm."""
    return ViTConfig(arch=arch, cls_token=True, pos_embed="sincos", **kw)


@dataclass
class MAEConfig:
    encoder: ViTConfig = field(default_factory=_mae_encoder)
    """The backbone being pretrained; needs cls_token=True, pos_embed='sincos' and no patch padding."""
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    """Fraction of patches removed per image; the encoder sees only the rest (25% by default)."""
    norm_pix_loss: bool = True
    """Regress each patch normalised by its own mean/std (MAE's better-representation setting)."""

    def __post_init__(self):
        if not self.encoder.cls_token:
            raise ValueError("encoder.cls_token must be true for MAE (the decoder input starts with it)")
        if self.encoder.pos_embed != "sincos":
            raise ValueError(f"encoder.pos_embed must be 'sincos' for MAE, got {self.encoder.pos_embed!r}")
        if self.encoder.patch_padding != 0:
            raise ValueError("encoder.patch_padding must be 0 for MAE (patches are the regression targets)")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"decoder_dim {self.decoder_dim} is not a multiple of decoder_heads {self.decoder_heads}"
            )
        if self.decoder_dim % 4:
            raise ValueError(f"decoder_dim must be a multiple of 4 (2D sin-cos), got {self.decoder_dim}")


class MaskedAutoencoder(nn.Module):
    """MAE with a `VisionTransformer` encoder (`self.encoder`) and a light transformer decoder."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.config = cfg
        # --------------------------------------------------------------------------
        # encoder: our ViT, run on the visible patches only
        self.encoder = VisionTransformer(cfg.encoder)
        self.patch_size = self.encoder.patch_size
        self.grid_size = self.encoder.grid_size  # (gh, gw)
        embed_dim = self.encoder.embed_dim
        num_patches = self.grid_size[0] * self.grid_size[1]
        # --------------------------------------------------------------------------
        # decoder: all patches (visible ones re-embedded + one shared mask token per removed one)
        self.decoder_embed = nn.Linear(embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        # fixed sin-cos; a parameter (not a buffer) so that MAE checkpoints keep their key
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, 1 + num_patches, cfg.decoder_dim), requires_grad=False
        )
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            Block(
                cfg.decoder_dim,
                cfg.decoder_heads,
                mlp_ratio=cfg.decoder_mlp_ratio,
                qkv_bias=True,
                norm_layer=norm_layer,
            )
            for _ in range(cfg.decoder_depth)
        )
        for blk in self.decoder_blocks:
            blk.attn.fused_attn = True  # always F.scaled_dot_product_attention, as in the encoder
        self.decoder_norm = norm_layer(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, self.patch_size**2 * cfg.encoder.in_chans)
        self.grad_checkpointing = cfg.encoder.grad_checkpointing
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The encoder initialises itself; decoder: sin-cos positions, xavier Linear, N(0, 0.02) mask token."""
        pe = get_2d_sincos_pos_embed(self.config.decoder_dim, self.grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        trunc_normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_linear_and_norm)

    # ---- patches <-> images ----

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, 3, H, W) -> (B, L, p*p*3) with L = gh*gw in row-major order, pixels as (p, q, c)."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        assert h % p == 0 and w % p == 0, f"image {h}x{w} is not a multiple of the patch size {p}"
        gh, gw = h // p, w // p
        x = imgs.reshape(b, c, gh, p, gw, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(b, gh * gw, p * p * c)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, L, p*p*3) -> imgs (B, 3, gh*p, gw*p); `grid` = (gh, gw), default the model's."""
        p = self.patch_size
        gh, gw = grid or self.grid_size
        b, length, d = x.shape
        c = d // (p * p)
        assert length == gh * gw, f"{length} patches do not fill a {gh}x{gw} grid"
        x = x.reshape(b, gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(b, c, gh * p, gw * p)

    # ---- stages, in data-flow order ----

    def random_masking(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by sorting per-sample noise (the smallest noise values are kept).

        x: [B, L, D]; noise: [B, L] in [0, 1) (random if None; pass it to reproduce a mask).
        Returns the visible tokens [B, K, D] (K = int(L * (1 - mask_ratio))), the binary mask [B, L]
        and ids_restore [B, L], the permutation that puts shuffled tokens back in place.
        """
        b, length, d = x.shape
        len_keep = int(length * (1 - self.config.mask_ratio))
        if noise is None:
            noise = torch.rand(b, length, device=x.device)  # [B, L]

        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, L]
        ids_keep = ids_shuffle[:, :len_keep]  # [B, K]
        # expand (a view), not repeat: no [B, K, D] index tensor is materialised
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [B, K, D]

        # binary mask: 0 is keep, 1 is remove
        mask = torch.ones(b, length, device=x.device, dtype=x.dtype)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # unshuffle -> [B, L] in patch order
        return x_masked, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [B, 3, H, W] -> latent [B, 1 + K, C] (cls first), mask [B, L], ids_restore [B, L]."""
        enc = self.encoder
        grid = enc.token_grid(imgs.shape[-2:])
        pos = enc.pos_embed_for(grid)  # [1, 1 + L, C]
        x = enc.patchify_embed(imgs)  # [B, L, C]
        x = x + pos[:, 1:]  # positions are added before masking, so each kept token knows where it is

        x, mask, ids_restore = self.random_masking(x, noise)  # [B, K, C]

        cls = (enc.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # [B, 1, C]
        x = torch.cat([cls, x], dim=1)  # [B, 1 + K, C]
        x = enc.forward_blocks(x)
        x = enc.norm(x)
        return x, mask, ids_restore

    def forward_decoder(
        self, x: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """x: latent [B, 1 + K, C]; ids_restore: [B, L]; grid: (gh, gw) -> pred [B, L, p*p*3]."""
        x = self.decoder_embed(x)  # [B, 1 + K, Cd]
        b, length = ids_restore.shape
        d = x.shape[-1]

        # append one mask token per removed patch, then undo the shuffle
        mask_tokens = self.mask_token.expand(b, length + 1 - x.shape[1], -1)  # [B, L - K, Cd]
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, L, Cd], shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # [B, L, Cd], patch order
        x = torch.cat([x[:, :1], x_], dim=1)  # [B, 1 + L, Cd]

        x = x + self.decoder_pos_embed_for(grid)
        for blk in self.decoder_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # [B, 1 + L, p*p*3]
        return x[:, 1:]  # drop the cls token

    def decoder_pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1, 1 + gh*gw, Cd]: the stored table for the model's grid, else the sin-cos table of `grid`."""
        if tuple(grid) == tuple(self.grid_size):
            return self.decoder_pos_embed
        pe = get_2d_sincos_pos_embed(self.config.decoder_dim, tuple(grid), cls_token=True)
        return torch.from_numpy(pe).to(self.decoder_pos_embed).unsqueeze(0)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs: [B, 3, H, W]; pred: [B, L, p*p*3]; mask: [B, L], 0 is keep, 1 is remove.

        Mean squared error per patch, averaged over the removed patches only.
        """
        target = self.patchify(imgs)  # [B, L, p*p*3]
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # [B, L], mean loss per patch
        return (loss * mask).sum() / mask.sum()  # mean over removed patches

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore, self.encoder.token_grid(imgs.shape[-2:]))
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    # ---- training helpers ----

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder and decoder blocks in the backward pass (activation memory ~ one block)."""
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos_embed", "encoder.cls_token", "mask_token", "decoder_pos_embed"}

    def reconstruct(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For pictures: (masked input, reconstruction with the visible patches pasted back), both [B, 3, H, W].

        With norm_pix_loss the prediction is in per-patch normalised units; it is mapped back with the
        target patch's own mean/std, as in the MAE visualisation demo.
        """
        grid = self.encoder.token_grid(imgs.shape[-2:])
        target = self.patchify(imgs)  # [B, L, p*p*3]
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        m = mask.unsqueeze(-1).to(pred.dtype)  # [B, L, 1]
        masked = self.unpatchify(target * (1 - m), grid)
        recon = self.unpatchify(target * (1 - m) + pred * m, grid)
        return masked, recon


def load_pretrained(model: MaskedAutoencoder, checkpoint, *, source: str | None = None) -> dict:
    """Start `model` from any checkpoint `sapiens_lite.convert` reads (a path or a loaded dict).

    The backbone part fills the encoder (MAE, timm, transformers ViTMAE, Sapiens `_clean.pth` and
    pose `.pth` ...): its position grid is resampled to ours (e.g. 64x64 -> 64x48) and a checkpoint
    without cls token keeps our initial one. A decoder in the facebookresearch/mae layout (full MAE
    checkpoints, transformers ViTMAEForPreTraining) is loaded too. Returns {"source", "encoder":
    [keys loaded], "decoder": [...], "kept": [keys left at their initial value]}. A checkpoint of
    another width/depth/patch size raises UserError naming both values.
    """
    from sapiens_lite.convert import convert_state_dict, load_checkpoint_file

    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint_file(checkpoint)
    conv = convert_state_dict(checkpoint, source=source)
    hints, enc_cfg = conv.hints, model.encoder.config
    for name, ours, theirs in [
        ("embed_dim", enc_cfg.embed_dim, hints.embed_dim),
        ("depth", enc_cfg.depth, hints.depth),
        ("patch_size", enc_cfg.patch_size, hints.patch_size),
    ]:
        if ours != theirs:
            raise UserError(
                f"{conv.source} checkpoint has {name}={theirs}, the MAE encoder ({enc_cfg.arch}) has {name}={ours}"
            )

    backbone = dict(conv.backbone)
    pos = backbone["pos_embed"].float()  # [1, (1) + gh*gw, C] at the checkpoint's grid
    patch_pos = pos[:, 1:] if hints.cls_token else pos  # [1, gh*gw, C]
    patch_pos = resample_pos_embed(patch_pos, model.grid_size, hints.grid)  # [1, L, C]
    cls_pos = pos[:, :1] if hints.cls_token else model.encoder.pos_embed.data[:, :1].float()  # [1, 1, C]
    backbone["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)  # [1, 1 + L, C]
    missing, unexpected = model.encoder.load_state_dict(backbone, strict=False)
    assert not unexpected, unexpected  # the converter checked the key set against the same ViT

    decoder = dict(conv.decoder or {})
    if decoder:
        dec_cfg = (model.config.decoder_dim, model.config.decoder_depth)
        theirs = (
            decoder["decoder_embed.weight"].shape[0],
            len({k.split(".")[1] for k in decoder if k.startswith("decoder_blocks.")}),
        )
        if dec_cfg != theirs:
            raise UserError(
                f"{conv.source} checkpoint has a {theirs[0]}-wide, {theirs[1]}-block MAE decoder; "
                f"the model's is {dec_cfg[0]}-wide with {dec_cfg[1]} blocks (model.decoder_dim / decoder_depth)"
            )
        if decoder["decoder_pos_embed"].shape != model.decoder_pos_embed.shape:
            decoder.pop("decoder_pos_embed")  # fixed sin-cos of another grid: ours is the one for our grid
        model.load_state_dict(decoder, strict=False)
    own = model.state_dict()
    loaded = {f"encoder.{k}" for k in backbone} | set(decoder)
    return {
        "source": conv.source,
        "encoder": sorted(backbone),
        "decoder": sorted(decoder),
        "kept": sorted(k for k in own if k not in loaded),
    }


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)  # as in MAE (JAX ViT), not PyTorch's default
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---- FLOPs (for MFU) ----


def _block_flops(n: int, c: int, mlp_ratio: float) -> int:
    """Matmul FLOPs of one transformer block on n tokens of width c (as in sapiens_lite.flops)."""
    m = int(c * mlp_ratio)
    return 2 * n * c * 3 * c + 4 * n * n * c + 2 * n * c * c + 4 * n * c * m


def mae_forward_flops(cfg: MAEConfig, img_size: tuple[int, int] | None = None) -> float:
    """Forward FLOPs of one image: patch embedding of every patch, encoder blocks on 1 + K visible
    tokens (K = 25% of L by default), decoder embed / blocks / prediction on all 1 + L tokens.
    A training step is 3x this (backward = 2x forward); recomputation is not counted (model FLOPs)."""
    enc = cfg.encoder.resolved()
    h, w = img_size or enc.img_size
    k = enc.patch_size
    length = (h // k) * (w // k)
    keep = int(length * (1 - cfg.mask_ratio))
    c, cd = enc.embed_dim, cfg.decoder_dim
    patch = 2 * length * c * enc.in_chans * k * k
    encoder = enc.depth * _block_flops(1 + keep, c, enc.mlp_ratio)
    decoder = (
        2 * (1 + keep) * c * cd
        + cfg.decoder_depth * _block_flops(1 + length, cd, cfg.decoder_mlp_ratio)
        + 2 * (1 + length) * cd * k * k * enc.in_chans
    )
    return float(patch + encoder + decoder)


def mae_train_flops(cfg: MAEConfig, img_size: tuple[int, int] | None = None) -> float:
    """FLOPs of one training sample (forward + backward), the numerator of MFU."""
    return 3.0 * mae_forward_flops(cfg, img_size)


# ---- sizes: the name says encoder arch, decoder width (d) and depth (b blocks) ----


def mae_config(
    arch: str,
    img_size: tuple[int, int] = (1024, 768),
    decoder_dim: int = 512,
    decoder_depth: int = 8,
    decoder_heads: int = 16,
    **kw,
) -> MAEConfig:
    """MAEConfig for `arch`; keywords go to the MAEConfig if they are its fields, else to the encoder."""
    mae_fields = {f.name for f in dataclasses.fields(MAEConfig)}
    mae_kw = {k: v for k, v in kw.items() if k in mae_fields}
    enc_kw = {k: v for k, v in kw.items() if k not in mae_fields}
    return MAEConfig(
        encoder=_mae_encoder(arch, img_size=tuple(img_size), **enc_kw),
        decoder_dim=decoder_dim,
        decoder_depth=decoder_depth,
        decoder_heads=decoder_heads,
        **mae_kw,
    )


def mae_sapiens_0_3b_dec512d8b(**kw) -> MaskedAutoencoder:
    return MaskedAutoencoder(mae_config("sapiens_0.3b", **kw))


def mae_sapiens_0_6b_dec512d8b(**kw) -> MaskedAutoencoder:
    return MaskedAutoencoder(mae_config("sapiens_0.6b", **kw))


def mae_sapiens_1b_dec512d8b(**kw) -> MaskedAutoencoder:
    return MaskedAutoencoder(mae_config("sapiens_1b", **kw))


def mae_sapiens_2b_dec512d8b(**kw) -> MaskedAutoencoder:
    return MaskedAutoencoder(mae_config("sapiens_2b", **kw))


def mae_vit_base_patch16_dec512d8b(**kw) -> MaskedAutoencoder:
    """The facebookresearch/mae ViT-B/16 (224x224 by default)."""
    return MaskedAutoencoder(mae_config("vit_base", **{"img_size": (224, 224), **kw}))


def mae_vit_small_patch16_dec512d8b(**kw) -> MaskedAutoencoder:
    return MaskedAutoencoder(mae_config("vit_small", **{"img_size": (224, 224), **kw}))


def mae_vit_tiny_patch16_dec128d2b(**kw) -> MaskedAutoencoder:
    """A small one for CPU runs: ViT-Tiny encoder, 128-wide 2-block decoder."""
    return MaskedAutoencoder(
        mae_config(
            "vit_tiny",
            **{"img_size": (128, 96), "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4, **kw},
        )
    )


# recommended names (decoder 512 wide, 8 blocks, as in MAE and Sapiens)
mae_sapiens_0_3b = mae_sapiens_0_3b_dec512d8b
mae_sapiens_0_6b = mae_sapiens_0_6b_dec512d8b
mae_sapiens_1b = mae_sapiens_1b_dec512d8b
mae_sapiens_2b = mae_sapiens_2b_dec512d8b
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
