"""The gain of distillation on synthesized people: teacher, ground-truth baseline, distilled students
(stages 1 and 2), and backbone distillation + fine-tuning against fine-tuning from scratch, over seeds.

    python bench/distill_gain.py --out runs/bench_distill            # the full benchmark (~20 min, 2 cores)
    python bench/distill_gain.py --out /tmp/distill_smoke --smoke    # every step on tiny sizes (~2.5 min)
    python bench/distill_gain.py --out runs/bench_distill2 --teacher runs/bench_distill/teacher  # reuse a teacher

The recipes are the repository's configs, run through the real trainers:
- teacher: configs/finetune/tiny_cpu_coco17.yaml (128 wide, 4 blocks, 128x96 crops), `--teacher-steps` steps,
  seed 0, trained once;
- student: configs/distill/tiny_cpu_coco17.yaml's model (96 wide, 3 blocks, on the teacher's 128x96 crops:
  about a third of its FLOPs), `--student-steps` steps per run;
- baseline: that student fine-tuned on ground truth only (`sapiens finetune`), with the distillation run's
  data, steps, optimizer, augmentation and seed: the two runs draw the same crops in the same order from
  the same initial weights, and differ only in the teacher;
- stage 1: `sapiens distill` with that config (GT + heatmap KL on all keypoints + feature MSE of the last
  blocks through a 1x1 projection, DWPose's linear decay);
- stage 2: configs/distill/tiny_cpu_coco17_stage2.yaml from the stage-1 student, `--stage2-steps` steps;
- backbone: configs/distill/tiny_cpu_backbone.yaml (the teacher's backbone into the student's, on the
  training images without their labels, `--backbone-steps` steps), then the baseline's fine-tuning from it.
Every student is evaluated by the trainers' final evaluation: OKS AP on a held-out synthesized set
(another synth seed), ground-truth boxes, flip test.

After the teacher (alone, on every core), the students' runs go in chains per seed (baseline; stage 1 ->
stage 2; backbone -> its fine-tuning), `--jobs` chains at a time in processes of their own with the cores
shared out (2 on a 2-core machine: about 1.3x the throughput of one run on both cores, for models this
small); `--jobs 1` runs everything in this process, one after the other.

Writes OUT/results.json (every AP, per-phase seconds) and OUT/results.md (the table in
docs/distillation.md); each run's output goes to OUT/<run>/stdout.txt, each chain's to OUT/unit_*.log.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._peak import device_name  # noqa: E402
from finetune import distill, distill_backbone  # noqa: E402
from finetune import train as finetune  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from finetune.distill_config import BackboneDistillConfig, DistillConfig  # noqa: E402
from sapiens_lite.config import config_from_dict, config_to_dict, load_config  # noqa: E402
from sapiens_train.dist import WORLD_OF_ONE_VARS  # noqa: E402

CONFIGS = {
    "teacher": ROOT / "configs/finetune/tiny_cpu_coco17.yaml",
    "stage1": ROOT / "configs/distill/tiny_cpu_coco17.yaml",
    "stage2": ROOT / "configs/distill/tiny_cpu_coco17_stage2.yaml",
    "backbone": ROOT / "configs/distill/tiny_cpu_backbone.yaml",
}


@dataclasses.dataclass
class Plan:
    train_images: int = 2000
    val_images: int = 100
    teacher_steps: int = 900
    student_steps: int = 400
    stage2_steps: int = 100
    backbone_steps: int = 200
    seeds: tuple[int, ...] = (0, 1, 2)
    workers: int = 1
    """DataLoader workers of each run (and synthesizer processes)."""


SMOKE = Plan(
    train_images=64, val_images=8, teacher_steps=20, student_steps=12, stage2_steps=4, backbone_steps=6,
    seeds=(0, 1, 2), workers=0,
)  # fmt: skip


def common(out: Path, plan: Plan, data: dict, name: str, seed: int, steps: int) -> list[str]:
    """Overrides every run shares: data, run dir, seed, steps, quiet logging, one evaluation at the end."""
    return [
        f"data.train_ann={data['train']}",
        f"data.train_images={data['train'].parent / 'images'}",
        f"data.val_ann={data['val']}",
        f"data.val_images={data['val'].parent / 'images'}",
        f"data.num_workers={plan.workers}",
        f"engine.run_dir={out / name}",
        f"engine.seed={seed}",
        f"engine.total_steps={steps}",
        f"optim.warmup_steps={max(1, min(100, steps // 10))}",
        "engine.checkpoint_every=0",
        "engine.progress=false",
        "engine.tensorboard=false",
        "eval.every_steps=0",
    ]


def baseline_config(distill: DistillConfig, run_dir: Path, init: str = "") -> FinetuneConfig:
    """The distillation run's student, data, loss, optimizer and engine, as a fine-tuning without teacher."""
    d = config_to_dict(distill)
    for section in ("teacher", "distill"):
        d.pop(section)
    d["data"].pop("views")
    d["engine"]["run_dir"] = str(run_dir)
    d["init"] = {"path": init}
    return config_from_dict(FinetuneConfig, d)


def run(out: Path, name: str, trainer, cfg, results: dict) -> float | None:
    """`trainer.main(cfg)` with its output in OUT/name/stdout.txt; returns (and records) the AP."""
    (out / name).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / name / "stdout.txt", "w") as f, contextlib.redirect_stdout(f):
        summary = trainer.main(cfg, resume=False)
    seconds = time.perf_counter() - t0
    ap = (summary.get("metrics") or {}).get("AP")
    results["runs"][name] = {"AP": ap, "seconds": round(seconds, 1), "final_loss": summary.get("final_loss")}
    shown = f"AP {ap:.4f}" if ap is not None else f"loss {summary.get('final_loss'):.4f}"
    print(f"[bench] {name:<22} {shown}  ({seconds:.0f} s)", flush=True)
    return ap


def make_data(out: Path, plan: Plan) -> dict:
    from sapiens_train.shards import PackOptions, collect_folder, pack
    from sapiens_train.synth import synthesize

    size, workers = (256, 192), max(1, plan.workers)
    train = synthesize(out / "data/train", plan.train_images, seed=0, size=size, scheme="coco17", people=(1, 2),
                       workers=workers, progress=False)  # fmt: skip
    val = synthesize(out / "data/val", plan.val_images, seed=1001, size=size, scheme="coco17", people=(1, 2),
                     workers=1, progress=False)  # fmt: skip
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        items, source = collect_folder(train.parent / "images")  # the same images, without their labels
        pack(items, source, out / "data/unlabeled", PackOptions(max_samples=500), progress=False)
    data = {"train": train, "val": val, "unlabeled": out / "data/unlabeled"}
    assert data == data_paths(out), (data, data_paths(out))
    return data


def data_paths(out: Path) -> dict:
    """Where make_data puts the annotations and the unlabeled shards."""
    return {"train": out / "data/train/annotations.json", "val": out / "data/val/annotations.json",
            "unlabeled": out / "data/unlabeled"}  # fmt: skip


def mean_spread(values: list[float]) -> str:
    """'mean +- sample std (min..max)' in AP points (x100)."""
    v = [100 * x for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.1f} ± {sd:.1f} ({min(v):.1f}..{max(v):.1f})"


def student_label() -> str:
    """'128x96, 96 wide, 3 blocks': the student of the stage-1 config."""
    m = load_config(DistillConfig, [CONFIGS["stage1"]]).model
    return f"{m.input_size[0]}x{m.input_size[1]}, {m.backbone.embed_dim} wide, {m.backbone.depth} blocks"


def table(results: dict, plan: Plan) -> str:
    runs = results["runs"]
    student = results.get("student") or student_label()

    def aps(kind: str) -> list[float]:
        return [runs[f"{kind}_s{s}"]["AP"] for s in plan.seeds]

    base = aps("baseline")
    rows = [("teacher (128x96, 128 wide, 4 blocks)", f"{100 * runs['teacher']['AP']:.1f}", "")]
    for kind, label in (
        ("baseline", "student, ground truth only (baseline)"),
        ("stage1", "student, distilled: stage 1"),
        ("stage2", "student, distilled: stage 1 + 2"),
        ("backbone_ft", "student, distilled backbone + fine-tuning"),
    ):
        values = aps(kind)
        gain = "" if kind == "baseline" else mean_spread([a - b for a, b in zip(values, base)])
        rows.append((label, mean_spread(values), gain))
    lines = [
        f"| model (student: {student}; {len(plan.seeds)} seeds) | AP | gain over baseline (per seed) |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
    ]
    return "\n".join(lines)


UNITS = ("backbone", "stage", "baseline")
"""The students' runs in independent chains per seed: backbone = backbone distillation -> its fine-tuning;
stage = stage 1 -> stage 2; baseline = ground truth only. Longest first."""


def run_unit(out: Path, plan: Plan, data: dict, teacher: Path, kind: str, seed: int, results: dict) -> None:
    """One chain of one seed, in this process (its runs' APs and times into `results`)."""
    s = f"_s{seed}"
    stage1 = load_config(
        DistillConfig,
        [CONFIGS["stage1"]],
        [*common(out, plan, data, "stage1" + s, seed, plan.student_steps), f"teacher.path={teacher}"],
    )
    if kind == "baseline":
        run(out, "baseline" + s, finetune, baseline_config(stage1, out / ("baseline" + s)), results)
    elif kind == "stage":
        run(out, "stage1" + s, distill, stage1, results)
        stage2 = load_config(
            DistillConfig,
            [CONFIGS["stage2"]],
            [
                *common(out, plan, data, "stage2" + s, seed, plan.stage2_steps),
                f"teacher.path={out / ('stage1' + s)}",
            ],
        )
        run(out, "stage2" + s, distill, stage2, results)
    elif kind == "backbone":
        backbone = load_config(
            BackboneDistillConfig,
            [CONFIGS["backbone"]],
            [
                f"teacher.path={teacher}",
                f"data.shards={data['unlabeled']}",
                f"data.num_workers={plan.workers}",
                f"engine.run_dir={out / ('backbone' + s)}",
                f"engine.seed={seed}",
                f"engine.total_steps={plan.backbone_steps}",
                f"optim.warmup_steps={max(1, min(50, plan.backbone_steps // 10))}",
                "engine.checkpoint_every=0",
                "engine.progress=false",
                "engine.tensorboard=false",
            ],
        )
        run(out, "backbone" + s, distill_backbone, backbone, results)
        finetuned = baseline_config(stage1, out / ("backbone_ft" + s), init=str(out / ("backbone" + s)))
        run(out, "backbone_ft" + s, finetune, finetuned, results)
    else:
        raise ValueError(f"unknown unit {kind!r} (one of {', '.join(UNITS)})")


def run_parallel(out: Path, args, teacher: Path, units: list[tuple[str, int]], results: dict) -> None:
    """The units in `args.jobs` processes at a time, the cores shared out between them.

    For students this small, two single-threaded runs side by side do 1.05x to 1.4x the work of one run
    on both cores (600-step runs: two baselines in about 220 s against 115 s each alone, two stage-1 runs
    in about 260 s against 180 s each): their matmuls are too small for two threads. Each unit is this script again with --unit; its results come back as OUT/unit_KIND_sSEED.json.
    """
    import subprocess

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # Without the world-of-one variables the teacher's run set in this process (its MASTER_PORT above
    # all): each unit is a world of its own, on a port of its own.
    env = {k: v for k, v in os.environ.items() if k not in WORLD_OF_ONE_VARS}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    plan_args = strip_option(strip_option(sys.argv[1:], "--jobs"), "--teacher")
    pending, running, failed = list(units), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            kind, seed = pending.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), *plan_args,
                   "--teacher", str(teacher), "--unit", f"{kind}:{seed}", "--jobs", "1"]  # fmt: skip
            log = open(out / f"unit_{kind}_s{seed}.log", "w")
            running.append(
                ((kind, seed), subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
            )
        time.sleep(1)
        for item in list(running):
            (kind, seed), proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            text = (out / f"unit_{kind}_s{seed}.log").read_text()
            print("\n".join(line for line in text.splitlines() if line.startswith("[bench] ") and "data:" not in line
                            and "teacher" not in line), flush=True)  # fmt: skip
            if proc.returncode != 0:
                failed.append(
                    f"{kind}:{seed} (exit {proc.returncode}, log {out / f'unit_{kind}_s{seed}.log'})"
                )
                continue
            results["runs"].update(json.loads((out / f"unit_{kind}_s{seed}.json").read_text())["runs"])
    if failed:
        raise SystemExit(f"[bench] failed: {', '.join(failed)}")


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name` and its value (`--name V` or `--name=V`)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            kept.append(a)
    return kept


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for data, runs and results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every step runs")
    for f in dataclasses.fields(Plan):
        if f.name != "seeds":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument(
        "--teacher", help="reuse this teacher run dir (an earlier run's OUT/teacher) instead of training one"
    )
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="students' runs side by side, the cores shared out (default: 2 on 2+ cores)")  # fmt: skip
    p.add_argument("--unit", help=argparse.SUPPRESS)  # KIND:SEED, one chain: how --jobs runs its processes
    args = p.parse_args()
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    plan = dataclasses.replace(SMOKE if args.smoke else Plan())
    for f in dataclasses.fields(Plan):
        value = getattr(args, f.name)
        if value is not None:
            setattr(plan, f.name, tuple(value) if f.name == "seeds" else value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # where the trainers run: the engine takes the GPU when there is one
    device = device_name("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {
        "plan": dataclasses.asdict(plan),
        "device": device,
        "student": student_label(),
        "runs": {},
        "seconds": {},
    }
    t_all = time.perf_counter()

    if args.unit:  # one chain, on the data and teacher of the run that started this process
        kind, seed = args.unit.split(":")
        run_unit(out, plan, data_paths(out), Path(args.teacher), kind, int(seed), results)
        (out / f"unit_{kind}_s{seed}.json").write_text(json.dumps(results, indent=1) + "\n")
        return 0
    results["jobs"] = args.jobs

    t0 = time.perf_counter()
    data = make_data(out, plan)
    results["seconds"]["data"] = round(time.perf_counter() - t0, 1)
    print(
        f"[bench] data: {plan.train_images} + {plan.val_images} images ({results['seconds']['data']:.0f} s)"
    )

    if args.teacher:  # a teacher trained by an earlier run of this benchmark (same data, same recipe)
        teacher = Path(args.teacher)
        metrics = json.loads((teacher / "final" / "metrics.json").read_text())
        results["runs"]["teacher"] = {"AP": metrics["AP"], "seconds": 0.0, "reused": str(teacher)}
        print(f"[bench] teacher                AP {metrics['AP']:.4f}  (reused: {teacher})", flush=True)
    else:
        teacher = out / "teacher"
        teacher_cfg = load_config(
            FinetuneConfig, [CONFIGS["teacher"]], common(out, plan, data, "teacher", 0, plan.teacher_steps)
        )
        run(out, "teacher", finetune, teacher_cfg, results)

    units = [(kind, seed) for kind in UNITS for seed in plan.seeds]  # longest first: the slots end together
    t0 = time.perf_counter()
    if args.jobs == 1:
        for kind, seed in units:
            run_unit(out, plan, data, teacher, kind, seed, results)
    else:
        run_parallel(out, args, teacher, units, results)
    results["seconds"]["students"] = round(time.perf_counter() - t0, 1)

    results["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    text = table(results, plan)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"[bench] total {results['seconds']['total']:.0f} s; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
