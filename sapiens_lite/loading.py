"""One way to load a model, whatever the checkpoint is.

    model = load_model("runs/tiny_cpu_coco17")          # a run dir: its final/ (or backbone/) folder
    model = load_model("org/sapiens-0.3b-coco17")        # a Hub repo id (through the Hub cache)
    model = load_model("sapiens_1b_goliath_best.pth")    # any foreign checkpoint `sapiens convert` reads
    init_from(pose_model, "runs/pretrain")               # starting weights for training (grid resampled)

What a path is, in order: a folder of ours (config.json written by `save_pretrained`); a run dir (no
config.json, but `final/` or `backbone/` holding one); a checkpoint file (.pth / .pt / .bin / .ckpt /
.safetensors) or any other folder (a transformers `save_pretrained` folder): converted with
`sapiens_lite.convert.read_checkpoint`; a path that does not exist but reads as `org/name`: a Hub repo
(ours by its config.json, else converted).

`MODEL_CLASSES` is the explicit table from `model_type` to class; a new model family (a student, a dense
head) adds one line there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from sapiens_lite.convert import Converted, Hints, adapt_to, build_model, is_foreign_folder, read_checkpoint
from sapiens_lite.convert.read import is_repo_id
from sapiens_lite.convert.safe_load import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES
from sapiens_lite.errors import UserError
from sapiens_lite.hub import CONFIG_NAME, is_our_config
from sapiens_lite.models.pose import PoseConfig, PoseModel
from sapiens_lite.models.vit import VisionTransformer, ViTConfig

# config.json `model_type` -> the class that loads it with `from_pretrained`.
MODEL_CLASSES: dict[str, type] = {
    "vit": VisionTransformer,
    "pose": PoseModel,
}
# Sub-folders of a run dir that hold its exported model, in order of preference: a fine-tuning or
# distillation run's final model, then a pretraining run's backbone.
RUN_DIR_MODELS = ("final", "backbone")
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + SAFETENSORS_SUFFIXES


# ---- what a path is ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _model_class(info: dict, where) -> type:
    """The class for a config.json of ours (a model type this version does not know is an error)."""
    cls = MODEL_CLASSES.get(info.get("model_type"))
    if cls is None:
        raise UserError(
            f"{where}: a {info.get('model_type')!r} model, which this version cannot load "
            f"(known: {', '.join(MODEL_CLASSES)}); upgrade sapiens-toolkit"
        )
    return cls


def locate(path_or_repo: str | os.PathLike, *, revision: str | None = None) -> tuple[str, str]:
    """(kind, where): kind is "ours" (a folder of ours), "file" or "foreign" (a file / folder to convert), or
    "hub" (a repo id).

    A run dir resolves to the folder of its exported model. Raises UserError for a path that is none of these.
    """
    path = Path(path_or_repo).expanduser()
    text = str(path_or_repo)
    if path.is_file():
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            return "file", str(path)
        raise UserError(f"{path}: a file, but not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
    if path.is_dir():
        if revision is not None:
            raise UserError(f"{path}: revision={revision!r} applies to Hub repos, not to a local folder")
        if (path / CONFIG_NAME).is_file():
            info = _read_json(path / CONFIG_NAME)
            return ("ours" if is_our_config(info) else "foreign"), str(path)
        for sub in RUN_DIR_MODELS:
            if (path / sub / CONFIG_NAME).is_file():
                return "ours", str(path / sub)
        if (path / "checkpoints").is_dir():
            raise UserError(
                f"{path}: a run dir without an exported model ({' or '.join(RUN_DIR_MODELS)}/); "
                "run `sapiens export-backbone` on a pretraining run, or let the run finish"
            )
        if is_foreign_folder(path):  # weights without a config.json
            return "foreign", str(path)
        raise UserError(
            f"{path}: neither a model folder (config.json) nor a run dir with {' or '.join(RUN_DIR_MODELS)}/"
        )
    if is_repo_id(text):
        return "hub", text
    raise UserError(f"{path}: not found (no such file or folder, and not a Hub repo id org/name)")


def _hub_config(repo_id: str, revision: str | None) -> dict:
    """config.json of a Hub repo (through the cache; works offline from a populated cache)."""
    from huggingface_hub import hf_hub_download

    try:
        f = hf_hub_download(repo_id, CONFIG_NAME, revision=revision)
    except Exception as e:  # offline and not cached, unknown repo, no access: say which and why
        raise UserError(
            f"{repo_id}: cannot read {CONFIG_NAME} from the Hub ({type(e).__name__}: {e})"
        ) from None
    return _read_json(Path(f))


def model_config(path_or_repo: str | os.PathLike, *, revision: str | None = None):
    """(model_type, config dataclass) of a checkpoint of ours, read from its config.json only (no weights);
    None for a foreign checkpoint (its shape is known only once it is converted)."""
    from sapiens_lite.config import config_from_dict

    kind, where = locate(path_or_repo, revision=revision)
    if kind == "ours":
        info = _read_json(Path(where) / CONFIG_NAME)
    elif kind == "hub":
        info = _hub_config(where, revision)
        if not is_our_config(info):
            return None
    else:
        return None
    cls = _model_class(info, where)
    try:
        return info["model_type"], config_from_dict(cls.config_class, info["config"])
    except UserError as e:
        raise UserError(f"{where}/{CONFIG_NAME}: {e}") from None


def backbone_config(path_or_repo: str | os.PathLike, *, revision: str | None = None) -> ViTConfig | None:
    """The (resolved) `ViTConfig` of the backbone a checkpoint of ours holds (a backbone or a pose model's),
    else None."""
    found = model_config(path_or_repo, revision=revision)
    if found is None:
        return None
    _, cfg = found
    return (cfg.backbone if isinstance(cfg, PoseConfig) else cfg).resolved()


# ---- loading ----------------------------------------------------------------------------------------


def load_model(
    path_or_repo: str | os.PathLike,
    *,
    revision: str | None = None,
    map_location="cpu",
    source: str | None = None,
    arch: str | None = None,
    num_heads: int | None = None,
    scheme: str | None = None,
) -> nn.Module:
    """The model a checkpoint holds, as the class its config names (eval mode, fp32).

    `source`, `arch`, `num_heads` and `scheme` only apply to foreign checkpoints (see `sapiens convert`):
    the format if it cannot be recognised, the arch or the number of heads of a backbone whose size no
    table holds, the keypoint scheme of a pose head.
    """
    kind, where = locate(path_or_repo, revision=revision)
    if kind == "hub":
        info = _hub_config(where, revision)
        if is_our_config(info):
            return _model_class(info, where).from_pretrained(
                where, revision=revision, map_location=map_location
            )
    elif kind == "ours":
        info = _read_json(Path(where) / CONFIG_NAME)
        return _model_class(info, where).from_pretrained(where, map_location=map_location)
    conv = read_checkpoint(where, revision=revision, source=source, num_heads=num_heads)
    return build_model(conv, arch=arch, scheme=scheme).to(map_location)


def load_pose_model(
    path_or_repo: str | os.PathLike,
    *,
    revision: str | None = None,
    expected_scheme: str | None = None,
    config: PoseConfig | None = None,
) -> PoseModel:
    """A `PoseModel` from any checkpoint `load_model` reads.

    config: build this model and load the checkpoint into it (a Sapiens `.pth` then gets the config's
        backbone settings, e.g. patch padding); otherwise the checkpoint's own config decides.
    expected_scheme: a head for another number of keypoints is a UserError naming the file, the expected
        and the found K.
    """
    if config is not None:
        model = PoseModel(config)
        init_from(model, path_or_repo, revision=revision)
        return model.eval()
    model = load_model(path_or_repo, revision=revision)
    if not isinstance(model, PoseModel):
        raise UserError(f"{path_or_repo}: holds a backbone, not a pose model (no keypoint head)")
    if expected_scheme is not None and model.scheme.name != _scheme_name(expected_scheme):
        raise UserError(
            f"{path_or_repo}: the checkpoint's head predicts {model.scheme.num_keypoints} keypoints "
            f"({model.scheme.name}), expected {_num_keypoints(expected_scheme)} (model.scheme={expected_scheme})"
        )
    return model


def _scheme_name(scheme: str) -> str:
    from sapiens_lite.keypoints import get_scheme

    return get_scheme(scheme).name


def _num_keypoints(scheme: str) -> int:
    from sapiens_lite.keypoints import get_scheme

    return get_scheme(scheme).num_keypoints


# ---- starting weights for training ------------------------------------------------------------------


def init_from(
    model: PoseModel | VisionTransformer,
    path_or_repo: str | os.PathLike,
    *,
    revision: str | None = None,
    load_head: bool = True,
) -> str:
    """Load a checkpoint's weights into `model` (a pose model or a backbone); returns a one-line description.

    The backbone may come from another grid or cls layout (a cls slot is dropped, the position grid
    resampled); width, depth and patch size must match. A pose checkpoint's head is loaded too when
    `load_head` (its keypoint count and layers must fit `model.head`).
    """
    backbone = model.backbone if isinstance(model, PoseModel) else model
    kind, where = locate(path_or_repo, revision=revision)
    if kind in ("file", "foreign") or (kind == "hub" and not is_our_config(_hub_config(where, revision))):
        # Converted straight into the target's config: the checkpoint's own arch need not be in any table.
        conv = read_checkpoint(where, revision=revision)
        with_head = conv.head is not None and load_head and isinstance(model, PoseModel)
        if with_head:
            _check_head_keypoints(conv.hints.head.num_keypoints, model, where)
            _load_head(model, conv.head, where)
        backbone.load_state_dict(adapt_to(conv, backbone.config), strict=True)
        return f"{conv.source} checkpoint {where} (backbone{' + head' if with_head else ''})"
    src = load_model(path_or_repo, revision=revision)
    src_backbone = src.backbone if isinstance(src, PoseModel) else src
    with_head = isinstance(src, PoseModel) and load_head and isinstance(model, PoseModel)
    if with_head:
        _check_head_keypoints(src.scheme.num_keypoints, model, where)
        _load_head(model, src.head.state_dict(), where)
    load_backbone(backbone, src_backbone, where)
    what = "pose checkpoint" if isinstance(src, PoseModel) else "backbone"
    return f"{what} {where} (backbone{' + head' if with_head else ''})"


def load_backbone(target: VisionTransformer, source: VisionTransformer, name: str = "checkpoint") -> None:
    """Copy `source`'s weights into `target` (cls token dropped, position grid resampled if they differ)."""
    c = source.config.resolved()
    hints = Hints(
        embed_dim=c.embed_dim,
        depth=c.depth,
        patch_size=c.patch_size,
        grid=source.grid_size,
        cls_token=c.cls_token,
    )
    conv = Converted(source=name, backbone=source.state_dict(), hints=hints)
    target.load_state_dict(adapt_to(conv, target.config), strict=True)


def _check_head_keypoints(found_k: int, model: PoseModel, source: str) -> None:
    k = model.scheme.num_keypoints
    if found_k != k:
        raise UserError(
            f"{source}: the checkpoint's head predicts {found_k} keypoints, expected {k} "
            f"(model.scheme={model.config.scheme}); set model.scheme to match or init.load_head=false"
        )


def _load_head(model: PoseModel, sd: dict, source: str) -> None:
    try:
        model.head.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # another head kind or width: name the file and both sides
        first = str(e).strip().splitlines()
        raise UserError(
            f"{source}: its pose head does not fit model.head (kind={model.config.head.kind}, "
            f"channels={model.config.head.width}): {first[1].strip() if len(first) > 1 else first[0]}; "
            "set model.head to match or init.load_head=false"
        ) from None
