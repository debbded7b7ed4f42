"""MAE pretraining transforms: random resized crop to H x W, horizontal flip, ImageNet normalisation.

    transform = MAETransform(MAETransformConfig(size=(1024, 768)))
    x = transform(jpeg_bytes, seed)          # float32 [3, H, W], the same for the same (bytes, seed)
    decode = MAEDecode(transform)            # for build_stream: sample dict -> [3, H, W]

The crop follows torchvision's `RandomResizedCrop`: area fraction in `scale` (0.2-1.0), aspect
ratio w/h log-uniform in `ratio` (3/4-4/3), ten tries, then a centre crop clamped to `ratio`.
All randomness comes from `numpy.random.default_rng(seed)`, and the stream loader hands every
sample its own seed (`sample["__seed__"]`, fixed by the loader seed, the epoch and the sample's
place in the epoch), so a run is reproducible whatever the number of workers doing the decoding.

Decoder: PIL, chosen by measurement (bench/data_throughput.py). Against OpenCV (`cv2.imdecode`,
`IMREAD_REDUCED_COLOR_*`) and `torchvision.io.decode_jpeg` + `resized_crop(antialias=True)`, all
three on libjpeg-turbo, PIL was fastest at 224x224 (its `draft` decodes JPEGs at 1/2, 1/4 or 1/8
size in the DCT domain) and within noise of OpenCV at 1024x768, where it also crops and resizes
in one antialiased pass (`Image.resize(box=...)`); see the bench's output for the figures.
Reduced-size decoding is used when the crop is at least twice the target size in both
directions: decoding at 1/2^n then resizing is what a full decode followed by an antialiased
downscale approximates anyway, at a fraction of the cost.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class MAETransformConfig:
    size: tuple[int, int] = (1024, 768)
    """Output (H, W); Sapiens pretrains at 1024 x 768."""
    scale: tuple[float, float] = (0.2, 1.0)
    """Range of the crop's area as a fraction of the image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's aspect ratio w / h (sampled log-uniformly)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    reduced_decode: bool = True
    """Decode JPEGs at 1/2, 1/4 or 1/8 size when the crop is that much larger than the output."""

    def __post_init__(self):
        self.size = tuple(int(s) for s in self.size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (H, W) with positive ints, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {self.hflip}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean={self.mean} std={self.std}")


def random_resized_crop_params(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a numpy Generator: (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the whole image, cropped to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode_resized_crop(
    data: bytes,
    rng: np.random.Generator,
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    reduced_decode: bool = True,
) -> Image.Image:
    """Decode an encoded image and return a random resized crop of it as an RGB PIL image of `size` (H, W)."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    top, left, h, w = random_resized_crop_params(rng, width, height, scale, ratio)
    out_h, out_w = size
    factor = min(w / out_w, h / out_h)
    if reduced_decode and factor >= 2 and img.format == "JPEG":
        # PIL picks the smallest 1/2^n scale whose size is >= the request, so the crop keeps >= out pixels.
        img.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    if img.mode != "RGB":
        img = img.convert("RGB")
    sx, sy = img.size[0] / width, img.size[1] / height
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return img.resize((out_w, out_h), Image.BILINEAR, box=box)


def to_normalized_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    """RGB uint8 image -> float32 [3, H, W], (x / 255 - mean) / std in one multiply and one subtract."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # [H, W, 3]
    x = x.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)  # [3, H, W]
    mul = torch.tensor([1 / (255 * s) for s in std]).view(3, 1, 1)
    sub = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    return x.mul_(mul).sub_(sub)


class MAETransform:
    """Encoded image bytes + seed -> normalised float32 [3, H, W]."""

    def __init__(self, cfg: MAETransformConfig | None = None):
        self.cfg = cfg or MAETransformConfig()

    def __call__(self, data: bytes, seed: int) -> torch.Tensor:
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        img = decode_resized_crop(data, rng, cfg.size, cfg.scale, cfg.ratio, cfg.reduced_decode)
        if rng.random() < cfg.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img, cfg.mean, cfg.std)


def sample_image_bytes(sample: dict) -> bytes:
    """The encoded image of a webdataset sample (`jpg`, `jpeg`, `png` or `webp` member)."""
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    members = sorted(k for k in sample if not k.startswith("__"))
    raise ValueError(f"sample {sample.get('__key__')!r} has no image member (has {members})")


class MAEDecode:
    """`decode` for `build_stream`: a raw sample (with `__seed__`) -> [3, H, W]."""

    def __init__(self, transform: MAETransform | MAETransformConfig | None = None):
        if not isinstance(transform, MAETransform):
            transform = MAETransform(transform)
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> torch.Tensor:
        return self.transform(sample_image_bytes(sample), int(sample["__seed__"]))
