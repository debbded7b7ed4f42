"""Top-down pose evaluation: OKS AP / AR as MMPose and Sapiens report them, per-part APs, PCK, overlays.

The pipeline, in run order:

1. The people to evaluate. `check_gt` reads the annotation JSON (K keypoints in `keypoints`, or the
   official COCO-WholeBody split fields, joined by the training reader). `gt_instances`: one instance per
   annotated person, as MMPose's top-down val set holds them; or `detection_instances`: a detections JSON
   `[{"image_id", "bbox", "score", "category_id"}]` kept above a score threshold.
2. `sapiens_lite.predict.predict_instances`: crop each box (`sapiens_lite.topdown`), run the model in
   batches (optionally with flip test), decode the heatmaps (`sapiens_lite.codec`) and map the keypoints
   back to image pixels.
3. `to_coco_results`: COCO results `[{"image_id", "category_id": 1, "keypoints": [x, y, s] * K, "score"}]`
   with MMPose's rescoring (score = box score x mean of the keypoint scores above a threshold) and
   MMPose's OKS-NMS per image (threshold 0.9, on detections and on ground-truth boxes alike).
4. `coco_keypoint_metrics`: pycocotools `COCOeval(iouType="keypoints")` with the scheme's sigmas, any K
   (17, 133, 308), fed so that it computes what xtcocotools (MMPose's evaluator) computes: a person counts
   for a set of keypoints only when it has a labelled point among them, a prediction only when it has a
   score > 0 among them. `part_metrics` repeats this for every part of the scheme (`scheme.parts`: body,
   foot, face, lefthand, righthand). `pck` is a second, simpler metric on the ground-truth boxes.
5. `write_overlays`: the best and worst predictions by OKS, drawn next to their ground truth.

The conventions, and where they come from:
  rescoring   box score x mean of the keypoint scores > 0.2     MMPose CocoMetric(score_mode="bbox_keypoint")
  OKS-NMS     thr 0.9; area of a pair = mean of the two crops'   MMPose oks_nms / oks_iou ("mmpose", default);
              areas (box x 1.25, grown to the input aspect)      "box": raw w x h of the better pose
  GT area     the file's `area`; missing: 0.53 x box w x h        xtcocotools use_area=False (with a warning)
  parts       a person without a labelled point in the part is   xtcocotools iouType="keypoints_<part>"
              ignored; a prediction with no score > 0 there is
              dropped; OKS scale = the whole person's area

pycocotools is imported only in this package (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sapiens_lite.errors import UserError
from sapiens_lite.predict import Instance, predict_instances

log = logging.getLogger(__name__)

# pycocotools' order of `COCOeval.stats` for keypoints.
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

# xtcocotools' OKS scale for an annotation without `area` (COCOeval(use_area=False)): a share of the box.
AREA_FROM_BOX = 0.53

NMS_AREAS = ("mmpose", "box")


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
    """A validated, slim copy of a COCO keypoint dict with K = `num_keypoints` points per person.

    Reads both layouts: `keypoints` with all K points, and the official COCO-WholeBody file, whose
    `keypoints` hold the 17 body points and `foot_kpts`, `face_kpts`, `lefthand_kpts`, `righthand_kpts`
    the rest (joined in the 133 order by `sapiens_train.coco`, the reader training uses). Each
    annotation keeps what evaluation reads: id, image_id, category_id, bbox, area, iscrowd, keypoints
    (K x 3, flat) and num_keypoints (the file's; counted over the K points when absent).

    An annotation without `area` (the OKS scale) gets 0.53 x box w x h, xtcocotools' rule for files
    without area (MMPose with use_area=False); a warning names the file and the count.
    """
    from sapiens_train.coco import _raw_keypoints  # the reader's joiner of the WholeBody fields

    for key in ("images", "annotations"):
        if not isinstance(gt.get(key), list):
            raise UserError(f"{source}: missing the {key!r} list of a COCO keypoint file")
    images = []
    for im in gt["images"]:
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise UserError(f"{source}: every image needs 'id' and 'file_name', got {str(im)[:100]}")
        images.append({k: im[k] for k in ("id", "file_name", "width", "height") if k in im})
    anns, seen, no_area = [], set(), 0
    for i, a in enumerate(gt["annotations"]):
        aid = a.get("id")
        if aid is None or aid in seen:
            raise UserError(
                f"{source}: annotation #{i} has " + ("no 'id'" if aid is None else f"id {aid} twice")
            )
        seen.add(aid)
        flat = _raw_keypoints(a, source)
        if len(flat) != 3 * num_keypoints:
            raise UserError(
                f"{source}: annotation {aid} has {len(flat) / 3:g} keypoints, expected {num_keypoints} "
                f"(the keypoint scheme of the model)"
            )
        try:
            kpts = np.asarray(flat, dtype=np.float64)
            x, y, w, h = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"{source}: annotation {aid} needs numeric 'keypoints' and 'bbox' [x, y, w, h]"
            ) from None
        if "area" in a:
            area = float(a["area"])
        else:
            area = AREA_FROM_BOX * w * h
            no_area += 1
        anns.append(
            {
                "id": aid,
                "image_id": a.get("image_id"),
                "category_id": a.get("category_id", 1),
                "bbox": [x, y, w, h],
                "area": area,
                "iscrowd": int(a.get("iscrowd", 0)),
                "keypoints": kpts.tolist(),
                "num_keypoints": int(a["num_keypoints"])
                if "num_keypoints" in a
                else int((kpts[2::3] > 0).sum()),
            }
        )
    if no_area:
        log.warning(
            "%s: %d of %d annotations have no 'area' (the OKS scale); using %.2f x box width x height, "
            "xtcocotools' rule for files without area (MMPose's use_area=False)",
            source,
            no_area,
            len(anns),
            AREA_FROM_BOX,
        )
    categories = gt.get("categories") or [{"id": 1, "name": "person"}]
    return {"images": images, "annotations": anns, "categories": categories}


def gt_instances(gt: dict, *, min_box_size: float = 0.0) -> tuple[list[Instance], int]:
    """One instance per person of MMPose's top-down val set, in its order (annotation id).

    MMPose keeps a person when it is not a crowd, its `num_keypoints` > 0, a keypoint coordinate is > 0
    and its box, clipped to the image (x1 = clip(x, 0, W - 1), x2 = clip(x + w, 0, W - 1), likewise y),
    is wider and taller than `min_box_size`; the clipped box is the one cropped. Returns (instances,
    number of skipped degenerate boxes); the caller logs the count.
    """
    images = {im["id"]: im for im in gt["images"]}
    out, skipped = [], 0
    for i in sorted(range(len(gt["annotations"])), key=lambda i: gt["annotations"][i]["id"]):
        a = gt["annotations"][i]
        kp = a["keypoints"]
        if a["iscrowd"] or a["num_keypoints"] == 0 or max(kp[0::3] + kp[1::3]) <= 0:  # no coordinate > 0
            continue
        im = images.get(a["image_id"])
        if im is None:
            raise UserError(
                f"annotation {a['id']} refers to image_id {a['image_id']}, which is not in 'images'"
            )
        x, y, w, h = a["bbox"]
        x1, y1, x2, y2 = x, y, x + w, y + h
        if im.get("width") and im.get("height"):
            x1, x2 = np.clip([x1, x2], 0, im["width"] - 1)
            y1, y2 = np.clip([y1, y2], 0, im["height"] - 1)
        w, h = x2 - x1, y2 - y1
        if not (w > min_box_size and h > min_box_size) or not np.isfinite([x1, y1, w, h]).all():
            skipped += 1
            continue
        out.append(
            Instance(a["image_id"], im["file_name"], (float(x1), float(y1), float(w), float(h)), 1.0, i)
        )
    return out, skipped


def detection_instances(
    gt: dict,
    detections: list[dict],
    *,
    score_thr: float = 0.0,
    min_box_size: float = 1.0,
    source: str = "detections",
) -> tuple[list[Instance], int]:
    """Person detections above `score_thr` on images of the GT file (others are ignored), in file order."""
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


def nms_areas(
    instances: list[Instance], convention: str, input_size: tuple[int, int] | None = None
) -> np.ndarray:
    """The area OKS-NMS scales each instance's OKS with -> [N].

    "mmpose": the area of the crop, i.e. the box padded by 1.25 and grown to the input aspect ratio
    (MMPose's `bbox_scales` after TopdownAffine; needs `input_size` (H, W)). "box": the box w x h.
    """
    if convention == "box":
        return np.array([ins.bbox[2] * ins.bbox[3] for ins in instances], dtype=np.float64)
    if convention != "mmpose":
        raise ValueError(f"nms area convention must be one of {NMS_AREAS}, got {convention!r}")
    from sapiens_lite.topdown import bbox_xywh_to_center_scale

    h, w = input_size
    scales = [bbox_xywh_to_center_scale(ins.bbox, aspect_ratio=w / h)[1] for ins in instances]
    return np.array([s[0] * s[1] for s in scales], dtype=np.float64)


def oks_matrix(kpts: np.ndarray, scale: np.ndarray, sigmas) -> np.ndarray:
    """OKS between every pair of poses over all keypoints, pair (i, j) scaled by the area scale[i, j].

    kpts: [N, K, 2]; scale: [N, N] -> [N, N].
    """
    var = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2  # [K]
    d2 = ((kpts[:, None] - kpts[None]) ** 2).sum(-1)  # [N, N, K]
    return np.exp(-d2 / var / (scale[..., None] + np.spacing(1)) / 2).mean(-1)


def oks_nms(
    kpts: np.ndarray, scores: np.ndarray, areas: np.ndarray, sigmas, thr: float = 0.9, *, convention="mmpose"
) -> list[int]:
    """Greedy NMS on OKS (one image): keep the best pose, drop poses with OKS > thr to it, repeat.

    kpts: [N, K, 2]; scores, areas: [N] (areas from `nms_areas`). "mmpose" is MMPose's `oks_nms`: a
    pair's OKS uses the mean of its two areas, is rounded to float32, and poses are visited in the order
    `scores.argsort()[::-1]` (of equal scores, the later pose first). "box": pose i's own area for the
    OKS of every pose to it, and of equal scores the earlier pose first.
    """
    n = len(scores)
    if convention == "mmpose":
        oks = oks_matrix(kpts, (areas[:, None] + areas[None]) / 2, sigmas).astype(np.float32)
        order = list(np.asarray(scores).argsort()[::-1])
    elif convention == "box":
        oks = oks_matrix(kpts, np.repeat(areas[:, None], n, axis=1), sigmas)
        order = list(np.argsort(-np.asarray(scores), kind="stable"))
    else:
        raise ValueError(f"nms area convention must be one of {NMS_AREAS}, got {convention!r}")
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
    nms_area: str = "mmpose",
    input_size: tuple[int, int] | None = None,
) -> list[dict]:
    """COCO results JSON entries; `nms_thr` (with `sigmas`) applies OKS-NMS per image, over all keypoints.

    keypoints: [N, K, 2] image pixels; kpt_scores: [N, K]. nms_area: see `nms_areas` / `oks_nms`
    ("mmpose" needs the model's `input_size` (H, W)).
    """
    box_scores = np.array([ins.score for ins in instances], dtype=np.float64)
    scores = rescore(box_scores, kpt_scores, kpt_score_thr)
    keep = list(range(len(instances)))
    if nms_thr is not None:
        areas = nms_areas(instances, nms_area, input_size)
        keep = []
        by_image: dict[int, list[int]] = {}
        for i, ins in enumerate(instances):
            by_image.setdefault(ins.image_id, []).append(i)
        for ids in by_image.values():
            ids = np.array(ids)
            kept = oks_nms(keypoints[ids], scores[ids], areas[ids], sigmas, nms_thr, convention=nms_area)
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
    gt: dict,
    results: list[dict],
    sigmas,
    *,
    keypoints: Sequence[int] | None = None,
    area_keypoints: Sequence[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """OKS AP / AR of `results` against `gt` (from `check_gt`) on the keypoints `keypoints` (None: all K).

    `sigmas` has all K entries; GT and results hold all K points. Computed as xtcocotools (the evaluator
    of MMPose and Sapiens) computes it, with pycocotools:
    - a GT person is ignored (like a crowd) when none of the evaluated keypoints is labelled (v > 0):
      its `num_keypoints` is set to the labelled count among them;
    - a result is left out when none of its scores on the evaluated keypoints is > 0;
    - the OKS scale is the GT `area` of the whole person;
    - a result's area, which only decides whether an unmatched result counts in the medium / large
      numbers, is the extent of its `area_keypoints` (xtcocotools takes it from the `keypoints` field,
      the body points in the WholeBody layout); None: the evaluated keypoints.
    Returns the 10 standard numbers (`KEYPOINT_STAT_NAMES`; -1 where nothing can be counted, as
    pycocotools); no result left -> zeros.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    sigmas = np.asarray(sigmas, dtype=np.float64)
    k = len(sigmas)
    sel = np.arange(k) if keypoints is None else np.asarray(keypoints, dtype=np.int64)
    area_sel = sel if area_keypoints is None else np.asarray(area_keypoints, dtype=np.int64)

    anns = []
    for a in gt["annotations"]:
        part = np.asarray(a["keypoints"], dtype=np.float64).reshape(k, 3)[sel]
        anns.append(dict(a, keypoints=part.reshape(-1).tolist(), num_keypoints=int((part[:, 2] > 0).sum())))
    dts, dt_areas = [], []
    for r in results:
        kp = np.asarray(r["keypoints"], dtype=np.float64).reshape(k, 3)
        part = kp[sel]
        if not (part[:, 2] > 0).any():
            continue
        xy = kp[area_sel, :2]
        dt_areas.append(float((xy[:, 0].max() - xy[:, 0].min()) * (xy[:, 1].max() - xy[:, 1].min())))
        dts.append({**r, "keypoints": part.reshape(-1).tolist()})
    if not dts:
        return dict.fromkeys(KEYPOINT_STAT_NAMES, 0.0)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = dict(gt, annotations=anns)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dts)  # writes area / bbox / id into the (fresh) dicts
        for d, area in zip(coco_dt.dataset["annotations"], dt_areas):
            d["area"] = area
        ev = COCOeval(coco_gt, coco_dt, iouType="keypoints")
        ev.params.kpt_oks_sigmas = sigmas[sel]
        ev.params.useSegm = None
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(KEYPOINT_STAT_NAMES, ev.stats)}


def part_metrics(gt: dict, results: list[dict], scheme, *, verbose: bool = False) -> dict[str, float]:
    """The 10 numbers of `coco_keypoint_metrics` for every part of `scheme.parts`, as "<part>/<stat>".

    Each part is evaluated on its own keypoints and sigmas, as xtcocotools' `keypoints_<part>` types do
    (MMPose's CocoWholeBodyMetric, Sapiens' GoliathMetric); results' areas come from the body points.
    A scheme without parts -> {}.
    """
    body = scheme.parts.get("body")
    out = {}
    for part, ids in scheme.parts.items():
        m = coco_keypoint_metrics(
            gt, results, scheme.sigmas, keypoints=ids, area_keypoints=body, verbose=verbose
        )
        out.update({f"{part}/{name}": v for name, v in m.items()})
    return out


def instance_oks(ann: dict, pred_xy: np.ndarray, sigmas) -> float:
    """pycocotools' OKS of one prediction [K, 2] with one GT annotation that has a labelled point.

    Mean over the labelled points of exp(-d^2 / (2 * area * (2 sigma)^2)), area = the GT `area`.
    """
    g = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
    var = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2
    d2 = ((np.asarray(pred_xy, dtype=np.float64) - g[:, :2]) ** 2).sum(-1)
    e = d2 / var / (ann["area"] + np.spacing(1)) / 2
    return float(np.exp(-e[g[:, 2] > 0]).mean())


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
    overlays: int = 3,
) -> dict:
    """Evaluate `model` (a `PoseModel`) on a COCO-format val set with the knobs of `cfg` (an `EvalConfig`).

    Returns the metrics: the 10 COCO numbers over all keypoints ("AP", ..., "ARl"), the same per part of
    the scheme ("body/AP", ...), PCK on GT boxes, counts. With `out_dir`, writes `results.json` (COCO
    results), `metrics.json` and `overlays/` (the `overlays` best and worst people by OKS) there.
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
        log.warning("%s: skipped %d degenerate boxes", cfg.detections or ann_file, skipped)
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

    # OKS-NMS on GT boxes too, as MMPose's CocoMetric does (nms_mode="oks_nms" whatever the boxes).
    results = to_coco_results(
        instances,
        kpts,
        scores,
        kpt_score_thr=cfg.kpt_score_thr,
        sigmas=scheme.sigmas,
        nms_thr=cfg.nms_thr,
        nms_area=cfg.nms_area,
        input_size=tuple(model.config.input_size),
    )
    metrics: dict = coco_keypoint_metrics(gt, results, scheme.sigmas, area_keypoints=scheme.parts.get("body"))
    metrics.update(part_metrics(gt, results, scheme))
    if use_gt_boxes:
        metrics[f"PCK@{cfg.pck_thr:g}"] = pck_from_results(gt, instances, kpts, cfg.pck_thr)
    metrics.update(num_instances=len(instances), skipped_boxes=skipped, missing_images=len(missing))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "results.json", results)
        _write_json(out_dir / "metrics.json", metrics)
        if overlays:
            write_overlays(out_dir / "overlays", gt, results, image_root, scheme, count=overlays)
    return metrics


def format_metrics(metrics: dict, parts: Sequence[str] = ()) -> str:
    """The metrics as a table: one row per part and one over all keypoints ("wholebody" when the scheme
    has parts), the 10 COCO numbers with 3 decimals as pycocotools prints them, then PCK and the counts."""
    names = KEYPOINT_STAT_NAMES
    rows = [(p, [metrics.get(f"{p}/{n}") for n in names]) for p in parts]
    rows.append(("wholebody" if parts else "all", [metrics.get(n) for n in names]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [" " * width + "".join(f"{n:>7}" for n in names)]
    for label, values in rows:
        lines.append(f"{label:<{width}}" + "".join("      -" if v is None else f"{v:7.3f}" for v in values))
    for key, v in metrics.items():
        if key.startswith("PCK@"):
            lines.append(f"{key} {v:.3f} (on ground-truth boxes)")
    if "num_instances" in metrics:
        lines.append(
            f"{metrics['num_instances']} people evaluated, {metrics['skipped_boxes']} degenerate boxes "
            f"skipped, {metrics['missing_images']} images missing"
        )
    return "\n".join(lines)


def write_overlays(
    folder: str | os.PathLike, gt: dict, results: list[dict], image_root, scheme, *, count: int = 3
) -> list[tuple[Path, float]]:
    """Draw the `count` worst and best people by OKS as `worst_<i>.jpg` / `best_<i>.jpg` in `folder`.

    Each GT person (not a crowd, with a labelled point, on an image with results) is paired with the
    result of its image that has the highest OKS with it (`instance_oks`). A file shows the region
    around the person twice: the ground truth on the left, the prediction on the right, both drawn
    at the points the GT labels (those the OKS counts). Returns [(path, oks)].
    """
    import cv2

    from sapiens_lite.visualize import draw_keypoints, image_grid

    k = scheme.num_keypoints
    by_image: dict = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(
            np.asarray(r["keypoints"], dtype=np.float64).reshape(k, 3)
        )
    pairs = []  # (oks, annotation, predicted [K, 3])
    for a in gt["annotations"]:
        labelled = np.asarray(a["keypoints"][2::3]) > 0
        if a["iscrowd"] or not labelled.any() or a["image_id"] not in by_image:
            continue
        oks = [instance_oks(a, p[:, :2], scheme.sigmas) for p in by_image[a["image_id"]]]
        j = int(np.argmax(oks))
        pairs.append((oks[j], a, by_image[a["image_id"]][j]))
    pairs.sort(key=lambda t: t[0])
    n_best = min(count, (len(pairs) + 1) // 2)  # few people: half best, half worst, none twice
    best = pairs[::-1][:n_best]
    worst = pairs[: min(count, len(pairs) - n_best)]

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("best_*.jpg"), *folder.glob("worst_*.jpg")]:
        old.unlink()  # from an earlier run
    files = {im["id"]: im["file_name"] for im in gt["images"]}
    written = []
    for name, chosen in (("best", best), ("worst", worst)):
        for i, (oks, a, pred) in enumerate(chosen, 1):
            img = cv2.imread(str(Path(image_root) / files[a["image_id"]]), cv2.IMREAD_COLOR)
            if img is None:
                continue
            g = np.asarray(a["keypoints"], dtype=np.float64).reshape(k, 3)
            shown = (g[:, 2] > 0).astype(np.float64)[:, None]  # draw exactly the points OKS counts
            crop, offset, s = _person_region(img[:, :, ::-1], a["bbox"])
            g_xy = (g[:, :2] - offset) * s
            p_xy = (pred[:, :2] - offset) * s
            panel = image_grid(
                [
                    [
                        draw_keypoints(crop, np.concatenate([g_xy, shown], 1), scheme, kpt_thr=0.5),
                        draw_keypoints(crop, np.concatenate([p_xy, shown], 1), scheme, kpt_thr=0.5),
                    ]
                ],
                labels=[f"ground truth (annotation {a['id']})", f"prediction, OKS {oks:.2f}"],
            )
            path = folder / f"{name}_{i}.jpg"
            _, buf = cv2.imencode(".jpg", panel[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(buf.tobytes())
            os.replace(tmp, path)
            written.append((path, oks))
    return written


def _person_region(img: np.ndarray, bbox, height: int = 384) -> tuple[np.ndarray, np.ndarray, float]:
    """The box grown by 1.25 about its centre, clipped to the image and resized to `height` rows.

    Returns (region, its top-left corner (x, y) in the image, scale): image point p -> (p - corner) * scale.
    """
    import cv2

    x, y, w, h = bbox
    cx, cy, w, h = x + w / 2, y + h / 2, max(w, 1.0) * 1.25, max(h, 1.0) * 1.25
    H, W = img.shape[:2]
    x0 = int(np.clip(np.floor(cx - w / 2), 0, W - 1))
    y0 = int(np.clip(np.floor(cy - h / 2), 0, H - 1))
    x1, y1 = int(min(W, np.ceil(cx + w / 2))), int(min(H, np.ceil(cy + h / 2)))
    region = img[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
    s = height / region.shape[0]
    size = (max(1, int(round(region.shape[1] * s))), height)
    return (
        cv2.resize(np.ascontiguousarray(region), size, interpolation=cv2.INTER_LINEAR),
        np.array([x0, y0]),
        s,
    )


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
