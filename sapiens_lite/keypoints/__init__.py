"""Keypoint schemes: COCO-17, COCO-WholeBody-133 and Sapiens/Goliath-308.

The definitions are data (JSON files next to this module, converted from the public dataset
definitions). `get_scheme(name)` returns a frozen `KeypointScheme`; the channel order of a pose
model's heatmaps is the order of `scheme.names`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sapiens_lite.errors import UserError

_DIR = Path(__file__).parent

# name -> JSON file. Aliases let users write the short or the dataset name.
SCHEME_FILES: dict[str, str] = {
    "coco17": "coco17.json",
    "coco_wholebody133": "coco_wholebody133.json",
    "goliath308": "goliath308.json",
}
ALIASES: dict[str, str] = {
    "coco": "coco17",
    "wholebody133": "coco_wholebody133",
    "coco_wholebody": "coco_wholebody133",
    "wholebody": "coco_wholebody133",
    "goliath": "goliath308",
    "sapiens308": "goliath308",
}


@dataclass(frozen=True)
class KeypointScheme:
    name: str
    names: tuple[str, ...]
    flip_index: tuple[int, ...]  # channel i of a flipped image is channel flip_index[i] of the original
    skeleton: tuple[tuple[int, int], ...]
    skeleton_colors: tuple[tuple[int, int, int], ...]  # RGB
    keypoint_colors: tuple[tuple[int, int, int], ...]  # RGB
    keypoint_types: tuple[str, ...]  # "upper" / "lower" (used by half-body augmentation)
    sigmas: tuple[float, ...]  # OKS per-keypoint sigmas
    joint_weights: tuple[float, ...]

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UserError(f"keypoint {name!r} is not in scheme {self.name!r}") from None

    def indices(self, names) -> list[int]:
        return [self.index(n) for n in names]

    @property
    def upper_body_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.keypoint_types) if t == "upper"]

    @property
    def lower_body_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.keypoint_types) if t == "lower"]


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in SCHEME_FILES:
        choices = sorted(SCHEME_FILES) + sorted(ALIASES)
        raise UserError(f"unknown keypoint scheme {name!r}; choose one of: {', '.join(choices)}")
    return name


@cache
def get_scheme(name: str) -> KeypointScheme:
    """Return the scheme called `name` (e.g. "coco17", "coco_wholebody133", "goliath308")."""
    name = canonical_name(name)
    d = json.loads((_DIR / SCHEME_FILES[name]).read_text())
    k = d["num_keypoints"]
    for field in ("names", "flip_index", "keypoint_colors", "keypoint_types", "sigmas", "joint_weights"):
        assert len(d[field]) == k, f"{SCHEME_FILES[name]}: {field} has {len(d[field])} entries, expected {k}"
    return KeypointScheme(
        name=name,
        names=tuple(d["names"]),
        flip_index=tuple(d["flip_index"]),
        skeleton=tuple(tuple(p) for p in d["skeleton"]),
        skeleton_colors=tuple(tuple(c) for c in d["skeleton_colors"]),
        keypoint_colors=tuple(tuple(c) for c in d["keypoint_colors"]),
        keypoint_types=tuple(d["keypoint_types"]),
        sigmas=tuple(float(s) for s in d["sigmas"]),
        joint_weights=tuple(float(w) for w in d["joint_weights"]),
    )


def scheme_for_num_keypoints(k: int) -> KeypointScheme:
    """The scheme with `k` keypoints (17, 133 or 308)."""
    for name in SCHEME_FILES:
        s = get_scheme(name)
        if s.num_keypoints == k:
            return s
    raise UserError(f"no keypoint scheme has {k} keypoints (supported: 17, 133, 308)")
