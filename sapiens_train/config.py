"""Typed configs of the training engine, composed into each trainer's config.

    @dataclass
    class PretrainConfig:
        engine: EngineConfig = field(default_factory=EngineConfig)
        optim: OptimConfig = field(default_factory=OptimConfig)
        ...

The DeepSpeed config is generated from these (`engine.build_ds_config`), never written by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal


@dataclass
class OptimConfig:
    """AdamW + per-step learning-rate schedule."""

    blr: float = 1.5e-4
    """Base learning rate per 256 samples: lr = blr * global_batch / 256 (MAE's rule)."""
    lr: float | None = None
    """Absolute learning rate; when set it overrides `blr`."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (MAE pretraining 0.9/0.95, pose fine-tuning 0.9/0.999)."""
    eps: float = 1e-8
    weight_decay: float = 0.05
    """Applied to weights with ndim >= 2 only; never to norms, biases, position embeddings, cls/mask tokens."""
    layer_decay: float | None = None
    """Layer-wise lr decay (e.g. 0.75 when fine-tuning a ViT): block i gets lr * layer_decay**(depth - i)."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps (from lr/warmup_steps up to lr)."""
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    """After warmup: cosine down to `min_lr`, step decay at `milestones`, or constant."""
    min_lr: float = 0.0
    """Final lr of the cosine schedule (absolute)."""
    milestones: tuple[int, ...] = ()
    """Optimizer steps at which the `step` schedule multiplies the lr by `gamma`."""
    gamma: float = 0.1
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (DeepSpeed `gradient_clipping`); None = no clipping."""

    def __post_init__(self):
        if not self.blr > 0:
            raise ValueError(f"blr must be > 0, got {self.blr}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 or null, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1] or null, got {self.layer_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, got {self.min_lr}")
        if list(self.milestones) != sorted(self.milestones) or any(m < 0 for m in self.milestones):
            raise ValueError(f"milestones must be increasing step numbers >= 0, got {self.milestones}")
        if self.schedule == "step" and not self.milestones:
            raise ValueError("schedule='step' needs milestones (optimizer steps at which lr *= gamma)")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class EngineConfig:
    """The training loop, DeepSpeed, checkpoints and logs."""

    run_dir: str = "runs/default"
    """Everything a run writes: config.yaml, ds_config.json, checkpoints/, log.jsonl, tensorboard/."""
    seed: int = 0
    total_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Samples per rank per forward/backward."""
    grad_accum_steps: int | None = None
    """Micro-batches per optimizer step; unset: derived from `global_batch_size`, else 1."""
    global_batch_size: int | None = None
    """micro_batch_size * grad_accum_steps * world_size. Given alone, the accumulation is derived from it
    (an error before any work when it cannot divide); given with grad_accum_steps, they must agree."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 keeps fp32 master weights and accumulates gradients in fp32; it needs zero_stage >= 1."""
    activation_checkpointing: bool = False
    """Calls `model.set_grad_checkpointing(True)` (recompute block activations in backward)."""
    compile: bool = False
    """torch.compile the forward of every transformer block (regional compilation, as torchtitan does):
    one graph per block shape, compiled once; state-dict keys and activation checkpointing unchanged;
    under ZeRO-3 the blocks become DeepSpeed leaf modules so parameter gathering stays outside the graph."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto: nccl on CUDA, gloo on CPU."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many optimizer steps (and at the end); 0 = never (smoke runs and
    throughput measurements, where a 2B model's 30 GB of ZeRO state would take longer than the run)."""
    keep_last: int = 3
    """Checkpoints kept on disk; older ones are deleted."""
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    """tqdm progress bar on rank 0."""
    max_nonfinite: int = 5
    """Abort (after a final checkpoint) after this many consecutive non-finite losses."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU; None = a table of known GPUs, else a measured matmul (on a CPU
    measured again in every log window, under the same load as training). The log names the source."""
    resume_from: str | None = None
    """A checkpoint tag (e.g. step_00000500) to resume from instead of checkpoints/latest, e.g. the newest
    intact one that a damaged checkpoint's error names."""

    def __post_init__(self):
        for name in ("total_steps", "micro_batch_size", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 1, or 0 for never, got {self.checkpoint_every}")
        for name in ("log_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_accum_steps is not None and self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1 or null, got {self.grad_accum_steps}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1 or null, got {self.global_batch_size}")
        if self.precision == "bf16" and self.zero_stage == 0:
            # DeepSpeed accumulates bf16 gradients in fp32 only inside its ZeRO optimizers.
            raise ValueError(
                "precision='bf16' needs zero_stage >= 1 (fp32 gradient accumulation lives in ZeRO)"
            )
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be > 0 or null, got {self.peak_tflops}")
        if not self.run_dir:
            raise ValueError("run_dir must not be empty")
        if self.resume_from is not None and not re.fullmatch(r"step_\d+", self.resume_from):
            raise ValueError(
                f"resume_from must be a checkpoint tag like step_00000500, got {self.resume_from!r}"
            )
