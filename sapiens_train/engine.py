"""The one training engine: DeepSpeed from our typed config, the step loop, checkpoints, logs.

    engine = Engine(build_model, cfg.engine, cfg.optim, param_groups=groups_fn,
                    flops_per_sample=fwd_flops, config_to_save=cfg, resume=True)   # no-op on a fresh run_dir
    loader = build_loader(rank=engine.rank, world_size=engine.world_size, ...)

    def step_fn(model, batch):                          # forward only; the engine does backward/step
        loss, pred, mask = model(batch["image"], mask_ratio=0.75)
        return loss, {"masked": mask.mean().item()}

    summary = engine.fit(loader, step_fn, hooks=[EveryN(500, save_reconstructions)])

One optimizer step = `grad_accum_steps` micro-batches per rank; `engine.step` counts optimizer steps.
Hooks run on every rank. Under ZeRO-3 each rank holds only a partition of `engine.module`'s
parameters: run forward passes through `engine.ds` on all ranks (it gathers them), or enter
`engine.full_weights()` on all ranks, inside which rank 0 alone may evaluate or save the whole module.
With precision bf16 the module's parameters are bf16 (the fp32 master weights are in the checkpoints:
`consolidate_fp32`): wrap forward passes outside `fit` in `engine.autocast()`.
A micro-batch whose loss is non-finite on any rank is dropped on every rank (no backward, no update,
counted in `nonfinite_skipped`) and another one is drawn; `max_nonfinite` in a row raise `UserError`
and leave `latest` on the newest checkpoint saved before the weights that gave them.

Resume (`resume=True`): the checkpoint (`latest`, or `engine.resume_from`) is verified against its
manifest before DeepSpeed starts. Saved on the same number of ranks and ZeRO stage, the run continues
exactly: model, optimizer, step, every rank's RNG states and data position. Saved on another number of
ranks (or ZeRO stage), DeepSpeed's universal checkpoint carries the model and optimizer over, the
data loader continues the epoch with the samples no rank had consumed (`load_elastic_state`), and the
global batch is kept by adjusting the gradient accumulation (or the change is stated in one line).
Nothing draws from a global random generator between the restored RNG states and the first step
(loaders own their generators; the MFU peak is measured with its own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from sapiens_lite.config import save_config
from sapiens_lite.errors import UserError
from sapiens_train import checkpoint as ckpt
from sapiens_train.config import EngineConfig, OptimConfig
from sapiens_train.dist import (
    all_reduce,
    barrier,
    broadcast_module,
    gather_objects,
    init_distributed,
    launcher_rank_world,
    on_rank0,
    rng_state,
    seed_everything,
    set_rng_state,
)
from sapiens_train.monitor import PeakMeter, RunLogger, mfu, peak_memory_gib, plot_log
from sapiens_train.optim import describe_param_groups
from sapiens_train.optim import param_groups as default_param_groups
from sapiens_train.schedule import describe_lr, lr_at, scaled_lr

# After sapiens_train.dist (above), which chooses DeepSpeed's accelerator before DeepSpeed's first import.
import deepspeed  # noqa: E402  # isort: skip

StepFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, float]]"]


class Hook(Protocol):
    """Called on every rank after optimizer steps that are multiples of `every` (before that step's checkpoint)."""

    every: int

    def __call__(self, engine: Engine, step: int, last_batch: Any, metrics: dict[str, float]) -> None: ...


@dataclass
class EveryN:
    """A plain function as a hook: `EveryN(500, fn)` calls `fn(engine, step, last_batch, metrics)`."""

    every: int
    fn: Callable[[Engine, int, Any, dict], None]

    def __call__(self, engine: Engine, step: int, last_batch: Any, metrics: dict[str, float]) -> None:
        self.fn(engine, step, last_batch, metrics)


def resolve_batch(
    cfg: EngineConfig, world_size: int, *, keep_global: int | None = None
) -> tuple[int, int, str | None]:
    """(global batch, gradient accumulation steps, a one-line note or None) for `world_size` ranks.

    The global batch is micro-batch x accumulation x world. Given both `grad_accum_steps` and
    `global_batch_size`, they must agree; given only the global batch, the accumulation is derived
    from it (an error only when it cannot divide); given neither, the accumulation is 1.
    keep_global: the global batch of a checkpoint saved on another number of ranks; when the config
    sets neither value, the accumulation is chosen to keep it, and the note says what happened.
    """
    per_step = cfg.micro_batch_size * world_size  # samples of one micro-batch on every rank
    factors = f"engine.micro_batch_size={cfg.micro_batch_size} x world_size={world_size}"
    if cfg.global_batch_size is not None and cfg.grad_accum_steps is not None:
        gbs = per_step * cfg.grad_accum_steps
        if gbs != cfg.global_batch_size:
            raise UserError(
                f"engine.global_batch_size={cfg.global_batch_size} but {factors} x "
                f"engine.grad_accum_steps={cfg.grad_accum_steps} = {gbs}; change one of them so the product "
                "matches, or leave engine.grad_accum_steps unset to derive it"
            )
        accum, note = cfg.grad_accum_steps, None
    elif cfg.global_batch_size is not None:
        if cfg.global_batch_size % per_step:
            raise UserError(
                f"engine.global_batch_size={cfg.global_batch_size} is not a multiple of {factors} = {per_step}; "
                "change engine.global_batch_size or engine.micro_batch_size"
            )
        accum = cfg.global_batch_size // per_step
        note = (
            (
                f"gradient accumulation {accum} derived from engine.global_batch_size={cfg.global_batch_size} "
                f"({factors})"
            )
            if accum > 1
            else None
        )
    elif cfg.grad_accum_steps is not None:
        accum, note = cfg.grad_accum_steps, None
    elif keep_global is not None and keep_global % per_step == 0:
        accum, note = keep_global // per_step, None
    else:
        accum, note = 1, None
    gbs = per_step * accum
    if keep_global is not None and gbs != keep_global:
        note = (
            f"the global batch changes from {keep_global} (checkpoint) to {gbs} = {factors} x accumulation "
            f"{accum}"
            + (
                ""
                if cfg.global_batch_size or cfg.grad_accum_steps
                else f" ({keep_global} is not a multiple of {per_step})"
            )
        )
    elif keep_global is not None and accum != 1 and cfg.grad_accum_steps is None:
        note = f"global batch {gbs} kept from the checkpoint: gradient accumulation {accum} on {world_size} ranks"
    return gbs, accum, note


def global_batch_size(cfg: EngineConfig, world_size: int) -> int:
    """micro-batch x accumulation x world (`resolve_batch`); UserError when the settings disagree."""
    return resolve_batch(cfg, world_size)[0]


def build_ds_config(
    cfg: EngineConfig, optim: OptimConfig, world_size: int, *, grad_accum_steps: int | None = None
) -> dict:
    """The DeepSpeed config, generated from our typed config (saved as run_dir/ds_config.json).

    No optimizer/scheduler sections: the engine passes its own AdamW and sets the lr every step.
    grad_accum_steps: the engine's resolved value (default: `resolve_batch` on the config alone).
    """
    accum = grad_accum_steps or resolve_batch(cfg, world_size)[1]
    ds = {
        "train_batch_size": cfg.micro_batch_size * accum * world_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": optim.grad_clip or 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        # bf16 weights/activations, but gradients summed over micro-batches and ranks in fp32.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        # DeepSpeed runs the module's forward with autocast switched off unless this section enables
        # it; with it, fp32 inputs meet the bf16 weights through autocast (norms and losses in fp32).
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """torch.compile the forward of every timm `Block` in `model`, in place; returns the blocks.

    Regional compilation: same-shaped blocks share one graph, compiled once however deep the model
    (an MAE compiles two: encoder and decoder block); `model`'s class, state-dict keys and module hooks
    stay as they are. Replacing `forward` rather than `__call__` keeps the block's own hooks outside the
    compiled code (the engine makes blocks ZeRO-3 leaves, so that their submodules carry no hooks
    either). The fusions (LayerNorm, GELU, bias and residual adds around the matmuls) are for GPUs; on a
    CPU the matmuls are the time and compiling changes nothing measurable.
    """
    from timm.models.vision_transformer import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return blocks


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@dataclass
class _ResumePlan:
    """What a resume loads, decided (and verified) before DeepSpeed starts."""

    tag: str
    load_tag: str  # the tag itself, or its universal form
    saved_world: int
    saved_zero: int
    saved_global_batch: int | None
    elastic: bool  # another number of ranks or ZeRO stage
    own: dict  # this rank's (or, for a new rank, rank 0's) engine state
    data_states: list  # elastic: every saved rank's data state


@contextlib.contextmanager
def _forward_hooks_detached(model: nn.Module) -> Iterator[None]:
    """Every forward hook of `model`'s modules taken off for the duration, and put back as they were.

    ZeRO-3 hooks each module: before its forward it gathers the module's partitions, after it frees them,
    and the module order of a step is recorded and checked across ranks for prefetching. With the weights
    already gathered and rank 0 running alone, each of these is a collective no other rank joins (a hang)
    or frees weights still to be read. torch keeps a module's forward hooks in these two dicts; swapping
    them out and back leaves DeepSpeed's state untouched. (`deepspeed.runtime.zero.
    unwrap_model_for_generation` removes and re-registers the per-module hooks but keeps the root's
    start-of-forward hook, whose trace check is a collective right after a trace was reset.)
    """
    saved = [(m, m._forward_pre_hooks, m._forward_hooks) for m in model.modules()]
    for m, _, _ in saved:
        m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
    try:
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class Engine:
    """DeepSpeed training of one model; see the module docstring for the trainer-side code.

    Attributes: rank, world_size, local_rank, is_main, device, step (optimizer steps done),
    global_batch_size, grad_accum_steps, base_lr, ds (the DeepSpeed engine; call it for forward passes
    under ZeRO-3), module (the unwrapped model), optimizer (the torch AdamW inside DeepSpeed), run_dir,
    ckpt_dir, resumed_from (the tag, or None).
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        cfg: EngineConfig,
        optim: OptimConfig,
        *,
        param_groups: Callable[[nn.Module], list[dict]] | None = None,
        flops_per_sample: float | None = None,
        config_to_save: Any = None,
        resume: bool = False,
    ):
        """Set up the process group, seeds, optimizer and DeepSpeed, and write the run's configs.

        model: the model, or a zero-argument function building it (then built right after seeding,
            identically on every rank). Rank 0's weights are broadcast to all ranks either way.
        param_groups: a function of the built model returning its AdamW groups (`params`,
            `weight_decay`, optional `lr_scale`, `name`); default: decay iff ndim >= 2, `optim.layer_decay` over `blocks.<i>` (`optim.param_groups`).
        flops_per_sample: forward FLOPs of one sample, for MFU (training counts 3x).
        config_to_save: the trainer's resolved config dataclass, written to run_dir/config.yaml.
        resume: continue from run_dir's `latest` checkpoint (or `engine.resume_from`) if there is one;
            it is verified before DeepSpeed starts, and may come from another number of ranks.
        """
        self.cfg, self.optim_cfg = cfg, optim
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / ckpt.CHECKPOINT_DIR
        if not os.environ.get("SAPIENS_DS_VERBOSE"):
            deepspeed.utils.logger.setLevel(logging.WARNING)

        # Every user mistake and damaged file before any real work: the process group alone can take
        # a minute (DeepSpeed builds its CPU communication kernel on first use), DeepSpeed much more.
        self.rank, self.world_size = launcher_rank_world()
        self.is_main = self.rank == 0
        plan = self._plan_resume(cfg.resume_from) if resume else None
        keep = plan.saved_global_batch if plan is not None and plan.elastic else None
        self.global_batch_size, self.grad_accum_steps, batch_note = resolve_batch(
            cfg, self.world_size, keep_global=keep
        )
        if self.is_main:
            self._prepare_run_dir()

        rank, world, self.local_rank, self.device = init_distributed(cfg.dist_backend)
        tag = plan.tag if plan is not None else None
        # Each rank read `latest` on its own above; rank 0's reading decides, since the clients of a shared
        # filesystem may each serve a stale cached copy for a while (see dist.on_rank0).
        tag0 = on_rank0(lambda: tag) if resume else None
        if (rank, world) != (self.rank, self.world_size) or tag0 != tag:  # or a launcher we do not know
            self.rank, self.world_size, self.is_main = rank, world, rank == 0
            # With tag0 given, _plan_resume makes no collective call: ranks may take this branch alone.
            plan = self._plan_resume(tag0) if tag0 else None
            keep = plan.saved_global_batch if plan is not None and plan.elastic else None
            self.global_batch_size, self.grad_accum_steps, batch_note = resolve_batch(
                cfg, self.world_size, keep_global=keep
            )
        if plan is not None and plan.load_tag != plan.tag:
            if self.is_main:
                ckpt.to_universal(self.ckpt_dir, plan.tag)  # once; later resumes reuse it
            barrier()

        seed_everything(cfg.seed, rank=0)  # identical model init on every rank
        if not isinstance(model, nn.Module):
            model = model()
        seed_everything(cfg.seed, rank=self.rank)  # then per-rank streams (masks, augmentation)
        if cfg.activation_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise UserError(
                    f"engine.activation_checkpointing=true but {type(model).__name__} has no set_grad_checkpointing()"
                )
            model.set_grad_checkpointing(True)
        if cfg.compile:
            blocks = compile_blocks(model)
            if not blocks:
                raise UserError(
                    f"engine.compile=true but {type(model).__name__} has no transformer blocks to compile"
                )
            if cfg.zero_stage == 3:
                # ZeRO-3 hooks every submodule to gather its parameters; inside a compiled block each hook
                # is a graph break (one block became ~10 graphs on CPU). As leaves, blocks gather all their
                # parameters in one hook, outside the compiled forward.
                for block in blocks:
                    deepspeed.utils.set_z3_leaf_module(block, True)

        self.base_lr = scaled_lr(optim, self.global_batch_size)
        if param_groups is None:
            groups = default_param_groups(model, optim.weight_decay, layer_decay=optim.layer_decay)
        else:
            groups = param_groups(model)
        for i, g in enumerate(groups):
            g.setdefault("name", f"group_{i}")
            g.setdefault("lr_scale", 1.0)
            g.setdefault("weight_decay", optim.weight_decay)
        # The groups' own settings, put back after a checkpoint is loaded (a universal checkpoint of
        # ZeRO-3 gives every group the first group's settings).
        self._group_settings = [
            {k: v for k, v in g.items() if k in ("name", "lr_scale", "weight_decay")} for g in groups
        ]
        model.to(self.device)
        broadcast_module(model)
        # Described before DeepSpeed initialises: ZeRO-3 then leaves every rank a partition only.
        n_train = sum(p.numel() for g in groups for p in g["params"])
        groups_text = describe_param_groups(groups)
        adamw = torch.optim.AdamW(groups, lr=self.base_lr, betas=tuple(optim.betas), eps=optim.eps)
        self.ds_config = build_ds_config(cfg, optim, self.world_size, grad_accum_steps=self.grad_accum_steps)
        if plan is not None and plan.load_tag != plan.tag:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=adamw, config=self.ds_config, dist_init_required=False
        )
        self.module = self.ds.module

        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self.flops_per_sample = flops_per_sample
        self.resumed_from: str | None = None
        self._pending_rank_state: dict | None = None
        self._pending_elastic: list | None = None
        self._data = None
        self._data_iter = None
        self._last_saved_step: int | None = None
        self._peak: PeakMeter | None = None
        self._logger: RunLogger | None = None

        if self.is_main:
            if config_to_save is not None:
                save_config(config_to_save, self.run_dir / "config.yaml")
            _write_json(self.run_dir / "ds_config.json", self.ds_config)
            lr_msg = describe_lr(optim, self.global_batch_size)
            print(
                f"[engine] world {self.world_size} on {self.device} ({self.ds_config['zero_optimization']}, "
                f"{cfg.precision}); global batch {self.global_batch_size} = micro {cfg.micro_batch_size} x "
                f"accum {self.grad_accum_steps} x world {self.world_size}\n[engine] {lr_msg}\n"
                + (f"[engine] {batch_note}\n" if batch_note else "")
                + f"[engine] {n_train:,} trainable parameters in {len(groups)} AdamW groups:\n{groups_text}",
                flush=True,
            )
        if plan is not None:
            self._load(plan)

    def _prepare_run_dir(self) -> None:
        """Create run_dir (rank 0), or say in one line why it cannot be."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"engine.run_dir: {self.run_dir} exists and is not a folder")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test.{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise UserError(f"engine.run_dir: cannot write to {self.run_dir} ({e.strerror or e})") from None

    # ---- the whole model ----

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[nn.Module]:
        """`module` with every parameter whole for the duration: for work rank 0 does alone (evaluation,
        save_pretrained) on a model that ZeRO-3 keeps partitioned.

            with engine.full_weights() as model:    # on every rank
                if engine.is_main:
                    evaluate(model)
            barrier()                               # the others wait here

        Every rank must enter it: under ZeRO-3 it gathers the partitions (a collective), and inside it the
        module is a plain torch module (its ZeRO-3 hooks detached), so a forward pass on one rank alone
        needs no other rank. Read only: the partitions are kept, and changes to the weights are dropped
        on exit. The parameters are as training holds them (fp32, or bf16 with precision bf16). With ZeRO
        stages 0-2 every rank holds the whole module already, and this does nothing.
        """
        if self.cfg.zero_stage != 3:
            yield self.module
            return
        # modifier_rank=None: nothing is broadcast on exit, each rank keeps its own partition.
        gathered = deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        with gathered, _forward_hooks_detached(self.module):
            yield self.module

    # ---- learning rate ----

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.optim_cfg, self.base_lr, self.cfg.total_steps)

    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    # ---- data ----

    def _start_data(self, data: Iterable) -> None:
        """Position `data` where this run stands: a fresh epoch 0, or the resumed checkpoint's place."""
        self._data, self._data_iter = data, None
        if self._pending_elastic is not None:
            states, self._pending_elastic = self._pending_elastic, None
            if any(s is None for s in states) or not hasattr(data, "load_elastic_state"):
                raise UserError(
                    f"the training data ({type(data).__name__}) cannot continue on another number of ranks "
                    "(it has no resumable position); resume with the number of ranks the checkpoint was saved with"
                )
            data.load_elastic_state(states)
            now = data.state_dict()  # the loader may have moved on to the next epoch (nothing was left)
            self.epoch = int(now.get("epoch", self.epoch))
            self.batches_in_epoch = int(now.get("batches_in_epoch", now.get("batches", 0)))
            return
        state = self._pending_rank_state
        if state is None:
            if hasattr(data, "set_epoch"):
                data.set_epoch(self.epoch)
            return
        if state.get("data") is not None and hasattr(data, "load_state_dict"):
            data.load_state_dict(state["data"])
            return
        # No resumable state: replay this epoch up to where the checkpoint was (deterministic sources).
        if hasattr(data, "set_epoch"):
            data.set_epoch(self.epoch)
        self._data_iter = iter(data)
        for _ in range(self.batches_in_epoch):
            try:
                next(self._data_iter)
            except StopIteration:
                break

    def _next_batch(self) -> Any:
        for _ in range(2):
            if self._data_iter is None:
                self._data_iter = iter(self._data)
            try:
                batch = next(self._data_iter)
            except StopIteration:
                if self.batches_in_epoch == 0:
                    break
                self.epoch += 1
                self.batches_in_epoch = 0
                if hasattr(self._data, "set_epoch"):
                    self._data.set_epoch(self.epoch)
                self._data_iter = None
                continue
            self.batches_in_epoch += 1
            return batch
        raise UserError(f"the training data yielded no batches in epoch {self.epoch} on rank {self.rank}")

    def _data_state(self) -> dict:
        data = self._data
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "data": data.state_dict() if data is not None and hasattr(data, "state_dict") else None,
        }

    # ---- one optimizer step ----

    def autocast(self):
        """The precision context of training steps; use it for forward passes outside `fit` (evaluation hooks):
        with precision bf16 the module's parameters are bf16, and autocast lets fp32 inputs meet them."""
        if self.cfg.precision == "bf16":
            # Parameters are bf16 (DeepSpeed); autocast casts fp32 inputs and keeps losses/norms in fp32.
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, step_fn: StepFn) -> tuple[dict[str, float], Any]:
        """grad_accum_steps finite micro-batches -> one DeepSpeed optimizer step; returns (metrics, last batch)."""
        sums: dict[str, float] = {}
        done = 0
        batch = None
        while done < self.grad_accum_steps:
            batch = _to_device(self._next_batch(), self.device)
            with self.autocast():
                loss, metrics = step_fn(self.ds, batch)
            bad = torch.tensor(
                [0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=self.device
            )
            if all_reduce(bad, "max").item() > 0:
                del loss  # dropped on every rank so that backward's collectives stay matched
                self._on_nonfinite()
                continue
            self.consecutive_nonfinite = 0
            self.ds.backward(loss)
            self.ds.step()  # DeepSpeed updates only at the accumulation boundary
            done += 1
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / self.grad_accum_steps for k, v in sums.items()}, batch

    def _on_nonfinite(self) -> None:
        self.nonfinite_skipped += 1
        self.consecutive_nonfinite += 1
        n = self.consecutive_nonfinite
        if self._logger is not None:
            self._logger.info(
                f"[engine] step {self.step + 1}: non-finite loss, micro-batch dropped ({n} in a row)"
            )
        if n >= self.cfg.max_nonfinite:
            kept = self._drop_checkpoints_from(self.step)
            raise UserError(
                f"{n} consecutive non-finite losses at step {self.step + 1} (engine.max_nonfinite="
                f"{self.cfg.max_nonfinite}); {kept}. Lower the lr (optim.blr / optim.lr), set "
                "optim.grad_clip, or check the data"
            )

    def _drop_checkpoints_from(self, step: int) -> str:
        """After non-finite losses with the weights of `step`: the checkpoints of those weights (and any
        later one) are deleted and `latest` goes back to the newest earlier one. Returns what was kept."""
        barrier()
        kept = None
        if self.is_main:
            tags = ckpt.list_tags(self.ckpt_dir)
            bad = [t for t in tags if ckpt.step_of_tag(t) >= step]
            good = [t for t in tags if ckpt.step_of_tag(t) < step]
            kept = good[-1] if good else None
            if bad:
                if kept is not None:
                    ckpt.write_latest(self.ckpt_dir, kept)
                else:
                    (self.ckpt_dir / ckpt.LATEST).unlink(missing_ok=True)
                for t in bad:
                    shutil.rmtree(self.ckpt_dir / t, ignore_errors=True)
                    shutil.rmtree(ckpt.universal_dir(self.ckpt_dir, t), ignore_errors=True)
        barrier()
        if kept is not None:
            return f"checkpoints/latest is {kept}, saved before the weights went bad"
        return "no checkpoint from before the weights went bad: the next run starts afresh"

    # ---- the loop ----

    def fit(self, data: Iterable, step_fn: StepFn, *, hooks: Sequence[Hook] = ()) -> dict:
        """Train until cfg.total_steps optimizer steps; returns a summary dict.

        data: micro-batches for this rank (optionally with set_epoch/state_dict/load_state_dict, and
            load_elastic_state to continue on another number of ranks).
        step_fn(model, batch) -> (loss, metrics): the forward pass only; `model` is the DeepSpeed
            engine (call it like the module), `batch` is already on `engine.device`.
        hooks: called as hook(engine, step, last_batch, metrics) when step % hook.every == 0.
        """
        cfg = self.cfg
        self._start_data(data)
        if self._pending_rank_state is not None:
            set_rng_state(self._pending_rank_state["rng"])  # last, so nothing above shifts the streams
            self._pending_rank_state = None
        self._logger = RunLogger(
            self.run_dir,
            enabled=self.is_main,
            total_steps=cfg.total_steps,
            initial_step=self.step,
            tensorboard=cfg.tensorboard,
            progress=cfg.progress,
        )
        if self.flops_per_sample and self._peak is None and self.is_main:
            # Its own random generator: rank 0 measuring must not shift rank 0's training streams.
            self._peak = PeakMeter(self.device, cfg.precision, cfg.peak_tflops)
            self._logger.info(f"[engine] MFU against {self._peak.describe()}")
        self.ds.train()
        start_step, t_start = self.step, time.perf_counter()
        t_log, steps_since_log = t_start, 0
        window: dict[str, float] = {}
        logged: dict[str, Any] = {}
        try:
            while self.step < cfg.total_steps:
                lr = self.lr_at(self.step)
                self._set_lr(lr)
                metrics, batch = self._train_step(step_fn)
                self.step += 1
                steps_since_log += 1
                for k, v in metrics.items():
                    window[k] = window.get(k, 0.0) + v
                if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                    now = time.perf_counter()
                    logged = self._log(window, steps_since_log, now - t_log, lr)
                    t_log, steps_since_log, window = time.perf_counter(), 0, {}
                for hook in hooks:
                    if self.step % hook.every == 0:
                        hook(self, self.step, batch, metrics)
                        self.ds.train()  # a hook may have switched to eval mode
                if cfg.checkpoint_every and (
                    self.step % cfg.checkpoint_every == 0 or self.step == cfg.total_steps
                ):
                    self.save_checkpoint()
                self._logger.advance()
        finally:
            self._logger.close()
            if self._last_saved_step != self.step:  # a checkpoint at this step has drawn it already
                self._plot_curves()  # also after an abort: the curve up to it is what one wants to see
        seconds = time.perf_counter() - t_start
        steps = self.step - start_step
        return {
            "steps": self.step,
            "steps_this_run": steps,
            "final_loss": logged.get("loss"),
            "img_per_s": steps * self.global_batch_size / seconds if seconds > 0 else None,
            "seconds": seconds,
            "nonfinite_skipped": self.nonfinite_skipped,
            "resumed_from": self.resumed_from,
        }

    def _log(self, window: dict[str, float], n_steps: int, seconds: float, lr: float) -> dict:
        """Average the window's metrics over steps and ranks, add throughput/MFU, write them (rank 0)."""
        keys = sorted(window)  # the same keys on every rank
        t = torch.tensor([window[k] / n_steps for k in keys], dtype=torch.float64, device=self.device)
        all_reduce(t, "mean")
        values: dict[str, Any] = dict(zip(keys, t.tolist()))
        img_per_s = n_steps * self.global_batch_size / seconds if seconds > 0 else 0.0
        values.update(
            lr=lr,
            img_per_s=img_per_s,
            mem_gib=round(peak_memory_gib(self.device), 3),
            epoch=self.epoch,
            nonfinite_skipped=self.nonfinite_skipped,
        )
        stats = getattr(self._data, "stats", None)  # the webdataset StreamLoader counts bad samples
        if isinstance(stats, dict) and "skipped" in stats:
            values["data_skipped"] = int(stats["skipped"])
        if self._peak is not None:
            # On a CPU the peak is measured again in every window, under the same load as the steps.
            values["mfu"] = mfu(self.flops_per_sample, img_per_s, self._peak.current(), self.world_size)
        self._logger.log(self.step, values)
        return values

    def _plot_curves(self) -> None:
        """run_dir/loss.png from log.jsonl (rank 0); a missing matplotlib only costs the picture."""
        log = self.run_dir / "log.jsonl"
        if not self.is_main or not log.exists() or log.stat().st_size == 0:
            return
        try:
            plot_log(log, self.run_dir / "loss.png")
        except ImportError:
            warnings.warn("matplotlib is not installed; no loss.png (pip install matplotlib)", stacklevel=2)

    # ---- checkpoints ----

    def save_checkpoint(self, tag: str | None = None) -> str:
        """Save on every rank (DeepSpeed needs all), checksum every file into the tag's manifest, then mark
        it `latest` and prune old ones. Returns the tag."""
        tag = tag or ckpt.tag_for_step(self.step)
        tag_dir = self.ckpt_dir / tag
        if self.is_main and tag_dir.exists():
            shutil.rmtree(tag_dir)  # saved again (after a rollback): no stale rank files may remain
            shutil.rmtree(ckpt.universal_dir(self.ckpt_dir, tag), ignore_errors=True)
        barrier()
        client_state = {"step": self.step, "epoch": self.epoch, "nonfinite_skipped": self.nonfinite_skipped}
        self.ds.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        rank_path = ckpt.rank_state_path(self.ckpt_dir, tag, self.rank)
        rank_path.parent.mkdir(parents=True, exist_ok=True)
        ckpt.save_rank_state(
            rank_path,
            {
                "step": self.step,
                "world_size": self.world_size,
                "nonfinite_skipped": self.nonfinite_skipped,
                "rng": rng_state(),
                **self._data_state(),
            },
        )
        barrier()  # every rank's files are complete (DeepSpeed's too) before they are hashed
        own = ckpt.hash_own_files(tag_dir, self.rank)  # while they are in this node's page cache
        entries = gather_objects(own)
        if self.is_main:
            files = {name: e for part in entries for name, e in part.items()}
            ckpt.write_manifest(
                tag_dir,
                files,
                {
                    "step": self.step,
                    "world_size": self.world_size,
                    "zero_stage": self.cfg.zero_stage,
                    "precision": self.cfg.precision,
                    "global_batch_size": self.global_batch_size,
                    "micro_batch_size": self.cfg.micro_batch_size,
                    "grad_accum_steps": self.grad_accum_steps,
                },
            )
            ckpt.write_latest(self.ckpt_dir, tag)
            ckpt.prune(self.ckpt_dir, self.cfg.keep_last, keep=tag)
            self._plot_curves()  # a long run's curve stays current between checkpoints
        barrier()
        self._last_saved_step = self.step
        return tag

    def _plan_resume(self, tag: str | None) -> _ResumePlan | None:
        """Find, verify and read the checkpoint to resume from, before DeepSpeed starts; None on a fresh run.

        Raises UserError naming a missing or damaged file and the newest intact checkpoint.
        """
        # Rank 0 reads `latest` and tells the others: every rank resumes from the same tag.
        tag = tag or on_rank0(lambda: ckpt.read_latest(self.ckpt_dir))
        if tag is None:
            return None
        manifest = ckpt.verify_checkpoint(self.ckpt_dir, tag, self.rank, self.world_size)
        rank0 = ckpt.load_rank_state(self._rank_file(tag, 0))
        info = manifest or {}
        saved_world = int(info.get("world_size", rank0.get("world_size", self.world_size)))
        saved_zero = info.get("zero_stage", self.cfg.zero_stage)
        elastic = saved_world != self.world_size or saved_zero != self.cfg.zero_stage
        if self.rank == 0:
            own = rank0
        elif self.rank < saved_world:
            own = ckpt.load_rank_state(self._rank_file(tag, self.rank))
        else:  # a rank the saved run did not have: rank 0's counters, random streams of its own
            own = {k: v for k, v in rank0.items() if k != "rng"}
        plan = _ResumePlan(
            tag=tag,
            load_tag=tag,
            saved_world=saved_world,
            saved_zero=saved_zero,
            saved_global_batch=info.get("global_batch_size"),
            elastic=elastic,
            own=own,
            data_states=[],
        )
        if not elastic:
            return plan
        where = self.ckpt_dir / tag
        if manifest is None:
            raise UserError(
                f"{where} was saved by {saved_world} ranks (this run has {self.world_size}) before checkpoints "
                "had manifests; resume it with the number of ranks it was saved with"
            )
        if 0 in (saved_zero, self.cfg.zero_stage) and saved_zero != self.cfg.zero_stage:
            raise UserError(
                f"{where} was saved with engine.zero_stage={saved_zero}; continuing with zero_stage="
                f"{self.cfg.zero_stage} is only possible between stages 1-3; set engine.zero_stage={saved_zero}"
            )
        plan.data_states = [
            ckpt.load_rank_state(self._rank_file(tag, r)).get("data") for r in range(saved_world)
        ]
        if saved_zero >= 1:  # ZeRO-0 keeps the whole optimizer in the model states: any world loads it
            plan.load_tag = ckpt.universal_dir(self.ckpt_dir, tag).name
        return plan

    def _rank_file(self, tag: str, rank: int) -> Path:
        path = ckpt.rank_state_path(self.ckpt_dir, tag, rank)
        if not path.is_file():
            raise UserError(
                f"{path}: missing; the checkpoint is incomplete{ckpt.fallback_hint(self.ckpt_dir, tag)}"
            )
        return path

    def _load(self, plan: _ResumePlan) -> None:
        """Load a verified plan into DeepSpeed and the engine's counters (RNG and data at `fit`)."""
        where = self.ckpt_dir / plan.tag
        try:
            load_path, _ = self.ds.load_checkpoint(str(self.ckpt_dir), tag=plan.load_tag)
        except Exception as e:
            raise UserError(f"{where}: cannot load checkpoint ({type(e).__name__}: {e})") from None
        if load_path is None:
            raise UserError(f"{where}: DeepSpeed could not load this checkpoint")
        for g, settings in zip(self.optimizer.param_groups, self._group_settings):
            g.update(settings)
        state = plan.own
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        if plan.elastic:
            self._pending_elastic = plan.data_states
            if "rng" in state:
                self._pending_rank_state = {"rng": state["rng"]}
            else:  # a new rank: a stream of its own, fixed by the seed, the rank and the step
                seed_everything(self.cfg.seed + 1_000_003 * self.step, rank=self.rank)
        else:
            self._pending_rank_state = state
        self._last_saved_step = self.step
        self.resumed_from = plan.tag
        if self.is_main:
            how = ""
            if plan.elastic:
                how = f" (saved by {plan.saved_world} ranks, continued on {self.world_size}"
                how += " through DeepSpeed's universal checkpoint)" if plan.load_tag != plan.tag else ")"
            print(f"[engine] resumed from {where} at step {self.step}{how}", flush=True)

    def resume(self, tag: str | None = None) -> bool:
        """Load the `latest` (or given, or `engine.resume_from`) checkpoint of run_dir; False if there is none.

        Prefer `Engine(..., resume=True)`, which verifies the checkpoint before DeepSpeed starts and can
        continue on another number of ranks; this later call handles the same number of ranks only.
        """
        plan = self._plan_resume(tag or self.cfg.resume_from)
        if plan is None:
            return False
        if plan.elastic:
            raise UserError(
                f"{self.ckpt_dir / plan.tag} was saved by {plan.saved_world} ranks (this run has "
                f"{self.world_size}); continuing needs Engine(..., resume=True)"
            )
        self._load(plan)
        return True
