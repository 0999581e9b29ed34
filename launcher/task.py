"""What submitit runs in each Slurm task: the trainer as its own program, and the preemption contract.

Kept free of heavy imports: it is unpickled on the node by `submitit.core._submit` and only
starts `python -m trainers.<family> <run_dir>/config.yaml` (from the code snapshot when there is
one), whose distributed module reads the allocation (SLURM_PROCID, SLURM_NTASKS, ...).

The preemption contract on Slurm:

1. Slurm sends USR2 `signal_delay_s` before the time limit (`--signal`), SIGTERM when it ends the
   job (scancel, `scontrol requeue`, preemption, the time limit itself; SIGKILL follows KillWait
   later). Each task passes the signal to its trainer, which checkpoints at a step every rank
   agrees on and exits REQUEUE_EXIT_CODE (75).
2. On exit 75, rank 0 requeues the job (`scontrol requeue`, the array task alone for arrays) while
   its requeue count, SLURM_RESTART_COUNT, is below `backend.max_requeues`; past the limit the job
   ends FAILED (exit 75) with a line saying why. The requeued job runs this again and the trainer
   resumes from its latest checkpoint.
3. Not after a SIGTERM: Slurm is ending the job then, and it requeues it by itself when that is
   why (`scontrol requeue`, preemption in REQUEUE mode); a cancelled job must stay cancelled.
4. Any other non-zero exit is a failure and is never requeued.

Every task appends what happens to `<run_dir>/status/events.jsonl`, one JSON object per line:
{"time", "event": "start" | "exit" | "requeue", "rank", "attempt", "exit_code", "host", "job_id", ...}.
`attempt` is SLURM_RESTART_COUNT; a requeue event's `attempt` is the attempt that ended, its `by`
says who requeued ("launcher": rank 0 after exit 75; "slurm": noticed when the next attempt starts).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# trainers.core.job.REQUEUE_EXIT_CODE; not imported, since that module imports numpy.
REQUEUE_EXIT_CODE = 75
FORWARDED = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


def append_event(run_dir: str | Path, event: dict) -> None:
    """Append one JSON line to <run_dir>/status/events.jsonl in a single O_APPEND write.

    One write() of a whole line on a file opened O_APPEND lands in one piece even with every rank
    of every attempt appending to the same file (on local filesystems; NFS does not promise it).
    """
    path = Path(run_dir) / "status" / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(event, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def slurm_job_id(environ: dict[str, str]) -> str:
    """The id that names this job alone: `<array>_<index>` for an array task, else the job id."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID", "")


class TrainerTask:
    """A picklable callable: run the trainer command, pass signals on, requeue on exit 75."""

    def __init__(
        self,
        command: list[str],
        run_dir: str,
        code_dir: str | None = None,
        max_requeues: int = 3,
    ) -> None:
        self.command = list(command)
        self.run_dir = run_dir
        self.code_dir = code_dir  # the code snapshot to run from; None: the launcher's own tree
        self.max_requeues = int(max_requeues)

    def __call__(self) -> int:
        # First of all, our own handlers: submitit's (installed in its `_submit` process just before
        # it called us) would requeue on USR2 by themselves, without a limit, and exit.
        received: list[int] = []
        proc: subprocess.Popen | None = None

        def forward(signum, _frame):
            # The trainer decides what a signal means (checkpoint, then exit for requeue).
            received.append(signum)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signum)

        for sig in FORWARDED:
            signal.signal(sig, forward)

        rank = int(os.environ.get("SLURM_PROCID", "0"))
        ntasks = os.environ.get("SLURM_NTASKS", "1")
        attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0)  # unset on the first start
        job_id = slurm_job_id(os.environ)
        # Slurm's node name (several slurmd can share a host, so the host name may not tell them apart).
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        base = {"rank": rank, "attempt": attempt, "host": node, "job_id": job_id}

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cwd = None
        if self.code_dir:
            from launcher.snapshot import run_env

            env, cwd = run_env(self.code_dir, env), self.code_dir
        note = f" (attempt {attempt + 1}, code {self.code_dir or 'in place'})"
        print(f"[vlaunch] rank {rank} of {ntasks} on {node}: {shlex.join(self.command)}{note}", flush=True)
        if rank == 0 and attempt > 0:
            self._note_requeue_by_slurm(attempt, base)
        append_event(self.run_dir, {"time": time.time(), "event": "start", "exit_code": None, **base})
        proc = subprocess.Popen(self.command, env=env, cwd=cwd)
        for signum in received:  # arrived while the trainer was being started
            proc.send_signal(signum)
        code = proc.wait()

        stopped = code == REQUEUE_EXIT_CODE
        if code == -signal.SIGUSR2 and signal.SIGUSR2 in received:
            # USR2 came before the trainer had its handler (still importing): nothing was saved, but
            # the job is to run again all the same, from its last checkpoint if there is one.
            print(f"[vlaunch] rank {rank}: the trainer was stopped by USR2 before it could checkpoint")
            stopped = True
        status_dir = Path(self.run_dir) / "status"
        status_dir.mkdir(parents=True, exist_ok=True)
        (status_dir / f"exit_code.rank{rank}").write_text(f"{code}\n")
        signals = [signal.Signals(s).name for s in received]
        append_event(
            self.run_dir,
            {"time": time.time(), "event": "exit", "exit_code": code, "signals": signals, **base},
        )
        if code == 0:
            return 0
        status = REQUEUE_EXIT_CODE if stopped else (code if code > 0 else 128 - code)
        if not stopped:
            print(f"[vlaunch] rank {rank}: trainer exited with code {code}", file=sys.stderr, flush=True)
        elif rank == 0:
            self._requeue(job_id, attempt, signal.SIGTERM in received, base)
        # SystemExit passes through submitit, so Slurm records the trainer's own exit code. After a
        # requeue the code is moot: sacct records the attempt as REQUEUED when the requeue happens.
        raise SystemExit(status)

    def _note_requeue_by_slurm(self, attempt: int, base: dict) -> None:
        """A restart that no rank 0 recorded as its own requeue: Slurm (or a user) requeued the job."""
        path = Path(self.run_dir) / "status" / "events.jsonl"
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "requeue" and event.get("attempt") == attempt - 1:
                return
        event = {**base, "attempt": attempt - 1, "by": "slurm"}
        append_event(self.run_dir, {"time": time.time(), "event": "requeue", "exit_code": None, **event})

    def _requeue(self, job_id: str, attempt: int, terminated: bool, base: dict) -> None:
        """Rank 0, after the trainer checkpointed and exited 75: requeue the job, or say why not."""
        if terminated:
            print(
                f"[vlaunch] job {job_id} checkpointed at SIGTERM: Slurm is ending the job (cancel, "
                "requeue, preemption or time limit) and requeues it by itself if that is why",
                flush=True,
            )
            return
        if attempt >= self.max_requeues:
            print(
                f"[vlaunch] job {job_id} checkpointed after a stop signal but is NOT requeued: it has been "
                f"requeued {attempt} time(s), backend.max_requeues={self.max_requeues}; the job fails "
                f"(exit {REQUEUE_EXIT_CODE}). Its latest checkpoint stays in {self.run_dir}/checkpoints",
                file=sys.stderr,
                flush=True,
            )
            return
        proc = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            print(f"[vlaunch] job {job_id}: scontrol requeue failed ({why}); the job fails", file=sys.stderr)
            return
        print(
            f"[vlaunch] job {job_id} checkpointed after a stop signal: requeued "
            f"({attempt + 1} of at most {self.max_requeues})",
            flush=True,
        )
        event = {"time": time.time(), "event": "requeue", "exit_code": None, "by": "launcher", **base}
        append_event(self.run_dir, event)
