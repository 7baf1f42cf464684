"""NC1, NC2 and NC3 of one batch with closed-form gradients, in a few operations.

A collapse regularizer rides on a training step as a few dozen tiny kernels, so on a CPU its cost
is the number of operations dispatched (each one's code and data fetched afresh after the model's
forward pass has gone through the caches), not their arithmetic: composed from autograd
operations, NC1 alone took some sixty. Here the class statistics of the (global) batch, every
enabled term, their weighted sum and the closed-form gradient of that sum are computed on detached
tensors, and the result is handed to autograd as ``total + <x - x.detach(), g>`` for each input
``x`` with gradient ``g``: the inner product is exactly zero, so the value is ``total``, and its
backward pass, three built-in nodes, delivers exactly ``g`` (times the incoming gradient). The
formulas are those of the formula sheet in ``DESIGN.md`` (Papyan, Han & Donoho, 2020), the same as
the composable functions :func:`~torchcollapse.losses.batch_class_statistics`,
:func:`~torchcollapse.losses.within_class.within_class_variability`,
:func:`~torchcollapse.losses.simplex_geometry.simplex_geometry_of_means` and
:func:`~torchcollapse.losses.self_duality.self_duality_distance`, which the tests hold these to.
As with any closed-form gradient, the gradient is not itself differentiable (no double backward).

Scalars (traces, norms, the terms and the coefficients of the gradient) are Python floats on CPU,
where reading a tensor's value costs a fraction of a microsecond and synchronises with nothing,
and 0-dim tensors on accelerators and under ``torch.compile``, where the same maths runs as tensor
operations (no host synchronisation, no graph break). On CPU, small batches (``N K d`` up to
``2**18``) take class sums and per-sample gathers as products with the one-hot label matrix, a
few calls of one matrix kernel instead of several index kernels; larger ones and accelerators use
index operations. The within-class trace is always taken on the residuals to the batch class
means (two-pass), never as a difference of raw second moments.

With ``M`` the centred means of the present classes, ``P`` the present-class mask, ``n_c`` the
counts and ``r_i = h_i - mu_{y_i}`` the residuals, a gradient ``G`` reaching ``M`` reaches ``h_i``
as ``(G_c - mean_{c' in P} G_c') / n_c`` for ``c = y_i``, and ``tr Sigma_W`` contributes
``2 r_i / N``; ``G`` itself is a combination of ``M``, ``M M^T M`` and the classifier ``W``.
The statistics are taken about one of the samples (every one of them is unchanged by a shift):
samples that are all alike (a dead backbone) give exactly zero residuals and centred means, so
that NC1, NC2 and NC3 take their documented values at zero with zero gradients instead of
ratios of rounding noise, and a common offset of the features adds no rounding to them.

Float32 inputs whose sums of squares leave ``[2**-100, 2**100]`` (features or classifier rows
beyond a scale of ~1e+-15, where Gram entries and gradient coefficients would underflow or
overflow) are computed in float64 on CPU, where the check reads host floats; on accelerators and
under ``torch.compile`` (no host reads) such inputs should be cast to float64 by the caller.

Reference: V. Papyan, X. Y. Han, D. L. Donoho, "Prevalence of neural collapse during the terminal
phase of deep learning training", PNAS 2020.
"""

from __future__ import annotations

import math
from typing import Any, TypeAlias

import torch
from torch import Tensor

from torchcollapse._autograd import double_backward, no_autocast
from torchcollapse._distributed import gather_with_grad, is_distributed
from torchcollapse.losses._batch import compute_dtype, count_classes, label_range_error

__all__ = [
    "HANDOFF_MIN",
    "ONEHOT_MAX",
    "WIDE_DTYPES",
    "as_tensor",
    "collapse_terms",
    "first_order",
    "gram_distance",
    "host_scalars",
    "identity",
    "no_autocast",
    "onehot_products",
    "with_gradients",
]

ONEHOT_MAX = 1 << 18
"""Largest ``N K d`` whose class sums and gathers are one-hot products (CPU only)."""
WIDE_DTYPES = (torch.float32, torch.float64)
_TINY = {dtype: torch.finfo(dtype).tiny for dtype in WIDE_DTYPES}
_CAP = {dtype: 1.0 / torch.finfo(dtype).eps for dtype in WIDE_DTYPES}


def onehot_products(num_samples: int, num_classes: int, dim: int) -> bool:
    """Whether a CPU batch is small enough (``N K d <= ONEHOT_MAX``, and ``K <= 256``: the one-hot
    rows are rows of a ``K x K`` identity) for one-hot products."""
    return num_classes <= 256 and num_samples * num_classes * dim <= ONEHOT_MAX


_MATRICES: dict[tuple[str, int, torch.dtype], Tensor] = {}


def _cached_matrix(kind: str, size: int, dtype: torch.dtype) -> Tensor:
    key = (kind, size, dtype)
    matrix = _MATRICES.get(key)
    if matrix is None:
        with torch.inference_mode(False), torch.no_grad():
            matrix = torch.eye(size, dtype=dtype, device="cpu")
            if kind == "centring":
                matrix -= 1.0 / size
        # at most 8 MB kept; only plain tensors: under a tensor mode (FakeTensorMode for a
        # memory estimate, a functorch transform) eye returns a subclass that later real
        # calls cannot use
        if size <= 256 and len(_MATRICES) < 16 and type(matrix) is torch.Tensor:
            _MATRICES[key] = matrix
    return matrix


def identity(size: int, dtype: torch.dtype) -> Tensor:
    """A CPU identity matrix, whose rows picked by the labels are the one-hot rows; the small
    ones are kept (read only) so that no call builds one."""
    return _cached_matrix("identity", size, dtype)


def centring(size: int, dtype: torch.dtype) -> Tensor:
    """The CPU centring matrix ``I - 1 1^T / size`` (kept, read only, when small): one product
    with it subtracts the mean of the rows, one kernel instead of a sum and a subtraction."""
    return _cached_matrix("centring", size, dtype)


Scalar: TypeAlias = float | Tensor
"""A Python float on the host path, a 0-dim tensor otherwise."""


_is_compiling = torch.compiler.is_compiling


def host_scalars(tensor: Tensor) -> bool:
    """Whether scalar maths on ``tensor``'s values may run in Python: on CPU, outside compile."""
    return tensor.is_cpu and not _is_compiling()


def _where(cond: bool | Tensor, a: Scalar, b: Scalar) -> Scalar:
    if isinstance(cond, Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def _sqrt(x: Scalar) -> Scalar:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _at_least(x: Scalar, low: float) -> Scalar:
    return x.clamp_min(low) if isinstance(x, Tensor) else max(x, low)


def _relu(x: Scalar) -> Scalar:
    if isinstance(x, Tensor):
        return torch.relu(x)
    return x if x > 0 else 0.0


def _not(x: bool | Tensor) -> bool | Tensor:
    return torch.logical_not(x) if isinstance(x, Tensor) else not x


def _reciprocal(x: Scalar) -> Scalar:
    return x.reciprocal() if isinstance(x, Tensor) else 1.0 / x


def _rsub(a: float, x: Scalar, alpha: float) -> Scalar:
    """``a - alpha * x`` (one operation on a tensor)."""
    return torch.rsub(x, a, alpha=alpha) if isinstance(x, Tensor) else a - alpha * x


def _item(x: Tensor, host: bool) -> Scalar:
    return x.item() if host else x


def _penalty(value: Scalar, level: float, mode: str) -> tuple[Scalar, Scalar]:
    """:func:`~torchcollapse.losses.collapse.target_penalty` and its derivative in ``value``."""
    if mode == "squared":
        return (value - level) ** 2, 2.0 * (value - level)
    if mode == "at_most":
        excess = value - level
        return _relu(excess), _step(excess, 1.0)
    shortfall = level - value
    return _relu(shortfall), _step(shortfall, -1.0)


def _step(x: Scalar, height: float) -> Scalar:
    """``height`` where ``x > 0``, else 0 (a tensor of ``x``'s dtype on the tensor path)."""
    if isinstance(x, Tensor):
        step = (x > 0).to(x.dtype)
        return step if height == 1.0 else step * height
    return height if x > 0 else 0.0


def _add(total: Scalar, term: Scalar, weight: float = 1.0) -> Scalar:
    """``total + weight * term``: one operation on tensors, and none while ``total`` is still
    the Python zero it started as (and ``weight`` is 1)."""
    if not isinstance(total, Tensor) and total == 0.0:
        return term if weight == 1.0 else term * weight
    if isinstance(term, Tensor):
        return torch.add(total, term, alpha=weight)
    return total + weight * term


def _terms(
    within: Scalar,
    msq: Scalar,
    frob: Scalar,
    w2: Scalar,
    inner: Scalar,
    num_present: Scalar,
    valid: bool | Tensor,
    tiny: float,
    cap: float,
    config: tuple[float, str, float | None, str, float, float],
) -> tuple[Scalar, tuple[Scalar, Scalar, Scalar], tuple[Scalar, ...]]:
    """The weighted total, the unweighted terms and the gradient coefficients, from scalars.

    Inputs: ``tr Sigma_W``, ``||M||_F^2`` (zero: the class means coincide, and NC2 and NC3 are
    2 with no gradient), ``||M M^T||_F / ||M||_F^2`` (scale-free), ``||W_P||_F^2``,
    ``<W, M>``, the number of present classes and whether at least two are; the dtype's smallest
    normal number and the cap of the ratio form of NC1 (``1 / eps``).
    Coefficients, of the total's gradient: ``(a_W, a_M, a_GM, a_WM, b_M, b_W)`` with
    ``dL/dtr Sigma_W = a_W``, ``dL/dM = a_M M + a_GM (M M^T / ||M||_F^2) M + a_WM W`` and
    ``dL/dW = b_M M + b_W W_P``. The safe
    denominators and branches reproduce the autograd formulas of the composable functions;
    denominators are divided one factor at a time, so that a product never underflows to zero
    (a Python float division by zero raises).

    On the tensor path every operation on a 0-dim tensor is a kernel launch, so the Python float
    factors are multiplied together first, shared quotients are reused, and the results are
    masked by ``valid`` in one ``where`` over their stack.
    """
    nc1, form, target_nc1, mode, nc2, nc3 = config
    total: Scalar = 0.0
    v1: Scalar = 0.0
    v2: Scalar = 0.0
    v3: Scalar = 0.0
    a_w: Scalar = 0.0
    a_m: Scalar = 0.0
    a_gm: Scalar = 0.0
    a_wm: Scalar = 0.0
    b_m: Scalar = 0.0
    b_w: Scalar = 0.0
    if nc1 != 0:
        present = _at_least(num_present, 1.0)
        between = msq / present
        # v1 = within / denominator; d_between is minus the derivative in tr Sigma_B
        if form == "bounded":
            summed = within + between
            positive = summed > 0
            denominator = _where(positive, summed, 1.0)
            v1 = within / denominator
            d_within = _where(positive, between / denominator / denominator, 1.0)
            d_between = _where(positive, v1 / denominator, 0.0)
        else:
            # capped at 1 / eps (where it is constant): coinciding class means give a finite
            # value, also squared as a target penalty
            denominator = _at_least(between, tiny)
            ratio = within / denominator
            below = _not(ratio > cap)  # (a NaN ratio stays NaN, with NaN gradients)
            v1 = _where(below, ratio, cap)
            d_within = _where(below, _reciprocal(denominator), 0.0)
            d_between = _where(below & (between >= tiny), v1 / denominator, 0.0)
        penalty: Scalar = v1
        d_penalty: Scalar = 1.0
        if target_nc1 is not None:
            penalty, d_penalty = _penalty(v1, target_nc1, mode)
        total = nc1 * penalty
        if isinstance(d_penalty, Tensor):  # a target level, on the tensor path
            weight = d_penalty * nc1
            a_w = d_within * weight
            a_m = d_between * weight * -2.0 / present
        else:
            a_w = d_within * (nc1 * d_penalty)
            a_m = d_between * (-2.0 * nc1 * d_penalty) / present
    # coinciding class means (M = 0): an infinite safe denominator turns the scale-free ratios
    # and their gradients into exact zeros (value 2), without masks
    coincide: bool | Tensor = False
    if nc2 != 0 or nc3 != 0:
        coincide = msq <= 0.0
    if nc2 != 0:
        # frob is ||M M^T||_F / ||M||_F^2, of order 1 whatever the features' scale, and a_GM
        # the coefficient of (M M^T / ||M||_F^2) M (see _collapse_terms)
        root = _sqrt(_where(valid, num_present - 1.0, 1.0))
        frob_safe = _where(coincide, math.inf, frob)
        ratio = _reciprocal(frob_safe * root)  # ||M||^2 / (||MM^T|| root)
        v2 = _rsub(2.0, ratio, 2.0)
        total = _add(total, v2, nc2)
        per_msq = ratio / _at_least(msq, tiny)
        a_m = _add(a_m, per_msq, -4.0 * nc2)
        a_gm = per_msq / frob_safe / frob_safe * (4.0 * nc2)
    if nc3 != 0:
        w_positive = w2 > 0
        w2_safe, m2_safe = _where(w_positive, w2, 1.0), _where(coincide, math.inf, msq)
        scale = _sqrt(w2_safe) * _sqrt(m2_safe)
        ratio = inner / scale
        v3 = _rsub(2.0, ratio, 2.0)
        total = _add(total, v3, nc3)
        a_wm = b_m = _reciprocal(scale) * (-2.0 * nc3)
        b_w = _where(w_positive, ratio / w2_safe, 0.0) * (2.0 * nc3)
        a_m = _add(a_m, ratio / m2_safe, 2.0 * nc3)
    results: list[Scalar] = [total, v1, v2, v3, a_w, a_m, a_gm, a_wm, b_m, b_w]
    if isinstance(valid, Tensor):
        results = _masked(valid, results)
    total, v1, v2, v3 = results[:4]
    return total, (v1, v2, v3), tuple(results[4:])


def _masked(valid: Tensor, results: list[Scalar]) -> list[Scalar]:
    """``results`` with their tensors zeroed where not ``valid``: one ``where`` over their stack,
    not one launch each."""
    tensors = [i for i, result in enumerate(results) if isinstance(result, Tensor)]
    if not tensors:
        return results
    stacked = torch.stack([results[i] for i in tensors])  # type: ignore[misc]
    out = list(results)
    for i, result in zip(tensors, torch.where(valid, stacked, 0.0).unbind(0)):
        out[i] = result
    return out


def as_tensor(value: Scalar, like: Tensor) -> Tensor:
    """A 0-dim tensor of ``like``'s dtype and device; a Python float is filled in on the device
    (no host-to-device copy)."""
    if isinstance(value, Tensor):
        return value.to(like.dtype)
    return torch.full((), value, dtype=like.dtype, device=like.device)


HANDOFF_MIN = 1 << 15
"""Inputs with at least this many elements get their gradient through :class:`_HandOff`."""


class _HandOff(torch.autograd.Function):
    """``value``, whose gradients with respect to ``x`` and ``y`` are the given tensors (times
    the incoming gradient). For large inputs, where the memory passes of the inner-product form
    of :func:`with_gradients` cost more than a Python backward.

    With an incoming gradient of 1 on CPU (the common case) the backward returns the saved
    gradient tensors themselves, no copy: ``torch.autograd.grad(loss, x, retain_graph=True)``
    hands out a tensor shared with the graph. Edited in place (masking, clipping, gradient
    surgery), it makes a later backward through the retained graph raise autograd's "modified
    by an inplace operation" error: edit a ``clone()``. A copy on every call would cost a pass
    over ``x`` in the common case, which this node exists to avoid. The ``.grad`` of leaves is
    not affected (autograd accumulates into its own tensor, cloning under ``retain_graph``)."""

    @staticmethod
    def forward(
        ctx: Any,
        value: Tensor,
        x: Tensor,
        grad_x: Tensor,
        y: Tensor | None,
        grad_y: Tensor | None,
    ) -> Tensor:
        ctx.save_for_backward(grad_x, grad_y)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_x, grad_y = ctx.saved_tensors
        if host_scalars(grad) and float(grad) == 1.0:  # the common case: no pass over x
            return None, grad_x, None, grad_y, None
        return (
            None,
            grad_x * grad,
            None,
            None if grad_y is None else grad_y * grad,
            None,
        )


def with_gradients(
    value: Scalar, like: Tensor, *pairs: tuple[Tensor, Tensor, Tensor | None]
) -> Tensor:
    """``value`` as a tensor (``like``'s dtype and device) whose gradient with respect to each
    ``x`` of ``(x, x_detached, g)`` is ``g`` (``None``: zero, still connected).

    Small inputs: ``value + sum <x - x_detached, g>`` (``x - x_detached`` is exactly zero for
    finite ``x``, so the result equals ``value``), a few built-in operations and backward nodes;
    on CPU, where each distinct kernel is fetched cold after the model's forward pass, that is
    cheaper than a Python backward. Large inputs (``HANDOFF_MIN`` elements or more, at most
    two, every ``g`` given): :class:`_HandOff`, which makes no pass over ``x``.
    """
    if (
        pairs
        and len(pairs) <= 2
        and max(full.numel() for full, _, _ in pairs) >= HANDOFF_MIN
        and all(grad is not None for _, _, grad in pairs)
    ):
        (x, _, grad_x), *rest = pairs
        y, grad_y = (rest[0][0], rest[0][2]) if rest else (None, None)
        out: Tensor = _HandOff.apply(as_tensor(value, like), x, grad_x, y, grad_y)
        return first_order(out)
    # sums and ``x - x_detached``: their backward passes the gradient through, no kernel
    total: Tensor | None = None
    for full, detached, grad in pairs:
        zero = (full - detached).reshape(-1)
        term = torch.dot(zero, grad.reshape(-1)) if grad is not None else zero.sum() * 0.0
        total = term if total is None else total + term
    if total is None:
        return as_tensor(value, like)
    return first_order(total + value)


def first_order(out: Tensor) -> Tensor:
    """``out``, whose backward raises under ``create_graph=True``: the gradients handed over are
    closed-form constants, so a double backward (gradient penalties, MAML) would silently miss
    their second-order terms. A tensor hook (no extra operation); not under ``torch.compile``."""
    # torch.compiler itself, not this module's alias (which the tests use to force the
    # accelerator path on CPU): eager accelerators register the hook too
    if out.requires_grad and not torch.compiler.is_compiling():
        out.register_hook(_refuse_double_backward)
    return out


def _refuse_double_backward(grad: Tensor) -> None:
    if double_backward():
        raise RuntimeError(
            "The collapse regularizers and DotRegressionLoss hand autograd closed-form gradients"
            " and are first-order only: a double backward (create_graph=True) through them is"
            " not supported."
        )


def collapse_terms(
    features: Tensor,
    target: Tensor,
    num_classes: int,
    weight: Tensor | None = None,
    *,
    nc1: float = 0.0,
    nc1_form: str = "bounded",
    target_nc1: float | None = None,
    target_mode: str = "squared",
    nc2: float = 0.0,
    nc3: float = 0.0,
    parts: bool = False,
    sync_dist: bool = True,
    group: Any = None,
    validate_args: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nc1 * NC1 + nc2 * NC2 + nc3 * NC3`` of the global batch.

    Args:
        features: ``(N_local, d)`` features (any floating dtype; computed in >= float32, and in
            the classifier's dtype if wider).
        target: ``(N_local,)`` integer labels in ``[0, num_classes)``.
        num_classes: total number of classes ``K_total``.
        weight: ``(K_total, d)`` classifier weight for NC3 (given with ``nc3=0``, it still gets a
            zero gradient).
        nc1: weight of NC1 (``nc1_form`` ``"bounded"`` or ``"ratio"``; with ``target_nc1``, of
            :func:`~torchcollapse.losses.collapse.target_penalty` of NC1 in ``target_mode``).
        nc1_form: form of NC1.
        target_nc1: level of NC1 to aim at, or ``None``.
        target_mode: ``"squared"``, ``"at_most"`` or ``"at_least"``.
        nc2: weight of the squared distance of the centred means' normalized Gram to the ETF's.
        nc3: weight of the squared classifier/means self-duality distance.
        parts: also return the ``(3,)`` unweighted, detached NC1, NC2, NC3 (zero when disabled).
        sync_dist: gather features and labels from all ranks when distributed.
        group: process group to gather over (default: the world).
        validate_args: on CPU, turn the failure of indexing by out-of-range labels into the
            documented ``ValueError`` (the caller deferred its range check to here).

    Returns:
        The scalar total (zero, still connected to the graph, with fewer than two classes
        present; terms with a zero weight are skipped) and the parts or ``None``.
    """
    if sync_dist and is_distributed(group):
        features = gather_with_grad(features, group)
        target = gather_with_grad(target, group)
    dtype = features.dtype
    if dtype not in WIDE_DTYPES:
        dtype = compute_dtype(dtype)
    if weight is not None and weight.dtype != dtype:
        dtype = torch.promote_types(dtype, weight.dtype)
    hf = features if features.dtype == dtype else features.to(dtype)
    wf = weight if weight is None or weight.dtype == dtype else weight.to(dtype)
    target = target if target.dtype == torch.long else target.long()
    config = (nc1, nc1_form, target_nc1, target_mode, nc2, nc3)
    with no_autocast("cpu" if hf.is_cpu else hf.device.type):
        return _collapse_terms(hf, target, wf, num_classes, config, parts, validate_args)


def _collapse_terms(
    hf: Tensor,
    target: Tensor,
    wf: Tensor | None,
    num_classes: int,
    config: tuple[float, str, float | None, str, float, float],
    want_parts: bool,
    validate_args: bool,
    cap: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """See :func:`collapse_terms`; ``cap`` of the ratio form of NC1 (default: ``1 / eps`` of
    the compute dtype; the float64 fallback of float32 inputs keeps float32's)."""
    h = hf.detach()
    n, d = h.shape
    dtype = h.dtype
    host = h.is_cpu and not _is_compiling()
    onehot = host and onehot_products(n, num_classes, d)
    # the statistics about one of the samples: the same values and gradients (each one is
    # unchanged by a shift), but samples alike give exact zeros and an offset adds no rounding
    x = h - h[:1] if n else h
    # class counts and sums (or the one-hot assignment), indexing by the labels: on CPU, labels
    # out of range raise here
    try:
        if onehot:
            assign = identity(num_classes, dtype).index_select(0, target)
            counts = assign.sum(0)
        else:
            sums = x.new_zeros((num_classes, d)).index_add_(0, target, x)
            if host:
                counts = torch.bincount(target, minlength=num_classes).to(dtype)
            else:
                counts = count_classes(target, num_classes, dtype)
    except (IndexError, RuntimeError):
        error = label_range_error(target, num_classes) if validate_args and host else None
        if error is not None:
            raise error from None
        raise
    num_present: Scalar
    valid: bool | Tensor
    present_col: Tensor | None = None
    if host:
        if num_classes <= 256:
            num_present = num_classes - counts.tolist().count(0.0)
        else:
            num_present = int(torch.count_nonzero(counts))
        valid = num_present >= 2
        full = num_present == num_classes
    else:
        full = False
    if full:  # every class present: no masks (the common case, decided on the host)
        denominator = counts
    else:
        present_col = (counts > 0).to(dtype).unsqueeze(1)
        if not host:
            num_present = present_col.sum()
            valid = num_present >= 2
        denominator = counts.clamp_min(1.0)
    nc1, nc2, nc3 = config[0], config[4], config[5]
    residual = None  # only NC1 needs the residuals to the class means
    if onehot:
        scaled = assign / denominator  # row i: 1 / n_{y_i} at column y_i
        means = scaled.T @ x
        if nc1 != 0:
            residual = torch.addmm(x, assign, means, alpha=-1.0)
    else:
        denominator = denominator.unsqueeze(1)
        means = sums.div_(denominator)
        if nc1 != 0:
            residual = means.index_select(0, target).neg_().add_(x)  # one N x d temporary
    if present_col is None:
        if onehot:
            centred = centring(num_classes, dtype) @ means
        else:
            centred = torch.sub(means, means.sum(0), alpha=1.0 / num_classes)
    else:
        present = _at_least(num_present, 1.0)
        centred = (means - means.sum(0) / present) * present_col
    within: Scalar = 0.0
    if residual is not None:
        flat = residual.reshape(-1)
        within = _item(torch.dot(flat, flat), host) / max(n, 1)
    centred_flat = centred.view(-1)
    msq = _item(torch.dot(centred_flat, centred_flat), host)
    left = num_classes <= d
    gram = None
    frob: Scalar = 0.0
    tiny = _TINY.get(dtype) or torch.finfo(dtype).tiny
    if cap is None:
        cap = _CAP.get(dtype) or 1.0 / torch.finfo(dtype).eps
    if nc2 != 0:
        # the Gram matrix over ||M||_F^2 (its trace): entries of order 1, so that its Frobenius
        # norm (~ scale^4 unnormalized) neither overflows nor underflows in float32
        gram = centred @ centred.T if left else centred.T @ centred
        gram = gram.div_(_at_least(msq, tiny))
        gram_flat = gram.view(-1)
        frob = _sqrt(_item(torch.dot(gram_flat, gram_flat), host))
    w = None if wf is None else wf.detach()
    rows = None  # the classifier's rows of the present classes (NC3 only)
    if nc3 != 0 and w is not None:
        rows = w if present_col is None else w * present_col
    w2: Scalar = 0.0
    inner: Scalar = 0.0
    if rows is not None:
        rows_flat = rows.reshape(-1)
        w2 = _item(torch.dot(rows_flat, rows_flat), host)
        inner = _item(torch.dot(rows_flat, centred_flat), host)
    if host and dtype == torch.float32 and valid and _outside_float32_range(within, msq, w2, rows):
        # squares at the edge of the float32 range (features or classifier rows beyond ~1e+-15):
        # the products and quotients below would underflow or overflow; the same in float64
        # (differentiable casts), returned in float32, the ratio form of NC1 keeping float32's cap
        w64 = None if wf is None else wf.double()
        cap = _CAP[torch.float32]
        total64, parts64 = _collapse_terms(
            hf.double(), target, w64, num_classes, config, want_parts, validate_args, cap
        )
        return total64.float(), None if parts64 is None else parts64.float()
    total: Scalar = 0.0
    values: tuple[Scalar, Scalar, Scalar] = (0.0, 0.0, 0.0)
    coefficients: tuple[Scalar, ...] = (0.0,) * 6
    if not host or valid:  # else fewer than two classes: every term is zero
        total, values, coefficients = _terms(
            within, msq, frob, w2, inner, num_present, valid, tiny, cap, config
        )
    parts = None
    if want_parts:
        if host:
            parts = torch.tensor([float(v) for v in values], dtype=dtype, device=h.device)
        else:
            parts = torch.stack([as_tensor(v, h) for v in values])
    grad_enabled = torch.is_grad_enabled()
    need_h = grad_enabled and hf.requires_grad
    need_w = grad_enabled and wf is not None and wf.requires_grad
    a_w, a_m, a_gm, a_wm, b_m, b_w = coefficients
    grad_h = grad_w = None
    degenerate = host and not any(coefficients)  # zero gradients, still connected
    if not degenerate:
        if need_h:
            # gradient reaching the centred means, as matrix * factor
            grad_m, factor = centred, a_m
            if gram is not None or nc3 != 0:
                factor = 1.0
                if gram is not None and not isinstance(a_gm, Tensor):
                    # a_m M + a_gm M M^T M in one product (host floats)
                    a, b = (gram, centred) if left else (centred, gram)
                    grad_m = torch.addmm(centred, a, b, beta=float(a_m), alpha=a_gm)
                else:
                    grad_m = centred * a_m
                    if gram is not None:
                        product = gram @ centred if left else centred @ gram
                        grad_m = _add_scaled(grad_m, product, a_gm)
                if nc3 != 0 and w is not None:
                    # W's rows do not sum to zero: project onto the present classes' centred space
                    grad_m = _add_scaled(grad_m, w, a_wm)
                    if present_col is None and onehot:
                        grad_m = centring(num_classes, dtype) @ grad_m
                    elif present_col is None:
                        grad_m = torch.sub(grad_m, grad_m.sum(0), alpha=1.0 / num_classes)
                    else:  # minus the mean over the present classes (one product); the
                        # rows of absent classes are never gathered, so they are left as they are
                        grad_m = grad_m.sub_((present_col.T @ grad_m).div_(present))
            residual_factor = a_w * 2.0 / max(n, 1)
            if onehot and residual is not None:  # host floats: one product, gather and sum
                grad_h = torch.addmm(
                    residual, scaled, grad_m, beta=float(residual_factor), alpha=float(factor)
                )
            elif onehot:  # no NC1, hence factor 1
                grad_h = scaled @ grad_m
            else:
                per_class = grad_m / denominator
                if grad_m is centred:
                    per_class = per_class.mul_(factor)
                grad_h = per_class.index_select(0, target)
                if residual is not None:
                    grad_h = _add_scaled(grad_h, residual, residual_factor)
        if need_w and rows is not None:
            grad_w = _add_scaled(centred * b_m, rows, b_w)
    pairs: list[tuple[Tensor, Tensor, Tensor | None]] = []
    if need_h:
        pairs.append((hf, h, grad_h))
    if need_w and wf is not None and w is not None:
        pairs.append((wf, w, grad_w))
    return with_gradients(total, h, *pairs), parts


_SAFE = (2.0**-100, 2.0**100)
"""Sums of squares inside which float32 statistics, Gram matrices and gradient coefficients
stay normal and finite (their entries' products at least ``2**-100 / (K d)``)."""


def _in_range(value: Scalar) -> bool:
    """Whether a float32 sum of squares (a host float) is inside :data:`_SAFE`. A zero is not:
    rows of ~1e-23 square to exactly zero in float32 and are only told from zero rows (a
    zero-initialised classifier, coinciding class means) in float64, which gives the latter
    their documented values too."""
    return _SAFE[0] <= float(value) <= _SAFE[1]


def _outside_float32_range(within: Scalar, msq: Scalar, w2: Scalar, rows: Tensor | None) -> bool:
    """Whether float32 sums of squares (host floats) leave :data:`_SAFE`: the squared norm of
    the centred means, the within-class sum of squares above it, the classifier rows' when they
    are read."""
    if not _in_range(msq) or float(within) > _SAFE[1]:
        return True
    return rows is not None and not _in_range(w2)


def _add_scaled(out: Tensor, other: Tensor, factor: Scalar) -> Tensor:
    """``out + factor * other``, in place on ``out`` (a fresh temporary); skipped for a host 0."""
    if isinstance(factor, Tensor):
        return out.addcmul_(other, factor)
    return out.add_(other, alpha=factor) if factor != 0 else out


def gram_distance(vectors: Tensor, present: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """``scale`` times the squared distance of the rows' normalized Gram to the simplex ETF Gram.

    See :func:`~torchcollapse.losses.simplex_geometry.simplex_gram_distance` (``scale=1``). With
    ``v`` the (masked) rows, ``s`` their sum, ``k`` their number, ``t = ||v||_F^2 - ||s||^2 / k``
    and ``f = ||v v^T||_F``, the value is ``2 - 2 t / (f sqrt(k - 1))`` and its gradient
    ``-4 (v - 1 s^T / k) / (f sqrt(k - 1)) + 4 t v v^T v / (f^3 sqrt(k - 1))``. The Gram matrix is
    taken over ``||v||_F^2`` (entries of order 1; ``f^2``, which is computed, grows as the fourth
    power of the rows' scale and would leave the float32 range beyond ~1e+-9), and every quotient
    is formed from those scale-free quantities.
    """
    dtype = compute_dtype(vectors.dtype)
    with no_autocast(vectors.device.type):
        vf = vectors if vectors.dtype == dtype else vectors.to(dtype)
        host = host_scalars(vf)
        num_rows: Scalar
        if present is None:
            num_rows = float(vf.shape[0])
        else:
            present_f = present.to(dtype)
            vf = vf * present_f.unsqueeze(1)
            num_rows = _item(present_f.sum(), host)
        v = vf.detach()
        left = v.shape[0] <= v.shape[1]
        v_flat = v.reshape(-1)
        trace = _item(torch.dot(v_flat, v_flat), host)  # ||v||_F^2
        if host and dtype == torch.float32 and not _in_range(trace):
            # rows at the edge of the float32 range: the same in float64 (see _SAFE)
            return gram_distance(vf.double(), present, scale).float()
        norm = _at_least(trace, _TINY.get(dtype) or torch.finfo(dtype).tiny)
        gram = (v @ v.T if left else v.T @ v).div_(norm)
        row_sum = v.sum(0)
        total = _item(torch.dot(row_sum, row_sum), host)
        gram_flat = gram.view(-1)
        frob = _sqrt(_item(torch.dot(gram_flat, gram_flat), host))  # ||v v^T||_F / norm
        valid = num_rows >= 2
        value: Scalar = 0.0
        coefficients: tuple[Scalar, Scalar, Scalar] = (0.0, 0.0, 0.0)
        if not isinstance(valid, bool) or valid:
            # as in _terms: Python factors first, shared quotients, one masking where
            rows = _at_least(num_rows, 1.0)
            centred_trace = (trace - total / rows) / norm
            root = _sqrt(_where(valid, num_rows - 1.0, 1.0))
            positive = frob > 0
            frob_safe = _where(positive, frob, 1.0)
            inverse = _reciprocal(frob_safe * root)
            ratio = centred_trace * inverse
            value = _rsub(2.0 * scale, ratio, 2.0 * scale)
            cubed = ratio / frob_safe / frob_safe
            # the gradient's coefficients carry one 1 / norm (the normalized Gram's one)
            per_norm = inverse / norm
            coefficients = (
                per_norm * (-4.0 * scale),
                per_norm / rows * (4.0 * scale),
                _where(positive, cubed, 0.0) / norm * (4.0 * scale),
            )
            if isinstance(valid, Tensor):
                value, *masked = _masked(valid, [value, *coefficients])
                coefficients = (masked[0], masked[1], masked[2])
        if not (torch.is_grad_enabled() and vf.requires_grad):
            return with_gradients(value, v)
        c_v, c_sum, c_gram = coefficients
        grad = None
        if isinstance(c_v, Tensor) or any(coefficients):
            if isinstance(c_v, float) and isinstance(c_gram, float):
                if left:
                    grad = torch.addmm(v, gram, v, beta=c_v, alpha=c_gram)
                else:
                    grad = torch.addmm(v, v, gram, beta=c_v, alpha=c_gram)
            else:
                grad = _add_scaled(v * c_v, gram @ v if left else v @ gram, c_gram)
            grad = _add_scaled(grad, row_sum, c_sum)
        return with_gradients(value, v, (vf, v, grad))
