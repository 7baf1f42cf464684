"""Initialise a learnable classifier at a simplex equiangular tight frame.

The learnable counterpart of a fixed simplex head: start ``nn.Linear`` (or any ``K x d`` weight)
at the geometry neural collapse converges to (Papyan, Han & Donoho, 2020), and let training move
it. Works like the functions of :mod:`torch.nn.init`.

References:
    Papyan, Han & Donoho (2020), *Prevalence of neural collapse during the terminal phase of deep
    learning training*, PNAS.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torchcollapse._numbers import read_number
from torchcollapse.frames import simplex_etf

__all__ = ["etf_init_"]

_Target = TypeVar("_Target", Tensor, nn.Module)


def etf_init_(
    target: _Target, *, gain: float = 1.0, generator: torch.Generator | None = None
) -> _Target:
    """Fill a ``(num_classes, in_features)`` weight with ``gain`` times a simplex ETF, in place.

    Args:
        target: a 2-D tensor (filled without recording autograd), or a module with a 2-D
            ``weight`` such as :class:`torch.nn.Linear` or
            :class:`~torchcollapse.heads.CosineHead` (its ``bias``, if any, is zeroed).
        gain: scale of the frame, a finite real number: every row has norm ``|gain|`` (as in
            :mod:`torch.nn.init`, a negative gain flips the frame).
        generator: CPU generator for the orientation; default: the fixed default seed of
            :func:`~torchcollapse.frames.simplex_etf`.

    Returns:
        ``target``.

    Raises:
        ValueError: when ``target`` (or the module's ``weight``) is not 2-D,
            ``in_features < num_classes - 1`` (no simplex ETF fits), or ``gain`` is NaN or
            infinite.
        TypeError: when ``target`` is neither a tensor nor a module with a ``weight`` parameter
            or buffer, is not floating point, or ``gain`` is not a real number.

    Example:
        >>> fc = etf_init_(torch.nn.Linear(16, 5))
        >>> gram = fc.weight @ fc.weight.T
        >>> torch.allclose(gram, 1.25 * (torch.eye(5) - 0.2), atol=1e-6)  # K/(K-1) (I - 11^T/K)
        True
        >>> bool((fc.bias == 0).all())
        True
    """
    gain = read_number(gain, "gain", "a finite number")
    if isinstance(target, nn.Module):
        weight = getattr(target, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(
                f"Expected argument `target` to be a tensor or a module with a `weight` tensor, "
                f"but {type(target).__name__} has none."
            )
        stored = (*target.parameters(), *target.buffers())
        if not any(weight is tensor for tensor in stored):
            if parametrize.is_parametrized(target, "weight"):
                raise TypeError(
                    f"Expected the `weight` of {type(target).__name__} to be a parameter or "
                    "buffer of the module, but it is computed by a parametrization (e.g. "
                    "weight_norm, spectral_norm, orthogonal) from the tensors under "
                    "`parametrizations.weight`: initialise the module before parametrizing it."
                )
            # e.g. a fixed-frame head, whose `weight` is computed from its frame on each access:
            # filling it would change nothing but the bias
            raise TypeError(
                f"Expected the `weight` of {type(target).__name__} to be a parameter or buffer of"
                " the module, but it is computed on access (a fixed-frame head keeps its frame)."
            )
        etf_init_(weight, gain=gain, generator=generator)
        bias = getattr(target, "bias", None)
        if isinstance(bias, Tensor):
            with torch.no_grad():
                bias.zero_()
        return target
    if not isinstance(target, Tensor):
        raise TypeError(
            f"Expected argument `target` to be a Tensor or an nn.Module, but got "
            f"{type(target).__name__}."
        )
    if target.ndim != 2 or not target.is_floating_point():
        error = ValueError if target.ndim != 2 else TypeError  # a wrong shape, else a wrong dtype
        raise error(
            "Expected argument `target` to be a 2-D floating-point (num_classes, in_features) "
            f"tensor, but got shape {tuple(target.shape)} and dtype {target.dtype}."
        )
    num_classes, in_features = target.shape
    if in_features < num_classes - 1:
        raise ValueError(
            f"Expected `in_features` ({in_features}) to be at least `num_classes - 1` "
            f"({num_classes - 1}) for a simplex ETF initialisation."
        )
    frame = simplex_etf(
        num_classes, in_features, generator=generator, dtype=target.dtype, device=target.device
    )
    with torch.no_grad():
        target.copy_(frame * gain)
    return target
