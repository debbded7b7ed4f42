"""Top-down pose data: one item per person, cropped with the UDP warp, augmented, with heatmap targets.

    ds = TopDownDataset.from_coco("person_keypoints_train2017.json", "train2017/", scheme="coco17",
                                  input_size=(256, 192), sigma=2.0, train=True, seed=0)
    item = ds[0]   # img [3, H, W] float (normalised), heatmaps [K, H/4, W/4], target_weight [K],
                   # keypoints [K, 2] (input frame), visible [K], meta {center, scale, rotation, ...}

The training pipeline is the one of the Sapiens pose configs (mmpose transforms, in this order):
GetBBoxCenterScale (padding 1.25) -> RandomFlip (0.5) -> RandomHalfBody -> RandomBBoxTransform ->
TopdownAffine (UDP, aspect ratio fixed to the input's) -> PhotometricDistortion -> UDP heatmap targets.
The flip is folded into the crop's affine matrix (cropping a mirrored image with the mirrored box
gives the same pixels), so the full image is never copied. Validation/test mode (`train=False`)
only crops. Frames are those of sapiens_lite/topdown.py (image, input) and sapiens_lite/codec.py
(heatmap). Not reproduced: the Sapiens configs' Albumentations step (blur / median blur p=0.1,
one coarse-dropout hole of 20-40% of the crop).

Reproducibility: the augmentation of item i in epoch e draws from numpy's generator seeded with
(seed, e, i), so a resumed run or any number of DataLoader workers produce the same crops. Call
`set_epoch(e)` before each epoch's DataLoader is created (workers copy the dataset when they start).

Webdataset shards (sapiens_train.stream) hold KEY.jpg + KEY.json ({"annotations": [...]});
`StreamDecoder` turns such a sample into the same item (one person per sample, chosen by the
sample's seed when the image has several).

Bad input: a keypoint count that does not match the scheme is an error (UserError naming the file);
degenerate boxes (w or h <= 0, NaN: "no_area"), people without labelled keypoints (training only:
"no_keypoints"), crowd annotations and people whose image file is missing ("missing_image") are
skipped, logged once with their counts, and counted in `dataset.skipped` (reason -> count; the COCO
reader's reasons, sapiens_train.coco, are merged in). An image that exists but cannot be decoded
raises UserError naming it when its item is loaded.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from sapiens_lite import topdown
from sapiens_lite.codec import encode_heatmaps
from sapiens_lite.errors import UserError
from sapiens_lite.keypoints import KeypointScheme, get_scheme
from sapiens_lite.models.pose import HEATMAP_STRIDE
from sapiens_train.coco import _raw_keypoints, load_coco_keypoints

log = logging.getLogger(__name__)


@dataclass
class AugmentConfig:
    """Training augmentation; defaults are mmpose's as used by the Sapiens pose configs."""

    flip_prob: float = 0.5
    """Horizontal flip (keypoint channels swapped with the scheme's flip_index)."""
    half_body_prob: float = 0.3
    """Crop to the upper or lower body only (mmpose RandomHalfBody)."""
    half_body_min_total: int = 9
    """...if the person has at least this many labelled keypoints,"""
    half_body_min_upper: int = 2
    """...and the chosen half at least this many (upper) ..."""
    half_body_min_lower: int = 3
    """...or this many (lower)."""
    half_body_upper_prob: float = 0.7
    """Probability of preferring the upper half when both qualify."""
    half_body_padding: float = 1.5
    """The half-body box is the keypoints' extent times this."""
    shift_factor: float = 0.16
    """Box centre shift, a truncated normal in [-1, 1] times this times the box size (mmpose RandomBBoxTransform)."""
    shift_prob: float = 0.3
    scale_range: tuple[float, float] = (0.5, 1.5)
    """Box scale factor: truncated normal with mean and half-width from this range."""
    scale_prob: float = 1.0
    rotate_factor: float = 80.0
    """Rotation in degrees: truncated normal in [-1, 1] times this."""
    rotate_prob: float = 0.6
    photometric: bool = True
    """mmpose PhotometricDistortion: brightness +-32, contrast and saturation x[0.5, 1.5], hue +-18 (each p=0.5)."""
    bbox_padding: float = 1.25
    """The person box is enlarged by this before cropping (train and val)."""

    def __post_init__(self):
        self.scale_range = tuple(self.scale_range)
        for name in (
            "flip_prob",
            "half_body_prob",
            "half_body_upper_prob",
            "shift_prob",
            "scale_prob",
            "rotate_prob",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        if self.bbox_padding <= 0 or self.half_body_padding <= 0:
            raise ValueError("bbox_padding and half_body_padding must be positive")
        if self.shift_factor < 0 or self.rotate_factor < 0:
            raise ValueError("shift_factor and rotate_factor must be >= 0")


@dataclass
class PersonSample:
    """One annotated person: what the dataset needs from any source (COCO JSON, shards, tests)."""

    image_path: str
    bbox: np.ndarray  # [4] (x, y, w, h) in the image frame
    keypoints: np.ndarray  # [K, 3] (x, y, v) in the image frame; v = 0 unlabelled, 1 occluded, 2 visible
    image_id: int = -1
    ann_id: int = -1


@dataclass
class TargetSpec:
    """What every item is made for: crop size, heatmap sigma, normalisation, keypoint scheme."""

    scheme: KeypointScheme
    input_size: tuple[int, int] = (1024, 768)
    sigma: float = 6.0
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @property
    def heatmap_size(self) -> tuple[int, int]:
        return (self.input_size[0] // HEATMAP_STRIDE, self.input_size[1] // HEATMAP_STRIDE)


# ---- random draws ----


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of item `index` in `epoch`: independent of worker count, order and resume."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


def truncnorm(rng: np.random.Generator, size=None) -> np.ndarray:
    """Standard normal truncated to [-1, 1] (scipy truncnorm(-1, 1), as mmpose), by rejection."""
    n = int(np.prod(size)) if size is not None else 1
    out = np.empty(0)
    while out.size < n:
        x = rng.standard_normal(2 * n + 4)
        out = np.concatenate([out, x[np.abs(x) <= 1.0]])
    out = out[:n]
    return out.reshape(size) if size is not None else float(out[0])


# ---- augmentation steps (pure functions of their inputs and the generator) ----


def flip_person(kpts: np.ndarray, vis: np.ndarray, center: np.ndarray, image_width: int, flip_index):
    """Mirror keypoints [K, 2], visibility [K] and box centre in the image frame (x -> width - 1 - x)."""
    idx = np.asarray(flip_index)
    kpts = kpts[idx].copy()
    kpts[:, 0] = image_width - 1 - kpts[:, 0]
    center = center.copy()
    center[0] = image_width - 1 - center[0]
    return kpts, vis[idx].copy(), center


def half_body(
    kpts: np.ndarray, vis: np.ndarray, scheme: KeypointScheme, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | None:
    """mmpose RandomHalfBody: (center, scale) of the upper or lower body's keypoints, or None."""
    if vis.sum() < aug.half_body_min_total or rng.random() > aug.half_body_prob:
        return None
    upper = [i for i in scheme.upper_body_ids if vis[i] > 0]
    lower = [i for i in scheme.lower_body_ids if vis[i] > 0]
    prefer_upper = rng.random() < aug.half_body_upper_prob
    if len(upper) < aug.half_body_min_upper and len(lower) < aug.half_body_min_lower:
        return None
    if len(lower) < aug.half_body_min_lower:
        ids = upper
    elif len(upper) < aug.half_body_min_upper:
        ids = lower
    else:
        ids = upper if prefer_upper else lower
    sel = kpts[ids]
    center = sel.mean(axis=0)
    scale = (sel.max(axis=0) - sel.min(axis=0)) * aug.half_body_padding
    return center, scale


def random_bbox_transform(
    center: np.ndarray, scale: np.ndarray, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, float]:
    """mmpose RandomBBoxTransform: shifted centre, rescaled box, rotation in degrees."""
    offset = truncnorm(rng, (2,)) * aug.shift_factor
    if rng.random() >= aug.shift_prob:
        offset = np.zeros(2)
    lo, hi = aug.scale_range
    s = truncnorm(rng) * (hi - lo) * 0.5 + (hi + lo) * 0.5
    if rng.random() >= aug.scale_prob:
        s = 1.0
    rot = truncnorm(rng) * aug.rotate_factor
    if rng.random() >= aug.rotate_prob:
        rot = 0.0
    return center + offset * scale, scale * s, float(rot)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmpose PhotometricDistortion on an RGB uint8 crop: brightness, contrast, saturation, hue (each p=0.5)."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        x = x * contrast
    do_sat, sat = rng.random() < 0.5, rng.uniform(0.5, 1.5)
    do_hue, hue = rng.random() < 0.5, int(rng.integers(-18, 19))
    if do_sat or do_hue:
        hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + hue) % 180  # OpenCV's 8-bit hue is 0..179
        x = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if not contrast_first and contrast is not None:
        x = x * contrast
    return np.clip(x, 0, 255).astype(np.uint8)


def normalize(crop: np.ndarray, mean, std) -> torch.Tensor:
    """RGB uint8 crop [H, W, 3] -> float tensor [3, H, W], (x - mean) / std on the 0..255 scale."""
    x = (crop.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def check_pixels(source, where: str) -> None:
    """Refuse a decompression bomb before decoding it: more pixels than PIL's `Image.MAX_IMAGE_PIXELS`
    (89.5 M, the limit the MAE loader's PIL decode applies), read from the header alone. OpenCV's own
    limit is 2^30 pixels: a 20000 x 20000 single-colour PNG of 1 MiB took 13 s and 2.8 GiB to decode."""
    from PIL import Image

    try:
        with Image.open(source) as img:
            w, h = img.size
    except Image.DecompressionBombError:  # PIL's own refusal, above twice its limit
        raise UserError(f"{where}: image is over the {Image.MAX_IMAGE_PIXELS:,}-pixel limit") from None
    except Exception:
        return  # not PIL-readable: OpenCV decides (and fails with its own message)
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise UserError(f"{where}: {w}x{h} image is over the {Image.MAX_IMAGE_PIXELS:,}-pixel limit")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 [H, W, 3]; UserError naming the file if it cannot be read or is too large."""
    if os.path.isfile(path):
        check_pixels(path, str(path))
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"{path}: image missing or unreadable")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_image_bytes(data: bytes, where: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] from encoded bytes; UserError (the stream skips the sample) if undecodable or
    over the pixel limit."""
    check_pixels(io.BytesIO(data), where)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"{where}: image bytes could not be decoded")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# ---- one person -> one training item ----


def make_item(
    img: np.ndarray,
    person: PersonSample,
    spec: TargetSpec,
    aug: AugmentConfig | None,
    rng: np.random.Generator | None,
    encode_targets: bool = True,
) -> dict:
    """Crop, augment (when `aug` and `rng` are given) and encode one person.

    img: RGB uint8 [H0, W0, 3] in the image frame. Returns img [3, H, W] float (normalised),
    keypoints [K, 2] (input frame, after flip/channel swap), visible [K], meta (center, scale,
    rotation of the crop in the image frame, bbox, ids, flip flag) and, with `encode_targets`,
    heatmaps [K, h, w] and target_weight [K] (codec.encode_heatmaps).
    """
    H, W = spec.input_size
    padding = aug.bbox_padding if aug is not None else topdown.BBOX_PADDING
    center, scale = topdown.bbox_xywh_to_center_scale(person.bbox, aspect_ratio=None, padding=padding)
    kpts = person.keypoints[:, :2].astype(np.float64)
    vis = (person.keypoints[:, 2] > 0).astype(np.float32)
    pre = None  # image-frame affine applied before the crop (the flip)
    flipped, rot = False, 0.0
    if aug is not None and rng is not None:
        if rng.random() < aug.flip_prob:
            flipped = True
            kpts, vis, center = flip_person(kpts, vis, center, img.shape[1], spec.scheme.flip_index)
            pre = topdown.hflip_matrix(img.shape[1])
        half = half_body(kpts, vis, spec.scheme, aug, rng)
        if half is not None:
            center, scale = half
        center, scale, rot = random_bbox_transform(center, scale, aug, rng)
    scale = topdown.fix_aspect_ratio(scale, W / H)
    m = topdown.get_udp_warp_matrix(center, scale, rot, output_size=(W, H))  # (flipped) image -> input
    crop = topdown.warp_image(img, m if pre is None else topdown.compose_affine(m, pre), spec.input_size)
    kpts_in = topdown.transform_points(kpts, m)  # [K, 2] input frame
    if aug is not None and rng is not None and aug.photometric:
        crop = photometric_distortion(crop, rng)

    item = {
        "img": normalize(crop, spec.mean, spec.std),  # [3, H, W]
        "keypoints": torch.from_numpy(kpts_in).float(),  # [K, 2] input frame
        "visible": torch.from_numpy(vis),  # [K] 1 where labelled
        "meta": {
            "center": torch.from_numpy(center.astype(np.float64)),
            "scale": torch.from_numpy(scale.astype(np.float64)),
            "rotation": float(rot),
            "flipped": flipped,
            "bbox": torch.from_numpy(np.asarray(person.bbox, np.float64)),
            "image_id": int(person.image_id),
            "ann_id": int(person.ann_id),
            "image_path": str(person.image_path),
        },
    }
    if encode_targets:
        # Targets may instead be made on the GPU from keypoints/visible (codec.encode_heatmaps is
        # batched): 308 x 256 x 192 float heatmaps are 60 MB per person to ship from the workers.
        item["heatmaps"], item["target_weight"] = encode_heatmaps(
            item["keypoints"], item["visible"], spec.input_size, spec.heatmap_size, spec.sigma
        )  # [K, h, w], [K]
    return item


# ---- sources ----


def validate_people(
    people: Sequence[PersonSample],
    num_keypoints: int,
    *,
    source: str,
    train: bool,
    check_files: bool = True,
) -> tuple[list[PersonSample], Counter]:
    """Keep the usable people; UserError on a wrong keypoint count; counted skips for the rest."""
    kept, skipped = [], Counter()
    exists: dict[str, bool] = {}
    for p in people:
        kp = np.asarray(p.keypoints)
        if kp.ndim != 2 or kp.shape[1] != 3 or kp.shape[0] != num_keypoints:
            raise UserError(
                f"{source}: annotation {p.ann_id} (image {p.image_id}) has keypoints of shape {tuple(kp.shape)}, "
                f"expected ({num_keypoints}, 3) for this keypoint scheme"
            )
        b = np.asarray(p.bbox, dtype=np.float64).reshape(-1)
        if b.shape != (4,) or not np.all(np.isfinite(b)) or b[2] <= 0 or b[3] <= 0:
            skipped["no_area"] += 1
            continue
        if not np.all(np.isfinite(kp)):
            skipped["nonfinite_keypoints"] += 1
            continue
        if train and not np.any(kp[:, 2] > 0):
            skipped["no_keypoints"] += 1
            continue
        if check_files:
            if p.image_path not in exists:
                exists[p.image_path] = os.path.isfile(p.image_path)
            if not exists[p.image_path]:
                skipped["missing_image"] += 1
                continue
        kept.append(p)
    if skipped:
        log.warning("%s: skipped %d people (%s)", source, sum(skipped.values()), dict(skipped))
    return kept, skipped


class TopDownDataset(torch.utils.data.Dataset):
    """Map-style dataset with one item per annotated person (see the module docstring)."""

    def __init__(
        self,
        people: Sequence[PersonSample],
        spec: TargetSpec,
        *,
        train: bool = True,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        source: str = "dataset",
        check_files: bool = True,
        encode_targets: bool = True,
        image_loader: Callable[[str], np.ndarray] = load_image,
    ):
        self.spec = spec
        self.encode_targets = encode_targets
        self.train = train
        self.augment = (augment or AugmentConfig()) if train else None
        self.seed = seed
        self.epoch = 0
        self.image_loader = image_loader
        self.people, self.skipped = validate_people(
            people, spec.scheme.num_keypoints, source=source, train=train, check_files=check_files
        )
        if not self.people:
            raise UserError(f"{source}: no usable people (skipped: {dict(self.skipped) or 'none given'})")

    @classmethod
    def from_coco(
        cls,
        json_path: str | os.PathLike,
        image_root: str | os.PathLike | None,
        *,
        scheme: str,
        input_size: tuple[int, int] = (1024, 768),
        sigma: float = 6.0,
        mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375),
        train: bool = True,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> TopDownDataset:
        data = load_coco_keypoints(json_path, image_root, scheme, require_keypoints=train)
        people = [
            PersonSample(str(img.path), p.bbox, p.keypoints, image_id=img.image_id, ann_id=p.annotation_id)
            for img in data.images
            for p in img.people
        ]
        spec = TargetSpec(data.scheme, tuple(input_size), sigma, tuple(mean), tuple(std))
        ds = cls(
            people, spec, train=train, augment=augment, seed=seed, source=str(json_path), check_files=False
        )
        ds.skipped.update({reason: n for reason, n in data.skipped.items() if n})
        if any(data.skipped.values()):
            log.warning("%s", data.summary())
        return ds

    @classmethod
    def from_config(cls, cfg, split: str = "train") -> TopDownDataset:
        """From a `finetune.config.FinetuneConfig`: split "train" (augmented) or "val" (crop only)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        d, m = cfg.data, cfg.model
        ann, images = (d.train_ann, d.train_images) if split == "train" else (d.val_ann, d.val_images)
        if split == "train" and not ann and d.train_shards:
            raise UserError("data.train_shards is a stream: build it with finetune.data.build_pose_stream")
        if not ann:
            raise UserError(f"data.{split}_ann is not set")
        return cls.from_coco(
            ann,
            images or None,
            scheme=m.scheme,
            input_size=m.input_size,
            sigma=m.sigma,
            mean=m.mean,
            std=m.std,
            train=split == "train",
            augment=d.augment,
            seed=cfg.engine.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.people)

    def __getitem__(self, index: int) -> dict:
        person = self.people[index]
        img = self.image_loader(person.image_path)
        rng = item_rng(self.seed, self.epoch, index) if self.train else None
        return make_item(img, person, self.spec, self.augment, rng, self.encode_targets)


# ---- webdataset shards ----


@dataclass
class StreamDecoder:
    """`decode` for `sapiens_train.stream.build_stream`: a KEY.jpg + KEY.json sample -> one item.

    The JSON holds {"annotations": [{"bbox": [x, y, w, h], "keypoints": [...], "id": ...}, ...]}
    (COCO fields; "image_id" optional). One usable person is taken per sample, chosen by the
    sample's `__seed__` when there are several; samples without one return None (the stream counts
    them as skipped). Augmentation draws from `__seed__` too, so resumed streams repeat exactly.
    """

    spec: TargetSpec
    train: bool = True
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    image_key: str = "jpg"
    encode_targets: bool = True

    def __call__(self, sample: dict) -> dict | None:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        if "json" not in sample or self.image_key not in sample:
            raise UserError(f"{where}: sample needs .{self.image_key} and .json members")
        info = json.loads(sample["json"])
        anns = info.get("annotations", []) if isinstance(info, dict) else []
        people = []
        for ann in anns:
            if ann.get("iscrowd", 0):
                continue
            flat = _raw_keypoints(ann, where)  # COCO-WholeBody parts joined in the 133 order
            if len(flat) % 3:
                raise UserError(f"{where}: annotation {ann.get('id')} has {len(flat)} keypoint values")
            people.append(
                PersonSample(
                    image_path=where,
                    bbox=np.asarray(ann.get("bbox", [np.nan] * 4), dtype=np.float64),
                    keypoints=np.asarray(flat, dtype=np.float64).reshape(-1, 3),
                    image_id=int(ann.get("image_id", info.get("image_id", -1))),
                    ann_id=int(ann.get("id", -1)),
                )
            )
        people, _ = validate_people(
            people, self.spec.scheme.num_keypoints, source=where, train=self.train, check_files=False
        )
        if not people:
            return None
        seed = int(sample.get("__seed__", 0))
        rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF])
        person = people[int(rng.integers(len(people)))]
        img = decode_image_bytes(sample[self.image_key], where)
        if not self.train:
            return make_item(img, person, self.spec, None, None, self.encode_targets)
        return make_item(img, person, self.spec, self.augment, rng, self.encode_targets)


def build_pose_stream(cfg, *, image_key: str = "jpg", encode_targets: bool = True, **kwargs):
    """The webdataset stream of `cfg.data.train_shards` for a `FinetuneConfig` (wds injected).

    Extra keywords go to `sapiens_train.stream.build_stream` (rank, world_size, mode, ...).
    """
    from sapiens_train.stream import build_stream

    m = cfg.model
    spec = TargetSpec(get_scheme(m.scheme), tuple(m.input_size), m.sigma, tuple(m.mean), tuple(m.std))
    decode = StreamDecoder(
        spec, train=True, augment=cfg.data.augment, image_key=image_key, encode_targets=encode_targets
    )
    return build_stream(
        cfg.data.train_shards,
        decode=decode,
        batch_size=cfg.engine.micro_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.engine.seed,
        **kwargs,
    )
