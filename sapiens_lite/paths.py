"""Checks on the paths a command reads and writes, so that a mistake is one line (`UserError`) before any work.

    out = output_dir(args.out, "--out")            # a folder to create or fill: not a file, no file above it
    png = output_file(args.sheet, "--out")         # a file to write: not a folder, no file above it
    make_dir(out, "--out")                         # mkdir -p, an OSError becomes a UserError naming the path
    text = read_text(args.config, "--config")      # UTF-8 text, or a UserError naming the file

Nothing is created by the checks; `make_dir` creates only the folder asked for (and its missing parents).
"""

from __future__ import annotations

import os
from pathlib import Path

from sapiens_lite.errors import UserError


def _file_above(path: Path, what: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what}: {parent} is a file, so {path} cannot be created under it")
            return


def output_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a folder to create or write into; UserError if it is a file or lies under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} exists and is not a folder")
    _file_above(path, what)
    return path


def output_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a file to write; UserError if it is a folder or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what}: {path} is a folder; give a file name")
    _file_above(path, what)
    return path


def make_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder `path` (and missing parents); UserError naming it when that is impossible."""
    path = output_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what}: cannot create {path} ({e.strerror or e})") from None
    return path


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file; UserError for a missing file, a folder or bytes that are not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what}: {path} is a folder, not a file")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what}: {path} not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what}: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UserError(f"{what}: cannot read {path} ({e.strerror or e})") from None
