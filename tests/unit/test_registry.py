"""The experiment registry (launcher/registry.py), its recording by the launcher (launcher/sweep.py),
and `vlaunch-ctl` (launcher/ctl.py) on local jobs and fake run dirs.

Local jobs here are real processes started by the local backend, running small Python commands
instead of a trainer, so every path (pids, exit codes, metrics files, logs) is the real one.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from launcher import ctl, registry, sweep
from launcher.errors import LaunchError
from launcher.plan import JobPlan, SweepPlan
from launcher.registry import Observation, Registry

REPO = Path(__file__).resolve().parents[2]
LOCAL = {"name": "local", "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "gpus_per_node": 0}
SLURM = {"name": "slurm", "partition": "debug", "nodes": 1, "tasks_per_node": 1, "time_min": 5}


def make_plan(
    root: Path, sweep_id: str, n: int, backend: str = "slurm", commands: list[list[str]] | None = None
) -> SweepPlan:
    """A plan as plan_sweep makes it: job configs with their resolved backend, one resource group."""
    sweep_dir = root / sweep_id
    resources = dict(LOCAL if backend == "local" else SLURM, max_parallel=4)
    jobs = []
    for num in range(n):
        run_dir = sweep_dir / "jobs" / str(num)
        config = {
            "job": {"sweep_id": sweep_id, "num": num, "run_dir": str(run_dir), "name": "t"},
            "seed": num,
            "trainer": {"family": "singularity", "lr": 1e-4},
            "backend": resources,
        }
        command = (
            commands[num] if commands else [sys.executable, "-m", "trainers.x", str(run_dir / "config.yaml")]
        )
        jobs.append(JobPlan(num, [f"seed={num}"], run_dir, config, command, label=f"seed={num}"))
    return SweepPlan(
        sweep_id=sweep_id,
        sweep_dir=sweep_dir,
        backend=backend,
        jobs=jobs,
        command_line=f"python -m launcher -m seed=range({n})",
        resource_groups=[(resources, list(range(n)))],
    )


def record(reg: Registry, plan: SweepPlan, created: float | None = None) -> None:
    reg.record_sweep(
        plan, command_line=plan.command_line, overrides=["-m", "seed=range(2)"], cwd="/x", created=created
    )


@pytest.fixture
def reg(tmp_path) -> Registry:
    with Registry(tmp_path / "reg" / "registry.sqlite") as r:
        yield r


def run_ctl(*args: str, registry_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.ctl", "--registry", str(registry_path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


# --------------------------------------------------------------------------------- the file


def test_schema_wal_and_owner_only_permissions(tmp_path, monkeypatch):
    monkeypatch.delenv("VLAUNCH_REGISTRY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    path = registry.default_path()
    assert path == tmp_path / "data" / "vlaunch" / "registry.sqlite"
    with Registry() as r:
        record(r, make_plan(tmp_path, "s1", 2))
        assert r.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert r.conn.execute("PRAGMA user_version").fetchone()[0] == registry.SCHEMA_VERSION
        tables = {row[0] for row in r.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"sweeps", "jobs", "job_events"} <= tables
        plan_of_status = r.conn.execute(
            "EXPLAIN QUERY PLAN SELECT num FROM jobs WHERE sweep_id = ? ORDER BY num", ("s1",)
        ).fetchall()
        assert "SEARCH jobs USING" in " ".join(str(tuple(row)) for row in plan_of_status)
    for f in [path, *path.parent.glob("registry.sqlite-*")]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # The env var wins over XDG.
    monkeypatch.setenv("VLAUNCH_REGISTRY", str(tmp_path / "elsewhere.sqlite"))
    assert registry.default_path() == tmp_path / "elsewhere.sqlite"


def test_registry_path_from_config_key_then_env_then_default(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, "s1", 1)
    monkeypatch.setenv("VLAUNCH_REGISTRY", str(tmp_path / "env.sqlite"))
    assert sweep.registry_path(plan) == tmp_path / "env.sqlite"
    # The `registry` config key (conf/config.yaml, or registry=... on the command line) is passed in.
    assert sweep.registry_path(plan, str(tmp_path / "key.sqlite")) == tmp_path / "key.sqlite"


def test_record_update_and_history_only_on_change(reg, tmp_path):
    plan = make_plan(tmp_path, "20250101-000000-aaaa", 3)
    record(reg, plan)
    (s,) = reg.sweeps()
    assert (s.id, s.backend, s.runs_dir, s.name) == (plan.sweep_id, "slurm", str(plan.sweep_dir), "t")
    jobs = reg.jobs(s.id)
    assert [j.state for j in jobs] == ["SUBMITTING"] * 3
    assert (
        jobs[1].overrides == ["seed=1"]
        and jobs[1].label == "seed=1"
        and jobs[1].command == plan.jobs[1].command
    )
    assert reg.configs(s.id, [2])[2] == json.loads(json.dumps(plan.jobs[2].config))

    reg.set_handles(s.id, {0: "100_0", 1: "100_1", 2: "100_2"})
    reg.update(s.id, [Observation(0, state="RUNNING"), Observation(1, state="PENDING")])  # 1: no change
    reg.update(s.id, [Observation(0, state="RUNNING"), Observation(1, state="PENDING")])  # no change at all
    reg.update(s.id, [Observation(0, state="FAILED", exit_code=3, metrics={"headline": {"R@1": 2.0}})])
    history = [(e.kind, e.state, e.exit_code, e.handle) for e in reg.events(s.id, 0)]
    assert history == [
        ("state", "SUBMITTING", None, None),
        ("state", "PENDING", None, "100_0"),
        ("state", "RUNNING", None, "100_0"),
        ("state", "FAILED", 3, "100_0"),
    ]
    assert [e.state for e in reg.events(s.id, 1)] == ["SUBMITTING", "PENDING"]
    job0 = reg.jobs(s.id, [0])[0]
    assert (job0.state, job0.exit_code, job0.metrics) == ("FAILED", 3, {"headline": {"R@1": 2.0}})
    # A later observation without metrics keeps the recorded ones.
    reg.update(s.id, [Observation(0, state="FAILED")])
    assert reg.jobs(s.id, [0])[0].metrics == {"headline": {"R@1": 2.0}}
    assert reg.state_counts([s.id]) == {s.id: {"FAILED": 1, "PENDING": 2}}

    with pytest.raises(registry.RegistryError, match="already in the registry"):
        record(reg, plan)


def test_resolve_by_prefix_latest_and_one_line_errors(reg, tmp_path):
    for i, sid in enumerate(["20250101-000000-aaaa", "20250102-000000-bbbb", "20250102-000000-bccc"]):
        record(reg, make_plan(tmp_path, sid, 1), created=1000.0 + i)
    assert reg.resolve("20250101").id == "20250101-000000-aaaa"
    assert reg.resolve("latest").id == "20250102-000000-bccc"
    with pytest.raises(registry.RegistryError, match="ambiguous"):
        reg.resolve("20250102")
    with pytest.raises(registry.RegistryError) as e:
        reg.resolve("nosuch")
    assert "newest are: 20250102-000000-bccc, 20250102-000000-bbbb, 20250101-000000-aaaa" in str(e.value)

    proc = run_ctl("status", "nosuch", registry_path=reg.path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no sweep 'nosuch'"), proc.stderr
    assert "20250102-000000-bccc" in proc.stderr
    for command in ("history", "logs", "cancel"):  # a job the sweep does not have
        proc = run_ctl(command, "latest", "3", registry_path=reg.path)
        assert proc.returncode == 2 and proc.stdout == "", (command, proc.stdout)
        assert proc.stderr == "error: sweep 20250102-000000-bccc has no job 3; its jobs are 0-0\n", command


def _writer(path: str, worker: int, sweeps: int, jobs: int, root: str) -> None:
    with Registry(path) as r:
        for k in range(sweeps):
            plan = make_plan(Path(root), f"w{worker}-s{k}", jobs)
            record(r, plan)
            r.set_handles(plan.sweep_id, {n: f"{worker}{k}_{n}" for n in range(jobs)})
            r.update(plan.sweep_id, [Observation(n, state="COMPLETED", exit_code=0) for n in range(jobs)])


def test_eight_processes_recording_at_once_lose_nothing(tmp_path):
    path = tmp_path / "registry.sqlite"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 5, 40, str(tmp_path))) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 8
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sweeps").fetchone()[0] == 40
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 40 * 40
    # Every job went SUBMITTING -> PENDING -> COMPLETED, with its own handle.
    assert conn.execute("SELECT count(*) FROM job_events").fetchone()[0] == 40 * 40 * 3
    assert conn.execute("SELECT DISTINCT state FROM jobs").fetchall() == [("COMPLETED",)]
    bad = conn.execute(
        "SELECT count(*) FROM jobs j JOIN sweeps s ON s.id = j.sweep_id WHERE j.handle IS NULL"
        " OR j.handle NOT LIKE substr(s.id, 2, instr(s.id, '-') - 2) || substr(s.id, instr(s.id, '-s') + 2) || '_%'"
    ).fetchone()[0]
    assert bad == 0
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_second_open_in_one_process_keeps_its_writes_visible_to_other_processes(tmp_path):
    """`vlaunch-ctl resubmit` holds the registry open and opens it again to record the new sweep. Opening
    must not drop the lock the first connection holds: without it another process that closes its
    connection deletes the WAL this process still commits to, and those commits never reach the file."""
    path = tmp_path / "registry.sqlite"
    first = Registry(path)
    record(first, make_plan(tmp_path, "s1", 1))
    second = Registry(path)
    record(second, make_plan(tmp_path, "s2", 1))
    other = "from launcher.registry import Registry; import sys; Registry(sys.argv[1]).sweeps()"
    subprocess.run([sys.executable, "-c", other, str(path)], cwd=REPO, check=True, timeout=60)
    first.mark("s1", [0], "COMPLETED")
    read = (
        "from launcher.registry import Registry; import sys; print(Registry(sys.argv[1]).jobs('s1')[0].state)"
    )
    out = subprocess.run([sys.executable, "-c", read, str(path)], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "COMPLETED", out.stdout + out.stderr
    first.close()
    second.close()
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --------------------------------------------------------------------------------- refresh


def write_run_dir(run_dir: Path, *, metrics=None, ckpt=None, exit_codes=None, requeues=0) -> None:
    (run_dir / "status").mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if ckpt is not None:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / ckpt).write_bytes(b"x")
        (run_dir / "checkpoints" / "latest").write_text(ckpt)
    for rank, code in (exit_codes or {}).items():
        (run_dir / "status" / f"exit_code.rank{rank}").write_text(f"{code}\n")
    lines = []
    for attempt in range(requeues):
        for rank in (0, 1):  # every rank writes its own line: one requeue per attempt all the same
            base = {"rank": rank, "attempt": attempt, "host": "node1", "time": 100.0 + attempt}
            lines.append({**base, "event": "exit", "exit_code": 75})
            lines.append({**base, "event": "requeue", "exit_code": 75})
    if lines:
        text = "\n".join(json.dumps(e) for e in lines) + "\n" + '{"time": 1, "ev'  # a line being written
        (run_dir / "status" / "events.jsonl").write_text(text)


def test_refresh_ingests_slurm_states_and_run_dir_files_with_one_rate_limited_query(reg, tmp_path):
    plan = make_plan(tmp_path, "s1", 4)
    record(reg, plan)
    reg.set_handles("s1", {0: "7_0", 1: "7_1", 2: "7_2", 3: "9"})
    dirs = [j.run_dir for j in plan.jobs]
    metrics = {"headline": {"R@1": 41.5, "R@5": 70.0}, "chance": {"R@1": 1.0, "R@5": 5.0}}
    write_run_dir(dirs[0], metrics=metrics, ckpt="ckpt_00000120.pth", exit_codes={0: 0}, requeues=2)
    write_run_dir(dirs[1], exit_codes={1: 0, 0: 3})
    write_run_dir(dirs[2], ckpt="ckpt_00000010.pth")  # running, has checkpointed; no events file
    calls = []

    def query(arrays):
        calls.append(list(arrays))
        return {"7_0": ("COMPLETED", 0), "7_1": ("FAILED", 3), "7_2": ("RUNNING", None)}  # 9: not yet known

    assert registry.refresh(reg, reg.sweep("s1"), query_states=query, now=1000.0)
    assert calls == [["7", "9"]]  # one call for every array of the sweep
    jobs = reg.jobs("s1")
    assert [(j.state, j.exit_code) for j in jobs] == [
        ("COMPLETED", 0),
        ("FAILED", 3),
        ("RUNNING", None),
        ("PENDING", None),
    ]
    assert jobs[0].requeues == 2 and jobs[0].metrics == metrics and jobs[0].checkpoint_step == 120
    assert jobs[2].checkpoint == str(dirs[2] / "checkpoints" / "ckpt_00000010.pth") and jobs[2].requeues == 0
    requeue_events = [e for e in reg.events("s1", 0) if e.kind == "requeue"]
    assert [(e.time, e.detail) for e in requeue_events] == [
        (100.0, "attempt 0 on node1"),
        (101.0, "attempt 1 on node1"),
    ]

    # Rate-limited: a second status within max_age asks nobody; --refresh does, for unfinished jobs only.
    assert not registry.refresh(reg, reg.sweep("s1"), query_states=query, now=1005.0)
    assert registry.refresh(reg, reg.sweep("s1"), query_states=query, now=1006.0, force=True)
    assert calls == [["7", "9"], ["7", "9"]]
    # Reading the same events again adds no duplicate requeues.
    assert len([e for e in reg.events("s1", 0) if e.kind == "requeue"]) == 2
    text = ctl.status_text(reg, reg.sweep("s1"), now=1010.0)
    assert "states from sacct 4 s ago" in text
    row0 = next(line for line in text.splitlines() if line.startswith("0 "))
    assert row0.split() == ["0", "seed=0", "7_0", "COMPLETED", "2", "41.5", "step", "120"]
    assert "FAILED (exit 3)" in text


def test_refresh_takes_the_queues_live_state_where_sacct_lags(reg, tmp_path, monkeypatch):
    # slurmdbd records a start late: sacct can still say PENDING of a job squeue shows RUNNING. The
    # registry must not step back from RUNNING to PENDING (a follow saw that history in the test suite).
    plan = make_plan(tmp_path, "lag", 3)
    record(reg, plan)
    reg.set_handles("lag", {0: "8_0", 1: "8_1", 2: "8_2"})
    asked = []

    def squeue(arrays):
        asked.append(list(arrays))
        return {"8_0": ("RUNNING", None), "8_2": ("PENDING", None)}  # 8_1: left the queue already

    monkeypatch.setattr(registry, "squeue_states", squeue)
    sacct = {"8_0": ("PENDING", None), "8_1": ("PENDING", None), "8_2": ("PENDING", None)}
    assert registry.refresh(reg, reg.sweep("lag"), query_states=lambda arrays: sacct, now=1000.0)
    assert asked == [["8"]]
    assert [j.state for j in reg.jobs("lag")] == ["RUNNING", "PENDING", "PENDING"]
    # Once sacct knows a job has started (or ended), the queue is not asked about it.
    sacct = {"8_0": ("RUNNING", None), "8_1": ("COMPLETED", 0), "8_2": ("RUNNING", None)}
    assert registry.refresh(reg, reg.sweep("lag"), query_states=lambda arrays: sacct, now=1020.0)
    assert asked == [["8"]]
    assert [j.state for j in reg.jobs("lag")] == ["RUNNING", "COMPLETED", "RUNNING"]


# --------------------------------------------------------------------------------- launcher


class FakeSlurm:
    """A backend module standing in for launcher.backends.slurm (its submit contract)."""

    def __init__(self, refuse: str | None = None):
        self.refuse = refuse
        self.plans = []

    def submit(self, plan):
        from launcher.backends.slurm import Submission

        self.plans.append(plan)
        if self.refuse:
            raise LaunchError(self.refuse)
        return Submission(array_ids=["55"], job_ids=[f"55_{i}" for i in range(len(plan.jobs))])


def test_run_plan_records_before_submitting_then_handles_or_refusal(tmp_path, monkeypatch, capsys):
    reg_path = tmp_path / "registry.sqlite"
    monkeypatch.setattr(sweep.snapshot, "attach", lambda plan: None)
    fake = FakeSlurm()
    seen_states = []

    def submit(plan):  # the sweep must already be in the registry, SUBMITTING, when the backend is asked
        with Registry(reg_path) as r:
            seen_states.extend(j.state for j in r.jobs(plan.sweep_id))
        return FakeSlurm.submit(fake, plan)

    fake.submit = submit
    monkeypatch.setattr(sweep.backends, "get", lambda name: fake)
    plan = make_plan(tmp_path, "ok", 2)
    assert sweep.run_plan(plan, dry_run=False, wait=False, registry_file=str(reg_path)) == 0
    assert seen_states == ["SUBMITTING", "SUBMITTING"]
    with Registry(reg_path) as r:
        assert [(j.state, j.handle) for j in r.jobs("ok")] == [("PENDING", "55_0"), ("PENDING", "55_1")]

    refusing = FakeSlurm(refuse="sbatch refused the sweep: invalid partition specified: nosuch")
    monkeypatch.setattr(sweep.backends, "get", lambda name: refusing)
    with pytest.raises(LaunchError) as e:
        sweep.run_plan(
            make_plan(tmp_path, "refused", 2), dry_run=False, wait=False, registry_file=str(reg_path)
        )
    assert str(e.value) == "sbatch refused the sweep: invalid partition specified: nosuch"
    with Registry(reg_path) as r:
        jobs = r.jobs("refused")
        assert {(j.state, j.error) for j in jobs} == {("FAILED_TO_SUBMIT", str(e.value))}

    # A dry run records nothing.
    monkeypatch.setattr(
        sweep.backends, "get", lambda name: type("B", (), {"render": staticmethod(lambda p: "")})
    )
    sweep.run_plan(make_plan(tmp_path, "dry", 2), dry_run=True, wait=False, registry_file=str(reg_path))
    with Registry(reg_path) as r:
        assert sorted(s.id for s in r.sweeps()) == ["ok", "refused"]


def test_dry_run_through_the_cli_creates_no_registry(tmp_path):
    env = dict(os.environ, VLAUNCH_RUNS=str(tmp_path / "runs"), VLAUNCH_REGISTRY=str(tmp_path / "r.sqlite"))
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "trainer=singularity", "dataset=msrvtt", "--dry-run"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "r.sqlite").exists()


JOB_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    run_dir = Path(sys.argv[1]).parent
    print(f"cwd {os.getcwd()}", flush=True)
    for i in range(int(sys.argv[2])):
        print(f"line {i}", flush=True)
        time.sleep(float(sys.argv[3]))
    if int(sys.argv[4]) == 0:
        (run_dir / "metrics.json").write_text(json.dumps({"headline": {"R@1": 10.0 + len(str(run_dir))%7},
                                                           "chance": {"R@1": 1.0}}))
    sys.exit(int(sys.argv[4]))
    """
)


def local_plan(tmp_path: Path, sweep_id: str, specs: list[tuple[int, float, int]]) -> SweepPlan:
    """Local jobs running JOB_SCRIPT with (lines, seconds per line, exit code)."""
    script = tmp_path / "job.py"
    script.write_text(JOB_SCRIPT)
    commands = [
        [
            sys.executable,
            str(script),
            str(tmp_path / sweep_id / "jobs" / str(n) / "config.yaml"),
            str(a),
            str(b),
            str(c),
        ]
        for n, (a, b, c) in enumerate(specs)
    ]
    return make_plan(tmp_path, sweep_id, len(specs), backend="local", commands=commands)


def test_local_sweep_records_pids_exit_codes_and_metrics_then_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep.snapshot, "attach", lambda plan: None)
    reg_path = tmp_path / "registry.sqlite"
    plan = local_plan(tmp_path, "loc", [(2, 0.05, 0), (1, 0.05, 3)])
    assert sweep.run_plan(plan, dry_run=False, wait=False, registry_file=str(reg_path)) == 1
    with Registry(reg_path) as r:
        jobs = r.jobs("loc")
        assert [(j.state, j.exit_code) for j in jobs] == [("COMPLETED", 0), ("FAILED", 3)]
        assert all(j.handle and j.handle.isdigit() for j in jobs)
        assert jobs[0].metrics["headline"]["R@1"] > 0 and not jobs[1].metrics
        assert [e.state for e in r.events("loc", 1)] == ["SUBMITTING", "PENDING", "RUNNING", "FAILED"]

        paths = ctl.write_report(r, r.sweep("loc"), tmp_path / "report")
    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(row["job"], row["state"], row["exit_code"]) for row in rows] == [
        ("0", "COMPLETED", "0"),
        ("1", "FAILED", "3"),
    ]
    assert float(rows[0]["R@1"]) == jobs[0].metrics["headline"]["R@1"] and rows[0]["chance R@1"] == "1.0"
    document = json.loads(paths["json"].read_text())
    assert document["sweep"]["id"] == "loc" and document["jobs"][1]["exit_code"] == 3
    assert "R@1 (chance)" in paths["table"].read_text()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert ctl.main(["--registry", str(reg_path), "report", "loc", "--out", str(blocked / "report")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: cannot write the report to {blocked / 'report'}: Not a directory; give --out a directory "
        "you can write"
    )

    # resubmit --failed runs job 1 again (same run dir); its cause fixed, it completes.
    cmd = reg_command = json.loads(sqlite3.connect(reg_path).execute(
        "SELECT command FROM jobs WHERE sweep_id='loc' AND num=1").fetchone()[0])  # fmt: skip
    cmd[-1] = "0"
    with Registry(reg_path) as r:
        with r._write() as conn:
            conn.execute(
                "UPDATE jobs SET command = ? WHERE sweep_id='loc' AND num=1", (json.dumps(reg_command),)
            )
    assert ctl.main(["--registry", str(reg_path), "resubmit", "loc", "--failed"]) == 0
    out = capsys.readouterr().out
    assert "resubmitting 1 job(s)" in out
    with Registry(reg_path) as r:
        assert [j.state for j in r.jobs("loc")] == ["COMPLETED", "COMPLETED"]
        states = [(e.kind, e.state) for e in r.events("loc", 1)]
        assert states[-3:] == [("resubmit", "PENDING"), ("state", "RUNNING"), ("state", "COMPLETED")]
        assert ("state", "FAILED") in states


def test_ctl_logs_follow_and_cancel_of_local_jobs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep.snapshot, "attach", lambda plan: None)
    reg_path = tmp_path / "registry.sqlite"
    plan = local_plan(tmp_path, "loc", [(6, 0.3, 0), (1000, 0.1, 0)])
    launcher = threading.Thread(
        target=lambda: sweep.run_plan(plan, dry_run=False, wait=False, registry_file=str(reg_path)),
        daemon=True,
    )
    launcher.start()
    with Registry(reg_path) as r:
        deadline = time.monotonic() + 30
        while [j.state for j in r.jobs("loc")] != ["RUNNING"] * 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    # Follow: every line of job 0, and it stops by itself when the job has ended.
    assert ctl.main(["--registry", str(reg_path), "logs", "loc", "0", "--follow"]) == 0
    out = capsys.readouterr()
    assert [f"line {i}" for i in range(6)] == [
        line for line in out.out.splitlines() if line.startswith("line")
    ]
    assert "job 0 COMPLETED" in out.err

    assert ctl.main(["--registry", str(reg_path), "cancel", "loc", "1"]) == 0
    assert "cancelled 1 job(s)" in capsys.readouterr().out
    launcher.join(timeout=30)
    assert not launcher.is_alive()
    with Registry(reg_path) as r:  # the launcher saw the request: CANCELLED, not FAILED by SIGTERM
        assert [j.state for j in r.jobs("loc")] == [registry.COMPLETED, registry.CANCELLED]
    with Registry(reg_path) as r:
        job1 = r.jobs("loc", [1])[0]
        assert job1.state == "CANCELLED" and not registry.local_pids_alive(job1.handle, job1.run_dir)
    assert ctl.main(["--registry", str(reg_path), "logs", "loc", "1"]) == 0
    assert "line 0" in capsys.readouterr().out


TWO_RANKS = textwrap.dedent(
    """
    import os, sys, time
    if os.environ["RANK"] == "1":
        print("rank 1: the real cause", flush=True)
        os.kill(os.getpid(), 9) if sys.argv[1] == "killed" else sys.exit(3)
    time.sleep(0.5)  # rank 0 notices its peer is gone, as gloo does, and fails too
    print("rank 0: Connection closed by peer", flush=True)
    sys.exit(1)
    """
)


@pytest.mark.parametrize(("how", "code"), [("exit", 3), ("killed", -9)])
def test_a_failed_local_ddp_job_reports_the_rank_that_failed_first(tmp_path, how, code):
    """When one rank dies, the others fail after it in a collective. The report must show the first
    one's exit code and log, not rank 0's "peer closed" (a rank killed outright, e.g. by the OOM
    killer, included)."""
    from launcher.backends import local

    script = tmp_path / "ranks.py"
    script.write_text(TWO_RANKS)
    plan = make_plan(tmp_path, "ddp", 1, backend="local", commands=[[sys.executable, str(script), how]])
    plan.resource_groups[0][0]["tasks_per_node"] = 2
    (result,) = local.submit(plan, poll_s=2.0)
    assert (result.state, result.exit_code) == ("FAILED", code)
    assert result.log_path == plan.jobs[0].run_dir / "logs" / "rank1.log"
    assert "rank 1: the real cause" in result.log_tail and "peer" not in result.log_tail


def test_ctrl_c_on_a_local_sweep_stops_its_jobs_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from launcher.backends import local

    monkeypatch.setattr(sweep.snapshot, "attach", lambda plan: None)
    reg_path = tmp_path / "registry.sqlite"
    plan = local_plan(tmp_path, "ctrlc", [(1000, 0.1, 0), (1000, 0.1, 0)])

    def ctrl_c(seconds: float) -> None:  # the launcher's first wait between polls: Ctrl-C arrives
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "time", SimpleNamespace(sleep=ctrl_c, monotonic=time.monotonic))
    try:
        code = sweep.run_plan(plan, dry_run=False, wait=False, registry_file=str(reg_path))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C went up to the user as a traceback")
    assert code == 130
    out = capsys.readouterr().out
    assert out.rstrip().endswith("interrupted; continue the unfinished jobs with: vlaunch-ctl resume ctrlc")
    assert "exit code None" not in out
    with Registry(reg_path) as r:
        for job in r.jobs("ctrlc"):
            assert job.state == "CANCELLED" and not registry.local_pids_alive(job.handle, job.run_dir)


def test_sigterm_to_the_launcher_stops_its_local_jobs_like_ctrl_c(tmp_path, monkeypatch, capsys):
    """`kill <launcher>` (or a closed terminal) used to end the launcher and leave its jobs running,
    each in a session of its own; now they are stopped and recorded as on Ctrl-C."""
    import signal
    from types import SimpleNamespace

    from launcher.backends import local

    monkeypatch.setattr(sweep.snapshot, "attach", lambda plan: None)
    reg_path = tmp_path / "registry.sqlite"
    plan = local_plan(tmp_path, "term", [(1000, 0.1, 0), (1000, 0.1, 0)])
    before = signal.getsignal(signal.SIGTERM)

    def killed(seconds: float) -> None:  # the launcher's first wait between polls: `kill` arrives
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(seconds)

    monkeypatch.setattr(local, "time", SimpleNamespace(sleep=killed, monotonic=time.monotonic))
    code = sweep.run_plan(plan, dry_run=False, wait=False, registry_file=str(reg_path))
    assert code == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    assert out.rstrip().endswith(
        "stopped by SIGTERM; continue the unfinished jobs with: vlaunch-ctl resume term"
    )
    with Registry(reg_path) as r:
        for job in r.jobs("term"):
            assert job.state == "CANCELLED" and not registry.local_pids_alive(job.handle, job.run_dir)
    assert signal.getsignal(signal.SIGTERM) == before  # the launcher's own handler is gone again


def test_a_local_or_tpu_sweep_that_fails_to_start_leaves_no_job_pending(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.snapshot, "attach", lambda plan: None)
    reg_path = tmp_path / "registry.sqlite"
    plan = local_plan(tmp_path, "nostart", [(1, 0.1, 0), (1, 0.1, 0)])

    def staging_fails(*args, **kwargs):
        raise LaunchError("staging the code to gs://b/code.tar.gz failed: connection refused")

    monkeypatch.setattr(sweep, "run_local", staging_fails)
    with pytest.raises(LaunchError):
        sweep.run_plan(plan, dry_run=False, wait=False, registry_file=str(reg_path))
    with Registry(reg_path) as r:
        assert [j.state for j in r.jobs("nostart")] == [registry.FAILED_TO_SUBMIT] * 2


def test_resubmitting_a_tpu_sweep_stages_todays_code_and_a_failed_start_is_one_line(
    tmp_path, monkeypatch, capsys
):
    from launcher.results import JobResult

    reg_path = tmp_path / "registry.sqlite"
    plan = make_plan(tmp_path, "tpu1", 1)
    plan.backend = "tpu_pod"
    with Registry(reg_path) as r:
        record(r, plan)
        r.mark("tpu1", [0], registry.FAILED_TO_SUBMIT, error="staging failed")
    staged = []

    def run_tpu(plan, reg, num_of=None):  # the TPU backend stages plan.code_dir to the bucket
        staged.append(plan.code_dir)
        if len(staged) == 1:
            raise LaunchError("nothing answers at http://127.0.0.1:1 (backend.gcs_endpoint)")
        return [JobResult(0, "seed=0", "COMPLETED", 0)]

    monkeypatch.setattr(sweep, "run_tpu", run_tpu)
    ctl_args = ["--registry", str(reg_path), "resubmit", "tpu1", "--failed"]
    assert ctl.main(ctl_args) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: nothing answers at http://127.0.0.1:1 (backend.gcs_endpoint)"
    )
    with Registry(reg_path) as r:
        assert r.jobs("tpu1")[0].state == registry.FAILED_TO_SUBMIT  # not left PENDING
    assert ctl.main(ctl_args) == 0
    assert staged[0] is not None and (Path(staged[0]) / "launcher" / "ctl.py").is_file()


# --------------------------------------------------------------------------------- relaunch plans


def test_resubmit_plan_rebuilds_configs_resources_and_code_dir(reg, tmp_path):
    plan = make_plan(tmp_path, "s1", 5)
    plan.jobs[3].config["backend"] = dict(SLURM, partition="long")
    reg.record_sweep(plan, command_line="x", overrides=[], cwd="/", code_dir=str(tmp_path / "code"))
    jobs = reg.jobs("s1", [1, 3, 4])
    rebuilt, num_of = ctl.build_plan(
        reg, reg.sweep("s1"), jobs, code_dir=str(tmp_path / "code"), command_line="c"
    )
    # Numbered 0..n-1 as the Slurm backend indexes them, mapped back to the sweep's own numbers.
    assert [j.num for j in rebuilt.jobs] == [0, 1, 2] and num_of == {0: 1, 1: 3, 2: 4}
    assert [j.run_dir for j in rebuilt.jobs] == [plan.jobs[n].run_dir for n in (1, 3, 4)]
    assert [j.command for j in rebuilt.jobs] == [plan.jobs[n].command for n in (1, 3, 4)]
    assert rebuilt.jobs[1].config == plan.jobs[3].config and rebuilt.jobs[0].label == "seed=1"
    assert [(r["partition"], nums) for r, nums in rebuilt.resource_groups] == [
        ("debug", [0, 2]),
        ("long", [1]),
    ]
    assert rebuilt.code_dir == tmp_path / "code" and rebuilt.sweep_dir == plan.sweep_dir


def test_ctl_list_status_report_never_import_torch_or_jax(reg, tmp_path):
    plan = make_plan(tmp_path, "20250101-000000-aaaa", 2)
    record(reg, plan)
    reg.set_handles(plan.sweep_id, {0: "1_0", 1: "1_1"})
    reg.update(
        plan.sweep_id,
        [Observation(0, state="COMPLETED", exit_code=0), Observation(1, state="FAILED", exit_code=1)],
    )
    reg.close()
    out = tmp_path / "rep"
    code = f"""
import sys
from launcher import ctl
for args in (["list"], ["status", "latest"], ["report", "2025", "--out", {str(out)!r}], ["history", "latest", "1"]):
    assert ctl.main(["--registry", {str(reg.path)!r}, *args]) == 0, args
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "jax", "transformers"))
print("HEAVY", heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
    assert "1 COMPLETED, 1 FAILED" in proc.stdout  # list and status count states
    assert "FAILED (exit 1)" in proc.stdout and (out / "metrics.png").stat().st_size > 0


def test_resume_relaunches_unfinished_and_lost_jobs_from_the_submitted_code(tmp_path, capsys):
    reg_path = tmp_path / "registry.sqlite"
    plan = local_plan(tmp_path, "res", [(1, 0.01, 0), (1, 0.01, 0), (1, 0.01, 0)])
    code = tmp_path / "snapshot"
    code.mkdir()
    with Registry(reg_path) as r:
        r.record_sweep(plan, command_line="x", overrides=[], cwd="/", code_dir=str(code))
        # Job 0 completed; job 1 failed; job 2 was recorded but its launcher died before starting it.
        r.update(
            "res",
            [Observation(0, state="COMPLETED", exit_code=0), Observation(1, state="FAILED", exit_code=9)],
        )
    for job in plan.jobs:
        sweep.write_job_config(job)
    assert ctl.main(["--registry", str(reg_path), "resume", "res"]) == 0
    assert "resuming 2 job(s) with the code it was submitted with" in capsys.readouterr().out
    with Registry(reg_path) as r:
        assert [(j.state, j.exit_code) for j in r.jobs("res")] == [("COMPLETED", 0)] * 3
        assert [e.kind for e in r.events("res", 0)] == ["state", "state"]  # job 0 left alone
        assert [e.kind for e in r.events("res", 2)] == ["state", "resubmit", "state", "state"]
    for num in (1, 2):
        assert f"cwd {code}" in (plan.jobs[num].run_dir / "logs" / "rank0.log").read_text()
    assert not (plan.jobs[0].run_dir / "logs").exists()


def test_a_registry_another_process_keeps_locked_is_one_line_and_nothing_is_recorded(tmp_path):
    """Before, the first write past the busy timeout ended the launch in sqlite3's traceback."""
    path = tmp_path / "registry.sqlite"
    Registry(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with Registry(path, busy_timeout_s=0.3) as r, pytest.raises(registry.RegistryError) as caught:
            record(r, make_plan(tmp_path, "locked", 1))
        assert str(caught.value) == (
            f"the registry {path} stayed locked for 0.3 s: another vlaunch process holds it; try again"
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with Registry(path) as r:
        assert r.sweeps() == []


def test_resume_says_a_job_starts_over_when_its_recorded_checkpoint_is_gone(tmp_path, capsys):
    """A run dir removed by hand (to free space, say): status and resume used to promise the checkpoint
    step the registry last saw, and the job then started from step 0."""
    reg_path = tmp_path / "registry.sqlite"
    plan = local_plan(tmp_path, "gone", [(1, 0.01, 0), (1, 0.01, 0)])
    kept = plan.jobs[1].run_dir / "checkpoints" / "ckpt_00000030.pth"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"x")
    lost = plan.jobs[0].run_dir / "checkpoints" / "ckpt_00000025.pth"
    with Registry(reg_path) as r:
        r.record_sweep(plan, command_line="x", overrides=[], cwd="/", code_dir=None)
        r.update(
            "gone",
            [
                Observation(0, state="CANCELLED", exit_code=130, checkpoint=str(lost)),
                Observation(1, state="CANCELLED", exit_code=130, checkpoint=str(kept)),
            ],
        )
    assert ctl.main(["--registry", str(reg_path), "status", "gone"]) == 0
    rows = capsys.readouterr().out.splitlines()[-2:]
    assert rows[0].rstrip().endswith("step 25 (gone)") and rows[1].rstrip().endswith("step 30"), rows
    for job in plan.jobs:
        sweep.write_job_config(job)
    assert ctl.main(["--registry", str(reg_path), "resume", "gone"]) == 0
    out = capsys.readouterr().out
    assert (
        f"job 0 (seed=0) was CANCELLED (exit 130): again from the start: its checkpoint {lost} is gone" in out
    )
    assert "job 1 (seed=1) was CANCELLED (exit 130): again from checkpoint step 30" in out

    shutil.rmtree(plan.sweep_dir)
    assert ctl.main(["--registry", str(reg_path), "logs", "gone", "0"]) == 2
    log = plan.jobs[0].run_dir / "logs" / "rank0.log"
    assert (
        capsys.readouterr().err.strip()
        == f"error: no log at {log}: the sweep's runs dir {plan.sweep_dir} is gone"
    )


def test_a_tpu_job_whose_launcher_was_killed_is_failed_with_the_reason_and_no_longer_left_alone(
    tmp_path, capsys
):
    """A TPU job lives in the launcher that runs it. While that process lives, its jobs are alive
    (resume leaves them alone); once it is killed (-9: it recorded nothing), status says FAILED and why."""
    reg_path = tmp_path / "registry.sqlite"
    plan = make_plan(tmp_path, "tpuk", 1)
    plan.backend = "tpu_pod"
    run_dir = plan.jobs[0].run_dir
    run_dir.mkdir(parents=True)
    with Registry(reg_path) as r:
        record(r, plan)
        r.update("tpuk", [Observation(num=0, state=registry.RUNNING, handle="vl-tpuk-0")])
    stand_in = subprocess.Popen(  # the launcher, as far as the registry can tell
        [
            sys.executable,
            "-c",
            "import sys, time; from launcher import registry\n"
            f"with registry.watching([{str(run_dir)!r}]):\n    print('watching', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert stand_in.stdout.readline() == "watching\n"
        assert registry.watcher(run_dir)[0] == "alive"
        assert ctl.main(["--registry", str(reg_path), "resume", "tpuk"]) == 0
        assert "1 job(s) still queued or running, left alone: [0]" in capsys.readouterr().out
    finally:
        stand_in.kill()
        stand_in.wait()
    assert registry.watcher(run_dir) == ("gone", json.loads((run_dir / registry.WATCHER_FILE).read_text()))
    assert ctl.main(["--registry", str(reg_path), "status", "tpuk", "--refresh"]) == 0
    out = capsys.readouterr().out
    assert "FAILED" in out, out
    assert f"job 0: the launcher that ran it (pid {stand_in.pid}) ended without recording how it ended" in out
    assert "its TPU vl-tpuk-0 may still exist" in out

    # Another machine's launcher (a shared home): nothing here can tell, so it is not declared dead.
    facts = {"pid": os.getpid(), "host": "login-2", "start": "1"}
    (run_dir / registry.WATCHER_FILE).write_text(json.dumps(facts))
    assert registry.watcher(run_dir) == ("elsewhere", facts)


DETACHED_LAUNCH = """
import pickle, sys
from launcher import sweep
sweep.snapshot.attach = lambda plan: None  # the jobs are stand-in scripts: no code snapshot
plan = pickle.loads(open(sys.argv[1], "rb").read())
sys.exit(sweep.run_plan(plan, dry_run=False, wait=False, detach=True, registry_file=sys.argv[2]))
"""


def test_detach_returns_at_once_and_a_job_cancelled_while_waiting_never_starts(tmp_path, capsys):
    """--detach on the local backend: the launch returns while its jobs run in a background launcher;
    vlaunch-ctl sees them alive (resume leaves them alone), and cancelling the job still waiting for a
    slot means it never starts, while the running one completes."""
    import pickle

    reg_path = tmp_path / "registry.sqlite"
    plan = local_plan(tmp_path, "det", [(60, 0.1, 0), (1, 0.1, 0)])  # job 0: 6 s, for the checks below
    plan.resource_groups[0][0]["max_parallel"] = 1  # job 1 waits for job 0's slot
    (tmp_path / "plan.pickle").write_bytes(pickle.dumps(plan))
    launch = subprocess.run(
        [sys.executable, "-c", DETACHED_LAUNCH, str(tmp_path / "plan.pickle"), str(reg_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert launch.returncode == 0, launch.stdout + launch.stderr
    assert "2 job(s) on local, run in the background by pid" in launch.stdout, launch.stdout
    assert "vlaunch-ctl cancel det" in launch.stdout
    with Registry(reg_path) as r:
        states = [j.state for j in r.jobs("det")]
    assert states[0] in (registry.PENDING, registry.RUNNING) and states[1] == registry.PENDING, states

    assert ctl.main(["--registry", str(reg_path), "resume", "det"]) == 0
    assert "2 job(s) still queued or running, left alone: [0, 1]" in capsys.readouterr().out
    assert ctl.main(["--registry", str(reg_path), "status", "det"]) == 0
    assert f"background launcher's output: {plan.sweep_dir / 'launcher.log'}" in capsys.readouterr().out
    assert ctl.main(["--registry", str(reg_path), "cancel", "det", "1"]) == 0
    run_dirs = [j.run_dir for j in plan.jobs]
    deadline = time.monotonic() + 60
    while registry.watcher(run_dirs[0])[0] == "alive":  # the background launcher ends with its jobs
        assert time.monotonic() < deadline, (plan.sweep_dir / "launcher.log").read_text()
        time.sleep(0.1)
    log = (plan.sweep_dir / "launcher.log").read_text()
    with Registry(reg_path) as r:
        assert [j.state for j in r.jobs("det")] == [registry.COMPLETED, registry.CANCELLED], log
    assert "job 1 (seed=1) cancelled before it started (vlaunch-ctl cancel)" in log
    assert not (run_dirs[1] / "logs").exists()  # never started
    assert not any((d / registry.WATCHER_FILE).exists() for d in run_dirs)

    # resume --detach: the cancelled job runs now, in the background again.
    resume = run_ctl("resume", "det", "--detach", registry_path=reg_path)
    assert resume.returncode == 0, resume.stdout + resume.stderr
    assert "1 job(s) on local, run in the background by pid" in resume.stdout, resume.stdout
    assert "vlaunch-ctl logs det 1 --follow" in resume.stdout
    deadline = time.monotonic() + 60
    with Registry(reg_path) as r:
        while r.jobs("det")[1].state != registry.COMPLETED:
            assert time.monotonic() < deadline, (plan.sweep_dir / "launcher.log").read_text()
            time.sleep(0.1)
    assert (run_dirs[1] / "metrics.json").exists()


def test_teardown_deletes_the_tpus_tpu_jobs_left_and_keeps_named_and_watched_ones(tmp_path, capsys):
    """vlaunch-ctl teardown: after a killed launcher (or teardown=keep), the sweep's own TPUs and
    queued resources go, through the real TPU client against the fake Cloud TPU API; a TPU the user
    named (backend.tpu_name) stays, and so do the jobs a living launcher still runs."""
    from infra.fake_tpu.server import FakeTpuConfig, FakeTpuServer
    from launcher.tpu.client import TpuClient, TpuSpec

    reg_path = tmp_path / "registry.sqlite"
    plan = make_plan(tmp_path, "tpt", 4)
    plan.backend = "tpu_pod"
    with FakeTpuServer(FakeTpuConfig()) as fake:
        client = TpuClient("p", "us-central2-b", endpoint=fake.url, poll_interval_s=0.02)
        tpu = {
            "name": "tpu_pod", "project": "p", "zone": "us-central2-b", "api_endpoint": fake.url,
            "accelerator_type": "v4-8", "runtime_version": "tpu-ubuntu2204-base", "capacity": "spot", "queued": False,
            "tpu_name": None, "poll_s": 0.05,
        }  # fmt: skip
        for job, over in zip(plan.jobs, [{}, {"queued": True}, {"tpu_name": "mine"}, {}], strict=True):
            job.config["backend"] = {**tpu, **over}
        client.create_node("vl-tpt-0", TpuSpec("v4-8", "tpu-ubuntu2204-base"))
        client.create_queued_resource("vl-tpt-1", TpuSpec("v4-8", "tpu-ubuntu2204-base", capacity="spot"))
        client.create_node("mine", TpuSpec("v4-8", "tpu-ubuntu2204-base"))
        client.create_node("vl-tpt-3", TpuSpec("v4-8", "tpu-ubuntu2204-base"))
        with Registry(reg_path) as r:
            record(r, plan)
        with registry.watching([plan.jobs[3].run_dir]):  # job 3: its launcher (this process) runs it
            assert ctl.main(["--registry", str(reg_path), "teardown", "tpt"]) == 0
        out = capsys.readouterr().out
        assert "left alone, a launcher still runs them (vlaunch-ctl cancel stops them" in out, out
        assert "job 0: TPU vl-tpt-0 deleted" in out and "job 1: queued resource vl-tpt-1 deleted" in out, out
        assert "job 2: TPU mine is yours (backend.tpu_name), kept" in out, out
        names = {n.name.rsplit("/", 1)[1] for n in client.list_nodes()}
        assert names == {"mine", "vl-tpt-3"}
        assert client.list_queued_resources() == []

        assert ctl.main(["--registry", str(reg_path), "teardown", "tpt", "0"]) == 0
        assert "job 0: no TPU vl-tpt-0 (deleted already, or never made)" in capsys.readouterr().out

    slurm = make_plan(tmp_path, "slu", 1)
    with Registry(reg_path) as r:
        record(r, slurm)
    assert ctl.main(["--registry", str(reg_path), "teardown", "slu"]) == 2
    assert "sweep slu ran on slurm: teardown deletes what TPU sweeps left behind" in capsys.readouterr().err
