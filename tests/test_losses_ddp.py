"""The losses mean the same on one process or two: values and DDP-averaged gradients.

Two gloo processes on CPU each run a ``DistributedDataParallel`` model on their (ragged) share of a
global batch, feed its features to a loss, and backpropagate; DDP averages the gradients. For
every regularizer and for re-weighted ``DotRegressionLoss``, the loss value on each rank and the
averaged parameter gradients must equal one process on the concatenated batch, in float64, to
1e-10 (only the summation order differs). One fork serves every case (a fork costs seconds).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from tests._helpers.ddp import run_distributed
from torchcollapse.losses import (
    CollapseRegularizer,
    DotRegressionLoss,
    SelfDualityLoss,
    SimplexGeometryLoss,
    WithinClassVariabilityLoss,
)

K, D_IN, D = 5, 6, 4
N = 22
SPLITS = (7, 15)  # rank 0's share at step 0 and step 1: ragged on purpose
TOL = 1e-10  # float64, summation order only


class Net(nn.Module):
    """A small body producing features, and a bias-free head whose weight the losses read."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, D))
        self.head = nn.Linear(D, K, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


LossFn = Callable[[nn.Module, Net, Tensor, Tensor], Tensor]


def _frame() -> Tensor:
    return torch.randn(K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _frame_module() -> nn.Module:
    torch.manual_seed(5)
    return nn.Linear(D, K, bias=False).double()


# name -> (factory of the loss module, how to call it, uses the head, number of steps)
CASES: dict[str, tuple[Callable[[], nn.Module], LossFn, bool, int]] = {
    "nc1 bounded": (
        lambda: WithinClassVariabilityLoss(K, -0.5),
        lambda r, m, f, y: r(f, y),
        False,
        1,
    ),
    "nc1 ratio": (
        lambda: WithinClassVariabilityLoss(K, 0.3, form="ratio"),
        lambda r, m, f, y: r(f, y),
        False,
        1,
    ),
    "nc1 running": (
        lambda: WithinClassVariabilityLoss(K, form="running", in_features=D, momentum=0.4),
        lambda r, m, f, y: r(f, y),
        False,
        2,
    ),
    "nc2 means and weight": (
        lambda: SimplexGeometryLoss(K, 0.7),
        lambda r, m, f, y: r(f, y) + r(classifier=m.head),
        True,
        1,
    ),
    "nc3": (lambda: SelfDualityLoss(K, 1.5), lambda r, m, f, y: r(f, y, m.head), True, 1),
    "collapse with target": (
        lambda: CollapseRegularizer(K, nc1=1.0, nc2=-0.5, nc3=0.5, target_nc1=0.05),
        lambda r, m, f, y: r(f, y, m.head),
        True,
        1,
    ),
    # the frame is a constant of the loss (no gradient reaches it, see test_losses.py), here a
    # module outside the DDP model, whose parameters all get gradients
    "dot regression, batch counts, module frame": (
        lambda: DotRegressionLoss(class_counts="batch"),
        lambda r, m, f, y: r(f, y, _frame_module()),
        False,
        1,
    ),
    "dot regression, given counts, fixed frame": (
        lambda: DotRegressionLoss(class_counts=[40, 10, 5, 2, 1], reweight_power=1.0),
        lambda r, m, f, y: r(f, y, _frame()),
        False,
        1,
    ),
    "single class in the global batch": (
        lambda: CollapseRegularizer(K, nc1=1.0, nc2=1.0, nc3=1.0),
        lambda r, m, f, y: r(f, y.clamp(max=0), m.head),
        True,
        2,
    ),
}


def _data(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    target = torch.randint(0, K - 1, (N,), generator=g)  # class K-1 absent
    target[-1] = 2  # ... and some classes are rare on a rank
    inputs = torch.randn(N, D_IN, dtype=torch.float64, generator=g) + target[:, None].double()
    return inputs, target


def _model(uses_head: bool) -> nn.Module:
    torch.manual_seed(7)
    net = Net().double()
    return net if uses_head else net.body


def _run_case(name: str, rank: int | None) -> dict[str, object]:
    """One case; ``rank=None`` is the single process on the concatenated batch."""
    factory, call, uses_head, steps = CASES[name]
    model = _model(uses_head)
    wrapped: nn.Module = model if rank is None else DistributedDataParallel(model)
    reg = factory().double()
    losses = []
    for step in range(steps):
        inputs, target = _data(step)
        if rank is not None:
            rows = slice(0, SPLITS[step]) if rank == 0 else slice(SPLITS[step], N)
            inputs, target = inputs[rows], target[rows]
        wrapped.zero_grad()
        loss = call(reg, model, wrapped(inputs), target)
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in reg.named_buffers()}
    return {"losses": losses, "grads": grads, "buffers": buffers}


def _empty_batches(rank: int) -> dict[str, object]:
    """``DotRegressionLoss`` when rank 0's batch is empty (the mean over rank 1's samples) and
    when every rank's is (NaN for the mean, as torch's losses; zero for the sum)."""
    features, target = _data(0)
    features, target = features[:, :D], target
    empty_features, empty_target = features[:0], target[:0]
    results: dict[str, object] = {}
    for counts in (None, "batch"):
        for reduction in ("mean", "sum"):
            loss = DotRegressionLoss(class_counts=counts, reduction=reduction)
            local = (empty_features, empty_target) if rank == 0 else (features, target)
            results[f"{counts} {reduction} one empty"] = loss(*local, _frame())
            results[f"{counts} {reduction} all empty"] = loss(
                empty_features, empty_target, _frame()
            )
    return results


def _running_with_a_non_finite_batch(rank: int | None, steps: tuple[int, ...]) -> Tensor:
    """Running means of ``form="running"`` after ``steps`` of ``_data``'s features; at step 1
    rank 0's share (or, in one process, the batch) holds a NaN."""
    reg = WithinClassVariabilityLoss(K, form="running", in_features=D_IN, momentum=0.4).double()
    for step in steps:
        features, target = _data(step)
        if step == 1:
            features[0, 0] = float("nan")  # on rank 0's share
        if rank is not None:
            rows = slice(0, SPLITS[step % 2]) if rank == 0 else slice(SPLITS[step % 2], N)
            features, target = features[rows], target[rows]
        reg(features, target)
    return reg.running_mean


def _worker(rank: int, world_size: int) -> dict[str, dict[str, object]]:
    results = {name: _run_case(name, rank) for name in CASES}
    results["empty batches"] = _empty_batches(rank)
    results["non-finite"] = {"running": _running_with_a_non_finite_batch(rank, (0, 1, 2))}
    return results


@pytest.mark.ddp
def test_losses_under_ddp_equal_one_process_on_the_concatenated_batch() -> None:
    results = run_distributed(_worker, 2)
    for name in CASES:
        expected = _run_case(name, None)
        for rank, per_rank in enumerate(results):
            got = per_rank[name]
            where = f"{name}, rank {rank}"
            for step, (value, reference) in enumerate(zip(got["losses"], expected["losses"])):
                torch.testing.assert_close(
                    value, reference, rtol=TOL, atol=TOL, msg=f"{where} step {step}"
                )
            assert set(got["grads"]) == set(expected["grads"]), where
            for param, grad in expected["grads"].items():
                torch.testing.assert_close(
                    got["grads"][param], grad, rtol=TOL, atol=TOL, msg=f"{where} {param}"
                )
            for buffer, value in expected["buffers"].items():
                torch.testing.assert_close(
                    got["buffers"][buffer], value, rtol=TOL, atol=TOL, msg=f"{where} {buffer}"
                )
        if name == "single class in the global batch":
            assert all(v.item() == 0.0 for v in expected["losses"])
            assert all(torch.equal(g, torch.zeros_like(g)) for g in expected["grads"].values())
        else:  # the comparison is not vacuous
            assert any(g.abs().max() > 1e-6 for g in expected["grads"].values()), name
    # a NaN on one rank skips the update of the running means on every rank: as if the batch
    # had not been seen (buffers identical across ranks, so they cannot drift apart)
    skipped = _running_with_a_non_finite_batch(None, (0, 2))
    for rank, per_rank in enumerate(results):
        running = per_rank["non-finite"]["running"]
        torch.testing.assert_close(running, skipped, rtol=TOL, atol=TOL, msg=f"rank {rank}")
    features, target = _data(0)
    features = features[:, :D]
    for rank, per_rank in enumerate(results):
        got = per_rank["empty batches"]
        for counts in (None, "batch"):
            for reduction in ("mean", "sum"):
                loss = DotRegressionLoss(class_counts=counts, reduction=reduction)
                expected = loss(features, target, _frame())  # rank 1's samples alone
                where = f"empty batches, {counts} {reduction}, rank {rank}"
                torch.testing.assert_close(
                    got[f"{counts} {reduction} one empty"], expected, rtol=TOL, atol=TOL, msg=where
                )
                all_empty = got[f"{counts} {reduction} all empty"]
                if reduction == "mean":
                    assert torch.isnan(all_empty), where
                else:
                    assert all_empty.item() == 0.0, where
