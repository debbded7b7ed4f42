"""One rank of `sapiens ...` under a launcher, recording what the rank does, for test_multinode.py.

    torchrun ... tests/sapiens_train/_multinode_entry.py pretrain --config cfg.yaml
    deepspeed --hostfile hosts --module tests.sapiens_train._multinode_entry pretrain --config cfg.yaml

It is `sapiens_lite.cli.main` (the `sapiens` command) with three test-only taps, all writing JSON lines to
$SAPIENS_MN_OUT/rank<RANK>_pid<pid>.jsonl (one file per process, so no two processes write one file):
  start  the launcher's variables as this rank sees them (ranks, node, TMPDIR, cwd, ssh, a probe variable)
  write  every path the process writes, moves onto, or deletes: Python's audit events (`open` for writing,
         `os.rename`/`os.replace`, `os.remove`, `shutil.rmtree`) plus `torch.save` to a path (its C++
         writer opens files without an audit event)
  read   files opened for reading under $SAPIENS_MN_WATCH (if set)
  batch  the sample keys of every micro-batch the engine takes from the streaming loader, with the
         loader's position after it (epoch, batches_in_epoch), and `loss` the rank's loss for it
$SAPIENS_MN_STALL_AT=k makes the rank stop before training the k-th micro-batch of the first epoch (after
recording it, and after writing $SAPIENS_MN_OUT/stalled_rank<RANK>) and sleep until killed: the test
kills one node's processes at a known point. $SAPIENS_MN_RUN labels the records of one launch.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time

OUT = os.environ["SAPIENS_MN_OUT"]
RANK = int(os.environ.get("RANK", "-1"))
RUN = os.environ.get("SAPIENS_MN_RUN", "")
_fd = os.open(
    os.path.join(OUT, f"rank{RANK}_pid{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
)


def record(event: str, **fields) -> None:
    # os.write raises no audit event, so the audit hook below may call this.
    line = json.dumps({"event": event, "run": RUN, "rank": RANK, "pid": os.getpid(), **fields}) + "\n"
    os.write(_fd, line.encode())


# ---- start: what the launcher exported

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "CROSS_RANK",
               "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "SAPIENS_MN_PROBE",
               "SAPIENS_MN_NODE")  # fmt: skip
record(
    "start",
    env={k: os.environ.get(k) for k in LAUNCH_VARS},
    ppid=os.getppid(),
    tmpdir=tempfile.gettempdir(),
    cwd=os.getcwd(),
    ssh="SSH_CONNECTION" in os.environ,
    host=socket.gethostname(),
)


# ---- write: every path this process writes


def _path(p) -> str | None:
    if isinstance(p, int) or p is None:
        return None
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    return os.path.abspath(os.fspath(p))


WATCH = os.path.abspath(os.environ["SAPIENS_MN_WATCH"]) + "/" if os.environ.get("SAPIENS_MN_WATCH") else None
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(event: str, args: tuple) -> None:
    try:
        _audit_event(event, args)
    except Exception:  # an audit hook's exception would break the call being audited
        pass


def _audit_event(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        if (p := _path(path)) is None:
            return
        if writing:
            record("write", op="open", path=p)
        elif WATCH and p.startswith(WATCH):
            record("read", path=p)
    # A name relative to a directory descriptor (shutil.rmtree's unlinks) is inside a recorded rmtree.
    elif event == "os.rename" and args[3] in (None, -1):
        record("write", op="rename", path=_path(args[1]), source=_path(args[0]))
    elif event == "os.remove" and args[1] in (None, -1):
        record("write", op="remove", path=_path(args[0]))
    elif event == "shutil.rmtree":
        record("write", op="rmtree", path=_path(args[0]))


sys.addaudithook(_audit)

import torch  # noqa: E402  (after the hook: what importing writes is recorded too)

_torch_save = torch.save


def _recording_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)):
        record("write", op="torch.save", path=_path(f))
    return _torch_save(obj, f, *args, **kwargs)


torch.save = _recording_save


# ---- batch / loss: what the engine trains on

import pretrain.train as pretrain_train  # noqa: E402
import sapiens_train.transforms as transforms  # noqa: E402


class KeyedDecode(transforms.MAEDecode):
    """The image and its sample key: the loader's batches become [images [B, 3, H, W], keys [B]]."""

    def __call__(self, sample):
        return super().__call__(sample), sample["__key__"]


class RecordingLoader:
    """The rank's StreamLoader, yielding the images only and recording the keys the engine takes."""

    def __init__(self, inner):
        self.inner = inner
        self.stall_at = int(os.environ.get("SAPIENS_MN_STALL_AT", "0"))

    def __getattr__(self, name):  # set_epoch, state_dict, load_state_dict, stats
        return getattr(self.inner, name)

    def __iter__(self):
        for images, keys in self.inner:
            # The loader's position after this batch (it moves to the next epoch on an epoch's last batch).
            epoch, done = self.inner.epoch, self.inner.batches_in_epoch
            pos = [epoch, done] if done > 0 else [epoch - 1, len(self.inner)]
            _last_pos[:] = pos
            record("batch", pos=pos, keys=list(keys))
            if pos == [0, self.stall_at]:
                with open(os.path.join(OUT, f"stalled_rank{RANK}"), "w") as f:
                    f.write(str(os.getpid()))
                while True:  # until the test kills this node
                    time.sleep(1)
            yield images


_last_pos: list[int] = []
_build_data = pretrain_train.build_data
_step_fn = pretrain_train.step_fn


def recording_build_data(cfg, engine, shards):
    transforms.MAEDecode = KeyedDecode  # build_data imports it at call time
    return RecordingLoader(_build_data(cfg, engine, shards))


def recording_step_fn(model, imgs):
    loss, metrics = _step_fn(model, imgs)
    record("loss", pos=list(_last_pos), loss=float(loss.detach().float()).hex())
    return loss, metrics


pretrain_train.build_data = recording_build_data
pretrain_train.step_fn = recording_step_fn

if __name__ == "__main__":
    from sapiens_lite.cli import main

    sys.exit(main(sys.argv[1:]))
