"""Class statistics: the sufficient statistics of neural collapse, accumulated exactly.

Every collapse quantity (Papyan, Han & Donoho, 2020, "Prevalence of neural collapse during the
terminal phase of deep learning training"; Galanti, Gyorgy & Hutter, 2022, "On the role of neural
collapse in transfer learning") is a function of a few statistics of features ``h_i`` in ``R^d`` and
labels ``y_i`` in ``{0, ..., K-1}``: the per-class counts, the per-class means, the pooled
within-class scatter (``d x d``) and the per-class within-class sums of squares.
:class:`ClassStatistics` owns them: built from a batch, updated in place, merged exactly with
another one and reduced across processes.

**Exactness.** A one-pass raw second moment ``sum h h^T - n mu mu^T`` cancels catastrophically late
in training, when the within-class spread is ``1e-3`` of the features' offset. Instead, every class
``c`` keeps a *shift* ``s_c``: one of its own samples (the first one seen). The statistics are
accumulated about that shift, in float64:

- ``counts[c] = n_c``;
- ``sums[c] = sum_{y_i = c} (h_i - s_c)``;
- ``sum_squares[c] = sum_{y_i = c} ||h_i - s_c||^2``;
- ``scatter = sum_i (h_i - s_{y_i}) (h_i - s_{y_i})^T``.

The centred values ``h_i - s_c`` are small (of the order of the within-class spread, whatever the
offset) and are formed in float64, where the subtraction of two input values is exact to one
rounding. The within-class statistics about the true class means follow with small corrections,
``S_W = scatter - sum_c sums_c sums_c^T / n_c``, because ``s_c`` is a sample of class ``c``. Two
statistics with different shifts merge exactly by re-expressing one about the other's shift (the
pairwise update of Chan, Golub & LeVeque, 1979, in matrix form), which is also how statistics of
several processes are combined.

**Speed.** The ``d x d`` product is the cost of an update. It runs in float64 (a float32 product of
a batch of ``1000`` rows already errs by ``~1e-6`` relative, the whole error budget); on CPU
only its upper block triangle is multiplied, panel by panel, about half the flops of the full
product (with several threads, as one batched product over a block of rows per thread; small
batches, where the panels' overhead outweighs the flops saved, take one product), so that a
float64 update stays close to the float32 Gram ``features.T @ features`` (the floor); the first
sample of a new class, its own shift, is a zero row and is left out. On GPUs, whose float64
throughput matches float32 (H100/H200), the product is one ``addmm``.

``update`` does no host-device synchronisation when ``validate_args=False`` (on accelerators the
shifts of new classes are set by masked arithmetic on the counts; on CPU, where reading a value is
free, only the samples of new classes are touched), no per-update work is proportional to
``K x d``, and on CPU the batch is centred in place in reused per-thread scratch buffers. For
hardware where float64 is slow, ``product_dtype=torch.float32`` trades the exact product for a
float32 one.

Example:
    >>> import torch
    >>> from torchcollapse.stats import ClassStatistics
    >>> features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    >>> target = torch.tensor([0, 0, 1, 1])
    >>> stats = ClassStatistics.from_features(features, target, num_classes=3)
    >>> stats.counts  # the third class has no samples
    tensor([2., 2., 0.], dtype=torch.float64)
    >>> stats.class_means()  # absent classes have no mean
    tensor([[2., 0.],
            [0., 3.],
            [nan, nan]], dtype=torch.float64)
    >>> stats.within_class_scatter()  # sum of (h - mu_y)(h - mu_y)^T over the samples
    tensor([[2., 0.],
            [0., 2.]], dtype=torch.float64)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchcollapse._distributed import is_distributed
from torchcollapse._numbers import read_int

__all__ = ["ClassStatistics", "symmetric_product"]


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check_features(features: Any, name: str = "features") -> None:
    if not isinstance(features, Tensor):
        raise TypeError(
            f"Expected argument `{name}` to be a torch.Tensor, but got {type(features)}."
        )
    if features.ndim != 2:
        raise ValueError(
            f"Expected argument `{name}` to be a 2-D tensor of shape (num_samples, num_features),"
            f" but got shape {_shape(features)}."
        )
    if not features.is_floating_point():
        raise TypeError(
            f"Expected argument `{name}` to be a floating point tensor, but got dtype"
            f" {features.dtype}."
        )
    if features.shape[1] == 0:
        raise ValueError(
            f"Expected argument `{name}` to have at least one feature (column), but got shape"
            f" {_shape(features)}."
        )


def _check_num_classes(num_classes: Any) -> int:
    """``num_classes`` as a Python int (any integer type, not a bool); raise unless positive."""
    return read_int(num_classes, "num_classes")


def _check_num_features(num_features: Any) -> int:
    """``num_features`` as a Python int (any integer type, not a bool); raise unless positive."""
    return read_int(num_features, "num_features")


def _check_dtype(dtype: Any) -> None:
    """Raise unless ``dtype`` is an accumulation dtype: float64 (exact) or float32. 16-bit
    floats would stop counting (bfloat16 counts stall at 256) and integers truncate."""
    if dtype not in (torch.float64, torch.float32):
        raise TypeError(
            f"Expected argument `dtype` to be torch.float64 (exact statistics) or torch.float32,"
            f" but got {dtype}."
        )


def _check_features_target(
    features: Any, target: Any, num_classes: int, *, validate_args: bool = True
) -> None:
    """Validate a batch: shapes and dtypes always; values (finite, in range) when ``validate_args``.

    The value checks read results back from the device (a host-device synchronisation); turn them
    off with ``validate_args=False`` for a synchronisation-free update.
    """
    _check_features(features)
    if not isinstance(target, Tensor):
        raise TypeError(f"Expected argument `target` to be a torch.Tensor, but got {type(target)}.")
    if target.ndim != 1:
        raise ValueError(
            f"Expected argument `target` to be a 1-D tensor of class indices, but got shape"
            f" {_shape(target)}."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"Expected argument `target` to be an integer tensor of class indices, but got dtype"
            f" {target.dtype}."
        )
    if target.shape[0] != features.shape[0]:
        raise ValueError(
            "Expected arguments `features` and `target` to have the same number of samples, but got"
            f" {features.shape[0]} and {target.shape[0]}."
        )
    if target.device != features.device:
        raise ValueError(
            "Expected arguments `features` and `target` to be on the same device, but got"
            f" {features.device} and {target.device}."
        )
    if not validate_args or target.numel() == 0:
        return
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Expected argument `target` to hold class indices in [0, {num_classes - 1}]"
            f" (num_classes={num_classes}), but got values in [{low}, {high}]."
        )
    if not bool(torch.isfinite(features).all()):
        bad = int((~torch.isfinite(features)).any(dim=1).sum())
        raise ValueError(
            f"Expected argument `features` to be finite, but got NaN or Inf in {bad} of"
            f" {features.shape[0]} rows. Pass `validate_args=False` to skip this check."
        )


class ClassStatistics:
    """Per-class counts, sums and sums of squares, and the pooled within-class scatter.

    The statistics of features ``h_i`` (``d``-dimensional) with labels ``y_i`` in
    ``{0, ..., K-1}``, accumulated about a per-class shift ``s_c`` (one of the class's samples)
    so that they stay exact whatever the features' offset; see the module
    docstring. All tensors share one dtype (float64 by default) and one device; on a device
    without float64 (Apple's MPS) make them in float32 (``zeros(..., dtype=torch.float32)``) or
    keep them on the CPU.

    Args:
        counts: ``(K,)`` number of samples per class (stored as floats).
        shift: ``(K, d)`` the shift ``s_c`` of each class; zero for classes without samples (a
            class seen for the first time takes ``0 + its first sample``, so any other value there
            is still exact, only less accurate).
        sums: ``(K, d)`` ``sum_{y_i = c} (h_i - s_c)``.
        sum_squares: ``(K,)`` ``sum_{y_i = c} ||h_i - s_c||^2``.
        scatter: ``(d, d)`` ``sum_i (h_i - s_{y_i})(h_i - s_{y_i})^T``.

    Use :meth:`zeros`, :meth:`from_features` or :meth:`unpack` rather than the constructor.

    Example:
        >>> import torch
        >>> from torchcollapse.stats import ClassStatistics
        >>> _ = torch.manual_seed(0)
        >>> features, target = torch.randn(100, 8), torch.randint(0, 4, (100,))
        >>> stats = ClassStatistics.zeros(num_classes=4, num_features=8)
        >>> for f, t in zip(features.split(30), target.split(30)):  # stream ragged batches
        ...     _ = stats.update(f, t)
        >>> whole = ClassStatistics.from_features(features, target, num_classes=4)
        >>> torch.allclose(stats.within_class_scatter(), whole.within_class_scatter())
        True
        >>> half = ClassStatistics.from_features(features[:50], target[:50], num_classes=4)
        >>> rest = ClassStatistics.from_features(features[50:], target[50:], num_classes=4)
        >>> torch.allclose(half.merge(rest).class_means(), whole.class_means())  # exact merge
        True
    """

    __slots__ = ("counts", "scatter", "shift", "sum_squares", "sums")

    def __init__(
        self, counts: Tensor, shift: Tensor, sums: Tensor, sum_squares: Tensor, scatter: Tensor
    ) -> None:
        if shift.ndim != 2:
            raise ValueError(f"Expected argument `shift` to be 2-D, but got shape {_shape(shift)}.")
        num_classes, num_features = shift.shape
        expected = {
            "counts": (num_classes,),
            "sums": (num_classes, num_features),
            "sum_squares": (num_classes,),
            "scatter": (num_features, num_features),
        }
        given = {"counts": counts, "sums": sums, "sum_squares": sum_squares, "scatter": scatter}
        for name, tensor in given.items():
            if _shape(tensor) != expected[name]:
                raise ValueError(
                    f"Expected argument `{name}` to have shape {expected[name]}, but got"
                    f" {_shape(tensor)}."
                )
            if tensor.dtype != shift.dtype or tensor.device != shift.device:
                raise ValueError(
                    f"Expected argument `{name}` to have dtype {shift.dtype} on {shift.device}, but"
                    f" got {tensor.dtype} on {tensor.device}."
                )
        self.counts = counts
        self.shift = shift
        self.sums = sums
        self.sum_squares = sum_squares
        self.scatter = scatter

    # ------------------------------------------------------------------ construction
    @classmethod
    def zeros(
        cls,
        num_classes: int,
        num_features: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> ClassStatistics:
        """Empty statistics (no samples) for ``num_classes`` classes of ``num_features`` features.

        Args:
            num_classes: number of classes ``K``.
            num_features: feature dimension ``d``.
            device: where the statistics live.
            dtype: accumulation dtype; float64 (the default) is what makes them exact.

        Example:
            >>> ClassStatistics.zeros(3, 2).num_present
            0
        """
        num_classes = _check_num_classes(num_classes)
        num_features = _check_num_features(num_features)
        _check_dtype(dtype)
        return cls.unpack(
            torch.zeros(cls.packed_size(num_classes, num_features), device=device, dtype=dtype),
            num_classes,
        )

    @classmethod
    def from_features(
        cls,
        features: Tensor,
        target: Tensor,
        num_classes: int,
        *,
        dtype: torch.dtype = torch.float64,
        validate_args: bool = True,
    ) -> ClassStatistics:
        """Statistics of one batch.

        Args:
            features: ``(N, d)`` floating point features (any float dtype, any device).
            target: ``(N,)`` integer class indices in ``[0, num_classes)``.
            num_classes: number of classes ``K``.
            dtype: accumulation dtype (float64 by default).
            validate_args: check that labels are in range and features finite (this reads values
                back from the device).

        The result is differentiable with respect to ``features`` when they require grad (the
        shifts are constants); it then holds new tensors rather than views of one flat tensor.

        Example:
            >>> stats = ClassStatistics.from_features(torch.eye(3), torch.tensor([0, 1, 1]), 2)
            >>> stats.counts
            tensor([1., 2.], dtype=torch.float64)
        """
        num_classes = _check_num_classes(num_classes)
        _check_features(features)
        stats = cls.zeros(num_classes, features.shape[1], device=features.device, dtype=dtype)
        return stats.update(features, target, validate_args=validate_args)

    # ------------------------------------------------------------------ packing
    @staticmethod
    def packed_size(num_classes: int, num_features: int) -> int:
        """Length of the flat tensor that :meth:`pack` returns: ``2K + 2Kd + d^2``."""
        return 2 * num_classes + 2 * num_classes * num_features + num_features * num_features

    @staticmethod
    def num_features_from_packed_size(size: int, num_classes: int) -> int:
        """Invert :meth:`packed_size` for ``d`` (raises if ``size`` does not fit)."""
        disc = num_classes * num_classes - 2 * num_classes + size
        root = math.isqrt(disc) if disc >= 0 else -1
        num_features = root - num_classes
        if (
            root < 0
            or num_features < 1
            or ClassStatistics.packed_size(num_classes, num_features) != size
        ):
            raise ValueError(
                "Expected a packed statistics tensor of length 2K + 2Kd + d^2 for K ="
                f" {num_classes}, but got length {size}."
            )
        return num_features

    def pack(self) -> Tensor:
        """One flat tensor ``[counts, sum_squares, shift, sums, scatter]`` (a copy).

        Example:
            >>> stats = ClassStatistics.from_features(torch.ones(2, 3), torch.tensor([0, 1]), 2)
            >>> ClassStatistics.unpack(stats.pack(), num_classes=2).counts
            tensor([1., 1.], dtype=torch.float64)
        """
        return torch.cat(
            [
                self.counts,
                self.sum_squares,
                self.shift.reshape(-1),
                self.sums.reshape(-1),
                self.scatter.reshape(-1),
            ]
        )

    @classmethod
    def unpack(cls, packed: Tensor, num_classes: int) -> ClassStatistics:
        """Statistics whose tensors are *views* of the flat tensor ``packed`` (see :meth:`pack`).

        In-place updates of the returned statistics (:meth:`update`) write into ``packed``.
        """
        if packed.ndim != 1:
            raise ValueError(
                f"Expected argument `packed` to be 1-D, but got shape {_shape(packed)}."
            )
        k = num_classes
        d = cls.num_features_from_packed_size(packed.numel(), k)
        bounds = [0, k, 2 * k, 2 * k + k * d, 2 * k + 2 * k * d, packed.numel()]
        # Plain slices (not ``split``), so that the views may be updated in place under autograd.
        counts, sum_squares, shift, sums, scatter = (
            packed[a:b] for a, b in itertools.pairwise(bounds)
        )
        return cls(counts, shift.view(k, d), sums.view(k, d), sum_squares, scatter.view(d, d))

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` (present or not)."""
        return int(self.shift.shape[0])

    @property
    def num_features(self) -> int:
        """Feature dimension ``d``."""
        return int(self.shift.shape[1])

    @property
    def present(self) -> Tensor:
        """``(K,)`` boolean mask of the classes with at least one sample."""
        return self.counts > 0

    @property
    def num_present(self) -> int:
        """Number of classes with at least one sample (reads a value from the device)."""
        return int(self.present.sum())

    @property
    def total(self) -> Tensor:
        """Total number of samples ``N`` (a 0-d tensor)."""
        return self.counts.sum()

    @property
    def dtype(self) -> torch.dtype:
        """Accumulation dtype."""
        return self.counts.dtype

    @property
    def device(self) -> torch.device:
        """Device of the statistics."""
        return self.counts.device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes},"
            f" num_features={self.num_features}, dtype={self.dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ derived statistics
    def class_means(self) -> Tensor:
        """``(K, d)`` class means ``mu_c``; rows of classes without samples are NaN.

        Differentiable where the statistics are.
        """
        present = self.present.unsqueeze(1)
        means = self.shift + self.sums / self.counts.clamp_min(1).unsqueeze(1)
        return torch.where(present, means, torch.full_like(means, float("nan")))

    def mean_offsets(self) -> Tensor:
        """``(K, d)`` ``mu_c - s_c``: class means relative to the shifts (0 if absent)."""
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    def within_class_scatter(self) -> Tensor:
        """``(d, d)`` within-class scatter ``sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T``.

        Divide by :attr:`total` for the (biased) within-class covariance ``Sigma_W``.
        """
        scaled = self.sums / self.counts.clamp_min(1).sqrt().unsqueeze(1)
        if self.scatter.requires_grad or scaled.requires_grad:
            return self.scatter - scaled.T @ scaled
        return self.scatter - symmetric_product(scaled)

    def within_class_sum_squares(self) -> Tensor:
        """``(K,)`` ``sum_{y_i = c} ||h_i - mu_c||^2`` (0 for classes without samples)."""
        return self.sum_squares - self.sums.square().sum(1) / self.counts.clamp_min(1)

    # ------------------------------------------------------------------ accumulation
    def update(
        self,
        features: Tensor,
        target: Tensor,
        *,
        validate_args: bool = True,
        product_dtype: torch.dtype | None = None,
    ) -> ClassStatistics:
        """Add a batch to the statistics, in place, and return ``self``.

        Args:
            features: ``(B, d)`` features of any floating dtype, on the statistics' device.
            target: ``(B,)`` integer class indices in ``[0, K)``.
            validate_args: check label range and finiteness (reads values back from the device;
                with ``False`` the update performs no host-device synchronisation).
            product_dtype: dtype of the ``d x d`` product of the centred batch: the accumulation
                dtype (default, float64: exact) or ``torch.float32`` (in full IEEE precision, TF32
                off): about twice as fast where float64 is slow (AVX2 CPUs, consumer GPUs), at a
                relative error in ``Sigma_W`` and NC1 of about float32's epsilon times the spread
                of ``Sigma_W``'s eigenvalues (~1e-7 to a few 1e-6 on typical features, 1e-3 when
                some directions are 1e-3 of the others' scale).

        A class seen for the first time takes its first sample in the batch as its shift.
        Features are centred about their class's shift in the accumulation dtype and multiplied:
        on CPU the symmetric ``d x d`` product of a large enough batch (from ~80 rows per
        thread at ``d = 256`` to 512) is formed panel by panel over its upper triangle (about
        half the flops of a full product), which keeps a float64 update close to the float32
        Gram ``features.T @ features``. On CPU, when autograd does not record the
        update, the first sample of each new class (its own shift, so a zero row) is left out of
        the centring and the product: at the start of an epoch, ``K`` of the rows. Nothing
        proportional to ``K x d`` is computed.
        """
        _check_features_target(features, target, self.num_classes, validate_args=validate_args)
        if product_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(
                "Expected argument `product_dtype` to be None, torch.float32 or torch.float64, but"
                f" got {product_dtype}."
            )
        if features.shape[1] != self.num_features:
            raise ValueError(
                f"Expected argument `features` to have {self.num_features} features (columns), but"
                f" got shape {_shape(features)}."
            )
        if features.device != self.device:
            raise ValueError(
                f"Expected argument `features` to be on {self.device}, but got {features.device}."
            )
        if features.shape[0] == 0:
            return self
        target = target.long()
        state = self.dtype
        num_samples = features.shape[0]
        ones = torch.ones(num_samples, device=self.device, dtype=state)
        shape = (num_samples, self.num_features)
        with torch.no_grad():
            rows, batch_shift = self._set_new_shifts(
                features.detach(), target, read_back=self.device.type == "cpu"
            )
        if torch.is_grad_enabled() and features.requires_grad:
            if batch_shift is None:
                with torch.no_grad():
                    batch_shift = self.shift.index_select(0, target)
            shift = batch_shift
            # Out of place, so that autograd records the batch (the tensors stop being views).
            centred = features.to(state) - shift
            self.counts = self.counts.index_add(0, target, ones)
            self.sums = self.sums.index_add(0, target, centred)
            squares = torch.linalg.vecdot(centred, centred)
            self.sum_squares = self.sum_squares.index_add(0, target, squares)
            self.scatter = self.scatter + centred.T @ centred
            return self
        self.counts.index_add_(0, target, ones)
        # Scratch buffers are reserved for the whole batch (plus padding): the rows kept grow
        # batch by batch as fewer classes are new.
        reserve = 0
        if self.device.type == "cpu":
            reserve = (num_samples + torch.get_num_threads()) * self.num_features
        if rows is not None:
            # The first sample of a new class is its shift: its centred row is exactly zero and
            # adds nothing, so only the other rows are gathered, centred and multiplied.
            shape = (rows.shape[0], self.num_features)
            kept = _scratch("rows", shape, features.dtype, self.device, reserve=reserve)
            features = torch.index_select(features, 0, rows, out=kept)
            target = target.index_select(0, rows)
        if batch_shift is None:
            batch_shift = torch.index_select(
                self.shift,
                0,
                target,
                out=_scratch("shift", shape, state, self.device, reserve=reserve),
            )
        shift = batch_shift
        # h - s in the state dtype. On CPU, in a reused buffer: the input is copied (promoted
        # exactly) and the shifts subtracted in place, with no temporary of the batch's size;
        # the buffer has zero rows appended up to a multiple of the blocks the product splits
        # the rows into. Elsewhere one subtraction, promoting on the fly (one kernel launch).
        num_rows = shape[0]
        parts = _gram_parts(num_rows, self.num_features, self.device)
        padded_shape = (-(-num_rows // parts) * parts, shape[1])
        if (
            _one_kernel_centring(self.device)
            and padded_shape[0] == num_rows
            and torch.promote_types(features.dtype, state) == state
        ):
            padded = centred = torch.sub(features, shift)
        else:
            padded = _scratch("centred", padded_shape, state, self.device, reserve=reserve)
            if padded_shape[0] > num_rows:
                padded[num_rows:].zero_()
            centred = padded[:num_rows].copy_(features)
            centred.sub_(shift)
        self.sums.index_add_(0, target, centred)
        # one reduction pass (a product and a sum would write a batch-sized temporary)
        squares = torch.linalg.vector_norm(centred, dim=1).square_()
        self.sum_squares.index_add_(0, target, squares)
        if product_dtype is None or product_dtype == state:
            _add_gram_(self.scatter, padded, parts)
        else:
            low = _scratch(
                "low precision", padded_shape, product_dtype, self.device, reserve=reserve
            )
            low.copy_(padded)
            product = _scratch("product", self.scatter.shape, product_dtype, self.device).zero_()
            with _full_precision_matmul():
                _add_gram_(product, low, parts)
            self.scatter.add_(product)
        return self

    def _set_new_shifts(
        self, features: Tensor, target: Tensor, *, read_back: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """Give every class seen for the first time its first sample in the batch as shift.

        Returns ``(rows, shift)``: the indices of the samples to accumulate (``None``: all) and
        the ``(B, d)`` shift of every sample (``None``: not gathered). With ``read_back`` (free on
        CPU) only the samples of new classes are touched and ``rows`` leaves out their first
        samples, which centre to exactly zero; without it (accelerators, where reading a value
        back synchronises) a masked selection runs over every sample, which gathers ``shift``
        on the way. Both give the same shifts.
        """
        num_samples = features.shape[0]
        new = self.counts.index_select(0, target) == 0
        if read_back and not bool(new.any()):
            return None, None
        # Index, within the batch, of the first sample of every class (num_samples: none).
        first = torch.full((self.num_classes,), num_samples, device=self.device)
        if read_back:
            samples = new.nonzero().squeeze(1)
            classes = target.index_select(0, samples)
            first.scatter_reduce_(0, classes, samples, reduce="amin", include_self=True)
            firsts = first.index_select(0, classes)
            # Rows of one class are identical: duplicate indices write the same values.
            self.shift.index_copy_(0, classes, features.index_select(0, firsts).to(self.dtype))
            others = torch.ones(num_samples, dtype=torch.bool, device=self.device)
            return others.index_fill_(0, firsts, False).nonzero().squeeze(1), None
        positions = torch.arange(num_samples, device=self.device)
        first.scatter_reduce_(0, target, positions, reduce="amin", include_self=True)
        candidate = features.index_select(0, first.index_select(0, target))
        # where() promotes the candidates to the statistics' dtype on the fly (exactly)
        shift = torch.where(new.unsqueeze(1), candidate, self.shift.index_select(0, target))
        if shift.dtype != self.dtype:
            shift = shift.to(self.dtype)
        self.shift.index_copy_(0, target, shift)
        return None, shift

    def merge(self, other: ClassStatistics) -> ClassStatistics:
        """Exact statistics of the union of the samples of ``self`` and ``other`` (a new object).

        Classes present in both keep ``self``'s shift; ``other``'s sums are re-expressed about it
        with ``delta = s_other - s_self``: ``sums += n delta``, ``sum_squares += 2 delta . sums +
        n ||delta||^2`` and ``scatter += U^T D + D^T U`` with ``D`` the stacked deltas and
        ``U = sums + n delta / 2``, computed only for the classes present in both (this reads the
        number of such classes back from the device).

        Example:
            >>> a = ClassStatistics.from_features(torch.tensor([[0.0], [2.0]]), torch.arange(2), 2)
            >>> b = ClassStatistics.from_features(torch.tensor([[4.0]]), torch.tensor([1]), 2)
            >>> a.merge(b).class_means()
            tensor([[0.],
                    [3.]], dtype=torch.float64)
        """
        if not isinstance(other, ClassStatistics):
            raise TypeError(
                f"Expected argument `other` to be a ClassStatistics, but got {type(other)}."
            )
        if (other.num_classes, other.num_features) != (self.num_classes, self.num_features):
            raise ValueError(
                f"Expected argument `other` to have num_classes={self.num_classes} and"
                f" num_features={self.num_features}, but got {other.num_classes} and"
                f" {other.num_features}."
            )
        other = other.to(device=self.device, dtype=self.dtype)
        mine, theirs = self.present, other.present
        both = mine & theirs
        shift = torch.where(
            mine.unsqueeze(1), self.shift, torch.where(theirs.unsqueeze(1), other.shift, 0.0)
        )
        delta = torch.where(both.unsqueeze(1), other.shift - self.shift, 0.0)
        sums = other.sums + other.counts.unsqueeze(1) * delta
        sum_squares = (
            other.sum_squares
            + 2 * (delta * other.sums).sum(1)
            + other.counts * delta.square().sum(1)
        )
        scatter = other.scatter.clone()
        rows = torch.nonzero(both & (delta != 0).any(1)).squeeze(1)
        if rows.numel() > 0:
            d_rows = delta.index_select(0, rows)
            u_rows = other.sums.index_select(0, rows) + 0.5 * (
                other.counts.index_select(0, rows).unsqueeze(1) * d_rows
            )
            cross = u_rows.T @ d_rows
            scatter = scatter + cross + cross.T
        return ClassStatistics(
            self.counts + other.counts,
            shift,
            self.sums + sums,
            self.sum_squares + sum_squares,
            self.scatter + scatter,
        )

    @classmethod
    def merge_all(cls, statistics: Sequence[ClassStatistics]) -> ClassStatistics:
        """Exact merge of several statistics, left to right (see :meth:`merge`)."""
        if len(statistics) == 0:
            raise ValueError("Expected argument `statistics` to hold at least one ClassStatistics.")
        merged = statistics[0].clone()  # a new object, as merge gives, also for one statistics
        for other in statistics[1:]:
            merged = merged.merge(other)
        return merged

    def reduce(self, group: Any = None) -> ClassStatistics:
        """Exact statistics over all processes of ``group`` (a new object; not differentiable).

        Gathers every process's statistics (``world_size`` times their memory) and merges them in
        rank order, so that every process gets the same result. Without an initialised process
        group this returns a copy of ``self``.
        """
        packed = self.pack().detach()
        if not is_distributed(group):
            return ClassStatistics.unpack(packed.clone(), self.num_classes)
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed.contiguous(), group=group)
        return ClassStatistics.merge_all(
            [ClassStatistics.unpack(g, self.num_classes) for g in gathered]
        )

    def to(
        self,
        device: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> ClassStatistics:
        """The statistics on another device or (floating) dtype (``self`` when nothing changes);
        as for :meth:`torch.Tensor.to`, a dtype may come first (``stats.to(torch.float32)``)."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError(
                    f"Expected one dtype, but got {device} (first argument) and {dtype} (`dtype`)."
                )
            device, dtype = None, device
        if dtype is not None:
            _check_dtype(dtype)
        if (device is None or torch.device(device) == self.device) and (
            dtype is None or dtype == self.dtype
        ):
            return self
        return ClassStatistics(
            *(
                t.to(device=device, dtype=dtype)
                for t in (self.counts, self.shift, self.sums, self.sum_squares, self.scatter)
            )
        )

    def clone(self) -> ClassStatistics:
        """A copy that shares no memory with ``self``."""
        return ClassStatistics.unpack(self.pack().clone(), self.num_classes)


def _merge_packed(stacked: Tensor, num_classes: int) -> Tensor:
    """Merge a ``(P, L)`` stack of packed statistics (rows from :meth:`ClassStatistics.pack`)."""
    parts = [ClassStatistics.unpack(row, num_classes) for row in stacked.unbind(0)]
    return ClassStatistics.merge_all(parts).pack()


_BACKENDS = ("cuda", "mkldnn")


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """Float32 matrix products in full IEEE precision (no TF32 or bfloat16 passes) inside, the
    process's settings as they were after.

    With torch's per-backend settings (``torch.backends.cuda.matmul.fp32_precision`` and
    ``torch.backends.mkldnn.matmul.fp32_precision``, torch >= 2.9), only a backend set to a
    reduced precision is switched to ``"ieee"``, and put back as it was: ``"none"`` (inherit
    ``torch.backends.fp32_precision``) when it read the inherited value (torch reads the
    inherited value, so a backend set explicitly to the global value comes back inheriting it:
    the same precision, until the global setting changes). The legacy
    ``torch.get_float32_matmul_precision`` is not read there: it raises once the new settings are
    in use. Older torch: the legacy setting, ``"highest"`` inside."""
    backends: list[Any] = [
        getattr(getattr(torch.backends, name, None), "matmul", None) for name in _BACKENDS
    ]
    if not all(hasattr(backend, "fp32_precision") for backend in backends):  # torch < 2.9
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
        return
    inherited = torch.backends.fp32_precision  # type: ignore[attr-defined]
    restore = []
    for backend in backends:
        current = backend.fp32_precision
        if current not in ("none", "ieee"):  # a reduced precision: full precision inside
            restore.append((backend, "none" if current == inherited else current))
            backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, value in restore:
            backend.fp32_precision = value


_SCRATCH = threading.local()


def _one_kernel_centring(device: torch.device) -> bool:
    """Whether ``update`` centres with one mixed-dtype subtraction (accelerators, where a launch
    costs more than the cast) rather than a copy and an in-place subtraction (CPU, where the
    mixed-dtype kernel is the slower)."""
    return device.type != "cpu"


def _scratch(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    *,
    reserve: int = 0,
) -> Tensor:
    """A reusable per-thread buffer for batch-sized temporaries of ``update``.

    On CPU, freshly allocated buffers of a few MB are returned to the operating system when freed
    and page-fault again on the next batch, which costs as much as the update itself; keeping the
    last buffer of each name avoids that. A new buffer holds at least ``reserve`` elements, so
    that requests growing batch by batch (the rows an update keeps) do not reallocate each time.
    Accelerators have caching allocators: a fresh tensor.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers: dict[tuple[str, torch.dtype, bool], Tensor]
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    # Tensors made under inference mode cannot be written outside it: one set per mode.
    key = (name, dtype, torch.is_inference_mode_enabled())
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(max(size, reserve), dtype=dtype, device=device)
        buffers[key] = buffer
    return buffer[:size].view(shape)


def symmetric_product(matrix: Tensor) -> Tensor:
    """``matrix^T matrix`` (``(n, d) -> (d, d)``); on CPU half the flops of ``matrix.T @ matrix``.

    Example:
        >>> x = torch.randn(50, 300, dtype=torch.float64)
        >>> torch.allclose(symmetric_product(x), x.T @ x)
        True
    """
    out = torch.zeros((matrix.shape[1], matrix.shape[1]), dtype=matrix.dtype, device=matrix.device)
    _add_gram_(out, matrix)
    return out


def _gram_panel(num_rows: int, num_features: int, device: torch.device) -> int:
    """Columns per panel of the blocked symmetric product (the whole matrix: one product).

    Panels halve the flops but each adds a product call and a transposed copy of its block into
    the lower triangle, a cost of the ``d x d`` output; with few rows one full product is faster
    (up to 3-4x for a few rows). Where the two cross was measured on a 2-core AVX-512 machine
    (``benchmarks/gram_product.py``): above ``d = 512`` (eight panels of ``d / 8`` columns) at
    64 rows or ``2**16`` elements per intra-op thread, whichever is more; for ``256 <= d <= 512``
    (panels of 64) at ~80 rows per thread; below ``d = 256`` (three panels or fewer save less) at
    ~300 rows per thread. Accelerators always take one product.
    """
    if device.type != "cpu" or num_features <= 128:
        return num_features
    threads = torch.get_num_threads()
    if num_features > 512:
        panel, min_rows = num_features // 8, max(64, (1 << 16) * threads // num_features)
    else:
        panel, min_rows = 64, (80 if num_features >= 256 else 320) * threads
    return panel if num_rows >= min_rows else num_features


_GRAM_PART_ROWS = 256
"""Fewest rows per row block of a split CPU product."""


def _gram_parts(num_rows: int, num_features: int, device: torch.device) -> int:
    """Row blocks the CPU product of ``num_rows x num_features`` is split into (1: not split).

    One block per intra-op thread, each of at least ``_GRAM_PART_ROWS`` rows, when the product
    is multiplied by column panels: the blocks' panel products are one batched product, which
    keeps every thread on a whole product of its own; a single thin panel product divides
    poorly among threads.
    """
    if _gram_panel(num_rows, num_features, device) >= num_features:
        return 1
    return max(1, min(torch.get_num_threads(), num_rows // _GRAM_PART_ROWS))


def _add_gram_(scatter: Tensor, centred: Tensor, parts: int | None = None) -> None:
    """``scatter += X^T X`` for ``centred = X`` of shape ``(B, d)``.

    On CPU only the upper block triangle is multiplied, panel by panel of columns, and mirrored:
    about half the flops of the full product, which makes float64 about as fast as a float32 Gram
    (small products, see :func:`_gram_panel`, are one ``addmm``).
    The rows are split into ``parts`` blocks (default :func:`_gram_parts`; used when it divides
    the rows) whose panel products are one batched product, summed in the panel.
    """
    num_rows, num_features = centred.shape
    panel = _gram_panel(num_rows, num_features, centred.device)
    if panel >= num_features:
        scatter.addmm_(centred.T, centred)
        return
    if parts is None:
        parts = _gram_parts(num_rows, num_features, centred.device)
    # the row blocks, or None when the product is not split
    blocks = centred.unflatten(0, (parts, -1)) if parts > 1 and num_rows % parts == 0 else None
    # a reused output buffer, unless autograd records the product
    differentiable = torch.is_grad_enabled() and (centred.requires_grad or scatter.requires_grad)
    for start in range(0, num_features, panel):
        stop = min(num_features, start + panel)
        upper = scatter[start:stop, start:]
        if blocks is None:
            upper.addmm_(centred[:, start:stop].T, centred[:, start:])
        else:
            left, right = blocks[:, :, start:stop].transpose(1, 2), blocks[:, :, start:]
            if differentiable:
                products = torch.bmm(left, right)
            else:
                shape = (parts, stop - start, num_features - start)
                out = _scratch("gram panels", shape, centred.dtype, centred.device)
                products = torch.bmm(left, right, out=out)
            for product in products.unbind(0):
                upper.add_(product)
        if stop < num_features:
            scatter[stop:, start:stop].copy_(scatter[start:stop, stop:].T)
