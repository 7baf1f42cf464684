"""Differentiable class statistics of one (global) batch, shared by the collapse regularizers.

The metrics accumulate exact, detached statistics over many batches; a loss needs the same
quantities on the current batch *with autograd*. This module computes them once per batch, over
the **global** batch under ``torch.distributed`` (features and labels gathered with
:func:`torchcollapse._distributed.gather_with_grad`), with the conventions of the formula sheet in
``DESIGN.md`` (Papyan, Han & Donoho, 2020):

- classes absent from the batch are left out of every quantity (never divided by); ``K`` counts
  the present classes;
- class mean ``mu_c``; global mean ``mu_G`` = unweighted mean of the present class means;
- ``tr Sigma_W = 1/N sum_i ||h_i - mu_{y_i}||^2`` (two-pass: residuals to the batch class means);
- ``tr Sigma_B = 1/K sum_c ||mu_c - mu_G||^2``.

Everything is computed in at least float32 with autocast disabled, so float16/bfloat16 features
(or an autocast region) do not lose the statistics. No host-device synchronisation happens here
except the gather's own (it reads the per-rank batch sizes) and, on CPU only, the optional
label-range check.

Reference: V. Papyan, X. Y. Han, D. L. Donoho, "Prevalence of neural collapse during the terminal
phase of deep learning training", PNAS 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from torchcollapse._autograd import no_autocast
from torchcollapse._classifier import applied_weight
from torchcollapse._distributed import (
    DropsProcessGroupWhenPickled,
    gather_with_grad,
    is_distributed,
)
from torchcollapse._labels import check_label_range, label_range_error
from torchcollapse._numbers import read_int, read_number

__all__ = [
    "BatchClassStatistics",
    "batch_class_statistics",
    "check_classifier_shape",
    "check_device",
    "check_features_target",
    "check_num_classes",
    "check_reduction",
    "check_stats",
    "check_weight",
    "compute_dtype",
    "count_classes",
    "global_sum",
    "label_range_error",
    "read_counts",
    "resolve_weight",
    "where_valid",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def check_features_target(
    features: Tensor,
    target: Tensor,
    num_classes: int | None,
    validate_args: bool,
    *,
    defer_cpu_range: bool = False,
    name: str = "features",
) -> None:
    """Validate a ``(N, d)`` float feature batch and its ``(N,)`` integer labels.

    Shapes and dtypes are always checked. The label range is checked when ``validate_args`` is
    true, except under ``torch.compile``: on CPU with a ``ValueError``, on accelerators with an
    asynchronous device-side assertion, so that no call synchronises with the host. With
    ``defer_cpu_range`` the CPU check is left to the caller, which indexes by the labels anyway
    and raises :func:`label_range_error` when that indexing fails (one operation fewer).
    ``name`` is the features' argument name in error messages (``"logits"`` for the losses on
    logits). Features without a column are refused, as by
    :class:`~torchcollapse.stats.ClassStatistics`: every statistic of them is zero.
    """
    if not isinstance(features, Tensor):
        raise TypeError(
            f"Expected argument `{name}` to be a tensor, but got {type(features).__name__}."
        )
    if not isinstance(target, Tensor):
        raise TypeError(
            f"Expected argument `target` to be a tensor, but got {type(target).__name__}."
        )
    if features.ndim != 2:
        raise ValueError(
            f"Expected argument `{name}` to be a 2-D tensor, but got shape {tuple(features.shape)}."
        )
    if not features.is_floating_point():
        raise TypeError(
            f"Expected argument `{name}` to be a floating-point tensor, but got dtype "
            f"{features.dtype}."
        )
    if features.shape[1] == 0:
        column = "feature (column)" if name == "features" else "column"
        raise ValueError(
            f"Expected argument `{name}` to have at least one {column}, but got shape "
            f"{tuple(features.shape)}."
        )
    if target.ndim != 1:
        raise ValueError(
            f"Expected argument `target` to be a 1-D tensor, but got shape {tuple(target.shape)}."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"Expected argument `target` to be an integer tensor, but got dtype {target.dtype}."
        )
    if target.shape[0] != features.shape[0]:
        raise ValueError(
            f"Expected arguments `{name}` and `target` to have the same number of samples, but "
            f"got {features.shape[0]} and {target.shape[0]}."
        )
    if not validate_args or num_classes is None or (target.is_cpu and defer_cpu_range):
        return
    check_label_range(target, num_classes)


def resolve_weight(classifier: Tensor | nn.Module, name: str = "classifier") -> Tensor:
    """The ``(K, d)`` weight of a classifier given as a tensor or as a module: the classifier it
    applies, its ``effective_weight`` where it has one (every head of :mod:`torchcollapse.heads`:
    ``scale * normalize(weight)`` for a cosine head), else its ``weight``; as the metrics read it.
    """
    weight: Any = classifier
    if not isinstance(classifier, Tensor):
        weight = applied_weight(classifier)
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"Expected argument `{name}` to be a (num_classes, in_features) tensor or a module "
            f"with a `weight` tensor, but got {type(classifier).__name__}."
        )
    if weight.ndim != 2 or not weight.is_floating_point():
        error = ValueError if weight.ndim != 2 else TypeError  # a wrong shape, else a wrong dtype
        raise error(
            f"Expected argument `{name}` to have a 2-D floating-point weight (num_classes, "
            f"in_features), but got shape {tuple(weight.shape)} and dtype {weight.dtype}."
        )
    return weight


def check_classifier_shape(weight: Tensor, num_classes: int, in_features: int) -> None:
    """Raise unless ``weight`` has shape ``(num_classes, in_features)``; ``in_features`` is the
    width of the features, which the message blames when the number of rows is right."""
    if weight.shape[0] != num_classes:
        raise ValueError(
            f"Expected argument `classifier` to have a weight of shape ({num_classes}, "
            f"{in_features}) (`num_classes`, feature dimension), but got {tuple(weight.shape)}."
        )
    if weight.shape[1] != in_features:
        raise ValueError(
            f"Expected argument `features` to have {weight.shape[1]} columns, the width of "
            f"`classifier` (shape {tuple(weight.shape)}), but got {in_features}."
        )


def check_stats(stats: Any) -> None:
    """Raise unless ``stats`` is a :class:`BatchClassStatistics`."""
    if not isinstance(stats, BatchClassStatistics):
        raise TypeError(
            "Expected argument `stats` to be the BatchClassStatistics of "
            f"`batch_class_statistics`, but got {type(stats).__name__}."
        )


def read_counts(counts: Any, name: str = "class_counts") -> Tensor:
    """``counts`` (a tensor, array or sequence of real numbers) as a float64 CPU tensor, on the
    host also inside a meta-device context (counts are data). Anything else (``None``, a
    string, a dict, a sequence of strings, bools or complex numbers) is a ``TypeError`` naming
    the argument; the caller checks the shape and the values."""
    got = type(counts).__name__
    if not isinstance(counts, (str, bytes, dict)):
        try:  # the inferred dtype shows bools and complex numbers, which float64 would hide
            values = torch.as_tensor(counts, device="cpu")
        except (TypeError, ValueError, RuntimeError, OverflowError):
            values = None
        if values is not None:
            if values.dtype != torch.bool and not values.is_complex():
                # read again as float64: a list of floats was inferred in the default dtype
                return torch.as_tensor(counts, dtype=torch.float64, device="cpu")
            got += f" of dtype {values.dtype}"
    raise TypeError(
        f"Expected argument `{name}` to be a sequence or tensor of real counts, but got {got}."
    )


def check_device(device: Any, name: str = "device") -> torch.device | None:
    """``device`` as a ``torch.device`` (``None`` stays ``None``); raise, naming the argument,
    unless ``torch.device`` reads it."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(
            f"Expected argument `{name}` to be a torch.device, a string or an index, but got "
            f"{type(device).__name__}."
        )
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"Expected argument `{name}` to be a device such as 'cpu' or 'cuda:0', but got "
            f"{device!r}."
        ) from None


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: Any) -> None:
    """Raise unless ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"Expected argument `reduction` to be one of {REDUCTIONS}, but got {reduction!r}."
        )


def check_num_classes(num_classes: Any) -> int:
    """``num_classes`` of a collapse term as a Python int (any integer type, not a bool); raise
    unless it is at least 2: with one class every term would be zero, whatever the features."""
    return read_int(num_classes, "num_classes", 2)


def check_weight(value: Any, name: str = "weight") -> float:
    """``value`` as a float; raise unless it is a finite real number (a bool is not a weight)."""
    return read_number(value, name, "a finite number")


class BatchCollapseTerm(DropsProcessGroupWhenPickled):
    """Shared construction of a weighted collapse term over the (global) batch.

    Args:
        num_classes: number of classes ``K`` (at least 2).
        weight: signed weight of the term.
        sync_dist: compute over the global batch under ``torch.distributed``.
        process_group: process group (default: the world).
        validate_args: check the labels.
    """

    def __init__(
        self,
        num_classes: int,
        weight: float = 1.0,
        *,
        sync_dist: bool = True,
        process_group: Any = None,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        self.num_classes = num_classes
        self.weight = check_weight(weight)
        self.sync_dist = sync_dist
        self.process_group = process_group
        self.validate_args = validate_args

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, weight={self.weight}"


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks as well."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def global_sum(tensor: Tensor, *, sync_dist: bool = True, group: Any = None) -> Tensor:
    """Sum of a per-rank partial sum over all ranks, differentiably.

    Every rank gets the global sum. As with :func:`gather_with_grad`, the backward pass sums the
    gradient over ranks, so that a loss computed identically on every rank from the result gets,
    after ``DistributedDataParallel`` averages the gradients, the single-process gradient.
    Without an initialised process group (or with ``sync_dist=False``) it is the identity.
    """
    if not (sync_dist and is_distributed(group)):
        return tensor
    out: Tensor = _AllReduceSum.apply(tensor, group)
    return out


def count_classes(target: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``(num_classes,)`` label counts in ``dtype``; a static output shape, unlike bincount."""
    ones = torch.ones(target.shape, dtype=dtype, device=target.device)
    return torch.zeros(num_classes, dtype=dtype, device=target.device).index_add(0, target, ones)


def where_valid(valid: Tensor, value: Tensor) -> Tensor:
    """``value`` where ``valid`` else zero, keeping the graph connected.

    The zero still has a ``grad_fn`` that reaches every input of ``value`` (with zero gradient), so
    ``DistributedDataParallel`` does not see unused parameters on a degenerate batch. ``value``
    must be finite and have a finite backward on invalid batches (callers use safe denominators).
    """
    return torch.where(valid, value, 0.0)


class _WithinAndCentredMeans(torch.autograd.Function):
    """``tr Sigma_W`` and the centred class means in one node, with a closed-form backward.

    With ``r_i = h_i - mu_{y_i}`` the residuals, ``M`` the centred means of the present classes
    and ``P`` the present-class mask: ``d tr Sigma_W / d h_i = 2 r_i / N`` (the residuals of a
    class sum to zero, so the means' dependence on ``h`` drops out), and a gradient ``G`` on ``M``
    reaches ``h_i`` as ``(G_c - mean_{c' in P} G_c') / n_c`` for ``c = y_i`` (the global mean's
    dependence is the subtracted mean). One autograd node replaces some twenty, which matters
    because a regularizer is dozens of tiny kernels next to a training step.
    """

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, target: Tensor, counts: Tensor, present: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        present_f = present.to(h.dtype).unsqueeze(1)
        num_present = present_f.sum().clamp_min(1.0)
        inverse_counts = counts.clamp_min(1.0).reciprocal().unsqueeze(1)
        # about one of the samples (every statistic but the means themselves is unchanged by a
        # shift): samples alike give exactly zero, and a common offset adds no rounding
        shift = h[:1] if h.shape[0] else None
        shifted = h if shift is None else h - shift
        means = h.new_zeros((counts.shape[0], h.shape[1])).index_add_(0, target, shifted)
        means.mul_(inverse_counts)
        centered = (means - means.sum(0, keepdim=True) / num_present) * present_f
        # one N x d temporary: residuals in place, their squared norm as a dot product
        residual = means.index_select(0, target).neg_().add_(shifted).reshape(h.shape)
        flat = residual.reshape(-1)
        trace_within = torch.dot(flat, flat) / max(h.shape[0], 1)
        if shift is not None:
            means = means.add_(shift).mul_(present_f)
        ctx.save_for_backward(residual, target, inverse_counts, present_f, num_present)
        ctx.mark_non_differentiable(means)
        return trace_within, centered, means

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_within: Tensor, grad_centered: Tensor, _: Tensor
    ) -> tuple[Tensor | None, None, None, None]:
        residual, target, inverse_counts, present_f, num_present = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        g = grad_centered * present_f
        g = (g - present_f * (g.sum(0, keepdim=True) / num_present)) * inverse_counts
        grad = g.index_select(0, target)
        grad.addcmul_(residual, grad_within * (2.0 / max(residual.shape[0], 1)))
        return grad, None, None, None


class BatchClassStatistics(NamedTuple):
    """Class statistics of one batch, differentiable with respect to the features.

    Attributes:
        counts: ``(K_total,)`` samples per class, in the compute dtype.
        present: ``(K_total,)`` boolean mask of the classes with at least one sample.
        num_present: scalar, the number ``K`` of present classes (compute dtype).
        num_samples: the number ``N`` of samples in the (global) batch.
        means: ``(K_total, d)`` class means, detached; rows of absent classes are zero.
        centered_means: ``(K_total, d)`` rows ``mu_c - mu_G`` for present classes, zero otherwise.
        trace_within: ``tr Sigma_W``.
        trace_between: ``tr Sigma_B``.
        valid: boolean scalar, true when at least two classes are present.
    """

    counts: Tensor
    present: Tensor
    num_present: Tensor
    num_samples: int
    means: Tensor
    centered_means: Tensor
    trace_within: Tensor
    trace_between: Tensor
    valid: Tensor


def batch_class_statistics(
    features: Tensor,
    target: Tensor,
    num_classes: int,
    *,
    sync_dist: bool = True,
    group: Any = None,
    validate_args: bool = True,
) -> BatchClassStatistics:
    """Differentiable class statistics of the global batch.

    Arguments are checked as by the regularizers: shapes and dtypes always, the label range with
    ``validate_args``. In float32 the traces are sums of squares, exact only while those stay in
    float32's normal range: for features beyond a scale of ~1e+-15 pass them in float64 (the
    fused regularizers do that themselves on CPU).

    Args:
        features: ``(N_local, d)`` features (any floating dtype; computed in >= float32), at
            least one column.
        target: ``(N_local,)`` integer labels in ``[0, num_classes)``.
        num_classes: total number of classes ``K_total``, a positive integer (Python's, numpy's
            or a 0-dim integer tensor; not a bool).
        sync_dist: gather features and labels from all ranks when ``torch.distributed`` is
            initialised, so the statistics are those of the concatenated batch.
        group: process group to gather over (default: the world).
        validate_args: check the label range of this process's batch (a ValueError on CPU; a
            device-side assertion, without host synchronisation, on accelerators; skipped under
            torch.compile).

    Returns:
        A :class:`BatchClassStatistics`.

    Raises:
        TypeError: ``features`` or ``target`` is not a tensor, or of the wrong dtype;
            ``num_classes`` is not an integer.
        ValueError: a shape is wrong, ``num_classes`` is below 1 or, with ``validate_args``, a
            label on CPU is outside ``[0, num_classes)``.
    """
    num_classes = read_int(num_classes, "num_classes")
    check_features_target(features, target, num_classes, validate_args)
    if sync_dist and is_distributed(group):
        features = gather_with_grad(features, group)
        target = gather_with_grad(target, group)
    dtype = compute_dtype(features.dtype)
    with no_autocast(features.device.type):
        h = features if features.dtype == dtype else features.to(dtype)
        target = target if target.dtype == torch.long else target.long()
        counts = count_classes(target, num_classes, dtype)
        present = counts > 0
        num_present = present.to(dtype).sum()
        trace_within, centered, means = _WithinAndCentredMeans.apply(h, target, counts, present)
        trace_between = centered.pow(2).sum() / num_present.clamp_min(1.0)
    return BatchClassStatistics(
        counts=counts,
        present=present,
        num_present=num_present,
        num_samples=features.shape[0],
        means=means,
        centered_means=centered,
        trace_within=trace_within,
        trace_between=trace_between,
        valid=num_present >= 2,
    )
