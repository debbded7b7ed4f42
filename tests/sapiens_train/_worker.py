"""Multi-process scenarios for test_multiprocess.py, run under `torchrun --nproc_per_node 2`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 _worker.py SCENARIO OUT_DIR

Scenarios (one launcher start runs several configurations in turn, to keep the test fast):
  matrix   2 steps for ZeRO 1/2/3 x fp32/bf16, a rank-local NaN, ZeRO-3 consolidation and an
           in-process ZeRO-3 crash + resume
  kill     a 12-step ZeRO-2 run, SIGKILLed by rank 0 at step 8 (checkpoint at 6)
  resume   resumes the killed run to step 12, then runs the same 12 steps uninterrupted
  compile  a tiny ViT under ZeRO 2 and 3, eager and with engine.compile (regional torch.compile)
Each rank writes OUT_DIR/<scenario>_rank<r>.json; the test compares them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import TensorDataset

from sapiens_train.checkpoint import consolidate_fp32
from sapiens_train.config import EngineConfig, OptimConfig
from sapiens_train.engine import Engine, EveryN
from sapiens_train.loader import ResumableLoader
from sapiens_train.monitor import read_log

IN_DIM = 8


class TinyNet(nn.Module):
    """A few layers with dropout (RNG in the forward pass) and a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN_DIM, 32)
        self.norm = nn.LayerNorm(32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 1)
        self.frozen_scale = nn.Parameter(torch.linspace(0.5, 1.5, 32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.norm(self.fc1(x)).relu()) * self.frozen_scale  # [B, 32]
        return self.fc2(h)  # [B, 1]


def make_dataset(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, IN_DIM, generator=g)
    y = (x[:, :3].sum(1, keepdim=True) - x[:, 3:5].prod(1, keepdim=True)).float()
    return TensorDataset(x, y)


def step_fn(model, batch):
    x, y = batch
    x = x + 0.01 * torch.randn_like(x)  # torch RNG outside the model as well
    pred = model(x).float()
    loss = ((pred - y) ** 2).mean()
    return loss, {"pred_mean": pred.mean().item()}


def cfg_for(run_dir: Path, zero: int, precision: str = "fp32", total: int = 12, **kw) -> EngineConfig:
    return EngineConfig(
        run_dir=str(run_dir),
        seed=7,
        total_steps=total,
        micro_batch_size=4,
        grad_accum_steps=kw.pop("accum", 1),
        zero_stage=zero,
        precision=precision,
        checkpoint_every=kw.pop("checkpoint_every", 6),
        keep_last=kw.pop("keep_last", 2),
        log_every=1,
        progress=False,
        tensorboard=False,
        **kw,
    )


OPTIM = OptimConfig(lr=5e-3, warmup_steps=3, betas=(0.9, 0.95), weight_decay=0.05, grad_clip=1.0)


def loader(engine: Engine, n: int = 40) -> ResumableLoader:
    return ResumableLoader(
        make_dataset(n), engine.cfg.micro_batch_size, rank=engine.rank, world_size=engine.world_size, seed=3
    )


def full_params(engine: Engine) -> dict[str, torch.Tensor]:
    """This rank's view of every parameter, gathered under ZeRO-3 (a collective: call on all ranks)."""
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=engine.cfg.zero_stage == 3):
        return {n: p.detach().float().clone().cpu() for n, p in params}


def same_on_all_ranks(params: dict[str, torch.Tensor]) -> bool:
    flat = torch.cat([p.flatten() for p in params.values()])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(out[0], o) for o in out)


def log_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir / "log.jsonl")}


def reference_run(out: Path, run_name: str, hooks=()) -> dict:
    engine = Engine(TinyNet, cfg_for(out / run_name, zero=2), OPTIM)
    resumed = engine.resume()
    summary = engine.fit(loader(engine), step_fn, hooks=hooks)
    return {
        "resumed": resumed,
        "summary": summary,
        "losses": log_losses(out / run_name) if engine.is_main else {},
    }


def scenario_matrix(out: Path) -> dict:
    res: dict = {}
    # ZeRO 1/2/3 x fp32/bf16: a few steps, finite losses, identical updated parameters on every rank.
    for zero in (1, 2, 3):
        for precision in ("fp32", "bf16"):
            name = f"z{zero}_{precision}"
            engine = Engine(
                TinyNet, cfg_for(out / name, zero, precision, total=2, checkpoint_every=100), OPTIM
            )
            before = full_params(engine)
            summary = engine.fit(loader(engine), step_fn)
            after = full_params(engine)
            changed = [n for n in before if not torch.equal(before[n], after[n])]
            res[name] = {
                "final_loss": summary["final_loss"],
                "steps": summary["steps"],
                "same_on_ranks": same_on_all_ranks(after),
                "changed": sorted(changed),
            }

    # A NaN on rank 1 only: every rank drops that micro-batch, parameters stay identical.
    def nan_on_rank1(model, batch):
        loss, m = step_fn(model, batch)
        if dist.get_rank() == 1 and nan_on_rank1.calls == 2:
            loss = loss * float("nan")
        nan_on_rank1.calls += 1
        return loss, m

    nan_on_rank1.calls = 0
    engine = Engine(TinyNet, cfg_for(out / "nan", 1, total=4, checkpoint_every=100), OPTIM)
    summary = engine.fit(loader(engine), nan_on_rank1)
    res["nan"] = {
        "skipped": summary["nonfinite_skipped"],
        "steps": summary["steps"],
        "same_on_ranks": same_on_all_ranks(full_params(engine)),
        "batches": engine.batches_in_epoch + engine.epoch * 5,
    }

    # ZeRO-3 checkpoint -> one fp32 state dict equal to the live (gathered) parameters.
    engine = Engine(TinyNet, cfg_for(out / "z3_export", 3, total=3), OPTIM)
    engine.fit(loader(engine), step_fn)
    live = full_params(engine)
    dist.barrier()
    if engine.is_main:
        sd = consolidate_fp32(out / "z3_export")
        res["consolidate"] = {
            "keys_match": sorted(sd) == sorted(live),
            "max_diff": max((sd[k] - live[k]).abs().max().item() for k in live),
            "all_fp32": all(v.dtype == torch.float32 for v in sd.values()),
        }

    # In-process resume under ZeRO-3: crash (an exception) at step 5, new engine resumes from step 4.
    ref = Engine(TinyNet, cfg_for(out / "z3_ref", 3, total=8, checkpoint_every=4), OPTIM)
    ref.fit(loader(ref), step_fn)

    class Crash(Exception):
        pass

    def crash(engine, step, batch, metrics):
        raise Crash()

    eng = Engine(TinyNet, cfg_for(out / "z3_crash", 3, total=8, checkpoint_every=4), OPTIM)
    try:
        eng.fit(loader(eng), step_fn, hooks=[EveryN(5, crash)])
    except Crash:
        pass
    eng = Engine(TinyNet, cfg_for(out / "z3_crash", 3, total=8, checkpoint_every=4), OPTIM)
    res["z3_resume"] = {"resumed": eng.resume(), "step": eng.step}
    eng.fit(loader(eng), step_fn)
    if eng.is_main:
        res["z3_resume"]["ref"] = log_losses(out / "z3_ref")
        res["z3_resume"]["got"] = log_losses(out / "z3_crash")
    return res


class TinyViT(nn.Module):
    """Two timm blocks (vit_test) on a 32x32 image and a linear read-out: what `engine.compile` compiles."""

    def __init__(self):
        super().__init__()
        from sapiens_lite.models.vit import build_vit

        self.backbone = build_vit("vit_test", img_size=(32, 32), drop_path_rate=0.0)
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x).mean((2, 3)))  # [B, 1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def vit_step_fn(model, batch):
    x, y = batch
    img = x.repeat_interleave(3 * 128, dim=1).reshape(-1, 3, 32, 32)  # [B, 3, 32, 32] from [B, 8]
    loss = ((model(img).float() - y) ** 2).mean()
    return loss, {}


def scenario_compile(out: Path) -> dict:
    from torch._dynamo.utils import counters

    res: dict = {}
    for zero in (2, 3):
        for compiled in (False, True):
            name = f"z{zero}_{'compiled' if compiled else 'eager'}"
            counters.clear()
            engine = Engine(
                TinyViT,
                cfg_for(
                    out / name,
                    zero,
                    total=3,
                    checkpoint_every=100,
                    compile=compiled,
                    activation_checkpointing=True,
                ),  # fmt: skip
                OPTIM,
            )
            summary = engine.fit(loader(engine), vit_step_fn)
            res[name] = {
                "steps": summary["steps"],
                "losses": log_losses(out / name) if engine.is_main else {},
                "keys": sorted(engine.module.state_dict()),
                "graphs": counters["stats"]["unique_graphs"],
                "graph_breaks": sum(counters["graph_break"].values()),
            }
    return res


def scenario_kill(out: Path) -> dict:
    def kill(engine, step, batch, metrics):
        if engine.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    reference_run(out, "zero2_killed", hooks=[EveryN(8, kill)])
    raise AssertionError("rank 0 should have been killed at step 8")


def scenario_resume(out: Path) -> dict:
    # The resumed run first, then the uninterrupted reference in the same process.
    return {"resumed": reference_run(out, "zero2_killed"), "reference": reference_run(out, "zero2_ref")}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    scenarios = {
        "matrix": scenario_matrix,
        "kill": scenario_kill,
        "resume": scenario_resume,
        "compile": scenario_compile,
    }
    result = scenarios[scenario](out)
    rank = dist.get_rank()
    tmp = out / f"{scenario}_rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, out / f"{scenario}_rank{rank}.json")


if __name__ == "__main__":
    main()
