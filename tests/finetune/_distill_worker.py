"""Two ranks over gloo for test_distill_zero3.py, run under `torchrun --nproc_per_node 2`:

    python -m torch.distributed.run --standalone --nproc_per_node 2 _distill_worker.py OUT DATA

1. The teacher placed with ZeRO-3 (`sapiens_train.frozen.place_frozen(zero3=True)`): every parameter is
   partitioned (no rank holds a whole one at rest), and its outputs equal the unpartitioned teacher's.
2. Pose distillation with a ZeRO-3 student, the teacher plain and then under ZeRO-3 (run dirs OUT/plain,
   OUT/zero3); the test compares their logs and exported students.
Each rank writes OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from finetune.distill import TeacherNet, train
from finetune.distill_config import DistillConfig
from sapiens_lite.config import load_config
from sapiens_lite.loading import load_model
from sapiens_train.dist import init_distributed
from sapiens_train.frozen import place_frozen


def main() -> None:
    out, data = Path(sys.argv[1]), Path(sys.argv[2])
    rank, world, _, device = init_distributed("gloo")
    result: dict = {"world": world}

    model, reference = load_model(data / "teacher"), load_model(data / "teacher")
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    net = place_frozen(TeacherNet(model, (0, 1)), device, precision="fp32", zero3=True, micro_batch_size=2)
    result["partitioned"] = all(p.numel() == 0 for p in model.parameters())  # freed after partitioning
    result["partition_share"] = sum(p.ds_tensor.numel() for p in model.parameters()) / sum(sizes.values())
    x = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = net(x)
        want = TeacherNet(reference.eval(), (0, 1))(x)
    diffs = [
        float((a - b).abs().max()) for a, b in zip([got[0], *got[1], got[2]], [want[0], *want[1], want[2]])
    ]
    result["teacher_max_diff"] = max(diffs)

    overrides = json.loads((data / "overrides.json").read_text())
    for name, zero3 in (("plain", False), ("zero3", True)):
        cfg = load_config(
            DistillConfig, [], [*overrides, f"engine.run_dir={out / name}", f"teacher.zero3={zero3}"]
        )
        _, summary, _ = train(cfg, resume=False)
        result[name] = {"steps": summary["steps"], "final_loss": summary["final_loss"]}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
