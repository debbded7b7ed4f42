"""Shard packing: formats, shard bounds, reproducible bytes, resume after a crash, bad inputs, inspect."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sapiens_lite.errors import UserError
from sapiens_train import shards as shards_mod
from sapiens_train.shards import (
    PackOptions,
    collect_coco,
    collect_folder,
    format_report,
    inspect_shards,
    pack,
    synthesize_source,
)


def make_folder(root: Path, n: int = 11, size=(48, 64)) -> Path:
    """n images in nested folders, mostly JPEG with a PNG and a WebP among them."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("a" if i % 3 == 0 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        ext = {4: "png", 7: "webp"}.get(i, "jpg")
        img.save(sub / f"img.{i:02d}.{ext}")
    (root / "notes.txt").write_text("not an image")
    return root


def tar_members(path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_pack_folder(tmp_path):
    src = make_folder(tmp_path / "imgs")
    items, source = collect_folder(src)
    assert len(items) == 11 and source["type"] == "folder"
    index = pack(items, source, tmp_path / "out", PackOptions(max_samples=4), progress=False)
    assert [s["num_samples"] for s in index["shards"]] == [4, 4, 3]
    assert index["num_samples"] == 11
    saved = json.loads((tmp_path / "out" / "index.json").read_text())
    assert saved == index
    for s in index["shards"]:
        assert s["num_bytes"] == os.path.getsize(tmp_path / "out" / s["url"])
    names = tar_members(tmp_path / "out" / "shard-000000.tar")
    assert names[:2] == [f"{items[0].key}.jpg", f"{items[0].key}.json"]
    assert all(n.count(".") == 1 for n in names)  # keys hold no dot (webdataset splits at the first)
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-{000000..000002}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [it.key for it in items]  # webdataset sees our keys
    by_file = {json.loads(s["json"])["file_name"]: s for s in samples}
    jpg = by_file["a/img.00.jpg"]
    assert jpg["jpg"] == (src / "a/img.00.jpg").read_bytes()  # JPEGs are copied untouched
    png = by_file["b/c/img.04.png"]
    assert Image.open(io.BytesIO(png["jpg"])).format == "JPEG"  # others re-encoded
    meta = json.loads(png["json"])
    assert (meta["width"], meta["height"]) == (64, 48)


def test_max_bytes_bounds_shards(tmp_path):
    src = make_folder(tmp_path / "imgs", n=12, size=(96, 128))
    items, source = collect_folder(src)
    limit = 40_000
    index = pack(
        items, source, tmp_path / "out", PackOptions(max_samples=100, max_bytes=limit), progress=False
    )
    assert len(index["shards"]) > 1
    assert all(s["num_bytes"] <= limit for s in index["shards"])
    assert index["num_samples"] == 12


def test_resize_and_quality(tmp_path):
    src = make_folder(tmp_path / "imgs", n=3, size=(90, 120))
    items, source = collect_folder(src)
    pack(items, source, tmp_path / "out", PackOptions(resize_long=60, quality=70), progress=False)
    for s in wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False):
        img = Image.open(io.BytesIO(s["jpg"]))
        meta = json.loads(s["json"])
        assert img.size == (60, 45) == (meta["width"], meta["height"])


def test_identical_bytes_and_resume_after_exception(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "imgs")
    items, source = collect_folder(src)
    options = PackOptions(max_samples=3)
    pack(items, source, tmp_path / "ref", options, progress=False)
    pack(items, source, tmp_path / "ref2", options, progress=False)
    assert digests(tmp_path / "ref") == digests(tmp_path / "ref2")  # reproducible bytes

    real = shards_mod.encode_sample
    calls = {"n": 0}

    def failing(item, opts):
        calls["n"] += 1
        if calls["n"] == 8:  # in the middle of the third shard
            raise RuntimeError("disk on fire")
        return real(item, opts)

    monkeypatch.setattr(shards_mod, "encode_sample", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pack(items, source, tmp_path / "out", options, progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(out.glob("*.tmp")) and not (out / "index.json").exists()  # the partial one is gone

    monkeypatch.setattr(shards_mod, "encode_sample", real)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    written = []
    pack(items, source, out, options, progress=False, on_shard=lambda info: written.append(info.url))
    assert written == ["shard-000002.tar", "shard-000003.tar"]  # finished shards are not rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[01].tar")} == before
    assert digests(out) == digests(tmp_path / "ref")
    assert not list(out.glob("*.tmp"))
    assert (
        json.loads((out / "index.json").read_text())["shards"]
        == json.loads((tmp_path / "ref" / "index.json").read_text())["shards"]
    )


def test_resume_with_other_options_is_refused(tmp_path):
    src = make_folder(tmp_path / "imgs", n=4)
    items, source = collect_folder(src)
    pack(items, source, tmp_path / "out", PackOptions(max_samples=2), progress=False)
    with pytest.raises(UserError, match="different pack"):
        pack(items, source, tmp_path / "out", PackOptions(max_samples=3), progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.tar").write_bytes(b"")
    with pytest.raises(UserError, match="already holds shards"):
        pack(items, source, tmp_path / "foreign", PackOptions(), progress=False)


@pytest.mark.slow
def test_parallel_workers_write_the_same_shards(tmp_path):
    src = make_folder(tmp_path / "imgs", n=8)
    items, source = collect_folder(src)
    pack(items, source, tmp_path / "one", PackOptions(max_samples=2), progress=False)
    pack(items, source, tmp_path / "two", PackOptions(max_samples=2, workers=2), progress=False)
    assert digests(tmp_path / "one") == digests(tmp_path / "two")


@pytest.mark.slow
def test_sigkill_mid_pack_then_resume(tmp_path):
    src = make_folder(tmp_path / "imgs", n=40, size=(240, 320))
    args = ["--images", str(src), "--max-samples", "1", "--resize-long", "200", "--no-progress"]
    ref = subprocess.run(
        [sys.executable, "-m", "sapiens_lite.cli", "data", "pack", *args, "--out", str(tmp_path / "ref")],
        capture_output=True,
        text=True,
    )
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sapiens_lite.cli", "data", "pack", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (out.is_dir() and list(out.glob("shard-000003.tar"))):
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = digests(out)
    assert 4 <= len(done) < 40, "the kill should land mid-pack"
    assert not (out / "index.json").exists()
    reference = digests(tmp_path / "ref")
    assert all(reference[name] == d for name, d in done.items())  # nothing half-written looks complete
    resumed = subprocess.run(
        [sys.executable, "-m", "sapiens_lite.cli", "data", "pack", *args, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert digests(out) == reference

    def keys(folder):
        return [
            s["__key__"]
            for s in wds.WebDataset(str(folder / "shard-{000000..000039}.tar"), shardshuffle=False)
        ]

    assert keys(out) == keys(tmp_path / "ref")
    assert json.loads((out / "index.json").read_text())["num_samples"] == 40


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        collect_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("hi")
    with pytest.raises(UserError, match="holds no images"):
        collect_folder(tmp_path / "empty")
    with pytest.raises(UserError, match="missing.json does not exist"):
        collect_coco(tmp_path / "missing.json")
    doc = {
        "images": [{"id": 1, "file_name": "gone.jpg", "width": 64, "height": 48}],
        "annotations": [],
        "categories": [{"id": 1, "name": "person"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="gone.jpg"):
        collect_coco(tmp_path / "ann.json", tmp_path / "empty")
    with pytest.raises(UserError, match="max-samples"):
        PackOptions(max_samples=0)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from sapiens_train.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 5, seed=3, size=(96, 72), scheme="coco_wholebody133", people=(1, 2), progress=False)
    return out


def test_pack_coco_keeps_annotations_in_our_format(synth_dir, tmp_path):
    doc = json.loads((synth_dir / "annotations.json").read_text())
    items, source = collect_coco(synth_dir / "annotations.json", synth_dir / "images")
    assert source["keypoint_scheme"] == "coco_wholebody133" and len(items) == 5
    pack(items, source, tmp_path / "full", PackOptions(max_samples=2), progress=False)
    pack(items, source, tmp_path / "half", PackOptions(max_samples=2, resize_long=48), progress=False)
    full = list(wds.WebDataset(str(tmp_path / "full" / "shard-{000000..000002}.tar"), shardshuffle=False))
    half = list(wds.WebDataset(str(tmp_path / "half" / "shard-{000000..000002}.tar"), shardshuffle=False))
    assert len(full) == 5
    total_people = 0
    for f, h in zip(full, half):
        mf, mh = json.loads(f["json"]), json.loads(h["json"])
        assert set(mf) >= {"image_id", "file_name", "width", "height", "annotations"}
        assert (mf["width"], mf["height"]) == (72, 96) and (mh["width"], mh["height"]) == (36, 48)
        for af, ah in zip(mf["annotations"], mh["annotations"]):
            kf = np.array(af["keypoints"]).reshape(-1, 3)
            kh = np.array(ah["keypoints"]).reshape(-1, 3)
            assert kf.shape == (133, 3)  # WholeBody's five fields joined in the 133 order
            np.testing.assert_allclose(kh[:, :2], kf[:, :2] * 0.5, atol=1e-4)
            np.testing.assert_array_equal(kh[:, 2], kf[:, 2])
            np.testing.assert_allclose(ah["bbox"], np.array(af["bbox"]) * 0.5, atol=1e-4)
            total_people += 1
    assert total_people == len(doc["annotations"])
    # the body part of the first person matches the file's 17 body points
    first = doc["annotations"][0]
    sample = next(s for s in full if json.loads(s["json"])["image_id"] == first["image_id"])
    k = json.loads(sample["json"])["annotations"][0]["keypoints"]
    np.testing.assert_allclose(k[: 17 * 3], first["keypoints"], atol=1e-4)


def test_synth_source_and_inspect(tmp_path):
    items, source = synthesize_source(
        tmp_path / "out", 4, seed=1, size=(96, 72), scheme="goliath308", people=(1, 1), workers=1
    )
    assert source["type"] == "synth" and len(items) == 4
    pack(items, source, tmp_path / "out", PackOptions(max_samples=3), progress=False)
    reports = inspect_shards(
        str(tmp_path / "out" / "index.json"),
        sheet=str(tmp_path / "sheet.png"),
        num_images=4,
        cols=2,
        tile_size=64,
    )
    assert [r.num_samples for r in reports] == [3, 1]
    assert sum(r.num_people for r in reports) == 4
    assert reports[0].keypoint_counts == {308: 3}
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size[0] > 2 * 64 and sheet.format == "PNG"
    text = format_report(reports)
    assert "total" in text and "308 keypoints" in text
