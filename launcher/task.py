"""What submitit runs in each Slurm task: the trainer as its own program.

Kept free of heavy imports: it is unpickled on the node by `submitit.core._submit` and only
starts `python -m trainers.<family> <run_dir>/config.yaml`, whose distributed module reads the
allocation (SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_NODELIST, ...).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path


class TrainerTask:
    """A picklable callable: run the trainer command, pass signals on, exit with its code."""

    def __init__(self, command: list[str], run_dir: str) -> None:
        self.command = list(command)
        self.run_dir = run_dir

    def __call__(self) -> int:
        rank = os.environ.get("SLURM_PROCID", "0")
        ntasks = os.environ.get("SLURM_NTASKS", "1")
        # Slurm's node name (several slurmd can share a host, so the host name may not tell them apart).
        node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        print(f"[vlaunch] rank {rank} of {ntasks} on {node}: {shlex.join(self.command)}", flush=True)
        proc = subprocess.Popen(self.command, env=env)

        def forward(signum, _frame):
            # The trainer decides what a signal means (checkpoint, then exit for requeue).
            if proc.poll() is None:
                proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            signal.signal(sig, forward)
        code = proc.wait()
        status_dir = Path(self.run_dir) / "status"
        status_dir.mkdir(parents=True, exist_ok=True)
        (status_dir / f"exit_code.rank{rank}").write_text(f"{code}\n")
        if code != 0:
            print(f"[vlaunch] rank {rank}: trainer exited with code {code}", file=sys.stderr, flush=True)
            # SystemExit passes through submitit, so Slurm records the trainer's own exit code.
            raise SystemExit(code if code > 0 else 128 - code)
        return code
