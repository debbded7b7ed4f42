"""`sapiens convert SRC DST [--source NAME] [--arch NAME] [--grid GHxGW] [--scheme NAME]`.

Contract: a supported foreign checkpoint file becomes a folder loadable with `from_pretrained` (a
backbone, or a PoseModel when the checkpoint has a pose head) computing the same outputs as the
converted weights; a missing, corrupt or unrecognised file is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import save_file

from sapiens_lite.cli import main
from sapiens_lite.convert import build_backbone, build_pose_model, convert_state_dict
from sapiens_lite.models.pose import PoseModel
from sapiens_lite.models.vit import VisionTransformer
from tests.sapiens_lite.test_convert import mae_checkpoint, mmpretrain_vit_sd, sapiens_pose_checkpoint


def _run(capsys, *argv):
    rc = main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_sapiens_pose_pth_to_pose_folder(tmp_path, capsys):
    ckpt = sapiens_pose_checkpoint(grid=(4, 3))
    ckpt["meta"]["args"] = argparse.Namespace(work_dir="x")  # unpickled as an inert placeholder
    src, dst = tmp_path / "sapiens_pose.pth", tmp_path / "out"
    torch.save(ckpt, src)
    rc, out, err = _run(capsys, src, dst)
    assert rc == 0, err
    assert "[sapiens_pose]" in out and "pose model (sapiens head, 17 keypoints)" in out
    info = json.loads((dst / "config.json").read_text())
    assert info["model_type"] == "pose" and info["converted_from"]["source"] == "sapiens_pose"
    loaded = PoseModel.from_pretrained(dst)
    assert loaded.config.backbone.patch_padding == 2 and not loaded.config.backbone.cls_token
    expected = build_pose_model(convert_state_dict(ckpt)).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x))


def test_mae_pth_to_backbone_folder(tmp_path, capsys):
    src, dst = tmp_path / "mae_pretrain.pth", tmp_path / "backbone"
    torch.save({**mae_checkpoint(), "args": argparse.Namespace(mask_ratio=0.75)}, src)
    rc, out, err = _run(capsys, src, dst, "--source", "mae")
    assert rc == 0, err
    assert "[mae]" in out and "MAE decoder not kept" in out
    loaded = VisionTransformer.from_pretrained(dst)
    assert loaded.config.cls_token and loaded.config.arch == "vit_test"
    expected = build_backbone(convert_state_dict(mae_checkpoint())).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x))


def test_safetensors_source_and_arch_flag(tmp_path, capsys):
    src = tmp_path / "pretrain.safetensors"
    save_file(mmpretrain_vit_sd(grid=(4, 4)), src)
    rc, _, err = _run(capsys, src, tmp_path / "a", "--arch", "vit_test")
    assert rc == 0, err
    rc, out, err = _run(capsys, src, tmp_path / "b", "--arch", "vit_small")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "embed_dim=64" in err and "embed_dim=384" in err


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x02garbage" * 20)
    save_file({"some.other.model": torch.zeros(2)}, tmp_path / "other.safetensors")
    save_file(mmpretrain_vit_sd(grid=(2, 5)), tmp_path / "odd.safetensors")
    cases = [
        (["missing.pth"], "missing.pth: no such checkpoint file"),
        (["corrupt.pth"], "corrupt.pth: not a readable torch checkpoint"),
        (["other.safetensors"], "unrecognised checkpoint format; keys seen: some.other.model"),
        (["other.safetensors", "--source", "nope"], "unknown source 'nope'"),
        (["odd.safetensors"], "pass grid=(gh, gw) / --grid GHxGW"),
        (["odd.safetensors", "--grid", "2by5"], "--grid must look like 64x48"),
    ]
    for args, message in cases:
        rc, out, err = _run(capsys, tmp_path / args[0], tmp_path / "dst", *args[1:])
        assert rc == 2, (args, err)
        assert err.startswith("sapiens convert: error: ") and err.count("\n") == 1, err
        assert message in err, err
    assert not (tmp_path / "dst").exists()
    rc, _, err = _run(capsys, tmp_path / "odd.safetensors", tmp_path / "dst", "--grid", "2x5")
    assert rc == 0, err


def test_help_names_every_source(capsys):
    from sapiens_lite.convert import SOURCES

    try:
        main(["convert", "--help"])
    except SystemExit:
        pass
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in SOURCES)
