"""How the tests start ranks: torchrun's command and a clean launch environment, in one place."""

from __future__ import annotations

import os
import sys

# Variables a launcher sets; the pytest process may hold a world-of-one's, which must not leak into a launch.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "CROSS_RANK", "LOCAL_SIZE", "TORCHELASTIC_RUN_ID")  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any launcher's variables, one OpenMP thread per rank (2 cores), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def torchrun(nproc: int) -> list[str]:
    """`python -m torch.distributed.run` for `nproc` ranks on this machine; nproc=0: plain `python`."""
    if not nproc:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--monitor-interval", "0.5"]  # fmt: skip
