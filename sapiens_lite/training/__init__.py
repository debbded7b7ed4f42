"""The one training engine for every trainer (MAE pretraining, pose fine-tuning, distillation).

DeepSpeed is injected: trainers `import deepspeed` and pass the module to `Engine(deepspeed, ...)`;
nothing in this package imports it. See `engine.py` for how a trainer uses it.
"""

from sapiens_lite.training.checkpoint import consolidate_fp32
from sapiens_lite.training.config import EngineConfig, OptimConfig
from sapiens_lite.training.data import ResumableDistributedSampler, ResumableLoader
from sapiens_lite.training.dist import seed_everything, set_ds_accelerator_env
from sapiens_lite.training.engine import Engine, EveryN, Hook, build_ds_config, global_batch_size
from sapiens_lite.training.monitor import plot_log, read_log
from sapiens_lite.training.optim import param_groups, vit_layer_id
from sapiens_lite.training.schedule import lr_at, scaled_lr

__all__ = [
    "Engine",
    "EngineConfig",
    "EveryN",
    "Hook",
    "OptimConfig",
    "ResumableDistributedSampler",
    "ResumableLoader",
    "build_ds_config",
    "consolidate_fp32",
    "global_batch_size",
    "lr_at",
    "param_groups",
    "plot_log",
    "read_log",
    "scaled_lr",
    "seed_everything",
    "set_ds_accelerator_env",
    "vit_layer_id",
]
