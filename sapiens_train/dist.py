"""Process group set-up (single process, torchrun, deepspeed launcher), seeds and RNG states.

Importing this module chooses DeepSpeed's accelerator (`set_ds_accelerator_env`), so modules that import
DeepSpeed import this one first.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from sapiens_lite.errors import UserError

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set by MPI launchers (`deepspeed --launcher openmpi`, mpirun); DeepSpeed then discovers ranks via mpi4py.
_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
# A process's rank on its node, by launcher: torchrun and the deepspeed launcher (LOCAL_RANK), Open MPI,
# MVAPICH, MPICH/Intel MPI (hydra), Cray PALS, srun. Under MPI launchers DeepSpeed fills LOCAL_RANK only
# inside init_distributed.
_LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                    "PALS_LOCAL_RANKID", "SLURM_LOCALID")  # fmt: skip


def launcher_local_rank() -> int:
    """This process's rank on its node as its launcher announced it (0 without a launcher): its GPU."""
    for var in _LOCAL_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def launcher_rank_world() -> tuple[int, int]:
    """(rank, world size) as the launcher announced them, before any process group exists: torchrun's and
    the deepspeed launcher's RANK / WORLD_SIZE, or an MPI launcher's; (0, 1) without a launcher."""
    for rank_var, size_var in (
        ("RANK", "WORLD_SIZE"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
    ):
        if os.environ.get(rank_var, "").isdigit() and os.environ.get(size_var, "").isdigit():
            return int(os.environ[rank_var]), int(os.environ[size_var])
    return 0, 1


WORLD_OF_ONE_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
"""What set_single_process_env fills in. They stay in os.environ while the process lives (the process
group outlives one run): a program that trains in-process and then starts other training processes
must leave them out of their environment, or every child takes the same MASTER_PORT."""


def set_single_process_env() -> bool:
    """Without a launcher, fill in the env:// variables for a world of one. Returns True if it did.

    A task of a multi-task Slurm step without launcher variables (`srun -n 8 sapiens pretrain`, or
    `deepspeed --launcher slurm` on a cluster without PMI) is refused: each task would train alone and all
    of them would write the same run dir.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    if any(v in os.environ for v in _MPI_VARS):
        return False
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks > 1 and "SLURM_PROCID" in os.environ:
        raise UserError(
            f"this is task {os.environ['SLURM_PROCID']} of {tasks} of a Slurm step, but no launcher set RANK and "
            "WORLD_SIZE: start one torchrun per node with srun (scripts/slurm/pretrain.sbatch) instead of one "
            "training process per task"
        )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ["RANK"] = "0"
    os.environ["WORLD_SIZE"] = "1"
    os.environ["LOCAL_RANK"] = "0"
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    return True


def set_ds_accelerator_env() -> str | None:
    """Call before `import deepspeed`: DS_ACCELERATOR=cpu when torch sees no GPU (unless already set).

    DeepSpeed fixes its accelerator when it is imported. Its own probe also falls back to cpu on a
    machine without GPUs (with a warning); this makes the choice explicit. Returns the value in force.
    """
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR")


set_ds_accelerator_env()


def accelerator_name() -> str:
    """The DeepSpeed accelerator in use ("cuda", "cpu", ...), checked against what torch can see.

    DeepSpeed picks its accelerator when it is first imported. A CUDA build of torch on a machine
    without a GPU makes it fall back to "cpu" (or DS_ACCELERATOR=cpu forces it); a "cuda" accelerator
    without a usable GPU can only fail later, so it is reported here with the fix.
    """
    import deepspeed

    name = deepspeed.accelerator.get_accelerator().device_name()
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "DeepSpeed selected the cuda accelerator but torch sees no GPU; run with DS_ACCELERATOR=cpu"
        )
    return name


def init_distributed(backend: str = "auto") -> tuple[int, int, int, torch.device]:
    """Initialise the default process group once; returns (rank, world_size, local_rank, device).

    backend "auto" is nccl on CUDA and gloo otherwise. Works as a single process (no launcher), under
    torchrun and under the deepspeed launcher (all three set the env:// variables; the first by us).
    """
    import deepspeed

    accel = accelerator_name()
    if backend == "auto":
        backend = "nccl" if accel == "cuda" else "gloo"
    if backend == "nccl" and accel != "cuda":
        raise UserError(
            f"engine.dist_backend='nccl' needs CUDA GPUs, but the accelerator is {accel!r}; use gloo"
        )
    if not dist.is_initialized():
        alone = set_single_process_env()
        if accel == "cuda":  # before the process group, so NCCL binds this rank's GPU (not every rank GPU 0)
            torch.cuda.set_device(launcher_local_rank())
        # With RANK/WORLD_SIZE set (torchrun, the deepspeed launcher, or us) DeepSpeed uses them;
        # under an MPI launcher it discovers them through mpi4py.
        if alone:
            # A world of one rendezvous through a file, not a TCP port: a port picked as free can be
            # taken by another process before the store binds it (EADDRINUSE, seen in CI).
            store_dir = tempfile.mkdtemp(prefix="sapiens-pg-")
            atexit.register(shutil.rmtree, store_dir, ignore_errors=True)
            store = Path(store_dir) / "store"
            deepspeed.init_distributed(
                dist_backend=backend, verbose=False, init_method=f"file://{store}", rank=0, world_size=1
            )
        else:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        # Left to the interpreter's teardown, the gloo/NCCL threads can be destroyed in the wrong order
        # ("terminate called without an active exception"): a finished rank then ends with SIGABRT.
        atexit.register(shutdown)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = launcher_local_rank()
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


def on_rank0(fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 alone; every rank returns its result, or raises what it raised (a UserError as
    such, anything else as a RuntimeError naming it), so that no rank is left waiting.

    For a shared file whose reading every rank must agree on, such as the `latest` checkpoint tag: the
    clients of a shared filesystem may each serve a cached copy for a while (NFS attribute caches, FUSE
    mounts of object stores), and ranks resuming from different tags would mix two checkpoints.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("user", str(e))
        except Exception as e:
            box[0] = ("error", f"on rank 0: {type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "user":
        raise UserError(value)
    if kind == "error":
        raise RuntimeError(value)
    return value


def gather_objects(obj) -> list:
    """Every rank's picklable `obj` in rank order on rank 0; [] on the other ranks, [obj] in a world of one."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def shutdown() -> None:
    """Destroy the default process group, if any, before the interpreter exits.

    Left to the interpreter's exit, the gloo/NCCL threads can be torn down in the wrong order
    ("terminate called without an active exception"), so a finished rank ends with SIGABRT.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


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
