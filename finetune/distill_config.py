"""Configs of the distillation trainers: defaults here, differences in configs/distill/*.yaml.

    cfg = load_config(DistillConfig, ["configs/distill/tiny_cpu_coco17.yaml"], ["distill.stage=2"])
    cfg = load_config(BackboneDistillConfig, ["configs/distill/tiny_cpu_backbone.yaml"])

`DistillConfig` (`sapiens distill`): a frozen pose teacher (`teacher`) and a student pose model
(`model`, a PoseConfig as in fine-tuning), the fine-tuning sections `data` / `loss` (the ground-truth
heatmap loss) / `engine` / `optim` / `init` (the student's starting weights) / `eval`, and `distill`
(which losses, their weights, the stage). Stage 2 (DWPose's second stage) trains only the head of a
copy of the teacher on the teacher's own features: `model` then follows the teacher.

`BackboneDistillConfig` (`sapiens distill-backbone`): a teacher backbone (any checkpoint `load_model`
reads; a pose model gives its backbone), a student ViT (`model`), unlabeled image shards (`data`),
the layer mapping and token loss (`distill`), `engine` / `optim`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from finetune.config import DataConfig, EvalConfig, InitConfig, _pose_optim, with_backbone_of
from finetune.losses import LossConfig
from sapiens_lite.models.pose import PoseConfig
from sapiens_lite.models.vit import ViTConfig
from sapiens_train.config import EngineConfig, OptimConfig


@dataclass
class TeacherConfig:
    """The frozen teacher: anything `sapiens_lite.loading.load_model` reads (a folder of ours, a
    fine-tuning or distillation run dir, a Hub repo id, a Sapiens `.pth`, a transformers folder)."""

    path: str = ""
    revision: str | None = None
    """Hub revision when `path` is a repo id."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """The teacher's weights and forward pass (bf16 halves its memory; fp32 is faster on most CPUs)."""
    zero3: bool = False
    """Partition the teacher across the ranks with DeepSpeed ZeRO-3 (a 2B teacher next to the student);
    every rank then needs the teacher in each step, which a training step gives."""
    input_size: tuple[int, int] | None = None
    """(H, W) of the teacher's crop of each person; None: the teacher's own input size. Its aspect ratio
    must be the student's (the same crop at two resolutions)."""
    cache: str = ""
    """A folder written by `sapiens distill-cache`: shards holding the images and the teacher's outputs,
    streamed instead of running the teacher (then `path` may stay empty; set, it must be the cache's)."""
    batch_size: int = 32
    """Crops per teacher forward pass when writing the cache."""

    def __post_init__(self):
        if self.input_size is not None:
            self.input_size = tuple(self.input_size)
            if len(self.input_size) != 2 or any(s % 16 for s in self.input_size):
                raise ValueError(f"input_size must be (H, W), multiples of 16, got {self.input_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class DistillDataConfig(DataConfig):
    views: int = 0
    """Augmentation draws per image: 0 draws a new crop every epoch; V > 0 makes epoch e reuse draw e % V
    of each image (seeded by the image's key), which is what a teacher cache stores (V views each)."""

    def __post_init__(self):
        super().__post_init__()
        if self.views < 0:
            raise ValueError(f"views must be >= 0, got {self.views}")


@dataclass
class DistillLossConfig:
    """loss = ground truth (`loss`) + s(step) * (heatmap_weight * heatmap loss + feature_weight * feature loss)."""

    stage: Literal[1, 2] = 1
    """1: train the student on ground truth + teacher. 2 (DWPose): a copy of the teacher, usually the stage-1
    student, trains only its head on its own frozen features, against ground truth and its own heatmaps."""
    heatmap_loss: Literal["mse", "kl"] = "mse"
    """mse: squared error on every keypoint's heatmap; kl: KL of the spatial soft-max (see `temperature`)."""
    heatmap_weight: float = 1.0
    temperature: float = 0.5
    """kl only: heatmaps are divided by this before the soft-max (DWPose's beta = 1 / temperature)."""
    feature_weight: float = 0.0
    """Feature distillation (stage 1): 0 turns it off."""
    student_layers: tuple[int, ...] = (-1,)
    """Student blocks whose outputs are projected (1x1 conv) onto `teacher_layers` (negative: from the end)."""
    teacher_layers: tuple[int, ...] = (-1,)
    feature_norm: bool = True
    """Pass both sides' block outputs through their model's final LayerNorm before comparing them."""
    projection: bool = True
    """Learn a 1x1 projection of each student map onto the teacher's width (and resize it to the teacher's
    grid); without it the maps must already have the same shape."""
    decay: Literal["auto", "linear", "none"] = "auto"
    """The distillation weights over training: linear goes from 1 to 0 (DWPose), none keeps them;
    auto is linear in stage 1 and none in stage 2, as DWPose."""
    target_dtype: Literal["fp16", "fp32"] = "fp16"
    """The teacher's outputs are rounded to this, online as in a cache (a cached run equals an online one)."""

    def __post_init__(self):
        for name in ("heatmap_weight", "feature_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.student_layers, self.teacher_layers = tuple(self.student_layers), tuple(self.teacher_layers)
        if len(self.student_layers) != len(self.teacher_layers) or not self.student_layers:
            raise ValueError(
                f"student_layers {list(self.student_layers)} and teacher_layers {list(self.teacher_layers)} "
                "must pair up: the same number of entries, at least one"
            )

    @property
    def decays(self) -> bool:
        return self.decay == "linear" or (self.decay == "auto" and self.stage == 1)


@dataclass
class DistillConfig:
    model: PoseConfig = field(default_factory=PoseConfig)
    """The student (in stage 2: a copy of the teacher, taken from teacher.path)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillLossConfig = field(default_factory=DistillLossConfig)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    """The ground-truth heatmap loss."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(run_dir="runs/distill"))
    optim: OptimConfig = field(default_factory=_pose_optim)
    init: InitConfig = field(default_factory=InitConfig)
    """The student's starting weights (e.g. a backbone from `sapiens distill-backbone`); empty in stage 2."""
    eval: EvalConfig = field(default_factory=EvalConfig)

    def finalize(self, explicit: frozenset[str]) -> DistillConfig:
        """The student's backbone shape from `init.path` (as fine-tuning); in stage 2 the whole model config
        from the teacher (when it is a checkpoint of ours), unless the config sets it (then they must agree)."""
        if self.distill.stage == 2:
            return self._model_from_teacher(explicit)
        if not self.init.path:
            return self
        model = with_backbone_of(self.model, self.init.path, self.init.revision, explicit, "model")
        return self if model is self.model else dataclasses.replace(self, model=model)

    def _model_from_teacher(self, explicit: frozenset[str]) -> DistillConfig:
        from sapiens_lite.errors import UserError
        from sapiens_lite.loading import model_config

        if not self.teacher.path:
            return self
        try:
            found = model_config(self.teacher.path, revision=self.teacher.revision)
        except UserError:
            return self  # the trainer's validation names the unreadable teacher.path
        if found is None or not isinstance(found[1], PoseConfig):
            return self
        teacher = found[1]
        set_keys = sorted(k for k in explicit if k.startswith("model."))
        conflicts = [k for k in set_keys if _get(self, k) != _get_model(teacher, k)]
        if conflicts:
            k = conflicts[0]
            raise ValueError(
                f"distill.stage=2 trains a copy of teacher.path {self.teacher.path}, but {k}={_get(self, k)!r} "
                f"differs from the teacher's {_get_model(teacher, k)!r}; leave model unset in stage 2"
            )
        return dataclasses.replace(self, model=teacher)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def _get_model(model: PoseConfig, dotted: str):
    return _get(model, dotted.split(".", 1)[1])


# ---- backbone distillation -------------------------------------------------------------------------


@dataclass
class BackboneTeacherConfig:
    """A teacher backbone: a backbone or pose checkpoint of any kind `load_model` reads."""

    path: str = ""
    revision: str | None = None
    precision: Literal["bf16", "fp32"] = "bf16"
    zero3: bool = False
    img_size: tuple[int, int] | None = None
    """(H, W) of the teacher's view of each crop; None: the student's `data.img_size`."""

    def __post_init__(self):
        if self.img_size is not None:
            self.img_size = tuple(self.img_size)
            if len(self.img_size) != 2 or any(s % 16 for s in self.img_size):
                raise ValueError(f"img_size must be (H, W), multiples of 16, got {self.img_size}")


@dataclass
class BackboneDataConfig:
    shards: str = ""
    """Unlabeled images: webdataset shards (a pattern, a folder or an index.json, as `sapiens data pack` writes)."""
    img_size: tuple[int, int] = (1024, 768)
    """(H, W) of the student's crops; `model.img_size` follows it."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Area fraction of the random resized crop (as MAE pretraining)."""
    hflip: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """The student's normalisation on the 0..1 scale (ImageNet, as our pose and MAE models)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = 4
    shuffle_buffer: int = 1000

    def __post_init__(self):
        self.img_size = tuple(self.img_size)
        if len(self.img_size) != 2 or any(s < 16 or s % 16 for s in self.img_size):
            raise ValueError(f"img_size must be (H, W), multiples of 16, got {self.img_size}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class BackboneDistillLossConfig:
    student_layers: tuple[int, ...] = (-1,)
    """Student blocks matched to `teacher_layers` (pairwise; negative indices count from the end)."""
    teacher_layers: tuple[int, ...] = (-1,)
    loss: Literal["cosine", "smooth_l1"] = "cosine"
    normalize: bool = True
    """LayerNorm (no affine) on both sides' tokens before the loss."""

    def __post_init__(self):
        self.student_layers, self.teacher_layers = tuple(self.student_layers), tuple(self.teacher_layers)
        if len(self.student_layers) != len(self.teacher_layers) or not self.student_layers:
            raise ValueError(
                f"student_layers {list(self.student_layers)} and teacher_layers {list(self.teacher_layers)} "
                "must pair up: the same number of entries, at least one"
            )


def _backbone_optim() -> OptimConfig:
    # Feature distillation of ViTs (as MAE pretraining): AdamW (0.9, 0.95), wd 0.05, warmup + cosine.
    return OptimConfig(blr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, schedule="cosine", warmup_steps=100)


@dataclass
class BackboneDistillConfig:
    model: ViTConfig = field(default_factory=lambda: ViTConfig(arch="vit_tiny"))
    """The student backbone; its img_size follows data.img_size."""
    teacher: BackboneTeacherConfig = field(default_factory=BackboneTeacherConfig)
    data: BackboneDataConfig = field(default_factory=BackboneDataConfig)
    distill: BackboneDistillLossConfig = field(default_factory=BackboneDistillLossConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(run_dir="runs/distill_backbone"))
    optim: OptimConfig = field(default_factory=_backbone_optim)

    def finalize(self, explicit: frozenset[str]) -> BackboneDistillConfig:
        """`model.img_size` follows `data.img_size` (setting both differently is an error)."""
        if tuple(self.model.img_size) == self.data.img_size:
            return self
        if "model.img_size" in explicit:
            raise ValueError(
                f"model.img_size {list(self.model.img_size)} differs from data.img_size "
                f"{list(self.data.img_size)}; set data.img_size only (the student follows it)"
            )
        return dataclasses.replace(self, model=dataclasses.replace(self.model, img_size=self.data.img_size))
