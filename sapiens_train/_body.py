"""Geometry of one procedural person: a 3D skeleton, five-finger hands, feet and a face model.

Everything here is pure numpy and knows nothing about images. `sample_person(rng)` draws body
proportions, a pose and face parameters; `build_figure(params)` turns them into
  - the 308 Sapiens/Goliath keypoints in 3D body units (the figure is about 1 unit tall),
  - the 68 iBUG face points of COCO-WholeBody from the same face model,
  - a per-keypoint "self-occluded" flag (surface points whose normal faces away from the camera),
  - drawing commands grouped into parts (torso, head, upper arm, ...) that the renderer sorts by depth.

Frames. Body/world: x to the subject's LEFT, y DOWN, z TOWARDS the camera (so a figure facing the camera
has its left side at larger image x, as COCO expects). Head: the same axes before the head rotation.
Projection is orthographic: image (x, y) = scale * (x, y) + offset, depth = z (larger is nearer).

Left/right symmetry. Every left-side quantity is built from the right-side recipe with the side sign
s = +1 (left) / -1 (right) and rotations about y and z negated, so mirroring a pose maps each keypoint
onto its `flip_index` partner. The Goliath face points are defined for the right side (or the midline)
only; a left point is the mirror of its flip partner. This makes flip augmentation exact by
construction even where the Goliath names of a left/right pair differ (e.g. `r_point_8_of_inner_helix`
pairs with `l_point_2_of_inner_helix`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from sapiens_lite.keypoints import get_scheme

# Part ids (the renderer's depth-sorted units; a keypoint is "visible" when the pixel under it shows
# one of its own parts, see `KEYPOINT_PARTS`).
PARTS = (
    "torso",
    "neck",
    "head",
    "l_upperarm",
    "l_forearm",
    "l_hand",
    "r_upperarm",
    "r_forearm",
    "r_hand",
    "l_thigh",
    "l_shank",
    "l_foot",
    "r_thigh",
    "r_shank",
    "r_foot",
)
PART_ID = {n: i for i, n in enumerate(PARTS)}


# ----------------------------------------------------------------------------------------------------
# rotations (right-handed, angles in radians)
def rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


DOWN = np.array([0.0, 1.0, 0.0])
D2R = math.pi / 180.0


# ----------------------------------------------------------------------------------------------------
# parameters
@dataclass
class PersonParams:
    """Everything that defines one figure's geometry (angles in degrees, lengths in body units)."""

    lengths: dict[str, float]
    radii: dict[str, float]
    head: tuple[float, float, float]  # ellipsoid radii (rx, ry, rz)
    body: dict[str, float]  # global yaw / tilt, torso twist / bend / side bend
    neck: dict[str, float]  # head yaw / pitch / roll relative to the chest
    arm: dict[str, dict[str, float]]  # side "l"/"r" -> abd, flex, twist, elbow, pron, wflex, wdev
    leg: dict[str, dict[str, float]]  # side -> abd, flex, twist, knee, ankle
    fingers: dict[str, list[float]]  # side -> 5 curls in [0, 1] (thumb..pinky) + spread
    face: dict[str, float]  # per-side eye openness, gaze, mouth open, smile, brow raise


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def sample_person(rng: np.random.Generator, *, yaw_range: tuple[float, float] | None = None) -> PersonParams:
    """Draw proportions, a pose within joint limits and a face. `yaw_range` (degrees) pins the body yaw."""
    g = lambda sd: min(max(float(rng.normal(1.0, sd)), 1 - 2.5 * sd), 1 + 2.5 * sd)  # noqa: E731
    child = rng.random() < 0.1
    limb = 0.85 if child else 1.0
    lengths = {
        "torso": 0.30 * g(0.07),
        "neck": 0.035 * g(0.15),
        "shoulder": 0.105 * g(0.08),
        "hip": 0.06 * g(0.1),
        "upperarm": 0.17 * limb * g(0.06),
        "forearm": 0.145 * limb * g(0.06),
        "hand": 0.1 * g(0.06),
        "thigh": 0.245 * limb * g(0.06),
        "shank": 0.235 * limb * g(0.06),
        "foot": 0.14 * g(0.08),
    }
    build = g(0.18)
    radii = {
        "upperarm": 0.028 * build,
        "forearm": 0.021 * build,
        "thigh": 0.045 * build,
        "shank": 0.031 * build,
        "neck": 0.024 * build,
        "torso_depth": 0.06 * build,
        "waist": 0.085 * build,
    }
    hs = (1.25 if child else 1.0) * g(0.06)
    head = (0.052 * hs * g(0.05), 0.066 * hs, 0.06 * hs * g(0.05))

    if yaw_range is None:
        r = rng.random()
        yaw = _u(rng, -50, 50) if r < 0.6 else _u(rng, -110, 110) if r < 0.88 else _u(rng, 130, 230)
    else:
        yaw = _u(rng, *yaw_range)
    mode = rng.choice(["stand", "walk", "sit", "reach", "random"], p=[0.25, 0.2, 0.12, 0.18, 0.25])
    tilt = _u(rng, -8, 8) if rng.random() < 0.93 else _u(rng, -90, 90)
    body = {
        "yaw": yaw,
        "tilt": tilt,
        "twist": _u(rng, -25, 25),
        "bend": _u(rng, -10, 25) if mode != "sit" else _u(rng, 0, 20),
        "side": _u(rng, -12, 12),
    }
    neck = {"yaw": _u(rng, -70, 70), "pitch": _u(rng, -30, 35), "roll": _u(rng, -25, 25)}

    def arm(swing: float) -> dict[str, float]:
        if mode in ("stand", "walk", "sit"):
            a = {"abd": _u(rng, 5, 35), "flex": swing + _u(rng, -15, 25), "elbow": _u(rng, 0, 60)}
        elif mode == "reach":
            a = {"abd": _u(rng, 10, 170), "flex": _u(rng, -30, 160), "elbow": _u(rng, 0, 130)}
        else:
            a = {"abd": _u(rng, 0, 170), "flex": _u(rng, -40, 170), "elbow": _u(rng, 0, 150)}
        a.update(
            twist=_u(rng, -50, 70), pron=_u(rng, -20, 150), wflex=_u(rng, -50, 50), wdev=_u(rng, -15, 25)
        )
        return a

    def leg(swing: float) -> dict[str, float]:
        if mode == "stand":
            lg = {"abd": _u(rng, 0, 15), "flex": _u(rng, -10, 20), "knee": _u(rng, 0, 20)}
        elif mode == "walk":
            lg = {"abd": _u(rng, 0, 8), "flex": swing, "knee": _u(rng, 0, 60)}
        elif mode == "sit":
            lg = {"abd": _u(rng, 0, 25), "flex": _u(rng, 70, 100), "knee": _u(rng, 60, 110)}
        else:
            lg = {"abd": _u(rng, 0, 45), "flex": _u(rng, -20, 110), "knee": _u(rng, 0, 140)}
        lg.update(twist=_u(rng, -20, 30), ankle=_u(rng, -20, 35))
        return lg

    swing = _u(rng, -35, 35) if mode == "walk" else 0.0
    arms = {"l": arm(-swing), "r": arm(swing)}
    legs = {"l": leg(swing), "r": leg(-swing)}
    grip = rng.random()
    fingers = {
        s: [float(np.clip(grip + rng.normal(0, 0.25), 0, 1)) for _ in range(5)] + [_u(rng, 0, 1)]
        for s in "lr"
    }
    face = {
        "open_l": float(np.clip(rng.normal(0.9, 0.25), 0.05, 1.1)),
        "open_r": float(np.clip(rng.normal(0.9, 0.25), 0.05, 1.1)),
        "gaze_x": _u(rng, -1, 1),
        "gaze_y": _u(rng, -0.7, 0.7),
        "mouth": float(max(0.0, rng.normal(0.1, 0.3))),
        "smile": _u(rng, -0.5, 1),
        "brow": _u(rng, -0.5, 1),
        "pupil": _u(rng, 0.7, 1.3),
    }
    face["open_r"] = face["open_l"] if rng.random() < 0.8 else face["open_r"]
    return PersonParams(lengths, radii, head, body, neck, arms, legs, fingers, face)


def mirror_params(p: PersonParams) -> PersonParams:
    """The mirror image of a figure (x -> -x): left and right swap, yaw / roll style angles negate."""
    body = dict(
        p.body, yaw=-p.body["yaw"], tilt=-p.body["tilt"], twist=-p.body["twist"], side=-p.body["side"]
    )
    neck = dict(p.neck, yaw=-p.neck["yaw"], roll=-p.neck["roll"])
    face = dict(p.face, open_l=p.face["open_r"], open_r=p.face["open_l"], gaze_x=-p.face["gaze_x"])
    return PersonParams(
        dict(p.lengths),
        dict(p.radii),
        p.head,
        body,
        neck,
        {"l": dict(p.arm["r"]), "r": dict(p.arm["l"])},
        {"l": dict(p.leg["r"]), "r": dict(p.leg["l"])},
        {"l": list(p.fingers["r"]), "r": list(p.fingers["l"])},
        face,
    )


# ----------------------------------------------------------------------------------------------------
# face model: specs in normalised face coordinates (u = x / rx, v = y / ry, dz = extra height / rz)
def _eye_center(s: float) -> tuple[float, float]:
    return s * 0.36, -0.02


_EYE_HALF = 0.16


def _eye_shape(t: float) -> float:
    return math.sin(math.pi * min(max(t, 0.0), 1.0) ** 0.9)


def _eye_curve(curve: str, t: float, s: float, openness: float) -> tuple[float, float, float]:
    """A point on one eye curve; t runs from the inner corner (0) to the outer corner (1)."""
    cu, cv = _eye_center(s)
    u = cu + s * _EYE_HALF * (2 * t - 1)
    hu, hl = 0.1 * openness + 0.01, 0.065 * openness + 0.01
    sh = _eye_shape(t)
    v = {
        "upper_lash": cv - hu * sh,
        "upper_eyelid": cv - (hu + 0.035) * sh - 0.008,
        "upper_crease": cv - (hu + 0.09) * sh - 0.03,
        "lower_lash": cv + hl * sh,
        "lower_eyelid": cv + (hl + 0.035) * sh + 0.008,
    }[curve]
    return u, v, 0.02


def _brow(edge: str, t: float, s: float, raise_: float) -> tuple[float, float, float]:
    """Brow edge point; t runs from the inner start (0) to the outer end (1)."""
    u = s * (0.12 + 0.5 * t)
    v = -0.3 - 0.05 * raise_ - 0.07 * math.sin(math.pi * (0.25 + 0.65 * t)) + 0.05 * t
    if edge == "lower":
        v += 0.07 * (1 - 0.75 * t)
    return u, v, 0.04


def _nose_bridge(v: float) -> float:
    # protrusion along the midline from the root (v=-0.17) to the tip (v=0.28)
    a = (v + 0.17) / 0.45
    return 0.02 + 0.3 * a**1.6


def _lip(curve: str, t: float, s: float, mouth: float, smile: float) -> tuple[float, float, float]:
    """Lip point; t runs from the mouth corner (0) to the midline (1)."""
    w = 0.3 + 0.03 * smile
    vc = 0.58 - 0.035 * smile * (1 - t) ** 2
    q = math.sin(math.pi / 2 * t)
    if curve == "upper_outer":
        u, v = s * w * (1 - t), vc - 0.075 * t**0.6 + 0.025 * max(0.0, t - 0.7) / 0.3
    elif curve == "lower_outer":
        u, v = s * w * (1 - t), vc + (0.085 + 0.1 * mouth) * q
    elif curve == "upper_inner":
        u, v = s * (w - 0.04) * (1 - t), vc - 0.01 * q
    else:  # lower_inner
        u, v = s * (w - 0.04) * (1 - t), vc + (0.005 + 0.1 * mouth) * q
    return u, v, 0.04


# ear chart: (forward, down) in [-1, 1]; the ear plane is the head's side
_EAR_CHART = {
    "ear": (0.25, 0.1),
    "top_connecting_point_of_helix": (0.55, -0.6),
    "point_1_of_inner_helix": (0.25, -0.92),
    "point_2_of_inner_helix": (-0.15, -1.0),
    "point_3_of_inner_helix": (-0.5, -0.85),
    "point_4_of_inner_helix": (-0.78, -0.5),
    "point_5_of_inner_helix": (-0.9, 0.0),
    "point_6_of_inner_helix": (-0.8, 0.4),
    "point_7_of_inner_helix": (-0.6, 0.7),
    "point_8_of_inner_helix": (-0.35, 0.9),
    "tip_of_ear_lobe": (0.0, 1.1),
    "bottom_connecting_point_of_ear_lobe": (0.35, 0.95),
    "top_point_of_tragus": (0.6, 0.05),
    "protruding_point_of_tragus": (0.72, 0.22),
    "bottom_point_of_tragus": (0.6, 0.42),
    "highest_point_of_antitragus": (-0.15, 0.55),
    "start_point_of_crus_of_helix": (0.4, -0.2),
    "deepest_point_of_concha": (0.12, 0.15),
    "start_of_antihelix": (-0.3, 0.48),
    "midpoint_1_of_antihelix": (-0.5, 0.15),
    "midpoint_2_of_antihelix": (-0.5, -0.2),
    "midpoint_3_of_antihelix": (-0.38, -0.45),
    "end_of_antihelix": (-0.22, -0.62),
    "top_end_of_superior_crus": (-0.1, -0.82),
    "top_end_of_inferior_crus": (0.25, -0.55),
    "midpoint_1_of_inferior_crus": (0.05, -0.45),
    "midpoint_between_22_15": (-0.42, 0.72),
}
# ear outline for drawing (closed polygon around the chart)
_EAR_OUTLINE = [
    (0.55, -0.6),
    (0.2, -1.05),
    (-0.4, -0.95),
    (-0.9, -0.45),
    (-1.0, 0.1),
    (-0.7, 0.75),
    (0.0, 1.15),
    (0.45, 0.9),
    (0.7, 0.3),
]

_CLOCK = {
    "3": 0.0,
    "midpoint_1": 45.0,
    "12": 90.0,
    "midpoint_4": 135.0,
    "9": 180.0,
    "midpoint_3": 225.0,
    "6": 270.0,
    "midpoint_2": 315.0,
}
_LASH_T = {"inner_end": 0.0, "outer_end": 1.0, "centerpoint": 0.5}
_LASH_T.update({f"midpoint_{k}": (k if k <= 3 else k + 1) / 8 for k in range(1, 7)})
_BROW_T = {"startpoint": 0.0, "midpoint_1": 0.25, "midpoint_2": 0.5, "midpoint_3": 0.75}
# lip midpoints: the Goliath pairs (1,2), (3,6), (4,5) are mirror images; 1/3/4 lie on the right half
_LIP_T = {"midpoint_3": 0.25, "midpoint_1": 0.5, "midpoint_4": 0.75}


def _face_spec(name: str):
    """Recipe for a right-side (subject's right, x < 0) or midline face keypoint, as a tuple
    (kind, *args) that `_face_point` evaluates: kinds nose / fixed / jaw / eye / brow / lip / iris / ear /
    eye_center. Returns None for names that are not such face points (body, hands, left-side names)."""
    if name in ("nose", "tip_of_nose"):
        return ("nose", 0.0, 0.28, _nose_bridge(0.28))
    if name == "right_eye":
        return ("eye_center",)
    if name == "right_ear":
        return ("ear", "ear")
    mid = {
        "center_of_glabella": (0.0, -0.3, 0.02),
        "center_of_nose_root": (0.0, -0.17, _nose_bridge(-0.17)),
        "midpoint_1_of_nose_bridge": (0.0, -0.06, _nose_bridge(-0.06)),
        "midpoint_2_of_nose_bridge": (0.0, 0.05, _nose_bridge(0.05)),
        "midpoint_3_of_nose_bridge": (0.0, 0.15, _nose_bridge(0.15)),
        "tip_of_nose_bridge": (0.0, 0.22, _nose_bridge(0.22)),
        "bottom_center_of_nose": (0.0, 0.36, 0.12),
        "r_outer_corner_of_nose": (-0.17, 0.3, 0.06),
        "inner_corner_of_r_nostril": (-0.04, 0.35, 0.12),
        "outer_corner_of_r_nostril": (-0.12, 0.34, 0.08),
        "upper_corner_of_r_nostril": (-0.08, 0.31, 0.11),
    }
    if name in mid:
        return ("nose", *mid[name])
    if name == "center_of_labiomental_groove":
        return ("fixed", 0.0, 0.78, 0.02)
    if name == "tip_of_chin":
        return ("jaw", 8)
    m = re.fullmatch(
        r"r_(inner_end|outer_end|centerpoint|midpoint_\d)_of_(upper|lower)_(lash|eyelid|crease)_line", name
    )
    if m:
        return ("eye", f"{m[2]}_{m[3]}", _LASH_T[m[1]])
    m = re.fullmatch(r"(upper|lower)_(startpoint|midpoint_\d)_of_r_eyebrow", name)
    if m:
        return ("brow", m[1], _BROW_T[m[2]])
    if name == "end_of_r_eyebrow":
        return ("brow", "upper", 1.0)
    if name == "r_outer_corner_of_mouth":
        return ("lip", "upper_outer", 0.0)
    if name == "r_inner_corner_of_mouth":
        return ("lip", "upper_inner", 0.0)
    m = re.fullmatch(r"center_of_(cupid_bow|lower_outer_lip|upper_inner_lip|lower_inner_lip)", name)
    if m:
        curve = {"cupid_bow": "upper_outer"}.get(m[1], m[1].replace("_lip", ""))
        return ("lip", curve, 1.0)
    m = re.fullmatch(r"(midpoint_[134])_of_(upper|lower)_(outer|inner)_lip", name)
    if m:
        return ("lip", f"{m[2]}_{m[3]}", _LIP_T[m[1]])
    m = re.fullmatch(r"r_(.+)", name)
    if m and m[1] in _EAR_CHART:
        return ("ear", m[1])
    m = re.fullmatch(r"r_center_of_(iris|pupil)", name)
    if m:
        return ("iris", m[1], None)
    m = re.fullmatch(r"r_border_of_(iris|pupil)_(\d+|midpoint_\d)", name)
    if m:
        return ("iris", m[1], _CLOCK[m[2]])
    return None


def _ibug_specs() -> list[tuple]:
    """The 68 iBUG face points (COCO-WholeBody face-0..67) as (side, spec) from the same face model."""
    R, L = -1.0, 1.0
    out: list[tuple] = [(R if k < 8 else L, ("jaw", k)) for k in range(17)]
    out += [(R, ("brow", "upper", t)) for t in (1.0, 0.75, 0.5, 0.25, 0.0)]
    out += [(L, ("brow", "upper", t)) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    out += [(R, ("nose", 0.0, v, _nose_bridge(v))) for v in (-0.17, -0.02, 0.12, 0.28)]
    out += [
        (R, ("nose", -0.12, 0.34, 0.08)),
        (R, ("nose", -0.06, 0.355, 0.1)),
        (R, ("nose", 0.0, 0.36, 0.12)),
    ]
    out += [(L, ("nose", 0.06, 0.355, 0.1)), (L, ("nose", 0.12, 0.34, 0.08))]
    out += [
        (R, ("eye", "upper_lash", 1.0)),
        (R, ("eye", "upper_lash", 2 / 3)),
        (R, ("eye", "upper_lash", 1 / 3)),
    ]
    out += [
        (R, ("eye", "upper_lash", 0.0)),
        (R, ("eye", "lower_lash", 1 / 3)),
        (R, ("eye", "lower_lash", 2 / 3)),
    ]
    out += [
        (L, ("eye", "upper_lash", 0.0)),
        (L, ("eye", "upper_lash", 1 / 3)),
        (L, ("eye", "upper_lash", 2 / 3)),
    ]
    out += [
        (L, ("eye", "upper_lash", 1.0)),
        (L, ("eye", "lower_lash", 2 / 3)),
        (L, ("eye", "lower_lash", 1 / 3)),
    ]
    out += [(R, ("lip", "upper_outer", t)) for t in (0.0, 1 / 3, 2 / 3)] + [(R, ("lip", "upper_outer", 1.0))]
    out += [(L, ("lip", "upper_outer", t)) for t in (2 / 3, 1 / 3, 0.0)]
    out += [(L, ("lip", "lower_outer", t)) for t in (1 / 3, 2 / 3)] + [(R, ("lip", "lower_outer", 1.0))]
    out += [(R, ("lip", "lower_outer", t)) for t in (2 / 3, 1 / 3)]
    out += [
        (R, ("lip", "upper_inner", 0.0)),
        (R, ("lip", "upper_inner", 0.5)),
        (R, ("lip", "upper_inner", 1.0)),
    ]
    out += [
        (L, ("lip", "upper_inner", 0.5)),
        (L, ("lip", "upper_inner", 0.0)),
        (L, ("lip", "lower_inner", 0.5)),
    ]
    out += [(R, ("lip", "lower_inner", 1.0)), (R, ("lip", "lower_inner", 0.5))]
    assert len(out) == 68
    return out


@lru_cache(maxsize=1)
def face_tables() -> tuple[list[tuple[int, float, tuple]], list[tuple[float, tuple]]]:
    """(Goliath face entries [(index, side, spec)], iBUG entries [(side, spec)]), computed once."""
    scheme = get_scheme("goliath308")
    entries = []
    for i, name in enumerate(scheme.names):
        spec = _face_spec(name)
        if spec is not None:
            entries.append((i, -1.0, spec))
            continue
        partner = scheme.names[scheme.flip_index[i]]
        spec = _face_spec(partner)
        if spec is not None:
            entries.append((i, 1.0, spec))
    return entries, _ibug_specs()


def _face_point(spec: tuple, s: float, fp: dict[str, float]) -> tuple[float, float, float, str]:
    """(u, v, dz, kind) of one face spec on side s."""
    kind = spec[0]
    openness = fp["open_l"] if s > 0 else fp["open_r"]
    if kind == "nose":
        return s * abs(spec[1]), spec[2], spec[3], "nose"
    if kind == "fixed":
        return s * abs(spec[1]), spec[2], spec[3], "surf"
    if kind == "eye_center":
        cu, cv = _eye_center(s)
        return cu, cv, 0.03, "surf"
    if kind == "jaw":
        th = math.pi * spec[1] / 16
        return -0.86 * math.cos(th), -0.05 + 1.02 * math.sin(th), 0.0, "surf"
    if kind == "eye":
        return (*_eye_curve(spec[1], spec[2], s, openness), "surf")
    if kind == "brow":
        return (*_brow(spec[1], spec[2], s, fp["brow"]), "surf")
    if kind == "lip":
        return (*_lip(spec[1], spec[2], s, fp["mouth"], fp["smile"]), "surf")
    if kind == "iris":
        cu, cv = _eye_center(s)
        iu, iv = cu + 0.06 * fp["gaze_x"], cv + 0.03 * fp["gaze_y"]
        if spec[2] is None:
            return iu, iv, 0.05, "iris"
        r = 0.075 if spec[1] == "iris" else 0.032 * fp["pupil"]
        a = spec[2] * D2R
        # clock positions as seen from the front (3 o'clock = +x for the right eye); the left eye mirrors
        # it, so the right eye's 3 o'clock becomes the left eye's 9 o'clock, as the flip pairs say
        return iu - s * r * math.cos(a), iv - 0.8 * r * math.sin(a), 0.05, "iris"
    assert kind == "ear", spec
    return (*_EAR_CHART[spec[1]], 0.0, "ear")


# ----------------------------------------------------------------------------------------------------
# the figure
@dataclass
class Figure:
    """Posed geometry of one person (body units, world frame; see module docstring)."""

    kp: np.ndarray  # [308, 3] Goliath keypoints
    kp_hidden: np.ndarray  # [308] bool: faces away from the camera (back of the head, far ear, ...)
    ibug: np.ndarray  # [68, 3] iBUG face points
    ibug_hidden: np.ndarray  # [68] bool
    parts: list[tuple[int, float, list[tuple]]] = field(default_factory=list)  # (part id, depth, commands)


_FACE_PARAMS = ("open", "brow", "mouth", "smile", "gaze_x", "gaze_y", "pupil")


@lru_cache(maxsize=2)
def _face_basis(which: str) -> tuple[np.ndarray, ...]:
    """Every face point's (u, v, dz) is affine in the face parameters; tabulate the coefficients once.

    Returns basis [N, 3, 1 + P] (constant + one column per `_FACE_PARAMS` entry), side [N], and
    per-point kind masks (ear, nose, iris)."""
    goliath, ibug = face_tables()
    entries = [(s, sp) for _, s, sp in goliath] if which == "goliath" else ibug
    n, P = len(entries), len(_FACE_PARAMS)
    basis = np.zeros((n, 3, 1 + P))
    side = np.array([s for s, _ in entries])
    kinds = []
    for k, (s, spec) in enumerate(entries):
        zero = {name: 0.0 for name in _FACE_PARAMS}
        zero["open_l"] = zero["open_r"] = 0.0
        u, v, dz, kind = _face_point(spec, s, zero)
        base = np.array([u, v, dz])
        basis[k, :, 0] = base
        for j, name in enumerate(_FACE_PARAMS):
            one = dict(zero)
            one["open_l" if name == "open" and s > 0 else "open_r" if name == "open" else name] = 1.0
            basis[k, :, 1 + j] = np.array(_face_point(spec, s, one)[:3]) - base
        kinds.append(kind)
    kinds = np.array(kinds)
    return basis, side, kinds == "ear", kinds == "nose", kinds == "iris"


def _face_points(which: str, fp: dict[str, float], head) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head-local points [N, 3], outward normals [N, 3] and 'behind the eyelids' flags [N] of the
    Goliath face keypoints (which="goliath", in `face_tables()` order) or the 68 iBUG points."""
    basis, side, ear, nose, iris = _face_basis(which)
    hx, hy, hz = head
    shared = [fp[name] for name in _FACE_PARAMS[1:]]
    coef = np.empty((len(side), 1 + len(_FACE_PARAMS)))
    coef[:, 0] = 1.0
    coef[:, 1] = np.where(side > 0, fp["open_l"], fp["open_r"])
    coef[:, 2:] = shared
    u, v, dz = np.einsum("nck,nk->cn", basis, coef)  # each [N]
    zz = np.sqrt(np.maximum(0.03, 1.0 - u * u - v * v))
    pts = np.stack([u * hx, v * hy, zz * hz + dz * hz], 1)
    nrm = np.stack([u / hx, v / hy, zz / hz], 1)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    nrm[nose, 2] += 1.0
    # ears: a plane on the side of the head, chart (forward, down) = (u, v)
    pts[ear] = np.stack(
        [side[ear] * hx * _ear_flare(u[ear]), hy * (0.05 + 0.26 * v[ear]), hz * (-0.12 + 0.17 * u[ear])], 1
    )
    nrm[ear] = np.stack([side[ear], np.zeros(ear.sum()), np.full(ear.sum(), 0.45)], 1)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    # iris / pupil points are hidden behind the lids unless between the upper and lower lash lines
    lidded = np.zeros(len(side), bool)
    if iris.any():
        s, o = side[iris], coef[iris, 1]
        cu, cv = s * 0.36, -0.02
        t = ((u[iris] - cu) / (s * _EYE_HALF) + 1) / 2
        sh = np.sin(np.pi * np.clip(t, 0, 1) ** 0.9)
        up, lo = cv - (0.1 * o + 0.01) * sh, cv + (0.065 * o + 0.01) * sh
        lidded[iris] = ~((t >= 0) & (t <= 1) & (v[iris] >= up) & (v[iris] <= lo))
    return pts, nrm, lidded


def _ear_flare(fwd):
    """Ears stand off the head towards their back edge (fwd = -1), so they show from the front."""
    return 0.97 + 0.09 * (1 - fwd)


def _ear_outline(head, s: float) -> np.ndarray:
    hx, hy, hz = head
    return np.array(
        [(s * hx * _ear_flare(a), hy * (0.05 + 0.26 * b), hz * (-0.12 + 0.17 * a)) for a, b in _EAR_OUTLINE]
    )


@lru_cache(maxsize=1)
def _face_index() -> tuple[np.ndarray, np.ndarray]:
    """Goliath indices of the face entries and their back-facing thresholds (ears stay visible edge-on)."""
    goliath, _ = face_tables()
    idx = np.array([i for i, _, _ in goliath])
    thr = np.array([-0.15 if sp[0] == "ear" else 0.02 for _, _, sp in goliath])
    return idx, thr


@lru_cache(maxsize=1)
def _goliath_layout():
    scheme = get_scheme("goliath308")
    idx = {n: i for i, n in enumerate(scheme.names)}
    return scheme, idx


_FINGERS = ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")
# (MCP along the hand, MCP lateral towards the thumb, segment lengths) as fractions of hand length
_FINGER_GEOM = {
    "thumb": (0.14, 0.16, (0.22, 0.17, 0.14)),
    "forefinger": (0.47, 0.13, (0.24, 0.15, 0.12)),
    "middle_finger": (0.48, 0.03, (0.27, 0.17, 0.12)),
    "ring_finger": (0.46, -0.07, (0.25, 0.16, 0.11)),
    "pinky_finger": (0.42, -0.16, (0.2, 0.12, 0.1)),
}


def _sphere_samples(n_ring: int = 12, n_per: int = 24) -> np.ndarray:
    """Unit-sphere sample points [N, 3] (head silhouette = hull of the projected points; hair caps)."""
    pts = [(0.0, -1.0, 0.0), (0.0, 1.0, 0.0)]
    for i in range(1, n_ring):
        th = math.pi * i / n_ring
        for j in range(n_per):
            ph = 2 * math.pi * (j + 0.5 * (i % 2)) / n_per
            pts.append((math.sin(th) * math.cos(ph), -math.cos(th), math.sin(th) * math.sin(ph)))
    return np.array(pts)


_SPHERE = _sphere_samples()
_HAIR_TOP = _SPHERE[:, 1] < -0.45
_HAIR_BACK = (_SPHERE[:, 2] < -0.35) & (_SPHERE[:, 1] < 0.45)


def build_figure(p: PersonParams) -> Figure:
    """Pose the skeleton, hands, feet and face; return keypoints and depth-sortable drawing commands."""
    scheme, idx = _goliath_layout()
    L, Rd = p.lengths, p.radii
    kp = np.zeros((scheme.num_keypoints, 3))
    hidden = np.zeros(scheme.num_keypoints, bool)
    parts: list[tuple[int, float, list[tuple]]] = []

    def put(name: str, xyz) -> None:
        kp[idx[name]] = xyz

    # torso: pelvis at the origin; the chest rotates on top of it
    R0 = rz(p.body["tilt"] * D2R) @ ry(p.body["yaw"] * D2R)
    Rc = R0 @ ry(p.body["twist"] * D2R) @ rx(-p.body["bend"] * D2R) @ rz(p.body["side"] * D2R)
    neck_base = Rc @ np.array([0.0, -L["torso"], 0.0])
    put("neck", neck_base)
    shoulders, hips = {}, {}
    for side, s in (("left", 1.0), ("right", -1.0)):
        shoulders[side] = Rc @ np.array([s * L["shoulder"], -L["torso"] + 0.03, 0.0])
        hips[side] = R0 @ np.array([s * L["hip"], 0.02, 0.0])
        put(f"{side}_shoulder", shoulders[side])
        put(f"{side}_hip", hips[side])
        top = np.array(
            [s * (L["shoulder"] + 0.2 * Rd["upperarm"]), -L["torso"] + 0.03 - 0.75 * Rd["upperarm"], 0.0]
        )
        put(f"{side}_acromion", Rc @ top)

    # torso silhouette: a box from the shoulders to the hips, with a waist
    dpt = Rd["torso_depth"]
    corners = []
    for s in (1.0, -1.0):
        for dz in (dpt, -dpt):
            corners.append(
                Rc @ np.array([s * (L["shoulder"] + 0.2 * Rd["upperarm"]), -L["torso"] + 0.02, dz * 0.8])
            )
            corners.append(Rc @ np.array([s * L["shoulder"] * 0.55, -L["torso"] - 0.005, dz * 0.6]))
            corners.append(
                R0 @ ry(p.body["twist"] * 0.5 * D2R) @ np.array([s * Rd["waist"], -0.5 * L["torso"], dz])
            )
            corners.append(R0 @ np.array([s * (L["hip"] + 0.7 * Rd["thigh"]), 0.04, dz]))
    corners = np.array(corners)
    parts.append(
        (PART_ID["torso"], float(corners[:, 2].mean()) - dpt * 0.5, [("hull", corners, "shirt", True)])
    )

    # head
    Rh = Rc @ ry(p.neck["yaw"] * D2R) @ rx(p.neck["pitch"] * D2R) @ rz(p.neck["roll"] * D2R)
    hx, hy, hz = p.head
    neck_top = neck_base + Rc @ np.array([0.0, -L["neck"], 0.0])
    head_c = neck_top + Rh @ np.array([0.0, -0.62 * hy, -0.12 * hz])
    parts.append(
        (
            PART_ID["neck"],
            float((neck_base[2] + neck_top[2]) / 2) - 0.01,
            [("capsule", neck_base, head_c, Rd["neck"], "skin", True)],
        )
    )

    face_idx, ear_thr = _face_index()
    pts, nrm, lidded = _face_points("goliath", p.face, p.head)
    kp[face_idx] = head_c + pts @ Rh.T
    hidden[face_idx] = ((nrm @ Rh.T)[:, 2] < ear_thr) | lidded
    ipts, inrm, _ = _face_points("ibug", p.face, p.head)
    ibug = head_c + ipts @ Rh.T
    ibug_hidden = (inrm @ Rh.T)[:, 2] < 0.02

    sph = _SPHERE * np.array(p.head)
    sph_w = head_c + sph @ Rh.T
    sph_nz = (_SPHERE / np.array(p.head) ** 2 * np.array(p.head).mean() ** 2) @ Rh.T
    facing = (Rh @ np.array([0.0, 0.0, 1.0]))[2]
    head_cmds: list[tuple] = [
        ("hull", head_c + (sph * 1.08 + np.array([0, -0.08 * hy, -0.08 * hz])) @ Rh.T, "hair", True)
    ]
    head_cmds.append(("hull", sph_w, "skin", True))
    ear_cmds = []
    for s in (1.0, -1.0):
        n_ear = (Rh @ np.array([s, 0.0, 0.45]))[2]
        if n_ear > -0.3:
            outline = _ear_outline(p.head, s)
            ear_cmds.append(("hull", head_c + outline @ Rh.T, "skin_dark", True))
    head_cmds += ear_cmds
    for cap in (_HAIR_TOP, _HAIR_BACK):
        vis = cap & (sph_nz[:, 2] > 0)
        if vis.sum() >= 3:
            head_cmds.append(("hull", sph_w[vis], "hair", False))
    if facing > -0.2:
        head_cmds += _face_commands(ibug, (inrm @ Rh.T)[:, 2], kp, idx, hidden, p.head)
    # the neck capsule reaches the head centre: always draw the head over it
    neck_depth = float((neck_base[2] + neck_top[2]) / 2) - 0.01
    parts.append((PART_ID["head"], max(float(head_c[2]), neck_depth + 1e-4), head_cmds))

    # arms and hands
    for side, s in (("left", 1.0), ("right", -1.0)):
        a = p.arm[side[0]]
        Rua = Rc @ rz(-s * a["abd"] * D2R) @ rx(a["flex"] * D2R) @ ry(s * a["twist"] * D2R)
        sh = shoulders[side]
        elbow = sh + Rua @ (DOWN * L["upperarm"])
        Rfa = Rua @ rx(a["elbow"] * D2R)
        wrist = elbow + Rfa @ (DOWN * L["forearm"])
        put(f"{side}_elbow", elbow)
        put(f"{side}_wrist", wrist)
        Rmid = Rua @ rx(a["elbow"] * 0.5 * D2R)
        back = Rmid @ np.array([0.0, 0.0, -1.0])
        put(f"{side}_olecranon", elbow + back * 0.8 * Rd["upperarm"])
        put(f"{side}_cubital_fossa", elbow - back * 0.6 * Rd["forearm"])
        hidden[idx[f"{side}_olecranon"]] = back[2] < -0.25
        hidden[idx[f"{side}_cubital_fossa"]] = -back[2] < -0.25
        sleeve = f"{side[0]}_sleeve"
        ua_cmds = [("capsule", sh, elbow, Rd["upperarm"], "shirt", True)]
        if s > 0:  # the left sleeve carries a band: a consistent cue that tells left from right
            ua_cmds.append(
                (
                    "capsule",
                    sh + 0.45 * (elbow - sh),
                    sh + 0.62 * (elbow - sh),
                    Rd["upperarm"] * 1.05,
                    "accent",
                    False,
                )
            )
        parts.append((PART_ID[f"{side[0]}_upperarm"], float((sh[2] + elbow[2]) / 2), ua_cmds))
        parts.append(
            (
                PART_ID[f"{side[0]}_forearm"],
                float((elbow[2] + wrist[2]) / 2),
                [("capsule", elbow, wrist, Rd["forearm"], sleeve, True)],
            )
        )
        Rhand = Rfa @ ry(s * a["pron"] * D2R) @ rx(a["wflex"] * D2R) @ rz(-s * a["wdev"] * D2R)
        cmds, depth = _hand(side, s, wrist, Rhand, L["hand"], Rd["forearm"], p.fingers[side[0]], put)
        parts.append((PART_ID[f"{side[0]}_hand"], depth, cmds))

    # legs and feet
    for side, s in (("left", 1.0), ("right", -1.0)):
        g = p.leg[side[0]]
        Rth = R0 @ rz(-s * g["abd"] * D2R) @ rx(g["flex"] * D2R) @ ry(s * g["twist"] * D2R)
        hip = hips[side]
        knee = hip + Rth @ (DOWN * L["thigh"])
        Rsh = Rth @ rx(-g["knee"] * D2R)
        ankle = knee + Rsh @ (DOWN * L["shank"])
        put(f"{side}_knee", knee)
        put(f"{side}_ankle", ankle)
        Rft = Rsh @ rx(g["ankle"] * D2R)
        fl = L["foot"]
        heel = ankle + Rft @ np.array([0.0, 0.045, -0.28 * fl])
        big = ankle + Rft @ np.array([-s * 0.16 * fl, 0.05, 0.95 * fl])
        small = ankle + Rft @ np.array([s * 0.3 * fl, 0.05, 0.78 * fl])
        put(f"{side}_heel", heel)
        put(f"{side}_big_toe", big)
        put(f"{side}_small_toe", small)
        th_cmds = [("capsule", hip, knee, Rd["thigh"], "pants", True)]
        if s > 0:
            th_cmds.append(
                (
                    "capsule",
                    hip + 0.55 * (knee - hip),
                    hip + 0.7 * (knee - hip),
                    Rd["thigh"] * 1.04,
                    "accent",
                    False,
                )
            )
        parts.append((PART_ID[f"{side[0]}_thigh"], float((hip[2] + knee[2]) / 2), th_cmds))
        parts.append(
            (
                PART_ID[f"{side[0]}_shank"],
                float((knee[2] + ankle[2]) / 2),
                [("capsule", knee, ankle, Rd["shank"], f"{side[0]}_leg", True)],
            )
        )
        sole = np.array(
            [
                ankle + Rft @ np.array([0.0, -0.01, -0.1 * fl]),
                heel,
                big,
                small,
                ankle + Rft @ np.array([s * 0.3 * fl, 0.035, 0.5 * fl]),
                ankle + Rft @ np.array([-s * 0.2 * fl, 0.035, 0.5 * fl]),
            ]
        )
        foot_cmds = [
            ("hull", sole, "shoe", True),
            (
                "capsule",
                ankle,
                ankle + Rft @ np.array([0.0, 0.02, 0.3 * fl]),
                Rd["shank"] * 0.8,
                "shoe",
                True,
            ),
        ]
        parts.append((PART_ID[f"{side[0]}_foot"], float(sole[:, 2].mean()), foot_cmds))

    return Figure(kp=kp, kp_hidden=hidden, ibug=ibug, ibug_hidden=ibug_hidden, parts=parts)


def _hand(side, s, wrist, Rhand, hl, r_wrist, curls, put):
    """Five-finger hand: writes the 21 hand keypoints, returns (commands, depth)."""
    # hand-local (along, towards thumb, palm normal) -> limb frame (x mirrored by side) -> world
    B = Rhand @ np.array([[0.0, s, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    along, lat, palm = B[:, 0], B[:, 1], B[:, 2]
    geom = _finger_tables()
    base = wrist + hl * (geom["a0"][:, None] * along + geom["l0"][:, None] * lat)  # [5, 3]
    # first-segment direction (fingers fan out with the spread) and the direction each finger curls to
    ang = geom["fan"] * (0.3 + 0.7 * curls[5])
    d0 = np.cos(ang)[:, None] * along + np.sin(ang)[:, None] * lat
    d0[0] = along * 0.55 + lat * 0.75 + palm * 0.35
    d0 /= np.linalg.norm(d0, axis=1, keepdims=True)
    bend = np.repeat(palm[None], 5, 0)
    bend[0] = palm * 0.8 - lat * 0.3
    bend -= d0 * (bend * d0).sum(1, keepdims=True)
    bend /= np.linalg.norm(bend, axis=1, keepdims=True)
    acc = np.cumsum(np.asarray(curls[:5])[:, None] * geom["flex"], 1) * D2R  # [5, 3] joint angles
    steps = (
        hl
        * geom["seg"][..., None]
        * (np.cos(acc)[..., None] * d0[:, None] + np.sin(acc)[..., None] * bend[:, None])
    )
    pts = np.concatenate([base[:, None], base[:, None] + np.cumsum(steps, 1)], 1)  # [5, 4, 3] MCP..tip
    for k, f in enumerate(_FINGERS):
        for n, q in zip((f"{side}_{f}_third_joint", f"{side}_{f}2", f"{side}_{f}3", f"{side}_{f}4"), pts[k]):
            put(n, q)
    r_f = 0.05 * hl
    mids = (pts[:, :-1, 2] + pts[:, 1:, 2]) / 2  # [5, 3] segment depths
    segs = [
        (mids[k, j], ("capsule", pts[k, j], pts[k, j + 1], r_f * (1.15 if k == 0 else 1.0), "skin", True))
        for k in range(5)
        for j in range(3)
    ]
    palm_arr = np.concatenate(
        [
            [wrist + lat * 0.9 * r_wrist, wrist - lat * 0.9 * r_wrist],
            base[1:],
            [wrist + hl * (0.2 * along + 0.17 * lat)],
        ]
    )
    depth = float(palm_arr[:, 2].mean())
    segs.sort(key=lambda t: t[0])
    cmds = (
        [c for d, c in segs if d < depth]
        + [("hull", palm_arr, "skin", True)]
        + [c for d, c in segs if d >= depth]
    )
    return cmds, depth


@lru_cache(maxsize=1)
def _finger_tables() -> dict[str, np.ndarray]:
    g = [_FINGER_GEOM[f] for f in _FINGERS]
    flex = np.array([[30.0, 50.0, 60.0]] + [[70.0, 95.0, 65.0]] * 4)  # degrees at full curl
    l0 = np.array([x[1] for x in g])
    return {
        "a0": np.array([x[0] for x in g]),
        "l0": l0,
        "seg": np.array([x[2] for x in g]),
        "flex": flex,
        "fan": l0 * 1.6,
    }


def _face_commands(ibug, ibug_nz, kp, idx, hidden, head) -> list[tuple]:
    """Brows, eyes (sclera, iris, pupil), nose and lips for a head that faces the camera enough."""
    cmds: list[tuple] = []
    hy = head[1]
    for lo, hi in ((17, 22), (22, 27)):
        if ibug_nz[lo:hi].mean() > 0.05:
            cmds.append(("polyline", ibug[lo:hi], 0.08 * hy, "brow"))
    for side, lo in (("r", 36), ("l", 42)):
        if ibug_nz[lo : lo + 6].mean() > 0.05:
            cmds.append(("poly", ibug[lo : lo + 6], "sclera"))
            c = kp[idx[f"{side}_center_of_iris"]]
            if not hidden[idx[f"{side}_center_of_iris"]]:
                cmds.append(("disc", c, 0.075 * head[0], "iris"))
                cmds.append(("disc", kp[idx[f"{side}_center_of_pupil"]], 0.03 * head[0], "pupil"))
    if ibug_nz[27:36].mean() > -0.1:
        cmds.append(("hull", np.concatenate([ibug[27:28], ibug[30:36]]), "skin_dark", True))
        cmds.append(("polyline", ibug[27:31], 0.03 * hy, "nose_line"))
    if ibug_nz[48:60].mean() > 0.0:
        cmds.append(("poly", ibug[48:60], "lip"))
        cmds.append(("poly", ibug[60:68], "mouth"))
    return cmds
