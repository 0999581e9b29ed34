"""backend.max_parallel: how a TPU sweep's jobs are scheduled side by side (the jobs themselves are
stand-ins here; tests/integration/test_tpu_pod.py runs real ones on the emulated TPU cloud)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from launcher.backends import tpu
from launcher.errors import LaunchError
from launcher.results import CANCELLED, COMPLETED, JobResult


def sweep(count: int) -> SimpleNamespace:
    jobs = [SimpleNamespace(num=n, label=f"seed={n}") for n in range(count)]
    return SimpleNamespace(sweep_id="par", jobs=jobs)


def test_jobs_run_side_by_side_and_the_registry_hears_of_them_on_the_launchers_thread(monkeypatch):
    plan = sweep(4)
    both_running = threading.Barrier(2, timeout=10)  # passes only when 2 jobs run at the same time
    running, most = [0], [0]
    lock = threading.Lock()

    def job(plan, job, code, on_change, stop):
        on_change(job.num, "RUNNING", f"vl-par-{job.num}", None)
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        both_running.wait()
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        on_change(job.num, COMPLETED, None, 0)
        return JobResult(job.num, job.label, COMPLETED, exit_code=0)

    monkeypatch.setattr(tpu, "_run_job", job)
    heard = []
    main = threading.current_thread()

    def on_change(num, state, handle, code):
        assert threading.current_thread() is main  # the registry's SQLite connection is this thread's
        heard.append((num, state))

    results = tpu._run_parallel(plan, code=None, on_change=on_change, parallel=2)
    assert [(r.num, r.state) for r in results] == [(n, COMPLETED) for n in range(4)]  # in job order
    assert most[0] == 2  # never more than max_parallel at once
    assert sorted(heard) == sorted([(n, s) for n in range(4) for s in ("RUNNING", COMPLETED)])


def test_one_jobs_error_stops_the_running_jobs_and_cancels_the_rest(monkeypatch):
    plan = sweep(3)
    started = threading.Event()
    seen_stop = []

    def job(plan, job, code, on_change, stop):
        if stop.is_set():  # as the real _run_job does for a job whose turn comes after a stop
            on_change(job.num, CANCELLED, None, None)
            return JobResult(job.num, job.label, CANCELLED)
        if job.num == 0:
            started.wait(10)
            on_change(job.num, "CREATING", "vl-par-0", None)
            raise LaunchError("creating TPU vl-par-0 failed: quota exceeded")
        started.set()
        deadline = time.monotonic() + 10
        while not stop.is_set():  # job 1 runs until the sweep stops it (or ends unstopped: a failure)
            if time.monotonic() > deadline:
                return JobResult(job.num, job.label, COMPLETED, exit_code=0)
            time.sleep(0.01)
        seen_stop.append(job.num)
        on_change(job.num, CANCELLED, None, None)
        raise KeyboardInterrupt  # what _run_job raises after stopping its hosts

    monkeypatch.setattr(tpu, "_run_job", job)
    heard = []

    def on_change(num, state, handle, code):
        heard.append((num, state))
        if num == 0:
            # A slow registry write on the launcher's thread: job 0's thread, free again, must still not
            # start job 2 (its TPU) before the sweep knows of the error.
            time.sleep(0.5)

    with pytest.raises(LaunchError, match="quota exceeded"):
        tpu._run_parallel(plan, code=None, on_change=on_change, parallel=2)
    assert seen_stop == [1]  # job 2 never started
    assert sorted(heard) == [(0, "CREATING"), (1, CANCELLED), (2, CANCELLED)]
