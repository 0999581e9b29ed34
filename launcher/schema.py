"""Typed configs of the submitting side: one dataclass per backend, registered with Hydra.

The dataclass *is* the schema: composing `backend=slurm backend.partitio=gpu` fails at
compose time and the launcher lists these fields as the valid keys. Resource words mean the
same thing in every backend (`nodes`, `tasks_per_node`, `gpus_per_node`, `cpus_per_task`,
`mem_gb`, `time_min`).

Fields left `None` are filled, in order, from the site profile (`conf/site/*.yaml`, the
values a user sets once) and then from `SITE_FALLBACKS` below.
"""

from __future__ import annotations

import dataclasses
import importlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from trainers.registry import FAMILIES


@dataclass
class LocalBackend:
    """Run jobs as processes on this machine (the embedded default)."""

    name: str = "local"
    nodes: int = 1  # must stay 1: a local job cannot span machines
    tasks_per_node: int | None = None  # processes per job (the DDP world size)
    cpus_per_task: int | None = None  # torch threads per process
    gpus_per_node: int | None = None  # GPUs per job, split between its tasks
    max_parallel: int | None = None  # jobs running at once; None: as many as the cores allow


@dataclass
class SlurmBackend:
    """Submit through submitit as one job array per sweep."""

    name: str = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int | None = None
    tasks_per_node: int | None = None  # one trainer process per task (srun)
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None  # memory per node
    time_min: int | None = None  # time limit of each job, minutes
    constraint: str | None = None
    exclude: str | None = None  # nodes to avoid, Slurm hostlist syntax
    signal_delay_s: int | None = None  # USR2 this many seconds before the time limit
    # Requeues of a job after its trainer checkpointed at a stop signal (exit 75); one more stop
    # ends the job FAILED. Counts every requeue of the job (SLURM_RESTART_COUNT), Slurm's own too.
    max_requeues: int | None = None
    # Lists default to empty (OmegaConf cannot merge a value into a None list); empty counts as
    # unset when the site profile is applied.
    setup: list[str] = field(default_factory=list)  # shell lines run in the batch script before srun
    srun_args: list[str] = field(default_factory=list)  # extra arguments to srun
    array_parallelism: int | None = None  # array tasks running at once (the %N of --array)
    job_name: str | None = None  # default: vl-<trainer>-<dataset>
    comment: str | None = None
    # Other sbatch flags, e.g. {mail-type: END}. Typed Any: a typed dict would be a struct node that
    # refuses new keys given as backend.additional_parameters={hold:true}.
    additional_parameters: Any = None
    python: str | None = None  # interpreter command on the nodes; default: the launcher's own


@dataclass
class TpuBackend:
    """A Cloud TPU VM (`tpu_vm`: one host) or pod slice (`tpu_pod`: several hosts) per job, created
    through the Cloud TPU API; the trainer runs on every host at once over SSH.

    The job's code and config are staged to `bucket`; checkpoints and metrics go there too
    (`<bucket>/<sweep id>/jobs/<n>/`). Fields left null come from the site profile
    (`conf/site/*.yaml`, keys `tpu_vm:` / `tpu_pod:`), then from `SITE_FALLBACKS`."""

    name: str = "tpu_pod"
    project: str | None = None
    zone: str | None = None
    bucket: str | None = None  # gs://bucket[/prefix]: staging, checkpoints, metrics
    accelerator_type: str | None = None  # v4-8, v4-16, v5litepod-16, ...
    runtime_version: str | None = None  # default: the one Google documents for the type's generation
    capacity: str | None = None  # on_demand | spot | preemptible | guaranteed | reserved
    queued: bool | None = None  # ask through a queued resource (needed for guaranteed / reserved)
    reservation: str | None = None  # capacity=reserved with a queued resource: the reservation's id
    network: str | None = None
    subnetwork: str | None = None
    service_account: str | None = None
    # A TPU to use by name: reused when it exists and is READY, created under that name otherwise.
    # null: one TPU per job, named vl-<sweep id>-<job>.
    tpu_name: str | None = None
    # Jobs of a sweep running at once, each on a TPU of its own (default 1: one after another).
    max_parallel: int | None = None
    # delete | keep: what to do with the TPU after the job. Default: delete the TPUs the launcher
    # made, keep one named by tpu_name.
    teardown: str | None = None
    ready_timeout_s: int | None = None  # how long to wait for READY / ACTIVE
    # Recreations after a preemption and reruns after a lost ssh connection, together; other failures
    # are never retried.
    max_retries: int | None = None
    ssh_user: str | None = None  # default: your user name on this machine
    ssh_port: int | None = None
    ssh_key_dir: str | None = None  # default: <runs_root>/.ssh (an ed25519 key made once)
    python: str | None = None  # the interpreter on the TPU hosts; default python3 (emulated: ours)
    workdir: str | None = None  # where each host unpacks the code and runs
    stop_grace_s: int | None = None  # SIGTERM to SIGKILL on the hosts, when a job is stopped
    poll_s: float | None = None  # seconds between API polls while a job runs
    api_endpoint: str | None = None  # default: the real Cloud TPU API
    # A GCS emulator (fake-gcs-server) to stage to instead of Google's: this process and the hosts
    # get STORAGE_EMULATOR_HOST and friends pointing at it.
    gcs_endpoint: str | None = None
    # Emulation (tests, a laptop): the hosts are not TPUs, so JAX is given an explicit coordinator
    # (host 0) and `cpu_devices_per_host` CPU devices per process, and the GCS emulator settings of
    # this process (STORAGE_EMULATOR_HOST, ...) are passed on to the hosts.
    emulated: bool | None = None
    cpu_devices_per_host: int | None = None
    labels: Any = None  # extra labels on the TPU
    worker_env: Any = None  # extra environment variables for the trainer on every host


@dataclass
class TpuVmBackend(TpuBackend):
    name: str = "tpu_vm"


# Values used when neither the backend config nor the site profile sets a field.
SITE_FALLBACKS: dict[str, dict[str, Any]] = {
    "local": {"tasks_per_node": 1, "cpus_per_task": 1, "gpus_per_node": 0},
    "slurm": {
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": 2,
        "gpus_per_node": 0,
        "time_min": 60,
        "signal_delay_s": 120,
        "max_requeues": 3,
        "array_parallelism": 256,
        "setup": [],
        "srun_args": [],
        "additional_parameters": {},
    },
}

_TPU_FALLBACKS: dict[str, Any] = {
    "capacity": "on_demand",
    "queued": False,
    "ready_timeout_s": 1800,
    "max_retries": 3,
    "ssh_port": 22,
    "workdir": "/tmp/vlaunch",
    "stop_grace_s": 60,
    "poll_s": 10.0,
    "emulated": False,
    "cpu_devices_per_host": 1,
    "labels": {},
    "worker_env": {},
}
SITE_FALLBACKS["tpu_vm"] = {**_TPU_FALLBACKS, "accelerator_type": "v4-8"}
SITE_FALLBACKS["tpu_pod"] = {**_TPU_FALLBACKS, "accelerator_type": "v4-16"}

BACKEND_SCHEMAS: dict[str, type] = {
    "local": LocalBackend,
    "slurm": SlurmBackend,
    "tpu_vm": TpuVmBackend,
    "tpu_pod": TpuBackend,
}


def backend_fields(name: str) -> list[str]:
    """The valid keys of a backend's config, for error messages."""
    return [f.name for f in dataclasses.fields(BACKEND_SCHEMAS[name])]


def new_sweep_id() -> str:
    """Sortable and unique enough for concurrent launchers: time plus 16 random bits."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def register_configs() -> None:
    """Register the schemas with Hydra (conf/backend/*.yaml extend them) and our resolver."""
    if not OmegaConf.has_resolver("vl.new_sweep_id"):
        # Cached: every job of a sweep (composed from the same master config) gets the same id.
        OmegaConf.register_new_resolver("vl.new_sweep_id", new_sweep_id, use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="local_backend_schema", node=LocalBackend)
    for family, spec in FAMILIES.items():
        module = importlib.import_module(spec.config_module)  # torch-free by contract
        cs.store(name=f"{family}_trainer_schema", node=module.optional_schema(module.TrainConfig))
    cs.store(name="slurm_backend_schema", node=SlurmBackend)
    cs.store(name="tpu_pod_backend_schema", node=TpuBackend)
    cs.store(name="tpu_vm_backend_schema", node=TpuVmBackend)
