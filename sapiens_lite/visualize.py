"""Drawing: keypoint/skeleton overlays, contact sheets and image grids (numpy RGB uint8 in and out).

    overlay = draw_keypoints(image, keypoints, "coco17")          # keypoints [K, 3] or [N, K, 3] (x, y, score)
    overlay = draw_people(image, people, "coco17", kpt_thr=0.3)  # PoseEstimator's persons, with their boxes
    sheet = contact_sheet([overlay, ...], cols=4, tile_size=256)
    grid = image_grid([[original, masked, reconstruction], ...], labels=["image", "masked", "MAE"])

Colours come from the keypoint scheme (RGB). Sizes follow the person: radius and line width scale with
the extent of the person's drawn keypoints (and never exceed what the image size allows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from sapiens_lite.keypoints import KeypointScheme, get_scheme

_SHIFT = 4
_ONE = 1 << _SHIFT


def as_rgb_uint8(image) -> np.ndarray:
    """HxW / HxWx1 / HxWx3 / HxWx4, uint8 or float in [0, 1] (or a PIL image) -> contiguous HxWx3 uint8."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (
            np.clip(a.astype(np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            if a.dtype.kind == "f"
            else np.clip(a, 0, 255).astype(np.uint8)
        )
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def draw_keypoints(
    image,
    keypoints,
    scheme: str | KeypointScheme,
    *,
    kpt_thr: float = 0.3,
    radius: int | None = None,
    thickness: int | None = None,
) -> np.ndarray:
    """A copy of `image` with each person's skeleton links and keypoints drawn.

    keypoints: [K, 3] or [N, K, 3] (x, y, score-or-visibility); points with score < kpt_thr are not
    drawn, nor are links touching them. radius / thickness default to sizes scaled with the person.
    """
    if isinstance(scheme, str):
        scheme = get_scheme(scheme)
    img = as_rgb_uint8(image).copy()
    kps = np.asarray(keypoints, dtype=np.float32)
    if kps.ndim == 2:
        kps = kps[None]
    if kps.ndim != 3 or kps.shape[1:] != (scheme.num_keypoints, 3):
        raise ValueError(
            f"keypoints must be [K, 3] or [N, K, 3] with K={scheme.num_keypoints}, got {tuple(np.shape(keypoints))}"
        )
    h, w = img.shape[:2]
    dense = scheme.num_keypoints > 17  # many small face / hand points: smaller dots
    for person in kps:
        ok = (person[:, 2] >= kpt_thr) & np.isfinite(person[:, :2]).all(1)
        if not ok.any():
            continue
        pts = person[ok, :2]
        extent = float(max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1]), 1.0)) if len(pts) > 1 else 0.25 * min(h, w)
        extent = min(extent, float(max(h, w)))
        r = radius if radius is not None else max(1, int(round(extent * (0.008 if dense else 0.015))))
        t = thickness if thickness is not None else max(1, int(round(extent * (0.006 if dense else 0.01))))
        fixed = np.round(person[:, :2] * _ONE).astype(np.int64)
        for (a, b), color in zip(scheme.skeleton, scheme.skeleton_colors):
            if ok[a] and ok[b]:
                cv2.line(
                    img,
                    tuple(fixed[a].tolist()),
                    tuple(fixed[b].tolist()),
                    tuple(float(c) for c in color),
                    t,
                    cv2.LINE_AA,
                    _SHIFT,
                )
        for k in np.flatnonzero(ok):
            color = tuple(float(c) for c in scheme.keypoint_colors[k])
            cv2.circle(img, tuple(fixed[k].tolist()), r * _ONE, color, -1, cv2.LINE_AA, _SHIFT)
    return img


def draw_boxes(image, boxes, *, color=(0, 200, 255), thickness: int | None = None) -> np.ndarray:
    """A copy of `image` with boxes [N, 4+] (x, y, w, h, ...) in image pixels drawn as rectangles."""
    img = as_rgb_uint8(image).copy()
    t = thickness if thickness is not None else max(1, int(round(max(img.shape[:2]) / 400)))
    b = np.asarray(boxes, dtype=np.float64)
    b = b.reshape(-1, b.shape[-1]) if b.size else np.zeros((0, 4))
    for x, y, w, h in b[:, :4]:
        p0 = (int(round(x * _ONE)), int(round(y * _ONE)))
        p1 = (int(round((x + w - 1) * _ONE)), int(round((y + h - 1) * _ONE)))
        cv2.rectangle(img, p0, p1, tuple(float(c) for c in color), t, cv2.LINE_AA, _SHIFT)
    return img


def draw_people(image, people, scheme: str | KeypointScheme, *, kpt_thr: float = 0.3, boxes: bool = True):
    """A copy of `image` with each `sapiens_lite.estimator.Person`'s box (if `boxes`) and skeleton drawn."""
    img = as_rgb_uint8(image)
    if not people:
        return img.copy()
    if boxes:
        img = draw_boxes(img, np.stack([p.bbox for p in people]))
    return draw_keypoints(img, np.stack([p.keypoints for p in people]), scheme, kpt_thr=kpt_thr)


def _fit(image: np.ndarray, th: int, tw: int, fill: int) -> np.ndarray:
    """Resize keeping the aspect ratio and centre on a (th, tw) canvas."""
    h, w = image.shape[:2]
    s = min(th / h, tw / w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    small = cv2.resize(image, (nw, nh), interpolation=interp)
    canvas = np.full((th, tw, 3), fill, np.uint8)
    y, x = (th - nh) // 2, (tw - nw) // 2
    canvas[y : y + nh, x : x + nw] = small
    return canvas


def contact_sheet(
    images: Sequence, cols: int = 4, tile_size: int | tuple[int, int] = 256, *, gap: int = 2, fill: int = 32
) -> np.ndarray:
    """Tile images (each fitted into a tile, aspect kept) in rows of `cols`. tile_size: side or (h, w)."""
    if len(images) == 0:
        raise ValueError("contact_sheet needs at least one image")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else (int(tile_size[0]), int(tile_size[1]))
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    sheet = np.full((rows * th + (rows + 1) * gap, cols * tw + (cols + 1) * gap, 3), fill, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        y, x = gap + r * (th + gap), gap + c * (tw + gap)
        sheet[y : y + th, x : x + tw] = _fit(as_rgb_uint8(im), th, tw, fill)
    return sheet


def image_grid(
    rows: Sequence[Sequence],
    labels: Sequence[str] | None = None,
    *,
    height: int | None = None,
    gap: int = 2,
    fill: int = 255,
) -> np.ndarray:
    """Rows of images side by side, each scaled to a common `height` (default: the tallest image).

    labels: one title per column, written above the first row (e.g. "image", "masked", "reconstruction").
    """
    if len(rows) == 0 or any(len(r) == 0 for r in rows):
        raise ValueError("image_grid needs at least one non-empty row")
    rows = [[as_rgb_uint8(im) for im in r] for r in rows]
    th = height or max(im.shape[0] for r in rows for im in r)
    cols = max(len(r) for r in rows)
    # column widths: the widest scaled image in each column
    widths = [0] * cols
    for r in rows:
        for c, im in enumerate(r):
            widths[c] = max(widths[c], int(round(im.shape[1] * th / im.shape[0])))
    header = 0
    if labels:
        if len(labels) > cols:
            raise ValueError(f"{len(labels)} labels for {cols} columns")
        scale = max(0.35, th / 400)
        header = int(30 * scale) + 2 * gap
    H = header + len(rows) * th + (len(rows) + 1) * gap
    W = sum(widths) + (cols + 1) * gap
    grid = np.full((H, W, 3), fill, np.uint8)
    xs = np.cumsum([gap] + [w + gap for w in widths])[:-1]
    for ri, r in enumerate(rows):
        y = header + gap + ri * (th + gap)
        for c, im in enumerate(r):
            grid[y : y + th, xs[c] : xs[c] + widths[c]] = _fit(im, th, widths[c], fill)
    if labels:
        ink = (0, 0, 0) if fill > 127 else (255, 255, 255)
        for c, text in enumerate(labels):
            cv2.putText(
                grid,
                str(text),
                (int(xs[c]) + 2, header - gap - 4),
                cv2.FONT_HERSHEY_SIMPLEX,
                scale,
                ink,
                1,
                cv2.LINE_AA,
            )
    return grid
