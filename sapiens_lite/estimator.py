"""`PoseEstimator`: keypoints of the people in images, in a few lines.

    from sapiens_lite.estimator import PoseEstimator
    pose = PoseEstimator.from_pretrained("runs/tiny_cpu_coco17", device="cuda", dtype="bf16", compile=True)
    people = pose("photo.jpg")                                   # path, numpy RGB array or PIL image
    people[0].keypoints                                          # [K, 3]: x, y in image pixels, score
    people[0].names                                              # the scheme's K keypoint names
    people = pose(image, boxes=[[x, y, w, h], ...])              # COCO boxes (a score column is optional)
    batch = pose.predict([img1, img2], boxes=[boxes1, None])     # persons of all images batched together

Boxes come from the caller, from a detector (`detector=`: `sapiens_lite.boxes.OnnxPersonDetector` or any
callable image -> boxes [N, 4|5], see sapiens_lite/boxes.py), or, with neither, the whole image is one
person box: right for a photo of one person, wrong for a crowd.

Whatever `from_pretrained` is given, the same path runs: every box is cropped (`predict.crop_batch`),
crops of all images are batched `batch_size` at a time, and `predict.predict_crops` runs the model
(flip test on request), decodes the heatmaps and maps the keypoints back to each image. `stream` does
it for an iterable of images (a folder, a video's frames) with a bounded number of them in memory, and
on a GPU cuts the next batch's crops while the previous batch runs.

`from_pretrained` reads anything `sapiens_lite.load_model` reads (a model folder, a run dir, a Hub repo, a
Sapiens .pth, a transformers VitPose folder), and the files `sapiens export` writes (.pt2, .onnx).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sapiens_lite.boxes import Detector, as_boxes, whole_image_box
from sapiens_lite.errors import UserError
from sapiens_lite.predict import crop_batch, predict_crops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESCORE_THR = 0.2  # mmpose: a person's score is its box score x the mean of its keypoint scores above this


@dataclass
class Person:
    """One person's prediction."""

    keypoints: np.ndarray
    """[K, 3] float32: x, y in image pixels (pixel centres on integers) and the heatmap score."""
    bbox: np.ndarray
    """[4] float64: the person box (x, y, w, h) the keypoints were predicted in."""
    bbox_score: float
    names: tuple[str, ...] = field(repr=False)
    """The keypoint scheme's K names, in the order of `keypoints`."""

    @property
    def score(self) -> float:
        """mmpose's person score: bbox_score x the mean keypoint score above 0.2 (0 when none is)."""
        s = self.keypoints[:, 2]
        valid = s > RESCORE_THR
        return float(self.bbox_score * s[valid].mean()) if valid.any() else 0.0

    def to_dict(self) -> dict[str, tuple[float, float, float]]:
        """{keypoint name: (x, y, score)}."""
        return {n: (float(x), float(y), float(s)) for n, (x, y, s) in zip(self.names, self.keypoints)}

    def to_coco(self, image_id) -> dict:
        """A COCO keypoint results entry (pycocotools `loadRes` reads it): keypoints as x, y, score triples."""
        return {
            "image_id": image_id,
            "category_id": 1,
            "keypoints": [round(float(v), 3) + 0.0 for v in self.keypoints.reshape(-1)],  # + 0.0: no "-0.0"
            "score": round(self.score, 5),
            "bbox": [round(float(v), 2) for v in self.bbox],
        }


def read_image(image) -> np.ndarray:
    """A path, a PIL image or an array -> RGB uint8 [H, W, 3]. Arrays are taken as RGB (HxW: grey;
    float: in [0, 1]); an unreadable file is a UserError naming it."""
    from sapiens_lite.visualize import as_rgb_uint8

    if isinstance(image, (str, os.PathLike)):
        import cv2

        path = Path(image)
        if not path.is_file():
            raise UserError(f"{path}: image not found")
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise UserError(f"{path}: not an image OpenCV can read (corrupt or unknown format)")
        return np.ascontiguousarray(bgr[:, :, ::-1])
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image, without importing PIL
        return np.asarray(image.convert("RGB")).copy()
    return as_rgb_uint8(image)


def resolve_dtype(dtype) -> torch.dtype:
    """ "fp32" / "bf16" / "fp16", a torch dtype, or None (fp32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _Pending:
    """An image whose persons are being predicted (kept until its last person's batch has come back)."""

    key: object
    image: np.ndarray
    boxes: np.ndarray  # [N, 5]
    keypoints: np.ndarray  # [N, K, 3], filled batch by batch
    left: int  # persons not predicted yet


class PoseEstimator:
    """Top-down pose estimation over images: boxes -> crops -> batched model -> keypoints in image pixels.

    model: a `PoseModel` (or an exported program from `sapiens_lite.export.load_exported`).
    device / dtype: where and in what precision the model runs ("fp32", "bf16", "fp16"; default: cuda
        if available, fp32; an exported model: where it was loaded, in its own dtype).
    compile: `torch.compile` the model, in place (the first batches take longer).
    flip_test: average with the mirror image's heatmaps (twice the model work; default off).
    batch_size: persons per model call, gathered across images.
    detector: boxes for images given without any (see sapiens_lite.boxes); None: the whole image.
    """

    def __init__(
        self,
        model,
        *,
        device=None,
        dtype=None,
        compile: bool = False,
        flip_test: bool = False,
        batch_size: int = 16,
        detector: Detector | None = None,
    ):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if device is None:  # an exported model stays where it was loaded (ONNX: the CPU)
            device = default_device() if isinstance(model, torch.nn.Module) else model.device
        self.device = torch.device(device)
        if isinstance(model, torch.nn.Module):
            self.dtype = resolve_dtype(dtype)
            model = model.to(device=self.device, dtype=self.dtype).eval()
            if compile:
                model.compile()  # compiles the module's __call__ in place: PoseModel.predict runs it
        else:  # an exported program runs in the precision it was exported in
            self.dtype = model.dtype
            if compile or (dtype is not None and resolve_dtype(dtype) != model.dtype):
                what = "compile" if compile else f"dtype {dtype}"
                raise UserError(f"{what}: an exported model runs as exported ({model.dtype}); export again")
            model.to(self.device)
            self.device = model.device  # ONNX Runtime hands its outputs back on the CPU
        self.model = model
        self.flip_test = flip_test
        self.batch_size = batch_size
        self.detector = detector

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        device=None,
        dtype=None,
        compile: bool = False,
        flip_test: bool = False,
        batch_size: int = 16,
        detector: Detector | None = None,
        revision: str | None = None,
    ) -> PoseEstimator:
        """An estimator over any checkpoint `load_model` reads, or a .pt2 / .onnx file of `sapiens export`."""
        from sapiens_lite.export import EXPORT_SUFFIXES, load_exported
        from sapiens_lite.loading import load_pose_model

        if Path(path_or_repo).suffix.lower() in EXPORT_SUFFIXES:
            model = load_exported(path_or_repo)
        else:
            model = load_pose_model(path_or_repo, revision=revision)
        return cls(
            model,
            device=device,
            dtype=dtype,
            compile=compile,
            flip_test=flip_test,
            batch_size=batch_size,
            detector=detector,
        )

    # ---- what the model predicts ----

    @property
    def scheme(self):
        return self.model.scheme

    @property
    def keypoint_names(self) -> tuple[str, ...]:
        return self.model.scheme.names

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the person crops."""
        return tuple(self.model.config.input_size)

    # ---- calls ----

    def __call__(self, image, boxes=None, *, flip_test: bool | None = None) -> list[Person]:
        """The persons of one image (path, RGB array or PIL image), one per box (see the class docstring)."""
        return self.predict([image], None if boxes is None else [boxes], flip_test=flip_test)[0]

    def predict(
        self, images: Sequence, boxes: Sequence | None = None, *, flip_test: bool | None = None
    ) -> list[list[Person]]:
        """The persons of each image; `boxes[i]` for image i ([N, 4|5], or None: detector / whole image)."""
        if boxes is not None and len(boxes) != len(images):
            raise UserError(f"boxes: {len(boxes)} entries for {len(images)} images")
        items = ((i, img, None if boxes is None else boxes[i]) for i, img in enumerate(images))
        return [persons for _, _, persons in self.stream(items, flip_test=flip_test)]

    def boxes_for(self, image: np.ndarray, boxes=None) -> np.ndarray:
        """[N, 5] boxes of an RGB image: the given ones, else the detector's, else the whole image."""
        if boxes is not None:
            return as_boxes(boxes)
        if self.detector is not None:
            return as_boxes(self.detector(image), where="detector output")
        return whole_image_box(*image.shape[:2])

    def stream(
        self, items: Iterable[tuple[object, object, object]], *, flip_test: bool | None = None
    ) -> Iterator[tuple[object, np.ndarray, list[Person]]]:
        """(key, image, boxes-or-None) items -> (key, RGB image, persons), in order, as they complete.

        Persons of consecutive images share batches; an image is held only until its last person's
        batch is back. Errors reading an image propagate (the CLI catches them per item).
        """
        flip = self.flip_test if flip_test is None else flip_test
        k = self.model.scheme.num_keypoints
        pending: deque[_Pending] = deque()  # images in input order, each with persons outstanding or done
        queue: list[tuple[_Pending, int, np.ndarray, np.ndarray, np.ndarray]] = []  # crops not run yet
        inflight = None  # the batch launched last: (owners, keypoints, scores) still on the device

        def launch(batch):
            crops = torch.from_numpy(np.stack([c for _, _, c, _, _ in batch])).permute(0, 3, 1, 2)
            if self.device.type == "cuda":
                crops = crops.pin_memory()
            centers = np.stack([c for _, _, _, c, _ in batch])
            scales = np.stack([s for _, _, _, _, s in batch])
            xy, s = predict_crops(self.model, crops, centers, scales, flip_test=flip, device=self.device)
            return [(p, j) for p, j, _, _, _ in batch], xy, s

        def land(done):
            owners, xy, s = done
            kps = torch.cat([xy, s[..., None]], dim=-1).cpu().numpy()  # [B, K, 3]; waits for the device
            for (p, j), kp in zip(owners, kps):
                p.keypoints[j] = kp
                p.left -= 1

        def finished():
            while pending and pending[0].left == 0:
                p = pending.popleft()
                persons = [
                    Person(p.keypoints[j], p.boxes[j, :4], float(p.boxes[j, 4]), self.model.scheme.names)
                    for j in range(len(p.boxes))
                ]
                yield p.key, p.image, persons

        for key, image, boxes in items:
            image = read_image(image)
            b = self.boxes_for(image, boxes)
            crops, centers, scales = crop_batch(image, b[:, :4], self.input_size)
            p = _Pending(key, image, b, np.zeros((len(b), k, 3), np.float32), len(b))
            pending.append(p)
            queue.extend((p, j, crops[j], centers[j], scales[j]) for j in range(len(b)))
            while len(queue) >= self.batch_size:
                batch, queue = queue[: self.batch_size], queue[self.batch_size :]
                launched = launch(batch)  # asynchronous on a GPU: the next crops are cut meanwhile
                if inflight is not None:
                    land(inflight)
                inflight = launched
            yield from finished()
        if queue:
            launched = launch(queue)
            if inflight is not None:
                land(inflight)
            inflight = launched
        if inflight is not None:
            land(inflight)
        yield from finished()
