"""Experiment tracking (Weights & Biases), off unless the job config turns it on.

One run per job, whatever happens to the job: the run id is derived from (sweep id, job number),
so a requeued or recreated job continues the same run (`resume="allow"`), and runs of a sweep
share a group (the sweep id). Offline mode (the default when on) needs no network; `wandb sync
<run_dir>/wandb/offline-run-*` uploads later.

Secrets: the API key is read by wandb from its own environment/netrc when online; nothing here
writes it anywhere, and the config we log is the job config, which holds no environment.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from trainers.core.job import write_json_atomic

log = logging.getLogger("trainers.tracking")

# Keys that look like credentials are never logged as config, even if a user put one in a config.
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)


def run_id(job: dict[str, Any]) -> str:
    """Stable across requeues and TPU recreations: the same job always continues the same run."""
    return f"{job['job']['sweep_id']}-{job['job']['num']}"


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<hidden>" if _SECRET_KEY.search(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


class Tracker:
    """No-op tracker; `WandbTracker` overrides what it records."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, float]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass

    def preempted(self) -> None:
        """The job will be requeued: the run continues later under the same id."""


def _best_effort(method):
    """Tracking never decides a job's fate: a failing tracker call (e.g. wandb's service process
    already killed by the scheduler's SIGTERM) is logged and training goes on or exits as planned."""

    def guarded(self, *args, **kwargs):
        if self._broken:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._broken = True
            log.warning("tracker call %s failed (%s: %s); tracking stops for this attempt", method.__name__,
                        type(e).__name__, e)  # fmt: skip
            return None

    return guarded


class WandbTracker(Tracker):
    _broken = False

    def __init__(self, job: dict[str, Any], settings: dict[str, Any]) -> None:
        import wandb

        run_dir = Path(job["job"]["run_dir"])
        self.run_id = run_id(job)
        self._run = wandb.init(
            project=settings.get("project") or "vlaunch",
            entity=settings.get("entity"),
            id=self.run_id,
            resume="allow",
            group=job["job"]["sweep_id"],
            name=f"{job['job']['name']}-{job['job']['num']}",
            job_type=job["dataset"]["name"],
            tags=list(settings.get("tags") or []),
            config=_scrub({k: v for k, v in job.items() if k != "backend"}),
            dir=str(run_dir),
            mode=settings.get("mode") or "offline",
        )
        # The launcher/registry read the run id from here (compute nodes never open the registry).
        write_json_atomic(run_dir / "status" / "tracker.json", {"wandb_run_id": self.run_id})
        log.info(
            "wandb run %s (mode %s, group %s)",
            self.run_id,
            settings.get("mode") or "offline",
            job["job"]["sweep_id"],
        )

    @_best_effort
    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    @_best_effort
    def summary(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._run.summary[key] = value

    @_best_effort
    def finish(self, exit_code: int = 0) -> None:
        self._run.finish(exit_code=exit_code)

    @_best_effort
    def preempted(self) -> None:
        self._run.mark_preempting()
        self._run.finish()


def start(job: dict[str, Any], is_main: bool) -> Tracker:
    """The job's tracker: wandb on the main rank when `tracker.wandb` is on, else a no-op."""
    settings = job.get("tracker") or {}
    if not is_main or not settings.get("wandb"):
        return Tracker()
    return WandbTracker(job, settings)
