"""Interrupting real training runs: a run that is killed or told to stop, then started again on
its run dir, ends with exactly the parameters of a run that was never interrupted.

Every run here is a 2-process DDP job on CPU (gloo), so the per-rank random streams (dropout, ITM
negatives) and the rank agreement on a stop are part of what is checked. The uninterrupted
reference runs through the launcher's local backend; the interrupted ones start the trainer
processes the way that backend does (torchrun-style variables), on a copy of its config.yaml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.backends.local import free_port, job_env
from trainers.core.job import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
# 40 sample training items: 5 steps per epoch per rank, 15 in all; checkpoints at steps 3, 5 (end
# of epoch 0), 6, 9, 10, 12 and 15, so the runs below stop between checkpoints with epochs to go.
OVERRIDES = [
    "trainer=singularity",
    "dataset=msrvtt",
    f"backend.tasks_per_node={WORLD_SIZE}",
    "dataset.sample_scale=0.05",
    "trainer.epochs=3",
    "trainer.batch_size=4",
    "trainer.num_workers=0",
    "trainer.checkpoint_every=3",
]
START_TIMEOUT_S = 180  # importing torch + transformers on a busy 2-core machine
RUN_TIMEOUT_S = 300
_CKPT = re.compile(r"ckpt_(\d+)\.pth")


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> dict[str, str]:
    """The environment of every process here: our own runs and data, no inherited rank variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_")
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        VLAUNCH_RUNS=str(tmp_path_factory.mktemp("runs")),
        VLAUNCH_DATA_CACHE=str(tmp_path_factory.mktemp("data")),
        OMP_NUM_THREADS="1",  # what the local backend sets for cpus_per_task=1: same arithmetic everywhere
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="module")
def reference(base_env) -> Path:
    """The uninterrupted job, run by the launcher; returns its run dir."""
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", *OVERRIDES],
        cwd=REPO,
        env=base_env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (config,) = Path(base_env["VLAUNCH_RUNS"]).glob("*/jobs/0/config.yaml")
    run_dir = config.parent
    assert "COMPLETED" in proc.stdout, proc.stdout + log_tails(run_dir)
    return run_dir


def digests(run_dir: Path) -> list[str]:
    return [
        (run_dir / "status" / f"params.rank{rank}.sha256").read_text().strip() for rank in range(WORLD_SIZE)
    ]


def log_tails(run_dir: Path, lines: int = 30) -> str:
    out = []
    for log in sorted((run_dir / "logs").glob("*.log")):
        out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


def fresh_run_dir(reference: Path, tmp_path: Path, **trainer: object) -> Path:
    """The reference job's config.yaml in a new run dir (with `trainer` keys changed)."""
    config = yaml.safe_load((reference / "config.yaml").read_text())
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    config["job"]["run_dir"] = str(run_dir)
    config["trainer"].update(trainer)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_dir


class Trainer:
    """One attempt of a job: WORLD_SIZE trainer processes, each in a session of its own, so a kill
    reaches its loader workers too (as when a node goes away)."""

    def __init__(self, run_dir: Path, env: dict[str, str], attempt: int) -> None:
        self.run_dir = run_dir
        port = free_port()
        self.logs = [run_dir / "logs" / f"attempt{attempt}.rank{rank}.log" for rank in range(WORLD_SIZE)]
        self.logs[0].parent.mkdir(parents=True, exist_ok=True)
        self.procs = []
        for rank in range(WORLD_SIZE):
            rank_env = job_env(rank, WORLD_SIZE, port, cpus=int(env.get("OMP_NUM_THREADS", 1)), base=env)
            with open(self.logs[rank], "wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "trainers.singularity", str(run_dir / "config.yaml")],
                        cwd=REPO,
                        env=rank_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def log(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")

    def wait_for(self, path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll (finely: training is fast) until `path` exists; fail if a process ends first."""
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            codes = [p.poll() for p in self.procs]
            assert all(c is None for c in codes), f"exited {codes} before {path} appeared\n" + self.tails()
            assert time.monotonic() < deadline, f"no {path} after {timeout_s} s\n" + self.tails()
            time.sleep(0.005)

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout_s
        try:
            return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"trainer still running after {timeout_s} s\n" + self.tails())

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def tails(self) -> str:
        return log_tails(self.run_dir)


@pytest.fixture
def attempts():
    """Start trainer attempts; whatever a failing test leaves running is killed."""
    started: list[Trainer] = []

    def start(run_dir: Path, env: dict[str, str]) -> Trainer:
        trainer = Trainer(run_dir, env, attempt=len(started) + 1)
        started.append(trainer)
        return trainer

    yield start
    for trainer in started:
        trainer.kill()


def latest_step(run_dir: Path) -> int:
    return int(_CKPT.fullmatch((run_dir / "checkpoints" / "latest").read_text().strip()).group(1))


def total_steps(run_dir: Path) -> int:
    return int(json.loads((run_dir / "progress.json").read_text())["total_steps"])


def assert_not_finished(run_dir: Path) -> None:
    assert latest_step(run_dir) < total_steps(run_dir)
    assert not (run_dir / "status").exists(), "the run had already finished training"
    assert not (run_dir / "metrics.json").exists()


def test_local_ddp_job_completes_with_identical_replicas(reference):
    """The launcher's local backend runs 2 DDP processes that end with the same parameters."""
    rank0_digest, rank1_digest = digests(reference)
    assert rank0_digest == rank1_digest
    log0 = (reference / "logs" / "rank0.log").read_text()
    assert f"rank 0 of {WORLD_SIZE} (torchrun)" in log0
    assert (reference / "logs" / "rank1.log").exists()
    assert (reference / "metrics.json").exists()
    total = total_steps(reference)
    assert total >= 10, "too few steps for the interruptions below to land mid-training"
    assert f"step {total}/{total}" in log0


@pytest.mark.parametrize("num_workers", [0, 1])
def test_killed_run_resumes_to_the_same_parameters(reference, base_env, tmp_path, attempts, num_workers):
    """SIGKILL (no chance to save) right after the first checkpoint; the rerun resumes from it.

    With num_workers=1 the items come from a loader process while the reference loaded them in
    the trainer: item randomness must depend on the item, not on who loads it.
    """
    run_dir = fresh_run_dir(reference, tmp_path, num_workers=num_workers)
    first = attempts(run_dir, base_env)
    first.wait_for(run_dir / "checkpoints" / "latest")
    first.kill()
    assert [p.returncode for p in first.procs] == [-signal.SIGKILL] * WORLD_SIZE
    assert_not_finished(run_dir)
    killed_at = latest_step(run_dir)

    second = attempts(run_dir, base_env)
    assert second.wait() == [0] * WORLD_SIZE, second.tails()
    assert re.search(rf"resuming from \S+ckpt_0*{killed_at}\.pth \(step {killed_at}\)", second.log())
    assert digests(run_dir) == digests(reference)
    assert (run_dir / "metrics.json").exists()


def test_stop_signal_checkpoints_exits_for_requeue_and_resumes_to_the_same_parameters(
    reference, base_env, tmp_path, attempts
):
    """SIGUSR2 (Slurm's warning before the time limit) to one rank: every rank saves and exits 75."""
    run_dir = fresh_run_dir(reference, tmp_path)
    first = attempts(run_dir, base_env)
    first.wait_for(run_dir / "checkpoints" / "latest")
    first.procs[1].send_signal(signal.SIGUSR2)  # only rank 1 hears it; rank 0 must stop with it
    assert first.wait() == [REQUEUE_EXIT_CODE] * WORLD_SIZE, first.tails()
    stops = [re.search(r"stopped at step (\d+) by a signal", first.log(rank)) for rank in range(WORLD_SIZE)]
    assert all(stops), first.tails()
    stopped_at = int(stops[0].group(1))
    assert int(stops[1].group(1)) == stopped_at
    assert latest_step(run_dir) == stopped_at
    assert_not_finished(run_dir)

    second = attempts(run_dir, base_env)
    assert second.wait() == [0] * WORLD_SIZE, second.tails()
    assert f"(step {stopped_at})" in second.log()
    assert digests(run_dir) == digests(reference)


def test_rerun_of_a_finished_job_evaluates_without_training(reference, base_env, tmp_path, attempts):
    """A job requeued after its last step (e.g. preempted while evaluating) trains no further and
    reports the same final loss as the run that evaluated the first time."""
    run_dir = fresh_run_dir(reference, tmp_path)
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    total = total_steps(reference)
    assert latest_step(run_dir) == total

    rerun = attempts(run_dir, base_env)
    assert rerun.wait() == [0] * WORLD_SIZE, rerun.tails()
    assert f"(step {total})" in rerun.log()
    assert not re.search(r"epoch \d+ step \d+/", rerun.log()), "trained again"
    assert digests(run_dir) == digests(reference)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert metrics["final_loss"] == expected["final_loss"]
    assert metrics["headline"] == expected["headline"]


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before_to_the_same_parameters(
    reference, base_env, tmp_path, attempts
):
    """A latest checkpoint cut short (a copy between filesystems, a full disk) is reported and skipped: the
    rerun resumes from the checkpoint before it, trains the steps since again, and ends where the reference
    did. When no checkpoint can be read the job fails in one line and leaves the files alone."""
    run_dir = fresh_run_dir(reference, tmp_path)
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    total = total_steps(reference)
    damaged = run_dir / "checkpoints" / f"ckpt_{total:08d}.pth"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    (before,) = [p for p in (run_dir / "checkpoints").glob("ckpt_*.pth") if p != damaged]
    rerun = attempts(run_dir, base_env)
    assert rerun.wait() == [0] * WORLD_SIZE, rerun.tails()
    assert f"checkpoint {damaged} cannot be read" in rerun.log(), rerun.tails()
    step = int(_CKPT.fullmatch(before.name).group(1))
    assert f"resuming from {before} (step {step})" in rerun.log()
    assert re.search(rf"epoch \d+ step {total}/{total}", rerun.log())
    assert digests(run_dir) == digests(reference)

    run_dir = fresh_run_dir(reference, tmp_path / "none")
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    for path in (run_dir / "checkpoints").glob("ckpt_*.pth"):
        path.write_bytes(b"PK\x03\x04 not a checkpoint")
    sizes = {p.name: p.stat().st_size for p in (run_dir / "checkpoints").iterdir()}
    rerun = attempts(run_dir, base_env)
    assert rerun.wait() == [1] * WORLD_SIZE, rerun.tails()
    errors = [line for line in rerun.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no checkpoint in" in errors[0] and "move them away" in errors[0], errors
    assert "Traceback" not in rerun.log()
    assert {p.name: p.stat().st_size for p in (run_dir / "checkpoints").iterdir()} == sizes
