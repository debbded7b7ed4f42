"""Learning rate: the batch-scaled base lr and the per-step schedule (pure functions of the step)."""

from __future__ import annotations

import math

from sapiens_train.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """lr = blr * global_batch / 256 (MAE's linear scaling rule), unless `cfg.lr` gives it directly."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.blr * global_batch_size / 256


def describe_lr(cfg: OptimConfig, global_batch_size: int) -> str:
    """The lr line both the engine and `--dry-run` print: the rule, its factors and the result."""
    lr = scaled_lr(cfg, global_batch_size)
    if cfg.lr is None:
        return f"lr = blr {cfg.blr:g} x global batch {global_batch_size} / 256 = {lr:.4g}"
    return f"lr = {lr:.4g} (absolute; blr unused)"


def lr_at(step: int, cfg: OptimConfig, base_lr: float, total_steps: int) -> float:
    """The lr of optimizer step `step` (0-based): linear warmup to `base_lr`, then cosine / step / constant.

    Warmup: step s < warmup_steps gets base_lr * (s + 1) / warmup_steps, so the first step already moves.
    Cosine: from base_lr at the end of warmup to cfg.min_lr at `total_steps`.
    Step: base_lr * gamma ** (number of milestones <= step).
    """
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return base_lr
    if cfg.schedule == "step":
        return base_lr * cfg.gamma ** sum(step >= m for m in cfg.milestones)
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(progress, 1.0)
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
