"""The preemption contract on the real local Slurm cluster, and sweeps larger than MaxArraySize.

A job that Slurm stops (a `scontrol requeue` from outside: SIGTERM; its time limit coming: USR2 from
`--signal`) checkpoints, is requeued, resumes and ends with exactly the parameters of a run that was
never interrupted. A failing job is not requeued; a job stopped more often than
`backend.max_requeues` allows ends FAILED. What happened is read back from Slurm (sacct with
--duplicates lists every attempt of a requeued job) and from `status/events.jsonl`, which every
task appends to.

Timing on the local cluster (slurm.conf: KillWait=5, cred_expire=10 so a requeued job starts again
about 11 s later): slurmctld looks at time limits every 30 s, and sends `--signal=USR2@S` at the
first look at or after 30 - S seconds into the job (for a 1-minute limit) and kills the job at the
first look after 60 s. With S=10 the warning comes 20-50 s into the job and the kill 60-90 s in.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher.registry import Registry

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[2]
SCALE = 0.05
# 40 sample items, batch 4: 10 steps per epoch; a tiny step takes 70-100 ms on one core here.
# SHORT (300 steps) is interrupted a few seconds in; LONG (1000 steps) still trains 50 s after its
# start even alone on a core, so the time-limit warning (20-50 s in) always finds it training.
BASE = ["trainer=singularity", "dataset=msrvtt", "backend=slurm", "site=local_slurm"]
SMALL = [f"dataset.sample_scale={SCALE}", "trainer.batch_size=4", "trainer.num_workers=0"]
SHORT = [*SMALL, "trainer.epochs=30", "trainer.checkpoint_every=7"]
LONG = [*SMALL, "trainer.epochs=100", "trainer.checkpoint_every=7"]
TRACKED = ["tracker.wandb=true", "tracker.mode=offline"]  # one tracker run must survive the requeue
RUN_TIMEOUT_S = 240
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "COMPLETING"}


# ------------------------------------------------------------------------------------------- helpers


def slurm(*cmd: str) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=True).stdout


def wait_for(what: str, probe: Callable[[], object], timeout: float = 60, every: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    value = probe()
    while not value:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
        value = probe()
    return value


def attempts(job_id: str) -> list[tuple[str, str]]:
    """(State, ExitCode) of every attempt of a job, oldest first (sacct --duplicates)."""
    out = slurm("sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", job_id)
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return [(state.split()[0], code) for jid, state, code in rows if jid == job_id]


def final_state(job_id: str) -> tuple[str, str] | None:
    """The latest attempt's (State, ExitCode) once the job has ended, else None."""
    rows = attempts(job_id)
    return rows[-1] if rows and rows[-1][0] not in ACTIVE else None


def squeue_ids(name: str) -> list[str]:
    out = slurm("squeue", "-h", "-r", "-n", name, "-o", "%i")
    return out.split()


@dataclass
class Job:
    """One launched single-job sweep: its Slurm id and run dir."""

    name: str
    sweep_dir: Path
    job_id: str
    output: str
    registry: str = ""

    @property
    def run_dir(self) -> Path:
        return self.sweep_dir / "jobs" / "0"

    @property
    def log(self) -> Path:
        return self.sweep_dir / "slurm" / self.job_id / f"{self.job_id}_0_log.out"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self) -> list[dict]:
        path = self.run_dir / "status" / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def digest(self) -> str:
        return (self.run_dir / "status" / "params.rank0.sha256").read_text().strip()

    def latest_step(self) -> int:
        latest = self.run_dir / "checkpoints" / "latest"
        m = re.search(r"ckpt_(\d+)", latest.read_text()) if latest.exists() else None
        return int(m.group(1)) if m else -1

    def wait_end(self, timeout: float = RUN_TIMEOUT_S) -> tuple[str, str]:
        return wait_for(f"job {self.job_id} to end", lambda: final_state(self.job_id), timeout, every=1.0)

    def details(self) -> str:
        events = "\n".join(json.dumps(e) for e in self.events())
        return f"{self.output}\n--- events\n{events}\n--- log {self.log}\n{self.log_text()[-4000:]}"


@pytest.fixture(scope="module")
def env(slurm_cluster, tmp_path_factory) -> dict[str, str]:
    """Our own runs, registry and sample data (made once here; jobs find it through the env)."""
    cache = tmp_path_factory.mktemp("vlaunch_data")
    base = dict(
        os.environ,
        VLAUNCH_RUNS=str(tmp_path_factory.mktemp("runs")),
        VLAUNCH_REGISTRY=str(tmp_path_factory.mktemp("registry") / "registry.sqlite"),
        VLAUNCH_DATA_CACHE=str(cache),
    )
    subprocess.run(
        [sys.executable, "-m", "trainers.core.sample_data", "msrvtt", "--scale", str(SCALE)],
        cwd=REPO_ROOT,
        env=base,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return base


@pytest.fixture(scope="module")
def launch(env):
    """Run `python -m launcher <args> name=<unique>` (not waiting); cancel everything it queued at the end."""
    names: list[str] = []

    def run(*args: str) -> Job:
        name = f"p{secrets.token_hex(4)}"
        names.append(name)
        proc = subprocess.run(
            [sys.executable, "-m", "launcher", *BASE, *args, f"name={name}"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert proc.returncode == 0, output
        head = re.search(r"^sweep (\S+): 1 job\(s\) accepted by Slurm as (\S+)$", proc.stdout, re.M)
        assert head, output
        return Job(
            name, Path(env["VLAUNCH_RUNS"]) / head.group(1), head.group(2), output, env["VLAUNCH_REGISTRY"]
        )

    run.names = names  # type: ignore[attr-defined]
    yield run
    for name in names:
        subprocess.run(["scancel", "-n", f"vl-{name}"], capture_output=True, check=False, timeout=30)


def of(events: list[dict], kind: str, **match: object) -> list[dict]:
    return [e for e in events if e["event"] == kind and all(e.get(k) == v for k, v in match.items())]


# ----------------------------------------------------------------- MaxArraySize, failures, the limit


def test_sweep_larger_than_max_array_size_is_split_and_every_job_queued_once(launch, env):
    max_size = int(
        re.search(r"^MaxArraySize\s*=\s*(\d+)", slurm("scontrol", "show", "config"), re.M).group(1)
    )
    n = max_size + 10
    name = f"p{secrets.token_hex(4)}"
    launch.names.append(name)  # type: ignore[attr-defined]
    args = ["-m", *BASE, f"seed=range(0,{n})", "backend.additional_parameters={hold:true}", f"name={name}"]
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    head = re.search(rf"^sweep (\S+): {n} job\(s\) accepted by Slurm as (.+)$", proc.stdout, re.M)
    assert head, proc.stdout[-3000:]
    arrays = [a.strip() for a in head.group(2).split(",")]
    assert len(arrays) == 2, arrays  # max_size jobs, then 10

    queued = squeue_ids(f"vl-{name}")
    manifest = json.loads((Path(env["VLAUNCH_RUNS"]) / head.group(1) / "sweep.json").read_text())
    job_ids = manifest["handles"]["job_ids"]
    assert len(queued) == n and len(set(queued)) == n, f"{len(queued)} queued, {len(set(queued))} distinct"
    assert len(job_ids) == n and set(job_ids) == set(queued)
    assert [j["num"] for j in manifest["jobs"]] == list(range(n))
    # Job k is index k of the first array, then index k - max_size of the second.
    assert job_ids[0] == f"{arrays[0]}_0" and job_ids[max_size - 1] == f"{arrays[0]}_{max_size - 1}"
    assert job_ids[max_size] == f"{arrays[1]}_0" and job_ids[-1] == f"{arrays[1]}_9"

    subprocess.run(["scancel", *arrays], check=True, timeout=30)
    wait_for("the held arrays to leave the queue", lambda: not squeue_ids(f"vl-{name}"), timeout=60)

    # The dry run shows the same split.
    plan = subprocess.run(
        [sys.executable, "-m", "launcher", *args, "--dry-run"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert plan.returncode == 0, plan.stderr
    assert re.findall(r"^#SBATCH --array=(\S+)$", plan.stdout, re.M) == [f"0-{max_size - 1}%256", "0-9%10"]
    assert f"(array 2 of 2 of a resource group: MaxArraySize={max_size})" in plan.stdout


def test_failing_job_is_failed_with_its_exit_code_and_not_requeued(launch):
    # An unreadable pretrained checkpoint: the trainer fails right after starting, exit code 2 (bad input).
    job = launch(*SMALL, "trainer.epochs=1", "trainer.pretrained=/dev/null")
    assert job.wait_end(timeout=120) == ("FAILED", "2:0"), job.details()
    assert attempts(job.job_id) == [("FAILED", "2:0")], job.details()  # one attempt: never requeued
    events = job.events()
    assert [(e["event"], e["attempt"], e["exit_code"]) for e in events] == [
        ("start", 0, None),
        ("exit", 0, 2),
    ]
    assert "requeue" not in job.log_text().lower(), job.details()


def test_requeue_limit_ends_the_job_failed_after_max_requeues(launch):
    """max_requeues=1: the first stop (USR2, as from --signal) requeues, the second fails the job."""
    job = launch(*LONG, "backend.max_requeues=1")
    for attempt in (0, 1):
        # The trainer has its stop handler before it saves its first checkpoint (attempt 0) or logs
        # the checkpoint it resumes from (attempt 1).
        ready = (
            (lambda: job.latest_step() > 0) if attempt == 0 else (lambda: "resuming from" in job.log_text())
        )
        wait_for(
            f"attempt {attempt} to train", lambda a=attempt: of(job.events(), "start", attempt=a), timeout=120
        )
        wait_for(f"attempt {attempt}'s trainer to be ready", ready, timeout=120)
        slurm("scancel", "--signal=USR2", job.job_id)
        if attempt == 0:
            wait_for("the requeue", lambda: of(job.events(), "requeue"), timeout=60)
    assert job.wait_end(timeout=120) == ("FAILED", "75:0"), job.details()
    assert [s for s, _ in attempts(job.job_id)] == ["REQUEUED", "FAILED"], job.details()
    events = job.events()
    assert [(e["attempt"], e["by"]) for e in of(events, "requeue")] == [(0, "launcher")], job.details()
    assert [e["exit_code"] for e in of(events, "exit")] == [75, 75], job.details()
    assert "NOT requeued: it has been requeued 1 time(s), backend.max_requeues=1" in job.log_text()


# ----------------------------------------------------------------- interrupted runs end like a clean one


class RaiseLimitAfterRequeue(threading.Thread):
    """Once the job has requeued itself, give its next attempt a long time limit, so that the test
    does not depend on where in slurmctld's 30 s cycle the next warning would fall."""

    def __init__(self, job: Job) -> None:
        super().__init__(daemon=True)
        self.job, self.done, self.stop = job, threading.Event(), threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            if of(self.job.events(), "requeue"):
                subprocess.run(["scontrol", "update", f"JobId={self.job.job_id}", "TimeLimit=20"], check=True)
                self.done.set()
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def interrupted_runs(launch):
    """Started together: SHORT uninterrupted and SHORT to be requeued from outside (the same
    training: they must end with the same parameters), and LONG with a one-minute time limit,
    watched so that its resumed attempt gets the time to finish."""
    timed = launch(*LONG, "backend.time_min=1", "backend.signal_delay_s=10")
    watcher = RaiseLimitAfterRequeue(timed)
    watcher.start()
    reference = launch(*SHORT)
    requeued = launch(*SHORT, *TRACKED)
    yield reference, requeued, timed, watcher
    watcher.stop.set()


def test_scontrol_requeue_resumes_from_the_checkpoint_to_the_same_parameters(interrupted_runs):
    reference, job, _, _ = interrupted_runs
    wait_for("a checkpoint at step 20 or later", lambda: job.latest_step() >= 20, timeout=150)
    requeued_at = time.time()
    slurm("scontrol", "requeue", job.job_id)
    assert job.wait_end() == ("COMPLETED", "0:0"), job.details()
    assert reference.wait_end() == ("COMPLETED", "0:0"), reference.details()
    assert [s for s, _ in attempts(job.job_id)] == ["REQUEUED", "COMPLETED"], job.details()

    # SIGTERM reached the trainer, which saved a checkpoint at its next step within KillWait, and the
    # next attempt resumed from exactly that step; Slurm did the requeue (rank 0 left it to Slurm).
    events = job.events()
    log = job.log_text()
    stopped = re.search(r"stopped at step (\d+) by a signal", log)
    assert stopped, job.details()
    resumed = log.split("stopped at step")[1]
    assert f"(step {stopped.group(1)})" in resumed, "did not resume from the stop checkpoint"
    first_exit = of(events, "exit", attempt=0)
    if first_exit:  # absent only if the trainer's exit outlasted KillWait (the checkpoint was in)
        assert first_exit[0]["signals"][-1] == "SIGTERM" and first_exit[0]["exit_code"] == 75, job.details()
        assert "Slurm is ending the job" in log
        print(f"scontrol requeue -> trainer exited 75 after {first_exit[0]['time'] - requeued_at:.2f} s")
    assert [(e["attempt"], e["by"]) for e in of(events, "requeue")] == [(0, "slurm")], job.details()
    assert of(events, "exit", attempt=1)[0]["exit_code"] == 0
    assert job.digest() == reference.digest()

    # The registry (refreshed by the ctl from Slurm and the run dir) shows the requeue in the job's
    # history, and the job kept one tracker run across both attempts.
    sweep_id = job.sweep_dir.name
    env = dict(os.environ, VLAUNCH_REGISTRY=job.registry)
    status = subprocess.run(
        [sys.executable, "-m", "launcher.ctl", "status", sweep_id, "--refresh"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    reg = Registry(Path(job.registry))
    (row,) = reg.jobs(sweep_id)
    assert (row.state, row.requeues, row.tracker_run_id) == ("COMPLETED", 1, f"{sweep_id}-0"), status.stdout
    assert any(e.kind == "requeue" for e in reg.events(sweep_id, 0)), reg.events(sweep_id, 0)
    offline = sorted((job.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(r.name.endswith(f"-{sweep_id}-0") for r in offline), offline


def test_time_limit_warning_checkpoints_requeues_and_completes(interrupted_runs):
    _, _, job, watcher = interrupted_runs
    assert job.wait_end() == ("COMPLETED", "0:0"), job.details()
    assert watcher.done.is_set()
    assert [s for s, _ in attempts(job.job_id)] == ["REQUEUED", "COMPLETED"], job.details()
    events = job.events()
    (first_exit,) = of(events, "exit", attempt=0)
    assert first_exit["signals"] == ["SIGUSR2"] and first_exit["exit_code"] == 75, job.details()
    assert [(e["attempt"], e["by"]) for e in of(events, "requeue")] == [(0, "launcher")], job.details()
    log = job.log_text()
    assert "received SIGUSR2" in log and "requeued (1 of at most 3)" in log, job.details()
    stopped = re.search(r"stopped at step (\d+) by a signal", log)
    assert stopped and f"(step {stopped.group(1)})" in log, job.details()
    assert (job.run_dir / "metrics.json").exists()


def test_a_job_whose_node_fails_is_requeued_and_reported_completed_not_node_fail(launch):
    """Slurm requeues a job whose node goes down (JobRequeue=1). Until it records the next attempt,
    sacct says NODE_FAIL of the job; the launcher (`--wait`, `vlaunch-ctl status`) must not take that
    for the job's end, or it stops waiting and shows a finished job as failed for good."""
    from launcher import registry

    job = launch(*SHORT)
    wait_for("a checkpoint", lambda: job.latest_step() > 0, timeout=150)
    node = slurm("squeue", "-h", "-j", job.job_id, "-o", "%N").strip()
    reg = Registry(Path(job.registry))
    sweep_id = job.sweep_dir.name
    seen: list[str] = []

    def ended() -> bool:
        registry.refresh(reg, reg.sweep(sweep_id), force=True)  # what `vlaunch-ctl status --refresh` does
        (row,) = reg.jobs(sweep_id)
        if not seen or seen[-1] != row.state:
            seen.append(row.state)
        return row.state in registry.TERMINAL

    try:
        slurm("scontrol", "update", f"nodename={node}", "state=down", "reason=vlaunch-test")
        wait_for("the registry to see the job end", ended, timeout=RUN_TIMEOUT_S, every=0.25)
    finally:  # the local cluster brings the node back by itself (ReturnToService=2); make sure of it
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
        wait_for(f"{node} to be up", lambda: "down" not in slurm("sinfo", "-h", "-n", node, "-o", "%T"))
    assert attempts(job.job_id)[0][0] == "NODE_FAIL", job.details()  # the node did fail the job
    assert seen[-1] == "COMPLETED", (seen, job.details())
    assert (job.run_dir / "metrics.json").exists()
