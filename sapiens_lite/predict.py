"""Batched top-down prediction: person crops -> keypoints in image pixels. One path for everything.

    instances = [Instance(image_id=1, file_name="a.jpg", bbox=(x, y, w, h))]
    kpts, scores, ok = predict_instances(model, instances, "images/", flip_test=True, batch_size=32)
    # kpts [N, K, 2] image pixels, scores [N, K], ok [N] (False: the image was missing or unreadable)

    crops, centers, scales = crop_batch(image_rgb, boxes_xywh, model.config.input_size)
    kpts, scores = predict_crops(model, crops, centers, scales, flip_test=False)   # torch, [B, K, 2], [B, K]

In run order: each box is cut out of its image with the UDP warp of `sapiens_lite.topdown` (box ->
center/scale with 1.25 padding and the input's aspect ratio; `crop_batch`), the model runs on a batch
of crops (`predict_crops`: normalise, `model.predict` with optional flip test), `sapiens_lite.codec`
decodes the heatmaps (argmax + DARK-UDP) and the keypoints go back to the image (`crops_to_image`,
batched torch on the model's device). Evaluation (`predict_instances`, over image files),
`sapiens_lite.estimator.PoseEstimator` (over images in memory, videos) and distillation all call
`predict_crops`.

`model` is anything with `config.input_size`, `config.mean`, `config.std`, `scheme` and
`predict(x, flip_test=)`: a `PoseModel`, or an exported program loaded by `sapiens_lite.export`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sapiens_lite import codec, topdown


@dataclass
class Instance:
    """One person box to run the model on; `ann_index` links it to its GT annotation (GT boxes only)."""

    image_id: int
    file_name: str
    bbox: tuple[float, float, float, float]  # x, y, w, h in image pixels
    score: float = 1.0
    ann_index: int | None = None


# ---- crops -----------------------------------------------------------------------------------------


def crop_batch(
    image: np.ndarray, boxes_xywh, input_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops of the boxes [N, 4] (x, y, w, h) of one RGB image [H0, W0, 3] uint8.

    Returns crops [N, H, W, 3] uint8, centers [N, 2] and scales [N, 2] (image pixels, see topdown.py).
    """
    h, w = input_size
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    crops = np.empty((len(boxes), h, w, 3), np.uint8)
    centers = np.empty((len(boxes), 2))
    scales = np.empty((len(boxes), 2))
    for i, box in enumerate(boxes):
        crops[i], _, centers[i], scales[i] = topdown.crop_person(image, box, input_size)
    return crops, centers, scales


class CropDataset(torch.utils.data.Dataset):
    """Map-style dataset of person crops read from image files (UDP warp, no augmentation).

    A missing or unreadable image yields `ok=False` (and a zero crop) so the caller can count and skip
    it instead of aborting a long evaluation.
    """

    def __init__(self, instances: list[Instance], image_root: str | os.PathLike, input_size: tuple[int, int]):
        self.instances = instances
        self.root = Path(image_root)
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, i: int) -> dict:
        import cv2

        ins = self.instances[i]
        img = cv2.imread(str(self.root / ins.file_name), cv2.IMREAD_COLOR)
        ok = img is not None
        if not ok:
            img = np.zeros((8, 8, 3), np.uint8)
        img = img[:, :, ::-1]  # BGR -> RGB
        crop, _, center, scale = topdown.crop_person(img, ins.bbox, self.input_size)
        return {
            "img": torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1),  # [3, H, W] uint8 RGB
            "center": torch.from_numpy(center),
            "scale": torch.from_numpy(scale),
            "index": i,
            "ok": ok,
        }


# ---- the model on a batch of crops -----------------------------------------------------------------


def model_dtype(model) -> torch.dtype:
    """The dtype crops are fed in: an exported program's `dtype`, else the model's parameters' (bf16 when
    called on a bf16 DeepSpeed model mid-training)."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def crops_to_image(keypoints: torch.Tensor, centers, scales, input_size: tuple[int, int]) -> torch.Tensor:
    """Keypoints [B, K, 2] in the input frame -> the image frame, batched on the keypoints' device.

    The inverse of the UDP warp without rotation (`topdown.get_udp_warp_matrix`): the input centre
    ((W - 1) / 2, (H - 1) / 2) goes to the box centre and W - 1 input steps span the box width.
    """
    H, W = input_size
    c = torch.as_tensor(np.asarray(centers), dtype=torch.float32, device=keypoints.device)[
        :, None
    ]  # [B, 1, 2]
    s = torch.as_tensor(np.asarray(scales), dtype=torch.float32, device=keypoints.device)[:, None]
    half = keypoints.new_tensor([0.5 * (W - 1), 0.5 * (H - 1)])
    steps = keypoints.new_tensor([W - 1.0, H - 1.0])
    return (keypoints - half) * (s / steps) + c


@torch.inference_mode()
def predict_crops(
    model, crops: torch.Tensor, centers, scales, *, flip_test: bool = False, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints [B, K, 2] (image pixels, float32) and scores [B, K] of a batch of crops, on the model's device.

    crops: [B, 3, H, W] uint8 RGB, on any device; centers, scales: [B, 2] of each crop's box. A keypoint whose heatmap is all <= 0 lands on
    the crop's input-frame (-1, -1), with its score (the heatmap maximum) <= 0. `device`: where the
    model runs (default: where its parameters are).
    """
    input_size = tuple(model.config.input_size)  # (H, W)
    device = model_device(model) if device is None else torch.device(device)
    mean = torch.tensor(model.config.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std, device=device).view(1, 3, 1, 1)
    x = ((crops.to(device, non_blocking=True).float() - mean) / std).to(model_dtype(model))
    x = (
        x.contiguous()
    )  # [B, 3, H, W]; crops cut channels-last arrive permuted: one memory layout, one arithmetic
    heatmaps = model.predict(x, flip_test=flip_test)  # [B, K, h, w]
    xy, scores = codec.decode_heatmaps(heatmaps, input_size=input_size)  # input frame, [B, K, 2]
    return crops_to_image(xy, centers, scales, input_size), scores


# ---- evaluation: boxes in image files ---------------------------------------------------------------


def predict_instances(
    model,
    instances: list[Instance],
    image_root: str | os.PathLike,
    *,
    flip_test: bool = True,
    batch_size: int = 32,
    num_workers: int = 0,
    device=None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keypoints [N, K, 2] in image pixels, scores [N, K] and ok [N] (False: image missing).

    `device` is where the model is (default: its parameters' device); the crops are read and cut by
    `num_workers` loader processes.
    """
    from tqdm import tqdm

    k = model.scheme.num_keypoints
    n = len(instances)
    kpts = np.zeros((n, k, 2), np.float64)
    scores = np.zeros((n, k), np.float64)
    ok = np.zeros(n, bool)
    batches = -(-n // batch_size)
    loader = torch.utils.data.DataLoader(
        CropDataset(instances, image_root, tuple(model.config.input_size)),
        batch_size=batch_size,
        num_workers=max(0, min(num_workers, batches - 1)),  # no worker processes for a single batch
    )
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        xy, s = predict_crops(
            model, batch["img"], batch["center"], batch["scale"], flip_test=flip_test, device=device
        )
        idx = batch["index"].numpy()
        kpts[idx] = xy.cpu().numpy()
        scores[idx] = s.float().cpu().numpy()
        ok[idx] = batch["ok"].numpy()
    return kpts, scores, ok
