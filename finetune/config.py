"""The pose fine-tuning config: dataclass defaults < YAML (differences only) < `a.b=value` overrides.

    cfg = load_config(FinetuneConfig, ["configs/finetune/sapiens_1b_coco17.yaml"], ["optim.lr=2e-4"])

Sections: `model` (PoseConfig: backbone ViTConfig, head, keypoint scheme, input size), `data` (annotation
JSON + image folders, or shards; heatmap sigma; augmentation; workers), `loss`, `engine` and `optim`
(the shared training engine's configs, the same classes pretraining uses), `init` (where the starting
weights come from) and `eval` (periodic and final OKS AP on the val set).

The defaults are the Sapiens pose recipe (facebookresearch/sapiens pose/configs/sapiens_pose/*):
AdamW (0.9, 0.999), weight decay 0.1, layer-wise lr decay 0.85, lr 5e-4, 500 warmup steps, step decay
x0.1 at 170/210 and 200/210 of training, gradient clipping 1.0, heatmap sigma 6 at 1024x768.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from finetune.data import AugmentConfig
from finetune.losses import LossConfig
from sapiens_lite.errors import UserError
from sapiens_lite.models.pose import PoseConfig
from sapiens_train.config import EngineConfig, OptimConfig


@dataclass
class DataConfig:
    """Where the people come from. Training reads `train_ann` + `train_images` (COCO keypoint JSON)
    or webdataset `train_shards`; evaluation reads `val_ann` + `val_images`."""

    train_ann: str = ""
    """COCO-format keypoint JSON (17 / WholeBody 133 / 308 keypoints: must match `model.scheme`)."""
    train_images: str = ""
    """Folder the `file_name`s of `train_ann` are relative to."""
    train_shards: str = ""
    """Alternative to train_ann: webdataset shard pattern, e.g. `data/shards/train-{000000..000099}.tar`."""
    val_ann: str = ""
    val_images: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_workers: int = 4
    """DataLoader worker processes (0 = load in the main process)."""

    def __post_init__(self):
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.train_ann and self.train_shards:
            raise ValueError("set either train_ann (+ train_images) or train_shards, not both")


@dataclass
class InitConfig:
    """The starting weights: anything `sapiens_lite.loading` reads (see `locate`). `path` may be:

    - a pretraining run dir (its exported `backbone/`) or a backbone folder / Hub repo (model_type "vit"):
      backbone only, head randomly initialised;
    - a pose model folder / Hub repo or a fine-tuning run dir (its `final/`): backbone and head;
    - a Sapiens pretrain or pose `.pth` (or another format `sapiens convert` reads): converted; the cls
      token is dropped and the 64x64 position grid resampled to the model's grid (64x48 at 1024x768).
    Empty: random initialisation (tests, smoke runs).

    A checkpoint of ours brings its backbone's shape: `model.backbone` takes the checkpoint's arch
    (width, depth, heads, patch size, MLP) unless the config sets those fields; set to other values
    they are an error (`FinetuneConfig.finalize`).
    """

    path: str = ""
    revision: str | None = None
    """Hub revision (branch, tag, commit) when `path` is a repo id."""
    load_head: bool = True
    """With a pose checkpoint: also load the head (its keypoint count must match `model.scheme`)."""


@dataclass
class EvalConfig:
    """Top-down evaluation on `data.val_ann` (periodic in training, and `sapiens eval`)."""

    every_steps: int = 0
    """Evaluate every this many optimizer steps (0 = only at the end); the best AP is kept as best/."""
    flip_test: bool = True
    """Average the heatmaps of the image and its mirror (channels swapped by the scheme's flip_index)."""
    batch_size: int = 32
    detections: str = ""
    """COCO detections JSON [{image_id, bbox, score, category_id}]; empty = ground-truth boxes."""
    det_score_thr: float = 0.0
    """Detections below this box score are dropped."""
    kpt_score_thr: float = 0.2
    """Keypoints above this score count in the instance score (mmpose rescoring)."""
    nms_thr: float = 0.9
    """OKS-NMS threshold per image, on detections and GT boxes alike as in MMPose (1.0 keeps every pose)."""
    nms_area: Literal["mmpose", "box"] = "mmpose"
    """OKS-NMS area: "mmpose" = MMPose's oks_nms (mean of the two crops' areas, box x 1.25 grown to the input
    aspect); "box" = the raw box w x h of the higher-scoring pose."""
    pck_thr: float = 0.05
    """PCK radius as a fraction of the GT box size max(w, h)."""
    max_images: int | None = None
    """Evaluate on the first N images only (quick periodic checks); None = all."""

    def __post_init__(self):
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {self.every_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("det_score_thr", "kpt_score_thr", "pck_thr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.nms_thr <= 1:
            raise ValueError(f"nms_thr must be in (0, 1], got {self.nms_thr}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1 or null, got {self.max_images}")


def _pose_optim() -> OptimConfig:
    # Sapiens pose recipe; the milestones are set per config (they depend on the number of steps).
    return OptimConfig(
        lr=5e-4,
        betas=(0.9, 0.999),
        weight_decay=0.1,
        layer_decay=0.85,
        warmup_steps=500,
        schedule="cosine",
        grad_clip=1.0,
    )


@dataclass
class FinetuneConfig:
    model: PoseConfig = field(default_factory=PoseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=_pose_optim)
    init: InitConfig = field(default_factory=InitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def finalize(self, explicit: frozenset[str]) -> FinetuneConfig:
        """The backbone's shape comes from the init checkpoint (see `InitConfig`), unless the config sets it."""
        if not self.init.path:
            return self
        model = with_backbone_of(self.model, self.init.path, self.init.revision, explicit, "model")
        return self if model is self.model else dataclasses.replace(self, model=model)


# Backbone fields that a checkpoint dictates: its weights have these shapes. Not inherited: the input grid
# (resampled), the cls token (dropped for pose), patch padding and drop path (choices of the fine-tuning).
SHAPE_FIELDS = (
    "embed_dim",
    "depth",
    "num_heads",
    "patch_size",
    "in_chans",
    "mlp_ratio",
    "qkv_bias",
    "final_norm",
    "norm_eps",
)


def with_backbone_of(model: PoseConfig, path: str, revision: str | None, explicit, prefix: str) -> PoseConfig:
    """`model` whose backbone has the arch of the checkpoint at `path` (a folder, run dir or Hub repo of ours).

    A field the user set (`<prefix>.backbone.<field>` in `explicit`, or `arch`, which implies the sizes) must
    agree with the checkpoint; a field left at its default takes the checkpoint's value. Foreign checkpoints
    (.pth, transformers folders) are converted later, into the configured shape, and change nothing here.
    """
    from sapiens_lite.loading import backbone_config

    try:
        src = backbone_config(path, revision=revision)
    except UserError:
        return model  # the trainer's validation reports an unreadable init.path, with its own message
    if src is None:
        return model
    src = src.resolved()
    ours = model.backbone.resolved()
    key = f"{prefix}.backbone"
    set_by_user = {f for f in ("arch", *SHAPE_FIELDS) if f"{key}.{f}" in explicit}
    if set_by_user:
        conflicts = [
            f"{f}={getattr(ours, f)} (checkpoint {getattr(src, f)})"
            for f in SHAPE_FIELDS
            if getattr(ours, f) != getattr(src, f) and (f in set_by_user or "arch" in set_by_user)
        ]
        if conflicts:
            raise ValueError(
                f"{key} ({ours.arch}) does not fit init.path {path} ({src.arch}): {', '.join(conflicts)}; "
                f"leave {key} unset to take the checkpoint's arch, or start from another checkpoint"
            )
    sizes = {f: getattr(src, f) for f in SHAPE_FIELDS if f not in set_by_user}
    if "arch" not in set_by_user:
        sizes["arch"] = src.arch
    backbone = dataclasses.replace(model.backbone, **sizes)
    if backbone == model.backbone:
        return model
    return dataclasses.replace(model, backbone=backbone)
