"""Plan a sweep: pure functions from composed configs to what a backend will do.

Nothing here touches the filesystem or a scheduler except to *check* that inputs exist, so
`--dry-run` prints exactly what `apply` would do and golden files can pin it.
"""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import LaunchError
from launcher.schema import BACKEND_SCHEMAS, SITE_FALLBACKS, backend_fields, new_sweep_id
from trainers.registry import FAMILIES


@dataclass
class JobPlan:
    """One job of a sweep: its config (written to run_dir/config.yaml) and trainer command."""

    num: int
    overrides: list[str]
    run_dir: Path
    config: dict[str, Any]
    command: list[str]
    label: str = ""  # the overrides that tell this job apart, for tables and log lines


@dataclass
class SweepPlan:
    sweep_id: str
    sweep_dir: Path
    backend: str
    jobs: list[JobPlan]
    command_line: str
    # Jobs that share backend resources go into one Slurm array: {resources key: job indices}.
    resource_groups: list[tuple[dict[str, Any], list[int]]] = field(default_factory=list)
    # The code snapshot every job runs from (launcher.snapshot), set at submission; None: in place.
    code_dir: Path | None = None


# Overrides that say how to launch, not what to train: left out of job labels.
_LAUNCH_KEYS = {
    "backend",
    "hydra/launcher",
    "dry_run",
    "wait",
    "wait_poll_s",
    "detach",
    "runs_root",
    "site",
    "sweep_id",
    "name",
}


# Hydra's escapes in an override it wrote back (`gs\://b/x`): a backslash before one of these.
_HYDRA_ESCAPE = re.compile(r"\\([\\()\[\]{}:=, ])")


def job_labels(overrides: list[list[str]]) -> list[str]:
    """What sets each job apart: the overrides not shared by every job of the sweep."""
    shared = set.intersection(*(set(o) for o in overrides)) if len(overrides) > 1 else set()
    labels = []
    for job in overrides:
        keep = [
            o
            for o in job
            if o not in shared and o.split("=")[0].lstrip("+~").split(".")[0] not in _LAUNCH_KEYS
        ]
        # A swept value comes back in Hydra's escaped form (gs\://b/x): shown as typed.
        labels.append(_HYDRA_ESCAPE.sub(r"\1", " ".join(keep)) or "(defaults)")
    return labels


def effective_backend(backend_cfg: dict[str, Any], site_cfg: dict[str, Any]) -> dict[str, Any]:
    """Backend resources after filling unset fields from the site profile, then the fallbacks."""
    name = backend_cfg["name"]
    if name not in BACKEND_SCHEMAS:
        raise LaunchError(f"unknown backend '{name}'; choose one of: {', '.join(sorted(BACKEND_SCHEMAS))}")
    site_cfg = site_cfg or {}
    site = dict(site_cfg.get(name) or {})
    if name.startswith("tpu_"):
        site = {**(site_cfg.get("tpu") or {}), **site}  # `tpu:` is shared by tpu_vm and tpu_pod
    valid = set(backend_fields(name))
    unknown = sorted(set(site) - valid)
    if unknown:
        raise LaunchError(
            f"site profile sets unknown {name} key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}"
        )
    resolved = dict(backend_cfg)
    fallbacks = SITE_FALLBACKS.get(name, {})
    for key in valid:
        if resolved.get(key) in (None, [], {}):
            resolved[key] = site.get(key, fallbacks.get(key))
    if name == "local" and resolved["nodes"] != 1:
        raise LaunchError(
            "backend=local runs on this machine only: nodes must be 1 (use backend=slurm for more)"
        )
    # Numbers sbatch would refuse late or misread (it takes --array=0-9%-2 as written). 0 is a choice
    # for array_parallelism (%0: no throttle), mem_gb (--mem=0: all of the node's memory) and time_min
    # (--time=0: no limit).
    for key in ("nodes", "tasks_per_node", "cpus_per_task"):
        if resolved.get(key) is not None and int(resolved[key]) < 1:
            raise LaunchError(f"backend.{key} must be at least 1, got {resolved[key]}")
    for key in ("max_requeues", "gpus_per_node", "signal_delay_s", "mem_gb", "time_min", "array_parallelism"):
        if resolved.get(key) is not None and int(resolved[key]) < 0:
            raise LaunchError(f"backend.{key} must be 0 or more, got {resolved[key]}")
    if name.startswith("tpu_"):
        from launcher.backends.tpu import check_resources

        check_resources(resolved)
    return resolved


def check_dataset(dataset: dict[str, Any], *, files: bool = True) -> None:
    """Fail on the laptop on a sample size that cannot be generated and, with `files`, when a real
    dataset's files are missing (sample data is made on demand)."""
    root = dataset.get("data_root")
    if root is None:
        scale = dataset.get("sample_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
            raise LaunchError(
                f"dataset.sample_scale={scale} must be a number > 0 (the generated sample's size: 1.0 is "
                "the full sample, 0.1 a tenth)"
            )
        return
    if not files:
        return
    root_path = Path(root).expanduser()
    needed = [("annotation file", dataset["anno"][split]) for split in dataset["anno"]]
    needed.append(("media directory", dataset["media_dir"]))
    if dataset.get("entities"):  # ALPRO's pretraining: the PEM entity list
        needed.append(("entity file", dataset["entities"]))
    for what, rel in needed:
        path = root_path / rel
        if not path.exists():
            raise LaunchError(
                f"dataset {dataset['name']}: {what} {path} does not exist; put it there, or point "
                f"dataset.data_root= at the directory holding {rel} (leave data_root unset for the sample data)"
            )


# Job settings that name files: a relative path means relative to where the command was typed, not to
# the code snapshot the job runs in.
_PATH_KEYS = (("dataset", "data_root"), ("trainer", "pretrained"), ("trainer", "prompter"))


def absolute_paths(cfg: dict[str, Any]) -> None:
    """Make the local paths of `_PATH_KEYS` absolute (`~` expanded); URLs (gs://...) stay as they are."""
    for section, key in _PATH_KEYS:
        value = (cfg.get(section) or {}).get(key)
        if isinstance(value, str) and value and "://" not in value:
            path = Path(value).expanduser()
            cfg[section][key] = str(path if path.is_absolute() else path.resolve())


def check_pretrained(trainer: dict[str, Any]) -> None:
    """Fail on the laptop when `trainer.pretrained=` names a local path that is not there (after
    `absolute_paths`); URLs are read where the job runs. (ALPRO's config checks `trainer.prompter=`.)"""
    value = trainer.get("pretrained")
    if isinstance(value, str) and value and "://" not in value and not Path(value).exists():
        raise LaunchError(
            f"trainer.pretrained={value} does not exist; give a checkpoint file, a run directory "
            "(runs/<sweep>/jobs/<n>: its latest checkpoint) or a gs:// URL"
        )


def check_trainer(job: dict[str, Any], _checked: dict | None = None) -> str:
    """The trainer's module, after checking that it can run this dataset's task.

    `_checked` caches the verdict per (trainer, dataset) object pair: jobs of a sweep that do not
    override them share the same dicts, so a 1000-seed sweep checks its trainer config once.
    """
    key = (id(job["trainer"]), id(job["dataset"]))
    if _checked is not None and key in _checked:
        return _checked[key][0]
    family = job["trainer"]["family"]
    if family not in FAMILIES:
        raise LaunchError(f"unknown trainer family '{family}'; known: {', '.join(sorted(FAMILIES))}")
    spec = FAMILIES[family]
    try:
        importlib.import_module(spec.config_module).resolve(job["trainer"], job["dataset"])
    except ValueError as e:
        raise LaunchError(f"trainer={family}: {e}") from None
    task = job["dataset"]["task"]
    if task not in spec.tasks:
        raise LaunchError(
            f"trainer={family} does not train {task} datasets ({job['dataset']['name']}); it trains: "
            + ", ".join(spec.tasks)
        )
    if _checked is not None:
        _checked[key] = (spec.module, job["trainer"], job["dataset"])  # keep them alive: ids stay theirs
    return spec.module


def plan_sweep(
    composed: list[tuple[list[str], dict[str, Any]]],
    *,
    command_line: str,
    sweep_id: str | None = None,
    python: str | None = None,
) -> SweepPlan:
    """Turn resolved job configs into a plan. Every job is checked before any is submitted."""
    if not composed:
        raise LaunchError("the sweep has no jobs")
    first = composed[0][1]
    sweep_id = sweep_id or first.get("sweep_id") or new_sweep_id()
    backend = first["backend"]["name"]
    sweep_dir = Path(first["runs_root"]).expanduser().resolve() / sweep_id
    jobs: list[JobPlan] = []
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    checked: dict = {}
    for num, (overrides, cfg) in enumerate(composed):
        if cfg["backend"]["name"] != backend:
            raise LaunchError("one sweep runs on one backend; do not sweep over backend=")
        absolute_paths(cfg)
        if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
            raise LaunchError(
                f"seed={cfg['seed']} must be a whole number (it seeds every random stream of the job)"
            )
        module = check_trainer(cfg, checked)
        if backend.startswith("tpu_") and FAMILIES[cfg["trainer"]["family"]].framework != "jax":
            jax_families = sorted(n for n, f in FAMILIES.items() if f.framework == "jax")
            raise LaunchError(
                f"trainer={cfg['trainer']['family']} is a PyTorch trainer and backend={backend} runs JAX "
                f"trainers ({', '.join(jax_families) or 'none registered'}); use backend=slurm or local for it"
            )
        resources = effective_backend(cfg["backend"], cfg.get("site", {}))
        # Local paths are read where the job runs: here, on Slurm's shared filesystem or on emulated TPU
        # hosts (this machine), so they are checked here; a real TPU VM's disks are not ours to look at.
        local_paths = not backend.startswith("tpu_") or bool(resources.get("emulated"))
        check_dataset(cfg["dataset"], files=local_paths)
        if local_paths:
            check_pretrained(cfg["trainer"])
        run_dir = sweep_dir / "jobs" / str(num)
        interpreter = resources.get("python") or python or sys.executable
        job_cfg = {
            "job": {
                "sweep_id": sweep_id,
                "num": num,
                "run_dir": str(run_dir),
                "overrides": list(overrides),
                "name": cfg.get("name") or cfg["trainer"]["family"],
            },
            "seed": cfg["seed"],
            "tracker": cfg.get("tracker") or {},
            "trainer": cfg["trainer"],
            "dataset": cfg["dataset"],
            "backend": resources,
        }
        config_arg = str(run_dir / "config.yaml")
        if backend.startswith("tpu_"):
            # Outputs go to the bucket (the hosts share no disk with us); the agent on each host
            # puts its local copy of the config where `{config}` stands.
            job_cfg["job"]["output_url"] = f"{resources['bucket'].rstrip('/')}/{sweep_id}/jobs/{num}"
            config_arg = "{config}"
        command = [*shlex.split(interpreter), "-m", module, config_arg]
        jobs.append(
            JobPlan(num=num, overrides=list(overrides), run_dir=run_dir, config=job_cfg, command=command)
        )
        key = repr(sorted(resources.items()))
        groups.setdefault(key, (resources, []))[1].append(num)
    for job, label in zip(jobs, job_labels([j.overrides for j in jobs]), strict=True):
        job.label = label
    return SweepPlan(
        sweep_id=sweep_id,
        sweep_dir=sweep_dir,
        backend=backend,
        jobs=jobs,
        command_line=command_line,
        resource_groups=list(groups.values()),
    )
