"""MAE transforms: shapes, seeded determinism, crop statistics, flip, normalisation, reduced decoding."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sapiens_train.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAEDecode,
    MAETransform,
    MAETransformConfig,
    normalize_batch,
    random_resized_crop_params,
)


def jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def smooth_image(h: int = 240, w: int = 320, period: float = 1.0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / period
    r = 127 + 120 * np.sin(x / 23.0)
    g = 127 + 120 * np.cos(y / 17.0)
    b = 127 + 120 * np.sin((x + y) / 31.0)
    return np.stack([r, g, b], -1).astype(np.uint8)


def test_shape_dtype_and_determinism():
    data = jpeg(smooth_image())
    t = MAETransform(MAETransformConfig(size=(64, 48)))
    a, b, c = t(data, 7), t(data, 7), t(data, 8)
    assert a.shape == (3, 64, 48) and a.dtype == torch.float32 and a.is_contiguous()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_crop_params_follow_torchvision_rules():
    from torchvision.transforms import RandomResizedCrop

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    ours, theirs = [], []
    for _ in range(4000):
        top, left, h, w = random_resized_crop_params(rng, 400, 300, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and 0 <= left and top + h <= 300 and left + w <= 400 and h > 0 and w > 0
        ours.append((h * w / (400 * 300), math.log(w / h)))
        _, _, h, w = RandomResizedCrop.get_params(Image.new("RGB", (400, 300)), (0.2, 1.0), (3 / 4, 4 / 3))
        theirs.append((h * w / (400 * 300), math.log(w / h)))
    ours, theirs = np.array(ours), np.array(theirs)
    assert ours[:, 0].min() >= 0.19 and ours[:, 0].max() <= 1.0
    assert np.exp(ours[:, 1]).min() >= 0.74 and np.exp(ours[:, 1]).max() <= 1.35
    # Same distribution as torchvision's (standard errors of these means are about 0.004).
    np.testing.assert_allclose(ours.mean(0), theirs.mean(0), atol=0.02)
    np.testing.assert_allclose(ours.std(0), theirs.std(0), atol=0.02)


def test_crop_params_fallback_is_a_centre_crop():
    rng = np.random.default_rng(0)
    # A very wide image: no crop of ratio <= 4/3 with area >= 0.9 fits, so the fallback applies.
    top, left, h, w = random_resized_crop_params(rng, 1000, 100, (0.9, 1.0), (3 / 4, 4 / 3))
    assert (top, h) == (0, 100) and w == round(100 * 4 / 3) and left == (1000 - w) // 2


def test_normalisation_of_a_flat_colour():
    color = (200, 100, 30)
    data = jpeg(np.full((64, 64, 3), color, np.uint8), quality=100)
    x = MAETransform(MAETransformConfig(size=(16, 16)))(data, 0)
    for ch in range(3):
        expected = (color[ch] / 255 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
        assert abs(x[ch].mean().item() - expected) < 3 / 255 / IMAGENET_STD[ch]


def test_flip_mirrors_the_same_crop():
    data = jpeg(smooth_image())
    plain = MAETransform(MAETransformConfig(size=(32, 24), hflip=0.0))(data, 3)
    flipped = MAETransform(MAETransformConfig(size=(32, 24), hflip=1.0))(data, 3)
    torch.testing.assert_close(flipped, plain.flip(-1))


def test_reduced_decoding_is_close_to_a_full_decode(monkeypatch):
    from PIL import JpegImagePlugin

    scales = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = draft(self, mode, size)
        scales.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = jpeg(smooth_image(960, 1280, period=8.0))
    cfg = dict(size=(64, 48), scale=(0.9, 1.0))
    fast = MAETransform(MAETransformConfig(**cfg))(data, 1)
    assert scales == [(160, 120)]  # decoded at 1/8: the crop (>= 0.9 of the image) is >= 8x the output
    full = MAETransform(MAETransformConfig(**cfg, reduced_decode=False))(data, 1)
    assert len(scales) == 1
    # Same crop, decoded at 1/8 size (the crop snaps to that grid): a smooth image barely changes
    # (values are in std units).
    assert (fast - full).abs().mean().item() < 0.05


def test_png_and_grey_images():
    grey = Image.fromarray(smooth_image()[..., 0])
    buf = io.BytesIO()
    grey.save(buf, "PNG")
    x = MAETransform(MAETransformConfig(size=(20, 30)))(buf.getvalue(), 0)
    assert x.shape == (3, 20, 30)
    torch.testing.assert_close(
        x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0], x[1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]
    )


def test_decode_for_the_stream():
    data = jpeg(smooth_image())
    decode = MAEDecode(MAETransformConfig(size=(16, 16)))
    x = decode({"__key__": "k", "jpg": data, "__seed__": 5})
    assert torch.equal(x, MAETransform(MAETransformConfig(size=(16, 16)))(data, 5))
    with pytest.raises(ValueError, match="no image member"):
        decode({"__key__": "k", "json": b"{}", "__seed__": 1})


def test_uint8_output_normalises_to_the_float_output():
    data = jpeg(smooth_image())
    x = MAETransform(MAETransformConfig(size=(32, 24)))(data, 4)
    raw = MAETransform(MAETransformConfig(size=(32, 24), output="uint8"))(data, 4)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 24)
    torch.testing.assert_close(normalize_batch(raw[None])[0], x)


def test_config_validation():
    with pytest.raises(ValueError, match="scale"):
        MAETransformConfig(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hflip"):
        MAETransformConfig(hflip=2.0)
    with pytest.raises(ValueError, match="size"):
        MAETransformConfig(size=(0, 10))
    assert math.isclose(MAETransformConfig().ratio[1], 4 / 3)


_FORKED_WORKER_SCRIPT = r"""
import io, sys
import cv2, numpy as np, torch
from PIL import Image
from sapiens_train.transforms import MAETransform, MAETransformConfig

# The parent runs a parallel OpenCV function first, as rendering data.synthetic people at 1024x768 does:
# this starts OpenCV's thread pool, whose threads a forked DataLoader worker does not inherit.
big = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
for _ in range(3):
    cv2.GaussianBlur(big, (15, 15), 3)
    cv2.resize(big, (1000, 1000), interpolation=cv2.INTER_AREA)
buf = io.BytesIO()
Image.fromarray(big[:240, :320]).save(buf, "PNG")
data = buf.getvalue()
transform = MAETransform(MAETransformConfig(size=(64, 48)))

class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return transform(data, i)

ctx = torch.multiprocessing.get_context("fork")
loader = torch.utils.data.DataLoader(Images(), batch_size=2, num_workers=2, multiprocessing_context=ctx)
print([tuple(b.shape) for b in loader])
"""


def test_forked_loader_workers_do_not_hang_after_the_parent_used_opencv_threads(tmp_path):
    """MAETransform in forked DataLoader workers of a process that had started OpenCV's thread pool.

    cv2.setNumThreads(1) in such a worker waits for ever on the parent's pool threads (a 2b pretraining
    on synthetic data hung at its first step on a 16-core GPU machine); it must finish in seconds.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "OPENCV_FOR_THREADS_NUM": "4"}  # a pool of several threads on any machine
    try:
        out = subprocess.run(
            [sys.executable, "-c", _FORKED_WORKER_SCRIPT],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("forked DataLoader workers running MAETransform hung (OpenCV thread pool after fork)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[(2, 3, 64, 48), (2, 3, 64, 48)]"
