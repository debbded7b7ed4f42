"""Two ranks over gloo under torchrun: ZeRO 1/2/3 x fp32/bf16, NaN agreement, consolidation, kill + resume
(map-style data, and the default path: a tiny MAE on webdataset shards with a loader worker and the
MFU peak measured), resume on another number of ranks, damaged and missing checkpoint files.

The scenarios live in `_worker.py`; each test starts one `torchrun --nproc_per_node 2` (or two) and
checks the JSON the ranks wrote.
"""

from __future__ import annotations

import json
import random
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from sapiens_lite.errors import UserError
from tests._launch import clean_env
from tests._launch import torchrun as launch_cmd
from tests.sapiens_train._worker import make_image_shards

WORKER = Path(__file__).with_name("_worker.py")


def torchrun(scenario: str, out: Path, *args: str, timeout: float = 240, nproc: int = 2):
    """The worker under torchrun with `nproc` ranks; nproc=0: one plain process (no launcher)."""
    cmd = [*launch_cmd(nproc), str(WORKER), scenario, str(out), *args]
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def results(out: Path, scenario: str, proc: subprocess.CompletedProcess, ranks: int = 2) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"{scenario}_rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.slow
def test_zero_stages_nan_agreement_consolidation(tmp_path):
    """ZeRO 1/2/3 in fp32 and bf16 train identically on both ranks; a NaN on one rank is dropped by all;
    a ZeRO-3 checkpoint consolidates to the live parameters; a crashed ZeRO-3 run resumes exactly."""
    r0, r1 = results(tmp_path, "matrix", torchrun("matrix", tmp_path))
    trainable = ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "norm.bias", "norm.weight"]
    for zero in (1, 2, 3):
        for precision in ("fp32", "bf16"):
            name = f"z{zero}_{precision}"
            for r in (r0, r1):
                assert r[name]["steps"] == 2
                assert r[name]["same_on_ranks"], name
                assert r[name]["changed"] == trainable, name  # the frozen parameter never moves
            assert r0[name]["final_loss"] == pytest.approx(r1[name]["final_loss"], abs=0)
            assert 0 < r0[name]["final_loss"] < 100
    # fp32 partitions the same arithmetic: identical losses for every stage.
    assert r0["z1_fp32"]["final_loss"] == r0["z2_fp32"]["final_loss"] == r0["z3_fp32"]["final_loss"]

    for r in (r0, r1):
        assert r["nan"] == {"skipped": 1, "steps": 4, "same_on_ranks": True, "batches": 5}

    assert r0["consolidate"] == {"keys_match": True, "max_diff": 0.0, "all_fp32": True}

    z3 = r0["z3_resume"]
    assert z3["resumed"] and z3["step"] == 4
    assert z3["got"] == z3["ref"]  # every step, including those after the resume, bit for bit


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """ZeRO-2, 2 ranks: SIGKILL at step 8 (checkpoint at 6), resume -> losses of steps 7..12 equal an
    uninterrupted run exactly (model, AdamW state, lr step, RNG per rank and data position restored)."""
    killed = torchrun("kill", tmp_path)
    assert killed.returncode != 0
    ckpt = tmp_path / "zero2_killed" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000006"
    assert not (ckpt / "step_00000012").exists()

    r0, _ = results(tmp_path, "resume", torchrun("resume", tmp_path))
    resumed, reference = r0["resumed"], r0["reference"]
    assert resumed["resumed"] and resumed["summary"]["resumed_from"] == "step_00000006"
    assert resumed["summary"]["steps_this_run"] == 6
    assert not reference["resumed"]
    assert sorted(map(int, reference["losses"])) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed["losses"][str(step)] == reference["losses"][str(step)], step


@pytest.mark.slow
def test_compiled_blocks_under_zero2_and_zero3(tmp_path):
    """engine.compile: one graph per block shape and no graph breaks, also under ZeRO-3 (whose
    per-submodule hooks would split every compiled block unless blocks are ZeRO-3 leaves); the
    losses equal eager ones and the state-dict keys (hence checkpoints) are unchanged."""
    r0, r1 = results(tmp_path, "compile", torchrun("compile", tmp_path, timeout=400))
    for zero in (2, 3):
        eager, compiled = r0[f"z{zero}_eager"], r0[f"z{zero}_compiled"]
        assert eager["graphs"] == 0 and compiled["graphs"] == 1, zero  # both vit_test blocks share a graph
        assert compiled["graph_breaks"] == 0, zero
        assert compiled["keys"] == eager["keys"]
        assert compiled["steps"] == eager["steps"] == 3
        for step in ("1", "2", "3"):
            assert compiled["losses"][step] == pytest.approx(eager["losses"][step], rel=1e-4), (zero, step)
        assert r1[f"z{zero}_compiled"]["graph_breaks"] == 0


@pytest.mark.slow
def test_killed_mae_run_on_the_streaming_loader_resumes_bit_exact(tmp_path):
    """The default path: a tiny MAE (masks from the global torch RNG) on webdataset shards with a loader
    worker and the MFU peak measured by rank 0, ZeRO-1 fp32 and ZeRO-3 bf16, SIGKILLed at a random step
    after a checkpoint (mid-epoch: 5 steps an epoch, checkpoints every 3). The resumed run repeats the
    uninterrupted run's losses and weights exactly; log.jsonl holds every step once."""
    make_image_shards(tmp_path / "shards")
    rng = random.Random()
    kills = {"z1_fp32": rng.choice([4, 5, 7, 8]), "z3_bf16": rng.choice([4, 5, 7, 8])}
    for name, step in kills.items():
        killed = torchrun("mae_kill", tmp_path, name, str(step))
        assert killed.returncode != 0, (name, step)
        assert (tmp_path / name / "checkpoints" / "latest").read_text() == f"step_{3 * (step // 3):08d}"
    r0, r1 = results(tmp_path, "mae_resume", torchrun("mae_resume", tmp_path, *kills, timeout=400))
    for name, step in kills.items():
        resumed, reference = r0[name]["resumed"], r0[name]["reference"]
        saved = 3 * (step // 3)
        assert resumed["resumed_from"] == f"step_{saved:08d}", (name, step)
        assert reference["resumed_from"] is None
        assert resumed["summary"]["steps_this_run"] == 9 - saved
        assert sorted(map(int, reference["losses"])) == list(range(1, 10))
        for s in range(1, 10):  # bit for bit, before and after the kill
            assert resumed["losses"][str(s)] == reference["losses"][str(s)], (name, step, s)
        assert resumed["weights"] == reference["weights"], (name, step)
        steps = [
            json.loads(line)["step"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
        ]
        assert steps == list(range(1, 10)), (name, step)  # the interrupted run's extra lines are gone


@pytest.mark.slow
def test_elastic_resume_2_to_1_and_1_to_2_ranks(tmp_path):
    """A run saved mid-epoch on 2 ranks continues on 1 (ZeRO-1), one saved on 1 continues on 2 (ZeRO-3):
    DeepSpeed's universal checkpoint carries the fp32 weights and Adam moments over exactly, each AdamW
    group keeps its weight decay, the global batch stays 4 (accumulation 2 <-> 1), and the rest of the
    epoch trains on every sample no rank had consumed, exactly once (another number of loader workers too).
    Then the checkpoints are damaged: the errors name the file and the newest intact checkpoint, come
    before any process group, and `engine.resume_from` continues from that one."""
    make_image_shards(tmp_path / "shards")  # 23 samples
    for name, zero, save_ranks, resume_ranks in (("to1", 1, 2, 0), ("to2", 3, 0, 2)):
        saved = results(tmp_path, "elastic_save", torchrun("elastic_save", tmp_path, name, str(zero),
                        nproc=save_ranks), ranks=save_ranks or 1)  # fmt: skip
        resumed = results(tmp_path, "elastic_resume", torchrun("elastic_resume", tmp_path, name, str(zero),
                          nproc=resume_ranks), ranks=resume_ranks or 1)  # fmt: skip
        r = resumed[0]
        assert r["resumed_from"] == "step_00000003" and r["steps"] == 7, name
        assert r["world_size"] == (resume_ranks or 1) and r["global_batch_size"] == 4
        assert r["grad_accum_steps"] == {"to1": 2, "to2": 1}[name]
        assert r["max_diff"] == 0.0 and r["num_params"] == 48 and r["nonzero_moments"], name
        assert {n: wd for n, wd, _ in r["groups"]} == {"layer_0_decay": 0.05, "layer_0_no_decay": 0.0}
        before = [k for s in saved for _, k in s["keys"]]
        rest = [k for x in resumed for epoch, k in x["keys"] if epoch == 0]
        assert len(before) == 12  # 3 steps of 4
        everything = before + rest
        assert len(everything) == len(set(everything)), name  # nothing twice
        # Every remaining sample once, but the last that do not fill one micro-batch on every new rank.
        new_micro_global = 2 * (resume_ranks or 1)
        assert 23 - len(everything) == (23 - 12) % new_micro_global, name
        assert 0 < r["final_loss"] < 10

    # Damaged checkpoints of the 2-rank ZeRO-3 run (checkpoints at steps 3, 6 and 7).
    from pretrain.mae import MaskedAutoencoder
    from sapiens_train.config import EngineConfig, OptimConfig
    from sapiens_train.engine import Engine
    from tests.sapiens_train._worker import mae_config

    ckpt = tmp_path / "to2" / "checkpoints"
    optim_file = ckpt / "step_00000007" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(optim_file.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # 4 KiB zeroed inside the optimizer state
    optim_file.write_bytes(bytes(data))
    model_file = ckpt / "step_00000006" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    model_file.unlink()
    cfg = EngineConfig(run_dir=str(tmp_path / "to2"), micro_batch_size=2, global_batch_size=4, zero_stage=3,
                       total_steps=8, progress=False, tensorboard=False)  # fmt: skip

    def build():
        raise AssertionError("the model must not be built before the checkpoint is verified")

    with pytest.raises(UserError) as err:
        Engine(build, cfg, OptimConfig(lr=1e-3), resume=True)
    msg = str(err.value)
    assert str(optim_file) in msg and "checksum mismatch" in msg, msg
    assert "newest intact checkpoint is step_00000003" in msg and "engine.resume_from=step_00000003" in msg
    with pytest.raises(UserError, match=f"{model_file}: missing.*engine.resume_from=step_00000003"):
        Engine(build, replace(cfg, resume_from="step_00000006"), OptimConfig(lr=1e-3), resume=True)
    engine = Engine(lambda: MaskedAutoencoder(mae_config()), replace(cfg, resume_from="step_00000003"),
                    OptimConfig(lr=1e-3), resume=True)  # fmt: skip
    assert engine.resumed_from == "step_00000003" and engine.step == 3 and engine.grad_accum_steps == 2
