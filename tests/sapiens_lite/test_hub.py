"""Checkpoint folders and Hub I/O (sapiens_lite/hub.py), all offline.

Hub downloads are exercised through an HF cache the test populates itself (HF_HUB_OFFLINE=1), uploads
through a fake HfApi that records what would be pushed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from sapiens_lite.errors import UserError
from sapiens_lite.hub import HubMixin, read_checkpoint_config
from sapiens_lite.models.vit import VisionTransformer, build_vit

SMALL = (64, 48)


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return build_vit("vit_test", img_size=SMALL, **kw)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ---- local folders ----


def test_save_then_load_a_local_folder(tmp_path):
    model = tiny_vit(pos_embed="sincos", cls_token=True, patch_padding=2)
    out = model.save_pretrained(tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    info = json.loads((out / "config.json").read_text())
    assert info["model_type"] == "vit" and info["format_version"] == 1
    assert info["config"]["arch"] == "vit_test" and info["config"]["img_size"] == [64, 48]
    assert info["config"]["embed_dim"] == 64 and info["config"]["patch_padding"] == 2  # resolved sizes
    assert info["library"] == "sapiens-toolkit"
    assert info["input_size"] == [64, 48] and info["num_params"] == sum(p.numel() for p in model.parameters())
    assert load_file(out / "model.safetensors").keys() == model.state_dict().keys()

    loaded = VisionTransformer.from_pretrained(out)
    assert loaded.config == model.config and not loaded.training
    assert_same_weights(loaded, model)
    assert not loaded.pos_embed.requires_grad and loaded.cls_token.requires_grad
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(1, 3, *SMALL)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded.save_pretrained(tmp_path / "again")  # a loaded model saves again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_model_card_has_metadata(tmp_path):
    tiny_vit().save_pretrained(tmp_path, license="cc-by-nc-4.0", tags=("pose",))
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "cc-by-nc-4.0"
    assert card.data.library_name == "sapiens-toolkit"
    assert {"sapiens-toolkit", "vit", "pose"} <= set(card.data.tags)
    n = sum(p.numel() for p in tiny_vit().parameters())
    assert "vit_test" in card.text and f"{n:,}" in card.text and "(64, 48)" in card.text


def test_metadata_lands_in_config_json(tmp_path):
    tiny_vit().save_pretrained(tmp_path, metadata={"mean": [0.5, 0.5, 0.5], "source": "test"})
    info = read_checkpoint_config(tmp_path, expected_model_type="vit")
    assert info["mean"] == [0.5, 0.5, 0.5] and info["source"] == "test"


def test_overwrite_replaces_files_and_removes_stale_shards(tmp_path):
    big = tiny_vit(seed=1)
    big.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors.index.json" in names and len([n for n in names if n.startswith("model-")]) > 1
    assert_same_weights(VisionTransformer.from_pretrained(tmp_path / "ckpt"), big)  # sharded load

    small = tiny_vit(seed=2)
    small.save_pretrained(tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    assert_same_weights(VisionTransformer.from_pretrained(tmp_path / "ckpt"), small)


def test_failed_save_leaves_the_old_checkpoint_and_no_temporary_files(tmp_path, monkeypatch):
    first = tiny_vit(seed=1)
    first.save_pretrained(tmp_path / "ckpt")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_vit(seed=2).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(OSError):
        tiny_vit(seed=2).save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert_same_weights(VisionTransformer.from_pretrained(tmp_path / "ckpt"), first)


def test_bf16_weights_load_as_float32(tmp_path):
    model = tiny_vit().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = VisionTransformer.from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(loaded.pos_embed, model.pos_embed.float())


# ---- errors ----


def test_missing_files_and_wrong_contents_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="config.json: not found"):
        VisionTransformer.from_pretrained(tmp_path)
    tiny_vit().save_pretrained(tmp_path / "ok")

    (tmp_path / "ok" / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(UserError, match=r"ok/model.safetensors: not found"):
        VisionTransformer.from_pretrained(tmp_path / "ok")
    (tmp_path / "moved.safetensors").rename(tmp_path / "ok" / "model.safetensors")

    with pytest.raises(UserError, match="expected a checkpoint folder"):
        VisionTransformer.from_pretrained(tmp_path / "ok" / "config.json")

    cfg_path = tmp_path / "ok" / "config.json"
    good = json.loads(cfg_path.read_text())
    for change, pattern in [
        ({"model_type": "pose"}, "holds a 'pose' model, not a 'vit' model"),
        ({"format_version": 2}, "format_version 2 is newer"),
        ({"config": {**good["config"], "depht": 3}}, "config.json: unknown config key 'depht'.*depth"),
        ({"config": {**good["config"], "depth": 3}}, "missing keys blocks.2"),
        ({"config": {**good["config"], "depth": 1}}, "unexpected keys blocks.1"),
        ({"config": {**good["config"], "embed_dim": 32}}, "shape mismatches"),
    ]:
        cfg_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(UserError, match=pattern):
            VisionTransformer.from_pretrained(tmp_path / "ok")
    cfg_path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        VisionTransformer.from_pretrained(tmp_path / "ok")


def test_non_strict_load_keeps_the_init_of_missing_weights(tmp_path):
    tiny_vit(seed=1).save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    info = json.loads(cfg_path.read_text())
    info["config"]["depth"] = 3
    cfg_path.write_text(json.dumps(info))
    loaded = VisionTransformer.from_pretrained(tmp_path, strict=False)
    assert len(loaded.blocks) == 3
    assert all(not p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(loaded.blocks[0].attn.qkv.weight, tiny_vit(seed=1).blocks[0].attn.qkv.weight)


# ---- a second model class: the mixin is generic (pose models use it too) ----


@dataclass
class HeadConfig:
    channels: int = 4


@dataclass
class ToyConfig:
    width: int = 3
    head: HeadConfig = field(default_factory=HeadConfig)


class ToyModel(nn.Module, HubMixin):
    model_type = "toy"
    config_class = ToyConfig

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.lin = nn.Linear(cfg.width, cfg.head.channels)
        # not in the state dict: exercises the rebuild after a meta-device load
        self.register_buffer("scale", torch.full((cfg.head.channels,), 2.0), persistent=False)

    def hub_metadata(self) -> dict:
        return {"keypoint_scheme": "coco17"}


def test_mixin_works_for_another_model_with_a_nested_config(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(ToyConfig(width=5, head=HeadConfig(channels=7)))
    model.save_pretrained(tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    assert info["model_type"] == "toy" and info["keypoint_scheme"] == "coco17"
    assert info["config"] == {"width": 5, "head": {"channels": 7}}
    loaded = ToyModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    assert not loaded.scale.is_meta and torch.all(loaded.scale == 2)
    with pytest.raises(UserError, match="holds a 'toy' model, not a 'vit' model"):
        VisionTransformer.from_pretrained(tmp_path)


# ---- the Hub: a populated cache, offline ----


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache with offline mode on (huggingface_hub reads both at import, so patch constants too)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache: Path, repo_id: str, model: nn.Module, commit: str, refs: tuple[str, ...]) -> None:
    """The layout of huggingface_hub's file_download: models--org--name/{refs/<ref>, snapshots/<sha>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


def test_load_by_repo_id_from_the_cache_with_revisions(hf_cache):
    main, v1 = tiny_vit(seed=1), tiny_vit(seed=2)
    sha_main, sha_v1 = "a" * 40, "b" * 40
    put_in_cache(hf_cache, "sapiens/vit-test", main, sha_main, refs=("main",))
    put_in_cache(hf_cache, "sapiens/vit-test", v1, sha_v1, refs=("v1",))

    assert_same_weights(VisionTransformer.from_pretrained("sapiens/vit-test"), main)
    assert_same_weights(VisionTransformer.from_pretrained("sapiens/vit-test", revision="v1"), v1)
    assert_same_weights(VisionTransformer.from_pretrained("sapiens/vit-test", revision=sha_v1), v1)

    with pytest.raises(UserError, match="'sapiens/other'.*not in the local cache"):
        VisionTransformer.from_pretrained("sapiens/other")
    with pytest.raises(UserError, match=r"revision 'v2'"):
        VisionTransformer.from_pretrained("sapiens/vit-test", revision="v2")
    with pytest.raises(UserError, match="not a valid Hub repo id"):
        VisionTransformer.from_pretrained("no/such/folder")


def test_cached_repo_without_weights_names_the_file(hf_cache):
    put_in_cache(hf_cache, "org/broken", tiny_vit(), "c" * 40, refs=("main",))
    snapshot = hf_cache / "models--org--broken" / "snapshots" / ("c" * 40)
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors: not found"):
        VisionTransformer.from_pretrained("org/broken")


def test_explicit_cache_dir(tmp_path, hf_cache):
    other = tmp_path / "elsewhere"
    put_in_cache(other, "org/m", tiny_vit(seed=3), "d" * 40, refs=("main",))
    assert_same_weights(VisionTransformer.from_pretrained("org/m", cache_dir=other), tiny_vit(seed=3))


# ---- push_to_hub ----


class FakeHfApi:
    """Records create_repo / upload_folder calls; keeps a copy of the uploaded folder's files."""

    calls: list = []

    def __init__(self, token=None, **kwargs):
        FakeHfApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        FakeHfApi.calls.append(
            ("create_repo", {"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
        )

        class Url:
            pass

        url = Url()
        url.repo_id = repo_id
        return url

    def upload_folder(self, *, repo_id, folder_path, commit_message, repo_type=None, revision=None, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        FakeHfApi.calls.append(
            (
                "upload_folder",
                {"repo_id": repo_id, "files": files, "message": commit_message, "revision": revision},
            )
        )

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/{'e' * 40}"

        return Info()


def test_push_to_hub_uploads_the_saved_folder(monkeypatch, tmp_path):
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    model = tiny_vit()
    url = model.push_to_hub("me/vit-test", private=True, token="hf_x", commit_message="first")
    assert url == f"https://huggingface.co/me/vit-test/commit/{'e' * 40}"
    kinds = [c[0] for c in FakeHfApi.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    assert FakeHfApi.calls[0][1]["token"] == "hf_x"
    assert FakeHfApi.calls[1][1] == {"repo_id": "me/vit-test", "private": True, "exist_ok": True}
    upload = FakeHfApi.calls[2][1]
    assert upload["message"] == "first" and upload["repo_id"] == "me/vit-test"
    assert sorted(upload["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(upload["files"]["config.json"])["model_type"] == "vit"

    # what was uploaded loads back into the same model
    for name, data in upload["files"].items():
        (tmp_path / name).write_bytes(data)
    assert_same_weights(VisionTransformer.from_pretrained(tmp_path), model)
