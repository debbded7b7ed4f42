"""Checkpoint layout, the atomic `latest` marker, pruning, validation and fp32 consolidation.

run_dir/checkpoints/
    latest                          # the last complete tag, written (tmp + rename) after all ranks saved
    step_00000500/                  # one DeepSpeed checkpoint per tag
        mp_rank_00_model_states.pt  #   DeepSpeed: module (+ our client_state) from rank 0
        *zero_pp_rank_<r>_*optim_states.pt   # DeepSpeed: optimizer partition of rank r (ZeRO)
        engine_rank<r>.pt           #   ours: step, RNG states and data position of rank r
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path

import torch

from sapiens_lite.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_path(ckpt_dir: str | os.PathLike, tag: str, rank: int) -> Path:
    return Path(ckpt_dir) / tag / f"engine_rank{rank:03d}.pt"


def write_latest(ckpt_dir: str | os.PathLike, tag: str) -> None:
    """Point `latest` at `tag` atomically (a crash leaves either the old or the new name, never half of one)."""
    path = Path(ckpt_dir) / LATEST
    tmp = path.with_name(f"{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(ckpt_dir: str | os.PathLike) -> str | None:
    """The tag in `latest`, or None when no checkpoint was completed."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag:
        raise UserError(f"{path}: empty checkpoint marker; delete it or point it at a tag in {ckpt_dir}")
    return tag


def list_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Our `step_<n>` checkpoint tags, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    tags = [p.name for p in d.iterdir() if p.is_dir() and _TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(_TAG_RE.match(t).group(1)))


def prune(ckpt_dir: str | os.PathLike, keep_last: int, keep: str | None = None) -> list[str]:
    """Delete all but the newest `keep_last` tags (never `keep`); returns the deleted tags. Rank 0 only."""
    tags = list_tags(ckpt_dir)
    doomed = [t for t in tags[: max(0, len(tags) - keep_last)] if t != keep]
    for t in doomed:
        shutil.rmtree(Path(ckpt_dir) / t, ignore_errors=True)
    return doomed


def save_rank_state(path: str | os.PathLike, state: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_rank_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        # Our own file with numpy/python RNG states, which the weights-only unpickler refuses.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from None


def validate_checkpoint(ckpt_dir: str | os.PathLike, tag: str, rank: int) -> None:
    """Fail early (UserError naming the file) on a missing or truncated checkpoint.

    Every `.pt` file of the tag must be a readable zip archive (torch's format keeps its directory at
    the end, so a truncated write is caught without reading the tensors).
    """
    tag_dir = Path(ckpt_dir) / tag
    if not tag_dir.is_dir():
        raise UserError(f"{Path(ckpt_dir) / LATEST} names checkpoint {tag!r}, but {tag_dir} does not exist")
    files = sorted(tag_dir.glob("*.pt"))
    if not any(f.name.endswith("model_states.pt") for f in files):
        raise UserError(
            f"{tag_dir}: no DeepSpeed model states file (*model_states.pt); the checkpoint is incomplete"
        )
    if not rank_state_path(ckpt_dir, tag, rank).is_file():
        raise UserError(
            f"{rank_state_path(ckpt_dir, tag, rank)}: missing (was the run saved with a different world size?)"
        )
    for f in files:
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(
                f"{f}: corrupt checkpoint file ({e}); delete {tag_dir} or fix {Path(ckpt_dir) / LATEST}"
            ) from None


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A run dir (holding `checkpoints/`) or the checkpoints dir itself."""
    path = Path(path)
    if (path / CHECKPOINT_DIR).is_dir():
        return path / CHECKPOINT_DIR
    if path.is_dir():
        return path
    raise UserError(f"{path}: no such run or checkpoint directory")


def consolidate_fp32(run_dir: str | os.PathLike, tag: str | None = None) -> dict[str, torch.Tensor]:
    """One fp32 state dict (the module's own key names) from a DeepSpeed checkpoint of any ZeRO stage.

    ZeRO 1-3 partitions are merged by `deepspeed.utils.zero_to_fp32` (fp32 master weights, frozen
    parameters included); a ZeRO-0 checkpoint holds the whole module already. Used by
    `sapiens export-backbone`.
    """
    ckpt_dir = resolve_checkpoint_dir(run_dir)
    tag = tag or read_latest(ckpt_dir)
    if tag is None:
        raise UserError(f"{ckpt_dir}: no completed checkpoint (no '{LATEST}' file); pass a tag")
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise UserError(f"{tag_dir}: no such checkpoint")
    if list(tag_dir.glob("*optim_states.pt")):
        from sapiens_train.dist import set_ds_accelerator_env

        set_ds_accelerator_env()  # before DeepSpeed's first import (a `sapiens export-backbone` process)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    if not model_files:
        raise UserError(f"{tag_dir}: no DeepSpeed model states file")
    state = torch.load(model_files[0], map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
