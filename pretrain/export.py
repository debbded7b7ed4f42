"""`sapiens export-backbone RUN_DIR OUT`: a pretraining run's encoder as a backbone checkpoint folder.

    sapiens export-backbone runs/sapiens_0.3b exported/sapiens_0.3b              # latest checkpoint
    sapiens export-backbone runs/sapiens_0.3b exported/x --tag step_00010000 --drop-cls-token

The (ZeRO-partitioned) DeepSpeed checkpoint is consolidated into fp32 master weights
(`consolidate_fp32`), the `encoder.` part is kept, and a `VisionTransformer` is built from the run's
saved config and written with `save_pretrained` (config.json + model.safetensors + model card), ready
for `VisionTransformer.from_pretrained(OUT)` and `push_to_hub`.

Position embedding: MAE trains with a fixed sin-cos table; the export stores it as a learned table
(`--pos-embed learned`, the default) so that fine-tuning can adapt it, as Sapiens does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pretrain.config import PretrainConfig
from sapiens_lite.config import load_config
from sapiens_lite.errors import UserError
from sapiens_lite.models.vit import VisionTransformer
from sapiens_lite.paths import output_dir
from sapiens_train.checkpoint import consolidate_fp32


def encoder_state_dict(full: dict[str, torch.Tensor], *, drop_cls_token: bool) -> dict[str, torch.Tensor]:
    """The MAE state dict's `encoder.` part in timm key names; without cls token if asked."""
    sd = {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")}
    if not sd:
        raise UserError("the checkpoint holds no `encoder.*` weights (is it an MAE pretraining run?)")
    if drop_cls_token:
        sd.pop("cls_token", None)
        sd["pos_embed"] = sd["pos_embed"][:, 1:]  # [1, gh*gw, C]: the cls slot goes with the token
    return sd


def export_backbone(
    run_dir: str | Path,
    out: str | Path,
    *,
    tag: str | None = None,
    drop_cls_token: bool = False,
    pos_embed: str = "learned",
) -> VisionTransformer:
    """Consolidate run_dir's checkpoint (latest or `tag`) and write the encoder to `out`; returns it."""
    output_dir(out, "OUT")  # before the (long) consolidation
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir}: no config.yaml (not a `sapiens pretrain` run directory)")
    cfg = load_config(PretrainConfig, [config_file])
    full = consolidate_fp32(run_dir, tag)
    if "encoder.pos_embed" not in full and cfg.model.encoder.pos_embed == "sincos":
        # ZeRO-1/2 checkpoints hold only trainable parameters; the fixed sin-cos table is not one of them.
        # It is a function of the grid alone, so the model built from the run's config recreates it exactly.
        from pretrain.mae import MaskedAutoencoder

        full["encoder.pos_embed"] = MaskedAutoencoder(cfg.model).encoder.pos_embed.detach()
    sd = encoder_state_dict(full, drop_cls_token=drop_cls_token)
    vit_cfg = dataclasses.replace(
        cfg.model.encoder,
        cls_token=not drop_cls_token,
        pos_embed=pos_embed,
        grad_checkpointing=False,
        drop_path_rate=0.0,
    )
    model = VisionTransformer(vit_cfg)
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(out, tags=("mae", "pretraining"), metadata={"pretraining_run": str(run_dir)})
    return model
