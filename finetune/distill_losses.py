"""Distillation losses: heatmaps, features, backbone tokens, and DWPose's weight decay.

    t = resample_heatmaps(teacher_heatmaps, student_heatmaps.shape[-2:])    # teacher grid -> student grid
    loss = heatmap_distill_loss(student_heatmaps, t, kind="kl", temperature=0.5)
    loss = feature_distill_loss(projected_student_maps, teacher_maps)        # lists of [B, C, gh, gw]
    loss = token_distill_loss(student_tokens, teacher_tokens, kind="cosine")  # [B, L, C] each
    w = distill_scale(step, total_steps, decay=True)                         # 1 - step / total_steps

- Heatmap distillation covers every keypoint, visible or not (DWPose: the teacher knows where an
  occluded or unlabelled joint is; the ground-truth loss cannot say). "mse" is the mmpose
  `KeypointMSELoss` without target weights: the squared error averaged over B * K * h * w pixels, the
  same scale as the ground-truth loss. "kl" is the KL divergence between the spatial soft-max of the
  teacher's and of the student's heatmap (each over its h * w pixels), heatmaps divided by
  `temperature` first, summed over pixels and averaged over B * K (DWPose's `KDLoss` on SimCC vectors,
  whose `beta` multiplies the logits: temperature = 1 / beta). Heatmaps peak at 1 over a near-zero
  background, so temperatures below 1 are the useful ones.
- Feature distillation is the mean squared error between the projected student maps and the teacher's
  maps, averaged over elements and over the layer pairs (DWPose's `FeaLoss` sums over C * h * w and
  multiplies by alpha = 7e-5; a mean keeps the weight independent of the width and grid).
- Backbone distillation compares tokens after a LayerNorm without affine (`normalize`, so the
  teacher's outlier channels and the residual stream's growth do not dominate): "cosine" is 1 - the
  cosine similarity per token, averaged; "smooth_l1" is the smooth-L1 (beta 1) per element, averaged.
- The teacher's heatmaps live on its own grid (H_t/4, W_t/4). Both grids cover the same crop, and in
  the UDP frames (sapiens_lite/codec.py) their first and last pixel centres coincide, so they are
  resampled bilinearly with `align_corners=True`.
- DWPose lowers the distillation weights linearly from their start value to 0 over the first stage:
  `(1 - epoch / max_epochs) * loss` for both the feature and the logit loss, and keeps them constant in
  the second stage (mmpose `DWPoseDistiller.loss`). `distill_scale` does it per optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F


def resample_heatmaps(heatmaps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Heatmaps [B, K, h, w] on one UDP grid -> [B, K, *size] on another grid of the same crop."""
    size = tuple(int(s) for s in size)
    if tuple(heatmaps.shape[-2:]) == size:
        return heatmaps
    return F.interpolate(heatmaps.float(), size=size, mode="bilinear", align_corners=True)


def resize_feature_map(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Token map [B, C, gh, gw] -> [B, C, *grid] of the same crop (patch centres: align_corners=False)."""
    grid = tuple(int(g) for g in grid)
    if tuple(x.shape[-2:]) == grid:
        return x
    return F.interpolate(x, size=grid, mode="bilinear", align_corners=False)


def heatmap_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: Literal["mse", "kl"] = "mse",
    temperature: float = 1.0,
) -> torch.Tensor:
    """student, teacher: [B, K, h, w] on the same grid; every keypoint counts -> scalar."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"heatmap shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    s, t = student.float(), teacher.float().detach()
    if kind == "mse":
        return ((s - t) ** 2).mean()
    if kind == "kl":
        b, k = s.shape[:2]
        log_p_s = F.log_softmax(s.reshape(b * k, -1) / temperature, dim=1)  # [B*K, h*w]
        log_p_t = F.log_softmax(t.reshape(b * k, -1) / temperature, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # [B*K]
        return kl.mean()
    raise ValueError(f"kind must be 'mse' or 'kl', got {kind!r}")


def feature_distill_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Lists of maps [B, C, gh, gw] (student already projected and resized) -> the mean MSE over pairs."""
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"need as many student as teacher maps (>= 1), got {len(student)} and {len(teacher)}"
        )
    losses = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"feature shapes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        losses.append(((s.float() - t.float().detach()) ** 2).mean())
    return torch.stack(losses).mean()


def token_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: Literal["cosine", "smooth_l1"] = "cosine",
    normalize: bool = True,
) -> torch.Tensor:
    """student, teacher: [B, L, C] tokens (student projected to the teacher's width) -> scalar."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"token shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    s, t = student.float(), teacher.float().detach()
    if normalize:
        s = F.layer_norm(s, s.shape[-1:])
        t = F.layer_norm(t, t.shape[-1:])
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(s, t, beta=1.0)
    raise ValueError(f"kind must be 'cosine' or 'smooth_l1', got {kind!r}")


def distill_scale(step: int, total_steps: int, decay: bool) -> float:
    """The factor on the distillation losses at optimizer step `step` (0-based): DWPose's linear decay
    `1 - step / total_steps` (1 at the first step, 1 / total_steps at the last), or 1 without decay."""
    if not decay:
        return 1.0
    return max(0.0, 1.0 - step / total_steps)
