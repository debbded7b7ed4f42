"""The engine in one process (world of one over gloo): reproducibility, lr, logs, NaN handling, checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from sapiens_lite.errors import UserError
from sapiens_train.checkpoint import consolidate_fp32
from sapiens_train.config import EngineConfig, OptimConfig
from sapiens_train.engine import Engine, EveryN, resolve_batch
from sapiens_train.loader import ResumableLoader
from sapiens_train.monitor import PeakMeter, plot_log, read_log
from tests.sapiens_train._worker import TinyNet, make_dataset, step_fn

OPTIM = OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0)


def cfg(run_dir: Path, **kw) -> EngineConfig:
    base = dict(run_dir=str(run_dir), total_steps=6, micro_batch_size=4, log_every=1, checkpoint_every=100,
                progress=False, tensorboard=False)  # fmt: skip
    return EngineConfig(**{**base, **kw})


def fit_tiny(run_dir: Path, **kw) -> tuple[Engine, dict]:
    engine = Engine(TinyNet, cfg(run_dir, **kw), OPTIM)
    summary = engine.fit(ResumableLoader(make_dataset(), 4, seed=1), step_fn)
    return engine, summary


class Indexed:
    """Batches 0..n-1 (each carries its index), deterministic, resumable."""

    def __init__(self, indices):
        self.indices, self.pos = list(indices), 0

    def __iter__(self):
        while self.pos < len(self.indices):
            i = self.indices[self.pos]
            self.pos += 1
            g = torch.Generator().manual_seed(i)
            yield {
                "i": torch.tensor(i),
                "x": torch.randn(4, 8, generator=g),
                "y": torch.randn(4, 1, generator=g),
            }

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 1)
        self.checkpointing = False

    def forward(self, x):
        return self.fc2(self.fc1(x).tanh())

    def set_grad_checkpointing(self, enable=True):
        self.checkpointing = enable


def nan_at(bad: set[int]):
    def fn(model, batch):
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        if int(batch["i"]) in bad:
            loss = loss * float("inf") * 0  # nan
        return loss, {}

    return fn


def test_two_fresh_runs_are_identical(tmp_path):
    _, a = fit_tiny(tmp_path / "a")
    _, b = fit_tiny(tmp_path / "b")
    la, lb = read_log(tmp_path / "a" / "log.jsonl"), read_log(tmp_path / "b" / "log.jsonl")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert len(la) == 6 and a["final_loss"] == b["final_loss"] == la[-1]["loss"]
    _, c = fit_tiny(tmp_path / "c", seed=1)
    assert c["final_loss"] != a["final_loss"]


def test_logs_lr_schedule_and_written_files(tmp_path):
    lrs = []
    engine = Engine(
        Plain,
        cfg(tmp_path, tensorboard=True, log_every=2, total_steps=6),
        OptimConfig(lr=1e-2, warmup_steps=2),
        param_groups=None,
        flops_per_sample=1000.0,
        config_to_save=OptimConfig(lr=1e-2, warmup_steps=2),
    )
    hook = EveryN(1, lambda e, step, batch, m: lrs.append([g["lr"] for g in e.optimizer.param_groups]))
    engine.fit(Indexed(range(100)), nan_at(set()), hooks=[hook])
    assert [x[0] for x in lrs] == pytest.approx([engine.lr_at(s) for s in range(6)])
    assert lrs[0][0] == pytest.approx(5e-3) and lrs[1][0] == pytest.approx(1e-2)

    records = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    for key in ("loss", "lr", "img_per_s", "mfu", "mem_gib", "nonfinite_skipped", "epoch"):
        assert key in records[-1], key
    assert records[-1]["mfu"] > 0 and records[-1]["img_per_s"] > 0
    assert 0.05 < records[-1]["mem_gib"] < 64  # this process's peak resident set on a CPU
    ds = json.loads((tmp_path / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["zero_optimization"]["stage"] == 0
    assert "lr: 0.01" in (tmp_path / "config.yaml").read_text()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written by fit at the end
    png = plot_log(tmp_path / "log.jsonl", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_lr_scale_applied_each_step(tmp_path):
    """A model factory and a parameter-group function together: the groups are made from the built model."""

    def groups(model):
        return [
            {"params": list(model.fc1.parameters()), "weight_decay": 0.0, "lr_scale": 0.25},
            {"params": list(model.fc2.parameters()), "weight_decay": 0.0},
        ]

    engine = Engine(
        Plain,
        cfg(tmp_path, total_steps=3),
        OptimConfig(lr=1e-2, schedule="constant"),
        param_groups=groups,
    )
    engine.fit(Indexed(range(10)), nan_at(set()))
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([2.5e-3, 1e-2])
    assert [g["name"] for g in engine.optimizer.param_groups] == ["group_0", "group_1"]


@pytest.mark.parametrize("accum", [1, 2])
def test_nonfinite_loss_drops_the_batch_without_any_update(tmp_path, accum):
    """Training on 0,1,NaN,3,4,... ends with exactly the weights of training on 0,1,3,4,... (also when the
    NaN falls inside a gradient-accumulation window)."""
    with_nan = Engine(Plain, cfg(tmp_path / "nan", total_steps=5, grad_accum_steps=accum), OPTIM)
    s = with_nan.fit(Indexed(range(20)), nan_at({2}))
    clean = Engine(Plain, cfg(tmp_path / "clean", total_steps=5, grad_accum_steps=accum), OPTIM)
    clean.fit(Indexed([i for i in range(20) if i != 2]), nan_at(set()))
    assert s["nonfinite_skipped"] == 1 and s["steps"] == 5
    for (n, a), (_, b) in zip(with_nan.module.state_dict().items(), clean.module.state_dict().items()):
        assert torch.equal(a, b), n
    assert read_log(tmp_path / "nan" / "log.jsonl")[-1]["nonfinite_skipped"] == 1


def test_consecutive_nonfinite_losses_abort_and_latest_stays_before_the_weights_that_gave_them(tmp_path):
    engine = Engine(Plain, cfg(tmp_path, total_steps=10, max_nonfinite=3, checkpoint_every=1), OPTIM)
    with pytest.raises(UserError, match="3 consecutive non-finite losses at step 3.*latest is step_00000001"):
        engine.fit(Indexed(range(20)), nan_at(set(range(2, 20))))
    assert engine.step == 2 and engine.nonfinite_skipped == 3
    # The weights of step 2 gave the non-finite losses: their checkpoint is gone, latest is the one before.
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001"
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    again = Engine(Plain, cfg(tmp_path, total_steps=10), OPTIM, resume=True)
    assert again.step == 1 and again.nonfinite_skipped == 0


def test_exploding_lr_leaves_latest_on_a_finite_checkpoint_and_a_lower_lr_resumes(tmp_path):
    """optim.lr=1e9: the first update blows the weights up, the losses after it are non-finite; the
    abort must not leave those weights as `latest`, so the error's advice (a lower lr) works."""

    def overflowing(model, batch):  # a steep loss: overflows fp32 as soon as the weights explode
        return ((model(batch["x"]) - batch["y"]) ** 2).mean() ** 4, {}

    run = cfg(tmp_path, total_steps=6, checkpoint_every=1, max_nonfinite=5)
    Engine(Plain, replace(run, total_steps=2), OPTIM).fit(Indexed(range(20)), overflowing)
    blown = Engine(Plain, run, OptimConfig(lr=1e9), resume=True)
    with pytest.raises(UserError, match="5 consecutive non-finite losses at step 4"):
        blown.fit(Indexed(range(20)), overflowing)
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    assert latest == "step_00000002"  # step 3 (the blown-up weights) was saved, then dropped
    sd = consolidate_fp32(tmp_path)
    assert all(torch.isfinite(v).all() and v.abs().max() < 100 for v in sd.values())
    calm = Engine(Plain, run, OPTIM, resume=True)
    summary = calm.fit(Indexed(range(20)), overflowing)
    assert summary["resumed_from"] == "step_00000002" and summary["nonfinite_skipped"] == 0
    assert summary["steps"] == 6 and np.isfinite(summary["final_loss"])


def test_checkpoints_keep_last_and_resume_in_process(tmp_path):
    engine, _ = fit_tiny(tmp_path, checkpoint_every=1, keep_last=2)
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000005", "step_00000006"]
    assert (ckpt / "latest").read_text() == "step_00000006" and not (ckpt / "latest.tmp").exists()
    live = {k: v.clone() for k, v in engine.module.state_dict().items()}
    sd = consolidate_fp32(tmp_path)  # ZeRO-0: the module state as saved
    assert sorted(sd) == sorted(live) and all(torch.equal(sd[k], live[k]) for k in live)

    # Resuming a finished run with more steps continues from step 6.
    more = Engine(TinyNet, cfg(tmp_path, total_steps=8), OPTIM)
    assert more.resume() and more.step == 6
    assert all(torch.equal(more.module.state_dict()[k], live[k]) for k in live)
    summary = more.fit(ResumableLoader(make_dataset(), 4, seed=1), step_fn)
    assert summary["steps_this_run"] == 2 and summary["resumed_from"] == "step_00000006"


def test_checkpoint_every_zero_never_writes_a_checkpoint(tmp_path):
    engine, summary = fit_tiny(tmp_path / "a", checkpoint_every=0)
    assert summary["steps"] == 6 and not (tmp_path / "a" / "checkpoints").exists()
    assert (tmp_path / "a" / "loss.png").exists()  # drawn at the end of fit when no checkpoint drew it
    engine = Engine(Plain, cfg(tmp_path / "b", total_steps=10, max_nonfinite=2, checkpoint_every=0), OPTIM)
    with pytest.raises(UserError, match="no checkpoint from before"):
        engine.fit(Indexed(range(20)), nan_at(set(range(1, 20))))
    assert not (tmp_path / "b" / "checkpoints").exists()
    with pytest.raises(ValueError, match="checkpoint_every"):
        cfg(tmp_path, checkpoint_every=-1)


def test_corrupt_or_missing_checkpoint_is_a_user_error(tmp_path):
    fit_tiny(tmp_path, total_steps=2, checkpoint_every=1)
    ckpt = tmp_path / "checkpoints"
    model_file = ckpt / "step_00000002" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated write
    fresh = Engine(TinyNet, cfg(tmp_path), OPTIM)
    with pytest.raises(UserError, match=str(model_file)):
        fresh.resume()
    (ckpt / "latest").write_text("step_00000099")
    with pytest.raises(UserError, match="step_00000099"):
        fresh.resume()
    (ckpt / "latest").write_text("step_00000001")
    rank_file = ckpt / "step_00000001" / "engine_rank000.pt"
    rank_file.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=str(rank_file)):
        fresh.resume()
    assert not Engine(TinyNet, cfg(tmp_path / "empty"), OPTIM).resume()


def test_inconsistent_batch_sizes_fail_before_any_work(tmp_path):
    with pytest.raises(UserError, match="global_batch_size=16 but"):
        Engine(TinyNet, cfg(tmp_path / "run", global_batch_size=16, grad_accum_steps=2), OPTIM)
    with pytest.raises(UserError, match="global_batch_size=6 is not a multiple of .* = 4"):
        Engine(TinyNet, cfg(tmp_path / "run", global_batch_size=6), OPTIM)
    assert not (tmp_path / "run").exists()


def test_global_batch_alone_derives_the_accumulation(tmp_path, capsys):
    engine = Engine(TinyNet, cfg(tmp_path, global_batch_size=16), OPTIM)
    assert engine.grad_accum_steps == 4 and engine.global_batch_size == 16
    assert engine.ds_config["gradient_accumulation_steps"] == 4
    out = capsys.readouterr().out
    assert "gradient accumulation 4 derived from engine.global_batch_size=16" in out
    assert resolve_batch(cfg(tmp_path), 2) == (8, 1, None)
    assert resolve_batch(cfg(tmp_path, grad_accum_steps=3), 2)[:2] == (24, 3)
    # A checkpoint's global batch on another number of ranks: kept when it divides, else the change is said.
    assert resolve_batch(cfg(tmp_path), 1, keep_global=8)[:2] == (8, 2)
    assert "changes from 12 (checkpoint) to 8" in resolve_batch(cfg(tmp_path), 2, keep_global=12)[2]


def test_activation_checkpointing_switch(tmp_path):
    engine = Engine(Plain, cfg(tmp_path, activation_checkpointing=True), OPTIM)
    assert engine.module.checkpointing
    with pytest.raises(UserError, match="set_grad_checkpointing"):
        Engine(lambda: nn.Linear(8, 1), cfg(tmp_path, activation_checkpointing=True), OPTIM)


def test_compile_needs_transformer_blocks(tmp_path):
    # The compiled path itself (graphs, ZeRO-3 leaves, equal losses) runs in test_multiprocess.py.
    with pytest.raises(UserError, match="no transformer blocks"):
        Engine(Plain, cfg(tmp_path, compile=True), OPTIM)


def test_resumable_loader_shards_and_resumes():
    ds = make_dataset(40)
    shards = [ResumableLoader(ds, 4, rank=r, world_size=2, seed=5) for r in range(2)]
    ids = [[tuple(x[0].tolist()) for batch in s for x in zip(batch[0])] for s in shards]
    assert len(ids[0]) == len(ids[1]) == 20 and not set(ids[0]) & set(ids[1])

    full = ResumableLoader(ds, 4, seed=5)
    full.set_epoch(3)
    expected = [b[0] for b in full]
    part = ResumableLoader(ds, 4, seed=5)
    part.set_epoch(3)
    it = iter(part)
    head = [next(it)[0] for _ in range(4)]
    state = part.state_dict()
    assert state == {
        "epoch": 3,
        "batches": 4,
        "offset": 0,
        "world_size": 1,
        "batch_size": 4,
        "num_samples": 40,
    }
    resumed = ResumableLoader(ds, 4, seed=5)
    resumed.load_state_dict(state)
    tail = [b[0] for b in resumed]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, expected)) and len(head + tail) == len(expected)
    full.set_epoch(4)
    assert not torch.equal(next(iter(full))[0], expected[0])  # reshuffled per epoch


def test_data_tools_do_not_pay_for_deepspeed_and_the_engine_gets_the_cpu_accelerator():
    """`sapiens data ...` imports the data modules only (no DeepSpeed: seconds of start-up); importing the
    engine imports DeepSpeed, after the package has chosen the cpu accelerator on a machine without GPU."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = (
        "import os, sys\n"
        "import sapiens_train.synth, sapiens_train.shards, sapiens_train.coco, sapiens_train.data_cli\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed imported by the data tools'\n"
        "import sapiens_train.engine\n"
        "assert 'deepspeed' in sys.modules\n"
        "import torch\n"
        "assert torch.cuda.is_available() or os.environ['DS_ACCELERATOR'] == 'cpu'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_accelerator_choice_on_a_cpu_machine():
    """Without a GPU the engine runs on DeepSpeed's cpu accelerator; a forced cuda one is a clear UserError."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = (
        "from sapiens_train.dist import set_ds_accelerator_env\n"
        "assert set_ds_accelerator_env() == 'cpu'\n"
        "import deepspeed\n"
        "from sapiens_train.dist import accelerator_name\n"
        "assert accelerator_name() == 'cpu'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    code = (
        "import deepspeed\n"
        "from sapiens_lite.errors import UserError\n"
        "from sapiens_train.dist import accelerator_name\n"
        "try:\n    accelerator_name()\nexcept UserError as e:\n    assert 'DS_ACCELERATOR=cpu' in str(e)\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, "DS_ACCELERATOR": "cuda"})


def test_every_checkpoint_has_a_manifest_of_sizes_and_checksums(tmp_path):
    fit_tiny(tmp_path, total_steps=2, checkpoint_every=1)
    tag_dir = tmp_path / "checkpoints" / "step_00000002"
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["world_size"] == 1 and manifest["zero_stage"] == 0
    assert manifest["global_batch_size"] == 4
    files = {p.name for p in tag_dir.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files == {"mp_rank_00_model_states.pt", "engine_rank000.pt"}
    for name, entry in manifest["files"].items():  # checked with hashlib, not our helper
        data = (tag_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_damaged_checkpoint_is_named_before_any_work_and_resume_from_continues(tmp_path, monkeypatch):
    """4 KiB zeroed inside the latest checkpoint (the zip directory intact, so only the checksum can tell):
    the error names the file and the newest intact checkpoint, before the process group or the model
    exist; `engine.resume_from` with that tag continues from it."""
    fit_tiny(tmp_path, total_steps=3, checkpoint_every=1)
    damaged = tmp_path / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt"
    data = bytearray(damaged.read_bytes())
    data[1000:5096] = bytes(4096)
    damaged.write_bytes(bytes(data))

    import sapiens_train.engine as engine_module

    def no_process_group(*args):
        raise AssertionError("the checkpoint must be verified before the process group starts")

    def no_model():
        raise AssertionError("the checkpoint must be verified before the model is built")

    with monkeypatch.context() as m:
        m.setattr(engine_module, "init_distributed", no_process_group)
        with pytest.raises(UserError) as err:
            Engine(no_model, cfg(tmp_path, total_steps=5), OPTIM, resume=True)
    msg = str(err.value)
    assert msg.startswith(f"{damaged}: checksum mismatch"), msg
    assert (
        "the newest intact checkpoint is step_00000002: resume from it with engine.resume_from=step_00000002"
        in msg
    )
    engine = Engine(TinyNet, cfg(tmp_path, total_steps=5, resume_from="step_00000002"), OPTIM, resume=True)
    assert engine.step == 2 and engine.resumed_from == "step_00000002"
    summary = engine.fit(ResumableLoader(make_dataset(), 4, seed=1), step_fn)
    assert summary["steps"] == 5 and (tmp_path / "checkpoints" / "latest").read_text() == "step_00000005"
    with pytest.raises(ValueError, match="resume_from must be a checkpoint tag"):
        cfg(tmp_path, resume_from="latest")


def test_a_rerun_cuts_the_log_back_to_the_resumed_step(tmp_path):
    """An interrupted run logged steps past its last checkpoint; the rerun writes them again, once."""
    fit_tiny(tmp_path, total_steps=4, checkpoint_every=2)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")  # as if killed after step 4's log
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0}\n{"step": ')  # and a line cut by the kill
    engine = Engine(TinyNet, cfg(tmp_path, total_steps=6), OPTIM, resume=True)
    engine.fit(ResumableLoader(make_dataset(), 4, seed=1), step_fn)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_the_mfu_peak_touches_no_global_rng_and_says_where_it_comes_from():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    meter = PeakMeter(torch.device("cpu"), "fp32")
    assert (
        meter.remeasure and meter.current() > 0 and "measured again in every log window" in meter.describe()
    )
    assert torch.equal(torch.get_rng_state(), before)
    configured = PeakMeter(torch.device("cpu"), "fp32", configured=2.5)
    assert configured.current() == 2.5 and "engine.peak_tflops (config)" in configured.describe()


def test_resumable_loader_continues_an_epoch_on_another_number_of_ranks():
    ds = make_dataset(40)
    old = [ResumableLoader(ds, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    before = []
    for loader in old:
        it = iter(loader)
        before += [tuple(x.tolist()) for _ in range(3) for x in next(it)[0]]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in old]
    rest = []
    for r in range(3):  # 2 -> 3 ranks
        loader = ResumableLoader(ds, 2, rank=r, world_size=3, seed=5)
        loader.load_elastic_state(states)
        rest += [tuple(x.tolist()) for batch in loader for x in batch[0]]
    seen = before + rest
    assert len(seen) == len(set(seen)) and len(before) == 12
    assert 40 - len(seen) == (40 - 12) % 6  # the remaining 28: 4 batches of 2 on each of 3 ranks, 4 left
