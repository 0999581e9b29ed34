"""Hydra plugins: the launcher (`hydra/launcher=local|slurm`) and sweeper (thin glue; the work is in
`launcher`)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher

from launcher.schema import register_configs

register_configs()


class VLaunchLauncher(Launcher):
    def __init__(self, backend: str = "local") -> None:
        self.backend = backend
        self.config = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context = hydra_context
        self.config = config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from launcher.app import launch_overrides

        launch_overrides(self.hydra_context.config_loader, self.config, job_overrides)
        # The sweep's outcome is reported by the launcher itself; Hydra only needs a value per job.
        return [
            JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=None)
            for o in job_overrides
        ]


class VLaunchSweeper(BasicSweeper):
    """Hydra's basic sweeper without the pass that composes every job once more just to check it:
    the launcher composes and checks each job (and fails the whole sweep before submitting)."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        return None
