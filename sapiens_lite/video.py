"""Video in and out with OpenCV (opencv-python-headless, a core dependency), one frame at a time.

    with VideoReader("clip.mp4") as video:               # UserError if OpenCV cannot open it
        print(video.fps, video.size, len(video))          # len: the container's frame count (an estimate)
        for frame in video:                                # RGB uint8 [H, W, 3], streamed
            ...
    with VideoWriter("out.mp4", fps=25.0) as out:          # written to out.mp4.tmp.mp4, renamed on success
        out.write(frame_rgb)

Frames are decoded and encoded one by one, so a long video never sits in memory. The headless wheel
writes MPEG-4 Part 2 ("mp4v") into .mp4 files and Motion-JPEG into .avi; it has no H.264 encoder.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from sapiens_lite.errors import UserError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
# Output container -> FourCC the headless OpenCV wheel can encode.
WRITER_FOURCC = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


class VideoReader:
    """Iterate over the frames of a video file as RGB uint8 arrays [H, W, 3]."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: video file not found")
        self.capture = cv2.VideoCapture(str(self.path))
        ok, first = self.capture.read() if self.capture.isOpened() else (False, None)
        if not ok:
            self.capture.release()
            raise UserError(
                f"{self.path}: OpenCV cannot read a frame of this video (corrupt or unknown codec)"
            )
        self._first = first
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else 25.0
        self.size = (first.shape[0], first.shape[1])  # (H, W)

    def __len__(self) -> int:
        """The frame count the container declares (may be off by a few; 0 when unknown)."""
        return max(0, int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT)))

    def __iter__(self):
        frame, self._first = self._first, None
        if frame is None:
            raise RuntimeError(f"{self.path}: a VideoReader can be iterated once")
        while frame is not None:
            yield np.ascontiguousarray(frame[:, :, ::-1])  # BGR -> RGB
            ok, frame = self.capture.read()
            if not ok:
                frame = None

    def close(self) -> None:
        self.capture.release()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VideoWriter:
    """Write RGB uint8 frames [H, W, 3] to a .mp4 (mp4v), .avi (MJPG) or .mkv file, atomically.

    The frame size is taken from the first frame. Frames go to `<path>.tmp<suffix>` (OpenCV picks the
    container from the suffix) and the file is renamed to `path` when the writer is closed without an
    exception; after an exception the partial file is removed.
    """

    def __init__(self, path: str | os.PathLike, fps: float):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in WRITER_FOURCC:
            raise UserError(
                f"{self.path}: can write {', '.join(WRITER_FOURCC)} videos, not {suffix or 'no suffix'}"
            )
        self.fourcc = WRITER_FOURCC[suffix]
        self.fps = float(fps)
        self.tmp = self.path.with_name(self.path.name + ".tmp" + suffix)
        self.writer = None
        self.size = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        if self.writer is None:
            self.size = frame.shape[:2]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = cv2.VideoWriter(
                str(self.tmp), cv2.VideoWriter_fourcc(*self.fourcc), self.fps, (self.size[1], self.size[0])
            )
            if not self.writer.isOpened():
                raise UserError(f"{self.path}: OpenCV cannot open a {self.fourcc} video writer for it")
        if frame.shape[:2] != self.size:
            raise ValueError(f"frame size {frame.shape[:2]} differs from the video's {self.size}")
        self.writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # RGB -> BGR
        self.frames += 1

    def close(self, ok: bool = True) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            if ok:
                os.replace(self.tmp, self.path)
        if not ok:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ok=exc_type is None)
