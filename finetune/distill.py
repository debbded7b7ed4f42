"""Pose distillation (`sapiens distill`): a frozen teacher pose model teaches a smaller student, in DWPose's
two stages, on the shared training engine.

    cfg = load_config(DistillConfig, ["configs/distill/tiny_cpu_coco17.yaml"])
    summary = main(cfg)        # run_dir/final/ is the student: a PoseModel folder for `sapiens eval`,
                               # `load_model` and the Hub (save_pretrained / push_to_hub)

Stage 1 (`distill.stage=1`): the student learns from the ground truth and from the teacher:

    loss = GT heatmap loss (`loss`, as fine-tuning)
         + s(step) * (heatmap_weight * heatmap distillation on all keypoints (mse, or kl with a temperature)
                      + feature_weight * feature distillation (1x1 projections of student blocks onto
                                                               teacher blocks, resized to its grid))

with s(step) = 1 - step / total_steps (DWPose's linear decay, `distill.decay`). The teacher sees the same
person crop as the student at its own input size (one augmentation draw, two `make_item` calls with
generators seeded alike: every draw is independent of the crop size); its heatmaps are resampled to the
student's grid. Stage 2 (`distill.stage=2`, DWPose's self-distillation): the teacher is the stage-1
student; a copy of it trains only its head, on the teacher's frozen features, against the ground truth
and the teacher's heatmaps, usually for a fraction of stage 1's steps.

The teacher (`TeacherNet`) is never part of the engine: it is loaded from `teacher.path` (anything
`load_model` reads) in eval mode without gradients, in bf16 or fp32, on the engine's device or
partitioned with ZeRO-3 (`sapiens_train.frozen`). Checkpoints hold the student and the projections
(`DistillStudent`); run_dir/teacher.json records the teacher's path and a checksum of its weights and
config, and a resume with another teacher is refused. MFU counts the teacher's forward FLOPs.

Teacher outputs online or cached: `sapiens distill-cache` (`write_teacher_cache`) runs the teacher
once over `data.train_shards` and writes shards holding each image, its annotations and, for each of
`data.views` augmentation draws, the teacher's heatmaps on the student's grid (and its features when
feature distillation is on) in `distill.target_dtype`. A run with `teacher.cache` streams those shards
instead of running the teacher. The online teacher's outputs are rounded to the same dtype, and with
`data.views` set both runs draw the same crops (seeded by the image key and the view), so a cached
run's losses equal the online run's on the same data and seed.

The trainer shape of `sapiens_train.recipe`: `validate` (teacher and student, schemes, layers, grids,
data, cache; every user mistake before any work) -> `build_model` -> `Engine` -> teacher -> resume ->
`build_data` -> hooks (periodic OKS AP of the student) -> `Engine.fit` -> `finish` (the student into
final/, evaluated).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from finetune.data import (
    StreamDecoder,
    TargetSpec,
    TopDownDataset,
    item_rng,
    make_item,
)
from finetune.distill_config import DistillConfig
from finetune.distill_losses import (
    distill_scale,
    feature_distill_loss,
    heatmap_distill_loss,
    resample_heatmaps,
    resize_feature_map,
)
from finetune.losses import build_loss
from finetune.train import EvalHook, save_model
from sapiens_lite.config import config_from_dict, config_to_dict
from sapiens_lite.errors import UserError
from sapiens_lite.flops import forward_flops
from sapiens_lite.keypoints import get_scheme
from sapiens_lite.loading import init_from, load_model, locate, model_config
from sapiens_lite.models.pose import PoseConfig, PoseModel
from sapiens_train.checkpoint import consolidate_fp32, read_latest, tag_for_step
from sapiens_train.dist import barrier
from sapiens_train.engine import Engine, global_batch_size
from sapiens_train.loader import ResumableLoader
from sapiens_train.optim import param_groups as make_param_groups
from sapiens_train.optim import vit_layer_id
from sapiens_train.recipe import epochs_line, print_plan, world_size_from_env

TEACHER_RECORD = "teacher.json"  # in run_dir: which teacher the run's checkpoints were trained with
CACHE_MANIFEST = "teacher-cache.json"  # in a cache folder: what the cached targets were made with
CACHE_MEMBER = "teacher.npz"  # per sample: heatmaps [V, K, h, w] (+ features [V, L, C, gh, gw])
TARGET_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[distill] {msg}", flush=True)


# ---- validation: before any work --------------------------------------------------------------------


@dataclass
class TeacherPlan:
    """What validation found out about the teacher (without loading weights when it can)."""

    config: PoseConfig
    """The teacher's config (its backbone, head, scheme, input size, normalisation)."""
    input_size: tuple[int, int]
    """The teacher's crop size (H, W): `teacher.input_size`, else its own."""
    where: str
    """teacher.path as given (a folder, run dir, file or repo id), or the path recorded in the cache."""
    model: PoseModel | None = None
    """A foreign teacher file, read during validation (its config is known only once converted)."""
    manifest: dict | None = None
    """The cache's manifest in cached mode."""

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.backbone.resolved().token_grid(self.input_size)

    @property
    def width(self) -> int:
        return self.config.backbone.resolved().embed_dim

    @property
    def depth(self) -> int:
        return self.config.backbone.resolved().depth


def validate(cfg: DistillConfig) -> TeacherPlan:
    """Check what a user can get wrong before any process group, worker or student exists; one line each."""
    dist = cfg.distill
    if dist.stage == 2 and cfg.init.path:
        raise UserError("init.path: stage 2 starts from the teacher (teacher.path); leave init.path empty")
    _validate_data(cfg)
    teacher = _teacher_plan(cfg)
    student_scheme, teacher_scheme = get_scheme(cfg.model.scheme), get_scheme(teacher.config.scheme)
    if (student_scheme.num_keypoints, tuple(student_scheme.names)) != (
        teacher_scheme.num_keypoints,
        tuple(teacher_scheme.names),
    ):
        raise UserError(
            f"teacher.path {teacher.where} predicts {teacher_scheme.num_keypoints} keypoints "
            f"({teacher_scheme.name}) but the student's model.scheme={cfg.model.scheme} has "
            f"{student_scheme.num_keypoints} ({student_scheme.name}); distillation needs one keypoint scheme"
        )
    (sh, sw), (th, tw) = cfg.model.input_size, teacher.input_size
    if sh * tw != sw * th:
        raise UserError(
            f"teacher input {th}x{tw} and student model.input_size {sh}x{sw} have different aspect ratios; "
            "the teacher must see the student's crop (set teacher.input_size to a size of the student's shape)"
        )
    if dist.stage == 2:
        _validate_stage2(cfg, teacher)
    if dist.feature_weight > 0:
        _validate_features(cfg, teacher)
    if cfg.teacher.cache:
        _validate_cache(cfg, teacher)
    return teacher


def _validate_data(cfg: DistillConfig) -> None:
    d = cfg.data
    if not (d.train_ann or d.train_shards):
        raise UserError("data.train_ann (or data.train_shards) is required")
    for key in ("train_ann", "val_ann"):
        v = getattr(d, key)
        if v and not Path(v).is_file():
            raise UserError(f"data.{key}: {v} not found")
    for key in ("train_images", "val_images"):
        v = getattr(d, key)
        if v and not Path(v).is_dir():
            raise UserError(f"data.{key}: {v} is not a folder")
    if cfg.eval.every_steps and not d.val_ann:
        raise UserError("eval.every_steps > 0 needs data.val_ann")
    if cfg.init.path:
        locate(cfg.init.path, revision=cfg.init.revision)


def _teacher_plan(cfg: DistillConfig) -> TeacherPlan:
    t = cfg.teacher
    if t.cache:
        manifest = read_cache_manifest(t.cache)
        info = manifest["teacher"]
        if t.path and os.path.abspath(t.path) != os.path.abspath(info["path"]) and t.path != info["path"]:
            raise UserError(
                f"teacher.path {t.path}: teacher.cache {t.cache} was written with the teacher {info['path']}; "
                "leave teacher.path empty or write a cache with this teacher"
            )
        config = config_from_dict(PoseConfig, info["config"])
        return TeacherPlan(config, tuple(manifest["input_size"]), info["path"], manifest=manifest)
    if not t.path:
        raise UserError("teacher.path is required (a pose model: folder, run dir, Hub repo or .pth)")
    found = model_config(t.path, revision=t.revision)  # UserError: not found, unreadable config
    model = None
    if found is None:  # a foreign checkpoint: its config is known once it is converted
        model = load_model(t.path, revision=t.revision)
        kind, config = model.model_type, model.config
    else:
        kind, config = found
    if kind != "pose" or not isinstance(config, PoseConfig):
        raise UserError(
            f"teacher.path {t.path}: holds a {kind!r} model (a backbone), not a pose model; distill pose "
            "from a pose checkpoint, or distill backbones with `sapiens distill-backbone`"
        )
    input_size = t.input_size or tuple(config.input_size)
    return TeacherPlan(config, tuple(input_size), t.path, model=model)


def _validate_stage2(cfg: DistillConfig, teacher: TeacherPlan) -> None:
    if cfg.teacher.cache:
        raise UserError(
            "teacher.cache: stage 2 trains the head on the teacher's features, which a cache does not hold; "
            "run stage 2 with the teacher online (teacher.path)"
        )
    if cfg.distill.feature_weight > 0:
        raise UserError("distill.feature_weight must be 0 in stage 2 (the backbone is frozen)")
    ours, theirs = _shape_of(cfg.model), _shape_of(teacher.config)
    if ours != theirs:
        raise UserError(
            f"distill.stage=2 trains a copy of the teacher {teacher.where}, but model differs from it "
            f"({_first_difference(ours, theirs)}); leave model unset in stage 2"
        )
    if tuple(teacher.input_size) != tuple(cfg.model.input_size):
        raise UserError(
            f"teacher.input_size {list(teacher.input_size)}: in stage 2 the teacher runs on the student's crop "
            f"{list(cfg.model.input_size)}; leave teacher.input_size unset"
        )


def _shape_of(model: PoseConfig) -> dict:
    """The fields that decide a pose model's weights (backbone shape, head, keypoints)."""
    b = model.backbone.resolved()
    return {
        "backbone": {
            f: getattr(b, f) for f in ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")
        },
        "head": config_to_dict(model.head),
        "scheme": get_scheme(model.scheme).name,
    }


def _first_difference(a: dict, b: dict, prefix: str = "model") -> str:
    for k in a:
        if isinstance(a[k], dict):
            found = _first_difference(a[k], b[k], f"{prefix}.{k}")
            if found:
                return found
        elif a[k] != b[k]:
            return f"{prefix}.{k}={a[k]!r}, teacher {b[k]!r}"
    return ""


def check_layers(layers, depth: int, key: str, who: str) -> tuple[int, ...]:
    """Absolute block indices of `layers` (negative ones count from the end); UserError when out of range."""
    out = []
    for i in layers:
        if not -depth <= i < depth:
            raise UserError(
                f"{key}: block index {i} is out of range for the {who}'s {depth} blocks "
                f"(use 0..{depth - 1}, or -1..-{depth} from the end)"
            )
        out.append(i % depth)
    return tuple(out)


def _validate_features(cfg: DistillConfig, teacher: TeacherPlan) -> None:
    dist = cfg.distill
    student = cfg.model.backbone.resolved()
    check_layers(dist.student_layers, student.depth, "distill.student_layers", f"student ({student.arch})")
    check_layers(dist.teacher_layers, teacher.depth, "distill.teacher_layers", "teacher")
    s_shape = (student.embed_dim, *student.token_grid(cfg.model.input_size))
    t_shape = (teacher.width, *teacher.grid)
    if not dist.projection and s_shape != t_shape:
        raise UserError(
            f"distill.projection=false, but the student's feature maps are {list(s_shape)} (C, gh, gw) and the "
            f"teacher's {list(t_shape)}; set distill.projection=true (a learned 1x1 projection and a resize)"
        )


def _validate_cache(cfg: DistillConfig, teacher: TeacherPlan) -> None:
    manifest = teacher.manifest
    if not cfg.data.train_shards:
        raise UserError("teacher.cache: a cache is made from data.train_shards; set it to the cache's source")
    want = cache_request(cfg, teacher.input_size)
    for key, value in want.items():
        if key == "feature_layers" and cfg.distill.feature_weight == 0:
            continue  # features unused: a cache with or without them serves
        have = manifest["request"].get(key)
        if have != value:
            raise UserError(
                f"teacher.cache {cfg.teacher.cache} was written for {key}={have!r}, this run has {value!r}; "
                "match the setting or write a new cache (sapiens distill-cache)"
            )


# ---- the teacher ------------------------------------------------------------------------------------


class TeacherNet(nn.Module):
    """The frozen teacher's forward pass for distillation.

    x: [B, 3, H_t, W_t] teacher crops -> (heatmaps [B, K, H_t/4, W_t/4], the chosen blocks' outputs
    [B, C_t, gh, gw] each in `layers` order, the final feature map [B, C_t, gh, gw] the head reads).
    """

    def __init__(self, model: PoseModel, layers: tuple[int, ...] = (), norm: bool = True):
        super().__init__()
        self.model = model
        self.layers = tuple(layers)
        self.norm = norm

    def forward(self, x: torch.Tensor):
        backbone = self.model.backbone
        x = x.to(backbone.patch_embed.proj.weight.dtype)  # bf16 weights take bf16 crops
        grid = backbone.token_grid(x.shape[-2:])
        if self.layers:
            taken = sorted(set(self.layers))
            final, maps = backbone.forward_intermediates(x, indices=taken, norm=self.norm)
            by_block = dict(zip(taken, maps))
            features = [by_block[i] for i in self.layers]
        else:
            final, features = backbone.forward_tokens(x), []
        fmap = backbone.tokens_to_map(final[:, backbone.num_prefix_tokens :], grid)  # [B, C, gh, gw]
        return self.model.head(fmap), features, fmap


def load_teacher(cfg: DistillConfig, plan: TeacherPlan) -> tuple[PoseModel, str]:
    """The teacher in fp32 on the CPU, frozen, and the checksum of its weights and config."""
    from sapiens_train.frozen import freeze, weights_checksum

    model = (
        plan.model if plan.model is not None else load_model(cfg.teacher.path, revision=cfg.teacher.revision)
    )
    freeze(model)
    return model, weights_checksum(model, extra=config_to_dict(model.config))


def teacher_layers(cfg: DistillConfig, plan: TeacherPlan) -> tuple[int, ...]:
    if cfg.distill.feature_weight == 0:
        return ()
    return check_layers(cfg.distill.teacher_layers, plan.depth, "distill.teacher_layers", "teacher")


def teacher_targets(
    heatmaps: torch.Tensor, features: list[torch.Tensor], heatmap_size, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's outputs as the student's targets, rounded to the storage dtype (online and cached alike).

    heatmaps [B, K, h_t, w_t] -> [B, K, *heatmap_size] (the student's grid); features (L maps [B, C, gh, gw])
    -> [B, L, C, gh, gw] or None. Both returned in fp32.
    """
    hm = resample_heatmaps(heatmaps.float(), heatmap_size).to(dtype).float()
    feats = torch.stack([f.float() for f in features], dim=1).to(dtype).float() if features else None
    return hm, feats


def record_teacher(engine: Engine, record: dict, *, resume: bool) -> None:
    """Refuse to resume run_dir's checkpoints with a teacher other than the one run_dir/teacher.json records
    (`record`: {"path", "checksum" (sha256 of weights and config), ...}: every key but the path must match);
    on a fresh start write the record."""
    path = engine.run_dir / TEACHER_RECORD
    if resume and read_latest(engine.ckpt_dir) is not None:
        if not path.is_file():
            raise UserError(
                f"{engine.run_dir} has checkpoints but no {TEACHER_RECORD}: its teacher cannot be checked; "
                "start a new run_dir (or --no-resume)"
            )
        old = json.loads(path.read_text())
        differs = [k for k in record if k != "path" and old.get(k) != record[k]]
        if differs:

            def show(r: dict) -> str:
                extra = "".join(f", {k} {r.get(k)}" for k in record if k not in ("path", "checksum"))
                return f"{r.get('path')} (sha256 {str(r.get('checksum'))[:12]}{extra})"

            raise UserError(
                f"{engine.run_dir} was trained with the teacher {show(old)}; this run's teacher {show(record)} "
                "differs; resume with that teacher or use another run_dir"
            )
        return
    if engine.is_main:
        _write_json(path, record)
    barrier()


# ---- the student ------------------------------------------------------------------------------------


class DistillStudent(nn.Module):
    """What the engine trains: the student pose model and the feature projections (1x1 convs).

    forward(x) -> (heatmaps [B, K, H/4, W/4], projected maps [B, C_t, gh_t, gw_t] per layer pair);
    forward(features=teacher_map) -> (the student head on those features, []) for stage 2.
    """

    def __init__(
        self,
        student: PoseModel,
        layers: tuple[int, ...] = (),
        norm: bool = True,
        projections: nn.ModuleList | None = None,
        teacher_grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.student = student
        self.layers = tuple(layers)
        self.norm = norm
        self.projections = projections if projections is not None else nn.ModuleList()
        self.teacher_grid = teacher_grid

    def forward(self, x: torch.Tensor | None = None, features: torch.Tensor | None = None):
        if features is not None:
            dtype = next(self.student.head.parameters()).dtype  # the teacher's features may be bf16
            return self.student.head(features.to(dtype)), []
        if not self.layers:
            return self.student(x), []
        backbone = self.student.backbone
        grid = backbone.token_grid(x.shape[-2:])
        taken = sorted(set(self.layers))
        final, maps = backbone.forward_intermediates(x, indices=taken, norm=self.norm)
        by_block = dict(zip(taken, maps))
        fmap = backbone.tokens_to_map(final[:, backbone.num_prefix_tokens :], grid)  # [B, C, gh, gw]
        projected = [
            resize_feature_map(proj(by_block[i]), self.teacher_grid)
            for i, proj in zip(self.layers, self.projections)
        ]  # [B, C_t, gh_t, gw_t] each
        return self.student.head(fmap), projected

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.student.set_grad_checkpointing(enable)


def build_model(cfg: DistillConfig, plan: TeacherPlan, *, load_weights: bool = True) -> DistillStudent:
    """The student with its starting weights (stage 2: the teacher's, backbone frozen) and the projections.

    `load_weights=False` builds the architecture only (`--dry-run`, on the meta device)."""
    student = PoseModel(cfg.model)
    dist = cfg.distill
    if dist.stage == 2:
        if load_weights and plan.model is not None:  # a foreign file, read during validation
            student.load_state_dict(plan.model.state_dict())
        elif load_weights:
            init_from(student, cfg.teacher.path, revision=cfg.teacher.revision)
        for p in student.backbone.parameters():
            p.requires_grad_(False)
        if load_weights:
            log(f"stage 2: a copy of the teacher {plan.where}; only the head trains")
        return DistillStudent(student)
    if load_weights:
        what = "random initialisation"
        if cfg.init.path:
            what = init_from(student, cfg.init.path, revision=cfg.init.revision, load_head=cfg.init.load_head)
        log(f"student init: {what}")
    if dist.feature_weight == 0:
        return DistillStudent(student)
    s = cfg.model.backbone.resolved()
    layers = check_layers(dist.student_layers, s.depth, "distill.student_layers", "student")
    if dist.projection:
        projections = nn.ModuleList(nn.Conv2d(s.embed_dim, plan.width, kernel_size=1) for _ in layers)
    else:
        projections = nn.ModuleList(nn.Identity() for _ in layers)
    return DistillStudent(student, layers, dist.feature_norm, projections, plan.grid)


def param_groups(cfg: DistillConfig):
    """Layer-wise lr decay over the student's blocks (as fine-tuning); head and projections at scale 1."""
    depth = cfg.model.backbone.resolved().depth
    return lambda model: make_param_groups(
        model,
        cfg.optim.weight_decay,
        layer_decay=cfg.optim.layer_decay,
        num_layers=depth,
        layer_id_fn=vit_layer_id,
    )


def flops_per_sample(cfg: DistillConfig, plan: TeacherPlan) -> float:
    """Forward FLOPs such that the engine's 3x (forward + backward) counts the student's training and the
    teacher's forward pass once: student + teacher / 3 (stage 2: the student's backbone does not run)."""
    teacher = 0.0 if cfg.teacher.cache else forward_flops(plan.config.backbone, plan.input_size)
    student = 0.0 if cfg.distill.stage == 2 else forward_flops(cfg.model.backbone, cfg.model.input_size)
    return student + teacher / 3.0


# ---- data -------------------------------------------------------------------------------------------


def student_spec(cfg: DistillConfig) -> TargetSpec:
    m = cfg.model
    return TargetSpec(get_scheme(m.scheme), tuple(m.input_size), m.sigma, tuple(m.mean), tuple(m.std))


def teacher_spec(cfg: DistillConfig, plan: TeacherPlan) -> TargetSpec | None:
    """The teacher's crop of each person; None when it is the student's crop (same size and normalisation)."""
    t = plan.config
    spec = TargetSpec(get_scheme(t.scheme), tuple(plan.input_size), t.sigma, tuple(t.mean), tuple(t.std))
    s = student_spec(cfg)
    if (spec.input_size, spec.mean, spec.std) == (s.input_size, s.mean, s.std):
        return None
    return spec


def view_seed(seed: int, key: str, view: int) -> int:
    """The augmentation seed of view `view` of the image `key`: independent of order, rank and worker."""
    digest = hashlib.blake2b(f"{seed}/{key}/{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class TwoViewDataset(torch.utils.data.Dataset):
    """A `TopDownDataset` whose items also hold the teacher's crop of the same augmentation draw
    (`teacher_img` [3, H_t, W_t]; absent when the teacher sees the student's crop)."""

    def __init__(self, base: TopDownDataset, teacher: TargetSpec | None, views: int = 0):
        self.base, self.teacher, self.views = base, teacher, views
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        b = self.base
        person = b.people[index]
        img = b.image_loader(person.image_path)
        draw = self.epoch % self.views if self.views else self.epoch
        # Two generators seeded alike give the same draws: the crops differ only in their size.
        item = make_item(img, person, b.spec, b.augment, item_rng(b.seed, draw, index), b.encode_targets)
        if self.teacher is not None:
            t = make_item(img, person, self.teacher, b.augment, item_rng(b.seed, draw, index), False)
            item["teacher_img"] = t["img"]
        return item


@dataclass
class TwoViewDecoder:
    """`decode` for the stream: one shard sample -> the student's item, plus the teacher's crop of the same
    draw (`teacher_img`), or the cached teacher targets (`teacher_heatmaps`, `teacher_features`)."""

    student: StreamDecoder
    teacher: StreamDecoder | None
    seed: int
    views: int = 0
    cached: bool = False

    def __call__(self, sample: dict) -> dict | None:
        view = None
        if self.views:
            view = int(sample["__epoch__"]) % self.views
            sample = dict(sample, __seed__=view_seed(self.seed, sample["__key__"], view))
        item = self.student(sample)
        if item is None:
            return None
        if self.cached:
            if CACHE_MEMBER not in sample:
                raise UserError(
                    f"{sample.get('__url__')}:{sample.get('__key__')}: no {CACHE_MEMBER} in the cache"
                )
            with np.load(io.BytesIO(sample[CACHE_MEMBER])) as z:
                item["teacher_heatmaps"] = torch.from_numpy(z["heatmaps"][view].astype(np.float32))
                if "features" in z:
                    item["teacher_features"] = torch.from_numpy(z["features"][view].astype(np.float32))
        elif self.teacher is not None:
            item["teacher_img"] = self.teacher(sample)["img"]
        return item


def build_data(cfg: DistillConfig, engine: Engine, plan: TeacherPlan):
    """This rank's micro-batches: student crops with GT heatmaps, and the teacher's crops or cached targets."""
    tspec = None if cfg.teacher.cache else teacher_spec(cfg, plan)
    if cfg.data.train_shards:
        from sapiens_train.stream import build_stream

        aug = cfg.data.augment
        decode = TwoViewDecoder(
            StreamDecoder(student_spec(cfg), train=True, augment=aug),
            StreamDecoder(tspec, train=True, augment=aug, encode_targets=False) if tspec else None,
            seed=cfg.engine.seed,
            views=cfg.data.views,
            cached=bool(cfg.teacher.cache),
        )
        return build_stream(
            cache_index(cfg.teacher.cache) if cfg.teacher.cache else cfg.data.train_shards,
            decode=decode,
            batch_size=cfg.engine.micro_batch_size,
            num_workers=cfg.data.num_workers,
            seed=cfg.engine.seed,
            rank=engine.rank,
            world_size=engine.world_size,
            pin_memory=engine.device.type == "cuda",
        )
    base = TopDownDataset.from_config(cfg, split="train")
    if base.skipped and engine.is_main:
        log(f"{cfg.data.train_ann}: skipped {dict(base.skipped)}")
    return ResumableLoader(
        TwoViewDataset(base, tspec, cfg.data.views),
        cfg.engine.micro_batch_size,
        rank=engine.rank,
        world_size=engine.world_size,
        seed=cfg.engine.seed,
        num_workers=cfg.data.num_workers,
        pin_memory=engine.device.type == "cuda",
    )


def describe_data(cfg: DistillConfig, plan: TeacherPlan) -> str:
    """The data plan `--dry-run` prints: people, crops at both sizes, the teacher, epochs."""
    gbs = global_batch_size(cfg.engine, world_size_from_env())
    (sh, sw), (th, tw) = cfg.model.input_size, plan.input_size
    crops = f"student {sh}x{sw} crops (sigma {cfg.model.sigma}), teacher {th}x{tw}"
    if cfg.teacher.cache:
        teacher = f"teacher outputs cached in {cfg.teacher.cache} ({plan.where})"
    else:
        z3 = ", ZeRO-3" if cfg.teacher.zero3 else ""
        teacher = f"teacher {plan.where} online ({cfg.teacher.precision}{z3})"
    d = cfg.distill
    losses = f"stage {d.stage}: GT {cfg.loss.kind} + {d.heatmap_weight:g} x {d.heatmap_loss}"
    if d.feature_weight:
        losses += f" + {d.feature_weight:g} x features {list(d.student_layers)} -> {list(d.teacher_layers)}"
    losses += ", linear decay" if d.decays else ", constant weights"
    if cfg.data.train_shards:
        from sapiens_train.stream import resolve_shards

        n = sum(s.num_samples for s in resolve_shards(cfg.data.train_shards))
        source = f"shards {cfg.data.train_shards} ({n} images; one person drawn per image)"
    else:
        n = len(TopDownDataset.from_config(cfg, split="train"))
        source = f"{cfg.data.train_ann} ({n} people)"
    views = f"; {cfg.data.views} augmentation views per image" if cfg.data.views else ""
    return f"{source}; {crops}{views}\n{teacher}; {losses}\n" + epochs_line(n, gbs, cfg.engine.total_steps)


# ---- the step ---------------------------------------------------------------------------------------


def make_step_fn(cfg: DistillConfig, engine: Engine, teacher: nn.Module | None):
    """The forward pass of one micro-batch: the teacher (no gradients), the student, the weighted losses."""
    gt_loss = build_loss(cfg.loss)
    d = cfg.distill
    dtype = TARGET_DTYPES[d.target_dtype]
    heatmap_size = cfg.model.heatmap_size
    total = cfg.engine.total_steps

    def step_fn(model, batch):
        teacher_map = None
        if teacher is None:  # cached targets
            t_heatmaps, t_features = batch["teacher_heatmaps"], batch.get("teacher_features")
        else:
            with torch.no_grad():
                t_raw, t_layers, teacher_map = teacher(batch.get("teacher_img", batch["img"]))
            t_heatmaps, t_features = teacher_targets(t_raw, t_layers, heatmap_size, dtype)
        if d.stage == 2:
            heatmaps, projected = model(
                features=teacher_map
            )  # the head on the teacher's (= its own) features
        else:
            heatmaps, projected = model(batch["img"])  # [B, K, h, w], L x [B, C_t, gh_t, gw_t]
        gt = gt_loss(heatmaps, batch["heatmaps"], batch["target_weight"])
        zero = gt.new_zeros(())
        kd_heatmap = (
            heatmap_distill_loss(heatmaps, t_heatmaps, d.heatmap_loss, d.temperature)
            if d.heatmap_weight
            else zero
        )
        kd_feature = feature_distill_loss(projected, t_features.unbind(1)) if projected else zero
        scale = distill_scale(engine.step, total, d.decays)
        loss = gt + scale * (d.heatmap_weight * kd_heatmap + d.feature_weight * kd_feature)
        return loss, {
            "gt": gt.detach(),
            "kd_heatmap": kd_heatmap.detach(),
            "kd_feature": kd_feature.detach(),
            "kd_scale": scale,
        }

    return step_fn


# ---- hooks and export -------------------------------------------------------------------------------


def save_student(state: dict, config: PoseConfig, folder: Path, metrics: dict | None = None) -> PoseModel:
    """An fp32 PoseModel from `state` (the student's keys), saved with save_pretrained (+ metrics.json)."""
    model = PoseModel(config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    save_model(model, folder, metrics)
    return model


def student_state(engine: Engine, prefix: str = "student.") -> dict | None:
    """The trained student's fp32 weights on rank 0 (None on the others); a collective (every rank calls it).

    bf16 rounds the module's parameters: then the fp32 master weights are read back from the last
    checkpoint (saved now if this step has none). Otherwise the module holds them (under ZeRO-3 gathered
    from the ranks' partitions).
    """
    if engine.cfg.precision == "bf16":
        if read_latest(engine.ckpt_dir) != tag_for_step(engine.step):
            engine.save_checkpoint()
        if not engine.is_main:
            return None
        full = consolidate_fp32(engine.run_dir)
        return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
    with engine.full_weights() as model:
        if not engine.is_main:
            return None
        # Copies: under ZeRO-3 the gathered weights become partitions again when the block ends.
        return {
            k[len(prefix) :]: v.detach().cpu().clone()
            for k, v in model.state_dict().items()
            if k.startswith(prefix)
        }


# ---- the run ----------------------------------------------------------------------------------------


def main(cfg: DistillConfig, *, resume: bool = True, dry_run: bool = False) -> dict:
    """`sapiens distill`: validate, then print the plan (`dry_run`) or train; returns the summary (with the
    student's final val metrics under "metrics")."""
    plan = validate(cfg)  # user mistakes surface before DeepSpeed starts
    if dry_run:
        return print_plan(
            cfg,
            architecture=lambda: build_model(cfg, plan, load_weights=False),
            param_groups=param_groups(cfg),
            data_plan=describe_data(cfg, plan),
        )
    _, summary, _ = train(cfg, plan, resume=resume)
    return summary


def train(cfg: DistillConfig, plan: TeacherPlan | None = None, *, resume: bool = True):
    """Build, train, export and evaluate; returns (engine, summary, teacher module or None when cached).
    A rerun with the same engine.run_dir resumes exactly from its latest checkpoint, with the same teacher."""
    plan = plan if plan is not None else validate(cfg)
    if cfg.teacher.cache:
        model, checksum = None, plan.manifest["teacher"]["checksum"]
    else:
        model, checksum = load_teacher(cfg, plan)
    engine = Engine(
        lambda: build_model(cfg, plan),
        cfg.engine,
        cfg.optim,
        param_groups=param_groups(cfg),
        config_to_save=cfg,
        flops_per_sample=flops_per_sample(cfg, plan),
    )
    record = {"path": plan.where, "checksum": checksum, "stage": cfg.distill.stage}
    record_teacher(engine, record, resume=resume)  # before a checkpoint made with another teacher is loaded
    if resume:
        engine.resume()
    teacher = None
    if model is not None:
        from sapiens_train.frozen import place_frozen

        teacher = place_frozen(
            TeacherNet(model, teacher_layers(cfg, plan), cfg.distill.feature_norm),
            engine.device,
            precision=cfg.teacher.precision,
            zero3=cfg.teacher.zero3,
            micro_batch_size=cfg.engine.micro_batch_size,
        )
        log(
            f"teacher {plan.where} ({cfg.teacher.precision}{', ZeRO-3' if cfg.teacher.zero3 else ''}), sha256 {checksum[:12]}"
        )
    data = build_data(cfg, engine, plan)
    every = cfg.eval.every_steps if cfg.data.val_ann else 0
    hooks = []
    if every:  # the student evaluated and kept as fine-tuning does, written in fp32 like run_dir/final
        hooks = [
            EvalHook(
                cfg,
                every,
                resumed_step=engine.step,
                pick=lambda module: module.student,
                save=lambda student, folder, m: save_student(student.state_dict(), cfg.model, folder, m),
                autocast=True,
            )
        ]
    summary = engine.fit(data, make_step_fn(cfg, engine, teacher), hooks=hooks)
    summary["teacher_checksum"] = checksum
    summary["metrics"] = finish(cfg, engine, summary)
    return engine, summary, teacher


def finish(cfg: DistillConfig, engine: Engine, summary: dict) -> dict:
    """The student (fp32) into run_dir/final with save_pretrained, evaluated on the val set if there is one."""
    log(f"{summary['steps']} steps, final loss {summary['final_loss']}")
    state = student_state(engine)
    metrics: dict = {}
    if engine.is_main:
        out = Path(cfg.engine.run_dir) / "final"
        student = save_student(state, cfg.model, out)
        if cfg.data.val_ann:
            from finetune.evaluate import evaluate_model

            metrics = evaluate_model(
                student.to(engine.device).eval(),
                cfg.data.val_ann,
                cfg.data.val_images,
                cfg.eval,
                device=engine.device,
                num_workers=cfg.data.num_workers,
                progress=False,
            )
            tmp = out / "metrics.json.tmp"
            tmp.write_text(json.dumps(metrics, indent=1))
            os.replace(tmp, out / "metrics.json")
            log(f"final student AP {metrics['AP']:.4f}")
        log(f"final student: {out}")
    barrier()
    return metrics


# ---- the teacher cache (`sapiens distill-cache`) ----------------------------------------------------


def cache_request(cfg: DistillConfig, teacher_input_size) -> dict:
    """Everything the cached targets depend on besides the teacher's weights (checked when a run reads them)."""
    return {
        "source_shards": cfg.data.train_shards,
        "views": cfg.data.views,
        "seed": cfg.engine.seed,
        "augment": config_to_dict(cfg.data.augment),
        "teacher_input_size": list(teacher_input_size),
        "heatmap_size": list(cfg.model.heatmap_size),
        "student_input_size": list(cfg.model.input_size),
        "scheme": get_scheme(cfg.model.scheme).name,
        "target_dtype": cfg.distill.target_dtype,
        "feature_layers": list(cfg.distill.teacher_layers) if cfg.distill.feature_weight > 0 else [],
        "feature_norm": cfg.distill.feature_norm,
    }


def read_cache_manifest(folder: str) -> dict:
    path = Path(folder) / CACHE_MANIFEST
    if not path.is_file():
        raise UserError(
            f"teacher.cache {folder}: no {CACHE_MANIFEST} (write the cache with `sapiens distill-cache`)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "sapiens-teacher-cache/1":
        raise UserError(f"{path}: not a teacher cache manifest")
    return manifest


def cache_index(folder: str) -> str:
    from sapiens_train.stream import INDEX_NAME

    index = Path(folder) / INDEX_NAME
    if not index.is_file():
        raise UserError(
            f"teacher.cache {folder}: no {INDEX_NAME}; the cache is incomplete, run `sapiens distill-cache` again"
        )
    return str(index)


def write_teacher_cache(cfg: DistillConfig, *, progress: bool = True) -> dict:
    """Run the teacher once over `data.train_shards`, `data.views` crops per image, into `teacher.cache`.

    Each source shard becomes one cache shard with the same samples in the same order (so the stream
    plans the same batches): the sample's members, plus `teacher.npz` holding heatmaps [V, K, h, w] on the
    student's grid and, with feature distillation, features [V, L, C, gh, gw], in `distill.target_dtype`.
    Samples without a usable person keep no targets (the run skips them, as online). Resumable: finished
    shards are kept; a cache folder made with another teacher or settings is an error. Returns the manifest.
    """
    from tqdm import tqdm

    from sapiens_train.shards import read_samples, write_samples
    from sapiens_train.stream import INDEX_NAME, resolve_shards

    out = Path(cfg.teacher.cache) if cfg.teacher.cache else None
    if out is None:
        raise UserError("teacher.cache: the folder to write the cache into is required")
    if not cfg.data.train_shards:
        raise UserError(
            "data.train_shards: the cache is written for shards (pack images with `sapiens data pack`)"
        )
    if cfg.data.views < 1:
        raise UserError(
            "data.views must be >= 1 for a cache: each image's crops are stored for that many draws"
        )
    if cfg.distill.stage == 2:
        raise UserError("distill.stage=2 runs the teacher online (it needs the teacher's features); no cache")
    plan = validate(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache="")))
    model, checksum = load_teacher(cfg, plan)
    manifest = {
        "format": "sapiens-teacher-cache/1",
        "teacher": {"path": plan.where, "checksum": checksum, "config": config_to_dict(plan.config)},
        "input_size": list(plan.input_size),
        "request": cache_request(cfg, plan.input_size),
    }
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / CACHE_MANIFEST
    if manifest_path.is_file():
        if json.loads(manifest_path.read_text()) != manifest:
            raise UserError(
                f"{out} holds a teacher cache made with another teacher or settings ({manifest_path}); "
                "use a new folder or delete that one"
            )
    else:
        _write_json(manifest_path, manifest)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from sapiens_train.frozen import place_frozen

    layers = teacher_layers(cfg, plan)
    teacher = place_frozen(
        TeacherNet(model, layers, cfg.distill.feature_norm), device, precision=cfg.teacher.precision
    )
    tspec = TargetSpec(
        get_scheme(plan.config.scheme),
        tuple(plan.input_size),
        plan.config.sigma,
        tuple(plan.config.mean),
        tuple(plan.config.std),
    )
    decode = StreamDecoder(tspec, train=True, augment=cfg.data.augment, encode_targets=False)
    dtype = TARGET_DTYPES[cfg.distill.target_dtype]
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    views = cfg.data.views
    shards = resolve_shards(cfg.data.train_shards)
    entries = []
    bar = tqdm(
        total=sum(s.num_samples for s in shards), unit="img", desc="teacher cache", disable=not progress
    )

    def cached_samples(url: str) -> Iterator[dict]:
        chunk: list[dict] = []
        for sample in read_samples(url):
            chunk.append(sample)
            if len(chunk) * views >= cfg.teacher.batch_size:
                yield from targets_for(chunk)
                chunk = []
        if chunk:
            yield from targets_for(chunk)

    def targets_for(samples: list[dict]) -> Iterator[dict]:
        crops, owners = [], []
        for j, sample in enumerate(samples):
            for v in range(views):
                item = decode(
                    dict(sample, __seed__=view_seed(cfg.engine.seed, sample["__key__"], v), __epoch__=v)
                )
                if item is not None:
                    crops.append(item["img"])
                    owners.append(j)
        per_sample: dict[int, list] = {}
        if crops:
            with torch.no_grad():
                raw, feats, _ = teacher(torch.stack(crops).to(device))
            hm, fs = teacher_targets(raw, feats, cfg.model.heatmap_size, dtype)
            for n, j in enumerate(owners):
                per_sample.setdefault(j, []).append((hm[n], None if fs is None else fs[n]))
        for j, sample in enumerate(samples):
            record = {k: v for k, v in sample.items() if not k.startswith("__")}
            record["__key__"] = sample["__key__"]
            if j in per_sample:
                got = per_sample[j]
                arrays = {"heatmaps": torch.stack([h for h, _ in got]).numpy().astype(np_dtype)}
                if got[0][1] is not None:
                    arrays["features"] = torch.stack([f for _, f in got]).numpy().astype(np_dtype)
                buf = io.BytesIO()
                np.savez(buf, **arrays)
                record[CACHE_MEMBER] = buf.getvalue()
            bar.update(1)
            yield record

    for i, shard in enumerate(shards):
        name = f"teacher-{i:06d}.tar"
        path = out / name
        if path.is_file():
            bar.update(shard.num_samples)
        else:
            written = write_samples(path, cached_samples(shard.url))
            if written != shard.num_samples:
                path.unlink()
                raise UserError(f"{shard.url}: read {written} samples, its index says {shard.num_samples}")
        entries.append({"url": name, "num_samples": shard.num_samples})
    bar.close()
    _write_json(
        out / INDEX_NAME,
        {"format": "sapiens-shards/1", "source": {"type": "teacher-cache"}, "shards": entries},
    )
    log(f"teacher cache: {len(entries)} shards, {views} views per image, in {out}")
    return manifest


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
