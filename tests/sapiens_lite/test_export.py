"""Export to torch.export (.pt2) and ONNX: dynamic batch, metadata, loading back, parity with eager."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sapiens_lite.cli import main
from sapiens_lite.errors import UserError
from sapiens_lite.estimator import PoseEstimator
from sapiens_lite.export import TOLERANCE, export_model, load_exported, read_export_metadata
from tests.sapiens_lite.test_estimator import tiny_pose_model

FORMATS = [
    pytest.param("torch", ".pt2", id="torch"),
    pytest.param("onnx", ".onnx", id="onnx"),
]


def needs(fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")


@pytest.mark.parametrize("fmt,suffix", FORMATS)
def test_export_loads_back_and_matches_eager_at_any_batch(tmp_path, fmt, suffix):
    needs(fmt)
    model = tiny_pose_model()
    path = export_model(model, tmp_path / f"pose{suffix}", max_batch=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"pose{suffix}"]  # no temporary left behind
    meta = read_export_metadata(path)
    assert meta["model_type"] == "pose" and meta["keypoint_scheme"] == "coco17"
    assert meta["export"]["format"] == fmt and meta["export"]["dtype"] == "fp32"

    loaded = load_exported(path)
    assert loaded.config == model.config and loaded.scheme == model.scheme
    g = torch.Generator().manual_seed(0)
    for batch in (1, 3, 7):  # the example batch was 2: the batch dimension is dynamic
        x = torch.randn(batch, 3, *model.config.input_size, generator=g)
        with torch.no_grad():
            ref = model(x)
        got = loaded(x)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= TOLERANCE[fmt] * ref.abs().max()
    # flip test through the exported file equals PoseModel.predict's
    x = torch.randn(2, 3, *model.config.input_size, generator=g)
    ref = model.predict(x, flip_test=True)
    assert (loaded.predict(x, flip_test=True) - ref).abs().max() <= TOLERANCE[fmt] * ref.abs().max()


@pytest.mark.parametrize("fmt,suffix", FORMATS)
def test_estimator_runs_an_exported_file(tmp_path, fmt, suffix):
    needs(fmt)
    model = tiny_pose_model()
    path = export_model(model, tmp_path / f"pose{suffix}")
    img = np.random.default_rng(0).integers(0, 255, (150, 120, 3), dtype=np.uint8)
    boxes = [[10, 10, 60, 100], [50, 30, 60, 60]]
    eager = PoseEstimator(model, device="cpu", batch_size=2)(img, boxes)
    exported = PoseEstimator.from_pretrained(path, device="cpu", batch_size=2)(img, boxes)
    for a, b in zip(eager, exported):
        np.testing.assert_allclose(a.keypoints[:, 2], b.keypoints[:, 2], atol=1e-4)
        # scores match; positions too wherever the maximum is clear of its runner-up
        close = np.abs(a.keypoints[:, :2] - b.keypoints[:, :2]).max(1) < 0.05
        assert close.mean() > 0.8
    with pytest.raises(UserError, match="runs as exported"):
        PoseEstimator.from_pretrained(path, device="cpu", dtype="bf16")


def test_export_mistakes(tmp_path):
    model = tiny_pose_model()
    with pytest.raises(UserError, match="torch \\(.pt2\\) or onnx"):
        export_model(model, tmp_path / "pose.bin")
    with pytest.raises(UserError, match="fp32"):
        export_model(model, tmp_path / "pose.onnx", dtype=torch.bfloat16)
    (tmp_path / "other.pt2").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a torch.export archive"):
        load_exported(tmp_path / "other.pt2")
    with pytest.raises(UserError, match="not found"):
        load_exported(tmp_path / "missing.onnx")


@pytest.mark.parametrize("fmt,suffix", FORMATS)
def test_export_command(tmp_path, capsys, fmt, suffix):
    needs(fmt)
    tiny_pose_model().save_pretrained(tmp_path / "model")
    rc = main(["export", str(tmp_path / "model"), str(tmp_path / "out" / "pose"), "--format", fmt])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "out" / f"pose{suffix}").is_file()  # the suffix was added
    assert (
        "check: batch 3, max |export - eager| / max |eager|" in out
        and f"(tolerance {TOLERANCE[fmt]:.0e})" in out
    )
    info = read_export_metadata(tmp_path / "out" / f"pose{suffix}")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert info["config"] == saved["config"]


def test_export_command_needs_a_format(tmp_path, capsys):
    tiny_pose_model().save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "pose")]) == 2
    assert "give --format torch|onnx" in capsys.readouterr().err
