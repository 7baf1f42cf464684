"""Classifier heads whose class vectors are a fixed frame.

Late in training the classifier of a network converges to a simplex equiangular tight frame, and
the last-layer class means to the same frame (neural collapse; Papyan, Han & Donoho, 2020). Fixing
the classifier at such a frame from the start saves its ``K x d`` parameters and loses no accuracy
(Hoffer et al., 2018; Zhu et al., 2021), and keeps minority classes apart under imbalance (Yang et
al., 2022). :class:`FixedFrameHead` takes any frame from :mod:`torchcollapse.frames`;
:class:`SimplexETFHead`, :class:`SphericalCodeHead` and :class:`OrthogonalFrameHead` build theirs.

The frame is a persistent buffer: it is saved in ``state_dict``, moved by ``.to()`` and drawn
from a fixed seed, so every process of a distributed run holds the same one without a broadcast.
The scale is saved in ``state_dict`` too, so a head loaded from a checkpoint computes what the
saved head did, whatever scale it was built with.

References:
    Hoffer, Hubara & Soudry (2018), *Fix your classifier: the marginal value of training the last
    weight layer*, ICLR. Zhu et al. (2021), *A geometric analysis of neural collapse with
    unconstrained features*, NeurIPS. Yang et al. (2022), *Inducing neural collapse in imbalanced
    learning: do we really need a learnable classifier at the end of deep neural network?*,
    NeurIPS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchcollapse._numbers import check_float_dtype, read_int, read_number
from torchcollapse.frames import orthogonal_frame, simplex_etf, spherical_code
from torchcollapse.heads._common import (
    ScaledHeadMixin,
    check_features,
    normalized_linear,
    resolve_scale,
)

__all__ = ["FixedFrameHead", "OrthogonalFrameHead", "SimplexETFHead", "SphericalCodeHead"]

# torch.fx records the normalized product as one call (it branches on dtypes when it runs)
torch.fx.wrap("normalized_linear")


class FixedFrameHead(ScaledHeadMixin, nn.Module):
    """Logits from a fixed frame: ``scale * frame @ normalize(features) + bias``.

    The frame (``K x d``) is a persistent buffer that no optimizer touches. With
    ``normalize_features=True`` (default) the features are L2-normalised first, so logits are
    ``scale`` times the cosines between a feature and the class vectors; with ``False`` they are
    ``scale * frame @ features``. The cost is one matrix product and one rescaling, as for
    :class:`torch.nn.Linear` of the same shape, minus the weight gradient.

    Mixed precision works as for :class:`torch.nn.Linear`: under :func:`torch.autocast` the
    product runs, and the logits come out, in the autocast dtype while the frame stays float32;
    with float16/bfloat16 features the norms, the rescaling factors and the correction term of
    the feature gradient are computed in float32, so small features neither overflow nor lose
    their gradient. The product itself sees the raw features, as ``nn.Linear`` would: under
    float16 autocast, features of norm beyond float16's range (65504) give infinite logits and
    norms below ~1e-4 lose precision; bfloat16 has float32's range.

    Limitations: with ``normalize_features=True`` the fused backward is first-order only. A
    double backward (``create_graph=True``: gradient penalties, MAML, Hessian-vector products)
    raises a ``RuntimeError``, and forward-mode AD (:func:`torch.func.jvp`,
    :func:`torch.func.jacfwd`, :func:`torch.func.hessian`, :mod:`torch.autograd.forward_ad`)
    raises ``NotImplementedError``. Nested ``torch.func`` differentiation (``grad`` of ``grad``)
    is not caught and leaves out the head's second-order terms. With
    ``normalize_features=False`` the head is a plain product, differentiable to any order.

    Args:
        frame: ``(num_classes, in_features)`` class vectors, used as given (the functions of
            :mod:`torchcollapse.frames` return unit rows). Copied.
        normalize_features: L2-normalise the features before the product.
        scale: logit scale (inverse temperature). Default: with normalized features, the scale
            whose simplex cross-entropy floor is
            :data:`~torchcollapse.heads.scale.DEFAULT_LOSS_FLOOR` (see
            :func:`~torchcollapse.heads.scale.scale_for_loss_floor`); otherwise 1.
        learnable_scale: learn the scale, as a parameter ``log_scale`` initialised at
            ``log(scale)``; otherwise it is a constant. Either way ``state_dict`` holds it: a
            fixed scale as the module's extra state (key ``_extra_state``, a 0-dim float64
            tensor), which ``load_state_dict`` sets, as it sets the frame.
        bias: add a learnable bias (initialised at zero).
        eps: feature norms below ``eps`` are treated as ``eps``.
        device: device of the frame and parameters (default: the frame's).
        dtype: dtype of the frame and parameters (default: the frame's).

    Attributes:
        frame: the ``(num_classes, in_features)`` buffer.
        in_features: ``d``.
        num_classes: ``K`` (also ``out_features``, as :class:`torch.nn.Linear`).

    Example:
        >>> from torchcollapse.frames import simplex_etf
        >>> head = FixedFrameHead(simplex_etf(10, 64), scale=8.0)
        >>> head
        FixedFrameHead(in_features=64, num_classes=10, normalize_features=True, scale=8.0,
                       learnable_scale=False, bias=False)
        >>> logits = head(torch.randn(32, 64))  # a batch of 32 features
        >>> logits.shape
        torch.Size([32, 10])
        >>> bool(logits.abs().max() <= 8.0 + 1e-5)  # scale times cosines
        True
        >>> "frame" in head.state_dict(), len(list(head.parameters()))  # a buffer, no parameters
        (True, 0)
    """

    frame: Tensor
    log_scale: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        frame: Tensor,
        *,
        normalize_features: bool = True,
        scale: float | None = None,
        learnable_scale: bool = False,
        bias: bool = False,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(frame, Tensor):
            raise TypeError(
                f"Expected argument `frame` to be a Tensor, but got {type(frame).__name__}."
            )
        if frame.ndim != 2 or frame.shape[0] < 2 or frame.shape[1] < 1:
            raise ValueError(
                "Expected argument `frame` to be a 2-D tensor (num_classes, in_features) with at "
                f"least 2 rows, but got shape {tuple(frame.shape)}."
            )
        if not frame.is_floating_point():
            raise TypeError(
                f"Expected argument `frame` to be a floating-point tensor, but got {frame.dtype}."
            )
        # (a frame on the meta device, for deferred initialisation, has no values to check)
        if not frame.is_meta and not bool(torch.isfinite(frame).all()):
            raise ValueError(
                "Expected argument `frame` to be a finite floating-point tensor, but it holds NaN"
                " or infinity."
            )
        eps_value = read_number(eps, "eps", "> 0", lambda value: value > 0)
        self.num_classes, self.in_features = int(frame.shape[0]), int(frame.shape[1])
        self.normalize_features = bool(normalize_features)
        self.learnable_scale = bool(learnable_scale)
        self.eps = eps_value
        self._scale = resolve_scale(scale, self.num_classes, self.normalize_features)
        dtype = frame.dtype if dtype is None else dtype
        check_float_dtype(dtype)
        device = frame.device if device is None else device
        self.register_buffer(
            "frame", frame.detach().to(device=device, dtype=dtype, copy=True), persistent=True
        )
        if self.learnable_scale:
            self.log_scale = nn.Parameter(
                torch.full((), math.log(self._scale), device=device, dtype=dtype)
            )
        else:
            self.register_parameter("log_scale", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.num_classes, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        # rebuilds the frame (subclasses with a deterministic frame); a frame given as a tensor
        # is data, like a loaded weight, and has none
        self._frame_builder: _FrameBuilder | None = None

    def reset_parameters(self) -> None:
        """Put the scale and the bias back to their initial values, and rebuild the frame of the
        subclasses that draw it (the same frame: the generator's state is kept); a frame given
        to :class:`FixedFrameHead` is left as it is. For deferred initialisation: after
        ``to_empty()`` from the meta device, call this (or load a ``state_dict``)."""
        with torch.no_grad():
            if self._frame_builder is not None:
                self.frame.copy_(self._frame_builder.build(self.frame.dtype))
            if self.log_scale is not None:
                self.log_scale.fill_(math.log(self._scale))
            if self.bias is not None:
                self.bias.zero_()

    @property
    def weight(self) -> Tensor:
        """The effective ``K x d`` classifier ``scale * frame`` (what multiplies the features).

        With ``normalize_features=True`` it acts on normalized features; neural-collapse metrics
        (NC3, self-duality) use only its direction.
        """
        return self.frame * self.scale

    @property
    def effective_weight(self) -> Tensor:
        """Same as :attr:`weight`; every head of torchcollapse has this name for it."""
        return self.weight

    def forward(self, features: Tensor) -> Tensor:
        """Logits of shape ``(*, num_classes)`` for ``features`` of shape ``(*, in_features)``."""
        features = check_features(features, self.in_features)
        return self._logits(features, self.frame)

    def _logits(self, features: Tensor, frame: Tensor) -> Tensor:
        log_scale, bias = self.log_scale, self.bias  # each read once
        scale = self._scale if log_scale is None else log_scale.exp()
        if self.normalize_features:
            return normalized_linear(features, frame, scale, self.eps, bias)
        if log_scale is None and scale == 1.0:
            return F.linear(features, frame, bias)
        logits = F.linear(features, frame) * scale
        # in the logits' dtype, as nn.Linear under autocast (a float32 bias would promote them)
        return logits if bias is None else logits + bias.to(logits.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"normalize_features={self.normalize_features}, scale={self._scale_repr()}, "
            f"learnable_scale={self.learnable_scale}, bias={self.bias is not None}"
        )


class SimplexETFHead(FixedFrameHead):
    """A head fixed at a simplex ETF (:func:`~torchcollapse.frames.simplex_etf`).

    Works for any ``in_features >= num_classes - 1``. The orientation is drawn from ``generator``
    (default: the fixed default seed), so it is the same in every process.

    Limitations: as :class:`FixedFrameHead`, with ``normalize_features=True`` (the default) the
    backward is first-order only: no double backward (``create_graph=True``) and no forward-mode
    AD (``jvp``, ``jacfwd``, ``hessian``).

    Args:
        in_features: feature dimension ``d >= num_classes - 1``.
        num_classes: number of classes ``K >= 2``.
        normalize_features, scale, learnable_scale, bias, eps: as :class:`FixedFrameHead`.
        generator: CPU generator for the orientation.
        device: device of the frame and parameters (default: torch's default device; the frame
            is drawn on the CPU in any case, then moved).
        dtype: dtype of the frame and parameters (default: ``torch.get_default_dtype()``).

    Example:
        >>> head = SimplexETFHead(512, 10)  # model.fc = SimplexETFHead(model.fc.in_features, 10)
        >>> round(float(head.frame[0] @ head.frame[1]), 4)  # cosine -1/(K-1)
        -0.1111
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        normalize_features: bool = True,
        scale: float | None = None,
        learnable_scale: bool = False,
        bias: bool = False,
        eps: float = 1e-12,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        in_features = read_int(in_features, "in_features")
        num_classes = read_int(num_classes, "num_classes", 2)
        check_simplex_features(in_features, num_classes)
        builder = _FrameBuilder(simplex_etf, (num_classes, in_features))
        frame = builder.draw(generator, dtype, device)
        super().__init__(
            frame,
            normalize_features=normalize_features,
            scale=scale,
            learnable_scale=learnable_scale,
            bias=bias,
            eps=eps,
            device=device,
        )
        self._frame_builder = builder


class SphericalCodeHead(FixedFrameHead):
    """A head fixed at a spherical code (:func:`~torchcollapse.frames.spherical_code`).

    For any number of classes, including ``num_classes > in_features + 1`` where no simplex
    exists: the class vectors are spread to a large minimum angle (a simplex when one exists).
    Codes are cached, so building the same head again is instant.

    Args:
        in_features: feature dimension ``d``.
        num_classes: number of classes ``K >= 2``.
        normalize_features, scale, learnable_scale, bias, eps: as :class:`FixedFrameHead`.
        steps: optimiser steps of :func:`~torchcollapse.frames.spherical_code`.
        generator: CPU generator.
        device: device of the frame and parameters (default: torch's default device; the frame
            is drawn on the CPU in any case, then moved).
        dtype: dtype of the frame and parameters (default: ``torch.get_default_dtype()``).

    Example:
        >>> head = SphericalCodeHead(3, 12)  # 12 classes in 3 dimensions: an icosahedron
        >>> from torchcollapse.frames import frame_min_angle
        >>> round(frame_min_angle(head.frame), 1)
        63.4
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        normalize_features: bool = True,
        scale: float | None = None,
        learnable_scale: bool = False,
        bias: bool = False,
        eps: float = 1e-12,
        steps: int = 500,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        in_features = read_int(in_features, "in_features")
        num_classes = read_int(num_classes, "num_classes", 2)
        builder = _FrameBuilder(spherical_code, (num_classes, in_features), steps=steps)
        frame = builder.draw(generator, dtype, device)
        super().__init__(
            frame,
            normalize_features=normalize_features,
            scale=scale,
            learnable_scale=learnable_scale,
            bias=bias,
            eps=eps,
            device=device,
        )
        self._frame_builder = builder


class OrthogonalFrameHead(FixedFrameHead):
    """A head fixed at orthonormal class vectors (:func:`~torchcollapse.frames.orthogonal_frame`).

    Needs ``in_features >= num_classes``. Orthogonal class vectors are the classic fixed classifier
    of Hoffer et al. (2018); the simplex separates classes further (cosine ``-1/(K-1)``, not 0).

    Args:
        in_features: feature dimension ``d >= num_classes``.
        num_classes: number of classes ``K >= 2``.
        normalize_features, scale, learnable_scale, bias, eps: as :class:`FixedFrameHead`.
        generator: CPU generator.
        device: device of the frame and parameters (default: torch's default device; the frame
            is drawn on the CPU in any case, then moved).
        dtype: dtype of the frame and parameters (default: ``torch.get_default_dtype()``).

    Example:
        >>> head = OrthogonalFrameHead(16, 4)
        >>> torch.allclose(head.frame @ head.frame.T, torch.eye(4), atol=1e-6)
        True
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        normalize_features: bool = True,
        scale: float | None = None,
        learnable_scale: bool = False,
        bias: bool = False,
        eps: float = 1e-12,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        in_features = read_int(in_features, "in_features")
        num_classes = read_int(num_classes, "num_classes", 2)
        if in_features < num_classes:
            raise ValueError(
                f"Expected argument `in_features` to be at least `num_classes` = {num_classes} for"
                f" orthogonal class vectors, but got {in_features}; use"
                f" SimplexETFHead({in_features}, {num_classes}) (in_features >= num_classes - 1)"
                f" or SphericalCodeHead({in_features}, {num_classes})."
            )
        builder = _FrameBuilder(orthogonal_frame, (num_classes, in_features))
        frame = builder.draw(generator, dtype, device)
        super().__init__(
            frame,
            normalize_features=normalize_features,
            scale=scale,
            learnable_scale=learnable_scale,
            bias=bias,
            eps=eps,
            device=device,
        )
        self._frame_builder = builder


def check_simplex_features(in_features: int, num_classes: int) -> None:
    """Raise unless a simplex ETF of ``num_classes`` exists in ``in_features`` dimensions."""
    if in_features < num_classes - 1:
        raise ValueError(
            f"Expected argument `in_features` to be at least `num_classes - 1` ="
            f" {num_classes - 1} for a simplex ETF, but got {in_features}; use"
            f" SphericalCodeHead({in_features}, {num_classes}) for more classes than"
            " dimensions + 1."
        )


class _FrameBuilder:
    """Draws a frame and can draw it again: the frame function, its sizes and the generator's
    state as it was before the draw (bytes: no tensor attribute on the module; ``None``: the
    default seed)."""

    def __init__(
        self, function: Callable[..., Tensor], sizes: tuple[int, int], **kwargs: Any
    ) -> None:
        self.function, self.sizes, self.kwargs = function, sizes, kwargs
        self.state: bytes | None = None

    def draw(
        self,
        generator: torch.Generator | None,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> Tensor:
        """The frame from ``generator`` (advanced as the frame function advances it, on the CPU
        whatever the default device), its state kept for :meth:`build`, on ``device`` (default:
        torch's default device, so that a head built under ``with torch.device("meta")`` is a
        meta head); anything but a ``torch.Generator`` is left to the function to refuse."""
        if isinstance(generator, torch.Generator):
            self.state = bytes(generator.get_state().tolist())
        return self.function(
            *self.sizes, generator=generator, dtype=dtype, device=device, **self.kwargs
        )

    def build(self, dtype: torch.dtype) -> Tensor:
        """The same frame again, on the CPU (also inside a default-device context)."""
        generator = None
        if self.state is not None:
            generator = torch.Generator()
            generator.set_state(torch.tensor(list(self.state), dtype=torch.uint8, device="cpu"))
        return self.function(
            *self.sizes, generator=generator, dtype=dtype, device="cpu", **self.kwargs
        )
