"""COCO-format keypoint readers: COCO person keypoints (17), COCO-WholeBody (133) and Sapiens/Goliath (308).

    data = load_coco_keypoints("person_keypoints_val2017.json", image_root="val2017")
    data.scheme.name                      # "coco17" (from the keypoint count unless given)
    data.images[0].path, data.images[0].people[0].keypoints   # Path, [K, 3] float32 (x, y, v)
    print(data.summary())                 # counts, including what was skipped and why

COCO-WholeBody stores a person in five fields; they are joined in the standard 133 order
(`sapiens_lite/keypoints/coco_wholebody133.json`): `keypoints` (body 0-16), `foot_kpts` (17-22),
`face_kpts` (23-90), `lefthand_kpts` (91-111), `righthand_kpts` (112-132). A WholeBody file written
with a single 133-point `keypoints` list is read too.

Validation. Mistakes in the file (bad JSON, missing keys, a wrong keypoint count, an annotation of an
unknown image) raise `UserError` naming the file and the annotation id. Data that training should just
leave out is skipped and counted in `CocoKeypointData.skipped`:
  crowd            iscrowd = 1 (always skipped)
  no_keypoints     no labelled keypoint (v > 0); only with require_keypoints=True
  no_area          box width or height <= 0
  outside_image    box entirely outside its image
  missing_image    annotations of images whose file does not exist
  not_person       another category
With skip_invalid=False, boxes without area / outside the image and missing image files raise instead.
Boxes that stick out of their image are clipped to it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sapiens_lite.errors import UserError
from sapiens_lite.keypoints import KeypointScheme, get_scheme, scheme_for_num_keypoints

# COCO-WholeBody part fields in the 133-point order, with their point counts
WHOLEBODY_FIELDS: tuple[tuple[str, int], ...] = (
    ("keypoints", 17),
    ("foot_kpts", 6),
    ("face_kpts", 68),
    ("lefthand_kpts", 21),
    ("righthand_kpts", 21),
)
SKIP_REASONS = ("crowd", "no_keypoints", "no_area", "outside_image", "missing_image", "not_person")


@dataclass
class PersonRecord:
    """One annotated person."""

    annotation_id: int
    image_id: int
    bbox: np.ndarray  # [4] float32 x, y, w, h (clipped to the image)
    keypoints: np.ndarray  # [K, 3] float32 x, y, v (v: 0 unlabelled, 1 occluded, 2 visible)
    area: float
    category_id: int = 1
    extra: dict = field(default_factory=dict)  # WholeBody part boxes / valid flags when present

    @property
    def id(self) -> int:
        return self.annotation_id

    @property
    def num_keypoints(self) -> int:
        return int((self.keypoints[:, 2] > 0).sum())


@dataclass
class ImageRecord:
    """One image and the people kept on it (possibly none)."""

    image_id: int
    file_name: str
    path: Path
    width: int
    height: int
    people: list[PersonRecord] = field(default_factory=list)

    @property
    def id(self) -> int:
        return self.image_id


@dataclass
class CocoKeypointData:
    json_path: Path
    image_root: Path
    scheme: KeypointScheme
    images: list[ImageRecord]
    skipped: dict[str, int]  # reason -> annotations skipped (see module docstring)
    missing_images: list[str]  # file paths listed in the JSON that do not exist

    @property
    def people(self) -> list[PersonRecord]:
        return [p for img in self.images for p in img.people]

    def summary(self) -> str:
        kept = sum(len(img.people) for img in self.images)
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.items() if v) or "none"
        line = f"{self.json_path}: {len(self.images)} images, {kept} people ({self.scheme.name}); skipped: {skipped}"
        if self.missing_images:
            line += f"; {len(self.missing_images)} image files missing (e.g. {self.missing_images[0]})"
        return line


# ----------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"COCO annotation file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file (expected COCO JSON)") from None
    if not isinstance(doc, dict):
        raise UserError(
            f"{path}: expected a JSON object with 'images' and 'annotations', got {type(doc).__name__}"
        )
    for key in ("images", "annotations"):
        if not isinstance(doc.get(key), list):
            raise UserError(f"{path}: missing list {key!r} (not a COCO annotation file?)")
    return doc


def _is_wholebody(ann: dict) -> bool:
    return any(f in ann for f, _ in WHOLEBODY_FIELDS[1:])


def _raw_keypoints(ann: dict, path: Path) -> list:
    """The flat [x, y, v] * K list of an annotation (WholeBody parts joined in the 133 order)."""
    aid = ann.get("id")
    if _is_wholebody(ann):
        flat = []
        for name, k in WHOLEBODY_FIELDS:
            part = ann.get(name)
            if not isinstance(part, list) or len(part) != 3 * k:
                got = (
                    "missing"
                    if part is None
                    else f"{len(part)} values"
                    if isinstance(part, list)
                    else type(part).__name__
                )
                raise UserError(
                    f"{path}: annotation {aid}: COCO-WholeBody field {name!r} must hold {3 * k} values ({k} points), got {got}"
                )
            flat.extend(part)
        return flat
    kp = ann.get("keypoints")
    if not isinstance(kp, list):
        raise UserError(f"{path}: annotation {aid} has no 'keypoints' list")
    return kp


def _image_size(img: dict, file_path: Path) -> tuple[int, int]:
    """(width, height) from the JSON, else from the image header (0, 0 when unknown)."""
    w, h = img.get("width"), img.get("height")
    if isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0:
        return int(w), int(h)
    try:
        from PIL import Image

        with Image.open(file_path) as im:
            return im.size
    except Exception:  # unreadable or missing: no bounds check for this image
        return 0, 0


def default_image_root(json_path: str | os.PathLike) -> Path:
    """`<json dir>/images` when it exists (our synthesizer's layout), else the JSON's folder."""
    d = Path(json_path).parent
    return d / "images" if (d / "images").is_dir() else d


def load_coco_keypoints(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    scheme: str | KeypointScheme | None = None,
    *,
    skip_invalid: bool = True,
    require_keypoints: bool = True,
    check_images: bool = True,
) -> CocoKeypointData:
    """Read a COCO keypoint file (17 / WholeBody 133 / 308 points). See the module docstring.

    image_root: folder that `file_name` is relative to (default: `default_image_root(json_path)`).
    scheme: keypoint scheme name or object (default: from the keypoint count).
    skip_invalid: skip and count boxes without area / outside the image and images whose file is
      missing (what training wants); False raises UserError on the first one.
    require_keypoints: skip people with no labelled keypoint (for training).
    check_images: check that every image file exists.
    """
    path = Path(json_path)
    doc = _read_json(path)
    root = Path(image_root) if image_root is not None else default_image_root(path)

    # the keypoint count decides the scheme unless given
    anns = doc["annotations"]
    for ann in anns:
        if not isinstance(ann, dict):
            raise UserError(f"{path}: every annotation must be a JSON object, got {type(ann).__name__}")
    if isinstance(scheme, str):
        scheme = get_scheme(scheme)
    if scheme is None:
        first = next((a for a in anns if "keypoints" in a or _is_wholebody(a)), None)
        if first is None:
            scheme = get_scheme("coco17")  # no annotation to look at: images only
        else:
            n = len(_raw_keypoints(first, path))
            if n % 3:
                raise UserError(
                    f"{path}: annotation {first.get('id')}: {n} keypoint values is not a multiple of 3"
                )
            try:
                scheme = scheme_for_num_keypoints(n // 3)
            except UserError as e:  # its message lists the built-in schemes
                raise UserError(f"{path}: annotation {first.get('id')}: {e}") from None
    K = scheme.num_keypoints

    person_ids = {1}
    if isinstance(doc.get("categories"), list) and doc["categories"]:
        person_ids = {
            c.get("id") for c in doc["categories"] if isinstance(c, dict) and c.get("name") == "person"
        }
        if not person_ids:
            raise UserError(f"{path}: no category named 'person' in 'categories'")

    # images
    images: dict[int, ImageRecord] = {}
    missing: list[str] = []
    missing_ids: set = set()
    for img in doc["images"]:
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise UserError(f"{path}: every image needs 'id' and 'file_name', got {str(img)[:120]}")
        iid = img["id"]
        if iid in images:
            raise UserError(f"{path}: image id {iid} appears twice")
        fp = root / img["file_name"]
        if check_images and not fp.is_file():
            missing.append(str(fp))
            missing_ids.add(iid)
            if not skip_invalid:
                raise UserError(f"{path}: image {iid} file {fp} does not exist (image root {root})")
            continue
        w, h = _image_size(img, fp)
        images[iid] = ImageRecord(int(iid), str(img["file_name"]), fp, w, h)

    # annotations
    skipped: Counter = Counter({r: 0 for r in SKIP_REASONS})
    seen_ids: set = set()
    for ann in anns:
        aid = ann.get("id")
        where = f"{path}: annotation {aid}"
        if aid in seen_ids:
            raise UserError(f"{where}: annotation id appears twice")
        seen_ids.add(aid)
        iid = ann.get("image_id")
        if iid in missing_ids:
            skipped["missing_image"] += 1
            continue
        if iid not in images:
            raise UserError(f"{where}: image_id {iid} is not in 'images'")
        if ann.get("category_id", 1) not in person_ids:
            skipped["not_person"] += 1
            continue
        if ann.get("iscrowd", 0):
            skipped["crowd"] += 1
            continue
        raw = _raw_keypoints(ann, path)
        if len(raw) != 3 * K:
            raise UserError(
                f"{where} has {len(raw)} keypoint values; scheme {scheme.name} needs {3 * K} ({K} points)"
            )
        try:
            kp = np.asarray(raw, dtype=np.float32).reshape(K, 3)
        except (TypeError, ValueError):
            raise UserError(f"{where}: keypoints must be numbers") from None
        if not np.isfinite(kp).all():
            raise UserError(f"{where}: keypoints hold NaN or infinity")
        if require_keypoints and not (kp[:, 2] > 0).any():
            skipped["no_keypoints"] += 1
            continue

        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4:
            raise UserError(f"{where}: 'bbox' must be [x, y, w, h], got {box!r}")
        try:
            x, y, bw, bh = (float(v) for v in box)
        except (TypeError, ValueError):
            raise UserError(f"{where}: 'bbox' must hold numbers, got {box!r}") from None
        reason = None
        image = images[iid]
        if not (bw > 0 and bh > 0):
            reason = "no_area"
        elif image.width and image.height:
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + bw, float(image.width)), min(y + bh, float(image.height))
            if x1 <= x0 or y1 <= y0:
                reason = "outside_image"
            else:
                x, y, bw, bh = x0, y0, x1 - x0, y1 - y0
        if reason:
            if not skip_invalid:
                what = (
                    "has no area"
                    if reason == "no_area"
                    else f"lies outside its {image.width}x{image.height} image"
                )
                raise UserError(f"{where}: box {box} {what}")
            skipped[reason] += 1
            continue
        extra = {k: ann[k] for k in ann if k.endswith("_box") or k.endswith("_valid")}
        image.people.append(
            PersonRecord(
                annotation_id=int(aid) if aid is not None else -1,
                image_id=int(iid),
                bbox=np.array([x, y, bw, bh], np.float32),
                keypoints=kp,
                area=float(ann.get("area", bw * bh)),
                category_id=int(ann.get("category_id", 1)),
                extra=extra,
            )
        )
    return CocoKeypointData(path, root, scheme, list(images.values()), dict(skipped), missing)
