"""Every `sapiens` subcommand fed the mistakes people make: one line on stderr, exit code 2, no traceback,
and nothing left behind (no new file or folder, no `*.tmp`).

Each row is (command line, a fragment the error must contain). `{X}` in an argument is a path of the
shared fixture folder: a plain file, a folder, non-UTF-8 text, a small checkpoint, ... The command runs
through the real entry point (`sapiens_lite.cli.main`) in this process: an uncaught exception is the
traceback the user would have seen.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sapiens_lite.cli import main
from sapiens_lite.models.pose import build_pose_model
from sapiens_lite.models.vit import build_vit
from tests.finetune.test_evaluate import make_gt_and_results

NOT_UTF8 = b"engine:\n  seed: 1\n# caf\xe9 \xff\xfe\n"
# /sys refuses new entries even to root: an output path nobody can write.
UNWRITABLE = "/sys/sapiens-cli-test/out"


def _jpeg(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_bomb(side: int = 20000) -> bytes:
    """One colour, side x side: a few hundred KiB of PNG that decodes to side^2 x 3 bytes."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 7).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli")
    (d / "afile").write_text("a plain file\n")
    (d / "adir").mkdir()
    (d / "latin1.yaml").write_bytes(NOT_UTF8)
    (d / "latin1.json").write_bytes(b'{"images": [], "annotations": [], "x": "\xff"}')
    (d / "notjson.json").write_text("{not json")
    torch.save(build_vit("vit_test").state_dict(), d / "vit.pth")
    build_pose_model("vit_test", "coco17", input_size=(64, 48)).save_pretrained(d / "pose")
    run = d / "run_latin1"  # a pretraining run dir whose config.yaml is not UTF-8
    run.mkdir()
    (run / "config.yaml").write_bytes(NOT_UTF8)
    gt, _ = make_gt_and_results(17, seed=5, images=2)
    (d / "coco_noimg.json").write_text(json.dumps(gt))  # its images exist nowhere
    (d / "img").mkdir()
    for im in gt["images"]:
        Image.new("RGB", (640, 480), (90, 90, 90)).save(d / "img" / im["file_name"])
    (d / "coco_ok.json").write_text(json.dumps(gt))
    shards = d / "shards"
    shards.mkdir()
    meta = json.dumps({"annotations": []}).encode()
    write_shard(
        shards / "shard-000000.tar", [{"__key__": f"k{i}", "jpg": _jpeg(i), "json": meta} for i in range(3)]
    )
    return {
        "afile": str(d / "afile"),
        "adir": str(d / "adir"),
        "latin1": str(d / "latin1.yaml"),
        "latin1_json": str(d / "latin1.json"),
        "notjson": str(d / "notjson.json"),
        "vit": str(d / "vit.pth"),
        "pose": str(d / "pose"),
        "run_latin1": str(run),
        "shards": str(shards),
        "coco_ok": str(d / "coco_ok.json"),
        "coco_noimg": str(d / "coco_noimg.json"),
        "img": str(d / "img"),
        "missing": str(d / "does-not-exist"),
        "new": str(d / "new-output"),
        "root": str(d),
    }


SMALL_PRETRAIN = ["data.synthetic=8", "data.img_size=[32,32]", "engine.micro_batch_size=2",
                  "engine.total_steps=2", "optim.warmup_steps=0", "engine.progress=false",
                  "engine.tensorboard=false"]  # fmt: skip

SMALL_FINETUNE = ["model.input_size=[64,48]", "model.backbone.arch=vit_test", "model.backbone.img_size=[64,48]",
                  "engine.micro_batch_size=1", "engine.total_steps=1", "data.num_workers=0",
                  "engine.progress=false", "engine.tensorboard=false"]  # fmt: skip

ROWS: list[tuple[str, list[str], str]] = [
    # id, argv, fragment of the error line
    ("info-img-size", ["info", "--img-size", "0", "0"], "--img-size"),
    ("convert-dst-is-file", ["convert", "{vit}", "{afile}"], "{afile}"),
    ("convert-dst-under-file", ["convert", "{vit}", "{afile}/sub"], "{afile}"),
    ("convert-dst-unwritable", ["convert", "{vit}", UNWRITABLE], "/sys/sapiens-cli-test"),
    ("convert-src-missing", ["convert", "{missing}.pth", "{new}"], "does-not-exist"),
    ("convert-src-not-a-checkpoint", ["convert", "{latin1}", "{new}"], "{latin1}"),
    ("synth-out-is-file", ["data", "synth", "{afile}", "--num-images", "1"], "{afile}"),
    ("synth-out-under-file", ["data", "synth", "{afile}/x", "--num-images", "1"], "{afile}"),
    ("synth-out-unwritable", ["data", "synth", UNWRITABLE, "--num-images", "1"], "/sys/sapiens-cli-test"),
    ("synth-quality-500", ["data", "synth", "{new}", "--quality", "500"], "--quality"),
    ("synth-quality-0", ["data", "synth", "{new}", "--quality", "0"], "--quality"),
    ("synth-workers-0", ["data", "synth", "{new}", "--workers", "0"], "workers"),
    ("pack-out-is-file", ["data", "pack", "--images", "{adir}", "--out", "{afile}"], "{afile}"),
    ("pack-out-under-file", ["data", "pack", "--synth", "2", "--out", "{afile}/x"], "{afile}"),
    ("pack-out-unwritable", ["data", "pack", "--synth", "2", "--out", UNWRITABLE], "/sys/sapiens-cli-test"),
    ("pack-images-is-file", ["data", "pack", "--images", "{afile}", "--out", "{new}"], "{afile}"),
    ("pack-coco-not-utf8", ["data", "pack", "--coco", "{latin1_json}", "--out", "{new}"], "UTF-8"),
    ("pack-coco-not-json", ["data", "pack", "--coco", "{notjson}", "--out", "{new}"], "not valid JSON"),
    ("pack-quality-500", ["data", "pack", "--synth", "2", "--quality", "500", "--out", "{new}"], "--quality"),
    ("inspect-missing", ["data", "inspect", "{missing}"], "does-not-exist"),
    ("inspect-out-is-dir", ["data", "inspect", "{shards}", "--out", "{adir}"], "{adir}"),
    ("inspect-out-under-file", ["data", "inspect", "{shards}", "--out", "{afile}/s.png"], "{afile}"),
    ("inspect-out-unwritable", ["data", "inspect", "{shards}", "--out", UNWRITABLE + ".png"], "/sys/"),
    ("inspect-cols-0", ["data", "inspect", "{shards}", "--out", "{new}.png", "--cols", "0"], "--cols"),
    (
        "inspect-tile-size-0",
        ["data", "inspect", "{shards}", "--out", "{new}.png", "--tile-size", "0"],
        "--tile-size",
    ),  # fmt: skip
    (
        "inspect-num-images-0",
        ["data", "inspect", "{shards}", "--out", "{new}.png", "--num-images", "0"],
        "--num-images",
    ),  # fmt: skip
    ("pretrain-config-not-utf8", ["pretrain", "--config", "{latin1}"], "{latin1}"),
    ("pretrain-config-missing", ["pretrain", "--config", "{missing}.yaml"], "not found"),
    ("pretrain-config-is-dir", ["pretrain", "--config", "{adir}"], "{adir}"),
    ("pretrain-run-dir-is-file", ["pretrain", *SMALL_PRETRAIN, "engine.run_dir={afile}"], "engine.run_dir"),
    (
        "pretrain-run-dir-under-file",
        ["pretrain", *SMALL_PRETRAIN, "engine.run_dir={afile}/run"],
        "engine.run_dir",
    ),  # fmt: skip
    (
        "pretrain-run-dir-unwritable",
        ["pretrain", *SMALL_PRETRAIN, f"engine.run_dir={UNWRITABLE}"],
        "engine.run_dir",
    ),  # fmt: skip
    (
        "pretrain-shards-missing",
        ["pretrain", "data.shards=[{missing}.tar]", "engine.run_dir={new}"],
        "does-not-exist",
    ),  # fmt: skip
    (
        "pretrain-batch-indivisible",
        ["pretrain", *SMALL_PRETRAIN, "engine.global_batch_size=3", "engine.run_dir={new}"],
        "not a multiple",
    ),  # fmt: skip
    (
        "pretrain-resume-from-missing",
        ["pretrain", *SMALL_PRETRAIN, "engine.resume_from=step_00000009", "engine.run_dir={new}"],
        "step_00000009",
    ),  # fmt: skip
    ("export-run-missing", ["export-backbone", "{missing}", "{new}"], "does-not-exist"),
    ("export-config-not-utf8", ["export-backbone", "{run_latin1}", "{new}"], "config.yaml"),
    ("export-out-is-file", ["export-backbone", "{run_latin1}", "{afile}"], "{afile}"),
    ("export-out-under-file", ["export-backbone", "{run_latin1}", "{afile}/out"], "{afile}"),
    ("finetune-config-not-utf8", ["finetune", "--config", "{latin1}"], "{latin1}"),
    ("finetune-ann-not-utf8", ["finetune", "data.train_ann={latin1_json}", "engine.run_dir={new}"], "UTF-8"),
    ("finetune-ann-is-dir", ["finetune", "data.train_ann={adir}", "engine.run_dir={new}"], "{adir}"),
    (
        "finetune-images-missing",
        ["finetune", "data.train_ann={coco_ok}", "data.train_images={missing}", "engine.run_dir={new}"],
        "does-not-exist",
    ),  # fmt: skip
    (
        "finetune-images-absent",
        ["finetune", "data.train_ann={coco_noimg}", "engine.run_dir={new}", *SMALL_FINETUNE],
        "coco_noimg.json",
    ),  # fmt: skip
    (
        "finetune-run-dir-is-file",
        [
            "finetune",
            "data.train_ann={coco_ok}",
            "data.train_images={img}",
            "engine.run_dir={afile}",
            *SMALL_FINETUNE,
        ],
        "engine.run_dir",
    ),  # fmt: skip
    (
        "finetune-run-dir-under-file",
        [
            "finetune",
            "data.train_ann={coco_ok}",
            "data.train_images={img}",
            "engine.run_dir={afile}/run",
            *SMALL_FINETUNE,
        ],
        "engine.run_dir",
    ),  # fmt: skip
    (
        "eval-ann-not-utf8",
        ["eval", "--checkpoint", "{pose}", "--ann", "{latin1_json}", "--out", "{new}"],
        "UTF-8",
    ),  # fmt: skip
    ("eval-ann-is-dir", ["eval", "--checkpoint", "{pose}", "--ann", "{adir}", "--out", "{new}"], "{adir}"),
    (
        "eval-detections-not-utf8",
        [
            "eval",
            "--checkpoint",
            "{pose}",
            "--ann",
            "{notjson}",
            "--detections",
            "{latin1_json}",
            "--out",
            "{new}",
        ],
        "json",
    ),  # fmt: skip
    ("eval-config-not-utf8", ["eval", "--checkpoint", "{pose}", "--config", "{latin1}"], "{latin1}"),
    (
        "eval-out-is-file",
        ["eval", "--checkpoint", "{pose}", "--ann", "{notjson}", "--out", "{afile}"],
        "{afile}",
    ),  # fmt: skip
    (
        "eval-out-under-file",
        ["eval", "--checkpoint", "{pose}", "--ann", "{notjson}", "--out", "{afile}/o"],
        "{afile}",
    ),  # fmt: skip
    (
        "eval-device-bogus",
        ["eval", "--checkpoint", "{pose}", "--ann", "{notjson}", "--device", "bogus"],
        "--device",
    ),  # fmt: skip
    ("eval-checkpoint-missing", ["eval", "--checkpoint", "{missing}", "--ann", "{notjson}"], "not found"),
]


def _tree(root: str) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


@pytest.mark.parametrize("argv,fragment", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_a_mistake_is_one_line_exit_2_and_leaves_nothing(place, capsys, argv, fragment, monkeypatch):
    monkeypatch.chdir(place["root"])  # relative defaults (runs/, eval/) land in the fixture folder too
    argv = [a.format(**place) for a in argv]
    fragment = fragment.format(**place)
    before = _tree(place["root"])
    rc = main(argv)  # an exception here is the traceback a user would see
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("W", "[20"))]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"sapiens {argv[0]}: error: "), err
    assert fragment in lines[0], err
    assert _tree(place["root"]) == before, f"left behind: {_tree(place['root']) ^ before}"
    assert not Path(UNWRITABLE).parent.exists()


def test_inspect_counts_the_samples_the_loaders_skip(place, tmp_path, capsys):
    """A bad JSON, a bad JPEG and a pixel bomb (a 20000 x 20000 single-colour PNG stored as the sample's
    .jpg) are counted by reason, as the loaders skip them, and the contact sheet is still written."""
    folder = tmp_path / "bad"
    folder.mkdir()
    ok = json.dumps({"annotations": [{"keypoints": [10, 10, 2] * 17, "bbox": [0, 0, 20, 20]}]}).encode()
    write_shard(folder / "shard-000000.tar", [
        {"__key__": "good", "jpg": _jpeg(1), "json": ok},
        {"__key__": "badjson", "jpg": _jpeg(2), "json": b"{oops"},
        {"__key__": "badjpeg", "jpg": b"\xff\xd8 not a jpeg", "json": ok},
        {"__key__": "bomb", "jpg": _png_bomb(), "json": ok},
    ])  # fmt: skip
    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(folder), "--out", str(sheet), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 4 and report["num_people"] == 1
    assert report["skipped"] == {"bad JSON": 1, "undecodable image (UnidentifiedImageError)": 1,
                                 "image over the pixel limit": 1}  # fmt: skip
    assert sheet.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["bad", "sheet.png"]
    assert main(["data", "inspect", str(folder)]) == 0
    assert "samples the loaders skip: 1 bad JSON" in capsys.readouterr().out


def test_saved_model_folders_get_the_modes_of_the_umask(place, tmp_path, capsys):
    """Colleagues on a shared cluster can read what a command saved: 0755 folders and 0644 files under
    umask 022 (`tempfile.mkdtemp` alone gives 0700)."""
    old = os.umask(0o022)
    try:
        assert main(["convert", place["vit"], str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644, "README.md": 0o644}  # fmt: skip
