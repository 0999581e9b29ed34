"""Apply a sweep plan: write the run dirs, hand the jobs to the backend, report.

This is the one place both Hydra entry points (a single run and `-m` multirun through the
launcher plugin) end up, so `backend=` behaves the same with and without `-m`.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from launcher import backends, yamlout
from launcher.plan import JobPlan, SweepPlan
from launcher.results import JobResult, failure_report, format_table

# Exit status of the last sweep, for `python -m launcher` to return (Hydra discards it).
EXIT_STATUS = 0

# The command line as the user typed it (set by __main__ before Hydra rewrites sys.argv).
USER_ARGS: list[str] | None = None


def fail(error: Exception) -> int:
    """Print a user error as one line; the exit status for it."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def command_line() -> str:
    args = sys.argv[1:] if USER_ARGS is None else USER_ARGS
    return shlex.join(["python", "-m", "launcher", *args])


def write_job_config(job: JobPlan) -> Path:
    """The job's resolved config as <run_dir>/config.yaml: what the trainer reads."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    path = job.run_dir / "config.yaml"
    path.write_text(yamlout.dumps(job.config))
    return path


def write_run_dirs(plan: SweepPlan) -> None:
    """The sweep manifest and each job's resolved config, before anything is submitted."""
    for job in plan.jobs:
        write_job_config(job)
    write_manifest(plan, {})


def write_manifest(plan: SweepPlan, handles: dict[str, Any]) -> None:
    manifest = {
        "sweep_id": plan.sweep_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command_line": plan.command_line,
        "cwd": os.getcwd(),
        "backend": plan.backend,
        "handles": handles,
        "jobs": [{"num": j.num, "overrides": j.overrides, "run_dir": str(j.run_dir)} for j in plan.jobs],
    }
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = plan.sweep_dir / "sweep.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(plan.sweep_dir / "sweep.json")


def _remove_hydra_leftovers(plan: SweepPlan) -> None:
    """Hydra makes the sweep dir (and multirun.yaml) before we run; a dry run leaves nothing."""
    leftovers = plan.sweep_dir / "multirun.yaml"
    leftovers.unlink(missing_ok=True)
    try:
        plan.sweep_dir.rmdir()
    except OSError:
        pass  # not empty: an earlier sweep with this id


def report(results: list[JobResult]) -> int:
    """Print the results table (and failures); the exit status: 0 only if every job completed."""
    print()
    print(format_table(results))
    failed = failure_report(results)
    if failed:
        print()
        print(failed)
    return 0 if all(r.ok for r in results) else 1


def run_plan(plan: SweepPlan, *, dry_run: bool, wait: bool, poll_s: float = 5.0) -> int:
    """Dry-run, or submit (and for local / --wait, run to the end and report)."""
    global EXIT_STATUS
    backend = backends.get(plan.backend)
    if dry_run:
        print(
            f"# dry run of sweep {plan.sweep_id}: {len(plan.jobs)} job(s) on {plan.backend}; nothing submitted"
        )
        print(f"# command: {plan.command_line}")
        print(backend.render(plan))
        _remove_hydra_leftovers(plan)
        EXIT_STATUS = 0
        return EXIT_STATUS
    write_run_dirs(plan)
    if plan.backend == "local":
        EXIT_STATUS = report(backend.submit(plan, poll_s=min(poll_s, 1.0)))
        return EXIT_STATUS
    submission = backend.submit(plan)
    write_manifest(plan, submission.to_json())
    arrays = ", ".join(submission.array_ids)
    print(f"sweep {plan.sweep_id}: {len(plan.jobs)} job(s) accepted by Slurm as {arrays}")
    for job, job_id in zip(plan.jobs, submission.job_ids, strict=True):
        print(f"  job {job.num} = slurm {job_id}: {job.label}")
    print(f"  runs: {plan.sweep_dir}/jobs/<n>   logs: {plan.sweep_dir}/slurm/<slurm job id>/")
    EXIT_STATUS = 0
    if wait:
        print("waiting for the jobs to end (Ctrl-C stops waiting; the jobs keep running)")
        try:
            EXIT_STATUS = report(backend.wait(plan, submission, poll_s=poll_s))
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the jobs keep running (scancel {arrays} stops them)")
            EXIT_STATUS = 130
    return EXIT_STATUS
