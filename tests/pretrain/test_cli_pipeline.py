"""The pipeline from the command line: `sapiens data synth` -> `data pack` -> `pretrain` -> `finetune` -> `eval`.

Each step runs as its own `sapiens` process, the way a user types it: the pretraining run streams the
packed shards (index.json) through the webdataset loader with worker processes and leaves its encoder in
run_dir/backbone, and fine-tuning starts from that run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml


def sapiens(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "sapiens_lite.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, f"sapiens {' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_synth_pack_then_pretrain_from_the_shards(tmp_path):
    synth, shards, run = tmp_path / "synth", tmp_path / "shards", tmp_path / "run"
    sapiens(
        "data", "synth", str(synth), "--num-images", "40", "--seed", "3", "--size", "96x72", "--no-progress"
    )
    sapiens(
        "data", "pack", "--coco", str(synth / "annotations.json"), "--out", str(shards),
        "--max-samples", "12", "--no-progress",
    )  # fmt: skip
    index = json.loads((shards / "index.json").read_text())
    assert sum(s["num_samples"] for s in index["shards"]) == 40 and len(index["shards"]) == 4  # 12+12+12+4

    r = sapiens("data", "inspect", str(shards / "index.json"), "--out", str(tmp_path / "sheet.png"))
    assert "40" in r.stdout and (tmp_path / "sheet.png").stat().st_size > 0

    cfg = {
        "model": {
            # a size no arch table holds: fine-tuning must take it from the run (its config names no arch)
            "encoder": {"arch": "custom", "embed_dim": 48, "depth": 3, "num_heads": 3},
            "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2,
        },
        "data": {"img_size": [64, 48], "num_workers": 2, "shuffle_buffer": 8},
        "engine": {
            "run_dir": str(run), "total_steps": 6, "micro_batch_size": 4, "checkpoint_every": 3,
            "log_every": 2, "tensorboard": False, "progress": False,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "viz": {"every": 6},
    }  # fmt: skip
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    sapiens("pretrain", "--config", str(tmp_path / "tiny.yaml"), f"data.index={shards / 'index.json'}")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in log)  # finite
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (run / "viz" / "step_00000006.png").is_file()
    assert json.loads((run / "backbone" / "config.json").read_text())["model_type"] == "vit"

    # Fine-tune a 308-keypoint model on the same drawn people, starting from the pretraining run.
    ft = tmp_path / "ft"
    ft_cfg = {
        "model": {
            "scheme": "goliath308", "input_size": [64, 48], "sigma": 2.0,
            "backbone": {"img_size": [64, 48]}, "head": {"kind": "simple"},
        },
        "data": {
            "train_ann": str(synth / "annotations.json"), "train_images": str(synth / "images"),
            "val_ann": str(synth / "annotations.json"), "val_images": str(synth / "images"), "num_workers": 0,
        },
        "engine": {
            "run_dir": str(ft), "total_steps": 4, "micro_batch_size": 4, "checkpoint_every": 4,
            "log_every": 2, "tensorboard": False, "progress": False,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 1, "layer_decay": 0.9},
        "init": {"path": str(run)},
        "eval": {"every_steps": 0, "batch_size": 16},
    }  # fmt: skip
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(ft_cfg))
    r = sapiens("finetune", "--config", str(tmp_path / "ft.yaml"))
    assert f"backbone {run / 'backbone'}" in r.stdout, r.stdout[-2000:]
    ft_config = yaml.safe_load((ft / "config.yaml").read_text())["model"]["backbone"]
    assert (ft_config["arch"], ft_config["embed_dim"], ft_config["depth"]) == ("custom", 48, 3)
    out = tmp_path / "eval"
    sapiens(
        "eval",
        "--config",
        str(tmp_path / "ft.yaml"),
        "--checkpoint",
        str(ft / "final"),
        "--no-flip",
        "--out",
        str(out),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0 and 0.0 <= metrics["PCK@0.05"] <= 1.0
    assert len(json.loads((out / "results.json").read_text())) > 0
