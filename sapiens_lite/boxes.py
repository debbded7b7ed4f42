"""Person boxes for top-down prediction: given by the caller, read from a COCO detections JSON, or found
by a detector (an ONNX person detector run with onnxruntime, or any callable).

Every box in this module, and everywhere in `sapiens_lite.estimator`, is COCO's (x, y, w, h) in image
pixels, optionally followed by a score: arrays [N, 4] or [N, 5]. `xyxy_to_xywh` converts the corner
form most detectors print.

    boxes = as_boxes([[10, 20, 100, 200, 0.9]])                 # [N, 5] float64, checked
    dets = CocoDetections("detections.json", score_thr=0.3)      # a COCO results list (or a COCO file)
    boxes = dets.boxes_for("images/000000000139.jpg")            # [N, 5] for that image
    detector = OnnxPersonDetector("yolov8n.onnx", score_thr=0.3, nms_thr=0.45)
    boxes = detector(image_rgb)                                  # [N, 5]

A detector is any callable taking an RGB uint8 image [H, W, 3] and returning boxes [N, 4] or [N, 5]
(x, y, w, h[, score]) in that image's pixels (`Detector`). With neither boxes nor a detector the
estimator takes the whole image as one person box (`whole_image_box`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sapiens_lite.errors import UserError

Detector = Callable[[np.ndarray], np.ndarray]
"""RGB uint8 image [H, W, 3] -> person boxes [N, 4] or [N, 5]: (x, y, w, h[, score]) in image pixels."""


# ---- box arrays ------------------------------------------------------------------------------------


def as_boxes(boxes, where: str = "boxes", min_size: float = 1.0) -> np.ndarray:
    """Boxes [N, 4] or [N, 5] (x, y, w, h[, score]) -> [N, 5] float64 (score 1.0 where none is given).

    A box that is not finite is a UserError naming `where`; boxes narrower or lower than `min_size`
    pixels are dropped (a detector's slivers), as evaluation does.
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 5))
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[1] not in (4, 5):
        raise UserError(
            f"{where}: expected boxes [N, 4] or [N, 5] (x, y, w, h[, score]), got shape {b.shape}"
        )
    if not np.isfinite(b).all():
        raise UserError(f"{where}: boxes must be finite numbers, got {b[~np.isfinite(b).all(1)][0].tolist()}")
    if b.shape[1] == 4:
        b = np.concatenate([b, np.ones((len(b), 1))], axis=1)
    return b[(b[:, 2] >= min_size) & (b[:, 3] >= min_size)]


def whole_image_box(height: int, width: int) -> np.ndarray:
    """The whole image as one person box [1, 5] (x, y, w, h, score 1): the default without boxes or detector."""
    return np.array([[0.0, 0.0, float(width), float(height), 1.0]])


def xyxy_to_xywh(boxes) -> np.ndarray:
    """Corners [N, 4+] (x1, y1, x2, y2, ...) -> (x, y, w, h, ...); extra columns (scores) pass through."""
    b = np.array(boxes, dtype=np.float64, ndmin=2)
    b[:, 2:4] -= b[:, 0:2]
    return b


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou_thr: float) -> np.ndarray:
    """Indices of the boxes kept by greedy IoU non-maximum suppression, best first (torchvision.ops.nms)."""
    import torch
    from torchvision.ops import nms as tv_nms

    if len(boxes_xyxy) == 0:
        return np.zeros(0, np.int64)
    keep = tv_nms(torch.as_tensor(boxes_xyxy, dtype=torch.float32), torch.as_tensor(scores).float(), iou_thr)
    return keep.numpy()


# ---- boxes from a COCO detections JSON -------------------------------------------------------------


class CocoDetections:
    """Person boxes per image from a COCO detections JSON, looked up by file name or frame index.

    The file is either a COCO results list `[{"image_id", "bbox": [x, y, w, h], "score", "category_id"}, ...]`
    (what detectors and `sapiens eval --detections` use) or a COCO object with "annotations" (same
    entries) and optionally "images" (`{"id", "file_name"}`). Entries whose category_id is not 1
    (person) or whose score is below `score_thr` are ignored.

    An image is matched to an `image_id` by, in order: the "images" table (its file_name, or the base
    name of it), the image's file name or stem as a string id, the stem as an integer (COCO's
    000000000139.jpg is id 139). A video frame's id is its 0-based index. An image the file does not
    mention has no person (the detector found none), which is not the same as having no file.
    """

    def __init__(self, path: str | os.PathLike, score_thr: float = 0.0):
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path}: detections file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: not valid JSON ({e})") from None
        images = []
        if isinstance(data, dict):
            if not isinstance(data.get("annotations"), list):
                raise UserError(
                    f"{self.path}: a JSON object needs an 'annotations' list (or give a results list)"
                )
            images = data.get("images") or []
            data = data["annotations"]
        if not isinstance(data, list):
            raise UserError(f"{self.path}: expected a list of {{image_id, bbox, score, category_id}}")
        self.ids_by_name: dict[str, object] = {}
        for im in images:
            if isinstance(im, dict) and "id" in im and "file_name" in im:
                self.ids_by_name[str(im["file_name"])] = im["id"]
                self.ids_by_name.setdefault(Path(str(im["file_name"])).name, im["id"])
        self.boxes: dict[object, list[list[float]]] = {}
        for i, d in enumerate(data):
            if not isinstance(d, dict) or "image_id" not in d or "bbox" not in d:
                raise UserError(f"{self.path}: entry {i} needs 'image_id' and 'bbox'")
            bbox = d["bbox"]
            if not (
                isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
            ):
                raise UserError(f"{self.path}: entry {i}: bbox must be [x, y, w, h], got {bbox!r}")
            score = d.get("score", 1.0)
            if d.get("category_id", 1) != 1 or score < score_thr:
                continue
            self.boxes.setdefault(d["image_id"], []).append([*map(float, bbox), float(score)])

    def image_id(self, file_name: str | os.PathLike) -> object | None:
        """The image_id of an image file (see the class docstring), or None if the file names no such id."""
        p = Path(file_name)
        for key in (str(file_name), p.name):
            if key in self.ids_by_name:
                return self.ids_by_name[key]
        for key in (str(file_name), p.name, p.stem):
            if key in self.boxes:
                return key
        if p.stem.isdigit() and int(p.stem) in self.boxes:
            return int(p.stem)
        return None

    def boxes_for(self, file_name: str | os.PathLike | None = None, frame: int | None = None) -> np.ndarray:
        """Boxes [N, 5] (x, y, w, h, score) of an image file, or of video frame `frame` (its image_id)."""
        key = frame if frame is not None else self.image_id(file_name)
        return as_boxes(self.boxes.get(key, []), where=f"{self.path}: image_id {key}")


# ---- an ONNX person detector -----------------------------------------------------------------------


class OnnxPersonDetector:
    """A person detector in an ONNX file, run with onnxruntime (the `onnx` extra).

    Input: one image [1, 3, S_h, S_w] float RGB in [0, 1], letterboxed (resized keeping the aspect
    ratio, centred, padded with grey 114), as ultralytics YOLO models take it; S is the model's static
    input size (640 x 640 when the file leaves it dynamic).

    Output, recognised by its shape (`output_format="auto"`, or named):
      - "yolo": `[1, 4 + C, N]` (ultralytics YOLOv8 / YOLO11 exports): per candidate the box centre and
        size (cx, cy, w, h) in input pixels, then C class scores; the person is class `person_class`
        (0 in COCO). This is the raw output: thresholds and NMS are applied here.
      - "xyxy": `[1, N, 6]` or `[N, 6]` (end-to-end exports, e.g. ultralytics `nms=True`, YOLOv10):
        per detection x1, y1, x2, y2 in input pixels, score, class id.
    "auto" takes "xyxy" when the last axis has 6 entries and the other does not, else "yolo".

    Candidates of the person class scoring at least `score_thr` go through class-agnostic NMS
    (`nms_thr` IoU) and come back as (x, y, w, h, score) in the original image's pixels, clipped to it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        score_thr: float = 0.3,
        nms_thr: float = 0.45,
        person_class: int = 0,
        output_format: str = "auto",
        providers: list[str] | None = None,
    ):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(
                "an ONNX detector needs onnxruntime, which is not installed: pip install 'sapiens-toolkit[onnx]'"
            ) from None
        if output_format not in ("auto", "yolo", "xyxy"):
            raise UserError(f"output_format must be auto, yolo or xyxy, got {output_format!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: detector file not found")
        try:
            self.session = ort.InferenceSession(
                str(self.path), providers=providers or ort.get_available_providers()
            )
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise UserError(f"{self.path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        h, w = inp.shape[2:4] if len(inp.shape) == 4 else (None, None)
        self.input_size = (h if isinstance(h, int) else 640, w if isinstance(w, int) else 640)  # (H, W)
        self.score_thr = score_thr
        self.nms_thr = nms_thr
        self.person_class = person_class
        self.output_format = output_format

    def letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float, tuple[float, float]]:
        """RGB uint8 [H, W, 3] -> (input [1, 3, S_h, S_w] in [0, 1], ratio, (pad_x, pad_y)): input = image * ratio + pad."""
        import cv2

        sh, sw = self.input_size
        h, w = image.shape[:2]
        ratio = min(sh / h, sw / w)
        nh, nw = int(round(h * ratio)), int(round(w * ratio))
        pad_x, pad_y = (sw - nw) / 2, (sh - nh) / 2
        top, left = int(round(pad_y - 0.1)), int(round(pad_x - 0.1))  # ultralytics LetterBox rounding
        canvas = np.full((sh, sw, 3), 114, np.uint8)
        canvas[top : top + nh, left : left + nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        x = canvas.transpose(2, 0, 1)[None].astype(self.input_dtype) / 255.0  # [1, 3, S_h, S_w]
        return x, ratio, (float(left), float(top))

    def candidates(self, output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The raw output -> person boxes [M, 4] (x1, y1, x2, y2, input pixels) and scores [M]."""
        out = np.asarray(output, dtype=np.float32)
        fmt = self.output_format
        if fmt == "auto":
            last, other = out.shape[-1], out.shape[-2] if out.ndim >= 2 else 0
            fmt = "xyxy" if last == 6 and other != 6 else "yolo"
        if fmt == "xyxy":
            det = out.reshape(-1, 6)  # [N, 6]
            keep = det[:, 5].round() == self.person_class
            return det[keep, :4], det[keep, 4]
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[1] < 5:
            raise UserError(f"{self.path}: expected a YOLO output [1, 4 + classes, N], got shape {out.shape}")
        pred = out[0].T  # [N, 4 + C]
        if self.person_class >= pred.shape[1] - 4:
            raise UserError(
                f"{self.path}: person_class {self.person_class} but the model has {pred.shape[1] - 4} classes"
            )
        cxcywh, scores = pred[:, :4], pred[:, 4 + self.person_class]
        xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], axis=1)
        return xyxy, scores

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Person boxes [N, 5] (x, y, w, h, score) in `image` pixels, best first."""
        x, ratio, (pad_x, pad_y) = self.letterbox(image)
        output = self.session.run(None, {self.input_name: x})[0]
        xyxy, scores = self.candidates(output)
        keep = scores >= self.score_thr
        xyxy, scores = xyxy[keep], scores[keep]
        keep = nms(xyxy, scores, self.nms_thr)
        xyxy, scores = xyxy[keep], scores[keep]
        # letterboxed input pixels -> image pixels, clipped to the image
        h, w = image.shape[:2]
        xyxy = (xyxy - [pad_x, pad_y, pad_x, pad_y]) / ratio
        xyxy = np.clip(xyxy, 0, [w, h, w, h])
        return as_boxes(xyxy_to_xywh(np.concatenate([xyxy, scores[:, None]], axis=1)), where=str(self.path))
