"""Classifier heads: fixed frames, a frame that follows the features, and learnable baselines.

- :class:`FixedFrameHead` (any frame from :mod:`torchcollapse.frames`) and its constructors
  :class:`SimplexETFHead`, :class:`SphericalCodeHead`, :class:`OrthogonalFrameHead`: the classifier
  fixed at the geometry neural collapse converges to (Papyan, Han & Donoho, 2020; Hoffer et al.,
  2018; Yang et al., 2022).
- :class:`NearestETFHead`: a simplex ETF that rotates to the one nearest the running class means
  (closed-form version of Markou et al., 2024).
- :class:`CosineHead`: the learnable normalized classifier (NormFace) with CosFace/ArcFace margins;
  :func:`etf_init_` starts a learnable ``nn.Linear`` at a simplex ETF.
- :func:`replace_head` / :func:`find_head`: swap the classifier of a torchvision, timm or
  ``nn.Sequential`` model.
- :func:`cross_entropy_floor` / :func:`scale_for_loss_floor`: choose the logit scale.

Every head follows timm's head contract: ``(in_features, num_classes, *, ..., device=None,
dtype=None)``, ``forward(features) -> logits``, a ``K x d`` ``weight`` (and ``effective_weight``,
the classifier actually applied) for the collapse metrics, ``extra_repr``, ``state_dict``
round-trips and ``torch.compile``.

Export and tracing: the heads, as the layers of :mod:`torchcollapse.norms`, go through
``torch.compile(fullgraph=True)``, ``torch.export``, ``torch.jit.trace`` and
``torch.fx.symbolic_trace`` (which torchvision's ``create_feature_extractor`` and FX graph-mode
quantization use). The FX graph checks its inputs as the module does (features, and labels
where the module reads them: the same errors, raised before any buffer changes), keeps each
step that depends on dtypes or values (the normalized product, a margin, the frame update of
:class:`NearestETFHead`) as one call, and computes what the module computes, bit for bit, in
training mode too. A head traced as the root takes
``target`` as an input that may be left out when the graph is called. The graph holds a fixed
scale as a constant (as an exported program does), and a training-mode update that synchronises
over a ``process_group`` cannot be traced (trace in eval mode, or make the head a leaf module).
``torch.jit.script`` is not supported: use ``torch.jit.trace`` or ``torch.export``.
"""

from __future__ import annotations

from torchcollapse.heads.cosine import CosineHead
from torchcollapse.heads.fixed_frame import (
    FixedFrameHead,
    OrthogonalFrameHead,
    SimplexETFHead,
    SphericalCodeHead,
)
from torchcollapse.heads.init import etf_init_
from torchcollapse.heads.nearest_etf import NearestETFHead
from torchcollapse.heads.replace import find_head, replace_head
from torchcollapse.heads.scale import (
    DEFAULT_LOSS_FLOOR,
    cross_entropy_floor,
    scale_for_loss_floor,
)

__all__ = [
    "DEFAULT_LOSS_FLOOR",
    "CosineHead",
    "FixedFrameHead",
    "NearestETFHead",
    "OrthogonalFrameHead",
    "SimplexETFHead",
    "SphericalCodeHead",
    "cross_entropy_floor",
    "etf_init_",
    "find_head",
    "replace_head",
    "scale_for_loss_floor",
]
