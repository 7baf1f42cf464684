"""Shared pieces of the heads: input validation and the normalized linear map."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from torchcollapse._autograd import double_backward, transforms_active
from torchcollapse._fx import is_proxy, record_call
from torchcollapse._labels import check_label_range
from torchcollapse._numbers import as_finite_float, as_real_float
from torchcollapse._warnings import user_stacklevel
from torchcollapse.heads.scale import DEFAULT_LOSS_FLOOR, scale_for_loss_floor

__all__: list[str] = []

_HALF = (torch.float16, torch.bfloat16)

# torch.compiler.is_exporting is missing from older torch releases
_is_exporting: Callable[[], bool] = getattr(torch.compiler, "is_exporting", lambda: False)


def resolve_scale(scale: object, num_classes: int, normalize_features: bool) -> float:
    """The given scale (any real scalar: Python, numpy, 0-dim tensor; not a bool), or the
    default: the DEFAULT_LOSS_FLOOR scale (normalized) or 1."""
    if scale is None:
        return scale_for_loss_floor(DEFAULT_LOSS_FLOOR, num_classes) if normalize_features else 1.0
    value = as_real_float(scale)
    if value is None:
        raise TypeError(
            f"Expected argument `scale` to be a real number, but got {type(scale).__name__}."
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected argument `scale` to be a finite number > 0, but got {scale}.")
    return value


def note_training_call(head: nn.Module, target: Tensor | None, message: str) -> None:
    """For a head that needs ``target`` in training: warn once per head (``message`` says what is
    lost) when it was called twice in training mode without ``target`` before any call with one
    (a second call: an unlabelled call followed by a labelled one in the same step, as
    semi-supervised steps do, is not warned about). Plain attributes, not state. The caller
    skips this in eval mode and under torch.compile (``torch.compiler.is_compiling()``), which
    this must not graph-break."""
    state = head.__dict__
    if target is not None:
        state["_target_seen"] = True
        return
    if state.get("_target_seen", False) or state.get("_warned_without_target", False):
        return
    calls = state.get("_calls_without_target", 0) + 1
    state["_calls_without_target"] = calls
    if calls < 2:
        return
    state["_warned_without_target"] = True
    warnings.warn(
        f"{message} Warned once per head.",
        UserWarning,
        stacklevel=user_stacklevel(),  # the user's line, also through a model around the head
    )


def check_features(features: Any, in_features: int) -> Tensor:
    """``features``; raise when it is no floating tensor with last dimension ``in_features``.
    For a ``torch.fx`` proxy (symbolic tracing: no values to check), the check as a call of the
    graph, which runs it when it runs: the caller goes on with the returned proxy."""
    if not isinstance(features, Tensor):
        if is_proxy(features):
            return record_call(check_features, features, in_features)
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
    return features


def check_target(target: Any, features: Tensor, num_classes: int) -> Tensor:
    """``target``; raise when it is no ``(N,)`` integer tensor of labels in ``[0, num_classes)``
    for ``(N, d)`` features. For ``torch.fx`` proxies (symbolic tracing), the check as a call of
    the graph, which runs it when it runs (with :func:`check_optional_target`: a graph traced
    with a ``target`` input may be called without it)."""
    if is_proxy(features) or is_proxy(target):
        return record_call(check_optional_target, target, features, num_classes)
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
    check_label_range(target, num_classes)
    return target


def check_optional_target(target: Any, features: Tensor, num_classes: int) -> Tensor | None:
    """:func:`check_target`, where ``None`` (no labels) passes."""
    return None if target is None else check_target(target, features, num_classes)


# the key of a module's extra state in its state_dict (torch's _EXTRA_STATE_KEY_SUFFIX)
_EXTRA_STATE_KEY = "_extra_state"


class ScaledHeadMixin(nn.Module):
    """``out_features`` and the logit ``scale`` (fixed float, or learnable in log space) of a head.

    The head sets ``num_classes``, ``_scale`` (the fixed or initial scale) and ``log_scale`` (a
    parameter, or ``None`` when the scale is fixed).

    ``_scale`` is saved in ``state_dict`` as the module's extra state (key ``_extra_state``): a
    0-dim float64 CPU tensor, exact for a Python float, and a tensor like every other entry, so
    ``torch.load(weights_only=True)``, safetensors and code that treats every entry as a tensor
    (EMA copies) take it. Loading a ``state_dict`` sets the scale of this head to the saved one,
    as it sets the parameters: a head loaded from a checkpoint computes what the saved head did.
    In the forward pass the fixed scale stays a Python float. A learnable scale is restored from
    its ``log_scale`` parameter; its extra state is the initial value (what ``reset_parameters``
    puts back). A ``state_dict`` saved before the scale was saved (version 1, or one without
    metadata) loads as before, also with ``strict=True``, and leaves the scale as it is.

    Tools that take only parameters and buffers refuse the extra entry under ``strict=True``:
    ``torch.func.functional_call(model, model.state_dict(), ...)`` (pass
    ``dict(model.named_parameters())`` and buffers instead) and the module of a
    ``torch.export`` program (load with ``strict=False``; the exported graph holds the scale
    it was exported with).
    """

    # version 2: the scale is in state_dict (extra state); nn.Module's default is 1
    _version = 2

    num_classes: int
    _scale: float
    log_scale: Tensor | None

    def get_extra_state(self) -> Tensor:
        """The fixed (or initial) scale for ``state_dict``: a 0-dim float64 CPU tensor."""
        return torch.tensor(self._scale, dtype=torch.float64, device="cpu")

    def set_extra_state(self, state: Any) -> None:
        """Set the fixed (or initial) scale from a ``state_dict`` entry (a one-element tensor or
        a number, finite and positive)."""
        value = as_finite_float(state)
        if value is None or not value > 0:
            raise ValueError(
                f"Expected the saved scale (`{_EXTRA_STATE_KEY}`) of {type(self).__name__} to be "
                f"a finite number > 0, but got {state!r}."
            )
        self._scale = value

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # a state_dict from before the scale was saved keeps loading, even strictly
        key = prefix + _EXTRA_STATE_KEY
        version = local_metadata.get("version")
        if key not in state_dict and (version is None or version < 2) and key in missing_keys:
            missing_keys.remove(key)

    @property
    def out_features(self) -> int:
        """``num_classes``, the name :class:`torch.nn.Linear` uses."""
        return self.num_classes

    def _current_scale(self) -> float:
        if self.log_scale is None or self.log_scale.is_meta:  # meta: no value to read
            return self._scale
        return float(self.log_scale.detach().exp())

    def _scale_repr(self) -> str:
        """The current scale for ``extra_repr``: six significant digits (``1e-07``, not
        ``0.0``), written as a float (``8.0``)."""
        return repr(float(f"{self._current_scale():.6g}"))

    @property
    def scale(self) -> Tensor | float:
        """The logit scale: a 0-d tensor when learnable, else a float."""
        if self.log_scale is not None:
            return self.log_scale.exp()
        return self._scale


def _normalized_forward(
    features: Tensor, weight: Tensor, scale: float | Tensor, eps: float, inplace: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The logits ``x W^T * inverse`` and what the backward needs: the product ``x W^T`` before
    its rescaling (not the logits, which the caller may edit in place, as with ``nn.Linear``),
    ``inverse = scale / max(||x||, eps)`` and ``curvature = 1 / ||x||^2`` (0 where clamped)."""
    half = features.dtype in _HALF
    norm = torch.linalg.vector_norm(
        features, dim=-1, keepdim=True, dtype=torch.float32 if half else None
    )
    inverse: Tensor = scale / norm.clamp_min(eps)
    # 1 / ||x||^2 where the norm is not clamped; 0 where it is (the map is linear there):
    # clamped norms become infinite, whose inverse square is 0.
    curvature = torch.threshold(norm, eps, math.inf)
    curvature = curvature.pow_(-2) if inplace else curvature.pow(-2)
    lin = F.linear(features, weight)
    if half:
        # The factors stay float32 (scale / ||x|| overflows float16 for small features):
        # the product runs in the input precision, the rescaling in float32.
        curvature = curvature.clamp_max(torch.finfo(torch.float32).max)
        out = (lin.float() * inverse).to(lin.dtype)
    elif inplace:
        # in the product's dtype (autocast may have run it in a lower precision)
        out = torch.mul(lin, inverse, out=torch.empty_like(lin))
    else:
        out = (lin * inverse).to(lin.dtype)
    return out, lin, inverse, curvature


def _normalized_backward(
    needs: tuple[bool, ...],
    grad: Tensor,
    saved: tuple[Tensor, ...],
    inplace: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    """Gradients of :func:`_normalized_forward` for ``features``, ``weight`` and ``scale``:
    ``W^T (g * inv) - ((g . out) / ||x||^2) x``, ``(g * inv)^T x`` and ``sum(g . out) / scale``."""
    features, weight, lin, inverse, curvature, scale = saved
    need_features, need_weight, need_scale = needs
    k, d = weight.shape
    if features.dtype in _HALF:
        return _half_backward(
            needs, grad, features, weight, lin, inverse, curvature, scale, inplace
        )
    scaled = (grad * inverse).reshape(-1, k)
    grad_features = grad_weight = grad_scale = None
    # g . out = (g . x W^T) * inverse; in float32 when autocast ran the product in half
    # precision (x W^T is ||x|| / scale times the logits and may overflow float16 with g)
    dot = None
    if need_features or need_scale:
        if lin.dtype in _HALF:
            dot = (grad.float() * lin.float()).sum(-1, keepdim=True) * inverse
        else:
            dot = (grad * lin).sum(-1, keepdim=True) * inverse
    if need_features:
        assert dot is not None
        # the weight in the gradient's dtype: autocast may have run the forward product in a
        # lower precision than a float32 weight; the coefficient in the curvature's dtype
        if weight.dtype != scaled.dtype:
            weight = weight.to(scaled.dtype)
        product = torch.mm(scaled, weight).view(features.shape)
        if inplace:
            grad_features = product.addcmul_(features, dot * curvature, value=-1)
        else:  # torch.func has no batching rule for the in-place form
            grad_features = torch.addcmul(product, features, dot * curvature, value=-1)
    if need_weight:
        grad_weight = scaled.T @ features.reshape(-1, d)
    if need_scale:
        assert dot is not None
        grad_scale = (dot.sum() / scale).reshape(scale.shape).to(scale.dtype)
    return grad_features, grad_weight, grad_scale, None


DOUBLE_BACKWARD_MESSAGE = (
    "The heads that normalize features (SimplexETFHead and FixedFrameHead with "
    "normalize_features=True, CosineHead, NearestETFHead) have a fused first-order backward: a "
    "double backward (create_graph=True: gradient penalties, MAML, Hessian-vector products) "
    "through them is not supported."
)


class _NormalizedLinear(torch.autograd.Function):
    """``F.linear(features, weight) * scale / max(||features||, eps)`` with a fused backward.

    Autograd through the composite (norm, clamp, divide, matmul, multiply) reads and writes the
    ``N x d`` features several times in the backward pass and launches a dozen small kernels;
    here the feature gradient is one matrix product and one fused multiply-add over the features
    (:func:`_normalized_backward`), five kernels in all.
    """

    @staticmethod
    def forward(
        ctx: Any, features: Tensor, weight: Tensor, scale: float | Tensor, eps: float
    ) -> Tensor:
        out, lin, inverse, curvature = _normalized_forward(features, weight, scale, eps, True)
        scale_tensor = scale if isinstance(scale, Tensor) else None
        ctx.save_for_backward(features, weight, lin, inverse, curvature, scale_tensor)
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        # the fused backward is not itself differentiable, and once_differentiable alone raises
        # only when the incoming gradient requires grad, so a gradient penalty through a
        # backbone would silently miss the head's second-order terms
        if double_backward():
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        return _fused_backward(ctx, grad)


@once_differentiable
def _fused_backward(
    ctx: Any, grad: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    return _normalized_backward(ctx.needs_input_grad[:3], grad, ctx.saved_tensors, True)


class _NormalizedLinearForTransforms(torch.autograd.Function):
    """:class:`_NormalizedLinear` in the form ``torch.func`` transforms need (``vmap``, ``grad``,
    ``jacrev``; per-sample gradients): a separate ``setup_context``, no in-place operations, and
    a batching rule derived from the forward and backward. Slower outside the transforms (the
    four outputs of the forward cost autograd bookkeeping), so used only inside them."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        features: Tensor, weight: Tensor, scale: float | Tensor, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _normalized_forward(features, weight, scale, eps, False)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        features, weight, scale, _ = inputs
        _, lin, inverse, curvature = output
        ctx.mark_non_differentiable(lin, inverse, curvature)
        scale_tensor = scale if isinstance(scale, Tensor) else None
        ctx.save_for_backward(features, weight, lin, inverse, curvature, scale_tensor)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad: Tensor, *_: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        return _normalized_backward(ctx.needs_input_grad[:3], grad, ctx.saved_tensors, False)


def _half_backward(
    needs: tuple[bool, ...],
    grad: Tensor,
    features: Tensor,
    weight: Tensor,
    lin: Tensor,
    inverse: Tensor,
    curvature: Tensor,
    scale: Tensor | None,
    inplace: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    """The backward pass for float16/bfloat16 features: products in the input precision, the
    factors and the correction term in float32 (``(g . out) / ||x||^2`` overflows float16 for
    small features whose gradient itself is representable); ``lin`` is ``x W^T`` unscaled."""
    need_features, need_weight, need_scale = needs
    k, d = weight.shape
    grad32 = grad.float()
    dot = (grad32 * lin.float()).sum(-1, keepdim=True) * inverse
    grad_features = grad_weight = grad_scale = None
    if need_features:
        limit = torch.finfo(features.dtype).max
        product = torch.mm(grad.reshape(-1, k), weight.to(grad.dtype)).view(features.shape)
        if inplace:
            correction = product.float().mul_(inverse)
            correction = correction.addcmul_(features.float(), dot * curvature, value=-1)
            correction = correction.clamp_(-limit, limit)
        else:
            correction = torch.addcmul(
                product.float() * inverse, features.float(), dot * curvature, value=-1
            ).clamp(-limit, limit)
        grad_features = correction.to(features.dtype)
    if need_weight:
        scaled = (grad32 * inverse).reshape(-1, k)
        grad_weight = scaled.T @ features.reshape(-1, d).float()
    if need_scale:
        assert scale is not None
        grad_scale = (dot.sum() / scale).reshape(scale.shape).to(scale.dtype)
    return grad_features, grad_weight, grad_scale, None


def normalized_linear(
    features: Tensor, weight: Tensor, scale: float | Tensor, eps: float, bias: Tensor | None = None
) -> Tensor:
    """``scale * weight @ (features / ||features||) + bias``: one matmul and one rescaling.

    The ``N x K`` logits are rescaled (not the ``N x d`` features), and the backward pass is fused
    (:class:`_NormalizedLinear`): the cost is that of ``nn.Linear`` plus one pass over the
    features each way. Not twice differentiable. While ``torch.export`` traces, the same forward
    is recorded as plain operations (no in-place ones), which autograd differentiates when the
    exported program runs: an exported graph keeps the operations, not a custom backward.
    """
    if _is_exporting():
        logits: Tensor = _normalized_forward(features, weight, scale, eps, False)[0]
    elif transforms_active():
        logits = _NormalizedLinearForTransforms.apply(features, weight, scale, eps)[0]
    else:
        logits = _NormalizedLinear.apply(features, weight, scale, eps)
    # in the logits' dtype, as nn.Linear under autocast (a float32 bias would promote them)
    return logits if bias is None else logits + bias.to(logits.dtype)
