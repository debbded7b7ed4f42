"""`sapiens export-backbone`: a 2-rank ZeRO-3 run's encoder, consolidated to fp32, equals the live weights."""

from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch
import yaml

from pretrain.export import encoder_state_dict
from sapiens_lite.cli import main as sapiens
from sapiens_lite.models.vit import VisionTransformer
from tests._launch import clean_env, torchrun

from .test_train import TINY

# Runs the trainer under torchrun, then gathers the ZeRO-3 partitioned parameters on rank 0 and saves them.
LIVE_WEIGHTS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import deepspeed
    from pretrain.config import PretrainConfig
    from pretrain.train import train
    from sapiens_lite.config import load_config

    engine, _ = train(load_config(PretrainConfig, [sys.argv[1]]), resume=False)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if engine.is_main:
            sd = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
            torch.save(sd, sys.argv[2])
    """
)


def test_encoder_state_dict_drops_the_cls_slot():
    full = {
        "encoder.cls_token": torch.zeros(1, 1, 8),
        "encoder.pos_embed": torch.arange(5 * 8.0).reshape(1, 5, 8),
        "encoder.norm.weight": torch.ones(8),
        "decoder_embed.weight": torch.ones(4, 8),
    }
    sd = encoder_state_dict(full, drop_cls_token=False)
    assert sorted(sd) == ["cls_token", "norm.weight", "pos_embed"]
    sd = encoder_state_dict(full, drop_cls_token=True)
    assert sorted(sd) == ["norm.weight", "pos_embed"]
    torch.testing.assert_close(sd["pos_embed"], full["encoder.pos_embed"][:, 1:])


def test_export_of_a_non_run_directory_is_a_user_error(tmp_path, capsys):
    assert sapiens(["export-backbone", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "config.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_export_after_two_rank_zero3_run_matches_live_weights(tmp_path):
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["engine"].update(run_dir=str(tmp_path / "run"), zero_stage=3, total_steps=3)
    cfg["viz"]["every"] = 0
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "train_and_dump.py"
    script.write_text(LIVE_WEIGHTS_SCRIPT)
    live_path = tmp_path / "live.pt"
    env = clean_env(DS_ACCELERATOR="cpu")
    cmd = torchrun(2)
    r = subprocess.run(
        cmd + [str(script), str(cfg_path), str(live_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    live = torch.load(live_path)

    out = tmp_path / "backbone"
    assert sapiens(["export-backbone", str(tmp_path / "run"), str(out)]) == 0
    model = VisionTransformer.from_pretrained(out)
    assert (
        model.config.cls_token and model.config.img_size == (64, 48) and model.config.pos_embed == "learned"
    )
    exported = model.state_dict()
    encoder = {k.removeprefix("encoder."): v for k, v in live.items() if k.startswith("encoder.")}
    assert sorted(exported) == sorted(encoder)
    for k, v in encoder.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=k)

    no_cls = tmp_path / "backbone_nocls"
    assert sapiens(["export-backbone", str(tmp_path / "run"), str(no_cls), "--drop-cls-token"]) == 0
    pose_backbone = VisionTransformer.from_pretrained(no_cls)
    assert pose_backbone.cls_token is None and pose_backbone.pos_embed.shape == (1, 4 * 3, 64)
    torch.testing.assert_close(pose_backbone.pos_embed, encoder["pos_embed"][:, 1:], rtol=0, atol=0)
    feats = pose_backbone(torch.randn(1, 3, 64, 48))
    assert feats.shape == (1, 64, 4, 3)
