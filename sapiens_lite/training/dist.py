"""Process group set-up (single process, torchrun, deepspeed launcher), seeds and RNG states.

The deepspeed module is passed in by the trainer; this package never imports it.
"""

from __future__ import annotations

import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist

from sapiens_lite.errors import UserError


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> bool:
    """Without a launcher, fill in the env:// variables for a world of one. Returns True if it did."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ["RANK"] = "0"
    os.environ["WORLD_SIZE"] = "1"
    os.environ["LOCAL_RANK"] = "0"
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    return True


def accelerator_name(deepspeed) -> str:
    """The DeepSpeed accelerator in use ("cuda", "cpu", ...), checked against what torch can see.

    DeepSpeed picks its accelerator when it is first imported. A CUDA build of torch on a machine
    without a GPU makes it fall back to "cpu" (or DS_ACCELERATOR=cpu forces it); a "cuda" accelerator
    without a usable GPU can only fail later, so it is reported here with the fix.
    """
    name = deepspeed.accelerator.get_accelerator().device_name()
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "DeepSpeed selected the cuda accelerator but torch sees no GPU; run with DS_ACCELERATOR=cpu"
        )
    return name


def init_distributed(deepspeed, backend: str = "auto") -> tuple[int, int, int, torch.device]:
    """Initialise the default process group once; returns (rank, world_size, local_rank, device).

    backend "auto" is nccl on CUDA and gloo otherwise. Works as a single process (no launcher), under
    torchrun and under the deepspeed launcher (all three set the env:// variables; the first by us).
    """
    accel = accelerator_name(deepspeed)
    if backend == "auto":
        backend = "nccl" if accel == "cuda" else "gloo"
    if backend == "nccl" and accel != "cuda":
        raise UserError(
            f"engine.dist_backend='nccl' needs CUDA GPUs, but the accelerator is {accel!r}; use gloo"
        )
    if not dist.is_initialized():
        set_single_process_env()
        # MPI discovery would probe for mpi4py; launchers already set RANK/WORLD_SIZE.
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return rank, world, local_rank, device


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (all devices) with seed + rank (ranks draw different masks/augmentations)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, CUDA devices) for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over the default group (a no-op for a world of one); op is sum, max or mean."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if op == "mean":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
        else:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (identical init whatever each rank seeded)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)
