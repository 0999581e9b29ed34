"""Training checkpoints that are either complete and loadable or invisible.

Each checkpoint is written to a temporary name in the same directory, flushed to disk, and
renamed into place (a rename is atomic on POSIX); the `latest` pointer is replaced the same way
afterwards. A save killed at any moment leaves the previous checkpoint as the latest.

The state saved by the trainers: model, optimizer, scheduler, grad scaler, step, epoch, and the
RNG states (python, numpy, torch, CUDA) so a resumed run continues the same random stream.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from trainers.core import storage

LATEST = "latest"
_NAME = re.compile(r"^ckpt_(\d+)\.pth$")
log = logging.getLogger("trainers")


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be read, or a checkpoint cannot be written."""


def write_failed(path: str | Path, reason: str, kept: str | None) -> CheckpointError:
    """The one-line error for checkpoint `path` (a file or a step dir, local or a URL) that could not be
    written: `reason`, the space left (local), and `kept`, the checkpoint that is still the latest."""
    then = (
        f"{kept} is still the latest: make room and resubmit the job to resume from it"
        if kept
        else "make room and resubmit the job (it starts over: no checkpoint was saved before this one)"
    )
    return CheckpointError(f"cannot write checkpoint {path}: {reason}{storage.free_space(path)}; {then}")


class _FirstWriteError:
    """A binary file that remembers the first OSError of its `write`: torch.save turns one into an
    unrelated RuntimeError ("unexpected pos 704 vs 598"), which would hide a full disk."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _fsync_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            recorder = _FirstWriteError(f)
            try:
                write(recorder)
            except Exception as e:
                if recorder.error is None or recorder.error is e:
                    raise
                raise recorder.error from e
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed write (full disk, an exception while pickling) leaves no partial file behind.
        # One killed outright leaves its temporary, which no listing ever matches.
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `ckpt_<step>.pth` atomically, point `latest` at it, keep the newest `keep` files."""
    import torch

    directory = Path(directory)
    path = directory / f"ckpt_{step:08d}.pth"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _fsync_write(path, lambda f: torch.save(state, f))
        _fsync_write(directory / LATEST, lambda f: f.write(path.name.encode()))
    except OSError as e:  # a full disk, a quota, a file size limit, a read-only filesystem
        kept = latest(directory)
        raise write_failed(path, e.strerror or str(e), kept.name if kept else None) from e
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            if old != path:  # never the one `latest` now names, even if a higher step lies around
                old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files never match the name pattern)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(directory: str | Path) -> Path | None:
    """The checkpoint `latest` names; failing that, the newest complete one; None if there is none."""
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.exists():
        name = pointer.read_text().strip()
        # Only a checkpoint name counts: an empty or foreign pointer must not name the directory itself.
        if _NAME.match(name) and (directory / name).is_file():
            return directory / name
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_latest(directory: str | Path, map_location: str = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that can be read, loaded: the one `latest` names, then the others newest first;
    None when there is none. One that cannot be read (cut short by a copy, a bad disk: saves themselves are
    atomic) is reported and the one before it is tried, so a run loses the steps since that one, not all.
    Raises CheckpointError, naming each file and its error, when checkpoints exist and none can be read:
    training from the start would overwrite them."""
    first = latest(directory)
    if first is None:
        return None
    others = [p for p in reversed(list_checkpoints(directory)) if p != first]
    errors = []
    for path in [first, *others]:
        try:
            return path, load(path, map_location)
        except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on a bad file
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            errors.append(f"{path.name}: {reason}")
            log.warning("checkpoint %s cannot be read (%s); trying the one before it", path, reason)
    raise CheckpointError(
        f"no checkpoint in {directory} can be read ({'; '.join(errors)}); move them away to train from the start"
    )


def find(source: str | os.PathLike) -> Path | None:
    """The latest checkpoint of a checkpoints directory or of a run directory (under checkpoints/);
    None when `source` is not a directory or holds none."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    for directory in (path, path / "checkpoints"):
        found = latest(directory)
        if found is not None:
            return found
    return None


def resolve(source: str | os.PathLike) -> Path:
    """A checkpoint file for a file, a checkpoints directory or a run directory (its latest checkpoint)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint, checkpoints directory or run directory")
        return path
    found = find(path)
    if found is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (ckpt_*.pth, directly or under checkpoints/)")
    return found


def load(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    import torch

    # Our own checkpoints hold optimizer/scheduler state and RNG tuples: not weights-only.
    return torch.load(path, map_location=map_location, weights_only=False)
