"""Dot-regression loss towards a fixed frame (Yang et al., 2022).

With a fixed classifier frame (e.g. a simplex ETF), Yang et al. replace cross-entropy with a loss
that only pulls each feature towards the direction of its class's frame vector ``m_y`` and, unlike
cross-entropy, never pushes it away from the other classes' vectors, which keeps the geometry
intact under class imbalance (no minority collapse). Per sample, with the norms *detached*
(treated as constants in the backward pass, as in the authors' code),

    ``l = 1/2 (h^T m_y - ||h|| ||m_y||)^2 / (||h|| ||m_y||)``
    ``  = ||h|| ||m_y|| / 2 * (cos(h, m_y) - 1)^2``.

On unit-norm features and a unit-norm frame (the paper's setting: normalized features, ETF of
unit columns) it is exactly ``1/2 (cos(h, m_y) - 1)^2``; its gradient with respect to ``h`` is
``(cos(h, m_y) - 1) m_y``.

**Pass L2-normalized features**, as the paper does: ``torch.nn.functional.normalize(h, dim=1)``
or a :class:`~torchcollapse.norms.FeatureNorm` layer at the end of the backbone (also when the
head normalizes its features itself, as ``SimplexETFHead`` does by default: the loss reads the
features it is given, not the head's input). With the norms detached, the gradient
``(cos - 1) m_y`` only adds a multiple of the class vector to ``h``: nothing in it shrinks
``||h||``, and the loss, proportional to ``||h||``, grows with it. On raw features training
along this gradient grows the feature norms without bound (the loss rises and the accuracy
falls); behind the normalization the raw features' norms no longer enter the loss, and the
normalized ones are 1. Optionally each sample is re-weighted by its class,
``w_c = (n_mean / n_c)^p`` with ``p = 1/2`` and ``n_mean`` the mean count of the classes present:
this is the paper's rescaling of the target lengths ``E_W`` by ``sqrt(gamma / n_c)`` with
``gamma = N / K_present``, which multiplies the loss of class ``c`` by exactly that factor.

The frame is a constant of the loss, as in the paper (the features are trained towards a fixed
ETF): it is detached, so no gradient reaches it, whether it is a tensor or a module (e.g. a head
with a learnable scale). With the norms detached, the gradient the loss would send into the
frame is not its derivative: in the log of a frame's scale it would be
``sum_i w_i (cos_i - 1) cos_i ||h_i|| ||m_{y_i}||`` (over ``N`` for the mean), negative once the
features align with their class vectors, while the loss itself is proportional to the scale;
a learnable scale trained through it would grow without bound.

Reference: Y. Yang, S. Chen, X. Li, L. Xie, Z. Lin, D. Tao, "Inducing neural collapse in
imbalanced learning: do we really need a learnable classifier at the end of deep neural
network?", NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from torchcollapse._autograd import no_autocast
from torchcollapse._buffers import apply_keeping_dtypes, restore_constant
from torchcollapse._distributed import (
    DropsProcessGroupWhenPickled,
    all_reduce_sum,
    is_distributed,
)
from torchcollapse._numbers import read_number
from torchcollapse.losses._batch import (
    check_features_target,
    check_reduction,
    check_weight,
    compute_dtype,
    count_classes,
    global_sum,
    label_range_error,
    read_counts,
    resolve_weight,
)
from torchcollapse.losses._fused import (
    WIDE_DTYPES,
    as_tensor,
    first_order,
    host_scalars,
    identity,
    onehot_products,
    with_gradients,
)

__all__ = ["DotRegressionLoss", "class_weights_from_counts", "dot_regression_loss"]


def class_weights_from_counts(
    counts: Tensor, power: float = 0.5, *, validate_args: bool = True
) -> Tensor:
    """Per-class weights ``(n_mean / n_c)^power`` from class counts.

    ``n_mean`` is the mean count over the classes with a non-zero count; classes with a zero count
    get weight 1 (no sample of theirs is weighted).

    Args:
        counts: ``(K,)`` class counts, a real (integer or floating, not bool) tensor of
            non-negative, finite values.
        power: the exponent ``p``, a finite real number.
        validate_args: check that the counts are non-negative and finite; this reads them on the
            host (one synchronisation when they live on an accelerator; skipped under
            ``torch.compile``, as the label checks are). Their type and shape, and ``power``,
            are always checked.

    Returns:
        The ``(K,)`` weights in at least float32.

    Raises:
        TypeError: ``counts`` is not a real tensor, or ``power`` not a real number.
        ValueError: ``counts`` is not 1-D or, with ``validate_args``, holds a negative, NaN or
            infinite count; ``power`` is NaN or infinite.

    Example:
        >>> class_weights_from_counts(torch.tensor([100.0, 25.0, 0.0]))   # n_mean = 62.5
        tensor([0.7906, 1.5811, 1.0000])
    """
    if not isinstance(counts, Tensor) or counts.dtype == torch.bool or counts.is_complex():
        received = f"dtype {counts.dtype}" if isinstance(counts, Tensor) else type(counts).__name__
        raise TypeError(
            f"Expected argument `counts` to be a real (integer or floating) tensor, but got "
            f"{received}."
        )
    if counts.ndim != 1:
        raise ValueError(
            f"Expected argument `counts` to be a 1-D tensor (one count per class), but got shape "
            f"{tuple(counts.shape)}."
        )
    exponent = read_number(power, "power", "a finite number")
    if validate_args and not torch.compiler.is_compiling():
        bad = counts < 0
        if counts.is_floating_point():
            bad |= ~counts.isfinite()
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0])
            raise ValueError(
                "Expected argument `counts` to hold non-negative, finite counts, but got "
                f"{counts[index].item()} for class {index}."
            )
    return _class_weights(counts, exponent)


def _class_weights(counts: Tensor, power: float) -> Tensor:
    """:func:`class_weights_from_counts` without checks, for the losses' steps."""
    counts = counts.to(compute_dtype(counts.dtype) if counts.is_floating_point() else torch.float32)
    present = counts > 0
    mean_count = counts.sum() / present.sum().clamp_min(1)
    ratio = mean_count / counts.clamp_min(torch.finfo(counts.dtype).tiny)
    return torch.where(present, ratio.pow(power), torch.ones_like(counts))


def dot_regression_loss(
    features: Tensor,
    target: Tensor,
    frame: Tensor,
    *,
    class_weight: Tensor | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    eps: float = 1e-8,
    validate_args: bool = True,
) -> Tensor:
    """Dot-regression loss of Yang et al. (2022) on one process (no gathering).

    Pass L2-normalized ``features`` (e.g. ``torch.nn.functional.normalize(h, dim=1)``): on raw
    features the gradient only grows them along their class vectors and the loss diverges (see
    :class:`DotRegressionLoss`). Arguments are checked as by :class:`DotRegressionLoss`: shapes
    and dtypes, ``eps``, the length of ``class_weight`` and, with ``validate_args``, the label
    range. The frame is a
    constant (detached, see the module docstring): only ``features`` get a gradient, and a frame
    that requires one is left with ``grad`` ``None``.

    Args:
        features: ``(N, d)`` features, L2-normalized.
        target: ``(N,)`` integer labels in ``[0, K)``.
        frame: ``(K, d)`` frame, one row ``m_c`` per class (no gradient reaches it).
        class_weight: optional ``(K,)`` per-class weights multiplying each sample's loss, a
            floating or integer tensor (cast to the loss's compute dtype, as
            :class:`DotRegressionLoss` casts its ``class_counts``); bools are refused.
        reduction: ``"mean"`` (over samples, not over weights; NaN over an empty batch, as
            ``nn.MSELoss``), ``"sum"`` (zero over an empty batch) or ``"none"``.
        eps: lower bound of the (detached) norms, positive.
        validate_args: check the label range (a ValueError on CPU; a device-side assertion,
            without host synchronisation, on accelerators; skipped under torch.compile).

    Returns:
        The loss in at least float32.

    Raises:
        TypeError: an argument of a wrong type: ``features``, ``target``, ``frame`` or
            ``class_weight`` not a tensor or of a wrong dtype, ``eps`` not a real number.
        ValueError: a wrong shape or value: shapes that do not match, ``eps`` not positive and
            finite, or, with ``validate_args``, a label out of range.

    Example:
        >>> import torch.nn.functional as F
        >>> frame = torch.eye(2)
        >>> features = F.normalize(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), dim=1)  # unit rows
        >>> dot_regression_loss(features, torch.tensor([0, 0]), frame, reduction="none")
        tensor([0.0000, 0.5000])
    """
    check_reduction(reduction)
    eps = _check_eps(eps)
    weight = _check_inputs(features, target, frame, validate_args, defer_cpu_range=True)
    if class_weight is not None and (
        not isinstance(class_weight, Tensor)
        or class_weight.dtype == torch.bool
        or class_weight.is_complex()
        or tuple(class_weight.shape) != (weight.shape[0],)
    ):
        # not a real tensor: a wrong type; a real tensor of the wrong shape: a wrong value
        is_real = isinstance(class_weight, Tensor) and not (
            class_weight.dtype == torch.bool or class_weight.is_complex()
        )
        got = (
            f"{class_weight.dtype} of shape {tuple(class_weight.shape)}"
            if isinstance(class_weight, Tensor)
            else type(class_weight).__name__
        )
        raise (ValueError if is_real else TypeError)(
            f"Expected argument `class_weight` to be a real (floating or integer) tensor of "
            f"{weight.shape[0]} entries (rows of `frame`), but got {got}."
        )
    loss = _dot_regression(
        features,
        target,
        weight,
        class_weight,
        eps,
        _reduction_scale(reduction, features.shape[0]),
        validate_args=validate_args,
    )
    return _empty_mean(loss, reduction, features.shape[0])


def _reduction_scale(reduction: str, num_samples: int) -> float | None:
    """The factor of the sum of the per-sample losses: ``None`` for ``"none"`` (per-sample
    losses), 1 for ``"sum"``, ``1 / N`` for ``"mean"`` (1 for no samples: see
    :func:`_empty_mean`)."""
    if reduction == "none":
        return None
    return 1.0 if reduction == "sum" or num_samples == 0 else 1.0 / num_samples


def _empty_mean(loss: Tensor, reduction: str, num_samples: int) -> Tensor:
    """NaN (still connected to the graph) for the mean over no samples, as torch's losses."""
    return loss / 0.0 if reduction == "mean" and num_samples == 0 else loss


def _check_eps(eps: Any) -> float:
    """``eps`` as a float; raise unless it is positive and finite."""
    return read_number(eps, "eps", "positive and finite", lambda value: value > 0)


def _check_inputs(
    features: Tensor,
    target: Tensor,
    frame: Tensor | nn.Module,
    validate_args: bool,
    *,
    defer_cpu_range: bool,
) -> Tensor:
    """Validate features, labels and frame (its width); return the frame's ``(K, d)`` weight,
    detached: the frame is a constant of the loss (see the module docstring)."""
    weight = resolve_weight(frame, "frame").detach()
    check_features_target(
        features, target, weight.shape[0], validate_args, defer_cpu_range=defer_cpu_range
    )
    if weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"Expected argument `frame` to have {features.shape[1]} columns (the feature "
            f"dimension), but got shape {tuple(weight.shape)}."
        )
    return weight


def _dot_regression(
    features: Tensor,
    target: Tensor,
    frame: Tensor,
    class_weight: Tensor | None,
    eps: float,
    scale: float | None,
    batch_power: float | None = None,
    validate_args: bool = False,
) -> Tensor:
    """Per-sample losses (``scale=None``) or ``scale`` times their sum, in at least float32.

    With ``batch_power``, the class weights are ``(n_mean / n_c)^batch_power`` from the counts of
    this batch, taken in the same pass over the labels.
    """
    dtype = torch.promote_types(features.dtype, frame.dtype)
    if dtype not in WIDE_DTYPES:
        dtype = compute_dtype(dtype)
    hf = features if features.dtype == dtype else features.to(dtype)
    mf = frame if frame.dtype == dtype else frame.to(dtype)
    target = target if target.dtype == torch.long else target.long()
    if class_weight is not None and class_weight.dtype != dtype:
        class_weight = class_weight.to(dtype)
    args = (hf, target, mf, class_weight, eps, scale, batch_power, validate_args)
    with no_autocast("cpu" if hf.is_cpu else hf.device.type):
        return _dot_regression_terms(*args)


def _dot_regression_terms(
    hf: Tensor,
    target: Tensor,
    mf: Tensor,
    class_weight: Tensor | None,
    eps: float,
    scale: float | None,
    batch_power: float | None,
    validate_args: bool,
) -> Tensor:
    """The loss with detached norms. Its gradient is that of ``sum_i c_i h_i^T m_{y_i}`` with
    ``c_i = w_{y_i} (h_i^T m_{y_i} - s_i) / s_i`` held constant (times the reduction's scale), so
    autograd gets it through ``value + <c, p - p.detach()>`` for the products ``p``."""
    num_classes = mf.shape[0]
    host = host_scalars(hf)
    n, d = hf.shape
    try:  # index by the labels: on CPU, labels out of range raise here
        if host and onehot_products(n, num_classes, d):  # one-hot products, one matrix kernel
            assign = identity(num_classes, hf.dtype).index_select(0, target)
            m = assign @ mf
        else:
            assign = None
            m = mf.index_select(0, target)
    except (IndexError, RuntimeError):
        error = label_range_error(target, num_classes) if validate_args and host else None
        if error is not None:
            raise error from None
        raise
    products = torch.linalg.vecdot(hf, m)
    h, m_rows = hf.detach(), m.detach()
    norms = torch.linalg.vector_norm(h, dim=1).clamp_min_(eps)
    norms.mul_(torch.linalg.vector_norm(m_rows, dim=1).clamp_min_(eps))
    diff = products.detach() - norms
    coefficient = diff / norms  # d loss_i / d (h_i^T m_{y_i}), before the class weight
    factor = 1.0 if scale is None else scale
    if batch_power is not None:
        if assign is not None:
            counts = assign.sum(0)
        elif host:
            counts = torch.bincount(target, minlength=num_classes).to(hf.dtype)
        else:
            counts = count_classes(target, num_classes, hf.dtype)
        if host:  # (n_mean / n_c)^p = n_mean^p n_c^-p, the first factor on the host
            present = num_classes - counts.tolist().count(0.0) if num_classes <= 256 else None
            if present is None:
                present = int(torch.count_nonzero(counts))
            class_weight = counts.pow(-batch_power)  # absent classes (inf) are never gathered
            factor *= (n / max(present, 1)) ** batch_power
        else:
            class_weight = _class_weights(counts, batch_power)
    if class_weight is not None:
        coefficient.mul_(class_weight.index_select(0, target))
    if factor != 1.0:
        coefficient.mul_(factor)
    if scale is None:  # per-sample losses
        loss: Tensor = diff.mul_(coefficient).mul_(0.5)
        if products.requires_grad:
            loss = first_order(loss + coefficient * (products - products.detach()))
        return loss
    total = torch.dot(coefficient, diff)
    value: float | Tensor = 0.5 * total.item() if host else total * 0.5
    if not products.requires_grad:
        return with_gradients(value, h)
    return with_gradients(value, h, (products, products.detach(), coefficient))


class DotRegressionLoss(DropsProcessGroupWhenPickled):
    """Dot-regression loss towards a (fixed) frame, over the global batch (Yang et al., 2022).

    ``forward(features, target, frame)`` returns the mean over samples of

        ``w_y * 1/2 (h^T m_y - ||h|| ||m_y||)^2 / (||h|| ||m_y||)``  (norms detached),

    i.e. ``w_y * ||h|| ||m_y|| / 2 * (cos(h, m_y) - 1)^2``, which is ``1/2 (cos - 1)^2`` on unit
    vectors; see the module docstring. ``frame`` is the ``(K, d)`` frame, a tensor or a module
    (e.g. a ``SimplexETFHead``; its ``effective_weight`` where it has one, else its ``weight``).
    A head's weight includes its logit scale (``scale * frame``), which multiplies the loss
    through ``||m_y||``; pass ``head.frame`` for the unit-vector form.

    ``features`` must be L2-normalized, as in the paper: pass
    ``torch.nn.functional.normalize(features, dim=1)``, or end the backbone with a
    :class:`~torchcollapse.norms.FeatureNorm`; a head that normalizes its input itself (a
    ``SimplexETFHead`` by default) does not normalize what this loss reads. The norms are
    detached, so the gradient ``(cos - 1) m_y`` only adds a multiple of the class vector to each
    feature and never limits ``||h||``, while the loss is proportional to ``||h||``: on raw
    features, training grows the feature norms without bound and the loss with them. Behind the
    normalization the loss is ``1/2 (cos - 1)^2``, bounded, whatever the raw norms.

    The frame is a constant of the loss (Yang et al. train the features towards a fixed ETF): it
    is detached, so no gradient reaches it, tensor or module, and a frame parameter (a head's
    learnable scale, a learnable weight) keeps ``grad`` ``None`` after ``backward`` of this loss
    alone. With the norms detached, the gradient the loss would send into the frame is not the
    loss's derivative, and would grow a learnable scale without bound (see the module
    docstring). Other losses (e.g. cross-entropy on the head's logits) still train such a head;
    under ``DistributedDataParallel``, a learnable frame parameter that no other loss reaches is
    an unused parameter (``find_unused_parameters=True``, or keep it out of the wrapped model).

    Re-weighting (``class_counts``): ``None`` (default) for none; a sequence or tensor of ``K``
    class counts (e.g. of the training set, stored as a buffer); or ``"batch"`` to count the
    classes of the global batch (across processes). The weight of class ``c`` is
    ``(n_mean / n_c)^reweight_power``, ``n_mean`` the mean count of the classes present;
    ``reweight_power=0.5`` is the paper's choice.

    With ``reduction="mean"`` or ``"sum"`` and ``torch.distributed`` initialised (``sync_dist``),
    the result is the mean (sum) over the batch concatenated across processes, equal on every rank;
    after ``DistributedDataParallel`` averages gradients, parameter gradients equal those of one
    process on the concatenated batch, also for ragged batch sizes. ``reduction="none"`` returns
    the local per-sample losses (weighted with the global counts).

    Args:
        class_counts: ``None``, ``K`` class counts, or ``"batch"``.
        reweight_power: exponent ``p`` of the class weights.
        reduction: ``"mean"`` (NaN over an empty global batch, as ``nn.MSELoss``: under
            ``sync_dist`` only when no process has a sample), ``"sum"`` (zero over an empty
            batch) or ``"none"`` (an empty tensor).
        eps: lower bound of the detached norms (keeps zero features finite).
        sync_dist: reduce and count over all processes when ``torch.distributed`` is initialised.
        process_group: process group for ``sync_dist`` (default: the world; copies and
            pickles of the module hold ``None``: process groups cannot be pickled).
        validate_args: check the label range (a ValueError on CPU; a device-side assertion,
            without host synchronisation, on accelerators; skipped under torch.compile).
        device: device of the ``class_counts`` buffer (default: torch's default device, as
            ``nn.Linear``; the counts are read on the CPU). Counted ``"batch"`` classes follow
            the features.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torchcollapse.losses import DotRegressionLoss
        >>> frame = torch.eye(3)                          # stands for a fixed ETF head's frame
        >>> raw = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
        >>> target = torch.tensor([0, 1])
        >>> features = F.normalize(raw, dim=1)            # unit rows, as the loss expects
        >>> loss = DotRegressionLoss()(features, target, frame)
        >>> loss.item()                                   # (0 + 1/2 * (0 - 1)^2) / 2
        0.25
        >>> loss.backward()
        >>> raw.grad[0].abs().sum()                       # aligned: no gradient
        tensor(0.)
        >>> raw.grad[1, 1]                                # (cos - 1) m_y / N through the norm
        tensor(-0.2500)
    """

    class_counts: Tensor | None

    def __init__(
        self,
        *,
        class_counts: Tensor | Sequence[float] | Literal["batch"] | None = None,
        reweight_power: float = 0.5,
        reduction: Literal["mean", "sum", "none"] = "mean",
        eps: float = 1e-8,
        sync_dist: bool = True,
        process_group: Any = None,
        validate_args: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        self.batch_counts = isinstance(class_counts, str)
        if isinstance(class_counts, str) and class_counts != "batch":
            raise ValueError(
                "Expected argument `class_counts` to be None, a sequence of counts or 'batch', but "
                f"got {class_counts!r}."
            )
        counts: Tensor | None = None
        if class_counts is not None and not isinstance(class_counts, str):
            # validated on the host (also inside a meta-device context: counts are data)
            counts = read_counts(class_counts)
            valid = counts.ndim == 1 and bool(((counts >= 0) & counts.isfinite()).all())
            if counts.numel() == 0 or not valid:
                raise ValueError(
                    "Expected argument `class_counts` to be a 1-D sequence of non-negative, "
                    f"finite counts, but got {class_counts!r}."
                )
            counts = counts.float()
        # the values, to rebuild the buffer after to_empty() from the meta device
        self._class_count_values = None if counts is None else tuple(counts.tolist())
        # float32 whatever the module's dtype (see _apply): float16 would round them, or
        # overflow beyond 65504; on the default device unless one is given, as nn.Linear's weight
        if counts is not None:
            counts = counts.to(torch.get_default_device() if device is None else device)
        self.register_buffer("class_counts", counts)
        self.reweight_power = check_weight(reweight_power, "reweight_power")
        self.reduction = reduction
        self.eps = _check_eps(eps)
        self.sync_dist = sync_dist
        self.process_group = process_group
        self.validate_args = validate_args

    def reset_parameters(self) -> None:
        """Set the class counts back to the constructor's (no-op without given counts)."""
        if self.class_counts is None or self._class_count_values is None:
            return
        restore_constant(self.class_counts, self._class_count_values)

    def _apply(self, fn: Any, recurse: bool = True) -> DotRegressionLoss:
        # the counts keep their float32 dtype and values (data of the constructor, also after
        # to_empty(), from the meta device too); the device follows
        values = self._class_count_values
        apply_keeping_dtypes(
            self,
            partial(super()._apply, fn, recurse),
            ("class_counts",),
            always=True,
            constants=None if values is None else {"class_counts": values},
        )
        return self

    def extra_repr(self) -> str:
        counts = (
            "'batch'" if self.batch_counts else ("given" if self.class_counts is not None else None)
        )
        return (
            f"class_counts={counts}, reweight_power={self.reweight_power}, "
            f"reduction={self.reduction!r}"
        )

    def forward(self, features: Tensor, target: Tensor, frame: Tensor | nn.Module) -> Tensor:
        """Dot-regression loss of ``features`` (``(N, d)``) towards ``frame[target]``."""
        sync = self.sync_dist and is_distributed(self.process_group)
        weight = _check_inputs(
            features, target, frame, self.validate_args, defer_cpu_range=not sync
        )
        num_classes = weight.shape[0]
        counts: Tensor | None = None
        batch_power: float | None = None
        if self.class_counts is not None:
            if self.class_counts.numel() != num_classes:
                raise ValueError(
                    f"Expected `class_counts` to have {num_classes} entries (rows of `frame`), "
                    f"but got {self.class_counts.numel()}."
                )
            counts = self.class_counts
        elif self.batch_counts:
            if not sync:  # counted in the loss's own pass over the labels
                batch_power = self.reweight_power
            else:
                counts = count_classes(target.long(), num_classes, torch.float32)
                all_reduce_sum(counts, self.process_group)
        class_weight = None
        if counts is not None:
            dtype = compute_dtype(torch.promote_types(features.dtype, weight.dtype))
            counts = counts if counts.dtype == dtype else counts.to(dtype)
            class_weight = _class_weights(counts, self.reweight_power)
        if self.reduction == "none" or not sync:
            loss = _dot_regression(
                features,
                target,
                weight,
                class_weight,
                self.eps,
                _reduction_scale(self.reduction, features.shape[0]),
                batch_power,
                self.validate_args,
            )
            return _empty_mean(loss, self.reduction, features.shape[0])
        local = _dot_regression(features, target, weight, class_weight, self.eps, 1.0)
        total = global_sum(local, sync_dist=sync, group=self.process_group)
        if self.reduction == "sum":
            return total
        if self.batch_counts and counts is not None:
            num_samples = counts.sum().to(local.dtype)  # already global
        else:
            num_samples = as_tensor(float(features.shape[0]), local)
            all_reduce_sum(num_samples, self.process_group)
        return total / num_samples  # NaN when no process has a sample, as torch's mean
