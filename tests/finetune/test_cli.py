"""`sapiens eval` / `sapiens finetune` through the real entry point: results, and one-line errors with exit code 2."""

import json

import cv2
import numpy as np

from sapiens_lite.cli import main
from sapiens_lite.models.pose import build_pose_model
from tests.finetune.test_evaluate import make_gt_and_results


def _val_set(tmp_path, k=17):
    gt, _ = make_gt_and_results(k, seed=5, images=2)
    (tmp_path / "img").mkdir(exist_ok=True)
    for im in gt["images"]:
        cv2.imwrite(str(tmp_path / "img" / im["file_name"]), np.full((480, 640, 3), 90, np.uint8))
    (tmp_path / f"val{k}.json").write_text(json.dumps(gt))
    return tmp_path / f"val{k}.json"


def _config(tmp_path, scheme="coco17", val=None):
    lines = [
        "model:",
        f"  scheme: {scheme}",
        "  input_size: [64, 48]",
        "  backbone: {arch: vit_test, img_size: [64, 48], patch_padding: 2}",
        "data:",
        f"  val_ann: {val or ''}",
        f"  val_images: {tmp_path / 'img'}",
        "  num_workers: 0",
        "eval:",
        "  batch_size: 4",
    ]
    path = tmp_path / f"cfg_{scheme}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_eval_command_writes_metrics(tmp_path, capsys):
    val = _val_set(tmp_path)
    build_pose_model("vit_test", "coco17", input_size=(64, 48)).save_pretrained(tmp_path / "ckpt")
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--config",
            str(_config(tmp_path, val=val)),
            "--no-flip",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"AP", "AR", "PCK@0.05"} <= set(metrics) and metrics["num_instances"] == 4
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("all "))
    assert row[1] == f"{metrics['AP']:.3f}"  # a table of 3-decimal numbers, and where the files went
    assert (
        str(tmp_path / "out" / "results.json") in out
        and (tmp_path / "out" / "overlays" / "best_1.jpg").is_file()
    )


def test_eval_checkpoint_with_the_wrong_head_exits_2_naming_file_and_counts(tmp_path, capsys):
    val = _val_set(tmp_path)
    build_pose_model("vit_test", "goliath308", input_size=(64, 48)).save_pretrained(tmp_path / "g308")
    rc = main(["eval", "--checkpoint", str(tmp_path / "g308"), "--config", str(_config(tmp_path, val=val))])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "g308") in err and "308" in err and "expected 17" in err


def test_eval_sapiens_pth_with_the_wrong_head_exits_2(tmp_path, capsys):
    import torch

    from sapiens_lite.convert.sapiens import BACKBONE_KEYS, HEAD_KEYS
    from tests.finetune.test_train import _to_sapiens_names

    val = _val_set(tmp_path)
    src = build_pose_model("vit_test", "goliath308", input_size=(64, 48))
    sd = _to_sapiens_names(src.backbone.state_dict(), BACKBONE_KEYS, "backbone.")
    sd.update(_to_sapiens_names(src.head.state_dict(), HEAD_KEYS, "head."))
    torch.save({"state_dict": sd}, tmp_path / "sapiens_308.pth")
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "sapiens_308.pth"),
            "--config",
            str(_config(tmp_path, val=val)),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "sapiens_308.pth" in err and "308 keypoints, expected 17" in err


def test_eval_annotations_with_the_wrong_keypoint_count_exit_2(tmp_path, capsys):
    val133 = _val_set(tmp_path, k=133)
    build_pose_model("vit_test", "coco17", input_size=(64, 48)).save_pretrained(tmp_path / "ckpt")
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--ann",
            str(val133),
            "--images",
            str(tmp_path / "img"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "val133.json" in err and "133 keypoints, expected 17" in err


def test_eval_missing_checkpoint_and_finetune_mistakes_exit_2(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--ann", "x.json"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["finetune", "engine.total_step=3"]) == 2
    assert "unknown config key 'engine.total_step'" in capsys.readouterr().err
    assert main(["finetune"]) == 2
    assert "data.train_ann" in capsys.readouterr().err
    assert main(["finetune", f"data.train_ann={tmp_path / 'missing.json'}"]) == 2
    assert "missing.json not found" in capsys.readouterr().err
