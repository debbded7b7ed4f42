"""Multi-node training on one machine: simulated nodes under torchrun, the DeepSpeed launcher over ssh, Slurm.

Every rank runs `sapiens pretrain` through `_multinode_entry.py`, which records the launcher's variables,
every path the rank writes, and the sample keys and loss of every micro-batch it trains on. The tests
check the duties of docs/distributed.md on those records: a path of the shared run dir has one writer
(rank 0, or the rank whose checkpoint part it is), node-local files stay on their node, every sample of
an epoch is trained on once across ranks and nodes, and a run's numbers do not depend on how its ranks
are spread over nodes, or on a node being killed and the job restarted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapiens_train.monitor import read_log
from tests.sapiens_train import _multinode as mn

NPROC, NNODES, MICRO, SAMPLES = 2, 2, 2, 48
WORLD = NPROC * NNODES
STEPS = SAMPLES // (MICRO * WORLD)  # one epoch: 6 steps of 8 samples
RUNS = ("first", "second")  # the two launches of the simulated nodes


def expected_writer(rel: str) -> int:
    """docs/distributed.md for a run dir: a checkpoint's per-rank parts (ZeRO optimizer partition, the
    engine's RNG/data state) are written by their rank; every other shared file by rank 0."""
    m = re.search(r"(?:zero_pp_rank_|engine_rank)(\d+)", rel)
    return int(m.group(1)) if m else 0


def check_duties(run_writes: dict[str, set[int]], *, world: int, last: str, viz: bool = True) -> None:
    """Every path of the run dir written by exactly its owner; the expected files all written."""
    wrong = {p: sorted(w) for p, w in run_writes.items() if w != {expected_writer(p)}}
    assert not wrong, f"run-dir paths written by other ranks than their owner (or by several): {wrong}"
    # backbone: a folder written under a temporary name and moved into place
    expected = ["config.yaml", "ds_config.json", "log.jsonl", "loss.png", "checkpoints/latest", "backbone"]
    expected += ["viz/step_00000003.png"] if viz else []
    for r in range(world):
        expected += [
            f"checkpoints/{last}/engine_rank{r:03d}.pt",
            f"checkpoints/{last}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
        ]
    assert not [p for p in expected if p not in run_writes], sorted(run_writes)
    assert any(p.startswith("tensorboard/") for p in run_writes)


# ---- which GPU a rank takes, and a Slurm step without a launcher


@pytest.fixture
def environ(monkeypatch):
    """A private copy of os.environ for the test (the functions under test write into it)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in mn.LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI"))
    }
    monkeypatch.setattr(os, "environ", env)
    return env


@pytest.mark.parametrize(
    "var",
    [
        "LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ],
)
def test_local_rank_comes_from_each_launchers_variable(environ, var):
    """The GPU a rank binds before the process group exists is its node-local rank under every launcher
    (under MPI launchers DeepSpeed sets LOCAL_RANK only later: every rank would first take GPU 0)."""
    from sapiens_train.dist import launcher_local_rank

    assert launcher_local_rank() == 0
    environ[var] = "3"
    assert launcher_local_rank() == 3
    environ["LOCAL_RANK"] = "5"  # a launcher's own LOCAL_RANK comes first (torchrun under srun)
    assert launcher_local_rank() == 5


def test_slurm_tasks_without_a_launcher_are_refused(environ):
    """`srun -n 8 sapiens pretrain` would start 8 worlds of one writing the same run dir: a UserError instead."""
    from sapiens_lite.errors import UserError
    from sapiens_train.dist import set_single_process_env

    environ.update(SLURM_STEP_NUM_TASKS="8", SLURM_PROCID="3", SLURM_LOCALID="3")
    with pytest.raises(UserError, match="task 3 of 8 of a Slurm step.*torchrun"):
        set_single_process_env()
    assert "RANK" not in environ
    environ["SLURM_STEP_NUM_TASKS"] = "1"  # one task (an interactive srun): a world of one
    assert set_single_process_env() and environ["WORLD_SIZE"] == "1"


def test_on_rank0_in_a_world_of_one():
    from sapiens_lite.errors import UserError
    from sapiens_train.dist import on_rank0

    assert on_rank0(lambda: "step_00000003") == "step_00000003"

    def broken():
        raise UserError("checkpoints/latest: empty checkpoint marker")

    with pytest.raises(UserError, match="empty checkpoint marker"):
        on_rank0(broken)


@pytest.mark.slow
def test_two_simulated_nodes_kill_one_restart_match_single_node(tmp_path):
    """2 torchrun "nodes" x 2 ranks (c10d rendezvous on 127.0.0.1, each node its own working directory and
    TMPDIR, one shared run dir), ZeRO-2 pretraining on shards: node 1 is SIGKILLed after the step-3
    checkpoint, node 0 then fails by itself, both restart and resume. Every sample of the epoch is trained on
    exactly once across the 4 ranks, every rank's losses equal those of a 4-rank single-node run bit for
    bit, and each path of the run dir has exactly the writer the duties table names."""
    index = mn.make_shards(tmp_path / "data", SAMPLES, per_shard=12)
    out = tmp_path / "records"
    out.mkdir()
    shared_run = tmp_path / "shared" / "run"
    cfg = mn.write_config(tmp_path / "multi.yaml", run_dir=shared_run, index=index, total_steps=STEPS,
                          micro_batch=MICRO, keep_last=1)  # fmt: skip
    args = ["pretrain", "--config", str(cfg)]

    # The reference: one node with 4 ranks.
    ref_run = tmp_path / "single" / "run"
    ref_cfg = mn.write_config(tmp_path / "single.yaml", run_dir=ref_run, index=index, total_steps=STEPS,
                              micro_batch=MICRO, keep_last=1)  # fmt: skip
    log = tmp_path / "single.log"
    cmd = mn.torchrun_cmd(
        1, WORLD, node_rank=None, endpoint=None, args=["pretrain", "--config", str(ref_cfg)]
    )
    env = mn.clean_env(SAPIENS_MN_OUT=str(out), SAPIENS_MN_RUN="single")
    assert mn.start(cmd, cwd=tmp_path, env=env, log=log).wait(timeout=600) == 0, mn.tail(log)

    nodes = []
    for n in range(NNODES):
        node = tmp_path / f"node{n}"
        (node / "work").mkdir(parents=True)
        (node / "tmp").mkdir()
        nodes.append(node)

    def launch(run: str, stall_node: int | None = None, order=(0, 1)) -> list:
        endpoint = f"127.0.0.1:{mn.free_port()}"
        procs = [None] * NNODES
        for n in order:
            node = nodes[n]
            env = mn.clean_env(TMPDIR=str(node / "tmp"), SAPIENS_MN_OUT=str(out), SAPIENS_MN_RUN=run,
                               SAPIENS_MN_NODE=str(n), SAPIENS_MN_WATCH=str(shared_run / "checkpoints"))  # fmt: skip
            if n == stall_node:
                env["SAPIENS_MN_STALL_AT"] = "5"  # after the step-3 checkpoint and step 4
            cmd = mn.torchrun_cmd(NNODES, NPROC, node_rank=n, endpoint=endpoint, args=args)
            procs[n] = mn.start(cmd, cwd=node / "work", env=env, log=node / f"{run}.log")
        return procs

    # First launch: node 1 stops before step 5 and is killed (launcher and ranks); node 0, waiting for it
    # in step 5's collectives, must fail by itself rather than hang.
    first = launch("first", stall_node=1)
    try:
        stalled = lambda: len(list(out.glob("stalled_rank*"))) == NPROC  # noqa: E731
        mn.wait_for(stalled, 300, "node 1 to reach step 5", first)
        node1_pids = [r["pid"] for r in mn.starts(mn.read_records(out), "first").values()
                      if r["env"]["SAPIENS_MN_NODE"] == "1"]  # fmt: skip
        assert len(node1_pids) == NPROC
        mn.kill_tree(first[1], node1_pids)
        try:
            rc0 = first[0].wait(timeout=180)
        except subprocess.TimeoutExpired:
            rc0 = None
        hung = "node 0 did not fail after node 1 was killed\n"
        assert rc0 not in (None, 0), hung + mn.tail(nodes[0] / "first.log")
    finally:
        for p in first:
            if p.poll() is None:
                node_pids = [r["pid"] for r in mn.starts(mn.read_records(out), "first").values()]
                mn.kill_tree(p, node_pids)
    ckpt = shared_run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000003"
    assert not (ckpt / "step_00000006").exists()

    # Second launch: both nodes restart and resume from `latest`. Node 1 starts first: c10d numbers the
    # nodes by (host, launcher pid), so the ranks swap nodes, as they may when a job is requeued.
    second = launch("second", order=(1, 0))
    for n, p in enumerate(second):
        assert p.wait(timeout=600) == 0, mn.tail(nodes[n] / "second.log")
    assert (ckpt / "latest").read_text() == "step_00000006"
    assert "resumed from" in (nodes[0] / "second.log").read_text() + (nodes[1] / "second.log").read_text()

    records = mn.read_records(out)
    node_of = {
        run: {r: s["env"]["SAPIENS_MN_NODE"] for r, s in mn.starts(records, run).items()} for run in RUNS
    }
    assert node_of["first"] == {0: "0", 1: "0", 2: "1", 3: "1"}
    assert node_of["second"] == {0: "1", 1: "1", 2: "0", 3: "0"}  # the ranks changed nodes
    for run in RUNS:
        started = mn.starts(records, run)
        assert sorted(started) == list(range(WORLD)), run
        for s in started.values():
            n = int(s["env"]["SAPIENS_MN_NODE"])
            assert s["env"]["WORLD_SIZE"] == str(WORLD) and s["env"]["LOCAL_WORLD_SIZE"] == str(NPROC)
            assert s["tmpdir"] == str(nodes[n] / "tmp") and s["cwd"] == str(nodes[n] / "work")
        for n in range(NNODES):  # two ranks per node, local ranks 0 and 1, one group rank per node
            on_node = [s["env"] for s in started.values() if s["env"]["SAPIENS_MN_NODE"] == str(n)]
            assert sorted(e["LOCAL_RANK"] for e in on_node) == ["0", "1"], (run, n)
            assert len({e["GROUP_RANK"] for e in on_node}) == 1, (run, n)

    # Exactly once: the batches trained on (the resumed run's replace the killed run's after step 3).
    multi = mn.batches(records, list(RUNS))
    positions = [(0, b) for b in range(1, STEPS + 1)]
    for r in range(WORLD):
        assert sorted(multi[r]) == positions, r
    seen = [k for r in range(WORLD) for p in positions for k in multi[r][p]]
    assert len(seen) == SAMPLES and len(set(seen)) == SAMPLES
    # Node 1 was killed holding batch 5; the batches node 0 had taken past the checkpoint came back the same.
    first_batches = mn.batches(records, ["first"])
    for r in range(WORLD):
        for p in [(0, 4), (0, 5)]:
            if p in first_batches[r]:
                assert first_batches[r][p] == multi[r][p], (r, p)
    single = mn.batches(records, ["single"])
    assert single == multi  # the same samples per rank and step as on one node

    # The same numbers as one node: every rank's loss at every step, and the logged (rank-averaged) ones.
    multi_loss, single_loss = mn.losses(records, list(RUNS)), mn.losses(records, ["single"])
    for r in range(WORLD):
        assert sorted(multi_loss[r]) == positions
        assert multi_loss[r] == single_loss[r], r
    logged = {rec["step"]: rec["loss"] for rec in read_log(shared_run / "log.jsonl")}
    assert logged == {rec["step"]: rec["loss"] for rec in read_log(ref_run / "log.jsonl")}
    assert sorted(logged) == list(range(1, STEPS + 1))

    # Duties: one writer per run-dir path, as the table says; node-local files stay on their node.
    run_writes = mn.writes([r for r in records if r["run"] in RUNS], shared_run)
    check_duties(run_writes, world=WORLD, last="step_00000006")
    single_writes = mn.writes([r for r in records if r["run"] == "single"], ref_run)
    check_duties(single_writes, world=WORLD, last="step_00000006")
    for run in RUNS:  # a node's TMPDIR and working directory: its own ranks of that launch only
        run_records = [x for x in records if x["run"] == run]
        for n, node in enumerate(nodes):
            writers = {w for ws in mn.writes(run_records, node).values() for w in ws}
            assert writers <= {r for r, node_n in node_of[run].items() if node_n == str(n)}, (run, n, writers)
    # Every rank reads `latest` before the process group exists (to verify its own files early); rank 0's
    # reading then decides for all (a node's cached copy of it cannot split the resume).
    latest = str(shared_run / "checkpoints" / "latest")
    assert 0 in {r["rank"] for r in records if r["event"] == "read" and r["path"] == latest}
    # The backbone export of the finished run is complete (rank 0, after every rank's last checkpoint).
    assert json.loads((shared_run / "backbone" / "config.json").read_text())["model_type"] == "vit"


@pytest.mark.slow
def test_deepspeed_launcher_over_ssh_two_hosts(tmp_path):
    """`deepspeed --hostfile` with two host aliases of this machine: pdsh starts one rank per "host" over ssh
    (an sshd on 127.0.0.1 with a throwaway key), the ranks get node ranks 0 and 1 and the variables of
    `.deepspeed_env`, train two ZeRO-2 steps with a checkpoint, and write the run dir by the duties table."""
    why = mn.ensure_ssh_tools()
    if why is not None:
        pytest.skip(f"no ssh server and pdsh for the launcher: {why}")
    index = mn.make_shards(tmp_path / "data", 16, per_shard=8)
    run = tmp_path / "shared" / "run"
    cfg = mn.write_config(tmp_path / "cfg.yaml", run_dir=run, index=index, total_steps=2, micro_batch=2,
                          checkpoint_every=2)  # fmt: skip
    out = tmp_path / "records"
    out.mkdir()
    launch_dir = tmp_path / "launch"  # the working directory the user starts `deepspeed` in
    launch_dir.mkdir()
    (launch_dir / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    # What the ranks need beyond the launcher's own exports (NCCL_*, PYTHON*, UCX*): the user's lines.
    # A cache location the caller chose for compiled extensions travels along (a fresh one costs a build).
    ds_env = {"OMP_NUM_THREADS": "1", "SAPIENS_MN_PROBE": "arrived via .deepspeed_env", "SAPIENS_MN_OUT": str(out),
              "SAPIENS_MN_RUN": "ds"}  # fmt: skip
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        ds_env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    (launch_dir / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in ds_env.items()))

    with mn.loopback_sshd(tmp_path / "ssh", aliases=("node0", "node1")) as (ssh_config, ssh_bin):
        env = mn.clean_env(
            PATH=f"{ssh_bin}:{os.environ['PATH']}",  # DeepSpeed's reachability check runs plain `ssh`
            PDSH_SSH_ARGS_APPEND=f"-F {ssh_config}",  # pdsh's ssh
            PYTHONPATH=str(mn.ROOT),  # for the test's entry module; exported to the ranks as PYTHON*
        )
        check = subprocess.run(
            ["ssh", "node1", "echo", "ok"], env=env, capture_output=True, text=True, timeout=60
        )
        assert check.stdout.strip() == "ok", check.stderr
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed), "--hostfile", "hostfile", "--master_addr", "127.0.0.1",
               "--master_port", str(mn.free_port()), "--module", "tests.sapiens_train._multinode_entry",
               "pretrain", "--config", str(cfg)]  # fmt: skip
        log = tmp_path / "deepspeed.log"
        proc = mn.start(cmd, cwd=launch_dir, env=env, log=log)
        try:
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:  # the ranks run under sshd, outside the launcher's session
                started = mn.starts(mn.read_records(out), "ds").values()
                mn.kill_tree(proc, [p for s in started for p in (s["pid"], s["ppid"])])
    assert rc == 0, mn.tail(log)

    text = log.read_text()  # pdsh prefixes each line with the host it came from
    assert "node0: [pretrain] done" in text and "node1: " in text
    started = mn.starts(mn.read_records(out), "ds")
    assert sorted(started) == [0, 1]
    assert sorted(s["env"]["CROSS_RANK"] for s in started.values()) == ["0", "1"]  # one rank per host
    for s in started.values():
        assert s["ssh"], "the rank was not started through ssh"
        assert s["env"]["LOCAL_RANK"] == "0" and s["env"]["WORLD_SIZE"] == "2"
        assert s["env"]["SAPIENS_MN_PROBE"] == "arrived via .deepspeed_env"
        assert s["env"]["OMP_NUM_THREADS"] == "1"
        assert s["cwd"] == str(launch_dir)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 2]
    check_duties(mn.writes(mn.read_records(out), run), world=2, last="step_00000002", viz=False)


# ---- Slurm: the script's command lines for a fake allocation (no Slurm on this machine)

SBATCH = mn.ROOT / "scripts" / "slurm" / "pretrain.sbatch"

# `scontrol show hostnames LIST` (bracket ranges with zero padding, comma lists) and `scontrol requeue ID`.
FAKE_SCONTROL = r"""
import re, sys
def expand(part):
    m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", part)
    if not m:
        return [part]
    head, ranges, tail = m.groups()
    out = []
    for r in ranges.split(","):
        a, _, b = r.partition("-")
        for i in range(int(a), int(b or a) + 1):
            out += expand(f"{head}{i:0{len(a)}d}{tail}")
    return out
if sys.argv[1:3] == ["show", "hostnames"]:
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", sys.argv[3]):
        print("\n".join(expand(part)))
else:
    with open(sys.argv[0] + ".calls", "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\n")
"""


def fake_slurm(tmp_path: Path, srun_body: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!{sys.executable}\n{FAKE_SCONTROL}")
    # srun records its arguments (one JSON list per call), then does `srun_body`
    (bin_dir / "srun").write_text(
        f"#!/bin/sh\n{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\" "
        f">> {bin_dir / 'srun.calls'}\n{srun_body}\n"
    )
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    return mn.clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="3",
        SLURM_JOB_NODELIST="gpu-[009-010],gpu-100", SLURM_GPUS_ON_NODE="4", SLURM_RESTART_COUNT="1",
    )  # fmt: skip


def test_slurm_script_header_and_syntax():
    """The script parses, asks for one task per node, requeue, USR1 before the time limit and an appended log."""
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0
    header = [
        line.split(None, 1)[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")
    ]
    for option in ("--ntasks-per-node=1", "--requeue", "--open-mode=append"):
        assert option in header, option
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", o) for o in header)


def test_slurm_script_torchrun_command_for_a_fake_nodelist(tmp_path):
    """For 3 nodes gpu-[009-010],gpu-100 with 4 GPUs each: one srun task per node running torchrun with
    the c10d rendezvous on gpu-009, the job id as rendezvous id, and the user's arguments untouched."""
    env = fake_slurm(tmp_path, "exit 0")
    user_args = ["--config", "configs/pretrain/sapiens_0.3b.yaml", "data.index=/shared/my shards/index.json"]
    r = subprocess.run(["bash", str(SBATCH), *user_args], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "3 nodes x 4 processes, rendezvous gpu-009:29500" in r.stdout and "start 2" in r.stdout
    calls = [json.loads(line) for line in (tmp_path / "bin" / "srun.calls").read_text().splitlines()]
    assert len(calls) == 1
    argv = calls[0]
    assert argv[: argv.index("python3")] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    torchrun = argv[argv.index("python3") :]
    assert torchrun == ["python3", "-m", "torch.distributed.run", "--nnodes", "3", "--nproc_per_node", "4",
                        "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-009:29500", "--rdzv_id", "4242",
                        "-m", "sapiens_lite.cli", "pretrain", *user_args]  # fmt: skip
    # the same command line parses as torchrun's own (the launcher this toolkit is tested under)
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(torchrun[3:])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_endpoint) == ("3", "4", "gpu-009:29500")
    assert parsed.module and parsed.training_script == "sapiens_lite.cli"
    assert parsed.training_script_args == ["pretrain", *user_args]

    env.update(GPUS_PER_NODE="2", RDZV_PORT="31000", PYTHON="/opt/venv/bin/python")
    subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, timeout=60, check=True)
    argv = json.loads((tmp_path / "bin" / "srun.calls").read_text().splitlines()[-1])
    assert argv[2] == "/opt/venv/bin/python" and argv[argv.index("--nproc_per_node") + 1] == "2"
    assert argv[argv.index("--rdzv_endpoint") + 1] == "gpu-009:31000"


def test_slurm_script_requeues_on_usr1(tmp_path):
    """USR1 (Slurm's warning before the time limit) makes the script requeue its job and stop the step."""
    env = fake_slurm(tmp_path, "exec sleep 120")
    proc = subprocess.Popen(["bash", str(SBATCH), "--config", "c.yaml"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        mn.wait_for(lambda: (tmp_path / "bin" / "srun.calls").is_file(), 30, "srun to start", [proc])
        time.sleep(0.5)  # the script reaches `wait`
        os.kill(proc.pid, signal.SIGUSR1)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (tmp_path / "bin" / "scontrol.calls").read_text() == "requeue 4242\n"
    assert "requeueing job 4242" in stdout
    assert proc.returncode != 0  # the step was stopped, not finished
