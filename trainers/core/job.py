"""The contract between a trainer process and the launcher that started it.

In: `<run_dir>/config.yaml` (written by the launcher). Out: `progress.json` while training,
`metrics.json` at the end, checkpoints under `checkpoints/`, and the exit status:
0 done, REQUEUE_EXIT_CODE "checkpointed after a stop signal, run me again", anything else failed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# EX_TEMPFAIL: "try again later". Slurm and TPU backends requeue on this code, and only on it.
REQUEUE_EXIT_CODE = 75

log = logging.getLogger("trainers")


def load_config(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg.setdefault("job", {}).setdefault("run_dir", str(Path(path).resolve().parent))
    return cfg


def setup_logging(rank: int) -> None:
    # Every rank logs to its own file (local: logs/rank<r>.log, Slurm: one log per task).
    level = logging.INFO
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


class Progress:
    """Writes `progress.json` (what the launcher shows) at most every `every_s` seconds."""

    def __init__(self, run_dir: str | Path, total_steps: int, enabled: bool, every_s: float = 2.0) -> None:
        self.path = Path(run_dir) / "progress.json"
        self.total_steps = total_steps
        self.enabled = enabled
        self.every_s = every_s
        self._last = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.every_s):
            return
        self._last = now
        write_json_atomic(self.path, {"total_steps": self.total_steps, "time": time.time(), **fields})


class StopSignal:
    """Remembers that the scheduler asked us to stop (Slurm USR2 before the limit, SIGTERM).

    The handler only sets a flag; the training loop checks it at step boundaries, where all
    ranks agree on it, saves a checkpoint and exits with REQUEUE_EXIT_CODE.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signum
        log.warning("received %s: will checkpoint and exit for requeue", signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.received is not None
