"""Fixed frames: ``(num_classes, dim)`` matrices of unit-norm class directions.

Neural collapse (Papyan, Han & Donoho, 2020) drives the centred class means and the classifier of
a network to a *simplex equiangular tight frame* (ETF): ``K`` unit vectors with pairwise cosine
``-1/(K-1)``, the largest possible equal separation. Fixing the classifier at such a frame from the
start (Hoffer et al., 2018; Zhu et al., 2021; Yang et al., 2022) saves its parameters and induces
the collapse. This module builds the frames as pure functions:

- :func:`simplex_etf`: the simplex ETF, in any ``dim >= num_classes - 1`` (the minimal
  construction; the usual QR of a ``dim x K`` Gaussian matrix needs ``dim >= K``).
- :func:`nearest_simplex_etf`: the simplex ETF closest to given class means (orthogonal
  Procrustes, one small SVD), the target of an ETF that follows the features (Markou et al., 2024).
- :func:`orthogonal_frame`: ``K`` orthonormal directions, ``dim >= K``.
- :func:`spherical_code`: ``K`` directions as far apart as we can make them (maximal minimum angle,
  the Tammes problem) for any ``K``, in particular ``K > dim + 1`` where no simplex exists.
- :func:`hierarchy_frame`: directions whose pairwise cosines follow a class-similarity matrix,
  projected to the nearest valid Gram matrix (Higham, 2002).
- :func:`frame_min_angle`, :func:`min_angle_bound` and :func:`frame_angle_report`: how well
  separated a frame is, against the simplex bound, Rankin's orthoplex bound (1955) and the
  cap-packing bound.

Every random frame is drawn on the CPU in float64 from a :class:`torch.Generator` (by default one
seeded with :data:`DEFAULT_SEED`), then cast to ``dtype`` and moved to ``device``. The same call
therefore gives the same frame on every process and every device, without a broadcast (on
identical machines and software; ``DistributedDataParallel`` also broadcasts buffers from rank 0
when it wraps a model). The draw stays on the CPU under a default-device context too
(``with torch.device("cuda")``, ``torch.set_default_device``); as for torch's factory functions,
``device=None`` then means the context's device (``with torch.device("meta")`` gives a meta
tensor, whose values are gone, but the generator has advanced as on the CPU).

Sizes (``num_classes``, ``dim``, ``steps``, ``max_iter``) are any integer, as the heads take them:
Python or numpy integers and 0-dim integer tensors (never a bool or a float); a wrong type is a
``TypeError``, a size out of range a ``ValueError``, each naming the argument.

References:
    Papyan, Han & Donoho (2020), *Prevalence of neural collapse during the terminal phase of deep
    learning training*, PNAS. Hoffer et al. (2018), *Fix your classifier*, ICLR. Yang et al.
    (2022), *Inducing neural collapse in imbalanced learning*, NeurIPS. Rankin (1955), *The closest
    packing of spherical caps in n dimensions*. Higham (2002), *Computing the nearest correlation
    matrix*, IMA J. Numer. Anal. Markou, Ajanthan & Gould (2024), *Guiding neural collapse:
    optimising towards the nearest simplex equiangular tight frame*, NeurIPS. Schönemann (1966),
    *A generalized solution of the orthogonal Procrustes problem*, Psychometrika.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from torchcollapse._autograd import no_autocast
from torchcollapse._numbers import as_real_float, check_float_dtype, read_int, read_number

__all__ = [
    "DEFAULT_SEED",
    "FrameAngleReport",
    "frame_angle_report",
    "frame_min_angle",
    "hierarchy_frame",
    "min_angle_bound",
    "nearest_simplex_etf",
    "orthogonal_frame",
    "simplex_etf",
    "spherical_code",
]

DEFAULT_SEED = 0
"""Seed of the generator used when a frame function is called without ``generator``."""

# Spherical-code optimiser settings (see ``_descend``).
_NEIGHBOURS = 32  # nearest other points each point is repelled by
_REFRESH_EVERY = 25  # steps between recomputations of the neighbour lists
_TEMPERATURE = (10.0, 1e4)  # softmax temperature on cosines, first and last step (geometric)
_STEP_SIZE = (0.1, 1e-5)  # largest move of a point per step, in radians, first and last step
_RESTART_BUDGET = 2**16  # restarts while restarts * K * neighbours * dim stays below this (max 8)
_FLOAT64_WORK = 2**21  # larger problems (K * neighbours * dim) take their steps in float32
_BLOCK_ELEMENTS = 2**22  # rows are processed in blocks of at most this many gathered numbers

# Every tensor a frame function makes internally is made here, whatever the default device (a
# ``torch.device`` context, ``torch.set_default_device``): a CPU generator draws only on the CPU,
# and the optimiser needs values (the meta device has none).
_CPU = torch.device("cpu")


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(DEFAULT_SEED)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "Expected argument `generator` to be a torch.Generator or None, "
            f"but got {type(generator).__name__}."
        )
    if generator.device.type != "cpu":
        raise ValueError(
            "Expected argument `generator` to be a CPU generator (frames are drawn on the CPU so "
            f"that every device gets the same frame), but got one on {generator.device}."
        )
    return generator


def _finish(frame: Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> Tensor:
    """Cast the float64 CPU frame to the requested dtype and device (always a fresh tensor);
    ``None`` means torch's defaults, as for a factory function (``torch.randn``)."""
    check_float_dtype(dtype)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.get_default_device() if device is None else device
    return frame.to(device=device, dtype=dtype, copy=True)


def _random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed ``rows x cols`` matrix with orthonormal columns (``rows >= cols``).

    QR of a Gaussian matrix with the signs of ``diag(R)`` moved into ``Q`` (Mezzadri, 2007).
    """
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64, device=_CPU)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    result: Tensor = q * signs
    return result


def _helmert(num_classes: int) -> Tensor:
    """Orthonormal basis (``K x (K-1)``) of the subspace orthogonal to the all-ones vector.

    Column ``j`` (``j = 1..K-1``) is ``(1, ..., 1, -j, 0, ..., 0) / sqrt(j (j + 1))`` with ``j``
    ones, so ``B^T B = I`` and ``B B^T = I - 11^T / K`` exactly (up to rounding).
    """
    k = num_classes
    j = torch.arange(1, k, dtype=torch.float64, device=_CPU)  # column index 1..K-1
    rows = torch.arange(k, dtype=torch.float64, device=_CPU)[:, None]
    basis = torch.where(rows < j, 1.0, 0.0) - torch.where(rows == j, j, 0.0)
    return basis / torch.sqrt(j * (j + 1))


def simplex_etf(
    num_classes: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A simplex equiangular tight frame with a random orientation.

    Rows are unit vectors with pairwise cosine ``-1/(K-1)``: the Gram matrix is exactly
    ``K/(K-1) (I - 11^T/K)``. Built as ``sqrt(K/(K-1)) B Q^T``, where ``B`` (``K x (K-1)``) is the
    Helmert basis of the subspace orthogonal to ``1`` and ``Q`` (``dim x (K-1)``) has random
    orthonormal columns, so any ``dim >= K - 1`` works, the minimal ``dim = K - 1`` included.

    Args:
        num_classes: number of classes ``K >= 2``.
        dim: feature dimension, at least ``K - 1``.
        generator: CPU generator for the orientation; default: seeded with :data:`DEFAULT_SEED`.
        dtype: dtype of the result (default: ``torch.get_default_dtype()``).
        device: device of the result (default: torch's default device, as ``torch.randn``).

    Returns:
        Tensor of shape ``(num_classes, dim)`` with unit-norm rows summing to zero.

    Raises:
        TypeError: when a size is not an integer or ``dtype`` not a floating ``torch.dtype``.
        ValueError: when ``dim < num_classes - 1`` (use :func:`spherical_code` then).

    Example:
        >>> frame = simplex_etf(4, 3, dtype=torch.float64)  # 4 classes in the minimal 3 dimensions
        >>> (frame @ frame.T).diagonal()  # unit rows
        tensor([1., 1., 1., 1.], dtype=torch.float64)
        >>> round((frame[0] @ frame[1]).item(), 6)  # cosine -1/(K-1)
        -0.333333
        >>> torch.equal(frame, simplex_etf(4, 3, dtype=torch.float64))  # same default seed
        True
    """
    k = read_int(num_classes, "num_classes", 2)
    d = read_int(dim, "dim", 1)
    check_float_dtype(dtype)
    if d < k - 1:
        advice = (
            f"use `spherical_code({k}, {d})` for maximally separated directions instead"
            if d >= 2
            else "in one dimension only two directions (+1 and -1) exist"
        )
        raise ValueError(
            f"Expected argument `dim` to be at least `num_classes - 1` = {k - 1} for a simplex "
            f"ETF, but got {d}. No simplex ETF of {k} classes exists in {d} dimensions; {advice}."
        )
    gen = _cpu_generator(generator)
    rotation = _random_orthonormal(d, k - 1, gen)  # dim x (K-1)
    frame = math.sqrt(k / (k - 1)) * (_helmert(k) @ rotation.T)
    return _finish(frame, dtype, device)


def _helmert_transpose_times(matrix: Tensor) -> Tensor:
    """``B^T @ matrix`` (``(K-1) x d``) for the Helmert basis ``B``, ``O(K d)`` by prefix sums."""
    k = matrix.shape[0]
    j = torch.arange(1, k, device=matrix.device, dtype=matrix.dtype)[:, None]
    before = torch.cumsum(matrix, dim=0)[:-1]  # row j-1: sum of rows 0..j-1
    return (before - j * matrix[1:]) / torch.sqrt(j * (j + 1))


def _helmert_times(matrix: Tensor) -> Tensor:
    """``B @ matrix`` (``K x d``) for a ``(K-1) x d`` matrix, in ``O(K d)`` by suffix sums."""
    k = matrix.shape[0] + 1
    j = torch.arange(1, k, device=matrix.device, dtype=matrix.dtype)[:, None]
    scaled = matrix / torch.sqrt(j * (j + 1))
    after = torch.flip(torch.cumsum(torch.flip(scaled, [0]), dim=0), [0])  # sum of rows >= r
    zero = scaled.new_zeros(1, scaled.shape[1])
    return torch.cat([after, zero]) - torch.cat([zero, j * scaled])


def nearest_simplex_etf(
    points: Tensor,
    *,
    previous: Tensor | None = None,
    proximal: float = 0.0,
    eps: float = 1e-12,
) -> Tensor:
    """The simplex ETF closest, in Frobenius norm, to the row-normalised ``points``.

    Every simplex ETF of ``K`` classes in ``d >= K - 1`` dimensions is ``sqrt(K/(K-1)) B Q^T``
    with ``B`` the Helmert basis orthogonal to ``1`` and ``Q`` a ``d x (K-1)`` matrix with
    orthonormal columns, so the nearest one to a target ``T`` solves an orthogonal Procrustes
    problem: ``Q`` is the polar factor of ``T^T B`` (Schönemann, 1966), one thin SVD of a
    ``(K-1) x d`` matrix, ``O(d K^2)``. Centring ``T`` changes nothing (``B^T 1 = 0``). This is the
    closed-form solution of the problem Markou et al. (2024) solve iteratively on the Stiefel
    manifold.

    The target is ``normalize_rows(points) + proximal * previous``: a small ``proximal`` weight
    towards the current frame breaks ties when ``points`` do not determine the frame (zero rows
    for classes not seen yet, fewer informative directions than ``K - 1``).

    Args:
        points: ``(K, d)`` class means (any norms; zero rows carry no information).
        previous: ``(K, d)`` current frame, required when ``proximal > 0``.
        proximal: weight of ``previous`` in the target (a finite number ``>= 0``).
        eps: row norms below ``eps`` are treated as ``eps`` (a finite number ``> 0``).

    Returns:
        ``(K, d)`` simplex ETF (unit rows, cosines ``-1/(K-1)``) in ``points``' dtype and device,
        computed in at least float32.

    Raises:
        TypeError: when ``points`` is not a floating-point tensor, ``previous`` neither a tensor
            nor ``None``, or ``proximal`` or ``eps`` not a real number.
        ValueError: when ``points`` is not 2-D, ``d < K - 1``, ``proximal`` is negative or not
            finite, ``eps`` is not positive and finite, ``previous`` is not of ``points``' shape
            when ``proximal > 0``, or ``points`` (or ``previous``, when used) holds NaN or
            infinite values.

    Example:
        >>> etf = simplex_etf(4, 6, dtype=torch.float64)
        >>> noisy = 2.0 * etf + 0.01 * torch.randn(4, 6, dtype=torch.float64)
        >>> nearest = nearest_simplex_etf(noisy)
        >>> bool((nearest - etf).abs().max() < 0.05)  # recovers the frame the means came from
        True
        >>> torch.allclose(nearest @ nearest.T, etf @ etf.T)  # and it is an exact simplex ETF
        True
    """
    if not isinstance(points, Tensor):
        raise TypeError(
            "Expected argument `points` to be a 2-D floating-point (num_classes, dim) tensor, "
            f"but got {type(points).__name__}."
        )
    if not points.is_floating_point():
        raise TypeError(
            "Expected argument `points` to be a 2-D floating-point (num_classes, dim) tensor, "
            f"but got dtype {points.dtype}."
        )
    if points.ndim != 2:
        raise ValueError(
            "Expected argument `points` to be a 2-D floating-point (num_classes, dim) tensor, "
            f"but got shape {tuple(points.shape)}."
        )
    k, d = points.shape
    if k < 2 or d < k - 1:
        raise ValueError(
            f"Expected `points` of shape (K, d) with K >= 2 and d >= K - 1, but got {(k, d)}."
        )
    proximal_value = read_number(proximal, "proximal", "a finite number >= 0", lambda v: v >= 0)
    eps_value = read_number(eps, "eps", "a finite number > 0", lambda value: value > 0)
    if previous is not None and (
        not isinstance(previous, Tensor) or not previous.is_floating_point()
    ):
        got = f"dtype {previous.dtype}" if isinstance(previous, Tensor) else type(previous).__name__
        raise TypeError(
            "Expected argument `previous` to be a floating-point (num_classes, dim) tensor or None,"
            f" but got {got}."
        )
    if proximal_value and (previous is None or previous.shape != points.shape):
        got = "None" if previous is None else f"shape {tuple(previous.shape)}"
        raise ValueError(
            "Expected argument `previous` of the same shape as `points` "
            f"{tuple(points.shape)} when `proximal` > 0, but got {got}."
        )
    # (reads one flag back from an accelerator; the SVD reads its status back anyway)
    if not bool(torch.isfinite(points).all()):
        raise ValueError("Expected argument `points` to be finite, but it holds NaN or infinity.")
    if proximal_value and previous is not None and not bool(torch.isfinite(previous).all()):
        raise ValueError("Expected argument `previous` to be finite, but it holds NaN or infinity.")
    return _nearest_simplex_etf(points, previous, proximal_value, eps_value)


def _nearest_simplex_etf(
    points: Tensor, previous: Tensor | None, proximal: float, eps: float
) -> Tensor:
    """:func:`nearest_simplex_etf` without the checks, for arguments known to be valid."""
    k = points.shape[0]
    work = torch.promote_types(points.dtype, torch.float32)
    # at least float32 also under autocast, whose lower-precision products would leave the
    # frame only approximately an ETF
    with no_autocast(points.device.type):
        target = points.detach().to(work)
        target = target / torch.linalg.vector_norm(target, dim=1, keepdim=True).clamp_min(eps)
        if proximal and previous is not None:
            target = target + proximal * previous.detach().to(device=target.device, dtype=work)
        u, _, vh = torch.linalg.svd(_helmert_transpose_times(target), full_matrices=False)
        frame = math.sqrt(k / (k - 1)) * _helmert_times(u @ vh)
    return frame.to(points.dtype)


def orthogonal_frame(
    num_classes: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``K`` random orthonormal directions (Gram matrix the identity), ``dim >= K``.

    Args:
        num_classes: number of classes ``K >= 1``.
        dim: feature dimension, at least ``K``.
        generator: CPU generator; default: seeded with :data:`DEFAULT_SEED`.
        dtype: dtype of the result (default: ``torch.get_default_dtype()``).
        device: device of the result (default: torch's default device, as ``torch.randn``).

    Returns:
        Tensor of shape ``(num_classes, dim)`` with orthonormal rows.

    Example:
        >>> frame = orthogonal_frame(3, 5, dtype=torch.float64)
        >>> torch.allclose(frame @ frame.T, torch.eye(3, dtype=torch.float64))
        True
    """
    k = read_int(num_classes, "num_classes", 1)
    d = read_int(dim, "dim", 1)
    check_float_dtype(dtype)
    if d < k:
        raise ValueError(
            f"Expected argument `dim` to be at least `num_classes` = {k} for an orthogonal frame, "
            f"but got {d}. Use `simplex_etf` (dim >= num_classes - 1) or `spherical_code` instead."
        )
    frame = _random_orthonormal(d, k, _cpu_generator(generator)).T
    return _finish(frame, dtype, device)


# ---------------------------------------------------------------------------------------------
# Spherical codes
# ---------------------------------------------------------------------------------------------


def _row_blocks(num_rows: int, row_size: int) -> list[tuple[int, int]]:
    step = max(1, _BLOCK_ELEMENTS // max(row_size, 1))
    return [(s, min(s + step, num_rows)) for s in range(0, num_rows, step)]


def _max_cosine(points: Tensor) -> float:
    """Largest cosine between two distinct unit rows, in float64, a block of rows at a time."""
    k = points.shape[0]
    x = points.detach().to(device="cpu", dtype=torch.float64)
    best = -1.0
    for start, stop in _row_blocks(k, k):
        gram = x[start:stop] @ x.T
        own = torch.arange(start, stop, device=_CPU)
        gram[own - start, own] = -math.inf
        best = max(best, float(gram.max()))
    return min(best, 1.0)


def _neighbours(points: Tensor, count: int) -> Tensor:
    """Indices (``K x count``) of each point's ``count`` closest other points (float32 search)."""
    k = points.shape[0]
    x = points.to(torch.float32)
    out = torch.empty(k, count, dtype=torch.long, device=_CPU)
    for start, stop in _row_blocks(k, k):
        gram = x[start:stop] @ x.T
        own = torch.arange(start, stop, device=_CPU)
        gram[own - start, own] = -math.inf
        out[start:stop] = gram.topk(count, dim=1, sorted=False).indices
    return out


def _descend(points: Tensor, steps: int, count: int) -> Tensor:
    """Spread unit rows apart: projected gradient steps on a soft maximum of pairwise cosines.

    Each step minimises ``sum_{i, j in N(i)} exp(t cos(x_i, x_j))`` over the sphere, ``N(i)``
    being ``x_i``'s nearest neighbours (refreshed every ``_REFRESH_EVERY`` steps). The temperature
    ``t`` rises geometrically, so the objective moves from a smooth repulsion (an energy) to the
    maximum cosine itself; the step, normalised so that the most pushed point moves ``lr`` radians,
    shrinks geometrically.
    """
    k, d = points.shape
    x = points
    count = min(count, k - 1)
    neighbours = None
    if count == k - 1:  # every other point: no search needed
        neighbours = (
            torch.arange(1, k, device=_CPU)[None, :] + torch.arange(k, device=_CPU)[:, None]
        ) % k
    blocks = _row_blocks(k, count * d)
    (t_first, t_last), (lr_first, lr_last) = _TEMPERATURE, _STEP_SIZE
    for step in range(steps):
        progress = step / max(steps - 1, 1)
        temperature = t_first * (t_last / t_first) ** progress
        lr = lr_first * (lr_last / lr_first) ** progress
        if neighbours is None or (count < k - 1 and step % _REFRESH_EVERY == 0):
            neighbours = _neighbours(x, count)
        grad = torch.empty_like(x)
        block_tops = []
        for a, b in blocks:
            near = x[neighbours[a:b]]  # (rows, count, d)
            cosines = torch.bmm(near, x[a:b, :, None])
            top = float(cosines.max())
            # Shifted by the block's maximum and clipped at e^-40 (no overflow, no subnormals);
            # blocks are put on the common scale below.
            weights = torch.exp((temperature * (cosines - top)).clamp_min(-40.0))
            grad[a:b] = torch.bmm(weights.transpose(1, 2), near)[:, 0]
            block_tops.append(top)
        top = max(block_tops)
        for (a, b), block_top in zip(blocks, block_tops):
            if block_top < top:
                grad[a:b] *= math.exp(max(temperature * (block_top - top), -40.0))
        grad -= (grad * x).sum(1, keepdim=True) * x  # tangent to the sphere
        largest = float(grad.norm(dim=1).max())
        if largest > 0:
            x = x - (lr / largest) * grad
            x = x / x.norm(dim=1, keepdim=True)
    return x


def _regular_polygon(num_classes: int, generator: torch.Generator) -> Tensor:
    steps = torch.arange(num_classes, dtype=torch.float64, device=_CPU)
    angles = 2 * math.pi * steps / num_classes
    offset = 2 * math.pi * torch.rand((), generator=generator, dtype=torch.float64, device=_CPU)
    return torch.stack([torch.cos(angles + offset), torch.sin(angles + offset)], dim=1)


def _orthoplex_subset(num_classes: int, dim: int, generator: torch.Generator) -> Tensor:
    """``K`` of the ``2 d`` vectors ``+-e_i`` (pairwise cosines 0 or -1), randomly rotated."""
    eye = torch.eye(dim, dtype=torch.float64, device=_CPU)
    axes = torch.cat([eye, -eye])
    return axes[:num_classes] @ _random_orthonormal(dim, dim, generator).T


@functools.lru_cache(maxsize=8)
def _cached_code(num_classes: int, dim: int, steps: int, state: bytes) -> tuple[Tensor, bytes]:
    """The code for a generator state, and the generator state after drawing it."""
    gen = torch.Generator()
    gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    k, d = num_classes, dim
    if k <= d + 1:
        code = math.sqrt(k / (k - 1)) * (_helmert(k) @ _random_orthonormal(d, k - 1, gen).T)
    elif k <= 2 * d:
        code = _orthoplex_subset(k, d, gen)
    elif d == 2:
        code = _regular_polygon(k, gen)
    else:
        count = min(k - 1, _NEIGHBOURS)
        restarts = max(1, min(8, _RESTART_BUDGET // (k * count * d)))
        # float32 steps halve the memory traffic of large problems; the result is renormalised
        # in float64 and candidates are compared by their exact (float64) maximum cosine.
        work_dtype = torch.float64 if k * count * d <= _FLOAT64_WORK else torch.float32
        best, best_cosine = None, math.inf
        for _ in range(restarts):
            start = torch.randn(k, d, generator=gen, dtype=torch.float64, device=_CPU)
            start = (start / start.norm(dim=1, keepdim=True)).to(work_dtype)
            candidate = _descend(start, steps, count).to(torch.float64)
            candidate = candidate / candidate.norm(dim=1, keepdim=True)
            cosine = _max_cosine(candidate)
            if cosine < best_cosine:
                best, best_cosine = candidate, cosine
        assert best is not None  # restarts >= 1
        code = best
    return code, bytes(gen.get_state().numpy().tobytes())


def spherical_code(
    num_classes: int,
    dim: int,
    *,
    steps: int = 500,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``K`` unit vectors in ``dim`` dimensions with a large minimum pairwise angle.

    For ``K > dim + 1`` no simplex exists; the best arrangement (maximal minimum angle, the
    Tammes problem) is known in closed form only in a few cases, which are used:

    - ``K <= dim + 1``: the simplex ETF (optimal, angle ``arccos(-1/(K-1))``);
    - ``dim + 2 <= K <= 2 dim``: ``K`` vertices of the cross-polytope ``+-e_i`` (optimal: 90
      degrees, Rankin 1955);
    - ``dim = 2``: the regular ``K``-gon (optimal: ``360/K`` degrees).

    Otherwise points drawn at random are spread apart by projected gradient descent on a soft
    maximum of pairwise cosines, on the CPU (in float64; in float32 for large problems), with a
    temperature that rises until the objective is the maximum cosine itself; each point is pushed
    by its 32 nearest neighbours only, so ``K = 10,000`` in ``dim = 128`` takes seconds to a
    minute. Small problems are solved from up to 8 random starts and the best is kept. Results
    are cached per ``(K, dim, steps, generator state)``, so building the same head twice is
    instant; the generator advances the same way on a cache hit as on a miss. Compare the result
    with the bounds with :func:`frame_angle_report`.

    Args:
        num_classes: number of points ``K >= 2``.
        dim: dimension (``dim >= 2`` when ``K > 2``).
        steps: gradient steps of the optimiser (when one runs).
        generator: CPU generator for the starting points and orientation; default: seeded with
            :data:`DEFAULT_SEED`.
        dtype: dtype of the result (default: ``torch.get_default_dtype()``).
        device: device of the result (default: torch's default device, as ``torch.randn``).

    Returns:
        Tensor of shape ``(num_classes, dim)`` with unit-norm rows.

    Example:
        >>> code = spherical_code(12, 3, dtype=torch.float64)  # 12 points on the 2-sphere
        >>> report = frame_angle_report(code)
        >>> round(report.min_angle, 1)  # the icosahedron: arctan(2) = 63.4 degrees is optimal
        63.4
        >>> torch.equal(code, spherical_code(12, 3, dtype=torch.float64))  # deterministic
        True
    """
    k = read_int(num_classes, "num_classes", 2)
    d = read_int(dim, "dim", 1)
    steps = read_int(steps, "steps", 1)
    check_float_dtype(dtype)
    if d == 1 and k > 2:
        raise ValueError(
            f"Expected argument `dim` to be at least 2 for {k} classes: a line holds only 2 "
            "distinct unit vectors."
        )
    gen = _cpu_generator(generator)
    state = bytes(gen.get_state().numpy().tobytes())
    code, after = _cached_code(k, d, steps, state)
    gen.set_state(torch.frombuffer(bytearray(after), dtype=torch.uint8))
    return _finish(code, dtype, device)


def frame_min_angle(frame: Tensor) -> float:
    """Smallest angle, in degrees, between two rows of ``frame`` (computed in float64).

    Rows are normalised first; the ``K x K`` Gram matrix is formed a block of rows at a time to
    find the closest pairs (every pair whose cosine is within rounding of the largest), and their
    angle is then taken as ``2 atan2(||a - b||, ||a + b||)``, accurate for every angle: identical
    rows give exactly 0, and nearly parallel rows keep their angle (``acos`` of a cosine near 1
    would lose half the digits). Pairs are measured from the largest cosine down and those that
    cannot beat the angle found by more than its rounding are skipped, so frames whose pairs all
    tie (simplex ETF, orthogonal, one-hot) cost about the Gram matrix alone.

    Args:
        frame: tensor of shape ``(num_classes, dim)`` with ``num_classes >= 2`` nonzero rows.

    Returns:
        The minimum pairwise angle in degrees.

    Example:
        >>> frame_min_angle(torch.eye(3))
        90.0
    """
    _check_frame(frame)
    x = frame.detach().to(device="cpu", dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    return math.degrees(_min_angle(x))


def _min_angle(x: Tensor) -> float:
    """Smallest angle (radians) between two distinct unit rows of the float64 CPU tensor ``x``.

    A Gram entry of unit rows is within ``(d + 4) eps`` of the true cosine (Cauchy-Schwarz and
    the dot product's rounding bound, with the normalisation's rounding); with a margin of two,
    ``err = 2 (d + 4) eps``. The pair of the smallest angle therefore has a Gram entry within
    ``2 err`` of the largest entry seen, and each such candidate may need the exact angle
    formula. Candidates of each block are kept against the running largest entry, a superset of
    the final candidates (whose minimum is the same).

    The candidates are measured in order of decreasing Gram entry, a chunk at a time, and after
    each chunk those that cannot beat the smallest angle found so far are dropped: a pair with
    Gram entry ``g`` has an angle of at least ``acos(g + err)``, and it is dropped when that bound
    is within ``tol min(1, smallest)`` of the smallest angle (relative ``tol = 2 err`` below one
    radian, absolute above: the order of the exact formula's own rounding). Exact frames
    (simplex ETF, orthogonal, one-hot), whose pairs all tie, thus cost one chunk of exact angles
    instead of ``K^2``, and an angle of exactly 0 ends the search.
    """
    k, d = x.shape
    err = 2.0 * (d + 4) * torch.finfo(torch.float64).eps
    tol = 2.0 * err
    largest = -math.inf
    smallest = math.pi
    pair_chunk = max(1, _BLOCK_ELEMENTS // max(d, 1))
    chunk = min(pair_chunk, 16)  # doubled after each chunk: ties cost little, clusters few scans
    for start, stop in _row_blocks(k, k):
        gram = x[start:stop] @ x.T
        own = torch.arange(start, stop, device=_CPU)
        gram[own - start, own] = -math.inf
        largest = max(largest, float(gram.max()))
        while True:
            candidates = gram >= max(largest - tol, _beating_floor(smallest, err, tol))
            count = int(candidates.sum())
            if count == 0:
                break
            if count <= chunk:
                rows, cols = torch.nonzero(candidates, as_tuple=True)
            else:  # the chunk of the largest Gram entries first, then the rest are filtered again
                flat = torch.topk(gram.view(-1), chunk, sorted=False).indices
                rows, cols = flat // k, flat % k
                gram.view(-1)[flat] = -math.inf
            smallest = min(smallest, float(_exact_angles(x[rows + start], x[cols]).min()))
            if smallest == 0.0:
                return 0.0
            if count <= chunk:
                break
            chunk = min(2 * chunk, pair_chunk)
    return smallest


def _exact_angles(a: Tensor, b: Tensor) -> Tensor:
    """Angles (radians) between the unit rows ``a[i]`` and ``b[i]``: ``2 atan2(|a-b|, |a+b|)``."""
    return 2.0 * torch.atan2((a - b).norm(dim=1), (a + b).norm(dim=1))


def _beating_floor(smallest: float, err: float, tol: float) -> float:
    """Gram entries at or below this belong to pairs that cannot beat the angle ``smallest``.

    A pair with Gram entry ``g`` has an angle of at least ``acos(min(1, g + err))``; the pair is
    left out when that bound is at least ``smallest - tol min(1, smallest)``.
    """
    target = smallest - tol * min(1.0, smallest)
    return math.cos(target) - err if target > 0.0 else -math.inf


def _check_frame(frame: Tensor) -> None:
    if not isinstance(frame, Tensor):
        raise TypeError(
            f"Expected argument `frame` to be a Tensor, but got {type(frame).__name__}."
        )
    if frame.ndim != 2 or frame.shape[0] < 2 or frame.shape[1] < 1:
        raise ValueError(
            "Expected argument `frame` to be a 2-D tensor (num_classes, dim) with at least 2 rows, "
            f"but got shape {tuple(frame.shape)}."
        )
    if not frame.is_floating_point():
        raise TypeError(f"Expected argument `frame` to be floating point, but got {frame.dtype}.")
    norms = frame.detach().double().norm(dim=1)
    if not bool(torch.isfinite(frame).all()) or not bool((norms > 0).all()):
        raise ValueError("Expected argument `frame` to have finite, nonzero rows.")


def _packing_bound(num_classes: int, dim: int, grid: int = 100_001) -> float:
    """Cap-packing bound (degrees): caps of radius ``angle/2`` around the points do not overlap.

    The fraction of ``S^{dim-1}`` in a cap of radius ``r`` is ``int_0^r sin^{d-2} / int_0^pi
    sin^{d-2}``, tabulated by the trapezoid rule; the largest ``r`` with ``K`` caps covering at
    most the whole sphere is read off the table by linear interpolation.
    """
    if dim == 2:
        return 360.0 / num_classes
    phi = torch.linspace(0.0, math.pi / 2, grid, dtype=torch.float64, device=_CPU)
    log_density = (dim - 2) * torch.log(torch.sin(phi).clamp_min(1e-300))
    density = torch.exp(log_density - log_density.max())
    cumulative = torch.cat([density.new_zeros(1), torch.cumulative_trapezoid(density, phi)])
    fraction = cumulative / (2 * cumulative[-1])  # cap fraction for radius 0 .. pi/2
    target = torch.tensor([1.0 / num_classes], dtype=torch.float64, device=_CPU)
    upper = int(torch.searchsorted(fraction, target).clamp(1, grid - 1))
    low, high = float(fraction[upper - 1]), float(fraction[upper])
    position = upper - 1 + (1.0 / num_classes - low) / max(high - low, 1e-300)
    return math.degrees(2 * position * (math.pi / 2) / (grid - 1))


def min_angle_bound(num_classes: int, dim: int) -> tuple[float, str]:
    """Upper bound on the minimum pairwise angle of ``K`` unit vectors in ``dim`` dimensions.

    The smallest of: the simplex bound ``arccos(-1/(K-1))`` (attained when ``K <= dim + 1``),
    Rankin's orthoplex bound of 90 degrees for ``K >= dim + 2`` (attained when ``K <= 2 dim``),
    and the cap-packing bound (``K`` disjoint caps of radius ``angle/2``; attained for
    ``dim = 2``). For ``K > 2 dim`` in ``dim >= 3`` the bound is not attained in general.

    Args:
        num_classes: number of vectors ``K >= 2``.
        dim: dimension.

    Returns:
        ``(bound_in_degrees, name)`` with ``name`` one of ``"simplex"``, ``"orthoplex"``,
        ``"cap packing"``.

    Example:
        >>> min_angle_bound(4, 3)
        (109.47122063449069, 'simplex')
        >>> min_angle_bound(6, 3)
        (90.0, 'orthoplex')
    """
    k = read_int(num_classes, "num_classes", 2)
    d = read_int(dim, "dim", 1)
    if d == 1:
        return (180.0, "simplex") if k == 2 else (0.0, "cap packing")
    bounds = [(math.degrees(math.acos(-1.0 / (k - 1))), "simplex")]
    if k >= d + 2:
        bounds.append((90.0, "orthoplex"))
        bounds.append((_packing_bound(k, d), "cap packing"))
    return min(bounds, key=lambda item: item[0])


@dataclass(frozen=True)
class FrameAngleReport:
    """How well separated a frame is.

    Attributes:
        num_classes: number of rows ``K``.
        dim: dimension ``d``.
        min_angle: smallest pairwise angle between rows, in degrees.
        bound: upper bound on the minimum angle for any ``K`` unit vectors in ``d`` dimensions,
            in degrees (:func:`min_angle_bound`).
        bound_name: which bound is the smallest: ``"simplex"``, ``"orthoplex"`` or
            ``"cap packing"``.
        bound_attained: whether some frame attains ``bound`` (``K <= 2 d`` or ``d = 2``); when
            ``False`` the true optimum lies strictly below ``bound``.
    """

    num_classes: int
    dim: int
    min_angle: float
    bound: float
    bound_name: str
    bound_attained: bool

    @property
    def gap(self) -> float:
        """``bound - min_angle`` in degrees (zero for an optimal frame when ``bound_attained``)."""
        return self.bound - self.min_angle

    def __str__(self) -> str:
        kind = "attained" if self.bound_attained else "not attained in general"
        return (
            f"{self.num_classes} directions in {self.dim} dimensions: minimum angle "
            f"{self.min_angle:.4f} deg,\n{self.bound_name} bound {self.bound:.4f} deg ({kind})"
        )


def frame_angle_report(frame: Tensor) -> FrameAngleReport:
    """The minimum pairwise angle of ``frame`` against the best known upper bound.

    Args:
        frame: tensor of shape ``(num_classes, dim)``.

    Returns:
        A :class:`FrameAngleReport`.

    Example:
        >>> report = frame_angle_report(simplex_etf(5, 4))
        >>> print(report)  # the simplex attains the simplex bound
        5 directions in 4 dimensions: minimum angle 104.4775 deg,
        simplex bound 104.4775 deg (attained)
    """
    min_angle = frame_min_angle(frame)
    k, d = frame.shape
    bound, name = min_angle_bound(k, d)
    return FrameAngleReport(
        num_classes=k,
        dim=d,
        min_angle=min_angle,
        bound=bound,
        bound_name=name,
        bound_attained=k <= 2 * d or d <= 2,
    )


# ---------------------------------------------------------------------------------------------
# Frames from a class-similarity matrix
# ---------------------------------------------------------------------------------------------


def _psd_part(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    result: Tensor = (vectors * values.clamp_min(0.0)) @ vectors.T
    return result


def _nearest_correlation(similarity: Tensor, max_iter: int, tol: float) -> Tensor:
    """Alternating projections with Dykstra's correction (Higham, 2002), then a final repair."""
    y = similarity.clone()
    correction = torch.zeros_like(y)
    for _ in range(max_iter):
        residual = y - correction
        x = _psd_part(residual)
        correction = x - residual
        y_next = x.clone()
        y_next.fill_diagonal_(1.0)
        change = float(torch.linalg.matrix_norm(y_next - y)) / max(
            float(torch.linalg.matrix_norm(y)), 1e-300
        )
        y = y_next
        if change < tol:
            break
    gram = _psd_part(y)
    scale = torch.rsqrt(torch.diagonal(gram).clamp_min(1e-300))
    return gram * scale[:, None] * scale[None, :]


def hierarchy_frame(
    similarity: Tensor,
    dim: int | None = None,
    *,
    max_iter: int = 200,
    tol: float = 1e-12,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Unit vectors whose pairwise cosines follow a class-similarity matrix.

    The symmetrised ``similarity`` (diagonal ignored) is projected onto the nearest correlation
    matrix in Frobenius norm (positive semi-definite with unit diagonal; Higham 2002, alternating
    projections with Dykstra's correction, at most ``max_iter`` rounds). A valid input is kept as
    it is. The Gram matrix is factorised by its eigendecomposition into vectors of its rank ``r``,
    which are embedded in ``dim`` dimensions by a random orthonormal map, so the frame's Gram
    matrix is the projected one and its orientation is random.

    Args:
        similarity: ``(K, K)`` target cosines between classes, e.g. from a class hierarchy.
        dim: dimension of the frame, at least the rank ``r`` of the projected Gram matrix;
            default ``r``.
        max_iter: most alternating-projection rounds.
        tol: stop when a round changes the matrix by less than this (relative Frobenius norm),
            a real number ``>= 0``.
        generator: CPU generator for the orientation; default: seeded with :data:`DEFAULT_SEED`.
        dtype: dtype of the result (default: ``torch.get_default_dtype()``).
        device: device of the result (default: torch's default device, as ``torch.randn``).

    Returns:
        Tensor of shape ``(K, dim)`` with unit-norm rows.

    Raises:
        TypeError: when ``similarity`` is not a floating-point tensor, ``max_iter`` or ``dim``
            not an integer, ``tol`` not a real number, or ``dtype`` not a floating dtype.
        ValueError: when ``similarity`` is not square with ``K >= 2`` or holds NaN or infinite
            values, ``tol`` is negative or NaN, or ``dim`` is smaller than the rank of the
            projected Gram matrix.

    Example:
        >>> # two super-classes of two classes: siblings at cosine 0.5, cousins at -0.5
        >>> similarity = torch.tensor([[1.0, 0.5, -0.5, -0.5], [0.5, 1.0, -0.5, -0.5],
        ...                            [-0.5, -0.5, 1.0, 0.5], [-0.5, -0.5, 0.5, 1.0]])
        >>> frame = hierarchy_frame(similarity, dim=8, dtype=torch.float64)
        >>> frame.shape
        torch.Size([4, 8])
        >>> torch.allclose(frame @ frame.T, similarity.double())
        True
    """
    if not isinstance(similarity, Tensor):
        raise TypeError(
            f"Expected argument `similarity` to be a Tensor, but got {type(similarity).__name__}."
        )
    if (
        similarity.ndim != 2
        or similarity.shape[0] != similarity.shape[1]
        or similarity.shape[0] < 2
    ):
        raise ValueError(
            "Expected argument `similarity` to be a square (K, K) tensor with K >= 2, "
            f"but got shape {tuple(similarity.shape)}."
        )
    if not similarity.is_floating_point():
        raise TypeError(
            "Expected argument `similarity` to be a floating-point tensor, but got "
            f"{similarity.dtype}."
        )
    if not bool(torch.isfinite(similarity).all()):
        raise ValueError(
            "Expected argument `similarity` to be a finite floating-point tensor, but it holds "
            "NaN or infinity."
        )
    max_iter = read_int(max_iter, "max_iter", 1)
    check_float_dtype(dtype)
    tol_value = as_real_float(tol)
    if tol_value is None:
        raise TypeError(
            f"Expected argument `tol` to be a real number, but got {type(tol).__name__}."
        )
    if not tol_value >= 0:
        raise ValueError(f"Expected argument `tol` to be a number >= 0, but got {tol!r}.")
    s = similarity.detach().to(device="cpu", dtype=torch.float64)
    s = (s + s.T) / 2
    s.fill_diagonal_(1.0)
    gram = _nearest_correlation(s, max_iter, tol_value)
    values, vectors = torch.linalg.eigh(gram)
    keep = values > values.max() * s.shape[0] * torch.finfo(torch.float64).eps * 16
    rank = int(keep.sum())
    if dim is None:
        dim = rank
    d = read_int(dim, "dim", 1)
    if d < rank:
        raise ValueError(
            f"Expected argument `dim` to be at least {rank}, the rank of the projected "
            f"similarity (Gram) matrix, but got {d}."
        )
    vectors = vectors[:, keep] * values[keep].sqrt()  # K x r, Gram = gram
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    frame = vectors @ _random_orthonormal(d, rank, _cpu_generator(generator)).T
    return _finish(frame, dtype, device)
