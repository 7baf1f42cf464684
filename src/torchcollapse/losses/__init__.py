"""Collapse-aware losses and regularizers.

- Frame-targeting and classification losses: :class:`DotRegressionLoss` (Yang et al., 2022),
  :class:`RescaledMSELoss` (Hui & Belkin, 2021), :class:`BalancedSoftmaxLoss` (Ren et al., 2020;
  Menon et al., 2021).
- Collapse regularizers on a batch of features and labels, each with a signed weight, computed
  over the global batch under ``torch.distributed``: :class:`WithinClassVariabilityLoss` (NC1),
  :class:`SimplexGeometryLoss` (NC2), :class:`SelfDualityLoss` (NC3), and their sum
  :class:`CollapseRegularizer`, which can aim at a target level of NC1.
- The same terms as composable functions, for combinations of one's own:
  :func:`batch_class_statistics` (differentiable :class:`BatchClassStatistics` of the global
  batch: the class statistics in one autograd node with a closed-form, first-order backward),
  then :func:`within_class_variability`, :func:`simplex_geometry_of_means`,
  :func:`simplex_gram_distance` and :func:`self_duality_distance` in autograd operations (the
  same values as the modules, slower; first-order as well).

The regularizers and :class:`DotRegressionLoss` hand autograd closed-form gradients: they are
first-order only. A backward with ``create_graph=True`` (gradient penalties, MAML-style
meta-learning, Hessian-vector products) raises a ``RuntimeError`` rather than silently leave out
their second-order terms (under ``torch.compile`` the check is skipped: do not compile them into
such a step; nested ``torch.func`` differentiation, such as ``grad`` of ``grad``, is not caught
either).
"""

from __future__ import annotations

from torchcollapse.losses._batch import BatchClassStatistics, batch_class_statistics
from torchcollapse.losses.balanced_softmax import BalancedSoftmaxLoss
from torchcollapse.losses.collapse import CollapseRegularizer, target_penalty
from torchcollapse.losses.dot_regression import (
    DotRegressionLoss,
    class_weights_from_counts,
    dot_regression_loss,
)
from torchcollapse.losses.rescaled_mse import RescaledMSELoss, rescaled_mse_loss
from torchcollapse.losses.self_duality import SelfDualityLoss, self_duality_distance
from torchcollapse.losses.simplex_geometry import (
    SimplexGeometryLoss,
    simplex_geometry_of_means,
    simplex_gram_distance,
)
from torchcollapse.losses.within_class import WithinClassVariabilityLoss, within_class_variability

__all__ = [
    "BalancedSoftmaxLoss",
    "BatchClassStatistics",
    "CollapseRegularizer",
    "DotRegressionLoss",
    "RescaledMSELoss",
    "SelfDualityLoss",
    "SimplexGeometryLoss",
    "WithinClassVariabilityLoss",
    "batch_class_statistics",
    "class_weights_from_counts",
    "dot_regression_loss",
    "rescaled_mse_loss",
    "self_duality_distance",
    "simplex_geometry_of_means",
    "simplex_gram_distance",
    "target_penalty",
    "within_class_variability",
]
