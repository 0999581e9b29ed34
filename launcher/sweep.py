"""Apply a sweep plan: write the run dirs, record it, hand the jobs to the backend, report.

This is the one place both Hydra entry points (a single run and `-m` multirun through the
launcher plugin) end up, so `backend=` behaves the same with and without `-m`.

Every sweep goes into the experiment registry (`launcher.registry`) before anything is submitted
(jobs SUBMITTING), then gets its backend handles (PENDING) or FAILED_TO_SUBMIT with the backend's
message; local runs and `--wait` record how each job ended. A dry run records nothing.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from launcher import backends, registry, snapshot, yamlout
from launcher.errors import LaunchError
from launcher.interrupts import Terminated, signals_stop_jobs
from launcher.plan import JobPlan, SweepPlan
from launcher.results import COMPLETED, JobResult, failure_report, format_table

REPO_ROOT = Path(__file__).resolve().parent.parent

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
        "code_dir": str(plan.code_dir) if plan.code_dir else None,
        "handles": handles,
        "jobs": [{"num": j.num, "overrides": j.overrides, "run_dir": str(j.run_dir)} for j in plan.jobs],
    }
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = plan.sweep_dir / "sweep.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(plan.sweep_dir / "sweep.json")


def remove_hydra_leftovers(sweep_dir: Path) -> None:
    """Hydra makes the sweep dir (and multirun.yaml) before we run; a dry run or a launch refused at
    plan time leaves nothing."""
    (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
    try:
        sweep_dir.rmdir()
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


def user_overrides(plan: SweepPlan) -> list[str]:
    """The overrides as the user typed them (flags left out)."""
    if USER_ARGS is None:
        return list(plan.jobs[0].overrides) if plan.jobs else []
    return [a for a in USER_ARGS if not a.startswith("-")]


def registry_path(plan: SweepPlan, configured: str | None = None) -> Path:
    """The registry file: the `registry` config key when given, else `$VLAUNCH_REGISTRY`, else XDG's."""
    return Path(configured).expanduser() if configured else registry.default_path()


def record_sweep(plan: SweepPlan, path: Path) -> registry.Registry:
    """The sweep and its jobs (SUBMITTING) in the registry, in one transaction; fails before submitting."""
    commit, diff_hash = registry.git_facts(REPO_ROOT)
    reg = registry.Registry(path)
    try:
        reg.record_sweep(
            plan,
            command_line=plan.command_line,
            overrides=user_overrides(plan),
            cwd=os.getcwd(),
            git_commit=commit,
            git_diff_sha256=diff_hash,
            code_dir=_code_dir(plan),
        )
    except registry.RegistryError as e:
        raise LaunchError(f"{e}; nothing was submitted") from None
    return reg


def _code_dir(plan: SweepPlan) -> str | None:
    code_dir = getattr(plan, "code_dir", None)  # the code snapshot, where the plan has one
    return str(code_dir) if code_dir else None


def record_results(reg: registry.Registry, sweep_id: str, results: list[JobResult], run_dirs: dict) -> None:
    """How jobs ended (states, exit codes) with what their run dirs hold (metrics, checkpoints)."""
    observations = []
    for r in results:
        facts = registry.read_run_dir(run_dirs[r.num])
        observations.append(
            registry.Observation(
                num=r.num,
                state=r.state,
                exit_code=r.exit_code,
                metrics=r.metrics or facts.metrics,
                checkpoint=facts.checkpoint,
                requeue_events=facts.requeue_events,
                tracker_run_id=facts.tracker_run_id,
            )
        )
    reg.update(sweep_id, observations)


def job_recorder(plan: SweepPlan, reg: registry.Registry, num_of: dict[int, int] | None = None):
    """`on_change(num, state, handle, code)` for a blocking backend: records each job's start (its
    handle: local pids or a TPU's name) and end (state, exit code, what its run dir holds).

    `num_of` maps the plan's job numbers to the registry's (a resubmission's plan holds some jobs
    of a sweep)."""
    num_of = num_of or {j.num: j.num for j in plan.jobs}
    run_dirs = {j.num: j.run_dir for j in plan.jobs}
    sweep_id = plan.sweep_id

    def on_change(num: int, state: str, handle, code: int | None) -> None:
        if handle is not None:
            if isinstance(handle, list):  # local processes
                handle = ",".join(map(str, handle))
            reg.set_handles(sweep_id, {num_of[num]: handle}, state=state)
            return
        facts = registry.read_run_dir(run_dirs[num])
        current = {j.num: j for j in reg.jobs(sweep_id, [num_of[num]])}[num_of[num]]
        if current.state == registry.CANCELLED and state != COMPLETED:
            return  # `vlaunch-ctl cancel` stopped it: the signal's exit code is not a failure
        reg.update(
            sweep_id,
            [
                registry.Observation(
                    num=num_of[num],
                    state=state,
                    exit_code=code,
                    metrics=facts.metrics,
                    checkpoint=facts.checkpoint,
                    tracker_run_id=facts.tracker_run_id,
                    requeue_events=facts.requeue_events,  # a TPU job's recreations and reruns
                )
            ],
        )

    return on_change


def run_local(plan: SweepPlan, reg: registry.Registry, poll_s: float, num_of=None) -> list[JobResult]:
    """Run a plan on the local backend, recording each job's start (pids) and end in the registry."""
    on_change = job_recorder(plan, reg, num_of)
    return backends.get("local").submit(plan, poll_s=min(poll_s, 1.0), on_change=on_change)


def run_tpu(plan: SweepPlan, reg: registry.Registry, num_of=None) -> list[JobResult]:
    """Run a plan on a TPU backend (blocking), recording each job's TPU and end in the registry."""
    return backends.get(plan.backend).run(plan, on_change=job_recorder(plan, reg, num_of))


def run_here(plan: SweepPlan, reg: registry.Registry, *, poll_s: float = 1.0, num_of=None) -> int:
    """Run a local or TPU plan to its end (the launch blocks), print the results, return the exit
    status. Ctrl-C, SIGTERM or SIGHUP: the backend has stopped the jobs (they checkpoint), and one
    line says how to go on (128 + the signal: 130 for Ctrl-C). A failure before the jobs start
    (staging, say) leaves them FAILED_TO_SUBMIT."""
    for job in plan.jobs:  # a cancel request a killed launcher never saw is not meant for this run
        registry.cancel_requested(job.run_dir, take=True)
    try:
        # The watcher files tell vlaunch-ctl that this process runs the jobs: resume leaves them
        # alone, cancel asks it to stop them; one left by a killed launcher says nobody does any more.
        with signals_stop_jobs(), registry.watching(j.run_dir for j in plan.jobs):
            if plan.backend == "local":
                results = run_local(plan, reg, poll_s, num_of)
            else:
                results = run_tpu(plan, reg, num_of)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"{what}; continue the unfinished jobs with: vlaunch-ctl resume {plan.sweep_id}", flush=True)
        return 128 + signum
    except LaunchError as e:
        waiting = [
            j.num for j in reg.jobs(plan.sweep_id, _sweep_nums(plan, num_of)) if j.state == registry.PENDING
        ]
        reg.mark(plan.sweep_id, waiting, registry.FAILED_TO_SUBMIT, error=str(e))
        raise
    return report(results)


def _sweep_nums(plan: SweepPlan, num_of: dict[int, int] | None) -> list[int]:
    """The registry's numbers of the plan's jobs (a resubmission's plan numbers its jobs its own way)."""
    return [num_of[j.num] for j in plan.jobs] if num_of else [j.num for j in plan.jobs]


def run_detached(plan: SweepPlan, reg: registry.Registry, num_of=None) -> int:
    """--detach: a child process in a session of its own runs the jobs (as `run_here` does, output to
    <sweep dir>/launcher.log); this one says how to follow them and returns at once. A closed terminal
    does not reach the child; `vlaunch-ctl cancel` or `kill <its pid>` stop its jobs at a checkpoint."""
    check = getattr(backends.get(plan.backend), "preflight", None)
    if check is not None:  # what would fail at once fails here, on the terminal, not in the log
        try:
            check(plan)
        except LaunchError as e:
            reg.mark(plan.sweep_id, _sweep_nums(plan, num_of), registry.FAILED_TO_SUBMIT, error=str(e))
            raise
    log = plan.sweep_dir / "launcher.log"
    path = reg.path
    reg.close()  # SQLite connections must not cross a fork: the child opens its own
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            for stream in (sys.stdout, sys.stderr):
                if hasattr(stream, "reconfigure"):
                    stream.reconfigure(line_buffering=True)
            print(f"launcher pid {os.getpid()}: {plan.command_line}")
            with registry.Registry(path) as child:
                code = run_here(plan, child, num_of=num_of)
        except LaunchError as e:
            code = fail(e)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    n = len(plan.jobs)
    print(f"sweep {plan.sweep_id}: {n} job(s) on {plan.backend}, run in the background by pid {pid}")
    print(f"  its output:  {log}")
    first = _sweep_nums(plan, num_of)[0]
    print(
        f"  follow:      vlaunch-ctl status {plan.sweep_id}; vlaunch-ctl logs {plan.sweep_id} {first} --follow"
    )
    print(f"  stop:        vlaunch-ctl cancel {plan.sweep_id}  (the jobs save a checkpoint first)")
    return 0


def run_plan(
    plan: SweepPlan,
    *,
    dry_run: bool,
    wait: bool,
    detach: bool = False,
    poll_s: float = 5.0,
    registry_file: str | None = None,
) -> int:
    """Dry-run, or record and submit (local / TPU: run to the end, or in the background with
    `detach`; Slurm with --wait: wait for the end; then record and report)."""
    global EXIT_STATUS
    backend = backends.get(plan.backend)
    if detach and wait:  # set in a config file (the command line's flags are checked before Hydra)
        remove_hydra_leftovers(plan.sweep_dir)
        raise LaunchError("detach and wait are both true: give one (wait blocks, detach returns at once)")
    if dry_run:
        print(
            f"# dry run of sweep {plan.sweep_id}: {len(plan.jobs)} job(s) on {plan.backend}; nothing submitted"
        )
        print(f"# command: {plan.command_line}")
        print(backend.render(plan))
        remove_hydra_leftovers(plan.sweep_dir)
        EXIT_STATUS = 0
        return EXIT_STATUS
    if (plan.sweep_dir / "sweep.json").exists():  # its configs and manifest must not be overwritten
        raise LaunchError(
            f"{plan.sweep_dir} already holds a sweep: give another sweep_id= (or runs_root=); nothing was "
            "submitted"
        )
    try:
        snapshot.attach(plan)  # jobs run the code submitted now, also when requeued after an edit
    except OSError as e:  # a full disk, or a runs_root this user cannot write
        remove_hydra_leftovers(plan.sweep_dir)
        where = e.filename2 or e.filename or plan.sweep_dir.parent  # copyfile: (source, destination)
        from trainers.core.storage import out_of_space

        fix = "free some space there or " if out_of_space(e) else ""
        raise LaunchError(
            f"cannot snapshot the code under {plan.sweep_dir.parent}: {e.strerror or e} ({where}); nothing "
            f"was submitted: {fix}set runs_root= to another directory"
        ) from None
    # The registry first: it refuses a sweep id it holds already, and one it cannot use, before a
    # run dir is written.
    try:
        reg = record_sweep(plan, registry_path(plan, registry_file))
    except LaunchError:
        remove_hydra_leftovers(plan.sweep_dir)
        raise
    nums = [j.num for j in plan.jobs]
    try:
        write_run_dirs(plan)
    except OSError as e:
        error = f"cannot write the run dirs under {plan.sweep_dir}: {e}; nothing was submitted"
        reg.mark(plan.sweep_id, nums, registry.FAILED_TO_SUBMIT, error=error)
        raise LaunchError(error) from None
    if plan.backend == "local" or plan.backend.startswith("tpu_"):
        reg.mark(plan.sweep_id, nums, registry.PENDING)
        EXIT_STATUS = run_detached(plan, reg) if detach else run_here(plan, reg, poll_s=poll_s)
        return EXIT_STATUS
    try:
        with signals_stop_jobs():
            submission = backend.submit(plan)
    except LaunchError as e:
        reg.mark(plan.sweep_id, nums, registry.FAILED_TO_SUBMIT, error=str(e))
        raise
    except BaseException as e:  # Ctrl-C during submission: the backend cancelled what it had submitted
        reg.mark(plan.sweep_id, nums, registry.FAILED_TO_SUBMIT, error=f"interrupted: {type(e).__name__}")
        raise
    reg.set_handles(plan.sweep_id, dict(zip(nums, submission.job_ids, strict=True)))
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
            results = backend.wait(plan, submission, poll_s=poll_s)
            record_results(reg, plan.sweep_id, results, {j.num: j.run_dir for j in plan.jobs})
            EXIT_STATUS = report(results)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the jobs keep running (scancel {arrays} stops them)")
            EXIT_STATUS = 130
    return EXIT_STATUS
