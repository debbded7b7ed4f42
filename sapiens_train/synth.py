"""Procedural people with exact keypoints: images + COCO-format JSON for the 308 / 133 / 17 schemes.

    path = synthesize("data/synth", 1000, seed=0, size=(256, 192), scheme="goliath308", workers=2)
    image, people = render_sample(seed=0, index=5)          # in memory, people[i]["keypoints"]: [308, 3]

Each image holds 1-4 articulated figures (`_body.py`: a 3D skeleton with joint-angle limits, five-finger
hands, feet, a face model with brows, lids, iris, pupil, nose, lips and ears that turns with the head),
drawn with OpenCV (anti-aliased) over a gradient / noise / photo-crop background, in depth order.
Keypoints are exact for the drawn figure. Visibility follows COCO: 2 = visible, 1 = inside the image
but hidden (behind another part, another person, an occluder, the back of the head, closed lids),
0 = outside the image (then x = y = 0). A part id map drawn alongside the image decides occlusion.

The 133 (COCO-WholeBody) and 17 (COCO) points come from the same figure by NAME: body, feet and hand
points are the Goliath points of the same name (`hand_root` = wrist, finger `1` = Goliath
`third_joint`), and the 68 iBUG face points are computed from the same face model (the ones with a
Goliath twin, e.g. face-8 = tip_of_chin, face-30 = tip_of_nose, coincide with it exactly).

Determinism: image `index` of seed `seed` depends only on (seed, index) (numpy SeedSequence), so any
subset can be regenerated or rendered in parallel; the same seed gives byte-identical JPEGs and JSON
on one installation (the photo backgrounds come from scikit-image / matplotlib sample files when
those are installed).

Left and right can be told apart from the pixels: the figure's LEFT upper arm and LEFT thigh always
carry a band in an accent colour, and the face shows when the figure faces the camera.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from functools import cache, lru_cache
from pathlib import Path

import cv2
import numpy as np

from sapiens_lite.errors import UserError
from sapiens_lite.keypoints import canonical_name, get_scheme
from sapiens_train import _body

SHIFT = 4  # cv2 fixed-point bits: sub-pixel drawing, coordinates are multiplied by 16
_ONE = 1 << SHIFT
OCCLUDER_RANK = 65000  # part-map value of occluders: in front of everything

# ----------------------------------------------------------------------------------------------------
# scheme mapping (by name) from the Goliath 308 points (+ the 68 iBUG face points)


@cache
def scheme_sources(scheme: str) -> np.ndarray:
    """For each keypoint of `scheme`, its source: index into the 308 Goliath points, or 308 + k for the
    k-th iBUG face point (COCO-WholeBody `face-k`)."""
    name = canonical_name(scheme)
    goliath = get_scheme("goliath308")
    gidx = {n: i for i, n in enumerate(goliath.names)}
    out = []
    for n in get_scheme(name).names:
        if n.startswith("face-"):
            out.append(goliath.num_keypoints + int(n[5:]))
            continue
        g = n
        for side in ("left", "right"):
            if n == f"{side}_hand_root":
                g = f"{side}_wrist"
            elif n.startswith(f"{side}_") and n.endswith("1") and n[:-1].rsplit("_", 1)[-1] in _FINGER_WORDS:
                g = f"{n[:-1]}_third_joint"
        if g not in gidx:
            raise UserError(
                f"scheme {name}: keypoint {n!r} is not one the synthesizer draws (a Goliath-308 or "
                "COCO-WholeBody face name); name the scheme's points after those to synthesize it"
            )
        out.append(gidx[g])
    return np.array(out)


_FINGER_WORDS = ("thumb", "forefinger", "finger")


def to_scheme(kp308: np.ndarray, ibug: np.ndarray, scheme: str) -> np.ndarray:
    """[308, 3] Goliath + [68, 3] iBUG keypoints -> [K, 3] in `scheme` order."""
    return np.concatenate([kp308, ibug])[scheme_sources(scheme)]


@lru_cache(maxsize=1)
def _keypoint_parts() -> np.ndarray:
    """Own parts of each of the 308 + 68 points ([376, 3] part ids, -1 padded): a point is visible when
    the pixel under it shows one of these parts (or a part drawn behind them)."""
    goliath = get_scheme("goliath308")
    P = _body.PART_ID
    table = []
    for n in goliath.names:
        side = "l" if n.startswith("left") else "r" if n.startswith("right") else None
        if side and any(w in n for w in ("thumb", "finger")):
            own = [f"{side}_hand"]
        elif side and n.endswith("wrist"):
            own = [f"{side}_forearm", f"{side}_hand"]
        elif side and any(w in n for w in ("elbow", "olecranon", "cubital")):
            own = [f"{side}_upperarm", f"{side}_forearm"]
        elif side and any(w in n for w in ("shoulder", "acromion")):
            own = ["torso", f"{side}_upperarm"]
        elif side and n.endswith("hip"):
            own = ["torso", f"{side}_thigh"]
        elif side and n.endswith("knee"):
            own = [f"{side}_thigh", f"{side}_shank"]
        elif side and n.endswith("ankle"):
            own = [f"{side}_shank", f"{side}_foot"]
        elif side and any(w in n for w in ("toe", "heel")):
            own = [f"{side}_foot"]
        elif n == "neck":
            own = ["neck", "torso", "head"]
        else:
            own = ["head"]
        table.append([P[o] for o in own] + [-1] * (3 - len(own)))
    table += [[P["head"], -1, -1]] * 68  # the iBUG face points
    return np.array(table)


# ----------------------------------------------------------------------------------------------------
# appearance


def _color(rng, lo=20, hi=235) -> np.ndarray:
    return rng.integers(lo, hi, 3).astype(np.float64)


_SKIN = np.array(
    [[255, 224, 196], [241, 194, 157], [224, 172, 125], [198, 134, 86], [141, 85, 54], [96, 60, 40]], float
)
_HAIR = np.array(
    [[20, 15, 10], [60, 40, 25], [110, 75, 40], [190, 150, 90], [150, 150, 150], [120, 40, 20]], float
)


def sample_palette(rng: np.random.Generator) -> dict[str, tuple]:
    """RGB colour per drawing role for one person."""
    skin = _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.9, 1.08)
    shirt, pants, shoe, accent = _color(rng), _color(rng), _color(rng, 10, 120), _color(rng)
    # keep the accent band visible against the shirt and trousers
    while min(np.abs(accent - shirt).sum(), np.abs(accent - pants).sum()) < 150:
        accent = _color(rng)
    hair = _HAIR[rng.integers(len(_HAIR))]
    long_sleeves, long_pants = rng.random() < 0.5, rng.random() < 0.75
    roles = {
        "skin": skin,
        "skin_dark": skin * 0.85,
        "shirt": shirt,
        "l_sleeve": shirt if long_sleeves else skin,
        "r_sleeve": shirt if long_sleeves else skin,
        "pants": pants,
        "l_leg": pants if long_pants else skin,
        "r_leg": pants if long_pants else skin,
        "shoe": shoe,
        "accent": accent,
        "hair": hair,
        "brow": hair * 0.7,
        "sclera": np.array([236.0, 234.0, 228.0]),
        "iris": _color(rng, 30, 140),
        "pupil": np.array([12.0, 10.0, 10.0]),
        "lip": skin * np.array([0.95, 0.6, 0.6]),
        "mouth": np.array([70.0, 20.0, 25.0]),
        "nose_line": skin * 0.7,
    }
    return {k: tuple(np.clip(v, 0, 255).tolist()) for k, v in roles.items()}


# ----------------------------------------------------------------------------------------------------
# backgrounds


@lru_cache(maxsize=1)
def _photo_pool() -> tuple[np.ndarray, ...]:
    """RGB photos shipped inside installed packages (optional; empty when none is importable)."""
    pool = []
    try:
        import skimage.data as sd

        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
            try:
                pool.append(np.ascontiguousarray(getattr(sd, name)()[..., :3]))
            except Exception:  # a sample that needs a download, or an old scikit-image
                continue
        for name in ("brick", "grass", "gravel"):
            try:
                pool.append(np.repeat(getattr(sd, name)()[..., None], 3, axis=2))
            except Exception:
                continue
    except ImportError:
        pass
    try:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            data = np.frombuffer(f.read(), np.uint8)
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if img is not None:
            pool.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    except Exception:  # matplotlib missing or built without sample data
        pass
    return tuple(pool)


def _smooth_noise(rng, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1], [h, w] float32."""
    small = rng.uniform(-1, 1, (max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w)))).astype(
        np.float32
    )
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def render_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + noise, or a crop of a sample photo, plus a few clutter shapes. [h, w, 3] uint8 RGB."""
    pool = _photo_pool()
    kind = rng.random()
    if pool and kind < 0.45:
        photo = pool[int(rng.integers(len(pool)))]
        ph, pw = photo.shape[:2]
        frac = rng.uniform(0.3, 1.0)
        ch = int(min(ph, pw * h / w) * frac)
        cw = max(2, int(ch * w / h))
        ch = max(2, ch)
        y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        img = cv2.resize(photo[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = img.astype(np.float32) * rng.uniform(0.6, 1.2, 3).astype(np.float32)
    else:
        c0, c1 = _color(rng, 0, 255), _color(rng, 0, 255)
        a = rng.uniform(0, 2 * math.pi)
        xx = np.arange(w, dtype=np.float32)[None, :] * (0.7 * math.cos(a) / w)
        yy = np.arange(h, dtype=np.float32)[:, None] * (0.7 * math.sin(a) / h)
        t = xx + yy + 0.5
        img = c0.astype(np.float32) + np.clip(t, 0, 1)[..., None] * (c1 - c0).astype(np.float32)
        octaves = 1 if kind < 0.75 else 3
        for o in range(octaves):
            img += _smooth_noise(rng, h, w, 4 << (2 * o))[..., None] * rng.uniform(10, 50)
    img = np.clip(img, 0, 255).astype(np.uint8)
    img = np.ascontiguousarray(img)
    for _ in range(int(rng.integers(0, 6))):
        _clutter(rng, img)
    return img


def _clutter(rng, img: np.ndarray, mask: np.ndarray | None = None, value: int = 0) -> None:
    """One random shape (rectangle, ellipse, polygon or thick line); also into `mask` when given."""
    h, w = img.shape[:2]
    color = tuple(float(c) for c in _color(rng, 0, 255))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    s = rng.uniform(0.05, 0.35) * min(h, w)
    kind = int(rng.integers(4))
    targets = [(img, color, cv2.LINE_AA)] + ([(mask, value, cv2.LINE_8)] if mask is not None else [])
    if kind == 0:
        pts = np.array([[cx - s, cy - s * rng.uniform(0.3, 1)], [cx + s, cy + s * rng.uniform(0.3, 1)]])
        for im, c, lt in targets:
            cv2.rectangle(im, _pt(pts[0]), _pt(pts[1]), c, -1, lt, SHIFT)
    elif kind == 1:
        axes = (int(s * _ONE), int(s * rng.uniform(0.3, 1) * _ONE))
        for im, c, lt in targets:
            cv2.ellipse(im, _pt((cx, cy)), axes, rng.uniform(0, 180), 0, 360, c, -1, lt, SHIFT)
    elif kind == 2:
        n = int(rng.integers(3, 7))
        ang = np.sort(rng.uniform(0, 2 * math.pi, n))
        pts = np.stack([cx + s * np.cos(ang), cy + s * np.sin(ang)], 1)
        for im, c, lt in targets:
            cv2.fillPoly(im, [_pts(pts)], c, lt, SHIFT)
    else:
        a = rng.uniform(0, math.pi)
        d = np.array([math.cos(a), math.sin(a)]) * s * 1.5
        th = max(1, int(s * rng.uniform(0.05, 0.3)))
        for im, c, lt in targets:
            cv2.line(im, _pt((cx - d[0], cy - d[1])), _pt((cx + d[0], cy + d[1])), c, th, lt, SHIFT)


def _pt(p) -> tuple[int, int]:
    return int(math.floor(float(p[0]) * _ONE + 0.5)), int(math.floor(float(p[1]) * _ONE + 0.5))


def _pts(p: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(p)[:, :2] * _ONE).astype(np.int32)


# ----------------------------------------------------------------------------------------------------
# drawing one figure


def _draw_commands(img, pmap, rank: int, cmds, proj, scale: float, palette) -> None:
    """Draw one part's commands into the image (anti-aliased) and its outline into the part map."""
    for cmd in cmds:
        kind = cmd[0]
        if kind == "capsule":
            _, p0, p1, r, role, label = cmd
            ax, ay, bx, by = proj(np.stack([p0, p1])).ravel().tolist()
            a, b = (int(ax * _ONE + 0.5), int(ay * _ONE + 0.5)), (int(bx * _ONE + 0.5), int(by * _ONE + 0.5))
            th = max(1, int(2 * r * scale + 0.5))
            col = palette[role]
            cv2.line(img, a, b, col, th, cv2.LINE_AA, SHIFT)
            if th >= 5:  # a lighter stripe on the lit side makes limbs look round
                dx, dy = bx - ax, by - ay
                norm = math.hypot(dx, dy) + 1e-6
                nx, ny = -dy / norm, dx / norm
                if nx + ny > 0:
                    nx, ny = -nx, -ny
                ox, oy = int(nx * th * 0.18 * _ONE), int(ny * th * 0.18 * _ONE)
                light = tuple(min(255.0, c * 1.18 + 12) for c in col)
                cv2.line(
                    img,
                    (a[0] + ox, a[1] + oy),
                    (b[0] + ox, b[1] + oy),
                    light,
                    max(1, th // 3),
                    cv2.LINE_AA,
                    SHIFT,
                )
            if label:
                cv2.line(pmap, a, b, rank, th, cv2.LINE_8, SHIFT)
        elif kind == "hull":
            _, pts, role, label = cmd
            hull = cv2.convexHull(_pts(proj(pts)))
            cv2.fillConvexPoly(img, hull, palette[role], cv2.LINE_AA, SHIFT)
            if role == "shirt" and len(hull) > 2:
                c = hull.reshape(-1, 2).mean(0)
                inner = (
                    (hull.reshape(-1, 2) - c) * 0.7
                    + c
                    - np.array([0.08, 0.06]) * np.ptp(hull.reshape(-1, 2), 0)
                )
                light = tuple(min(255.0, v * 1.1 + 8) for v in palette[role])
                cv2.fillConvexPoly(img, inner.astype(np.int32), light, cv2.LINE_AA, SHIFT)
            if label:
                cv2.fillConvexPoly(pmap, hull, rank, cv2.LINE_8, SHIFT)
        elif kind == "poly":
            _, pts, role = cmd
            cv2.fillPoly(img, [_pts(proj(pts))], palette[role], cv2.LINE_AA, SHIFT)
        elif kind == "polyline":
            _, pts, th_w, role = cmd
            th = max(1, int(round(th_w * scale)))
            cv2.polylines(img, [_pts(proj(pts))], False, palette[role], th, cv2.LINE_AA, SHIFT)
        elif kind == "disc":
            _, c, r, role = cmd
            rr = max(1, int(round(r * scale * _ONE)))
            cv2.circle(img, _pt(proj(c)), rr, palette[role], -1, cv2.LINE_AA, SHIFT)
        else:
            raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------------
# one image


def _place(rng, fig: _body.Figure, n_people: int, h: int, w: int) -> tuple[float, np.ndarray]:
    """Scale and offset that put the figure at a random size / position (mostly inside the image)."""
    xy = np.concatenate([fig.kp[:, :2], fig.ibug[:, :2]])
    lo, hi = xy.min(0), xy.max(0)
    ext = np.maximum(hi - lo, 1e-3) + 0.06  # margin for limb / head thickness
    frac = rng.uniform(0.55, 0.95) if n_people == 1 else rng.uniform(0.25, 0.75)
    scale = frac * h / max(ext[1], ext[0] * 0.75)
    scale = min(scale, 0.95 * w / ext[0], 0.95 * h / ext[1])
    size = ext * scale
    slack = 0.25 if rng.random() < 0.15 else 0.0  # sometimes cut off by the border
    x = rng.uniform(-slack * size[0], max(-slack * size[0], w - size[0] * (1 - slack)))
    y = rng.uniform(-slack * size[1], max(-slack * size[1], h - size[1] * (1 - slack)))
    offset = np.array([x, y]) - (lo - 0.03) * scale
    return scale, offset


def render_sample(
    seed: int,
    index: int,
    size: tuple[int, int] = (256, 192),
    *,
    scheme: str = "goliath308",
    people: tuple[int, int] = (1, 4),
    yaw_range: tuple[float, float] | None = None,
    occluders: bool = True,
) -> tuple[np.ndarray, list[dict]]:
    """Render image `index` of seed `seed`.

    Returns (image [H, W, 3] uint8 RGB, people), one dict per person with
      "keypoints": [K, 3] float32 (x, y, v) in `scheme` order (v: 2 visible, 1 hidden, 0 outside -> x=y=0),
      "bbox": [x, y, w, h] tight around the person's visible pixels and visible keypoints,
      "area": visible pixels, "parts": {"face"|"lefthand"|"righthand"|"foot": (box xywh, valid)}.
    `yaw_range` (degrees, 0 = facing the camera) pins the body yaw; `people` is (min, max) per image.
    """
    h, w = int(size[0]), int(size[1])
    scheme = canonical_name(scheme)
    rng = np.random.default_rng([int(seed), int(index)])
    img = render_background(rng, h, w)
    pmap = np.zeros((h, w), np.uint16)  # draw rank of the part shown at each pixel; 0 = background

    n = int(rng.integers(people[0], people[1] + 1))
    figures, rank = [], 0
    part_table = _keypoint_parts()
    for _ in range(n):
        fig = _body.build_figure(_body.sample_person(rng, yaw_range=yaw_range))
        palette = sample_palette(rng)
        scale, offset = _place(rng, fig, n, h, w)

        def proj(p, scale=scale, offset=offset):
            return np.asarray(p)[..., :2] * scale + offset

        part_rank = np.full(len(_body.PARTS), -1)
        for part_id, _, cmds in sorted(fig.parts, key=lambda t: t[1]):
            rank += 1
            part_rank[part_id] = rank
            _draw_commands(img, pmap, rank, cmds, proj, scale, palette)
        figures.append((fig, proj, part_rank, rank))

    if occluders:
        for _ in range(int(rng.binomial(n, 0.3))):
            _clutter(rng, img, pmap, OCCLUDER_RANK)

    if rng.random() < 0.5:  # fabric / lighting texture over everything
        tex = 1.0 + _smooth_noise(rng, h, w, int(rng.integers(8, 40))) * rng.uniform(0.03, 0.12)
        img = np.clip(img * tex[..., None], 0, 255).astype(np.uint8)
    if rng.random() < 0.2:
        img = cv2.GaussianBlur(img, (3, 3), 0)

    # person index of each rank, for the visible-pixel boxes
    owner = np.full(OCCLUDER_RANK + 1, -1, np.int16)
    lo_rank = 1
    for p, (_, _, _, hi_rank) in enumerate(figures):
        owner[lo_rank : hi_rank + 1] = p
        lo_rank = hi_rank + 1
    pixel_owner = owner[pmap]

    out = []
    for p, (fig, proj, part_rank, _) in enumerate(figures):
        xy = proj(np.concatenate([fig.kp, fig.ibug]))  # [376, 2]
        hidden = np.concatenate([fig.kp_hidden, fig.ibug_hidden])
        inside = (xy[:, 0] >= 0) & (xy[:, 0] <= w - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= h - 1)
        xi = np.clip(np.round(xy[:, 0]).astype(int), 0, w - 1)
        yi = np.clip(np.round(xy[:, 1]).astype(int), 0, h - 1)
        shown = pmap[yi, xi].astype(np.int64)  # [376]
        own = np.where(part_table >= 0, part_rank[np.maximum(part_table, 0)], -1)  # [376, 3]
        own_min = np.where(own > 0, own, 1 << 30).min(1)
        # covered = a part drawn after (in front of) the point's own parts shows at its pixel
        covered = (shown > 0) & ~(own == shown[:, None]).any(1) & (shown > own_min)
        v = np.where(~inside, 0, np.where(hidden | covered, 1, 2))
        kp = np.concatenate([xy, v[:, None]], 1).astype(np.float32)
        kp[v == 0, :2] = 0.0

        mask = (pixel_owner == p).astype(np.uint8)
        area = int(cv2.countNonZero(mask))
        x0, y0, bw, bh = cv2.boundingRect(mask)
        pts = xy[v == 2]
        if area and len(pts):
            x1, y1 = max(x0 + bw - 1.0, pts[:, 0].max()), max(y0 + bh - 1.0, pts[:, 1].max())
            x0, y0 = min(x0, pts[:, 0].min()), min(y0, pts[:, 1].min())
            bw, bh = x1 - x0 + 1, y1 - y0 + 1
        elif len(pts):
            x0, y0 = pts.min(0)
            bw, bh = pts.max(0) - pts.min(0) + 1
        out_kp = to_scheme(kp[:308], kp[308:], scheme)
        if (out_kp[:, 2] > 0).sum() == 0 or bw * bh < 4:
            continue  # nothing of this person is in the image
        out.append(
            {
                "keypoints": out_kp,
                "bbox": [float(x0), float(y0), float(bw), float(bh)],
                "area": float(area),
                "parts": _part_boxes(to_scheme(kp[:308], kp[308:], "coco_wholebody133")),
            }
        )
    return img, out


def _part_boxes(kp133: np.ndarray) -> dict[str, tuple[list[float], bool]]:
    """COCO-WholeBody part boxes around the labelled points of each part (x, y, w, h), and whether any."""
    parts = {"foot": (17, 23), "face": (23, 91), "lefthand": (91, 112), "righthand": (112, 133)}
    out = {}
    for name, (a, b) in parts.items():
        pts = kp133[a:b][kp133[a:b, 2] > 0, :2]
        if len(pts) == 0:
            out[name] = ([0.0, 0.0, 0.0, 0.0], False)
            continue
        lo, hi = pts.min(0), pts.max(0)
        pad = 0.1 * float(max(hi - lo)) + 1.0
        out[name] = (
            [
                float(lo[0] - pad),
                float(lo[1] - pad),
                float(hi[0] - lo[0] + 2 * pad),
                float(hi[1] - lo[1] + 2 * pad),
            ],
            True,
        )
    return out


# ----------------------------------------------------------------------------------------------------
# dataset writer


def _r2(x: float) -> float:
    return round(float(x), 2)


def annotation_fields(person: dict, scheme: str) -> dict:
    """COCO keypoint fields of one rendered person (WholeBody: the per-part `*_kpts` fields)."""
    kp = person["keypoints"]
    flat = lambda a: [_r2(v) for v in a.reshape(-1)]  # noqa: E731
    ann = {
        "bbox": [_r2(v) for v in person["bbox"]],
        "area": _r2(person["area"]),
        "iscrowd": 0,
        "category_id": 1,
    }
    if scheme == "coco_wholebody133":
        ann["keypoints"] = flat(kp[:17])
        ann["num_keypoints"] = int((kp[:17, 2] > 0).sum())
        ann["foot_kpts"] = flat(kp[17:23])
        ann["face_kpts"] = flat(kp[23:91])
        ann["lefthand_kpts"] = flat(kp[91:112])
        ann["righthand_kpts"] = flat(kp[112:133])
        for part in ("face", "lefthand", "righthand", "foot"):
            box, valid = person["parts"][part]
            if part != "foot":
                ann[f"{part}_box"] = [_r2(v) for v in box]
            ann[f"{part}_valid"] = bool(valid)
    else:
        ann["keypoints"] = flat(kp)
        ann["num_keypoints"] = int((kp[:, 2] > 0).sum())
    ann["segmentation"] = []
    return ann


def _render_job(job: tuple) -> tuple[int, int, int, list[dict]]:
    """Worker: render one image, write its JPEG, return (index, h, w, annotations)."""
    seed, index, size, scheme, people, image_dir, quality = job
    cv2.setNumThreads(1)
    img, persons = render_sample(seed, index, size, scheme=scheme, people=people)
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    path = Path(image_dir) / image_name(index)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)
    return index, img.shape[0], img.shape[1], [annotation_fields(p, scheme) for p in persons]


def image_name(index: int) -> str:
    return f"{index:08d}.jpg"


def synthesize(
    out_dir: str | os.PathLike,
    num_images: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (256, 192),
    scheme: str = "goliath308",
    people: tuple[int, int] = (1, 4),
    workers: int = 1,
    progress: bool = True,
    quality: int = 92,
) -> Path:
    """Write `num_images` images to out_dir/images/ and their COCO JSON to out_dir/annotations.json.

    `file_name` in the JSON is relative to out_dir/images (COCO style: pass that folder as image root).
    Returns the JSON path."""
    scheme = canonical_name(scheme)
    if num_images < 1:
        raise UserError(f"num_images must be >= 1, got {num_images}")
    h, w = int(size[0]), int(size[1])
    if h < 64 or w < 48:
        raise UserError(f"image size must be at least 64x48 (HxW), got {h}x{w}")
    lo, hi = int(people[0]), int(people[1])
    if not 1 <= lo <= hi:
        raise UserError(f"people must be (min, max) with 1 <= min <= max, got {people}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, (h, w), scheme, (lo, hi), str(image_dir), quality) for i in range(num_images)]

    from tqdm import tqdm

    bar = tqdm(total=num_images, desc="synth", unit="img", disable=not progress)
    results = []
    if workers == 1:
        for job in jobs:
            results.append(_render_job(job))
            bar.update()
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap_unordered(
                _render_job, jobs, chunksize=max(1, min(64, num_images // (8 * workers)))
            ):
                results.append(r)
                bar.update()
    bar.close()
    results.sort(key=lambda r: r[0])

    target = get_scheme(scheme)
    body = get_scheme("coco17") if scheme == "coco_wholebody133" else target
    images, annotations = [], []
    for index, ih, iw, anns in results:
        images.append({"id": index + 1, "file_name": image_name(index), "height": ih, "width": iw})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann})
    doc = {
        "info": {
            "description": "sapiens-toolkit procedural people (sapiens_train.synth)",
            "keypoint_scheme": scheme,
            "seed": seed,
            "size": [h, w],
            "people": [lo, hi],
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {
                "id": 1,
                "name": "person",
                "supercategory": "person",
                "keypoints": list(body.names),
                "skeleton": [[a + 1, b + 1] for a, b in body.skeleton],  # COCO skeletons are 1-based
            }
        ],
    }
    path = out / "annotations.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------
# command line (wired as `sapiens data synth` in sapiens_train/data_cli.py)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW (e.g. 256x192), got {text!r}") from None
    return h, w


def _people(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"people must be MIN-MAX (e.g. 1-4), got {text!r}") from None


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder (images/ and annotations.json)")
    parser.add_argument("--num-images", type=int, default=1000, help="images to render (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed; image i depends only on (seed, i)")
    parser.add_argument(
        "--size", type=_size, default=(256, 192), metavar="HxW", help="image size (default 256x192)"
    )
    parser.add_argument(
        "--scheme",
        default="goliath308",
        help="keypoint scheme: goliath308 (default), coco_wholebody133, coco17",
    )
    parser.add_argument(
        "--people", type=_people, default=(1, 4), metavar="MIN-MAX", help="people per image (1-4)"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--quality", type=int, default=92, help="JPEG quality (default 92)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_synth(args: argparse.Namespace) -> int:
    path = synthesize(
        args.out,
        args.num_images,
        seed=args.seed,
        size=args.size,
        scheme=args.scheme,
        people=args.people,
        workers=args.workers,
        progress=not args.no_progress,
        quality=args.quality,
    )
    print(f"wrote {args.num_images} images and {path}")
    return 0
