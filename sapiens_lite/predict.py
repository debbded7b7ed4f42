"""Batched top-down prediction: person boxes in images -> keypoints in image pixels.

    instances = [Instance(image_id=1, file_name="a.jpg", bbox=(x, y, w, h))]
    kpts, scores, ok = predict_instances(model, instances, "images/", flip_test=True, batch_size=32)
    # kpts [N, K, 2] image pixels, scores [N, K], ok [N] (False: the image was missing or unreadable)

In run order: `CropDataset` cuts each box out of its image with the UDP warp of `sapiens_lite.topdown`
(box -> center/scale with 1.25 padding and the input's aspect ratio), the model runs on batches of crops
(`PoseModel.predict`, optionally with flip test), `sapiens_lite.codec` decodes the heatmaps (argmax +
DARK-UDP) and maps the keypoints back to the image. Evaluation, distillation and the inference CLI all
run the model through here.
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


class CropDataset(torch.utils.data.Dataset):
    """Map-style dataset of person crops (UDP warp, no augmentation) for `predict_instances`.

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


def predict_instances(
    model,
    instances: list[Instance],
    image_root: str | os.PathLike,
    *,
    flip_test: bool = True,
    batch_size: int = 32,
    num_workers: int = 0,
    device="cpu",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keypoints [N, K, 2] in image pixels, scores [N, K] and ok [N] (False: image missing)."""
    from tqdm import tqdm

    input_size = tuple(model.config.input_size)  # (H, W)
    k = model.scheme.num_keypoints
    n = len(instances)
    mean = torch.tensor(model.config.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std, device=device).view(1, 3, 1, 1)
    dtype = next(model.parameters()).dtype  # bf16 when called on a bf16 DeepSpeed model mid-training
    kpts = np.zeros((n, k, 2), np.float64)
    scores = np.zeros((n, k), np.float64)
    ok = np.zeros(n, bool)
    batches = -(-n // batch_size)
    loader = torch.utils.data.DataLoader(
        CropDataset(instances, image_root, input_size),
        batch_size=batch_size,
        num_workers=max(0, min(num_workers, batches - 1)),  # no worker processes for a single batch
    )
    with torch.inference_mode():
        for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
            x = ((batch["img"].to(device).float() - mean) / std).to(dtype)  # [B, 3, H, W]
            heatmaps = model.predict(x, flip_test=flip_test)  # [B, K, h, w]
            xy, s = codec.decode_heatmaps(heatmaps, input_size=input_size)  # input frame, [B, K, 2]
            xy_img = codec.keypoints_to_image(
                xy.cpu().numpy(), batch["center"].numpy(), batch["scale"].numpy(), input_size
            )
            idx = batch["index"].numpy()
            kpts[idx] = xy_img[..., :2]
            scores[idx] = s.cpu().numpy()
            ok[idx] = batch["ok"].numpy()
    return kpts, scores, ok
