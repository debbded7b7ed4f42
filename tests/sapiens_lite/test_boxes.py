"""Person boxes: box arrays, COCO detections files, and an ONNX detector exported here from a tiny torch module."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sapiens_lite.boxes import CocoDetections, OnnxPersonDetector, as_boxes, whole_image_box, xyxy_to_xywh
from sapiens_lite.errors import UserError


def test_box_arrays():
    np.testing.assert_array_equal(as_boxes([1, 2, 3, 4]), [[1, 2, 3, 4, 1]])
    np.testing.assert_array_equal(
        as_boxes([[1, 2, 3, 4, 0.5], [0, 0, 0.5, 10, 1]]), [[1, 2, 3, 4, 0.5]]
    )  # sliver dropped
    assert as_boxes([]).shape == (0, 5)
    with pytest.raises(UserError, match="shape"):
        as_boxes([[1, 2, 3]])
    with pytest.raises(UserError, match="finite"):
        as_boxes([[1, 2, np.nan, 4]])
    np.testing.assert_array_equal(whole_image_box(480, 640), [[0, 0, 640, 480, 1]])
    np.testing.assert_array_equal(xyxy_to_xywh([[10, 20, 50, 80, 0.7]]), [[10, 20, 40, 60, 0.7]])


def test_coco_detections_lists_and_files(tmp_path):
    results = [
        {"image_id": 139, "bbox": [1, 2, 30, 40], "score": 0.9, "category_id": 1},
        {"image_id": 139, "bbox": [5, 5, 10, 10], "score": 0.1, "category_id": 1},  # under the threshold
        {"image_id": 139, "bbox": [5, 5, 10, 10], "score": 0.9, "category_id": 3},  # not a person
        {"image_id": "walk", "bbox": [0, 0, 8, 9], "score": 0.8},
        {"image_id": 2, "bbox": [3, 3, 20, 20], "score": 0.7},
    ]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(results))
    dets = CocoDetections(path, score_thr=0.3)
    np.testing.assert_array_equal(
        dets.boxes_for("val/000000000139.jpg"), [[1, 2, 30, 40, 0.9]]
    )  # stem as int
    np.testing.assert_array_equal(dets.boxes_for("walk.png"), [[0, 0, 8, 9, 0.8]])  # stem as string
    np.testing.assert_array_equal(dets.boxes_for(frame=2), [[3, 3, 20, 20, 0.7]])  # a video frame
    assert dets.boxes_for("nobody.jpg").shape == (0, 5)  # not mentioned: no person
    assert dets.image_id("nobody.jpg") is None

    coco = {
        "images": [{"id": 7, "file_name": "sub/a.jpg"}],
        "annotations": [{"image_id": 7, "bbox": [1, 1, 5, 5]}],
    }
    path.write_text(json.dumps(coco))
    dets = CocoDetections(path)
    assert dets.image_id("sub/a.jpg") == 7 and dets.image_id("a.jpg") == 7
    np.testing.assert_array_equal(dets.boxes_for("sub/a.jpg"), [[1, 1, 5, 5, 1]])

    for bad, match in [
        ("{", "not valid JSON"),
        ('{"x": 1}', "annotations"),
        ('[{"bbox": [1, 2, 3, 4]}]', "image_id"),
    ]:
        path.write_text(bad)
        with pytest.raises(UserError, match=match):
            CocoDetections(path)
    with pytest.raises(UserError, match="not found"):
        CocoDetections(tmp_path / "missing.json")


# ---- the ONNX detector -------------------------------------------------------------------------------

# Candidates in letterboxed input pixels (320 x 320) as a YOLOv8 head emits them: cx, cy, w, h, then scores of
# 2 classes (0 = person). An image of 640 x 480 (W x H) is letterboxed with ratio 0.5 and 40 pixels of padding
# above and below.
CANDIDATES = np.array(
    [
        [100, 140, 40, 80, 0.90, 0.0],  # a person
        [102, 141, 40, 80, 0.80, 0.0],  # the same person again: suppressed by NMS
        [250, 200, 60, 100, 0.50, 0.1],  # another person
        [50, 60, 20, 20, 0.10, 0.0],  # under the score threshold
        [200, 100, 30, 30, 0.05, 0.95],  # not a person (class 1)
    ],
    dtype=np.float32,
)


class YoloHead(torch.nn.Module):
    """Fixed candidates, output [1, 4 + C, N] (the input only sets the batch and keeps it a graph input)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cand", torch.from_numpy(CANDIDATES.T.copy())[None])  # [1, 6, N]

    def forward(self, x):
        return self.cand + 0.0 * x.mean()


class EndToEndHead(torch.nn.Module):
    """The same persons as detections [1, N, 6]: x1, y1, x2, y2, score, class."""

    def __init__(self):
        super().__init__()
        c = CANDIDATES
        det = np.stack([c[:, 0] - c[:, 2] / 2, c[:, 1] - c[:, 3] / 2, c[:, 0] + c[:, 2] / 2, c[:, 1] + c[:, 3] / 2,
                        c[:, 4:6].max(1), c[:, 4:6].argmax(1)], axis=1).astype(np.float32)  # fmt: skip
        self.register_buffer("det", torch.from_numpy(det)[None])

    def forward(self, x):
        return self.det + 0.0 * x.mean()


def export_detector(module, path):
    torch.onnx.export(module.eval(), (torch.zeros(1, 3, 320, 320),), str(path), dynamo=True, verbose=False)
    return path


@pytest.mark.parametrize("head", [YoloHead, EndToEndHead], ids=["yolo", "end-to-end"])
def test_onnx_detector_boxes_in_image_pixels(tmp_path, head):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = export_detector(head(), tmp_path / "det.onnx")
    det = OnnxPersonDetector(path, score_thr=0.3, nms_thr=0.5)
    assert det.input_size == (320, 320)
    image = np.zeros((480, 640, 3), np.uint8)
    boxes = det(image)
    # letterboxed (cx, cy, w, h) -> image pixels: x = (x_in - pad_x) / ratio, pad_x = 0, pad_y = 40, ratio 0.5
    expected = np.array(
        [
            [(100 - 20) * 2, (140 - 40 - 40) * 2, 80, 160, 0.9],
            [(250 - 30) * 2, (200 - 50 - 40) * 2, 120, 200, 0.5],
        ]
    )
    np.testing.assert_allclose(boxes, expected, atol=1e-4)

    x, ratio, pad = det.letterbox(image)
    assert x.shape == (1, 3, 320, 320) and ratio == 0.5 and pad == (0.0, 40.0)
    assert np.allclose(x[0, :, :40], 114 / 255) and np.allclose(x[0, :, 40:280], 0)

    # a lower threshold keeps the weak person (0.1), NMS off (IoU 1.0) keeps the duplicate
    boxes = OnnxPersonDetector(path, score_thr=0.08, nms_thr=1.0)(image)
    assert len(boxes) == 4 and np.all(np.diff(boxes[:, 4]) <= 0)


def test_onnx_detector_errors(tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(UserError, match="not found"):
        OnnxPersonDetector(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        OnnxPersonDetector(tmp_path / "bad.onnx")
