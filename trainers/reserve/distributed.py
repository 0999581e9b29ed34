"""Multi-host JAX setup for the Reserve trainer: the one place that reads the environment.

Three ways a process can start (checked in this order):

1. Emulated or explicit: `VL_JAX_COORDINATOR` (host:port of process 0), `VL_JAX_NUM_PROCESSES` and
   `VL_JAX_PROCESS_ID` are set -> `jax.distributed.initialize` with exactly those. `VL_JAX_CPU_DEVICES`
   (optional) gives each process that many CPU devices and runs on CPU with gloo collectives: this is how
   tests emulate a TPU pod with one process per "host".
2. A real TPU VM (`VL_JAX_DISTRIBUTED=auto`, or a TPU device file present): `jax.distributed.initialize()`
   without arguments; JAX finds the workers and the coordinator from the TPU metadata server.
3. Otherwise one process on whatever devices JAX sees. `VL_JAX_DISTRIBUTED=off` forces this.

Models and data code never read these variables; they get a `JaxEnv` and a mesh.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("trainers.reserve")

COORDINATOR = "VL_JAX_COORDINATOR"
NUM_PROCESSES = "VL_JAX_NUM_PROCESSES"
PROCESS_ID = "VL_JAX_PROCESS_ID"
CPU_DEVICES = "VL_JAX_CPU_DEVICES"
MODE = "VL_JAX_DISTRIBUTED"  # auto | off (unset: auto-detect a TPU VM)
INIT_TIMEOUT_S = 300  # every worker must join within this (JAX's default)
_TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")


@dataclass(frozen=True)
class JaxEnv:
    process_index: int
    process_count: int
    local_devices: int
    global_devices: int
    source: str  # how the processes found each other

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


def _explicit() -> tuple[str, int, int] | None:
    names = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
    given = [n for n in names if os.environ.get(n)]
    if not given:
        return None
    if len(given) != len(names):
        missing = sorted(set(names) - set(given))
        raise ValueError(f"{', '.join(given)} set but {', '.join(missing)} not: set all three or none")
    try:
        count, index = int(os.environ[NUM_PROCESSES]), int(os.environ[PROCESS_ID])
    except ValueError:
        raise ValueError(f"{NUM_PROCESSES} and {PROCESS_ID} must be integers") from None
    if not 0 <= index < count:
        raise ValueError(f"{PROCESS_ID}={index} must be in 0..{count - 1} ({NUM_PROCESSES}={count})")
    return os.environ[COORDINATOR], count, index


def setup() -> JaxEnv:
    """Initialize JAX for this process (before any other JAX call) and describe where it stands."""
    import jax

    explicit = _explicit()
    mode = os.environ.get(MODE, "")
    if mode not in ("", "auto", "off"):
        raise ValueError(f"{MODE}={mode!r}; valid: auto, off (or unset)")
    cpu_devices = os.environ.get(CPU_DEVICES)
    if cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    if explicit is not None and mode != "off":
        coordinator, count, index = explicit
        if cpu_devices:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=count,
            process_id=index,
            initialization_timeout=INIT_TIMEOUT_S,
        )
        source = f"explicit coordinator {coordinator}"
    elif mode == "auto" or (mode != "off" and any(Path(p).exists() for p in _TPU_DEVICE_FILES)):
        jax.distributed.initialize()
        source = "TPU VM auto-detection"
    else:
        source = "single process"
    return JaxEnv(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
        source=source,
    )


def data_mesh():
    """A 1-D mesh over every device of every process, axis "data": batches are split along it."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()), ("data",))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any: a collective, so all must call it together."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def teardown() -> None:
    import jax

    if jax.process_count() > 1:
        jax.distributed.shutdown()


def process_count() -> int:
    """The job's number of JAX processes (1 when set-up never got that far)."""
    import jax

    try:
        return jax.process_count()
    except Exception:  # noqa: BLE001 - no backend: nothing to leave
        return 1
