"""`python -m launcher --help`: wall time (best of 5) and whether torch/jax get imported."""

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "launcher", "--help"], cwd=REPO, check=True, capture_output=True
        )
        times.append(time.perf_counter() - start)
    probe = (
        "import runpy, sys\nsys.argv = ['launcher', '--help']\n"
        "try:\n    runpy.run_module('launcher', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
    )
    heavy = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True).stdout
    print(
        f"python -m launcher --help: best {min(times):.3f} s, median {sorted(times)[2]:.3f} s (target < 1 s)"
    )
    print(f"heavy modules imported: {heavy.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
