"""Gathering a batch dimension across the processes of a job, for losses over the global batch.

Contrastive losses (ALPRO's VTC, CLIP-style ITC) compare each local sample with the samples of every
process. Two pitfalls this module exists for:

1. `torch.distributed.all_gather` returns tensors without autograd history, so the other processes'
   features act as constants and the gradient of the global loss is lost. `all_gather_with_grad`
   keeps it: its backward sums the incoming gradients over all processes (each process's loss
   depends on every shard) and hands each process the rows of its own shard. With DDP averaging the
   parameter gradients and each process's loss averaging over its local rows, the result equals the
   gradient of the single-process loss over the whole batch.
2. This process's rows in the gathered tensor start at the sum of the shard sizes of the processes
   before it in the process group: the GLOBAL rank decides. Upstream ALPRO (Horovod) used
   `hvd.local_rank()`, which names the same rows on every node of a multi-node job.

Shards may differ in size (a last, smaller batch): sizes are exchanged first. Without an initialised
process group (or with a single process) every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _active(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _shard_sizes(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> list[int]:
    """First-dimension size of every process's shard, in rank order."""
    local = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


def _gather(tensor: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every process's shard along dim 0 (padded to the largest shard for the collective)."""
    tensor = tensor.contiguous()
    longest = max(sizes)
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad])
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


def _offset(sizes: list[int], group: dist.ProcessGroup | None) -> int:
    # dist.get_rank(group) is this process's rank in the group: for the default group, the global rank.
    return sum(sizes[: dist.get_rank(group)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        sizes = _shard_sizes(tensor, group)
        ctx.group = group
        ctx.start = _offset(sizes, group)
        ctx.size = tensor.shape[0]
        return _gather(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Every process's loss depends on every shard: sum their gradients, keep our own rows.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.size], None


def all_gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate `tensor` (N_r, ...) of every process along dim 0, in rank order, keeping autograd.

    Backward all-reduces (sums) the gradient and returns this process's rows, so every process must
    call backward through it (as in a DDP step). Identity when not distributed.
    """
    if not _active(group):
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate `tensor` of every process along dim 0, in rank order, without gradient (ids, labels,
    features for evaluation). Identity when not distributed."""
    if not _active(group):
        return tensor
    return _gather(tensor, _shard_sizes(tensor, group), group)


def shard_rows(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> slice:
    """The rows that this process's `tensor` (its shard) occupies in the output of the gathers above.

    A collective when distributed (every process must call it); slice(0, len(tensor)) otherwise.
    """
    if not _active(group):
        return slice(0, tensor.shape[0])
    start = _offset(_shard_sizes(tensor, group), group)
    return slice(start, start + tensor.shape[0])


def global_mean(
    total: torch.Tensor, count: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """This process's share of a mean over every process: `total` (a local sum with autograd) times the
    number of processes over the summed `count`s, so DDP's averaging of the gradients gives the gradient
    of sum(totals) / sum(counts). Use it for losses that count only some rows (ignored regions, masked
    tokens): dividing by the local count would weight the processes unequally. 0 when nothing counts.

    A collective when distributed (every process must call it); total / count otherwise.
    """
    count = count.detach().to(torch.float64)
    if not _active(group):
        return total / count.clamp(min=1).to(total.dtype)
    summed = count.clone()
    dist.all_reduce(summed, group=group)
    return total * (dist.get_world_size(group) / summed.clamp(min=1).item())


__all__ = ["all_gather_with_grad", "concat_all_gather", "global_mean", "shard_rows"]
