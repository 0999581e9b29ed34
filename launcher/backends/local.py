"""The local backend: every job as real processes on this machine, torchrun-style rank variables.

Jobs run in parallel as far as the cores allow (`backend.max_parallel`), each with
`tasks_per_node` processes that find each other through MASTER_ADDR/MASTER_PORT on loopback.
The launch blocks, shows progress, and ends with the results table.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from launcher import registry, snapshot
from launcher.plan import JobPlan, SweepPlan
from launcher.results import (
    CANCELLED,
    COMPLETED,
    FAILED,
    JobResult,
    StatusLine,
    progress_text,
    read_metrics,
    tail,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(
    rank: int, world_size: int, port: int, cpus: int, gpus: list[int] | None = None, base: dict | None = None
) -> dict[str, str]:
    """A local task's environment: torchrun's variables, which the trainers' distributed module reads."""
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(cpus),
        PYTHONUNBUFFERED="1",
    )
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return env


def log_path(job: JobPlan, rank: int) -> Path:
    return job.run_dir / "logs" / f"rank{rank}.log"


def render(plan: SweepPlan) -> str:
    """What `apply` would run, one command per job."""
    resources = plan.resource_groups[0][0]
    lines = [
        f"# local backend: {len(plan.jobs)} job(s), {resources['tasks_per_node']} process(es) each, "
        f"{resources['cpus_per_task']} thread(s) per process, at most {max_parallel(resources)} at once"
    ]
    for job in plan.jobs:
        lines.append(f"# job {job.num}: {job.label}")
        lines.append(shlex.join(job.command))
    return "\n".join(lines)


def max_parallel(resources: dict) -> int:
    if resources.get("max_parallel"):
        return int(resources["max_parallel"])
    per_job = int(resources["tasks_per_node"]) * int(resources["cpus_per_task"])
    return max(1, (os.cpu_count() or 1) // per_job)


@dataclass
class _Running:
    job: JobPlan
    procs: list[subprocess.Popen]
    started: float
    logs: list = field(default_factory=list)
    exited: dict[int, float] = field(default_factory=dict)  # rank -> when its process ended
    watchers: list[threading.Thread] = field(default_factory=list)

    def watch(self) -> None:
        """Note when each rank's process ends: when one rank fails, the others fail soon after (a
        collective's peer is gone), and only the first one's log says what went wrong."""

        def note(rank: int, proc: subprocess.Popen) -> None:
            proc.wait()
            self.exited[rank] = time.monotonic()

        for rank, proc in enumerate(self.procs):
            thread = threading.Thread(target=note, args=(rank, proc), daemon=True)
            thread.start()
            self.watchers.append(thread)

    def first_failure(self) -> tuple[int, int] | None:
        """(rank, exit code) of the rank that failed first; None if none did."""
        for thread in self.watchers:
            thread.join(timeout=5)
        failed = [
            (self.exited.get(rank, float("inf")), rank, proc.returncode)
            for rank, proc in enumerate(self.procs)
            if proc.returncode not in (None, 0)
        ]
        return min(failed)[1:] if failed else None


# on_change(job num, state, pids of its processes or None, exit code or None): as jobs start and end.
OnChange = Callable[[int, str, "list[int] | None", "int | None"], None]


def submit(plan: SweepPlan, poll_s: float = 1.0, on_change: OnChange | None = None) -> list[JobResult]:
    """Run every job, at most `max_parallel` at once; return when all have ended.

    `on_change` hears of every start (RUNNING, with the pids) and end (with the exit code): the
    launcher records them in the registry as they happen."""
    resources = plan.resource_groups[0][0]
    tasks = int(resources["tasks_per_node"])
    cpus = int(resources["cpus_per_task"])
    gpus_total = int(resources.get("gpus_per_node") or 0)
    limit = max_parallel(resources)
    pending = list(plan.jobs)
    running: list[_Running] = []
    results: dict[int, JobResult] = {}
    progress = StatusLine()
    print(
        f"sweep {plan.sweep_id}: running {len(plan.jobs)} job(s) locally, {limit} at once; runs in {plan.sweep_dir}"
    )

    def start(job: JobPlan) -> _Running:
        port = free_port()
        procs, logs = [], []
        for rank in range(tasks):
            path = log_path(job, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            log = open(path, "ab")
            gpus = None
            if gpus_total:
                share = max(1, gpus_total // tasks)
                gpus = list(range(rank * share, (rank + 1) * share))
            # From the code snapshot when there is one: the job runs the code it was submitted with.
            env = snapshot.run_env(plan.code_dir, job_env(rank, tasks, port, cpus, gpus))
            procs.append(
                subprocess.Popen(
                    job.command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=plan.code_dir or None,
                    start_new_session=True,
                )
            )
            logs.append(log)
        print(f"  job {job.num} ({job.label}) started: log {log_path(job, 0)}", flush=True)
        if on_change is not None:
            on_change(job.num, "RUNNING", [p.pid for p in procs], None)
        run = _Running(job, procs, time.monotonic(), logs)
        run.watch()
        return run

    def finish(run: _Running, state: str, code: int | None) -> None:
        for log in run.logs:
            log.close()
        path = log_path(run.job, 0)
        if state == FAILED:
            # The rank that failed first: its exit code and its log (rank 0 when unclear).
            rank, code = run.first_failure() or (0, code)
            path = log_path(run.job, rank)
        results[run.job.num] = JobResult(
            num=run.job.num,
            label=run.job.label,
            state=state,
            exit_code=code,
            log_path=path,
            metrics=read_metrics(run.job.run_dir),
            log_tail="" if state == COMPLETED else tail(path),
        )
        if on_change is not None:
            on_change(run.job.num, state, None, code)
        note = "" if state == COMPLETED or code is None else f" (exit code {code})"
        progress.done()
        print(
            f"  job {run.job.num} ({run.job.label}) {state}{note} after {time.monotonic() - run.started:.0f} s"
        )

    try:
        while pending or running:
            while pending and len(running) < limit:
                job = pending.pop(0)
                if registry.cancel_requested(job.run_dir, take=True):
                    results[job.num] = JobResult(job.num, job.label, CANCELLED)
                    if on_change is not None:
                        on_change(job.num, CANCELLED, None, None)
                    print(f"  job {job.num} ({job.label}) cancelled before it started (vlaunch-ctl cancel)")
                    continue
                running.append(start(job))
            for run in list(running):
                codes = [p.poll() for p in run.procs]
                failed = [c for c in codes if c not in (None, 0)]
                # vlaunch-ctl cancel stops a running job's processes after asking: not a failure.
                if failed and registry.cancel_requested(run.job.run_dir, take=True):
                    _stop(run.procs)
                    finish(run, CANCELLED, None)
                    running.remove(run)
                elif failed:
                    # One rank failed: the others would wait forever in a collective.
                    _stop(run.procs)
                    finish(run, FAILED, failed[0])
                    running.remove(run)
                elif all(c == 0 for c in codes):
                    finish(run, COMPLETED, 0)
                    running.remove(run)
            if running:
                progress.show(
                    f"  [{len(results)}/{len(plan.jobs)} done] "
                    + " | ".join(f"job {r.job.num}: {progress_text(r.job.run_dir)}" for r in running)
                )
                time.sleep(poll_s)
    except KeyboardInterrupt:
        progress.done()
        print("interrupted: stopping the running jobs")
        for run in running:
            _stop(run.procs)
            finish(run, CANCELLED, None)
        for job in pending:
            results[job.num] = JobResult(job.num, job.label, CANCELLED)
            if on_change is not None:
                on_change(job.num, CANCELLED, None, None)
        raise
    progress.done()
    return [results[j.num] for j in plan.jobs]


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
