"""Code snapshots: what a job runs is the code as it was at submission, whatever happens to the tree.

Each test builds a small git checkout of its own (never the repository under test), snapshots it,
changes it, and checks the snapshot and the process a job starts from it.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher import snapshot
from launcher.task import TrainerTask


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def repo(tmp_path) -> Path:
    """A checkout with committed, uncommitted, untracked, ignored and executable files."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "mod.py").write_text("VERSION = 'committed'\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / ".gitignore").write_text("ignored/\n*.log\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    (root / "pkg" / "mod.py").write_text("VERSION = 'edited, not committed'\n")
    (root / "pkg" / "new.py").write_text("NEW = 1\n")  # untracked, not ignored
    (root / "ignored").mkdir()
    (root / "ignored" / "big.bin").write_bytes(b"x" * 1000)
    (root / "train.log").write_text("noise\n")
    return root


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_snapshot_holds_what_the_user_sees_and_nothing_ignored(repo, tmp_path):
    code = snapshot.take(tmp_path / "runs", repo)
    assert code is not None and code.parent == tmp_path / "runs" / snapshot.SNAPSHOTS
    assert files_under(code) == {".gitignore", "run.sh", "pkg/__init__.py", "pkg/mod.py", "pkg/new.py"}
    assert (code / "pkg" / "mod.py").read_text() == "VERSION = 'edited, not committed'\n"
    assert os.stat(code / "run.sh").st_mode & stat.S_IXUSR
    assert not os.access(code / "pkg" / "mod.py", os.W_OK) or os.geteuid() == 0
    assert not os.stat(code / "pkg" / "mod.py").st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def test_snapshot_is_content_addressed_and_made_once(repo, tmp_path):
    runs = tmp_path / "runs"
    first = snapshot.take(runs, repo)
    assert first is not None
    marker = first / "pkg" / "__init__.py"
    before = marker.stat().st_ino
    assert snapshot.take(runs, repo) == first
    assert marker.stat().st_ino == before, "an existing snapshot was copied again"
    # The same files elsewhere (another clone) address the same snapshot.
    clone = tmp_path / "clone"
    subprocess.run(["cp", "-a", str(repo), str(clone)], check=True)
    assert snapshot.take(runs, clone) == first
    # Only finished snapshots are left: no temporary directories.
    assert [p.name for p in (runs / snapshot.SNAPSHOTS).iterdir()] == [first.name]


def test_editing_the_tree_after_submission_leaves_the_snapshot_alone(repo, tmp_path):
    runs = tmp_path / "runs"
    submitted = snapshot.take(runs, repo)
    (repo / "pkg" / "mod.py").write_text("VERSION = 'edited after submission'\n")
    (repo / "pkg" / "new.py").unlink()
    (repo / "pkg" / "later.py").write_text("LATER = 1\n")
    assert (submitted / "pkg" / "mod.py").read_text() == "VERSION = 'edited, not committed'\n"
    assert (submitted / "pkg" / "new.py").exists() and not (submitted / "pkg" / "later.py").exists()
    resubmitted = snapshot.take(runs, repo)
    assert resubmitted != submitted
    assert (resubmitted / "pkg" / "mod.py").read_text() == "VERSION = 'edited after submission'\n"
    # A change of the executable bit alone is a change of the code too.
    (repo / "run.sh").chmod(0o644)
    assert snapshot.take(runs, repo) not in (submitted, resubmitted)


def test_job_runs_from_the_snapshot_not_the_edited_tree(repo, tmp_path, capfd, monkeypatch):
    """TrainerTask (what each Slurm task runs) starts the command in the snapshot, first on its
    PYTHONPATH, so `python -m` and imports find the submitted code after the tree was edited."""
    code = snapshot.take(tmp_path / "runs", repo)
    (repo / "pkg" / "mod.py").write_text("VERSION = 'edited after submission'\n")
    monkeypatch.chdir(repo)  # where the launcher (and submitit) ran
    monkeypatch.setenv("PYTHONPATH", str(repo))
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    probe = "import os, sys, pkg.mod; print('cwd', os.getcwd()); print('path0', sys.path[1]); print(pkg.mod.VERSION)"
    run_dir = tmp_path / "run"
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    try:
        assert TrainerTask([sys.executable, "-c", probe], str(run_dir), str(code))() == 0
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    out = capfd.readouterr().out
    assert f"cwd {code}" in out, out
    assert f"path0 {code}" in out, out  # PYTHONPATH: the snapshot first, then what was there
    assert "edited, not committed" in out and "after submission" not in out, out
    events = (run_dir / "status" / "events.jsonl").read_text().splitlines()
    assert [e.split('"event": ')[1].split(",")[0] for e in events] == ['"start"', '"exit"'], events


def test_without_git_there_is_no_snapshot_and_one_warning(tmp_path, capsys, monkeypatch):
    plain = tmp_path / "plain"
    (plain / "pkg").mkdir(parents=True)
    (plain / "pkg" / "mod.py").write_text("")
    assert snapshot.take(tmp_path / "runs", plain) is None
    assert not (tmp_path / "runs").exists()

    monkeypatch.setattr(snapshot, "SOURCE_ROOT", plain)
    plan = SimpleNamespace(sweep_dir=tmp_path / "runs" / "sweep", code_dir=None)
    assert snapshot.attach(plan) is None and plan.code_dir is None
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a git checkout" in err, err


def test_a_checkout_that_only_contains_the_launcher_is_not_snapshotted(repo, tmp_path):
    """Installed inside some other repository (e.g. a venv in a project): that repo is not our code."""
    inner = repo / "site" / "vlaunch"
    inner.mkdir(parents=True)
    assert snapshot.take(tmp_path / "runs", inner) is None


def test_a_plan_that_names_its_snapshot_keeps_it(repo, tmp_path, monkeypatch):
    """`ctl resume` sets the snapshot the jobs were first submitted with; attach does not replace it."""
    original = snapshot.take(tmp_path / "runs", repo)
    (repo / "pkg" / "mod.py").write_text("VERSION = 'edited since'\n")
    monkeypatch.setattr(snapshot, "SOURCE_ROOT", repo)
    plan = SimpleNamespace(sweep_dir=tmp_path / "runs" / "sweep", code_dir=original)
    assert snapshot.attach(plan) == original and plan.code_dir == original
    fresh = SimpleNamespace(sweep_dir=tmp_path / "runs" / "sweep", code_dir=None)
    assert snapshot.attach(fresh) not in (None, original)
