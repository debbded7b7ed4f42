"""What a run shows and records: tqdm bar, JSONL log, TensorBoard scalars, throughput and MFU, plots.

Only rank 0 writes. `log.jsonl` holds one JSON object per log step
(`{"step": 100, "loss": 0.61, "lr": 1.2e-4, "img_per_s": 812.0, "mfu": 0.41, "mem_gib": 61.2, ...}`);
`plot_log` draws it. `mem_gib` is rank 0's peak memory in the window (`peak_memory_gib`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import torch

# bf16 matmul peaks (TFLOP/s, one device), matched against the device name. H100/H200: an 8192^3 bf16
# matmul measured at 788-798 TFLOP/s on random data (the datasheet's dense 989 is not reached in practice);
# A100: datasheet dense bf16. MFU is reported against these practical peaks.
PEAK_BF16_TFLOPS = {"H200": 790.0, "H100": 798.0, "A100": 312.0}


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None
) -> float:
    """Achieved TFLOP/s of a square matmul on `device`: the practical peak when no table entry applies."""
    n = n or (4096 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

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
        if time.perf_counter() - t0 > 0.2 or reps >= 50:
            break
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def peak_tflops(device: torch.device, precision: str, configured: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where it came from): the config, the GPU table (bf16), or a measured matmul."""
    if configured is not None:
        return configured, "config"
    if device.type == "cuda" and precision == "bf16":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value, f"table ({name})"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 256 if (device.type == "cpu" and dtype == torch.bfloat16) else None  # CPU bf16 matmuls are slow
    # Best of three: on a busy machine one short measurement can land far under the real peak (MFU > 100 %).
    best = max(measure_matmul_tflops(device, dtype, n) for _ in range(3))
    return best, f"measured {dtype} matmul (best of 3)"


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
        self._jsonl = open(self.jsonl_path, "a")  # appended: a resumed run continues the same log
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
