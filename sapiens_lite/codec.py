"""UDP heatmap codec: keypoints <-> Gaussian heatmaps, batched torch on any device.

Frames (see sapiens_lite/topdown.py): the *input frame* is the network's input crop (H, W); the
*heatmap frame* is its output (h, w), usually (H/4, W/4). Under UDP (Huang et al., CVPR 2020) the
two are related by the number of pixel *steps*, not pixels:

    x_heatmap = x_input * (w - 1) / (W - 1)        y_heatmap = y_input * (h - 1) / (H - 1)

so the first and last pixel centres of both frames coincide and a horizontal flip (x -> W - 1 - x)
is a flip of the heatmap array with no one-pixel shift (mmpose `flip_heatmaps(shift_heatmap=False)`).

    heatmaps, weights = encode_heatmaps(kpts_in, visible, input_size=(256, 192), heatmap_size=(64, 48), sigma=2)
    kpts_in, scores = decode_heatmaps(heatmaps, input_size=(256, 192))    # argmax + DARK-UDP
    kpts_img = keypoints_to_image(kpts_in, centers, scales, input_size=(256, 192))

Semantics follow mmpose's `UDPHeatmap` codec: unnormalised Gaussians (peak 1 at the exact sub-pixel
location, cut to a window of radius 3 sigma around the rounded location), and DARK-UDP decoding
(`refine_keypoints_dark_udp`: blur with an 11x11 Gaussian, log, one Newton step of a second-order
Taylor expansion around the integer argmax). Decoding here is vectorised over [B, K]: the blur is
evaluated only on the patch around each argmax, not on whole heatmaps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sapiens_lite import topdown

BLUR_KERNEL_SIZE = 11  # mmpose UDPHeatmap default


# ---- frames ----


def udp_factor(input_size: Sequence[int], heatmap_size: Sequence[int]) -> tuple[float, float]:
    """(fx, fy) with x_input = x_heatmap * fx; sizes are (H, W)."""
    (H, W), (h, w) = input_size, heatmap_size
    return (W - 1) / (w - 1), (H - 1) / (h - 1)


def input_to_heatmap(points: torch.Tensor, input_size, heatmap_size) -> torch.Tensor:
    """Points [..., 2] (x, y) in the input frame -> the heatmap frame."""
    fx, fy = udp_factor(input_size, heatmap_size)
    return points / points.new_tensor([fx, fy])


def heatmap_to_input(points: torch.Tensor, input_size, heatmap_size) -> torch.Tensor:
    """Points [..., 2] (x, y) in the heatmap frame -> the input frame."""
    fx, fy = udp_factor(input_size, heatmap_size)
    return points * points.new_tensor([fx, fy])


# ---- encode ----


def encode_heatmaps(
    keypoints: torch.Tensor,
    visible: torch.Tensor,
    input_size: Sequence[int],
    heatmap_size: Sequence[int],
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """UDP Gaussian targets.

    keypoints: [..., K, 2] (x, y) in the input frame; visible: [..., K] (COCO v: 0 unlabelled, >0 labelled).
    Returns heatmaps [..., K, h, w] (float32, peak 1 at the exact location) and target weights [..., K]:
    1 where v > 0 and the Gaussian's window (radius 3 sigma) reaches the heatmap, else 0 (mmpose
    `generate_udp_gaussian_heatmaps`; a keypoint just outside the crop still gets a partial target).
    """
    h, w = heatmap_size
    kpts = input_to_heatmap(keypoints.float(), input_size, heatmap_size)  # [..., K, 2]
    radius = 3.0 * sigma
    mu = torch.trunc(kpts + 0.5)  # mmpose's int(x + 0.5): the window centre
    in_range = (mu[..., 0] - radius < w) & (mu[..., 1] - radius < h)
    in_range &= (mu[..., 0] + radius + 1 >= 0) & (mu[..., 1] + radius + 1 >= 0)
    weights = ((visible > 0) & in_range).float()  # [..., K]

    xs = torch.arange(w, device=kpts.device, dtype=torch.float32)
    ys = torch.arange(h, device=kpts.device, dtype=torch.float32)
    # The 2D Gaussian and its square window are separable: outer product of two 1D profiles.
    gx = torch.exp(-((xs - kpts[..., 0:1]) ** 2) / (2 * sigma**2))  # [..., K, w]
    gx = gx * ((xs - mu[..., 0:1]).abs() <= radius)
    gy = torch.exp(-((ys - kpts[..., 1:2]) ** 2) / (2 * sigma**2))  # [..., K, h]
    gy = gy * ((ys - mu[..., 1:2]).abs() <= radius)
    heatmaps = gy.unsqueeze(-1) * gx.unsqueeze(-2)  # [..., K, h, w]
    return heatmaps * weights[..., None, None], weights


# ---- decode ----


def get_heatmap_maximum(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """heatmaps [..., h, w] -> integer argmax locations [..., 2] (x, y) as float, max values [...]."""
    # Two small reductions (row maxima, then the best row) instead of one argmax over h*w values:
    # same first-occurrence result, ~8x faster on CPU where a plain max is vectorised and argmax is not.
    row_max = heatmaps.amax(dim=-1)  # [..., h]
    vals, y = row_max.max(dim=-1)  # [...]
    row = heatmaps.gather(-2, y[..., None, None].expand(*y.shape, 1, heatmaps.shape[-1])).squeeze(-2)
    x = row.argmax(dim=-1)  # [...]
    locs = torch.stack([x, y], dim=-1).to(torch.float32)
    return locs, vals


def _gaussian_kernel1d(size: int, device) -> torch.Tensor:
    """cv2.getGaussianKernel(size, sigma=0): sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8 (2.0 for size 11)."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(device=device, dtype=torch.float32)


def _blur_matrix(kernel_size: int, device) -> torch.Tensor:
    """[4 + k, 5] banded matrix: a (4 + k)-long signal @ it = the k-tap Gaussian blur at its 5 central points."""
    g = _gaussian_kernel1d(kernel_size, device)
    m = torch.zeros(4 + kernel_size, 5, device=device)
    for o in range(5):
        m[o : o + kernel_size, o] = g
    return m


def refine_dark_udp(
    keypoints: torch.Tensor, heatmaps: torch.Tensor, blur_kernel_size: int = BLUR_KERNEL_SIZE
) -> torch.Tensor:
    """DARK-UDP sub-pixel refinement (mmpose `refine_keypoints_dark_udp`), vectorised.

    keypoints: [..., 2] integer argmax locations (x, y) in the heatmap frame; heatmaps: [..., h, w].
    Returns refined keypoints [..., 2] in the heatmap frame.

    mmpose blurs each whole heatmap (zero padding), rescales it so its maximum equals the raw
    maximum, clips to [1e-3, 50], takes the log, pads by edge replication and does one Newton step
    with central differences at the argmax. Here the blur is computed only on the 5x5 pixels around
    the argmax (from a zero-padded (4 + k)x(4 + k) patch, as two small matrix products), and the
    rescaling uses the largest blurred value among them. The derivatives of the log are unaffected by
    that rescaling (it adds a constant); it only moves the 1e-3 clip floor, and only when the blurred
    map's maximum lies more than 2 pixels from the raw argmax (several peaks).
    """
    assert blur_kernel_size % 2 == 1
    h, w = heatmaps.shape[-2:]
    lead = heatmaps.shape[:-2]
    hm = heatmaps.reshape(-1, h * w)  # [N, h*w], any float dtype: only the patches become float32
    n = hm.shape[0]
    device = hm.device
    kpts = keypoints.reshape(n, 2)
    x0, y0 = kpts[:, 0].long(), kpts[:, 1].long()

    size = 4 + blur_kernel_size  # patch giving blurred values on a 5x5 grid around the argmax
    offs = torch.arange(size, device=device) - (size // 2)
    rows, cols = y0[:, None] + offs, x0[:, None] + offs  # [N, P]
    row_ok = ((rows >= 0) & (rows < h)).float()
    col_ok = ((cols >= 0) & (cols < w)).float()
    idx = (rows.clamp(0, h - 1) * w)[:, :, None] + cols.clamp(0, w - 1)[:, None, :]  # [N, P, P]
    patch = hm.gather(1, idx.view(n, -1)).view(n, size, size).float()
    patch = patch * row_ok[:, :, None] * col_ok[:, None, :]  # zero padding outside the heatmap

    blur = _blur_matrix(blur_kernel_size, device)  # [P, 5]
    blurred = blur.T @ (patch @ blur)  # [N, 5(y), 5(x)]: along x, then along y

    grid = torch.arange(-2, 3, device=device)
    inside = ((y0[:, None] + grid >= 0) & (y0[:, None] + grid < h))[:, :, None]
    inside = inside & ((x0[:, None] + grid >= 0) & (x0[:, None] + grid < w))[:, None, :]
    raw_max = patch[:, size // 2, size // 2, None]  # [N, 1]: the heatmap value at the argmax
    blur_max = blurred.masked_fill(~inside, float("-inf")).flatten(1).amax(dim=1, keepdim=True)

    # Edge replication of the (blurred, log) map at the 3x3 neighbours: clamp to the heatmap, then
    # index the 5x5 grid (centre at 2, 2).
    step = torch.arange(-1, 2, device=device)
    xi = (x0[:, None] + step).clamp(0, w - 1) - x0[:, None] + 2  # [N, 3]
    yi = (y0[:, None] + step).clamp(0, h - 1) - y0[:, None] + 2
    near = blurred[torch.arange(n, device=device)[:, None, None], yi[:, :, None], xi[:, None, :]]  # [N, 3, 3]
    logmap = torch.log((near * (raw_max / blur_max)[:, :, None]).clamp(1e-3, 50.0))  # [N, 3(y), 3(x)]

    i_, ix1, ix1_, iy1, iy1_ = (
        logmap[:, 1, 1],
        logmap[:, 1, 2],
        logmap[:, 1, 0],
        logmap[:, 2, 1],
        logmap[:, 0, 1],
    )
    ix1y1, ix1_y1_ = logmap[:, 2, 2], logmap[:, 0, 0]
    dx = 0.5 * (ix1 - ix1_)
    dy = 0.5 * (iy1 - iy1_)
    dxx = ix1 - 2 * i_ + ix1_
    dyy = iy1 - 2 * i_ + iy1_
    dxy = 0.5 * (ix1y1 - ix1 - iy1 + i_ + i_ - ix1_ - iy1_ + ix1_y1_)
    eps = float(np.finfo(np.float32).eps)  # mmpose adds eps * I before inverting the Hessian
    a, d = dxx + eps, dyy + eps
    det = a * d - dxy * dxy
    # offset = -H^-1 @ grad, with the closed-form inverse of the 2x2 Hessian.
    offset = torch.stack([-(d * dx - dxy * dy) / det, -(-dxy * dx + a * dy) / det], dim=-1)
    offset = torch.where(torch.isfinite(offset), offset, torch.zeros_like(offset))
    out = kpts.float() + offset
    return out.reshape(*lead, 2)


def decode_heatmaps(
    heatmaps: torch.Tensor,
    input_size: Sequence[int] | None = None,
    blur_kernel_size: int = BLUR_KERNEL_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """heatmaps [..., K, h, w] -> keypoints [..., K, 2] (x, y) and scores [..., K] (the raw maxima).

    Keypoints are in the heatmap frame, or in the input frame when `input_size` (H, W) is given.
    A keypoint whose maximum is <= 0 is returned at (-1, -1) in the heatmap frame (mmpose).
    Half-precision heatmaps are read as they are (no float32 copy of the maps: the argmax pass is the
    cost, one read of every heatmap value); only the refinement patches are computed in float32.
    """
    heatmaps = heatmaps.detach()
    if not heatmaps.is_floating_point():
        heatmaps = heatmaps.float()
    locs, scores = get_heatmap_maximum(heatmaps)
    scores = scores.float()
    kpts = refine_dark_udp(locs, heatmaps, blur_kernel_size)
    kpts = torch.where((scores > 0)[..., None], kpts, torch.full_like(kpts, -1.0))
    if input_size is not None:
        kpts = heatmap_to_input(kpts, input_size, heatmaps.shape[-2:])
    return kpts, scores


# ---- flip test ----


def flip_heatmaps(heatmaps: torch.Tensor, flip_index: Sequence[int]) -> torch.Tensor:
    """Heatmaps of a horizontally flipped input [..., K, h, w] -> heatmaps in the unflipped frame.

    Flips the width axis and swaps left/right channels (channel i takes channel flip_index[i]).
    No one-pixel shift: under UDP the flip x -> W - 1 - x maps pixel centres onto pixel centres.
    """
    index = torch.as_tensor(list(flip_index), device=heatmaps.device, dtype=torch.long)
    return heatmaps.flip(-1).index_select(-3, index)


# ---- back to the image ----


def keypoints_to_image(keypoints, centers, scales, input_size: Sequence[int], rotations=None):
    """Keypoints [B, K, 2+] in the input frame -> the image frame of each crop (numpy or torch in, same out).

    centers, scales: [B, 2] (x, y) / (w, h) of each crop's box in image pixels (see topdown.py);
    rotations: [B] degrees or None. Extra columns (scores) pass through.
    """
    H, W = input_size
    centers = np.asarray(_to_numpy(centers), dtype=np.float64).reshape(-1, 2)
    scales = np.asarray(_to_numpy(scales), dtype=np.float64).reshape(-1, 2)
    rots = np.zeros(len(centers)) if rotations is None else np.asarray(_to_numpy(rotations)).reshape(-1)
    inv = np.stack(
        [
            topdown.invert_affine(topdown.get_udp_warp_matrix(c, s, float(r), output_size=(W, H)))
            for c, s, r in zip(centers, scales, rots)
        ]
    )  # [B, 2, 3]: input frame -> image frame
    if isinstance(keypoints, torch.Tensor):
        m = torch.as_tensor(inv, dtype=torch.float32, device=keypoints.device)
        xy = keypoints[..., :2].float()
        out = torch.einsum("bij,bkj->bki", m[:, :, :2], xy) + m[:, None, :, 2]
        return torch.cat([out, keypoints[..., 2:].float()], dim=-1)
    return topdown.transform_points(np.asarray(keypoints), inv)


def _to_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
