"""`sapiens demo`: the toolkit's chain end to end, on procedurally drawn people, into one folder.

    sapiens demo                     # about 10 minutes on 2 CPU cores -> out/demo/report.html
    sapiens demo --quick             # the same chain, smaller, in about a minute (the test suite runs it)
    sapiens demo --skip distill      # leave stages out; `sapiens demo` again continues where it stopped

Stages, in order. Each is one `sapiens` command run as its own process (printed before it runs, its output
in logs/<stage>.log), so the demo exercises exactly what a user types:

    synth      procedural people with exact COCO-17 keypoints: a training set and a held-out val set
    pack       the training images into webdataset shards with an index.json
    pretrain   MAE pretraining of a small ViT from the shards with DeepSpeed (2 processes on 2+ cores)
    finetune   17-keypoint heatmap pose fine-tuning, started from the pretraining run
    scratch    the same fine-tuning from random weights: the AP without pretraining
    eval       OKS AP of both on the held-out people, with best/worst overlays
    distill    a smaller student distilled from the fine-tuned model (heatmaps + features)
    baseline   the same student trained on ground truth only: the distillation gain
    export     the student as ONNX
    predict    keypoints on photos that ship inside installed packages and on a short generated video

Then the summary table is printed and report.html written (self-contained: it opens without a network).

The state (finished stages and their results) lives in demo.json; a stage that fails names itself, its
log and the command to rerun, and `sapiens demo` again resumes from it (the training commands resume
from their own checkpoints). This module runs the recipes through the command line only: it imports
neither `pretrain` nor `finetune`.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from sapiens_lite.errors import UserError

STATE_NAME = "demo.json"


@dataclass(frozen=True)
class DemoSize:
    """How big each stage is; `FULL` fits about 10 minutes on 2 CPU cores, `QUICK` about one."""

    train_images: int
    val_images: int
    image_size: tuple[int, int]  # (H, W) of the drawn images
    input_size: tuple[int, int]  # (H, W) of the person crops and of the pretraining crops
    pretrain_steps: int
    finetune_steps: int
    distill_steps: int
    micro_batch: int
    video_frames: int


FULL = DemoSize(
    train_images=1200,
    val_images=100,
    image_size=(256, 192),
    input_size=(128, 96),
    pretrain_steps=300,
    finetune_steps=360,
    distill_steps=360,
    micro_batch=32,
    video_frames=24,
)
QUICK = DemoSize(
    train_images=48,
    val_images=12,
    image_size=(128, 96),
    input_size=(64, 48),
    pretrain_steps=6,
    finetune_steps=8,
    distill_steps=8,
    micro_batch=8,
    video_frames=4,
)

# The demo's models. The teacher and the pretraining encoder share one backbone (4 blocks, 128 wide, the
# backbone of configs/finetune/tiny_cpu_coco17.yaml); the student has half its width and half its blocks.
BACKBONE = {"arch": "tiny_cpu", "embed_dim": 128, "depth": 4, "num_heads": 4}
STUDENT = {"arch": "tiny_student", "embed_dim": 64, "depth": 2, "num_heads": 2}
QUICK_BACKBONE = {"arch": "vit_test"}


# ---- running commands ---------------------------------------------------------------------------------


class StageFailed(Exception):
    def __init__(self, stage: str, command: list[str], log: Path, code: int):
        self.stage, self.command, self.log, self.code = stage, command, log, code


def sapiens_command(*args: str) -> list[str]:
    """`sapiens ARGS` as this interpreter runs it (works in a venv whose bin/ is not on PATH)."""
    return [sys.executable, "-m", "sapiens_lite.cli", *map(str, args)]


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m sapiens_lite.cli ARGS`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "sapiens_lite.cli",
        *map(str, args),
    ]


def readable(cmd: list[str]) -> str:
    """The command as a user would type it (`sapiens ...` / `torchrun ...`)."""
    if cmd[:3] == [sys.executable, "-m", "sapiens_lite.cli"]:
        return shlex.join(["sapiens", *cmd[3:]])
    if cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        return shlex.join(["torchrun", *cmd[3:]])
    return shlex.join(cmd)


class Runner:
    """Runs one stage's commands with output into logs/<stage>.log; a failure raises `StageFailed`."""

    def __init__(self, out: Path, verbose: bool):
        self.out = out
        self.verbose = verbose
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, stage: str, cmd: list[str], *, threads: int | None = None) -> str:
        log = self.logs / f"{stage}.log"
        print(f"  $ {readable(cmd)}", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log, "a") as f:
            f.write(f"$ {readable(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(
                cmd, cwd=self.out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            lines = []
            for line in proc.stdout:
                f.write(line)
                lines.append(line)
                if self.verbose:
                    print("    " + line, end="", flush=True)
            code = proc.wait()
        if code != 0:
            raise StageFailed(stage, cmd, log, code)
        return "".join(lines)


# ---- the stages ---------------------------------------------------------------------------------------


@dataclass
class Context:
    out: Path
    size: DemoSize
    quick: bool
    nproc: int
    runner: Runner
    results: dict  # stage -> its result dict (from demo.json, then this run)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    @property
    def backbone(self) -> dict:
        return QUICK_BACKBONE if self.quick else BACKBONE


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
    return path


def _hxw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def stage_synth(ctx: Context) -> dict:
    s = ctx.size
    for name, n, seed in (("train", s.train_images, 0), ("val", s.val_images, 1001)):
        ctx.runner.run(
            "synth",
            sapiens_command(
                "data", "synth", f"data/{name}", "--num-images", n, "--seed", seed, "--scheme", "coco17",
                "--size", _hxw(s.image_size), "--people", "1-2", "--workers", ctx.nproc, "--no-progress",
            ),
        )  # fmt: skip
    people = {
        name: len(json.loads(ctx.path("data", name, "annotations.json").read_text())["annotations"])
        for name in ("train", "val")
    }
    return {"train_images": s.train_images, "val_images": s.val_images, "people": people}


def stage_pack(ctx: Context) -> dict:
    ctx.runner.run(
        "pack",
        sapiens_command(
            "data", "pack", "--coco", "data/train/annotations.json", "--out", "shards",
            "--max-samples", max(8, ctx.size.train_images // 4), "--no-progress",
        ),
    )  # fmt: skip
    index = json.loads(ctx.path("shards", "index.json").read_text())
    return {"shards": len(index["shards"]), "samples": sum(x["num_samples"] for x in index["shards"])}


def _engine(run_dir: str, steps: int, micro_batch: int) -> dict:
    return {
        "run_dir": run_dir,
        "total_steps": steps,
        "micro_batch_size": micro_batch,
        "checkpoint_every": max(1, steps // 2),
        "log_every": max(1, steps // 10),
        "tensorboard": False,
        "progress": False,
    }


def stage_pretrain(ctx: Context) -> dict:
    s = ctx.size
    steps = s.pretrain_steps
    cfg = {
        "model": {
            "encoder": ctx.backbone,
            "decoder_dim": 64 if ctx.quick else 128,
            "decoder_depth": 2,
            "decoder_heads": 4,
        },
        "data": {
            "index": "shards/index.json",
            "img_size": list(s.input_size),
            "num_workers": 1,
            "shuffle_buffer": 64,
        },
        # The global batch stays micro_batch whatever the number of processes.
        "engine": {**_engine("runs/pretrain", steps, s.micro_batch // ctx.nproc), "zero_stage": 1},
        "optim": {"lr": 1.5e-3, "warmup_steps": max(1, steps // 15)},
        "viz": {"every": steps, "num_images": 4},
    }
    config = _write_yaml(ctx.path("configs", "pretrain.yaml"), cfg)
    args = ("pretrain", "--config", config.relative_to(ctx.out))
    if ctx.nproc > 1:
        ctx.runner.run("pretrain", torchrun_command(ctx.nproc, *args), threads=1)
    else:
        ctx.runner.run("pretrain", sapiens_command(*args))
    log = _read_log(ctx.path("runs", "pretrain", "log.jsonl"))
    return {
        "processes": ctx.nproc,
        "first_loss": log[0]["loss"],
        "final_loss": log[-1]["loss"],
        "img_per_s": _median([r["img_per_s"] for r in log[1:] or log]),
    }


def finetune_config(ctx: Context, run_dir: str, init: str = "") -> dict:
    s = ctx.size
    steps = s.finetune_steps
    return {
        "model": {
            "scheme": "coco17",
            "input_size": list(s.input_size),
            "sigma": 2.0,
            "backbone": {**ctx.backbone, "img_size": list(s.input_size)},
            "head": {"kind": "vitpose", "channels": 64},
        },
        "data": {
            "train_ann": "data/train/annotations.json",
            "train_images": "data/train/images",
            "val_ann": "data/val/annotations.json",
            "val_images": "data/val/images",
            "num_workers": 1,
            # Light augmentation: a short run from scratch learns too slowly with the full Sapiens set.
            "augment": {
                "rotate_factor": 0.0,
                "half_body_prob": 0.0,
                "scale_range": [0.9, 1.1],
                "photometric": False,
            },
        },
        "engine": _engine(run_dir, steps, s.micro_batch),
        "optim": {"lr": 2e-3, "layer_decay": None, "warmup_steps": max(1, steps // 20), "schedule": "cosine"},
        "init": {"path": init},
        "eval": {"every_steps": 0, "batch_size": 64},
    }


def _finetune(ctx: Context, stage: str, run_dir: str, init: str) -> dict:
    config = _write_yaml(ctx.path("configs", f"{stage}.yaml"), finetune_config(ctx, run_dir, init))
    ctx.runner.run(stage, sapiens_command("finetune", "--config", config.relative_to(ctx.out)))
    return _run_result(ctx, run_dir)


def stage_finetune(ctx: Context) -> dict:
    return _finetune(ctx, "finetune", "runs/finetune", init="runs/pretrain")


def stage_scratch(ctx: Context) -> dict:
    return _finetune(ctx, "scratch", "runs/scratch", init="")


def stage_eval(ctx: Context) -> dict:
    out = {}
    for stage in ("finetune", "scratch"):
        if stage not in ctx.results:
            continue
        ctx.runner.run(
            "eval",
            sapiens_command(
                "eval",
                "--checkpoint",
                f"runs/{stage}",
                "--config",
                f"configs/{stage}.yaml",
                "--out",
                f"eval/{stage}",
            ),
        )
        m = json.loads(ctx.path("eval", stage, "metrics.json").read_text())
        out[stage] = {k: m[k] for k in ("AP", "AP50", "AR") if k in m} | {"PCK": m.get("PCK@0.05")}
    return out


def student_model(ctx: Context) -> dict:
    """The student: a smaller ViT (half the width, half the blocks: about 1/8 of the backbone FLOPs) on the
    teacher's crops, as DWPose distils at the teacher's resolution (at half the resolution the gain was nil
    on these people)."""
    size = list(ctx.size.input_size)
    backbone = QUICK_BACKBONE if ctx.quick else STUDENT
    return {
        "scheme": "coco17",
        "input_size": size,
        "sigma": 2.0,
        "backbone": {**backbone, "img_size": size},
        "head": {"kind": "vitpose", "channels": 64},
    }


def _student_config(ctx: Context, run_dir: str) -> dict:
    cfg = finetune_config(ctx, run_dir)
    cfg["model"] = student_model(ctx)
    cfg["engine"] = _engine(run_dir, ctx.size.distill_steps, ctx.size.micro_batch)
    cfg["optim"]["warmup_steps"] = max(1, ctx.size.distill_steps // 20)
    del cfg["init"]
    return cfg


def stage_distill(ctx: Context) -> dict:
    """Heatmap (KL on all keypoints) + feature distillation from the fine-tuned model, DWPose's decaying weights."""
    cfg = _student_config(ctx, "runs/distill")
    cfg["teacher"] = {"path": "runs/finetune", "precision": "fp32"}  # bf16 matmuls are slow on CPUs
    cfg["distill"] = {
        "heatmap_loss": "kl",
        "heatmap_weight": 1.0,
        "feature_weight": 0.002,
        "student_layers": [-1],
        "teacher_layers": [-1],
    }
    config = _write_yaml(ctx.path("configs", "distill.yaml"), cfg)
    ctx.runner.run("distill", sapiens_command("distill", "--config", config.relative_to(ctx.out)))
    return _run_result(ctx, "runs/distill")


def stage_baseline(ctx: Context) -> dict:
    """The same student, data, steps and seed on ground truth only: what distillation is measured against."""
    config = _write_yaml(ctx.path("configs", "baseline.yaml"), _student_config(ctx, "runs/baseline"))
    ctx.runner.run("baseline", sapiens_command("finetune", "--config", config.relative_to(ctx.out)))
    return _run_result(ctx, "runs/baseline")


def _run_result(ctx: Context, run_dir: str) -> dict:
    """A pose run's first and final logged loss and its final AP (run_dir/final/metrics.json)."""
    log = _read_log(ctx.path(run_dir, "log.jsonl"))
    metrics = json.loads(ctx.path(run_dir, "final", "metrics.json").read_text())
    return {
        "first_loss": log[0]["loss"],
        "final_loss": log[-1]["loss"],
        "AP": metrics["AP"],
        "run_dir": run_dir,
    }


def _student_run(ctx: Context) -> str:
    return "runs/distill" if "distill" in ctx.results else "runs/finetune"


def stage_export(ctx: Context) -> dict:
    path = "export/student.onnx"
    text = ctx.runner.run("export", sapiens_command("export", _student_run(ctx), path, "--format", "onnx"))
    # "check: batch 3, max |export - eager| / max |eager| = 1.2e-06 (tolerance 1e-04)"
    line = next((ln for ln in text.splitlines() if ln.startswith("check:")), "")
    diff = float(line.split("=")[1].split()[0]) if "=" in line else float("nan")
    return {"path": path, "max_diff": diff, "model": _student_run(ctx)}


def stage_predict(ctx: Context) -> dict:
    """Keypoints on photos shipped inside installed packages, and on a short video of drawn people."""
    photos = ctx.path("predict", "inputs")
    n_photos = _packaged_photos(photos)
    frames = _write_video(ctx.path("predict", "inputs_video", "people.mp4"), ctx.size.video_frames)
    model = _student_run(ctx)
    text = ctx.runner.run(
        "predict",
        sapiens_command(
            "predict", "predict/inputs", "--model", model, "--out", "predict/photos", "--no-progress"
        ),
    )
    ctx.runner.run(
        "predict",
        sapiens_command(
            "predict",
            "predict/inputs_video/people.mp4",
            "--model",
            model,
            "--out",
            "predict/video",
            "--no-progress",
        ),
    )
    _first_frame(ctx.path("predict", "video", "people.mp4"), ctx.path("predict", "video", "frame_000.jpg"))
    # "sapiens predict: 3 images, 4 people -> predict/photos in 1.2 s (2.5 images/s)"
    rate = float(text.rsplit("(", 1)[1].split()[0]) if "images/s)" in text else float("nan")
    return {"images": n_photos, "frames": frames, "img_per_s": rate, "out": "predict/", "model": model}


def _packaged_photos(folder: Path) -> int:
    """Photos of people that ship inside installed packages: scikit-image's astronaut, matplotlib's Grace Hopper."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    found = []
    try:
        import skimage

        found.append(Path(skimage.__file__).parent / "data" / "astronaut.png")
    except ImportError:
        pass
    try:
        import matplotlib.cbook

        found.append(Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    except ImportError:
        pass
    found = [p for p in found if p.is_file()]
    if not found:
        raise UserError("no packaged photo found (install the dev extra: scikit-image, matplotlib)")
    for p in found:
        shutil.copy(p, folder / p.name)
    return len(found)


def _write_video(path: Path, frames: int) -> int:
    """A short video: consecutive drawn people (sapiens_train.synth), 8 frames per second."""
    from sapiens_lite.video import VideoWriter
    from sapiens_train.synth import render_sample

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = VideoWriter(path, fps=8)
    for i in range(frames):
        img, _ = render_sample(7, i, (256, 192), people=(1, 1))
        writer.write(img)
    writer.close()
    return frames


def _first_frame(video: Path, out: Path) -> None:
    import cv2

    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    cap.release()
    if ok:
        cv2.imwrite(str(out), frame)


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if v else 0.0


# ---- the report ---------------------------------------------------------------------------------------


def summary_rows(results: dict) -> list[tuple[str, str]]:
    """(what, figure) rows of the summary table, from the stages' results (stages not run are left out)."""
    rows: list[tuple[str, str]] = []
    r = results
    if "synth" in r:
        p = r["synth"]["people"]
        rows.append(
            (
                "data",
                f"{r['synth']['train_images']} training images ({p['train']} people), "
                f"{r['synth']['val_images']} held-out ({p['val']} people)",
            )
        )
    if "pack" in r:
        rows.append(("shards", f"{r['pack']['samples']} samples in {r['pack']['shards']} shards"))
    if "pretrain" in r:
        x = r["pretrain"]
        rows.append(
            (
                "MAE loss",
                f"{x['first_loss']:.3f} -> {x['final_loss']:.3f} "
                f"({x['processes']} processes, {x['img_per_s']:.0f} img/s)",
            )
        )
    for stage, label in (("finetune", "with pretraining"), ("scratch", "without pretraining")):
        if stage in r:
            x = r[stage]
            ap = r.get("eval", {}).get(stage, {}).get("AP", x["AP"])
            rows.append(
                (f"pose AP {label}", f"{ap:.3f} (loss {x['first_loss']:.4f} -> {x['final_loss']:.4f})")
            )
    for stage, label in (("distill", "student, distilled"), ("baseline", "student, ground truth only")):
        if stage in r:
            rows.append((f"pose AP {label}", f"{r[stage]['AP']:.3f}"))
    if "distill" in r and "baseline" in r:
        gain = r["distill"]["AP"] - r["baseline"]["AP"]
        rows.append(("distillation gain", f"{gain:+.3f} AP"))
    if "export" in r:
        rows.append(
            ("exported student", f"{r['export']['path']} (max |onnx - eager| {r['export']['max_diff']:.1e})")
        )
    if "predict" in r:
        x = r["predict"]
        rows.append(
            (
                "predictions",
                f"{x['images']} photos + {x['frames']}-frame video, {x['img_per_s']:.1f} img/s -> {x['out']}",
            )
        )
    return rows


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max((len(a) for a, _ in rows), default=0)
    return "\n".join(f"  {a:<{width}}  {b}" for a, b in rows)


def _data_uri(path: Path) -> str:
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _pictures(out: Path) -> list[tuple[str, list[Path]]]:
    """(section title, image files) for the report, in the order of the chain; missing ones left out."""
    viz = sorted(out.glob("runs/pretrain/viz/*.png"))
    sections = [
        ("MAE reconstructions (image, masked 75 %, reconstruction)", viz[-1:]),
        (
            "Loss curves",
            [
                p
                for p in (
                    out / f"runs/{r}/loss.png"
                    for r in ("pretrain", "finetune", "scratch", "distill", "baseline")
                )
                if p.is_file()
            ],
        ),
        (
            "Held-out people: best and worst predictions (left ground truth, right prediction)",
            sorted(out.glob("eval/finetune/overlays/*.jpg"))[:6],
        ),
        (
            "Predictions on real photos (model trained on drawn people only)",
            sorted(p for p in out.glob("predict/photos/*") if p.suffix in (".jpg", ".png")),
        ),
        ("A frame of the predicted video", sorted(out.glob("predict/video/*.jpg"))[:1]),
    ]
    return [(t, files) for t, files in sections if files]


def write_report(out: Path, state: dict) -> Path:
    """report.html: the summary table and the pictures, every image inlined (opens offline)."""
    results = {k: v["result"] for k, v in state["stages"].items() if "result" in v}
    rows = summary_rows(results)
    timing = [(name, f"{v['seconds']:.0f} s") for name, v in state["stages"].items() if "seconds" in v]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sapiens demo</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td{border:1px solid #ccc;padding:4px 10px}"
        "img{max-width:100%;margin:4px;border:1px solid #ddd}h2{margin-top:1.5em}</style></head><body>",
        f"<h1>sapiens demo ({html.escape(state['mode'])})</h1>",
        "<p>Procedurally drawn people, a tiny ViT, CPU. Each stage was one <code>sapiens</code> command "
        "(see logs/).</p><h2>Summary</h2><table>",
        *[f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in rows],
        "</table><h2>Time per stage</h2><table>",
        *[f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in timing],
        "</table>",
    ]
    for title, files in _pictures(out):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts += [f"<img src='{_data_uri(f)}' title='{html.escape(f.name)}'>" for f in files]
    parts.append("</body></html>")
    path = out / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path


# ---- the chain ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict]
    needs: tuple[str, ...]
    """Stages whose outputs this one reads; skipping one of them skips this one."""
    what: str


STAGES: tuple[Stage, ...] = (
    Stage("synth", stage_synth, (), "procedural people: training and held-out val sets"),
    Stage("pack", stage_pack, ("synth",), "training images -> webdataset shards"),
    Stage("pretrain", stage_pretrain, ("pack",), "MAE pretraining from the shards (DeepSpeed)"),
    Stage("finetune", stage_finetune, ("synth", "pretrain"), "pose fine-tuning from the pretraining run"),
    Stage("scratch", stage_scratch, ("synth",), "the same fine-tuning from random weights"),
    Stage("eval", stage_eval, ("synth",), "OKS AP on the held-out people, overlays"),
    Stage("distill", stage_distill, ("finetune",), "a smaller student distilled from the fine-tuned model"),
    Stage("baseline", stage_baseline, ("synth",), "the same student on ground truth only"),
    Stage("export", stage_export, ("finetune",), "the student (or the fine-tuned model) as ONNX"),
    Stage("predict", stage_predict, ("finetune",), "keypoints on packaged photos and a generated video"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def _load_state(out: Path, quick: bool) -> dict:
    path = out / STATE_NAME
    if not path.is_file():
        return {"mode": "quick" if quick else "full", "stages": {}}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); delete it to start the demo again") from None
    mode = "quick" if quick else "full"
    if state.get("mode") != mode:
        raise UserError(
            f"{out} holds a {state.get('mode')} demo; run with{'' if state.get('mode') == 'quick' else 'out'} "
            f"--quick to continue it, or pass another --out"
        )
    return state


def _save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, out / STATE_NAME)


def run_demo(out: Path, *, quick: bool = False, skip: tuple[str, ...] = (), verbose: bool = False) -> dict:
    """Run the stages not yet done in `out`; returns the state (stage -> {seconds, result} or skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, quick)
    nproc = 2 if (os.cpu_count() or 1) >= 2 else 1
    ctx = Context(
        out=out,
        size=QUICK if quick else FULL,
        quick=quick,
        nproc=nproc,
        runner=Runner(out, verbose),
        results={k: v["result"] for k, v in state["stages"].items() if "result" in v},
    )
    state["size"] = asdict(ctx.size)
    skipped = set(skip)
    for i, stage in enumerate(STAGES, 1):
        head = f"[demo {i}/{len(STAGES)}] {stage.name}: {stage.what}"
        missing = [n for n in stage.needs if n in skipped]
        if stage.name in skipped or missing:
            why = "skipped" if stage.name in skipped else f"skipped (needs {', '.join(missing)})"
            print(f"{head} ... {why}", flush=True)
            skipped.add(stage.name)
            state["stages"][stage.name] = {"skipped": True}
            continue
        done = state["stages"].get(stage.name, {})
        if "result" in done:
            print(f"{head} ... done before ({done['seconds']:.0f} s)", flush=True)
            continue
        print(head, flush=True)
        t0 = time.perf_counter()
        result = stage.run(ctx)
        seconds = time.perf_counter() - t0
        ctx.results[stage.name] = result
        state["stages"][stage.name] = {"seconds": seconds, "result": result}
        _save_state(out, state)
        print(f"  done in {seconds:.0f} s", flush=True)
    _save_state(out, state)
    results = {k: v["result"] for k, v in state["stages"].items() if "result" in v}
    report = write_report(out, state)  # always redrawn: it shows every stage done so far
    print(f"\nsapiens demo: done in {out}\n{format_table(summary_rows(results))}", flush=True)
    print(f"  report: {report}", flush=True)
    return state


# ---- the command --------------------------------------------------------------------------------------


def add_demo_command(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole chain on drawn people: synth, pack, pretrain, fine-tune, eval, distil, export, predict",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--out", default="out/demo", help="the demo's folder (default out/demo); rerun to continue"
    )
    p.add_argument("--quick", action="store_true", help="a smaller chain in about a minute")
    p.add_argument(
        "--skip", nargs="+", default=[], choices=STAGE_NAMES, metavar="STAGE", help="stages to leave out"
    )
    p.add_argument(
        "--verbose", action="store_true", help="show every command's output, not only its log file"
    )
    p.set_defaults(func=run_demo_command)


def run_demo_command(args) -> int:
    out = Path(args.out)
    try:
        run_demo(out, quick=args.quick, skip=tuple(args.skip), verbose=args.verbose)
    except StageFailed as e:
        tail = e.log.read_text().splitlines()[-15:]
        print("\n".join("    " + line for line in tail), file=sys.stderr)
        raise UserError(
            f"stage {e.stage!r} failed (exit {e.code}); its log: {e.log}. Rerun it alone with "
            f"`cd {out} && {readable(e.command)}`, or continue the demo with `sapiens demo"
            f"{' --quick' if args.quick else ''} --out {out}`"
        ) from None
    return 0
