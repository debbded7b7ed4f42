"""`sapiens convert` / `read_checkpoint` on what users have: transformers folders, Hub repos, bare files.

Contract: a folder as transformers' `save_pretrained` writes it (config.json + model.safetensors, or
shards + index, or pytorch_model.bin), or a Hub repo id served from the HF cache with
`HF_HUB_OFFLINE=1`, converts to a folder that `from_pretrained` loads and that computes what the
transformers model computes (fp32, max abs diff <= 1e-5), with the settings only config.json holds:
the number of heads (depth 4 and 4 heads are in no arch table), LayerNorm eps (transformers'
default 1e-12; the inputs are scaled so that eps 1e-6 would visibly change the features) and
VitPose's `out_indices` (an earlier stage becomes a truncated backbone, exactly). A bare state dict of
an unknown size converts with `--num-heads`. Folders of ours, folders without weights and a
config.json that is not JSON are one line on stderr with exit code 2. transformers is the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sapiens_lite.cli import main
from sapiens_lite.convert import build_model, is_foreign_folder, read_checkpoint
from sapiens_lite.errors import UserError
from sapiens_lite.models.pose import PoseModel
from sapiens_lite.models.vit import VisionTransformer
from tests.sapiens_lite.test_hub import hf_cache, tiny_vit  # noqa: F401  (hf_cache is a fixture)

TOL = 1e-5
DIM, DEPTH, HEADS = 64, 4, 4  # no arch has depth 4: the heads must come from config.json


def _max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _convert_subprocess(*argv, env=None):
    """`sapiens convert ...` in a fresh interpreter (the user's view: argv, environment, exit code)."""
    run_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sapiens_lite.cli", "convert", *map(str, argv)],
        capture_output=True,
        text=True,
        env=run_env,
        timeout=300,
    )


def _convert(capsys, *argv):
    rc = main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- transformers ViTMAE ----


def _vitmae():
    """Depth 4, 4 heads, transformers' default LayerNorm eps 1e-12, every patch kept (mask_ratio 0)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    cfg = ViTMAEConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        image_size=64, patch_size=16, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=4, decoder_intermediate_size=64, mask_ratio=0.0,
    )  # fmt: skip
    assert cfg.layer_norm_eps == 1e-12  # the default this test is about
    ref = ViTMAEForPreTraining(cfg).eval()
    with torch.no_grad():
        # Tokens of variance ~1e-9 entering the first LayerNorm: eps 1e-6 instead of 1e-12 would shrink
        # them ~30x, so the comparison below fails unless eps comes through from config.json.
        emb = ref.vit.embeddings
        emb.patch_embeddings.projection.weight.mul_(1e-3)
        emb.patch_embeddings.projection.bias.zero_()
        emb.position_embeddings.mul_(1e-4)
        emb.cls_token.normal_(0, 1e-4)
    return ref


def _vitmae_tokens(ref, x):
    """ViTMAE encoder output [B, 1 + L, C], masking as the identity (noise = arange keeps the order)."""
    noise = torch.arange(16.0).expand(x.shape[0], 16)
    with torch.no_grad():
        return ref.vit(x, noise=noise).last_hidden_state


@pytest.mark.slow
def test_vitmae_folder_converts_in_a_subprocess_with_heads_and_eps(tmp_path):
    ref = _vitmae()
    ref.save_pretrained(tmp_path / "vitmae")
    result = _convert_subprocess(tmp_path / "vitmae", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "[transformers_vitmae]" in result.stdout and "4 layers, 4 heads" in result.stdout

    loaded = VisionTransformer.from_pretrained(tmp_path / "out")
    cfg = loaded.config
    assert (cfg.depth, cfg.num_heads, cfg.norm_eps, cfg.img_size, cfg.cls_token) == (
        4,
        4,
        1e-12,
        (64, 64),
        True,
    )
    info = json.loads((tmp_path / "out" / "config.json").read_text())
    assert info["config"]["norm_eps"] == 1e-12
    assert info["converted_from"] == {"source": "transformers_vitmae", "checkpoint": str(tmp_path / "vitmae")}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = loaded.forward_tokens(x)
    expected = _vitmae_tokens(ref, x)
    assert _max_diff(ours, expected) <= TOL
    # the test can fail: the same weights with our usual eps compute something else
    wrong_eps = build_model(read_checkpoint(tmp_path / "vitmae"), norm_eps=1e-6)
    with torch.no_grad():
        assert _max_diff(wrong_eps.forward_tokens(x), expected) > 1e-2


def test_vitmae_pytorch_model_bin_folder(tmp_path):
    ref = _vitmae()
    ref.save_pretrained(tmp_path / "st")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(load_file(tmp_path / "st" / "model.safetensors"), folder / "pytorch_model.bin")
    assert is_foreign_folder(folder)
    conv = read_checkpoint(folder)
    assert conv.source == "transformers_vitmae" and conv.decoder is not None
    model = build_model(conv)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(model.forward_tokens(x), _vitmae_tokens(ref, x)) <= TOL


# ---- transformers VitPose ----


def _vitpose(*, simple: bool, out_indices=(DEPTH,), seed=1, backbone_only=False):
    from transformers import VitPoseBackbone, VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    torch.manual_seed(seed)
    backbone = VitPoseBackboneConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        image_size=[64, 48], patch_size=[16, 16], out_indices=list(out_indices),
    )  # fmt: skip
    if backbone_only:
        return VitPoseBackbone(backbone).eval()
    ref = VitPoseForPoseEstimation(
        VitPoseConfig(backbone_config=backbone, use_simple_decoder=simple, num_labels=17)
    )
    with torch.no_grad():  # make every parameter and BN statistic matter
        for name, p in ref.named_parameters():
            if "position_embeddings" in name:
                p.normal_(0, 0.2)
            elif name.startswith("head."):  # heatmaps of order 1, so that 1e-5 is a fp32-level tolerance
                p.normal_(0, 0.05)
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return ref.eval()


def _check_heatmaps(ref, folder: Path, depth: int = DEPTH):
    loaded = PoseModel.from_pretrained(folder)
    bb = loaded.backbone.config
    assert (bb.depth, bb.num_heads, bb.norm_eps, bb.patch_padding) == (depth, HEADS, 1e-12, 2)
    assert loaded.config.scheme == "coco17"
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ours, theirs = loaded(x), ref(x).heatmaps
    assert _max_diff(ours, theirs) <= TOL
    assert theirs.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("simple", [False, True], ids=["classic", "simple"])
def test_vitpose_folder(tmp_path, capsys, simple):
    ref = _vitpose(simple=simple)
    ref.save_pretrained(tmp_path / "vitpose")
    rc, out, err = _convert(capsys, tmp_path / "vitpose", tmp_path / "out")
    assert rc == 0, err
    kind = "simple" if simple else "vitpose"
    assert "[transformers_vitpose]" in out and f"pose model ({kind} head, 17 keypoints)" in out
    assert "note:" not in out  # out_indices is the last layer: nothing to say
    _check_heatmaps(ref, tmp_path / "out")


def test_vitpose_sharded_folder(tmp_path, capsys):
    ref = _vitpose(simple=False, seed=2)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    rc, _, err = _convert(capsys, tmp_path / "sharded", tmp_path / "out")
    assert rc == 0, err
    _check_heatmaps(ref, tmp_path / "out")


def _put_in_hub_cache(cache: Path, repo_id: str, save, commit: str, refs=("main",)) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    save(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.mark.slow
def test_vitpose_hub_repo_from_the_offline_cache_in_a_subprocess(tmp_path):
    ref = _vitpose(simple=False, seed=3)
    cache = tmp_path / "hf_cache"
    _put_in_hub_cache(cache, "usyd/vitpose-test", ref.save_pretrained, "a" * 40)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = _convert_subprocess("usyd/vitpose-test", tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr
    assert "usyd/vitpose-test [transformers_vitpose]" in result.stdout
    _check_heatmaps(ref, tmp_path / "out")


def test_hub_repo_revision_sharded_and_not_cached(tmp_path, capsys, hf_cache):  # noqa: F811
    main_ref, v1_ref = _vitpose(simple=False, seed=3), _vitpose(simple=True, seed=4)
    _put_in_hub_cache(hf_cache, "usyd/vitpose-test", main_ref.save_pretrained, "a" * 40)
    save_sharded = lambda d: v1_ref.save_pretrained(d, max_shard_size="100KB")  # noqa: E731
    _put_in_hub_cache(hf_cache, "usyd/vitpose-test", save_sharded, "b" * 40, refs=("v1",))
    capsys.readouterr()

    rc, out, err = _convert(capsys, "usyd/vitpose-test", tmp_path / "v1", "--revision", "v1")
    assert rc == 0, err
    assert "pose model (simple head, 17 keypoints)" in out
    _check_heatmaps(v1_ref, tmp_path / "v1")
    info = json.loads((tmp_path / "v1" / "config.json").read_text())
    assert info["converted_from"] == {
        "source": "transformers_vitpose",
        "checkpoint": "usyd/vitpose-test",
        "revision": "v1",
    }
    conv = read_checkpoint("usyd/vitpose-test")  # main
    assert conv.hints.head.kind == "vitpose"

    rc, out, err = _convert(capsys, "usyd/not-cached", tmp_path / "x")
    assert rc == 2 and err.count("\n") == 1, err
    assert "usyd/not-cached: no such local file or folder" in err and "not in the local cache" in err
    rc, out, err = _convert(capsys, "usyd/vitpose-test", tmp_path / "x", "--revision", "v2")
    assert rc == 2 and "(revision 'v2') is not in the local cache" in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("out_indices", [(2,), (-3,), (1, 3)], ids=["2", "minus3", "1+3"])
def test_vitpose_out_indices_before_the_last_layer_truncate_exactly(tmp_path, capsys, out_indices):
    """transformers reads stage i (after layer i) through the final LayerNorm; the head takes the last."""
    ref = _vitpose(simple=False, out_indices=out_indices)
    stage = max(i % (DEPTH + 1) for i in out_indices)  # -3 of stages 0..4 is stage 2
    ref.save_pretrained(tmp_path / "vitpose")
    rc, out, err = _convert(capsys, tmp_path / "vitpose", tmp_path / "out")
    assert rc == 0, err
    assert f"note: out_indices {list(out_indices)}: VitPose outputs stage {stage}" in out
    assert f"backbone of depth {stage} ({DEPTH - stage} unused layer(s) dropped)" in out
    _check_heatmaps(ref, tmp_path / "out", depth=stage)
    # the test can fail: the full depth computes other features than the stage the head reads
    full = _vitpose(simple=False)
    full.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert _max_diff(full.backbone(x).feature_maps[-1], ref.backbone(x).feature_maps[-1]) > 1e-2


def test_vitpose_out_indices_without_an_equivalent_are_refused(tmp_path):
    _vitpose(simple=False, out_indices=(1, 3), backbone_only=True).save_pretrained(tmp_path / "multi")
    with pytest.raises(UserError, match=r"several outputs \(out_indices \[1, 3\]\)"):
        read_checkpoint(tmp_path / "multi")
    _vitpose(simple=False, out_indices=(0,)).save_pretrained(tmp_path / "stem")
    with pytest.raises(UserError, match=r"config.json: out_indices \[0\] reads stage 0"):
        read_checkpoint(tmp_path / "stem")
    # a bare backbone with one earlier stage is exact too
    bare = _vitpose(simple=False, out_indices=(3,), backbone_only=True)
    bare.save_pretrained(tmp_path / "bare")
    model = build_model(read_checkpoint(tmp_path / "bare"))
    assert isinstance(model, VisionTransformer) and model.config.depth == 3
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        ours = model.forward_features(x).flatten(2).transpose(1, 2)  # [B, L, C]
        assert _max_diff(ours, bare(x).feature_maps[-1]) <= TOL


# ---- bare state dicts of an unknown size: --num-heads ----


def test_num_heads_for_a_bare_state_dict_of_unknown_size(tmp_path, capsys):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(5)
    ref = TimmViT(img_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=4, num_classes=0).eval()
    save_file(ref.state_dict(), tmp_path / "vit.safetensors")

    rc, out, err = _convert(capsys, tmp_path / "vit.safetensors", tmp_path / "a")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "no arch has embed_dim=48, depth=3" in err and "--num-heads" in err
    rc, _, err = _convert(capsys, tmp_path / "vit.safetensors", tmp_path / "a", "--num-heads", "5")
    assert rc == 2 and "num_heads=5 does not divide embed_dim=48" in err
    assert not (tmp_path / "a").exists()

    rc, out, err = _convert(capsys, tmp_path / "vit.safetensors", tmp_path / "a", "--num-heads", "4")
    assert rc == 0, err
    assert "arch custom (3 layers, 4 heads)" in out
    loaded = VisionTransformer.from_pretrained(tmp_path / "a")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(loaded.forward_tokens(x), ref.forward_features(x)) <= TOL
        # another head count computes something else: the flag matters
        two = build_model(read_checkpoint(tmp_path / "vit.safetensors", num_heads=2))
        assert _max_diff(two.forward_tokens(x), ref.forward_features(x)) > 1e-3


# ---- errors and folder kinds ----


def test_error_lines(tmp_path, capsys, hf_cache):  # noqa: F811
    tiny_vit().save_pretrained(tmp_path / "ours")
    _put_in_hub_cache(hf_cache, "me/ours", tiny_vit().save_pretrained, "c" * 40)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    _vitmae().config.to_json_file(no_weights / "config.json")
    bad_json = tmp_path / "bad_json"
    _vitpose(simple=True).save_pretrained(bad_json)
    (bad_json / "config.json").write_text("{not json")
    sharded = tmp_path / "sharded"
    _vitpose(simple=True).save_pretrained(sharded, max_shard_size="100KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    capsys.readouterr()  # transformers' progress bars
    cases = [
        ([tmp_path / "ours"], "ours: already a sapiens-toolkit checkpoint ('vit' model)"),
        (["me/ours"], "already a sapiens-toolkit checkpoint"),
        ([no_weights], "no_weights: no weights found; expected one of model.safetensors"),
        ([bad_json], "bad_json/config.json: not valid JSON"),
        ([sharded], "model.safetensors.index.json: shard 'model-00002-of-"),
        ([tmp_path / "ours", "--revision", "v1"], "revision='v1' applies to Hub repos"),
    ]
    for args, message in cases:
        rc, out, err = _convert(capsys, args[0], tmp_path / "dst", *args[1:])
        assert rc == 2, (args, err)
        assert err.startswith("sapiens convert: error: ") and err.count("\n") == 1, err
        assert message in err, err
    assert not (tmp_path / "dst").exists()


def test_is_foreign_folder(tmp_path):
    tiny_vit().save_pretrained(tmp_path / "ours")
    _vitpose(simple=True).save_pretrained(tmp_path / "theirs")
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights_only").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "weights_only" / "model.safetensors")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1,")
    assert not is_foreign_folder(tmp_path / "ours")
    assert is_foreign_folder(tmp_path / "theirs")
    assert not is_foreign_folder(tmp_path / "empty")
    assert is_foreign_folder(tmp_path / "weights_only")
    assert is_foreign_folder(tmp_path / "bad")
    assert not is_foreign_folder(tmp_path / "theirs" / "config.json")  # a file
