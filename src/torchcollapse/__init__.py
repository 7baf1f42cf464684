"""torchcollapse: induce, control and measure neural collapse in PyTorch.

Neural collapse (Papyan, Han & Donoho, 2020) is the geometry a classifier reaches late in training:
last-layer features of each class shrink to their class mean (NC1), the centred class means form a
simplex equiangular tight frame (NC2), the classifier aligns with them (NC3) and the network decides
like a nearest-class-centre rule (NC4). This package offers fixed-frame classifier heads, loss terms
that induce or limit collapse, and exact streaming metrics that measure it.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from torchcollapse.frames import (
    frame_angle_report,
    hierarchy_frame,
    nearest_simplex_etf,
    orthogonal_frame,
    simplex_etf,
    spherical_code,
)
from torchcollapse.functional.means import UndefinedCollapse
from torchcollapse.heads import (
    CosineHead,
    FixedFrameHead,
    NearestETFHead,
    OrthogonalFrameHead,
    SimplexETFHead,
    SphericalCodeHead,
    cross_entropy_floor,
    etf_init_,
    find_head,
    replace_head,
    scale_for_loss_floor,
)
from torchcollapse.losses import (
    BalancedSoftmaxLoss,
    CollapseRegularizer,
    DotRegressionLoss,
    RescaledMSELoss,
    SelfDualityLoss,
    SimplexGeometryLoss,
    WithinClassVariabilityLoss,
)
from torchcollapse.metrics import (
    NeuralCollapse,
    NeuralCollapseCDNV,
    NeuralCollapseETFDistance,
    NeuralCollapseNC1,
    NeuralCollapseNC3,
    NeuralCollapseNC4,
)
from torchcollapse.norms import FeatureCenter, FeatureNorm
from torchcollapse.stats import ClassStatistics
from torchcollapse.tracking import CollapseTracker

__all__ = [
    "BalancedSoftmaxLoss",
    "ClassStatistics",
    "CollapseRegularizer",
    "CollapseTracker",
    "CosineHead",
    "DotRegressionLoss",
    "FeatureCenter",
    "FeatureNorm",
    "FixedFrameHead",
    "NearestETFHead",
    "NeuralCollapse",
    "NeuralCollapseCDNV",
    "NeuralCollapseETFDistance",
    "NeuralCollapseNC1",
    "NeuralCollapseNC3",
    "NeuralCollapseNC4",
    "OrthogonalFrameHead",
    "RescaledMSELoss",
    "SelfDualityLoss",
    "SimplexETFHead",
    "SimplexGeometryLoss",
    "SphericalCodeHead",
    "UndefinedCollapse",
    "WithinClassVariabilityLoss",
    "__version__",
    "cross_entropy_floor",
    "etf_init_",
    "find_head",
    "frame_angle_report",
    "hierarchy_frame",
    "nearest_simplex_etf",
    "orthogonal_frame",
    "replace_head",
    "scale_for_loss_floor",
    "simplex_etf",
    "spherical_code",
]
