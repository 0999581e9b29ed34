"""wandb tracking (offline): one run per job, the same run id after a requeue, and secrets that
never reach a file the launcher or the trainer writes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainers.core.job import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "dataset=msrvtt",
    "dataset.sample_scale=0.05",
    "trainer.batch_size=4",
    "trainer.num_workers=0",
    "tracker.wandb=true",
    "tracker.mode=offline",
]


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env.update(
        VLAUNCH_RUNS=str(tmp_path / "runs"),
        VLAUNCH_DATA_CACHE=str(tmp_path / "cache"),
        VLAUNCH_REGISTRY=str(tmp_path / "registry.sqlite"),
        WANDB_SILENT="true",
        **extra,
    )
    return env


def launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", *SMALL, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_a_requeued_job_continues_the_same_wandb_run(tmp_path):
    env = env_for(tmp_path)
    launch(env, "trainer.epochs=1", "sweep_id=ref")
    reference = tmp_path / "runs" / "ref" / "jobs" / "0"
    runs = offline_runs(reference)
    assert len(runs) == 1 and runs[0].name.endswith("-ref-0"), runs
    assert json.loads((reference / "status" / "tracker.json").read_text()) == {"wandb_run_id": "ref-0"}

    # The same job, stopped by the scheduler's signal mid-run and started again.
    run_dir = tmp_path / "runs" / "stopped" / "jobs" / "0"
    run_dir.mkdir(parents=True)
    config = yaml.safe_load((reference / "config.yaml").read_text())
    config["job"].update(run_dir=str(run_dir), sweep_id="stopped")
    config["trainer"].update(epochs=6)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "trainers.singularity", str(run_dir / "config.yaml")]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / "progress.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=120) == REQUEUE_EXIT_CODE
    assert subprocess.run(command, cwd=REPO, env=env, capture_output=True).returncode == 0

    runs = offline_runs(run_dir)
    assert len(runs) == 2, "one offline directory per attempt"
    assert {r.name.rsplit("-", 2)[-2:] == ["stopped", "0"] for r in runs} == {True}, "one run id for both"
    assert json.loads((run_dir / "status" / "tracker.json").read_text()) == {"wandb_run_id": "stopped-0"}


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under root (the sample-data cache aside) that contains the secret."""
    return [
        str(path)
        for path in root.rglob("*")
        if path.is_file() and "cache" not in path.parts and secret.encode() in path.read_bytes()
    ]


@pytest.mark.slow
def test_a_secret_in_the_environment_reaches_no_file(tmp_path):
    canary = "vl-canary-" + secrets.token_hex(8)
    env = env_for(tmp_path, WANDB_API_KEY=canary, HF_TOKEN=canary, MY_SERVICE_PASSWORD=canary)
    launch(env, "trainer.epochs=1", "sweep_id=canary")
    launch(env, "trainer.epochs=1", "sweep_id=canary-dry", "backend=slurm", "--dry-run")
    assert files_holding(tmp_path, canary) == []
    assert (tmp_path / "runs" / "canary" / "jobs" / "0" / "metrics.json").exists(), "the run did happen"


@pytest.mark.slurm
def test_a_secret_reaches_no_file_of_a_slurm_run(slurm_cluster, tmp_path):
    """Batch scripts, submitit's pickles, task logs, run dirs, wandb's files and the registry."""
    canary = "vl-canary-" + secrets.token_hex(8)
    env = env_for(tmp_path, WANDB_API_KEY=canary, HF_TOKEN=canary, **slurm_cluster["env"])
    launch(env, "trainer.epochs=1", "sweep_id=canary-slurm", "backend=slurm", "site=local_slurm", "--wait")
    run_dir = tmp_path / "runs" / "canary-slurm"
    assert (run_dir / "jobs" / "0" / "metrics.json").exists() and list(run_dir.glob("slurm/*/*.sh"))
    assert (tmp_path / "registry.sqlite").exists()
    assert files_holding(tmp_path, canary) == []
