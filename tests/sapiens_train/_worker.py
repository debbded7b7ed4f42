"""Multi-process scenarios for test_multiprocess.py, run under `torchrun --nproc_per_node 2`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 _worker.py SCENARIO OUT_DIR

Scenarios (one launcher start runs several configurations in turn, to keep the test fast):
  matrix   2 steps for ZeRO 1/2/3 x fp32/bf16, a rank-local NaN, ZeRO-3 consolidation and an
           in-process ZeRO-3 crash + resume
  kill     a 12-step ZeRO-2 run, SIGKILLed by rank 0 at step 8 (checkpoint at 6)
  resume   resumes the killed run to step 12, then runs the same 12 steps uninterrupted
  compile  a tiny ViT under ZeRO 2 and 3, eager and with engine.compile (regional torch.compile)
  mae_kill NAME STEP    a tiny MAE (random masks from the global torch RNG) on webdataset shards with a
                        loader worker and the default MFU peak measurement, SIGKILLed by rank 0 at STEP
  mae_resume NAME...    resumes each killed MAE run, then runs it uninterrupted for reference
  elastic_save NAME ZERO        trains 5 steps (mid-epoch), records the checkpoint's full fp32 weights and
                                Adam moments and the sample keys each rank trained on
  elastic_resume NAME ZERO      resumes NAME on this world size, compares weights and moments, finishes
                                the epoch, records the keys
The elastic scenarios also run as one plain process (a world of one, no launcher).
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
        micro_batch_size=kw.pop("micro_batch_size", 4),
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


# ---- a tiny MAE on webdataset shards: exact resume on the default path ----

MAE_CONFIGS = {"z1_fp32": (1, "fp32"), "z3_bf16": (3, "bf16")}
MAE_STEPS = 9  # 2 ranks x micro 2 = 4 samples a step; 23 samples = 5 steps an epoch (3 dropped)


def make_image_shards(folder: Path, sizes=(7, 5, 11)) -> Path:
    """Shards of small noise JPEGs (KEY.jpg) with an index.json; keys s<shard>_<i>."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, n in enumerate(sizes):
        name = f"shard-{i:06d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False, mtime=0) as w:
            for j in range(n):
                rng = np.random.default_rng(i * 1000 + j)
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(buf, "JPEG")
                w.write({"__key__": f"s{i}_{j:03d}", "jpg": buf.getvalue()})
        entries.append({"url": name, "num_samples": n})
    (folder / "index.json").write_text(json.dumps({"shards": entries}))
    return folder / "index.json"


def mae_config():
    from pretrain.mae import MAEConfig
    from sapiens_lite.models.vit import ViTConfig

    encoder = ViTConfig(arch="vit_test", img_size=(32, 32), cls_token=True, pos_embed="sincos")
    return MAEConfig(encoder=encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2)


class KeyedMAEDecode:
    """MAEDecode plus the sample's key (as an int), so that a run can account for every sample."""

    def __init__(self):
        from sapiens_train.transforms import MAEDecode, MAETransform, MAETransformConfig

        self.decode = MAEDecode(MAETransform(MAETransformConfig(size=(32, 32))))

    def __call__(self, sample):
        shard, idx = sample["__key__"][1:].split("_")
        return {"image": self.decode(sample), "key": torch.tensor(int(shard) * 1000 + int(idx))}


def mae_engine(out: Path, name: str, zero: int, precision: str, *, resume: bool, total=MAE_STEPS, **kw):
    from pretrain.mae import MaskedAutoencoder, mae_forward_flops

    model_cfg = mae_config()
    cfg = cfg_for(out / name, zero, precision, total=total, checkpoint_every=kw.pop("checkpoint_every", 3),
                  keep_last=3, micro_batch_size=2, **kw)  # fmt: skip
    # flops_per_sample and no engine.peak_tflops: rank 0 measures the matmul peak during fit (the default).
    return Engine(
        lambda: MaskedAutoencoder(model_cfg),
        cfg,
        OptimConfig(lr=1e-3, warmup_steps=2, grad_clip=1.0),
        flops_per_sample=mae_forward_flops(model_cfg),
        resume=resume,
    )


def mae_stream(out: Path, engine: Engine, num_workers: int = 1):
    from sapiens_train.stream import build_stream

    return build_stream(
        out / "shards" / "index.json",
        decode=KeyedMAEDecode(),
        batch_size=engine.cfg.micro_batch_size,
        num_workers=num_workers,
        seed=engine.cfg.seed,
        rank=engine.rank,
        world_size=engine.world_size,
        shuffle_buffer=4,
    )


def mae_step(model, batch):
    loss, _, _ = model(batch["image"])  # the masks come from the global torch RNG
    return loss, {}


def mae_run(out: Path, name: str, hooks=()) -> dict:
    zero, precision = MAE_CONFIGS[name.split("-")[0]]
    engine = mae_engine(out, name, zero, precision, resume=True)
    resumed_from = engine.resumed_from
    summary = engine.fit(mae_stream(out, engine), mae_step, hooks=hooks)
    weights = full_params(engine)
    return {
        "resumed_from": resumed_from,
        "summary": summary,
        "losses": log_losses(out / name) if engine.is_main else {},
        "weights": {k: v.tolist() for k, v in weights.items()} if engine.is_main else {},
    }


def scenario_mae_kill(out: Path) -> dict:
    name, step = sys.argv[3], int(sys.argv[4])

    def kill(engine, s, batch, metrics):
        if engine.rank == 0 and s == step:
            os.kill(os.getpid(), signal.SIGKILL)

    mae_run(out, name, hooks=[EveryN(1, kill)])
    raise AssertionError(f"rank 0 should have been killed at step {step}")


def scenario_mae_resume(out: Path) -> dict:
    res = {}
    for name in sys.argv[3:]:
        res[name] = {"resumed": mae_run(out, name), "reference": mae_run(out, name + "-ref")}
    return res


# ---- another number of ranks ----


def moments(engine: Engine) -> dict:
    """Full fp32 master weights and Adam moments of every trainable parameter, through DeepSpeed's own
    accessors (collectives under ZeRO-3: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 link the Adam moments to each parameter's fragment after the first group's first step,
        # before the other groups have moments; link them again so that every group's can be read.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for n, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        out[n] = [
            safe_get_full_fp32_param(p).float().cpu(),
            safe_get_full_optimizer_state(p, "exp_avg").float().cpu(),
            safe_get_full_optimizer_state(p, "exp_avg_sq").float().cpu(),
        ]
    return out


class KeyRecorder:
    """A step function recording (epoch, key) of every sample it trains on."""

    def __init__(self, engine: Engine):
        self.engine, self.keys = engine, []

    def __call__(self, model, batch):
        self.keys += [(self.engine.epoch, k) for k in batch["key"].tolist()]
        return mae_step(model, batch)


ELASTIC_SAVE_STEPS = 3  # mid-epoch 0


def elastic_engine(out: Path, name: str, zero: int, *, resume: bool, total: int) -> Engine:
    # 2 -> 1 (name "to1"): the global batch is left to the engine, which keeps the checkpoint's by
    # accumulating twice; 1 -> 2 ("to2"): engine.global_batch_size=4 is set, so accumulation 2 then 1.
    gbs = 4 if name.startswith("to2") else None
    return mae_engine(out, name, zero, "fp32", resume=resume, total=total, checkpoint_every=ELASTIC_SAVE_STEPS,
                      accum=None, global_batch_size=gbs)  # fmt: skip


def scenario_elastic_save(out: Path) -> dict:
    name, zero = sys.argv[3], int(sys.argv[4])
    engine = elastic_engine(out, name, zero, resume=False, total=ELASTIC_SAVE_STEPS)
    rec = KeyRecorder(engine)
    engine.fit(mae_stream(out, engine), rec)
    state = moments(engine)
    if engine.is_main:
        torch.save(state, out / f"{name}_moments.pt")
    return {"keys": rec.keys, "world_size": engine.world_size, "global_batch_size": engine.global_batch_size}


def scenario_elastic_resume(out: Path) -> dict:
    name, zero = sys.argv[3], int(sys.argv[4])
    engine = elastic_engine(out, name, zero, resume=True, total=ELASTIC_SAVE_STEPS + 4)
    saved = torch.load(out / f"{name}_moments.pt")
    now = moments(engine)
    diffs = {n: max(float((a - b).abs().max()) for a, b in zip(now[n], saved[n])) for n in saved}
    groups = [[g["name"], g["weight_decay"], g["lr_scale"]] for g in engine.optimizer.param_groups]
    rec = KeyRecorder(engine)
    # Another number of loader workers as well; 4 more steps reach into epoch 1.
    summary = engine.fit(mae_stream(out, engine, num_workers=2), rec)
    return {
        "resumed_from": engine.resumed_from,
        "world_size": engine.world_size,
        "global_batch_size": engine.global_batch_size,
        "grad_accum_steps": engine.grad_accum_steps,
        "max_diff": max(diffs.values()),
        "num_params": len(diffs),
        "nonzero_moments": all(float(v[1].abs().max()) > 0 for v in saved.values()),
        "groups": groups,
        "keys": rec.keys,
        "final_loss": summary["final_loss"],
        "steps": summary["steps"],
    }


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    scenarios = {
        "matrix": scenario_matrix,
        "kill": scenario_kill,
        "resume": scenario_resume,
        "compile": scenario_compile,
        "mae_kill": scenario_mae_kill,
        "mae_resume": scenario_mae_resume,
        "elastic_save": scenario_elastic_save,
        "elastic_resume": scenario_elastic_resume,
    }
    result = scenarios[scenario](out)
    rank = dist.get_rank()
    tmp = out / f"{scenario}_rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, out / f"{scenario}_rank{rank}.json")


if __name__ == "__main__":
    main()
