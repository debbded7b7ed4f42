"""Per-part APs (COCO-WholeBody 133, Sapiens/Goliath 308) against references built without our code.

The references: pycocotools run on each part by itself, with every person's `num_keypoints` set to its
labelled count in the part and the results that have no score > 0 in the part left out (what the issue
tracker states xtcocotools does); and, where it imports, xtcocotools itself, run the way MMPose's
CocoWholeBodyMetric and Sapiens' GoliathMetric run it on files in the official split-field layout.
"""

import contextlib
import io
import json
import warnings

import cv2
import numpy as np
import pytest

from finetune.evaluate import check_gt, coco_keypoint_metrics, part_metrics
from sapiens_lite.keypoints import get_scheme
from tests.finetune.test_evaluate import direct_cocoeval

try:
    from xtcocotools.coco import COCO as XtCOCO
    from xtcocotools.cocoeval import COCOeval as XtCOCOeval
except Exception:  # absent, or PyPI's wheel built against numpy 1 ("numpy.dtype size changed")
    XtCOCO = XtCOCOeval = None
needs_xtcocotools = pytest.mark.skipif(
    XtCOCO is None,
    reason="xtcocotools not importable; PyPI's wheel needs numpy 1, build it: pip install cython && "
    "pip install --no-build-isolation --no-binary xtcocotools xtcocotools",
)

# COCO-WholeBody as its paper and official files define it: field -> keypoint indices in the 133 order.
WHOLEBODY_FIELDS = {
    "keypoints": range(0, 17),
    "foot_kpts": range(17, 23),
    "face_kpts": range(23, 91),
    "lefthand_kpts": range(91, 112),
    "righthand_kpts": range(112, 133),
}
PART_OF_FIELD = {
    "keypoints": "body",
    "foot_kpts": "foot",
    "face_kpts": "face",
    "lefthand_kpts": "lefthand",
    "righthand_kpts": "righthand",
}
STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def goliath_fields() -> dict[str, list[int]]:
    """The 308 points in Sapiens' GoliathMetric split (17 body in COCO order, 6 feet, 238 face, 20 + 20 hand
    points without the wrists; the 7 arm / neck points only in the whole-body AP), from the names."""
    names = get_scheme("goliath308").names
    coco17 = get_scheme("coco17").names
    finger = ("thumb", "finger")
    return {
        "keypoints": [names.index(n) for n in coco17],
        "foot_kpts": [i for i, n in enumerate(names) if n.endswith(("_toe", "_heel"))],
        "face_kpts": list(range(names.index("neck") + 1, 308)),
        "lefthand_kpts": [
            i for i, n in enumerate(names) if n.startswith("left_") and any(f in n for f in finger)
        ],
        "righthand_kpts": [
            i for i, n in enumerate(names) if n.startswith("right_") and any(f in n for f in finger)
        ],
    }


def make_people(fields: dict, k: int, seed: int, images: int = 8, people: int = 4):
    """GT people [K, 3] with boxes and areas across the small / medium / large ranges; many lack the
    labels of whole parts (hands, face, feet, even the body), a few points are unlabelled at random; one
    crowd region. Returns (images, people) with people = [{image_id, bbox, area, iscrowd, kp}]."""
    rng = np.random.default_rng(seed)
    imgs, out = [], []
    for img in range(1, images + 1):
        imgs.append({"id": img, "file_name": f"{img:03d}.jpg", "width": 640, "height": 640})
        for _ in range(people):
            w, h = rng.uniform(15, 400), rng.uniform(20, 400)
            x0, y0 = rng.uniform(0, 220), rng.uniform(0, 220)
            kp = np.zeros((k, 3))
            kp[:, 0], kp[:, 1] = x0 + rng.uniform(0, w, k), y0 + rng.uniform(0, h, k)
            kp[:, 2] = rng.choice([1, 2], k)
            kp[rng.random(k) < 0.15, 2] = 0
            for ids in fields.values():
                if rng.random() < 0.3:  # this part is not labelled for this person
                    kp[list(ids), 2] = 0
            kp[kp[:, 2] == 0, :2] = 0
            out.append({"image_id": img, "bbox": [x0, y0, w, h], "area": 0.6 * w * h, "iscrowd": 0, "kp": kp})
    out.append(
        {
            "image_id": 1,
            "bbox": [300.0, 300.0, 200.0, 200.0],
            "area": 30000.0,
            "iscrowd": 1,
            "kp": np.zeros((k, 3)),
        }
    )
    return imgs, out


def split_gt(imgs, people, fields) -> dict:
    """A GT file in the official COCO-WholeBody layout (per-part fields, *_valid, *_box)."""
    anns = []
    for i, p in enumerate(people):
        a = {
            "id": 1000 + i,
            "image_id": p["image_id"],
            "category_id": 1,
            "bbox": p["bbox"],
            "area": p["area"],
            "iscrowd": p["iscrowd"],
            "segmentation": [],
        }
        for name, ids in fields.items():
            a[name] = p["kp"][list(ids)].reshape(-1).tolist()
        a["num_keypoints"] = int((p["kp"][list(fields["keypoints"]), 2] > 0).sum())  # body count, as the file
        for part in [PART_OF_FIELD[f] for f in fields if f != "keypoints"]:
            a[f"{part}_valid"] = bool((np.asarray(a[f"{part}_kpts"][2::3]) > 0).any())
            if part != "foot":
                a[f"{part}_box"] = [0.0, 0.0, 0.0, 0.0] if not a[f"{part}_valid"] else p["bbox"]
        anns.append(a)
    return {"images": imgs, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}


def joined_gt(imgs, people) -> dict:
    """The same people with all K points in `keypoints`."""
    anns = [
        {
            "id": 1000 + i,
            "image_id": p["image_id"],
            "category_id": 1,
            "bbox": p["bbox"],
            "area": p["area"],
            "iscrowd": p["iscrowd"],
            "keypoints": p["kp"].reshape(-1).tolist(),
        }
        for i, p in enumerate(people)
    ]
    return {"images": imgs, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}


def noisy_predictions(people, fields, k: int, seed: int) -> list[np.ndarray]:
    """One prediction [K, 3] per non-crowd person (noise of 0.5-20 px, scores in (0.05, 1), a part's
    scores all 0 for some) and one false positive per image. Returns [(image_id, [K, 3], score)]."""
    rng = np.random.default_rng(seed)
    out = []
    for p in people:
        if p["iscrowd"]:
            continue
        x0, y0, w, h = p["bbox"]
        xy = np.where(p["kp"][:, 2:] > 0, p["kp"][:, :2], [x0 + w / 2, y0 + h / 2])
        pred = np.concatenate(
            [xy + rng.normal(0, rng.uniform(0.5, 20), (k, 2)), rng.uniform(0.05, 1, (k, 1))], 1
        )
        if rng.random() < 0.25:
            pred[list(list(fields.values())[rng.integers(len(fields))]), 2] = 0
        out.append((p["image_id"], pred, float(rng.uniform(0.2, 1))))
    for img in sorted({p["image_id"] for p in people}):
        pred = np.concatenate([rng.uniform(0, 600, (k, 2)), rng.uniform(0.05, 1, (k, 1))], 1)
        out.append((img, pred, float(rng.uniform(0, 0.5))))
    return out


def joined_results(preds) -> list[dict]:
    return [
        {"image_id": i, "category_id": 1, "keypoints": p.reshape(-1).tolist(), "score": s}
        for i, p, s in preds
    ]


def split_results(preds, fields) -> list[dict]:
    """Results in MMPose's CocoWholeBodyMetric.results2json layout."""
    out = []
    for i, p, s in preds:
        r = {"image_id": i, "category_id": 1, "score": s}
        r.update({name: p[list(ids)].reshape(-1).tolist() for name, ids in fields.items()})
        out.append(r)
    return out


def reference_part(split: dict, results_split: list[dict], field: str, sigmas) -> np.ndarray:
    """pycocotools on one part field: num_keypoints = the labelled count in the part, results without a
    score > 0 in the part left out."""
    anns = []
    for a in split["annotations"]:
        kp = a[field]
        anns.append(
            {
                "id": a["id"],
                "image_id": a["image_id"],
                "category_id": 1,
                "bbox": a["bbox"],
                "area": a["area"],
                "iscrowd": a["iscrowd"],
                "keypoints": kp,
                "num_keypoints": sum(v > 0 for v in kp[2::3]),
            }
        )
    res = [
        {"image_id": r["image_id"], "category_id": 1, "keypoints": r[field], "score": r["score"]}
        for r in results_split
        if any(s > 0 for s in r[field][2::3])
    ]
    return direct_cocoeval(dict(split, annotations=anns), res, sigmas)


def xtcocotools_stats(tmp_path, split: dict, results_split: list[dict], iou_type: str, sigmas) -> np.ndarray:
    """xtcocotools as MMPose's CocoWholeBodyMetric runs it: GT and results from files, use_area=True."""
    gt_file, res_file = tmp_path / "gt.json", tmp_path / "res.json"
    gt_file.write_text(json.dumps(split))
    res_file.write_text(json.dumps(results_split))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "'foot_score' not found, use 'score' instead": as in MMPose
        coco = XtCOCO(str(gt_file))
        ev = XtCOCOeval(coco, coco.loadRes(str(res_file)), iou_type, np.asarray(sigmas), use_area=True)
        ev.params.useSegm = None
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


@pytest.fixture(scope="module")
def wholebody():
    imgs, people = make_people(WHOLEBODY_FIELDS, 133, seed=0)
    split = split_gt(imgs, people, WHOLEBODY_FIELDS)
    preds = noisy_predictions(people, WHOLEBODY_FIELDS, 133, seed=1)
    return split, people, preds


def test_official_split_file_gt_as_predictions_gives_one_for_every_part(wholebody):
    split, people, _ = wholebody
    lacking = {
        f: sum(not (p["kp"][list(ids), 2] > 0).any() for p in people) for f, ids in WHOLEBODY_FIELDS.items()
    }
    assert all(n >= 3 for n in lacking.values()), lacking  # people without hands / face / feet / body labels
    gt = check_gt(split, 133, "coco_wholebody_val.json")  # the official layout is read
    results = [
        {"image_id": p["image_id"], "category_id": 1, "keypoints": p["kp"].reshape(-1).tolist(), "score": 1.0}
        for p in people
        if not p["iscrowd"]
    ]
    scheme = get_scheme("coco_wholebody133")
    m = coco_keypoint_metrics(gt, results, scheme.sigmas, area_keypoints=scheme.parts["body"])
    m.update({k.replace("/", " "): v for k, v in part_metrics(gt, results, scheme).items()})
    for part in ("body", "foot", "face", "lefthand", "righthand"):
        assert m[f"{part} AP"] == pytest.approx(1.0) and m[f"{part} AR"] == pytest.approx(1.0), part
    assert m["AP"] == pytest.approx(1.0) and m["AR"] == pytest.approx(1.0)


def test_noisy_part_aps_equal_per_part_pycocotools_reference(wholebody):
    split, _, preds = wholebody
    scheme = get_scheme("coco_wholebody133")
    ours = part_metrics(check_gt(split, 133, "val.json"), joined_results(preds), scheme)
    sigmas = np.array(scheme.sigmas)
    results_split = split_results(preds, WHOLEBODY_FIELDS)
    aps = []
    for field, ids in WHOLEBODY_FIELDS.items():
        ref = reference_part(split, results_split, field, sigmas[list(ids)])
        part = PART_OF_FIELD[field]
        # AP / AR over all sizes; medium / large also depend on results' areas (checked with xtcocotools).
        for i in (0, 1, 2, 5, 6, 7):
            assert ours[f"{part}/{STATS[i]}"] == pytest.approx(ref[i], abs=1e-9), (part, STATS[i])
        aps.append(ref[0])
    assert len({round(a, 6) for a in aps}) == 5 and 0.01 < min(aps) and max(aps) < 0.95  # non-trivial


@needs_xtcocotools
def test_wholebody_matches_xtcocotools_as_mmpose_runs_it(wholebody, tmp_path):
    split, _, preds = wholebody
    scheme = get_scheme("coco_wholebody133")
    gt = check_gt(split, 133, "val.json")
    results = joined_results(preds)
    ours = part_metrics(gt, results, scheme)
    whole = coco_keypoint_metrics(gt, results, scheme.sigmas, area_keypoints=scheme.parts["body"])
    sigmas = np.array(scheme.sigmas)
    results_split = split_results(preds, WHOLEBODY_FIELDS)
    for field, ids in WHOLEBODY_FIELDS.items():
        part = PART_OF_FIELD[field]
        ref = xtcocotools_stats(tmp_path, split, results_split, f"keypoints_{part}", sigmas[list(ids)])
        np.testing.assert_allclose([ours[f"{part}/{s}"] for s in STATS], ref, atol=1e-9, err_msg=part)
    ref = xtcocotools_stats(tmp_path, split, results_split, "keypoints_wholebody", sigmas)
    np.testing.assert_allclose([whole[s] for s in STATS], ref, atol=1e-9)


@needs_xtcocotools
def test_coco17_matches_xtcocotools(tmp_path):
    fields = {"keypoints": range(17)}
    imgs, people = make_people(fields, 17, seed=3)
    split = split_gt(imgs, people, fields)
    preds = noisy_predictions(people, fields, 17, seed=4)
    sigmas = get_scheme("coco17").sigmas
    ours = coco_keypoint_metrics(check_gt(split, 17, "val.json"), joined_results(preds), sigmas)
    ref = xtcocotools_stats(tmp_path, split, split_results(preds, fields), "keypoints", sigmas)
    np.testing.assert_allclose([ours[s] for s in STATS], ref, atol=1e-9)


def test_goliath308_parts_follow_sapiens_split_and_match_references(tmp_path):
    fields = goliath_fields()
    scheme = get_scheme("goliath308")
    assert [len(v) for v in fields.values()] == [17, 6, 238, 20, 20]
    assert {PART_OF_FIELD[f]: list(ids) for f, ids in fields.items()} == {
        p: list(ids) for p, ids in scheme.parts.items()
    }
    imgs, people = make_people(fields, 308, seed=5, images=5, people=3)
    preds = noisy_predictions(people, fields, 308, seed=6)
    gt = check_gt(joined_gt(imgs, people), 308, "goliath_val.json")
    ours = part_metrics(gt, joined_results(preds), scheme)
    split = split_gt(imgs, people, fields)
    results_split = split_results(preds, fields)
    sigmas = np.array(scheme.sigmas)
    for field, ids in fields.items():
        part = PART_OF_FIELD[field]
        ref = reference_part(split, results_split, field, sigmas[ids])
        for i in (0, 1, 2, 5, 6, 7):
            assert ours[f"{part}/{STATS[i]}"] == pytest.approx(ref[i], abs=1e-9), (part, STATS[i])
        if XtCOCO is not None:
            xt = xtcocotools_stats(tmp_path, split, results_split, f"keypoints_{part}", sigmas[ids])
            np.testing.assert_allclose([ours[f"{part}/{s}"] for s in STATS], xt, atol=1e-9, err_msg=part)


def test_sapiens_eval_reads_the_official_wholebody_file_and_prints_a_table(tmp_path, capsys):
    from sapiens_lite.cli import main
    from sapiens_lite.models.pose import build_pose_model

    imgs, people = make_people(WHOLEBODY_FIELDS, 133, seed=7, images=2, people=2)
    split = split_gt(imgs, people, WHOLEBODY_FIELDS)
    (tmp_path / "img").mkdir()
    ramp = np.tile(np.linspace(40, 200, 640, dtype=np.uint8)[None, :, None], (640, 1, 3))
    for im in imgs:
        cv2.imwrite(str(tmp_path / "img" / im["file_name"]), ramp)
    (tmp_path / "coco_wholebody_val_v1.0.json").write_text(json.dumps(split))
    build_pose_model("vit_test", "coco_wholebody133", input_size=(64, 48)).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    argv = [
        "eval",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--ann",
        str(tmp_path / "coco_wholebody_val_v1.0.json"),
    ]
    rc = main([*argv, "--images", str(tmp_path / "img"), "--no-flip", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    rows = [line.split()[0] for line in text.splitlines() if line.strip()]
    for part in ("body", "foot", "face", "lefthand", "righthand", "wholebody"):
        assert part in rows, text
    assert str(out / "results.json") in text and str(out / "overlays") in text
    assert "{" not in text  # a table, not JSON
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "body/AP", "foot/AP", "face/AP", "lefthand/AP", "righthand/AP"} <= set(metrics)
    assert f"{metrics['AP']:.3f}" in text
    assert len(json.loads((out / "results.json").read_text())[0]["keypoints"]) == 3 * 133
    assert sorted(p.name for p in (out / "overlays").iterdir())[:1] == ["best_1.jpg"]
