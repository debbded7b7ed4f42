"""Configs, parameter groups and the lr schedule (no DeepSpeed needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

from sapiens_lite.config import load_config
from sapiens_lite.errors import ConfigError, UserError
from sapiens_lite.models.vit import build_vit
from sapiens_train.config import EngineConfig, OptimConfig
from sapiens_train.engine import build_ds_config, global_batch_size
from sapiens_train.optim import param_groups, vit_layer_id
from sapiens_train.schedule import lr_at, scaled_lr


@dataclass
class TrainerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def test_configs_compose_and_reject_bad_values(tmp_path):
    cfg = load_config(TrainerConfig, overrides=["engine.zero_stage=2", "optim.betas=[0.9, 0.999]"])
    assert cfg.engine.zero_stage == 2 and cfg.optim.betas == (0.9, 0.999)
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(TrainerConfig, overrides=["engine.zero_stage=4"])
    with pytest.raises(ConfigError, match="zero_stage >= 1"):
        load_config(TrainerConfig, overrides=["engine.precision=bf16"])
    with pytest.raises(ConfigError, match="milestones"):
        load_config(TrainerConfig, overrides=["optim.schedule=step"])
    with pytest.raises(ConfigError, match="grad_clip"):
        load_config(TrainerConfig, overrides=["optim.grad_clip=0"])
    with pytest.raises(ConfigError, match="unknown config key 'engine.zero'"):
        load_config(TrainerConfig, overrides=["engine.zero=1"])


def test_global_batch_must_match_micro_accum_world():
    cfg = EngineConfig(micro_batch_size=4, grad_accum_steps=2, global_batch_size=64)
    assert global_batch_size(cfg, 8) == 64
    with pytest.raises(UserError, match=r"global_batch_size=64 .* = 32"):
        global_batch_size(cfg, 4)


def test_ds_config_generated_from_typed_config():
    cfg = EngineConfig(micro_batch_size=4, grad_accum_steps=3, zero_stage=2, precision="bf16")
    ds = build_ds_config(cfg, OptimConfig(grad_clip=1.0), world_size=2)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds["gradient_clipping"] == 1.0
    assert "optimizer" not in ds and "scheduler" not in ds
    fp32 = build_ds_config(EngineConfig(), OptimConfig(), world_size=1)
    assert (
        fp32["bf16"] == {"enabled": False}
        and "data_types" not in fp32
        and "torch_autocast" not in fp32
        and fp32["gradient_clipping"] == 0.0
    )


def test_scaled_lr_is_blr_times_batch_over_256():
    assert scaled_lr(OptimConfig(blr=1.5e-4), 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(OptimConfig(blr=1.5e-4, lr=5e-4), 4096) == 5e-4


def test_lr_warmup_then_cosine_step_constant():
    cfg = OptimConfig(warmup_steps=10, min_lr=1e-6)
    assert lr_at(0, cfg, 1e-3, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 1e-3, 110) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 1e-3, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 1e-3, 110) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert lr_at(110, cfg, 1e-3, 110) == pytest.approx(1e-6)
    lrs = [lr_at(s, cfg, 1e-3, 110) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    step = OptimConfig(schedule="step", milestones=(100, 150), gamma=0.1, warmup_steps=5)
    assert [lr_at(s, step, 1.0, 200) for s in (0, 4, 99, 100, 149, 150)] == pytest.approx(
        [0.2, 1.0, 1.0, 0.1, 0.1, 0.01]
    )
    assert lr_at(50, OptimConfig(schedule="constant"), 0.3, 100) == 0.3


def _names(model, group):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in group["params"]}


def test_weight_decay_only_on_matrices_not_embeddings_or_tokens():
    vit = build_vit("vit_test", cls_token=True, pos_embed="learned")
    groups = {g["name"]: g for g in param_groups(vit, 0.05)}
    assert set(groups) == {"layer_0_decay", "layer_0_no_decay"}
    decay, no_decay = _names(vit, groups["layer_0_decay"]), _names(vit, groups["layer_0_no_decay"])
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"} <= no_decay
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"} <= decay
    assert all(p.ndim >= 2 for p in groups["layer_0_decay"]["params"])
    assert (
        groups["layer_0_decay"]["weight_decay"] == 0.05 and groups["layer_0_no_decay"]["weight_decay"] == 0.0
    )
    n_trainable = sum(p.numel() for p in vit.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable


def test_mask_token_and_no_weight_decay_names_are_excluded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))  # 3-D, but a token: never decayed
            self.table = nn.Parameter(torch.zeros(4, 4))
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self):
            return {"table"}

    m = M()
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    assert _names(m, groups["layer_0_no_decay"]) == {"mask_token", "table", "proj.bias"}
    assert _names(m, groups["layer_0_decay"]) == {"proj.weight"}


def test_layer_decay_follows_mae_lr_decay():
    """MAE util/lr_decay.py: layer 0 = patch/pos/cls, blocks.i -> i + 1, the rest -> depth + 1 (scale 1)."""
    pose = nn.Module()
    pose.backbone = build_vit("vit_test", cls_token=True, pos_embed="learned")
    pose.head = nn.Conv2d(4, 4, 1)
    depth = len(pose.backbone.blocks)
    assert vit_layer_id("backbone.blocks.2.attn.qkv.weight", depth) == 3
    assert vit_layer_id("backbone.patch_embed.proj.weight", depth) == 0
    assert vit_layer_id("backbone.cls_token", depth) == 0
    assert vit_layer_id("decoder_blocks.0.mlp.fc1.weight", depth) == depth + 1
    assert vit_layer_id("decoder_pos_embed", depth) == depth + 1
    groups = {g["name"]: g for g in param_groups(pose, 0.05, layer_decay=0.75)}
    for name, g in groups.items():
        layer = int(name.split("_")[1])
        assert g["lr_scale"] == pytest.approx(0.75 ** (depth + 1 - layer))
    assert groups[f"layer_{depth + 1}_decay"]["lr_scale"] == 1.0
    assert _names(pose, groups[f"layer_{depth + 1}_decay"]) == {"head.weight"}
    assert "backbone.pos_embed" in _names(pose, groups["layer_0_no_decay"])
    assert _names(pose, groups["layer_1_decay"]) == {
        n for n, p in pose.named_parameters() if n.startswith("backbone.blocks.0.") and p.ndim >= 2
    }
    assert math.isclose(groups["layer_0_decay"]["lr_scale"], 0.75 ** (depth + 1))
