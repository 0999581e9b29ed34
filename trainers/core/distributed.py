"""Everything the PyTorch trainers know about the cluster, in one place.

Model and data code never read SLURM_* or torchrun variables: they get a `DistEnv`. The
lookup order is torchrun-style variables (torchrun, our local backend, or a user who exports
them), then Slurm's (srun starts one process per task), then a single process.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

# Which variable holds what, per launcher (cluster differences are data, not branches).
_SOURCES: dict[str, dict[str, str]] = {
    "torchrun": {
        "rank": "RANK",
        "world_size": "WORLD_SIZE",
        "local_rank": "LOCAL_RANK",
        "local_world_size": "LOCAL_WORLD_SIZE",
    },
    "slurm": {
        "rank": "SLURM_PROCID",
        "world_size": "SLURM_NTASKS",
        "local_rank": "SLURM_LOCALID",
        "local_world_size": "SLURM_NTASKS_PER_NODE",
    },
}


# Where Slurm says how many tasks run per node, most specific first.
_SLURM_TASK_COUNTS = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets ('a[1,3],b' -> ['a[1,3]', 'b'])."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += (ch == "[") - (ch == "]")
        current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_one(name: str) -> list[str]:
    """One host expression, any number of bracket groups ('r[1-2]n[01-02]' -> r1n01 r1n02 r2n01 ...)."""
    m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", name)
    if not m:
        return [name]
    prefix, ranges, rest = m.groups()
    tails = _expand_one(rest)
    hosts = []
    for rng in ranges.split(","):
        lo, _, hi = rng.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            hosts.extend(f"{prefix}{i:0{len(lo)}d}{tail}" for tail in tails)
    return hosts


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list ('gpu-[01-03,07],cpu1') as a list of host names, in order."""
    return [host for part in _split_top_level(hostlist.strip()) for host in _expand_one(part)]


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's per-node task counts ('2(x3),1', as in SLURM_TASKS_PER_NODE) as one count per node."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot read task counts {spec!r}; expected e.g. '2', '2(x3)' or '2(x3),1'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def node_address(hostname: str) -> str:
    """An address for a node name: DNS first, then the NodeAddr Slurm has for it."""
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", hostname], capture_output=True, text=True, timeout=30
        ).stdout
        m = re.search(r"NodeAddr=(\S+)", out)
        if m:
            return m.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return hostname


def _slurm_port(job_id: str) -> int:
    # Same job -> same port on every node, different jobs sharing a node -> (very likely) different ports.
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def from_environ(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the process's place in the job from the environment."""
    env = os.environ if environ is None else environ
    names = _SOURCES["torchrun"]
    if names["rank"] in env and names["world_size"] in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    names = _SOURCES["slurm"]
    if names["rank"] in env and names["world_size"] in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        first = expand_hostlist(nodelist)[0] if nodelist else "127.0.0.1"
        job_id = env.get("SLURM_JOB_ID", "0")
        # Tasks on this node: srun sets the step's counts; --ntasks-per-node or the allocation's
        # counts otherwise. All may read '2(x3),1' (one count per node); SLURM_NODEID picks ours.
        counts_spec = next((env[k] for k in _SLURM_TASK_COUNTS if env.get(k)), "1")
        counts = tasks_per_node(counts_spec)
        node_index = min(int(env.get("SLURM_NODEID", 0)), len(counts) - 1)
        return DistEnv(
            rank=int(env[names["rank"]]),
            world_size=int(env[names["world_size"]]),
            local_rank=int(env.get(names["local_rank"], 0)),
            local_world_size=counts[node_index],
            master_addr=env.get("MASTER_ADDR") or node_address(first),
            master_port=int(env.get("MASTER_PORT") or _slurm_port(job_id)),
            source="slurm",
        )
    return DistEnv()


def setup(timeout_s: float = 600.0):
    """Join the process group (gloo on CPU, NCCL on GPU); return (DistEnv, torch.device)."""
    import torch
    import torch.distributed as dist

    info = from_environ()
    if torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return info, device


def teardown() -> None:
    """Leave the process group, if this process is in one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    # A gloo worker thread lets go of a finished collective's tensors only after the caller has its
    # result, and letting go takes the GIL; the group's destructor joins those threads while holding
    # the GIL. Destroying the group right after a collective could hang the process at exit for good
    # (seen in a 2-process test: the destructor in join(), a gloo thread waiting for the GIL). Sleeping
    # releases the GIL, so the threads are done with their last work before the group goes away.
    time.sleep(0.1)
    dist.destroy_process_group()


def all_reduce_max(value: float) -> float:
    """The largest value across ranks (e.g. 'does any rank want to stop?'); identity when alone."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
