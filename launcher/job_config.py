"""`python -m launcher.job_config <run_dir> [overrides ...]`: compose one job's config and write
<run_dir>/config.yaml, exactly as the launcher would, without submitting anything.

For people who submit by hand (sbatch/*.sbatch): the trainer then runs with
`python -m trainers.<family> <run_dir>/config.yaml`, the same program the launcher starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.errors import LaunchError


def write_job_config(run_dir: Path, overrides: list[str]) -> Path:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from launcher.app import CONF_DIR
    from launcher.plan import plan_sweep
    from launcher.schema import register_configs
    from launcher.sweep import write_job_config as write

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    job = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    plan = plan_sweep([(overrides, job)], command_line="python -m launcher.job_config " + " ".join(overrides))
    planned = plan.jobs[0]
    planned.run_dir = run_dir
    planned.config["job"]["run_dir"] = str(run_dir)
    planned.config["job"]["sweep_id"] = run_dir.name
    return write(planned)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    from launcher.__main__ import _explain

    overrides = sys.argv[2:]
    try:
        path = write_job_config(Path(sys.argv[1]).resolve(), overrides)
    except LaunchError as e:
        message = str(e)
    except Exception as e:  # noqa: BLE001 - composition errors: one line, as the launcher prints them
        message = _explain(e, overrides)
        if message is None:
            raise
    else:
        print(path)
        return
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
