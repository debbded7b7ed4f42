"""Top-down geometry: person box -> crop, keypoints into the crop, predictions back to the image.

Pure numpy/cv2 functions used by training (finetune/data.py) and inference alike, so both see the
same crop. Three coordinate frames appear, always named in the docstrings:

- image frame: pixel (x, y) of the original image; pixel centres sit on integers (UDP convention,
  so a horizontal flip is x -> width - 1 - x).
- input frame: pixel (x, y) of the crop fed to the network, size (H, W) = `input_size`.
- heatmap frame: pixel (x, y) of the network output, size (h, w) = input / 4 (see sapiens_lite/codec.py).

The crop follows UDP (Huang et al., CVPR 2020, "The Devil is in the Details"): the box centre maps to
the input centre ((W - 1) / 2, (H - 1) / 2) and the box width `scale[0]` spans W - 1 pixel steps,
which makes the flip and the heatmap scaling exact (mmpose `get_udp_warp_matrix` semantics).

    center, scale = bbox_xywh_to_center_scale(box, aspect_ratio=768 / 1024)   # padding 1.25
    M = get_udp_warp_matrix(center, scale, rot=0.0, output_size=(768, 1024))  # image -> input, [2, 3]
    crop = warp_image(img, M, (1024, 768))
    kpts_in = transform_points(kpts_img, M)
    kpts_img = transform_points(kpts_in, invert_affine(M))
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from sapiens_lite.errors import UserError

DEFAULT_INPUT_SIZE = (1024, 768)  # (H, W) of the Sapiens models; 256x192 for small ViTPose models
BBOX_PADDING = 1.25  # the box is enlarged by this factor before cropping (mmpose GetBBoxCenterScale)


def check_bbox_xywh(bbox, where: str = "bbox") -> np.ndarray:
    """Validate a box (x, y, w, h) in the image frame; raise UserError naming `where` if degenerate."""
    b = np.asarray(bbox, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)) or b[2] <= 0 or b[3] <= 0:
        raise UserError(
            f"{where}: degenerate box {np.asarray(bbox).tolist()} (need finite x, y, w > 0, h > 0)"
        )
    return b


def fix_aspect_ratio(scale: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Grow the shorter side of `scale` [..., 2] (w, h) so that w / h == aspect_ratio (never shrink)."""
    scale = np.asarray(scale, dtype=np.float64)
    w, h = scale[..., 0], scale[..., 1]
    wider = w > h * aspect_ratio
    return np.stack([np.where(wider, w, h * aspect_ratio), np.where(wider, w / aspect_ratio, h)], axis=-1)


def bbox_xywh_to_center_scale(
    bbox, aspect_ratio: float | None = None, padding: float = BBOX_PADDING
) -> tuple[np.ndarray, np.ndarray]:
    """Box (x, y, w, h) in the image frame -> (center (x, y), scale (w, h)), both [2] float64.

    The scale is the box size times `padding`; with `aspect_ratio` (input W / H) the shorter side is
    then grown so the crop has the network's aspect ratio (mmpose fixes it in TopdownAffine, after
    the random scale/shift, which is equivalent because those scale both sides alike).
    """
    b = check_bbox_xywh(bbox)
    center = np.array([b[0] + 0.5 * b[2], b[1] + 0.5 * b[3]])
    scale = np.array([b[2], b[3]]) * padding
    if aspect_ratio is not None:
        scale = fix_aspect_ratio(scale, aspect_ratio)
    return center, scale


def center_scale_to_bbox_xywh(center, scale, padding: float = BBOX_PADDING) -> np.ndarray:
    """Inverse of `bbox_xywh_to_center_scale` without the aspect fix: (x, y, w, h) in the image frame."""
    wh = np.asarray(scale, dtype=np.float64) / padding
    xy = np.asarray(center, dtype=np.float64) - 0.5 * wh
    return np.concatenate([xy, wh], axis=-1)


def get_udp_warp_matrix(center, scale, rot: float, output_size: tuple[int, int]) -> np.ndarray:
    """Affine matrix [2, 3] (float64) mapping the image frame to the input frame (UDP).

    center: box centre (x, y) in the image frame; scale: box (w, h) in image pixels; rot: degrees
    (positive turns the person counter-clockwise in the crop, as in mmpose); output_size: (W, H) of
    the input frame (note: cv2 order, width first). The centre goes to ((W-1)/2, (H-1)/2) and one
    image pixel becomes (W - 1) / scale_w input pixels.
    """
    cx, cy = float(center[0]), float(center[1])
    sx = (output_size[0] - 1) / float(scale[0])
    sy = (output_size[1] - 1) / float(scale[1])
    a = math.radians(rot)
    cos, sin = math.cos(a), math.sin(a)
    # x_in = sx * ( cos * (x - cx) - sin * (y - cy)) + (W - 1) / 2
    # y_in = sy * ( sin * (x - cx) + cos * (y - cy)) + (H - 1) / 2
    return np.array(
        [
            [sx * cos, -sx * sin, sx * (-cos * cx + sin * cy) + 0.5 * (output_size[0] - 1)],
            [sy * sin, sy * cos, sy * (-sin * cx - cos * cy) + 0.5 * (output_size[1] - 1)],
        ]
    )


def hflip_matrix(image_width: int) -> np.ndarray:
    """Affine [2, 3] of a horizontal flip of an image `image_width` wide: x -> width - 1 - x."""
    return np.array([[-1.0, 0.0, image_width - 1.0], [0.0, 1.0, 0.0]])


def compose_affine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The affine [2, 3] that applies `b` first, then `a`."""
    a3 = np.vstack([a, [0.0, 0.0, 1.0]])
    b3 = np.vstack([b, [0.0, 0.0, 1.0]])
    return (a3 @ b3)[:2]


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of an affine [2, 3] (e.g. input frame -> image frame for predictions)."""
    m3 = np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(m3)[:2]


def transform_points(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply the affine `m` [2, 3] (or a batch [N, 2, 3] against points [N, ..., 2]) to points [..., 2].

    Extra trailing columns (e.g. visibility in [..., 3]) are kept unchanged.
    """
    points = np.asarray(points)
    m = np.asarray(m, dtype=np.float64)
    xy = points[..., :2].astype(np.float64)
    if m.ndim == 2:
        out = xy @ m[:, :2].T + m[:, 2]
    else:  # one matrix per leading index
        n = m.shape[0]
        flat = xy.reshape(n, -1, 2)
        out = (np.einsum("nij,npj->npi", m[:, :, :2], flat) + m[:, None, :, 2]).reshape(xy.shape)
    if points.shape[-1] > 2:
        out = np.concatenate([out, points[..., 2:].astype(np.float64)], axis=-1)
    return out


def warp_image(img: np.ndarray, m: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """Crop `img` [H0, W0, C] (uint8 or float) with the image->input affine `m` to `input_size` (H, W).

    Bilinear (cv2.INTER_LINEAR) sampling, zeros outside the image, like mmpose TopdownAffine.
    """
    h, w = input_size
    return cv2.warpAffine(img, np.asarray(m, dtype=np.float64), (int(w), int(h)), flags=cv2.INTER_LINEAR)


def crop_person(
    img: np.ndarray,
    bbox_xywh,
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
    padding: float = BBOX_PADDING,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inference crop of one person: returns (crop [H, W, C], M image->input [2, 3], center, scale)."""
    h, w = input_size
    center, scale = bbox_xywh_to_center_scale(bbox_xywh, aspect_ratio=w / h, padding=padding)
    m = get_udp_warp_matrix(center, scale, 0.0, output_size=(w, h))
    return warp_image(img, m, input_size), m, center, scale


def input_to_image(
    points: np.ndarray, center, scale, input_size: tuple[int, int], rot: float = 0.0
) -> np.ndarray:
    """Points [..., 2+] in the input frame -> the image frame, for a crop made from (center, scale, rot).

    Exact inverse of `get_udp_warp_matrix`. For rot = 0 this is the same as mmpose's
    `kpts / input_size * scale + center - scale / 2` applied after its UDP decoder's
    `kpts_hm / (heatmap_size - 1) * input_size`: the two (size - 1) conventions cancel.
    """
    h, w = input_size
    m = get_udp_warp_matrix(center, scale, rot, output_size=(w, h))
    return transform_points(points, invert_affine(m))
