"""Helpers of test_multinode.py: tiny shards, the run config, launches, the ranks' records, a loopback sshd.

The ranks run `_multinode_entry.py` (the `sapiens` command with recording taps); `read_records` turns
their JSON lines into per-rank views.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from tests._launch import LAUNCH_VARS

ROOT = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).with_name("_multinode_entry.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SAPIENS_MN_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


# ---- data and config


def make_shards(folder: Path, n: int, per_shard: int) -> Path:
    """`n` small random-pattern PNGs packed into shards of `per_shard` samples; returns the index.json."""
    import cv2

    from sapiens_train.shards import PackOptions, collect_folder, pack

    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        # Smooth blobs rather than noise: the crops and the MAE loss see some structure.
        small = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
        img = cv2.resize(small, (32, 40), interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(images / f"img_{i:03d}.png"), img)
    items, source = collect_folder(images)
    pack(items, source, folder / "shards", PackOptions(max_samples=per_shard), progress=False)
    return folder / "shards" / "index.json"


def write_config(
    path: Path, *, run_dir: Path, index: Path, total_steps: int, micro_batch: int, **engine
) -> Path:
    """A vit_test MAE at 32x32 under ZeRO-2, logging every step, a checkpoint and a picture every 3 steps.

    The default path a user runs: one loader worker per rank and the MFU peak measured on the CPU (both
    draw from generators of their own, so a resume replays the same masks and samples).
    """
    cfg = {
        "model": {"encoder": {"arch": "vit_test"}, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        "data": {"index": str(index), "img_size": [32, 32], "num_workers": 1, "shuffle_buffer": 8},
        "engine": {
            "run_dir": str(run_dir), "seed": 5, "total_steps": total_steps, "micro_batch_size": micro_batch,
            "zero_stage": 2, "checkpoint_every": 3, "keep_last": 3, "log_every": 1, "tensorboard": True,
            "progress": False, **engine,
        },
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "viz": {"every": 3, "num_images": 2},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- launches


def torchrun_cmd(nnodes: int, nproc: int, *, node_rank: int | None, endpoint: str | None, args: list[str]):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--monitor-interval", "0.5"]  # fmt: skip
    if endpoint is None:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", endpoint, "--rdzv_id", "sapiens-test"]  # fmt: skip
    return cmd + [str(ENTRY), *args]


def start(cmd: list[str], *, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A launcher in its own session (so that killing it cannot reach pytest), output to `log`."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a launcher exited ({p.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def kill_tree(proc: subprocess.Popen, pids: list[int]) -> None:
    """SIGKILL a launcher's session and the given processes (torchrun starts each worker in its own session)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} missing)"


# ---- the ranks' records


def read_records(out: Path) -> list[dict]:
    records = []
    for f in sorted(out.glob("rank*_pid*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def starts(records: list[dict], run: str) -> dict[int, dict]:
    """rank -> its `start` record in launch `run` (one process per rank)."""
    out = {}
    for r in records:
        if r["event"] == "start" and r["run"] == run:
            assert r["rank"] not in out, f"two processes claim rank {r['rank']} in {run}"
            out[r["rank"]] = r
    return out


def batches(records: list[dict], runs: list[str]) -> dict[int, dict[tuple, list[str]]]:
    """rank -> {loader position: sample keys}; a later run's batch at a position replaces an earlier one's."""
    out: dict[int, dict[tuple, list[str]]] = defaultdict(dict)
    for run in runs:
        for r in records:
            if r["event"] == "batch" and r["run"] == run:
                out[r["rank"]][tuple(r["pos"])] = r["keys"]
    return dict(out)


def losses(records: list[dict], runs: list[str]) -> dict[int, dict[tuple, float]]:
    """rank -> {loader position: loss}; later runs replace earlier ones as in `batches`."""
    out: dict[int, dict[tuple, float]] = defaultdict(dict)
    for run in runs:
        for r in records:
            if r["event"] == "loss" and r["run"] == run:
                out[r["rank"]][tuple(r["pos"])] = float.fromhex(r["loss"])
    return dict(out)


def writes(records: list[dict], under: Path) -> dict[str, set[int]]:
    """path (relative to `under`) -> the ranks that wrote, moved onto or deleted it."""
    out: dict[str, set[int]] = defaultdict(set)
    root = str(under.resolve())
    for r in records:
        if r["event"] == "write" and r["path"] and (r["path"] + "/").startswith(root + "/"):
            out[os.path.relpath(r["path"], root)].add(r["rank"])
    return dict(out)


# ---- an ssh server on the loopback interface


def ensure_ssh_tools() -> str | None:
    """Install openssh-server and pdsh where missing (root with apt only); None, or why they are unavailable."""
    missing = [pkg for pkg, exe in (("openssh-server", "/usr/sbin/sshd"), ("pdsh", "pdsh"), ("openssh-client", "ssh"))
               if shutil.which(exe) is None]  # fmt: skip
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"{', '.join(missing)} not installed, and installing them needs root"
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed, and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:  # stale or missing package lists: update once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        return f"apt-get install {' '.join(missing)} failed (offline?): {last[0]}"
    return None


@contextlib.contextmanager
def loopback_sshd(folder: Path, aliases: tuple[str, ...]):
    """sshd on 127.0.0.1 (a free port, its own host key and authorized_keys in `folder`) and a client
    config naming `aliases` as that server. Yields (ssh_config, bin_dir): `bin_dir/ssh` is `ssh -F ssh_config`,
    for tools that call plain `ssh` (DeepSpeed's reachability check, pdsh)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    port = free_port()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    (folder / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPrintMotd no\nLogLevel ERROR\n"
    )
    user = os.environ.get("USER") or __import__("getpass").getuser()
    (folder / "ssh_config").write_text(
        f"Host {' '.join(aliases)}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
        f"  IdentityFile {folder / 'client_key'}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
    )
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    real_ssh = shutil.which("ssh")
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {real_ssh} -F {folder / "ssh_config"} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    sshd = subprocess.Popen(
        [shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "sshd.log", "wb"),  # noqa: SIM115
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {tail(folder / 'sshd.log', 2000)}")
            time.sleep(0.1)
        yield folder / "ssh_config", bin_dir
    finally:
        sshd.terminate()
        try:
            sshd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sshd.kill()
