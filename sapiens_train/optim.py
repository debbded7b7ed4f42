"""AdamW parameter groups: weight decay only on matrices, optional layer-wise lr decay.

The decay rule is nanoGPT's one line (decay iff ndim >= 2) plus names that must never decay (position
embeddings, cls/mask tokens, whatever `model.no_weight_decay()` lists). Layer-wise decay follows MAE's
`util/lr_decay.py`: layer 0 is patch embedding + position embedding + cls token, block i is layer i + 1,
everything else (head, decoder, final norm) is layer depth + 1 with lr scale 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch.nn as nn

# Parameters that are embeddings/tokens rather than weights, whatever their ndim.
NO_DECAY_LEAF_NAMES = frozenset(
    {"pos_embed", "cls_token", "mask_token", "reg_token", "decoder_pos_embed", "absolute_pos_embed"}
)
# Layer 0 of the layer-wise decay: everything before the first block.
_EMBED_NAMES = frozenset({"patch_embed", "pos_embed", "cls_token", "reg_token"})
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def vit_layer_id(name: str, num_layers: int) -> int:
    """MAE's layer id of parameter `name` for a ViT with `num_layers` blocks (also under a prefix such as `backbone.`).

    0 = patch/pos embedding and cls token, i + 1 = `blocks.i.*`, num_layers + 1 = the rest (head, decoder).
    `decoder_blocks.*` belong to the rest: only the encoder's `blocks.` component counts.
    """
    m = _BLOCK_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    parts = name.split(".")
    if any(p in _EMBED_NAMES for p in parts) and not any(p.startswith("decoder") for p in parts):
        return 0
    return num_layers + 1


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names listed by any submodule's timm-style `no_weight_decay()` (prefixed by its path)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names.update(f"{prefix}.{n}" if prefix else n for n in fn())
    return names


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    layer_id_fn: Callable[[str, int], int] | None = None,
    no_decay_names: Iterable[str] = (),
) -> list[dict]:
    """AdamW parameter groups named `layer_{i}_{decay|no_decay}` with an `lr_scale` each.

    A parameter decays iff `p.ndim >= 2` and its name is not in the no-decay set (`no_decay_names`,
    `model.no_weight_decay()` of any submodule, and leaf names such as `pos_embed`/`cls_token`/`mask_token`).
    Frozen parameters (requires_grad=False) are left out. Without `layer_decay` every parameter is
    layer 0 with lr_scale 1. With it, layer i gets lr_scale = layer_decay ** (num_layers + 1 - i);
    `num_layers` (blocks) defaults to the largest `blocks.<i>` index + 1 found in the names.
    The engine multiplies each group's `lr_scale` by the scheduled lr at every step.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    skip = set(no_decay_names) | no_weight_decay_names(model)
    if layer_decay is not None:
        if num_layers is None:
            ids = [int(m.group(1)) for n, _ in named if (m := _BLOCK_RE.search(n))]
            if not ids:
                raise ValueError(
                    "layer_decay is set but the model has no `blocks.<i>` parameters; pass num_layers"
                )
            num_layers = max(ids) + 1
        layer_id_fn = layer_id_fn or vit_layer_id
        scales = [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]

    groups: dict[str, dict] = {}
    for name, p in named:
        no_decay = p.ndim < 2 or name in skip or name.rsplit(".", 1)[-1] in NO_DECAY_LEAF_NAMES
        layer = 0 if layer_decay is None else layer_id_fn(name, num_layers)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": 1.0 if layer_decay is None else scales[layer],
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def describe_param_groups(groups: list[dict]) -> str:
    """One line per group: name, tensors, parameters, weight decay, lr scale (printed by the engine on rank 0)."""
    lines = []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(
            f"  {g.get('name', '?'):<22} {len(g['params']):>4} tensors {n:>13,} params "
            f"wd={g['weight_decay']:g} lr_scale={g.get('lr_scale', 1.0):.4g}"
        )
    return "\n".join(lines)
