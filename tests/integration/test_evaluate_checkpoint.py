"""A saved checkpoint, evaluated alone (trainer.epochs=0 trainer.pretrained=...), gives the metrics
of the run that wrote it: the path a user takes with a released fine-tuned checkpoint. The run's
directory works in its place (its latest checkpoint), and so does a copy in a bucket (gs://).
Weights or annotation files a job cannot use fail it in one line (exit code 2, bad input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["dataset=msrvtt", "dataset.sample_scale=0.1", "trainer.batch_size=8", "trainer.num_workers=0"]


def launch(tmp_path: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLAUNCH_RUNS=str(tmp_path), VLAUNCH_DATA_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", *SMALL, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert (proc.returncode == 0) == ok, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_evaluating_a_saved_checkpoint_reproduces_its_metrics(tmp_path, fake_gcs):
    launch(tmp_path, "trainer.epochs=2", "sweep_id=train")
    run = tmp_path / "train" / "jobs" / "0"
    checkpoint = sorted((run / "checkpoints").glob("ckpt_*.pth"))[-1]
    launch(tmp_path, "trainer.epochs=0", f"trainer.pretrained={checkpoint}", "sweep_id=eval")
    evaluated = tmp_path / "eval" / "jobs" / "0"
    assert (
        json.loads((evaluated / "metrics.json").read_text())["metrics"]
        == json.loads((run / "metrics.json").read_text())["metrics"]
    )
    log = (evaluated / "logs" / "rank0.log").read_text()
    assert "Loaded 140/140 model tensors" in log
    assert not (evaluated / "checkpoints").exists(), "evaluation alone trains nothing and saves nothing"
    # The run directory stands for its latest checkpoint (how a user fine-tunes from a pretraining run),
    # and a checkpoint in a bucket is downloaded into the run dir, checked against its MD5, and loaded.
    from trainers.core import storage

    url = "gs://vl-test/weights/ckpt_trained.pth"
    storage.upload(checkpoint, url)
    launch(tmp_path, "-m", "trainer.epochs=0", f"trainer.pretrained={run},{url}", "sweep_id=more")
    for job in (tmp_path / "more" / "jobs" / "0", tmp_path / "more" / "jobs" / "1"):
        assert (
            json.loads((job / "metrics.json").read_text())["metrics"]
            == json.loads((run / "metrics.json").read_text())["metrics"]
        )
    log = (tmp_path / "more" / "jobs" / "0" / "logs" / "rank0.log").read_text()
    assert f"Loaded 140/140 model tensors from {checkpoint}" in log
    downloaded = tmp_path / "more" / "jobs" / "1" / "pretrained" / "ckpt_trained.pth"
    assert downloaded.read_bytes() == checkpoint.read_bytes()


@pytest.mark.slow
def test_pretrained_weights_that_cannot_be_used_fail_the_job_in_one_line(tmp_path):
    """A file that is not a checkpoint (cut short by a copy), and a checkpoint with nothing the model
    has (another family's): the job fails with exit code 2 and one line saying which file and why, and
    trains nothing; before, the second evaluated or trained a model left at its random initialisation."""
    import torch

    truncated, foreign = tmp_path / "truncated.pth", tmp_path / "foreign.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(4, 4)}}, foreign)
    truncated.write_bytes(foreign.read_bytes()[:100])
    proc = launch(tmp_path, "-m", f"trainer.pretrained={truncated},{foreign}", "sweep_id=bad", ok=False)
    for num, expected in [
        (0, f"{truncated} cannot be read as a PyTorch checkpoint ("),
        (1, f"not one of the 140 tensors of the singularity model is in {foreign} (it holds encoder.weight)"),
    ]:
        job = tmp_path / "bad" / "jobs" / str(num)
        errors = [line for line in (job / "logs" / "rank0.log").read_text().splitlines() if " ERROR " in line]
        assert len(errors) == 1 and expected in errors[0], errors
        assert not (job / "checkpoints").exists() and not (job / "metrics.json").exists()
    assert proc.stdout.count("FAILED (exit 2)") == 2, proc.stdout[-2000:]


@pytest.mark.slow
def test_an_annotation_file_that_is_not_json_fails_the_job_in_one_line_naming_where(tmp_path):
    """A train annotation file cut short (a copy that ran out of space): each family's job fails with
    exit code 2 and one line giving the file, line and column, not a JSONDecodeError traceback."""
    import shutil

    from trainers.core.sample_data import ensure_sample_data

    root = tmp_path / "data"
    shutil.copytree(ensure_sample_data("msrvtt", cache_dir=tmp_path / "cache", scale=0.1), root)
    anno = root / "anno" / "msrvtt_ret_train7k.json"
    anno.write_text(anno.read_text()[:500])
    proc = launch(
        tmp_path, "-m", "trainer=singularity,alpro", f"dataset.data_root={root}", "trainer.preset=tiny",
        "sweep_id=bad", ok=False,
    )  # fmt: skip
    for num in (0, 1):
        log = (tmp_path / "bad" / "jobs" / str(num) / "logs" / "rank0.log").read_text()
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and f"{anno}:1:" in errors[0] and "not valid JSON" in errors[0], log[-3000:]
        assert "Traceback" not in log
    assert proc.stdout.count("FAILED (exit 2)") == 2, proc.stdout[-2000:]
