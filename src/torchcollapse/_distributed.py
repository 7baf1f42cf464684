"""The one place that talks across processes.

Everything in torchcollapse that must see the *global* batch or the *global* statistics goes
through these helpers, so that a quantity means the same on one process or many:

- :func:`is_distributed` / :func:`world_size` / :func:`rank`: "am I in a process group?" checks that
  are safe to call when ``torch.distributed`` is unavailable or not initialised.
- :func:`gather_with_grad`: concatenates a tensor along dim 0 across ranks, keeping autograd. Batch
  sizes may differ between ranks. In the backward pass every rank receives the sum over ranks of the
  gradient flowing into its own slice, so that after ``DistributedDataParallel`` averages parameter
  gradients over ``W`` ranks, a loss computed identically on every rank from the gathered tensor
  gets exactly the single-process gradient on the concatenated batch.
- :func:`all_reduce_sum`: in-place sum of detached tensors (running statistics, counts).

Without an initialised process group every helper is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DropsProcessGroupWhenPickled",
    "all_reduce_sum",
    "gather_with_grad",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed(group: Any = None) -> bool:
    """Return ``True`` when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size(group))
    return 1


def rank(group: Any = None) -> int:
    """Rank of this process in ``group`` (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank(group))
    return 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 with ragged sizes; backward sums each slice's gradient over ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, size, group=group)
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        ctx.group = group
        ctx.counts = counts
        ctx.rank = dist.get_rank(group)
        return torch.cat([g[:n] for g, n in zip(gathered, counts)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None


def gather_with_grad(tensor: Tensor, group: Any = None) -> Tensor:
    """Concatenate ``tensor`` along dim 0 over all ranks, differentiably.

    Args:
        tensor: local tensor of shape ``(n_local, ...)``; ``n_local`` may differ between ranks, the
            trailing shape and dtype may not.
        group: process group (default: the world).

    Returns:
        The tensor of shape ``(sum of n_local, ...)``, rank 0's rows first. Without an initialised
        process group, ``tensor`` itself.
    """
    if not is_distributed(group):
        return tensor
    gathered: Tensor = _GatherWithGrad.apply(tensor, group)
    return gathered


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Sum ``tensor`` over ranks in place (no autograd) and return it."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class DropsProcessGroupWhenPickled(nn.Module):
    """Mixin for modules with a ``process_group`` attribute: process groups cannot be pickled, so
    a ``copy.deepcopy`` (an EMA copy of a model) or a pickle (``torch.save(model)``) of the
    module holds ``process_group=None`` (the world) instead; set it again on the copy if it
    should reduce over a group."""

    process_group: Any

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        if state.get("process_group") is not None:
            state = {**state, "process_group": None}
        return state
