"""`sapiens predict` on a real photo shipped with scikit-image, a short generated video and a corrupt file."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from sapiens_lite.cli import main
from sapiens_lite.keypoints import get_scheme
from sapiens_lite.video import VideoReader, VideoWriter
from tests.sapiens_lite.test_estimator import tiny_pose_model

K = get_scheme("coco17").num_keypoints
FRAMES = 6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder with the astronaut photo, a corrupt JPEG and a 6-frame video of procedural people; a tiny model."""
    from skimage.data import astronaut

    from sapiens_train.synth import render_sample

    root = tmp_path_factory.mktemp("predict")
    src = root / "in"
    src.mkdir()
    cv2.imwrite(str(src / "astronaut.png"), astronaut()[:, :, ::-1])  # 512 x 512 RGB photo
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with VideoWriter(src / "walk.mp4", fps=10) as out:
        for i in range(FRAMES):
            out.write(render_sample(0, i, (96, 128), scheme="coco17", people=(1, 1))[0])
    tiny_pose_model().save_pretrained(root / "model")
    return root


def check_result(entry, image_id):
    assert entry["image_id"] == image_id and entry["category_id"] == 1
    assert len(entry["keypoints"]) == 3 * K and len(entry["bbox"]) == 4
    assert isinstance(entry["score"], float)


def test_predict_photo_video_and_a_corrupt_file(inputs, capsys):
    out = inputs / "out"
    argv = ["predict", str(inputs / "in"), "--model", str(inputs / "model"), "--out", str(out)]
    rc = main([*argv, "--batch-size", "4", "--no-progress", "--kpt-thr", "0.0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "skipped " + str(inputs / "in" / "broken.jpg") in captured.err
    assert (
        "1 image, 1 video (6 frames), 7 people" in captured.out
        and "skipped 1 unreadable input" in captured.out
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "astronaut.json",
        "astronaut.png",
        "walk.json",
        "walk.mp4",
    ]

    (person,) = json.loads((out / "astronaut.json").read_text())  # no boxes, no detector: the whole photo
    check_result(person, 0)
    assert person["bbox"] == [0, 0, 512, 512]
    overlay = cv2.imread(str(out / "astronaut.png"))
    assert overlay.shape == (512, 512, 3)
    assert (overlay != cv2.imread(str(inputs / "in" / "astronaut.png"))).any()  # something was drawn

    frames = json.loads((out / "walk.json").read_text())
    assert [f["image_id"] for f in frames] == list(range(FRAMES))  # one person per frame, image_id = frame
    for f in frames:
        check_result(f, f["image_id"])
    with VideoReader(out / "walk.mp4") as video:
        assert video.size == (96, 128) and video.fps == pytest.approx(10) and len(list(video)) == FRAMES


def test_predict_with_boxes_from_a_detections_file(inputs, capsys):
    dets = [
        {"image_id": "astronaut", "bbox": [150, 20, 250, 480], "score": 0.9, "category_id": 1},
        {"image_id": "astronaut", "bbox": [0, 300, 100, 200], "score": 0.6, "category_id": 1},
        {"image_id": 3, "bbox": [10, 5, 40, 80], "score": 0.8},  # frame 3 of the video
    ]
    (inputs / "dets.json").write_text(json.dumps(dets))
    out = inputs / "out_boxes"
    rc = main(["predict", str(inputs / "in" / "*.*"), "--model", str(inputs / "model"), "--out", str(out),
               "--boxes", str(inputs / "dets.json"), "--flip", "--no-progress", "--no-overlay"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.json", "walk.json"]
    people = json.loads((out / "astronaut.json").read_text())
    assert [p["bbox"] for p in people] == [[150, 20, 250, 480], [0, 300, 100, 200]]
    assert all(p["image_id"] == "astronaut" for p in people)
    (frame,) = json.loads((out / "walk.json").read_text())  # the other frames have no detections
    assert frame["image_id"] == 3 and frame["bbox"] == [10, 5, 40, 80]


def test_predict_with_an_onnx_detector(inputs, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tests.sapiens_lite.test_boxes import EndToEndHead, export_detector

    detector = export_detector(EndToEndHead(), inputs / "det.onnx")
    out = inputs / "out_det"
    rc = main(["predict", str(inputs / "in" / "astronaut.png"), "--model", str(inputs / "model"), "--out", str(out),
               "--detector", str(detector), "--det-score-thr", "0.3", "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    people = json.loads((out / "astronaut.json").read_text())
    # the detector's two persons, letterboxed 512 -> 320 (ratio 0.625, no padding) and back
    np.testing.assert_allclose(
        [p["bbox"] for p in people], [[128, 160, 64, 128], [352, 240, 96, 160]], atol=0.01
    )


def test_predict_nothing_readable(inputs, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    (tmp_path / "b.mp4").write_bytes(b"junk")
    rc = main(
        [
            "predict",
            str(tmp_path),
            "--model",
            str(inputs / "model"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "none of the 2 inputs could be read" in err
    assert (
        main(["predict", str(tmp_path / "none"), "--model", str(inputs / "model"), "--out", str(tmp_path)])
        == 2
    )
