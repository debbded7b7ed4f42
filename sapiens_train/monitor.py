"""What a run shows and records: tqdm bar, JSONL log, TensorBoard scalars, throughput and MFU, plots.

Only rank 0 writes. `log.jsonl` holds one JSON object per log step
(`{"step": 100, "loss": 0.61, "lr": 1.2e-4, "img_per_s": 812.0, "mfu": 0.41, "mem_gib": 61.2, ...}`);
`plot_log` draws it. `mem_gib` is rank 0's peak memory in the window (`peak_memory_gib`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

# bf16 matmul peaks (TFLOP/s, one device), matched against the device name. H100/H200: an 8192^3 bf16
# matmul measured at 788-798 TFLOP/s on random data (the datasheet's dense 989 is not reached in practice);
# A100: datasheet dense bf16. MFU is reported against these practical peaks.
PEAK_BF16_TFLOPS = {"H200": 790.0, "H100": 798.0, "A100": 312.0}


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None, seconds: float = 0.2
) -> float:
    """Achieved TFLOP/s of a square matmul on `device`: the practical peak when no table entry applies.

    The operands come from a generator of their own: the global random streams (which a resumed run
    restores exactly) are never touched.
    """
    n = n or (4096 if device.type == "cuda" else 512)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up (kernel selection, thread pools)
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        sync()
        if time.perf_counter() - t0 > seconds or reps >= 50:
            break
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


class PeakMeter:
    """The peak TFLOP/s of one device that MFU is reported against, and where it comes from.

    `engine.peak_tflops` from the config wins; then the table of known GPUs (bf16); else a matmul
    measured on the device (the median of five short ones). A CPU is shared with the loader workers
    and other processes, whose load moves both the training speed and the peak: there the peak is
    measured again (median of three) for every log window, so MFU compares the two under the same load
    (a single measurement at start-up on a busy machine gave MFU of 800 %).
    """

    def __init__(self, device: torch.device, precision: str, configured: float | None = None):
        self.device = device
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        # CPU bf16 matmuls are ~100x slower than fp32 ones: a smaller one measures the same rate.
        self.n = 256 if (device.type == "cpu" and self.dtype == torch.bfloat16) else None
        self.remeasure = False
        if configured is not None:
            self.value, self.source = configured, "engine.peak_tflops (config)"
            return
        if device.type == "cuda" and precision == "bf16":
            name = torch.cuda.get_device_name(device)
            for key, value in PEAK_BF16_TFLOPS.items():
                if key in name:
                    self.value, self.source = value, f"the table of known GPUs ({name}, bf16)"
                    return
        self.remeasure = device.type == "cpu"
        self.value = self._measure(5)
        what = str(self.dtype).removeprefix("torch.")
        when = "measured again in every log window" if self.remeasure else "measured at start-up"
        self.source = f"a {what} matmul on {device.type}, median of short runs, {when}"

    def _measure(self, runs: int) -> float:
        seconds = 0.05 if self.device.type == "cpu" else 0.2
        return statistics.median(
            measure_matmul_tflops(self.device, self.dtype, self.n, seconds) for _ in range(runs)
        )

    def current(self) -> float:
        """The peak for the window just ended (measured again on a CPU)."""
        if self.remeasure:
            self.value = self._measure(3)
        return self.value

    def describe(self) -> str:
        return (
            f"a peak of {self.value:.3g} TFLOP/s per device from {self.source} (engine.peak_tflops sets it)"
        )


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last call, GiB: CUDA tensors' allocation on `device` (then reset, so each
    log window shows its own peak); on a CPU the process's peak resident set since start (it cannot be reset)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def mfu(flops_per_sample: float | None, samples_per_s: float, peak: float, world_size: int) -> float | None:
    """Model FLOPs utilisation: training = 3x forward FLOPs (forward + 2x backward), over all devices' peak."""
    if not flops_per_sample or not peak:
        return None
    return 3.0 * flops_per_sample * samples_per_s / (peak * 1e12 * world_size)


class RunLogger:
    """Rank-0 progress bar + JSONL + TensorBoard; on other ranks every method does nothing."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        initial_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
    ):
        self.enabled = enabled
        self.jsonl_path = Path(run_dir) / "log.jsonl"
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        # A rerun continues the log from the step it resumed at: records the interrupted run wrote after
        # its checkpoint are dropped (they will be written again), so every step appears once.
        truncate_jsonl(self.jsonl_path, initial_step)
        self._jsonl = open(self.jsonl_path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    "tensorboard is not installed; TensorBoard logging is off (pip install tensorboard)",
                    stacklevel=2,
                )
            else:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def log(self, step: int, values: dict) -> None:
        """One JSONL line, TensorBoard scalars under `train/`, and the bar's postfix."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            post = {k: values[k] for k in ("loss", "lr", "img_per_s", "mem_gib") if values.get(k) is not None}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in post.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Keep only the records of a JSONL log with "step" <= last_step (atomically); lines that do not
    parse (a write cut by a kill) go too. Nothing happens when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def read_log(jsonl_path: str | Path) -> list[dict]:
    """The records of a log.jsonl; after a resume the last record of each step wins."""
    by_step: dict[int, dict] = {}
    for line in Path(jsonl_path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_log(jsonl_path: str | Path, png_path: str | Path) -> Path:
    """Loss (log scale) and lr curves of a run's log.jsonl into a PNG (matplotlib, imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(jsonl_path)
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    loss = [r.get("loss") for r in records]
    ax_loss.plot(steps, [float("nan") if v is None else v for v in loss])
    ax_loss.set_ylabel("loss")
    if all(v is None or v > 0 for v in loss):
        ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in records], color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(str(Path(jsonl_path).parent.name))
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
