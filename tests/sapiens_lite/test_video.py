"""Video in and out through OpenCV (the headless wheel): frames streamed, written atomically."""

from __future__ import annotations

import numpy as np
import pytest

from sapiens_lite.errors import UserError
from sapiens_lite.video import VideoReader, VideoWriter, is_video


def frames(n=5, h=48, w=64):
    return [np.full((h, w, 3), (40 * i, 255 - 40 * i, 100), np.uint8) for i in range(n)]


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_write_then_read_back(tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    with VideoWriter(path, fps=12.0) as out:
        for f in frames():
            out.write(f)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # renamed from its temporary name
    with VideoReader(path) as video:
        assert video.fps == pytest.approx(12.0) and video.size == (48, 64) and len(video) == 5
        got = list(video)
    assert len(got) == 5 and got[0].shape == (48, 64, 3)
    for a, b in zip(got, frames()):  # lossy codecs: flat colours come back within a few levels, in RGB order
        assert np.abs(a.astype(int) - b).mean() < 6


def test_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "clip.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(path, fps=10) as out:
            out.write(frames(1)[0])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="frame size"):
        with VideoWriter(path, fps=10) as out:
            out.write(frames(1)[0])
            out.write(frames(1, 10, 10)[0])
    with pytest.raises(UserError, match="can write"):
        VideoWriter(tmp_path / "clip.gif", fps=10)


def test_unreadable_videos(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(UserError, match="bad.mp4: OpenCV cannot read"):
        VideoReader(tmp_path / "bad.mp4")
    with pytest.raises(UserError, match="not found"):
        VideoReader(tmp_path / "none.mp4")
    assert is_video("a.MP4") and is_video("b.mov") and not is_video("c.jpg")
