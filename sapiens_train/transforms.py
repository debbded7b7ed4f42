"""MAE pretraining transforms: random resized crop to H x W, horizontal flip, ImageNet normalisation.

    transform = MAETransform(MAETransformConfig(size=(1024, 768)))
    x = transform(jpeg_bytes, seed)          # float32 [3, H, W], the same for the same (bytes, seed)
    decode = MAEDecode(transform)            # for build_stream: sample dict -> [3, H, W]
    # output="uint8" gives uint8 [3, H, W] (4x fewer bytes through collate / pin / H2D);
    # then normalize_batch(x.cuda(non_blocking=True)) on the device.

The crop follows torchvision's `RandomResizedCrop`: area fraction in `scale` (0.2-1.0), aspect
ratio w/h log-uniform in `ratio` (3/4-4/3), ten tries, then a centre crop clamped to `ratio`.
All randomness comes from `numpy.random.default_rng(seed)`, and the stream loader hands every
sample its own seed (`sample["__seed__"]`, fixed by the loader seed, the epoch and the sample's
place in the epoch), so a run is reproducible whatever the number of workers doing the decoding.

Decoder, chosen by measurement (bench/data_throughput.py, one thread, 1280x960 photos, img/s for
decode + crop + flip + normalise; measured on a loaded 2-core machine, so read the ratios):

                     ours: PIL decode + OpenCV resize   PIL alone   OpenCV alone   torchvision.io
    224 x 224                 111                          102          105             96
    1024 x 768                 45                           21           29             44

PIL decodes: `Image.open` reads the size from the header before anything is decoded, so the crop
is drawn first and `draft` can decode the JPEG at 1/2, 1/4 or 1/8 size in the DCT domain whenever
the crop is at least twice the output in both directions (a full decode followed by an
antialiased shrink would end in nearly the same pixels, at a fraction of the cost). OpenCV
resizes (`INTER_AREA` when shrinking: a box filter, antialiased like PIL's; `INTER_LINEAR` when
enlarging), 5-8x faster than PIL's resize at 1024 x 768, which made "PIL alone" the slowest there.
torchvision.io ties with ours at 1024 x 768 (a second run: 33 vs 32) but has no reduced decoding,
so it loses at 224 x 224 (64 vs 81).
The crop snaps to the reduced grid (at most half a reduced pixel), a negligible change for an
augmentation. OpenCV runs one thread per process: the parallelism is the DataLoader's workers.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import cv2
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
    output: Literal["float", "uint8"] = "float"
    """"float": normalised float32 [3, H, W]. "uint8": raw uint8 [3, H, W], 4x fewer bytes to batch,
    pin and copy; normalise on the device with `normalize_batch`."""

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
        if self.output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {self.output!r}")
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
) -> np.ndarray:
    """Decode an encoded image; return a random resized crop of it: uint8 [H, W, 3] RGB of `size` (H, W)."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size  # read from the header: nothing is decoded yet
    top, left, h, w = random_resized_crop_params(rng, width, height, scale, ratio)
    out_h, out_w = size
    factor = min(w / out_w, h / out_h)
    if reduced_decode and factor >= 2 and img.format == "JPEG":
        # PIL picks the smallest 1/2^n scale whose size is >= the request, so the crop keeps >= out pixels.
        img.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    if img.mode != "RGB":
        img = img.convert("RGB")
    pixels = np.asarray(img)  # [h', w', 3], h' = height / 2^n after draft
    sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
    y0, x0 = int(round(top * sy)), int(round(left * sx))
    y1, x1 = max(y0 + 1, int(round((top + h) * sy))), max(x0 + 1, int(round((left + w) * sx)))
    crop = pixels[y0:y1, x0:x1]
    # Box filter when shrinking (antialiased, like PIL's resize), bilinear when enlarging.
    shrink = crop.shape[0] > out_h or crop.shape[1] > out_w
    return cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def to_normalized_tensor(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] = (x / 255 - mean) / std, contiguous."""
    h, w = pixels.shape[:2]
    out = torch.empty(3, h, w, dtype=torch.float32)
    for c, plane in enumerate(cv2.split(pixels)):  # planar copies beat a strided permute
        out[c].copy_(torch.from_numpy(plane))
    mul = torch.tensor([1 / (255 * s) for s in std]).view(3, 1, 1)
    sub = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    return out.mul_(mul).sub_(sub)


def normalize_batch(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [B, 3, H, W] (output="uint8", e.g. already on the GPU) -> normalised float32."""
    mul = torch.tensor([1 / (255 * s) for s in std], device=x.device).view(1, 3, 1, 1)
    sub = torch.tensor([m / s for m, s in zip(mean, std)], device=x.device).view(1, 3, 1, 1)
    return x.float().mul_(mul).sub_(sub)


_CV2_THREADS_SET_IN: int | None = None


def _single_threaded_cv2() -> None:
    """One OpenCV thread per process: the parallelism is the DataLoader workers (torch does the same).

    0, not 1: both run OpenCV's functions sequentially, but with its pthreads pool (the pip wheels')
    `setNumThreads(1)` joins the pool's threads at once, and in a forked DataLoader worker those are
    the parent's threads, which do not exist there: the worker hangs for ever whenever the parent had
    run a parallel OpenCV function before the fork (seen on a 16-core GPU machine, where rendering
    `data.synthetic` people at 1024x768 started the pool). 0 only takes effect at the next call.
    """
    global _CV2_THREADS_SET_IN
    if _CV2_THREADS_SET_IN != os.getpid():
        cv2.setNumThreads(0)
        _CV2_THREADS_SET_IN = os.getpid()


class MAETransform:
    """Encoded image bytes + seed -> normalised float32 [3, H, W]."""

    def __init__(self, cfg: MAETransformConfig | None = None):
        self.cfg = cfg or MAETransformConfig()

    def __call__(self, data: bytes, seed: int) -> torch.Tensor:
        _single_threaded_cv2()
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        pixels = decode_resized_crop(data, rng, cfg.size, cfg.scale, cfg.ratio, cfg.reduced_decode)
        if rng.random() < cfg.hflip:
            pixels = cv2.flip(pixels, 1)
        if cfg.output == "uint8":
            return torch.from_numpy(np.stack(cv2.split(pixels)))  # [3, H, W]
        return to_normalized_tensor(pixels, cfg.mean, cfg.std)


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
