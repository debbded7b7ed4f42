"""Top-down geometry: box -> center/scale, the UDP warp (mmpose get_udp_warp_matrix), crops and inverses."""

import math

import cv2
import numpy as np
import pytest

from sapiens_lite import topdown
from sapiens_lite.errors import UserError


def mmpose_udp_warp(center, scale, rot, output_size):
    """mmpose's formula, written the way its source writes it (input_size = 2 * center)."""
    input_size = np.asarray(center) * 2
    r = np.deg2rad(rot)
    sx = (output_size[0] - 1) / scale[0]
    sy = (output_size[1] - 1) / scale[1]
    m = np.zeros((2, 3))
    m[0, 0] = math.cos(r) * sx
    m[0, 1] = -math.sin(r) * sx
    m[0, 2] = sx * (-0.5 * input_size[0] * math.cos(r) + 0.5 * input_size[1] * math.sin(r) + 0.5 * scale[0])
    m[1, 0] = math.sin(r) * sy
    m[1, 1] = math.cos(r) * sy
    m[1, 2] = sy * (-0.5 * input_size[0] * math.sin(r) - 0.5 * input_size[1] * math.cos(r) + 0.5 * scale[1])
    return m


def test_center_scale_with_padding_and_aspect_fix():
    c, s = topdown.bbox_xywh_to_center_scale([10, 20, 100, 100], aspect_ratio=0.75)
    np.testing.assert_allclose(c, [60, 70])
    np.testing.assert_allclose(s, [125, 125 / 0.75])  # too wide for 3:4 -> taller
    c, s = topdown.bbox_xywh_to_center_scale([0, 0, 30, 200], aspect_ratio=0.75)
    np.testing.assert_allclose(s, [250 * 0.75, 250])  # too narrow -> wider
    _, s = topdown.bbox_xywh_to_center_scale([0, 0, 30, 200])
    np.testing.assert_allclose(s, [37.5, 250])
    np.testing.assert_allclose(
        topdown.center_scale_to_bbox_xywh(*topdown.bbox_xywh_to_center_scale([5, 6, 7, 8])), [5, 6, 7, 8]
    )


@pytest.mark.parametrize(
    "bad", [[0, 0, 0, 10], [0, 0, 10, -1], [np.nan, 0, 10, 10], [0, 0, np.inf, 10], [1, 2, 3]]
)
def test_degenerate_boxes_are_user_errors(bad):
    with pytest.raises(UserError, match="degenerate box"):
        topdown.bbox_xywh_to_center_scale(bad)


@pytest.mark.parametrize("rot", [0.0, 30.0, -75.0])
def test_udp_warp_matches_mmpose_and_maps_center_to_center(rot):
    center, scale = np.array([321.5, 210.25]), np.array([180.0, 240.0])
    m = topdown.get_udp_warp_matrix(center, scale, rot, output_size=(192, 256))
    np.testing.assert_allclose(m, mmpose_udp_warp(center, scale, rot, (192, 256)), atol=1e-9)
    np.testing.assert_allclose(topdown.transform_points(center, m), [95.5, 127.5], atol=1e-9)
    if rot == 0:
        # The box's left/right edges land on the first/last pixel centres (UDP: W - 1 steps).
        np.testing.assert_allclose(
            topdown.transform_points(np.array([center[0] - 90, center[1]]), m), [0, 127.5], atol=1e-9
        )
        np.testing.assert_allclose(
            topdown.transform_points(np.array([center[0] + 90, center[1]]), m), [191, 127.5], atol=1e-9
        )


def test_inverse_and_input_to_image_round_trip():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 500, (20, 3))
    for rot in (0.0, 45.0):
        m = topdown.get_udp_warp_matrix([250, 200], [150, 200], rot, (768, 1024))
        back = topdown.transform_points(topdown.transform_points(pts, m), topdown.invert_affine(m))
        np.testing.assert_allclose(back, pts, atol=1e-9)  # visibility column passes through
        np.testing.assert_allclose(
            topdown.input_to_image(
                topdown.transform_points(pts, m), [250, 200], [150, 200], (1024, 768), rot
            ),
            pts,
            atol=1e-9,
        )
    # rot = 0: same as mmpose's decode (kpts_hm / (hm - 1) * input) then kpts / input * scale + center - scale / 2.
    hm_pts = rng.uniform(0, 47, (5, 2))
    mm = (
        hm_pts / np.array([47, 63]) * np.array([192, 256]) / np.array([192, 256]) * np.array([150, 200])
        + np.array([250, 200])
        - np.array([75, 100])
    )
    ours = topdown.input_to_image(hm_pts * np.array([191 / 47, 255 / 63]), [250, 200], [150, 200], (256, 192))
    np.testing.assert_allclose(ours, mm, atol=1e-9)


def test_crop_pixels_follow_the_point_transform():
    """A dot at image (x, y) appears in the crop at transform_points((x, y), M), also with rotation and flip."""
    img = np.zeros((300, 400, 3), np.uint8)
    img[137, 211] = 255
    for rot, flip in [(0.0, False), (30.0, False), (0.0, True), (-50.0, True)]:
        m = topdown.get_udp_warp_matrix([200, 150], [120, 160], rot, (96, 128))
        full = topdown.compose_affine(m, topdown.hflip_matrix(400)) if flip else m
        crop = topdown.warp_image(img.astype(np.float32), full, (128, 96))
        src = np.array([400 - 1 - 211 if flip else 211, 137.0])  # where the dot is in the (mirrored) image
        x, y = topdown.transform_points(src, m)
        yy, xx = np.unravel_index(crop[..., 0].argmax(), crop.shape[:2])
        assert abs(xx - x) <= 1 and abs(yy - y) <= 1, (rot, flip, (xx, yy), (x, y))
        # The flip folded into the matrix is the same as flipping the image first.
        if flip:
            ref = cv2.warpAffine(img[:, ::-1].astype(np.float32).copy(), m, (96, 128), flags=cv2.INTER_LINEAR)
            np.testing.assert_allclose(crop, ref, atol=1e-3)


def test_crop_person_shapes():
    img = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    crop, m, c, s = topdown.crop_person(img, [100, 50, 80, 200], input_size=(256, 192))
    assert crop.shape == (256, 192, 3) and crop.dtype == np.uint8 and m.shape == (2, 3)
    np.testing.assert_allclose(s[0] / s[1], 0.75)
