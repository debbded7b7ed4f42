"""Drawing utilities: skeleton overlays, contact sheets, image grids."""

from __future__ import annotations

import numpy as np
import pytest

from sapiens_lite.keypoints import get_scheme
from sapiens_lite.visualize import contact_sheet, draw_keypoints, image_grid


def _person(k: int = 17) -> np.ndarray:
    rng = np.random.default_rng(0)
    kp = np.zeros((k, 3), np.float32)
    kp[:, 0] = rng.uniform(40, 150, k)
    kp[:, 1] = rng.uniform(40, 200, k)
    kp[:, 2] = 0.9
    return kp


def test_pixels_change_at_drawn_keypoints_only_above_threshold():
    img = np.zeros((256, 192, 3), np.uint8)
    kp = _person()
    kp[3] = (185, 8, 0.1)  # below kpt_thr, in an empty corner: neither it nor its links are drawn
    out = draw_keypoints(img, kp, "coco17", radius=3, thickness=1)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert img.sum() == 0  # the input is not modified
    for i, (x, y, s) in enumerate(kp):
        if s >= 0.3:
            assert out[int(round(y)), int(round(x))].any(), i
    assert not out[0:20, 175:192].any()
    kp[3, 2] = 0.9
    assert draw_keypoints(img, kp, "coco17", radius=3, thickness=1)[0:20, 175:192].any()


def test_low_score_person_draws_nothing_and_batches_work():
    img = np.full((64, 48, 3), 7, np.uint8)
    kp = _person()[None].repeat(2, 0) * np.array([0.25, 0.25, 1.0], np.float32)
    kp[:, :, 2] = 0.0
    assert np.array_equal(draw_keypoints(img, kp, "coco17"), img)
    kp[1, :, 2] = 1.0
    assert not np.array_equal(draw_keypoints(img, kp, get_scheme("coco17")), img)


def test_default_sizes_scale_with_the_person():
    small = _person() * np.array([0.2, 0.2, 1.0], np.float32)
    big = _person()
    img = np.zeros((256, 192, 3), np.uint8)
    n_small = (draw_keypoints(img, small, "coco17").sum(2) > 0).sum()
    n_big = (draw_keypoints(img, big, "coco17").sum(2) > 0).sum()
    assert n_big > 3 * n_small


def test_wrong_keypoint_count_raises():
    with pytest.raises(ValueError, match="K=133"):
        draw_keypoints(np.zeros((8, 8, 3), np.uint8), np.zeros((17, 3)), "coco_wholebody133")


def test_contact_sheet_shape_and_placement():
    images = [np.full((40 + 10 * i, 30, 3), 50 * i, np.uint8) for i in range(5)]
    sheet = contact_sheet(images, cols=3, tile_size=32, gap=2)
    assert sheet.shape == (2 * 32 + 3 * 2, 3 * 32 + 4 * 2, 3)
    assert (sheet[2 + 16, 2 + 32 + 2 + 16] == 50).all()  # tile 1 centre
    rect = contact_sheet(images[:2], cols=4, tile_size=(20, 10))
    assert rect.shape == (20 + 4, 2 * 10 + 3 * 2, 3)


def test_image_grid_rows_labels_and_float_inputs():
    a = np.zeros((32, 32, 3), np.uint8)
    b = np.ones((16, 32), np.float32)  # grayscale float in [0, 1]
    grid = image_grid([[a, b, a], [a, a, a]], gap=2)
    assert grid.shape[0] == 2 * 32 + 3 * 2
    assert grid.shape[1] == 32 + 64 + 32 + 4 * 2  # b is scaled to the common height
    labelled = image_grid([[a, a]], labels=["image", "recon"])
    assert labelled.shape[0] > 32 + 2 * 2 and labelled.shape[1] == 2 * 32 + 3 * 2
    header = labelled[: labelled.shape[0] - 32 - 4]
    assert (header < 255).any()  # the labels are written
    with pytest.raises(ValueError):
        image_grid([])
