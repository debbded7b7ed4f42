"""What `sapiens predict SOURCE` reads: a file, a folder (recursively), a glob; output names."""

from __future__ import annotations

import pytest

from sapiens_lite.errors import UserError
from sapiens_lite.sources import list_sources


def touch(root, *names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_folder_glob_and_file(tmp_path):
    touch(tmp_path, "a.jpg", "a.png", "sub/b.JPEG", "sub/clip.mp4", "notes.txt", "out/a.jpg")
    found = list_sources(tmp_path, exclude=tmp_path / "out")
    assert [(s.name, s.kind, s.out_stem) for s in found] == [
        ("a.jpg", "image", "a.jpg"),  # a.jpg and a.png share a stem: their outputs keep the suffix
        ("a.png", "image", "a.png"),
        ("sub/b.JPEG", "image", "sub/b"),
        ("sub/clip.mp4", "video", "sub/clip"),
    ]
    found = list_sources(str(tmp_path / "sub" / "*"))
    assert [(s.name, s.out_stem) for s in found] == [("b.JPEG", "b"), ("clip.mp4", "clip")]
    found = list_sources(str(tmp_path / "**" / "*.jpg"))
    assert [s.name for s in found] == ["a.jpg", "out/a.jpg"]
    (file,) = list_sources(tmp_path / "notes.txt")  # named explicitly: tried (and reported if unreadable)
    assert file.kind == "image"
    assert [s.image_id_from_name for s in list_sources(tmp_path / "a.jpg")] == [None]


def test_nothing_to_read(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        list_sources(tmp_path / "missing")
    with pytest.raises(UserError, match="no images"):
        list_sources(tmp_path)
    with pytest.raises(UserError, match="no images"):
        list_sources(str(tmp_path / "*.jpg"))
