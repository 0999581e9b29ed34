"""Backends: each renders its request (pure) and applies it (side effects)."""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("local", "slurm", "tpu_vm", "tpu_pod")


def get(name: str) -> ModuleType:
    if name not in NAMES:
        from launcher.errors import LaunchError

        raise LaunchError(f"unknown backend '{name}'; choose one of: {', '.join(NAMES)}")
    return importlib.import_module(f"launcher.backends.{'tpu' if name.startswith('tpu_') else name}")
