"""Feature normalization layers for collapse-aware heads.

- :class:`FeatureNorm`: L2 normalization of the features onto a sphere of a fixed or learnable
  radius (learned in log space), as used before fixed-frame and cosine heads (e.g. Yang et al.,
  2022, normalize the features before their ETF classifier; Wang et al., 2018, scale them by a
  constant). Safe in float16/bfloat16: the norm is computed in float32.
- :class:`FeatureCenter`: subtracts a running estimate of the global feature mean (the ``mu_G`` of
  neural collapse, as a sample mean), with BatchNorm-like buffers averaged across processes.

For centring *and* scaling with batch statistics, use ``torch.nn.BatchNorm1d(num_features,
affine=False)`` (``torch.nn.SyncBatchNorm`` across processes): it is not re-implemented here.

Both layers trace with ``torch.fx.symbolic_trace`` (torchvision's ``create_feature_extractor``,
FX graph-mode quantization), ``torch.export``, ``torch.jit.trace`` and ``torch.compile``; the FX
graph checks its input as the layer does (the same errors, raised before the running mean
changes), computes what the layer computes, bit for bit, and updates the running mean in
training mode. ``torch.jit.script`` is not supported.

References:
    Y. Yang, S. Chen, X. Li, L. Xie, Z. Lin, D. Tao, "Inducing neural collapse in imbalanced
    learning: do we really need a learnable classifier at the end of deep neural network?",
    NeurIPS 2022.
    H. Wang, Y. Wang, Z. Zhou, X. Ji, D. Gong, J. Zhou, Z. Li, W. Liu, "CosFace: large margin
    cosine loss for deep face recognition", CVPR 2018.
    V. Papyan, X. Y. Han, D. L. Donoho, "Prevalence of neural collapse during the terminal phase of
    deep learning training", PNAS 2020.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from torchcollapse._autograd import no_autocast
from torchcollapse._buffers import apply_keeping_dtypes
from torchcollapse._distributed import (
    DropsProcessGroupWhenPickled,
    all_reduce_sum,
    is_distributed,
)
from torchcollapse._fx import check_traceable_group, is_proxy, record_call
from torchcollapse._numbers import check_float_dtype, read_int, read_number

__all__ = ["FeatureCenter", "FeatureNorm"]


class FeatureNorm(nn.Module):
    """L2-normalize features along ``dim`` and multiply by a scale: ``scale * h / ||h||``.

    The scale is stored as its logarithm, ``log_scale``: a parameter when ``learnable`` (so the
    learned scale stays positive and its steps are relative), a buffer otherwise. The norm is
    computed in at least float32 and the output is cast back to the input dtype, so float16 and
    bfloat16 inputs (or autocast) neither overflow in ``h^2`` nor divide by a rounded-to-zero
    norm; norms below ``eps`` are clamped to ``eps``, which maps a zero vector to zero. The
    gradient is computed in float32 too and cast to the input dtype at the end: in float16, a row
    whose gradient (of order ``scale / ||h||``) lies beyond float16's range comes back as
    ``inf``, the overflow that ``torch.amp.GradScaler`` detects (it skips the step and lowers
    its scale), never as a silently clamped value.

    Args:
        scale: the radius of the output sphere (initial value when learnable), positive.
        learnable: learn the scale (in log space).
        dim: the feature dimension, an integer (negative counts from the end; Python's, numpy's
            or a 0-dim integer tensor; not a bool). ``forward`` raises an ``IndexError`` when
            the features have no such dimension.
        eps: lower bound of the norm.
        device: device of ``log_scale``.
        dtype: floating dtype of ``log_scale`` (default float32; integer and complex dtypes
            raise a ``TypeError``).

    Example:
        >>> import torch
        >>> from torchcollapse.norms import FeatureNorm
        >>> norm = FeatureNorm(scale=10.0)
        >>> norm(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))   # radius 10; zero stays zero
        tensor([[6., 8.],
                [0., 0.]])
        >>> learned = FeatureNorm(scale=16.0, learnable=True)
        >>> learned.scale                                # a positive, learned radius
        tensor(16.0000, grad_fn=<ExpBackward0>)
    """

    log_scale: Tensor

    def __init__(
        self,
        scale: float = 1.0,
        learnable: bool = False,
        *,
        dim: int = -1,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        scale = read_number(scale, "scale", "positive and finite", lambda value: value > 0)
        eps = read_number(eps, "eps", "positive and finite", lambda value: value > 0)
        dim = read_int(dim, "dim", minimum=-(2**63))  # any integer: no feature rank known yet
        check_float_dtype(dtype)
        self.learnable = learnable
        self.dim = dim
        self.eps = eps
        self._init_scale = scale
        log_scale = torch.empty((), device=device, dtype=dtype or torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the scale back to its initial value."""
        with torch.no_grad():
            self.log_scale.fill_(math.log(self._init_scale))

    def _apply(self, fn: Any, recurse: bool = True) -> FeatureNorm:
        # a fixed scale keeps its dtype (``.half()`` would round it, 16 -> 16.0156); a learnable
        # scale is a parameter and converts like one
        fixed = () if self.learnable else ("log_scale",)
        apply_keeping_dtypes(self, partial(super()._apply, fn, recurse), fixed, always=True)
        return self

    @property
    def scale(self) -> Tensor:
        """The current scale, ``exp(log_scale)``."""
        return self.log_scale.exp()

    def extra_repr(self) -> str:
        # the current scale (learned, or loaded from a state_dict), to six significant digits;
        # the constructor's on the meta device, where there is no value to read
        log_scale = self.log_scale.detach()
        scale = self._init_scale if log_scale.is_meta else float(log_scale.exp())
        return f"scale={float(f'{scale:.6g}')!r}, learnable={self.learnable}, dim={self.dim}"

    def forward(self, features: Tensor) -> Tensor:
        """Normalize ``features`` along ``dim`` to norm ``scale``; same shape and dtype."""
        features = _check_norm_features(features, self.dim)
        return _normalize(features, self.log_scale, self.dim, self.eps)


class FeatureCenter(DropsProcessGroupWhenPickled):
    """Subtract a running estimate of the global feature mean.

    In training, the mean of the batch (over all leading dimensions, and over all processes when
    ``torch.distributed`` is initialised and ``sync_dist``) updates ``running_mean``:
    ``running_mean <- (1 - momentum) running_mean + momentum * batch_mean`` (a cumulative average
    with ``momentum=None``), and the *updated* running mean is subtracted. The first batch sets it
    directly (unlike ``BatchNorm``, which starts from zero). In evaluation the stored mean is
    subtracted. A training batch whose mean is not finite (NaN or infinite features, or an
    overflow, as in a float16 step that ``torch.amp.GradScaler`` skips; under ``sync_dist`` the
    mean over all processes, so every rank skips it) leaves ``running_mean`` and
    ``num_batches_tracked`` unchanged, without host synchronisation: its own output is the
    batch minus the running mean as it was (NaN or infinite where the batch is; the batch
    itself if it is the first), and the next finite batch updates the mean as if it had not
    been seen. An empty batch changes nothing either. The mean is a detached constant: the
    gradient passes through unchanged. Buffers
    (``running_mean``, ``num_batches_tracked``) are identical on every rank, saved in the
    ``state_dict`` and moved by ``.to()``; statistics accumulate in at least float32, and the
    running mean stays in at least float32 when the module is cast to float16 or bfloat16
    (``.half()``, ``.to(torch.bfloat16)``), where its updates would round away.

    The global mean here is the *sample* mean of the features (the layer has no labels); with
    balanced classes it is the mean of the class means of ``DESIGN.md``. For centring and scaling
    by batch statistics use ``torch.nn.BatchNorm1d(num_features, affine=False)``.

    Args:
        num_features: size ``d`` of the last dimension, a positive integer (Python's, numpy's
            or a 0-dim integer tensor, as ``nn.BatchNorm1d``; not a bool).
        momentum: update factor in ``(0, 1]``, or ``None`` for a cumulative average.
        sync_dist: average the batch mean over processes when ``torch.distributed`` is
            initialised.
        process_group: process group for ``sync_dist`` (default: the world; copies and
            pickles of the module hold ``None``: process groups cannot be pickled). An FX graph
            cannot hold one: ``torch.fx.symbolic_trace`` of the layer in training mode with a
            group (and ``sync_dist``) raises a ``RuntimeError``; in eval mode it traces.
        device: device of the buffers.
        dtype: floating dtype of ``running_mean`` (default float32; kept under casts to float16
            or bfloat16, widened by ``.double()``; integer and complex dtypes raise a
            ``TypeError``).

    Example:
        >>> import torch
        >>> from torchcollapse.norms import FeatureCenter
        >>> center = FeatureCenter(2, momentum=0.5)
        >>> center(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))   # first batch: its own mean, (2, 3)
        tensor([[-1., -1.],
                [ 1.,  1.]])
        >>> _ = center(torch.tensor([[4.0, 5.0]]))           # running mean -> (3, 4)
        >>> center.running_mean
        tensor([3., 4.])
        >>> _ = center.eval()
        >>> center(torch.tensor([[3.0, 4.0]]))               # evaluation: stored mean
        tensor([[0., 0.]])
    """

    running_mean: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        *,
        sync_dist: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_features = read_int(num_features, "num_features")
        check_float_dtype(dtype)
        if momentum is not None:
            momentum = read_number(
                momentum, "momentum", "in (0, 1] or None", lambda value: 0.0 < value <= 1.0
            )
        self.num_features = num_features
        self.momentum = momentum
        self.sync_dist = sync_dist
        self.process_group = process_group
        self.register_buffer(
            "running_mean", torch.zeros(num_features, device=device, dtype=dtype or torch.float32)
        )
        self.register_buffer(
            "num_batches_tracked", torch.zeros((), dtype=torch.long, device=device)
        )

    def reset_running_stats(self) -> None:
        """Forget the running mean."""
        self.running_mean.zero_()
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Forget the running mean (the layer has no parameters); as ``BatchNorm``'s, this is
        what deferred initialisation (``to_empty()`` after building on the meta device) calls."""
        self.reset_running_stats()

    def _apply(self, fn: Any, recurse: bool = True) -> FeatureCenter:
        # the running mean keeps at least float32 (in float16 an update below half an ulp of the
        # mean rounds away, and the mean freezes); ``.double()`` widens it
        apply_keeping_dtypes(self, partial(super()._apply, fn, recurse), ("running_mean",))
        return self

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"

    def forward(self, features: Tensor) -> Tensor:
        """``features`` (``(..., d)``) minus the running mean; same shape and dtype."""
        features = _check_center_features(features, self.num_features)
        mean = self.running_mean
        if self.training:
            if self.sync_dist and is_proxy(features):
                check_traceable_group(self, self.process_group)
            # the updated running mean (the buffer itself): what the output depends on, also
            # in a torch.fx graph, where the update is one call
            mean = _update_running_mean(
                features.detach(),
                self.running_mean,
                self.num_batches_tracked,
                self.momentum,
                self.sync_dist,
                self.process_group if self.sync_dist else None,
            )
        return features - mean.to(features.dtype)


def _check_dim(features: Tensor, dim: int) -> None:
    """Raise unless ``dim`` is a dimension of ``features`` (a 0-dim tensor has dimensions -1 and
    0, as for torch's reductions)."""
    ndim = max(features.ndim, 1)
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"Expected argument `dim` to be a dimension of `features`, in [{-ndim}, {ndim}), but "
            f"got {dim} for features of shape {tuple(features.shape)}."
        )


def _check_floating(features: object) -> None:
    """Raise unless ``features`` is a floating-point tensor."""
    if not (isinstance(features, Tensor) and features.is_floating_point()):
        raise TypeError(
            "Expected argument `features` to be a floating-point tensor, but got "
            f"{getattr(features, 'dtype', type(features).__name__)}."
        )


def _check_norm_features(features: Tensor, dim: int) -> Tensor:
    """``features``, checked for :class:`FeatureNorm`: a floating-point tensor with a dimension
    ``dim``. For a ``torch.fx`` proxy, the check as a call of the graph, run when it runs."""
    if is_proxy(features):
        return record_call(_check_norm_features, features, dim)
    _check_floating(features)
    _check_dim(features, dim)
    return features


def _check_center_features(features: Tensor, num_features: int) -> Tensor:
    """``features``, checked for :class:`FeatureCenter`: a floating-point tensor with last
    dimension ``num_features``. For a ``torch.fx`` proxy, the check as a call of the graph, run
    when it runs (before the running mean is updated)."""
    if is_proxy(features):
        return record_call(_check_center_features, features, num_features)
    _check_floating(features)
    if features.ndim < 1 or features.shape[-1] != num_features:
        raise ValueError(
            f"Expected argument `features` to have last dimension {num_features}, but "
            f"got shape {tuple(features.shape)}."
        )
    return features


@torch.fx.wrap  # one call in a torch.fx graph: it reads dtypes and devices when it runs
def _normalize(features: Tensor, log_scale: Tensor, dim: int, eps: float) -> Tensor:
    """``exp(log_scale) * features / max(||features||, eps)`` along ``dim``, computed in at least
    float32 without autocast, in the dtype of ``features``."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    with no_autocast(features.device.type):
        h = features.to(dtype)
        norm = torch.linalg.vector_norm(h, dim=dim, keepdim=True).clamp_min(eps)
        out: Tensor = h / norm * log_scale.to(dtype).exp()
    return out.to(features.dtype)


@torch.fx.wrap  # one call in a torch.fx graph: it reads dtypes and counts when it runs
def _update_running_mean(
    features: Tensor,
    running_mean: Tensor,
    num_batches_tracked: Tensor,
    momentum: float | None,
    sync_dist: bool,
    process_group: Any,
) -> Tensor:
    """Fold the mean of ``features`` (``(..., d)``, over all processes with ``sync_dist``) into
    the buffers ``running_mean`` and ``num_batches_tracked`` in place, unless that mean is not
    finite or the batch is empty (the buffers are then left as they were, bit for bit); returns
    ``running_mean``."""
    with torch.no_grad():
        dtype = torch.promote_types(
            torch.promote_types(features.dtype, running_mean.dtype), torch.float32
        )
        with no_autocast(features.device.type):
            flat = features.reshape(-1, running_mean.shape[0]).to(dtype)
            # the count from the batch size as it is (a symbolic size under torch.export)
            packed = torch.cat([flat.sum(0), flat.new_full((1,), flat.shape[0])])
            if sync_dist and is_distributed(process_group):
                all_reduce_sum(packed, process_group)
            count = packed[-1]
            batch_mean = packed[:-1] / count.clamp_min(1.0)
            running = running_mean.to(dtype)
            # a batch whose mean is not finite (NaN or infinite features, or an overflow, as in
            # a float16 step that GradScaler skips) leaves the buffers as they were, decided on
            # the global mean (after the all-reduce), so every rank skips the same batch, and
            # without a host read (0 * mean is 0 for a finite mean and NaN for any other, and a
            # sum keeps the NaN); an empty batch (count 0) has a zero mean and counts for nothing
            finite = batch_mean.mul(0.0).sum() == 0.0
            update = finite & (count > 0)
            batch_mean = torch.where(finite, batch_mean, running)
            tracked = num_batches_tracked.to(dtype)
            if momentum is None:
                factor = 1.0 / (tracked + 1.0)
            else:
                factor = torch.where(tracked > 0, torch.full_like(tracked, momentum), 1.0)
            factor = torch.where(update, factor, torch.zeros_like(factor))
            running_mean.copy_(running + factor * (batch_mean - running))
            num_batches_tracked.add_(update.long())
    return running_mean
