"""`sapiens data synth | pack | inspect` through the real entry point (sapiens_lite.cli.main)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sapiens_lite.cli import main


def make_images(folder, n=5):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def test_pack_then_inspect(tmp_path, capsys):
    src = make_images(tmp_path / "imgs")
    out = tmp_path / "shards"
    assert (
        main(["data", "pack", "--images", str(src), "--out", str(out), "--max-samples", "2", "--no-progress"])
        == 0
    )
    assert "3 shards, 5 samples" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert [s["num_samples"] for s in index["shards"]] == [2, 2, 1]
    assert index["source"]["type"] == "folder"

    assert (
        main(
            [
                "data",
                "inspect",
                str(out / "index.json"),
                "--out",
                str(tmp_path / "sheet.png"),
                "--tile-size",
                "32",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert (
        "shard-000002.tar" in text and "3 shards, 5 samples" in text and "keypoint annotations: none" in text
    )
    assert Image.open(tmp_path / "sheet.png").format == "PNG"

    assert main(["data", "inspect", str(out / "shard-{000000..000001}.tar"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["num_samples"] for r in rows] == [2, 2]


def test_pack_synth_with_keypoints(tmp_path, capsys):
    out = tmp_path / "shards"
    rc = main(
        [
            "data",
            "pack",
            "--synth",
            "3",
            "--seed",
            "2",
            "--synth-size",
            "96x72",
            "--scheme",
            "coco17",
            "--people",
            "2-2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "6 people (6 with 17 keypoints)" in text


def test_synth_is_h3s_synthesizer(tmp_path):
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--num-images", "2", "--size", "64x48", "--no-progress"]) == 0
    doc = json.loads((out / "annotations.json").read_text())
    assert len(doc["images"]) == 2 and len(list((out / "images").glob("*.jpg"))) == 2
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--help"])
    assert e.value.code == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["pack", "--images", "{tmp}/missing", "--out", "{tmp}/o"],
            "image folder {tmp}/missing does not exist",
        ),
        (["pack", "--images", "{tmp}/empty", "--out", "{tmp}/o"], "holds no images"),
        (["pack", "--coco", "{tmp}/none.json", "--out", "{tmp}/o"], "{tmp}/none.json does not exist"),
        (
            ["pack", "--images", "{tmp}/empty", "--out", "{tmp}/o", "--max-samples", "0"],
            "--max-samples must be >= 1",
        ),
        (["inspect", "{tmp}/nothing-{{0..2}}.tar"], "{tmp}/nothing-0.tar does not exist"),
        (["inspect", "{tmp}/empty"], "holds no .tar shards"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["data", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sapiens data: error:")
    assert message.format(tmp=tmp_path) in err


def test_building_the_parser_imports_nothing_heavy():
    code = (
        "import sys; from sapiens_lite.cli import build_parser; build_parser('data'); "
        "print(sorted(m for m in ('webdataset', 'sapiens_train.synth', 'cv2', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
