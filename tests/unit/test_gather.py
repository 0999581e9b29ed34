"""The gradient-preserving all-gather and ALPRO's VTC under DDP, in real 2-process gloo groups.

Each case spawns two processes that join through `trainers.core.distributed.setup` from the same
environment variables torchrun or Slurm would give them, and compares with a single process that sees
the whole batch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket

import pytest

torch = pytest.importorskip("torch")
# Not importorskip: the spawned processes import this module too, and transformers only where needed.
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from trainers.core import distributed  # noqa: E402
from trainers.core.gather import all_gather_with_grad, concat_all_gather, shard_rows  # noqa: E402

WORLD = 2
GLOBAL_BATCH = 6
VOCAB = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int, local_rank: int, local_world_size: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    info, _ = distributed.setup(timeout_s=60)
    assert dist.is_initialized() and info.rank == rank and info.local_rank == local_rank


# ------------------------------------------------------------------------------------- the gather alone


def _gather_worker(rank: int, port: int) -> None:
    _join(rank, port, local_rank=rank, local_world_size=WORLD)
    try:
        sizes = [2, 3]  # unequal shards (a last, smaller batch)
        start = sum(sizes[:rank])
        x = (torch.arange(sizes[rank] * 2, dtype=torch.float) + 10 * rank).view(-1, 2).requires_grad_()
        y = all_gather_with_grad(x)
        expected = torch.cat(
            [torch.arange(n * 2, dtype=torch.float).view(-1, 2) + 10 * r for r, n in enumerate(sizes)]
        )
        assert torch.equal(y.detach(), expected)
        assert shard_rows(x) == slice(start, start + sizes[rank])
        assert concat_all_gather(x).requires_grad is False

        # Each rank's loss weighs the gathered rows differently; x's gradient must collect every rank's.
        weights = torch.arange(y.numel(), dtype=torch.float).view_as(y) * (rank + 1)
        (y * weights).sum().backward()
        every_rank = torch.arange(y.numel(), dtype=torch.float).view_as(y) * sum(r + 1 for r in range(WORLD))
        assert torch.equal(x.grad, every_rank[start : start + sizes[rank]])
    finally:
        distributed.teardown()


def test_all_gather_with_grad_concatenates_in_rank_order_and_sums_gradients_over_ranks():
    mp.spawn(_gather_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def test_gathers_are_the_identity_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert concat_all_gather(x) is x
    assert shard_rows(x) == slice(0, 3)


# ---------------------------------------------------------------------------------- VTC under real DDP


def _vtc_model_and_batch():
    from trainers.alpro.config import AlproConfig, LossWeights
    from trainers.alpro.model import Alpro

    config = dataclasses.replace(
        AlproConfig.tiny(vocab_size=VOCAB), loss_weight=LossWeights(vtc=1.0, vtm=0.0, mlm=0.0)
    )
    torch.manual_seed(0)
    # eval: no dropout; float64: differences are bugs, not rounding.
    model = Alpro(config).eval().double()
    v = config.video
    g = torch.Generator().manual_seed(1)
    video = torch.randn(
        GLOBAL_BATCH, v.num_frames, 3, v.image_size, v.image_size, generator=g, dtype=torch.float64
    )
    ids = torch.randint(104, VOCAB, (GLOBAL_BATCH, 7), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[::2, 5:] = 0
    ids[::2, 5:] = 0
    return model, video, ids, mask


def _vtc_loss_with_rows(model, video, ids, mask, rows: slice) -> torch.Tensor:
    """The VTC loss with this process's targets placed at `rows` of the gathered batch (upstream's code,
    with the offset as a parameter)."""
    with torch.no_grad():
        video_feat = model.video_features(model.encode_video(video))
        text_feat = model.text_features(model.encode_text(ids, mask))
        all_video, all_text = concat_all_gather(video_feat), concat_all_gather(text_feat)
        targets = torch.zeros(len(video_feat), len(all_video), dtype=video_feat.dtype)
        targets[:, rows] = torch.eye(len(video_feat))
        sim_v2t = video_feat @ all_text.t() / model.temp
        sim_t2v = text_feat @ all_video.t() / model.temp
        loss_v2t = -(torch.log_softmax(sim_v2t, 1) * targets).sum(1).mean()
        loss_t2v = -(torch.log_softmax(sim_t2v, 1) * targets).sum(1).mean()
        return (loss_v2t + loss_t2v) / 2


SCENARIOS = {"1 node x 2 processes": [0, 1], "2 nodes x 1 process": [0, 0]}  # local rank of global rank r


def _vtc_ddp_worker(rank: int, ports: list[int], out: str) -> None:
    """One DDP step per scenario, each in a fresh process group (one spawn: starting processes is slow)."""
    for (scenario, local_ranks), port in zip(SCENARIOS.items(), ports, strict=True):
        local_rank = local_ranks[rank]
        _join(rank, port, local_rank=local_rank, local_world_size=max(local_ranks) + 1)
        try:
            model, video, ids, mask = _vtc_model_and_batch()
            b = GLOBAL_BATCH // WORLD
            mine = slice(rank * b, (rank + 1) * b)
            assert shard_rows(video[mine]) == mine  # the global rank's rows, whatever the local rank

            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            loss = ddp(video[mine], ids[mine], mask[mine])["vtc"]
            loss.backward()  # DDP averages the gradients over the processes

            def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
                value = value.detach().clone()
                dist.all_reduce(value)
                return value / WORLD

            upstream_rows = slice(local_rank * b, (local_rank + 1) * b)  # hvd.local_rank() offsets
            upstream_loss = _vtc_loss_with_rows(model, video[mine], ids[mine], mask[mine], upstream_rows)
            result = {
                "loss": mean_over_ranks(loss),
                "upstream_loss": mean_over_ranks(upstream_loss),
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            }
            torch.save(result, os.path.join(out, f"{scenario}-rank{rank}.pt"))
        finally:
            distributed.teardown()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("vtc_ddp")
    ports = [_free_port() for _ in SCENARIOS]
    mp.spawn(_vtc_ddp_worker, args=(ports, str(out)), nprocs=WORLD, join=True)
    return {
        scenario: [torch.load(out / f"{scenario}-rank{r}.pt") for r in range(WORLD)] for scenario in SCENARIOS
    }


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_vtc_loss_and_gradients_of_two_ddp_ranks_equal_one_process_on_the_global_batch(ddp_results, scenario):
    model, video, ids, mask = _vtc_model_and_batch()
    reference = model(video, ids, mask)["vtc"]
    reference.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert "temp" in expected and any(n.startswith("visual_encoder.") for n in expected)
    for result in ddp_results[scenario]:
        assert torch.allclose(result["loss"], reference.detach(), rtol=1e-10, atol=0)
        assert set(result["grads"]) == set(expected)
        for name, grad in expected.items():
            assert torch.allclose(result["grads"][name], grad, rtol=1e-8, atol=1e-12), name

    # Upstream's targets at the LOCAL rank's rows: right on one node, wrong as soon as there are two.
    upstream = ddp_results[scenario][0]["upstream_loss"]
    local_ranks = SCENARIOS[scenario]
    if len(set(local_ranks)) == WORLD:
        assert torch.allclose(upstream, reference.detach(), rtol=1e-10, atol=0)
    else:
        assert not torch.allclose(upstream, reference.detach(), atol=1e-3)
