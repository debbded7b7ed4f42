"""Evaluation metrics: our OKS AP equals a direct pycocotools call; PCK on a hand-computed case; NMS; bad input."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finetune.evaluate import (
    Instance,
    check_gt,
    coco_keypoint_metrics,
    detection_instances,
    gt_instances,
    oks_nms,
    pck,
    rescore,
    to_coco_results,
    wholebody_metrics,
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


def test_wholebody_part_ap_matches_direct_pycocotools_on_the_slice():
    gt, results = make_gt_and_results(133, seed=1)
    sigmas = np.array(get_scheme("coco_wholebody133").sigmas)
    ours = wholebody_metrics(gt, results, sigmas)
    assert set(ours) >= {"body/AP", "foot/AP", "face/AP", "lefthand/AP", "righthand/AP", "wholebody/AP"}
    a, b = 91, 112  # left hand
    gt_part = dict(
        gt, annotations=[dict(x, keypoints=x["keypoints"][3 * a : 3 * b]) for x in gt["annotations"]]
    )
    res_part = [dict(r, keypoints=r["keypoints"][3 * a : 3 * b]) for r in results]
    ref = direct_cocoeval(gt_part, res_part, sigmas[a:b])
    assert ours["lefthand/AP"] == pytest.approx(ref[0])
    ref_all = direct_cocoeval(gt, [dict(r) for r in results], sigmas)
    assert ours["wholebody/AP"] == pytest.approx(ref_all[0])
    assert ours["face/AP"] != ours["body/AP"]  # parts really differ


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
    keep = oks_nms(
        kpts, np.array([0.8, 0.9, 0.7]), np.full(3, 100.0 * 100.0), get_scheme("coco17").sigmas, 0.9
    )
    assert keep == [1, 2]


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
