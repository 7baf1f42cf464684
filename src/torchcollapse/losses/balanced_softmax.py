"""Balanced softmax / logit-adjusted cross-entropy, the standard long-tail baseline.

Under a long-tailed training distribution, cross-entropy learns logits biased towards frequent
classes. Adding the log class priors to the logits inside the loss (but not at prediction time)
corrects for it: ``loss = CE(logits + tau * log pi, y)`` with ``pi_c = n_c / sum_j n_j``. With
``tau = 1`` this is the balanced softmax of Ren et al. (2020) and the logit-adjusted loss of Menon
et al. (2021), whose ``tau`` it exposes. The imbalance study compares it with a fixed ETF trained
with dot regression.

References:
    J. Ren, C. Yu, S. Sheng, X. Ma, H. Zhao, S. Yi, H. Li, "Balanced meta-softmax for long-tailed
    visual recognition", NeurIPS 2020.
    A. K. Menon, S. Jayasumana, A. S. Rawat, H. Jain, A. Veit, S. Kumar, "Long-tail learning via
    logit adjustment", ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchcollapse._autograd import no_autocast
from torchcollapse._buffers import apply_keeping_dtypes, restore_constant
from torchcollapse._labels import check_label_range
from torchcollapse._numbers import as_int, read_number
from torchcollapse.losses._batch import (
    check_features_target,
    check_reduction,
    compute_dtype,
    read_counts,
)

__all__ = ["BalancedSoftmaxLoss"]


class BalancedSoftmaxLoss(nn.Module):
    """Cross-entropy on logits shifted by the log class priors (balanced softmax).

    ``forward(logits, target)`` returns ``F.cross_entropy(logits + tau * log_prior, target)`` with
    ``log_prior = log(n_c / sum_j n_j)`` from the class counts given at construction. As with
    ``nn.CrossEntropyLoss``, ``target`` holds either ``(N,)`` integer class indices or ``(N, K)``
    floating class probabilities of the logits' shape (soft targets: Mixup/CutMix, distillation;
    cast to the loss's dtype), and the loss is the cross-entropy of the adjusted logits with
    them, ``-sum_c p_c log softmax(logits + tau * log_prior)_c`` per sample (``"mean"`` over
    samples). Predict with the plain ``logits``. Like ``nn.CrossEntropyLoss`` it is per process.

    The log priors are a buffer, saved in the ``state_dict``: float32, unchanged under
    ``.half()``/``.bfloat16()`` (which would round them), the exact float64 priors under
    ``.double()``, and those of the constructor's counts after ``to_empty()``, also from the
    meta device. The loss is computed in the logits' dtype, at least float32 (float32 logits
    give a float32 loss also with float64 priors).

    Args:
        class_counts: ``K`` positive class counts of the training set.
        tau: scale of the adjustment (1 is the balanced softmax).
        reduction: ``"mean"`` (NaN over an empty batch, as ``nn.CrossEntropyLoss``), ``"sum"``
            or ``"none"``.
        label_smoothing: in ``[0, 1]``, as in ``nn.CrossEntropyLoss``: the target is
            ``(1 - label_smoothing)`` on the label (or times the class probabilities) plus
            ``label_smoothing / K`` on every class, against the adjusted logits.
        ignore_index: a label whose samples are ignored, as in ``nn.CrossEntropyLoss`` (any
            integer: Python, numpy or a 0-dim integer tensor; a TypeError otherwise): they
            add nothing to the loss or its gradient, and ``"mean"`` averages over the other
            samples (NaN when every sample is ignored); ``"none"`` gives them a zero. Not a
            label-range error, with or without ``validate_args``. It applies to class indices
            only: class probabilities have no label to ignore, and every sample counts
            (``F.cross_entropy`` refuses a non-default ``ignore_index`` with them; here it is a
            setting of the module for index targets, so the same module takes both).
        validate_args: check the label range (a ValueError on CPU; a device-side assertion,
            without host synchronisation, on accelerators; skipped under torch.compile).
        device: device of the ``log_prior`` buffer (default: torch's default device, as
            ``nn.Linear``; the counts are read on the CPU).

    Example:
        >>> import torch
        >>> from torchcollapse.losses import BalancedSoftmaxLoss
        >>> loss_fn = BalancedSoftmaxLoss([900, 90, 10])   # a long-tailed training set
        >>> logits, target = torch.zeros(1, 3), torch.tensor([2])
        >>> loss_fn(logits, target)            # -log(10 / 1000): a rare class costs more
        tensor(4.6052)
        >>> mixed = torch.tensor([[0.0, 0.5, 0.5]])  # class probabilities (e.g. from Mixup)
        >>> loss_fn(logits, mixed)             # -(log(90 / 1000) + log(10 / 1000)) / 2
        tensor(3.5066)
    """

    log_prior: Tensor

    def __init__(
        self,
        class_counts: Tensor | Sequence[float],
        *,
        tau: float = 1.0,
        reduction: Literal["mean", "sum", "none"] = "mean",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        validate_args: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        # validated on the host (also inside a meta-device context: counts are data)
        counts = read_counts(class_counts)
        valid = bool(((counts > 0) & counts.isfinite()).all()) if counts.ndim == 1 else False
        if counts.numel() < 2 or not valid:
            raise ValueError(
                "Expected argument `class_counts` to be a 1-D sequence of at least two positive, "
                f"finite counts, but got {class_counts!r}."
            )
        tau = read_number(tau, "tau", "finite (a real number)")
        index = as_int(ignore_index)  # any integer (numpy too), as nn.CrossEntropyLoss
        if index is None:
            raise TypeError(
                f"Expected argument `ignore_index` to be an integer, but got {ignore_index!r}."
            )
        label_smoothing = read_number(
            label_smoothing, "label_smoothing", "in [0, 1]", lambda value: 0.0 <= value <= 1.0
        )
        # at least float32 whatever the module's dtype (see _apply): bfloat16 would round the
        # priors; the float64 values are kept for .double() and to_empty()
        log_prior64 = (counts / counts.sum()).log()
        self._log_prior_values = tuple(log_prior64.tolist())
        log_prior = log_prior64.float()
        device = torch.get_default_device() if device is None else device
        self.register_buffer("log_prior", log_prior.to(device))
        self.num_classes = counts.numel()
        self.tau = float(tau)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = index
        self.validate_args = validate_args

    def reset_parameters(self) -> None:
        """Set the log priors back to those of the constructor's counts (in the buffer's dtype)."""
        restore_constant(self.log_prior, self._log_prior_values)

    def _apply(self, fn: Any, recurse: bool = True) -> BalancedSoftmaxLoss:
        # the log priors stay at least float32 (unrounded by .half()/.bfloat16()) and widen to
        # float64 under .double(), from the constructor's float64 values; they are data of the
        # constructor, also after to_empty(), from the meta device too; the device follows
        apply_keeping_dtypes(
            self,
            partial(super()._apply, fn, recurse),
            ("log_prior",),
            constants={"log_prior": self._log_prior_values},
        )
        return self

    def extra_repr(self) -> str:
        extra = f"num_classes={self.num_classes}, tau={self.tau}, reduction={self.reduction!r}"
        if self.label_smoothing:
            extra += f", label_smoothing={self.label_smoothing}"
        if self.ignore_index != -100:
            extra += f", ignore_index={self.ignore_index}"
        return extra

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Balanced-softmax cross-entropy of ``logits`` (``(N, K)``) against ``target``: ``(N,)``
        class indices or ``(N, K)`` class probabilities."""
        # the classes first: a label range check against the wrong K would mislead
        if isinstance(logits, Tensor) and logits.ndim == 2 and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"Expected argument `logits` to have {self.num_classes} columns (classes), but "
                f"got shape {tuple(logits.shape)}."
            )
        if (
            isinstance(logits, Tensor)
            and logits.ndim == 2
            and logits.is_floating_point()
            and isinstance(target, Tensor)
        ):
            probabilities = target.is_floating_point()
            if target.shape != logits.shape if probabilities else target.ndim != 1:
                raise ValueError(
                    f"Expected argument `target` to hold ({logits.shape[0]},) integer class "
                    f"indices or {tuple(logits.shape)} floating class probabilities (the shape "
                    f"of `logits`), but got {target.dtype} of shape {tuple(target.shape)}."
                )
            if probabilities:
                with no_autocast(logits.device.type):
                    return self._adjusted_cross_entropy(logits, target)
        check_features_target(logits, target, None, self.validate_args, name="logits")
        if self.validate_args:
            labels = target
            if not 0 <= self.ignore_index < self.num_classes:  # ignored labels are no error
                labels = torch.where(target == self.ignore_index, 0, target)
            check_label_range(labels, self.num_classes)
        with no_autocast(logits.device.type):
            return self._adjusted_cross_entropy(logits, target)

    def _adjusted_cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        dtype = compute_dtype(logits.dtype)
        adjusted = logits.to(dtype) + self.tau * self.log_prior.to(dtype)
        if target.is_floating_point():  # class probabilities: no label to ignore
            return F.cross_entropy(
                adjusted,
                target.to(dtype),
                reduction=self.reduction,
                label_smoothing=self.label_smoothing,
            )
        return F.cross_entropy(
            adjusted,
            target.long(),
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
        )
