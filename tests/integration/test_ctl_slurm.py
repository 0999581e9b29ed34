"""The registry and `vlaunch-ctl` against the real local Slurm cluster, run as a user runs them:
`python -m launcher ...` to submit, `python -m launcher.ctl ...` to look after the sweep.

Each test checks what the ctl prints and records against what Slurm says (sacct) and what the jobs
wrote (logs, metrics). Every launch gets a registry and runs dir of its own test.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from trainers.core.sample_data import sample_data_root

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[2]
SCALE = 0.05
SMALL = [f"dataset.sample_scale={SCALE}", "trainer.epochs=1", "trainer.batch_size=4", "trainer.num_workers=0"]
SLURM = ["trainer=singularity", "backend=slurm", "site=local_slurm", "wait_poll_s=1"]
HOLD = "backend.additional_parameters={hold:true}"
JOB_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("vlaunch_data")
    subprocess.run(
        [sys.executable, "-m", "trainers.core.sample_data", "msrvtt", "--scale", str(SCALE)],
        cwd=REPO_ROOT, env=dict(os.environ, VLAUNCH_DATA_CACHE=str(cache)),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return cache


class Session:
    """Launcher and ctl runs sharing one registry and runs dir; cancels its Slurm jobs at the end."""

    def __init__(self, tmp_path: Path, data_cache: Path) -> None:
        self.registry = tmp_path / "registry.sqlite"
        self.runs = tmp_path / "runs"
        self.env = dict(
            os.environ,
            VLAUNCH_RUNS=str(self.runs),
            VLAUNCH_DATA_CACHE=str(data_cache),
            VLAUNCH_REGISTRY=str(self.registry),
        )
        self.names: list[str] = []

    def launch(self, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, str]:
        """`python -m launcher ... name=<unique>`; the process and the sweep id it printed."""
        name = f"c{secrets.token_hex(4)}"
        self.names.append(name)
        proc = subprocess.run(
            [sys.executable, "-m", "launcher", *args, f"name={name}"],
            cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        m = re.search(r"^sweep (\S+): \d+ job\(s\) accepted by Slurm", proc.stdout, re.M)
        assert m, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc, m.group(1)

    def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "launcher.ctl", *args],
            cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check:
            assert proc.returncode == 0, f"ctl {args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def jobs(self, sweep_id: str) -> list[tuple]:
        conn = sqlite3.connect(self.registry)
        try:
            return conn.execute(
                "SELECT num, handle, state, exit_code FROM jobs WHERE sweep_id = ? ORDER BY num", (sweep_id,)
            ).fetchall()
        finally:
            conn.close()

    def wait_status(self, sweep_id: str, done, timeout: float = JOB_TIMEOUT_S) -> str:
        """`ctl status --refresh` until `done(its output)`."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.ctl("status", sweep_id, "--refresh").stdout
            if done(out):
                return out
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f}s; last status:\n{out}")
            time.sleep(2)


@pytest.fixture
def session(slurm_cluster, data_cache, tmp_path):
    s = Session(tmp_path, data_cache)
    yield s
    for name in s.names:
        subprocess.run(["scancel", "-n", f"vl-{name}"], capture_output=True, check=False, timeout=30)


def sacct(job_ids: list[str]) -> dict[str, str]:
    """State of each job id (`<array>_<index>` or plain), asking sacct about their arrays.

    Array tasks that never started are accounted as one row, `<array>_[0-1]`: expanded here."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(arrays)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    states = {}
    for line in filter(None, out.splitlines()):
        job, state = line.split("|")
        m = re.fullmatch(r"(\d+)_\[(\d+)-(\d+)\]", job)
        ids = [f"{m.group(1)}_{i}" for i in range(int(m.group(2)), int(m.group(3)) + 1)] if m else [job]
        states.update((i, state.split()[0]) for i in ids)
    # A whole array accounted under its bare id (e.g. cancelled before any task started).
    by_array = {j.split("_")[0]: st for j, st in states.items()}  # any row of an array, for bare ids
    return {j: states.get(j) or by_array.get(j, "UNKNOWN") for j in job_ids}


def eventually(what: str, probe, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def squeue(job_ids: list[str]) -> dict[str, str]:
    """State of each queued job (held jobs reach sacct only once eligible)."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    states = dict(line.split("|") for line in out.splitlines() if line)
    return {j: states.get(j, "UNKNOWN") for j in job_ids}


def cells(status: str, handle: str) -> list[str]:
    """The status-table cells after a job's handle: state, requeues, metric, checkpoint."""
    m = re.search(rf"^\d+\s.*?\s{re.escape(handle)}\s+(.*)$", status, re.M)
    assert m, f"no row for {handle} in:\n{status}"
    return m.group(1).split()


def test_status_follows_slurm_and_logs_follow_the_job_to_its_end(session):
    _, sweep_id = session.launch(*SLURM, "dataset=msrvtt", *SMALL)
    (num, handle, state, _), = session.jobs(sweep_id)  # fmt: skip
    assert (num, state) == (0, "PENDING") and re.fullmatch(r"\d+", handle)

    status = session.ctl("status", "latest", "--refresh").stdout
    assert f"sweep {sweep_id}" in status and "states from sacct 0 s ago" in status, status
    assert cells(status, handle)[0] in {"PENDING", "RUNNING", "COMPLETED"}, status

    # Follow: prints the task log as it grows and returns by itself once Slurm says the job ended.
    follow = session.ctl("logs", sweep_id[:15], "0", "--follow", timeout=JOB_TIMEOUT_S)
    assert "[vlaunch] rank 0 of 1" in follow.stdout and "on msrvtt" in follow.stdout, follow.stdout
    assert "[vlaunch-ctl] job 0 COMPLETED" in follow.stderr, follow.stderr
    assert sacct([handle]) == {handle: "COMPLETED"}

    status = session.ctl("status", sweep_id).stdout
    state, requeues, r1, *checkpoint = cells(status, handle)
    assert (state, requeues) == ("COMPLETED", "0") and re.fullmatch(r"\d+\.\d", r1), status
    assert checkpoint[0] == "step", status  # the latest checkpoint's step
    log = session.ctl("logs", sweep_id, "0").stdout
    assert log == (session.runs / sweep_id / "slurm" / handle / f"{handle}_0_log.out").read_text()
    history = session.ctl("history", sweep_id).stdout
    states = [line.split()[4] for line in history.splitlines()[2:]]
    # RUNNING is recorded when a look saw it (the follow polls every 2 s; a short job may slip by).
    assert states in (
        ["SUBMITTING", "PENDING", "RUNNING", "COMPLETED"],
        ["SUBMITTING", "PENDING", "COMPLETED"],
    )

    report = session.ctl("report", sweep_id, "--out", str(session.runs / "report")).stdout
    assert "R@1 (chance)" in report and (session.runs / "report" / "metrics.png").stat().st_size > 0


def test_failed_job_resubmitted_after_its_cause_is_fixed_completes(session, data_cache, tmp_path):
    # The job reads its videos only on the node, when it trains: garbage videos fail it there.
    sample = sample_data_root("msrvtt", data_cache, scale=SCALE)
    data = tmp_path / "msrvtt"
    shutil.copytree(sample / "anno", data / "anno")
    shutil.copy(sample / "vocab.txt", data / "vocab.txt")
    (data / "videos").mkdir()
    for video in (sample / "videos").iterdir():
        (data / "videos" / video.name).write_bytes(b"not a video yet\n")
    args = [*SLURM, "dataset=msrvtt", f"dataset.data_root={data}", "trainer.preset=tiny", *SMALL[1:]]
    proc, sweep_id = session.launch(*args, "--wait", timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    ((_, first, state, code),) = session.jobs(sweep_id)
    assert (state, code) == ("FAILED", 1)  # recorded by --wait

    for video in (sample / "videos").iterdir():  # the cause fixed: the real videos in place
        shutil.copy(video, data / "videos" / video.name)
    out = session.ctl("resubmit", sweep_id, "--failed").stdout
    m = re.search(r"^  job 0 = slurm (\S+)$", out, re.M)
    assert m and m.group(1) != first, out
    second = m.group(1)
    session.wait_status(sweep_id, lambda s: cells(s, second)[0] in {"COMPLETED", "FAILED"})
    assert session.jobs(sweep_id) == [(0, second, "COMPLETED", 0)]
    assert sacct([first, second]) == {first: "FAILED", second: "COMPLETED"}

    # Both attempts in the history: the first one's failure under its id, the second under its own.
    history = session.ctl("history", sweep_id, "0").stdout
    events = [line.split() for line in history.splitlines()[2:]]
    kinds = [(e[3], e[4], e[6]) for e in events]  # date time job event state exit handle [detail]
    assert ("state", "FAILED", first) in kinds, history
    assert ("resubmit", "PENDING", second) in kinds and ("state", "COMPLETED", second) in kinds, history
    assert kinds.index(("state", "FAILED", first)) < kinds.index(("resubmit", "PENDING", second)), history
    log = session.runs / sweep_id / "slurm" / second / f"{second}_0_log.out"
    assert "[vlaunch] rank 0 of 1" in log.read_text()


def test_eight_launchers_at_once_then_cancel(session):
    """Eight real submissions (held, so nothing runs) racing for the registry: no row lost."""
    with ThreadPoolExecutor(8) as pool:
        launched = list(pool.map(lambda _: session.launch("-m", *SLURM, "seed=1,2", *SMALL, HOLD), range(8)))
    sweep_ids = [sweep_id for _, sweep_id in launched]
    assert len(set(sweep_ids)) == 8
    listed = session.ctl("list", "--limit", "20").stdout
    for proc, sweep_id in launched:
        printed = re.findall(r"^  job (\d) = slurm (\S+):", proc.stdout, re.M)
        assert session.jobs(sweep_id) == [(int(n), h, "PENDING", None) for n, h in printed], sweep_id
        assert re.search(rf"^{sweep_id}\s.*\s2\s+2 PENDING", listed, re.M), listed
    handles = [h for s in sweep_ids for _, h, _, _ in session.jobs(s)]
    assert len(set(handles)) == 16 and set(squeue(handles).values()) == {"PENDING"}

    # One job of the first sweep, then whole sweeps.
    first = sweep_ids[0]
    (_, keep, _, _), (_, gone, _, _) = session.jobs(first)
    assert "cancelled 1 job(s)" in session.ctl("cancel", first, "1").stdout
    assert squeue([keep, gone]) == {keep: "PENDING", gone: "UNKNOWN"}  # gone from the queue
    # (A held array task cancelled alone never reaches sacct: Slurm accounts held arrays as a whole.)
    for sweep_id in sweep_ids:
        session.ctl("cancel", sweep_id)
    assert set(squeue(handles).values()) == {"UNKNOWN"}  # nothing left in the queue
    arrays = sorted({h.split("_")[0] for h in handles})
    eventually("sacct to account the arrays cancelled", lambda: set(sacct(arrays).values()) == {"CANCELLED"})
    for sweep_id in sweep_ids:
        assert [s for _, _, s, _ in session.jobs(sweep_id)] == ["CANCELLED", "CANCELLED"]
    conn = sqlite3.connect(session.registry)
    assert conn.execute("SELECT count(*) FROM job_events WHERE state = 'CANCELLED'").fetchone()[0] == 16
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
