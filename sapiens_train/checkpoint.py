"""Checkpoint layout, the atomic `latest` marker, manifests, verification, pruning and fp32 consolidation.

run_dir/checkpoints/
    latest                          # the last complete tag, written (tmp + rename) after all ranks saved
    step_00000500/                  # one DeepSpeed checkpoint per tag
        mp_rank_00_model_states.pt  #   DeepSpeed: module (+ our client_state) from rank 0
        *zero_pp_rank_<r>_*optim_states.pt   # DeepSpeed: optimizer partition of rank r (ZeRO)
        engine_rank<r>.pt           #   ours: step, RNG states and data position of rank r
        manifest.json               #   ours: every file's size and sha256, and the run's shape (world
                                    #   size, ZeRO stage, batch); written before `latest` moves
    step_00000500_universal/        # DeepSpeed's universal form of the tag, made when a run continues on
                                    # another number of ranks (or ZeRO stage); pruned with its tag

Checksums: each rank hashes the files it wrote itself (its optimizer partition and rank state; rank 0
also the model states) right after writing them, while they are in the page cache; rank 0 merges the
entries after the barrier and writes the manifest before `latest` names the tag. sha256 (hashlib,
SHA extensions) streamed 0.5-1.5 GB/s per core on the shared 2-core development machine, from memory
and from a warm page cache (blake2b about half as fast there), so a 30 GB ZeRO checkpoint over 8 ranks
(3.75 GB each) adds ~3-8 s per rank to a save, and the same to a resume, where each rank hashes every
world_size-th file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch

from sapiens_lite.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sapiens-checkpoint/1"
UNIVERSAL_SUFFIX = "_universal"
_TAG_RE = re.compile(r"^step_(\d+)$")
_RANK_FILE_RE = re.compile(r"(?:^|_)pp_rank_(\d+)_|^engine_rank(\d+)\.pt$")
RESUME_HINT = "engine.resume_from"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int | None:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def rank_state_path(ckpt_dir: str | os.PathLike, tag: str, rank: int) -> Path:
    return Path(ckpt_dir) / tag / f"engine_rank{rank:03d}.pt"


def universal_dir(ckpt_dir: str | os.PathLike, tag: str) -> Path:
    return Path(ckpt_dir) / f"{tag}{UNIVERSAL_SUFFIX}"


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
    try:
        tag = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable checkpoint marker ({e}); delete it or rewrite it") from None
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
    """Delete all but the newest `keep_last` tags (never `keep`) with their universal forms; returns the
    deleted tags. Rank 0 only."""
    tags = list_tags(ckpt_dir)
    doomed = [t for t in tags[: max(0, len(tags) - keep_last)] if t != keep]
    for t in doomed:
        shutil.rmtree(Path(ckpt_dir) / t, ignore_errors=True)
        shutil.rmtree(universal_dir(ckpt_dir, t), ignore_errors=True)
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


# ---- manifests ----


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def owner_rank(name: str) -> int:
    """The rank that writes a checkpoint file: `*pp_rank_<r>_*` and `engine_rank<r>.pt` are rank r's,
    everything else (the model states of ZeRO 0-2) rank 0's."""
    m = _RANK_FILE_RE.search(name)
    if m is None:
        return 0
    return int(m.group(1) if m.group(1) is not None else m.group(2))


def hash_own_files(tag_dir: str | os.PathLike, rank: int) -> dict[str, dict]:
    """{file name: {"size", "sha256"}} of the files of `tag_dir` that `rank` wrote (see `owner_rank`)."""
    out = {}
    for p in sorted(Path(tag_dir).iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp") and owner_rank(p.name) == rank:
            out[p.name] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return out


def write_manifest(tag_dir: str | os.PathLike, files: dict[str, dict], info: dict) -> None:
    """manifest.json: `info` (step, world size, ZeRO stage, ...) and every file's size and checksum.

    Files of the folder that no rank reported (none with DeepSpeed's layout) are hashed here."""
    tag_dir = Path(tag_dir)
    files = dict(files)
    for p in sorted(tag_dir.iterdir()):
        if p.is_file() and p.name not in files and p.name != MANIFEST and not p.name.endswith(".tmp"):
            files[p.name] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    manifest = {"format": MANIFEST_FORMAT, **info, "files": dict(sorted(files.items()))}
    tmp = tag_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, tag_dir / MANIFEST)


def read_manifest(tag_dir: str | os.PathLike) -> dict | None:
    """The tag's manifest, None for a checkpoint written before manifests existed; UserError if damaged."""
    path = Path(tag_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: damaged checkpoint manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def _problem(tag_dir: Path, manifest: dict | None, hash_share: tuple[int, int] | None) -> str | None:
    """The first thing wrong with a tag's files, or None. hash_share=(i, n): hash every n-th file from
    the i-th (sizes are checked for all); None hashes every file."""
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    if manifest is None:
        # A checkpoint from before manifests: torch's zip directory sits at the end of each file, so a
        # truncated write is caught without reading the tensors.
        files = sorted(tag_dir.glob("*.pt"))
        if not any(f.name.endswith("model_states.pt") for f in files):
            return (
                f"{tag_dir}: no DeepSpeed model states file (*model_states.pt); the checkpoint is incomplete"
            )
        for f in files:
            try:
                with zipfile.ZipFile(f) as z:
                    z.namelist()
            except (zipfile.BadZipFile, OSError) as e:
                return f"{f}: corrupt checkpoint file ({e})"
        return None
    entries = sorted(manifest["files"].items())
    for name, entry in entries:
        p = tag_dir / name
        if not p.is_file():
            return f"{p}: missing (listed in {tag_dir / MANIFEST})"
        size = p.stat().st_size
        if size != entry["size"]:
            return f"{p}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)"
    for i, (name, entry) in enumerate(entries):
        if hash_share is not None and i % hash_share[1] != hash_share[0]:
            continue
        if file_sha256(tag_dir / name) != entry["sha256"]:
            return f"{tag_dir / name}: checksum mismatch, the file is damaged"
    return None


def newest_intact(ckpt_dir: str | os.PathLike, before: str | None = None) -> str | None:
    """The newest tag (older than `before`) whose every file matches its manifest; None if none does."""
    tags = list_tags(ckpt_dir)
    if before is not None and step_of_tag(before) is not None:
        tags = [t for t in tags if step_of_tag(t) < step_of_tag(before)]
    for t in reversed(tags):
        try:
            if _problem(Path(ckpt_dir) / t, read_manifest(Path(ckpt_dir) / t), None) is None:
                return t
        except UserError:
            continue
    return None


def verify_checkpoint(
    ckpt_dir: str | os.PathLike, tag: str, rank: int = 0, world_size: int = 1
) -> dict | None:
    """Check a tag before anything is loaded; returns its manifest (None for a pre-manifest checkpoint).

    Every rank checks that all files exist with their recorded sizes and hashes its share (every
    world_size-th file), so the work is spread however many ranks resume. A problem raises UserError
    naming the file and the newest intact older checkpoint, with the override that resumes from it.
    """
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        named = read_latest(ckpt_dir) == tag
        source = f"{ckpt_dir / LATEST} names checkpoint {tag!r}" if named else f"{RESUME_HINT}={tag}"
        raise UserError(f"{source}, but {tag_dir} does not exist{fallback_hint(ckpt_dir, tag)}")
    try:
        manifest = read_manifest(tag_dir)
        problem = _problem(tag_dir, manifest, (rank, world_size))
    except UserError as e:
        manifest, problem = None, str(e)
    if problem is not None:
        raise UserError(f"{problem}{fallback_hint(ckpt_dir, tag)}")
    return manifest


def fallback_hint(ckpt_dir: Path, tag: str) -> str:
    """The end of an error about `tag`: the newest intact older checkpoint and how to resume from it."""
    good = newest_intact(ckpt_dir, before=tag)
    if good is None:
        return "; no older intact checkpoint: start afresh with --no-resume (or another engine.run_dir)"
    return f"; the newest intact checkpoint is {good}: resume from it with {RESUME_HINT}={good}"


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
    parameters included); a ZeRO-0 checkpoint holds the whole module already. The tag's manifest is
    verified first. Used by `sapiens export-backbone`.
    """
    ckpt_dir = resolve_checkpoint_dir(run_dir)
    tag = tag or read_latest(ckpt_dir)
    if tag is None:
        raise UserError(f"{ckpt_dir}: no completed checkpoint (no '{LATEST}' file); pass a tag")
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise UserError(f"{tag_dir}: no such checkpoint")
    verify_checkpoint(ckpt_dir, tag)
    try:
        if list(tag_dir.glob("*optim_states.pt")):
            from sapiens_train.dist import set_ds_accelerator_env

            set_ds_accelerator_env()  # before DeepSpeed's first import (a `sapiens export-backbone` process)
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        else:
            model_files = sorted(tag_dir.glob("*model_states.pt"))
            if not model_files:
                raise UserError(f"{tag_dir}: no DeepSpeed model states file")
            sd = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    except UserError:
        raise
    except Exception as e:  # a checkpoint whose files are intact but do not fit together
        raise UserError(f"{tag_dir}: cannot consolidate the checkpoint ({type(e).__name__}: {e})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def to_universal(ckpt_dir: str | os.PathLike, tag: str) -> Path:
    """DeepSpeed's universal checkpoint of `tag` (any ZeRO stage >= 1), made once into `<tag>_universal`.

    The conversion (`deepspeed.checkpoint.ds_to_universal`, in this process, serially) writes into a
    temporary folder that is renamed when complete, so an interrupted conversion is redone, never used.
    Rank 0 only; the others wait at a barrier.
    """
    import contextlib
    import io
    from argparse import Namespace

    from sapiens_train.dist import set_ds_accelerator_env

    set_ds_accelerator_env()
    from deepspeed.checkpoint import ds_to_universal

    ckpt_dir = Path(ckpt_dir)
    out = universal_dir(ckpt_dir, tag)
    if (out / "zero" / "optimizer_state.pt").is_file():
        return out
    work = ckpt_dir / f".{tag}{UNIVERSAL_SUFFIX}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = Namespace(
        input_folder=str(ckpt_dir / tag),
        output_folder=str(work / tag),  # it also writes `latest_universal` next to this folder
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(work, ignore_errors=True)
        raise UserError(
            f"{ckpt_dir / tag}: DeepSpeed's universal conversion failed ({type(e).__name__}: {e}); "
            "resume with the number of ranks and engine.zero_stage it was saved with"
        ) from None
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work / tag, out)
    shutil.rmtree(work, ignore_errors=True)
    return out
