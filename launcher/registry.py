"""The experiment registry: every sweep and job the launcher submits, in one embedded SQLite file.

Where: `registry=` in the config, else `$VLAUNCH_REGISTRY`, else
`$XDG_DATA_HOME/vlaunch/registry.sqlite` (`~/.local/share/vlaunch/registry.sqlite`). The file is
created readable by its owner only (0600, its directory 0700 when we create it); SQLite gives the
`-wal`/`-shm` files the database's own permissions.

Only the submitting side opens it (the launcher and `vlaunch-ctl`): jobs on compute nodes never do,
since SQLite's locking is not to be trusted on shared filesystems. What happens on the nodes comes
back through Slurm (sacct, squeue) and through files the jobs write into their run dirs, which
`refresh` reads:

    metrics.json          final metrics ({"headline": {...}, "chance": {...}, ...})
    checkpoints/latest    the name of the latest committed checkpoint in that directory
    status/exit_code.rank<r>   the trainer's exit code per rank
    status/events.jsonl   one JSON object per line: {"time", "event": start|exit|requeue, "rank",
                          "attempt", "exit_code", "host"}; each attempt that was requeued counts once
    status/tracker.json   {"wandb_run_id": ...} once a tracker is on (trainers/core/tracking.py)

A local or TPU job runs under the launcher that started it (`python -m launcher`, in the foreground
or with --detach), which owns two more files in the run dir, on its own machine:

    launcher.json         {"pid", "host", "start"} of that launcher, from the launch until it returns
    cancel_requested      written by `vlaunch-ctl cancel`: that launcher stops the job (a TPU job's hosts
                          save a checkpoint, its TPU is torn down; a local job not started yet never
                          starts), records it CANCELLED and removes the file

Concurrency: WAL journal, a busy timeout, and every write in one `BEGIN IMMEDIATE` transaction (a
writer takes the write lock up front, so two launchers never deadlock upgrading a read lock). Eight
launchers recording at once only wait for each other.

Schema (version 1):

    sweeps      id TEXT PK (the sweep id printed by the launcher, also runs/<id>/), created REAL (unix
                time), name, command_line, overrides (JSON list, as typed), cwd, backend, git_commit,
                git_diff_sha256 (sha256 of `git diff HEAD`; NULL when clean or not in git), runs_dir
                (the sweep dir), code_dir (the code snapshot the jobs run; NULL: the working tree),
                refreshed REAL (last time Slurm was asked about this sweep; rate-limits sacct)
    jobs        sweep_id, num (UNIQUE together), label (the overrides that set it apart), overrides
                (JSON list), run_dir, command (JSON argv of the trainer), handle (Slurm job id
                `123_4`, local pids `4711,4712`, a TPU name later), state (Slurm's words plus
                SUBMITTING, FAILED_TO_SUBMIT), exit_code, requeues, checkpoint (path of the latest
                checkpoint), tracker_run_id, error (why a submission was refused), updated REAL,
                metrics (JSON), config (the resolved config JSON, = run_dir/config.yaml)
    job_events  id PK, sweep_id, num, time REAL, kind (`state`: a state change; `requeue`; `resubmit`:
                submitted again under a new handle), state (the state after the event), exit_code,
                handle, detail. A state event is written only when the state changes.

A job's life: SUBMITTING (recorded before anything is submitted) -> PENDING with its handle once the
backend accepted it, or FAILED_TO_SUBMIT with the backend's message -> RUNNING -> COMPLETED / FAILED /
CANCELLED / TIMEOUT / ... as Slurm (or the local backend) reports them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# States of our own, beside Slurm's.
SUBMITTING, PENDING, RUNNING, FAILED_TO_SUBMIT = "SUBMITTING", "PENDING", "RUNNING", "FAILED_TO_SUBMIT"
COMPLETED, FAILED, CANCELLED, TIMEOUT = "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"
# Ended: nothing will change unless someone submits the job again.
TERMINAL = {
    COMPLETED,
    FAILED,
    CANCELLED,
    TIMEOUT,
    FAILED_TO_SUBMIT,
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
}
# What `resubmit --failed` sends again.
FAILED_STATES = TERMINAL - {COMPLETED}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    name TEXT,
    command_line TEXT NOT NULL,
    overrides TEXT NOT NULL,
    cwd TEXT,
    backend TEXT NOT NULL,
    git_commit TEXT,
    git_diff_sha256 TEXT,
    runs_dir TEXT NOT NULL,
    code_dir TEXT,
    refreshed REAL
);
CREATE INDEX IF NOT EXISTS sweeps_created ON sweeps (created);
CREATE TABLE IF NOT EXISTS jobs (
    sweep_id TEXT NOT NULL REFERENCES sweeps (id),
    num INTEGER NOT NULL,
    label TEXT NOT NULL,
    overrides TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    command TEXT NOT NULL,
    handle TEXT,
    state TEXT NOT NULL,
    exit_code INTEGER,
    requeues INTEGER NOT NULL DEFAULT 0,
    checkpoint TEXT,
    tracker_run_id TEXT,
    error TEXT,
    updated REAL NOT NULL,
    metrics TEXT,
    config TEXT NOT NULL,
    UNIQUE (sweep_id, num)
);
CREATE INDEX IF NOT EXISTS jobs_handle ON jobs (handle);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY,
    sweep_id TEXT NOT NULL,
    num INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    state TEXT,
    exit_code INTEGER,
    handle TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events (sweep_id, num);
"""

# Columns of `jobs` read for tables (the big JSON config is left on disk unless asked for).
_JOB_COLUMNS = (
    "num, label, overrides, run_dir, command, handle, state, exit_code, requeues, checkpoint, "
    "tracker_run_id, error, updated, metrics"
)


class RegistryError(Exception):
    """A registry problem the user can fix (an unknown sweep id, a file that cannot be opened)."""


def default_path() -> Path:
    """`$VLAUNCH_REGISTRY`, else `$XDG_DATA_HOME/vlaunch/registry.sqlite` (XDG: ~/.local/share)."""
    if os.environ.get("VLAUNCH_REGISTRY"):
        return Path(os.environ["VLAUNCH_REGISTRY"]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "vlaunch" / "registry.sqlite"


def git_facts(repo: Path) -> tuple[str | None, str | None]:
    """(HEAD commit, sha256 of `git diff HEAD` or None when clean) of the repo at `repo`; Nones outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if head.returncode != 0:
            return None, None
        diff = subprocess.run(["git", "-C", str(repo), "diff", "HEAD"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    digest = hashlib.sha256(diff.stdout).hexdigest() if diff.returncode == 0 and diff.stdout else None
    return head.stdout.strip() or None, digest


# ------------------------------------------------------------------------------------------ rows


@dataclass
class Sweep:
    id: str
    created: float
    name: str | None
    command_line: str
    overrides: list[str]
    cwd: str | None
    backend: str
    git_commit: str | None
    git_diff_sha256: str | None
    runs_dir: str
    code_dir: str | None
    refreshed: float | None


@dataclass
class Job:
    num: int
    label: str
    overrides: list[str]
    run_dir: str
    command: list[str]
    handle: str | None
    state: str
    exit_code: int | None
    requeues: int
    checkpoint: str | None
    tracker_run_id: str | None
    error: str | None
    updated: float
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint_step(self) -> int | None:
        m = re.search(r"(\d+)", Path(self.checkpoint).name) if self.checkpoint else None
        return int(m.group(1)) if m else None

    @property
    def checkpoint_gone(self) -> bool:
        """The recorded checkpoint is a local file that no longer exists (its run dir was removed, say);
        one in a bucket is not looked up."""
        return bool(self.checkpoint) and "://" not in self.checkpoint and not Path(self.checkpoint).exists()


@dataclass
class Event:
    num: int
    time: float
    kind: str
    state: str | None
    exit_code: int | None
    handle: str | None
    detail: str | None


@dataclass
class Observation:
    """What is now known about one job; None fields leave the recorded value as it is."""

    num: int
    state: str | None = None
    exit_code: int | None = None
    handle: str | None = None
    requeue_events: list[dict[str, Any]] | None = None  # every requeue so far (from events.jsonl)
    checkpoint: str | None = None
    metrics: dict[str, Any] | None = None
    tracker_run_id: str | None = None
    error: str | None = None


def _sweep(row: sqlite3.Row) -> Sweep:
    values = dict(row)
    values["overrides"] = json.loads(values["overrides"])
    return Sweep(**values)


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["overrides"] = json.loads(values["overrides"])
    values["command"] = json.loads(values["command"])
    values["metrics"] = json.loads(values["metrics"]) if values["metrics"] else {}
    return Job(**values)


# ------------------------------------------------------------------------------------------ the file


class Registry:
    """One registry file. Cheap to open; every write is one transaction."""

    def __init__(self, path: str | Path | None = None, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path).expanduser() if path else default_path()
        self.busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None

    # -------------------------------------------------------------- connection

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        try:
            _make_private_dirs(self.path.parent)
            # Create the file ourselves so that it is 0600 from its first byte (sqlite would use 0644), and
            # only when it is missing: closing any descriptor of the file drops every POSIX lock this process
            # holds on it, among them the shared lock an open connection keeps. Without that lock another
            # process that closes its connection believes it is the last one and deletes the WAL this
            # process still writes to: its later commits are lost, or corrupt the file.
            if not self.path.exists():
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise RegistryError(f"cannot open the registry {self.path}: {e}") from None
        try:
            version = self._prepare(conn)
        except sqlite3.DatabaseError as e:  # not an SQLite file, a damaged one, locked for too long
            conn.close()
            if _busy(e):
                raise self._locked() from None
            raise RegistryError(
                f"cannot use the registry {self.path}: {e}; name another file with registry= or "
                "$VLAUNCH_REGISTRY (or move this one away to start an empty registry)"
            ) from None
        if version > SCHEMA_VERSION:
            conn.close()
            raise RegistryError(
                f"the registry {self.path} has schema version {version}; this vlaunch knows up to "
                f"{SCHEMA_VERSION}: upgrade vlaunch"
            )
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> int:
        """WAL mode, and the schema when the file is new; the file's schema version."""
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        _retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL"), self.busy_timeout_s)
        conn.execute("PRAGMA synchronous = NORMAL")  # durable at every checkpoint; safe in WAL mode
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            with self._write(conn):
                if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            version = SCHEMA_VERSION
        return version

    def _locked(self) -> RegistryError:
        return RegistryError(
            f"the registry {self.path} stayed locked for {self.busy_timeout_s:g} s: another vlaunch "
            "process holds it; try again"
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from its start."""
        conn = conn or self.conn
        try:
            _retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"), self.busy_timeout_s)
        except sqlite3.OperationalError as e:
            if _busy(e):
                raise self._locked() from None
            raise
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -------------------------------------------------------------- writes

    def record_sweep(
        self,
        plan: Any,
        *,
        command_line: str,
        overrides: list[str],
        cwd: str,
        git_commit: str | None = None,
        git_diff_sha256: str | None = None,
        code_dir: str | None = None,
        created: float | None = None,
    ) -> None:
        """The sweep and every job of a `SweepPlan`, state SUBMITTING, in one transaction."""
        now = time.time() if created is None else created
        jobs = plan.jobs
        name = jobs[0].config.get("job", {}).get("name") if jobs else None
        encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
        job_rows = [
            (
                plan.sweep_id,
                j.num,
                j.label,
                encode(list(j.overrides)),
                str(j.run_dir),
                encode(list(j.command)),
                SUBMITTING,
                now,
                encode(j.config),
            )
            for j in jobs
        ]
        event_rows = [(plan.sweep_id, j.num, now, "state", SUBMITTING) for j in jobs]
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO sweeps (id, created, name, command_line, overrides, cwd, backend, git_commit,"
                    " git_diff_sha256, runs_dir, code_dir) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        plan.sweep_id,
                        now,
                        name,
                        command_line,
                        encode(list(overrides)),
                        cwd,
                        plan.backend,
                        git_commit,
                        git_diff_sha256,
                        str(plan.sweep_dir),
                        code_dir,
                    ),
                )
                conn.executemany(
                    "INSERT INTO jobs (sweep_id, num, label, overrides, run_dir, command, state, updated, config)"
                    " VALUES (?,?,?,?,?,?,?,?,?)",
                    job_rows,
                )
                conn.executemany(
                    "INSERT INTO job_events (sweep_id, num, time, kind, state) VALUES (?,?,?,?,?)", event_rows
                )
        except sqlite3.IntegrityError:
            raise RegistryError(
                f"sweep {plan.sweep_id} is already in the registry {self.path}; give another sweep_id="
            ) from None

    def update(
        self,
        sweep_id: str,
        observations: Iterable[Observation],
        *,
        kind: str = "state",
        detail: str | None = None,
        now: float | None = None,
    ) -> list[Observation]:
        """Apply what is now known about jobs of a sweep, in one transaction.

        A `state` event is written only for a job whose state changed (`kind="resubmit"` writes one
        for every observation that brings a new handle); one `requeue` event per requeue not yet
        recorded. Returns the observations that changed a state.
        """
        observations = list(observations)
        if not observations:
            return []
        now = time.time() if now is None else now
        changed: list[Observation] = []
        with self._write() as conn:
            current = {
                row["num"]: row
                for row in conn.execute(
                    "SELECT num, state, handle, exit_code, requeues, error FROM jobs WHERE sweep_id = ?",
                    (sweep_id,),
                )
            }
            updates, events = [], []
            for ob in observations:
                row = current.get(ob.num)
                if row is None:
                    raise RegistryError(f"sweep {sweep_id} has no job {ob.num}")
                state = ob.state or row["state"]
                handle = ob.handle or row["handle"]
                same = state == row["state"]
                # A new state brings its own exit code and error (None: not known yet / none).
                exit_code = ob.exit_code if ob.exit_code is not None else (row["exit_code"] if same else None)
                error = ob.error if ob.error is not None else (row["error"] if same else None)
                requeues = row["requeues"]
                if ob.requeue_events is not None and len(ob.requeue_events) > requeues:
                    for e in ob.requeue_events[requeues:]:
                        note = f"attempt {e.get('attempt')} on {e.get('host')}" if e.get("host") else None
                        if e.get("reason"):  # a TPU job's: why, and on which TPU
                            note = f"{e['reason']}, TPU {e.get('tpu')}"
                        events.append(
                            (sweep_id, ob.num, float(e.get("time") or now), "requeue", state,
                             e.get("exit_code"), handle, note)
                        )  # fmt: skip
                    requeues = len(ob.requeue_events)
                new_handle = ob.handle is not None and ob.handle != row["handle"]
                if state != row["state"] or (kind != "state" and new_handle):
                    events.append((sweep_id, ob.num, now, kind, state, exit_code, handle, detail or ob.error))
                    changed.append(ob)
                updates.append(
                    (
                        state,
                        handle,
                        exit_code,
                        requeues,
                        ob.checkpoint,
                        None if ob.metrics is None else json.dumps(ob.metrics),
                        ob.tracker_run_id,
                        error,
                        now,
                        sweep_id,
                        ob.num,
                    )
                )
            conn.executemany(
                "UPDATE jobs SET state = ?, handle = ?, exit_code = ?, requeues = ?,"
                " checkpoint = COALESCE(?, checkpoint), metrics = COALESCE(?, metrics),"
                " tracker_run_id = COALESCE(?, tracker_run_id), error = ?, updated = ?"
                " WHERE sweep_id = ? AND num = ?",
                updates,
            )
            conn.executemany(
                "INSERT INTO job_events (sweep_id, num, time, kind, state, exit_code, handle, detail)"
                " VALUES (?,?,?,?,?,?,?,?)",
                events,
            )
        return changed

    def set_handles(self, sweep_id: str, handles: dict[int, str], state: str = PENDING, **kw) -> None:
        """The backend accepted the jobs: their handles, and the state they are in now."""
        self.update(sweep_id, [Observation(num=n, state=state, handle=h) for n, h in handles.items()], **kw)

    def mark(self, sweep_id: str, nums: Iterable[int], state: str, *, error: str | None = None, **kw) -> None:
        self.update(sweep_id, [Observation(num=n, state=state, error=error) for n in nums], **kw)

    def set_refreshed(self, sweep_id: str, when: float) -> None:
        with self._write() as conn:
            conn.execute("UPDATE sweeps SET refreshed = ? WHERE id = ?", (when, sweep_id))

    # -------------------------------------------------------------- reads

    def sweeps(self, limit: int = 20) -> list[Sweep]:
        """The newest sweeps first."""
        rows = self.conn.execute("SELECT * FROM sweeps ORDER BY created DESC, id DESC LIMIT ?", (limit,))
        return [_sweep(r) for r in rows]

    def state_counts(self, sweep_ids: list[str]) -> dict[str, dict[str, int]]:
        """{sweep id: {state: number of jobs}}."""
        counts: dict[str, dict[str, int]] = {s: {} for s in sweep_ids}
        for sweep_id in sweep_ids:  # one indexed range scan each: fast in a registry of any size
            for row in self.conn.execute(
                "SELECT state, count(*) FROM jobs WHERE sweep_id = ? GROUP BY state", (sweep_id,)
            ):
                counts[sweep_id][row[0]] = row[1]
        return counts

    def sweep(self, sweep_id: str) -> Sweep:
        row = self.conn.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
        if row is None:
            raise RegistryError(self._unknown(sweep_id))
        return _sweep(row)

    def resolve(self, ref: str) -> Sweep:
        """A sweep by id, unique id prefix, or `latest`."""
        if ref == "latest":
            newest = self.sweeps(limit=1)
            if not newest:
                raise RegistryError(f"the registry {self.path} holds no sweeps yet")
            return newest[0]
        # A range scan on the primary key: prefix match without LIKE's full scan.
        upper = ref[:-1] + chr(ord(ref[-1]) + 1) if ref else "\U0010ffff"
        rows = self.conn.execute(
            "SELECT * FROM sweeps WHERE id >= ? AND id < ? ORDER BY id LIMIT 6", (ref, upper)
        ).fetchall()
        exact = [r for r in rows if r["id"] == ref]
        if exact:
            return _sweep(exact[0])
        if len(rows) == 1:
            return _sweep(rows[0])
        if not rows:
            raise RegistryError(self._unknown(ref))
        ids = ", ".join(r["id"] for r in rows[:5])
        raise RegistryError(f"sweep id prefix '{ref}' is ambiguous: it matches {ids}; give more of it")

    def _unknown(self, ref: str) -> str:
        newest = [s.id for s in self.sweeps(limit=5)]
        if not newest:
            return f"no sweep '{ref}': the registry {self.path} holds no sweeps yet"
        return f"no sweep '{ref}' in the registry {self.path}; the newest are: {', '.join(newest)}"

    def jobs(self, sweep_id: str, nums: Iterable[int] | None = None) -> list[Job]:
        rows = self.conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE sweep_id = ? ORDER BY num", (sweep_id,)
        ).fetchall()
        jobs = [_job(r) for r in rows]
        if nums is not None:
            wanted = set(nums)
            missing = sorted(wanted - {j.num for j in jobs})
            if missing:
                raise RegistryError(
                    f"sweep {sweep_id} has no job {', '.join(map(str, missing))}; its jobs are 0-{len(jobs) - 1}"
                )
            jobs = [j for j in jobs if j.num in wanted]
        return jobs

    def configs(self, sweep_id: str, nums: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The resolved configs of some jobs (what their config.yaml holds)."""
        wanted = set(nums)
        rows = self.conn.execute("SELECT num, config FROM jobs WHERE sweep_id = ?", (sweep_id,))
        return {r["num"]: json.loads(r["config"]) for r in rows if r["num"] in wanted}

    def events(self, sweep_id: str, num: int | None = None) -> list[Event]:
        """The history of a sweep's jobs (or of one job), oldest first."""
        query = "SELECT num, time, kind, state, exit_code, handle, detail FROM job_events WHERE sweep_id = ?"
        args: tuple = (sweep_id,)
        if num is not None:
            query, args = query + " AND num = ?", (sweep_id, num)
        rows = self.conn.execute(query + " ORDER BY id", args)
        return [Event(**dict(r)) for r in rows]


def _make_private_dirs(directory: Path) -> None:
    """Create missing directories 0700 (existing ones are left as they are)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)


def _busy(error: sqlite3.Error) -> bool:
    """SQLite's `database is locked` / `database is busy`: another connection holds the lock."""
    return "locked" in str(error) or "busy" in str(error)


def _retry_busy(step: Callable[[], Any], timeout_s: float) -> Any:
    """Run a statement SQLite may refuse with `database is locked` before its busy handler applies."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            if not _busy(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


# ------------------------------------------------------------------------------------------ facts


@dataclass
class RunDirFacts:
    """What a job wrote into its run dir."""

    metrics: dict[str, Any] | None = None
    checkpoint: str | None = None
    exit_codes: dict[int, int] = field(default_factory=dict)  # rank -> code, first written first
    requeue_events: list[dict[str, Any]] = field(default_factory=list)
    tracker_run_id: str | None = None

    @property
    def exit_code(self) -> int | None:
        """The code of the rank that failed first, 0 if every rank ended well, None if none ended."""
        failed = [c for c in self.exit_codes.values() if c]
        if failed:
            return failed[0]
        return 0 if self.exit_codes else None


def read_run_dir(run_dir: str | Path) -> RunDirFacts:
    """Read the files a job writes (every one may be missing: a job that never started writes none)."""
    run_dir = Path(run_dir)
    facts = RunDirFacts()
    with contextlib.suppress(OSError, ValueError):
        facts.metrics = json.loads((run_dir / "metrics.json").read_text())
    with contextlib.suppress(OSError):
        name = (run_dir / "checkpoints" / "latest").read_text().strip()
        if name and "/" not in name:
            facts.checkpoint = str(run_dir / "checkpoints" / name)
        elif "://" in name:  # a checkpoint in a bucket (TPU jobs): its URL
            facts.checkpoint = name
    status = run_dir / "status"
    found = []
    with contextlib.suppress(OSError):
        for f in status.glob("exit_code.rank*"):
            with contextlib.suppress(OSError, ValueError):
                found.append(
                    (f.stat().st_mtime, int(f.name.removeprefix("exit_code.rank")), int(f.read_text()))
                )
    facts.exit_codes = {rank: code for _, rank, code in sorted(found)}
    facts.requeue_events = read_requeues(status / "events.jsonl")
    with contextlib.suppress(OSError, ValueError, AttributeError):
        facts.tracker_run_id = json.loads((status / "tracker.json").read_text()).get("wandb_run_id")
    return facts


def read_requeues(path: Path) -> list[dict[str, Any]]:
    """The requeue events of events.jsonl, one per attempt (every rank may write its own), by time."""
    try:
        text = path.read_text()
    except OSError:
        return []
    by_attempt: dict[Any, dict[str, Any]] = {}
    for n, line in enumerate(text.splitlines()):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written as we read
        if not isinstance(event, dict) or event.get("event") != "requeue":
            continue
        key = event.get("attempt", f"line{n}")
        by_attempt.setdefault(key, event)
    return sorted(by_attempt.values(), key=lambda e: float(e.get("time") or 0))


def local_pids_alive(handle: str | None, run_dir: str) -> list[int]:
    """The pids of a local job's handle that still run that job (a reused pid runs something else)."""
    alive = []
    for part in (handle or "").split(","):
        if not part.strip().isdigit():
            continue
        pid = int(part)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(Path(run_dir) / "config.yaml").encode() in cmdline:
            alive.append(pid)
    return alive


WATCHER_FILE = "launcher.json"
CANCEL_FILE = "cancel_requested"


def _process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot): a pid's identity, as pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22; the command name may hold spaces


@contextlib.contextmanager
def watching(run_dirs: Iterable[Path]) -> Iterator[None]:
    """Mark these TPU jobs' run dirs as watched by this process for as long as the block runs."""
    import socket

    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}
    files = [Path(d) / WATCHER_FILE for d in run_dirs]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(me) + "\n")
    try:
        yield
    finally:
        for f in files:
            f.unlink(missing_ok=True)


def request_cancel(run_dir: str | Path) -> None:
    """Ask the launcher running this job to stop it (`vlaunch-ctl cancel`)."""
    try:
        (Path(run_dir) / CANCEL_FILE).write_text(f"{time.time()}\n")
    except OSError:
        pass  # its run dir is gone: no launcher can be running it


def cancel_requested(run_dir: str | Path, *, take: bool = False) -> bool:
    """Whether `vlaunch-ctl cancel` asked for this job; `take`: the launcher acts on it now, so the
    request is removed (a later run of the job must not see it)."""
    request = Path(run_dir) / CANCEL_FILE
    if not request.exists():
        return False
    if take:
        request.unlink(missing_ok=True)
    return True


def watched(run_dir: str | Path) -> bool:
    """Whether a launcher still runs this job (here, or on another host where we cannot tell)."""
    return watcher(run_dir)[0] in ("alive", "elsewhere")


def watcher(run_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """Who watches a TPU job: ("alive" | "gone" | "elsewhere" (another host: cannot tell) | "none",
    the launcher's {"pid", "host", "start"})."""
    import socket

    try:
        facts = json.loads((Path(run_dir) / WATCHER_FILE).read_text())
        pid = int(facts["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return "none", {}
    if facts.get("host") != socket.gethostname():
        return "elsewhere", facts
    return ("alive" if _process_start(pid) == facts.get("start") else "gone"), facts


def slurm_array_ids(jobs: Iterable[Job]) -> list[str]:
    """The Slurm arrays (or plain job ids) behind the handles of some jobs."""
    return sorted({j.handle.split("_")[0] for j in jobs if j.handle})


def slurm_state(
    states: dict[str, tuple[str, int | None]], handle: str | None
) -> tuple[str, int | None] | None:
    """A job's (state, exit code) in a query_states answer. sacct accounts an array none of whose
    tasks ever started (held, cancelled while pending) under the bare array id: that one then."""
    if not handle:
        return None
    return states.get(handle) or states.get(handle.split("_")[0])


def squeue_states(array_ids: list[str]) -> dict[str, tuple[str, int | None]]:
    """{job id: (state, None)} of the queued jobs of some arrays (array tasks one by one)."""
    from launcher.backends.slurm import squeue_states

    return squeue_states(array_ids)


QueryStates = Callable[[list[str]], dict[str, tuple[str, int | None]]]


def refresh(
    registry: Registry,
    sweep: Sweep,
    *,
    force: bool = False,
    max_age_s: float = 10.0,
    query_states: QueryStates | None = None,
    now: float | None = None,
) -> bool:
    """Bring a sweep's jobs up to date: one batched sacct call for all its arrays (squeue for the jobs
    sacct does not know yet or calls pending), then the files its jobs wrote. Skipped when the last
    refresh is younger than `max_age_s` (unless `force`) or when every job has ended and was read
    after it ended.
    Returns whether it refreshed."""
    now = time.time() if now is None else now
    if not force and sweep.refreshed is not None and now - sweep.refreshed < max_age_s:
        return False
    jobs = registry.jobs(sweep.id)
    # Ended and already read since: nothing can change (until a resubmission, which resets state).
    stale = [j for j in jobs if j.state not in TERMINAL or j.updated > (sweep.refreshed or 0)]
    if not stale:
        return False
    states: dict[str, tuple[str, int | None]] = {}
    if sweep.backend == "slurm":
        active = [j for j in stale if j.state not in TERMINAL and j.handle]
        if active:
            if query_states is None:
                from launcher.backends.slurm import query_states
            states = query_states(slurm_array_ids(active))
            # sacct learns of held, just-submitted and just-started jobs late (it can still say PENDING
            # of a job the controller runs): for those the queue's live view wins.
            lagging = [j for j in active if (slurm_state(states, j.handle) or (PENDING,))[0] == PENDING]
            if lagging:
                states.update(squeue_states(slurm_array_ids(lagging)))
    observations = []
    for job in stale:
        facts = read_run_dir(job.run_dir)
        ob = Observation(
            num=job.num,
            requeue_events=facts.requeue_events,
            checkpoint=facts.checkpoint,
            metrics=facts.metrics,
            tracker_run_id=facts.tracker_run_id,
        )
        known = slurm_state(states, job.handle) if sweep.backend == "slurm" else None
        if known is not None and job.state not in TERMINAL:
            ob.state, ob.exit_code = known
            if ob.state in TERMINAL and ob.state != COMPLETED and not ob.exit_code:
                ob.exit_code = facts.exit_code or ob.exit_code  # the trainer's own, as the launcher shows it
        elif (
            sweep.backend == "local"
            and job.state == RUNNING
            and not local_pids_alive(job.handle, job.run_dir)
        ):
            # The launcher that ran it is gone (killed): its outcome is in the run dir or nowhere.
            ob.state = COMPLETED if facts.metrics else FAILED
            ob.exit_code = facts.exit_code
        elif job.state not in TERMINAL and sweep.backend != "slurm":
            seen, launcher = watcher(job.run_dir)
            if seen == "gone" and not local_pids_alive(
                job.handle, job.run_dir
            ):  # killed: it never recorded the end (a TPU's hosts stop with its ssh)
                ob.state = FAILED
                ob.error = (
                    f"the launcher that ran it (pid {launcher['pid']}) ended without recording how it "
                    f"ended; vlaunch-ctl resume {sweep.id} continues it from its checkpoint"
                    + (
                        f"; its TPU {job.handle} may still exist (vlaunch-ctl teardown {sweep.id} deletes it)"
                        if job.handle and sweep.backend != "local"
                        else ""
                    )
                )
        observations.append(ob)
    registry.update(sweep.id, observations, now=now)
    registry.set_refreshed(sweep.id, now)
    return True
