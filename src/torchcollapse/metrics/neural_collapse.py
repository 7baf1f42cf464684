"""``NeuralCollapse``: every neural collapse quantity as one streaming torchmetrics metric.

Measures NC1-NC4 (Papyan, Han & Donoho, 2020), the CDNV (Galanti, Gyorgy & Hutter, 2022) and the
generalized geometry for ``K > d + 1`` (Liu et al., 2023) from exact class statistics accumulated
batch by batch (:class:`~torchcollapse.stats.ClassStatistics`): the result after any number of
batches, on any number of processes, equals the two-pass float64 computation on all the data.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from torchcollapse._warnings import user_stacklevel
from torchcollapse.functional.neural_collapse import neural_collapse_compute
from torchcollapse.metrics._state import CollapseStatisticsMetric

__all__ = ["NeuralCollapse"]

_NOT_PLOTTED = ("num_classes_present",)


class NeuralCollapse(CollapseStatisticsMetric):
    """Neural collapse of features, class means and classifier, accumulated exactly over batches.

    As input to ``update``:

    - ``features`` (:class:`~torch.Tensor`): ``(B, d)`` features of any float dtype (float16,
      bfloat16, float32, float64), on the metric's device;
    - ``target`` (:class:`~torch.Tensor`): ``(B,)`` integer labels in ``[0, num_classes)``.

    As output of ``compute``, a ``dict[str, Tensor]`` of 0-d float64 tensors:

    - ``nc1``: ``tr(Sigma_W Sigma_B^+) / K``, pseudo-inverse on the top ``min(K-1, d)``
      eigenpairs of ``Sigma_B`` in float64, leaving out directions whose singular value of the
      centred means is at or below ``max(K, d) eps sigma_max`` (:func:`torch.linalg.pinv`'s
      cutoff): an exact dead unit or constant feature is left out, and so is a real direction
      that small; rounding above the cutoff (float32 or offset bottleneck features) counts as
      spread (see :func:`~torchcollapse.functional.neural_collapse_nc1`);
    - ``nc1_trace_ratio``: ``tr Sigma_W / tr Sigma_B``;
    - ``cdnv``: mean over pairs of ``(s_c + s_c') / (2 ||mu_c - mu_c'||^2)``, ``s_c`` the mean
      squared distance of class ``c``'s features to its mean;
    - ``nc2_equinorm`` (std/mean of ``||mu_c - mu_G||``), ``nc2_equiangularity`` (std of pairwise
      cosines), ``nc2_max_angle`` (mean ``|cos + 1/(K-1)|``), ``nc2_etf_distance``
      (``|| G/||G||_F - (I - 11^T/K)/sqrt(K-1) ||_F``, ``G = M M^T``);
    - ``nc2_min_angle`` (radians) and ``nc2_spherical_energy`` (Riesz ``s = 1`` energy) of the
      normalized centred means, meaningful also when ``K > d + 1`` where no simplex exists, and
      ``nc2_min_angle_optimal`` / ``nc2_spherical_energy_optimal``, their best possible values,
      present only where known (``K <= d + 1``, ``K = 2d``, ``d = 2``, ...);
    - with a ``classifier``: ``nc2_weight_*`` (the same six for its rows), ``nc3``
      (``|| W/||W||_F - M/||M||_F ||_F``) and ``nc3_cosine`` (mean of ``cos(w_c, mu_c - mu_G)``);
    - with a ``classifier`` and reference class means: ``nc4``;
    - ``num_classes_present`` (int64): classes with samples.

    Conventions (DESIGN.md): classes without samples are excluded from every quantity and ``K``
    counts the present ones (``num_classes_present``); the global mean ``mu_G`` is the mean of the
    class means, or of the samples with ``global_mean="samples"``; ``Sigma_W`` is the biased
    within-class covariance (divided by ``N``) and ``s_c`` divides by ``n_c``; standard deviations
    use ``ddof=1`` (and the std of a single pairwise cosine, ``K = 2``, is 0). Angles and cosines of
    the classifier use its rows as they are (not centred), restricted to the present classes.

    **NC4** needs class means *before* it sees the samples, so it is exact only against reference
    means, never approximated: call ``set_class_means(means)`` (or pass ``class_means=``), then the
    samples of the following updates are classified by ``argmax(W h + b)`` (bias included;
    ``argmax(W h / ||h|| + b)`` for a head that normalizes its features, as the head itself
    decides) and by the nearest reference mean, and ``nc4`` is the fraction that disagree. Two
    passes over the training data give the textbook NC4; the previous epoch's means give it for
    free each epoch::

        means = None
        for epoch in range(epochs):
            metric.set_class_means(means)  # None in the first epoch: no "nc4" key
            for x, y in loader:
                metric.update(model.features(x), y)
            results = metric.compute()
            means = metric.class_means()  # synchronised over processes
            metric.reset()

    Without reference means (or without a classifier) ``nc4`` is absent from the output. In a
    ``MetricCollection`` the metrics of a compute group share one state, updated only by the
    group's first metric after the collection's first update (see
    :mod:`~torchcollapse.metrics.quantities`); where that one lacks the means or a classifier
    nothing is counted, and ``compute`` warns. To measure NC4 in a collection, either create it
    with ``compute_groups=False``, or set reference means on the metrics that have a classifier
    before the collection's first update (the groups are formed then, and those metrics form a
    group of their own) and set each later epoch's means on all of them.

    Setting new means drops the NC4 counts this metric took against its earlier means (NC4 is
    over the samples updated since the current means were set); ``set_class_means(None)`` clears
    them. The reference means are an input, not state: with ``persistent(True)`` the
    ``state_dict`` keeps the NC4 counts (reported after a restore) but not the means. Counts
    restored from a ``state_dict`` are kept by the next ``set_class_means``: after loading a
    checkpoint, set the means the counts were taken against to go on counting (the result equals
    an uninterrupted run; the metric cannot check that the means are the same).

    **State and cost.** Memory ``O(K d + d^2)`` float64 (``2K + 2Kd + d^2`` values; twice when
    ``num_features`` or a classifier is given, as torchmetrics keeps a copy of every state's
    default), independent of the number of samples; ``update`` costs about one float64 ``d x d``
    product of the batch (on CPU plus reused scratch buffers of a few batch sizes), no ``K x K``
    matrix is formed beyond ``K <= d`` (where ``K x K`` is at most ``d x d``), and with
    ``validate_args=False`` ``update`` never synchronises host and device (but for copying a
    classifier kept on another device: see ``classifier``). Under DDP the
    statistics of the processes are merged exactly in ``compute`` (see
    :mod:`torchcollapse.metrics._state`). In a ``MetricCollection``, the compute groups share
    this state with the single-quantity metrics (:class:`NeuralCollapseNC1`, ...) for
    ``collection.update``: one update for all of them. The collection's ``forward``
    (``collection(features, y)``) updates each metric's own state (torchmetrics forms the groups
    in ``update`` only): the same numbers, at one ``d x d`` product per metric.

    **Devices.** The states are float64 tensors on the metric's device (``metric.to(device)``),
    and ``update`` accumulates there, whatever the dtype of the features. A device without
    float64 (Apple's MPS) cannot hold them, and moving the metric there raises a ``TypeError``:
    keep the metric on the CPU and update it with ``features.cpu()`` and ``target.cpu()`` (a
    copy, which waits for the device, per batch). :class:`~torchcollapse.tracking.CollapseTracker`
    does so by itself on MPS. The heads, losses, regularizers and norms of this package run on
    MPS, and so does ``ClassStatistics.zeros(..., dtype=torch.float32)``.

    Args:
        num_classes: number of classes ``K``.
        classifier: optional ``nn.Linear`` or any module with ``weight`` ``(K, d)`` and optional
            ``bias`` ``(K,)`` (or a ``(K, d)`` weight tensor). A module's ``effective_weight``,
            where it has one (the heads of :mod:`torchcollapse.heads`), is read instead of its
            ``weight``: the classifier actually applied (for a
            :class:`~torchcollapse.heads.CosineHead`, its normalized rows times its scale). A
            module with ``normalize_features=True`` (the fixed-frame heads) decides by
            ``argmax(W h / max(||h||, eps) + b)``, and NC4 counts those decisions. It is read,
            not copied: at ``compute`` for the classifier quantities, at ``update`` for NC4. It
            is not a submodule of the metric (not moved by ``.to``, not in its ``state_dict``).
            A copy of the metric alone (``clone()``, ``copy.deepcopy(metric)``) reads the same
            classifier; a deep copy or pickle of a model that holds both the metric and its
            classifier (an EMA or teacher copy) reads the copy's classifier. A classifier on
            another device than the features (a CPU tensor, features on a GPU) is copied to
            the features' device at every update that counts NC4, a copy that waits for the
            device (a cached copy could not tell every change: fused optimizers and collectives
            change a parameter without torch's version counter).
            Keep the classifier on the features' device to avoid the copy altogether.
            Since it may change between two ``compute`` calls without an ``update``, a metric
            with a classifier does not cache its result (torchmetrics' ``compute_with_cache``
            defaults to ``False`` then; pass ``compute_with_cache=True`` to cache).
        class_means: optional reference class means for NC4 (see :meth:`set_class_means`).
        num_features: feature dimension ``d``; inferred from the classifier or the first batch when
            omitted. Give it (or a classifier) under DDP if a process may see no data at all,
            and to restore a ``persistent(True)`` state with ``torch.distributed.checkpoint``
            (see :meth:`persistent`).
        global_mean: ``"classes"`` (mean of class means, default) or ``"samples"``.
        validate_args: check labels (integers in range) and features (finite) in ``update``;
            these checks read values back from the device.
        product_dtype: dtype of the ``d x d`` product of each centred batch. ``torch.float64``
            (default) is exact. ``torch.float32`` (full IEEE precision, TF32 off) halves the cost
            of that product where float64 is slow (AVX2/AVX-512 CPUs, consumer and workstation GPUs
            whose float64 rate is 1/32-1/64 of float32), at a relative error on ``Sigma_W``-based
            keys (NC1) of about float32's epsilon times the spread of ``Sigma_W``'s eigenvalues:
            ~1e-7 to a few 1e-6 on typical features, 1e-3 when some within-class directions are
            1e-3 of the others' scale; data-centre GPUs (A100, H100, H200) run float64 at the
            float32 rate and need no change. Float32 products also need features whose squares
            stay in the float32 range (scales within ~1e+-18). The statistics stay float64
            either way: this does not make the metric usable on a device without float64
            (MPS; see **Devices** above).
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).

    Raises:
        ValueError: at ``compute`` when fewer than two classes have samples; at construction for a
            classifier of the wrong shape; at ``update`` for inputs of a wrong shape or value
            (see :class:`~torchcollapse.stats.ClassStatistics`).
        TypeError: at construction for a classifier that is neither a tensor nor a module with a
            ``weight`` tensor, or not floating point; at ``update`` for inputs of a wrong type.

    Example:
        >>> import torch
        >>> from torchcollapse.metrics import NeuralCollapse
        >>> _ = torch.manual_seed(0)
        >>> classifier = torch.nn.Linear(16, 4)
        >>> metric = NeuralCollapse(num_classes=4, classifier=classifier)
        >>> means = 3 * torch.randn(4, 16)
        >>> for _ in range(5):  # five batches
        ...     target = torch.randint(0, 4, (32,))
        ...     metric.update(means[target] + 0.1 * torch.randn(32, 16), target)
        >>> results = metric.compute()
        >>> results["nc1"] < 0.01, int(results["num_classes_present"])
        (tensor(True), 4)
        >>> "nc4" in results  # no reference class means yet
        False
        >>> metric.set_class_means(metric.class_means())  # e.g. for the next epoch
    """

    higher_is_better = None
    plot_lower_bound = None

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
        super().__init__(
            num_classes,
            classifier=classifier,
            class_means=class_means,
            num_features=num_features,
            global_mean=global_mean,
            validate_args=validate_args,
            product_dtype=product_dtype,
            **kwargs,
        )

    def compute(self) -> dict[str, Tensor]:
        """Every quantity the inputs allow (see the class docstring for the keys)."""
        return self._batch_or_raise(self._compute, self._undefined_batch_value)

    def _compute(self) -> dict[str, Tensor]:
        classifier = self._classifier_weight_bias(finite=True)
        reason = self._nc4_uncounted()
        if reason is not None:
            warnings.warn(
                f"{reason} The nc4 key is left out.", UserWarning, stacklevel=user_stacklevel()
            )
        return neural_collapse_compute(
            self.class_statistics(),
            weight=None if classifier is None else classifier[0],
            global_mean=self.global_mean,  # type: ignore[arg-type]
            nc4_counts=self._nc4_counts_or_none(),
        )

    def _undefined_batch_value(self) -> dict[str, Tensor]:
        """What ``forward`` returns for a batch without collapse values: its class count (and
        NC4, which needs no second class)."""
        device = self.nc4_samples.device
        present = self.class_statistics().num_present if self.statistics.numel() else 0
        out = {"num_classes_present": torch.tensor(present, device=device)}
        if self.has_class_means and float(self.nc4_samples) > 0:
            out["nc4"] = self.nc4_mismatches / self.nc4_samples
        return out

    def plot(
        self,
        val: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None,
        ax: _AX_TYPE | None = None,
    ) -> _PLOT_OUT_TYPE:
        """Plot one result of ``compute`` or a sequence of them (one line per quantity).

        ``num_classes_present`` is left out. Needs matplotlib (``pip install matplotlib``).

        Args:
            val: a result of ``compute()`` or a list of them (e.g. one per epoch); computed now
                when omitted.
            ax: a matplotlib axis to draw on (default: a new figure).

        Returns:
            ``(figure, axis)``.
        """
        value = val if val is not None else self.compute()
        if isinstance(value, dict):
            shown: Any = {k: v for k, v in value.items() if k not in _NOT_PLOTTED}
        else:
            # keys may come and go between results (NC4 once reference means are set): every
            # key gets a line, with gaps where a result lacks it
            keys = list(dict.fromkeys(k for item in value for k in item if k not in _NOT_PLOTTED))
            gap = torch.tensor(float("nan"), dtype=torch.float64)
            shown = [{k: item.get(k, gap).detach().cpu() for k in keys} for item in value]
        return self._plot(shown, ax)
