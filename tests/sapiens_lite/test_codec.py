"""UDP codec: encode/decode round trip, parity with mmpose's DARK-UDP decoding, flip, frames."""

import cv2
import numpy as np
import pytest
import torch

from sapiens_lite import codec, topdown
from sapiens_lite.keypoints import get_scheme


def mmpose_udp_decode(heatmaps: np.ndarray, blur_kernel_size: int = 11) -> np.ndarray:
    """A loop-by-keypoint restatement of mmpose get_heatmap_maximum + refine_keypoints_dark_udp (heatmap frame)."""
    hm = heatmaps.astype(np.float32).copy()
    k, h, w = hm.shape
    flat = hm.reshape(k, -1)
    idx = flat.argmax(1)
    locs = np.stack([idx % w, idx // w], -1).astype(np.float64)
    border = (blur_kernel_size - 1) // 2
    for i in range(k):
        peak = hm[i].max()
        padded = np.zeros((h + 2 * border, w + 2 * border), np.float32)
        padded[border:-border, border:-border] = hm[i]
        blurred = cv2.GaussianBlur(padded, (blur_kernel_size, blur_kernel_size), 0)[
            border:-border, border:-border
        ]
        hm[i] = blurred * (peak / blurred.max())
    logm = np.log(np.clip(hm, 1e-3, 50.0))
    out = locs.copy()
    for i in range(k):
        p = np.pad(logm[i], 1, mode="edge")
        x, y = int(locs[i, 0]) + 1, int(locs[i, 1]) + 1
        dx = 0.5 * (p[y, x + 1] - p[y, x - 1])
        dy = 0.5 * (p[y + 1, x] - p[y - 1, x])
        dxx = p[y, x + 1] - 2 * p[y, x] + p[y, x - 1]
        dyy = p[y + 1, x] - 2 * p[y, x] + p[y - 1, x]
        dxy = 0.5 * (
            p[y + 1, x + 1]
            - p[y, x + 1]
            - p[y + 1, x]
            + 2 * p[y, x]
            - p[y, x - 1]
            - p[y - 1, x]
            + p[y - 1, x - 1]
        )
        hess = np.array([[dxx, dxy], [dxy, dyy]]) + np.finfo(np.float32).eps * np.eye(2)
        out[i] -= np.linalg.inv(hess) @ np.array([dx, dy])
    return out


@pytest.mark.parametrize(
    "input_size,sigma",
    [
        ((256, 192), 2.0),
        ((1024, 768), 6.0),
        ((128, 96), 2.0),
        ((128, 96), 6.0),
        ((512, 384), 6.0),
        ((384, 288), 3.0),
    ],
)
def test_encode_decode_round_trip(input_size, sigma):
    """Sub-pixel keypoints come back within 0.05 input pixels (away from the border, see refine_dark_udp)."""
    H, W = input_size
    hm_size = (H // 4, W // 4)
    g = torch.Generator().manual_seed(0)
    # Keep the peak >= blur radius + 2 heatmap pixels from the border, where zero padding bends the blur.
    margin = 8
    fx, fy = codec.udp_factor(input_size, hm_size)
    lo = torch.tensor([margin * fx, margin * fy])
    hi = torch.tensor([(hm_size[1] - 1 - margin) * fx, (hm_size[0] - 1 - margin) * fy])
    kpts = lo + torch.rand(3, 40, 2, generator=g) * (hi - lo)  # [B, K, 2] input frame
    heatmaps, weights = codec.encode_heatmaps(kpts, torch.ones(3, 40), input_size, hm_size, sigma)
    assert heatmaps.shape == (3, 40, *hm_size) and weights.eq(1).all()
    decoded, scores = codec.decode_heatmaps(heatmaps, input_size=input_size)
    err = (decoded - kpts).norm(dim=-1)
    assert err.max() < 0.05, err.max()
    assert scores.gt(0.6).all() and scores.le(1).all()


def test_decode_matches_mmpose_dark_udp_also_near_borders():
    g = torch.Generator().manual_seed(1)
    hm_size = (64, 48)
    kpts = torch.rand(60, 2, generator=g) * torch.tensor(
        [191.0, 255.0]
    )  # anywhere in the crop, borders included
    heatmaps, _ = codec.encode_heatmaps(kpts, torch.ones(60), (256, 192), hm_size, 2.0)
    heatmaps = heatmaps + 0.05 * torch.rand(heatmaps.shape, generator=g)  # noisy, like a prediction
    ours, _ = codec.decode_heatmaps(heatmaps)
    ref = mmpose_udp_decode(heatmaps.numpy())
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-3)


def test_encode_follows_mmpose_udp_gaussian():
    """Peak 1 at the exact location, window of radius 3 sigma around int(x + 0.5), weights from v and range."""
    sigma = 2.0
    # input frame; heatmap x = x_in * 47 / 191, y = y_in * 63 / 255
    kpts = torch.tensor([[[10.3 * 191 / 47, 20.6 * 255 / 63], [-60.0, 5.0], [40.0, 40.0], [-30.0, 5.0]]])
    vis = torch.tensor([[2.0, 2.0, 0.0, 1.0]])
    hm, w = codec.encode_heatmaps(kpts, vis, (256, 192), (64, 48), sigma)
    # -60 -> x_hm -14.8: the window [-20, -8] misses the map (weight 0); -30 -> -7.4: the window reaches x = 0.
    assert w.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert hm[0, 1:3].abs().max() == 0 and hm[0, 3].max() > 0
    x, y = 10.3, 20.6
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(48.0), indexing="ij")
    expected = torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    window = ((xs - 10).abs() <= 6) & ((ys - 21).abs() <= 6)  # int(10.3 + 0.5), int(20.6 + 0.5)
    torch.testing.assert_close(hm[0, 0], expected * window, atol=1e-5, rtol=1e-4)


def test_flip_heatmaps_equals_encoding_the_mirrored_keypoints():
    """UDP: mirroring the input (x -> W-1-x) and swapping channels is a plain flip of the heatmaps, no shift."""
    scheme = get_scheme("coco17")
    input_size, hm_size = (256, 192), (64, 48)
    g = torch.Generator().manual_seed(2)
    kpts = torch.rand(17, 2, generator=g) * torch.tensor([191.0, 255.0])
    hm, _ = codec.encode_heatmaps(kpts, torch.ones(17), input_size, hm_size, 2.0)
    mirrored = kpts[list(scheme.flip_index)].clone()
    mirrored[:, 0] = 191 - mirrored[:, 0]
    hm_mirror, _ = codec.encode_heatmaps(mirrored, torch.ones(17), input_size, hm_size, 2.0)
    torch.testing.assert_close(codec.flip_heatmaps(hm_mirror, scheme.flip_index), hm, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        codec.flip_heatmaps(hm[None], scheme.flip_index)[0], hm_mirror, atol=1e-5, rtol=0
    )


def test_argmax_ties_and_empty_maps():
    hm = torch.zeros(2, 5, 4)
    hm[0, 1, 2] = hm[0, 3, 0] = 1.0  # tie: first in row-major order wins (as np.argmax)
    locs, vals = codec.get_heatmap_maximum(hm)
    assert locs[0].tolist() == [2.0, 1.0] and vals.tolist() == [1.0, 0.0]
    kpts, scores = codec.decode_heatmaps(hm)
    assert kpts[1].tolist() == [-1.0, -1.0] and scores[1] == 0


def test_keypoints_to_image_inverts_the_crop_numpy_and_torch():
    rng = np.random.default_rng(3)
    centers = rng.uniform(100, 300, (4, 2))
    scales = rng.uniform(50, 200, (4, 2))
    rots = rng.uniform(-60, 60, 4)
    img_pts = rng.uniform(0, 400, (4, 10, 2))
    input_size = (256, 192)
    inp = np.stack(
        [
            topdown.transform_points(p, topdown.get_udp_warp_matrix(c, s, r, (192, 256)))
            for p, c, s, r in zip(img_pts, centers, scales, rots)
        ]
    )
    back = codec.keypoints_to_image(inp, centers, scales, input_size, rotations=rots)
    np.testing.assert_allclose(back, img_pts, atol=1e-8)
    with_scores = torch.cat([torch.from_numpy(inp).float(), torch.ones(4, 10, 1)], dim=-1)
    back_t = codec.keypoints_to_image(
        with_scores, torch.from_numpy(centers), torch.from_numpy(scales), input_size, rots
    )
    assert isinstance(back_t, torch.Tensor) and back_t.shape == (4, 10, 3)
    np.testing.assert_allclose(back_t[..., :2].numpy(), img_pts, atol=1e-3)
    assert back_t[..., 2].eq(1).all()


def test_half_precision_heatmaps_decode_as_their_float32_copy():
    """bf16 / fp16 heatmaps (a model run in half precision) are read in place, with the same result."""
    g = torch.Generator().manual_seed(3)
    kpts = torch.rand(2, 30, 2, generator=g) * torch.tensor([191.0, 255.0])
    heatmaps, _ = codec.encode_heatmaps(kpts, torch.ones(2, 30), (256, 192), (64, 48), 2.0)
    heatmaps = heatmaps + 0.05 * torch.rand(heatmaps.shape, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        half = heatmaps.to(dtype)
        ours, scores = codec.decode_heatmaps(half, input_size=(256, 192))
        ref, ref_scores = codec.decode_heatmaps(half.float(), input_size=(256, 192))
        assert scores.dtype == torch.float32
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(scores, ref_scores, atol=0, rtol=0)
