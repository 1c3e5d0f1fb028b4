"""Multi-node launch on one machine: two torchrun agents, one process each, meet through a c10d rendezvous on
127.0.0.1 as two nodes would, and train the tiny model into one shared run directory (a shared filesystem).

What differs from `--standalone` (tests/test_ddp.py): the second node's only process has RANK=1 but LOCAL_RANK=0,
GROUP_RANK=1, and its own agent. So everything that must happen once per run (token shards, config.yaml,
metrics.jsonl, checkpoints, the ledger, the log lines) has to key on the global rank: a LOCAL_RANK-keyed "main"
would do it once per node, and two writers in one shared folder would duplicate metrics or collide on a checkpoint's
temporary folder. The trajectory must still equal 1 process with gradient accumulation 2.

Trade-offs: both "nodes" share one kernel and loopback, so this covers the launch contract (environment, rank
assignment, rendezvous, shared-folder writes), not network faults or clock skew between machines; which agent
becomes node 0 is decided by the rendezvous, so the test finds it from the output instead of assuming it.
torchrun's static rendezvous (`--node_rank`, `--master_addr`) is not tested separately: the workers see the same
RANK/LOCAL_RANK/WORLD_SIZE environment either way, so it would exercise torch, not gptforge.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptforge.cli import main
from tests.test_ddp import ARGS, _metric

TIMEOUT_S = 240  # both agents together; a healthy run takes ~6 s here: a hung rendezvous fails, never hangs the suite
# torchrun tees each worker's output into its agent's with this prefix (global and local rank of the worker).
PREFIX = "[rank${rank} local${local_rank}]:"
PREFIX_RE = re.compile(r"^\[rank(\d+) local(\d+)\]:", re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): torchrun starts its workers in their own sessions, so killing the
    agent's process group would leave them running."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *_descendants(k)]
    return out


def _kill_all(procs: list[subprocess.Popen]) -> None:
    pids = [p for proc in procs for p in (*_descendants(proc.pid), proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait()


def _agent_cmd(run: Path, corpus: Path, port: int, log_dir: Path) -> list[str]:
    """One node's `torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d ... -m gptforge pretrain`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        f"--rdzv_id=gptforge-test-{os.getpid()}-{port}",
        "--rdzv_conf=join_timeout=120",  # the agents give up on their own, too
        "--local_addr=127.0.0.1",  # the workers' master address: loopback, not this host's (maybe unresolvable) name
        "--tee=3",  # worker stdout/stderr into the agent's, with PREFIX
        f"--log_dir={log_dir}",  # torchrun's copies of the worker logs: under tmp_path, not a fresh /tmp folder
        "-m",
        "gptforge",
        "pretrain",
        f"--run_dir={run}",
        f"--input={corpus}",
        *ARGS,
    ]


def _two_nodes(run: Path, corpus: Path, logs: Path) -> list[tuple[int, str, str]]:
    """Start both agents at once (neither can finish its rendezvous alone) and wait for both; (rc, stdout, stderr)
    per agent. Output goes to files under `logs`, not pipes: an agent blocked on a full pipe while the test waits on
    the other would deadlock them both. Past TIMEOUT_S every agent and worker is killed and the test fails with
    what they printed."""
    port = _free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": PREFIX,
    }
    logs.mkdir(parents=True, exist_ok=True)
    files = [(logs / f"agent{i}.out", logs / f"agent{i}.err") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(files):
        cmd = _agent_cmd(run, corpus, port, logs / f"torchelastic{i}")
        with open(out, "w") as fo, open(err, "w") as fe:  # the child keeps its own copies of the descriptors
            procs.append(subprocess.Popen(cmd, env=env, stdout=fo, stderr=fe))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_all(procs)
        tails = "\n".join(
            f"--- agent {i}:\n{o.read_text()[-1500:]}{e.read_text()[-2000:]}" for i, (o, e) in enumerate(files)
        )
        pytest.fail(f"two-node run did not finish in {TIMEOUT_S} s (hung rendezvous or collective?)\n{tails}")
    finally:
        _kill_all([p for p in procs if p.poll() is None])
    return [(p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(procs, files)]


def _ranks(output: str) -> set[tuple[int, int]]:
    """The (global rank, local rank) pairs of the workers whose lines appear in one agent's output."""
    return {(int(a), int(b)) for a, b in PREFIX_RE.findall(output)}


def test_two_nodes_match_one_process_and_only_global_rank_0_writes(tmp_path, corpus, tokenizer_run):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(tokenizer_run / "tokenizer", d / "tokenizer")
    assert main(["pretrain", f"--run_dir={one}", f"--input={corpus}", *ARGS, "--train.grad_accum=2"]) == 0
    agents = _two_nodes(two, corpus, tmp_path / "logs")
    for i, (rc, out, err) in enumerate(agents):
        assert rc == 0, f"agent {i} exited {rc}\n{out[-2000:]}\n{err[-3000:]}"

    # One agent hosts global rank 0 (its lines carry torchrun's "[rank0 local0]:" prefix); the other agent's only
    # worker is then RANK 1, and with --nproc_per_node=1 its LOCAL_RANK is 0 too: a process that a LOCAL_RANK-keyed
    # "main" would wrongly count in. gptforge prints nothing on rank 1, so that agent may show no prefixed line at all.
    seen = [_ranks(out + err) for _, out, err in agents]
    heads = [i for i, s in enumerate(seen) if (0, 0) in s]
    assert len(heads) == 1, seen
    head, other = agents[heads[0]], agents[1 - heads[0]]
    assert seen[heads[0]] == {(0, 0)} and seen[1 - heads[0]] <= {(1, 0)}, seen
    # The main-only lines come from global rank 0 only, never from node 1's LOCAL_RANK-0 process.
    for line in ("data: ", "model: ", "train: ", "checkpoint: "):
        assert f"[rank0 local0]:{line}" in head[1], line
        assert line not in other[1] + other[2], line
    assert "rank=0/2" in head[1]

    # Same global batches as 1 process with accumulation 2: the same trajectory, logged once (not once per node).
    a, b = _metric(one, "loss"), _metric(two, "loss")
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert _metric(one, "val_loss") == pytest.approx(_metric(two, "val_loss"), rel=1e-4, abs=1e-4)
    rows = [json.loads(x) for x in (two / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    ledger = [json.loads(x) for x in (two / "ledger.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["status"]) for e in ledger] == [("pretrain", "ok")]
    assert (two / "pretrain" / "config.yaml").is_file() and (two / "pretrain" / "summary.json").is_file()

    # Both ranks wrote their RNG state into the one committed checkpoint; nothing half-written is left behind.
    ckpts = two / "pretrain" / "checkpoints"
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {f.name for f in (ckpts / "step-00000008").iterdir()}
    assert json.loads((ckpts / "step-00000008" / "meta.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.json", "step-00000004", "step-00000008"]
