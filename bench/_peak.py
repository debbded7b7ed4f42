"""Measured matmul peak of the current device, the denominator of every MFU figure in bench/.

    peak = measure_matmul_peak(torch.device("cpu"), torch.float32)    # TFLOP/s
    print(f"MFU {mfu(achieved_flops_per_s, peak):.1%}")

A datasheet peak is not what a CPU (or a power-capped GPU) delivers; a large square matmul timed in
the same process is the practical ceiling, so MFU here says how close the model runs to it.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    device: torch.device | str, dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 10
) -> float:
    """TFLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs), median of `reps` timed runs after warmup."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e12


def mfu(flops_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the measured peak (a fraction)."""
    return flops_per_s / (peak_tflops * 1e12)


def device_name(device: torch.device | str) -> str:
    """What the figures were measured on: the GPU's name, or the CPU with its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    model = platform.processor() or platform.machine()
    try:  # Linux names the model ("AMD EPYC 9654 96-Core Processor"); platform only the architecture
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def write_json(path: str, obj: dict) -> None:
    """A benchmark's figures as JSON (written atomically), for bench/run_all.py."""
    import json
    import os

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
