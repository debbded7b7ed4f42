"""2D sin-cos position embeddings (MAE layout, non-square grids) and resampling (timm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sapiens_lite.pos_embed import get_2d_sincos_pos_embed, resample_pos_embed


def transformers_mae_pos_embed(embed_dim: int, grid: tuple[int, int], cls_token: bool) -> np.ndarray:
    """transformers' ViTMAE embedding in the original MAE layout (it rotates its halves for MAE weights)."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    pe = build_2d_sinusoidal_position_embedding(
        grid[0], grid[1], embed_dim=embed_dim, cls_token=cls_token, dtype=torch.float64
    )
    half = embed_dim // 2
    return torch.cat([pe[:, half:], pe[:, :half]], dim=1).numpy()


@pytest.mark.parametrize("embed_dim,size,cls_token", [(64, 4, False), (1024, 14, True), (192, 16, False)])
def test_square_grid_equals_mae(embed_dim, size, cls_token):
    ours = get_2d_sincos_pos_embed(embed_dim, (size, size), cls_token=cls_token)
    ref = transformers_mae_pos_embed(embed_dim, (size, size), cls_token)
    assert ours.shape == ((1 if cls_token else 0) + size * size, embed_dim)
    # same formula in float64 (numpy and torch sin/cos may differ in the last bit), and bit-identical
    # once cast to the float32 the model holds
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ours.astype(np.float32), ref.astype(np.float32))


@pytest.mark.parametrize("grid", [(64, 48), (3, 5), (1, 7)])
def test_non_square_grid_layout(grid):
    d = 32
    gh, gw = grid
    pe = get_2d_sincos_pos_embed(d, grid)
    assert pe.shape == (gh * gw, d)
    freqs = 1.0 / 10000 ** (np.arange(d // 4) / (d // 4))
    for r, c in [(0, 0), (gh - 1, 0), (0, gw - 1), (gh // 2, gw // 3), (gh - 1, gw - 1)]:
        row = pe[r * gw + c]  # row-major token order
        expected = np.concatenate(
            [np.sin(c * freqs), np.cos(c * freqs), np.sin(r * freqs), np.cos(r * freqs)]
        )
        np.testing.assert_allclose(row, expected, atol=1e-12)
    np.testing.assert_allclose(pe, transformers_mae_pos_embed(d, grid, False), rtol=0, atol=1e-12)


def test_cls_row_is_zero_and_the_rest_unchanged():
    with_cls = get_2d_sincos_pos_embed(16, (3, 2), cls_token=True)
    assert with_cls.shape == (7, 16)
    assert np.all(with_cls[0] == 0)
    np.testing.assert_array_equal(with_cls[1:], get_2d_sincos_pos_embed(16, (3, 2)))


def test_embed_dim_must_be_a_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        get_2d_sincos_pos_embed(30, (2, 2))


@pytest.mark.parametrize("prefix", [0, 1])
def test_resample_wraps_timm_and_keeps_prefix(prefix):
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    pos = torch.randn(1, prefix + 4 * 3, 8)
    out = resample_pos_embed(pos, (6, 4), (4, 3), num_prefix_tokens=prefix)
    assert out.shape == (1, prefix + 24, 8)
    ref = resample_abs_pos_embed(
        pos, [6, 4], old_size=[4, 3], num_prefix_tokens=prefix, interpolation="bicubic"
    )
    torch.testing.assert_close(out, ref)
    if prefix:
        torch.testing.assert_close(out[:, 0], pos[:, 0])
    assert resample_pos_embed(pos, (4, 3), (4, 3), prefix) is pos


def test_resample_keeps_a_smooth_embedding_and_its_dtype():
    """Bicubic resampling of the sin-cos embedding of the coarse grid stays close to the fine one."""
    coarse = torch.from_numpy(get_2d_sincos_pos_embed(64, (16, 12))).float()[None]
    up = resample_pos_embed(coarse.to(torch.bfloat16), (32, 24), (16, 12))
    assert up.dtype == torch.bfloat16 and up.shape == (1, 32 * 24, 64)
    # resampling to the same grid and back is close to the identity on a smooth signal
    down = resample_pos_embed(resample_pos_embed(coarse, (32, 24), (16, 12)), (16, 12), (32, 24))
    assert (down - coarse).abs().mean() < 0.05


def test_resample_rejects_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match=r"does not fit grid \(4, 4\)"):
        resample_pos_embed(torch.zeros(1, 13, 8), (2, 2), (4, 4), num_prefix_tokens=0)
