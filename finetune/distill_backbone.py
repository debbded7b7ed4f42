"""Backbone distillation (`sapiens distill-backbone`): a small student ViT learns to match a teacher backbone's
intermediate tokens on unlabeled images, giving a small foundation backbone for any downstream task.

    cfg = load_config(BackboneDistillConfig, ["configs/distill/tiny_cpu_backbone.yaml"])
    main(cfg)                  # run_dir/backbone/ is the student (a VisionTransformer folder):
                               # `sapiens finetune init.path=run_dir` starts from it, `load_model` reads it

Each image of `data.shards` (webdataset, as `sapiens data pack` writes; labels, if any, are ignored) gives
one random resized crop (MAE's transform), seen by the student at `data.img_size` and by the teacher at
`teacher.img_size`: the same region, drawn once (both transforms take the sample's seed; reduced JPEG
decoding is off so that the two crops cannot snap to different grids). For every pair
(`distill.student_layers[i]`, `distill.teacher_layers[i]`) the student block's tokens go through a
learned 1x1 projection onto the teacher's width and are resized to the teacher's token grid; the loss
is the mean over pairs of `token_distill_loss` (cosine or smooth-L1 on LayerNorm-ed tokens).

The teacher is any checkpoint `load_model` reads: a backbone (MAE / timm / Sapiens pretraining) or a pose
model (its backbone). It stays out of the engine as in pose distillation (`sapiens_train.frozen`: bf16 or
fp32, optionally ZeRO-3), run_dir/teacher.json guards resumes, MFU counts its forward FLOPs.

The trainer shape of `sapiens_train.recipe`: `validate` -> `build_model` -> `Engine` -> teacher -> resume
-> `build_data` -> `Engine.fit` -> `finish` (the student, without projections, into run_dir/backbone/).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from finetune.distill import check_layers, log, record_teacher, student_state
from finetune.distill_config import BackboneDistillConfig
from finetune.distill_losses import resize_feature_map, token_distill_loss
from sapiens_lite.config import config_to_dict
from sapiens_lite.errors import UserError
from sapiens_lite.flops import forward_flops
from sapiens_lite.loading import load_model, model_config
from sapiens_lite.models.pose import PoseConfig, PoseModel
from sapiens_lite.models.vit import VisionTransformer, ViTConfig
from sapiens_train.dist import barrier
from sapiens_train.engine import Engine, global_batch_size
from sapiens_train.optim import param_groups as make_param_groups
from sapiens_train.recipe import epochs_line, print_plan, world_size_from_env
from sapiens_train.transforms import MAETransform, MAETransformConfig, sample_image_bytes

EXPORT_DIR = "backbone"  # what `load_model(run_dir)` and `sapiens finetune init.path=run_dir` read


# ---- validation -------------------------------------------------------------------------------------


@dataclass
class BackbonePlan:
    config: ViTConfig
    """The teacher backbone's config (resolved)."""
    img_size: tuple[int, int]
    """The teacher's crop size (H, W)."""
    mean: tuple[float, float, float]
    """The teacher's normalisation on the 0..1 scale (a pose teacher's own, else data.mean/std)."""
    std: tuple[float, float, float]
    where: str
    model: nn.Module | None = None
    """A foreign checkpoint, read during validation."""

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.token_grid(self.img_size)


def validate(cfg: BackboneDistillConfig) -> BackbonePlan:
    """Teacher, layers and data, checked before any process group or worker exists; one line each."""
    t, d = cfg.teacher, cfg.data
    if not d.shards:
        raise UserError("data.shards is required (unlabeled images packed with `sapiens data pack --images`)")
    from sapiens_train.stream import resolve_shards

    resolve_shards(d.shards)  # UserError: no such shards
    if not t.path:
        raise UserError(
            "teacher.path is required (a backbone or pose checkpoint: folder, run dir, Hub repo, .pth)"
        )
    found = model_config(t.path, revision=t.revision)
    model = None
    if found is None:
        model = load_model(t.path, revision=t.revision)
        config = model.config
    else:
        config = found[1]
    mean, std = d.mean, d.std
    if isinstance(config, PoseConfig):
        mean, std = tuple(m / 255 for m in config.mean), tuple(s / 255 for s in config.std)
        config = config.backbone
    if not isinstance(config, ViTConfig):
        raise UserError(f"teacher.path {t.path}: not a ViT backbone or pose model ({type(config).__name__})")
    config = config.resolved()
    img_size = t.img_size or d.img_size
    (sh, sw), (th, tw) = d.img_size, img_size
    if sh * tw != sw * th:
        raise UserError(
            f"teacher.img_size {th}x{tw} and data.img_size {sh}x{sw} have different aspect ratios; "
            "the teacher must see the student's crop"
        )
    student = cfg.model.resolved()
    check_layers(
        cfg.distill.student_layers, student.depth, "distill.student_layers", f"student ({student.arch})"
    )
    check_layers(cfg.distill.teacher_layers, config.depth, "distill.teacher_layers", "teacher")
    return BackbonePlan(config, tuple(img_size), tuple(mean), tuple(std), t.path, model)


# ---- models -----------------------------------------------------------------------------------------


class TeacherBackbone(nn.Module):
    """x [B, 3, H_t, W_t] -> the chosen blocks' outputs [B, C_t, gh, gw], in `layers` order."""

    def __init__(self, backbone: VisionTransformer, layers: tuple[int, ...]):
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.to(self.backbone.patch_embed.proj.weight.dtype)
        taken = sorted(set(self.layers))
        maps = self.backbone.forward_intermediates(x, indices=taken, stop_early=True, intermediates_only=True)
        by_block = dict(zip(taken, maps))
        return [by_block[i] for i in self.layers]


class BackboneStudent(nn.Module):
    """What the engine trains: the student ViT and one 1x1 projection per layer pair.

    x [B, 3, H, W] -> projected maps [B, C_t, gh_t, gw_t], in `layers` order.
    """

    def __init__(self, backbone: VisionTransformer, layers, projections: nn.ModuleList, teacher_grid):
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        self.projections = projections
        self.teacher_grid = tuple(teacher_grid)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taken = sorted(set(self.layers))
        maps = self.backbone.forward_intermediates(x, indices=taken, stop_early=True, intermediates_only=True)
        by_block = dict(zip(taken, maps))
        return [
            resize_feature_map(proj(by_block[i]), self.teacher_grid)
            for i, proj in zip(self.layers, self.projections)
        ]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def build_model(cfg: BackboneDistillConfig, plan: BackbonePlan) -> BackboneStudent:
    student = VisionTransformer(cfg.model)
    c = student.config
    layers = check_layers(cfg.distill.student_layers, c.depth, "distill.student_layers", "student")
    projections = nn.ModuleList(nn.Conv2d(c.embed_dim, plan.config.embed_dim, kernel_size=1) for _ in layers)
    return BackboneStudent(student, layers, projections, plan.grid)


def load_teacher(cfg: BackboneDistillConfig, plan: BackbonePlan) -> tuple[VisionTransformer, str]:
    """The teacher backbone (fp32, CPU, frozen) and the checksum of its weights and config."""
    from sapiens_train.frozen import freeze, weights_checksum

    model = (
        plan.model if plan.model is not None else load_model(cfg.teacher.path, revision=cfg.teacher.revision)
    )
    backbone = model.backbone if isinstance(model, PoseModel) else model
    freeze(backbone)
    return backbone, weights_checksum(backbone, extra=config_to_dict(backbone.config))


def param_groups(cfg: BackboneDistillConfig):
    """AdamW groups (decay iff ndim >= 2; pos embed / tokens never), optional layer-wise decay over the blocks."""
    depth = cfg.model.resolved().depth
    return lambda model: make_param_groups(
        model, cfg.optim.weight_decay, layer_decay=cfg.optim.layer_decay, num_layers=depth
    )


# ---- data -------------------------------------------------------------------------------------------


@dataclass
class TwoSizeDecode:
    """`decode` for the stream: image bytes -> {"img": student crop, "teacher_img": the same crop at the
    teacher's size} (no teacher_img when both are the same). Both transforms draw from the sample's seed."""

    student: MAETransform
    teacher: MAETransform | None

    def __call__(self, sample: dict) -> dict:
        data, seed = sample_image_bytes(sample), int(sample["__seed__"])
        item = {"img": self.student(data, seed)}
        if self.teacher is not None:
            item["teacher_img"] = self.teacher(data, seed)
        return item


def build_data(cfg: BackboneDistillConfig, engine: Engine, plan: BackbonePlan):
    from sapiens_train.stream import build_stream

    d = cfg.data
    # reduced_decode off: it snaps a crop to the 1/2^n decoding grid, which depends on the output size.
    base = MAETransformConfig(
        size=d.img_size,
        scale=d.crop_scale,
        hflip=0.5 if d.hflip else 0.0,
        mean=d.mean,
        std=d.std,
        reduced_decode=False,
    )
    teacher = dataclasses.replace(base, size=plan.img_size, mean=plan.mean, std=plan.std)
    same = (teacher.size, tuple(teacher.mean), tuple(teacher.std)) == (
        base.size,
        tuple(base.mean),
        tuple(base.std),
    )
    return build_stream(
        d.shards,
        decode=TwoSizeDecode(MAETransform(base), None if same else MAETransform(teacher)),
        batch_size=cfg.engine.micro_batch_size,
        num_workers=d.num_workers,
        seed=cfg.engine.seed,
        rank=engine.rank,
        world_size=engine.world_size,
        shuffle_buffer=d.shuffle_buffer,
        pin_memory=engine.device.type == "cuda",
    )


def describe_data(cfg: BackboneDistillConfig, plan: BackbonePlan) -> str:
    from sapiens_train.stream import resolve_shards

    gbs = global_batch_size(cfg.engine, world_size_from_env())
    n = sum(s.num_samples for s in resolve_shards(cfg.data.shards))
    (sh, sw), (th, tw) = cfg.data.img_size, plan.img_size
    d = cfg.distill
    return (
        f"shards {cfg.data.shards} ({n} images, unlabeled); student {sh}x{sw} crops, teacher {th}x{tw}\n"
        f"teacher {plan.where} ({plan.config.arch}, {cfg.teacher.precision}); {d.loss} on "
        f"{'normalised ' if d.normalize else ''}tokens, student blocks {list(d.student_layers)} -> teacher "
        f"blocks {list(d.teacher_layers)}\n" + epochs_line(n, gbs, cfg.engine.total_steps)
    )


def make_step_fn(cfg: BackboneDistillConfig, teacher: nn.Module):
    d = cfg.distill

    def step_fn(model, batch):
        with torch.no_grad():
            targets = teacher(batch.get("teacher_img", batch["img"]))  # L x [B, C_t, gh, gw]
        preds = model(batch["img"])
        losses = [
            token_distill_loss(
                p.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2), d.loss, d.normalize
            )
            for p, t in zip(preds, targets)
        ]  # tokens [B, gh*gw, C_t] per pair
        return torch.stack(losses).mean(), {}

    return step_fn


# ---- the run ----------------------------------------------------------------------------------------


def main(cfg: BackboneDistillConfig, *, resume: bool = True, dry_run: bool = False) -> dict:
    """`sapiens distill-backbone`: validate, then print the plan or train; returns the summary."""
    plan = validate(cfg)
    if dry_run:
        return print_plan(
            cfg,
            architecture=lambda: build_model(cfg, plan),
            param_groups=param_groups(cfg),
            data_plan=describe_data(cfg, plan),
        )
    _, summary = train(cfg, plan, resume=resume)
    return summary


def train(cfg: BackboneDistillConfig, plan: BackbonePlan | None = None, *, resume: bool = True):
    """Build, train and export; returns (engine, summary). Reruns resume exactly, with the same teacher."""
    from sapiens_train.frozen import place_frozen

    plan = plan if plan is not None else validate(cfg)
    backbone, checksum = load_teacher(cfg, plan)
    engine = Engine(
        lambda: build_model(cfg, plan),
        cfg.engine,
        cfg.optim,
        param_groups=param_groups(cfg),
        config_to_save=cfg,
        flops_per_sample=forward_flops(cfg.model, cfg.data.img_size)
        + forward_flops(plan.config, plan.img_size) / 3,
    )
    record_teacher(engine, {"path": plan.where, "checksum": checksum, "kind": "backbone"}, resume=resume)
    if resume:
        engine.resume()
    teacher_layers = check_layers(
        cfg.distill.teacher_layers, plan.config.depth, "distill.teacher_layers", "teacher"
    )
    teacher = place_frozen(
        TeacherBackbone(backbone, teacher_layers),
        engine.device,
        precision=cfg.teacher.precision,
        zero3=cfg.teacher.zero3,
        micro_batch_size=cfg.engine.micro_batch_size,
    )
    log(f"teacher backbone {plan.where} ({plan.config.arch}), sha256 {checksum[:12]}")
    summary = engine.fit(build_data(cfg, engine, plan), make_step_fn(cfg, teacher))
    summary["teacher_checksum"] = checksum
    finish(cfg, engine, summary)
    return engine, summary


def finish(cfg: BackboneDistillConfig, engine: Engine, summary: dict) -> None:
    """The student backbone (fp32, without the projections) into run_dir/backbone with save_pretrained."""
    log(f"{summary['steps']} steps, final loss {summary['final_loss']}")
    state = student_state(engine, prefix="backbone.")
    if engine.is_main:
        model = VisionTransformer(cfg.model)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        out = Path(cfg.engine.run_dir) / EXPORT_DIR
        model.save_pretrained(out)
        log(f"student backbone: {out} (start fine-tuning with init.path={cfg.engine.run_dir})")
    barrier()
