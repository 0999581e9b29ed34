"""The local Slurm cluster of infra/local_slurm.sh does what the launcher's Slurm backend relies on:
two nodes, multi-node steps, job arrays, accounting (sacct), partition checks and requeue."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

TIMEOUT_S = 120
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=TIMEOUT_S, check=check)


def wait_for(what: str, probe: Callable[[], object], timeout: float = TIMEOUT_S) -> object:
    """Poll probe() until it returns something truthy; fail with its last value otherwise."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not value:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)
        value = probe()
    return value


def node_states(partition: str) -> dict[str, str]:
    out = run("sinfo", "-h", "-N", "-p", partition, "-o", "%N %T").stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def sacct_states(job_id: str) -> dict[str, str]:
    """JobID -> State of a job's allocations (array tasks appear as <id>_<task>)."""
    out = run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State").stdout
    return dict(line.split("|", 1) for line in out.splitlines() if line.strip())


def test_both_nodes_idle(slurm_cluster):
    def all_idle():
        states = node_states(slurm_cluster["partition"])
        return states if states and set(states.values()) == {"idle"} else None

    states = wait_for("node1 and node2 idle", all_idle, timeout=60)
    assert sorted(states) == slurm_cluster["nodes"]


def test_two_node_srun_runs_one_task_on_each_node(slurm_cluster):
    proc = run(
        "srun", "-p", slurm_cluster["partition"], "-N2", "-n2", "--ntasks-per-node=1", "-t", "2",
        "printenv", "SLURMD_NODENAME",
    )  # fmt: skip
    assert sorted(proc.stdout.split()) == ["node1", "node2"], proc.stderr


def test_job_array_completes_in_sacct(slurm_cluster, tmp_path: Path):
    proc = run(
        "sbatch", "--parsable", "-p", slurm_cluster["partition"], "--array=0-2", "-t", "2",
        "-o", str(tmp_path / "task-%a.out"), "--wrap", "echo task $SLURM_ARRAY_TASK_ID",
    )  # fmt: skip
    job_id = proc.stdout.strip().split(";")[0]
    expected = {f"{job_id}_{i}" for i in range(3)}

    def finished():
        states = sacct_states(job_id)
        done = states.keys() == expected and all(v in FINAL_STATES for v in states.values())
        return states if done else None

    states = wait_for(f"array job {job_id} to finish in sacct", finished)
    assert set(states.values()) == {"COMPLETED"}, states
    for i in range(3):
        assert (tmp_path / f"task-{i}.out").read_text().strip() == f"task {i}"


def test_unknown_partition_is_rejected_at_submit(slurm_cluster):
    proc = run("sbatch", "-p", "nosuch", "--wrap", "true", check=False)
    assert proc.returncode != 0
    assert "invalid partition" in proc.stderr.lower(), proc.stderr


@pytest.mark.slow
def test_requeued_job_runs_again(slurm_cluster, tmp_path: Path):
    out = tmp_path / "requeue.out"
    proc = run(
        "sbatch", "--parsable", "-p", slurm_cluster["partition"], "-t", "2", "--open-mode=append",
        "-o", str(out), "--wrap", 'n=${SLURM_RESTART_COUNT:-0}; echo "run $n"; if [ "$n" = 0 ]; then sleep 60; fi',
    )  # fmt: skip
    job_id = proc.stdout.strip()
    wait_for("the job to start", lambda: out.exists() and "run 0" in out.read_text(), timeout=60)
    run("scontrol", "requeue", job_id)
    # A requeued job is eligible again after AuthInfo's cred_expire (10s here) + 1s.
    wait_for("the requeued job to run again", lambda: "run 1" in out.read_text())

    def both_runs_recorded():
        # -D lists every run of a requeued job, not only the last one.
        states = run("sacct", "-X", "-n", "-P", "-D", "-j", job_id, "-o", "State").stdout
        return sorted(states.split()) == ["COMPLETED", "REQUEUED"]

    wait_for("sacct to record the requeue and the completion", both_runs_recorded)
