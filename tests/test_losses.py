"""torchcollapse.losses against brute-force float64 references written here.

Every reference below is a plain loop over samples, classes or pairs in numpy float64, sharing no
code with the library; NC2/NC3 are also cross-checked with the shared metric reference
(``tests/_helpers/reference.py``), so the loss terms and the metrics agree on their conventions.
Tolerances: float64 inputs differ from the references by summation order only (rtol 1e-10);
float32/bfloat16 inputs are compared on the *rounded* inputs, and statistics are computed in
float32 (rtol 1e-5 covers a few hundred ulps of float32).

The regularizers have three implementations of the same maths: one-hot products for small CPU
batches, index kernels for larger ones, and tensor scalars for accelerators and ``torch.compile``.
The ``compute_path`` fixture runs a test on each (the last by making the library believe it is
being compiled, which is what selects that path on CPU).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchcollapse.losses._fused as fused
from tests._helpers.devices import foreign_default_device
from tests._helpers.reference import reference_neural_collapse
from tests._helpers.testers import check_deferred_init, check_module
from torchcollapse.heads import SimplexETFHead
from torchcollapse.losses import (
    BalancedSoftmaxLoss,
    CollapseRegularizer,
    DotRegressionLoss,
    RescaledMSELoss,
    SelfDualityLoss,
    SimplexGeometryLoss,
    WithinClassVariabilityLoss,
    class_weights_from_counts,
    target_penalty,
)
from torchcollapse.losses._batch import batch_class_statistics
from torchcollapse.losses.dot_regression import dot_regression_loss
from torchcollapse.losses.rescaled_mse import rescaled_mse_loss
from torchcollapse.losses.self_duality import self_duality_distance
from torchcollapse.losses.simplex_geometry import simplex_geometry_of_means, simplex_gram_distance
from torchcollapse.losses.within_class import within_class_variability
from torchcollapse.norms import FeatureCenter, FeatureNorm

RTOL64 = 1e-10  # float64 vs float64 reference: summation order only

PATHS = ("one-hot", "index", "tensor")


@pytest.fixture(params=PATHS)
def compute_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Select one implementation of the regularizers for the test (see the module docstring)."""
    if request.param == "index":
        monkeypatch.setattr(fused, "ONEHOT_MAX", 0)
    elif request.param == "tensor":
        monkeypatch.setattr(fused, "_is_compiling", lambda: True)
    return str(request.param)


def make_batch(
    n: int,
    d: int,
    k: int,
    seed: int,
    *,
    absent: tuple[int, ...] = (),
    singletons: tuple[int, ...] = (),
    spread: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """A float64 Gaussian-mixture batch; ``absent`` classes have no sample, ``singletons`` one."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([c for c in range(k) if c not in absent and c not in singletons])
    target = allowed[torch.randint(0, len(allowed), (n,), generator=g)]
    target = torch.cat([target, torch.tensor(singletons, dtype=torch.long)])
    centres = 3.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    features = centres[target] + spread * torch.randn(
        len(target), d, generator=g, dtype=torch.float64
    )
    return features, target


# ----------------------------------------------------------------------------------------------
# brute-force references


def ref_traces(h: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float, list[int], np.ndarray]:
    """``tr Sigma_W``, ``tr Sigma_B``, present classes and centred means, by loops."""
    present = [c for c in range(k) if int(np.sum(y == c)) > 0]
    means = {c: h[y == c].sum(axis=0) / np.sum(y == c) for c in present}
    mu_g = sum(means[c] for c in present) / len(present)
    within = sum(float(np.dot(h[i] - means[y[i]], h[i] - means[y[i]])) for i in range(len(y)))
    between = sum(float(np.dot(means[c] - mu_g, means[c] - mu_g)) for c in present)
    centred = np.stack([means[c] - mu_g for c in present])
    return within / len(y), between / len(present), present, centred


def ref_nc1(h: np.ndarray, y: np.ndarray, k: int, form: str) -> float:
    within, between, present, _ = ref_traces(h, y, k)
    if len(present) < 2:
        return 0.0
    return within / (within + between) if form == "bounded" else within / between


def ref_gram_distance(vectors: np.ndarray) -> float:
    """``||G/||G||_F - (I - 11^T/K)/sqrt(K-1)||_F^2`` with the K x K Gram formed explicitly."""
    k = vectors.shape[0]
    gram = np.array([[float(np.dot(a, b)) for b in vectors] for a in vectors])
    etf = (np.eye(k) - np.ones((k, k)) / k) / math.sqrt(k - 1)
    return float(np.sum((gram / np.sqrt(np.sum(gram**2)) - etf) ** 2))


def ref_self_duality(w: np.ndarray, m: np.ndarray) -> float:
    return float(np.sum((w / np.sqrt(np.sum(w**2)) - m / np.sqrt(np.sum(m**2))) ** 2))


def ref_dot_regression(
    h: np.ndarray, y: np.ndarray, frame: np.ndarray, counts: np.ndarray | None
) -> tuple[float, np.ndarray, np.ndarray]:
    """Yang et al.'s loss by a loop, and its gradient in ``h`` with the norms held constant (the
    frame is a constant of the loss).

    Re-weighting as in the authors' ``produce_Ew``: ``E_c = sqrt(gamma / n_c)`` with ``gamma`` the
    mean count of the classes present, multiplying the loss of class ``c``.
    """
    n = len(y)
    weights = np.ones(frame.shape[0])
    if counts is not None:
        present = counts > 0
        gamma = counts.sum() / present.sum()
        weights[present] = np.sqrt(gamma / counts[present])
    total, grad = 0.0, np.zeros_like(h)
    for i in range(n):
        m = frame[y[i]]
        dot = float(np.dot(h[i], m))
        scale = math.sqrt(float(np.dot(h[i], h[i]))) * math.sqrt(float(np.dot(m, m)))
        total += weights[y[i]] * 0.5 * (dot - scale) ** 2 / scale
        grad[i] = weights[y[i]] * (dot - scale) / scale * m / n
    return total / n, grad


# ----------------------------------------------------------------------------------------------
# DotRegressionLoss


@pytest.mark.parametrize("counts_mode", [None, "batch", "given"])
def test_dot_regression_matches_loop_value_and_detached_norm_gradient(
    counts_mode: str | None, compute_path: str
) -> None:
    features, target = make_batch(40, 6, 5, seed=1, singletons=(4,))
    frame = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    given = np.array([50.0, 20.0, 10.0, 5.0, 1.0])
    if counts_mode == "given":
        loss_fn = DotRegressionLoss(class_counts=given.tolist())
        counts = given
    elif counts_mode == "batch":
        loss_fn = DotRegressionLoss(class_counts="batch")
        counts = np.bincount(target.numpy(), minlength=5).astype(np.float64)
    else:
        loss_fn, counts = DotRegressionLoss(), None
    h = features.clone().requires_grad_()
    learnable = frame.clone().requires_grad_()
    loss = loss_fn(h, target, learnable)
    loss.backward()
    expected, expected_grad = ref_dot_regression(
        features.numpy(), target.numpy(), frame.numpy(), counts
    )
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=RTOL64)
    # norms are detached (the paper's choice), so the gradient is (cos - 1) m_y, not the derivative
    # of ||h|| ||m|| / 2 (cos - 1)^2: compare with that closed form, not with gradcheck.
    np.testing.assert_allclose(h.grad.numpy(), expected_grad, rtol=1e-9, atol=1e-13)
    # the frame is a constant of the loss: detached, it gets no gradient at all
    assert learnable.grad is None
    # per-sample losses carry the same gradients (their sum is N times the mean)
    h_none = features.clone().requires_grad_()
    frame_none = frame.clone().requires_grad_()
    loss_fn.reduction = "none"
    per_sample = loss_fn(h_none, target, frame_none)
    assert per_sample.sum().item() == pytest.approx(len(target) * expected, rel=RTOL64)
    (per_sample.sum() / len(target)).backward()
    np.testing.assert_allclose(h_none.grad.numpy(), expected_grad, rtol=1e-9, atol=1e-13)
    assert frame_none.grad is None


def test_dot_regression_is_half_squared_cosine_gap_on_unit_vectors(compute_path: str) -> None:
    features, target = make_batch(30, 5, 4, seed=3)
    frame = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=1)
    unit = F.normalize(features, dim=1)
    per_sample = DotRegressionLoss(reduction="none")(unit, target, frame)
    cosine = (unit * frame[target]).sum(1)
    torch.testing.assert_close(per_sample, 0.5 * (cosine - 1) ** 2, rtol=RTOL64, atol=1e-14)


def test_dot_regression_reductions_and_frame_module(compute_path: str) -> None:
    features, target = make_batch(12, 4, 3, seed=4)
    head = nn.Linear(4, 3, bias=False).double()
    none = DotRegressionLoss(reduction="none")(features, target, head)
    assert none.shape == (len(target),)
    torch.testing.assert_close(
        DotRegressionLoss(reduction="sum")(features, target, head), none.sum()
    )
    torch.testing.assert_close(DotRegressionLoss()(features, target, head.weight), none.mean())


def test_dot_regression_trains_features_and_leaves_a_learnable_head_scale_alone() -> None:
    """A head with a learnable scale as the frame: the loss trains the features only. The scale
    keeps its value (no gradient reaches it: its ``grad`` stays ``None``), the loss stays finite,
    and the features turn towards their class vectors (mean cosine from about 0 to over 0.5; it
    is 0.66-0.78 on five seeds). Before, the detached-norm gradient grew the scale without
    bound: NaN within 20 steps at this learning rate."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh data, reported on failure
    g = torch.Generator().manual_seed(seed)
    k, d, n = 4, 16, 128
    target = torch.arange(n) % k
    inputs = torch.randn(n, 10, generator=g) + 2.0 * F.one_hot(target, 10).float()
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, d))
    head = SimplexETFHead(d, k, learnable_scale=True)
    assert head.log_scale is not None
    log_scale = head.log_scale.detach().clone()
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1)
    loss_fn = DotRegressionLoss()
    losses, cosines = [], []
    for _ in range(40):
        opt.zero_grad()
        features = backbone(inputs)
        loss = loss_fn(features, target, head)
        loss.backward()
        assert head.log_scale.grad is None, f"seed {seed}"
        opt.step()
        losses.append(loss.item())
        cosine = F.cosine_similarity(features.detach(), head.frame[target], dim=1).mean()
        cosines.append(cosine.item())
    assert all(math.isfinite(value) for value in losses), f"seed {seed}: {losses}"
    assert torch.equal(head.log_scale.detach(), log_scale), f"seed {seed}"
    assert cosines[-1] > 0.5, f"seed {seed}: {cosines}"
    assert cosines[-1] > cosines[0] + 0.3, f"seed {seed}: {cosines}"


def test_dot_regression_zero_feature_is_finite(compute_path: str) -> None:
    features = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    loss = DotRegressionLoss()(
        features, torch.tensor([0, 1, 2]), torch.eye(3, 4, dtype=torch.float64)
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(features.grad).all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.float64])
def test_dot_regression_function_takes_integer_class_weights(
    dtype: torch.dtype, compute_path: str
) -> None:
    """``class_weight`` may be an integer tensor (cast to the compute dtype, as the module casts
    its ``class_counts``). Reference: a float64 loop with the weights as Python numbers; float64
    features, so only the summation order differs (RTOL64)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    features = torch.randn(9, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (9,), generator=g)
    frame = torch.randn(4, 5, generator=g, dtype=torch.float64)
    weights = torch.randint(0, 6, (4,), generator=g).tolist()
    expected = []
    for i in range(9):
        m = frame[int(target[i])].tolist()
        h = features[i].tolist()
        dot = math.fsum(a * b for a, b in zip(h, m))
        scale = math.sqrt(math.fsum(a * a for a in h)) * math.sqrt(math.fsum(b * b for b in m))
        expected.append(weights[int(target[i])] * 0.5 * (dot - scale) ** 2 / scale)
    class_weight = torch.tensor(weights, dtype=dtype)
    loss = dot_regression_loss(features, target, frame, class_weight=class_weight)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(math.fsum(expected) / 9, rel=RTOL64)
    per_sample = dot_regression_loss(
        features, target, frame, class_weight=class_weight, reduction="none"
    )
    torch.testing.assert_close(
        per_sample, torch.tensor(expected, dtype=torch.float64), rtol=RTOL64, atol=1e-15
    )


def test_class_weights_from_counts_follow_inverse_square_root() -> None:
    counts = torch.tensor([8.0, 2.0, 0.0, 6.0])
    weights = class_weights_from_counts(counts)
    mean_count = 16.0 / 3.0
    expected = [
        math.sqrt(mean_count / 8),
        math.sqrt(mean_count / 2),
        1.0,
        math.sqrt(mean_count / 6),
    ]
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        class_weights_from_counts(counts, 1.0)[1], torch.tensor(mean_count / 2)
    )


# ----------------------------------------------------------------------------------------------
# RescaledMSELoss and BalancedSoftmaxLoss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_classification_losses_on_an_empty_batch_agree_with_torch(dtype: torch.dtype) -> None:
    """No samples: ``"mean"`` is NaN (a mean over nothing, as ``nn.CrossEntropyLoss`` and
    ``nn.MSELoss``), ``"sum"`` zero and ``"none"`` an empty tensor, for the three losses on
    logits or features (modules and functions); a backward pass still runs."""
    k = 3
    logits = torch.empty(0, k, dtype=dtype, requires_grad=True)
    target = torch.empty(0, dtype=torch.long)
    frame = torch.eye(k, dtype=dtype)
    losses: dict[str, Callable[[Any], Tensor]] = {
        "balanced softmax": lambda r: BalancedSoftmaxLoss([3, 2, 1], reduction=r)(logits, target),
        "rescaled mse": lambda r: RescaledMSELoss(reduction=r)(logits, target),
        "rescaled mse function": lambda r: rescaled_mse_loss(logits, target, reduction=r),
        "dot regression": lambda r: DotRegressionLoss(reduction=r)(logits, target, frame),
        "dot regression, batch counts": lambda r: DotRegressionLoss(
            class_counts="batch", reduction=r
        )(logits, target, frame),
        "dot regression function": lambda r: dot_regression_loss(
            logits, target, frame, reduction=r
        ),
    }
    assert torch.isnan(nn.CrossEntropyLoss()(logits, target))
    assert torch.isnan(nn.MSELoss()(logits, logits.detach()))
    for name, loss in losses.items():
        mean = loss("mean")
        assert torch.isnan(mean), name
        mean.backward()
        assert logits.grad is not None, name
        assert logits.grad.shape == (0, k), name
        total = loss("sum")
        assert total.item() == 0.0, name
        assert total.dtype == dtype, name
        assert loss("none").shape == (0,), name


@pytest.mark.parametrize(("k", "m"), [(1.0, 1.0), (15.0, 30.0), (0.5, 2.0)])
def test_rescaled_mse_matches_loop(k: float, m: float) -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 7, dtype=torch.float64, generator=g)
    target = torch.randint(0, 7, (9,), generator=g)
    expected = 0.0
    for i in range(9):
        c = int(target[i])
        terms = [
            (k * (float(logits[i, j]) - m) ** 2 if j == c else float(logits[i, j]) ** 2)
            for j in range(7)
        ]
        expected += sum(terms) / 7
    loss = RescaledMSELoss(k, m)(logits, target)
    assert loss.item() == pytest.approx(expected / 9, rel=RTOL64)
    if k == m == 1.0:  # the plain square loss against one-hot targets
        torch.testing.assert_close(loss, F.mse_loss(logits, F.one_hot(target, 7).double()))


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_balanced_softmax_matches_loop(tau: float, smoothing: float) -> None:
    counts = [500.0, 120.0, 30.0, 7.0]
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    logits = torch.randn(10, 4, dtype=torch.float64, generator=g)
    target = torch.randint(0, 4, (10,), generator=g)
    total = sum(counts)
    expected = 0.0
    for i in range(10):
        z = [float(logits[i, j]) + tau * math.log(counts[j] / total) for j in range(4)]
        top = max(z)
        log_norm = top + math.log(math.fsum(math.exp(v - top) for v in z))
        # smoothed target: (1 - s) on the label, s / K on every class
        expected += (1 - smoothing) * (log_norm - z[int(target[i])])
        expected += smoothing / 4 * math.fsum(log_norm - v for v in z)
    loss = BalancedSoftmaxLoss(counts, tau=tau, label_smoothing=smoothing)(logits, target)
    assert loss.item() == pytest.approx(expected / 10, rel=1e-7)  # log_prior buffer is float32


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_balanced_softmax_takes_class_probabilities(smoothing: float, reduction: str) -> None:
    """``(N, K)`` floating targets are class probabilities, as for ``nn.CrossEntropyLoss``
    (Mixup/CutMix): the cross-entropy of the adjusted logits with them, smoothed as torch
    smooths probabilities, ``ignore_index`` not applied. Reference: a float64 loop, on a
    ``.double()`` module (float64 priors), so only the summation order differs (RTOL64)."""
    counts, tau, k, n = [500.0, 120.0, 30.0, 7.0], 0.7, 4, 10
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    logits = torch.randn(n, k, dtype=torch.float64, generator=g).requires_grad_()
    probabilities = torch.rand(n, k, dtype=torch.float64, generator=g)
    probabilities /= probabilities.sum(1, keepdim=True)
    total = sum(counts)
    losses, grads = [], torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        z = [float(logits.detach()[i, j]) + tau * math.log(counts[j] / total) for j in range(k)]
        top = max(z)
        log_norm = top + math.log(math.fsum(math.exp(v - top) for v in z))
        wanted = [(1 - smoothing) * float(probabilities[i, j]) + smoothing / k for j in range(k)]
        losses.append(math.fsum(p * (log_norm - v) for p, v in zip(wanted, z)))
        for j in range(k):
            grads[i, j] = math.fsum(wanted) * math.exp(z[j] - log_norm) - wanted[j]
    loss_fn = BalancedSoftmaxLoss(
        counts,
        tau=tau,
        reduction=reduction,  # type: ignore[arg-type]
        label_smoothing=smoothing,
        ignore_index=1,  # a label, but no sample is ignored
    ).double()
    loss = loss_fn(logits, probabilities)
    expected = torch.tensor(losses, dtype=torch.float64)
    scale = 1.0 / n if reduction == "mean" else 1.0
    if reduction != "none":
        expected = expected.sum() * scale
    torch.testing.assert_close(loss, expected, rtol=RTOL64, atol=1e-14)
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, grads * scale, rtol=1e-9, atol=1e-14)
    # one-hot probabilities are the class indices (label smoothing alike); float32 probabilities
    # are cast to the loss's dtype
    labels = torch.randint(0, k, (n,), generator=g)
    loss_fn.ignore_index = -100
    onehot = F.one_hot(labels, k)
    torch.testing.assert_close(loss_fn(logits, onehot.double()), loss_fn(logits, labels))
    torch.testing.assert_close(loss_fn(logits, onehot.float()), loss_fn(logits, labels))
    # float32 logits give a float32 loss (as with class indices), also for float64 probabilities
    assert (
        BalancedSoftmaxLoss(counts)(logits.detach().float(), probabilities).dtype == torch.float32
    )


def test_balanced_softmax_target_errors_name_both_accepted_forms() -> None:
    loss_fn = BalancedSoftmaxLoss([5, 3, 1])
    logits = torch.randn(4, 3)
    wrong = {
        "(N, 1) labels": torch.zeros(4, 1, dtype=torch.long),
        "one-hot integers": torch.zeros(4, 3, dtype=torch.long),
        "probabilities of another width": torch.full((4, 2), 0.5),
        "probabilities of fewer samples": torch.full((3, 3), 1 / 3),
        "1-D probabilities": torch.full((4,), 0.5),
    }
    for name, target in wrong.items():
        message = r"`target` to hold \(4,\) integer class indices or \(4, 3\) floating class"
        with pytest.raises(ValueError, match=message):
            loss_fn(logits, target)
        del name
    with pytest.raises(ValueError, match="same number of samples"):
        loss_fn(logits, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("validate_args", [True, False])
@pytest.mark.parametrize("ignore_index", [-100, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("integer", ["python", "numpy", "tensor"])
def test_balanced_softmax_ignores_samples_labelled_ignore_index(
    validate_args: bool, ignore_index: int, reduction: str, integer: str
) -> None:
    """As ``nn.CrossEntropyLoss``: samples labelled ``ignore_index`` add nothing (a zero with
    ``"none"``), ``"mean"`` divides by the others, the same with and without validation (the
    default -100 is outside the label range and no error). ``ignore_index`` may be any integer,
    numpy's and a 0-dim tensor too (as for ``nn.CrossEntropyLoss``). Reference: a float64
    loop."""
    counts, smoothing, k = [40.0, 9.0, 3.0, 1.0], 0.2, 4
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    logits = torch.randn(9, k, dtype=torch.float64, generator=g).requires_grad_()
    target = torch.randint(0, k, (9,), generator=g)
    order = torch.randperm(9, generator=g)
    target[order[:3]] = ignore_index
    # at least one sample counts (else "mean" is 0 / 0, NaN as in torch): never all ignored
    target[order[3]] = (ignore_index + 1) % k if 0 <= ignore_index < k else 0
    total = sum(counts)
    losses, grads = [], torch.zeros(9, k, dtype=torch.float64)
    for i in range(9):
        if int(target[i]) == ignore_index:
            losses.append(0.0)
            continue
        z = [float(logits.detach()[i, j]) + math.log(counts[j] / total) for j in range(k)]
        top = max(z)
        log_norm = top + math.log(math.fsum(math.exp(v - top) for v in z))
        label = int(target[i])
        losses.append(
            (1 - smoothing) * (log_norm - z[label])
            + smoothing / k * math.fsum(log_norm - v for v in z)
        )
        for j in range(k):
            wanted = (1 - smoothing) * (j == label) + smoothing / k
            grads[i, j] = math.exp(z[j] - log_norm) - wanted
    kept = sum(int(t) != ignore_index for t in target)
    loss_fn = BalancedSoftmaxLoss(
        counts,
        reduction=reduction,  # type: ignore[arg-type]
        label_smoothing=smoothing,
        ignore_index={"python": int, "numpy": np.int64, "tensor": torch.tensor}[integer](
            ignore_index
        ),
        validate_args=validate_args,
    )
    assert loss_fn.ignore_index == ignore_index
    assert type(loss_fn.ignore_index) is int
    loss = loss_fn(logits, target)
    loss.sum().backward()
    scale = 1.0 / kept if reduction == "mean" else 1.0
    if reduction == "none":
        torch.testing.assert_close(loss.detach(), torch.tensor(losses, dtype=torch.float64))
    else:
        assert loss.item() == pytest.approx(math.fsum(losses) * scale, rel=1e-7)
    # float32 log priors: rtol 1e-6
    torch.testing.assert_close(logits.grad, grads * scale, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\]"):
        BalancedSoftmaxLoss(counts, ignore_index=ignore_index)(
            logits, torch.tensor([0, -1] * 4 + [4])
        )


def test_balanced_softmax_priors_survive_meta_to_empty_and_half_casts() -> None:
    """The log priors are data of the constructor: built inside a meta-device context (FSDP,
    Lightning's ``empty_init``) and after ``to_empty()`` they are the priors of the counts, and
    ``.bfloat16()``/``.half()`` keep them in float32 (bfloat16 rounded -13.8155 to -13.8125).
    Reference: the loop of the cross-entropy on the adjusted logits, in float64."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    counts = [999_999.0, 1.0, float(torch.randint(1, 1000, (), generator=g))]
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (5,), generator=g)

    def loop(rounded: Tensor) -> float:
        total, expected = sum(counts), 0.0
        for i in range(len(target)):
            z = [float(rounded[i, j]) + math.log(counts[j] / total) for j in range(3)]
            top = max(z)
            log_norm = top + math.log(math.fsum(math.exp(v - top) for v in z))
            expected += log_norm - z[int(target[i])]
        return expected / len(target)

    check_deferred_init(lambda: BalancedSoftmaxLoss(counts), [(logits.float(), target)])
    emptied = BalancedSoftmaxLoss(counts).to_empty(device="cpu")
    assert emptied(logits.float(), target).item() == pytest.approx(loop(logits), rel=1e-6)
    for dtype in (torch.bfloat16, torch.float16):
        loss = BalancedSoftmaxLoss(counts).to(dtype)
        assert loss.log_prior.dtype == torch.float32
        rounded = logits.to(dtype)
        # float32 priors and loss; the logits as the loss sees them (rounded)
        assert loss(rounded, target).item() == pytest.approx(loop(rounded.double()), rel=1e-6)


def test_balanced_softmax_priors_widen_to_float64_under_double() -> None:
    """``.double()`` gives the exact float64 priors (they were float32, the loss on float64
    logits float32-accurate, 1e-8 relative), so float64 logits get the float64 formula (RTOL64
    against a float64 loop); narrower casts after it keep float64, ``.float()`` narrows again;
    ``reset_parameters`` and ``to_empty`` (also from the meta device) give the constructor's
    priors in the buffer's dtype; float32 logits still give a float32 loss."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    counts = [999_999.0, 1.0, float(torch.randint(1, 1000, (), generator=g))]
    exact = torch.tensor([math.log(c / sum(counts)) for c in counts], dtype=torch.float64)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (6,), generator=g)
    expected = 0.0
    for i in range(len(target)):
        z = [float(logits[i, j]) + float(exact[j]) for j in range(3)]
        top = max(z)
        log_norm = top + math.log(math.fsum(math.exp(v - top) for v in z))
        expected += log_norm - z[int(target[i])]
    expected /= len(target)

    def same64(prior: Tensor) -> None:
        # float64 priors: within a few float64 ulps of math.log (torch's vectorised log may
        # differ from it in the last bit), far inside float32's rounding (~6e-8)
        assert prior.dtype == torch.float64
        torch.testing.assert_close(prior, exact, rtol=1e-15, atol=0)

    loss_fn = BalancedSoftmaxLoss(counts)
    assert loss_fn.log_prior.dtype == torch.float32
    loss_fn.double()
    assert loss_fn.log_prior.dtype == torch.float64
    same64(loss_fn.log_prior)
    assert loss_fn(logits, target).item() == pytest.approx(expected, rel=RTOL64)
    float32_loss = loss_fn(logits.float(), target)
    assert float32_loss.dtype == torch.float32
    assert float32_loss.item() == pytest.approx(expected, rel=1e-5)
    for dtype in (torch.float16, torch.bfloat16):  # never narrower than they are
        same64(BalancedSoftmaxLoss(counts).double().to(dtype).log_prior)
    torch.testing.assert_close(loss_fn.float().log_prior, exact.float(), rtol=2**-23, atol=0)
    loss_fn.double()  # from the (unmodified) float32 buffer: the exact priors again
    same64(loss_fn.log_prior)
    with torch.no_grad():
        loss_fn.log_prior.zero_()
    loss_fn.reset_parameters()
    same64(loss_fn.log_prior)
    same64(loss_fn.to_empty(device="cpu").log_prior)
    with torch.device("meta"):
        deferred = BalancedSoftmaxLoss(counts).double()
    same64(deferred.to_empty(device="cpu").log_prior)
    with torch.device("meta"):
        deferred = BalancedSoftmaxLoss(counts)
    same64(deferred.to_empty(device="cpu").double().log_prior)


def test_balanced_softmax_priors_land_on_the_default_device() -> None:
    """Without ``device``, the log priors go to torch's default device (as ``nn.Linear``'s
    weight), the counts being read on the CPU: inside a meta context the loss runs on meta
    logits (a CPU buffer added to them raised), and ``to_empty()`` gives the priors of the
    counts. Reference: ``log(n_c / sum n)`` in float64 and the cross-entropy loop, float32
    priors (rtol 1e-6)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    counts = torch.randint(1, 1000, (4,), generator=g).tolist()
    expected_prior = torch.tensor([math.log(c / sum(counts)) for c in counts], dtype=torch.float64)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (5,), generator=g)
    expected = 0.0
    for i in range(5):
        z = [float(logits[i, j] + expected_prior[j]) for j in range(4)]
        top = max(z)
        expected += top + math.log(math.fsum(math.exp(v - top) for v in z)) - z[int(target[i])]
    expected /= 5
    with torch.device("meta"):
        loss_fn = BalancedSoftmaxLoss(counts)
        assert loss_fn.log_prior.is_meta
        out = loss_fn(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
        assert out.is_meta
        assert out.shape == ()
        on_cpu = BalancedSoftmaxLoss(counts, device="cpu")  # an explicit device wins
    for built in (loss_fn.to_empty(device="cpu"), on_cpu):
        assert built.log_prior.dtype == torch.float32
        assert built.log_prior.device.type == "cpu"
        torch.testing.assert_close(built.log_prior.double(), expected_prior, rtol=1e-6, atol=0)
        assert built(logits, target).item() == pytest.approx(expected, rel=1e-6)
    with foreign_default_device():  # the counts are read on the CPU, not on that device
        foreign = BalancedSoftmaxLoss(counts)
    assert foreign(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_classification_losses_pass_module_checks() -> None:
    g = torch.Generator().manual_seed(7)
    logits, target = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    check_module(lambda: RescaledMSELoss(2.0, 3.0), (logits, target))
    # log priors follow float32 and float64 (never narrower: see the bfloat16 test)
    check_module(lambda: BalancedSoftmaxLoss([5, 3, 2, 1]), (logits, target))
    frame = torch.randn(4, 5, generator=g)
    features = torch.randn(6, 5, generator=g)
    # Norms are detached by design, so a numerical gradcheck does not apply (see the loop test).
    check_module(
        lambda: DotRegressionLoss(class_counts=[4, 3, 2, 1]),
        (features, target, frame),
        gradcheck=False,
        fixed_dtype_buffers=("class_counts",),  # float32 counts: float16 would round them
    )


# ----------------------------------------------------------------------------------------------
# regularizers: values


CASES = {
    "plain": {"absent": (), "singletons": ()},
    "absent classes": {"absent": (1, 4), "singletons": ()},
    "single-sample classes": {"absent": (0,), "singletons": (2, 5)},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form", ["bounded", "ratio"])
def test_within_class_variability_matches_loop(case: str, form: str, compute_path: str) -> None:
    features, target = make_batch(30, 5, 6, seed=8, **CASES[case])  # type: ignore[arg-type]
    reg = WithinClassVariabilityLoss(6, weight=-0.7, form=form)  # type: ignore[arg-type]
    expected = -0.7 * ref_nc1(features.numpy(), target.numpy(), 6, form)
    assert reg(features, target).item() == pytest.approx(expected, rel=RTOL64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [None, "squared", "at_most", "at_least"])
def test_ratio_nc1_is_capped_when_class_means_coincide(
    dtype: torch.dtype, mode: str | None, compute_path: str
) -> None:
    # Identical class means with some spread: tr Sigma_B = 0, the ratio is capped at 1 / eps,
    # where it is constant, so values (also squared as a target penalty) and gradients are finite.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(3, 5, generator=g, dtype=torch.float64)
    features = block.repeat(4, 1).to(dtype).requires_grad_()  # every class: the same 3 rows
    target = torch.arange(4).repeat_interleave(3)
    level = 0.5
    extra = {} if mode is None else {"target_nc1": level, "target_mode": mode}
    regularizer = CollapseRegularizer(4, nc1=0.3, nc1_form="ratio", **extra)  # type: ignore[arg-type]
    value = regularizer(features, target)
    value.backward()
    cap = 1.0 / torch.finfo(dtype).eps
    penalty = {None: cap, "squared": (cap - level) ** 2, "at_most": cap - level, "at_least": 0.0}
    message = f"seed {seed}, {compute_path}"
    assert value.item() == pytest.approx(0.3 * penalty[mode], rel=1e-6), message
    assert features.grad is not None
    assert torch.equal(features.grad, torch.zeros_like(features)), message
    stats = batch_class_statistics(features.detach(), target, 4)
    composable = within_class_variability(stats, "ratio")
    assert composable.item() == cap, message


@pytest.mark.parametrize("case", list(CASES))
def test_simplex_geometry_and_self_duality_match_loops(case: str, compute_path: str) -> None:
    features, target = make_batch(30, 7, 6, seed=9, **CASES[case])  # type: ignore[arg-type]
    weight = torch.randn(6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    _, _, present, centred = ref_traces(features.numpy(), target.numpy(), 6)
    nc2 = SimplexGeometryLoss(6, weight=0.3)(features, target)
    nc3 = SelfDualityLoss(6, weight=2.0)(features, target, weight)
    nc2_weight = SimplexGeometryLoss(6)(classifier=weight)
    assert nc2.item() == pytest.approx(0.3 * ref_gram_distance(centred), rel=RTOL64)
    expected_nc3 = ref_self_duality(weight.numpy()[present], centred)
    assert nc3.item() == pytest.approx(2.0 * expected_nc3, rel=RTOL64)
    assert nc2_weight.item() == pytest.approx(ref_gram_distance(weight.numpy()), rel=RTOL64)
    # the same conventions as the metrics: our terms are the squares of their distances
    metrics = reference_neural_collapse(features, target, 6, weight=weight)
    assert nc2.item() == pytest.approx(0.3 * metrics["nc2_etf_distance"] ** 2, rel=1e-9)
    assert nc3.item() == pytest.approx(2.0 * metrics["nc3"] ** 2, rel=1e-9)


def test_simplex_geometry_is_zero_at_any_simplex_and_large_k_uses_small_gram(
    compute_path: str,
) -> None:
    k, d = 9, 4  # K > d: the d x d Gram path
    g = torch.Generator().manual_seed(11)
    vectors = torch.randn(k, d, dtype=torch.float64, generator=g)
    assert SimplexGeometryLoss(k)(classifier=vectors).item() == pytest.approx(
        ref_gram_distance(vectors.numpy()), rel=RTOL64
    )
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=g))
    etf = 5.0 * (torch.eye(12, dtype=torch.float64) - 1 / 12) @ rotation  # scaled, rotated ETF
    assert abs(SimplexGeometryLoss(12)(classifier=etf).item()) < 1e-12


@pytest.mark.parametrize("target_mode", ["squared", "at_most", "at_least"])
def test_collapse_regularizer_is_the_weighted_sum_with_target(
    target_mode: str, compute_path: str
) -> None:
    features, target = make_batch(40, 6, 5, seed=12, absent=(3,))
    weight = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    h, y = features.numpy(), target.numpy()
    _, _, present, centred = ref_traces(h, y, 5)
    nc1 = ref_nc1(h, y, 5, "bounded")
    nc2, nc3 = ref_gram_distance(centred), ref_self_duality(weight.numpy()[present], centred)
    reg = CollapseRegularizer(5, nc1=0.5, nc2=-0.25, nc3=2.0)
    loss, parts = reg(features, target, weight, return_parts=True)
    assert loss.item() == pytest.approx(0.5 * nc1 - 0.25 * nc2 + 2.0 * nc3, rel=RTOL64)
    assert parts["nc1"].item() == pytest.approx(nc1, rel=RTOL64)
    assert not any(p.requires_grad for p in parts.values())
    torch.testing.assert_close(reg(features, target, weight), loss)  # default: the tensor only
    for level in (0.5 * nc1, 2.0 * nc1):
        aimed = CollapseRegularizer(
            5,
            nc1=3.0,
            target_nc1=level,
            target_mode=target_mode,  # type: ignore[arg-type]
        )
        penalty = {
            "squared": (nc1 - level) ** 2,
            "at_most": max(nc1 - level, 0.0),
            "at_least": max(level - nc1, 0.0),
        }[target_mode]
        assert aimed(features, target).item() == pytest.approx(3.0 * penalty, rel=RTOL64, abs=1e-15)


def test_target_penalty_modes() -> None:
    value = torch.tensor([0.2, 0.6], dtype=torch.float64)
    torch.testing.assert_close(
        target_penalty(value, 0.4), torch.tensor([0.04, 0.04], dtype=torch.float64)
    )
    torch.testing.assert_close(
        target_penalty(value, 0.4, "at_most"), torch.tensor([0.0, 0.2], dtype=torch.float64)
    )
    torch.testing.assert_close(
        target_penalty(value, 0.4, "at_least"), torch.tensor([0.2, 0.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="`mode`"):
        target_penalty(value, 0.4, "hinge")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# regularizers: gradients, module contract


def test_regularizers_gradcheck_with_absent_and_single_sample_classes(compute_path: str) -> None:
    features, target = make_batch(14, 4, 6, seed=14, absent=(1,), singletons=(3,))
    weight = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    h = features.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    fns = {
        "bounded": lambda h, w: WithinClassVariabilityLoss(6)(h, target),
        "ratio": lambda h, w: WithinClassVariabilityLoss(6, form="ratio")(h, target),
        "nc2": lambda h, w: SimplexGeometryLoss(6)(h, target),
        "nc2 weight": lambda h, w: SimplexGeometryLoss(6)(classifier=w) + 0 * h.sum(),
        "nc3": lambda h, w: SelfDualityLoss(6)(h, target, w),
        "all, target": lambda h, w: CollapseRegularizer(
            6, nc1=1.0, nc2=0.5, nc3=0.5, target_nc1=0.1
        )(h, target, w),
    }
    for name, fn in fns.items():
        assert torch.autograd.gradcheck(fn, (h, w)), name


def test_regularizers_pass_module_checks() -> None:
    features, target = make_batch(16, 5, 4, seed=16)
    features = features.float()
    weight = torch.randn(4, 5, generator=torch.Generator().manual_seed(17))
    check_module(lambda: WithinClassVariabilityLoss(4, 0.5), (features, target))
    check_module(lambda: WithinClassVariabilityLoss(4, form="ratio"), (features, target))
    check_module(lambda: SimplexGeometryLoss(4), (features, target))
    check_module(lambda: SelfDualityLoss(4), (features, target, weight))
    check_module(
        lambda: CollapseRegularizer(4, nc1=1.0, nc2=0.5, nc3=0.5, target_nc1=0.2),
        (features, target, weight),
    )

    def trained_running() -> WithinClassVariabilityLoss:
        reg = WithinClassVariabilityLoss(4, form="running", in_features=5, momentum=0.5)
        reg(features[:10], target[:10])  # training mode: fills the running means
        return reg

    check_module(trained_running, (features, target))


# ----------------------------------------------------------------------------------------------
# running class means


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_form_matches_loop_over_steps(momentum: float | None, compute_path: str) -> None:
    k, d = 5, 3
    reg = WithinClassVariabilityLoss(
        k, weight=2.0, form="running", in_features=d, momentum=momentum
    )
    reg.double()
    running = np.zeros((k, d))
    batches_seen = np.zeros(k)
    for step in range(3):
        absent = (step,)  # a different class missing from each batch
        features, target = make_batch(12, d, k, seed=20 + step, absent=absent)
        h, y = features.numpy(), target.numpy()
        for c in range(k):
            rows = h[y == c]
            if len(rows):
                factor = (
                    1.0
                    if batches_seen[c] == 0
                    else (1.0 / (batches_seen[c] + 1) if momentum is None else momentum)
                )
                running[c] = running[c] + factor * (rows.mean(axis=0) - running[c])
                batches_seen[c] += 1
        expected = 2.0 * np.mean([np.sum((h[i] - running[y[i]]) ** 2) for i in range(len(y))])
        x = features.clone().requires_grad_()
        loss = reg(x, target)
        loss.backward()
        assert loss.item() == pytest.approx(expected, rel=RTOL64)
        np.testing.assert_allclose(reg.running_mean.numpy(), running, rtol=RTOL64, atol=1e-13)
        grad = 2.0 * 2.0 * (h - running[y]) / len(y)  # running means are constants
        np.testing.assert_allclose(x.grad.numpy(), grad, rtol=1e-9, atol=1e-13)
    reg.eval()
    features, target = make_batch(8, d, k, seed=30)
    before = reg.running_mean.clone()
    reg(features, target)
    torch.testing.assert_close(reg.running_mean, before, rtol=0, atol=0)  # no update in eval


def test_running_form_excludes_classes_never_seen(compute_path: str) -> None:
    reg = WithinClassVariabilityLoss(4, form="running", in_features=2).double().eval()
    features = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    loss = reg(features, torch.tensor([0, 1, 2, 3, 0]))
    loss.backward()
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    assert torch.equal(features.grad, torch.zeros_like(features))
    reg.train()
    reg(torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.tensor([2]))
    reg.eval()
    value = reg(torch.tensor([[4.0, 5.0], [9.0, 9.0]], dtype=torch.float64), torch.tensor([2, 0]))
    assert value.item() == pytest.approx(9.0 + 16.0)  # only the class-2 sample counts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_running_form_means_stay_float32_when_the_module_is_cast(dtype: torch.dtype) -> None:
    """Running means stored in 16 bits freeze near large values (float16 ulp 0.5 at 1000, an
    update with momentum 0.01 moves them less); cast with the module, they stay float32 and
    follow the float64 recursion on the same rounded batch means (rtol 1e-5: float32 storage)."""
    k, d = 2, 3
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    reg = WithinClassVariabilityLoss(k, form="running", in_features=d, momentum=0.01).to(dtype)
    assert reg.running_mean.dtype == torch.float32
    target = torch.arange(16) % k
    centres = torch.tensor([[1000.0, -500.0, 3.0], [-800.0, 20.0, 700.0]])
    running = np.zeros((k, d))
    for step in range(200):
        features = (centres + 0.05 * step)[target] + torch.randn(16, d, generator=g)
        features = features.to(dtype)
        h, y = features.double().numpy(), target.numpy()
        for c in range(k):
            mean = h[y == c].mean(axis=0)
            running[c] = mean if step == 0 else running[c] + 0.01 * (mean - running[c])
        reg(features, target)
    np.testing.assert_allclose(reg.running_mean.double().numpy(), running, rtol=1e-5, atol=1e-4)
    reg.eval()
    probe = torch.tensor(running, dtype=torch.float32)[target].to(dtype)
    h = probe.double().numpy()
    expected = np.mean([np.sum((h[i] - running[target[i]]) ** 2) for i in range(len(target))])
    assert reg(probe, target).item() == pytest.approx(expected, rel=1e-3, abs=1e-2)
    assert reg.double().running_mean.dtype == torch.float64


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_form_allows_deferred_initialisation_from_meta(momentum: float | None) -> None:
    """Built on the meta device, then ``to_empty`` + ``reset_parameters`` (FSDP, Lightning's
    ``empty_init``): the same buffers as a directly built term, and the same values and running
    means over training batches (the first batch of a class sets its mean: garbage left in
    ``class_batches`` would blend it with garbage means)."""
    seed = int(torch.randint(0, 2**31, ()))
    batches = [make_batch(12, 3, 4, seed=seed + i, absent=(i,)) for i in range(3)]
    batches = [(features.float(), target) for features, target in batches]
    check_deferred_init(
        lambda: WithinClassVariabilityLoss(4, form="running", in_features=3, momentum=momentum),
        batches,
    )
    check_deferred_init(lambda: WithinClassVariabilityLoss(4, form="ratio"), batches)


# ----------------------------------------------------------------------------------------------
# degenerate batches and low precision


def all_regularizers(k: int) -> dict[str, nn.Module]:
    return {
        "bounded": WithinClassVariabilityLoss(k),
        "ratio": WithinClassVariabilityLoss(k, form="ratio"),
        "nc2": SimplexGeometryLoss(k),
        "nc3": SelfDualityLoss(k),
        "collapse": CollapseRegularizer(k, nc1=1.0, nc2=1.0, nc3=1.0),
        "collapse target": CollapseRegularizer(k, nc1=1.0, target_nc1=0.3),
    }


def call(name: str, reg: nn.Module, features: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    if name in ("nc3", "collapse", "all"):
        return reg(features, target, weight)
    return reg(features, target)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_fewer_than_two_classes_give_a_connected_zero(n: int, compute_path: str) -> None:
    """Documented: exactly zero, no warning, and a graph reaching the inputs with zero gradient."""
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for name, reg in all_regularizers(4).items():
        features = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
        loss = call(name, reg, features, torch.full((n,), 2, dtype=torch.long), weight)
        assert loss.item() == 0.0, name
        assert loss.grad_fn is not None, name
        (grad,) = torch.autograd.grad(loss, features)
        assert torch.equal(grad, torch.zeros_like(features)), name


def test_identical_features_stay_finite(compute_path: str) -> None:
    features = torch.ones(6, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    weight = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    for name, reg in all_regularizers(3).items():
        loss = call(name, reg, features, target, weight)
        grads = torch.autograd.grad(loss, [features, weight], allow_unused=True)
        assert torch.isfinite(loss), name
        assert all(g is None or torch.isfinite(g).all() for g in grads), name
    assert WithinClassVariabilityLoss(3)(features, target).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "absent"), [(5, ()), (7, ()), (6, (2,))])
def test_coinciding_class_means_give_two_and_no_gradient(
    dtype: torch.dtype, k: int, absent: tuple[int, ...], compute_path: str
) -> None:
    """Every sample alike (a dead backbone with a bias): the class means coincide, and every
    term is that of all-zero residuals and means, as documented (NC1 0, NC2 and NC3 2), with
    zero gradients. Summed about the origin, the class means of a row repeated 3 times came out
    apart by rounding, and the scale-free terms of that noise were arbitrary, with gradients
    up to ~1e6."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    d = 5
    target = torch.tensor([c for c in range(k) if c not in absent]).repeat(3)
    scale = 10.0 ** float(torch.empty(()).uniform_(-2.0, 3.0, generator=g))
    row = scale * torch.randn(1, d, generator=g, dtype=torch.float64)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64).to(dtype)
    message = f"seed {seed}, {compute_path}, {dtype}"
    terms: dict[str, tuple[nn.Module, float]] = {
        "nc2": (SimplexGeometryLoss(k, weight=0.7), 2.0 * 0.7),
        "nc3": (SelfDualityLoss(k, weight=-1.5), 2.0 * -1.5),
        "collapse": (CollapseRegularizer(k, nc1=0.0, nc2=0.5, nc3=2.0), 2.0 * 0.5 + 2.0 * 2.0),
        "nc1": (WithinClassVariabilityLoss(k, 0.3), 0.0),
        "nc1 ratio": (WithinClassVariabilityLoss(k, 0.3, form="ratio"), 0.0),
        "all": (CollapseRegularizer(k, nc1=0.4, nc2=0.5, nc3=2.0), 2.0 * 0.5 + 2.0 * 2.0),
    }
    for name, (reg, expected) in terms.items():
        h = row.repeat(len(target), 1).to(dtype).requires_grad_()
        w = weight.clone().requires_grad_()
        value = call(name, reg, h, target, w)
        grads = torch.autograd.grad(value, [h, w], allow_unused=True)
        # the weighted 2, rounded to the compute dtype
        assert value.item() == pytest.approx(expected, rel=torch.finfo(dtype).eps), (
            f"{name}: {message}"
        )
        for grad in grads:
            assert grad is None or torch.equal(grad, torch.zeros_like(grad)), f"{name}: {message}"
    # the composable functions agree
    h = row.repeat(len(target), 1).to(dtype).requires_grad_()
    w = weight.clone().requires_grad_()
    stats = batch_class_statistics(h, target, k)
    nc2, nc3 = simplex_geometry_of_means(stats), self_duality_distance(w, stats)
    nc1 = within_class_variability(stats)
    assert (nc1.item(), nc2.item(), nc3.item()) == (0.0, 2.0, 2.0), message
    grads = torch.autograd.grad(nc1 + nc2 + nc3, [h, w])
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads), message


def test_class_means_apart_by_little_behind_an_offset_still_count(compute_path: str) -> None:
    """Class means apart by 1e-9 of a common offset in float64 give the loop's NC2 and NC3 (rtol
    1e-4: rounding of the offset, 1e-16, is 1e-7 of the spread); nothing small is cut."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    k, d = 5, 6
    target = torch.arange(20) % k
    offset = 100.0 * torch.randn(1, d, generator=g, dtype=torch.float64)
    spread = 1e-7 * torch.randn(k, d, generator=g, dtype=torch.float64)
    features = offset + spread[target]
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    _, _, present, centred = ref_traces(features.numpy(), target.numpy(), k)
    nc2 = SimplexGeometryLoss(k)(features, target).item()
    nc3 = SelfDualityLoss(k)(features, target, weight).item()
    message = f"seed {seed}, {compute_path}"
    assert nc2 == pytest.approx(ref_gram_distance(centred), rel=1e-4), message
    assert nc3 == pytest.approx(ref_self_duality(weight.numpy()[present], centred), rel=1e-4), (
        message
    )


def test_float32_statistics_are_taken_about_a_sample(compute_path: str) -> None:
    """float32 features with a common offset 5e4 times the spread of their class means: taken
    about one of the samples (an exact subtraction), the statistics round relative to the spread,
    not to the offset, and NC1, NC2 and NC3 and their gradients match a float64 loop on the same
    float32 values to 1e-3 (summed about the origin, 1e-2 errors: eps * offset / spread =
    1.2e-7 * 5e4). Large batches: the index path and the accelerator path's statistics."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    k, d, n = 10, 16, 4096
    target = torch.arange(n) % k
    centres = 2e-5 * torch.randn(k, d, generator=g, dtype=torch.float64)
    noise = 4e-6 * torch.randn(n, d, generator=g, dtype=torch.float64)
    features32 = (1.0 + centres[target] + noise).float()
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    message = f"seed {seed}, {compute_path}"
    for name, reg in {
        "nc1": WithinClassVariabilityLoss(k),
        "nc2": SimplexGeometryLoss(k),
        "nc3": SelfDualityLoss(k),
    }.items():
        values, grads = [], []
        for dtype in (torch.float32, torch.float64):
            h = features32.to(dtype).requires_grad_()
            w = weight.to(dtype)
            value = call(name, reg, h, target, w)
            (grad,) = torch.autograd.grad(value, h)
            values.append(value.item())
            grads.append(grad.double())
        assert values[0] == pytest.approx(values[1], rel=1e-3), f"{name}: {message}"
        error = (grads[0] - grads[1]).norm() / grads[1].norm()
        assert error < 1e-3, f"{name}: {message}: gradient error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_autocast_give_float32_statistics(
    dtype: torch.dtype, compute_path: str
) -> None:
    features64, target = make_batch(48, 8, 5, seed=40, absent=(2,))
    features = features64.to(dtype)
    rounded = features.double()  # the reference sees the rounded inputs
    weight = torch.randn(5, 8, generator=torch.Generator().manual_seed(41))
    h, y = rounded.numpy(), target.numpy()
    _, _, present, centred = ref_traces(h, y, 5)
    expected = {
        "bounded": ref_nc1(h, y, 5, "bounded"),
        "ratio": ref_nc1(h, y, 5, "ratio"),
        "nc2": ref_gram_distance(centred),
        "nc3": ref_self_duality(weight.double().numpy()[present], centred),
    }
    for name, reg in all_regularizers(5).items():
        if name not in expected:
            continue
        value = call(name, reg, features, target, weight)
        assert value.dtype == torch.float32, name
        assert value.item() == pytest.approx(expected[name], rel=1e-5), name  # float32 statistics
    # under autocast, a linear layer hands bfloat16 features to the loss; it stays finite and
    # backpropagates into the layer
    layer = nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(features64.float())
        assert out.dtype == torch.bfloat16
        loss = CollapseRegularizer(5, nc1=1.0, nc2=1.0, nc3=1.0)(out, target, weight)
        dr = DotRegressionLoss(class_counts="batch")(out, target, weight)
    assert loss.dtype == torch.float32
    assert dr.dtype == torch.float32
    (loss + dr).backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(dr)
    assert layer.weight.grad is not None
    assert torch.isfinite(layer.weight.grad).all()


# ----------------------------------------------------------------------------------------------
# errors


def test_documented_errors() -> None:
    features, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    reg = WithinClassVariabilityLoss(3)
    with pytest.raises(ValueError, match="`features` to be a 2-D tensor"):
        reg(features[None], target)
    with pytest.raises(TypeError, match="`features` to be a floating-point tensor"):
        reg(features.long(), target)
    with pytest.raises(TypeError, match="`target` to be an integer tensor"):
        reg(features, target.float())
    with pytest.raises(ValueError, match="`target` to be a 1-D tensor"):
        reg(features, target[None])
    with pytest.raises(ValueError, match="same number of samples"):
        reg(features, target[:3])
    with pytest.raises(ValueError, match=r"labels in \[0, 2\], but got labels in \[0, 3\]"):
        reg(features, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(TypeError, match="`features` to be a tensor"):
        reg(features.tolist(), target)
    for k in (0, 1):  # one class: every term would be zero whatever the features
        with pytest.raises(ValueError, match=f"`num_classes` to be at least 2, but got {k}"):
            WithinClassVariabilityLoss(k)
    with pytest.raises(ValueError, match="`form`"):
        WithinClassVariabilityLoss(3, form="trace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`momentum`"):
        WithinClassVariabilityLoss(3, form="running", in_features=3, momentum=1.5)
    with pytest.raises(ValueError, match="`in_features`"):
        WithinClassVariabilityLoss(3, form="running")
    with pytest.raises(ValueError, match="3 columns"):
        WithinClassVariabilityLoss(3, form="running", in_features=3)(torch.randn(4, 2), target)
    with pytest.raises(ValueError, match="`features` and `target`, or `classifier`"):
        SimplexGeometryLoss(3)()
    with pytest.raises(ValueError, match="`classifier` to have 3 rows"):
        SimplexGeometryLoss(3)(classifier=torch.randn(4, 3))
    with pytest.raises(TypeError, match="module with a `weight`"):
        SelfDualityLoss(3)(features, target, nn.ReLU())
    with pytest.raises(ValueError, match=r"`classifier` to have a weight of shape \(3, 3\)"):
        SelfDualityLoss(3)(features, target, torch.randn(4, 3))
    # the right number of classes: the features' width is what differs, and is blamed
    message = (
        r"`features` to have 4 columns, the width of `classifier` \(shape \(3, 4\)\), but got 3"
    )
    with pytest.raises(ValueError, match=message):
        SelfDualityLoss(3)(features, target, torch.randn(3, 4))
    with pytest.raises(ValueError, match="`classifier` when `nc3` is non-zero"):
        CollapseRegularizer(3, nc3=1.0)(features, target)
    with pytest.raises(ValueError, match="`target_nc1` to be in"):
        CollapseRegularizer(3, target_nc1=1.5)
    with pytest.raises(ValueError, match="`nc1` to be positive when `target_nc1`"):
        CollapseRegularizer(3, nc1=-1.0, target_nc1=0.5)
    with pytest.raises(ValueError, match="at least one of the arguments"):
        CollapseRegularizer(3, nc1=0.0)
    with pytest.raises(ValueError, match="`nc1_form`"):
        CollapseRegularizer(3, nc1_form="running")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`target_mode`"):
        CollapseRegularizer(3, target_nc1=0.5, target_mode="hinge")  # type: ignore[arg-type]
    # a NaN or infinite weight would make every loss value NaN or inf
    for bad in (math.nan, math.inf, -math.inf):
        for make in (WithinClassVariabilityLoss, SimplexGeometryLoss, SelfDualityLoss):
            with pytest.raises(ValueError, match="`weight` to be a finite number"):
                make(3, bad)
        for name in ("nc1", "nc2", "nc3"):
            with pytest.raises(ValueError, match=f"`{name}` to be a finite number"):
                CollapseRegularizer(3, **{name: bad})
    # a flag is not a number: a TypeError, as for any other type
    for make in (WithinClassVariabilityLoss, SimplexGeometryLoss, SelfDualityLoss):
        with pytest.raises(TypeError, match="`weight` to be a real number, but got bool"):
            make(3, True)
    for name in ("nc1", "nc2", "nc3"):
        with pytest.raises(TypeError, match=f"`{name}` to be a real number, but got bool"):
            CollapseRegularizer(3, **{name: True})


# every number argument of the losses' and norms' constructors: (build, argument name)
NUMBER_ARGUMENTS: list[tuple[Callable[[object], nn.Module], str]] = [
    (lambda v: CollapseRegularizer(3, nc1=v), "nc1"),
    (lambda v: CollapseRegularizer(3, nc2=v), "nc2"),
    (lambda v: CollapseRegularizer(3, nc3=v), "nc3"),
    (lambda v: CollapseRegularizer(3, target_nc1=v), "target_nc1"),
    (lambda v: CollapseRegularizer(3, nc1_form="ratio", target_nc1=v), "target_nc1"),
    (lambda v: WithinClassVariabilityLoss(3, v), "weight"),  # type: ignore[arg-type]
    (
        lambda v: WithinClassVariabilityLoss(3, form="running", in_features=2, momentum=v),  # type: ignore[arg-type]
        "momentum",
    ),
    (lambda v: SimplexGeometryLoss(3, v), "weight"),  # type: ignore[arg-type]
    (lambda v: SelfDualityLoss(3, v), "weight"),  # type: ignore[arg-type]
    (lambda v: DotRegressionLoss(reweight_power=v), "reweight_power"),  # type: ignore[arg-type]
    (lambda v: DotRegressionLoss(eps=v), "eps"),  # type: ignore[arg-type]
    (lambda v: BalancedSoftmaxLoss([3, 1, 2], tau=v), "tau"),  # type: ignore[arg-type]
    (lambda v: BalancedSoftmaxLoss([3, 1, 2], label_smoothing=v), "label_smoothing"),  # type: ignore[arg-type]
    (lambda v: RescaledMSELoss(k=v), "k"),  # type: ignore[arg-type]
    (lambda v: RescaledMSELoss(m=v), "m"),  # type: ignore[arg-type]
    (lambda v: FeatureNorm(v), "scale"),  # type: ignore[arg-type]
    (lambda v: FeatureNorm(eps=v), "eps"),  # type: ignore[arg-type]
    (lambda v: FeatureCenter(3, momentum=v), "momentum"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("build", "name"), NUMBER_ARGUMENTS)
@pytest.mark.parametrize("bad", ["0.5", None, True, np.bool_(False), 1 + 0j, [0.5]])
def test_number_arguments_refuse_non_numbers_naming_the_argument(
    build: Callable[[object], nn.Module], name: str, bad: object
) -> None:
    # strings, None, bools (a flag is not a number), complex numbers and lists: a TypeError (a
    # wrong type, as torch's nn.Linear("2", 3)) that names the argument and the type received,
    # not a comparison's TypeError nor a bool read as 1
    if bad is None and name in ("target_nc1", "momentum"):
        return  # None is valid there: no target, a cumulative average
    message = rf"Expected argument `{name}` to be a real number, but got {type(bad).__name__}\."
    with pytest.raises(TypeError, match=message):
        build(bad)


@pytest.mark.parametrize(("build", "name"), NUMBER_ARGUMENTS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, np.float32(-math.inf), torch.tensor(math.nan)])
def test_number_arguments_refuse_non_finite_numbers_naming_the_argument(
    build: Callable[[object], nn.Module], name: str, bad: object
) -> None:
    # a number of the right type but a wrong value: a ValueError that names the argument
    with pytest.raises(ValueError, match=rf"Expected argument `{name}` to be .*, but got"):
        build(bad)


@pytest.mark.parametrize(("build", "name"), NUMBER_ARGUMENTS)
def test_number_arguments_read_any_real_scalar_as_a_python_float(
    build: Callable[[object], nn.Module], name: str
) -> None:
    # 0.5 is valid for every argument above; numpy and 0-dim tensor scalars build the same module
    expected = repr(build(0.5))
    for scalar in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5, dtype=torch.float64)):
        module = build(scalar)
        assert repr(module) == expected, (name, type(scalar))
        if name == "eps":  # not in the repr
            assert type(module.eps) is float, type(scalar)
            assert module.eps == 0.5


def test_documented_loss_errors() -> None:
    features, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="`frame` to have 3 columns"):
        DotRegressionLoss()(features, target, torch.randn(3, 4))
    with pytest.raises(ValueError, match="`class_counts` to have 3 entries"):
        DotRegressionLoss(class_counts=[1, 2])(features, target, torch.randn(3, 3))
    with pytest.raises(ValueError, match="`class_counts` to be None"):
        DotRegressionLoss(class_counts="global")  # type: ignore[arg-type]
    for counts in ([1, -2, 3], [1, math.nan, 3], [1, math.inf, 3]):
        with pytest.raises(ValueError, match="non-negative, finite counts"):
            DotRegressionLoss(class_counts=counts)
    for eps in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="`eps` to be positive"):
            DotRegressionLoss(eps=eps)
    with pytest.raises(ValueError, match="`reduction`"):
        DotRegressionLoss(reduction="avg")  # type: ignore[arg-type]
    for counts in ([3, 0, 2], [3, math.inf, 2], [3, math.nan, 2]):
        with pytest.raises(ValueError, match="at least two positive, finite counts"):
            BalancedSoftmaxLoss(counts)
    with pytest.raises(ValueError, match="`tau` to be finite"):
        BalancedSoftmaxLoss([3, 1, 2], tau=math.inf)
    with pytest.raises(ValueError, match="`logits` to have 3 columns"):
        BalancedSoftmaxLoss([3, 1, 2])(torch.randn(4, 4), target)
    with pytest.raises(ValueError, match="`reduction`"):
        BalancedSoftmaxLoss([3, 1, 2], reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`label_smoothing` to be in"):
        BalancedSoftmaxLoss([3, 1, 2], label_smoothing=1.5)
    for index in (True, np.bool_(False), 1.0, "1", torch.tensor([1, 2]), None):
        with pytest.raises(TypeError, match="`ignore_index` to be an integer"):
            BalancedSoftmaxLoss([3, 1, 2], ignore_index=index)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`logits` to have 2 columns"):  # before the labels
        BalancedSoftmaxLoss([3, 1])(torch.randn(4, 3), target)
    for k in (0.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="`k` to be a positive finite number"):
            RescaledMSELoss(k=k)
    with pytest.raises(ValueError, match="`m` to be a finite number"):
        RescaledMSELoss(m=math.nan)
    with pytest.raises(TypeError, match="`num_classes` to be an integer, but got bool"):
        CollapseRegularizer(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`target_nc1` to be in"):
        CollapseRegularizer(3, nc1_form="ratio", target_nc1=math.inf)
    with pytest.raises(ValueError, match="`reduction`"):
        RescaledMSELoss(reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels in \[0, 2\]"):
        RescaledMSELoss()(features, torch.tensor([0, 1, 5, 0]))
    with pytest.raises(ValueError, match="`logits` to be a 2-D tensor"):
        RescaledMSELoss()(torch.randn(4), target)
    with pytest.raises(ValueError, match="`logits` and `target` to have the same number"):
        BalancedSoftmaxLoss([3, 1, 2])(torch.randn(3, 3), target)


# ----------------------------------------------------------------------------------------------
# the closed-form implementations against autograd, labels, evaluation mode


def composable(
    features: Tensor, target: Tensor, k: int, weight: Tensor, config: dict[str, object]
) -> Tensor:
    """The same total from the composable functions, differentiated by autograd."""
    stats = batch_class_statistics(features, target, k)
    total = features.new_zeros(())
    if config.get("nc1"):
        nc1 = within_class_variability(stats, config.get("form", "bounded"))  # type: ignore[arg-type]
        level = config.get("target_nc1")
        if level is not None:
            mode = config.get("target_mode", "squared")
            penalty = target_penalty(nc1, level, mode)  # type: ignore[arg-type]
            nc1 = torch.where(stats.valid, penalty, nc1)
        total = total + config["nc1"] * nc1  # type: ignore[operator]
    if config.get("nc2"):
        total = total + config["nc2"] * simplex_geometry_of_means(stats)  # type: ignore[operator]
    if config.get("nc3"):
        total = total + config["nc3"] * self_duality_distance(weight, stats)  # type: ignore[operator]
    return total


CONFIGS: dict[str, dict[str, object]] = {
    "bounded": {"nc1": 0.7},
    "ratio": {"nc1": -0.3, "form": "ratio"},
    "nc2": {"nc2": 1.3},
    "nc3": {"nc3": 0.9},
    "all, squared target": {"nc1": 1.0, "nc2": 0.5, "nc3": -0.5, "target_nc1": 0.1},
    "all, at most": {
        "nc1": 1.0,
        "nc2": 0.5,
        "nc3": 0.5,
        "target_nc1": 0.05,
        "target_mode": "at_most",
    },
    "ratio, at least": {
        "nc1": 1.0,
        "form": "ratio",
        "nc3": 2.0,
        "target_nc1": 50.0,
        "target_mode": "at_least",
    },
}
SHAPES = {
    "plain": (30, 5, 6, {}),
    "absent classes": (30, 5, 6, {"absent": (1, 4)}),
    "single-sample classes": (30, 5, 6, {"absent": (0,), "singletons": (2, 5)}),
    "more classes than dimensions": (40, 4, 9, {"absent": (3,)}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_closed_form_gradients_equal_autograd_of_the_composable_functions(
    shape: str, compute_path: str
) -> None:
    """Values and gradients (features and classifier) of every term and combination equal those
    of the composable functions (``batch_class_statistics`` and friends) under autograd."""
    n, d, k, kwargs = SHAPES[shape]
    features, target = make_batch(n, d, k, seed=50, **kwargs)  # type: ignore[arg-type]
    weight = torch.randn(k, d, dtype=torch.float64, generator=torch.Generator().manual_seed(51))
    for name, config in CONFIGS.items():
        h1, w1 = features.clone().requires_grad_(), weight.clone().requires_grad_()
        reg = CollapseRegularizer(
            k,
            nc1=float(config.get("nc1", 0.0)),  # type: ignore[arg-type]
            nc2=float(config.get("nc2", 0.0)),  # type: ignore[arg-type]
            nc3=float(config.get("nc3", 0.0)),  # type: ignore[arg-type]
            nc1_form=config.get("form", "bounded"),  # type: ignore[arg-type]
            target_nc1=config.get("target_nc1"),  # type: ignore[arg-type]
            target_mode=config.get("target_mode", "squared"),  # type: ignore[arg-type]
        )
        value = reg(h1, target, w1)
        grads = torch.autograd.grad(value, [h1, w1], allow_unused=True)
        h2, w2 = features.clone().requires_grad_(), weight.clone().requires_grad_()
        expected = composable(h2, target, k, w2, config)
        expected_grads = torch.autograd.grad(expected, [h2, w2], allow_unused=True)
        where = f"{shape}, {name}, {compute_path}"
        torch.testing.assert_close(value, expected, rtol=RTOL64, atol=1e-13, msg=where)
        torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-9, atol=1e-13, msg=where)
        if config.get("nc3"):
            torch.testing.assert_close(
                grads[1], expected_grads[1], rtol=1e-9, atol=1e-13, msg=where
            )
    # the classifier's geometry, with a mask of the rows that take part
    present = torch.arange(k) % 3 != 1
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    value = simplex_gram_distance(w1, present)
    expected = ref_gram_distance(weight.numpy()[present.numpy()])
    assert value.item() == pytest.approx(expected, rel=RTOL64)
    (grad,) = torch.autograd.grad(value, w1)
    (expected_grad,) = torch.autograd.grad(gram_distance_by_autograd(w2, present), w2)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)


def gram_distance_by_autograd(vectors: Tensor, present: Tensor) -> Tensor:
    """``||G / ||G||_F - E||_F^2`` of the masked rows with the K x K Gram, by autograd."""
    rows = vectors[present]
    k = rows.shape[0]
    gram = rows @ rows.T
    etf = (torch.eye(k, dtype=rows.dtype) - 1.0 / k) / math.sqrt(k - 1)
    return (gram / gram.pow(2).sum().sqrt() - etf).pow(2).sum()


def label_cases(k: int, d: int) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    weight = torch.randn(k, d)
    running = WithinClassVariabilityLoss(k, form="running", in_features=d)
    return {
        "bounded": lambda f, y: WithinClassVariabilityLoss(k)(f, y),
        "running, training": lambda f, y: running.train()(f, y),
        "running, evaluation": lambda f, y: running.eval()(f, y),
        "nc2": lambda f, y: SimplexGeometryLoss(k)(f, y),
        "nc3": lambda f, y: SelfDualityLoss(k)(f, y, weight),
        "collapse": lambda f, y: CollapseRegularizer(k, nc1=1.0, nc2=1.0, nc3=1.0)(f, y, weight),
        "dot regression, batch counts": lambda f, y: DotRegressionLoss(class_counts="batch")(
            f, y, weight
        ),
        "dot regression, per sample": lambda f, y: DotRegressionLoss(reduction="none")(
            f, y, weight
        ),
    }


def test_label_check_outside_torch_func_does_not_walk_the_transform_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the check runs on every labelled call: without a torch.func transform one cheap flag
    # answers; the interpreter stack is walked only under a transform (vmap: tested with the
    # per-sample gradients of the heads)
    import torchcollapse._labels as labels

    class NoStack:
        def get_interpreter_stack(self) -> None:
            raise AssertionError("walked the functorch interpreter stack outside torch.func")

    monkeypatch.setattr(labels, "_functorch", NoStack())
    with pytest.raises(ValueError, match=r"labels in \[0, 2\], but got labels in \[0, 3\]"):
        labels.check_label_range(torch.tensor([0, 3, 1]), 3)
    assert labels.label_range_error(torch.tensor([0, 2, 1]), 3) is None


@pytest.mark.parametrize("path", ["one-hot", "index"])
def test_labels_out_of_range_raise_the_documented_error(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the range check rides on the indexing by the labels: the same ValueError as an
    up-front check, before any running buffer changes; unvalidated, bad labels still raise."""
    if path == "index":
        monkeypatch.setattr(fused, "ONEHOT_MAX", 0)
    features = torch.randn(6, 3)
    for labels, seen in (([0, 1, 3, 0, 2, 1], "[0, 3]"), ([0, -1, 2, 0, 2, 1], "[-1, 2]")):
        target = torch.tensor(labels)
        message = rf"`target` to hold labels in \[0, 2\], but got labels in {re.escape(seen)}"
        for call in label_cases(3, 3).values():
            with pytest.raises(ValueError, match=message):
                call(features, target)
    running = WithinClassVariabilityLoss(3, form="running", in_features=3)
    running(features, torch.tensor([0, 1, 2, 0, 1, 2]))
    before = (running.running_mean.clone(), running.class_batches.clone())
    with pytest.raises(ValueError, match="labels in"):
        running(features, torch.tensor([0, 1, 2, 0, 1, 5]))
    assert torch.equal(running.running_mean, before[0])
    assert torch.equal(running.class_batches, before[1])
    unvalidated = (
        WithinClassVariabilityLoss(3, validate_args=False),
        CollapseRegularizer(3, nc1=1.0, nc2=1.0, validate_args=False),
    )
    for reg in unvalidated:
        with pytest.raises((IndexError, RuntimeError)):  # never a silent value
            reg(features, torch.tensor([0, 1, 3, 0, 2, 1]))


def test_evaluation_without_autograd_gives_the_same_values(compute_path: str) -> None:
    features, target = make_batch(24, 5, 4, seed=60, absent=(2,))
    weight = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(61))
    cases: dict[str, Callable[[Tensor], Tensor]] = {
        "collapse": lambda f: CollapseRegularizer(4, nc1=1.0, nc2=1.0, nc3=1.0)(f, target, weight),
        "nc2 classifier": lambda f: SimplexGeometryLoss(4)(classifier=weight) + 0 * f.sum(),
        "running": lambda f: (
            WithinClassVariabilityLoss(4, form="running", in_features=5).double().eval()(f, target)
        ),
        "dot regression": lambda f: DotRegressionLoss(class_counts="batch")(f, target, weight),
    }
    for name, call in cases.items():
        with_grad = call(features.clone().requires_grad_())
        with torch.no_grad():
            without = call(features.clone().requires_grad_())
        assert without.grad_fn is None, name
        assert without.dtype == torch.float64, name
        torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0, msg=name)


def test_many_classes_int32_labels_and_strided_features(compute_path: str) -> None:
    """More than 256 classes (counted with a reduction rather than on the host), 32-bit labels
    and features that are a transposed view."""
    k, d = 300, 3
    features, target = make_batch(40, d, k, seed=70)
    strided = features.T.contiguous().T  # same values, column-major
    assert not strided.is_contiguous()
    labels = target.to(torch.int32)
    h, y = features.numpy(), target.numpy()
    assert WithinClassVariabilityLoss(k)(strided, labels).item() == pytest.approx(
        ref_nc1(h, y, k, "bounded"), rel=RTOL64
    )
    _, _, _, centred = ref_traces(h, y, k)
    assert SimplexGeometryLoss(k)(strided, labels).item() == pytest.approx(
        ref_gram_distance(centred), rel=RTOL64
    )
    frame = torch.randn(k, d, dtype=torch.float64, generator=torch.Generator().manual_seed(71))
    counts = np.bincount(y, minlength=k).astype(np.float64)
    loss = DotRegressionLoss(class_counts="batch")(strided, labels, frame)
    expected, _ = ref_dot_regression(h, y, frame.numpy(), counts)
    assert loss.item() == pytest.approx(expected, rel=RTOL64)
    running = WithinClassVariabilityLoss(k, form="running", in_features=d, momentum=0.5).double()
    running(strided, labels)
    for c in np.unique(y):
        np.testing.assert_allclose(running.running_mean[c].numpy(), h[y == c].mean(0), rtol=1e-12)


def test_large_batches_hand_their_gradients_to_autograd(compute_path: str) -> None:
    """At ``N d >= HANDOFF_MIN`` the closed-form gradients go through one custom node: values and
    gradients still match autograd of the composable functions and the loops, scale with the
    incoming gradient and survive a retained graph's second backward pass."""
    n, d, k = 1200, 32, 6
    assert n * d >= fused.HANDOFF_MIN
    features, target = make_batch(n, d, k, seed=80, absent=(4,))
    weight = torch.randn(k, d, dtype=torch.float64, generator=torch.Generator().manual_seed(81))
    config: dict[str, object] = {"nc1": 1.0, "nc2": 0.5, "nc3": 0.5}
    h1, w1 = features.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = CollapseRegularizer(k, nc1=1.0, nc2=0.5, nc3=0.5)(h1, target, w1)
    (3.0 * loss).backward(retain_graph=True)  # an incoming gradient of 3
    h2, w2 = features.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = composable(h2, target, k, w2, config)
    (3.0 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=RTOL64, atol=1e-13)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-13)
    loss.backward()  # the retained graph again, incoming gradient 1: 3 + 1 = 4 times
    torch.testing.assert_close(h1.grad, 4.0 / 3.0 * h2.grad, rtol=1e-9, atol=1e-13)
    # running means: the first batch's loss is the within-class mean squared distance
    h3 = features.clone().requires_grad_()
    running = WithinClassVariabilityLoss(k, form="running", in_features=d).double()
    value = running(h3, target)
    value.backward()
    x, y = features.numpy(), target.numpy()
    means = np.stack([x[y == c].mean(0) if (y == c).any() else np.zeros(d) for c in range(k)])
    assert value.item() == pytest.approx(np.mean(np.sum((x - means[y]) ** 2, 1)), rel=RTOL64)
    np.testing.assert_allclose(h3.grad.numpy(), 2.0 * (x - means[y]) / n, rtol=1e-9, atol=1e-14)
    # dot regression with batch counts and a frame that requires a gradient (it gets none)
    h4, frame = features.clone().requires_grad_(), weight.clone().requires_grad_()
    dot = DotRegressionLoss(class_counts="batch")(h4, target, frame)
    dot.backward()
    counts = np.bincount(y, minlength=k).astype(np.float64)
    expected_dot, grad_h = ref_dot_regression(x, y, weight.numpy(), counts)
    assert dot.item() == pytest.approx(expected_dot, rel=RTOL64)
    np.testing.assert_allclose(h4.grad.numpy(), grad_h, rtol=1e-9, atol=1e-14)
    assert frame.grad is None


def test_handed_off_gradient_is_shared_with_a_retained_graph() -> None:
    """Documented in ``_HandOff``: for large inputs the gradient ``torch.autograd.grad`` returns
    is the tensor the graph keeps, so an in-place edit makes a second backward through the
    retained graph raise; editing a clone leaves the second gradient equal to the first."""
    n, d, k = 1024, 64, 10
    assert n * d >= fused.HANDOFF_MIN
    features, target = make_batch(n, d, k, seed=int(torch.randint(0, 10_000, ())))
    h = features.clone().requires_grad_()
    value = CollapseRegularizer(k, nc1=1.0, nc2=1.0)(h, target)
    (first,) = torch.autograd.grad(value, h, retain_graph=True)
    masked = first.clone()  # the safe way: edit a copy
    masked[: n // 2] = 0.0
    (second,) = torch.autograd.grad(value, h, retain_graph=True)
    assert torch.equal(second, first)
    assert first[: n // 2].abs().max() > 0
    first.mul_(0.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(value, h)


def test_tensor_path_reads_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path of accelerators and ``torch.compile`` never synchronises: no value is read."""
    monkeypatch.setattr(fused, "_is_compiling", lambda: True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a value was read on the host")

    features, target = make_batch(20, 4, 5, seed=90, absent=(3,))
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    modules: dict[str, Callable[[Tensor], Tensor]] = {
        "collapse": lambda f: CollapseRegularizer(5, nc1=1.0, nc2=1.0, nc3=1.0, target_nc1=0.1)(
            f, target, weight
        ),
        "running": lambda f: WithinClassVariabilityLoss(5, form="running", in_features=4).double()(
            f, target
        ),
        "dot regression": lambda f: DotRegressionLoss(class_counts="batch")(f, target, weight),
        "nc2 classifier": lambda f: SimplexGeometryLoss(5)(classifier=weight) + 0 * f.sum(),
    }
    for name, call in modules.items():
        expected = call(features.clone().requires_grad_()).item()  # allowed: the test's own read
        with monkeypatch.context() as patch:
            patch.setattr(Tensor, "item", refuse)
            patch.setattr(Tensor, "tolist", refuse)
            patch.setattr(Tensor, "__float__", refuse)
            patch.setattr(Tensor, "__int__", refuse)
            patch.setattr(Tensor, "__bool__", refuse)
            value = call(features.clone().requires_grad_())
            value.backward()
        assert value.item() == pytest.approx(expected, rel=RTOL64), name


@pytest.mark.parametrize("mode", ["squared", "at_most", "at_least"])
def test_target_modes_agree_on_host_and_tensor_paths_in_float64(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The accelerator path computes the scalar maths on 0-dim tensors; in float64 it must keep
    # float64 throughout (a float32 step of a hinge would round the weight to ~1e-8).
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = make_batch(60, 6, 4, seed=seed, spread=0.3)
    weight = 0.1 + 0.8 * torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
    level = 0.5 if mode == "at_least" else 0.0  # a hinge that is active
    regularizer = CollapseRegularizer(4, nc1=weight, target_nc1=level, target_mode=mode)
    results = []
    for tensor_path in (False, True):
        with monkeypatch.context() as patch:
            if tensor_path:
                patch.setattr(fused, "_is_compiling", lambda: True)
            h = features.clone().requires_grad_()
            value = regularizer(h, target)
            value.backward()
        assert h.grad is not None
        results.append((value.detach(), h.grad))
    (host_value, host_grad), (tensor_value, tensor_grad) = results
    assert host_grad.abs().max() > 0, f"seed {seed}"
    message = f"seed {seed}, {mode}"
    torch.testing.assert_close(tensor_value, host_value, rtol=1e-13, atol=0, msg=message)
    torch.testing.assert_close(tensor_grad, host_grad, rtol=1e-12, atol=1e-15, msg=message)


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1e6, 1e12])
@pytest.mark.parametrize("shape", [(6, 10), (9, 4)])  # K <= d and K > d (the d x d Gram)
def test_classifier_simplex_geometry_does_not_overflow_at_extreme_weight_scales(
    scale: float, shape: tuple[int, int], compute_path: str
) -> None:
    # NC2 of a classifier is invariant to the weight's scale; in float32 ||W W^T||_F grows with
    # its fourth power and must not overflow or underflow on the way.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    vectors = torch.randn(
        *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    loss = SimplexGeometryLoss(shape[0], weight=0.7)
    results = []
    for dtype in (torch.float64, torch.float32):
        weight = (vectors * scale).to(dtype).requires_grad_()
        value = loss(classifier=weight)
        value.backward()
        assert weight.grad is not None
        results.append((value.detach().double(), weight.grad.double() * scale))
    (exact, exact_grad), (value, grad) = results
    message = f"seed {seed}, scale {scale:g}, {compute_path}"
    assert float(exact) == pytest.approx(0.7 * ref_gram_distance(vectors.numpy()), rel=1e-9)
    torch.testing.assert_close(value, exact, rtol=1e-4, atol=0, msg=message)
    torch.testing.assert_close(
        grad, exact_grad, rtol=1e-3, atol=1e-4 * float(exact_grad.abs().max()), msg=message
    )


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1e6, 1e12])
def test_collapse_terms_do_not_overflow_at_extreme_feature_scales(
    scale: float, compute_path: str
) -> None:
    # Every term is invariant to the features' scale; in float32, ||M M^T||_F grows with its
    # fourth power and must not overflow or underflow on the way.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = make_batch(96, 8, 6, seed=seed % 10_000, spread=0.8)
    regularizer = CollapseRegularizer(6, nc1=0.5, nc2=1.0)
    results = []
    for dtype in (torch.float64, torch.float32):
        h = (features * scale).to(dtype).requires_grad_()
        value = regularizer(h, target)
        value.backward()
        assert h.grad is not None
        results.append((value.double(), h.grad.double() * scale))
    (exact, exact_grad), (value, grad) = results
    message = f"seed {seed}, scale {scale:g}, {compute_path}"
    torch.testing.assert_close(value, exact, rtol=1e-4, atol=0, msg=message)
    torch.testing.assert_close(
        grad, exact_grad, rtol=1e-3, atol=1e-4 * float(exact_grad.abs().max()), msg=message
    )


def test_functional_losses_validate_like_their_modules() -> None:

    h, y, frame = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.randn(3, 3)
    with pytest.raises(ValueError, match="`reduction` to be one of"):
        dot_regression_loss(h, y, frame, reduction="Sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`reduction` to be one of"):
        rescaled_mse_loss(h, y, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`k` to be a positive finite number"):
        rescaled_mse_loss(h, y, k=-1.0)
    with pytest.raises(ValueError, match="`reweight_power` to be a finite number"):
        DotRegressionLoss(reweight_power=math.nan)
    with pytest.raises(ValueError, match="`eps` to be positive and finite"):
        DotRegressionLoss(eps=math.inf)
    with pytest.raises(TypeError, match="`logits` to be a tensor"):
        RescaledMSELoss()([[1.0, 2.0]], torch.tensor([0]))  # type: ignore[arg-type]
    # the function checks its arguments as the module does (eps=0 gave NaN on a zero feature,
    # labels out of range a bare IndexError)
    for eps in (0.0, -1e-8, math.nan):
        with pytest.raises(ValueError, match="`eps` to be positive and finite"):
            dot_regression_loss(h, y, frame, eps=eps)
    with pytest.raises(TypeError, match="`eps` to be a real number, but got bool"):
        dot_regression_loss(h, y, frame, eps=True)
    for labels in (torch.tensor([0, 5, 1, 2]), torch.tensor([0, -1, 1, 2])):
        with pytest.raises(ValueError, match=r"`target` to hold labels in \[0, 2\]"):
            dot_regression_loss(h, labels, frame)
    for weight in (torch.ones(2), torch.ones(3, 1)):  # a wrong shape
        with pytest.raises(ValueError, match=r"`class_weight` to be a real .* tensor of 3"):
            dot_regression_loss(h, y, frame, class_weight=weight)
    # a wrong type: not a tensor, or not real
    for weight in (
        torch.ones(3, dtype=torch.bool),
        torch.ones(3, dtype=torch.complex64),
        [1, 1, 1],
    ):
        with pytest.raises(TypeError, match=r"`class_weight` to be a real .* tensor of 3"):
            dot_regression_loss(h, y, frame, class_weight=weight)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`frame` to have 3 columns"):
        dot_regression_loss(h, y, torch.randn(3, 4))
    with pytest.raises(ValueError, match="`frame` to have a 2-D floating-point weight"):
        dot_regression_loss(h, y, torch.randn(3))
    with pytest.raises(ValueError, match="same number of samples"):
        dot_regression_loss(h, y[:3], frame)
    # the rescaled square loss checks shapes as its module does: a (N, 1) or one-hot target
    # broadcast against the logits and gave a wrong number
    for bad in (y[:, None], F.one_hot(y, 3)):
        for loss in (rescaled_mse_loss, RescaledMSELoss()):
            with pytest.raises(ValueError, match="`target` to be a 1-D tensor"):
                loss(h, bad)
    with pytest.raises(ValueError, match=r"`target` to hold labels in \[0, 2\]"):
        rescaled_mse_loss(h, torch.tensor([0, 3, 1, 2]))
    with pytest.raises(ValueError, match="`logits` to be a 2-D tensor"):
        rescaled_mse_loss(h[0], y[:1])
    with pytest.raises(ValueError, match="same number of samples"):
        rescaled_mse_loss(h, y[:3])


def test_a_fake_tensor_call_leaves_no_fake_matrix_for_real_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call under ``FakeTensorMode`` (a memory or FLOP estimate of the training step) must not
    leave a fake one-hot or centring matrix in the process-wide cache: the real calls after it
    use it. Reference: the loop's NC1 of the same batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(fused, "_MATRICES", {})
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = make_batch(14, 5, 7, seed=seed % 10_000)
    reg = CollapseRegularizer(7, nc1=1.0, nc2=0.5)
    with FakeTensorMode(), contextlib.suppress(Exception):  # reading values may fail there
        reg(torch.randn(14, 5, dtype=torch.float64), torch.arange(14) % 7)
    assert all(type(matrix) is torch.Tensor for matrix in fused._MATRICES.values())
    h, y = features.numpy(), target.numpy()
    _, _, _, centred = ref_traces(h, y, 7)
    expected = ref_nc1(h, y, 7, "bounded") + 0.5 * ref_gram_distance(centred)
    assert reg(features, target).item() == pytest.approx(expected, rel=RTOL64), f"seed {seed}"


def test_many_classes_do_not_build_a_class_by_class_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A tiny batch of many classes fits N K d <= 2**18, but the one-hot rows would come from a
    # K x K identity (K = 12,000: 576 MB): such batches take the index path.
    built: list[int] = []
    original = fused._cached_matrix

    def spy(kind: str, size: int, dtype: torch.dtype) -> Tensor:
        built.append(size)
        return original(kind, size, dtype)

    monkeypatch.setattr(fused, "_cached_matrix", spy)
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 12_000, (4,), generator=g)
    value = CollapseRegularizer(12_000, nc1=1.0, nc2=0.5)(h, y)
    value.backward()
    assert all(size <= 256 for size in built), f"seed {seed}: {built}"
    monkeypatch.setattr(fused, "ONEHOT_MAX", 0)  # the index path everywhere: the same result
    h2 = h.detach().clone().requires_grad_()
    CollapseRegularizer(12_000, nc1=1.0, nc2=0.5)(h2, y).backward()
    assert h.grad is not None
    assert h2.grad is not None
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-12, atol=1e-14, msg=f"seed {seed}")


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_composable_simplex_geometry_holds_at_extreme_scales_in_float32(scale: float) -> None:
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = make_batch(60, 6, 5, seed=seed % 10_000, spread=0.5)
    values = []
    for dtype in (torch.float64, torch.float32):
        stats = batch_class_statistics((features * scale).to(dtype), target, 5)
        values.append(float(simplex_geometry_of_means(stats)))
    assert values[1] == pytest.approx(values[0], rel=1e-4), f"seed {seed}"


def test_composable_terms_refuse_double_backward() -> None:
    # Closed-form gradients are first order: a gradient penalty through them must fail loudly
    # rather than drop their second-order terms.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = make_batch(24, 4, 3, seed=seed % 10_000)
    h = features.clone().requires_grad_()
    nc1 = within_class_variability(batch_class_statistics(h, target, 3))
    (grad,) = torch.autograd.grad(nc1, h, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.square().sum().backward()


@pytest.mark.parametrize("n", [24, 4096])  # the inner-product hand-off and the custom node
def test_fused_terms_refuse_create_graph(n: int, compute_path: str) -> None:
    # A gradient penalty or MAML step through closed-form gradients would silently miss their
    # second-order terms: the backward with create_graph=True raises instead, and a plain
    # backward (also retain_graph twice) still works. (The running-means NC1 of small CPU
    # batches is plain autograd, exact to any order, and does not raise.)
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = make_batch(n, 8, 3, seed=seed % 10_000)
    net = nn.Linear(8, 8).double()
    frame = torch.eye(3, 8, dtype=torch.float64)
    terms = {
        "regularizer": lambda h: CollapseRegularizer(3, nc1=1.0, nc2=0.5)(h, target),
        "dot": lambda h: DotRegressionLoss()(h, target, frame),
        # per-sample losses, reduced by the caller (the imbalance recipe's use)
        "dot per sample": lambda h: DotRegressionLoss(reduction="none")(h, target, frame).mean(),
        "dot function per sample": lambda h: dot_regression_loss(
            h, target, frame, reduction="none"
        ).sum(),
    }
    for name, term in terms.items():
        with pytest.raises(RuntimeError, match="first-order only"):
            torch.autograd.grad(term(net(features)), list(net.parameters()), create_graph=True)
        value = term(net(features))
        value.backward(retain_graph=True)
        value.backward()
        assert net.weight.grad is not None, name
        net.zero_grad()


def test_number_arguments_accept_numpy_scalars_and_nan_features_give_nan_gradients(
    compute_path: str,
) -> None:
    assert RescaledMSELoss(k=np.float32(2.0), m=np.int64(3)).k == 2.0
    assert DotRegressionLoss(eps=torch.tensor(1e-6)).eps == pytest.approx(1e-6)
    # a NaN feature is a NaN loss *and* NaN gradients (GradScaler reads the gradients), also on
    # the capped ratio form
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = make_batch(30, 4, 3, seed=seed % 10_000)
    features[0, 0] = math.nan
    for extra in ({}, {"target_nc1": 0.5}):
        h = features.clone().requires_grad_()
        CollapseRegularizer(3, nc1=1.0, nc1_form="ratio", **extra)(h, target).backward()  # type: ignore[arg-type]
        assert h.grad is not None
        assert torch.isnan(h.grad).any(), f"seed {seed}, {extra}"


def test_torch_func_grad_through_the_regularizer_matches_autograd() -> None:
    # torch.func.grad runs its first-order backward with grad mode on; the create_graph check
    # must let it through (small CPU batches: the inner-product hand-off works under torch.func)
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = make_batch(30, 5, 3, seed=seed % 10_000)
    regularizer = CollapseRegularizer(3, nc1=1.0, nc2=0.5)
    got = torch.func.grad(lambda h: regularizer(h, target))(features)
    h = features.clone().requires_grad_()
    regularizer(h, target).backward()
    assert h.grad is not None
    torch.testing.assert_close(got, h.grad, rtol=1e-12, atol=1e-14, msg=f"seed {seed}")


def test_number_reading_refuses_bools_complex_and_overflow_and_keeps_data_after_to_empty() -> None:
    from decimal import Decimal

    from torchcollapse._numbers import as_finite_float
    from torchcollapse.losses.rescaled_mse import rescaled_mse_loss

    accepted = [(2, 2.0), (np.float32(1.5), 1.5), (torch.tensor([2.0]), 2.0), (Decimal("2"), 2.0)]
    for value, expected in accepted:
        assert as_finite_float(value) == expected, repr(value)
    refused = [True, np.True_, torch.tensor(True), np.complex128(1 + 2j), 1 + 0j, b"1", "1"]
    refused += [bytearray(b"1.5"), 10**400, math.nan, -math.inf, None, [1.0]]
    for value in refused:
        assert as_finite_float(value) is None, repr(value)
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(seed))
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(
        rescaled_mse_loss(logits, target, k=Decimal("2"), m=np.int64(3)),
        rescaled_mse_loss(logits, target, k=2.0, m=3.0),
    )
    # the counts are data of the constructor: to_empty() keeps them
    loss = DotRegressionLoss(class_counts=[10.0, 20.0, 30.0]).to_empty(device="cpu")
    assert loss.class_counts is not None
    assert loss.class_counts.tolist() == [10.0, 20.0, 30.0]


def test_losses_and_norms_run_on_the_meta_device() -> None:
    """Built and called inside ``with torch.device("meta")`` (shape inference, deferred
    initialisation): every loss and norm gives a meta result of the right shape (asking whether
    autocast is on raised on meta), and ``DotRegressionLoss``'s counts, on the default device
    like any buffer (or on the ``device`` given), come back after ``to_empty()``."""
    counts = torch.randint(1, 100, (4,)).tolist()
    with torch.device("meta"):
        features, target = torch.randn(8, 3), torch.arange(8) % 4
        frame, logits = torch.randn(4, 3), torch.randn(8, 4)
        dot = DotRegressionLoss(class_counts=counts)
        assert dot.class_counts is not None
        assert dot.class_counts.is_meta
        outputs = {
            "dot regression": dot(features, target, frame),
            "rescaled mse": RescaledMSELoss()(logits, target),
            "balanced softmax": BalancedSoftmaxLoss(counts)(logits, target),
            "collapse": CollapseRegularizer(4, nc1=1.0, nc2=1.0, nc3=1.0)(features, target, frame),
            "running": WithinClassVariabilityLoss(4, form="running", in_features=3)(
                features, target
            ),
            "feature norm": FeatureNorm()(features),
            "feature center": FeatureCenter(3)(features),
        }
    for name, out in outputs.items():
        assert out.is_meta, name
        assert out.shape == (features.shape if name.startswith("feature") else ()), name
        on_cpu = DotRegressionLoss(class_counts=counts, device="cpu")  # an explicit device wins
    dot.to_empty(device="cpu")
    for built in (dot, on_cpu):
        assert built.class_counts is not None
        assert built.class_counts.device.type == "cpu"
        assert built.class_counts.tolist() == [float(c) for c in counts]
        assert built.class_counts.dtype == torch.float32
    # the explicit device gives the same loss as the default one (reference: the default build)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    h, y, m = torch.randn(8, 3, generator=g), torch.arange(8) % 4, torch.randn(4, 3, generator=g)
    expected = DotRegressionLoss(class_counts=counts)(h, y, m)
    assert torch.equal(on_cpu(h, y, m), expected)


def test_num_classes_may_be_any_integer_but_not_a_bool() -> None:
    """As ``nn.Linear`` takes numpy integers for its sizes: ``num_classes`` of the regularizers,
    the metrics and the statistics is read as a Python int from any integer (numpy's, a 0-dim
    tensor), giving the same values as the int; bools and floats are refused by name."""
    from torchcollapse.heads import cross_entropy_floor, scale_for_loss_floor
    from torchcollapse.metrics import NeuralCollapse
    from torchcollapse.stats import ClassStatistics
    from torchcollapse.tracking import CollapseTracker

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    features, target = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.arange(12) % 4
    builders: dict[str, Callable[[Any], Any]] = {
        "regularizer": lambda k: CollapseRegularizer(k, nc1=1.0, nc2=1.0)(features, target),
        "nc1": lambda k: WithinClassVariabilityLoss(k)(features, target),
        "nc2": lambda k: SimplexGeometryLoss(k)(features, target),
        "metric": lambda k: NeuralCollapse(k).forward(features, target)["nc1"],
        "statistics": lambda k: ClassStatistics.from_features(features, target, k).counts,
    }
    for name, build in builders.items():
        expected = build(4)
        for k in (np.int64(4), np.int32(4), torch.tensor(4)):
            assert torch.equal(build(k), expected), f"{name}: {type(k).__name__}"
    stored = [
        CollapseRegularizer(np.int64(4)).num_classes,
        WithinClassVariabilityLoss(np.int64(4)).num_classes,
        NeuralCollapse(np.int64(4)).num_classes,
        ClassStatistics.zeros(np.int64(4), 3).num_classes,
    ]
    with CollapseTracker(nn.Sequential(nn.Linear(3, 3)), ["0"], np.int64(4)) as tracker:
        stored.append(tracker.num_classes)
    assert all(type(k) is int and k == 4 for k in stored), stored
    assert cross_entropy_floor(10.0, np.int64(4)) == cross_entropy_floor(10.0, 4)
    assert scale_for_loss_floor(0.1, torch.tensor(4)) == scale_for_loss_floor(0.1, 4)
    for build in builders.values():
        for bad in (True, 4.0, "4"):  # not integers: a TypeError, as nn.Linear's sizes
            with pytest.raises(TypeError, match="`num_classes` to be an integer"):
                build(bad)
        with pytest.raises(
            ValueError, match=r"`num_classes` to be (a positive integer|at least 2)"
        ):
            build(0)
    # a collapse term or metric compares classes: one class is refused; statistics keep it
    for name in ("regularizer", "nc1", "nc2", "metric"):
        with pytest.raises(ValueError, match="`num_classes` to be at least 2"):
            builders[name](1)
    for term in (SelfDualityLoss, SimplexGeometryLoss):
        with pytest.raises(ValueError, match="`num_classes` to be at least 2, but got 1"):
            term(1)
    assert ClassStatistics.from_features(features, 0 * target, 1).counts.tolist() == [12.0]


def test_running_form_in_features_may_be_any_integer_but_not_a_bool() -> None:
    """``in_features`` of the running form is read as ``num_classes`` is: numpy integers and
    0-dim tensors give the same buffers and values as the int; bools and other types raise a
    TypeError naming the type, integers below 1 a ValueError with the value."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    features, target = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.arange(12) % 4
    expected_loss = WithinClassVariabilityLoss(4, form="running", in_features=3).double()
    expected = expected_loss(features, target)
    for size in (np.int64(3), np.int32(3), torch.tensor(3)):
        loss = WithinClassVariabilityLoss(4, form="running", in_features=size).double()  # type: ignore[arg-type]
        assert type(loss.in_features) is int, type(size)
        assert torch.equal(loss(features, target), expected), type(size)
        assert torch.equal(loss.running_mean, expected_loss.running_mean), type(size)
    for bad in (True, np.bool_(True), torch.tensor(True), 3.0, "3"):
        with pytest.raises(TypeError, match="`in_features` to be an integer when `form='running'`"):
            WithinClassVariabilityLoss(4, form="running", in_features=bad)  # type: ignore[arg-type]
    for bad in (0, np.int64(-1), torch.tensor(0)):
        message = (
            f"`in_features` to be a positive integer when `form='running'`, but got {int(bad)}\\."
        )
        with pytest.raises(ValueError, match=message):
            WithinClassVariabilityLoss(4, form="running", in_features=bad)  # type: ignore[arg-type]


def test_heads_are_read_through_the_classifier_they_apply(compute_path: str) -> None:
    """A module classifier is read as the metrics read it: its ``effective_weight`` where it has
    one. For a ``CosineHead`` (rows normalised and scaled) NC3, the classifier's NC2 and the
    combined regularizer equal those of ``head.effective_weight`` given as a tensor, with the
    same gradients reaching the head's ``weight`` (through the normalisation) and the features;
    and NC3 equals the float64 loop on the normalised rows."""
    from torchcollapse.heads import CosineHead

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    k, d = 4, 6
    features, target = make_batch(24, d, k, seed=seed % 1000)
    head = CosineHead(d, k, dtype=torch.float64)
    with torch.no_grad():  # rows of unequal norms: normalising them changes NC3
        head.weight.mul_(torch.rand(k, 1, generator=g, dtype=torch.float64) * 3 + 0.2)
    message = f"seed {seed}, {compute_path}"
    terms: dict[str, Callable[[Tensor, Any], Tensor]] = {
        "nc3": lambda h, c: SelfDualityLoss(k)(h, target, c),
        "nc2 classifier": lambda h, c: SimplexGeometryLoss(k)(classifier=c) + 0 * h.sum(),
        "collapse": lambda h, c: CollapseRegularizer(k, nc1=0.5, nc2=0.5, nc3=1.0)(h, target, c),
    }
    for name, term in terms.items():
        results = []
        for as_tensor in (False, True):
            head.zero_grad()
            h = features.clone().requires_grad_()
            value = term(h, head.effective_weight if as_tensor else head)
            value.backward()
            results.append((value.item(), h.grad, head.weight.grad.clone()))
        (v0, h0, w0), (v1, h1, w1) = results
        assert v0 == pytest.approx(v1, rel=RTOL64), f"{name}: {message}"
        torch.testing.assert_close(h0, h1, rtol=RTOL64, atol=0, msg=f"{name}: {message}")
        torch.testing.assert_close(w0, w1, rtol=RTOL64, atol=1e-15, msg=f"{name}: {message}")
    _, _, present, centred = ref_traces(features.numpy(), target.numpy(), k)
    rows = head.effective_weight.detach().numpy()[present]
    nc3 = SelfDualityLoss(k)(features, target, head).item()
    assert nc3 == pytest.approx(ref_self_duality(rows, centred), rel=1e-9), message


def test_an_attribute_error_inside_effective_weight_is_not_taken_for_a_missing_one() -> None:
    """A classifier whose ``effective_weight`` property fails with an ``AttributeError`` (a bug
    in it: an attribute it reads is missing) raises that error from the regularizers and the
    metrics, instead of their silently falling back to the raw ``weight``, which
    ``nn.Module.__getattr__`` would have offered as if the property did not exist. A weight
    stored as a buffer named ``effective_weight`` is read as before (reference: the same
    weight given as a tensor)."""
    from torchcollapse.metrics import NeuralCollapse

    class Broken(nn.Linear):
        @property
        def effective_weight(self) -> Tensor:
            return self.weight * self.missing_scale  # type: ignore[no-any-return]

    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    k, d = 3, 5
    features, target = torch.randn(12, d, generator=g, dtype=torch.float64), torch.arange(12) % k
    broken = Broken(d, k, dtype=torch.float64)
    readers: dict[str, Callable[[Any], Any]] = {
        "nc3": lambda c: SelfDualityLoss(k)(features, target, c),
        "metric": lambda c: NeuralCollapse(k, classifier=c).forward(features, target)["nc3"],
    }
    stored = nn.Linear(d, k, dtype=torch.float64)
    scaled = 2.0 * stored.weight.detach()
    stored.register_buffer("effective_weight", scaled)
    for name, read in readers.items():
        with pytest.raises(AttributeError, match="missing_scale"):
            read(broken)
        assert torch.equal(read(stored), read(scaled)), f"{name}: seed {seed}"


@pytest.mark.parametrize("path", ["onehot", "index"])
def test_float32_regularizers_at_the_edges_of_the_range(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU path, float32 features or classifier rows whose sums of squares leave
    ``[2**-100, 2**100]`` (scales beyond ~1e+-15, where Gram entries and gradient coefficients
    underflowed or overflowed: NC2 came out at -4, NaN, or a crash) are computed in float64 and
    returned in float32. Reference: the same terms of the float64 features at scale 1 (values
    scale-free; gradients scaled by 1/scale), rtol 1e-5 (float32 inputs)."""
    if path == "index":
        monkeypatch.setattr(fused, "ONEHOT_MAX", 0)
    seed = int(torch.randint(0, 2**31, ()))
    k, d = 4, 6
    features, target = make_batch(40, d, k, seed=seed % 1000)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    reg = CollapseRegularizer(k, nc1=0.5, nc2=1.0, nc3=1.0)
    h64 = features.float().double().requires_grad_()
    expected = reg(h64, target, weight.float().double())
    (expected_grad,) = torch.autograd.grad(expected, h64)
    for scale in (2.0**-70, 2.0**-55, 2.0**60):
        h = (features.float() * scale).requires_grad_()
        value = reg(h, target, weight.float())
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(expected.item(), rel=1e-5), f"{scale}, seed {seed}"
        (grad,) = torch.autograd.grad(value, h)
        torch.testing.assert_close(
            grad.double() * scale, expected_grad, rtol=1e-4, atol=1e-6, msg=f"{scale}, {seed}"
        )
    rows = weight.float()
    expected_nc2 = SimplexGeometryLoss(k)(classifier=rows.double()).item()
    expected_nc3 = SelfDualityLoss(k)(features.float(), target, rows.double()).item()
    for scale in (2.0**-85, 2.0**65):
        scaled = rows * scale
        assert SimplexGeometryLoss(k)(classifier=scaled).item() == pytest.approx(
            expected_nc2, rel=1e-5
        ), f"{scale}, seed {seed}"
        nc3 = SelfDualityLoss(k)(features.float(), target, scaled).item()
        assert nc3 == pytest.approx(expected_nc3, rel=1e-5), f"{scale}, seed {seed}"


def test_modules_with_a_process_group_can_be_copied_and_pickled() -> None:
    """Process groups cannot be pickled: a deep copy (an EMA copy of a model) or a pickle
    (``torch.save(model)``) of a module built with a ``process_group`` holds ``None`` (the
    world) instead of failing, and computes what the original computes in one process.
    Reference: the original module's output."""
    import copy
    import pickle

    class Unpicklable:  # stands in for a ProcessGroup
        def __reduce__(self) -> Any:
            raise TypeError("cannot pickle 'ProcessGroup' object")

    group = Unpicklable()
    k, d = 3, 4
    features, target = torch.randn(12, d, dtype=torch.float64), torch.arange(12) % k
    frame = torch.randn(k, d, dtype=torch.float64)
    calls: dict[str, tuple[nn.Module, Callable[[nn.Module], Tensor]]] = {
        "nc1": (WithinClassVariabilityLoss(k, process_group=group), lambda m: m(features, target)),
        "nc2": (SimplexGeometryLoss(k, process_group=group), lambda m: m(features, target)),
        "nc3": (SelfDualityLoss(k, process_group=group), lambda m: m(features, target, frame)),
        "collapse": (
            CollapseRegularizer(k, nc1=1.0, nc2=1.0, process_group=group),
            lambda m: m(features, target),
        ),
        "dot": (DotRegressionLoss(process_group=group), lambda m: m(features, target, frame)),
        "center": (FeatureCenter(d, process_group=group).eval(), lambda m: m(features)),
    }
    for name, (module, call) in calls.items():
        expected = call(module)
        for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            assert copied.process_group is None, name
            assert torch.equal(call(copied), expected), name
        assert module.process_group is group, name  # the original keeps its group


# ----------------------------------------------------------------------------------------------
# argument checks of the composable functions and of the regularizers' constructors


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def test_within_class_variability_function_refuses_unknown_forms() -> None:
    """Any ``form`` other than "bounded" and "ratio" was taken for "ratio" without a word;
    "running" (a form of the module only) gave the unbounded ratio instead of a centre loss."""
    g = fresh_generator()
    features, target = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.arange(12) % 3
    stats = batch_class_statistics(features, target, 3)
    h, y = features.numpy(), target.numpy()
    for form in ("bounded", "ratio"):  # against the loops
        value = within_class_variability(stats, form).item()  # type: ignore[arg-type]
        assert value == pytest.approx(ref_nc1(h, y, 3, form), rel=RTOL64)
    with pytest.raises(ValueError, match=r"'running' is a form of the module .* but got 'running'"):
        within_class_variability(stats, "running")  # type: ignore[arg-type]
    for form in ("Bounded", None, "trace", 1):
        with pytest.raises(
            ValueError, match=rf"`form` to be 'bounded' or 'ratio', but got {form!r}\."
        ):
            within_class_variability(stats, form)  # type: ignore[arg-type]
    for term in (within_class_variability, simplex_geometry_of_means):
        for bad in (features, stats._asdict()):
            with pytest.raises(TypeError, match="`stats` to be the BatchClassStatistics"):
                term(bad)  # type: ignore[arg-type]


def test_batch_class_statistics_checks_its_arguments() -> None:
    """``num_classes`` of a wrong type gave torch's ``zeros()`` error, one too small a bare
    IndexError, integer features were accepted; now named errors, as the regularizers give."""
    g = fresh_generator()
    features, target = torch.randn(9, 4, generator=g), torch.arange(9) % 3
    expected = batch_class_statistics(features.double(), target, 3)
    h, y = features.double().numpy(), target.numpy()
    within, between, _, _ = ref_traces(h, y, 3)
    assert expected.trace_within.item() == pytest.approx(within, rel=RTOL64)
    assert expected.trace_between.item() == pytest.approx(between, rel=RTOL64)
    for k in (np.int64(3), torch.tensor(3)):  # any integer
        same = batch_class_statistics(features.double(), target, k)  # type: ignore[arg-type]
        assert torch.equal(same.trace_within, expected.trace_within)
    for bad in (None, 3.0, True, "3"):
        with pytest.raises(TypeError, match="`num_classes` to be an integer"):
            batch_class_statistics(features, target, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`num_classes` to be a positive integer, but got 0"):
        batch_class_statistics(features, target, 0)
    with pytest.raises(ValueError, match=r"`target` to hold labels in \[0, 1\]"):
        batch_class_statistics(features, target, 2)
    with pytest.raises(TypeError, match="`features` to be a floating-point tensor"):
        batch_class_statistics(features.long(), target, 3)
    with pytest.raises(TypeError, match="`target` to be an integer tensor"):
        batch_class_statistics(features, target.float(), 3)
    with pytest.raises(ValueError, match="`features` to be a 2-D tensor"):
        batch_class_statistics(features[0], target, 3)
    with pytest.raises(
        ValueError, match=r"at least one feature \(column\), but got shape \(9, 0\)"
    ):
        batch_class_statistics(features[:, :0], target, 3)
    with pytest.raises(ValueError, match="same number of samples"):
        batch_class_statistics(features, target[:5], 3)


def test_self_duality_distance_reads_modules_and_checks_the_weight() -> None:
    """The ``nn.Linear`` the module takes gave an AttributeError, a weight of the wrong shape a
    broadcasting error or an IndexError, an integer one was accepted."""
    g = fresh_generator()
    features = torch.randn(12, 4, generator=g, dtype=torch.float64)
    target = torch.arange(12) % 3
    stats = batch_class_statistics(features, target, 3)
    head = nn.Linear(4, 3, bias=False).double()
    _, _, _, centred = ref_traces(features.numpy(), target.numpy(), 3)
    expected = ref_self_duality(head.weight.detach().numpy(), centred)
    assert self_duality_distance(head, stats).item() == pytest.approx(expected, rel=RTOL64)
    assert self_duality_distance(head.weight, stats).item() == pytest.approx(expected, rel=RTOL64)
    for shape in ((4, 4), (3, 5), (3, 3)):
        message = "`weight` to have shape (3, 4) (the classes and feature width of `stats`), "
        with pytest.raises(ValueError, match=re.escape(message + f"but got {shape}.")):
            self_duality_distance(torch.randn(shape, dtype=torch.float64), stats)
    with pytest.raises(ValueError, match="`weight` to have a 2-D floating-point weight"):
        self_duality_distance(torch.randn(4, dtype=torch.float64), stats)
    with pytest.raises(TypeError, match=r"`weight` to have a 2-D .* dtype torch.int64"):
        self_duality_distance(head.weight.long(), stats)
    with pytest.raises(TypeError, match=r"`weight` to be a .* tensor or a module"):
        self_duality_distance(head.weight.tolist(), stats)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`stats` to be the BatchClassStatistics"):
        self_duality_distance(head, features)  # type: ignore[arg-type]


def test_simplex_gram_distance_checks_vectors_and_mask() -> None:
    g = fresh_generator()
    vectors = torch.randn(5, 3, generator=g, dtype=torch.float64)
    present = torch.tensor([True, False, True, True, False])
    expected = ref_gram_distance(vectors.numpy()[present.numpy()])
    assert simplex_gram_distance(vectors, present).item() == pytest.approx(expected, rel=RTOL64)
    with pytest.raises(ValueError, match=r"`vectors` to be a 2-D tensor .* shape \(5,\)"):
        simplex_gram_distance(vectors[:, 0])
    for bad in (vectors.long(), vectors.tolist()):
        with pytest.raises(TypeError, match="`vectors` to be a floating-point tensor"):
            simplex_gram_distance(bad)  # type: ignore[arg-type]
    for mask in (present.tolist(), present.long(), present.double()):
        with pytest.raises(TypeError, match="`present` to be a boolean tensor or None"):
            simplex_gram_distance(vectors, mask)  # type: ignore[arg-type]
    for mask in (present[:3], present[None]):
        with pytest.raises(ValueError, match=r"`present` to have shape \(5,\)"):
            simplex_gram_distance(vectors, mask)


def test_target_penalty_checks_value_and_target() -> None:
    value = torch.rand(4, dtype=torch.float64, generator=fresh_generator())
    level = 0.3
    for mode, expected in (
        ("squared", (value - level) ** 2),
        ("at_most", (value - level).clamp_min(0)),
        ("at_least", (level - value).clamp_min(0)),
    ):
        for target in (level, np.float64(level), torch.tensor(level)):  # any real scalar
            torch.testing.assert_close(target_penalty(value, target, mode), expected)  # type: ignore[arg-type]
    for bad_value in (0.5, [0.5], value.long()):
        with pytest.raises(TypeError, match="`value` to be a floating-point tensor"):
            target_penalty(bad_value, 0.1)  # type: ignore[arg-type]
    for bad in (math.nan, math.inf, -math.inf):  # a NaN target gave a NaN penalty silently
        with pytest.raises(ValueError, match="`target` to be a finite number"):
            target_penalty(value, bad)
    for bad in ("0.1", None, True):  # not numbers: a wrong type
        with pytest.raises(
            TypeError, match=rf"`target` to be a real number, but got {type(bad).__name__}"
        ):
            target_penalty(value, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`target` to be a real number or a floating-point tensor"):
        target_penalty(value, torch.tensor(1))
    # a tensor target is used as it is: per element, and with its gradient (a learned level)
    levels = torch.rand(4, dtype=torch.float64, generator=fresh_generator()).requires_grad_()
    penalty = target_penalty(value, levels, "squared")
    torch.testing.assert_close(penalty, (value - levels.detach()) ** 2, rtol=0.0, atol=0.0)
    (grad,) = torch.autograd.grad(penalty.sum(), levels)
    torch.testing.assert_close(grad, 2.0 * (levels.detach() - value), rtol=0.0, atol=0.0)


def test_target_penalty_compiles_with_a_tensor_target() -> None:
    """A scheduled level kept in a 0-dim tensor: one graph, no recompilation as it changes."""
    value = torch.rand(6, dtype=torch.float64, generator=fresh_generator())
    compiled = torch.compile(target_penalty, fullgraph=True, dynamic=False)
    for level in (0.2, 0.7):
        for mode in ("squared", "at_most", "at_least"):
            got = compiled(value, torch.tensor(level, dtype=torch.float64), mode)
            torch.testing.assert_close(got, target_penalty(value, level, mode))  # type: ignore[arg-type]


def test_class_weights_from_counts_check_counts_and_power(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative counts were taken for absent classes, NaN counts or power gave NaN weights, 2-D
    counts gave 2-D weights, a list an AttributeError."""
    counts = torch.tensor([5, 2, 0, 9])
    mean_count = 16 / 3
    expected = torch.tensor(
        [(mean_count / 5) ** 0.3, (mean_count / 2) ** 0.3, 1.0, (mean_count / 9) ** 0.3]
    )
    for given in (counts, counts.double(), counts.float()):  # integer counts as floats
        torch.testing.assert_close(
            class_weights_from_counts(given, 0.3),
            expected.to(torch.promote_types(given.dtype, torch.float32)),
            rtol=1e-6,
            atol=0,
        )
    for bad in (counts.tolist(), counts.bool(), counts.to(torch.complex64)):
        with pytest.raises(TypeError, match=r"`counts` to be a real .* tensor"):
            class_weights_from_counts(bad)  # type: ignore[arg-type]
    for bad in (counts[None].float(), torch.tensor(3.0)):
        with pytest.raises(ValueError, match="`counts` to be a 1-D tensor"):
            class_weights_from_counts(bad)
    for value in (-1.0, math.nan, math.inf):
        bad = counts.double()
        bad[1] = value
        with pytest.raises(
            ValueError, match=f"non-negative, finite counts, but got {value} for class 1"
        ):
            class_weights_from_counts(bad)
    with pytest.raises(ValueError, match="non-negative, finite counts, but got -2 for class 0"):
        class_weights_from_counts(torch.tensor([-2, 3]))
    for power in (math.nan, math.inf):
        with pytest.raises(ValueError, match="`power` to be a finite number"):
            class_weights_from_counts(counts, power)
    for bad in ("0.5", True):  # not numbers: a wrong type
        with pytest.raises(
            TypeError, match=rf"`power` to be a real number, but got {type(bad).__name__}"
        ):
            class_weights_from_counts(counts, bad)  # type: ignore[arg-type]

    # without the value check the counts are not read (no host synchronisation): reading a
    # tensor's value on the host raises here
    def no_host_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a value was read on the host")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, no_host_read)
        weights = class_weights_from_counts(counts.float(), 0.3, validate_args=False)
        unchecked = class_weights_from_counts(torch.tensor([-1.0, 2.0, 4.0]), validate_args=False)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert unchecked.shape == (3,)  # a negative count is not refused without the check
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "__bool__", no_host_read)
        with pytest.raises(AssertionError, match="read on the host"):
            class_weights_from_counts(counts.float(), 0.3)  # the check reads the counts


def test_class_weights_from_counts_compiles_with_its_checks_on() -> None:
    """The value check reads the counts on the host; under torch.compile it is skipped, as the
    label checks are, so that the default call compiles into one graph."""
    counts = torch.randint(0, 50, (7,), generator=fresh_generator()).double()
    compiled = torch.compile(class_weights_from_counts, fullgraph=True)
    torch.testing.assert_close(compiled(counts, 0.5), class_weights_from_counts(counts, 0.5))


@pytest.mark.parametrize("module_dtype", [torch.float32, torch.float64])
def test_running_form_skips_non_finite_batches(
    module_dtype: torch.dtype, compute_path: str
) -> None:
    """One batch with a NaN or infinite feature (a float16 step GradScaler would skip) left the
    running means NaN for good, and every later loss NaN. Such a batch now leaves the buffers as
    they were: NaN batch then clean batch gives what the clean batch alone gives."""
    g = fresh_generator()
    k, d = 4, 3
    first = torch.randn(16, d, generator=g, dtype=torch.float64), torch.arange(16) % k
    clean = torch.randn(12, d, generator=g, dtype=torch.float64), torch.arange(12) % k

    def running(momentum: float | None) -> WithinClassVariabilityLoss:
        reg = WithinClassVariabilityLoss(k, form="running", in_features=d, momentum=momentum)
        return reg.to(module_dtype)  # float64 features: running means float32 or float64

    for momentum in (0.3, None):
        expected = running(momentum)
        expected(*first)
        expected_loss = expected(*clean)
        for value in (math.nan, math.inf, -math.inf):
            reg = running(momentum)
            reg(*first)
            bad = clean[0].clone()
            bad[int(torch.randint(0, 12, (), generator=g)), 1] = value
            loss = reg(bad, clean[1])
            assert not math.isfinite(loss.item())  # the batch's own loss shows the problem
            assert reg.class_batches.tolist() == [1] * k  # the bad batch is not counted
            again = reg(*clean)
            where = f"{value}, momentum {momentum}, {compute_path}"
            assert torch.equal(reg.running_mean, expected.running_mean), where
            assert torch.equal(reg.class_batches, expected.class_batches), where
            assert torch.equal(again, expected_loss), where
    # a class's first batch: a non-finite one does not count it as seen
    reg = running(0.3)
    reg(torch.full((2, d), math.nan, dtype=torch.float64), torch.tensor([0, 1]))
    assert reg.class_batches.tolist() == [0] * k
    assert torch.equal(reg.running_mean, torch.zeros(k, d, dtype=module_dtype))


@pytest.mark.parametrize("form", ["bounded", "ratio", "running"])
def test_regularizer_constructor_arguments_are_checked_whatever_the_form(form: str) -> None:
    """``in_features``, ``dtype`` and ``device`` were checked only by the running form (and the
    dtype not even there: int64 running means truncated every update)."""
    g = fresh_generator()
    features, target = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.arange(12) % 3
    when = " when `form='running'`" if form == "running" else ""
    for bad in ("x", 4.0, True):
        with pytest.raises(TypeError, match=f"`in_features` to be an integer{re.escape(when)}"):
            WithinClassVariabilityLoss(3, form=form, in_features=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`in_features` to be a positive integer"):
        WithinClassVariabilityLoss(3, form=form, in_features=0)  # type: ignore[arg-type]
    for dtype in (torch.int64, torch.bool, torch.complex64, "float32", torch.float32.itemsize):
        with pytest.raises(TypeError, match=r"`dtype` to be a floating dtype, but got"):
            WithinClassVariabilityLoss(3, form=form, in_features=4, dtype=dtype)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`device` to be a device such as .* but got 'foo'"):
        WithinClassVariabilityLoss(3, form=form, in_features=4, device="foo")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`device` to be a torch.device, a string or an index"):
        WithinClassVariabilityLoss(3, form=form, in_features=4, device=1.5)  # type: ignore[arg-type]
    # valid arguments: the same values as without them, the width checked by every form
    reg = WithinClassVariabilityLoss(
        3,
        form=form,
        in_features=np.int64(4),
        device="cpu",
        dtype=torch.float64,  # type: ignore[arg-type]
    )
    assert type(reg.in_features) is int
    if form != "running":
        h, y = features.numpy(), target.numpy()
        assert reg(features, target).item() == pytest.approx(ref_nc1(h, y, 3, form), rel=RTOL64)
    with pytest.raises(
        ValueError, match=r"`features` to have 4 columns \(`in_features`\), but got 5"
    ):
        reg(torch.randn(12, 5, dtype=torch.float64), target)


def test_target_mode_needs_target_nc1() -> None:
    """A hinge ``target_mode`` without ``target_nc1`` was accepted and ignored (plain NC1); the
    default ``"squared"``, given explicitly (as a saved config of the defaults does), is not an
    error."""
    g = fresh_generator()
    features, target = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.arange(12) % 3
    for mode in ("at_most", "at_least"):
        with pytest.raises(ValueError, match=f"`target_nc1` with `target_mode='{mode}'`"):
            CollapseRegularizer(3, target_mode=mode)
    with pytest.raises(ValueError, match="`target_mode` to be one of"):
        CollapseRegularizer(3, target_mode="hinge")  # type: ignore[arg-type]
    nc1 = ref_nc1(features.numpy(), target.numpy(), 3, "bounded")
    plain = CollapseRegularizer(3, target_mode="squared")  # the default, explicitly
    assert plain.target_mode == "squared"
    assert plain(features, target).item() == pytest.approx(nc1, rel=RTOL64)
    rebuilt = CollapseRegularizer(  # from its own attributes
        plain.num_classes, nc1=plain.nc1, target_nc1=plain.target_nc1, target_mode=plain.target_mode
    )
    assert rebuilt(features, target).item() == plain(features, target).item()
    aimed = CollapseRegularizer(3, target_nc1=0.2)
    assert aimed.target_mode == "squared"
    assert "target_mode='squared'" in repr(aimed)
    assert aimed(features, target).item() == pytest.approx((nc1 - 0.2) ** 2, rel=RTOL64)


def test_regularizers_refuse_features_without_columns_and_name_what_is_missing() -> None:
    """Features with 0 columns gave 2.0 (NC2) or 0.0 (NC1); the statistics and metrics refuse
    them. A forgotten target was reported as "got neither", and features of the wrong width
    were blamed on the classifier."""
    g = fresh_generator()
    features, target = torch.randn(9, 4, generator=g), torch.arange(9) % 3
    weight = torch.randn(3, 4, generator=g)
    empty = features[:, :0]
    calls: dict[str, Callable[[], Tensor]] = {
        "nc1": lambda: WithinClassVariabilityLoss(3)(empty, target),
        "ratio": lambda: WithinClassVariabilityLoss(3, form="ratio")(empty, target),
        "nc2": lambda: SimplexGeometryLoss(3)(empty, target),
        "nc3": lambda: SelfDualityLoss(3)(empty, target, weight),
        "collapse": lambda: CollapseRegularizer(3, nc3=1.0)(empty, target, weight),
        "dot": lambda: DotRegressionLoss()(empty, target, weight[:, :0]),
    }
    for call in calls.values():
        with pytest.raises(
            ValueError, match=r"at least one feature \(column\), but got shape \(9, 0\)"
        ):
            call()
    reg = SimplexGeometryLoss(3)
    with pytest.raises(ValueError, match=r"`target` with `features` .*, but got None"):
        reg(features)
    with pytest.raises(ValueError, match=r"`features` with `target` .*, but got None"):
        reg(target=target)
    with pytest.raises(ValueError, match="`features` and `target`, or `classifier`, but got none"):
        reg()
    for term in (SelfDualityLoss(3), CollapseRegularizer(3, nc3=1.0)):
        message = (
            r"`features` to have 4 columns, the width of `classifier` \(shape \(3, 4\)\), but got 3"
        )
        with pytest.raises(ValueError, match=message):
            term(features[:, :3], target, weight)
        # an integer classifier is a wrong type, not a wrong value
        with pytest.raises(TypeError, match=r"`classifier` to have a 2-D floating-point weight"):
            term(features, target, weight.long())
    with pytest.raises(TypeError, match=r"`frame` to have a 2-D floating-point weight"):
        DotRegressionLoss()(features, target, weight.long())
