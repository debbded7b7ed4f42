"""COCO-format readers: 17 / WholeBody 133 / 308 points, validation errors that name file and annotation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sapiens_lite.errors import UserError
from sapiens_train.coco import load_coco_keypoints


def _kp(k: int, v: int = 2) -> list[float]:
    return [float(x) for i in range(k) for x in (10 + i % 30, 20 + i % 40, v)]


def _ann(aid: int, k: int = 17, image_id: int = 1, bbox=(5, 5, 40, 60), **extra) -> dict:
    return {
        "id": aid,
        "image_id": image_id,
        "category_id": 1,
        "bbox": list(bbox),
        "area": 100.0,
        "iscrowd": 0,
        "keypoints": _kp(k),
        **extra,
    }


def _write(tmp_path, anns, images=None, make_files=True, name="ann.json") -> str:
    images = images if images is not None else [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}]
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    if make_files:
        for img in images:
            (root / img["file_name"]).write_bytes(b"jpg")
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return str(p)


def test_coco17_loads(tmp_path):
    path = _write(tmp_path, [_ann(1), _ann(2, bbox=(90, 70, 30, 30))])
    data = load_coco_keypoints(path, tmp_path / "imgs")
    assert data.scheme.name == "coco17" and len(data.images) == 1
    img = data.images[0]
    assert img.path == tmp_path / "imgs" / "a.jpg" and (img.width, img.height) == (100, 80)
    a, b = img.people
    assert a.keypoints.shape == (17, 3) and a.keypoints.dtype == np.float32
    assert a.annotation_id == 1 and a.image_id == 1 and a.num_keypoints == 17
    np.testing.assert_allclose(b.bbox, [90, 70, 10, 10])  # clipped to the image
    assert sum(data.skipped.values()) == 0 and "2 people" in data.summary()


def test_goliath308_and_explicit_scheme(tmp_path):
    path = _write(tmp_path, [_ann(1, k=308)])
    assert load_coco_keypoints(path, tmp_path / "imgs").scheme.name == "goliath308"
    with pytest.raises(UserError, match=r"annotation 1 has 924 keypoint values; scheme coco17 needs 51"):
        load_coco_keypoints(path, tmp_path / "imgs", scheme="coco17")


def test_wholebody_parts_join_in_133_order(tmp_path):
    parts = {"foot_kpts": 6, "face_kpts": 68, "lefthand_kpts": 21, "righthand_kpts": 21}
    ann = _ann(7)
    for i, (field, k) in enumerate(parts.items()):
        ann[field] = [float(x) for _ in range(k) for x in (i + 1, i + 1, 2)]
    ann["face_box"], ann["face_valid"] = [1, 2, 3, 4], True
    path = _write(tmp_path, [ann])
    data = load_coco_keypoints(path, tmp_path / "imgs")
    assert data.scheme.name == "coco_wholebody133"
    kp = data.people[0].keypoints
    assert kp.shape == (133, 3)
    np.testing.assert_array_equal(kp[:17], np.asarray(_kp(17), np.float32).reshape(17, 3))
    assert (
        (kp[17:23, 0] == 1).all()
        and (kp[23:91, 0] == 2).all()
        and (kp[91:112, 0] == 3).all()
        and (kp[112:, 0] == 4).all()
    )
    assert data.people[0].extra == {"face_box": [1, 2, 3, 4], "face_valid": True}
    del ann["lefthand_kpts"]
    path = _write(tmp_path, [ann], name="broken.json")
    with pytest.raises(
        UserError, match=r"broken.json: annotation 7: COCO-WholeBody field 'lefthand_kpts'.*missing"
    ):
        load_coco_keypoints(path, tmp_path / "imgs")


def test_bad_json_and_missing_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"images": [')
    with pytest.raises(UserError, match=r"bad.json: not valid JSON"):
        load_coco_keypoints(p)
    with pytest.raises(UserError, match=r"nope.json does not exist"):
        load_coco_keypoints(tmp_path / "nope.json")
    p.write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match=r"bad.json: missing list 'annotations'"):
        load_coco_keypoints(p)


def test_wrong_keypoint_count_names_annotation(tmp_path):
    path = _write(tmp_path, [_ann(1), _ann(42, k=16)])
    with pytest.raises(
        UserError, match=r"ann.json: annotation 42 has 48 keypoint values; scheme coco17 needs 51"
    ):
        load_coco_keypoints(path, tmp_path / "imgs")
    path = _write(tmp_path, [_ann(3, k=20)], name="k20.json")
    with pytest.raises(
        UserError,
        match=r"k20.json: annotation 3: no built-in keypoint scheme has 20 keypoints.*17 \(coco17\)",
    ):
        load_coco_keypoints(path, tmp_path / "imgs")


def test_missing_image_files_are_reported(tmp_path):
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
        {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80},
    ]
    path = _write(tmp_path, [_ann(1), _ann(2, image_id=2)], images=images)
    (tmp_path / "imgs" / "b.jpg").unlink()
    data = load_coco_keypoints(path, tmp_path / "imgs")
    assert [img.image_id for img in data.images] == [1]
    assert data.skipped["missing_image"] == 1 and data.missing_images == [str(tmp_path / "imgs" / "b.jpg")]
    assert "1 image files missing" in data.summary()
    with pytest.raises(UserError, match=r"ann.json: image 2 file .*b.jpg does not exist"):
        load_coco_keypoints(path, tmp_path / "imgs", skip_invalid=False)
    assert len(load_coco_keypoints(path, tmp_path / "imgs", check_images=False).images) == 2


def test_boxes_without_area_or_outside_are_skipped_or_raise(tmp_path):
    anns = [
        _ann(1),
        _ann(2, bbox=(5, 5, 0, 10)),
        _ann(3, bbox=(200, 5, 10, 10)),
        _ann(4, bbox=(-30, -30, 20, 20)),
    ]
    path = _write(tmp_path, anns)
    data = load_coco_keypoints(path, tmp_path / "imgs")
    assert [p.annotation_id for p in data.people] == [1]
    assert data.skipped["no_area"] == 1 and data.skipped["outside_image"] == 2
    with pytest.raises(UserError, match=r"annotation 2: box \[5, 5, 0, 10\] has no area"):
        load_coco_keypoints(path, tmp_path / "imgs", skip_invalid=False)
    path = _write(tmp_path, [_ann(1), _ann(3, bbox=(200, 5, 10, 10))], name="out.json")
    with pytest.raises(UserError, match=r"out.json: annotation 3: box .* outside its 100x80 image"):
        load_coco_keypoints(path, tmp_path / "imgs", skip_invalid=False)


def test_crowd_and_unlabelled_people_are_skipped(tmp_path):
    empty = _ann(3)
    empty["keypoints"] = _kp(17, v=0)
    path = _write(tmp_path, [_ann(1), _ann(2, iscrowd=1), empty, _ann(4, category_id=9)])
    data = load_coco_keypoints(path, tmp_path / "imgs")
    assert [p.annotation_id for p in data.people] == [1]
    assert (
        data.skipped["crowd"] == 1 and data.skipped["no_keypoints"] == 1 and data.skipped["not_person"] == 1
    )
    kept = load_coco_keypoints(path, tmp_path / "imgs", require_keypoints=False)
    assert [p.annotation_id for p in kept.people] == [1, 3]


def test_structural_errors_name_the_annotation(tmp_path):
    path = _write(tmp_path, [_ann(5, image_id=99)])
    with pytest.raises(UserError, match=r"annotation 5: image_id 99 is not in 'images'"):
        load_coco_keypoints(path, tmp_path / "imgs")
    path = _write(tmp_path, [_ann(6, bbox=(1, 2, 3))], name="box.json")
    with pytest.raises(UserError, match=r"box.json: annotation 6: 'bbox' must be \[x, y, w, h\]"):
        load_coco_keypoints(path, tmp_path / "imgs")
    path = _write(tmp_path, [_ann(1), _ann(1)], name="dup.json")
    with pytest.raises(UserError, match=r"dup.json: annotation 1: annotation id appears twice"):
        load_coco_keypoints(path, tmp_path / "imgs")
    nan = _ann(8)
    nan["keypoints"][0] = float("nan")
    path = _write(tmp_path, [nan], name="nan.json")
    with pytest.raises(UserError, match=r"annotation 8: keypoints hold NaN"):
        load_coco_keypoints(path, tmp_path / "imgs")


def test_image_size_from_file_when_json_lacks_it(tmp_path):
    from PIL import Image

    images = [{"id": 1, "file_name": "a.png"}]
    path = _write(tmp_path, [_ann(1)], images=images, make_files=False)
    Image.new("RGB", (64, 48)).save(tmp_path / "imgs" / "a.png")
    img = load_coco_keypoints(path, tmp_path / "imgs").images[0]
    assert (img.width, img.height) == (64, 48)
    np.testing.assert_allclose(img.people[0].bbox, [5, 5, 40, 43])  # clipped to 48 rows
