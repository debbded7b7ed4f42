"""Position embeddings for a (gh, gw) patch grid.

Fixed 2D sin-cos embeddings follow facebookresearch/mae `util/pos_embed.py` and give the same numbers
for a square grid; here the grid may be non-square (Sapiens trains at 1024x768 -> 64x48 patches).
Resizing a (learned) embedding to another grid calls timm's `resample_abs_pos_embed`.

Layout of one D-dim vector, as in MAE: `[sin(w*f) | cos(w*f) | sin(h*f) | cos(h*f)]`, each part D/4
wide, frequencies f_i = 1 / 10000^(i / (D/4)). (MAE's code names the first half "h", but its meshgrid
puts the column index there; transformers' ViTMAE documents the same quirk. Pretrained MAE weights
depend on it, so we keep it.) Tokens are in row-major order: index = row * gw + col.
"""

from __future__ import annotations

import numpy as np
import torch


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: positions of any shape (M values) -> [M, embed_dim] as `[sin | cos]`."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even for a 1D sin-cos embedding, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # [D/2]
    pos = pos.reshape(-1)  # [M]
    out = np.einsum("m,d->md", pos, omega)  # [M, D/2] outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


def get_2d_sincos_pos_embed(embed_dim: int, grid: tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """Fixed 2D sin-cos embedding for a `grid = (gh, gw)` patch grid.

    Returns a float64 array [gh*gw, D], or [1 + gh*gw, D] with a zero row first for the cls token.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2D sin-cos embedding, got {embed_dim}")
    gh, gw = grid
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    # "xy" indexing: coords[0] holds the column (w) index, coords[1] the row (h) index, both [gh, gw]
    coords = np.stack(np.meshgrid(grid_w, grid_h), axis=0)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, coords[0])  # [gh*gw, D/2]
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, coords[1])  # [gh*gw, D/2]
    pos_embed = np.concatenate([emb_w, emb_h], axis=1)  # [gh*gw, D]
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def resample_pos_embed(
    pos: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Bicubic resize of `pos` [1, prefix + oh*ow, D] to [1, prefix + nh*nw, D]; prefix rows kept as they are.

    Interpolates in fp32 and returns the input dtype (timm `resample_abs_pos_embed`, antialiased).
    """
    from timm.layers import resample_abs_pos_embed

    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] != expected:
        raise ValueError(
            f"pos_embed of shape {tuple(pos.shape)} does not fit grid {tuple(old_grid)} with "
            f"{num_prefix_tokens} prefix tokens (expected [1, {expected}, D])"
        )
    if tuple(new_grid) == tuple(old_grid):
        return pos
    return resample_abs_pos_embed(
        pos, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=num_prefix_tokens
    )
