"""Heatmap losses for top-down pose training.

    loss_fn = build_loss(LossConfig(kind="ohkm_mse", topk=128))      # Sapiens 308-keypoint fine-tuning
    loss = loss_fn(pred, target, target_weight)   # pred, target [B, K, h, w]; target_weight [B, K]

- "mse": mmpose `KeypointMSELoss(use_target_weight=True)`: the squared error of every heatmap pixel is
  multiplied by its keypoint's weight and the result is averaged over all B * K * h * w pixels (so
  unlabelled keypoints still count in the denominator; no 0.5 factor, as in mmpose >= 1.0).
- "ohkm_mse": mmpose `KeypointOHKMMSELoss(use_target_weight=True)`: per-keypoint MSE averaged over the
  heatmap pixels, with the weight applied to both prediction and target (weight^2 on the squared
  error, as mmpose), then for each sample the mean of its `topk` largest keypoint losses, averaged over
  the batch (online hard keypoint mining).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn


@dataclass
class LossConfig:
    kind: Literal["mse", "ohkm_mse"] = "mse"
    """mse: weighted heatmap MSE; ohkm_mse: MSE over the top-k hardest keypoints of each sample."""
    topk: int = 8
    """Keypoints kept per sample by ohkm_mse (Sapiens uses 128 of 308; mmpose's default is 8)."""
    loss_weight: float = 1.0
    """Multiplies the loss (mmpose `loss_weight`)."""

    def __post_init__(self):
        if self.kind not in ("mse", "ohkm_mse"):
            raise ValueError(f"kind must be 'mse' or 'ohkm_mse', got {self.kind!r}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.loss_weight <= 0:
            raise ValueError(f"loss_weight must be positive, got {self.loss_weight}")


class KeypointMSELoss(nn.Module):
    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
        """pred, target: [B, K, h, w]; target_weight: [B, K] -> scalar."""
        err = (pred.float() - target.float()) ** 2  # [B, K, h, w]
        return (err * target_weight.float()[:, :, None, None]).mean() * self.loss_weight


class KeypointOHKMMSELoss(nn.Module):
    def __init__(self, topk: int = 8, loss_weight: float = 1.0):
        super().__init__()
        self.topk = topk
        self.loss_weight = loss_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
        """pred, target: [B, K, h, w]; target_weight: [B, K] -> scalar."""
        num_keypoints = pred.shape[1]
        if num_keypoints < self.topk:
            raise ValueError(
                f"ohkm_mse: topk={self.topk} is larger than the number of keypoints {num_keypoints}"
            )
        w = target_weight.float()[:, :, None, None]
        per_kpt = ((pred.float() * w - target.float() * w) ** 2).mean(dim=(2, 3))  # [B, K]
        hardest = per_kpt.topk(self.topk, dim=1, sorted=False).values  # [B, topk]
        return hardest.mean() * self.loss_weight


LOSSES: dict[str, Callable[[LossConfig], nn.Module]] = {
    "mse": lambda cfg: KeypointMSELoss(cfg.loss_weight),
    "ohkm_mse": lambda cfg: KeypointOHKMMSELoss(cfg.topk, cfg.loss_weight),
}


def build_loss(cfg: LossConfig) -> nn.Module:
    return LOSSES[cfg.kind](cfg)
