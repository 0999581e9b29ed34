"""Code snapshots: a job runs the code that was submitted, not what the working tree holds later.

At submission the files of the git checkout that holds the launcher (tracked files plus untracked
files git does not ignore, as they are on disk: uncommitted edits included) are copied once into
`<runs_root>/.code/<digest>/`, where the digest is a sha256 of the file list and contents. The same
code submitted twice shares one snapshot; a changed file makes a new one. The copy is written to a
temporary directory and renamed, so a snapshot directory that exists is complete. Jobs run with
their working directory and the front of PYTHONPATH at the snapshot, so `python -m trainers.<family>`
(and everything it imports from this repository) comes from it, on the first start and on every
requeue. Stdlib only: the launcher imports this before submitting, and must stay fast.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

SNAPSHOTS = ".code"  # under runs_root: <runs_root>/.code/<digest>/

# The checkout holding this launcher: launcher/ and trainers/ sit side by side at its root.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> bytes | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def source_files(root: Path) -> list[str] | None:
    """Paths (relative, sorted) of what the user sees in the checkout at `root`; None if it is none.

    Tracked and untracked-but-not-ignored files that exist on disk: a tracked file deleted in the
    working tree is left out, as the user would not run it either.
    """
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.decode().strip()).resolve() != root.resolve():
        return None  # not a checkout, or the launcher is installed inside some other repository
    listed = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listed is None:
        return None
    names = sorted({n for n in listed.decode("utf-8", "surrogateescape").split("\0") if n})
    # Submodules (directories) are left out; symlinks are kept as links.
    return [n for n in names if (root / n).is_symlink() or (root / n).is_file()]


def digest(root: Path, files: list[str]) -> str:
    """sha256 of the file list, each file's executable bit and contents (symlinks: their target)."""
    h = hashlib.sha256()
    for name in files:
        path = root / name
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
        if path.is_symlink():
            h.update(b"l\0" + os.readlink(path).encode("utf-8", "surrogateescape"))
        else:
            executable = os.stat(path).st_mode & stat.S_IXUSR
            data = path.read_bytes()
            h.update(b"x\0" if executable else b"f\0")
            h.update(str(len(data)).encode() + b"\0" + data)
        h.update(b"\0")
    return h.hexdigest()


def take(runs_root: Path, root: Path = SOURCE_ROOT) -> Path | None:
    """The snapshot of the checkout at `root` under `runs_root`, made if missing; None without git."""
    files = source_files(root)
    if files is None:
        return None
    snapshots = Path(runs_root) / SNAPSHOTS
    target = snapshots / digest(root, files)
    if target.is_dir():
        return target
    snapshots.mkdir(parents=True, exist_ok=True)
    tmp = snapshots / f".tmp-{target.name[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        for name in files:
            src, dst = root / name, tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
                continue
            shutil.copyfile(src, dst)
            # Read-only: an edit by hand in the snapshot would silently change what jobs run.
            executable = os.stat(src).st_mode & stat.S_IXUSR
            os.chmod(dst, 0o555 if executable else 0o444)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent launcher that made the same snapshot first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def attach(plan) -> Path | None:
    """Snapshot the code for a sweep about to be submitted; sets and returns `plan.code_dir`.

    A plan that already names a snapshot keeps it (`ctl resume` re-running jobs with the code they
    were first submitted with). Without a git checkout there is nothing to snapshot: one warning
    line, and jobs run in place.
    """
    given = getattr(plan, "code_dir", None)
    if given and Path(given).is_dir():
        return Path(given)
    if given:
        print(f"warning: code snapshot {given} is gone; taking a new one of {SOURCE_ROOT}", file=sys.stderr)
    code_dir = take(plan.sweep_dir.parent, SOURCE_ROOT)
    if code_dir is None:
        print(
            f"warning: {SOURCE_ROOT} is not a git checkout: no code snapshot, jobs run the code in place "
            "(a job that starts or is requeued after an edit runs the edited code)",
            file=sys.stderr,
        )
    plan.code_dir = code_dir
    return code_dir


def run_env(code_dir: str | Path | None, env: dict[str, str]) -> dict[str, str]:
    """`env` for a process that runs from the snapshot: its PYTHONPATH starts with `code_dir`."""
    if not code_dir:
        return env
    rest = env.get("PYTHONPATH")
    return dict(env, PYTHONPATH=str(code_dir) + (os.pathsep + rest if rest else ""))
