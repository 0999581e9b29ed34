"""The launcher against the real local Slurm cluster, run as a user runs it: `python -m launcher ...`.

Each test submits through `backend=slurm site=local_slurm` with small training settings and checks what
the user sees (the printed ids, the results table, the exit status) against what Slurm and the run
directories say (squeue, sacct, metrics.json, the per-rank status files and logs).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainers.core.sample_data import sample_data_root

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small enough for a job to train and evaluate in seconds on two CPU cores.
SCALE = 0.05
SMALL = [f"dataset.sample_scale={SCALE}", "trainer.epochs=1", "trainer.batch_size=4", "trainer.num_workers=0"]
SLURM = ["trainer=singularity", "backend=slurm", "site=local_slurm", "wait_poll_s=1"]
WAIT_TIMEOUT_S = 150  # one `--wait` launch, queueing included
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED"}


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """A test-only sample data cache, filled once (the jobs find it through VLAUNCH_DATA_CACHE)."""
    cache = tmp_path_factory.mktemp("vlaunch_data")
    subprocess.run(
        [sys.executable, "-m", "trainers.core.sample_data", "didemo", "msrvtt", "--scale", str(SCALE)],
        cwd=REPO_ROOT,
        env=dict(os.environ, VLAUNCH_DATA_CACHE=str(cache)),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return cache


@dataclass
class Launched:
    proc: subprocess.CompletedProcess
    runs: Path
    seconds: float

    @property
    def output(self) -> str:
        return f"exit status {self.proc.returncode}\n--- stdout\n{self.proc.stdout}\n--- stderr\n{self.proc.stderr}"


@pytest.fixture
def launch(slurm_cluster, data_cache, tmp_path) -> Iterator[Callable[..., Launched]]:
    """Run `python -m launcher <args> name=<a name unique to this test>`; cancel its jobs afterwards.

    The name makes the Slurm job name `vl-<name>`, so squeue/sacct can find this test's jobs (and
    only them) and nothing a failed test submitted outlives it.
    """
    names: list[str] = []
    runs = tmp_path / "runs"
    env = dict(os.environ, VLAUNCH_RUNS=str(runs), VLAUNCH_DATA_CACHE=str(data_cache))

    def run(*args: str, timeout: float = WAIT_TIMEOUT_S) -> Launched:
        name = f"t{secrets.token_hex(4)}"
        names.append(name)
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "launcher", *args, f"name={name}"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Launched(proc=proc, runs=runs, seconds=time.monotonic() - started)

    run.names = names  # type: ignore[attr-defined]
    yield run
    for name in names:
        subprocess.run(["scancel", "-n", f"vl-{name}"], capture_output=True, check=False, timeout=30)


# ------------------------------------------------------------------------------------------- helpers


def slurm(*cmd: str) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=True).stdout


def wait_for(what: str, probe: Callable[[], object], timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    value = probe()
    while not value:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)
        value = probe()
    return value


def sacct(job_ids: str) -> dict[str, tuple[str, str]]:
    """JobID -> (State, ExitCode) of the allocations (array tasks as <array>_<index>)."""
    out = slurm("sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", job_ids)
    rows = (line.split("|") for line in out.splitlines() if line.strip())
    return {job: (state.split()[0], code) for job, state, code in rows}


def squeue(*selector: str) -> dict[str, str]:
    """JobID -> State of the queued jobs matching the selector (array tasks one by one)."""
    out = slurm("squeue", "-h", "-r", "-o", "%i|%T", *selector)
    return dict(line.split("|", 1) for line in out.splitlines() if line.strip())


@dataclass
class Submission:
    sweep_id: str
    arrays: list[str]
    job_ids: list[str]  # per job number
    labels: list[str]


def parse_submission(stdout: str) -> Submission:
    """What the launcher prints once Slurm accepted the sweep."""
    head = re.search(r"^sweep (\S+): (\d+) job\(s\) accepted by Slurm as (.+)$", stdout, re.M)
    assert head, f"no 'sweep <id>: ... accepted by Slurm as <ids>' line in:\n{stdout}"
    jobs = re.findall(r"^  job (\d+) = slurm (\S+): (.*)$", stdout, re.M)
    assert [int(n) for n, _, _ in jobs] == list(range(int(head.group(2)))), stdout
    return Submission(
        sweep_id=head.group(1),
        arrays=[a.strip() for a in head.group(3).split(",")],
        job_ids=[j for _, j, _ in jobs],
        labels=[label for _, _, label in jobs],
    )


def table_row(stdout: str, num: int, label: str) -> str:
    """The results-table row of job `num` (the text after its overrides)."""
    m = re.search(rf"^{num}\s+{re.escape(label)}\s+(\S.*)$", stdout, re.M)
    assert m, f"no results row for job {num} ({label}) in:\n{stdout}"
    return m.group(1)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error: ' line, got:\n{stderr}"
    return lines[0]


def job_name(launch: Callable[..., Launched]) -> str:
    """The Slurm job name of the latest launch (`vl-` + the name the fixture gave it)."""
    return "vl-" + launch.names[-1]  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------- tests


def test_sweep_is_one_job_array_and_wait_prints_the_results(launch):
    run = launch("-m", *SLURM, "dataset=didemo,msrvtt", *SMALL, "--wait")
    assert run.proc.returncode == 0, run.output
    sub = parse_submission(run.proc.stdout)
    assert sub.labels == ["dataset=didemo", "dataset=msrvtt"], run.output

    # One array whose two tasks are the two jobs, as printed and as Slurm accounts them.
    assert len(sub.arrays) == 1, run.output
    array = sub.arrays[0]
    assert sub.job_ids == [f"{array}_0", f"{array}_1"], run.output
    accounted = sacct(array)
    assert {j: s for j, (s, _) in accounted.items()} == {
        f"{array}_0": "COMPLETED",
        f"{array}_1": "COMPLETED",
    }, accounted
    manifest = json.loads((run.runs / sub.sweep_id / "sweep.json").read_text())
    assert manifest["handles"] == {"array_ids": [array], "job_ids": sub.job_ids}

    assert "waiting for the jobs to end" in run.proc.stdout
    assert re.search(r"^job\s+overrides\s+state\s+R@1 \(chance\)\s+R@5 \(chance\)", run.proc.stdout, re.M)
    for num, (dataset, job_id) in enumerate(zip(("didemo", "msrvtt"), sub.job_ids, strict=True)):
        row = table_row(run.proc.stdout, num, f"dataset={dataset}")
        m = re.match(r"COMPLETED\s+(\d+\.\d) \((\d+\.\d)\)", row)
        assert m, f"job {num}: expected COMPLETED and R@1 (chance), got {row!r}"
        run_dir = run.runs / sub.sweep_id / "jobs" / str(num)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["task"] == "retrieval"
        assert m.groups() == (f"{metrics['headline']['R@1']:.1f}", f"{metrics['chance']['R@1']:.1f}")
        assert (run_dir / "status" / "exit_code.rank0").read_text().strip() == "0"
        log = run.runs / sub.sweep_id / "slurm" / job_id / f"{job_id}_0_log.out"
        assert f"on {dataset}" in log.read_text(), f"{log} is not job {num}'s log"


def test_without_wait_it_returns_while_the_jobs_are_queued(launch):
    run = launch("-m", *SLURM, "dataset=didemo,msrvtt", *SMALL, timeout=60)
    # Straight away: a job cannot even import torch in the time the launcher needs to return.
    queued = squeue("-n", job_name(launch))
    assert run.proc.returncode == 0, run.output
    sub = parse_submission(run.proc.stdout)
    assert set(queued) == set(sub.job_ids), f"squeue right after the launch: {queued}\n{run.output}"
    assert set(queued.values()) <= ACTIVE, f"jobs ended before the launcher returned: {queued}"

    # It printed where everything goes, and waited for nothing.
    sweep_dir = run.runs / sub.sweep_id
    assert f"runs: {sweep_dir}/jobs/<n>" in run.proc.stdout, run.output
    assert f"logs: {sweep_dir}/slurm/" in run.proc.stdout, run.output
    assert "waiting" not in run.proc.stdout and "R@1" not in run.proc.stdout, run.output
    assert not list(sweep_dir.glob("jobs/*/metrics.json"))
    assert json.loads((sweep_dir / "sweep.json").read_text())["handles"]["job_ids"] == sub.job_ids

    subprocess.run(["scancel", *sub.arrays], check=True, timeout=30)
    wait_for("the cancelled jobs to leave the queue", lambda: not squeue("-n", job_name(launch)), timeout=30)


def test_two_node_job_trains_one_replica_per_node(launch):
    run = launch(*SLURM, "dataset=msrvtt", *SMALL, "backend.nodes=2", "backend.tasks_per_node=1", "--wait")
    assert run.proc.returncode == 0, run.output
    sub = parse_submission(run.proc.stdout)
    (job_id,) = sub.job_ids
    assert sacct(job_id)[job_id][0] == "COMPLETED"
    assert re.search(r"^0\s+.*\sCOMPLETED\s+\d+\.\d \(", run.proc.stdout, re.M), run.output

    sweep_dir = run.runs / sub.sweep_id
    status = sweep_dir / "jobs" / "0" / "status"
    assert (sweep_dir / "jobs" / "0" / "metrics.json").exists()
    logs = {r: (sweep_dir / "slurm" / job_id / f"{job_id}_{r}_log.out").read_text() for r in (0, 1)}
    nodes = set()
    for rank, text in logs.items():
        # The launcher's task wrapper: srun placed one task on each node.
        m = re.search(rf"\[vlaunch\] rank {rank} of 2 on (\S+):", text)
        assert m, f"rank {rank}'s log has no '[vlaunch] rank {rank} of 2 on <node>' line:\n{text}"
        nodes.add(m.group(1))
        assert (status / f"exit_code.rank{rank}").read_text().strip() == "0"
    assert nodes == {"node1", "node2"}

    # DDP kept the replicas identical through the training steps.
    digests = [(status / f"params.rank{r}.sha256").read_text().strip() for r in (0, 1)]
    assert re.fullmatch(r"[0-9a-f]{64}", digests[0]) and digests[0] == digests[1], digests

    # The trainer itself saw a world of two on both ranks.
    for rank, text in logs.items():
        assert re.search(rf"rank {rank} of 2 \(slurm\)", text), (
            f"rank {rank}'s log lacks the trainer's 'rank {rank} of 2 (slurm)' line:\n{text}"
        )


def test_failing_job_is_reported_failed_with_exit_code_and_log_tail(launch, data_cache, tmp_path):
    # Real annotation files and vocabulary, but every video is garbage: training cannot load a batch.
    sample = sample_data_root("msrvtt", data_cache, scale=SCALE)
    bad = tmp_path / "corrupt_msrvtt"
    shutil.copytree(sample / "anno", bad / "anno")
    shutil.copy(sample / "vocab.txt", bad / "vocab.txt")
    (bad / "videos").mkdir()
    for video in (sample / "videos").iterdir():
        (bad / "videos" / video.name).write_bytes(b"this is not an mp4 file\n" * 8)

    run = launch(
        *SLURM, "dataset=msrvtt", f"dataset.data_root={bad}", "trainer.preset=tiny",
        "trainer.epochs=1", "trainer.batch_size=4", "trainer.num_workers=0", "--wait",
    )  # fmt: skip
    assert run.proc.returncode == 1, run.output
    assert "COMPLETED" not in run.proc.stdout, run.output
    sub = parse_submission(run.proc.stdout)
    (job_id,) = sub.job_ids
    assert sacct(job_id)[job_id] == ("FAILED", "1:0")

    row = table_row(run.proc.stdout, 0, sub.labels[0])
    assert row.startswith("FAILED (exit 1)"), row
    log = run.runs / sub.sweep_id / "slurm" / job_id / f"{job_id}_0_log.out"
    report = re.search(
        rf"^job 0 \(.*\) FAILED, exit code 1; log {re.escape(str(log))}:\n((?:    .*\n?)+)",
        run.proc.stdout,
        re.M,
    )
    assert report, f"no failure report naming the log {log}:\n{run.output}"
    tail = report.group(1)
    assert "failed to load" in tail and "Invalid data" in tail, tail
    assert "[vlaunch] rank 0: trainer exited with code 1" in tail, tail
    assert (run.runs / sub.sweep_id / "jobs" / "0" / "status" / "exit_code.rank0").read_text().strip() == "1"
    assert not (run.runs / sub.sweep_id / "jobs" / "0" / "metrics.json").exists()


def test_refused_partition_fails_in_one_line_and_leaves_nothing_queued(launch):
    run = launch(*SLURM, "dataset=msrvtt", *SMALL, "backend.partition=nosuch", timeout=60)
    assert run.proc.returncode == 2, run.output
    line = one_error_line(run.proc.stderr)
    assert "invalid partition" in line.lower() and "nosuch" in line, line
    assert "accepted" not in run.proc.stdout, run.output
    assert squeue("-n", job_name(launch)) == {}
    assert slurm("sacct", "-X", "-n", "-P", "-o", "JobID", "--name", job_name(launch)).strip() == ""


def test_sweep_whose_second_array_is_refused_cancels_the_first(launch):
    args = ["-m", *SLURM, "dataset=didemo,msrvtt", *SMALL, "backend.partition=debug,nosuch"]
    # Two partitions are two resource groups: two arrays of two jobs each, debug's first.
    plan = launch(*args, "--dry-run", timeout=60)
    assert plan.proc.returncode == 0, plan.output
    partitions = re.findall(r"^#SBATCH --partition=(\S+)$", plan.proc.stdout, re.M)
    assert partitions == ["debug", "nosuch"], plan.output
    assert plan.proc.stdout.count("#SBATCH --array=0-1%2") == 2, plan.output

    run = launch(*args, timeout=60)
    assert run.proc.returncode == 2, run.output
    line = one_error_line(run.proc.stderr)
    assert "invalid partition" in line.lower(), line
    m = re.search(r"cancelled the arrays already accepted: (\d+)\)", line)
    assert m, f"the message does not name the cancelled first array: {line}"
    first = m.group(1)
    name = job_name(launch)
    # Nothing of the sweep may still be waiting or running once the launcher has returned.
    queued = squeue("-n", name)
    assert not set(queued.values()) & ACTIVE, f"still queued after the refusal: {queued}"
    wait_for("the cancelled array to leave the queue", lambda: not squeue("-n", name), timeout=30)
    states = wait_for("sacct to record the cancelled array", lambda: sacct(first), timeout=30)
    assert {s for s, _ in states.values()} == {"CANCELLED"}, states
