"""The Reserve trainer as real processes: a tiny run learns; 2 JAX processes on CPU (explicit coordinator,
gloo) with checkpoints on the fake GCS survive a SIGTERM and end with the parameters of an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from trainers.core.job import REQUEUE_EXIT_CODE
from trainers.reserve import data, prep
from trainers.reserve.config import resolve

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private sample-data cache with the tvqa records prepared once (no jax needed for that)."""
    path = tmp_path_factory.mktemp("sample_cache")
    old = os.environ.get("VLAUNCH_DATA_CACHE")
    os.environ["VLAUNCH_DATA_CACHE"] = str(path)
    try:
        dataset = {"name": "tvqa", "data_root": None, "sample_scale": 1.0}
        cfg = resolve({"preset": "tiny"}, dataset)
        data.sample_records(dataset, cfg, prep.Layout.of(cfg))
    finally:
        if old is None:
            os.environ.pop("VLAUNCH_DATA_CACHE")
        else:
            os.environ["VLAUNCH_DATA_CACHE"] = old
    return path


def write_config(run_dir: Path, trainer: dict, output_url: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "job": {"sweep_id": "test", "num": 0, "name": "reserve", "run_dir": str(run_dir)},
        "seed": 3,
        "tracker": {},
        "trainer": {"family": "reserve", "preset": "auto", **trainer},
        "dataset": {"name": "tvqa", "task": "mc_qa", "data_root": None, "sample_scale": 1.0, "records": None},
    }
    if output_url:
        job["job"]["output_url"] = output_url
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def env_for(cache: Path, extra: dict | None = None) -> dict[str, str]:
    env = dict(os.environ, VLAUNCH_DATA_CACHE=str(cache), PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = (
        "true"  # compile time dominates on CPU; numerics stay deterministic
    )
    env.update(extra or {})
    return env


class Pod:
    """N trainer processes joined through an explicit coordinator, like the hosts of a TPU pod."""

    def __init__(
        self,
        config: Path,
        cache: Path,
        gcs_env: dict,
        n: int = 2,
        tag: str = "run",
        programs: dict | None = None,
    ) -> None:
        """`programs`: {process index: python -c program} run instead of `-m trainers.reserve` there."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.logs = [config.parent / f"{tag}.process{i}.log" for i in range(n)]
        self.procs = []
        for i in range(n):
            extra = gcs_env | {
                "VL_JAX_COORDINATOR": f"127.0.0.1:{port}",
                "VL_JAX_NUM_PROCESSES": str(n),
                "VL_JAX_PROCESS_ID": str(i),
                "VL_JAX_CPU_DEVICES": "2",
            }
            with open(self.logs[i], "wb") as log:
                program = ["-c", programs[i]] if programs and i in programs else ["-m", "trainers.reserve"]
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, *program, str(config)],
                        cwd=ROOT, env=env_for(cache, extra), stdout=log, stderr=subprocess.STDOUT,
                    )
                )  # fmt: skip

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait_for(self, i: int, pattern: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not re.search(pattern, self.log(i)):
            if self.procs[i].poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"process {i} never logged {pattern!r}:\n{self.log(i)[-3000:]}")
            time.sleep(0.05)

    def wait(self) -> list[int]:
        try:
            return [p.wait(timeout=TIMEOUT_S) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def digests(run_dir: Path, n: int) -> list[str]:
    return [(run_dir / "status" / f"params.rank{i}.sha256").read_text().strip() for i in range(n)]


def test_a_tiny_run_learns_tvqa_above_chance(cache, tmp_path):
    """`python -m trainers.reserve <run_dir>/config.yaml` on the sample data, one process, as the local
    backend starts it: prepares the records itself, trains, writes metrics.json and a checkpoint."""
    config = write_config(tmp_path / "run", {"log_every": 20})
    result = subprocess.run(
        [sys.executable, "-m", "trainers.reserve", str(config)],
        cwd=ROOT, env=env_for(cache), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = yaml.safe_load((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["chance"]["accuracy"] == 20.0 and metrics["num_questions"] == 24
    assert metrics["headline"]["accuracy"] >= 40.0, metrics  # chance is 20: it learned from the clips
    assert (tmp_path / "run" / "checkpoints" / str(metrics["train_steps"])).is_dir()
    assert re.fullmatch(r"[0-9a-f]{64}", digests(tmp_path / "run", 1)[0])


def test_two_processes_survive_sigterm_and_a_damaged_checkpoint_on_gcs_and_end_as_an_uninterrupted_run(
    cache, tmp_path, fake_gcs
):
    from trainers.core import storage

    gcs_env = fake_gcs.env()
    base = f"gs://vl-test/{uuid.uuid4().hex[:8]}"
    trainer = {"epochs": 1, "log_every": 1, "save_every": 4, "eval_split": "none"}

    # An uninterrupted run, and beside it the same run preempted: SIGTERM to process 1 only, mid-run.
    straight = write_config(tmp_path / "straight", trainer, f"{base}/straight/jobs/0")
    straight_pod = Pod(straight, cache, gcs_env, tag="straight")
    output = f"{base}/preempted/jobs/0"
    config = write_config(tmp_path / "preempted", trainer, output)
    pod = Pod(config, cache, gcs_env, tag="first")
    pod.wait_for(1, r"step 5/10 ")  # after the save at step 4
    pod.procs[1].send_signal(signal.SIGTERM)
    assert pod.wait() == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    stopped = [int(re.search(r"stopped at step (\d+)", pod.log(i)).group(1)) for i in range(2)]
    assert stopped[0] == stopped[1] and 5 <= stopped[0] < 10
    step = stopped[0]
    ckpts = f"{output}/checkpoints"
    assert storage.exists(f"{ckpts}/{step}/commit_success.txt")  # committed before exiting
    # A save cut short (no commit marker) must be ignored on resume.
    storage.write_text(f"{ckpts}/999/state/manifest.ocdbt", "half written")
    assert not (tmp_path / "preempted" / "metrics.json").exists()
    # And the stop step damaged after its commit (its array data deleted from the bucket): both hosts
    # must agree to go back to the committed step before it.
    fs, state_dir = storage.filesystem(f"{ckpts}/{step}/state")
    chunks = [path for path in fs.find(state_dir) if "/d/" in path]
    assert chunks
    fs.rm(chunks)
    before = max(s for s in (4, 8) if s < step)

    # Restarted (the launcher recreates the TPU and runs the same command): resumes at the committed step
    # before the damaged one, and ends with the parameters of the uninterrupted run all the same.
    pod = Pod(config, cache, gcs_env, tag="second")
    assert pod.wait() == [0, 0], pod.log(0)[-3000:]
    for i in range(2):
        assert f"checkpoint step {step} cannot be restored" in pod.log(i), pod.log(i)[-3000:]
        assert (
            f"starting at step {before} of 10 (own checkpoint step {before}; newer step(s) [{step}]"
            in pod.log(i)
        )
    assert straight_pod.wait() == [0, 0], straight_pod.log(0)[-3000:]
    expected = digests(tmp_path / "straight", 2)
    assert expected[0] == expected[1]  # replicated parameters, identical on both hosts
    assert digests(tmp_path / "preempted", 2) == expected
    # Process 0 also published the outputs under output_url.
    assert storage.exists(f"{output}/metrics.json")
    assert storage.read_text(f"{output}/status/params.rank0.sha256").strip() == expected[0]


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before_to_the_same_parameters(cache, tmp_path):
    """Before, a committed step whose data was damaged afterwards (a shard deleted from the bucket) failed
    every resume of the job; now the run goes back to the step before and ends where it would have. (With
    2 hosts on the bucket: test_two_processes_survive_sigterm_and_a_damaged_checkpoint_on_gcs_and_end_as_an_uninterrupted_run.)"""
    trainer = {"epochs": 2, "log_every": 1, "save_every": 4, "eval_split": "none"}
    config = write_config(tmp_path / "run", trainer)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "trainers.reserve", str(config)],
            cwd=ROOT, env=env_for(cache), capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip

    first = run()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    expected = digests(tmp_path / "run", 1)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [16, 20]
    for chunk in (checkpoints / "20" / "state").rglob("d/*"):  # the array data; metadata left intact
        chunk.unlink()
    (tmp_path / "run" / "status" / "params.rank0.sha256").unlink()

    again = run()
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert re.search(r"checkpoint step 20 cannot be restored \(.+\); trying step 16", out), out[-3000:]
    assert (
        "starting at step 16 of 20 (own checkpoint step 16; newer step(s) [20] could not be restored" in out
    )
    assert digests(tmp_path / "run", 1) == expected
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [16, 20]


def test_a_checkpoint_the_disk_cannot_hold_ends_the_run_in_one_line(cache, tmp_path):
    """A real write error: past RLIMIT_FSIZE the checkpoint's data file fails with EFBIG, as on a full
    disk with ENOSPC (Python ignores SIGXFSZ). Before, the job ended with exit 2 (the code for bad data)
    and a log tail of Orbax's and asyncio's tracebacks, one per array."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    trainer = {"epochs": 1, "log_every": 1, "save_every": 4, "eval_split": "none"}
    config = write_config(tmp_path / "run", trainer)
    result = subprocess.run(
        [sys.executable, "-m", "trainers.reserve", str(config)],
        cwd=ROOT, env=env_for(cache), capture_output=True, text=True, timeout=TIMEOUT_S,
        preexec_fn=small_files,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if " ERROR " in line]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    message = errors[0].split(" ERROR trainers.reserve: ", 1)[-1]
    assert re.fullmatch(
        rf"cannot write checkpoint {re.escape(str(checkpoints / '4'))}: File too large, \d+ MiB free there; "
        r"make room and resubmit the job \(it starts over: no checkpoint was saved before this one\)",
        message,
    ), errors
    assert not (checkpoints / "4").exists()  # a save cut short never counts as committed


# Process 0 as a host whose save fails (the bucket refused it) at step 8, while process 1 goes into the
# same save and waits there for process 0.
FAILING_SAVE = """
from trainers.reserve import checkpoint, train
save = checkpoint.Checkpointer.save
def failing(self, step, state, meta):
    if step >= 8:
        raise RuntimeError("the bucket refused the save (simulated)")
    return save(self, step, state, meta)
checkpoint.Checkpointer.save = failing
train.main()
"""


def test_a_host_that_fails_mid_run_ends_the_job_without_waiting_for_the_others(cache, tmp_path, fake_gcs):
    """Before, the failed host sat in jax.distributed's shutdown barrier (also run at exit) for 5 minutes
    while the other waited for it in a collective, so the launcher saw no exit code for that long."""
    trainer = {"epochs": 1, "log_every": 1, "save_every": 4, "eval_split": "none"}
    config = write_config(tmp_path / "run", trainer, f"gs://vl-test/{uuid.uuid4().hex[:8]}/jobs/0")
    pod = Pod(config, cache, fake_gcs.env(), programs={0: FAILING_SAVE})
    try:
        pod.wait_for(0, r"step 8/10 ")
        failed_at = time.monotonic()
        assert pod.procs[0].wait(timeout=60) == 1, pod.log(0)[-3000:]
        assert "the trainer failed" in pod.log(0) and "the bucket refused the save" in pod.log(0)
        pod.procs[1].wait(timeout=120)  # the other host notices the coordinator is gone and ends too
        assert time.monotonic() - failed_at < 150, (pod.log(0)[-2000:], pod.log(1)[-2000:])
    finally:
        pod.kill()
