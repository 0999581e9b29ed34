"""`vlaunch-ctl` (or `python -m launcher.ctl`): look after launched sweeps through the registry.

    vlaunch-ctl list [--limit N]                    sweeps, newest first, with job counts per state
    vlaunch-ctl status <sweep> [--refresh]          a sweep's jobs (states asked from Slurm, rate-limited)
    vlaunch-ctl history <sweep> [<job>]             every recorded event: state changes, requeues, resubmissions
    vlaunch-ctl logs <sweep> <job> [--rank R] [--follow]
    vlaunch-ctl cancel <sweep> [<job> ...]          scancel (Slurm) / stop the processes (local)
    vlaunch-ctl resubmit <sweep> --failed           ended-but-not-completed jobs again, with today's code
    vlaunch-ctl resume <sweep>                      every unfinished job again, with the code it was submitted with
    vlaunch-ctl report <sweep> [--out DIR]          metrics table, PNG plot, CSV and JSON

<sweep> is a sweep id, a unique prefix of one, or `latest`. `--registry PATH` picks the registry file
(default: $VLAUNCH_REGISTRY, else ~/.local/share/vlaunch/registry.sqlite).

Resubmitted and resumed jobs keep their config.yaml and run dir, so the trainer resumes from the
latest checkpoint there. Never imports torch or jax; Slurm and plotting code load on first use.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher import registry
from launcher.errors import LaunchError
from launcher.registry import Job, Registry, RegistryError, Sweep

DETACH_HELP = "local and TPU: run the jobs in the background (output in <sweep dir>/launcher.log)"
REFRESH_MAX_AGE_S = 10.0  # sacct is asked about a sweep at most this often, unless --refresh


class CtlError(Exception):
    """Printed as one `error:` line, exit status 2."""


# ---------------------------------------------------------------------------------------- helpers


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _state_text(job: Job) -> str:
    return job.state if job.exit_code in (None, 0) else f"{job.state} (exit {job.exit_code})"


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def headline_key(jobs: list[Job]) -> str | None:
    """The metric shown per job: R@1 when there is one, else the first headline metric."""
    keys: list[str] = []
    for j in jobs:
        keys += [k for k in j.metrics.get("headline", {}) if k not in keys]
    return "R@1" if "R@1" in keys else (keys[0] if keys else None)


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def refresh(
    reg: Registry, sweep: Sweep, *, force: bool = False, max_age_s: float = REFRESH_MAX_AGE_S
) -> Sweep:
    """The sweep after asking Slurm (one batched sacct) and reading its run dirs, rate-limited."""
    registry.refresh(reg, sweep, force=force, max_age_s=max_age_s)
    return reg.sweep(sweep.id)


# ---------------------------------------------------------------------------------------- commands


def cmd_list(reg: Registry, args: argparse.Namespace) -> int:
    sweeps = reg.sweeps(limit=args.limit)
    if not sweeps:
        print(f"no sweeps in {reg.path} yet")
        return 0
    counts = reg.state_counts([s.id for s in sweeps])
    rows = [
        [
            s.id,
            _when(s.created),
            s.backend,
            str(sum(counts[s.id].values())),
            _counts_text(counts[s.id]),
            s.name or "-",
            " ".join(s.overrides),
        ]
        for s in sweeps
    ]
    print(_table(["sweep", "created", "backend", "jobs", "states", "name", "overrides"], rows))
    return 0


def status_text(reg: Registry, sweep: Sweep, now: float | None = None) -> str:
    """The status table of a sweep, as recorded (refresh first for news)."""
    now = time.time() if now is None else now
    jobs = reg.jobs(sweep.id)
    metric = headline_key(jobs)
    rows = []
    for j in jobs:
        value = j.metrics.get("headline", {}).get(metric) if metric else None
        step = j.checkpoint_step
        rows.append(
            [
                str(j.num),
                j.label,
                j.handle or "-",
                _state_text(j),
                str(j.requeues),
                _fmt(value),
                "-" if step is None else f"step {step}" + (" (gone)" if j.checkpoint_gone else ""),
            ]
        )
    git = (sweep.git_commit or "no git")[:12] + (" +diff" if sweep.git_diff_sha256 else "")
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.state] = counts.get(j.state, 0) + 1
    source = "sacct" if sweep.backend == "slurm" else "the run dirs"
    fresh = (
        f"states from {source} {now - sweep.refreshed:.0f} s ago"
        if sweep.refreshed
        else "states as recorded at launch"
    )
    head = [
        f"sweep {sweep.id} ({sweep.name or '-'}): {len(jobs)} job(s) on {sweep.backend}, created "
        f"{_when(sweep.created)}, git {git}",
        f"  {_counts_text(counts)}; {fresh}; runs {sweep.runs_dir}",
    ]
    background = Path(sweep.runs_dir) / "launcher.log"
    if background.exists():  # launched (or resumed) with --detach
        head.append(f"  background launcher's output: {background}")
    header = ["job", "overrides", "handle", "state", "requeues", metric or "metric", "checkpoint"]
    why = [f"  job {j.num}: {j.error}" for j in jobs if j.error and j.state != registry.COMPLETED]
    return "\n".join([*head, _table(header, rows), *why])


def cmd_status(reg: Registry, args: argparse.Namespace) -> int:
    sweep = refresh(reg, reg.resolve(args.sweep), force=args.refresh, max_age_s=args.max_age)
    print(status_text(reg, sweep))
    return 0


def cmd_history(reg: Registry, args: argparse.Namespace) -> int:
    sweep = reg.resolve(args.sweep)
    if args.job is not None:
        reg.jobs(sweep.id, [args.job])  # a job the sweep does not have: one line, as `logs` and `cancel`
    rows = [
        [
            _when(e.time),
            str(e.num),
            e.kind,
            e.state or "-",
            "-" if e.exit_code is None else str(e.exit_code),
            e.handle or "-",
            e.detail or "",
        ]
        for e in reg.events(sweep.id, args.job)
    ]
    print(_table(["time", "job", "event", "state", "exit", "handle", "detail"], rows))
    return 0


def log_file(sweep: Sweep, job: Job, rank: int) -> Path:
    """Where a job's rank writes its output: the Slurm task log, or the local rank log."""
    if sweep.backend == "slurm":
        if not job.handle:
            raise CtlError(f"job {job.num} of sweep {sweep.id} has no Slurm job id (state {job.state})")
        return Path(sweep.runs_dir) / "slurm" / job.handle / f"{job.handle}_{rank}_log.out"
    if sweep.backend.startswith("tpu_"):
        return Path(job.run_dir) / "logs" / f"worker{rank}.log"  # one log per TPU host
    return Path(job.run_dir) / "logs" / f"rank{rank}.log"


def cmd_logs(reg: Registry, args: argparse.Namespace) -> int:
    sweep = reg.resolve(args.sweep)
    (job,) = reg.jobs(sweep.id, [args.job])
    path = log_file(sweep, job, args.rank)
    if not args.follow:
        if not path.exists():
            if not Path(sweep.runs_dir).is_dir():
                raise CtlError(f"no log at {path}: the sweep's runs dir {sweep.runs_dir} is gone")
            raise CtlError(f"no log yet at {path} (job {job.num} is {job.state})")
        with open(path, "rb") as f:
            sys.stdout.buffer.write(f.read())
        sys.stdout.flush()
        return 0
    return follow(reg, sweep, job.num, path)


def follow(
    reg: Registry, sweep: Sweep, num: int, path: Path, poll_s: float = 0.5, check_s: float = 2.0
) -> int:
    """Print the log as it grows, like `tail -f`, until the job has ended (then the rest of it)."""
    offset, last_check = 0, 0.0
    while True:
        ended = False
        if time.monotonic() - last_check >= check_s:
            last_check = time.monotonic()
            sweep = refresh(reg, reg.sweep(sweep.id), max_age_s=check_s)
            ended = reg.jobs(sweep.id, [num])[0].state in registry.TERMINAL
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        if ended:
            job = reg.jobs(sweep.id, [num])[0]
            print(f"[vlaunch-ctl] job {num} {_state_text(job)}", file=sys.stderr)
            return 0
        try:
            time.sleep(poll_s)
        except KeyboardInterrupt:
            return 130


def cmd_cancel(reg: Registry, args: argparse.Namespace) -> int:
    sweep = refresh(reg, reg.resolve(args.sweep))
    jobs = reg.jobs(sweep.id, args.jobs or None)
    live = [j for j in jobs if j.state not in registry.TERMINAL]
    if not live:
        print(
            f"nothing to cancel: the {'chosen jobs' if args.jobs else 'jobs'} of sweep {sweep.id} have all ended"
        )
        return 0
    if sweep.backend.startswith("tpu_"):
        return _cancel_tpu(reg, sweep, live, wait_s=args.wait)
    if sweep.backend == "slurm":
        with_handle = [j for j in live if j.handle]
        # A whole sweep: its arrays (tasks already ended are not touched); some jobs: their own ids.
        targets = registry.slurm_array_ids(with_handle) if not args.jobs else [j.handle for j in with_handle]
        if targets:
            proc = subprocess.run(["scancel", *targets], capture_output=True, text=True)
            if proc.returncode != 0:
                why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
                raise CtlError(f"scancel {' '.join(targets)} failed: {why}")
        what = ", ".join(targets) or "nothing queued"
    else:
        import signal

        stopped = []
        for j in live:
            # For the launcher that runs them: record CANCELLED, and never start one still waiting.
            registry.request_cancel(j.run_dir)
            for pid in registry.local_pids_alive(j.handle, j.run_dir):
                try:
                    os.killpg(pid, signal.SIGTERM)  # each local rank leads its own process group
                except ProcessLookupError:
                    continue
                stopped.append(str(pid))
        what = f"pids {', '.join(stopped)}" if stopped else "no live processes"
    reg.mark(sweep.id, [j.num for j in live], registry.CANCELLED, detail="vlaunch-ctl cancel")
    print(f"sweep {sweep.id}: cancelled {len(live)} job(s) ({what}): {' '.join(str(j.num) for j in live)}")
    return 0


# ---------------------------------------------------------------------------------------- relaunch


def build_plan(reg: Registry, sweep: Sweep, jobs: list[Job], *, code_dir: str | None, command_line: str):
    """A SweepPlan holding `jobs` of a recorded sweep (same configs, run dirs and resources), and
    {plan job number: sweep job number}. Slurm plans number their jobs 0..n-1 as the backend expects.

    With `code_dir`, the jobs run from that copy of the code (its cwd and the front of PYTHONPATH):
    the Slurm backend's task does that for `plan.code_dir`; local commands get it through `env`."""
    from launcher.plan import JobPlan, SweepPlan

    configs = reg.configs(sweep.id, [j.num for j in jobs])
    plan_jobs, num_of = [], {}
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for index, job in enumerate(jobs):
        num = index if sweep.backend == "slurm" else job.num
        command = list(job.command)
        if code_dir and sweep.backend == "local":
            command = ["env", "-C", code_dir, f"PYTHONPATH={code_dir}", *command]
        config = configs[job.num]
        plan_jobs.append(
            JobPlan(
                num=num,
                overrides=list(job.overrides),
                run_dir=Path(job.run_dir),
                config=config,
                command=command,
                label=job.label,
            )
        )
        num_of[num] = job.num
        resources = config["backend"]
        groups.setdefault(repr(sorted(resources.items())), (resources, []))[1].append(index)
    plan = SweepPlan(
        sweep_id=sweep.id,
        sweep_dir=Path(sweep.runs_dir),
        backend=sweep.backend,
        jobs=plan_jobs,
        command_line=command_line,
        resource_groups=list(groups.values()),
    )
    if sweep.backend != "local":
        plan.code_dir = Path(code_dir) if code_dir else None
    return plan, num_of


def relaunch(
    reg: Registry, sweep: Sweep, jobs: list[Job], *, code_dir: str | None, why: str, detach: bool = False
) -> int:
    """Submit `jobs` of `sweep` again through its backend and record the new handles (local and TPU:
    run them here, or in a background launcher with `detach`)."""
    from launcher import backends
    from launcher import sweep as apply

    plan, num_of = build_plan(
        reg, sweep, jobs, code_dir=code_dir, command_line=" ".join(["vlaunch-ctl", *sys.argv[1:]])
    )
    for job in plan.jobs:
        if not (job.run_dir / "config.yaml").exists():  # removed since: it is in the registry
            apply.write_job_config(job)
    for job in jobs:
        step = job.checkpoint_step
        if job.checkpoint_gone:
            start = f"from the start: its checkpoint {job.checkpoint} is gone"
        elif step is not None:
            start = f"from checkpoint step {step}"
        else:
            start = "from its latest checkpoint, if any"
        print(f"  job {job.num} ({job.label}) was {_state_text(job)}: again {start}")
    if sweep.backend == "local" or sweep.backend.startswith("tpu_"):
        if sweep.backend != "local":
            from launcher import snapshot

            snapshot.attach(plan)  # the hosts get staged code: today's (resubmit) or the sweep's (resume)
        reg.update(
            sweep.id,
            [registry.Observation(num=n, state=registry.PENDING) for n in num_of.values()],
            kind="resubmit",
            detail=why,
        )
        if detach:
            return apply.run_detached(plan, reg, num_of=num_of)
        return apply.run_here(plan, reg, num_of=num_of)
    try:
        submission = backends.get(sweep.backend).submit(plan)
    except LaunchError as e:
        raise CtlError(str(e)) from None
    handles = {num_of[j.num]: job_id for j, job_id in zip(plan.jobs, submission.job_ids, strict=True)}
    reg.update(
        sweep.id,
        [registry.Observation(num=n, state=registry.PENDING, handle=h) for n, h in handles.items()],
        kind="resubmit",
        detail=why,
    )
    print(f"sweep {sweep.id}: {len(handles)} job(s) submitted again as {', '.join(submission.array_ids)}")
    for num, handle in handles.items():
        print(f"  job {num} = slurm {handle}")
    return 0


def cmd_resubmit(reg: Registry, args: argparse.Namespace) -> int:
    if not args.failed:
        raise CtlError("say which jobs: vlaunch-ctl resubmit <sweep> --failed")
    sweep = refresh(reg, reg.resolve(args.sweep), force=True)
    jobs = [j for j in reg.jobs(sweep.id) if j.state in registry.FAILED_STATES]
    if not jobs:
        counts = _counts_text(reg.state_counts([sweep.id])[sweep.id])
        print(f"sweep {sweep.id}: no failed, cancelled or timed-out jobs to resubmit ({counts})")
        return 0
    print(f"sweep {sweep.id}: resubmitting {len(jobs)} job(s) with the current code")
    return relaunch(reg, sweep, jobs, code_dir=None, why="vlaunch-ctl resubmit --failed", detach=args.detach)


def cmd_teardown(reg: Registry, args: argparse.Namespace) -> int:
    sweep = refresh(reg, reg.resolve(args.sweep))
    if not sweep.backend.startswith("tpu_"):
        raise CtlError(
            f"sweep {sweep.id} ran on {sweep.backend}: teardown deletes what TPU sweeps left behind"
        )
    jobs = reg.jobs(sweep.id, args.jobs or None)
    running = [j for j in jobs if registry.watched(j.run_dir)]
    if running:
        print(
            f"sweep {sweep.id}: left alone, a launcher still runs them (vlaunch-ctl cancel stops them and "
            f"tears their TPUs down): {' '.join(str(j.num) for j in running)}"
        )
    jobs = [j for j in jobs if j not in running]
    if not jobs:
        return 0
    from launcher.backends import tpu

    plan, num_of = build_plan(reg, sweep, jobs, code_dir=None, command_line="vlaunch-ctl teardown")
    try:
        for job, what in tpu.teardown_left(plan):
            print(f"  job {num_of[job.num]}: {what}")
    except LaunchError as e:
        raise CtlError(str(e)) from None
    return 0


def _cancel_tpu(reg: Registry, sweep: Sweep, live: list[Job], wait_s: float) -> int:
    """A TPU job is stopped by the launcher that runs it: ask it through the job's run dir, and wait
    (up to `wait_s`) while its hosts save a checkpoint and its TPU is torn down."""
    watched = [j for j in live if registry.watched(j.run_dir)]
    orphans = [j for j in live if j not in watched]
    if orphans:  # no launcher runs them (any more): there is nothing to stop
        reg.mark(sweep.id, [j.num for j in orphans], registry.CANCELLED, detail="vlaunch-ctl cancel")
        print(f"sweep {sweep.id}: cancelled {len(orphans)} job(s): {' '.join(str(j.num) for j in orphans)}")
    if not watched:
        return 0
    for j in watched:
        registry.request_cancel(j.run_dir)
    launchers = sorted({_launcher_text(registry.watcher(j.run_dir)) for j in watched})
    nums = [j.num for j in watched]
    print(
        f"sweep {sweep.id}: asked {', '.join(launchers)} to stop job(s) {' '.join(map(str, nums))}: "
        "its hosts save a checkpoint, then its TPU is torn down as backend.teardown says"
    )
    from launcher.results import StatusLine

    status = StatusLine(every_s=15.0)
    started = time.monotonic()
    try:
        while time.monotonic() - started < wait_s:
            jobs = reg.jobs(sweep.id, nums)
            left = [j for j in jobs if j.state not in registry.TERMINAL]
            if not left:
                status.done()
                print(f"sweep {sweep.id}: cancelled {len(jobs)} job(s): {' '.join(map(str, nums))}")
                return 0
            seen = {registry.watcher(j.run_dir)[0] for j in left}
            if "alive" not in seen:
                status.done()
                if "elsewhere" in seen:  # its registry may not be this one: nothing to wait for here
                    print("their launcher runs on another machine: it records them CANCELLED there")
                    return 0
                break  # the launcher ended without recording them: status says so after a refresh
            status.show(f"  waiting for {len(left)} job(s) to stop ({time.monotonic() - started:.0f} s)")
            time.sleep(0.5)
    except KeyboardInterrupt:
        status.done()
        print(f"stopped waiting; the launcher goes on stopping them (vlaunch-ctl status {sweep.id})")
        return 130
    status.done()
    print(f"not all have stopped yet: vlaunch-ctl status {sweep.id} shows when they have")
    return 1


def _launcher_text(seen: tuple[str, dict[str, Any]]) -> str:
    state, facts = seen
    where = "" if state == "alive" else f" on {facts.get('host')}"
    return f"the launcher (pid {facts.get('pid')}{where})"


def _alive(sweep: Sweep, jobs: list[Job]) -> set[int]:
    """Jobs the backend still runs or queues (a PENDING job Slurm never heard of is lost, not alive)."""
    waiting = [j for j in jobs if j.state not in registry.TERMINAL]
    if sweep.backend == "local" or sweep.backend.startswith("tpu_"):
        # Its processes run, or the launcher that will start it (or watches its TPU) still does.
        return {
            j.num
            for j in waiting
            if (sweep.backend == "local" and registry.local_pids_alive(j.handle, j.run_dir))
            or registry.watched(j.run_dir)
        }
    with_handle = [j for j in waiting if j.handle]
    if not with_handle:
        return set()
    from launcher.backends.slurm import query_states

    states = query_states(registry.slurm_array_ids(with_handle))
    known = {j.num: registry.slurm_state(states, j.handle) for j in with_handle}
    return {num for num, state in known.items() if state is not None and state[0] not in registry.TERMINAL}


def cmd_resume(reg: Registry, args: argparse.Namespace) -> int:
    sweep = refresh(reg, reg.resolve(args.sweep), force=True)
    unfinished = [j for j in reg.jobs(sweep.id) if j.state != registry.COMPLETED]
    alive = _alive(sweep, unfinished)
    if alive:
        print(f"sweep {sweep.id}: {len(alive)} job(s) still queued or running, left alone: {sorted(alive)}")
    jobs = [j for j in unfinished if j.num not in alive]
    if not jobs:
        print(f"sweep {sweep.id}: nothing to resume")
        return 0
    if sweep.code_dir and not Path(sweep.code_dir).is_dir():
        raise CtlError(
            f"sweep {sweep.id} ran the code in {sweep.code_dir}, which is gone; resubmit --failed runs today's"
        )
    if sweep.code_dir:
        print(
            f"sweep {sweep.id}: resuming {len(jobs)} job(s) with the code it was submitted with ({sweep.code_dir})"
        )
    else:
        print(
            f"warning: sweep {sweep.id} has no code snapshot; resuming with the current code in "
            f"{Path(__file__).resolve().parent.parent} (git {sweep.git_commit or '?'} at submission)",
            file=sys.stderr,
        )
        print(f"sweep {sweep.id}: resuming {len(jobs)} job(s)")
    return relaunch(reg, sweep, jobs, code_dir=sweep.code_dir, why="vlaunch-ctl resume", detach=args.detach)


# ---------------------------------------------------------------------------------------- report


def write_report(reg: Registry, sweep: Sweep, out: Path) -> dict[str, Path]:
    """Metrics table (text), bar chart (PNG), CSV and JSON of a sweep's jobs; their paths."""
    from launcher.results import JobResult, format_table

    jobs = reg.jobs(sweep.id)
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for j in jobs:
        keys += [k for k in j.metrics.get("headline", {}) if k not in keys]
    results = [JobResult(j.num, j.label, j.state, j.exit_code, metrics=j.metrics) for j in jobs]
    paths = {"table": out / "table.txt", "csv": out / "metrics.csv", "json": out / "metrics.json"}
    paths["table"].write_text(format_table(results) + "\n")

    base = ["job", "label", "handle", "state", "exit_code", "requeues", "checkpoint"]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(base + keys + [f"chance {k}" for k in keys])
        for j in jobs:
            head, chance = j.metrics.get("headline", {}), j.metrics.get("chance", {})
            writer.writerow(
                [j.num, j.label, j.handle or "", j.state, "" if j.exit_code is None else j.exit_code]
                + [j.requeues, j.checkpoint or ""]
                + [head.get(k, "") for k in keys]
                + [chance.get(k, "") for k in keys]
            )
    document = {
        "sweep": {
            "id": sweep.id,
            "name": sweep.name,
            "created": sweep.created,
            "backend": sweep.backend,
            "command_line": sweep.command_line,
            "git_commit": sweep.git_commit,
            "git_diff_sha256": sweep.git_diff_sha256,
            "runs_dir": sweep.runs_dir,
        },
        "jobs": [
            {
                "num": j.num,
                "label": j.label,
                "overrides": j.overrides,
                "handle": j.handle,
                "state": j.state,
                "exit_code": j.exit_code,
                "requeues": j.requeues,
                "checkpoint": j.checkpoint,
                "tracker_run_id": j.tracker_run_id,
                "metrics": j.metrics,
            }
            for j in jobs
        ],
    }
    paths["json"].write_text(json.dumps(document, indent=1))
    paths["png"] = out / "metrics.png"
    plot(sweep, jobs, keys, paths["png"])
    return paths


def plot(sweep: Sweep, jobs: list[Job], keys: list[str], path: Path) -> None:
    """Grouped bars: the headline metrics of each job, chance level drawn over each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(jobs) * max(1, len(keys)) / 2 + 2), 4.5))
    width = 0.8 / max(1, len(keys))
    for k_index, key in enumerate(keys):
        xs, heights, chances = [], [], []
        for j_index, job in enumerate(jobs):
            value = job.metrics.get("headline", {}).get(key)
            if isinstance(value, int | float):
                xs.append(j_index + (k_index - (len(keys) - 1) / 2) * width)
                heights.append(value)
                chances.append(job.metrics.get("chance", {}).get(key))
        ax.bar(xs, heights, width=width * 0.95, label=key)
        for x, chance in zip(xs, chances, strict=True):
            if isinstance(chance, int | float):
                ax.hlines(
                    chance, x - width / 2, x + width / 2, colors="black", linestyles="--", linewidth=1.2
                )
    if any(isinstance(j.metrics.get("chance", {}).get(k), int | float) for j in jobs for k in keys):
        ax.plot([], [], "k--", linewidth=1.2, label="chance")
    if not keys:
        ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(range(len(jobs)))
    ax.set_xticklabels([f"{j.num}: {j.label}"[:40] for j in jobs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(f"sweep {sweep.id}" + (f" ({sweep.name})" if sweep.name else ""))
    if keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_report(reg: Registry, args: argparse.Namespace) -> int:
    sweep = refresh(reg, reg.resolve(args.sweep))
    out = Path(args.out) if args.out else Path(sweep.runs_dir) / "report"
    try:
        paths = write_report(reg, sweep, out)
    except OSError as e:
        raise CtlError(
            f"cannot write the report to {out}: {e.strerror or e}; give --out a directory you can write"
        ) from None
    print(paths["table"].read_text().rstrip())
    print()
    for what in ("png", "csv", "json", "table"):
        print(f"{what}: {paths[what]}")
    return 0


# ---------------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlaunch-ctl", description="Look after launched sweeps: status, logs, cancel, resubmit, report."
    )
    p.add_argument("--registry", help="registry file (default: $VLAUNCH_REGISTRY or ~/.local/share/vlaunch/)")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    s = sub.add_parser("list", help="sweeps, newest first, with job counts per state")
    s.add_argument("--limit", type=int, default=20)
    s.set_defaults(run=cmd_list)

    s = sub.add_parser("status", help="a sweep's jobs, states refreshed from Slurm")
    s.add_argument("sweep", help="sweep id, a unique prefix of it, or 'latest'")
    s.add_argument("--refresh", action="store_true", help="ask Slurm now, however recent the last answer")
    s.add_argument("--max-age", type=float, default=REFRESH_MAX_AGE_S, help="seconds an answer stays fresh")
    s.set_defaults(run=cmd_status)

    s = sub.add_parser("history", help="recorded events: state changes, requeues, resubmissions")
    s.add_argument("sweep")
    s.add_argument("job", type=int, nargs="?")
    s.set_defaults(run=cmd_history)

    s = sub.add_parser("logs", help="print a job's log (Slurm task log or local rank log)")
    s.add_argument("sweep")
    s.add_argument("job", type=int)
    s.add_argument("--rank", type=int, default=0)
    s.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    s.set_defaults(run=cmd_logs)

    s = sub.add_parser("cancel", help="cancel a sweep, or some of its jobs")
    s.add_argument("sweep")
    s.add_argument("jobs", type=int, nargs="*")
    s.add_argument(
        "--wait",
        type=float,
        default=600.0,
        metavar="S",
        help="TPU jobs: wait up to S seconds while their launcher stops them (default 600)",
    )
    s.set_defaults(run=cmd_cancel)

    s = sub.add_parser(
        "teardown", help="TPU sweeps: delete the TPUs their jobs left (a killed launcher, teardown=keep)"
    )
    s.add_argument("sweep")
    s.add_argument("jobs", type=int, nargs="*")
    s.set_defaults(run=cmd_teardown)

    s = sub.add_parser("resubmit", help="submit failed/cancelled/timed-out jobs again (current code)")
    s.add_argument("sweep")
    s.add_argument("--failed", action="store_true", help="every job that ended without completing")
    s.add_argument("--detach", action="store_true", help=DETACH_HELP)
    s.set_defaults(run=cmd_resubmit)

    s = sub.add_parser("resume", help="re-launch every unfinished job with the code it was submitted with")
    s.add_argument("sweep")
    s.add_argument("--detach", action="store_true", help=DETACH_HELP)
    s.set_defaults(run=cmd_resume)

    s = sub.add_parser("report", help="metrics table, PNG plot, CSV and JSON of a sweep")
    s.add_argument("sweep")
    s.add_argument("--out", help="directory for the files (default: <runs>/<sweep>/report)")
    s.set_defaults(run=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from launcher.backends.slurm import adopt_local_cluster

    adopt_local_cluster()  # squeue/sacct/scancel find the local test cluster as the launch did
    reg = Registry(args.registry)
    try:
        return args.run(reg, args)
    except (RegistryError, CtlError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        reg.close()


if __name__ == "__main__":
    sys.exit(main())
