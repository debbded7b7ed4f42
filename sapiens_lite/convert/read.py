"""Read any foreign checkpoint: one file, a transformers-style folder, or a Hugging Face Hub repo.

    conv = read_checkpoint("sapiens_0.3b_epoch_1600_clean.pth")    # a .pth / .pt / .bin / .ckpt / .safetensors
    conv = read_checkpoint("out/vitmae")                           # config.json + model.safetensors (or shards)
    conv = read_checkpoint("usyd-community/vitpose-base-simple")   # a Hub repo, through the HF cache
    model = build_model(conv)                                      # VisionTransformer or PoseModel

A folder is what transformers' `save_pretrained` writes: `config.json` and the weights, either
`model.safetensors` or the shards `model-0000i-of-0000n.safetensors` listed in
`model.safetensors.index.json` (older folders: `pytorch_model.bin`, or shards listed in
`pytorch_model.bin.index.json`). Torch files are read weights-only (`load_checkpoint_file`). A Hub
repo is fetched with huggingface_hub's `snapshot_download` into the HF cache, config.json and the
safetensors files first, the `.bin` files only for a repo without safetensors; with `HF_HUB_OFFLINE=1`
a cached snapshot is used.

config.json says what weights don't (`ForeignConfig`): the number of attention heads, the LayerNorm
eps (transformers defaults to 1e-12, we to 1e-6), the image and patch size (hence the position grid)
and, for VitPose, the stages the head reads (`out_indices`; see transformers_vitpose.py). Folders of
our own (config.json by `save_pretrained` of this library) are refused: `from_pretrained` loads them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sapiens_lite.convert import transformers_vitpose
from sapiens_lite.convert.common import Converted
from sapiens_lite.convert.core import convert_state_dict, detect_source, unwrap
from sapiens_lite.convert.safe_load import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, load_checkpoint_file
from sapiens_lite.errors import UserError
from sapiens_lite.hub import CONFIG_NAME, LIBRARY_NAME, is_our_config, resolve_checkpoint_folder

# Weights of a foreign folder, (single file, shard index), in order of preference: safetensors hold no code.
WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
# What is fetched from a Hub repo, one list per weight format, tried in this order.
HUB_PATTERNS = (
    [CONFIG_NAME, "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"],
    [CONFIG_NAME, "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"],
)
# transformers `model_type` -> our source (the key-based recognition would agree; this is only firmer).
SOURCE_BY_MODEL_TYPE = {
    "vit_mae": "transformers_vitmae",
    "vitpose": "transformers_vitpose",
    "vitpose_backbone": "transformers_vitpose",
}

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ForeignConfig:
    """What a (transformers) config.json adds to the weights; None where the file does not say."""

    path: Path
    model_type: str | None = None
    num_heads: int | None = None
    norm_eps: float | None = None
    img_size: tuple[int, int] | None = None
    patch_size: int | None = None
    out_indices: tuple[int, ...] | None = None
    """VitPose stages the backbone outputs, as written (negative = from the end; 0 = the embeddings)."""

    @property
    def source(self) -> str | None:
        return SOURCE_BY_MODEL_TYPE.get(self.model_type)

    @property
    def grid(self) -> tuple[int, int] | None:
        """(gh, gw) of the position embedding: transformers counts image_size // patch_size per side."""
        if self.img_size is None or self.patch_size is None:
            return None
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)


# ---- the entry point ----


def read_checkpoint(
    path_or_repo: str | os.PathLike,
    *,
    revision: str | None = None,
    source: str | None = None,
    grid: tuple[int, int] | None = None,
    num_heads: int | None = None,
) -> Converted:
    """A checkpoint file, a transformers-style folder or a Hub repo id (`org/name`) -> `Converted`.

    An existing local path wins over a repo id of the same spelling.

    revision: branch, tag or commit of a Hub repo. source: force a format (a key of `SOURCES`).
    grid: (gh, gw) of the position embedding, when neither config.json nor the shape tells it.
    num_heads: attention heads, for weights whose size is in no arch table and with no config.json.
    config.json values (heads, LayerNorm eps, image size, VitPose out_indices) go into `conv.hints`.
    Raises `UserError` naming the file for anything the user can fix.
    """
    target = str(path_or_repo)
    path = Path(target).expanduser()
    if revision is not None and path.exists():
        raise UserError(f"{path}: revision={revision!r} applies to Hub repos, not to a local file or folder")
    if path.is_dir():
        folder = path
    elif path.is_file() or not is_repo_id(target):
        conv = convert_state_dict(load_checkpoint_file(path), source=source, grid=grid)
        return _with_num_heads(conv, num_heads)
    else:
        folder = _fetch(target, revision)

    cfg = read_foreign_config(folder)
    sd = unwrap(load_folder_weights(folder))
    if source is None:
        source = (cfg.source if cfg else None) or detect_source(sd)
    dropped, notes = [], []
    if cfg is not None and cfg.out_indices is not None and source == "transformers_vitpose":
        sd, dropped, notes = _keep_stages(sd, cfg)
    if grid is None and cfg is not None:
        grid = cfg.grid
    conv = convert_state_dict(sd, source=source, grid=grid)
    conv = dataclasses.replace(conv, dropped=conv.dropped + dropped, notes=conv.notes + notes)
    if cfg is not None:
        conv = _with_config(conv, cfg, num_heads)
    return _with_num_heads(conv, num_heads)


def is_foreign_folder(path: str | os.PathLike) -> bool:
    """True for a folder `read_checkpoint` takes: a config.json not written by us, or none but weights."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    if (folder / CONFIG_NAME).is_file():
        try:
            info = json.loads((folder / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return True  # not ours; read_checkpoint names the problem
        return not is_our_config(info)
    return _has_weights(folder)


def is_repo_id(target: str) -> bool:
    """`org/name` (not a path: no leading `.` or `/`, one slash, no checkpoint-file suffix)."""
    suffixes = TORCH_SUFFIXES + SAFETENSORS_SUFFIXES
    return bool(_REPO_ID.fullmatch(target)) and not target.lower().endswith(suffixes)


# ---- folders and repos ----


def _fetch(repo_id: str, revision: str | None) -> Path:
    """The cached snapshot of a Hub repo with config.json and weights (safetensors, else .bin)."""
    for patterns in HUB_PATTERNS:
        try:
            folder = resolve_checkpoint_folder(repo_id, revision=revision, allow_patterns=patterns)
        except UserError as e:
            raise UserError(f"{repo_id}: no such local file or folder, and as a Hub repo: {e}") from None
        if _has_weights(folder) or is_our_config(_json_or_none(folder / CONFIG_NAME)):
            return folder
    return folder  # load_folder_weights says what is missing


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for names in WEIGHT_FILES for name in names)


def load_folder_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a transformers-style folder: one file, or the shards its index lists."""
    folder = Path(folder)
    for single, index in WEIGHT_FILES:
        if (folder / single).is_file():
            return load_checkpoint_file(folder / single)
        if (folder / index).is_file():
            return _load_shards(folder / index)
    expected = ", ".join(name for names in WEIGHT_FILES for name in names)
    raise UserError(f"{folder}: no weights found; expected one of {expected}")


def _load_shards(index: Path) -> dict[str, torch.Tensor]:
    """Shards named by a transformers index (`{"weight_map": {key: shard file}}`), merged; every key checked."""
    info = _read_json(index)
    weight_map = info.get("weight_map") if isinstance(info, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: expected a non-empty 'weight_map' of key -> shard file")
    sd: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        shard = index.parent / str(name)
        if Path(name).name != name or not shard.is_file():
            raise UserError(f"{index}: shard {name!r} not found next to it")
        sd.update(unwrap(load_checkpoint_file(shard)))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise UserError(f"{index}: {len(missing)} key(s) listed but in no shard, e.g. {missing[0]}")
    return sd


# ---- config.json ----


def read_foreign_config(folder: str | os.PathLike) -> ForeignConfig | None:
    """The transformers config.json of a folder (None without one); refuses one of ours."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        return None
    info = _read_json(path)
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(info).__name__}")
    if is_our_config(info):
        raise UserError(
            f"{folder}: already a {LIBRARY_NAME} checkpoint ({info.get('model_type')!r} model); "
            "load it with from_pretrained, there is nothing to convert"
        )
    # VitPoseForPoseEstimation keeps the ViT's settings in `backbone_config`.
    vit = info.get("backbone_config") if isinstance(info.get("backbone_config"), dict) else info
    where = f"{path}: " + ("backbone_config." if vit is not info else "")
    act = vit.get("hidden_act", "gelu")
    if act != "gelu":  # transformers' "gelu" is the exact (erf) GELU of our blocks
        raise UserError(f"{where}hidden_act {act!r}: only 'gelu' converts (our blocks use exact GELU)")
    experts = _typed(vit, "num_experts", int, where)
    if experts is not None and experts > 1:
        raise UserError(
            f"{where}num_experts {experts}: mixture-of-experts (ViTPose+) backbones are not supported"
        )
    return ForeignConfig(
        path=path,
        model_type=info.get("model_type") if isinstance(info.get("model_type"), str) else None,
        num_heads=_typed(vit, "num_attention_heads", int, where),
        norm_eps=_typed(vit, "layer_norm_eps", float, where),
        img_size=_pair(vit, "image_size", where),
        patch_size=_square(vit, "patch_size", where),
        out_indices=_out_indices(vit, where),
    )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _typed(c: dict, key: str, tp: type, where: str):
    v = c.get(key)
    if v is None:
        return None
    ok = isinstance(v, (int, float)) if tp is float else isinstance(v, tp)
    if isinstance(v, bool) or not ok:
        raise UserError(f"{where}{key} must be {tp.__name__}, got {v!r}")
    return tp(v)


def _pair(c: dict, key: str, where: str) -> tuple[int, int] | None:
    """An int or [h, w] of ints -> (h, w)."""
    v = c.get(key)
    if v is None:
        return None
    pair = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, list) else ()
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise UserError(f"{where}{key} must be a positive int or [height, width], got {v!r}")
    return pair


def _square(c: dict, key: str, where: str) -> int | None:
    pair = _pair(c, key, where)
    if pair is not None and pair[0] != pair[1]:
        raise UserError(f"{where}{key} {list(pair)}: only square patches are supported")
    return None if pair is None else pair[0]


def _out_indices(c: dict, where: str) -> tuple[int, ...] | None:
    """`out_indices`, else `out_features` ("stem" = 0, "stageN" = N), as a tuple of stage indices."""
    indices, features = c.get("out_indices"), c.get("out_features")
    if indices is not None:
        if not isinstance(indices, list) or not indices or not all(type(i) is int for i in indices):
            raise UserError(f"{where}out_indices must be a non-empty list of ints, got {indices!r}")
        return tuple(indices)
    if features is None:
        return None
    stage = re.compile(r"stem|stage(\d+)")
    matches = [stage.fullmatch(f) if isinstance(f, str) else None for f in features] if features else []
    if not isinstance(features, list) or not matches or not all(matches):
        raise UserError(f"{where}out_features must be a list of 'stem' / 'stageN', got {features!r}")
    return tuple(int(m.group(1) or 0) for m in matches)


# ---- what config.json changes ----


def _keep_stages(sd: dict[str, torch.Tensor], cfg: ForeignConfig):
    """VitPose: keep the layers up to the last stage the head reads (exact; see transformers_vitpose.py)."""
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"(?:backbone\.)?encoder\.layer\.(\d+)\.", k))}
    depth = 1 + max(layers, default=-1)
    stages = []
    for i in cfg.out_indices:
        if not -(depth + 1) <= i <= depth:
            raise UserError(
                f"{cfg.path}: out_indices {list(cfg.out_indices)} out of range for {depth} layers"
            )
        stages.append(i % (depth + 1))  # -1 is the last stage, as transformers reads it
    has_head = any(k.startswith("head.") for k in sd)
    keep = transformers_vitpose.depth_for_out_indices(tuple(stages), has_head=has_head, where=str(cfg.path))
    if keep == depth:
        return sd, [], []
    sd, dropped = transformers_vitpose.keep_blocks(sd, keep)
    note = (
        f"out_indices {list(cfg.out_indices)}: VitPose outputs stage {keep} (layer {keep} of {depth}, then "
        f"the final LayerNorm); converted exactly as a backbone of depth {keep} "
        f"({depth - keep} unused layer(s) dropped)"
    )
    return sd, dropped, [note]


def _with_config(conv: Converted, cfg: ForeignConfig, num_heads: int | None) -> Converted:
    h = conv.hints
    if cfg.patch_size is not None and cfg.patch_size != h.patch_size:
        raise UserError(
            f"{cfg.path}: patch_size {cfg.patch_size}, but the weights' patch embedding is {h.patch_size}"
        )
    if cfg.norm_eps is not None:
        h = dataclasses.replace(h, norm_eps=cfg.norm_eps)
    if cfg.num_heads is not None:
        if num_heads is not None and num_heads != cfg.num_heads:
            raise UserError(
                f"num_heads={num_heads} given, but {cfg.path} has num_attention_heads={cfg.num_heads}"
            )
        h = h.with_num_heads(cfg.num_heads, str(cfg.path))
    return dataclasses.replace(conv, hints=h)


def _with_num_heads(conv: Converted, num_heads: int | None) -> Converted:
    if num_heads is None:
        return conv
    return dataclasses.replace(conv, hints=conv.hints.with_num_heads(num_heads, conv.source))


__all__ = [
    "ForeignConfig",
    "HUB_PATTERNS",
    "WEIGHT_FILES",
    "is_foreign_folder",
    "is_repo_id",
    "load_folder_weights",
    "read_checkpoint",
    "read_foreign_config",
]
