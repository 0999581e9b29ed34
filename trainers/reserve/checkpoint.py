"""Orbax checkpoints of the Reserve trainer, in a local directory or on gs://.

A checkpoint is one step directory `<output>/checkpoints/<step>` holding `state` (params and optimizer
state: global jax.Arrays, written by every process, each its own shards) and `meta` (JSON: step, epoch,
loss). Only committed steps count: on gs:// Orbax writes `commit_success.txt` last, locally it renames a
temporary directory; a step directory without that (a save cut short) is invisible to `latest_step`.

Saving is asynchronous: `save` returns once the arrays are copied off the devices, and the upload runs
in background threads while training goes on; `wait` blocks until every started save is committed.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import re
import threading
from typing import Any

import orbax.checkpoint as ocp

from trainers.core.checkpoint import CheckpointError, write_failed

log = logging.getLogger("trainers.reserve.checkpoint")
NOTICE_EVERY_S = 60.0  # a save or wait blocked this long logs a warning, and again every as long

# How Orbax (through tensorstore) reports a write the filesystem or the bucket refused: a status code,
# and for a local file the OS's reason before the errno (`...: No space left on device [os_error_code=..`).
_STORE_ERROR = re.compile(
    r"^(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED): |\[os_error_code="
)
_OS_REASON = re.compile(r"([^:\]]+?) \[os_error_code=")


class Checkpointer:
    def __init__(
        self, directory: str, keep: int = 2, asynchronous: bool = True, read_only: bool = False
    ) -> None:
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=asynchronous,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # a save cut short (a full disk, a kill) takes no room
        )
        self.manager = ocp.CheckpointManager(directory, options=options)
        self._in_flight: int | None = None  # the step of the save started last, until it is committed
        self._failed: CheckpointError | None = None

    def latest_step(self) -> int | None:
        """The newest committed step (None when there is none)."""
        self._reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self._reload()
        return list(self.manager.all_steps())

    def _reload(self) -> None:
        # The steps as the directory has them, once no save is in flight: a save's background thread
        # deletes the steps past `keep` after it commits, and a reload while it does read a step being
        # deleted back in, which the next save then deleted again and failed on (FileNotFoundError).
        self.wait()
        self.manager.reload()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving `state` (a pytree of global jax.Arrays) at `step`; returns before the upload ends.
        Raises CheckpointError when this save, or the one before it, could not be written."""
        with self._write_errors(step):
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
            self._in_flight = step

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`; `abstract_state` gives every leaf's shape, dtype and sharding."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])

    def delete(self, step: int) -> None:
        """Remove committed `step` (every process calls it: Orbax's primary host deletes, all sync)."""
        self.wait()
        self.manager.delete(step)

    def wait(self) -> None:
        """Block until every save started so far is committed (CheckpointError when one was not)."""
        if self._failed is not None:  # reported once already; Orbax has given up on that save
            return
        with self._write_errors(self._in_flight):
            self.manager.wait_until_finished()
        self._in_flight = None

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        done = threading.Event()
        pending = self._in_flight if self._in_flight is not None else step

        def notice() -> None:  # a store that is down is retried for many minutes: say so meanwhile
            waited = 0.0
            while not done.wait(NOTICE_EVERY_S):
                waited += NOTICE_EVERY_S
                log.warning(
                    "checkpoint step %s is still being written to %s after %.3g s: the storage is slow or "
                    "unreachable (it is retried)", pending, self.directory, waited,
                )  # fmt: skip

        threading.Thread(target=notice, name="checkpoint-notice", daemon=True).start()
        try:
            yield
        except Exception as e:
            message = str(e)
            if not (isinstance(e, OSError) or _STORE_ERROR.search(message)):
                raise
            # A background save that failed surfaces at the next call: `pending` names that save's step.
            self._failed = self._explain(pending, e)
            raise self._failed from None
        finally:
            done.set()

    def _explain(self, step: int | None, error: Exception) -> CheckpointError:
        found = _OS_REASON.search(str(error))
        if found:
            reason = found.group(1).strip()
        elif isinstance(error, OSError):
            reason = error.strerror or str(error)
        else:
            reason = str(error).splitlines()[0][:300]
        try:
            self.manager.reload()
            latest = self.manager.latest_step()
        except Exception:  # noqa: BLE001 - the message is what matters now
            latest = None
        kept = None if latest is None else f"step {latest}"
        return write_failed(posixpath.join(self.directory, str(step)), reason, kept)

    def close(self) -> None:
        if self._failed is not None:
            # Not closed: Orbax would raise the failed save's error again, and closing its event loop
            # while its writer threads still finish other arrays makes each print a traceback. The
            # process is about to end anyway.
            return
        with self._write_errors(self._in_flight):
            self.manager.close()


def resolve_resume_from(path: str) -> tuple[str, int]:
    """(checkpoints dir, step) for `trainer.resume_from`: a step dir `.../<step>`, or a checkpoints dir
    (its newest committed step). Raises FileNotFoundError naming what was looked for."""
    path = str(path).rstrip("/")
    name = posixpath.basename(path)
    if re.fullmatch(r"\d+", name):
        parent = posixpath.dirname(path)
        steps = Checkpointer(parent, read_only=True, asynchronous=False)
        if int(name) not in steps.all_steps():
            raise FileNotFoundError(
                f"trainer.resume_from={path}: step {name} is not a committed checkpoint in {parent}"
            )
        return parent, int(name)
    steps = Checkpointer(path, read_only=True, asynchronous=False)
    latest = steps.latest_step()
    if latest is None:
        raise FileNotFoundError(f"trainer.resume_from={path}: no committed checkpoint there")
    return path, latest


__all__ = ["CheckpointError", "Checkpointer", "resolve_resume_from"]
