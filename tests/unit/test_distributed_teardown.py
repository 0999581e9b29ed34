"""A process leaves its gloo process group without hanging, right after a DDP step.

torch's gloo threads let go of a finished collective's Python objects only after the caller has moved
on, and that takes the GIL; the group's destructor joins those threads while holding the GIL. A
teardown straight after the last collective (the end of every training run) used to deadlock there,
so a finished job would sit on its allocation until the time limit.
"""

from __future__ import annotations

import datetime
import time

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from trainers.core import distributed  # noqa: E402

WORLD = 2
ROUNDS = 8  # the old teardown hung within one or two rounds


def _rounds(rank: int, store_dir: str) -> None:
    torch.set_num_threads(1)
    for i in range(ROUNDS):
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_dir}/round{i}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),
        )
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        ddp(torch.randn(4, 16)).sum().backward()
        loss = torch.ones(1)
        dist.all_reduce(loss)
        distributed.teardown()
        del ddp  # the reducer outlives the group, as a trainer's model does


def test_teardown_right_after_a_ddp_step_does_not_hang(tmp_path):
    context = mp.spawn(_rounds, args=(str(tmp_path),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{WORLD} processes did not finish {ROUNDS} init/step/teardown rounds in 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
