"""Random labelled feature sets for the collapse tests and the GPU checks.

``collapse_case`` draws ``n`` features in ``d`` dimensions around ``k`` random class means, with a
within-class spread, an optional common offset (to test exactness behind a large offset), balanced
or Zipf-distributed labels (optionally with one class left empty), and a classifier near the means.
"""

from __future__ import annotations

import torch

__all__ = ["collapse_case"]


def collapse_case(
    n: int,
    d: int,
    k: int,
    *,
    spread: float = 0.6,
    offset: float = 0.0,
    zipf: bool = False,
    empty: int | None = None,
    seed: int = 0,
    weight_noise: float = 0.4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features, target, weight, bias)`` in float64, from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    if zipf:
        weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
        if empty is not None:
            weights[empty] = 0.0
        target = torch.multinomial(weights, n, replacement=True, generator=g)
    else:
        target = torch.randperm(n, generator=g) % k
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    features = offset + means[target] + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = means + weight_noise * torch.randn(k, d, generator=g, dtype=torch.float64)
    bias = 0.5 * torch.randn(k, generator=g, dtype=torch.float64)
    return features, target, weight, bias
