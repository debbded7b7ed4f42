"""TopDownDataset: crops and keypoints agree (also flipped / rotated), targets, determinism, bad input, shards."""

import json
from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from finetune.data import (
    AugmentConfig,
    PersonSample,
    StreamDecoder,
    TargetSpec,
    TopDownDataset,
    half_body,
    item_rng,
    truncnorm,
)
from sapiens_lite import codec
from sapiens_lite.errors import UserError
from sapiens_lite.keypoints import get_scheme

SCHEME = get_scheme("coco17")
INPUT = (64, 48)
NO_AUG = AugmentConfig(
    flip_prob=0, half_body_prob=0, shift_prob=0, scale_prob=0, rotate_prob=0, photometric=False
)


def _person_image(tmp_path, name="img.png", size=(240, 320), seed=0):
    """An image with 17 colour-coded dots (keypoint i has a unique red value 60 + 10 i) on black."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.zeros((h, w, 3), np.uint8)
    kpts = np.zeros((17, 3))
    kpts[:, 0] = rng.uniform(0.35 * w, 0.65 * w, 17)
    kpts[:, 1] = np.linspace(0.2 * h, 0.8 * h, 17) + rng.uniform(-3, 3, 17)
    kpts[:, 2] = 2
    for i, (x, y, _) in enumerate(kpts):
        cv2.circle(img, (int(round(x)), int(round(y))), 2, (60 + 10 * i, 255, 0), -1)
        kpts[i, :2] = np.round(kpts[i, :2])
    path = tmp_path / name
    cv2.imwrite(str(path), img[:, :, ::-1])
    x0, y0 = kpts[:, :2].min(0) - 5
    x1, y1 = kpts[:, :2].max(0) + 5
    return PersonSample(str(path), np.array([x0, y0, x1 - x0, y1 - y0]), kpts, image_id=1, ann_id=7), img


def _spec(**kw):
    return TargetSpec(SCHEME, INPUT, sigma=2.0, mean=(0, 0, 0), std=(1, 1, 1), **kw)


def _red_at(item, xy):
    crop = item["img"].numpy().transpose(1, 2, 0)  # un-normalised (mean 0, std 1): RGB 0..255
    x, y = int(round(xy[0])), int(round(xy[1]))
    return crop[y, x, 0], crop[y, x, 1]


def test_val_crop_and_keypoints_agree_and_invert(tmp_path):
    person, _ = _person_image(tmp_path)
    ds = TopDownDataset([person], _spec(), train=False)
    item = ds[0]
    assert item["img"].shape == (3, 64, 48) and item["heatmaps"].shape == (17, 16, 12)
    assert item["target_weight"].tolist() == [1.0] * 17 and item["meta"]["flipped"] is False
    # The box is padded by 1.25 and widened to the 3:4 input aspect.
    bw, bh = person.bbox[2:]
    sw, sh = item["meta"]["scale"].tolist()
    assert sw / sh == pytest.approx(48 / 64) and min(sw / bw, sh / bh) == pytest.approx(1.25)
    # Input-frame keypoints -> image frame through the inverse warp gives the annotations back.
    back = codec.keypoints_to_image(
        item["keypoints"][None].numpy(),
        item["meta"]["center"][None].numpy(),
        item["meta"]["scale"][None].numpy(),
        INPUT,
    )[0]
    np.testing.assert_allclose(back, person.keypoints[:, :2], atol=1e-6)
    # Heatmap maxima sit at the keypoints (heatmap frame = input frame * (h-1)/(H-1)).
    kh = codec.input_to_heatmap(item["keypoints"], INPUT, (16, 12))
    locs, _ = codec.get_heatmap_maximum(item["heatmaps"])
    assert (locs - kh).abs().max() <= 0.5 + 1e-6


@pytest.mark.parametrize("seed", range(6))
def test_augmented_crops_keep_each_keypoint_on_its_own_dot(tmp_path, seed):
    """Flip, rotation, scale, shift: the dot under input keypoint i is keypoint i's (flip_index when flipped)."""
    person, _ = _person_image(tmp_path, size=(480, 640), seed=seed)
    aug = AugmentConfig(flip_prob=0.5, half_body_prob=0, photometric=False, scale_range=(0.9, 1.1))
    ds = TopDownDataset(
        [person],
        TargetSpec(SCHEME, (256, 192), 2.0, (0, 0, 0), (1, 1, 1)),
        train=True,
        augment=aug,
        seed=seed,
    )
    flips, checked = set(), 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        item = ds[0]
        flipped = item["meta"]["flipped"]
        flips.add(flipped)
        for i, xy in enumerate(item["keypoints"].numpy()):
            if not (2 <= xy[0] <= 192 - 3 and 2 <= xy[1] <= 256 - 3):
                continue  # rotated / shifted out of the crop
            checked += 1
            src = SCHEME.flip_index[i] if flipped else i
            red, green = _red_at(item, xy)
            assert green > 100, f"keypoint {i} is not on a dot (epoch {epoch})"
            assert abs(red - (60 + 10 * src)) <= 6, (
                f"keypoint {i} sits on dot {round((red - 60) / 10)}, expected {src}"
            )
    assert checked >= 40


def test_flip_maps_back_to_the_annotation(tmp_path):
    person, img = _person_image(tmp_path)
    aug = AugmentConfig(
        flip_prob=1.0, half_body_prob=0, shift_prob=0, scale_prob=0, rotate_prob=0, photometric=False
    )
    item = TopDownDataset([person], _spec(), train=True, augment=aug)[0]
    assert item["meta"]["flipped"] is True
    back = codec.keypoints_to_image(
        item["keypoints"][None], item["meta"]["center"][None], item["meta"]["scale"][None], INPUT
    )[0].numpy()
    back[:, 0] = img.shape[1] - 1 - back[:, 0]  # undo the mirror
    np.testing.assert_allclose(back, person.keypoints[list(SCHEME.flip_index), :2], atol=1e-3)


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    people = [_person_image(tmp_path, f"{i}.png", seed=i)[0] for i in range(3)]
    spec = _spec()
    a = TopDownDataset(people, spec, train=True, seed=5)
    b = TopDownDataset(people, spec, train=True, seed=5)
    b.set_epoch(0)
    order_b = {i: b[i] for i in (2, 0, 1)}  # another order (as another worker would)
    for i in range(3):
        torch.testing.assert_close(a[i]["img"], order_b[i]["img"])
        torch.testing.assert_close(a[i]["heatmaps"], order_b[i]["heatmaps"])
    a.set_epoch(1)
    assert not torch.equal(a[0]["img"], b[0]["img"])
    c = TopDownDataset(people, spec, train=True, seed=6)
    assert not torch.equal(c[0]["img"], b[0]["img"])
    # Validation items never change.
    v = TopDownDataset(people, spec, train=False)
    x = v[1]["img"]
    v.set_epoch(3)
    torch.testing.assert_close(v[1]["img"], x)


def test_targets_follow_visibility_and_can_be_left_to_the_gpu(tmp_path):
    person, _ = _person_image(tmp_path)
    person.keypoints[3, 2] = 0  # unlabelled
    person.keypoints[4, :] = [-500, -500, 2]  # labelled, far outside the crop
    item = TopDownDataset([person], _spec(), train=False)[0]
    w = item["target_weight"]
    assert w[3] == 0 and w[4] == 0 and w.sum() == 15
    assert item["heatmaps"][3].abs().max() == 0
    lazy = TopDownDataset([person], _spec(), train=False, encode_targets=False)[0]
    assert "heatmaps" not in lazy
    hm, wt = codec.encode_heatmaps(lazy["keypoints"][None], lazy["visible"][None], INPUT, (16, 12), 2.0)
    torch.testing.assert_close(hm[0], item["heatmaps"])
    torch.testing.assert_close(wt[0], w)


def test_half_body_uses_the_scheme_halves():
    rng = np.random.default_rng(0)
    kpts = rng.uniform(0, 100, (17, 2))
    vis = np.ones(17, np.float32)
    aug = AugmentConfig(half_body_prob=1.0, half_body_upper_prob=1.0)
    center, scale = half_body(kpts, vis, SCHEME, aug, rng)
    upper = kpts[SCHEME.upper_body_ids]
    np.testing.assert_allclose(center, upper.mean(0))
    np.testing.assert_allclose(scale, (upper.max(0) - upper.min(0)) * 1.5)
    # One upper keypoint (< min 2) and six lower ones: the lower half, whatever the preference.
    vis[SCHEME.upper_body_ids] = 0
    vis[0] = 1
    center, _ = half_body(kpts, vis, SCHEME, AugmentConfig(half_body_prob=1.0, half_body_min_total=5), rng)
    np.testing.assert_allclose(center, kpts[SCHEME.lower_body_ids].mean(0))
    vis[:] = 0
    vis[:5] = 1  # fewer than min_total labelled: no half-body
    assert half_body(kpts, vis, SCHEME, aug, rng) is None


def test_truncnorm_and_rng():
    x = truncnorm(np.random.default_rng(0), (10000,))
    assert (
        np.abs(x).max() <= 1 and abs(x.mean()) < 0.03 and 0.53 < x.std() < 0.55
    )  # N(0, 1) cut at +-1: std 0.5396
    assert item_rng(1, 2, 3).random() == item_rng(1, 2, 3).random() != item_rng(1, 2, 4).random()


def test_bad_people_are_counted_or_rejected(tmp_path):
    good, _ = _person_image(tmp_path)
    zero_w = PersonSample(good.image_path, np.array([10, 10, 0, 50.0]), good.keypoints, ann_id=2)
    nan_box = PersonSample(good.image_path, np.array([np.nan, 10, 10, 50.0]), good.keypoints, ann_id=3)
    missing = PersonSample(str(tmp_path / "nope.png"), good.bbox, good.keypoints, ann_id=4)
    unlabelled = PersonSample(good.image_path, good.bbox, good.keypoints * [1, 1, 0], ann_id=5)
    ds = TopDownDataset([good, zero_w, nan_box, missing, unlabelled], _spec(), train=True)
    assert len(ds) == 1
    assert ds.skipped == Counter({"no_area": 2, "missing_image": 1, "no_keypoints": 1})
    wrong_k = PersonSample(good.image_path, good.bbox, np.zeros((133, 3)), ann_id=9)
    with pytest.raises(UserError, match=r"annotation 9 .*\(133, 3\), expected \(17, 3\)"):
        TopDownDataset([good, wrong_k], _spec(), train=True, source="train.json")
    with pytest.raises(UserError, match="no usable people"):
        TopDownDataset([missing], _spec(), train=False)


def test_from_coco_json(tmp_path):
    person, _ = _person_image(tmp_path)
    ann = {
        "images": [{"id": 1, "file_name": "img.png", "width": 320, "height": 240}],
        "annotations": [
            {
                "id": 7,
                "image_id": 1,
                "bbox": person.bbox.tolist(),
                "keypoints": person.keypoints.ravel().tolist(),
                "num_keypoints": 17,
                "iscrowd": 0,
                "category_id": 1,
            },
            {
                "id": 8,
                "image_id": 1,
                "bbox": [1, 1, 5, 5],
                "keypoints": [0] * 51,
                "iscrowd": 1,
                "category_id": 1,
            },
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    ds = TopDownDataset.from_coco(path, tmp_path, scheme="coco17", input_size=INPUT, sigma=2.0, train=False)
    assert len(ds) == 1 and ds.skipped["crowd"] == 1
    item = ds[0]
    assert item["meta"]["ann_id"] == 7 and item["meta"]["image_id"] == 1
    batch = torch.utils.data.default_collate([item, item])
    assert batch["img"].shape == (2, 3, 64, 48) and batch["meta"]["center"].shape == (2, 2)
    with pytest.raises(UserError, match="x.json does not exist"):
        TopDownDataset.from_coco(tmp_path / "x.json", tmp_path, scheme="coco17")
    # A missing image file is a counted skip; a keypoint count that is not the scheme's is an error.
    ann["images"].append({"id": 2, "file_name": "gone.png", "width": 320, "height": 240})
    ann["annotations"].append({**ann["annotations"][0], "id": 9, "image_id": 2})
    path.write_text(json.dumps(ann))
    ds = TopDownDataset.from_coco(path, tmp_path, scheme="coco17", input_size=INPUT, train=True)
    assert len(ds) == 1 and ds.skipped["missing_image"] == 1
    with pytest.raises(UserError, match="ann.json.*annotation 7"):
        TopDownDataset.from_coco(path, tmp_path, scheme="coco_wholebody133", input_size=INPUT)


def test_stream_decoder(tmp_path):
    person, img = _person_image(tmp_path)
    ok, jpg = cv2.imencode(".png", img[:, :, ::-1])
    anns = [
        {"id": 7, "bbox": person.bbox.tolist(), "keypoints": person.keypoints.ravel().tolist()},
        {
            "id": 8,
            "bbox": [0, 0, 0, 0],
            "keypoints": person.keypoints.ravel().tolist(),
        },  # degenerate: never chosen
    ]
    decode = StreamDecoder(_spec(), train=True, augment=NO_AUG, image_key="png")
    sample = {
        "__key__": "k",
        "__url__": "s.tar",
        "png": jpg.tobytes(),
        "json": json.dumps({"annotations": anns}).encode(),
        "__seed__": 3,
    }
    item = decode(sample)
    assert item["meta"]["ann_id"] == 7
    ref = TopDownDataset([person], _spec(), train=False)[0]
    torch.testing.assert_close(item["img"], ref["img"])
    torch.testing.assert_close(item["heatmaps"], ref["heatmaps"])
    assert decode({**sample, "json": b'{"annotations": []}'}) is None
    with pytest.raises(UserError, match="s.tar:k"):
        decode({**sample, "png": b"not an image"})


def test_augment_config_validation():
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentConfig(scale_range=(1.5, 0.5))


def test_pose_stream_from_webdataset_shards(tmp_path):
    """build_pose_stream: shards of KEY.png + KEY.json through sapiens_train.stream give the same items."""
    wds = pytest.importorskip("webdataset")
    from types import SimpleNamespace

    from finetune.data import build_pose_stream

    person, img = _person_image(tmp_path)
    _, png = cv2.imencode(".png", img[:, :, ::-1])
    ann = {
        "annotations": [
            {
                "id": 7,
                "image_id": 1,
                "bbox": person.bbox.tolist(),
                "keypoints": person.keypoints.ravel().tolist(),
            }
        ]
    }
    shard = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(4):
            sink.write({"__key__": f"s{i:03d}", "png": png.tobytes(), "json": json.dumps(ann).encode()})
    cfg = SimpleNamespace(
        model=SimpleNamespace(scheme="coco17", input_size=INPUT, sigma=2.0, mean=(0, 0, 0), std=(1, 1, 1)),
        data=SimpleNamespace(train_shards=str(shard), augment=NO_AUG, num_workers=0),
        engine=SimpleNamespace(micro_batch_size=2, seed=0),
    )
    loader = build_pose_stream(cfg, rank=0, world_size=1, image_key="png")
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["img"].shape == (2, 3, 64, 48)
    ref = TopDownDataset([person], _spec(), train=False)[0]
    torch.testing.assert_close(batches[0]["heatmaps"][0], ref["heatmaps"])
    assert batches[1]["meta"]["ann_id"].tolist() == [7, 7]


def test_a_pixel_bomb_is_refused_before_decoding():
    """A 20000 x 20000 single-colour PNG (under 1 MiB) stored as a sample's image: OpenCV would decode it
    (13 s, 2.8 GiB); the decoder refuses it from the header, as the MAE loader's PIL limit does."""
    import io
    import time

    from PIL import Image

    from finetune.data import decode_image_bytes
    from sapiens_lite.errors import UserError

    buf = io.BytesIO()
    Image.new("L", (20000, 20000), 7).save(buf, "PNG")
    assert len(buf.getvalue()) < 2**20
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="shard-0.tar:bomb: .*image is over the .*-pixel limit"):
        decode_image_bytes(buf.getvalue(), "shard-0.tar:bomb")
    assert time.perf_counter() - t0 < 2.0
    small = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(small, "PNG")
    assert decode_image_bytes(small.getvalue(), "ok").shape == (30, 40, 3)
