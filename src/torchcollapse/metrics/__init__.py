"""Neural collapse metrics for torchmetrics: exact, streaming, distributed.

:class:`NeuralCollapse` returns every quantity (NC1-NC4, CDNV, generalized geometry) in one dict;
:class:`NeuralCollapseNC1`, :class:`NeuralCollapseCDNV`, :class:`NeuralCollapseETFDistance`,
:class:`NeuralCollapseNC3` and :class:`NeuralCollapseNC4` return one quantity each and share
``NeuralCollapse``'s state inside a ``MetricCollection`` (for its ``update``; its ``forward``
updates every metric on its own). Papyan, Han & Donoho (2020),
"Prevalence of neural collapse during the terminal phase of deep learning training".
"""

from __future__ import annotations

from torchcollapse.metrics._state import CollapseStatisticsMetric
from torchcollapse.metrics.neural_collapse import NeuralCollapse
from torchcollapse.metrics.quantities import (
    NeuralCollapseCDNV,
    NeuralCollapseETFDistance,
    NeuralCollapseNC1,
    NeuralCollapseNC3,
    NeuralCollapseNC4,
)

__all__ = [
    "CollapseStatisticsMetric",
    "NeuralCollapse",
    "NeuralCollapseCDNV",
    "NeuralCollapseETFDistance",
    "NeuralCollapseNC1",
    "NeuralCollapseNC3",
    "NeuralCollapseNC4",
]
