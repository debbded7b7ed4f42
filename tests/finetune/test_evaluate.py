"""Evaluation metrics: OKS AP equals a direct pycocotools call; PCK on a hand-computed case; NMS; bad input.

The COCO-WholeBody / 308-point part APs are checked in test_evaluate_parts.py.
"""

import contextlib
import io
import logging

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finetune.evaluate import (
    Instance,
    check_gt,
    coco_keypoint_metrics,
    detection_instances,
    format_metrics,
    gt_instances,
    instance_oks,
    nms_areas,
    oks_matrix,
    oks_nms,
    pck,
    rescore,
    to_coco_results,
)
from sapiens_lite.errors import UserError
from sapiens_lite.keypoints import get_scheme


def make_gt_and_results(k: int, seed: int = 0, images: int = 4, people: int = 2):
    """A few images with random people and predictions perturbed by a noise that differs per person."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    results = []
    for img in range(1, images + 1):
        gt["images"].append({"id": img, "file_name": f"{img}.jpg", "width": 640, "height": 480})
        for _ in range(people):
            x0, y0 = rng.uniform(0, 300), rng.uniform(0, 200)
            w, h = rng.uniform(60, 300), rng.uniform(80, 260)
            xy = np.stack([x0 + rng.uniform(0, w, k), y0 + rng.uniform(0, h, k)], 1)
            v = np.where(rng.random(k) < 0.8, 2, 0)
            kp = np.concatenate([xy, v[:, None]], 1)
            kp[v == 0, :2] = 0
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": img,
                    "category_id": 1,
                    "bbox": [x0, y0, w, h],
                    "area": float(w * h),
                    "iscrowd": 0,
                    "num_keypoints": int((v > 0).sum()),
                    "keypoints": kp.reshape(-1).tolist(),
                }
            )
            noise = rng.normal(0, rng.uniform(1, 25), (k, 2))
            pred = np.concatenate([xy + noise, rng.uniform(0.3, 1, (k, 1))], 1)
            results.append(
                {
                    "image_id": img,
                    "category_id": 1,
                    "keypoints": pred.reshape(-1).tolist(),
                    "score": float(rng.random()),
                }
            )
    return gt, results


def direct_cocoeval(gt, results, sigmas):
    """pycocotools used exactly as its docs say, written out here as the reference."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, "keypoints")
        ev.params.kpt_oks_sigmas = np.array(sigmas)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_coco17_ap_matches_direct_pycocotools():
    gt, results = make_gt_and_results(17)
    sigmas = get_scheme("coco17").sigmas
    ours = coco_keypoint_metrics(gt, results, sigmas)
    ref = direct_cocoeval(gt, [dict(r) for r in results], sigmas)
    assert 0.05 < ours["AP"] < 0.95  # a non-trivial case: some hits, some misses
    np.testing.assert_allclose([ours["AP"], ours["AP50"], ours["AR"]], [ref[0], ref[1], ref[5]])
    # Perfect predictions give AP 1.
    perfect = [dict(r, keypoints=a["keypoints"]) for r, a in zip(results, gt["annotations"])]
    assert coco_keypoint_metrics(gt, perfect, sigmas)["AP"] == pytest.approx(1.0)


def test_coco17_ap_follows_xtcocotools_for_unlabelled_people_and_zero_score_results():
    """Like xtcocotools (MMPose's evaluator): a person is ignored when no point is labelled, whatever the
    file's num_keypoints says, and a result whose scores are all 0 is left out."""
    gt, results = make_gt_and_results(17, seed=4)
    sigmas = get_scheme("coco17").sigmas
    gt["annotations"][0]["num_keypoints"] = 99  # stale count: the labels decide
    gt["annotations"][1]["keypoints"][2::3] = [0] * 17  # nothing labelled: ignored
    results[2]["keypoints"][2::3] = [0.0] * 17  # all scores 0: left out
    ours = coco_keypoint_metrics(check_gt(gt, 17), results, sigmas)
    ref_gt = dict(gt, annotations=[dict(a) for a in gt["annotations"]])
    ref_gt["annotations"][0]["num_keypoints"] = 17 - gt["annotations"][0]["keypoints"][2::3].count(0)
    ref_gt["annotations"][1]["num_keypoints"] = 0
    ref = direct_cocoeval(ref_gt, [dict(r) for i, r in enumerate(results) if i != 2], sigmas)
    np.testing.assert_allclose([ours[n] for n in ("AP", "AP50", "AP75", "AR")], ref[[0, 1, 2, 5]], atol=1e-12)


def test_instance_oks_matches_pycocotools_computeoks():
    gt, results = make_gt_and_results(17, seed=6, images=1, people=3)
    sigmas = np.array(get_scheme("coco17").sigmas)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "keypoints")
        ev.params.kpt_oks_sigmas = sigmas
        ev.evaluate()
    dts = sorted(results, key=lambda r: -r["score"])  # the rows of ev.ious: results by falling score
    ours = [
        [instance_oks(a, np.reshape(d["keypoints"], (17, 3))[:, :2], sigmas) for a in gt["annotations"]]
        for d in dts
    ]
    np.testing.assert_allclose(ours, ev.ious[(1, 1)], rtol=1e-12)


def test_pck_hand_computed():
    gt = np.array([[[10.0, 10.0], [50.0, 50.0], [0.0, 0.0]]])  # [1, 3, 2]
    pred = np.array([[[14.0, 13.0], [50.0, 56.0], [100.0, 100.0]]])
    vis = np.array([[True, True, False]])
    # box size 100 -> radius 5: kp0 is at distance 5 (hit, <=), kp1 at 6 (miss), kp2 invisible.
    assert pck(pred, gt, vis, np.array([100.0]), 0.05) == pytest.approx(0.5)
    assert pck(pred, gt, vis, np.array([120.0]), 0.05) == pytest.approx(1.0)


def test_rescore_and_results_format():
    s = rescore(np.array([0.5, 1.0]), np.array([[0.1, 0.9, 0.7], [0.1, 0.1, 0.1]]), thr=0.2)
    np.testing.assert_allclose(s, [0.5 * 0.8, 0.0])
    ins = [Instance(3, "a.jpg", (0, 0, 10, 10), 0.5)]
    res = to_coco_results(ins, np.zeros((1, 17, 2)), np.full((1, 17), 0.6))
    assert (
        res[0]["category_id"] == 1
        and len(res[0]["keypoints"]) == 51
        and res[0]["score"] == pytest.approx(0.3)
    )


def test_oks_nms_drops_duplicates_keeps_distinct():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 100, (17, 2))
    kpts = np.stack([a, a + 0.5, a + 300])  # 0 and 1 are the same person
    for convention in ("mmpose", "box"):
        keep = oks_nms(
            kpts,
            np.array([0.8, 0.9, 0.7]),
            np.full(3, 100.0 * 100.0),
            get_scheme("coco17").sigmas,
            0.9,
            convention=convention,
        )
        assert keep == [1, 2]


def _mmpose_oks_iou(g, d, a_g, a_d, sigmas):
    """MMPose's oks_iou (mmpose/evaluation/functional/nms.py), written out from its source: the reference."""
    var = (np.asarray(sigmas) * 2) ** 2
    ious = np.zeros(len(d), dtype=np.float32)
    for n in range(len(d)):
        e = (
            ((d[n, :, 0] - g[:, 0]) ** 2 + (d[n, :, 1] - g[:, 1]) ** 2)
            / var
            / ((a_g + a_d[n]) / 2 + np.spacing(1))
            / 2
        )
        ious[n] = np.sum(np.exp(-e)) / len(e)
    return ious


def test_oks_nms_conventions_on_two_poses_3px_apart_in_a_60x160_box():
    """Two poses 3 px apart (x and y) in a 60x160 box: the raw box area gives OKS 0.900 (both kept at 0.9),
    MMPose's padded, aspect-fixed crop area (150 x 200 for a 3:4 input) gives 0.965 (one kept)."""
    sigmas = np.array(get_scheme("coco17").sigmas)
    rng = np.random.default_rng(1)
    a = np.stack([rng.uniform(100, 160, 17), rng.uniform(50, 210, 17)], 1)
    kpts = np.stack([a, a + 3.0])
    ins = [Instance(1, "a.jpg", (100.0, 50.0, 60.0, 160.0), s) for s in (0.9, 0.8)]
    box, mm = nms_areas(ins, "box"), nms_areas(ins, "mmpose", input_size=(256, 192))
    np.testing.assert_allclose(box, [9600.0, 9600.0])
    np.testing.assert_allclose(mm, [150.0 * 200.0] * 2)
    scores = np.array([0.9, 0.8])

    oks_box = oks_matrix(kpts, np.full((2, 2), 9600.0), sigmas)[0, 1]
    ref_mm = _mmpose_oks_iou(kpts[0], kpts[1:], mm[0], mm[1:], sigmas)[0]
    assert round(oks_box, 3) == 0.900 and round(float(ref_mm), 3) == 0.965
    assert oks_nms(kpts, scores, box, sigmas, 0.9, convention="box") == [0, 1]
    assert oks_nms(kpts, scores, mm, sigmas, 0.9, convention="mmpose") == [0]

    # Equal scores: MMPose visits scores.argsort()[::-1], so the later pose is the one kept.
    tie = np.array([0.5, 0.5])
    assert oks_nms(kpts, tie, mm, sigmas, 0.9, convention="mmpose") == [1]
    assert oks_nms(kpts, tie, mm, sigmas, 0.99, convention="box") == [0, 1]
    assert oks_nms(kpts, tie, np.full(2, 1e6), sigmas, 0.9, convention="box") == [0]


def test_oks_nms_mmpose_convention_matches_mmpose_reference_on_random_poses():
    """MMPose's oks_nms loop (written out from its source) on crowded random poses keeps the same poses."""
    sigmas = np.array(get_scheme("coco17").sigmas)
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 200, (4, 17, 2))
    kpts = np.concatenate([base + rng.normal(0, s, base.shape) for s in (0.5, 2.0, 4.0)])  # [12, 17, 2]
    scores = rng.uniform(0, 1, len(kpts))
    areas = rng.uniform(2000, 20000, len(kpts))
    order, ref = scores.argsort()[::-1], []
    while len(order):
        i = order[0]
        ref.append(int(i))
        ovr = _mmpose_oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas)
        order = order[np.where(ovr <= 0.9)[0] + 1]
    ours = oks_nms(kpts, scores, areas, sigmas, 0.9, convention="mmpose")
    assert ours == ref and 4 <= len(ours) < 12


def test_bad_input_errors_and_skips():
    gt, _ = make_gt_and_results(17, images=1)
    with pytest.raises(UserError, match="expected 133"):
        check_gt(gt, 133, "val.json")
    gt = check_gt(gt, 17)
    gt["annotations"][0]["bbox"] = [5, 5, 0, 10]  # degenerate box: counted and skipped
    inst, skipped = gt_instances(gt)
    assert skipped == 1 and len(inst) == 1
    dets = [
        {"image_id": 1, "bbox": [0, 0, 50, 80], "score": 0.9},
        {"image_id": 1, "bbox": [0, 0, 50, 80], "score": 0.1},
    ]
    inst, _ = detection_instances(gt, dets, score_thr=0.5)
    assert len(inst) == 1
    with pytest.raises(UserError, match="lacks"):
        detection_instances(gt, [{"image_id": 1}])


def test_check_gt_without_area_warns_naming_file_count_and_rule(caplog):
    gt, _ = make_gt_and_results(17, images=2)
    for a in gt["annotations"][:3]:
        del a["area"]
    with caplog.at_level(logging.WARNING, logger="finetune.evaluate"):
        out = check_gt(gt, 17, "val.json")
    msg = caplog.text
    assert "val.json" in msg and "3 of 4 annotations" in msg and "0.53 x box width x height" in msg
    w, h = gt["annotations"][0]["bbox"][2:]
    assert out["annotations"][0]["area"] == pytest.approx(0.53 * w * h)
    assert out["annotations"][3]["area"] == gt["annotations"][3]["area"]


def test_gt_instances_follow_mmpose_clip_order_and_filters():
    gt, _ = make_gt_and_results(17, images=1, people=4)
    anns = gt["annotations"]
    anns[0]["id"], anns[1]["id"] = 20, 10  # MMPose's order is the annotation id
    anns[1]["bbox"] = [-10.0, 400.0, 100.0, 200.0]  # sticks out of the 640x480 image: clipped
    anns[2]["iscrowd"] = 1
    anns[3]["num_keypoints"] = 0  # the file's count decides, as in MMPose's dataset
    inst, skipped = gt_instances(check_gt(gt, 17))
    assert skipped == 0 and [i.ann_index for i in inst] == [1, 0]
    assert inst[0].bbox == pytest.approx((0.0, 400.0, 90.0, 79.0))


def test_format_metrics_table():
    m = dict.fromkeys(["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"], 0.5)
    m.update(
        {"body/AP": 0.61234, "PCK@0.05": 0.25, "num_instances": 7, "skipped_boxes": 0, "missing_images": 1}
    )
    text = format_metrics(m, ("body",))
    lines = text.splitlines()
    assert lines[0].split() == ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
    assert lines[1].split()[:2] == ["body", "0.612"] and lines[1].split()[2] == "-"
    assert lines[2].split()[0] == "wholebody" and lines[2].split()[1] == "0.500"
    assert "PCK@0.05 0.250" in text and "7 people evaluated" in text and "1 images missing" in text
    assert format_metrics(m).splitlines()[1].split()[0] == "all"


def test_write_overlays_ranks_people_by_their_best_oks(tmp_path):
    import cv2

    from finetune.evaluate import write_overlays

    gt, results = make_gt_and_results(17, seed=8, images=3, people=2)
    (tmp_path / "img").mkdir()
    for im in gt["images"]:
        cv2.imwrite(str(tmp_path / "img" / im["file_name"]), np.full((480, 640, 3), 127, np.uint8))
    anns = gt["annotations"]
    results[0]["keypoints"] = list(anns[0]["keypoints"])  # a perfect prediction: OKS 1
    gt = check_gt(gt, 17)
    scheme = get_scheme("coco17")
    written = write_overlays(tmp_path / "ov", gt, results, tmp_path / "img", scheme, count=2)
    assert [p.name for p, _ in written] == ["best_1.jpg", "best_2.jpg", "worst_1.jpg", "worst_2.jpg"]
    best_oks = []
    for a in gt["annotations"]:  # each person's best OKS over the results of its image
        preds = [
            np.reshape(r["keypoints"], (17, 3))[:, :2] for r in results if r["image_id"] == a["image_id"]
        ]
        best_oks.append(max(instance_oks(a, xy, scheme.sigmas) for xy in preds))
    ranked = sorted(best_oks)
    assert [o for _, o in written] == pytest.approx([ranked[-1], ranked[-2], ranked[0], ranked[1]])
    assert written[0][1] == pytest.approx(1.0)


def _tiny_model(scheme="coco17"):
    import torch

    from sapiens_lite.models.pose import build_pose_model

    torch.manual_seed(0)
    return build_pose_model("vit_test", scheme, input_size=(64, 48)).eval()


def _write_val_set(tmp_path, k=17, images=2):
    import json

    import cv2

    gt, _ = make_gt_and_results(k, seed=3, images=images)
    (tmp_path / "img").mkdir()
    for im in gt["images"]:
        cv2.imwrite(str(tmp_path / "img" / im["file_name"]), np.full((480, 640, 3), 127, np.uint8))
    (tmp_path / "val.json").write_text(json.dumps(gt))
    return gt


def test_evaluate_model_end_to_end_writes_results_and_counts_missing_images(tmp_path):
    import json

    import cv2

    from finetune.config import EvalConfig
    from finetune.evaluate import evaluate_model

    gt = _write_val_set(tmp_path, images=3)
    (tmp_path / "img" / gt["images"][0]["file_name"]).unlink()  # a missing image: counted, skipped
    m = evaluate_model(
        _tiny_model(),
        tmp_path / "val.json",
        tmp_path / "img",
        EvalConfig(batch_size=3),
        out_dir=tmp_path / "out",
        progress=False,
    )
    assert m["missing_images"] == 1 and m["num_instances"] == 4
    assert 0.0 <= m["AP"] <= 1.0 and "PCK@0.05" in m
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(res) == 4 and len(res[0]["keypoints"]) == 51 and res[0]["category_id"] == 1
    # The keypoints are mapped back into the image: inside (a padded) box of their person.
    boxes = {a["image_id"]: a["bbox"] for a in gt["annotations"]}
    x, y = np.array(res[0]["keypoints"][0::3]), np.array(res[0]["keypoints"][1::3])
    assert np.isfinite(x).all() and (x > -200).all() and (y < 700).all()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["AP"] == m["AP"]
    assert boxes  # (used above only for the sanity bound)
    # Overlays: 4 people on readable images -> the 2 best and the 2 worst.
    shots = sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir())
    assert shots == ["best_1.jpg", "best_2.jpg", "worst_1.jpg", "worst_2.jpg"]
    panel = cv2.imread(str(tmp_path / "out" / "overlays" / "worst_1.jpg"))
    assert panel.shape[0] > 384 and panel.shape[1] > panel.shape[0]  # two panels side by side


def test_evaluate_model_with_detections_applies_nms(tmp_path):
    import json

    from finetune.config import EvalConfig
    from finetune.evaluate import evaluate_model

    gt = _write_val_set(tmp_path, images=1)
    box = gt["annotations"][0]["bbox"]
    dets = [
        {"image_id": 1, "bbox": box, "score": 0.9, "category_id": 1},
        {"image_id": 1, "bbox": [box[0] + 0.5, box[1], box[2], box[3]], "score": 0.8, "category_id": 1},
        {"image_id": 1, "bbox": box, "score": 0.01, "category_id": 1},
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    cfg = EvalConfig(detections=str(tmp_path / "dets.json"), det_score_thr=0.05, flip_test=False)
    m = evaluate_model(
        _tiny_model(), tmp_path / "val.json", tmp_path / "img", cfg, out_dir=tmp_path / "o", progress=False
    )
    assert m["num_instances"] == 2 and "PCK@0.05" not in m
    # Two boxes on one person give near-identical poses: OKS-NMS keeps one.
    assert len(json.loads((tmp_path / "o" / "results.json").read_text())) == 1
