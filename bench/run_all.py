"""Every benchmark in one run, written as one Markdown table into docs/benchmarks.md.

    python bench/run_all.py                                   # CPU rows (~15 min on 2 idle cores) + distill gain (~20 min)
    python bench/run_all.py --distill-results runs/bench_distill/results.json   # reuse a distill_gain run
    python bench/run_all.py --quick --out /tmp/benchmarks.md  # tiny sizes: every row, meaningless figures
    python bench/run_all.py --skip distill --args mae="--steps 30"              # drop one, change another

Each benchmark runs as its own process, one after the other (its own matmul peak, nothing left over from
the previous one), writes its figures as JSON into `--json-dir` (with its log), and becomes rows of the table:

    data          bench/data_throughput.py   our shards + stream loader vs an image folder + torchvision
    mae           bench/mae_throughput.py    our MAE training step vs transformers ViTMAEForPreTraining
    decode        bench/inference.py --part decode   post-processing: heatmaps -> keypoints vs mmpose / transformers
    inference     bench/inference.py --part e2e      pose inference vs transformers VitPose (end-to-end, model)
    distill       bench/distill_gain.py      AP of distilled students against the ground-truth baseline

With CUDA (`torch.cuda.is_available()`) it also runs the GPU configurations of bench/gpu_check.sh and
bench/gpu_inference.sh (bf16): mae_gpu, mae_gpu_compile, largest_gpu, decode_gpu, inference_gpu,
inference_gpu_compile. Without it, the table shows the GPU figures recorded in docs/bench/inference_*.txt
and docs/bench/mae_*.txt (parsed from those logs, labelled with the file) and names the GPU rows not
measured yet.

Ratio = ours / reference of the two figures in the row; every figure is a throughput, so > 1 means ours
is faster. MFU = model FLOPs x throughput / the matmul peak measured in the same process. A benchmark that
fails (non-zero exit, timeout, no JSON, a row that failed inside it) becomes a "failed" row and the exit
status is 1; the table is written either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._peak import device_name  # noqa: E402


@dataclasses.dataclass
class Bench:
    name: str
    script: str
    """File under bench/."""
    args: list[str]
    timeout_s: int
    gpu: bool = False
    what: str = ""
    """The row label when the whole benchmark fails or is not measured."""


# What each benchmark measures (device, part, precision), the same with --quick.
MODE = {
    "data": [],
    "mae": ["--device", "cpu", "--dtype", "fp32"],
    "decode": ["--device", "cpu", "--part", "decode"],
    "inference": ["--device", "cpu", "--part", "e2e", "--no-compile", "--dtype", "fp32"],
    "mae_gpu": ["--device", "cuda", "--dtype", "bf16"],
    "mae_gpu_compile": ["--device", "cuda", "--dtype", "bf16", "--compile"],
    "largest_gpu": ["--device", "cuda", "--dtype", "bf16", "--find-largest"],
    "decode_gpu": ["--device", "cuda", "--part", "decode"],
    "inference_gpu": ["--device", "cuda", "--part", "e2e", "--no-compile", "--dtype", "bf16"],
    "inference_gpu_compile": ["--device", "cuda", "--part", "e2e", "--compile", "--dtype", "bf16"],
}
# Sizes. CPU: about 15 minutes on 2 idle cores for data + mae + decode + inference. GPU: those of
# bench/gpu_check.sh (MAE) and bench/gpu_inference.sh (decode, inference).
MAE_GPU = [
    "--arch",
    "sapiens_0.3b",
    "--size",
    "1024",
    "768",
    "--batch",
    "32",
    "--steps",
    "8",
    "--warmup",
    "3",
]
INFERENCE_GPU = [
    "--size",
    "1024",
    "768",
    "--batch",
    "32",
    "--e2e-batches",
    "2",
    "--steps",
    "3",
    "--warmup",
    "2",
]
SIZES = {
    "data": ["--num-images", "48", "--rounds", "5", "--seconds", "2"],
    "mae": ["--arch", "vit_small", "--size", "224", "224", "--batch", "8", "--warmup", "3", "--steps", "20"],
    "decode": ["--keypoints", "308", "--decode-batch", "8", "--decode-steps", "10"],
    "inference": ["--archs", "vit_base", "--size", "256", "192", "--batch", "8", "--e2e-batches", "4",
                  "--warmup", "2", "--steps", "7"],
    "mae_gpu": MAE_GPU,
    "mae_gpu_compile": MAE_GPU,
    "largest_gpu": ["--max-batch", "64"],  # as bench/gpu_check.sh: sapiens_0.3b..2b, 1024x768, within 79.1 GiB
    "decode_gpu": ["--keypoints", "308", "--decode-batch", "16", "--decode-steps", "10"],
    "inference_gpu": [*INFERENCE_GPU, "--archs", "sapiens_0.3b", "sapiens_1b"],
    "inference_gpu_compile": [*INFERENCE_GPU, "--archs", "sapiens_0.3b"],
}  # fmt: skip
# --quick: tiny models and a step or two, so that a test sees every row within a minute.
TINY_MAE = ["--arch", "vit_test", "--size", "64", "48", "--batch", "2", "--decoder-dim", "32", "--decoder-depth", "1",
            "--decoder-heads", "2", "--warmup", "1", "--steps", "2"]  # fmt: skip
TINY_INFERENCE = ["--archs", "vit_test", "--size", "64", "48", "--batch", "2", "--image-size", "96", "128",
                  "--e2e-batches", "1", "--warmup", "1", "--steps", "1"]  # fmt: skip
TINY_DECODE = ["--keypoints", "17", "--decode-batch", "1", "--decode-steps", "1"]
TINY = {
    "data": ["--num-images", "4", "--source-size", "240x320", "--batch", "2", "--rounds", "1", "--seconds", "0.05"],
    "mae": TINY_MAE,
    "decode": TINY_DECODE,
    "inference": TINY_INFERENCE,
    "mae_gpu": TINY_MAE,
    "mae_gpu_compile": TINY_MAE,
    "largest_gpu": ["--archs", "vit_test", "vit_tiny", "--size", "64", "48", "--max-batch", "2", "--decoder-dim", "32",
                    "--decoder-depth", "1", "--decoder-heads", "2"],
    "decode_gpu": TINY_DECODE,
    "inference_gpu": TINY_INFERENCE,
    "inference_gpu_compile": TINY_INFERENCE,
}  # fmt: skip


def plan(quick: bool) -> list[Bench]:
    """Every benchmark, in run order; the figures of --quick are for tests only."""
    sizes = {name: [*MODE[name], *(TINY if quick else SIZES)[name]] for name in MODE}
    t = 300 if quick else None  # seconds each: full sizes get room for a slow machine, --quick fails fast
    return [
        Bench("data", "data_throughput.py", sizes["data"], t or 1200, what="data throughput"),
        Bench("mae", "mae_throughput.py", sizes["mae"], t or 1800, what="MAE training"),
        Bench("decode", "inference.py", sizes["decode"], t or 600, what="post-processing (decode)"),
        Bench("inference", "inference.py", sizes["inference"], t or 1800, what="pose inference"),
        Bench("distill", "distill_gain.py", ["--smoke"] if quick else [], 900 if quick else 5400,
              what="distillation gain"),
        Bench("mae_gpu", "mae_throughput.py", sizes["mae_gpu"], t or 300, True, "MAE training (GPU)"),
        Bench("mae_gpu_compile", "mae_throughput.py", sizes["mae_gpu_compile"], t or 400, True,
              "MAE training, compiled (GPU)"),
        Bench("largest_gpu", "mae_throughput.py", sizes["largest_gpu"], t or 300, True,
              "largest MAE training batch in 79.1 GiB (GPU)"),
        Bench("decode_gpu", "inference.py", sizes["decode_gpu"], t or 120, True, "post-processing (GPU)"),
        Bench("inference_gpu", "inference.py", sizes["inference_gpu"], t or 400, True, "pose inference (GPU)"),
        Bench("inference_gpu_compile", "inference.py", sizes["inference_gpu_compile"], t or 400, True,
              "pose inference, compiled (GPU)"),
    ]  # fmt: skip


NAMES = [b.name for b in plan(False)]
GROUPS = {"cpu": [b.name for b in plan(False) if not b.gpu], "gpu": [b.name for b in plan(False) if b.gpu]}


# ---- running -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    figures: dict | None
    """The benchmark's JSON, None when it failed."""
    error: str = ""
    seconds: float = 0.0
    log: Path | None = None
    reused: bool = False
    """Read from --json-dir (--reuse), not run now."""


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def run_bench(bench: Bench, json_dir: Path, extra: list[str], gpu_dry: bool) -> Outcome:
    """The benchmark in its own process (own session, so a timeout takes its workers too)."""
    out = json_dir / ("distill" if bench.name == "distill" else f"{bench.name}.json")
    result = out / "results.json" if bench.name == "distill" else out
    result.unlink(missing_ok=True)
    log = json_dir / f"{bench.name}.log"
    args = [*bench.args, *extra]
    if bench.gpu and gpu_dry:  # SAPIENS_GPU_CHECK_DRY: the GPU configurations on the CPU (tests), in fp32:
        # a CPU without bf16 matmuls takes minutes for the matmul peak alone
        args = [{"cuda": "cpu", "bf16": "fp32"}.get(a, a) for a in args]
    cmd = [sys.executable, str(ROOT / "bench" / bench.script), *args, "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    print(f"[run_all] {bench.name}: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=bench.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    seconds = time.perf_counter() - t0
    if rc is None:
        error = f"timed out after {bench.timeout_s} s"
    elif rc != 0:
        error = f"exit {rc}: {last_line(log)}"
    elif not result.exists():
        error = f"wrote no {result.name}"
    else:
        figures = json.loads(result.read_text())
        print(f"[run_all] {bench.name}: done in {seconds:.0f} s", flush=True)
        return Outcome(figures, seconds=seconds, log=log)
    print(f"[run_all] {bench.name}: FAILED ({error}); log {log}", flush=True)
    return Outcome(None, error, seconds, log)


# ---- rows --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    benchmark: str
    device: str
    ours: float | str | None = None
    """A throughput (float, formatted with `unit`) or a preformatted cell."""
    reference: float | str | None = None
    unit: str = ""
    ratio: str = ""
    """Empty: ours / reference when both are numbers."""
    mfu: tuple[float | None, float | None] | None = None
    notes: str = ""
    status: str = "measured"
    """measured, failed, not measured, or "recorded: FILE" (parsed from a log in docs/bench/)."""

    def cells(self) -> list[str]:
        ours, ref = self.ours, self.reference
        ratio = self.ratio
        if not ratio and isinstance(ours, float) and isinstance(ref, float):
            ratio = f"{ours / ref:.2f}" if ours / ref < 100 else f"{ours / ref:.0f}"
        mfu = "n/a"
        if self.mfu is not None:
            mfu = " / ".join("—" if u is None else f"{100 * u:.1f}%" for u in self.mfu)
        label = self.benchmark + ("" if self.status == "measured" else f" [{self.status}]")
        return [
            label,
            self.device,
            figure(ours, self.unit),
            figure(ref, self.unit),
            ratio or "—",
            mfu,
            self.notes,
        ]


def figure(value: float | str | None, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    digits = 2 if value < 10 else 1 if value < 1000 else 0
    return f"{value:,.{digits}f} {unit}"


def failed_row(label: str, device: str, error: str, notes: str = "") -> Row:
    return Row(label, device, "failed", notes=f"{error}{'; ' if notes else ''}{notes}", status="failed")


def pair(rows: dict, ours: str, ref: str, key: str = "img_s") -> tuple:
    """(ours figure, reference figure, (ours MFU, reference MFU), error) of two rows of a benchmark's JSON."""
    a, b = rows.get(ours), rows.get(ref)
    errors = [f"{n}: {r.get('failed', 'failed') if r else 'failed'}" for n, r in ((ours, a), (ref, b))
              if not r or key not in r]  # fmt: skip
    value = lambda r: r[key] if r and key in r else None  # noqa: E731
    mfu = lambda r: r.get("mfu") if r else None  # noqa: E731
    return value(a), value(b), (mfu(a), mfu(b)), "; ".join(errors)


def rows_data(js: dict) -> list[Row]:
    settings = (f"{js['images']} JPEG photos {js['source_size'][0]}x{js['source_size'][1]}, batch {js['batch']}, "
                f"single process; ours: shards + stream + MAEDecode; reference: image folder + torchvision "
                "RandomResizedCrop + flip")  # fmt: skip
    rows = []
    for size, r in js["sizes"].items():
        rows.append(Row(f"data throughput, MAE crops {size}", js["device"], r["ours_img_s"], r["reference_img_s"],
                        "img/s", notes=f"{settings}; paired-round ratio {r['ratio']:.2f}"))  # fmt: skip
    for size, r in js["sizes"].items():
        if "decoders_img_s" not in r:
            continue
        d = dict(r["decoders_img_s"])
        ours = d.pop("ours: PIL+cv2")
        best = max(d, key=d.get)
        others = ", ".join(f"{k} {v:.0f}" for k, v in d.items())
        rows.append(Row(f"JPEG decode + crop to {size}: ours (PIL + cv2) vs fastest other ({best})", js["device"],
                        ours, d[best], "img/s", notes=f"one JPEG at a time; img/s of the others: {others}"))  # fmt: skip
    return rows


def rows_mae(js: dict, compiled: bool | None = None, status: str = "measured", source: str = "") -> list[Row]:
    """`compiled` None = all rows, True/False = only the compiled / the eager ones."""
    h, w = js["size"]
    settings = (f"{js['arch']} {h}x{w}, batch {js['batch']}, {js['dtype']}, decoder {js.get('decoder', '?')}, "
                f"mask 0.75, norm-pix loss, median of {js.get('steps', '?')} steps; "
                f"{js['flops_per_image'] / 1e9:.1f} GFLOP/img, peak {js['peak_tflops']:.3g} TFLOP/s")  # fmt: skip
    rows = []
    for ours, ref in (("ours", "transformers"), ("ours+compile", "transformers+compile"),
                      ("ours+compile-full", "transformers+compile")):  # fmt: skip
        if ours not in js["rows"] or (compiled is not None and compiled != ("compile" in ours)):
            continue
        label = f"MAE training {js['arch']}, {ours} vs {ref} ViTMAE"
        a, b, mfu, error = pair(js["rows"], ours, ref)
        opt = (js["rows"].get(ours) or {}).get("opt"), (js["rows"].get(ref) or {}).get("opt")
        notes = f"{settings}; optimizer {opt[0]} vs {opt[1]}{source}"
        if error:
            rows.append(Row(label, js["device"], a if a else "failed", b if b else "failed", "img/s", mfu=mfu,
                            notes=f"{error}; {notes}", status="failed"))  # fmt: skip
        else:
            rows.append(Row(label, js["device"], a, b, "img/s", mfu=mfu, notes=notes, status=status))
    return rows


def rows_largest(js: dict, status: str = "measured", source: str = "") -> list[Row]:
    """One row per size: the largest power-of-two batch that trains within the memory cap (no reference)."""
    h, w = js["size"]
    settings = (f"{h}x{w}, {js['dtype']} autocast, fp32 weights + fused AdamW state, activation checkpointing"
                f"{', compiled blocks' if js.get('compile') else ''}, one device, no ZeRO; batches 1, 2, 4, ... up "
                f"to {js['max_batch']}; img/s at that batch; peak {js['peak_tflops']:.3g} TFLOP/s")  # fmt: skip
    rows = []
    for r in js["rows"]:
        label = f"largest MAE training batch in {js['memory_gb']:g} GiB, {r['arch']}"
        if "peak_gib" not in r:
            rows.append(
                Row(label, js["device"], "batch 1 does not fit", notes=settings + source, status=status)
            )
            continue
        capped = " (every batch tried fitted)" if r["capped"] else ""
        ours = f"batch {r['batch']}{'+' if r['capped'] else ''}{capped}, {r['peak_gib']:.1f} GiB, {r['img_s']:.1f} img/s"
        rows.append(
            Row(label, js["device"], ours, mfu=(r["mfu"], None), notes=settings + source, status=status)
        )
    return rows


def rows_decode(js: dict, device: str, status: str = "measured", source: str = "") -> list[Row]:
    d = js["decode"]
    ms = d["ms_per_person"]
    h, w = d["heatmap_size"]
    rows = []
    for key in ms:
        if not key.startswith("ours ") or key.startswith("ours flip"):
            continue
        dtype = key.split()[1]
        for ref, what in (("mmpose", "mmpose DARK-UDP loop (numpy + cv2)"),
                          ("transformers", "transformers post_process_pose_estimation")):  # fmt: skip
            if ref not in ms:
                continue
            notes = (f"{d['keypoints']} keypoints, heatmaps {h}x{w}, {dtype} heatmaps; ours: batched torch on "
                     f"a batch of {d['batch']} ({ms[key]:.2f} ms/person, flip-test merge "
                     f"{ms.get('ours flip merge ' + dtype, float('nan')):.2f} ms/person); reference: one person on "
                     f"the CPU ({ms[ref]:.1f} ms){source}")  # fmt: skip
            rows.append(Row(f"post-processing: decode {d['keypoints']} keypoints, {dtype}, vs {what}", device,
                            1e3 / ms[key], 1e3 / ms[ref], "people/s", notes=notes, status=status))  # fmt: skip
    return rows


def rows_inference(
    js: dict, compiled: bool | None = None, status: str = "measured", source: str = ""
) -> list[Row]:
    """Rows of the e2e part: `compiled` None = all rows, True/False = only the compiled / the eager ones."""
    e = js["e2e"]
    rows = []
    for arch, r in e["archs"].items():
        ih, iw = r["image_size"]
        settings = (f"{arch} {e['size'][0]}x{e['size'][1]} crops, {e['keypoints']} keypoints, batch {e['batch']}, "
                    f"{e['dtype']}; {r['flops_per_crop'] / 1e9:.1f} GFLOP/crop, peak {e['peak_tflops']:.3g} TFLOP/s; "
                    f"heatmaps ours vs transformers max rel diff {r['max_rel_diff']:.0e}")  # fmt: skip
        for suffix in ("", "+compile"):
            if compiled is not None and compiled != bool(suffix):
                continue
            for part, what in (("e2e", f"end-to-end ({r['images_per_e2e_step']} images {ih}x{iw}, one box "
                                       "each: crop + model + decode, no flip)"),
                               ("model", "model only (same normalised batch)")):  # fmt: skip
                ours, ref = f"ours{suffix} {part}", f"transformers{suffix} {part}"
                if ours not in r["rows"] and ref not in r["rows"]:
                    continue
                label = f"pose inference {part} {arch}, ours{suffix} vs transformers{suffix} VitPose"
                a, b, mfu, error = pair(r["rows"], ours, ref)
                notes = f"{what}; {settings}{source}"
                if error:
                    rows.append(Row(label, js["device"], a if a else "failed", b if b else "failed", "img/s", mfu=mfu,
                                    notes=f"{error}; {notes}", status="failed"))  # fmt: skip
                else:
                    rows.append(Row(label, js["device"], a, b, "img/s", mfu=mfu, notes=notes, status=status))
    return rows


def ap_spread(values: list[float]) -> str:
    """AP points (x100): 'mean ± sample std (min..max)' over seeds."""
    v = [100 * x for x in values]
    mean = sum(v) / len(v)
    sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f} ({min(v):.1f}..{max(v):.1f})"


def rows_distill(results: dict, source: str) -> list[Row]:
    runs, p = results["runs"], results["plan"]
    seeds = p["seeds"]
    device = results.get("device", "not recorded")
    settings = (f"{len(seeds)} seeds, {p['train_images']} synthesized train images, {p['val_images']} val; "
                f"teacher {p['teacher_steps']} steps, students {p['student_steps']} (+{p['stage2_steps']} stage 2, "
                f"{p['backbone_steps']} backbone); OKS AP, GT boxes, flip test; {source}")  # fmt: skip

    def aps(kind: str) -> list[float | None]:
        return [(runs.get(f"{kind}_s{s}") or {}).get("AP") for s in seeds]

    teacher = (runs.get("teacher") or {}).get("AP")
    if teacher is None:
        rows = [
            failed_row("distillation: teacher AP (128x96, 128 wide, 4 blocks)", device, "no AP", settings)
        ]
    else:
        rows = [Row("distillation: teacher AP (128x96, 128 wide, 4 blocks)", device, f"{100 * teacher:.1f} AP",
                    notes=settings)]  # fmt: skip
    base = aps("baseline")
    student = results.get("student", "student of configs/distill/tiny_cpu_coco17.yaml")
    for kind, label in (
        ("stage1", "stage 1"),
        ("stage2", "stage 1 + 2"),
        ("backbone_ft", "distilled backbone + FT"),
    ):
        name = f"distillation gain: student {label} vs ground-truth baseline ({student})"
        values = aps(kind)
        if None in values or None in base:
            missing = [
                f"{k}_s{s}"
                for k, v in ((kind, values), ("baseline", base))
                for s, x in zip(seeds, v)
                if x is None
            ]
            rows.append(failed_row(name, device, "no AP for " + ", ".join(missing), settings))
            continue
        gain = ap_spread([a - b for a, b in zip(values, base)])
        rows.append(Row(name, device, f"{ap_spread(values)} AP", f"{ap_spread(base)} AP",
                        ratio=f"gain {gain}", notes=settings))  # fmt: skip
    return rows


# ---- what docs/bench/ recorded ------------------------------------------------------------------------

E2E_HEAD = re.compile(
    r"End-to-end pose inference: (?P<arch>\S+) \((?P<params>[\d.]+) M params.*?crops (?P<h>\d+)x(?P<w>\d+), "
    r"(?P<k>\d+) keypoints, batch (?P<batch>\d+), (?P<dtype>\w+), device \w+ \((?P<device>[^)]+)\); "
    r"e2e = (?P<n>\d+) images of (?P<ih>\d+)x(?P<iw>\d+)"
)
E2E_FLOPS = re.compile(
    r"model FLOPs per crop: (?P<gflop>[\d.]+) GFLOP; measured matmul peak (?P<peak>[\d.]+) TFLOP/s.*?"
    r"max rel diff (?P<diff>[\d.e+-]+)"
)
E2E_ROW = re.compile(r"^(?P<name>(?:ours|transformers)(?:\+compile)? (?:e2e|model))\s+(?P<ms>[\d.]+)\s+"
                     r"(?P<img_s>[\d.]+)\s+(?P<mfu>[\d.]+)%$")  # fmt: skip
DECODE_HEAD = re.compile(
    r"Decoding (?P<k>\d+) keypoints per person, heatmaps (?P<h>\d+)x(?P<w>\d+) .*?batch (?P<batch>\d+), "
    r"device (?P<device>\w+)"
)
DECODE_ROW = {
    re.compile(r"^ours: decode \+ to image \(torch, batched\), (\w+) heatmaps\s+([\d.]+)$"): "ours {}",
    re.compile(
        r"^ours: flip-test merge \(mean with the mirrored maps\), (\w+)\s+([\d.]+)$"
    ): "ours flip merge {}",
    re.compile(r"^reference: mmpose DARK-UDP per keypoint.*?()\s+([\d.]+)$"): "mmpose",
    re.compile(r"^reference: transformers post_process_pose_estimation.*?()\s+([\d.]+)$"): "transformers",
}


def parse_inference_log(text: str) -> dict:
    """The figures of a bench/inference.py log (its printed tables), as its `--out` JSON would hold them."""
    js: dict = {}
    arch = None
    for line in text.splitlines():
        line = line.strip()
        if m := DECODE_HEAD.search(line):
            js["device"] = m["device"]
            js["decode"] = {"keypoints": int(m["k"]), "heatmap_size": [int(m["h"]), int(m["w"])],
                            "batch": int(m["batch"]), "ms_per_person": {}}  # fmt: skip
        elif m := E2E_HEAD.search(line):
            js["device"] = m["device"]
            e = js.setdefault("e2e", {"size": [int(m["h"]), int(m["w"])], "batch": int(m["batch"]),
                                      "dtype": m["dtype"], "keypoints": int(m["k"]), "archs": {}})  # fmt: skip
            arch = m["arch"]
            e["archs"][arch] = {"arch": arch, "params": float(m["params"]) * 1e6, "images_per_e2e_step": int(m["n"]),
                                "image_size": [int(m["ih"]), int(m["iw"])], "rows": {}}  # fmt: skip
        elif (m := E2E_FLOPS.search(line)) and arch:
            js["e2e"]["peak_tflops"] = float(m["peak"])
            js["e2e"]["archs"][arch].update(
                flops_per_crop=float(m["gflop"]) * 1e9, max_rel_diff=float(m["diff"])
            )
        elif (m := E2E_ROW.match(line)) and arch:
            js["e2e"]["archs"][arch]["rows"][m["name"]] = {
                "step_s": float(m["ms"]) / 1e3, "img_s": float(m["img_s"]), "mfu": float(m["mfu"]) / 100}  # fmt: skip
        elif "decode" in js:
            for pattern, key in DECODE_ROW.items():
                if m := pattern.match(line):
                    js["decode"]["ms_per_person"][key.format(m[1])] = float(m[2])
    return js


MAE_HEAD = re.compile(
    r"MAE training throughput: (?P<arch>\S+) \(.*?\), (?P<h>\d+)x(?P<w>\d+), batch (?P<batch>\d+), (?P<dtype>\w+), "
    r"device \w+ \((?P<device>[^)]+)\), decoder (?P<decoder>\w+)"
)
MAE_FLOPS = re.compile(
    r"model FLOPs per training image: (?P<gflop>[\d.]+) GFLOP; measured matmul peak (?P<peak>[\d.]+)"
)
MAE_ROW = re.compile(r"^(?P<name>(?:ours|transformers)(?:\+compile(?:-full)?)?)\s+(?P<ms>[\d.]+)\s+(?P<img_s>[\d.]+)\s+"
                     r"(?P<mfu>[\d.]+)%\s+(?P<opt>.+)$")  # fmt: skip
LARGEST_HEAD = re.compile(
    r"Largest batch per device within (?P<gb>[\d.]+) GiB \((?P<dtype>\w+) autocast, (?P<what>.*?), "
    r"(?P<h>\d+)x(?P<w>\d+)\), (?P<device>.+), matmul peak (?P<peak>[\d.]+) TFLOP/s:"
)
LARGEST_ROW = re.compile(r"^(?P<arch>\S+)\s+(?P<batch>\d+)(?P<capped>\+?)\s+(?P<gib>[\d.]+)\s+(?P<img_s>[\d.]+)\s+"
                         r"(?P<mfu>[\d.]+)%$")  # fmt: skip
MAX_BATCH = re.compile(r"--max-batch (\d+)")


def parse_mae_log(text: str) -> dict:
    """The figures of a bench/mae_throughput.py log (training comparison, or --find-largest), as its JSON."""
    js: dict = {}
    for line in text.splitlines():
        line = line.strip()
        if m := MAE_HEAD.search(line):
            js.update(benchmark="mae_training", device=m["device"], arch=m["arch"], size=[int(m["h"]), int(m["w"])],
                      batch=int(m["batch"]), dtype=m["dtype"], decoder=m["decoder"], rows={})  # fmt: skip
        elif (m := MAE_FLOPS.search(line)) and "rows" in js:
            js.update(flops_per_image=float(m["gflop"]) * 1e9, peak_tflops=float(m["peak"]))
        elif (m := MAE_ROW.match(line)) and "rows" in js:
            js["rows"][m["name"]] = {"step_s": float(m["ms"]) / 1e3, "img_s": float(m["img_s"]),
                                     "mfu": float(m["mfu"]) / 100, "opt": m["opt"].strip()}  # fmt: skip
        elif m := LARGEST_HEAD.search(line):
            js.update(benchmark="largest_batch", device=m["device"], memory_gb=float(m["gb"]), dtype=m["dtype"],
                      size=[int(m["h"]), int(m["w"])], compile="compiled blocks" in m["what"],
                      peak_tflops=float(m["peak"]), rows=[])  # fmt: skip
        elif (m := LARGEST_ROW.match(line)) and js.get("benchmark") == "largest_batch":
            js["rows"].append({"arch": m["arch"], "batch": int(m["batch"]), "capped": bool(m["capped"]),
                               "peak_gib": float(m["gib"]), "img_s": float(m["img_s"]),
                               "mfu": float(m["mfu"]) / 100})  # fmt: skip
        elif m := MAX_BATCH.search(line):  # the command line a recorded log starts with
            js["max_batch"] = int(m[1])
    if js.get("benchmark") == "largest_batch":
        top = js.get("max_batch")
        for r in js["rows"]:  # logs from before the "+" marker: capped when the batch reached --max-batch
            r["capped"] = r["capped"] or r["batch"] == top
        js.setdefault("max_batch", max((r["batch"] for r in js["rows"]), default=0))
    return js


def recorded_rows(folder: Path) -> dict[str, list[Row]]:
    """Rows of the GPU logs in `folder` (inference_*.txt, mae_*.txt), by the GPU benchmark that would
    measure them."""
    by_bench: dict[str, list[Row]] = {"decode_gpu": [], "inference_gpu": [], "inference_gpu_compile": [],
                                      "mae_gpu": [], "mae_gpu_compile": [], "largest_gpu": []}  # fmt: skip
    for path in sorted(folder.glob("mae_*.txt")):
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        source, status = f"; recorded in {rel}", f"recorded: {path.name}"
        js = parse_mae_log(path.read_text())
        if js.get("benchmark") == "mae_training" and js["rows"]:
            by_bench["mae_gpu"] += rows_mae(js, False, status, source)
            by_bench["mae_gpu_compile"] += rows_mae(js, True, status, source)
        elif js.get("benchmark") == "largest_batch" and js["rows"]:
            by_bench["largest_gpu"] += rows_largest(js, status, source)
        else:
            by_bench["mae_gpu"].append(failed_row(f"recorded GPU figures ({rel})", "?", "no table found"))
    for path in sorted(folder.glob("inference_*.txt")):
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        source, status = f"; recorded in {rel}", f"recorded: {path.name}"
        js = parse_inference_log(path.read_text())
        if "decode" in js and js["decode"]["ms_per_person"]:
            by_bench["decode_gpu"] += rows_decode(js, js["device"], status, source)
        if "e2e" in js:
            by_bench["inference_gpu"] += rows_inference(js, False, status, source)
            by_bench["inference_gpu_compile"] += rows_inference(js, True, status, source)
        if not ("decode" in js or "e2e" in js):
            by_bench["inference_gpu"].append(
                failed_row(f"recorded GPU figures ({rel})", "?", "no table found")
            )
    for row in (r for rows in by_bench.values() for r in rows):
        row.benchmark += " (GPU)"
    return by_bench


# ---- the document ------------------------------------------------------------------------------------

COLUMNS = [
    "benchmark",
    "device",
    "ours",
    "reference",
    "ratio ours / ref",
    "MFU ours / ref",
    "settings, notes",
]


def markdown(header: list[str], rows: list[Row], footer: list[str]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    table = [
        line(COLUMNS),
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
        *(line(r.cells()) for r in rows),
    ]
    return "\n".join([*header, "", *table, "", *footer]) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="the Markdown file to write")
    p.add_argument(
        "--json-dir", default=str(ROOT / "runs" / "bench_all"), help="each benchmark's JSON and log"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, a step or two: checks that every row comes out"
    )
    p.add_argument("--skip", nargs="+", default=[], choices=[*NAMES, *GROUPS], metavar="NAME",
                   help=f"benchmarks not to run: {', '.join(NAMES)}, or the groups cpu, gpu")  # fmt: skip
    p.add_argument(
        "--distill-results", help="reuse this bench/distill_gain.py results.json instead of running it"
    )
    p.add_argument("--args", nargs="+", default=[], metavar="NAME=ARGS",
                   help='extra arguments for one benchmark, appended to its own (e.g. mae="--steps 30")')  # fmt: skip
    p.add_argument("--recorded", default=str(ROOT / "docs" / "bench"), help="folder of recorded GPU logs")
    p.add_argument("--reuse", action="store_true",
                   help="a benchmark whose JSON an earlier run left in --json-dir is not run again: its figures "
                        "are read from there (e.g. to rewrite the table after new GPU logs were recorded)")  # fmt: skip
    args = p.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, _, value = item.partition("=")
        if name not in NAMES or not _:
            p.error(f"--args {item!r}: expected NAME=ARGS with NAME one of {', '.join(NAMES)}")
        extra[name] = extra.get(name, []) + shlex.split(value)
    if args.distill_results and not Path(args.distill_results).is_file():
        p.error(f"--distill-results {args.distill_results}: no such file")
    skip = {n for s in args.skip for n in GROUPS.get(s, [s])}
    # as in bench/gpu_check.sh: SAPIENS_GPU_CHECK_DRY runs the GPU configurations on the CPU
    gpu_dry = bool(os.environ.get("SAPIENS_GPU_CHECK_DRY"))
    has_gpu = torch.cuda.is_available() or gpu_dry
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)

    outcomes: dict[str, Outcome] = {}
    benches = plan(args.quick)
    for bench in benches:
        if bench.name in skip or (bench.gpu and not has_gpu):
            continue
        if bench.name == "distill" and args.distill_results:
            continue
        earlier = json_dir / f"{bench.name}.json"
        if args.reuse and earlier.is_file():
            outcomes[bench.name] = Outcome(json.loads(earlier.read_text()), log=earlier, reused=True)
            continue
        outcomes[bench.name] = run_bench(bench, json_dir, extra.get(bench.name, []), gpu_dry)

    cpu = device_name("cpu")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    recorded = recorded_rows(Path(args.recorded))
    build = {
        "data": rows_data,
        "mae": rows_mae,
        "decode": lambda js: rows_decode(js, js["device"]),
        "inference": rows_inference,
        "mae_gpu": rows_mae,
        "mae_gpu_compile": lambda js: rows_mae(js, compiled=True),
        "largest_gpu": rows_largest,
        "decode_gpu": lambda js: rows_decode(js, js["device"]),
        "inference_gpu": rows_inference,
        "inference_gpu_compile": lambda js: rows_inference(js, compiled=True),
    }
    rows: list[Row] = []
    not_measured: list[str] = []
    for bench in benches:
        device = (gpu or "GPU") if bench.gpu and not gpu_dry else cpu
        # the command as it ran (SAPIENS_GPU_CHECK_DRY aside), minus --out
        settings = "`" + shlex.join([f"bench/{bench.script}", *bench.args, *extra.get(bench.name, [])]) + "`"
        if bench.name == "distill" and args.distill_results and bench.name not in skip:
            path = Path(args.distill_results)
            rows += rows_distill(json.loads(path.read_text()), f"from {path}")
            continue
        outcome = outcomes.get(bench.name)
        if outcome is None:
            if bench.gpu and bench.name in recorded and recorded[bench.name]:
                rows += recorded[bench.name]
            elif bench.gpu:
                why = "skipped" if bench.name in skip else "no GPU in this run"
                rows.append(Row(bench.what, "GPU", "not measured yet", notes=f"{why}; {settings}",
                                status="not measured"))  # fmt: skip
                not_measured.append(bench.name)
            else:
                rows.append(Row(bench.what, cpu, "skipped", notes=settings, status="not measured"))
            continue
        if outcome.figures is None:
            rows.append(failed_row(bench.what, device, outcome.error, f"log {outcome.log}; {settings}"))
            continue
        try:
            if bench.name == "distill":
                made = rows_distill(outcome.figures, f"{json_dir / 'distill' / 'results.json'}")
            else:
                made = build[bench.name](outcome.figures)
        except (KeyError, TypeError, ValueError) as e:  # a JSON without the expected figures
            made = [failed_row(bench.what, device, f"unreadable figures: {type(e).__name__}: {e}", settings)]
        if not made:
            made = [failed_row(bench.what, device, "no figures in its JSON", settings)]
        for r in made:
            r.benchmark += " (GPU)" if bench.gpu else ""  # the CPU rows have the same labels
            if r.status != "failed" and bench.name != "distill":
                r.notes += f"; {settings}"
        rows += made

    peaks = []
    for name, outcome in outcomes.items():
        js = outcome.figures or {}
        peak = js.get("peak_tflops") or (js.get("e2e") or {}).get("peak_tflops")
        if peak:
            dtype = js.get("dtype") or js["e2e"]["dtype"]
            peaks.append(f"{peak:.3g} TFLOP/s {dtype} on {js['device']} ({name})")
    failed = [r for r in rows if r.status == "failed"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import transformers

    header = [
        "# Benchmarks",
        "",
        f"Written by `python bench/run_all.py{' ' + shlex.join(argv if argv is not None else sys.argv[1:])}` on {now}"
        + (" with **--quick: tiny sizes, the figures mean nothing**" if args.quick else "")
        + ". Each benchmark ran in its own process, one after the other; their JSON and logs: "
        + f"`{json_dir}`.",
        "",
        f"- devices: {cpu}; GPU {gpu or 'none (torch.cuda.is_available() is False)'}"
        + (" (SAPIENS_GPU_CHECK_DRY: the GPU configurations ran on the CPU, in fp32)" if gpu_dry else ""),
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- measured matmul peak (each process measures its own): {'; '.join(peaks) or 'none measured'}",
        "- ratio = ours / reference of the row's two figures, all throughputs: > 1 means ours is faster. "
        "MFU = model FLOPs x throughput / that peak, ours / reference (n/a: no model FLOPs). "
        "Distillation rows: AP x 100 as mean ± sample std (min..max) over seeds, gain = per-seed difference.",
        "- [recorded: FILE]: parsed from that log in docs/bench/, not measured in this run; "
        "[not measured]: GPU rows still to measure (`python bench/run_all.py` on a GPU machine).",
    ]
    if failed:
        header.append(f"- **{len(failed)} failed row(s)**: see their notes and logs.")
    times = [
        f"{n} {'reused from ' + str(o.log) if o.reused else f'{o.seconds:.0f} s'}"
        for n, o in outcomes.items()
    ]
    footer = [f"Wall time: {', '.join(times) or 'none'}."]
    write_atomic(Path(args.out), markdown(header, rows, footer))
    print(f"[run_all] wrote {args.out}: {len(rows)} rows, {len(failed)} failed, not measured: "
          f"{', '.join(not_measured) or 'none'}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
