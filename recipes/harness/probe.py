"""Evaluators for frozen features: a linear probe, nearest-class-mean few-shot, rank correlation.

* **Linear probe**: multinomial logistic regression with an L2 penalty on standardized features,
  fitted full-batch by L-BFGS in float64 to its optimum, the protocol of Kornblith, Shlens & Le
  (2019, "Do Better ImageNet Models Transfer Better?") and of the transfer studies of Kornblith et
  al. (2021, "Why Do Better Loss Functions Lead to Less Transferable Features?").
* **Nearest class mean (NCM) few-shot**: class means from ``n`` labelled samples per class,
  queries assigned to the nearest mean in Euclidean distance, accuracy averaged over several random
  draws of the support set, as in Galanti, György & Hutter (2022, "On the Role of Neural Collapse in
  Transfer Learning").
* **Spearman's rank correlation** with average ranks for ties (Spearman, 1904), and its
  permutation test (exact up to 8 points, Monte Carlo above).

All three are written in torch, with no scikit-learn or scipy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LinearProbe",
    "average_ranks",
    "few_shot_ncm_accuracy",
    "fit_linear_probe",
    "linear_probe_accuracy",
    "nearest_class_mean_predict",
    "spearman_correlation",
    "spearman_permutation_test",
]


def _check_features_target(features: Tensor, target: Tensor, name: str = "features") -> None:
    if features.ndim != 2:
        raise ValueError(
            f"Expected argument `{name}` to be a 2-D tensor, but got shape {tuple(features.shape)}."
        )
    if not features.dtype.is_floating_point:
        raise TypeError(
            f"Expected argument `{name}` to be a floating-point tensor, but got {features.dtype}."
        )
    if target.ndim != 1 or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(
            "Expected the target to be a 1-D integer tensor, "
            f"but got shape {tuple(target.shape)} and dtype {target.dtype}."
        )
    if len(target) != len(features):
        raise ValueError(
            f"Expected the target to have one label per row of `{name}` ({len(features)}), "
            f"but got {len(target)}."
        )
    if not torch.isfinite(features).all():
        raise ValueError(f"Expected argument `{name}` to be finite, but it holds NaN or inf.")


@dataclass(frozen=True)
class LinearProbe:
    """A fitted multinomial logistic regression on standardized features.

    Attributes:
        weight: ``(K, d)`` weights acting on standardized features.
        bias: ``(K,)`` biases.
        mean: ``(d,)`` feature means of the training set.
        scale: ``(d,)`` feature standard deviations of the training set (1 where a feature is
            constant).
        loss: final value of the objective (mean cross-entropy plus the L2 term).
        grad_norm: Euclidean norm of the objective's gradient at the returned parameters.
        iterations: L-BFGS iterations used.
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    scale: Tensor
    loss: float
    grad_norm: float
    iterations: int

    def logits(self, features: Tensor) -> Tensor:
        """Logits ``W (h - mean) / scale + b`` of raw (unstandardized) ``features``."""
        z = (features.to(self.weight) - self.mean) / self.scale
        return z @ self.weight.T + self.bias

    def predict(self, features: Tensor) -> Tensor:
        """Predicted class of each row of ``features``."""
        return self.logits(features).argmax(dim=1)


def _probe_objective(
    weight: Tensor, bias: Tensor, z: Tensor, target: Tensor, weight_decay: float
) -> Tensor:
    logits = z @ weight.T + bias
    return (
        torch.nn.functional.cross_entropy(logits, target)
        + 0.5 * weight_decay * weight.square().sum()
    )


def fit_linear_probe(
    features: Tensor,
    target: Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-3,
    max_iter: int = 1000,
    tolerance_grad: float = 1e-9,
    standardize: bool = True,
) -> LinearProbe:
    """Fit multinomial logistic regression to its optimum, full batch, in float64.

    Minimizes ``1/N sum_i CE(W z_i + b, y_i) + weight_decay / 2 * ||W||_F^2`` over ``(W, b)``, where
    ``z_i`` are the features standardized with the training mean and standard deviation. The
    objective is strictly convex in ``W`` for ``weight_decay > 0``; L-BFGS with a strong-Wolfe line
    search stops when every gradient entry is below ``tolerance_grad``.

    Args:
        features: ``(N, d)`` training features.
        target: ``(N,)`` labels in ``[0, num_classes)``.
        num_classes: ``K``.
        weight_decay: L2 penalty on the weights (not the bias); must be positive.
        max_iter: most L-BFGS iterations.
        tolerance_grad: stopping threshold on the largest absolute gradient entry.
        standardize: standardize features (zero mean, unit variance per feature) before fitting.

    Returns:
        The fitted :class:`LinearProbe`; ``probe.grad_norm`` tells how close to the optimum it got.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(40, 3, generator=g)
        >>> x[:20] -= 2; x[20:] += 2  # two well-separated blobs
        >>> y = torch.arange(2).repeat_interleave(20)
        >>> probe = fit_linear_probe(x, y, num_classes=2)
        >>> (probe.predict(x) == y).float().mean().item()  # separable: every sample right
        1.0
        >>> probe.grad_norm < 1e-8  # at the optimum
        True
    """
    _check_features_target(features, target)
    if target.numel() == 0:
        raise ValueError("Expected at least one training sample, but got none.")
    if int(target.min()) < 0 or int(target.max()) >= num_classes:
        raise ValueError(
            f"Expected the target to hold labels in [0, {num_classes}), but got labels in "
            f"[{int(target.min())}, {int(target.max())}]."
        )
    if not weight_decay > 0:
        raise ValueError(
            f"Expected argument `weight_decay` to be positive, but got {weight_decay!r}."
        )
    x = features.detach().to(torch.float64)
    target = target.to(x.device)
    if standardize:
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False) if len(x) > 1 else torch.zeros_like(mean)
        scale = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    else:
        mean = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        scale = torch.ones_like(mean)
    z = (x - mean) / scale
    weight = torch.zeros(
        num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True
    )
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-16,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _probe_objective(weight, bias, z, target, weight_decay)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        loss = _probe_objective(weight, bias, z, target, weight_decay)
        grad_weight, grad_bias = torch.autograd.grad(loss, [weight, bias])
    grad_norm = math.sqrt(float(grad_weight.square().sum() + grad_bias.square().sum()))
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return LinearProbe(
        weight=weight.detach(),
        bias=bias.detach(),
        mean=mean,
        scale=scale,
        loss=float(loss.detach()),
        grad_norm=grad_norm,
        iterations=iterations,
    )


def linear_probe_accuracy(
    train_features: Tensor,
    train_target: Tensor,
    test_features: Tensor,
    test_target: Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-3,
) -> float:
    """Test accuracy of a linear probe fitted on the training features.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(40, 2, generator=g)
        >>> y = (x[:, 0] > 0).long()
        >>> linear_probe_accuracy(x[:20], y[:20], x[20:], y[20:], num_classes=2) > 0.8
        True
    """
    _check_features_target(test_features, test_target, "test_features")
    probe = fit_linear_probe(train_features, train_target, num_classes, weight_decay=weight_decay)
    return float((probe.predict(test_features).cpu() == test_target.cpu()).double().mean())


def nearest_class_mean_predict(features: Tensor, means: Tensor) -> Tensor:
    """Index of the nearest class mean (Euclidean distance) for each row of ``features``.

    Ties go to the lower class index.

    Example:
        >>> means = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
        >>> nearest_class_mean_predict(torch.tensor([[1.0, 1.0], [3.0, -1.0]]), means).tolist()
        [0, 1]
    """
    if features.ndim != 2 or means.ndim != 2 or features.shape[1] != means.shape[1]:
        raise ValueError(
            "Expected `features` (N, d) and `means` (K, d) with the same d, but got shapes "
            f"{tuple(features.shape)} and {tuple(means.shape)}."
        )
    x = features.to(torch.float64)
    m = means.to(torch.float64)
    # ||x - m||^2 = ||x||^2 - 2 x.m + ||m||^2; ||x||^2 is the same for every class, so drop it.
    distances = m.square().sum(dim=1) - 2 * x @ m.T
    return distances.argmin(dim=1)


def few_shot_ncm_accuracy(
    features: Tensor,
    target: Tensor,
    shots: int | None,
    *,
    num_classes: int | None = None,
    num_draws: int = 10,
    query_features: Tensor | None = None,
    query_target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Nearest-class-mean accuracy with ``shots`` labelled samples per class, over several draws.

    Each draw picks ``shots`` samples of every class uniformly without replacement from
    ``(features, target)`` (the support), takes their class means, and classifies the queries by
    the nearest mean. The queries are ``(query_features, query_target)`` when given, otherwise the
    samples of ``(features, target)`` left out of that draw's support.

    Args:
        features: ``(N, d)`` pool to draw the support from.
        target: ``(N,)`` labels in ``[0, num_classes)``.
        shots: samples per class in the support; ``None`` uses all of ``features`` (one draw, and
            then ``query_features`` are required).
        num_classes: ``K``; defaults to ``target.max() + 1``.
        num_draws: number of random support sets.
        query_features: optional fixed ``(M, d)`` query set.
        query_target: its labels.
        generator: source of randomness for the draws.

    Returns:
        ``(num_draws,)`` float64 accuracies (one entry when ``shots`` is ``None``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat(10)
        >>> x = 5 * torch.eye(3)[y] + 0.1 * torch.randn(30, 3, generator=g)
        >>> few_shot_ncm_accuracy(x, y, shots=1, num_draws=4, generator=g).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    _check_features_target(features, target)
    if (query_features is None) != (query_target is None):
        raise ValueError("Expected `query_features` and `query_target` to be given together.")
    if query_features is not None and query_target is not None:
        _check_features_target(query_features, query_target, "query_features")
        if query_features.shape[1] != features.shape[1]:
            raise ValueError(
                f"Expected `query_features` to have {features.shape[1]} columns, "
                f"but got {query_features.shape[1]}."
            )
    if num_classes is None:
        num_classes = int(target.max()) + 1 if target.numel() else 0
    counts = torch.bincount(target.cpu(), minlength=num_classes)
    if len(counts) > num_classes or (counts == 0).any():
        raise ValueError(
            f"Expected every class in [0, {num_classes}) to have samples and no other labels, "
            f"but got per-class counts {counts.tolist()}."
        )
    if shots is None:
        if query_features is None or query_target is None:
            raise ValueError("Expected `query_features` when `shots` is None (all data).")
        means = torch.stack(
            [features[target == c].to(torch.float64).mean(0) for c in range(num_classes)]
        )
        pred = nearest_class_mean_predict(query_features, means).cpu()
        return (pred == query_target.cpu()).double().mean().reshape(1)
    if not isinstance(shots, int) or shots < 1:
        raise ValueError(f"Expected argument `shots` to be a positive integer, but got {shots!r}.")
    least = shots + (1 if query_features is None else 0)
    if int(counts.min()) < least:
        raise ValueError(
            f"Expected every class to have at least {least} samples for {shots}-shot evaluation, "
            f"but the smallest class has {int(counts.min())}."
        )
    if not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(
            f"Expected argument `num_draws` to be a positive integer, but got {num_draws!r}."
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    target_cpu = target.cpu()
    members = [torch.nonzero(target_cpu == c).flatten() for c in range(num_classes)]
    accuracies = torch.empty(num_draws, dtype=torch.float64)
    for draw in range(num_draws):
        support = torch.stack(
            [m[torch.randperm(len(m), generator=generator)[:shots]] for m in members]
        )  # (K, shots)
        means = features[support.flatten().to(features.device)].to(torch.float64)
        means = means.reshape(num_classes, shots, -1).mean(dim=1)
        if query_features is not None and query_target is not None:
            qx, qy = query_features, query_target.cpu()
        else:
            rest = torch.ones(len(target), dtype=torch.bool)
            rest[support.flatten()] = False
            qx, qy = features[rest.to(features.device)], target_cpu[rest]
        pred = nearest_class_mean_predict(qx, means).cpu()
        accuracies[draw] = (pred == qy).double().mean()
    return accuracies


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks.

    Example:
        >>> average_ranks(torch.tensor([10.0, 30.0, 20.0, 30.0])).tolist()
        [1.0, 3.5, 2.0, 3.5]
    """
    if values.ndim != 1:
        raise ValueError(
            f"Expected argument `values` to be a 1-D tensor, but got shape {tuple(values.shape)}."
        )
    sorted_values, order = torch.sort(values.to(torch.float64), stable=True)
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, dim=0).to(torch.float64)  # 1-based rank of each group's last
    group_rank = ends - (counts.to(torch.float64) - 1) / 2  # mean of first..last
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(group_rank, counts)
    return ranks


def spearman_correlation(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks.

    Raises:
        ValueError: if the inputs differ in length, hold fewer than 2 values or NaN, or one of them
            is constant (the correlation is then undefined).

    Example:
        >>> spearman_correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 40.0, 90.0]))
        1.0
    """
    x = torch.as_tensor(x).flatten()
    y = torch.as_tensor(y).flatten()
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(
            "Expected `x` and `y` to hold the same number (at least 2) of values, "
            f"but got {len(x)} and {len(y)}."
        )
    if torch.isnan(x).any() or torch.isnan(y).any():
        raise ValueError("Expected `x` and `y` without NaN.")
    rx = average_ranks(x)
    ry = average_ranks(y)
    rx = rx - rx.mean()
    ry = ry - ry.mean()
    denominator = math.sqrt(float(rx.square().sum() * ry.square().sum()))
    if denominator == 0:
        raise ValueError(
            "Expected `x` and `y` to vary; the rank correlation of a constant is undefined."
        )
    return float((rx * ry).sum()) / denominator


def _rank_correlation(rx: Tensor, ry: Tensor) -> Tensor:
    # Pearson correlation of centred ranks along the last dimension.
    rx = rx - rx.mean(dim=-1, keepdim=True)
    ry = ry - ry.mean(dim=-1, keepdim=True)
    return (rx * ry).sum(-1) / (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()


def spearman_permutation_test(
    x: Tensor,
    y: Tensor,
    *,
    num_permutations: int = 10_000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Spearman's rho and its two-sided permutation p-value under "no association".

    The p-value is the fraction of permutations ``pi`` of ``y`` with
    ``|rho(x, y_pi)| >= |rho(x, y)|`` (up to 1e-12). With at most 8 points every permutation is
    enumerated (exact test); above, ``num_permutations`` random ones are drawn and the identity is
    counted once, ``p = (1 + hits) / (1 + num_permutations)`` (never 0; Phipson & Smyth, 2010).

    Example:
        >>> rho, p = spearman_permutation_test(torch.arange(5.0), torch.arange(5.0))
        >>> rho, round(p, 4)  # only the identity and the reversal reach |rho| = 1: 2 / 120
        (1.0, 0.0167)
    """
    rho = spearman_correlation(x, y)
    rx = average_ranks(torch.as_tensor(x).flatten())
    ry = average_ranks(torch.as_tensor(y).flatten())
    n = len(rx)
    threshold = abs(rho) - 1e-12
    if n <= 8:
        perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)
        values = _rank_correlation(rx.expand(len(perms), n), ry[perms])
        return rho, float((values.abs() >= threshold).double().mean())
    if not isinstance(num_permutations, int) or num_permutations < 1:
        raise ValueError(
            "Expected argument `num_permutations` to be a positive integer, "
            f"but got {num_permutations!r}."
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    hits = 0
    for start in range(0, num_permutations, 1000):
        size = min(1000, num_permutations - start)
        perms = torch.rand(size, n, generator=generator).argsort(dim=1)
        values = _rank_correlation(rx.expand(size, n), ry[perms])
        hits += int((values.abs() >= threshold).sum())
    return rho, (1 + hits) / (1 + num_permutations)
