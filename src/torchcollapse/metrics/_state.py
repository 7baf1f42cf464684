"""The state every neural collapse metric shares: exact class statistics, packed into one tensor.

The metrics of :mod:`torchcollapse.metrics` (Papyan, Han & Donoho, 2020) accumulate
:class:`~torchcollapse.stats.ClassStatistics` about per-class shifts. Shifted statistics of two
processes do not add up (their shifts differ), so the statistics are packed into one flat float64
state whose cross-process reduction is an *exact merge* (a callable ``dist_reduce_fx``: torchmetrics
gathers the packed tensors of all ranks, stacks them and hands the stack to the merge).
``forward``, ``merge_state`` and ``MetricCollection`` compute groups work as for any torchmetrics
metric: every metric of this family has the same three states, so a collection's ``update``
updates them once per compute group. A collection's ``forward`` (``collection(features, y)``) runs
each metric's own ``forward`` on its own state (torchmetrics forms compute groups in ``update``
only): the same numbers, at one ``d x d`` product per metric.

States:

- ``statistics``: the packed statistics (``2K + 2Kd + d^2`` float64 values; see
  :meth:`ClassStatistics.pack`), allocated at the first ``update`` when ``num_features`` is not
  known in advance;
- ``nc4_mismatches``, ``nc4_samples``: NC4 counts against reference class means (sums).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from torchcollapse._classifier import applied_weight
from torchcollapse._warnings import user_stacklevel
from torchcollapse.functional.duality import _check_bias, _check_weight
from torchcollapse.functional.means import UndefinedCollapse, _check_global_mean
from torchcollapse.functional.nearest_class_center import (
    _check_class_means,
    _nc4_counts,
    _prepare_reference,
)
from torchcollapse.stats import (
    ClassStatistics,
    _check_features,
    _check_features_target,
    _check_num_classes,
    _check_num_features,
)

_T = TypeVar("_T")

__all__ = ["CollapseStatisticsMetric"]


class _MergeStatistics:
    """Exact merge of a ``(world_size, L)`` stack of packed statistics (a picklable callable)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, stacked: Tensor) -> Tensor:
        if stacked.ndim == 1:
            return stacked
        if stacked.shape[-1] == 0:
            return stacked[0]
        parts = [ClassStatistics.unpack(row, self.num_classes) for row in stacked.unbind(0)]
        return ClassStatistics.merge_all(parts).pack()


def _gather_statistics(tensor: Tensor, group: Any = None) -> list[Tensor]:
    """``gather_all_tensors``, where a rank that saw no data contributes zero statistics."""
    gathered: list[Tensor] = gather_all_tensors(tensor, group=group)
    sizes = {g.numel() for g in gathered}
    if tensor.ndim == 1 and len(sizes) > 1 and 0 in sizes:
        full = next(g for g in gathered if g.numel() > 0)
        gathered = [torch.zeros_like(full) if g.numel() == 0 else g for g in gathered]
    return gathered


class _SharedClassifier:
    """Holds the classifier without registering it as a submodule.

    The metric reads the live classifier (the model's own layer) at compute time, so a deep copy
    of the metric alone (``clone``, ``MetricCollection``) must not copy the layer: the copy reads
    the same one. A deep copy of an object that holds both the metric and its classifier (a
    model, as ``copy.deepcopy(model)`` for an EMA or teacher copy) binds the copied metric to the
    copied classifier, as pickling does. ``metric.to(...)`` does not move the classifier.

    Which of the two a deep copy is can be told only once the whole copy is made: the model may
    hold the metric before its classifier, which is then copied after the metric. The copy
    therefore keeps the copy's ``memo`` and looks the classifier up in it at its first use
    (:attr:`module`, pickling or another copy; the metric reads it at the start of every
    ``update`` and ``forward``): the classifier's copy when the same deep copy made one, else
    the classifier itself. The ``memo`` holds every object the deep copy reached in the
    original, so the original stays alive until then: at most until the copied metric's first
    ``update``, ``forward`` or ``compute``.
    """

    def __init__(self, module: nn.Module | Tensor, memo: dict[int, Any] | None = None) -> None:
        self._module = module
        self._memo = memo  # the deep copy this one came from, until the first use

    @property
    def module(self) -> nn.Module | Tensor:
        """The classifier (bound, at the first use after a deep copy, as the class says)."""
        if self._memo is not None:
            self._module = self._memo.get(id(self._module), self._module)
            self._memo = None
        return self._module

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedClassifier:
        module = self.module
        copied = memo.get(id(module))
        if copied is not None:  # the classifier was copied already in this deep copy
            return _SharedClassifier(copied)
        return _SharedClassifier(module, memo)

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self.module}  # the memo of a deep copy is never pickled

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._module, self._memo = state["module"], None


def _holds_float64(device: torch.device) -> bool:
    """Whether tensors of ``device`` can be float64: not on Apple's MPS, which has no float64."""
    return device.type != "mps"


def _check_holds_float64(device: torch.device, name: str) -> None:
    """A ``TypeError`` naming the workaround when metric ``name`` is moved to a device without
    float64 (where torch would fail deep inside the move)."""
    if not _holds_float64(device):
        raise TypeError(
            f"Expected {name} to be moved to a device that supports float64 (its statistics"
            f" accumulate in float64 on the metric's device), but got {device}, which has no"
            " float64. Keep the metric on the CPU (not inside a model moved there) and update it"
            " with `features.cpu()` and `target.cpu()` (a copy per batch); CollapseTracker does"
            f" so by itself. Heads, losses, regularizers and norms run on {device.type}, and"
            " ClassStatistics.zeros(..., dtype=torch.float32) accumulates there."
        )


_DEFAULT_FEATURE_EPS = 1e-12

# the arguments of `update` (and so of `forward`), bound before forward touches the state
_BATCH = inspect.Signature(
    [
        inspect.Parameter("features", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("target", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
)


def _classifier_tensors(
    classifier: nn.Module | Tensor, num_classes: int, *, finite: bool = False
) -> tuple[Tensor, Tensor | None, float | None]:
    """Weight ``(K, d)``, optional bias ``(K,)`` and feature normalization of a classifier,
    validated (``finite``: also free of NaN and Inf, a host read on accelerators).

    The weight is the classifier actually applied: a module's ``effective_weight`` where it has one
    (every head of :mod:`torchcollapse.heads`: ``scale * normalize(weight)`` for a
    :class:`~torchcollapse.heads.CosineHead`, ``scale * frame`` for the fixed frames), else its
    ``weight``. The third item is ``None`` for a classifier of the raw features, deciding by
    ``argmax(W h + b)``, and the ``eps`` of a module that L2-normalizes its features first (a
    ``normalize_features`` attribute set to ``True``, as the fixed-frame heads have), whose
    decision is ``argmax(W h / max(||h||, eps) + b)``.
    """
    weight: Any
    bias: Any
    feature_eps: float | None = None
    if isinstance(classifier, Tensor):
        weight, bias = classifier, None
    else:
        weight = applied_weight(classifier)
        bias = getattr(classifier, "bias", None)
        if getattr(classifier, "normalize_features", False) is True:
            eps = getattr(classifier, "eps", _DEFAULT_FEATURE_EPS)
            feature_eps = float(eps) if isinstance(eps, (int, float)) else _DEFAULT_FEATURE_EPS
    if not isinstance(weight, Tensor):  # a wrong type: neither a tensor nor such a module
        got = type(classifier).__name__
        if isinstance(classifier, nn.Module):
            got += " (no `weight` tensor)"
        raise TypeError(
            "Expected argument `classifier` to be a module with a `weight` of shape (num_classes,"
            f" num_features) (num_classes={num_classes}), or such a tensor, but got {got}."
        )
    if weight.ndim != 2:
        raise ValueError(
            "Expected argument `classifier` to be a module with a `weight` of shape (num_classes,"
            f" num_features) (num_classes={num_classes}), or such a tensor, but got weight of"
            f" shape {tuple(weight.shape)}."
        )
    if weight.shape[0] != num_classes:
        raise ValueError(
            f"Expected argument `classifier` to have a `weight` of shape ({num_classes},"
            f" num_features) for num_classes={num_classes}, but got {tuple(weight.shape)}."
        )
    _check_weight(weight, num_classes, weight.shape[1], name="classifier.weight", finite=finite)
    if bias is not None:
        _check_bias(bias, num_classes, name="classifier.bias", finite=finite)
    return weight, bias, feature_eps


class CollapseStatisticsMetric(Metric):
    """Base of the neural collapse metrics: holds and updates the statistics, reads the classifier.

    Subclasses implement ``compute``. See :class:`~torchcollapse.metrics.NeuralCollapse` for the
    arguments.
    """

    is_differentiable = False
    higher_is_better: bool | None = False
    full_state_update = False
    plot_lower_bound: float | None = 0.0
    _batch_value = False  # inside forward (see there)
    _batch_undefined: str | None = None  # why forward's batch had no value

    statistics: Tensor
    nc4_mismatches: Tensor
    nc4_samples: Tensor

    def __init__(
        self,
        num_classes: int,
        *,
        classifier: nn.Module | Tensor | None = None,
        class_means: Tensor | None = None,
        num_features: int | None = None,
        global_mean: str = "classes",
        validate_args: bool = True,
        product_dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        if classifier is not None:
            # The classifier is read live at compute: a cached result would outlive its changes.
            kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)
        num_classes = _check_num_classes(num_classes)
        if num_classes < 2:
            raise ValueError(
                "Expected argument `num_classes` to be at least 2 (every collapse quantity"
                f" compares classes), but got {num_classes}."
            )
        _check_global_mean(global_mean)
        if not isinstance(validate_args, bool):
            raise ValueError(
                f"Expected argument `validate_args` to be a bool, but got {validate_args!r}."
            )
        if product_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                "Expected argument `product_dtype` to be torch.float32 or torch.float64, but got"
                f" {product_dtype}."
            )
        self.num_classes = num_classes
        self.global_mean = global_mean
        self.validate_args = validate_args
        self.product_dtype = product_dtype
        if num_features is not None:
            num_features = _check_num_features(num_features)
        self._classifier: _SharedClassifier | None = None
        if classifier is not None:
            weight, _, _ = _classifier_tensors(classifier, num_classes)
            if num_features is not None and weight.shape[1] != num_features:
                raise ValueError(
                    f"Expected argument `classifier` to have a `weight` of shape ({num_classes},"
                    f" {num_features}) for num_features={num_features}, but got"
                    f" {tuple(weight.shape)}."
                )
            num_features = int(weight.shape[1])
            self._classifier = _SharedClassifier(classifier)
        self.num_features: int | None = num_features
        size = 0 if num_features is None else ClassStatistics.packed_size(num_classes, num_features)
        # normal tensors even when the metric is built under inference mode (see `reset`)
        with torch.inference_mode(False):
            self.add_state(
                "statistics",
                default=torch.zeros(size, dtype=torch.float64),
                dist_reduce_fx=_MergeStatistics(num_classes),
            )
            zero = torch.zeros((), dtype=torch.float64)
            self.add_state("nc4_mismatches", default=zero.clone(), dist_reduce_fx="sum")
            self.add_state("nc4_samples", default=zero.clone(), dist_reduce_fx="sum")
        self._batch_checked = False  # inside forward, once the batch is validated (see there)
        self._checked_classifier: tuple[Tensor, Tensor | None, float | None] | None = None
        if self.dist_sync_fn is None:
            self.dist_sync_fn = _gather_statistics
        self._nc4_centre: Tensor | None
        self._nc4_means: Tensor | None
        self._nc4_offsets: Tensor | None
        self.register_buffer("_nc4_centre", None, persistent=False)
        self.register_buffer("_nc4_means", None, persistent=False)
        self.register_buffer("_nc4_offsets", None, persistent=False)
        # whether this metric's update counted NC4 samples against its current reference means
        # (set_class_means drops those counts; counts restored from a state_dict are kept)
        self._nc4_counted_here = False
        if class_means is not None:
            self.set_class_means(class_means)

    def _apply(self, fn: Any, *args: Any, recurse: bool = True, **kwargs: Any) -> Any:
        """Move the statistics, never cast them: they accumulate in float64 whatever the
        dtype of the model holding the metric (``model.float()``, ``.to(torch.bfloat16)``);
        torchmetrics' ``set_dtype`` has no effect on them either. Moved states are normal
        tensors even under ``torch.inference_mode()``.

        Out of the meta device (deferred initialisation: a model built under
        ``torch.device("meta")``, then ``to_empty``), the states and their defaults are zeros,
        never uninitialised memory: the metric comes out reset. Reference class means set on the
        meta device hold no values and are cleared (set them again for NC4). ``recurse``
        (``Module.to_empty`` passes it; torchmetrics' ``_apply`` takes no such argument) has no
        effect: the metric has no submodules (its classifier is not one).

        A move to a device without float64 (Apple's MPS) raises a ``TypeError`` before anything
        moves: keep the metric on the CPU and update it with ``features.cpu()``."""
        # where fn sends tensors, learnt from an empty float32 tensor (the float64 states
        # themselves would fail deep inside torch on such a device)
        target = fn(torch.empty(0, dtype=torch.float32, device=self.nc4_samples.device))
        if isinstance(target, Tensor):
            _check_holds_float64(target.device, type(self).__name__)

        def device_only(tensor: Tensor) -> Tensor:
            if tensor.is_meta:
                probe = fn(tensor.new_empty(0))
                if not probe.is_meta:  # nothing to keep: zeros, in float64 for floating states
                    dtype = tensor.dtype if tensor.is_floating_point() else probe.dtype
                    return torch.zeros(tensor.shape, dtype=dtype, device=probe.device)
            if not tensor.is_floating_point():
                moved: Tensor = fn(tensor)
                return moved
            # where fn would cast, learn its device from an empty tensor: no cast copy is made
            probe = fn(tensor.new_empty(0))
            if probe.dtype != tensor.dtype:
                return tensor.to(device=probe.device)
            moved = fn(tensor)
            return moved

        meta_reference = self._nc4_means is not None and self._nc4_means.is_meta
        # moved states are normal tensors even under inference mode (a first move in an
        # evaluation run there), so that updates outside it may write into them
        with torch.inference_mode(False):
            this = super()._apply(device_only, *args, **kwargs)
        if meta_reference and self._nc4_means is not None and not self._nc4_means.is_meta:
            self.set_class_means(None)
        return this

    def persistent(self, mode: bool = False) -> None:
        """Whether the states are saved in the ``state_dict`` (torchmetrics' ``persistent``).

        The ``statistics`` state holds ``2K + 2Kd + d^2`` values, and ``d`` is known only from
        ``num_features``, a classifier or the first batch: a metric built without either
        saves and loads a ``state_dict`` of any ``d`` (``load_state_dict`` takes the saved
        size), but its fresh ``statistics`` hold 0 values. Loaders that fill the fresh
        ``state_dict`` in place and require the saved sizes, as
        ``torch.distributed.checkpoint`` (DCP; FSDP and Lightning's sharded checkpoints) does,
        then refuse the checkpoint ("Size mismatch"): to restore with them, build the metric
        with ``num_features`` (or a classifier).

        Args:
            mode: ``True`` to save the states in the ``state_dict``, ``False`` (the default of
                a metric) to leave them out.
        """
        super().persistent(mode)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Accumulate a batch and return its own value (torchmetrics' ``forward``).

        A batch without a value of its own (fewer than two classes with samples, as a small last
        batch may have; NC4 without counted samples; a quantity undefined for the batch) is
        accumulated all the same; its value is NaN (``NeuralCollapse``: ``num_classes_present``
        and, when counted, ``nc4``), with a warning, where ``compute`` would raise.

        The batch is validated first, as ``update`` validates it: a batch that ``update`` would
        refuse raises before torchmetrics' ``forward`` sets the accumulated state aside, which
        is kept as it was. A subclass that overrides ``update`` (taking other inputs) validates
        them there; if its ``update`` raises, the accumulated state is put back as it was.
        """
        self._bind_classifier()
        if type(self).update is CollapseStatisticsMetric.update:
            try:
                batch = _BATCH.bind(*args, **kwargs)
            except TypeError as error:
                raise TypeError(f"{type(self).__name__}.forward: {error}.") from None
            self._checked_classifier = self._check_batch(*batch.args, **batch.kwargs)
            self._batch_checked = True
        self._batch_value, self._batch_undefined = True, None
        # torchmetrics sets the accumulated state aside and resets it (new tensors) before the
        # batch's update: references to it and its bookkeeping are enough to put it back
        kept = {name: getattr(self, name) for name in self._defaults}
        bookkeeping = (self._update_count, self._computed, self._nc4_counted_here)
        compute_on_cpu = self.compute_on_cpu
        try:
            value = super().forward(*args, **kwargs)
        except BaseException:
            for name, state in kept.items():
                setattr(self, name, state)
            self._update_count, self._computed, self._nc4_counted_here = bookkeeping
            # and the synchronisation settings torchmetrics' forward changes for the batch
            self._is_synced, self._should_unsync = False, True
            self._to_sync, self._enable_grad = self.sync_on_compute, False
            self.compute_on_cpu = compute_on_cpu
            raise
        finally:
            self._batch_value = self._batch_checked = False
            self._checked_classifier = None
        reason = self._take_batch_undefined()
        if reason is not None:
            warnings.warn(
                f"{type(self).__name__}.forward: the batch has no value of its own; it was"
                f" accumulated, and its value is NaN. ({reason})",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return value

    def _check_batch(
        self, features: Any, target: Any
    ) -> tuple[Tensor, Tensor | None, float | None] | None:
        """Every check of ``update`` on a batch, before anything is written (for ``forward``);
        returns the classifier NC4 counts the batch with (see :meth:`_nc4_classifier`)."""
        _check_features_target(features, target, self.num_classes, validate_args=self.validate_args)
        num_features = self._held_num_features()
        if num_features is not None and features.shape[1] != num_features:
            raise ValueError(
                f"Expected argument `features` to have {num_features} features (columns), the"
                f" feature dimension of this metric's statistics, but got shape"
                f" {tuple(features.shape)}."
            )
        if features.device != self.statistics.device:
            raise ValueError(
                f"Expected argument `features` to be on {self.statistics.device}, the device of"
                f" this metric's statistics, but got {features.device}."
            )
        return self._nc4_classifier(features, finite=self.validate_args)

    def _nc4_classifier(
        self, features: Tensor, *, finite: bool
    ) -> tuple[Tensor, Tensor | None, float | None] | None:
        """The classifier NC4 counts ``features`` with (see :meth:`_classifier_weight_bias`),
        checked against the reference means; ``None`` when NC4 is not counted."""
        if self._classifier is None or self._nc4_means is None:
            return None
        if features.shape[1] != self._nc4_means.shape[1]:
            raise ValueError(
                f"Expected argument `features` to have {self._nc4_means.shape[1]} features like"
                f" the reference class means, but got shape {tuple(features.shape)}."
            )
        return self._classifier_weight_bias(finite=finite)

    def _take_batch_undefined(self) -> str | None:
        reason, self._batch_undefined = self._batch_undefined, None
        return reason

    def _batch_or_raise(self, compute: Callable[[], _T], undefined: Callable[[], _T]) -> _T:
        """``compute()``; inside ``forward``, ``undefined()`` where the value is undefined."""
        if not self._batch_value:
            return compute()
        try:
            return compute()
        except UndefinedCollapse as error:
            self._batch_undefined = str(error)
            return undefined()

    def _nan(self) -> Tensor:
        return torch.tensor(float("nan"), dtype=torch.float64, device=self.nc4_samples.device)

    # ------------------------------------------------------------------ classifier and reference
    def _bind_classifier(self) -> None:
        """Bind a deep copy to its classifier now (see :class:`_SharedClassifier`), letting go of
        the copy's ``memo`` and with it the original model; an attribute read once bound."""
        shared = self._classifier
        if shared is not None and shared._memo is not None:
            _ = shared.module  # the read binds

    @property
    def classifier(self) -> nn.Module | Tensor | None:
        """The classifier read for the classifier quantities (not a submodule of the metric)."""
        return None if self._classifier is None else self._classifier.module

    def _classifier_weight_bias(
        self, *, finite: bool
    ) -> tuple[Tensor, Tensor | None, float | None] | None:
        """The classifier's detached weight (the one applied) and bias, and the ``eps`` of its
        feature normalization (``None`` without one; see :func:`_classifier_tensors`);
        ``finite``: NaN or Inf raise (a host read, at compute; in ``update`` only with
        ``validate_args``)."""
        if self._classifier is None:
            return None
        weight, bias, feature_eps = _classifier_tensors(
            self._classifier.module, self.num_classes, finite=finite
        )
        if self.num_features is not None and weight.shape[1] != self.num_features:
            raise ValueError(
                f"Expected argument `classifier` to have a `weight` of shape ({self.num_classes},"
                f" {self.num_features}), but got {tuple(weight.shape)}."
            )
        return weight.detach(), None if bias is None else bias.detach(), feature_eps

    @property
    def has_class_means(self) -> bool:
        """Whether reference class means are set (NC4 is accumulated only then)."""
        return self._nc4_means is not None

    def set_class_means(self, class_means: Tensor | None) -> None:
        """Set (or clear, with ``None``) the reference class means that NC4 compares against.

        Args:
            class_means: ``(num_classes, num_features)`` means, e.g. :meth:`class_means` of a
                first pass over the training data or of the previous epoch; rows holding NaN mark
                classes absent from the reference. Samples updated from now on are counted.
                ``None`` clears the means and the NC4 counts. The class statistics are kept.

        Which NC4 counts are kept: counts this metric's ``update`` took against earlier reference
        means are dropped, so that NC4 is over the samples updated since the current means were
        set. Counts restored from a ``state_dict`` (which holds the counts, not the means) and not
        added to since are kept, so that after loading a checkpoint ``set_class_means`` with the
        means the counts were taken against goes on counting: the result equals an uninterrupted
        run. (The metric cannot check that the means are the same: they are not saved.)
        """
        if class_means is None:
            self._nc4_centre = self._nc4_means = self._nc4_offsets = None
            self._clear_nc4_counts()
            return
        means = _check_class_means(class_means, self.num_features)
        if means.shape[0] != self.num_classes:
            raise ValueError(
                f"Expected argument `class_means` to have {self.num_classes} rows (num_classes),"
                f" but got shape {tuple(means.shape)}."
            )
        if self._classifier is None:
            warnings.warn(
                f"{type(self).__name__} has no `classifier`, so NC4 is not measured against these"
                " class means; pass `classifier=` at construction.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        centre, centred, offsets = _prepare_reference(means.to(self.nc4_samples.device))
        self._nc4_centre, self._nc4_means, self._nc4_offsets = centre, centred, offsets
        if self._nc4_counted_here:
            self._clear_nc4_counts()
        self._computed = None  # torchmetrics' cached result of compute

    def _clear_nc4_counts(self) -> None:
        # new tensors, not zeroed in place: a MetricCollection compute group may share these;
        # normal tensors even under inference mode, so later updates outside it may add to them
        with torch.inference_mode(False):
            self.nc4_mismatches = torch.zeros_like(self.nc4_mismatches)
            self.nc4_samples = torch.zeros_like(self.nc4_samples)
        self._nc4_counted_here = False
        self._computed = None  # torchmetrics' cached result of compute

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
        """torchmetrics' loading, of copies: the metric never shares storage with the
        ``state_dict``, whose tensors stay as they are when the metric is updated. The statistics
        are cast to float64 (the dtype they accumulate in) and moved to the metric's device, and
        statistics of another number of classes or features raise a ``ValueError``. NC4 counts
        read from the ``state_dict`` are restored counts, kept by the next
        :meth:`set_class_means`.

        With ``load_state_dict(..., assign=True)`` the states keep the device of the loaded
        tensors (still as float64 copies), as a module's parameters do, and the rest of the
        metric (the defaults ``reset`` restores) moves there too: a metric built under
        ``torch.device("meta")`` and loaded so holds the loaded numbers, on their device."""
        source = "in the loaded state_dict"
        name = prefix + "statistics"
        keys = [prefix + key for key in ("statistics", "nc4_mismatches", "nc4_samples")]
        device = None
        if local_metadata.get("assign_to_params_buffers", False):
            loaded_tensors = [state_dict[key] for key in keys if key in state_dict]
            device = next((t.device for t in loaded_tensors if isinstance(t, Tensor)), None)
        with torch.inference_mode(False):  # normal tensors, as in `reset`
            # validated (and adopted) before the metric moves: a refused state_dict changes nothing
            adopted: dict[str, Tensor] = {}
            if name in state_dict:
                adopted[name] = self._adopted_statistics(
                    state_dict[name], source, loading=True, device=device
                )
            for key in ("nc4_mismatches", "nc4_samples"):
                if prefix + key in state_dict:
                    adopted[prefix + key] = self._adopted_count(
                        state_dict[prefix + key], key, source, device=device
                    )
            if device is not None and device != self.nc4_samples.device:
                self._move_to(device)
            if name in adopted and adopted[name].numel() == 0 and self.num_features is not None:
                adopted[name] = self._zero_statistics(self.num_features)  # saved before data
            state_dict.update(adopted)
        if prefix + "nc4_samples" in state_dict:
            self._nc4_counted_here = False
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ statistics
    def class_statistics(self) -> ClassStatistics:
        """The statistics accumulated by this process (views of the ``statistics`` state)."""
        if self.statistics.numel() == 0:
            raise ValueError(
                f"Expected {type(self).__name__} to have been updated with at least one sample, but"
                " it holds no data."
            )
        return ClassStatistics.unpack(self.statistics, self.num_classes)

    def class_means(self) -> Tensor:
        """``(num_classes, num_features)`` float64 class means over all processes (NaN if absent).

        Synchronises across processes like ``compute``; pass the result to
        :meth:`set_class_means` (after ``reset``) to measure NC4 on the next pass or epoch.
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=True
        ):
            return self.class_statistics().class_means().clone()

    def update(self, features: Tensor, target: Tensor) -> None:
        """Accumulate a batch of ``features`` ``(B, d)`` with integer labels ``target`` ``(B,)``.

        A batch refused (wrong shapes; with ``validate_args``, labels out of range or features
        that are not finite) raises before anything is written.
        """
        self._bind_classifier()
        _check_features(features)
        # inside forward the batch was validated already (_check_batch), the classifier read
        validate = self.validate_args and not self._batch_checked
        if self._batch_checked:
            classifier = self._checked_classifier
        else:
            classifier = self._nc4_classifier(features, finite=validate)
        if self.statistics.numel() == 0:
            # the first batch fixes the feature dimension: validated before the allocation
            _check_features_target(features, target, self.num_classes, validate_args=validate)
            validate = False
            self.statistics = self._zero_statistics(int(features.shape[1]))
        stats = ClassStatistics.unpack(self.statistics, self.num_classes)
        stats.update(
            features.detach(),
            target,
            validate_args=validate,
            product_dtype=self.product_dtype,
        )
        if (
            classifier is not None
            and self._nc4_centre is not None
            and self._nc4_means is not None
            and self._nc4_offsets is not None
        ):
            reference = (self._nc4_centre, self._nc4_means, self._nc4_offsets)
            weight, bias, feature_eps = classifier
            mismatches, samples = _nc4_counts(
                features, weight, bias, reference, feature_eps=feature_eps
            )
            self.nc4_mismatches += mismatches
            self.nc4_samples += samples
            self._nc4_counted_here = True

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """torchmetrics' merge; NC4 counts merged in count as this metric's own (dropped by the
        next :meth:`set_class_means`, like counts it took against its current means), unlike
        counts restored from a ``state_dict``; a cached ``compute`` result is dropped."""
        state = incoming_state
        if isinstance(state, Metric):
            state = state.metric_state
        samples = state.get("nc4_samples") if isinstance(state, dict) else None
        super().merge_state(incoming_state)
        # a host read (not in update); counts may come as tensors or as Python numbers
        if isinstance(samples, (Tensor, int, float)) and float(samples) > 0:
            self._nc4_counted_here = True
        self._computed = None

    def reset(self) -> None:
        """torchmetrics' ``reset``. The new states are normal tensors even under
        ``torch.inference_mode()`` (an evaluation that computes and resets), so that updates
        outside it may write into them."""
        with torch.inference_mode(False):
            super().reset()

    def _copy_state_dict(self) -> dict[str, Tensor | list[Any]]:
        """torchmetrics' copy of the states (restored by ``forward`` and after a synchronised
        ``compute``), made of normal tensors even under ``torch.inference_mode()``."""
        with torch.inference_mode(False):
            copied: dict[str, Tensor | list[Any]] = super()._copy_state_dict()
        return copied

    def _held_num_features(self) -> int | None:
        """The feature dimension of the statistics held; ``None`` before the first batch."""
        if self.statistics.numel() == 0:
            return None
        return ClassStatistics.num_features_from_packed_size(
            self.statistics.numel(), self.num_classes
        )

    def _zero_statistics(self, num_features: int) -> Tensor:
        """Packed statistics of no sample with ``num_features`` features, on the metric's
        device: a normal tensor even under inference mode, so later updates outside it may write
        into it."""
        with torch.inference_mode(False):
            return torch.zeros(
                ClassStatistics.packed_size(self.num_classes, num_features),
                dtype=torch.float64,
                device=self.nc4_samples.device,
            )

    def _adopted_statistics(
        self,
        value: Any,
        source: str,
        *,
        loading: bool = False,
        copy: bool = True,
        device: torch.device | None = None,
    ) -> Tensor:
        """``value``, packed statistics from elsewhere (a ``state_dict``, ``merge_state``), in
        float64 on ``device`` (default: this metric's; ``copy``: always a copy); a
        ``ValueError`` unless it holds statistics of this metric's classes (and features:
        ``num_features``, or with ``loading=False`` those of the statistics held). Empty
        statistics (no data) pass."""
        if not isinstance(value, Tensor) or value.ndim != 1 or value.is_complex():
            got = (
                f"shape {tuple(value.shape)}, dtype {value.dtype}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise ValueError(
                f"Expected the `statistics` {source} to be a 1-D real tensor of packed class"
                f" statistics, but got {got}."
            )
        size = value.numel()
        dim = self.num_features if loading else self._held_num_features()
        if dim is not None:
            expected = ClassStatistics.packed_size(self.num_classes, dim)
            if size not in (0, expected):
                raise ValueError(
                    f"Expected the `statistics` {source} to hold statistics of {self.num_classes}"
                    f" classes and {dim} features like this metric ({expected} values), but got"
                    f" {size} values (another number of classes or features)."
                )
        elif size:
            try:
                ClassStatistics.num_features_from_packed_size(size, self.num_classes)
            except ValueError:
                raise ValueError(
                    f"Expected the `statistics` {source} to hold statistics of {self.num_classes}"
                    " classes like this metric (2K + 2Kd + d^2 values for some number of features"
                    f" d), but got {size} values (another number of classes)."
                ) from None
        device = self.statistics.device if device is None else device
        return value.detach().to(device, torch.float64, copy=copy)

    def _adopted_count(
        self, value: Any, name: str, source: str, *, device: torch.device | None = None
    ) -> Tensor:
        """An NC4 count from elsewhere (a tensor of one element or a number) as a 0-d float64
        tensor on ``device`` (default: this metric's), never ``value`` itself."""
        device = self.nc4_samples.device if device is None else device
        if isinstance(value, Tensor):
            if value.numel() != 1 or value.is_complex():
                raise ValueError(
                    f"Expected `{name}` {source} to be a real tensor of one element (a count), but"
                    f" got shape {tuple(value.shape)}, dtype {value.dtype}."
                )
            return value.detach().to(device, torch.float64, copy=True).reshape(())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"Expected `{name}` {source} to be a count (a tensor of one element or a number),"
                f" but got {value!r}."
            )
        return torch.tensor(float(value), dtype=torch.float64, device=device)

    def _move_to(self, device: torch.device) -> None:
        """Move the whole metric to ``device``; out of the meta device (no values) as
        ``to_empty`` moves it, which gives zeros (see :meth:`_apply`)."""

        def move(tensor: Tensor) -> Tensor:
            if tensor.is_meta:
                return torch.empty_like(tensor, device=device)
            return tensor.to(device)

        self._apply(move)

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        """Merge another state into this one (``forward``, ``merge_state``), exactly.

        Nothing of the incoming state is taken by reference: statistics merged into an empty
        metric are copied (cast to float64), so that updating either metric leaves the other
        as it is. States are built as normal tensors even under ``torch.inference_mode()``.
        """
        for name in self._defaults:
            if name not in incoming_state:
                raise ValueError(
                    f"Expected state variable {name} to be present in incoming state"
                    f" {list(incoming_state)}"
                )
        source = "of the incoming state"
        with torch.inference_mode(False):
            mine = self.statistics
            theirs = self._adopted_statistics(incoming_state["statistics"], source, copy=False)
            if theirs.numel() == 0:
                merged = mine
            elif mine.numel() == 0:
                merged = theirs.clone()  # adopted: never the incoming tensor itself
            else:
                merged = _MergeStatistics(self.num_classes)(torch.stack([theirs, mine]))
            if merged.is_inference():  # a state updated inside inference mode
                merged = merged.clone()
            self.statistics = merged
            mismatches = self._adopted_count(
                incoming_state["nc4_mismatches"], "nc4_mismatches", source
            )
            samples = self._adopted_count(incoming_state["nc4_samples"], "nc4_samples", source)
            self.nc4_mismatches = self.nc4_mismatches + mismatches
            self.nc4_samples = self.nc4_samples + samples

    def _nc4_uncounted(self) -> str | None:
        """Why NC4 counted no sample although a classifier and reference means are set and
        samples were accumulated; ``None`` when it counted some, or had nothing to count."""
        if self._nc4_means is None or self._classifier is None or float(self.nc4_samples) > 0:
            return None
        if self.statistics.numel() == 0 or float(self.class_statistics().total) == 0:
            return None
        return (
            f"{type(self).__name__} counted no sample for NC4, although its reference class means"
            " are set and samples were accumulated. Either every sample was updated before"
            " `set_class_means` (NC4 counts the later updates only), or the metric is in a"
            " MetricCollection whose compute group shares its state with a metric without these"
            " reference means or without a classifier: the groups are formed at the collection's"
            " first update, and only the first metric of a group is updated after it. Create the"
            " collection with `compute_groups=False`, or set reference means on the metrics that"
            " have a classifier before the collection's first update (they then form a group of"
            " their own) and set later means on all of them."
        )

    def _nc4_counts_or_none(self) -> tuple[Tensor, Tensor] | None:
        """The NC4 counts while they are measured, or once anything was counted (counts restored
        from a ``state_dict`` without the reference means, which are not saved)."""
        measuring = self._nc4_means is not None and self._classifier is not None
        if measuring or float(self.nc4_samples) > 0:
            return self.nc4_mismatches, self.nc4_samples
        return None
