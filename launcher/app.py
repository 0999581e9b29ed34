"""The Hydra application: compose, plan, apply. `python -m launcher` enters through here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launcher import sweep
from launcher.compose import SweepComposer
from launcher.errors import LaunchError
from launcher.plan import plan_sweep
from launcher.schema import register_configs
from launcher.sweep import command_line, run_plan

register_configs()

# An absolute path: run as `-m launcher`, Hydra would read a relative one as a Python package.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def launch_overrides(config_loader, master: DictConfig, job_overrides: Sequence[Sequence[str]]) -> int:
    """Multirun: compose every job (fast path), plan them together, apply once."""
    composer = SweepComposer(config_loader, master)
    composed = [(list(o), composer.compose_plain(o)) for o in job_overrides]
    # The id as Hydra resolved it for the sweep dir; jobs composed later must not draw a new one.
    try:
        plan = plan_sweep(composed, command_line=command_line(), sweep_id=str(master.sweep_id))
    except LaunchError:
        sweep.remove_hydra_leftovers(
            Path(str(master.runs_root)).expanduser().resolve() / str(master.sweep_id)
        )
        raise
    return run_plan(
        plan,
        dry_run=bool(master.dry_run),
        wait=bool(master.wait),
        detach=bool(master.detach),
        poll_s=float(master.wait_poll_s),
        registry_file=master.registry,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> int:
    """Single run (no -m): one job on the chosen backend, the same way a sweep of one would."""
    overrides = list(HydraConfig.get().overrides.task)
    job = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    try:
        try:
            plan = plan_sweep([(overrides, job)], command_line=command_line())
        except LaunchError:
            sweep.remove_hydra_leftovers(Path(HydraConfig.get().runtime.output_dir))
            raise
        return run_plan(
            plan,
            dry_run=bool(cfg.dry_run),
            wait=bool(cfg.wait),
            detach=bool(cfg.detach),
            poll_s=float(cfg.wait_poll_s),
            registry_file=cfg.registry,
        )
    except LaunchError as e:
        # Raised out of a Hydra task function, it would be wrapped in a multi-line report.
        sweep.EXIT_STATUS = sweep.fail(e)
        return sweep.EXIT_STATUS
