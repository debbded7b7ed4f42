"""Procedural people: exact keypoints for 308 / 133 / 17, visibility, determinism, flips, COCO output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sapiens_lite.keypoints import get_scheme
from sapiens_train import _body
from sapiens_train.coco import load_coco_keypoints
from sapiens_train.synth import (
    add_synth_arguments,
    render_sample,
    run_synth,
    scheme_sources,
    synthesize,
)

SIZE = (128, 96)


def test_scheme_sources_map_by_name():
    goliath = get_scheme("goliath308")
    for name in ("coco17", "coco_wholebody133", "goliath308"):
        scheme = get_scheme(name)
        src = scheme_sources(name)
        assert len(src) == scheme.num_keypoints
        for n, s in zip(scheme.names, src):
            if n.startswith("face-"):
                assert s == 308 + int(n[5:])
            elif n.endswith("hand_root"):
                assert goliath.names[s] == n.replace("hand_root", "wrist")
            elif n[-1] == "1" and ("thumb" in n or "finger" in n):
                assert goliath.names[s] == n[:-1] + "_third_joint"
            else:
                assert goliath.names[s] == n
    assert (scheme_sources("goliath308") == np.arange(308)).all()


@pytest.mark.parametrize("scheme,k", [("goliath308", 308), ("coco_wholebody133", 133), ("coco17", 17)])
def test_keypoint_count_and_flags(scheme, k):
    for index in range(4):
        img, people = render_sample(1, index, SIZE, scheme=scheme)
        assert img.shape == (*SIZE, 3) and img.dtype == np.uint8
        assert 1 <= len(people) <= 4
        for p in people:
            kp = p["keypoints"]
            assert kp.shape == (k, 3) and kp.dtype == np.float32
            assert set(np.unique(kp[:, 2])) <= {0.0, 1.0, 2.0}
            assert (kp[kp[:, 2] == 0, :2] == 0).all()  # COCO: unlabelled points are (0, 0, 0)


def test_deterministic_per_seed_and_index():
    a_img, a_people = render_sample(3, 7, SIZE)
    b_img, b_people = render_sample(3, 7, SIZE)
    assert np.array_equal(a_img, b_img)
    assert len(a_people) == len(b_people)
    for a, b in zip(a_people, b_people):
        assert np.array_equal(a["keypoints"], b["keypoints"]) and a["bbox"] == b["bbox"]
    c_img, _ = render_sample(3, 8, SIZE)
    d_img, _ = render_sample(4, 7, SIZE)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)


def test_visible_points_inside_image_and_box():
    h, w = SIZE
    n_visible = n_hidden = 0
    for index in range(12):
        _, people = render_sample(5, index, SIZE)
        for p in people:
            kp = p["keypoints"]
            x, y, bw, bh = p["bbox"]
            vis = kp[kp[:, 2] == 2]
            assert ((vis[:, 0] >= 0) & (vis[:, 0] <= w - 1) & (vis[:, 1] >= 0) & (vis[:, 1] <= h - 1)).all()
            eps = 1e-3
            assert ((vis[:, 0] >= x - eps) & (vis[:, 0] <= x + bw + eps)).all()
            assert ((vis[:, 1] >= y - eps) & (vis[:, 1] <= y + bh + eps)).all()
            assert 0 <= x and 0 <= y and x + bw <= w + 1 and y + bh <= h + 1 and bw > 0 and bh > 0
            n_visible += len(vis)
            n_hidden += int((kp[:, 2] == 1).sum())
    # both flags occur: self-occlusion and occluders are real, not a constant
    assert n_visible > 100 and n_hidden > 20


def test_schemes_share_one_figure():
    """The 17 / 133 points are the 308 points of the same name; iBUG twins coincide exactly."""
    img308, p308 = render_sample(2, 1, SIZE, scheme="goliath308")
    img133, p133 = render_sample(2, 1, SIZE, scheme="coco_wholebody133")
    img17, p17 = render_sample(2, 1, SIZE, scheme="coco17")
    assert np.array_equal(img308, img133) and np.array_equal(img308, img17)
    g, wb = get_scheme("goliath308"), get_scheme("coco_wholebody133")
    for a, b, c in zip(p308, p133, p17):
        k308, k133, k17 = a["keypoints"], b["keypoints"], c["keypoints"]
        assert np.array_equal(k17, k133[:17])
        for i, n in enumerate(get_scheme("coco17").names):
            assert np.array_equal(k17[i], k308[g.index(n)])
        assert np.array_equal(k133[wb.index("left_hand_root")], k308[g.index("left_wrist")])
        assert np.array_equal(
            k133[wb.index("right_forefinger1")], k308[g.index("right_forefinger_third_joint")]
        )
        for face_k, twin in ((8, "tip_of_chin"), (30, "tip_of_nose"), (27, "center_of_nose_root")):
            assert np.allclose(k133[23 + face_k], k308[g.index(twin)])
        assert np.allclose(
            k133[23 + 36], k308[g.index("r_outer_end_of_upper_lash_line")]
        )  # right eye outer corner
        assert np.allclose(k133[23 + 48], k308[g.index("r_outer_corner_of_mouth")])


def test_mirrored_pose_gives_flipped_keypoints():
    """Mirroring a pose maps every point onto its flip_index partner (308 and the 68 iBUG face points)."""
    g = get_scheme("goliath308")
    wb_face = np.array(get_scheme("coco_wholebody133").flip_index[23:91]) - 23
    mirror = np.array([-1.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    for _ in range(10):
        p = _body.sample_person(rng)
        a, b = _body.build_figure(p), _body.build_figure(_body.mirror_params(p))
        np.testing.assert_allclose(b.kp, (a.kp * mirror)[list(g.flip_index)], atol=1e-9)
        np.testing.assert_array_equal(b.kp_hidden, a.kp_hidden[list(g.flip_index)])
        np.testing.assert_allclose(b.ibug, (a.ibug * mirror)[wb_face], atol=1e-9)


def test_left_is_on_the_right_for_a_frontal_figure_and_flip_swaps():
    g = get_scheme("goliath308")
    pairs = [("left_shoulder", "right_shoulder"), ("left_hip", "right_hip")]
    for index in range(4):
        img, people = render_sample(0, index, SIZE, people=(1, 1), yaw_range=(-15, 15), occluders=False)
        kp = people[0]["keypoints"]
        for left, right in pairs:
            li, ri = g.index(left), g.index(right)
            if kp[li, 2] > 0 and kp[ri, 2] > 0:
                assert kp[li, 0] > kp[ri, 0], (index, left)
        # flip the image and the keypoints (x -> W - 1 - x, channels through flip_index): the pixel
        # under each visible point is the same as before, and left stays on the image right
        w = img.shape[1]
        fimg = img[:, ::-1]
        fkp = kp[list(g.flip_index)].copy()
        fkp[:, 0] = np.where(fkp[:, 2] > 0, w - 1 - fkp[:, 0], 0)
        for i in np.flatnonzero(kp[:, 2] == 2):
            j = g.flip_index[i]  # flip_index is an involution: channel j of the flip holds point i
            x, y = int(round(kp[i, 0])), int(round(kp[i, 1]))
            fx, fy = int(round(fkp[j, 0])), int(round(fkp[j, 1]))
            if abs(kp[i, 0] % 1 - 0.5) > 0.01:  # away from rounding ties
                assert np.array_equal(fimg[fy, fx], img[y, x])
        li, ri = g.index("left_shoulder"), g.index("right_shoulder")
        if fkp[li, 2] > 0 and fkp[ri, 2] > 0:
            assert fkp[li, 0] > fkp[ri, 0]


def test_synthesize_coco_json_round_trips(tmp_path):
    from pycocotools.coco import COCO

    path = synthesize(tmp_path / "a", 5, seed=1, size=SIZE, progress=False)
    doc = json.loads(path.read_text())
    assert len(doc["images"]) == 5 and doc["info"]["keypoint_scheme"] == "goliath308"
    assert len(doc["categories"][0]["keypoints"]) == 308
    data = load_coco_keypoints(path, tmp_path / "a" / "images")
    assert data.scheme.name == "goliath308" and not data.missing_images
    people = data.people
    assert len(people) == len(doc["annotations"]) > 0
    # same numbers as the in-memory renderer (JSON keeps 2 decimals)
    _, ref = render_sample(1, 0, SIZE)
    first = [p for p in people if p.image_id == 1]
    assert len(first) == len(ref)
    for p, r in zip(first, ref):
        np.testing.assert_allclose(p.keypoints, r["keypoints"], atol=0.006)
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 5 and len(coco.getAnnIds(iscrowd=False)) == len(people)
    # byte-identical on a second run
    path2 = synthesize(tmp_path / "b", 5, seed=1, size=SIZE, progress=False)
    assert path.read_bytes() == path2.read_bytes()
    for name in ("00000000.jpg", "00000004.jpg"):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (
            tmp_path / "b" / "images" / name
        ).read_bytes()


def test_wholebody_fields_round_trip(tmp_path):
    path = synthesize(tmp_path, 3, seed=2, size=SIZE, scheme="coco_wholebody133", progress=False)
    doc = json.loads(path.read_text())
    ann = doc["annotations"][0]
    for field, k in (
        ("keypoints", 17),
        ("foot_kpts", 6),
        ("face_kpts", 68),
        ("lefthand_kpts", 21),
        ("righthand_kpts", 21),
    ):
        assert len(ann[field]) == 3 * k
    for field in (
        "face_box",
        "lefthand_box",
        "righthand_box",
        "face_valid",
        "lefthand_valid",
        "righthand_valid",
        "foot_valid",
    ):
        assert field in ann
    data = load_coco_keypoints(path)  # image root defaults to <json dir>/images
    assert data.scheme.name == "coco_wholebody133"
    _, ref = render_sample(2, 0, SIZE, scheme="coco_wholebody133")
    got = [p for p in data.people if p.image_id == 1]
    for p, r in zip(got, ref):
        np.testing.assert_allclose(p.keypoints, r["keypoints"], atol=0.006)


@pytest.mark.slow
def test_workers_give_the_same_files(tmp_path):
    one = synthesize(tmp_path / "one", 6, seed=4, size=SIZE, scheme="coco17", workers=1, progress=False)
    two = synthesize(tmp_path / "two", 6, seed=4, size=SIZE, scheme="coco17", workers=2, progress=False)
    assert one.read_bytes() == two.read_bytes()
    for i in range(6):
        name = f"{i:08d}.jpg"
        assert (tmp_path / "one/images" / name).read_bytes() == (tmp_path / "two/images" / name).read_bytes()


def test_cli_helpers(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    args = parser.parse_args(
        [
            str(tmp_path),
            "--num-images",
            "2",
            "--size",
            "128x96",
            "--scheme",
            "coco17",
            "--people",
            "1-2",
            "--no-progress",
        ]
    )
    assert run_synth(args) == 0
    doc = json.loads((tmp_path / "annotations.json").read_text())
    assert len(doc["images"]) == 2 and all(len(a["keypoints"]) == 51 for a in doc["annotations"])
    assert "annotations.json" in capsys.readouterr().out
