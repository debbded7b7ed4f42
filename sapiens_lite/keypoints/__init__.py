"""Keypoint schemes: the built-in COCO-17, COCO-WholeBody-133 and Sapiens/Goliath-308, or your own JSON file.

    get_scheme("coco17")                       # a built-in name (or an alias: "coco", "wholebody", "goliath")
    get_scheme("configs/keypoints/hand5.json") # a scheme file: a new keypoint scheme is one JSON file

A scheme is data: a JSON object with the fields of `KeypointScheme` (the built-in ones are the JSON
files next to this module, converted from the public dataset definitions):

    names            K unique keypoint names; the channel order of a pose model's heatmaps
    flip_index       K ints: channel i of a mirrored image is channel flip_index[i] of the original
                     (a permutation that is its own inverse: left <-> right, midline points map to themselves)
    sigmas           K positive OKS sigmas (COCO keypoint AP)
    joint_weights    K loss weights (default 1.0 each)
    keypoint_types   K of "upper" / "lower" / "" for half-body augmentation (default "": none)
    keypoint_colors  K RGB triples for drawing (default orange)
    skeleton         [a, b] index pairs to draw as limbs (default none)
    skeleton_colors  one RGB triple per limb (default green)
    parts            {"body": [indices], "foot": [...], ...}: groups of keypoints that get their own OKS AP
                     in evaluation (default none; see README.md next to this module)
    scheme           optional display name (default: the file name without .json)
    num_keypoints    optional, checked against len(names)

A bad file is a `UserError` naming the file and the field. `get_scheme` returns a frozen
`KeypointScheme`. A pose model saved with a scheme file carries the full definition in its config.json
(`KeypointScheme.to_dict`); loading it registers that definition under the name its config uses
(`register_scheme`), so the model loads anywhere, without the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
KEYPOINT_TYPES = ("upper", "lower", "")
DEFAULT_KEYPOINT_COLOR = (255, 128, 0)
DEFAULT_SKELETON_COLOR = (0, 255, 0)


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
    # Named groups of keypoints that get their own AP (COCO-WholeBody's body / foot / face / lefthand /
    # righthand); empty when the JSON has no "parts". The AP over all keypoints is always reported.
    parts: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict, hash=False)

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

    def to_dict(self) -> dict:
        """The JSON form (a scheme file's fields); `scheme_from_dict` reads it back to an equal scheme."""
        return {
            "scheme": self.name,
            "num_keypoints": self.num_keypoints,
            "names": list(self.names),
            "flip_index": list(self.flip_index),
            "sigmas": list(self.sigmas),
            "joint_weights": list(self.joint_weights),
            "keypoint_types": list(self.keypoint_types),
            "keypoint_colors": [list(c) for c in self.keypoint_colors],
            "skeleton": [list(p) for p in self.skeleton],
            "skeleton_colors": [list(c) for c in self.skeleton_colors],
            "parts": {part: list(ids) for part, ids in self.parts.items()},
        }


# ---- reading and checking a definition ----


def scheme_from_dict(d: dict, source: str, default_name: str = "custom") -> KeypointScheme:
    """Check a scheme definition (a scheme file's JSON object) and build the `KeypointScheme`.

    Every problem is a UserError "{source}: {field}: ...".
    """

    def bad(field: str, problem: str):
        return UserError(f"{source}: {field}: {problem}")

    if not isinstance(d, dict):
        raise UserError(f"{source}: expected a JSON object with the fields of a keypoint scheme")
    known = {"scheme", "num_keypoints", *(f.name for f in dataclasses.fields(KeypointScheme))} - {"name"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise bad(unknown[0], f"unknown field; valid fields: {', '.join(sorted(known))}")
    for field in ("names", "flip_index", "sigmas"):
        if field not in d:
            raise bad(field, "missing (names, flip_index and sigmas are required)")

    name = d.get("scheme", default_name)
    if not isinstance(name, str) or not name:
        raise bad("scheme", f"expected a non-empty name, got {name!r}")
    names = d["names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise bad("names", "expected a non-empty list of keypoint names")
    k = len(names)
    if len(set(names)) != k:
        dup = next(n for n in names if names.count(n) > 1)
        raise bad("names", f"{dup!r} appears more than once")
    if "num_keypoints" in d and d["num_keypoints"] != k:
        raise bad("num_keypoints", f"{d['num_keypoints']!r}, but names has {k} entries")

    def per_keypoint(field: str, default, check, what: str) -> list:
        values = d.get(field, [default] * k)
        if not isinstance(values, list) or len(values) != k:
            n = len(values) if isinstance(values, list) else "not a list"
            raise bad(field, f"expected {k} entries (one per name), got {n}")
        for i, v in enumerate(values):
            if not check(v):
                raise bad(field, f"entry {i} ({names[i]}) is {v!r}; expected {what}")
        return values

    flip = per_keypoint("flip_index", None, lambda v: _is_int(v) and 0 <= v < k, f"an index in [0, {k})")
    if sorted(flip) != list(range(k)):
        missing = sorted(set(range(k)) - set(flip))
        raise bad("flip_index", f"not a permutation: index {missing[0]} never appears")
    for i, j in enumerate(flip):
        if flip[j] != i:
            raise bad(
                "flip_index",
                f"{names[i]} -> {names[j]} but {names[j]} -> {names[flip[j]]}; flipping twice must give "
                "the keypoint back (pairs swap, midline points map to themselves)",
            )
    sigmas = per_keypoint("sigmas", None, lambda v: _is_number(v) and v > 0, "a positive number")
    weights = per_keypoint("joint_weights", 1.0, lambda v: _is_number(v) and v >= 0, "a number >= 0")
    types = per_keypoint("keypoint_types", "", lambda v: v in KEYPOINT_TYPES, '"upper", "lower" or ""')
    colors = per_keypoint("keypoint_colors", list(DEFAULT_KEYPOINT_COLOR), _is_rgb, "[r, g, b] in 0..255")

    skeleton = d.get("skeleton", [])
    if not isinstance(skeleton, list):
        raise bad("skeleton", "expected a list of [a, b] index pairs")
    for e, pair in enumerate(skeleton):
        ok = isinstance(pair, list) and len(pair) == 2 and all(_is_int(v) and 0 <= v < k for v in pair)
        if not ok or pair[0] == pair[1]:
            raise bad(
                "skeleton", f"entry {e} is {pair!r}; expected [a, b], two different indices in [0, {k})"
            )
    limb_colors = d.get("skeleton_colors", [list(DEFAULT_SKELETON_COLOR)] * len(skeleton))
    if not isinstance(limb_colors, list) or len(limb_colors) != len(skeleton):
        n = len(limb_colors) if isinstance(limb_colors, list) else "not a list"
        raise bad("skeleton_colors", f"expected {len(skeleton)} entries (one per limb), got {n}")
    for e, c in enumerate(limb_colors):
        if not _is_rgb(c):
            raise bad("skeleton_colors", f"entry {e} is {c!r}; expected [r, g, b] in 0..255")

    parts = d.get("parts", {})
    if not isinstance(parts, dict):
        raise bad("parts", 'expected {"part name": [keypoint indices], ...}')
    for part, ids in parts.items():
        ok = isinstance(ids, list) and ids and all(_is_int(v) and 0 <= v < k for v in ids)
        if not ok or len(set(ids)) != len(ids):
            raise bad(
                "parts", f"{part!r} is {ids!r}; expected a non-empty list of distinct indices in [0, {k})"
            )

    return KeypointScheme(
        name=name,
        names=tuple(names),
        flip_index=tuple(flip),
        skeleton=tuple(tuple(p) for p in skeleton),
        skeleton_colors=tuple(tuple(c) for c in limb_colors),
        keypoint_colors=tuple(tuple(c) for c in colors),
        keypoint_types=tuple(types),
        sigmas=tuple(float(s) for s in sigmas),
        joint_weights=tuple(float(w) for w in weights),
        parts={part: tuple(ids) for part, ids in parts.items()},
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_rgb(c) -> bool:
    return isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c)


def read_scheme_file(path: str | os.PathLike) -> KeypointScheme:
    """Read and check a scheme JSON file (its name: the "scheme" field, else the file name)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: keypoint scheme file not found")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return scheme_from_dict(d, str(path), default_name=path.stem)


# ---- lookup: built-in names, registered definitions, files ----

# Definitions that came with a checkpoint (`register_scheme`), under the string its config uses.
_REGISTERED: dict[str, KeypointScheme] = {}


def is_builtin(name: str) -> bool:
    return ALIASES.get(name, name) in SCHEME_FILES


@cache
def _builtin(name: str) -> KeypointScheme:
    return read_scheme_file(_DIR / SCHEME_FILES[name])


@cache
def _file(resolved: str, mtime_ns: int, size: int) -> KeypointScheme:
    return read_scheme_file(resolved)  # cached per file version: an edited file is read again


def _looks_like_path(name: str) -> bool:
    return name.endswith(".json") or "/" in name or os.sep in name


def get_scheme(name: str | os.PathLike) -> KeypointScheme:
    """The scheme `name` stands for: a built-in name or alias ("coco17", "coco_wholebody133",
    "goliath308", "wholebody", ...), a definition registered from a checkpoint, or a scheme JSON file.

    A registered definition wins over a file at the same path: a loaded model keeps the scheme it was
    trained with even if the file was edited or deleted since.
    """
    name = os.fspath(name)
    if is_builtin(name):
        return _builtin(ALIASES.get(name, name))
    if name in _REGISTERED:
        return _REGISTERED[name]
    if _looks_like_path(name) or Path(name).is_file():
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"{name}: keypoint scheme file not found")
        st = path.stat()
        return _file(str(path.resolve()), st.st_mtime_ns, st.st_size)
    choices = sorted(SCHEME_FILES) + sorted(ALIASES)
    raise UserError(
        f"unknown keypoint scheme {name!r}; choose one of: {', '.join(choices)}, or give the path of a "
        "scheme JSON file"
    )


def canonical_name(name: str) -> str:
    """The built-in name for a name or alias; a scheme file path or registered name as given (checked)."""
    get_scheme(name)  # UserError if unknown or a bad file
    return ALIASES.get(name, name)


def register_scheme(name: str, definition: dict, source: str) -> KeypointScheme:
    """Make `get_scheme(name)` return the scheme defined by `definition` (a `KeypointScheme.to_dict()`).

    Used when a checkpoint carries its scheme's definition, so that its config's `scheme` (often the
    path of a file that is not there) resolves. Registering the same definition again is a no-op;
    another definition under the same name, or a built-in name, is a UserError naming `source`.
    """
    scheme = scheme_from_dict(definition, source)
    if is_builtin(name):
        if scheme != get_scheme(name):
            raise UserError(f"{source}: defines keypoint scheme {name!r} unlike the built-in one")
        return scheme
    known = _REGISTERED.get(name)
    if known is not None and known != scheme:
        raise UserError(
            f"{source}: keypoint scheme {name!r} is already defined differently in this process "
            "(by another checkpoint); give one of them another scheme name"
        )
    _REGISTERED[name] = scheme
    return scheme


def builtin_schemes() -> list[KeypointScheme]:
    return [_builtin(name) for name in SCHEME_FILES]


def scheme_for_num_keypoints(k: int) -> KeypointScheme:
    """The built-in scheme with `k` keypoints."""
    for s in builtin_schemes():
        if s.num_keypoints == k:
            return s
    known = ", ".join(f"{s.num_keypoints} ({s.name})" for s in builtin_schemes())
    raise UserError(
        f"no built-in keypoint scheme has {k} keypoints (built-in: {known}); give the scheme explicitly "
        "(a scheme JSON file for your own keypoints)"
    )
