"""Checkpoint folders and the Hugging Face Hub: `from_pretrained`, `save_pretrained`, `push_to_hub`.

A checkpoint is a folder (local or a Hub repo) holding

    config.json         {"model_type": "vit", "format_version": 1, "config": {...ViTConfig...}, ...metadata}
    model.safetensors   the state dict (timm key names); large models: model-0000i-of-0000n.safetensors + index
    README.md           a model card (huggingface_hub ModelCard: arch, params, input size, license, tags)

Any model class whose `__init__(cfg)` takes one config dataclass uses `HubMixin` by declaring
`model_type` and `config_class` and keeping the config in `self.config`:

    class VisionTransformer(nn.Module, HubMixin):
        model_type = "vit"
        config_class = ViTConfig

    model = VisionTransformer.from_pretrained("org/sapiens-0.3b", revision="v1")   # or a local folder
    model.save_pretrained("runs/x/backbone")
    model.push_to_hub("me/my-backbone", private=True)

Why not `huggingface_hub.PyTorchModelHubMixin`: it writes the init arguments flat into config.json
(no model_type / format version), loads dataclass configs by silently dropping unknown keys (we reject
them), is not atomic, and would import huggingface_hub whenever a model module is imported. Its
building blocks (`snapshot_download`, `save_torch_state_dict`, `HfApi.upload_folder`, `ModelCard`)
are used here directly. huggingface_hub is imported only inside the functions that use it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch

from sapiens_lite.config import config_from_dict, config_to_dict
from sapiens_lite.errors import UserError
from sapiens_lite.paths import output_dir

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
FORMAT_VERSION = 1
LIBRARY_NAME = "sapiens-toolkit"
# What from_pretrained fetches from a Hub repo (nothing else: no stray .pth or fp16 variants).
_HUB_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*-of-*.safetensors"]


class HubMixin:
    """Adds from_pretrained / save_pretrained / push_to_hub to an nn.Module built from one config dataclass."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]

    def hub_metadata(self) -> dict:
        """Extra top-level entries of config.json (input size, mean/std, keypoint scheme...); override to add."""
        return {}

    def model_card_body(self) -> str:
        """Markdown under the card's title; override for a model-specific description."""
        return ""

    # ---- load ----

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        cache_dir: str | os.PathLike | None = None,
        token: str | None = None,
    ):
        """Build the model from `config.json` and load `model.safetensors` from a folder or a Hub repo id.

        Hub repos go through the local cache (`HF_HUB_CACHE`); with `HF_HUB_OFFLINE=1` only cached
        snapshots are used. `revision` is a branch, tag or commit hash. The model is returned in
        eval mode (call `.train()` to fine-tune), with float tensors in the default dtype (fp32).
        """
        folder = resolve_checkpoint_folder(
            repo_id_or_path, revision=revision, cache_dir=cache_dir, token=token
        )
        info = read_checkpoint_config(folder, expected_model_type=cls.model_type)
        try:
            cfg = config_from_dict(cls.config_class, info["config"])
        except UserError as e:
            raise UserError(f"{folder / CONFIG_NAME}: {e}") from None
        state_dict = load_weights(folder, map_location=map_location)
        return build_with_weights(
            lambda: cls(cfg), state_dict, strict=strict, source=folder, map_location=map_location
        )

    # ---- save ----

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        license: str = "apache-2.0",
        tags: tuple[str, ...] = (),
        metadata: dict | None = None,
        max_shard_size: int | str = "5GB",
    ) -> Path:
        """Write config.json, model.safetensors (sharded above `max_shard_size`) and README.md to a folder.

        The files are written into a temporary folder next to the target and then moved in with
        `os.replace`, so a reader never sees a half-written checkpoint.
        """
        from huggingface_hub import save_torch_state_dict

        save_directory = output_dir(save_directory, "output folder")
        info = {
            "model_type": self.model_type,
            "format_version": FORMAT_VERSION,
            "config": config_to_dict(self.config),
            "library": LIBRARY_NAME,
            "library_version": _library_version(),
            **self.hub_metadata(),
            **(metadata or {}),
        }
        made = [p for p in save_directory.parents if not p.exists()]
        try:
            save_directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(
                tempfile.mkdtemp(prefix=f".{save_directory.name}.", suffix=".tmp", dir=save_directory.parent)
            )
        except OSError as e:
            raise UserError(f"{save_directory}: cannot write there ({e.strerror or e})") from None
        try:
            (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
            # On a CPU `.cpu()` is the tensor itself, possibly a view into a larger buffer (DeepSpeed's flat ZeRO
            # buffers, gathered ZeRO-3 partitions), which safetensors refuses to store: those are copied.
            state_dict = {k: _owning(v.detach().cpu()) for k, v in self.state_dict().items()}
            save_torch_state_dict(state_dict, tmp, max_shard_size=max_shard_size)
            self.model_card(license=license, tags=tags, info=info).save(tmp / "README.md")
            _usual_modes(tmp)
            _move_into(tmp, save_directory)
        except BaseException:  # a full disk, a quota: the OSError goes on, the folders made for it go
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return save_directory

    def model_card(
        self, *, license: str = "apache-2.0", tags: tuple[str, ...] = (), info: dict | None = None
    ):
        """A huggingface_hub `ModelCard` with YAML metadata (license, library, tags) and a short summary."""
        from huggingface_hub import ModelCard, ModelCardData

        info = info or {}
        cfg = config_to_dict(self.config)
        num_params = sum(p.numel() for p in self.parameters())
        arch = cfg.get("arch") or cfg.get("backbone", {}).get("arch", "?")
        img_size = cfg.get("img_size") or cfg.get("backbone", {}).get("img_size")
        data = ModelCardData(
            license=license,
            library_name=LIBRARY_NAME,
            tags=[LIBRARY_NAME, self.model_type, "vision", *tags],
        )
        lines = [
            f"# {self.model_type} {arch}",
            "",
            f"A `{type(self).__name__}` saved by [{LIBRARY_NAME}](https://pypi.org/project/{LIBRARY_NAME}/).",
            "",
            "| | |",
            "| --- | --- |",
            f"| model_type | `{self.model_type}` |",
            f"| arch | `{arch}` |",
            f"| parameters | {num_params:,} ({_human(num_params)}) |",
            f"| input size (H, W) | {tuple(img_size) if img_size else '?'} |",
            f"| format_version | {info.get('format_version', FORMAT_VERSION)} |",
            "",
            "```python",
            f"from {type(self).__module__} import {type(self).__name__}",
            f'model = {type(self).__name__}.from_pretrained("<repo_id or folder>")',
            "```",
        ]
        body = self.model_card_body()
        if body:
            lines += ["", body]
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = f"Upload model with {LIBRARY_NAME}",
        license: str = "apache-2.0",
        tags: tuple[str, ...] = (),
        metadata: dict | None = None,
    ) -> str:
        """Create `repo_id` if needed and upload the saved folder in one commit; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", license=license, tags=tags, metadata=metadata)
            commit = api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
            )
        return str(getattr(commit, "commit_url", commit))


# ---- functions behind the mixin (usable on their own, e.g. to peek at a checkpoint's model_type) ----


def resolve_checkpoint_folder(
    repo_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local checkpoint folder, or the cached snapshot of a Hub repo (downloaded if needed and allowed).

    allow_patterns: the repo files to fetch; by default our config.json and safetensors weights.
    """
    path = Path(repo_id_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise UserError(f"{path}: revision={revision!r} applies to Hub repos, not to a local folder")
        return path
    if path.exists():
        raise UserError(
            f"{path}: expected a checkpoint folder (with {CONFIG_NAME} and {WEIGHTS_NAME}), got a file"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = str(repo_id_or_path)
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=allow_patterns or _HUB_PATTERNS,
        )
    except HFValidationError:
        raise UserError(f"{repo_id}: no such local folder, and not a valid Hub repo id (org/name)") from None
    except RevisionNotFoundError:
        raise UserError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise UserError(f"Hub repo {repo_id!r} not found (or private/gated: pass token= or log in)") from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"Hub repo {where} is not in the local cache and cannot be downloaded "
            "(offline: HF_HUB_OFFLINE=1, or no connection)"
        ) from None
    return Path(folder)


def is_our_config(info) -> bool:
    """A parsed config.json written by this library's `save_pretrained` (any model_type, any version)."""
    if not isinstance(info, dict):
        return False
    return info.get("library") == LIBRARY_NAME or {"model_type", "config", "format_version"} <= set(info)


def read_checkpoint_config(folder: str | os.PathLike, expected_model_type: str | None = None) -> dict:
    """Read and check `config.json` of a checkpoint folder."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{path}: not found; a checkpoint folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or "model_type" not in info or "config" not in info:
        raise UserError(f"{path}: expected keys 'model_type' and 'config' (a {LIBRARY_NAME} checkpoint)")
    version = info.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {version!r} is newer than this {LIBRARY_NAME} understands "
            f"({FORMAT_VERSION}); upgrade {LIBRARY_NAME}"
        )
    if expected_model_type is not None and info["model_type"] != expected_model_type:
        raise UserError(f"{path}: holds a {info['model_type']!r} model, not a {expected_model_type!r} model")
    return info


def load_weights(
    folder: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint folder: `model.safetensors`, or the shards listed in its index."""
    from safetensors.torch import load_file

    folder = Path(folder)
    device = str(map_location)
    if (folder / WEIGHTS_NAME).is_file():
        return load_file(folder / WEIGHTS_NAME, device=device)
    index = folder / WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise UserError(f"{folder / WEIGHTS_NAME}: not found (nor a sharded {WEIGHTS_INDEX_NAME})")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state_dict: dict[str, torch.Tensor] = {}
    for name in shards:
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: weight shard listed in {WEIGHTS_INDEX_NAME} not found")
        state_dict.update(load_file(folder / name, device=device))
    return state_dict


def build_with_weights(
    build: Callable[[], torch.nn.Module],
    state_dict: dict[str, torch.Tensor],
    *,
    strict: bool = True,
    source="state dict",
    map_location: str | torch.device = "cpu",
) -> torch.nn.Module:
    """`build()` holding `state_dict`, in eval mode, with float tensors in the default dtype (fp32).

    Built on the meta device and given the loaded tensors (`assign=True`): no random init of a 2B model
    only to overwrite it. Keys and shapes are checked first (`check_state_dict`, naming `source`).
    Non-strict loads, and models with tensors outside their state dict (non-persistent buffers), are
    built normally so that nothing stays on the meta device.
    """
    dtype = torch.get_default_dtype()
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    with torch.device("meta"):
        model = build()
    check_state_dict(model, state_dict, strict=strict, source=source)
    if strict:
        model.load_state_dict(state_dict, assign=True)
    if not strict or any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = build()
        model.load_state_dict(state_dict, strict=strict)
        model.to(map_location)
    return model.eval()


def check_state_dict(model: torch.nn.Module, state_dict: dict, *, strict: bool, source) -> None:
    """UserError listing missing / unexpected keys (when strict) and shape mismatches (always)."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if strict and missing:
        problems.append(f"missing keys {_preview(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    shapes = [
        f"{k}: {tuple(v.shape)} in file, {tuple(expected[k].shape)} in model"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if shapes:
        problems.append(f"shape mismatches {_preview(shapes)}")
    if problems:
        raise UserError(
            f"{source}: weights do not fit the model built from {CONFIG_NAME}: " + "; ".join(problems)
        )


def _owning(t):
    """`t`, or a copy of it when it is a view into a larger storage."""
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def _usual_modes(folder: Path) -> None:
    """The modes the umask gives new files and folders (0755 / 0644 with umask 022): `mkdtemp` makes its
    folder 0700 and some writers their files 0600, which would hide a saved model from colleagues."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _move_into(src: Path, dst: Path) -> None:
    """Move the files of `src` into `dst`, each with os.replace; weight files of an older save are removed."""
    if not dst.exists():
        os.replace(src, dst)
        return
    if not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a folder")
    new = {p.name for p in src.iterdir()}
    for old in dst.glob("model*.safetensors*"):
        if old.name not in new:
            old.unlink()
    for p in src.iterdir():
        os.replace(p, dst / p.name)


def _preview(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _human(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _library_version() -> str:
    import sapiens_lite

    return sapiens_lite.__version__
