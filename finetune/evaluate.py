"""Top-down pose evaluation: OKS AP / AR through pycocotools, COCO-WholeBody part APs, PCK.

The pipeline, in run order:

1. `load_instances`: the people to evaluate. Ground-truth boxes from the annotation JSON (one instance
   per annotated person), or a detections JSON `[{"image_id", "bbox", "score", "category_id"}]` kept
   above a score threshold.
2. `sapiens_lite.predict.predict_instances`: crop each box (`sapiens_lite.topdown`), run the model in batches (optionally
   with flip test), decode the heatmaps (`sapiens_lite.codec`) and map the keypoints back to image
   pixels.
3. `to_coco_results`: COCO results `[{"image_id", "category_id": 1, "keypoints": [x, y, s] * K, "score"}]`
   with mmpose-style rescoring: score = box score x mean of the keypoint scores above a threshold.
   With detections, several boxes can cover one person, so `oks_nms` (threshold 0.9) keeps one pose per
   person in each image. With ground-truth boxes each person has exactly one box, so no NMS is needed.
4. `coco_keypoint_metrics`: pycocotools `COCOeval(iouType="keypoints")` with the scheme's sigmas
   (`params.kpt_oks_sigmas`), any K (17, 133, 308). For 133 keypoints, `wholebody_metrics` adds the
   COCO-WholeBody part APs; `pck` is a second, simpler metric on the ground-truth boxes.

pycocotools is imported only in this package (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from sapiens_lite.errors import UserError
from sapiens_lite.predict import Instance, predict_instances

log = logging.getLogger(__name__)

# pycocotools' order of `COCOeval.stats` for keypoints.
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

# COCO-WholeBody parts as index ranges of the 133 keypoints [start, stop).
WHOLEBODY_PARTS: dict[str, tuple[int, int]] = {
    "body": (0, 17),
    "foot": (17, 23),
    "face": (23, 91),
    "lefthand": (91, 112),
    "righthand": (112, 133),
    "wholebody": (0, 133),
}


# ---- 1. instances -------------------------------------------------------------------------------


def read_json(path: str | os.PathLike, what: str):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: {what} is not valid UTF-8 JSON ({e})") from None


def check_gt(gt: dict, num_keypoints: int, source: str = "annotations") -> dict:
    """Validate a COCO keypoint dict against K and fill `area` / `iscrowd` where missing (copy)."""
    for key in ("images", "annotations"):
        if key not in gt:
            raise UserError(f"{source}: missing the {key!r} list of a COCO keypoint file")
    gt = dict(gt)
    gt.setdefault("categories", [{"id": 1, "name": "person"}])
    anns = []
    for i, a in enumerate(gt["annotations"]):
        kpts = a.get("keypoints")
        if kpts is None or len(kpts) != 3 * num_keypoints:
            found = "none" if kpts is None else f"{len(kpts) / 3:g}"
            raise UserError(
                f"{source}: annotation {a.get('id', i)} has {found} keypoints, expected {num_keypoints} "
                f"(the keypoint scheme of the model)"
            )
        a = dict(a)
        a.setdefault("iscrowd", 0)
        a.setdefault("category_id", 1)
        if "num_keypoints" not in a:
            a["num_keypoints"] = int((np.asarray(kpts[2::3]) > 0).sum())
        if "area" not in a:
            w, h = a["bbox"][2:4]
            a["area"] = float(w * h)
        anns.append(a)
    gt["annotations"] = anns
    return gt


def gt_instances(gt: dict, *, min_box_size: float = 1.0) -> tuple[list[Instance], int]:
    """One instance per non-crowd person with at least one labelled keypoint and a usable box.

    Returns (instances, number of skipped degenerate boxes); the caller logs the count.
    """
    images = {im["id"]: im for im in gt["images"]}
    out, skipped = [], 0
    for i, a in enumerate(gt["annotations"]):
        if a.get("iscrowd", 0) or a.get("num_keypoints", 0) == 0:
            continue
        x, y, w, h = a["bbox"]
        if not (w >= min_box_size and h >= min_box_size) or not np.isfinite([x, y, w, h]).all():
            skipped += 1
            continue
        im = images.get(a["image_id"])
        if im is None:
            raise UserError(
                f"annotation {a.get('id', i)} refers to image_id {a['image_id']}, which is not in 'images'"
            )
        out.append(Instance(a["image_id"], im["file_name"], (x, y, w, h), 1.0, i))
    return out, skipped


def detection_instances(
    gt: dict,
    detections: list[dict],
    *,
    score_thr: float = 0.0,
    min_box_size: float = 1.0,
    source: str = "detections",
) -> tuple[list[Instance], int]:
    """Person detections above `score_thr` on images of the GT file (other images are ignored)."""
    images = {im["id"]: im for im in gt["images"]}
    if not isinstance(detections, list):
        raise UserError(f"{source}: expected a list of {{image_id, bbox, score, category_id}}")
    out, skipped = [], 0
    for i, d in enumerate(detections):
        missing = [k for k in ("image_id", "bbox", "score") if k not in d]
        if missing:
            raise UserError(f"{source}: entry {i} lacks {', '.join(missing)}")
        if d.get("category_id", 1) != 1 or d["score"] < score_thr or d["image_id"] not in images:
            continue
        x, y, w, h = d["bbox"]
        if not (w >= min_box_size and h >= min_box_size):
            skipped += 1
            continue
        out.append(
            Instance(d["image_id"], images[d["image_id"]]["file_name"], (x, y, w, h), float(d["score"]))
        )
    return out, skipped


# ---- 3. results: rescoring and OKS-NMS ----------------------------------------------------------


def rescore(box_scores: np.ndarray, kpt_scores: np.ndarray, thr: float = 0.2) -> np.ndarray:
    """mmpose rescoring: box score x mean of the keypoint scores above `thr` (0 where none is).

    box_scores: [N]; kpt_scores: [N, K] -> [N].
    """
    valid = kpt_scores > thr
    n = valid.sum(1)
    mean = np.where(n > 0, (kpt_scores * valid).sum(1) / np.maximum(n, 1), 0.0)
    return box_scores * mean


def oks_matrix(kpts: np.ndarray, areas: np.ndarray, sigmas, vis: np.ndarray | None = None) -> np.ndarray:
    """OKS between every pair of poses, with pose i's area as the scale of row i.

    kpts: [N, K, 2]; areas: [N]; vis: [N, K] bool (keypoints to count) -> [N, N].
    """
    var = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2  # [K]
    d2 = ((kpts[:, None] - kpts[None]) ** 2).sum(-1)  # [N, N, K]
    e = d2 / var / (areas[:, None, None] + np.spacing(1)) / 2
    sim = np.exp(-e)
    if vis is None:
        return sim.mean(-1)
    both = vis[:, None] & vis[None]  # [N, N, K]
    return np.where(both.sum(-1) > 0, (sim * both).sum(-1) / np.maximum(both.sum(-1), 1), 0.0)


def oks_nms(
    kpts: np.ndarray, scores: np.ndarray, areas: np.ndarray, sigmas, thr: float = 0.9, vis=None
) -> list[int]:
    """Greedy NMS on OKS (one image): keep the best pose, drop poses with OKS > thr to it, repeat."""
    order = list(np.argsort(-scores, kind="stable"))
    oks = oks_matrix(kpts, areas, sigmas, vis)
    keep = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        order = [j for j in order if oks[i, j] <= thr]
    return keep


def to_coco_results(
    instances: list[Instance],
    keypoints: np.ndarray,
    kpt_scores: np.ndarray,
    *,
    kpt_score_thr: float = 0.2,
    sigmas=None,
    nms_thr: float | None = None,
) -> list[dict]:
    """COCO results JSON entries; `nms_thr` (with `sigmas`) applies OKS-NMS per image.

    keypoints: [N, K, 2] image pixels; kpt_scores: [N, K].
    """
    box_scores = np.array([ins.score for ins in instances], dtype=np.float64)
    scores = rescore(box_scores, kpt_scores, kpt_score_thr)
    keep = list(range(len(instances)))
    if nms_thr is not None:
        keep = []
        by_image: dict[int, list[int]] = {}
        for i, ins in enumerate(instances):
            by_image.setdefault(ins.image_id, []).append(i)
        for ids in by_image.values():
            ids = np.array(ids)
            areas = np.array([instances[i].bbox[2] * instances[i].bbox[3] for i in ids])
            kept = oks_nms(
                keypoints[ids], scores[ids], areas, sigmas, nms_thr
            )  # all keypoints, as mmpose CocoMetric
            keep.extend(int(ids[k]) for k in kept)
        keep.sort()
    results = []
    for i in keep:
        kp = np.concatenate([keypoints[i], kpt_scores[i][:, None]], axis=1)  # [K, 3]
        results.append(
            {
                "image_id": instances[i].image_id,
                "category_id": 1,
                "keypoints": [round(float(v), 3) for v in kp.reshape(-1)],
                "score": float(scores[i]),
            }
        )
    return results


# ---- 4. metrics ---------------------------------------------------------------------------------


def coco_keypoint_metrics(
    gt: dict, results: list[dict], sigmas, *, verbose: bool = False
) -> dict[str, float]:
    """OKS AP / AR of `results` against the COCO keypoint dict `gt`, with per-keypoint `sigmas`.

    pycocotools takes the sigmas from `params.kpt_oks_sigmas`, so any K works as long as every GT and
    result has K keypoints. Returns the 10 standard numbers (`KEYPOINT_STAT_NAMES`); no results -> zeros.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    sigmas = np.asarray(sigmas, dtype=np.float64)
    if not results:
        return dict.fromkeys(KEYPOINT_STAT_NAMES, 0.0)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        # loadRes writes area/bbox/id into the dicts it gets: hand it copies.
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iouType="keypoints")
        ev.params.kpt_oks_sigmas = sigmas
        ev.params.useSegm = None
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(KEYPOINT_STAT_NAMES, ev.stats)}


def slice_keypoints(data: dict | list, start: int, stop: int, key: str = "annotations") -> dict | list:
    """Copy of a GT dict (or a results list) with every `keypoints` cut to keypoints [start, stop)."""

    def cut(a):
        a = dict(a)
        a["keypoints"] = list(a["keypoints"][3 * start : 3 * stop])
        return a

    if isinstance(data, list):
        return [cut(a) for a in data]
    out = dict(data)
    out[key] = [cut(a) for a in data[key]]
    return out


def wholebody_metrics(gt: dict, results: list[dict], sigmas, *, verbose: bool = False) -> dict[str, float]:
    """COCO-WholeBody APs per part: body, foot, face, lefthand, righthand and wholebody (all 133).

    xtcocotools (the reference wholebody evaluator) stores each part in its own field (`foot_kpts`,
    `face_kpts`, ...) and runs COCOeval once per part with that part's sigmas, reading the part's
    field from GT and results. pycocotools' COCOeval reads only `keypoints` and needs its length to
    match `kpt_oks_sigmas`, so we do the same thing by building, in memory, a GT dict and a results
    list whose `keypoints` hold only the part, and evaluating them with the part's slice of the sigmas.
    As in xtcocotools, `num_keypoints` (which decides whether a GT person is ignored) and `area` stay
    those of the whole person, and the results' scores are the whole-person scores.
    Returns `{"body/AP": .., "body/AR": .., ..., "wholebody/AP": ..}`.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    assert len(sigmas) == 133, len(sigmas)
    out = {}
    for part, (a, b) in WHOLEBODY_PARTS.items():
        m = coco_keypoint_metrics(
            slice_keypoints(gt, a, b), slice_keypoints(results, a, b), sigmas[a:b], verbose=verbose
        )
        out[f"{part}/AP"] = m["AP"]
        out[f"{part}/AR"] = m["AR"]
    return out


def pck(
    pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, box_size: np.ndarray, thr: float = 0.05
) -> float:
    """Fraction of visible GT keypoints predicted within `thr` x box size (max(w, h) of the GT box).

    pred, gt: [N, K, 2]; visible: [N, K] bool; box_size: [N]. NaN when nothing is visible.
    """
    dist = np.linalg.norm(pred - gt, axis=-1)  # [N, K]
    hit = dist <= thr * box_size[:, None]
    n = visible.sum()
    return float((hit & visible).sum() / n) if n else float("nan")


def pck_from_results(gt: dict, instances: list[Instance], keypoints: np.ndarray, thr: float = 0.05) -> float:
    """PCK of predictions made on ground-truth boxes (each instance knows its annotation)."""
    anns = [gt["annotations"][ins.ann_index] for ins in instances]
    g = np.array([a["keypoints"] for a in anns], dtype=np.float64).reshape(len(anns), -1, 3)
    size = np.array([max(a["bbox"][2], a["bbox"][3]) for a in anns], dtype=np.float64)
    return pck(keypoints, g[..., :2], g[..., 2] > 0, size, thr)


# ---- the whole evaluation ------------------------------------------------------------------------


def evaluate_model(
    model,
    ann_file: str | os.PathLike,
    image_root: str | os.PathLike,
    cfg,
    *,
    device="cpu",
    out_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate `model` (a `PoseModel`) on a COCO-format val set with the knobs of `cfg` (an `EvalConfig`).

    Returns the metrics (AP, AR, ..., part APs for 133 keypoints, PCK on GT boxes, counts) and, with
    `out_dir`, writes `results.json` (COCO results) and `metrics.json` there.
    """
    scheme = model.scheme
    k = scheme.num_keypoints
    gt = check_gt(read_json(ann_file, "annotation"), k, str(ann_file))
    if cfg.max_images is not None:
        keep = {im["id"] for im in sorted(gt["images"], key=lambda im: im["id"])[: cfg.max_images]}
        gt = dict(gt, images=[im for im in gt["images"] if im["id"] in keep])
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    use_gt_boxes = not cfg.detections
    if use_gt_boxes:
        instances, skipped = gt_instances(gt)
    else:
        dets = read_json(cfg.detections, "detections")
        instances, skipped = detection_instances(
            gt, dets, score_thr=cfg.det_score_thr, source=str(cfg.detections)
        )
    if skipped:
        log.warning("%s: skipped %d degenerate boxes (w or h < 1 pixel)", cfg.detections or ann_file, skipped)
    if not instances:
        raise UserError(f"{cfg.detections or ann_file}: no person boxes to evaluate")

    kpts, scores, ok = predict_instances(
        model,
        instances,
        image_root,
        flip_test=cfg.flip_test,
        batch_size=cfg.batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )
    missing = sorted({instances[i].file_name for i in np.flatnonzero(~ok)})
    if missing:
        log.warning(
            "%d images missing or unreadable under %s (skipped), e.g. %s",
            len(missing),
            image_root,
            missing[0],
        )
        if len(missing) == len({ins.file_name for ins in instances}):
            raise UserError(
                f"{image_root}: none of the {len(missing)} val images could be read (e.g. {missing[0]})"
            )
        # Those people still count as GT: missing images lower the AP instead of hiding a problem.
        instances = [ins for ins, o in zip(instances, ok) if o]
        kpts, scores = kpts[ok], scores[ok]

    # GT boxes: one box per person, nothing to suppress. Detections: several boxes per person -> OKS-NMS.
    results = to_coco_results(
        instances,
        kpts,
        scores,
        kpt_score_thr=cfg.kpt_score_thr,
        sigmas=scheme.sigmas,
        nms_thr=None if use_gt_boxes else cfg.nms_thr,
    )
    metrics: dict = coco_keypoint_metrics(gt, results, scheme.sigmas)
    if k == 133:
        metrics.update(wholebody_metrics(gt, results, scheme.sigmas))
    if use_gt_boxes:
        metrics[f"PCK@{cfg.pck_thr:g}"] = pck_from_results(gt, instances, kpts, cfg.pck_thr)
    metrics.update(num_instances=len(instances), skipped_boxes=skipped, missing_images=len(missing))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "results.json", results)
        _write_json(out_dir / "metrics.json", metrics)
    return metrics


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
