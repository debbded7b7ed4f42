"""A frozen second model beside the trained one (a distillation teacher): eval mode, no gradients, kept
outside the engine's optimizer and checkpoints.

    teacher = freeze(load_model(path))                     # eval, requires_grad=False everywhere
    digest = weights_checksum(teacher)                     # what a resumed run compares
    run = place_frozen(teacher, engine.device, precision="bf16", zero3=False, micro_batch_size=8)
    with torch.no_grad():
        out = run(x)     # x in any float dtype; cast to the model's weights inside its forward

On one device the model is moved there (bf16 weights when asked) and called like any module. With
`zero3=True` it becomes a DeepSpeed ZeRO-3 engine without an optimizer, DeepSpeed's inference mode
(DeepSpeed-Chat runs its frozen reference model this way): `deepspeed.initialize` partitions every
parameter across the ranks and each module's forward gathers its own parameters and frees them after,
so a 2B teacher in bf16 holds 4 GB / world_size per rank at rest. Every rank must then run the forward
together (it is a collective), which a training step does anyway. The trained model's engine is
unaffected: the two DeepSpeed engines share the process group and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import torch
import torch.nn as nn

import sapiens_train.dist  # noqa: F401  # chooses DeepSpeed's accelerator before DeepSpeed's first import

import deepspeed  # noqa: E402  # isort: skip

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def freeze(module: nn.Module) -> nn.Module:
    """`module` in eval mode with every parameter's requires_grad off (in place); returns it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def weights_checksum(module: nn.Module, extra: dict | None = None) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes; sorted by name) and the JSON of `extra`.

    Two modules with the same weights (and `extra`, e.g. their config) give the same digest whatever
    file they came from. Reads every byte once: about 10 s for a 2B fp32 model.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def place_frozen(
    module: nn.Module,
    device: torch.device,
    *,
    precision: Literal["fp32", "bf16"] = "fp32",
    zero3: bool = False,
    micro_batch_size: int = 1,
) -> nn.Module:
    """The frozen `module` ready to run on `device`: moved there in `precision`, or (zero3) partitioned.

    Returns a callable module; under ZeRO-3 the DeepSpeed engine (its `.module` is `module`).
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    freeze(module)
    if not zero3:
        return module.to(device=device, dtype=DTYPES[precision])
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    config = {
        # Batch sizes are required by DeepSpeed's config check; with no optimizer nothing uses them.
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "train_batch_size": micro_batch_size * world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(model=module, config=config, dist_init_required=False)
    engine.eval()
    return engine
