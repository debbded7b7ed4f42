"""What `sapiens predict SOURCE` reads: an image, a video, a folder (searched recursively) or a glob.

    sources = list_sources("photos/", exclude="out/")    # [Source(path, name, kind), ...], sorted
    sources[0].out_stem                                   # "sub/a": where its outputs go under --out

A folder or a glob yields the files whose suffix is an image's (`IMAGE_SUFFIXES`) or a video's
(`sapiens_lite.video.VIDEO_SUFFIXES`); a single file is taken whatever its suffix (a video by suffix,
else an image), so a mistyped or corrupt file is reported rather than ignored. Outputs keep the
layout of the input under the output folder; two inputs sharing a stem (a.jpg and a.png) keep their
suffix in their output names (a.jpg.json, a.png.json).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from sapiens_lite.errors import UserError
from sapiens_lite.video import VIDEO_SUFFIXES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
GLOB_CHARS = "*?["


@dataclass
class Source:
    path: Path
    name: str
    """Path relative to the folder / glob root (posix), e.g. "sub/a.jpg"."""
    kind: str
    """ "image" or "video"."""
    out_stem: str = ""
    """`name` without its suffix (with it when another input shares the stem): outputs are out_stem + .json etc."""

    @property
    def image_id_from_name(self) -> int | None:
        """COCO's file naming: 000000000139.jpg is image 139."""
        stem = Path(self.name).stem
        return int(stem) if stem.isdigit() else None


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"


def _known(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES


def list_sources(source: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Source]:
    """The inputs `source` names, sorted by name; files under `exclude` (the output folder) are left out."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    excluded = Path(exclude).resolve() if exclude is not None else None

    def keep(p: Path) -> bool:
        return p.is_file() and _known(p) and (excluded is None or excluded not in p.resolve().parents)

    if path.is_file():
        found = [Source(path, path.name, _kind(path))]
    elif path.is_dir():
        found = [
            Source(p, p.relative_to(path).as_posix(), _kind(p)) for p in sorted(path.rglob("*")) if keep(p)
        ]
    elif any(c in text for c in GLOB_CHARS):
        # the folder part before the first wildcard is the root the output names are relative to
        head = text[: min(text.index(c) for c in GLOB_CHARS if c in text)]
        root = Path(head).parent if not head.endswith(("/", os.sep)) else Path(head)
        found = []
        for f in sorted(glob.glob(os.path.expanduser(text), recursive=True)):
            p = Path(f)
            if keep(p):
                found.append(Source(p, os.path.relpath(p, root).replace(os.sep, "/"), _kind(p)))
    else:
        raise UserError(f"{text}: no such file or folder (and not a glob pattern)")
    if not found:
        raise UserError(
            f"{text}: no images ({', '.join(IMAGE_SUFFIXES)}) or videos ({', '.join(VIDEO_SUFFIXES)}) found"
        )
    stems: dict[str, int] = {}
    for s in found:
        stem = s.name[: -len(Path(s.name).suffix)] if Path(s.name).suffix else s.name
        stems[stem] = stems.get(stem, 0) + 1
        s.out_stem = stem
    for s in found:
        if stems[s.out_stem] > 1:
            s.out_stem = s.name
    return found
