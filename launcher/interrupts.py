"""Signals that stop the launcher's own work the way Ctrl-C does.

A launch that runs its jobs itself (local, TPU) or is in the middle of submitting them, and the TPU
scripts while they create a TPU, clean up on Ctrl-C (KeyboardInterrupt): jobs stopped at a checkpoint,
a half-made queued resource deleted. `signals_stop_jobs()` gives `kill` (SIGTERM) and a closed
terminal (SIGHUP) the same path, as a `Terminated` (a KeyboardInterrupt that knows its signal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the launcher is, so that it stops its jobs as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_stop_jobs():
    """While the launcher itself runs jobs (local, TPU) or submits them, `kill` (SIGTERM) and a closed
    terminal (SIGHUP) are handled like Ctrl-C: the jobs are stopped at a checkpoint, not orphaned.
    Once: a second signal during that cleanup is ignored. After SIGHUP the terminal is gone, so the
    cleanup's output goes to /dev/null instead of failing on it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if signum == signal.SIGHUP and os.isatty(1):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
