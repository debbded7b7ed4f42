"""`sapiens pretrain`: config errors before any work, a real tiny run whose loss falls, a 2-rank torchrun smoke."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.config import PretrainConfig
from pretrain.mae import mae_forward_flops
from sapiens_lite.cli import main as sapiens
from sapiens_lite.config import load_config
from sapiens_lite.errors import ConfigError
from sapiens_train.engine import resolve_batch
from tests._launch import clean_env, torchrun

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"

# vit_test MAE at 64x48 on drawn people: a training step takes milliseconds.
TINY = {
    "model": {"encoder": {"arch": "vit_test"}, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "data": {"img_size": [64, 48], "synthetic": 32, "num_workers": 0},
    "engine": {
        "micro_batch_size": 8,
        "total_steps": 4,
        "log_every": 2,
        "checkpoint_every": 100,
        "tensorboard": False,
        "progress": False,
    },
    "optim": {"lr": 2.0e-3, "warmup_steps": 2},
    "viz": {"every": 2, "num_images": 2},
}


def write_config(tmp_path: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    cfg["engine"].setdefault("run_dir", str(tmp_path / "run"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args, capsys) -> tuple[int, str]:
    rc = sapiens(args)
    return rc, capsys.readouterr().err


def test_defaults_follow_the_mae_recipe():
    cfg = PretrainConfig()
    assert cfg.data.img_size == (1024, 768) and cfg.model.encoder.img_size == (1024, 768)
    assert cfg.data.crop_scale == (0.2, 1.0) and cfg.data.hflip
    assert (cfg.optim.blr, cfg.optim.betas, cfg.optim.weight_decay) == (1.5e-4, (0.9, 0.95), 0.05)
    assert cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss
    # the encoder's grid follows data.img_size
    cfg = load_config(PretrainConfig, [], ["data.img_size=[128, 96]"])
    assert cfg.model.encoder.img_size == (128, 96)


@pytest.mark.parametrize(
    "sections, overrides, message",
    [
        ({"data": {"synthetic": 0}}, [], "no training data"),
        (
            {"data": {"synthetic": 0, "shards": ["/nonexistent/train-{000000..000003}.tar"]}},
            [],
            "does not exist",
        ),
        ({}, ["engine.global_batch_size=100"], "global_batch_size=100"),
        ({}, ["engine.micro_batch_szie=4"], "micro_batch_szie"),
        ({}, ["init.checkpoint=/nonexistent/ckpt.pth"], "does not exist"),
        ({"data": {"synthetic": 4}}, [], "fewer than one global micro-batch"),
    ],
)
def test_config_errors_before_any_work(tmp_path, capsys, sections, overrides, message):
    cfg = write_config(tmp_path, **sections)
    rc, err = run_cli(["pretrain", "--config", str(cfg), *overrides], capsys)
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was started


def test_unreadable_init_checkpoint(tmp_path, capsys):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint at all")
    cfg = write_config(tmp_path, init={"checkpoint": str(bad)})
    rc, err = run_cli(["pretrain", "--config", str(cfg)], capsys)
    assert rc == 2 and "broken.pth" in err
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    """--dry-run: the resolved config, the DeepSpeed config, the lr, the AdamW groups and the data plan."""
    cfg = write_config(tmp_path)
    assert sapiens(["pretrain", "--config", str(cfg), "--dry-run", "optim.blr=3e-4"]) == 0
    out = capsys.readouterr().out
    config_text = out.split("# resolved config\n")[1].split("# DeepSpeed config")[0]
    resolved = yaml.safe_load(config_text)
    assert resolved["optim"]["blr"] == 3e-4 and resolved["model"]["encoder"]["img_size"] == [64, 48]
    ds = json.loads(out.split("# DeepSpeed config (world size 1)\n")[1].split("\n# lr")[0])
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"] == {"stage": 0}
    assert "# lr = 0.002 (absolute; blr unused)" in out
    assert "layer_0_decay" in out and "layer_0_no_decay" in out  # the AdamW groups, from a meta-device model
    assert "procedurally drawn people" in out and "epochs" in out
    assert not (tmp_path / "run").exists()  # nothing written


def test_mae_flops_count_visible_tokens_in_the_encoder():
    cfg = load_config(PretrainConfig, [CONFIGS / "sapiens_0.3b.yaml"])
    half = load_config(PretrainConfig, [CONFIGS / "sapiens_0.3b.yaml"], ["model.mask_ratio=0.5"])
    assert mae_forward_flops(half.model) > 1.5 * mae_forward_flops(cfg.model)


@pytest.mark.slow
def test_tiny_run_loss_falls_and_writes_pictures(tmp_path):
    """Real training in this process: 100 steps of vit_test on 64 drawn people."""
    from pretrain.train import train

    cfg = load_config(
        PretrainConfig,
        [write_config(tmp_path)],
        [
            "engine.total_steps=100",
            "engine.log_every=20",
            "viz.every=50",
            "data.synthetic=64",
            "engine.checkpoint_every=100",
        ],
    )
    _, summary = train(cfg, resume=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert len(losses) == 5 and all(r["img_per_s"] > 0 and r["mfu"] > 0 for r in log)
    assert losses[-1] < 0.85 * losses[0], losses
    assert sorted(p.name for p in (tmp_path / "run" / "viz").iterdir()) == [
        "step_00000050.png",
        "step_00000100.png",
    ]
    assert summary["steps"] == 100


@pytest.mark.slow
def test_two_rank_torchrun_end_to_end_and_resume(tmp_path):
    """`sapiens pretrain` under torchrun (2 CPU ranks, gloo), then resumed to more steps."""
    cfg = write_config(tmp_path, engine={"zero_stage": 1, "checkpoint_every": 2})
    env = clean_env(DS_ACCELERATOR="cpu")
    cmd = [*torchrun(2), "-m", "sapiens_lite.cli", "pretrain", "--config", str(cfg)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (run / "viz" / "step_00000004.png").is_file()
    assert "global batch 16 = micro 8 x accum 1 x world 2" in r.stdout
    r = subprocess.run(cmd + ["engine.total_steps=6"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 4" in r.stdout
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 6


@pytest.mark.parametrize("name", ["sapiens_0.3b", "sapiens_0.6b", "sapiens_1b", "sapiens_2b", "tiny_cpu"])
def test_shipped_configs_load_and_keep_the_recipe(name):
    cfg = load_config(PretrainConfig, [CONFIGS / f"{name}.yaml"])
    assert cfg.model.mask_ratio == 0.75 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
    if name.startswith("sapiens"):
        assert cfg.model.encoder.arch == name and cfg.data.img_size == (1024, 768)
        assert cfg.optim.blr == 1.5e-4 and cfg.engine.global_batch_size == 4096
        gbs, accum, _ = resolve_batch(cfg.engine, 64)  # 8 nodes x 8 GPUs
        assert gbs == 4096 and cfg.engine.micro_batch_size * accum * 64 == 4096
        assert resolve_batch(cfg.engine, 1)[0] == 4096  # one GPU: the accumulation is derived, no error
        assert cfg.engine.precision == "bf16" and cfg.optim.warmup_steps * 40 == cfg.engine.total_steps


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_command(tmp_path):
    """The README's DeepSpeed-launcher form on one machine: 2 CPU ranks, ZeRO-2. The launcher passes
    --local_rank=N before the command; `sapiens` takes LOCAL_RANK from the environment instead."""
    cfg = write_config(tmp_path, engine={"zero_stage": 2, "checkpoint_every": 4}, viz={"every": 0})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    with socket.socket() as s:  # a port nothing listens on now (the launcher has no "pick one" option)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]
    cmd += ["--module", "sapiens_lite.cli", "pretrain", "--config", str(cfg)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world 2 on cpu ({'stage': 2}" in r.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (tmp_path / "run" / "backbone" / "model.safetensors").is_file()


@pytest.mark.slow
def test_compiled_smoke_run_without_checkpoints(tmp_path, capsys):
    """engine.compile + engine.checkpoint_every=0, the GPU throughput setting (bench/gpu_check.sh): the
    blocks compile, the loss is logged with memory, and nothing is written to checkpoints/ or backbone/."""
    cfg = write_config(tmp_path, engine={"checkpoint_every": 0, "compile": True}, viz={"every": 0})
    rc = sapiens(["pretrain", "--config", str(cfg), "engine.activation_checkpointing=true"])
    assert rc == 0
    assert "nothing saved (engine.checkpoint_every=0)" in capsys.readouterr().out
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(r["mem_gib"] > 0 for r in log)
    assert not (run / "checkpoints").exists() and not (run / "backbone").exists()


def test_encoder_size_follows_the_data_or_must_agree():
    """data.img_size is the one place the resolution is set; a different model.encoder.img_size is an error."""
    cfg = load_config(PretrainConfig, [], ["data.img_size=[128, 96]", "model.encoder.img_size=[128, 96]"])
    assert cfg.model.encoder.img_size == (128, 96)
    with pytest.raises(
        ConfigError, match=r"model.encoder.img_size \[64, 48\] differs from data.img_size \[128, 96\]"
    ):
        load_config(PretrainConfig, [], ["data.img_size=[128, 96]", "model.encoder.img_size=[64, 48]"])
