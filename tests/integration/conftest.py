"""Fixtures for integration tests that run against real local services.

`slurm_cluster` starts (or reuses) the one-host Slurm cluster of `infra/local_slurm.sh` and leaves it
running: `up` is idempotent and returns in well under a second when the cluster already runs, so every
module that asks for the fixture shares the same cluster. Stop it by hand with
`infra/local_slurm.sh down`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO_ROOT / "infra" / "local_slurm.sh"

# A first `up` may install packages with apt-get; later ones take a few seconds.
_UP_TIMEOUT_S = 900


def _parse_exports(text: str) -> dict[str, str]:
    """Turn the `export NAME=value` lines printed by `local_slurm.sh env` into a dict."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, _, value = words[1].partition("=")
            env[name] = value
    return env


@pytest.fixture(scope="module")
def slurm_cluster() -> dict:
    """A running local Slurm cluster (node1, node2; partitions `debug` (default) and `long`).

    Returns a dict with:
      env        the variables a process needs to use the cluster (SLURM_CONF, VLAUNCH_SLURM_STATE)
      state_dir  Path of the cluster's state directory (configs, logs, pid files)
      slurm_conf Path of its slurm.conf
      partition  the partition tests should submit to
      nodes      the node names

    It also sets those variables in os.environ, so Slurm commands run by the test process (and by
    code under test, e.g. submitit) talk to this cluster. SLURM_* variables inherited from an outer
    Slurm job are removed from os.environ, since srun/sbatch would otherwise treat them as ours.
    """
    if shutil.which("sinfo") is None and os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it needs root: run `sudo infra/local_slurm.sh up`")
    proc = subprocess.run(
        [str(LOCAL_SLURM), "up"],
        capture_output=True,
        text=True,
        timeout=_UP_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"`infra/local_slurm.sh up` failed with exit code {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    out = subprocess.run(
        [str(LOCAL_SLURM), "env"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    env = _parse_exports(out)
    assert "SLURM_CONF" in env, f"`local_slurm.sh env` printed no SLURM_CONF: {out!r}"

    for name in [k for k in os.environ if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del os.environ[name]
    os.environ.update(env)

    return {
        "env": env,
        "state_dir": Path(env["VLAUNCH_SLURM_STATE"]),
        "slurm_conf": Path(env["SLURM_CONF"]),
        "partition": "debug",
        "nodes": ["node1", "node2"],
    }
