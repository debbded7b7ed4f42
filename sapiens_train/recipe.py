"""The shape every trainer follows (pretrain, finetune, distill), and the dry run they share.

A trainer module reads top to bottom in this order, and its `main` is the same few lines:

    def main(cfg, *, resume=True, dry_run=False) -> dict:
        checked = validate(cfg)                          # every user mistake, before any work
        if dry_run:
            return print_plan(cfg, architecture=lambda: build_architecture(cfg),
                              param_groups=param_groups(cfg), data_plan=describe_data(cfg, checked))
        engine = Engine(lambda: build_model(cfg, checked), cfg.engine, cfg.optim,
                        param_groups=param_groups(cfg), flops_per_sample=..., config_to_save=cfg,
                        resume=resume)                   # verified before DeepSpeed; any number of ranks
        data = build_data(cfg, engine, checked)          # this rank's micro-batches, resumable
        summary = engine.fit(data, step_fn, hooks=build_hooks(cfg))
        return finish(cfg, engine, summary)              # exports, final evaluation

`cfg` is the trainer's config dataclass with `engine` (EngineConfig) and `optim` (OptimConfig) sections.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
import torch.nn as nn

from sapiens_lite.config import config_to_dict


def world_size_from_env() -> int:
    """The world size a launcher announced (torchrun, the deepspeed launcher), 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def print_plan(
    cfg,
    *,
    architecture: Callable[[], nn.Module],
    param_groups: Callable[[nn.Module], list[dict]] | None,
    data_plan: str,
) -> dict:
    """`--dry-run`: print the resolved config, the DeepSpeed config, the lr, the AdamW groups and the data
    plan, then return without starting a process group or reading weights.

    The model is built on the meta device (shapes only), so the plan of a 2B model prints in a second.
    Returns {"dry_run": True}.
    """
    import yaml

    from sapiens_train.engine import build_ds_config, global_batch_size
    from sapiens_train.optim import describe_param_groups
    from sapiens_train.optim import param_groups as default_param_groups
    from sapiens_train.schedule import describe_lr

    world = world_size_from_env()
    gbs = global_batch_size(cfg.engine, world)
    with torch.device("meta"):
        model = architecture()
    if param_groups is None:
        groups = default_param_groups(model, cfg.optim.weight_decay, layer_decay=cfg.optim.layer_decay)
    else:
        groups = param_groups(model)
    n_train = sum(p.numel() for g in groups for p in g["params"])
    print("# resolved config")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    print(f"# DeepSpeed config (world size {world})")
    print(json.dumps(build_ds_config(cfg.engine, cfg.optim, world), indent=2))
    print(f"# {describe_lr(cfg.optim, gbs)}")
    print(f"# {n_train:,} trainable parameters in {len(groups)} AdamW groups")
    print(describe_param_groups(groups))
    print("# data")
    print(data_plan)
    print("# dry run: config and data are valid; nothing was trained", flush=True)
    return {"dry_run": True}


def epochs_line(num_samples: int, global_batch: int, total_steps: int) -> str:
    """How far `total_steps` optimizer steps go through `num_samples` samples (for the data plan)."""
    per_epoch = num_samples // global_batch
    if per_epoch == 0:
        return f"{num_samples} samples < one global batch of {global_batch}"
    return (
        f"{num_samples:,} samples, {per_epoch:,} steps of {global_batch} per epoch "
        f"(the last partial batch dropped): {total_steps:,} steps = {total_steps / per_epoch:.2f} epochs"
    )
