"""A new keypoint scheme is one JSON file: fine-tune, evaluate, flip-test, save and reload a model for a toy
5-keypoint scheme through today's code paths, then load it where the JSON file no longer exists.

The data set: small images with five coloured dots (head, hands, feet) at known, jittered positions, in
COCO keypoint format. Reference for the evaluation: pycocotools itself, run here on the results file
with the toy sigmas.
"""

from __future__ import annotations

import contextlib
import io
import json

import cv2
import numpy as np
import pytest
import torch

from sapiens_lite import keypoints
from sapiens_lite.config import load_config
from sapiens_lite.errors import UserError
from sapiens_lite.models.pose import PoseModel

TOY = {
    "scheme": "toy5",
    "names": ["head", "left_hand", "right_hand", "left_foot", "right_foot"],
    "flip_index": [0, 2, 1, 4, 3],
    "sigmas": [0.05, 0.06, 0.06, 0.08, 0.08],
    "joint_weights": [1.0, 1.2, 1.2, 1.0, 1.0],
    "keypoint_types": ["upper", "upper", "upper", "lower", "lower"],
    "keypoint_colors": [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]],
    "skeleton": [[0, 1], [0, 2], [0, 3], [0, 4]],
    "skeleton_colors": [[200, 200, 200]] * 4,
}
# Where each dot sits in a 96x72 (H x W) image, before jitter: the person faces the camera, so its
# left hand is on the image's right.
LAYOUT = np.array([[36, 16], [56, 40], [16, 40], [46, 80], [26, 80]], np.float64)  # (x, y)
SIZE = (96, 72)  # image (H, W)


def make_toy_dataset(folder, n: int, seed: int):
    """n images with one 'person' each: five coloured dots (BGR on disk) and its COCO annotation."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        img = rng.integers(60, 100, (*SIZE, 3), dtype=np.uint8)
        pts = LAYOUT + rng.uniform(-5, 5, LAYOUT.shape)
        for (x, y), rgb in zip(pts, TOY["keypoint_colors"]):
            cv2.circle(img, (round(x), round(y)), 3, rgb[::-1], -1)
        name = f"{i:04d}.png"
        cv2.imwrite(str(folder / "images" / name), img)
        x0, y0 = pts.min(0) - 6
        w, h = pts.max(0) - pts.min(0) + 12
        images.append({"id": i + 1, "file_name": name, "height": SIZE[0], "width": SIZE[1]})
        anns.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [float(x0), float(y0), float(w), float(h)],
                "area": float(w * h),
                "iscrowd": 0,
                "num_keypoints": 5,
                "keypoints": np.concatenate([pts, np.full((5, 1), 2.0)], 1).reshape(-1).tolist(),
            }
        )
    doc = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "person", "keypoints": TOY["names"], "skeleton": TOY["skeleton"]}],
    }
    (folder / "annotations.json").write_text(json.dumps(doc))
    return folder / "annotations.json", folder / "images"


def _pycocotools_ap(gt_file, results_file, sigmas) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(str(results_file))
        ev = COCOeval(gt, dt, iouType="keypoints")
        ev.params.kpt_oks_sigmas = np.array(sigmas)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


@pytest.fixture
def registry(monkeypatch):
    """Checkpoint-registered schemes start (and end) empty, as in a fresh process."""
    monkeypatch.setattr(keypoints, "_REGISTERED", {})


def test_toy_scheme_trains_evaluates_flips_saves_and_loads_without_its_file(tmp_path, monkeypatch, registry):
    import finetune.evaluate as evaluate
    from finetune.config import EvalConfig, FinetuneConfig
    from finetune.train import train

    scheme_file = tmp_path / "toy5.json"
    scheme_file.write_text(json.dumps(TOY))
    train_json, train_images = make_toy_dataset(tmp_path / "train", 8, seed=0)
    val_json, val_images = make_toy_dataset(tmp_path / "val", 4, seed=1)
    (tmp_path / "cfg.yaml").write_text(
        "\n".join(
            [
                "model:",
                f"  scheme: {scheme_file}",
                "  input_size: [64, 48]",
                "  sigma: 2.0",
                "  backbone: {arch: vit_test, img_size: [64, 48], patch_padding: 2}",
                "  head: {kind: vitpose, channels: 16}",
                "data:",
                f"  train_ann: {train_json}",
                f"  train_images: {train_images}",
                "  num_workers: 0",
                "engine:",
                f"  run_dir: {tmp_path / 'run'}",
                "  total_steps: 3",
                "  micro_batch_size: 4",
                "  checkpoint_every: 3",
                "  log_every: 1",
                "  progress: false",
                "  tensorboard: false",
                "optim: {warmup_steps: 1, layer_decay: null}",
            ]
        )
        + "\n"
    )
    cfg = load_config(FinetuneConfig, [tmp_path / "cfg.yaml"])
    assert cfg.model.num_keypoints == 5

    # 1. fine-tune (the run saves run/final with save_pretrained)
    torch.manual_seed(0)
    train(cfg)
    final = tmp_path / "run" / "final"
    info = json.loads((final / "config.json").read_text())
    assert info["keypoint_scheme"] == "toy5" and info["num_keypoints"] == 5
    assert info["keypoint_scheme_definition"]["flip_index"] == TOY["flip_index"]
    model = PoseModel.from_pretrained(final).eval()
    assert model.scheme.names == tuple(TOY["names"]) and model.head.out_channels == 5

    # 2. evaluate: pycocotools gets the five toy sigmas
    seen = []
    real_metrics = evaluate.coco_keypoint_metrics

    def spy(gt, results, sigmas, *args, **kwargs):
        seen.append(list(sigmas))
        return real_metrics(gt, results, sigmas, *args, **kwargs)

    monkeypatch.setattr(evaluate, "coco_keypoint_metrics", spy)
    metrics = evaluate.evaluate_model(
        model, val_json, val_images, EvalConfig(batch_size=4), out_dir=tmp_path / "eval", progress=False
    )
    assert seen == [TOY["sigmas"]]
    assert metrics["num_instances"] == 4 and 0.0 <= metrics["PCK@0.05"] <= 1.0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(results) == 4 and all(len(r["keypoints"]) == 15 for r in results)
    ref_ap = _pycocotools_ap(val_json, tmp_path / "eval" / "results.json", TOY["sigmas"])
    assert metrics["AP"] == pytest.approx(ref_ap)

    # 3. flip test: the mirror view's heatmaps come back with the toy's left/right channels swapped
    with torch.no_grad():  # a head whose channels differ clearly (three training steps barely move it)
        model.head.conv.weight.normal_(std=1.0)
        model.head.conv.bias.normal_(std=1.0)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1))
        swapped = mirrored.flip(-1)[:, TOY["flip_index"]]  # channel i <- channel flip_index[i]
        torch.testing.assert_close(model.predict(x), 0.5 * (plain + swapped), atol=1e-4, rtol=1e-4)
        unswapped = 0.5 * (plain + mirrored.flip(-1))
        assert not torch.allclose(model.predict(x), unswapped, atol=1e-3)

    # 4. save, delete the JSON file, load in a "fresh process" (nothing registered)
    folder = model.save_pretrained(tmp_path / "toy_model")
    scheme_file.unlink()
    monkeypatch.setattr(keypoints, "_REGISTERED", {})
    with pytest.raises(UserError, match="toy5.json: keypoint scheme file not found"):
        keypoints.get_scheme(str(scheme_file))
    loaded = PoseModel.from_pretrained(folder)
    assert loaded.scheme == model.scheme and loaded.config.scheme == str(scheme_file)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x), model.predict(x))
