"""Shared pieces of the heads: input validation and the normalized linear map."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from torchcollapse.heads.scale import DEFAULT_LOSS_FLOOR, scale_for_loss_floor

__all__: list[str] = []

_HALF = (torch.float16, torch.bfloat16)


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected argument `{name}` to be an int, but got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"Expected argument `{name}` to be at least {minimum}, but got {value}.")
    return value


def resolve_scale(scale: float | None, num_classes: int, normalize_features: bool) -> float:
    """The given scale, or the default: the DEFAULT_LOSS_FLOOR scale (normalized) or 1."""
    if scale is None:
        return scale_for_loss_floor(DEFAULT_LOSS_FLOOR, num_classes) if normalize_features else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"Expected argument `scale` to be a float, but got {type(scale).__name__}.")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"Expected argument `scale` to be a finite number > 0, but got {scale}.")
    return float(scale)


def check_features(features: Tensor, in_features: int) -> None:
    if not isinstance(features, Tensor):
        raise TypeError(
            f"Expected argument `features` to be a Tensor, but got {type(features).__name__}."
        )
    if features.ndim < 1 or features.shape[-1] != in_features:
        raise ValueError(
            f"Expected argument `features` to have last dimension {in_features} (`in_features`), "
            f"but got shape {tuple(features.shape)}."
        )
    if not features.is_floating_point():
        raise TypeError(
            f"Expected argument `features` to be floating point, but got {features.dtype}."
        )


def check_target(target: Tensor, features: Tensor) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(
            f"Expected argument `target` to be a Tensor, but got {type(target).__name__}."
        )
    if features.ndim != 2 or target.shape != features.shape[:1]:
        raise ValueError(
            "Expected `features` of shape (N, in_features) and `target` of shape (N,), but got "
            f"{tuple(features.shape)} and {tuple(target.shape)}."
        )
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"Expected argument `target` to hold integers, but got {target.dtype}.")


def inverse_norm(features: Tensor, scale: float | Tensor, eps: float) -> Tensor:
    """``scale / max(||features||, eps)`` along the last dim, shape ``(*, 1)``, features' dtype.

    The norm is accumulated in float32 for half inputs, and the factor is capped at the dtype's
    largest number, so a zero or tiny feature gives a finite (small) output, never inf or NaN.
    """
    dtype = torch.float32 if features.dtype in _HALF else features.dtype
    norm = torch.linalg.vector_norm(features, dim=-1, keepdim=True, dtype=dtype)
    inverse: Tensor = scale / norm.clamp_min(eps)
    return inverse.clamp_max(torch.finfo(features.dtype).max).to(features.dtype)


def normalized_linear(
    features: Tensor, weight: Tensor, scale: float | Tensor, eps: float, bias: Tensor | None = None
) -> Tensor:
    """``scale * weight @ (features / ||features||) + bias``: one matmul and one rescaling.

    When the head has fewer outputs than inputs (``K <= d``) the ``N x K`` logits are rescaled
    instead of the ``N x d`` features, which is cheaper and the same number.
    """
    inverse = inverse_norm(features, scale, eps)
    if weight.shape[0] <= weight.shape[1]:
        logits = F.linear(features, weight) * inverse
        return logits if bias is None else logits + bias
    return F.linear(features * inverse, weight, bias)
