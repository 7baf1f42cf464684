"""One regularizer for the three geometric signs of neural collapse, with a target level of NC1.

``CollapseRegularizer`` adds, with signed weights, the within-class variability (NC1), the distance
of the class-mean geometry to a simplex ETF (NC2) and the classifier/means self-duality distance
(NC3) of the global batch, computing the class statistics once. With ``target_nc1`` it no longer
pushes NC1 to zero but towards a chosen level, which is what transfer learning needs (collapse
helps in distribution and can hurt transfer, Kornblith et al. 2021).

References:
    V. Papyan, X. Y. Han, D. L. Donoho, "Prevalence of neural collapse during the terminal phase of
    deep learning training", PNAS 2020.
    S. Kornblith, T. Chen, H. Lee, M. Norouzi, "Why do better loss functions lead to less
    transferable features?", NeurIPS 2021.
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from torchcollapse._distributed import DropsProcessGroupWhenPickled
from torchcollapse._numbers import read_number
from torchcollapse.losses._batch import (
    check_classifier_shape,
    check_features_target,
    check_num_classes,
    check_weight,
    resolve_weight,
)
from torchcollapse.losses._fused import collapse_terms

__all__ = ["CollapseRegularizer", "target_penalty"]

_TARGET_MODES = ("squared", "at_most", "at_least")


def target_penalty(
    value: Tensor,
    target: float | Tensor,
    mode: Literal["squared", "at_most", "at_least"] = "squared",
) -> Tensor:
    """Penalty on the distance of ``value`` to a ``target`` level.

    Args:
        value: the measured quantity (e.g. NC1).
        target: the level to aim at: a finite real number, or a floating-point tensor that
            broadcasts with ``value`` (a scheduled level kept in a tensor, which
            ``torch.compile`` does not specialise on; used as it is, gradient included).
        mode: ``"squared"``: ``(value - target)^2``, holds the value at the target from both
            sides; ``"at_most"``: ``relu(value - target)``, a hinge that acts only above the
            target (at least this much collapse); ``"at_least"``: ``relu(target - value)``, a hinge
            that acts only below it (at most this much collapse).

    Raises:
        TypeError: ``value`` is not a floating-point tensor, or ``target`` neither a real
            number nor a floating-point tensor.
        ValueError: a number ``target`` is NaN or infinite, or ``mode`` is unknown.

    Example:
        >>> import torch
        >>> value = torch.tensor([0.1, 0.5])
        >>> target_penalty(value, 0.3, "squared")
        tensor([0.0400, 0.0400])
        >>> target_penalty(value, 0.3, "at_most")     # only 0.5 exceeds the target
        tensor([0.0000, 0.2000])
        >>> target_penalty(value, 0.3, "at_least")    # only 0.1 falls short of it
        tensor([0.2000, 0.0000])
    """
    if not isinstance(value, Tensor) or not value.is_floating_point():
        received = f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(
            f"Expected argument `value` to be a floating-point tensor, but got {received}."
        )
    level: float | Tensor
    if isinstance(target, Tensor):
        if not target.is_floating_point():
            raise TypeError(
                "Expected argument `target` to be a real number or a floating-point tensor, but"
                f" got dtype {target.dtype}."
            )
        level = target
    else:
        level = read_number(target, "target", "a finite number")
    if mode == "squared":
        return (value - level).pow(2)
    if mode == "at_most":
        return torch.relu(value - level)
    if mode == "at_least":
        return torch.relu(level - value)
    raise ValueError(f"Expected argument `mode` to be one of {_TARGET_MODES}, but got {mode!r}.")


class CollapseRegularizer(DropsProcessGroupWhenPickled):
    """Signed sum of NC1, NC2 and NC3 terms of the global batch, optionally aiming at a NC1 level.

    ``forward(features, target, classifier=None)`` returns the scalar

        ``nc1 * NC1 + nc2 * NC2 + nc3 * NC3``

    where ``NC1`` is the within-class variability (``nc1_form``: ``"bounded"``
    ``tr Sigma_W / (tr Sigma_W + tr Sigma_B)`` by default, or ``"ratio"``), ``NC2`` the squared
    distance of the normalized Gram of the centred class means to the simplex ETF Gram and ``NC3``
    the squared distance between the normalized ``classifier`` weight and the normalized centred
    means (see :class:`~torchcollapse.losses.WithinClassVariabilityLoss`,
    :class:`~torchcollapse.losses.SimplexGeometryLoss`,
    :class:`~torchcollapse.losses.SelfDualityLoss`). Terms with a zero weight are skipped. With
    ``target_nc1`` the NC1 term becomes ``nc1 * target_penalty(NC1, target_nc1, target_mode)``
    (``"squared"``: ``(NC1 - t)^2``; ``"at_most"``: ``relu(NC1 - t)``; ``"at_least"``:
    ``relu(t - NC1)``), which holds collapse at, below or above a chosen level instead of pushing
    it to zero.

    The common case is one line: ``loss = F.cross_entropy(logits, y) + reg(features, y)``. For
    logging, ``reg(features, y, return_parts=True)`` returns ``(total, parts)`` with ``parts`` a
    dict of the *unweighted*, detached measured values under the keys ``"nc1"``, ``"nc2"``,
    ``"nc3"`` (only the enabled terms).

    The class statistics are computed once per call over the batch concatenated across processes
    (features gathered with autograd), so on 1 or 8 GPUs the value is the same and, after
    ``DistributedDataParallel`` averages gradients, so are the parameter gradients. Classes absent
    from the batch are left out; with fewer than two classes present every term is zero and still
    connected to the graph (no warning, no NaN, no unused parameters under DDP).

    Args:
        num_classes: number of classes ``K`` (at least 2).
        nc1: signed weight of the NC1 term (positive: collapse; negative: anti-collapse).
        nc2: signed weight of the NC2 term.
        nc3: signed weight of the NC3 term (needs ``classifier`` in ``forward``).
        target_nc1: level of NC1 to aim at instead of zero (``nc1`` must then be positive); in the
            scale of ``nc1_form`` (``[0, 1]`` for the bounded form).
        target_mode: ``"squared"`` (default), ``"at_most"`` or ``"at_least"``; see above. The
            hinges need ``target_nc1`` (a ``ValueError`` without it: they would have no effect).
        nc1_form: ``"bounded"`` or ``"ratio"``.
        sync_dist: compute over the global batch when ``torch.distributed`` is initialised.
        process_group: process group for ``sync_dist`` (default: the world; copies and
            pickles of the module hold ``None``: process groups cannot be pickled).
        validate_args: check the label range (a ValueError on CPU; a device-side assertion,
            without host synchronisation, on accelerators; skipped under torch.compile).

    Example:
        >>> import torch
        >>> from torchcollapse.losses import CollapseRegularizer
        >>> _ = torch.manual_seed(0)
        >>> features, target = torch.randn(64, 16, requires_grad=True), torch.arange(64) % 4
        >>> head = torch.nn.Linear(16, 4)
        >>> reg = CollapseRegularizer(num_classes=4, nc1=1.0, nc2=0.5, nc3=0.5)
        >>> loss, parts = reg(features, target, head, return_parts=True)
        >>> sorted(parts)
        ['nc1', 'nc2', 'nc3']
        >>> total = 1.0 * parts["nc1"] + 0.5 * parts["nc2"] + 0.5 * parts["nc3"]
        >>> torch.allclose(loss.detach(), total)
        True
        >>> hold = CollapseRegularizer(num_classes=4, nc1=1.0, target_nc1=0.2)  # aim at NC1 = 0.2
        >>> hold(features, target).backward()
    """

    def __init__(
        self,
        num_classes: int,
        *,
        nc1: float = 1.0,
        nc2: float = 0.0,
        nc3: float = 0.0,
        target_nc1: float | None = None,
        target_mode: Literal["squared", "at_most", "at_least"] = "squared",
        nc1_form: Literal["bounded", "ratio"] = "bounded",
        sync_dist: bool = True,
        process_group: Any = None,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        nc1, nc2, nc3 = (
            check_weight(w, name) for w, name in ((nc1, "nc1"), (nc2, "nc2"), (nc3, "nc3"))
        )
        if nc1_form not in ("bounded", "ratio"):
            raise ValueError(
                f"Expected argument `nc1_form` to be 'bounded' or 'ratio', but got {nc1_form!r}."
            )
        if target_mode not in _TARGET_MODES:
            raise ValueError(
                f"Expected argument `target_mode` to be one of {_TARGET_MODES}, but got "
                f"{target_mode!r}."
            )
        if target_mode != "squared" and target_nc1 is None:
            # a hinge without a level would be ignored: plain NC1 is pushed to zero
            raise ValueError(
                f"Expected argument `target_nc1` with `target_mode={target_mode!r}` (the mode "
                "shapes the penalty around that level), but got None."
            )
        if target_nc1 is not None:
            high = 1.0 if nc1_form == "bounded" else math.inf
            interval = "[0, 1]" if nc1_form == "bounded" else "[0, inf) (finite)"
            target_nc1 = read_number(
                target_nc1,
                "target_nc1",
                f"in {interval} for `nc1_form={nc1_form!r}`",
                lambda value: 0.0 <= value <= high,
            )
            if nc1 <= 0:
                raise ValueError(
                    "Expected argument `nc1` to be positive when `target_nc1` is given, but got "
                    f"{nc1}."
                )
        if nc1 == 0 and nc2 == 0 and nc3 == 0:
            raise ValueError(
                "Expected at least one of the arguments `nc1`, `nc2`, `nc3` to be non-zero, but "
                "got all zero."
            )
        self.num_classes = num_classes
        self.nc1 = float(nc1)
        self.nc2 = float(nc2)
        self.nc3 = float(nc3)
        self.target_nc1 = None if target_nc1 is None else float(target_nc1)
        self.target_mode: Literal["squared", "at_most", "at_least"] = target_mode
        self.nc1_form = nc1_form
        self.sync_dist = sync_dist
        self.process_group = process_group
        self.validate_args = validate_args

    def extra_repr(self) -> str:
        extra = f"num_classes={self.num_classes}, nc1={self.nc1}, nc2={self.nc2}, nc3={self.nc3}"
        if self.target_nc1 is not None:
            extra += f", target_nc1={self.target_nc1}, target_mode={self.target_mode!r}"
        return extra + f", nc1_form={self.nc1_form!r}"

    @overload
    def forward(
        self,
        features: Tensor,
        target: Tensor,
        classifier: Tensor | nn.Module | None = ...,
        *,
        return_parts: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        features: Tensor,
        target: Tensor,
        classifier: Tensor | nn.Module | None = ...,
        *,
        return_parts: Literal[True],
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    def forward(
        self,
        features: Tensor,
        target: Tensor,
        classifier: Tensor | nn.Module | None = None,
        *,
        return_parts: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Total regularizer of ``features`` (``(N, d)``) and ``target`` (``(N,)``).

        Args:
            features: the features the classifier reads.
            target: integer labels.
            classifier: ``(K, d)`` weight or a module (its ``effective_weight`` where it has
                one, else its ``weight``); required when ``nc3`` is non-zero, ignored otherwise.
            return_parts: also return the dict of unweighted, detached parts.
        """
        check_features_target(
            features, target, self.num_classes, self.validate_args, defer_cpu_range=True
        )
        weight: Tensor | None = None
        if self.nc3 != 0:
            if classifier is None:
                raise ValueError(
                    "Expected argument `classifier` when `nc3` is non-zero, but got None."
                )
            weight = resolve_weight(classifier)
            check_classifier_shape(weight, self.num_classes, features.shape[1])
        total, values = collapse_terms(
            features,
            target,
            self.num_classes,
            weight,
            nc1=self.nc1,
            nc1_form=self.nc1_form,
            target_nc1=self.target_nc1,
            target_mode=self.target_mode,
            nc2=self.nc2,
            nc3=self.nc3,
            parts=return_parts,
            sync_dist=self.sync_dist,
            group=self.process_group,
            validate_args=self.validate_args,
        )
        if values is None:
            return total
        enabled = zip(("nc1", "nc2", "nc3"), (self.nc1, self.nc2, self.nc3), values.unbind())
        return total, {name: value for name, factor, value in enabled if factor != 0}
