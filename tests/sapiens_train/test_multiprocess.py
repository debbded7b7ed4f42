"""Two ranks over gloo under torchrun: ZeRO 1/2/3 x fp32/bf16, NaN agreement, consolidation, kill + resume.

The scenarios live in `_worker.py`; each test starts one `torchrun --nproc_per_node 2` (or two) and
checks the JSON the ranks wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_worker.py")
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
)


def torchrun(scenario: str, out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    # A clean launch environment: the pytest process may hold a world-of-one's variables.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.5", str(WORKER), scenario, str(out)]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def results(out: Path, scenario: str, proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"{scenario}_rank{r}.json").read_text()) for r in range(2)]


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
