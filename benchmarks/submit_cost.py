"""Submission cost of an N-job sweep on the real (local) Slurm: wall time until all N are queued.

Compares, for N = 10, 200, 1000:
  ours       python -m launcher -m ... seed=range(N) backend=slurm      (returns once Slurm accepted)
  baseline   the same sweep through hydra-submitit-launcher 1.2.0 (in its own venv, since it
             registers its own Hydra launchers); it blocks on results, so we time until squeue
             shows all N jobs and then stop it
  sbatch     a bare `sbatch --array=0-(N-1)`
  import     python -c "import hydra, submitit"
Jobs are submitted held (--hold) and cancelled right after, so nothing runs.

Needs the local cluster: `infra/local_slurm.sh up` (make bench does it). Prints a table.
Usage: python benchmarks/submit_cost.py [--sizes 10 200 1000] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_VENV = REPO / "benchmarks" / ".venv-baseline"
BASELINE_APP = REPO / "benchmarks" / "baseline_app"


def slurm_env() -> dict[str, str]:
    env = dict(os.environ)
    if "SLURM_CONF" not in env:
        out = subprocess.run([str(REPO / "infra" / "local_slurm.sh"), "env"], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export ") :].partition("=")
                env[key] = value.strip("'\"")
    return env


def queued(env: dict[str, str], name: str) -> int:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True, env=env
    )
    return len(out.stdout.split())


def cancel(env: dict[str, str], name: str) -> None:
    subprocess.run(["scancel", "-n", name], env=env, capture_output=True)
    for _ in range(100):
        if queued(env, name) == 0:
            return
        time.sleep(0.1)


def time_command(cmd: list[str], env: dict[str, str], cwd: Path = REPO) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def ours(n: int, env: dict[str, str], runs: Path) -> float:
    name = "bench-ours"
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "-m",
        "trainer=singularity",
        "dataset=msrvtt",
        f"seed=range(0,{n})",
        "backend=slurm",
        "site=local_slurm",
        f"backend.job_name={name}",
        "backend.additional_parameters={hold:true}",
    ]
    seconds = time_command(cmd, dict(env, VLAUNCH_RUNS=str(runs)))
    count = queued(env, name)
    cancel(env, name)
    assert count == n, f"ours: {count} of {n} jobs in the queue"
    return seconds


def ensure_baseline_venv() -> Path:
    python = BASELINE_VENV / "bin" / "python"
    if not python.exists():
        print("creating the baseline venv (hydra-submitit-launcher 1.2.0) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BASELINE_VENV)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "hydra-core==1.3.2",
                "hydra-submitit-launcher==1.2.0",
            ],
            check=True,
        )
    return python


def baseline(n: int, env: dict[str, str], runs: Path, python: Path) -> float:
    name = "bench-baseline"
    cmd = [
        str(python),
        str(BASELINE_APP / "app.py"),
        "-m",
        "trainer=singularity",
        "dataset=msrvtt",
        f"seed=range(0,{n})",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=debug",
        f"hydra.launcher.name={name}",
        "+hydra.launcher.additional_parameters={hold:true}",
        f"hydra.sweep.dir={runs}/baseline-{n}",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while queued(env, name) < n:
            if proc.poll() is not None:
                raise RuntimeError(f"baseline exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        seconds = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait()
        cancel(env, name)
    return seconds


def bare_sbatch(n: int, env: dict[str, str]) -> float:
    name = "bench-sbatch"
    seconds = time_command(
        ["sbatch", "--hold", "-p", "debug", "-J", name, f"--array=0-{n - 1}", "--wrap", "true"], env
    )
    cancel(env, name)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 200, 1000])
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    env = slurm_env()
    imports = time_command([sys.executable, "-c", "import hydra, submitit"], env)
    python = None if args.skip_baseline else ensure_baseline_venv()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        for n in args.sizes:
            row = {"N": n, "ours": ours(n, env, runs), "sbatch": bare_sbatch(n, env)}
            if python is not None:
                row["baseline"] = baseline(n, env, runs, python)
            rows.append(row)
            print(f"N={n}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items() if k != "N"), flush=True)
    print()
    print("wall time until all N jobs are queued (local Slurm, this machine)")
    print(
        f"{'N':>6}  {'ours':>8}  {'hydra-submitit':>14}  {'bare sbatch':>11}  {'import hydra+submitit':>21}"
    )
    for row in rows:
        base = f"{row['baseline']:.2f} s" if "baseline" in row else "skipped"
        print(
            f"{row['N']:>6}  {row['ours']:>6.2f} s  {base:>14}  {row['sbatch']:>9.2f} s  {imports:>19.2f} s"
        )
    print("target: 1000 jobs queued in under 2 s")


if __name__ == "__main__":
    main()
