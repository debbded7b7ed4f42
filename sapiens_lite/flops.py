"""Parameter counts and forward FLOPs of the ViT backbones (for `sapiens info` and MFU).

Both are closed-form, so `sapiens info` needs neither timm nor a model. `count_params` equals the
parameter count of the built model (checked against a meta-device model in the tests):

    patch conv  C*c*k*k + C            cls token C (if any)      pos embed (prefix + gh*gw) * C
    per block   2 LayerNorms 4C, qkv 3C*C (+3C bias), proj C*C + C, fc1 C*M + M, fc2 M*C + C
    final norm  2C (if any)

Forward FLOPs are counted analytically as 2 x multiply-accumulates of the matrix products, for one
image of size (H, W), with N = prefix + gh*gw tokens, width C, MLP hidden size M = int(C * mlp_ratio),
patch size k and c input channels:

    patch conv          2 * gh*gw * C * (c*k*k)
    per block  qkv      2 * N * C * 3C
               q @ k^T  2 * N * N * C        (summed over heads: heads * head_dim = C)
               attn @ v 2 * N * N * C
               proj     2 * N * C * C
               mlp      2 * N * C * M * 2    (fc1 and fc2)

i.e. depth * (2*N*C*(4C + 2M) + 4*N^2*C) + the patch conv. LayerNorm, softmax, GELU, biases and
residual adds are left out (they are elementwise, a fraction of a percent, and not matmul work; the
same convention as `torch.utils.flop_counter` and the MFU literature). A training step costs about
3x the forward FLOPs (backward = 2x forward); the trainers apply that factor.
"""

from __future__ import annotations

from sapiens_lite.models.vit import ViTConfig


def _resolved(cfg: ViTConfig | str) -> ViTConfig:
    return (ViTConfig(arch=cfg) if isinstance(cfg, str) else cfg).resolved()


def count_params(cfg: ViTConfig | str) -> int:
    """Number of parameters (trainable or not, the fixed sin-cos pos embed included) of the backbone."""
    cfg = _resolved(cfg)
    c, m, k = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.patch_size
    gh, gw = cfg.grid_size
    prefix = 1 if cfg.cls_token else 0
    embed = (c * cfg.in_chans * k * k + c) + prefix * c + (prefix + gh * gw) * c
    qkv = 3 * c * c + (3 * c if cfg.qkv_bias else 0)
    block = 4 * c + qkv + (c * c + c) + (c * m + m) + (m * c + c)
    return embed + cfg.depth * block + (2 * c if cfg.final_norm else 0)


def forward_flops(cfg: ViTConfig | str, img_size: tuple[int, int] | None = None) -> float:
    """Forward FLOPs of one image of `img_size` (H, W) (default `cfg.img_size`) through the backbone."""
    cfg = _resolved(cfg)
    k = cfg.patch_size
    gh, gw = cfg.token_grid(img_size or cfg.img_size)
    n = gh * gw + (1 if cfg.cls_token else 0)
    c, m = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    patch = 2 * gh * gw * c * cfg.in_chans * k * k
    block = 2 * n * c * 3 * c + 2 * 2 * n * n * c + 2 * n * c * c + 2 * 2 * n * c * m
    return float(patch + cfg.depth * block)
