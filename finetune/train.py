"""Top-down pose fine-tuning on the shared training engine (the same `Engine` as MAE pretraining).

    cfg = load_config(FinetuneConfig, ["configs/finetune/tiny_cpu_coco17.yaml"])
    summary = main(cfg)        # run_dir/final/ is a PoseModel folder for `sapiens eval` and the Hub

The trainer shape of `sapiens_train.recipe`: config -> `validate` (data paths, the init checkpoint: every
user mistake before DeepSpeed starts) -> `build_model` (the `PoseModel`, its starting weights from
anything `sapiens_lite.loading.init_from` reads) -> the engine (layer-wise lr decay groups, resume) ->
`build_data` (top-down crops from COCO JSON, or webdataset shards) -> hooks (OKS AP every
`eval.every_steps`, the best model kept as best/) -> `Engine.fit` -> `finish` (a final evaluation and
`save_pretrained` into final/).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from finetune.config import FinetuneConfig
from finetune.data import TopDownDataset, build_pose_stream
from finetune.losses import build_loss
from sapiens_lite.errors import UserError
from sapiens_lite.flops import forward_flops
from sapiens_lite.loading import init_from, locate
from sapiens_lite.models.pose import PoseModel
from sapiens_train.dist import barrier
from sapiens_train.engine import Engine, global_batch_size
from sapiens_train.loader import ResumableLoader
from sapiens_train.monitor import truncate_jsonl
from sapiens_train.optim import param_groups as make_param_groups
from sapiens_train.optim import vit_layer_id
from sapiens_train.recipe import epochs_line, print_plan, world_size_from_env

# ---- validation: before any work --------------------------------------------------------------------


def validate(cfg: FinetuneConfig) -> dict:
    """Check what a user can get wrong (data paths, the init checkpoint) before any process group exists
    or anything is written. Returns what it had to load anyway: {"dataset": the training people, or None
    for shards}."""
    d = cfg.data
    if not (d.train_ann or d.train_shards):
        raise UserError("data.train_ann (or data.train_shards) is required")
    for key in ("train_ann", "val_ann"):
        v = getattr(d, key)
        if v and Path(v).is_dir():
            raise UserError(f"data.{key}: {v} is a folder, not an annotation file")
        if v and not Path(v).is_file():
            raise UserError(f"data.{key}: {v} not found")
    for key in ("train_images", "val_images"):
        v = getattr(d, key)
        if v and not Path(v).is_dir():
            raise UserError(f"data.{key}: {v} is not a folder")
    if cfg.eval.every_steps and not d.val_ann:
        raise UserError("eval.every_steps > 0 needs data.val_ann")
    if cfg.init.path:
        locate(cfg.init.path, revision=cfg.init.revision)  # UserError: no such file, run dir without export
    global_batch_size(cfg.engine, world_size_from_env())  # UserError: batch settings that disagree
    if d.train_shards:
        return {"dataset": None}
    dataset = TopDownDataset.from_config(cfg, split="train")  # UserError: unreadable or wrong annotations
    need = cfg.engine.micro_batch_size * world_size_from_env()
    if len(dataset) < need:
        skipped = f" (skipped: {dict(dataset.skipped)})" if dataset.skipped else ""
        raise UserError(
            f"data.train_ann: {d.train_ann} gives {len(dataset)} usable people{skipped}, fewer than one "
            f"micro-batch on every rank ({need}); check data.train_images and the annotations"
        )
    return {"dataset": dataset}


# ---- model ------------------------------------------------------------------------------------------


def build_model(cfg: FinetuneConfig) -> PoseModel:
    """The pose model with its starting weights (`init.path`), identical on every rank."""
    model = PoseModel(cfg.model)
    if cfg.init.path:
        what = init_from(model, cfg.init.path, revision=cfg.init.revision, load_head=cfg.init.load_head)
    else:
        what = "random initialisation"
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[finetune] init: {what}", flush=True)
    return model


def param_groups(cfg: FinetuneConfig):
    """Layer-wise lr decay over the backbone blocks (MAE lr_decay); the head is the last "layer" (scale 1)."""
    depth = cfg.model.backbone.resolved().depth
    return lambda model: make_param_groups(
        model,
        cfg.optim.weight_decay,
        layer_decay=cfg.optim.layer_decay,
        num_layers=depth,
        layer_id_fn=vit_layer_id,
    )


# ---- data -------------------------------------------------------------------------------------------


def build_data(cfg: FinetuneConfig, engine: Engine, dataset: TopDownDataset | None = None):
    """This rank's micro-batches of person crops with heatmap targets, resumable through the engine."""
    if cfg.data.train_shards:
        return build_pose_stream(cfg, rank=engine.rank, world_size=engine.world_size)
    dataset = dataset if dataset is not None else TopDownDataset.from_config(cfg, split="train")
    if dataset.skipped and engine.is_main:
        print(f"[finetune] {cfg.data.train_ann}: skipped {dict(dataset.skipped)}", flush=True)
    return ResumableLoader(
        dataset,
        cfg.engine.micro_batch_size,
        rank=engine.rank,
        world_size=engine.world_size,
        seed=cfg.engine.seed,
        num_workers=cfg.data.num_workers,
        pin_memory=engine.device.type == "cuda",
    )


def describe_data(cfg: FinetuneConfig) -> str:
    """The data plan `--dry-run` prints: where the people come from and how many epochs the run makes."""
    gbs = global_batch_size(cfg.engine, world_size_from_env())
    size = f"{cfg.model.input_size[0]}x{cfg.model.input_size[1]} crops, sigma {cfg.model.sigma}"
    val = f"; val {cfg.data.val_ann} every {cfg.eval.every_steps or 'end'} steps" if cfg.data.val_ann else ""
    if cfg.data.train_shards:
        from sapiens_train.stream import resolve_shards

        n = sum(s.num_samples for s in resolve_shards(cfg.data.train_shards))
        source = f"shards {cfg.data.train_shards} ({n} images; one person drawn per image)"
    else:
        n = len(TopDownDataset.from_config(cfg, split="train"))
        source = f"{cfg.data.train_ann} ({n} people)"
    return f"{source}; {size}{val}\n" + epochs_line(n, gbs, cfg.engine.total_steps)


def make_step_fn(cfg: FinetuneConfig):
    loss_fn = build_loss(cfg.loss)

    def step_fn(model, batch):
        heatmaps = model(batch["img"])  # [B, K, h, w]
        return loss_fn(heatmaps, batch["heatmaps"], batch["target_weight"]), {}

    return step_fn


# ---- hooks ------------------------------------------------------------------------------------------


class EvalHook:
    """Engine hook: OKS AP on the val set every `every` steps (rank 0 on the whole model; the others wait).

    Each result is appended to run_dir/eval.jsonl; the best AP so far is saved into run_dir/best (with
    its metrics.json). Distillation evaluates its student with the same hook: `pick` takes the pose
    model out of the engine's module, `save` writes it, `autocast` runs the evaluation in the
    engine's precision.
    """

    def __init__(
        self,
        cfg: FinetuneConfig,
        every: int,
        resumed_step: int = 0,
        *,
        pick: Callable[[nn.Module], PoseModel] = lambda module: module,
        save: Callable[[PoseModel, Path, dict], None] | None = None,
        autocast: bool = False,
    ):
        self.cfg = cfg
        self.every = every
        self.pick, self.save, self.autocast = pick, save or save_model, autocast
        # A rerun continues eval.jsonl from the step it resumed at (the interrupted run's later lines go).
        truncate_jsonl(Path(cfg.engine.run_dir) / "eval.jsonl", resumed_step)
        # A resumed run keeps the best AP of its earlier part (best/metrics.json), not just its own.
        best_file = Path(cfg.engine.run_dir) / "best" / "metrics.json"
        self.best = json.loads(best_file.read_text())["AP"] if best_file.is_file() else -1.0
        self.history: list[dict] = []

    def __call__(self, engine, step: int, last_batch, metrics: dict) -> None:
        self.evaluate(engine, step)

    def evaluate(self, engine, step: int) -> dict:
        from finetune.evaluate import evaluate_model

        m: dict = {}
        with engine.full_weights() as module:  # every rank: under ZeRO-3 the partitions are gathered
            model = self.pick(module)
            was_training = model.training
            model.eval()
            if engine.is_main:
                with engine.autocast() if self.autocast else contextlib.nullcontext():
                    m = evaluate_model(
                        model,
                        self.cfg.data.val_ann,
                        self.cfg.data.val_images,
                        self.cfg.eval,
                        device=engine.device,
                        num_workers=self.cfg.data.num_workers,
                        progress=False,
                    )
                m = {"step": step, **m}
                self.history.append(m)
                run_dir = Path(self.cfg.engine.run_dir)
                with open(run_dir / "eval.jsonl", "a") as f:
                    f.write(json.dumps(m) + "\n")
                print(f"[eval] step {step}: AP {m['AP']:.4f}  AR {m['AR']:.4f}", flush=True)
                if m["AP"] > self.best:
                    self.best = m["AP"]
                    self.save(model, run_dir / "best", m)
            model.train(was_training)
        barrier()
        return m


def save_model(model: PoseModel, folder: Path, metrics: dict | None) -> None:
    """`save_pretrained` into `folder`, with the metrics that made it worth keeping (metrics.json)."""
    model.save_pretrained(folder)
    if metrics:
        tmp = folder / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=1))
        os.replace(tmp, folder / "metrics.json")


# ---- the run ----------------------------------------------------------------------------------------


def main(cfg: FinetuneConfig, *, resume: bool = True, dry_run: bool = False) -> dict:
    """`sapiens finetune`: validate, then print the plan (`dry_run`) or train; returns the summary
    (with the final val metrics under "metrics")."""
    checked = validate(cfg)  # user mistakes surface before DeepSpeed starts
    if dry_run:
        return print_plan(
            cfg,
            architecture=lambda: PoseModel(cfg.model),
            param_groups=param_groups(cfg),
            data_plan=describe_data(cfg),
        )
    _, summary = train(cfg, checked, resume=resume)
    return summary


def train(cfg: FinetuneConfig, checked: dict | None = None, *, resume: bool = True) -> tuple[Engine, dict]:
    """Build, train, evaluate and save; returns (engine, summary). A rerun with the same engine.run_dir
    resumes exactly from its latest checkpoint."""
    checked = checked if checked is not None else validate(cfg)
    engine = Engine(
        lambda: build_model(cfg),
        cfg.engine,
        cfg.optim,
        param_groups=param_groups(cfg),
        config_to_save=cfg,
        flops_per_sample=forward_flops(cfg.model.backbone, cfg.model.input_size),
        resume=resume,  # the checkpoint is verified before DeepSpeed starts
    )
    data = build_data(cfg, engine, checked.get("dataset"))
    hook = EvalHook(cfg, cfg.eval.every_steps, resumed_step=engine.step) if cfg.data.val_ann else None
    summary = engine.fit(data, make_step_fn(cfg), hooks=[hook] if hook is not None and hook.every else [])
    summary["metrics"] = finish(cfg, engine, summary, hook)
    return engine, summary


def finish(cfg: FinetuneConfig, engine: Engine, summary: dict, hook: EvalHook | None) -> dict:
    """A final evaluation (unless the hook just made it) and `save_pretrained` into run_dir/final."""
    if engine.is_main:
        print(f"[finetune] {summary['steps']} steps, final loss {summary['final_loss']}", flush=True)
    final: dict = {}
    if hook is not None:
        done = hook.history and hook.history[-1]["step"] == engine.step  # the hook just evaluated this step
        final = hook.history[-1] if done else hook.evaluate(engine, engine.step)
    with engine.full_weights() as model:  # every rank: under ZeRO-3 the partitions are gathered
        if engine.is_main:
            out = Path(cfg.engine.run_dir) / "final"
            save_model(model, out, final)
            print(f"[finetune] final model: {out}", flush=True)
    barrier()
    return final
