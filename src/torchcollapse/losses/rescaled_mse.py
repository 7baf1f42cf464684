"""Rescaled square loss for classification (Hui & Belkin, 2021).

Hui and Belkin train classifiers with the square loss on the network outputs (no softmax) and
match cross-entropy. For many classes they rescale it with two numbers, ``k`` (weight of the true
class's term) and ``M`` (height of the one-hot target). Per sample with label ``c`` and outputs
``f`` over ``C`` classes:

    ``l = 1/C * ( k (f_c - M)^2 + sum_{i != c} f_i^2 )``.

With ``k = M = 1`` it is the plain square loss, the mean over classes of ``(f_i - onehot_i)^2``
(``nn.MSELoss`` against one-hot targets). The paper uses ``k = 1, M = 1`` for few classes and
larger values for many (e.g. ``k = 15, M = 30`` on ImageNet). Collapse under the square loss is
studied by Han, Papyan & Donoho (2022).

References:
    L. Hui, M. Belkin, "Evaluation of neural architectures trained with square loss vs
    cross-entropy in classification tasks", ICLR 2021.
    X. Y. Han, V. Papyan, D. L. Donoho, "Neural collapse under MSE loss: proximity to and dynamics
    on the central path", ICLR 2022.
"""

from __future__ import annotations

from typing import Any, Literal

import torch  # noqa: F401  (the examples of the docstrings use it)
import torch.nn.functional as F
from torch import Tensor, nn

from torchcollapse._autograd import no_autocast
from torchcollapse._numbers import read_number
from torchcollapse.losses._batch import check_features_target, check_reduction, compute_dtype

__all__ = ["RescaledMSELoss", "rescaled_mse_loss"]


def _check_arguments(k: Any, m: Any, reduction: Any) -> tuple[float, float]:
    """``k`` and ``m`` as floats, validated with ``reduction``."""
    check_reduction(reduction)
    k_value = read_number(k, "k", "a positive finite number", lambda value: value > 0)
    return k_value, read_number(m, "m", "a finite number")


def rescaled_mse_loss(
    logits: Tensor,
    target: Tensor,
    k: float = 1.0,
    m: float = 1.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
    validate_args: bool = True,
) -> Tensor:
    """Rescaled square loss ``1/C (k (f_c - M)^2 + sum_{i != c} f_i^2)`` per sample.

    Arguments are checked as by :class:`RescaledMSELoss`: shapes and dtypes (a ``(N, 1)`` or
    one-hot target is refused, not broadcast), ``k``, ``m``, ``reduction`` and, with
    ``validate_args``, the label range.

    Args:
        logits: ``(N, C)`` network outputs (no softmax).
        target: ``(N,)`` integer labels in ``[0, C)``.
        k: weight of the true class's term.
        m: target value ``M`` of the true class.
        reduction: ``"mean"`` over samples (NaN over an empty batch, as ``nn.MSELoss``),
            ``"sum"`` (zero over an empty batch) or ``"none"``.
        validate_args: check the label range (a ValueError on CPU; a device-side assertion,
            without host synchronisation, on accelerators; skipped under torch.compile).

    Returns:
        The loss in at least float32.

    Example:
        >>> logits, target = torch.tensor([[0.5, 0.0]]), torch.tensor([0])
        >>> rescaled_mse_loss(logits, target)               # (0.5^2 + 0^2) / 2
        tensor(0.1250)
        >>> rescaled_mse_loss(logits, target, k=2.0, m=2.0)  # 2 * 1.5^2 / 2
        tensor(2.2500)
    """
    k, m = _check_arguments(k, m, reduction)
    num_classes = logits.shape[-1] if isinstance(logits, Tensor) and logits.ndim else 0
    check_features_target(logits, target, num_classes, validate_args, name="logits")
    dtype = compute_dtype(logits.dtype)
    with no_autocast(logits.device.type):
        f = logits.to(dtype)
        onehot = F.one_hot(target.long(), f.shape[1]).to(dtype)
        per_sample = ((1.0 + (k - 1.0) * onehot) * (f - m * onehot).pow(2)).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / per_sample.shape[0]  # NaN over no samples, as torch's mean


class RescaledMSELoss(nn.Module):
    """Rescaled square loss of Hui & Belkin (2021) on logits, ``nn.CrossEntropyLoss``-style.

    ``forward(logits, target)`` returns the ``reduction`` over samples of
    ``1/C (k (f_y - M)^2 + sum_{i != y} f_i^2)``; see the module docstring. Like
    ``nn.CrossEntropyLoss`` it is per process: under ``DistributedDataParallel`` with equal local
    batch sizes the averaged gradients are those of the global mean.

    Args:
        k: weight of the true class's term (``k`` in the paper).
        m: value of the true class's target (``M`` in the paper).
        reduction: ``"mean"`` (NaN over an empty batch, as ``nn.MSELoss``), ``"sum"`` (zero
            over an empty batch) or ``"none"``.
        validate_args: check the label range (a ValueError on CPU; a device-side assertion,
            without host synchronisation, on accelerators; skipped under torch.compile).

    Example:
        >>> import torch
        >>> from torchcollapse.losses import RescaledMSELoss
        >>> logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
        >>> onehot = torch.nn.functional.one_hot(target, 5).float()
        >>> plain = torch.nn.functional.mse_loss(logits, onehot)
        >>> torch.allclose(RescaledMSELoss()(logits, target), plain)    # k = M = 1: plain MSE
        True
    """

    def __init__(
        self,
        k: float = 1.0,
        m: float = 1.0,
        *,
        reduction: Literal["mean", "sum", "none"] = "mean",
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        self.k, self.m = _check_arguments(k, m, reduction)
        self.reduction = reduction
        self.validate_args = validate_args

    def extra_repr(self) -> str:
        return f"k={self.k}, m={self.m}, reduction={self.reduction!r}"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Rescaled square loss of ``logits`` (``(N, C)``) against labels ``target``."""
        return rescaled_mse_loss(logits, target, self.k, self.m, self.reduction, self.validate_args)
