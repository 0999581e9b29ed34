"""Cost of the experiment registry: recording a sweep, and `status` of a sweep in a big registry.

Prints, next to their targets:
  record     recording a 1000-job sweep (one transaction: sweep row, 1000 jobs with their resolved
             configs, 1000 events), as the launcher does before submitting          target < 100 ms
  status     `vlaunch-ctl status` of one 10-job sweep in a registry of 100,000 jobs: open, resolve
             the id, read the jobs and their run dirs, format the table              target < 200 ms
             - without asking Slurm (an answer younger than the rate limit)
             - with the one batched sacct call (the local cluster's, when it runs; skipped otherwise)
  cli        the same status as a fresh `python -m launcher.ctl status` process, start-up included

The 100,000-job registry is built with executemany in a temporary directory (a few seconds).
Usage: python benchmarks/registry_cost.py [--jobs 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher import ctl, registry  # noqa: E402
from launcher.plan import JobPlan, SweepPlan  # noqa: E402


def config(sweep_id: str, num: int, run_dir: Path) -> dict:
    """A job config the size of a real Singularity one (~3 KB of JSON)."""
    return {
        "job": {
            "sweep_id": sweep_id,
            "num": num,
            "run_dir": str(run_dir),
            "overrides": [f"seed={num}"],
            "name": "b",
        },
        "seed": num,
        "trainer": {"family": "singularity", "preset": "tiny", **{f"key_{i}": i * 0.5 for i in range(120)}},
        "dataset": {"name": "msrvtt", "task": "retrieval", "anno": {"train": "a.json", "test": "b.json"}},
        "backend": {"name": "slurm", "partition": "debug", "nodes": 1, "tasks_per_node": 1, "time_min": 20},
    }


def plan(root: Path, sweep_id: str, n: int) -> SweepPlan:
    jobs = []
    for num in range(n):
        run_dir = root / sweep_id / "jobs" / str(num)
        jobs.append(
            JobPlan(
                num, [f"seed={num}"], run_dir, config(sweep_id, num, run_dir),
                ["python", "-m", "trainers.singularity", str(run_dir / "config.yaml")], label=f"seed={num}",
            )
        )  # fmt: skip
    return SweepPlan(sweep_id, root / sweep_id, "slurm", jobs, "python -m launcher -m seed=range(n)")


def record(reg: registry.Registry, p: SweepPlan, created: float | None = None) -> None:
    reg.record_sweep(
        p, command_line=p.command_line, overrides=["-m", "seed=range(1000)"], cwd=str(REPO), created=created
    )


def ms(times: list[float]) -> str:
    return f"{1000 * statistics.median(times):7.1f} ms (min {1000 * min(times):.1f})"


def slurm_env() -> bool:
    if "SLURM_CONF" not in os.environ:
        out = subprocess.run([str(REPO / "infra" / "local_slurm.sh"), "env"], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export ") :].partition("=")
                os.environ[key] = value.strip("'\"")
    return shutil.which("sacct") is not None and "SLURM_CONF" in os.environ


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vlaunch-registry-bench-"))
    try:
        # ---- record a 1000-job sweep (fresh registry each time, plans built beforehand)
        plans = [plan(tmp / "runs", f"rec-{i}", 1000) for i in range(args.repeat)]
        times = []
        with registry.Registry(tmp / "record.sqlite") as reg:
            reg.conn  # noqa: B018 - open (and create) outside the timing, as the launcher's first write does
            for p in plans:
                start = time.perf_counter()
                record(reg, p)
                times.append(time.perf_counter() - start)
        start = time.perf_counter()
        registry.git_facts(REPO)
        git_s = time.perf_counter() - start
        print(f"record   1000-job sweep, one transaction       {ms(times)}   target < 100 ms")
        print(f"         (+ git rev-parse / git diff HEAD once per launch: {1000 * git_s:.1f} ms)")

        # ---- a big registry: args.jobs jobs in sweeps of 1000, then the 10-job sweep we ask about
        path = tmp / "big.sqlite"
        start = time.perf_counter()
        template = plan(tmp / "runs", "tmpl", 1000)
        with registry.Registry(path) as reg:
            for i in range(args.jobs // 1000):
                template.sweep_id = f"20240101-{i:06d}-0000"
                record(reg, template, created=1e9 + i)
                reg.set_handles(
                    template.sweep_id, {n: f"{1000 + i}_{n}" for n in range(1000)}, state="COMPLETED"
                )
            target = plan(tmp / "runs", "20250101-000000-beef", 10)
            record(reg, target, created=2e9)
            reg.set_handles(target.sweep_id, {n: f"99999999_{n}" for n in range(10)}, state="RUNNING")
            total = reg.conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
        print(
            f"built    a registry of {total} jobs in {time.perf_counter() - start:.1f} s ({path.stat().st_size >> 20} MiB)"
        )

        def status(force: bool) -> float:
            start = time.perf_counter()
            with registry.Registry(path) as reg:
                sweep = reg.resolve("20250101-000000")
                if force:
                    registry.refresh(reg, sweep, force=True)
                    sweep = reg.sweep(sweep.id)
                text = ctl.status_text(reg, sweep)
            assert "99999999_9" in text
            return time.perf_counter() - start

        with registry.Registry(path) as reg:
            reg.set_refreshed("20250101-000000-beef", time.time() + 3600)  # fresh: no sacct
        status(False)  # warm the page cache once, as a registry in use is
        print(
            f"status   10 jobs of {total}, no sacct (fresh)      {ms([status(False) for _ in range(args.repeat)])}   target < 200 ms"
        )
        if slurm_env():
            print(
                f"status   10 jobs of {total}, with one sacct call   {ms([status(True) for _ in range(args.repeat)])}   target < 200 ms"
            )
            start = time.perf_counter()
            subprocess.run(
                ["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", "99999999"],
                capture_output=True,
            )
            print(
                f"         (of which the sacct process alone: {1000 * (time.perf_counter() - start):.1f} ms)"
            )
        else:
            print("status   with sacct: skipped (no Slurm here; infra/local_slurm.sh up)")
        cli = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "launcher.ctl", "--registry", str(path), "status", "20250101-000000"],
                check=True, capture_output=True, cwd=REPO,
            )  # fmt: skip
            cli.append(time.perf_counter() - start)
        print(
            f"cli      python -m launcher.ctl status (no sacct) {ms(cli)}   (interpreter start-up included)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
