"""Single-quantity neural collapse metrics that share ``NeuralCollapse``'s state.

Each metric here returns one 0-d tensor: NC1 (Papyan, Han & Donoho, 2020), the CDNV (Galanti, Gyorgy
& Hutter, 2022), the simplex-ETF distance of the centred class means (NC2), NC3 and NC4. They hold
exactly the states of :class:`~torchcollapse.metrics.NeuralCollapse`, so in a ``MetricCollection``
(with ``compute_groups=True``, the default) ``collection.update(...)`` updates them once for all,
and each ``compute`` evaluates only its own quantity. Conventions are those of ``NeuralCollapse``
(devices included: float64 states; see its **Devices**). The sharing is for ``update`` (and
``compute``), where torchmetrics forms the compute groups: the collection's ``forward``
(``collection(features, y)``, as Lightning's ``training_step`` often logs) updates every metric's
own state, for the same numbers at the cost of one ``d x d`` product per metric. Where only the
epoch value is logged, call ``collection.update(features, y)`` and log the collection.

Metrics share their state when it is equal after the collection's first update, and from then on
only the first metric of each group is updated. So give them the same ``classifier`` and reference
``class_means``: the NC4 counts accumulated against the reference means are part of the state.
Metrics that count NC4 at the first update (a ``classifier`` and reference means) form a group
apart from those that do not. Reference means set only *later* (the epoch loop of
:class:`~torchcollapse.metrics.NeuralCollapse`, whose first epoch has none) find the NC4 metrics
in one group with the others, whose first metric (in the collection's order: by name for a dict,
as given for a list) may have no classifier or no means: then nothing is counted, and
``compute`` says so with a warning (``NeuralCollapseNC4`` returns NaN, ``NeuralCollapse`` leaves
``nc4`` out). Two ways always work: create the collection with
``MetricCollection(..., compute_groups=False)`` (every metric updated on its own), or set
reference means on every metric with a ``classifier`` before the collection's first update
(``class_means=``; any means, e.g. of a first pass) and each later epoch's means on all of them.

Example:
    >>> import torch
    >>> from torchmetrics import MetricCollection
    >>> from torchcollapse.metrics import NeuralCollapseCDNV, NeuralCollapseNC1
    >>> collection = MetricCollection([NeuralCollapseNC1(3), NeuralCollapseCDNV(3)])
    >>> target = torch.arange(3).repeat(10)
    >>> collection.update(torch.eye(3)[target] + 0.01 * torch.randn(30, 3), target)
    >>> collection.compute_groups  # one shared state
    {0: ['NeuralCollapseNC1', 'NeuralCollapseCDNV']}
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from torchcollapse._warnings import user_stacklevel
from torchcollapse.functional.means import UndefinedCollapse
from torchcollapse.functional.neural_collapse import neural_collapse_compute
from torchcollapse.metrics._state import CollapseStatisticsMetric

__all__ = [
    "NeuralCollapseCDNV",
    "NeuralCollapseETFDistance",
    "NeuralCollapseNC1",
    "NeuralCollapseNC3",
    "NeuralCollapseNC4",
]


class _SingleQuantity(CollapseStatisticsMetric):
    """One key of :func:`~torchcollapse.functional.neural_collapse_compute`."""

    key: ClassVar[str] = ""
    needs_classifier: ClassVar[bool] = False

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
        if self.needs_classifier and classifier is None:
            raise ValueError(
                f"Expected argument `classifier` (a module with `weight` of shape (num_classes,"
                f" num_features)) for {type(self).__name__}, but got None."
            )
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

    def compute(self) -> Tensor:
        """The quantity over everything accumulated (0-d float64 tensor)."""
        return self._batch_or_raise(self._compute, self._nan)

    def _compute(self) -> Tensor:
        classifier = self._classifier_weight_bias(finite=True)
        out = neural_collapse_compute(
            self.class_statistics(),
            weight=None if classifier is None else classifier[0],
            global_mean=self.global_mean,  # type: ignore[arg-type]
            nc4_counts=self._nc4_counts_or_none(),
            keys=(self.key,),
        )
        if self.key not in out:  # undefined here; a warning said why
            raise UndefinedCollapse(
                f"Expected `{self.key}` to be defined for the accumulated statistics and"
                " classifier, but it is not (see the warning)."
            )
        return out[self.key]

    def plot(
        self, val: Tensor | Sequence[Tensor] | None = None, ax: _AX_TYPE | None = None
    ) -> _PLOT_OUT_TYPE:
        """Plot a value of ``compute`` or a sequence of them (needs matplotlib).

        Args:
            val: a result of ``compute()`` or a list of them; computed now when omitted.
            ax: a matplotlib axis to draw on (default: a new figure).

        Returns:
            ``(figure, axis)``.
        """
        return self._plot(val, ax)


class NeuralCollapseNC1(_SingleQuantity):
    """NC1 = ``tr(Sigma_W Sigma_B^+) / K`` (see :class:`~torchcollapse.metrics.NeuralCollapse`).

    Example:
        >>> import torch
        >>> metric = NeuralCollapseNC1(num_classes=2)
        >>> features = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.0]])
        >>> metric.update(features, torch.tensor([0, 0, 1]))
        >>> metric.compute()  # the spread is orthogonal to the class means
        tensor(0., dtype=torch.float64)
    """

    key = "nc1"


class NeuralCollapseCDNV(_SingleQuantity):
    """Class-distance normalized variance (Galanti et al., 2022), mean over pairs of classes.

    Example:
        >>> import torch
        >>> metric = NeuralCollapseCDNV(num_classes=2)
        >>> metric.update(torch.tensor([[0.0], [2.0], [10.0], [12.0]]), torch.tensor([0, 0, 1, 1]))
        >>> metric.compute()  # (1 + 1) / (2 * 10^2)
        tensor(0.0100, dtype=torch.float64)
    """

    key = "cdnv"


class NeuralCollapseETFDistance(_SingleQuantity):
    """NC2: ``|| G/||G||_F - (I - 11^T/K)/sqrt(K-1) ||_F`` for the centred class means (in [0, 2]).

    Example:
        >>> import torch
        >>> metric = NeuralCollapseETFDistance(num_classes=3)
        >>> metric.update(torch.eye(3), torch.arange(3))  # centred one-hot means: a simplex ETF
        >>> metric.compute().abs() < 1e-12
        tensor(True)
    """

    key = "nc2_etf_distance"
    plot_upper_bound = 2.0


class NeuralCollapseNC3(_SingleQuantity):
    """NC3 = ``|| W/||W||_F - M/||M||_F ||_F``: classifier vs centred means (needs a classifier).

    Example:
        >>> import torch
        >>> metric = NeuralCollapseNC3(num_classes=2, classifier=torch.tensor([[1.0], [-1.0]]))
        >>> metric.update(torch.tensor([[3.0], [-3.0]]), torch.tensor([0, 1]))
        >>> metric.compute()
        tensor(0., dtype=torch.float64)
    """

    key = "nc3"
    needs_classifier = True
    plot_upper_bound = 2.0


class NeuralCollapseNC4(_SingleQuantity):
    """NC4: fraction of samples where ``argmax(W h + b)`` differs from the nearest reference mean.

    Needs a ``classifier`` and reference class means (``class_means=`` or
    :meth:`set_class_means`); only samples updated after the means were set are counted. New means
    drop the counts taken against earlier ones; counts restored from a ``state_dict`` are kept
    (see :class:`~torchcollapse.metrics.NeuralCollapse`). Without counted samples (no reference
    means yet, as in the first epoch when the means come from the previous one) ``compute``
    returns NaN with a warning instead of raising, so that a ``MetricCollection`` holding the
    metric still computes the others.

    Example:
        >>> import torch
        >>> means = torch.tensor([[1.0], [-1.0]])
        >>> weight = torch.tensor([[1.0], [-1.0]])
        >>> metric = NeuralCollapseNC4(2, classifier=weight, class_means=means)
        >>> metric.update(torch.tensor([[0.5], [-2.0], [3.0]]), torch.tensor([0, 1, 1]))
        >>> metric.compute()  # the classifier and the nearest mean agree on every sample
        tensor(0., dtype=torch.float64)
    """

    key = "nc4"
    needs_classifier = True
    plot_upper_bound = 1.0

    def compute(self) -> Tensor:
        """NC4 over the samples updated since the reference means were set (or over the counts
        restored from a ``state_dict``, which does not hold the means, as for
        :class:`~torchcollapse.metrics.NeuralCollapse`).

        NaN, with a ``UserWarning`` saying why, when nothing was counted: no reference means
        were set (the first epoch of the previous-epoch pattern), every sample came before
        them, or the metric's compute group in a ``MetricCollection`` is updated by a metric
        without them (see the module docstring). A collection's ``compute`` then still returns
        its other metrics' values, as ``forward`` returns NaN for such a batch."""
        if self._batch_value:
            return self._batch_or_raise(self._compute, self._nan)
        try:
            return self._compute()
        except UndefinedCollapse as error:
            warnings.warn(
                f"{type(self).__name__}.compute: NC4 is undefined, so its value is NaN. ({error})",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            return self._nan()

    def _compute(self) -> Tensor:
        counted = float(self.nc4_samples) > 0
        if not self.has_class_means and not counted:
            raise UndefinedCollapse(
                "Expected reference class means for NeuralCollapseNC4 (pass `class_means=` or call"
                " `set_class_means(...)` before updating), but got none."
            )
        reason = self._nc4_uncounted()
        if reason is not None:
            raise UndefinedCollapse(reason)
        if not counted:
            raise UndefinedCollapse(
                "Expected NeuralCollapseNC4 to have counted samples against its reference class"
                " means, but got none: update it after `set_class_means(...)`."
            )
        # a ratio of counts: defined whatever the number of classes seen
        return self.nc4_mismatches / self.nc4_samples
