"""A learnable normalized (cosine) classifier, with CosFace and ArcFace margins.

The learnable baseline that fixed frames are compared against: class vectors ``w_c`` are learned,
but features and class vectors are L2-normalised, so logits are ``s cos(theta_c)`` (NormFace; Wang
et al., 2017). When the target is passed, a margin ``m`` is applied to the target logit only:

- ``"cosface"`` (additive cosine margin; Wang et al., 2018): ``s (cos(theta_y) - m)``;
- ``"arcface"`` (additive angular margin; Deng et al., 2019): ``s cos(theta_y + m)`` while
  ``theta_y + m <= pi``; beyond, ``s (cos(theta_y) - m sin(m))``, the linear continuation that
  keeps the target logit decreasing in ``theta_y`` (the convention of the authors' code). With
  ``easy_margin=True`` the margin applies only where ``cos(theta_y) > 0`` and the logit is
  ``s cos(theta_y)`` elsewhere.

A margin makes training harder than evaluation, so ``forward(features)`` without a target (as at
evaluation) gives plain ``s cos(theta)``. Margins usually need larger scales than the default
(``s`` = 30 to 64 in face recognition). A head with a margin called twice in training mode
without a target (``model(x)`` after ``replace_head``) warns once; code that does so on purpose,
as ``torch.optim.swa_utils.update_bn``, may silence it with ``warnings.filterwarnings("ignore",
".*called in training mode without")``.

References:
    Wang et al. (2017), *NormFace: L2 hypersphere embedding for face verification*, ACM MM.
    Wang et al. (2018), *CosFace: large margin cosine loss for deep face recognition*, CVPR.
    Deng et al. (2019), *ArcFace: additive angular margin loss for deep face recognition*, CVPR.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchcollapse._fx import is_proxy
from torchcollapse._numbers import check_float_dtype, read_int, read_number
from torchcollapse.heads._common import (
    ScaledHeadMixin,
    check_features,
    check_target,
    normalized_linear,
    note_training_call,
    resolve_scale,
)

__all__ = ["CosineHead"]

MarginType = Literal["cosface", "arcface"]


class CosineHead(ScaledHeadMixin, nn.Module):
    """Learnable normalized classifier: ``scale * cos(w_c, features)``, with optional margins.

    Limitations: the fused backward is first-order only. A double backward
    (``create_graph=True``: gradient penalties, MAML, Hessian-vector products) raises a
    ``RuntimeError``, and forward-mode AD (:func:`torch.func.jvp`, :func:`torch.func.jacfwd`,
    :func:`torch.func.hessian`) raises ``NotImplementedError``; nested ``torch.func``
    differentiation (``grad`` of ``grad``) is not caught and leaves out the second-order terms.

    Args:
        in_features: feature dimension ``d``.
        num_classes: number of classes ``K >= 2``.
        scale: logit scale ``s``. Default: the scale whose simplex cross-entropy floor is
            :data:`~torchcollapse.heads.scale.DEFAULT_LOSS_FLOOR`.
        learnable_scale: learn the scale as a parameter ``log_scale`` (initialised at
            ``log(scale)``). Either way ``state_dict`` holds it: a fixed scale as the module's
            extra state (key ``_extra_state``), which ``load_state_dict`` sets.
        margin: margin ``m >= 0`` applied to the target logit when ``forward`` gets ``target``
            (cosine units for ``"cosface"``, radians for ``"arcface"``, where ``m < pi``). The
            head must then be called as ``head(features, target)`` in training: called without
            ``target`` (``model(x)`` after :func:`~torchcollapse.heads.replace_head`) it applies
            no margin, and warns once when called so twice in training mode before any call
            with ``target`` (outside ``torch.compile``).
        margin_type: ``"cosface"`` or ``"arcface"``.
        easy_margin: ArcFace only: apply the margin only where ``cos(theta_y) > 0``.
        eps: norms below ``eps`` are treated as ``eps``.
        device: device of the parameters.
        dtype: floating dtype of the parameters (integer and complex dtypes raise a
            ``TypeError``).

    Attributes:
        weight: the learnable ``(num_classes, in_features)`` class vectors (only their directions
            matter; the classifier actually applied is :attr:`effective_weight`).

    Example:
        >>> head = CosineHead(64, 10, scale=30.0, margin=0.35, margin_type="cosface")
        >>> features, target = torch.randn(8, 64), torch.randint(0, 10, (8,))
        >>> train_logits = head(features, target)  # margin on the target logits
        >>> eval_logits = head(features)  # plain 30 * cosine
        >>> rows = torch.arange(8)
        >>> torch.allclose(train_logits[rows, target], eval_logits[rows, target] - 30 * 0.35)
        True
    """

    log_scale: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        scale: float | None = None,
        learnable_scale: bool = False,
        margin: float = 0.0,
        margin_type: MarginType = "cosface",
        easy_margin: bool = False,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = read_int(in_features, "in_features")
        self.num_classes = read_int(num_classes, "num_classes", 2)
        if margin_type not in ("cosface", "arcface"):
            raise ValueError(
                "Expected argument `margin_type` to be 'cosface' or 'arcface', "
                f"but got {margin_type!r}."
            )
        upper = math.pi if margin_type == "arcface" else math.inf
        interval = "[0, pi)" if margin_type == "arcface" else "[0, inf)"
        # any real scalar (Python, numpy, 0-dim tensor), never a bool
        margin = read_number(
            margin, "margin", f"a number in {interval} for {margin_type}", lambda m: 0 <= m < upper
        )
        eps_value = read_number(eps, "eps", "> 0", lambda value: value > 0)
        check_float_dtype(dtype)
        self.margin = float(margin)
        self.margin_type: MarginType = margin_type
        self.easy_margin = bool(easy_margin)
        self.learnable_scale = bool(learnable_scale)
        self.eps = eps_value
        self._scale = resolve_scale(scale, self.num_classes, True)
        self.weight = nn.Parameter(
            torch.empty(self.num_classes, self.in_features, device=device, dtype=dtype)
        )
        if self.learnable_scale:
            self.log_scale = nn.Parameter(
                torch.full((), math.log(self._scale), device=device, dtype=self.weight.dtype)
            )
        else:
            self.register_parameter("log_scale", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Class vectors drawn uniformly on the sphere (standard normal rows); scale reset."""
        nn.init.normal_(self.weight)
        if self.log_scale is not None:
            with torch.no_grad():
                self.log_scale.fill_(math.log(self._scale))

    @property
    def effective_weight(self) -> Tensor:
        """The ``K x d`` classifier applied to normalized features, ``scale * normalize(weight)``.

        Every head of torchcollapse has this name for it.
        """
        return F.normalize(self.weight, dim=1, eps=self.eps) * self.scale

    def forward(self, features: Tensor, target: Tensor | None = None) -> Tensor:
        """Logits ``(*, num_classes)``; with ``target`` (``(N,)``), the margin is applied.

        Args:
            features: ``(*, in_features)``; ``(N, in_features)`` when ``target`` is given.
            target: optional class indices ``(N,)`` in ``[0, num_classes)``.

        Returns:
            ``scale * cos(theta)``, with the target entries replaced by the margin's logit.
        """
        features = check_features(features, self.in_features)
        if (
            self.margin != 0.0
            and self.training
            and not torch.compiler.is_compiling()
            and not is_proxy(features)
        ):
            note_training_call(
                self,
                target,
                f"CosineHead(margin={self.margin}) was called in training mode without `target`:"
                " the margin applies only when the head gets the batch's labels, e.g."
                " `head(features, target)`; called as `model(x)` (as after `replace_head`) it"
                " gives plain scaled cosines, without the margin.",
            )
        if target is not None:
            target = check_target(target, features, self.num_classes)
        return _cosine_logits(
            features,
            self.weight,
            self.scale,
            self.eps,
            target,
            self.margin,
            self.margin_type,
            self.easy_margin,
        )

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"scale={self._scale_repr()}, learnable_scale={self.learnable_scale}"
        )
        if self.margin:
            text += f", margin={self.margin}, margin_type={self.margin_type!r}"
            if self.margin_type == "arcface" and self.easy_margin:
                text += ", easy_margin=True"
        return text


@torch.fx.wrap  # one call in a torch.fx graph: it branches on `target` when it runs
def _cosine_logits(
    features: Tensor,
    weight: Tensor,
    scale: float | Tensor,
    eps: float,
    target: Tensor | None,
    margin: float,
    margin_type: MarginType,
    easy_margin: bool,
) -> Tensor:
    """The logits of :class:`CosineHead`: ``scale * cos(theta)``, the target entries with the
    margin when ``target`` is given."""
    unit_weight = F.normalize(weight, dim=1, eps=eps)
    if target is None or margin == 0.0:
        return normalized_linear(features, unit_weight, scale, eps)
    cosine = normalized_linear(features, unit_weight, 1.0, eps)
    index = target.long()[:, None]
    shifted = _target_cosine(cosine.gather(1, index), margin, margin_type, easy_margin)
    return cosine.scatter(1, index, shifted) * scale


def _target_cosine(
    cosine: Tensor, margin: float, margin_type: MarginType, easy_margin: bool
) -> Tensor:
    """The target class's cosine after the margin."""
    if margin_type == "cosface":
        return cosine - margin
    m = margin
    cosine = cosine.clamp(-1.0, 1.0)
    # sin(theta) >= sqrt(eps): a finite gradient at cos(theta) = +-1
    sine = (1.0 - cosine * cosine).clamp_min(torch.finfo(cosine.dtype).eps).sqrt()
    shifted = cosine * math.cos(m) - sine * math.sin(m)  # cos(theta + m)
    if easy_margin:
        return torch.where(cosine > 0, shifted, cosine)
    return torch.where(cosine > math.cos(math.pi - m), shifted, cosine - m * math.sin(m))
