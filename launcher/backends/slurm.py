"""The Slurm backend: one job array per sweep (per distinct resource request), through submitit.

`render` and `submit` build the batch script with the same submitit function, so the dry-run
text is exactly what sbatch receives. Submission is all-or-nothing: if sbatch refuses a later
array, the arrays already accepted are cancelled and sbatch's own message is reported.

A resource group with more jobs than the cluster's MaxArraySize (array indices must stay below it)
goes in as several arrays, each with its own `%array_parallelism` throttle. Jobs are submitted
`--requeue`, so the preemption contract of `launcher.task` can requeue them whatever the cluster's
JobRequeue default.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import LaunchError
from launcher.plan import SweepPlan
from launcher.results import (
    COMPLETED,
    FAILED,
    TERMINAL,
    JobResult,
    StatusLine,
    progress_text,
    read_metrics,
    tail,
)

# Our resource words -> submitit's SlurmExecutor parameters (which are sbatch's).
_DIRECT = (
    "partition",
    "account",
    "qos",
    "nodes",
    "cpus_per_task",
    "constraint",
    "exclude",
    "signal_delay_s",
    "setup",
    "srun_args",
    "array_parallelism",
    "comment",
    "additional_parameters",
)


def sbatch_parameters(resources: dict[str, Any], job_name: str) -> dict[str, Any]:
    """Translate a resolved backend config into submitit/sbatch parameters."""
    params: dict[str, Any] = {k: resources[k] for k in _DIRECT if resources.get(k) not in (None, [], {})}
    params["ntasks_per_node"] = int(resources["tasks_per_node"])
    params["time"] = int(resources["time_min"])
    if resources.get("gpus_per_node"):
        params["gpus_per_node"] = int(resources["gpus_per_node"])
    if resources.get("mem_gb") is not None:  # 0 asks for all of a node's memory
        params["mem"] = f"{int(resources['mem_gb'])}GB"
    params["job_name"] = resources.get("job_name") or job_name
    params["stderr_to_stdout"] = True  # one log per task: errors next to the output that led to them
    # Requeueable whatever the cluster's JobRequeue default: rank 0 requeues after exit 75.
    params["additional_parameters"] = {"requeue": True, **(resources.get("additional_parameters") or {})}
    return params


# Slurm's own default MaxArraySize, used when `scontrol show config` cannot be asked.
DEFAULT_MAX_ARRAY_SIZE = 1001
_max_array_size: tuple[int, str | None] | None = None


def max_array_size() -> tuple[int, str | None]:
    """The cluster's MaxArraySize (asked once per process), and why the default is used, if it is."""
    global _max_array_size
    if _max_array_size is None:
        why = None
        try:
            proc = subprocess.run(
                ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=False
            )
            m = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.M)
            if m:
                _max_array_size = (int(m.group(1)), None)
            else:
                why = (proc.stderr.strip().splitlines() or ["no MaxArraySize in its output"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            why = str(e)
        if _max_array_size is None:
            _max_array_size = (DEFAULT_MAX_ARRAY_SIZE, f"`scontrol show config` failed: {why}")
    return _max_array_size


def split_arrays(nums: list[int], max_size: int) -> list[list[int]]:
    """A resource group's jobs as arrays whose indices 0..n-1 stay below MaxArraySize."""
    size = max(1, max_size)
    return [nums[i : i + size] for i in range(0, len(nums), size)]


def _arrays(plan: SweepPlan) -> list[tuple[dict[str, Any], list[int], str]]:
    """(resources, job numbers, note) per sbatch call, in submission order; render and submit share it."""
    limit, _ = max_array_size()
    out = []
    for resources, nums in plan.resource_groups:
        parts = split_arrays(nums, limit)
        for i, part in enumerate(parts):
            note = f" (array {i + 1} of {len(parts)} of a resource group: MaxArraySize={limit})"
            out.append((resources, part, note if len(parts) > 1 else ""))
    return out


def _python(plan: SweepPlan, resources: dict[str, Any]) -> str:
    return resources.get("python") or shlex.quote(sys.executable)


def _folder(plan: SweepPlan) -> Path:
    return plan.sweep_dir / "slurm" / "%j"


def _job_name(plan: SweepPlan) -> str:
    return "vl-" + plan.jobs[0].config["job"]["name"]


def render(plan: SweepPlan) -> str:
    """The exact sbatch script(s) `submit` would hand to sbatch."""
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    texts = []
    arrays = _arrays(plan)
    limit, why = max_array_size()
    if why and any(len(nums) > 1 for _, nums, _ in arrays):
        # On stderr: stdout is the plan, the same on every machine for the same cluster settings.
        print(f"# MaxArraySize unknown ({why}); splitting arrays at Slurm's default {limit}", file=sys.stderr)
    for resources, nums, note in arrays:
        params = sbatch_parameters(resources, _job_name(plan))
        executor = SlurmExecutor(folder=_folder(plan), python=_python(plan, resources))
        executor.update_parameters(**params)
        if len(nums) > 1:  # as submit(): an array per group of several jobs, a plain job for one
            executor.parameters["map_count"] = len(nums)
        text = _make_sbatch_string(
            command=executor._submitit_command_str, folder=executor.folder, **executor.parameters
        )
        jobs = ", ".join(f"{i}={plan.jobs[n].label}" for i, n in enumerate(nums))
        texts.append(f"# --- sbatch script for {len(nums)} job(s){note} [array index=job: {jobs}]\n{text}")
    return "\n".join(texts)


def _validate(resources: dict[str, Any], plan: SweepPlan) -> dict[str, Any]:
    from submitit.slurm.slurm import SlurmExecutor

    params = sbatch_parameters(resources, _job_name(plan))
    try:
        SlurmExecutor(folder=_folder(plan)).update_parameters(**params)
    except ValueError as e:  # submitit lists the valid parameters
        raise LaunchError(f"invalid Slurm parameters: {e}") from None
    return params


@dataclass
class Submission:
    array_ids: list[str]
    job_ids: list[str]  # per job of the plan, e.g. "1234_0"

    def to_json(self) -> dict[str, Any]:
        return {"array_ids": self.array_ids, "job_ids": self.job_ids}


# Where Slurm's commands look for a config when SLURM_CONF is not set (configless clusters aside).
SYSTEM_SLURM_CONF = Path("/etc/slurm/slurm.conf")


def adopt_local_cluster() -> str | None:
    """Point Slurm's commands (ours and the jobs') at this machine's test cluster when nothing else
    names a cluster: SLURM_CONF unset, no system slurm.conf, and `infra/local_slurm.sh up` running
    (its slurmctld alive). Returns that slurm.conf when it was adopted, else None (nothing changed)."""
    if os.environ.get("SLURM_CONF") or SYSTEM_SLURM_CONF.exists():
        return None
    from launcher.snapshot import SOURCE_ROOT

    state = Path(os.environ.get("VLAUNCH_SLURM_STATE") or SOURCE_ROOT / ".state" / "slurm")
    conf = state / "etc" / "slurm.conf"
    try:
        pid = int((state / "run" / "slurmctld.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if not conf.is_file() or not Path(f"/proc/{pid}").exists():
        return None
    os.environ["SLURM_CONF"] = str(conf)
    return str(conf)


def submit(plan: SweepPlan) -> Submission:
    """Submit every job; returns as soon as Slurm has accepted them all."""
    import submitit
    from submitit.core.utils import FailedJobError

    from launcher.task import TrainerTask

    if shutil.which("sbatch") is None:
        raise LaunchError(
            "sbatch not found on PATH: run on a Slurm login node (or start infra/local_slurm.sh up)"
        )
    adopted = adopt_local_cluster()
    if adopted:
        print(
            f"  SLURM_CONF is not set and this machine has no Slurm config: using the local cluster ({adopted})"
        )
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # sbatch would retry for a minute before saying so
        raise LaunchError(
            f"SLURM_CONF={conf} does not exist; point it at your cluster's slurm.conf (on this machine: "
            'infra/local_slurm.sh up, then eval "$(infra/local_slurm.sh env)")'
        )
    batches = _arrays(plan)
    all_params = [_validate(resources, plan) for resources, _, _ in batches]
    code_dir = str(plan.code_dir) if plan.code_dir else None
    job_ids: dict[int, str] = {}
    arrays: list[str] = []
    try:
        for (resources, nums, _), params in zip(batches, all_params, strict=True):
            executor = submitit.SlurmExecutor(folder=_folder(plan), python=_python(plan, resources))
            executor.update_parameters(**params)
            max_requeues = int(resources.get("max_requeues") or 0)
            tasks = [
                TrainerTask(plan.jobs[n].command, str(plan.jobs[n].run_dir), code_dir, max_requeues)
                for n in nums
            ]
            # submitit echoes a refusing sbatch's stderr to ours; the message goes in our one line.
            with contextlib.redirect_stderr(io.StringIO()):
                if len(nums) == 1:  # as render(): a plain job, not an array of one
                    jobs = [executor.submit(tasks[0])]
                else:
                    with executor.batch():
                        jobs = [executor.submit(t) for t in tasks]
            arrays.append(jobs[0].job_id.split("_")[0])
            for n, job in zip(nums, jobs, strict=True):
                job_ids[n] = job.job_id
    except (FailedJobError, subprocess.CalledProcessError) as e:
        note = _cancel(arrays)
        raise LaunchError(f"sbatch refused the sweep: {_sbatch_message(e)}{note}") from None
    except BaseException:  # Ctrl-C or a bug between two arrays: still all-or-nothing
        _cancel(arrays)
        raise
    return Submission(array_ids=arrays, job_ids=[job_ids[j.num] for j in plan.jobs])


def _cancel(arrays: list[str]) -> str:
    """Cancel the arrays already accepted; a note for the error message saying so."""
    if not arrays:
        return ""
    proc = subprocess.run(["scancel", *arrays], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return (
            f" (could not cancel the arrays already accepted ({why}); "
            f"cancel them with: scancel {' '.join(arrays)})"
        )
    return f" (cancelled the arrays already accepted: {', '.join(arrays)})"


# sbatch's words when it found no cluster to talk to (no slurm.conf, or its controller is down).
_NO_CONTROLLER = re.compile(
    r"Unable to contact slurm controller|configuration source|Unable to process configuration file"
)


def _sbatch_message(error: Exception) -> str:
    text = str(error)
    found = re.findall(r"sbatch: error: (.*)", text)
    message = "; ".join(dict.fromkeys(found)) if found else text.strip().splitlines()[-1]
    if _NO_CONTROLLER.search(text):
        message += (
            f" (no Slurm controller answered with SLURM_CONF={os.environ.get('SLURM_CONF', '<unset>')}; on "
            'this machine: infra/local_slurm.sh up, then eval "$(infra/local_slurm.sh env)")'
        )
    return message


def log_path(plan_dir: Path, job_id: str, task: int = 0) -> Path:
    """A task's log of a submitit job (arrays use <array>_<index> as job id); task = the rank."""
    return plan_dir / "slurm" / job_id / f"{job_id}_{task}_log.out"


# ---------------------------------------------------------------- status

_ARRAY_RANGE = re.compile(r"^(\d+)_\[(.+)\]$")


def _expand(job_id: str) -> list[str]:
    """'12_[0-3,7%2]' -> ['12_0', ..., '12_3', '12_7']; plain ids unchanged."""
    m = _ARRAY_RANGE.match(job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


# A job can come back from these: Slurm requeues a job whose node failed (JobRequeue=1, the default),
# one that failed to launch, and one whose exit code the cluster's RequeueExit lists. Until the next
# attempt is recorded, sacct shows the attempt that ended; the queue already holds the job again.
_MAY_COME_BACK = {"NODE_FAIL", "BOOT_FAIL", FAILED}
_LEAVING = {"COMPLETING", *TERMINAL}


def query_states(array_ids: list[str]) -> dict[str, tuple[str, int | None]]:
    """State and exit code of every job of the given arrays: one sacct call, squeue as a fallback
    (and for the jobs sacct says ended in a way Slurm may requeue them from)."""
    states: dict[str, tuple[str, int | None]] = {}
    if not array_ids:
        return states
    proc = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(array_ids)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:  # accounting disabled or unreachable: squeue knows jobs until they leave
        return squeue_states(array_ids)
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 3:
            continue
        job_id, state, exit_code = parts[0], parts[1].split()[0], parts[2]
        code = int(exit_code.split(":")[0]) if exit_code and exit_code[0].isdigit() else None
        for jid in _expand(job_id):
            states[jid] = (state, code)
    ended = [jid for jid, (state, _) in states.items() if state in _MAY_COME_BACK]
    if ended:
        for jid, queued in squeue_states(ended).items():
            if queued[0] not in _LEAVING:  # requeued: pending or running again
                states[jid] = queued
    return states


def squeue_states(job_ids: list[str]) -> dict[str, tuple[str, int | None]]:
    """{job id: (state, None)} of those of the jobs (or arrays, task by task) still in the queue."""
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(job_ids)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    rows = (line.partition("|") for line in proc.stdout.splitlines())
    return {job_id: (state, None) for job_id, _, state in rows if state}


def collect(plan_dir: Path, labels: list[str], job_ids: list[str], run_dirs: list[Path]) -> list[JobResult]:
    """Current results of the jobs of a sweep (states from Slurm, metrics from the run dirs)."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    states = query_states(arrays)
    results = []
    for num, (label, job_id, run_dir) in enumerate(zip(labels, job_ids, run_dirs, strict=True)):
        state, code = states.get(job_id, ("PENDING", None))
        log = log_path(plan_dir, job_id)
        result = JobResult(num=num, label=label, state=state, exit_code=code, log_path=log)
        if state == COMPLETED:
            result.metrics = read_metrics(run_dir)
        elif state in TERMINAL:
            failed = [(rank, c) for rank, c in _exit_codes(run_dir).items() if c]
            if failed:
                # The rank that failed first (the others may only have been stopped because of it):
                # its exit code, and its log (task r's log is rank r's).
                rank, result.exit_code = failed[0]
                rank_log = log_path(plan_dir, job_id, rank)
                if rank_log.exists():
                    result.log_path = rank_log
            result.log_tail = tail(result.log_path)
        results.append(result)
    return results


def _exit_codes(run_dir: Path) -> dict[int, int]:
    """{rank: the trainer's exit code} from the status files TrainerTask writes, first written first."""
    found = []
    for f in (Path(run_dir) / "status").glob("exit_code.rank*"):
        try:
            found.append((f.stat().st_mtime, int(f.name.removeprefix("exit_code.rank")), int(f.read_text())))
        except (OSError, ValueError):
            pass
    return {rank: code for _, rank, code in sorted(found)}


def wait(plan: SweepPlan, submission: Submission, poll_s: float = 5.0) -> list[JobResult]:
    """Block until every job has ended, showing state counts and the running jobs' progress."""
    labels = [j.label for j in plan.jobs]
    run_dirs = [j.run_dir for j in plan.jobs]
    status = StatusLine(every_s=30.0)
    while True:
        results = collect(plan.sweep_dir, labels, submission.job_ids, run_dirs)
        if all(r.state in TERMINAL for r in results):
            status.done()
            return results
        counts: dict[str, int] = {}
        for r in results:
            counts[r.state] = counts.get(r.state, 0) + 1
        running = [r for r in results if r.state == "RUNNING"][:3]
        status.show(
            "  "
            + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
            + "".join(f" | job {r.num}: {progress_text(run_dirs[r.num])}" for r in running)
        )
        time.sleep(poll_s)


__all__ = ["render", "submit", "wait", "collect", "query_states", "Submission", "COMPLETED", "FAILED"]
