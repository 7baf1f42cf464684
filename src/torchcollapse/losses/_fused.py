"""NC1, NC2 and NC3 terms of one batch in one autograd node each way, with closed-form gradients.

A collapse regularizer rides on a training step as a few dozen tiny kernels, so on a CPU its cost
is the number of operations dispatched, not their arithmetic: composed from autograd operations,
NC1 alone took some sixty. Here one :class:`torch.autograd.Function` computes the class statistics
of the (global) batch, every enabled term and their weighted sum in about twenty operations
without autograd, and its backward applies the closed-form gradient in a handful more. The
formulas are those of the formula sheet in ``DESIGN.md`` (Papyan, Han & Donoho, 2020), the same
as the composable functions :func:`~torchcollapse.losses._batch.batch_class_statistics`,
:func:`~torchcollapse.losses.within_class.within_class_variability`,
:func:`~torchcollapse.losses.simplex_geometry.simplex_geometry_of_means` and
:func:`~torchcollapse.losses.self_duality.self_duality_distance`, which the tests hold these to.

Scalars (traces, norms, the terms and the coefficients of the gradient) are Python floats on CPU,
where reading a tensor's value costs a fraction of a microsecond and synchronises with nothing,
and 0-dim tensors on accelerators and under ``torch.compile``, where the same maths runs as tensor
operations (no host synchronisation, no graph break). The within-class trace is always taken on
the residuals to the batch class means (two-pass), never as a difference of raw second moments.

With ``M`` the centred means of the present classes, ``P`` the present-class mask, ``n_c`` the
counts and ``r_i = h_i - mu_{y_i}`` the residuals, a gradient ``G`` reaching ``M`` reaches ``h_i``
as ``(G_c - mean_{c' in P} G_c') / n_c`` for ``c = y_i``, and ``tr Sigma_W`` contributes
``2 r_i / N``; ``G`` itself is a combination of ``M``, ``M M^T M`` and the classifier ``W``.

Reference: V. Papyan, X. Y. Han, D. L. Donoho, "Prevalence of neural collapse during the terminal
phase of deep learning training", PNAS 2020.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeAlias

import torch
from torch import Tensor

from torchcollapse._distributed import gather_with_grad, is_distributed
from torchcollapse.losses._batch import compute_dtype, count_classes

__all__ = ["collapse_terms", "gram_distance", "host_scalars", "no_autocast"]

Scalar: TypeAlias = float | Tensor
"""A Python float on the host path, a 0-dim tensor otherwise."""


def host_scalars(tensor: Tensor) -> bool:
    """Whether scalar maths on ``tensor``'s values may run in Python: on CPU, outside compile."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def no_autocast(device_type: str) -> AbstractContextManager[Any]:
    """A context that disables autocast on ``device_type``; a no-op when it is not enabled."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


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


def _item(x: Tensor, host: bool) -> Scalar:
    return x.item() if host else x


def _penalty(value: Scalar, level: float, mode: str) -> tuple[Scalar, Scalar]:
    """:func:`~torchcollapse.losses.collapse.target_penalty` and its derivative in ``value``."""
    if mode == "squared":
        return (value - level) ** 2, 2.0 * (value - level)
    if mode == "at_most":
        excess = value - level
        return _relu(excess), _where(excess > 0, 1.0, 0.0)
    shortfall = level - value
    return _relu(shortfall), _where(shortfall > 0, -1.0, 0.0)


def _terms(
    within: Scalar,
    msq: Scalar,
    frob: Scalar,
    w2: Scalar,
    inner: Scalar,
    num_present: Scalar,
    valid: bool | Tensor,
    tiny: float,
    config: tuple[float, str, float | None, str, float, float],
) -> tuple[Scalar, tuple[Scalar, Scalar, Scalar], tuple[Scalar, ...]]:
    """The weighted total, the unweighted terms and the gradient coefficients, from scalars.

    Inputs: ``tr Sigma_W``, ``||M||_F^2``, ``||M M^T||_F``, ``||W_P||_F^2``, ``<W, M>``, the
    number of present classes and whether at least two are. Coefficients, of the total's
    gradient: ``(a_W, a_M, a_GM, a_WM, b_M, b_W)`` with ``dL/dtr Sigma_W = a_W``,
    ``dL/dM = a_M M + a_GM M M^T M + a_WM W`` and ``dL/dW = b_M M + b_W W_P``. The safe
    denominators and branches reproduce the autograd formulas of the composable functions;
    denominators are divided one factor at a time, so that a product never underflows to zero
    (a Python float division by zero raises).
    """
    nc1, form, target_nc1, mode, nc2, nc3 = config
    present = _at_least(num_present, 1.0)
    between = msq / present
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
        if form == "bounded":
            positive = (within + between) > 0
            denominator = _where(positive, within + between, 1.0)
            v1 = within / denominator
            d_within = _where(positive, between / denominator / denominator, 1.0)
            d_between = _where(positive, -within / denominator / denominator, 0.0)
        else:
            denominator = _at_least(between, tiny)
            v1 = within / denominator
            d_within = 1.0 / denominator
            d_between = _where(between >= tiny, -within / denominator / denominator, 0.0)
        penalty: Scalar = v1
        d_penalty: Scalar = 1.0
        if target_nc1 is not None:
            penalty, d_penalty = _penalty(v1, target_nc1, mode)
        total = total + nc1 * penalty
        a_w = a_w + nc1 * d_penalty * d_within
        a_m = a_m + nc1 * d_penalty * d_between * 2.0 / present
    if nc2 != 0:
        root = _sqrt(_where(valid, num_present - 1.0, 1.0))
        positive = frob > 0
        frob_safe = _where(positive, frob, 1.0)
        v2 = 2.0 - 2.0 * msq / (frob_safe * root)
        total = total + nc2 * v2
        a_m = a_m - nc2 * 4.0 / (frob_safe * root)
        cubed = 4.0 * msq / frob_safe / frob_safe / frob_safe / root
        a_gm = a_gm + nc2 * _where(positive, cubed, 0.0)
    if nc3 != 0:
        m2 = between * num_present
        w_positive, m_positive = w2 > 0, m2 > 0
        w2_safe, m2_safe = _where(w_positive, w2, 1.0), _where(m_positive, m2, 1.0)
        scale = _sqrt(w2_safe) * _sqrt(m2_safe)
        v3 = 2.0 - 2.0 * inner / scale
        total = total + nc3 * v3
        a_wm = a_wm - nc3 * 2.0 / scale
        b_m = b_m - nc3 * 2.0 / scale
        b_w = b_w + nc3 * _where(w_positive, 2.0 * inner / w2_safe / scale, 0.0)
        a_m = a_m + nc3 * _where(m_positive, 2.0 * inner / m2_safe / scale, 0.0)
    values: tuple[Scalar, Scalar, Scalar] = (v1, v2, v3)
    coefficients: tuple[Scalar, ...] = (a_w, a_m, a_gm, a_wm, b_m, b_w)
    if isinstance(valid, Tensor):
        total = _where(valid, total, 0.0)
        values = (_where(valid, v1, 0.0), _where(valid, v2, 0.0), _where(valid, v3, 0.0))
        coefficients = tuple(_where(valid, c, 0.0) for c in coefficients)
    return total, values, coefficients


class _CollapseTerms(torch.autograd.Function):
    """Weighted NC1 + NC2 + NC3 of a batch (and the unweighted terms); see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        target: Tensor,
        weight: Tensor | None,
        num_classes: int,
        config: tuple[float, str, float | None, str, float, float],
        want_parts: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        host = host_scalars(h)
        n, d = h.shape
        dtype = h.dtype
        sums = h.new_zeros((num_classes, d)).index_add_(0, target, h)  # raises on bad labels
        num_present: Scalar
        if host:
            counts = torch.bincount(target, minlength=num_classes)
            num_present = int(torch.count_nonzero(counts))
            counts = counts.to(dtype)
            full = num_present == num_classes
            valid: bool | Tensor = num_present >= 2
        else:
            counts = count_classes(target, num_classes, dtype)
            full = False
        present_col: Tensor | None = None
        if full:  # every class present: no masks (the common case, decided on the host)
            counts_col = counts.unsqueeze(1)
            means = sums.div_(counts_col)
            centred = means - means.mean(0)
        else:
            present_col = (counts > 0).to(dtype).unsqueeze(1)
            if not host:
                num_present = present_col.sum()
                valid = num_present >= 2
            counts_col = counts.clamp_min(1.0).unsqueeze(1)
            means = sums.div_(counts_col)
            centred = (means - means.sum(0) / _at_least(num_present, 1.0)) * present_col
        residual = h - means.index_select(0, target)
        flat = residual.reshape(-1)
        centred_flat = centred.view(-1)
        within = _item(torch.dot(flat, flat), host) / max(n, 1)
        msq = _item(torch.dot(centred_flat, centred_flat), host)
        nc2, nc3 = config[4], config[5]
        gram = None
        frob: Scalar = 0.0
        if nc2 != 0:
            gram = centred @ centred.T if num_classes <= d else centred.T @ centred
            frob = _item(torch.linalg.vector_norm(gram), host)
        w2: Scalar = 0.0
        inner: Scalar = 0.0
        if nc3 != 0 and weight is not None:
            w_flat = weight.reshape(-1)
            if present_col is None:
                w2 = _item(torch.dot(w_flat, w_flat), host)
            else:
                w2 = _item(torch.dot(weight.pow(2).sum(1), present_col.view(-1)), host)
            inner = _item(torch.dot(w_flat, centred_flat), host)
        total: Scalar = 0.0
        values: tuple[Scalar, Scalar, Scalar] = (0.0, 0.0, 0.0)
        coefficients: tuple[Scalar, ...] = (0.0,) * 6
        if not host or valid:  # else fewer than two classes: every term is zero
            total, values, coefficients = _terms(
                within, msq, frob, w2, inner, num_present, valid, torch.finfo(dtype).tiny, config
            )
        ctx.host = host
        ctx.num_present = num_present if host else None
        ctx.gram_left = num_classes <= d
        ctx.project = nc3 != 0 and weight is not None
        if host:
            ctx.coefficients = coefficients
            ctx.save_for_backward(residual, centred, counts_col, present_col, target, gram, weight)
            out = torch.full((), float(total), dtype=dtype, device=h.device)
            if not want_parts:
                return out
            parts = torch.tensor([float(v) for v in values], dtype=dtype, device=h.device)
        else:
            stacked = torch.stack(
                [torch.as_tensor(c, dtype=dtype, device=h.device) for c in coefficients]
            )
            ctx.save_for_backward(
                residual, centred, counts_col, present_col, target, gram, weight, stacked
            )
            out = torch.as_tensor(total, dtype=dtype, device=h.device).clone()
            if not want_parts:
                return out
            parts = torch.stack([torch.as_tensor(v, dtype=dtype, device=h.device) for v in values])
        ctx.mark_non_differentiable(parts)
        return out, parts

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        residual, centred, counts_col, present_col, target, gram, weight = saved[:7]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        none = (None,) * 4
        if not (need_h or need_w):
            return (None, None, None, *none)
        host = ctx.host
        if host:
            g = float(grad_total)
            a_w, a_m, a_gm, a_wm, b_m, b_w = (c * g for c in ctx.coefficients)
            if not any(ctx.coefficients):  # a degenerate batch: zero, still connected
                return (
                    torch.zeros_like(residual) if need_h else None,
                    None,
                    torch.zeros_like(weight) if need_w else None,
                    *none,
                )
        else:
            a_w, a_m, a_gm, a_wm, b_m, b_w = (saved[7] * grad_total).unbind()
        with no_autocast(residual.device.type):
            grad_h = None
            if need_h:
                grad_m = centred * a_m
                if gram is not None:
                    product = gram @ centred if ctx.gram_left else centred @ gram
                    grad_m = _add_scaled(grad_m, product, a_gm)
                if ctx.project:
                    # W has no zero row sums: project onto the present classes' centred space
                    grad_m = _add_scaled(grad_m, weight, a_wm)
                    if present_col is None:
                        grad_m = grad_m - grad_m.mean(0)
                    else:
                        num_present = ctx.num_present if host else present_col.sum()
                        grad_m = grad_m * present_col
                        grad_m = grad_m - present_col * (grad_m.sum(0) / _at_least(num_present, 1))
                grad_h = (grad_m / counts_col).index_select(0, target)
                grad_h = _add_scaled(grad_h, residual, a_w * 2.0 / max(residual.shape[0], 1))
            grad_w = None
            if need_w and weight is not None:
                rows = weight if present_col is None else weight * present_col
                grad_w = _add_scaled(centred * b_m, rows, b_w)
        return (grad_h, None, grad_w, *none)


def _add_scaled(out: Tensor, other: Tensor, factor: Scalar) -> Tensor:
    """``out + factor * other``, in place on ``out`` (a fresh temporary); skipped for a host 0."""
    if isinstance(factor, Tensor):
        return out.addcmul_(other, factor)
    return out.add_(other, alpha=factor) if factor != 0 else out


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
) -> tuple[Tensor, Tensor | None]:
    """``nc1 * NC1 + nc2 * NC2 + nc3 * NC3`` of the global batch, in one autograd node.

    Args:
        features: ``(N_local, d)`` features (any floating dtype; computed in >= float32, and in
            the classifier's dtype if wider).
        target: ``(N_local,)`` integer labels in ``[0, num_classes)`` (not validated here).
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

    Returns:
        The scalar total (zero, still connected to the graph, with fewer than two classes
        present; terms with a zero weight are skipped) and the parts or ``None``.
    """
    if sync_dist and is_distributed(group):
        features = gather_with_grad(features, group)
        target = gather_with_grad(target, group)
    dtype = compute_dtype(features.dtype)
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
    with no_autocast(features.device.type):
        h = features if features.dtype == dtype else features.to(dtype)
        target = target if target.dtype == torch.long else target.long()
        if weight is not None and weight.dtype != dtype:
            weight = weight.to(dtype)
        config = (nc1, nc1_form, target_nc1, target_mode, nc2, nc3)
        out = _CollapseTerms.apply(h, target, weight, num_classes, config, parts)
    if parts:
        total, values = out
        return total, values
    return out, None


class _GramDistance(torch.autograd.Function):
    """``scale * (2 - 2 <G, E> / ||G||_F)`` of masked rows, closed-form backward."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, num_rows: Scalar, scale: float) -> Tensor:
        host = host_scalars(v)
        k_total, d = v.shape
        left = k_total <= d
        gram = v @ v.T if left else v.T @ v
        row_sum = v.sum(0)
        trace = _item(torch.trace(gram), host)
        total = _item(torch.dot(row_sum, row_sum), host)
        frob = _item(torch.linalg.vector_norm(gram), host)
        if host and isinstance(num_rows, Tensor):
            num_rows = num_rows.item()
        valid = num_rows >= 2
        coefficients: tuple[Scalar, Scalar, Scalar]
        if isinstance(valid, bool) and not valid:
            value: Scalar = 0.0
            coefficients = (0.0, 0.0, 0.0)
        else:
            rows = _at_least(num_rows, 1.0)
            centred_trace = trace - total / rows
            root = _sqrt(_where(valid, num_rows - 1.0, 1.0))
            positive = frob > 0
            frob_safe = _where(positive, frob, 1.0)
            value = scale * (2.0 - 2.0 * centred_trace / (frob_safe * root))
            coefficients = (
                -4.0 * scale / (frob_safe * root),
                4.0 * scale / (frob_safe * root * rows),
                _where(
                    positive,
                    4.0 * scale * centred_trace / frob_safe / frob_safe / frob_safe / root,
                    0.0,
                ),
            )
            if isinstance(valid, Tensor):
                value = _where(valid, value, 0.0)
                coefficients = (
                    _where(valid, coefficients[0], 0.0),
                    _where(valid, coefficients[1], 0.0),
                    _where(valid, coefficients[2], 0.0),
                )
        ctx.host = host
        ctx.left = left
        if host:
            ctx.coefficients = coefficients
            ctx.save_for_backward(v, row_sum, gram)
            return torch.full((), float(value), dtype=v.dtype, device=v.device)
        stacked = torch.stack(
            [torch.as_tensor(c, dtype=v.dtype, device=v.device) for c in coefficients]
        )
        ctx.save_for_backward(v, row_sum, gram, stacked)
        return torch.as_tensor(value, dtype=v.dtype, device=v.device).clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        v, row_sum, gram = ctx.saved_tensors[:3]
        if ctx.host:
            g = float(grad)
            c_v, c_sum, c_gram = (c * g for c in ctx.coefficients)
            if not any(ctx.coefficients):
                return torch.zeros_like(v), None, None
        else:
            c_v, c_sum, c_gram = (ctx.saved_tensors[3] * grad).unbind()
        with no_autocast(v.device.type):
            out = _add_scaled(v * c_v, row_sum, c_sum)
            out = _add_scaled(out, gram @ v if ctx.left else v @ gram, c_gram)
        return out, None, None


def gram_distance(vectors: Tensor, present: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """``scale`` times the squared distance of the rows' normalized Gram to the simplex ETF Gram.

    See :func:`~torchcollapse.losses.simplex_geometry.simplex_gram_distance` (``scale=1``).
    """
    dtype = compute_dtype(vectors.dtype)
    with no_autocast(vectors.device.type):
        v = vectors if vectors.dtype == dtype else vectors.to(dtype)
        num_rows: Scalar
        if present is None:
            num_rows = float(v.shape[0])
        else:
            present_f = present.to(dtype)
            v = v * present_f.unsqueeze(1)
            num_rows = present_f.sum()
        out: Tensor = _GramDistance.apply(v, num_rows, scale)
        return out
