"""The same mistake raises the same exception type across the public API.

The convention is PyTorch's (``nn.Linear("2", 3)`` is a ``TypeError``): a value of the wrong
type (a string, ``None`` or a bool where a number is expected, something other than a tensor
where a tensor is expected, an integer tensor where a floating one is expected, a string where a
``torch.dtype`` is expected) is a ``TypeError``; a value of the right type but of a wrong shape,
size or range is a ``ValueError``. Each message names the argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import torchcollapse.functional as F
from torchcollapse import FeatureNorm, NeuralCollapse
from torchcollapse.frames import (
    frame_angle_report,
    hierarchy_frame,
    nearest_simplex_etf,
    orthogonal_frame,
    simplex_etf,
    spherical_code,
)
from torchcollapse.heads import (
    CosineHead,
    FixedFrameHead,
    NearestETFHead,
    OrthogonalFrameHead,
    SimplexETFHead,
    SphericalCodeHead,
    cross_entropy_floor,
    etf_init_,
    replace_head,
)
from torchcollapse.losses import (
    BalancedSoftmaxLoss,
    DotRegressionLoss,
    RescaledMSELoss,
    SelfDualityLoss,
    WithinClassVariabilityLoss,
    dot_regression_loss,
)
from torchcollapse.stats import ClassStatistics
from torchcollapse.tracking import CollapseTracker

K, D = 3, 8


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(3 * K, D), torch.arange(3 * K) % K


def _tracked(target: Any, pool: Any = "mean") -> None:
    model = nn.Sequential(nn.Linear(D, D), nn.Linear(D, K))
    with CollapseTracker(model, "0", K, pool=pool) as tracker:
        tracker.update(torch.randn(3 * K, D), target)


def _statistics() -> ClassStatistics:
    return ClassStatistics.from_features(*_batch(), K)


LIST = [[1.0, 0.0]] * K
INT_FRAME = torch.eye(K, dtype=torch.int64)

# (what is wrong, the call, the match of the message); every call is a TypeError
WRONG_TYPES: list[tuple[str, Callable[[], object], str]] = [
    # a string or a bool where a real number is expected
    ("head scale str", lambda: SimplexETFHead(D, K, scale="2"), "`scale` to be a real number"),
    ("head eps str", lambda: SimplexETFHead(D, K, eps="1"), "`eps` to be a real number"),
    ("head eps None", lambda: SimplexETFHead(D, K, eps=None), "`eps` to be a real number"),
    ("head scale bool", lambda: SimplexETFHead(D, K, scale=True), "`scale` to be a real number"),
    ("margin bool", lambda: CosineHead(D, K, margin=True), "`margin` to be a real number"),
    ("margin str", lambda: CosineHead(D, K, margin="0.1"), "`margin` to be a real number"),
    ("momentum str", lambda: NearestETFHead(D, K, momentum="0.1"), "`momentum` to be a real"),
    ("floor scale str", lambda: cross_entropy_floor("10", K), "`scale` to be a real number"),
    ("tol str", lambda: hierarchy_frame(torch.eye(K), tol="a"), "`tol` to be a real number"),
    ("eps str", lambda: nearest_simplex_etf(torch.randn(K, D), eps="a"), "`eps` to be a real"),
    ("norm scale str", lambda: FeatureNorm(scale="2"), "`scale` to be a real number"),
    ("weight str", lambda: WithinClassVariabilityLoss(K, weight="1"), "`weight` to be a real"),
    ("k str", lambda: RescaledMSELoss(k="1"), "`k` to be a real number"),
    ("tau str", lambda: BalancedSoftmaxLoss([1, 2], tau="1"), "`tau` to be a real number"),
    ("gain str", lambda: etf_init_(nn.Linear(D, K), gain="2"), "`gain` to be a real number"),
    ("exponent str", lambda: F.spherical_energy(torch.randn(K, D), "1"), "`exponent` to be a"),
    # something other than a tensor where a tensor is expected
    ("frame list", lambda: FixedFrameHead(LIST), "`frame` to be a Tensor, but got list"),
    ("similarity list", lambda: hierarchy_frame(LIST), "`similarity` to be a Tensor"),
    ("points list", lambda: nearest_simplex_etf(LIST), "`points` .* but got list"),
    (
        "previous list",
        lambda: nearest_simplex_etf(torch.randn(K, D), previous=LIST, proximal=0.1),
        "`previous` .* but got list",
    ),
    (
        "previous integer",
        lambda: nearest_simplex_etf(
            torch.randn(K, D), previous=torch.ones(K, D, dtype=torch.long), proximal=0.1
        ),
        "`previous` to be a floating-point .* but got dtype torch.int64",
    ),
    ("loss classifier list", lambda: SelfDualityLoss(K)(*_batch(), LIST), "`classifier`"),
    (
        "metric classifier list",
        lambda: NeuralCollapse(K, classifier=LIST),
        r"`classifier` to be a module with a `weight` .* but got list\.",
    ),
    (
        "metric classifier without weight",
        lambda: NeuralCollapse(K, classifier=nn.ReLU()),
        r"`classifier` .* but got ReLU \(no `weight` tensor\)",
    ),
    (
        "class_weight list",
        lambda: dot_regression_loss(*_batch(), torch.randn(K, D), class_weight=[1.0] * K),
        "`class_weight` .* but got list",
    ),
    ("metric target list", lambda: NeuralCollapse(K).update(_batch()[0], [0] * 9), "`target`"),
    ("tracker target list", lambda: _tracked([0] * 9), "`target` .* but got list"),
    ("tracker target None", lambda: _tracked(None), "`target` .* but got NoneType"),
    ("tracker pool list", lambda: _tracked(_batch()[1], pool=lambda out: LIST), "but got list"),
    (
        "variances list",
        lambda: F.pairwise_geometry(torch.randn(K, D), variances=[1.0] * K),
        "`variances` to be a real tensor",
    ),
    (
        "gram list",
        lambda: F.pairwise_geometry(torch.randn(K, D), gram=LIST),
        "`gram` to be a real tensor",
    ),
    # an integer tensor where a floating one is expected
    ("int report", lambda: frame_angle_report(INT_FRAME), "`frame` to be floating point"),
    ("int metric classifier", lambda: NeuralCollapse(K, classifier=INT_FRAME), "`classifier"),
    (
        "int nc3",
        lambda: F.neural_collapse_nc3(_statistics(), torch.ones(K, D, dtype=torch.int64)),
        "`weight`",
    ),
    (
        "int features",
        lambda: SimplexETFHead(D, K)(torch.ones(2, D, dtype=torch.int64)),
        "`features`",
    ),
    ("int points", lambda: nearest_simplex_etf(INT_FRAME), "`points` .* dtype torch.int64"),
    ("int similarity", lambda: hierarchy_frame(INT_FRAME), "`similarity` to be a floating"),
    ("int frame", lambda: FixedFrameHead(INT_FRAME), "`frame` to be a floating-point tensor"),
    ("int init", lambda: etf_init_(torch.zeros(K, D, dtype=torch.int64)), "`target` to be a"),
    ("int loss classifier", lambda: SelfDualityLoss(K)(*_batch(), INT_FRAME), "`classifier`"),
    ("int loss frame", lambda: DotRegressionLoss()(*_batch(), INT_FRAME), "`frame`"),
    # a string where a torch.dtype is expected (it failed inside torch with an AttributeError)
    ("dtype simplex_etf", lambda: simplex_etf(K, D, dtype="float32"), "`dtype` .* 'float32'"),
    ("dtype orthogonal", lambda: orthogonal_frame(K, D, dtype="float32"), "`dtype`"),
    ("dtype spherical", lambda: spherical_code(K, D, dtype="float32"), "`dtype`"),
    ("dtype hierarchy", lambda: hierarchy_frame(torch.eye(K), dtype="float32"), "`dtype`"),
    ("dtype simplex head", lambda: SimplexETFHead(D, K, dtype="float32"), "`dtype`"),
    ("dtype orthogonal head", lambda: OrthogonalFrameHead(D, K, dtype="float32"), "`dtype`"),
    ("dtype spherical head", lambda: SphericalCodeHead(D, K, dtype="float32"), "`dtype`"),
    ("dtype nearest head", lambda: NearestETFHead(D, K, dtype="float32"), "`dtype`"),
    (
        "dtype fixed head",
        lambda: FixedFrameHead(simplex_etf(K, D), dtype="float32"),
        "`dtype` .* 'float32'",
    ),
    # class counts that are not real numbers (they failed inside torch.as_tensor)
    ("counts None", lambda: BalancedSoftmaxLoss(None), "`class_counts` .* but got NoneType"),
    ("counts str", lambda: BalancedSoftmaxLoss("abc"), "`class_counts` .* but got str"),
    ("counts strs", lambda: BalancedSoftmaxLoss(["a", "b"]), "`class_counts` .* but got list"),
    ("counts dict", lambda: BalancedSoftmaxLoss({0: 1}), "`class_counts` .* but got dict"),
    ("counts bools", lambda: BalancedSoftmaxLoss([True, True]), "`class_counts` .* torch.bool"),
    (
        "counts complex",
        lambda: BalancedSoftmaxLoss(torch.ones(2, dtype=torch.complex64)),
        "`class_counts` .* torch.complex64",
    ),
    (
        "dot counts strs",
        lambda: DotRegressionLoss(class_counts=["a", "b"]),
        "`class_counts` .* but got list",
    ),
    ("dot counts dict", lambda: DotRegressionLoss(class_counts={0: 1}), "`class_counts`"),
    # power-user arguments of the functional API
    (
        "nc4 counts not numbers",
        lambda: F.neural_collapse_compute(_statistics(), nc4_counts=(1.0, "10")),
        r"`nc4_counts` .* but got \(float, str\)",
    ),
    (
        "block_elements str",
        lambda: F.pairwise_geometry(torch.randn(K, D), block_elements="8"),
        "`block_elements` to be an integer",
    ),
    (
        "block_elements float",
        lambda: F.pairwise_geometry(torch.randn(K, D), block_elements=1.5),
        "`block_elements` to be an integer",
    ),
    (
        "block_elements bool",
        lambda: F.pairwise_geometry(torch.randn(K, D), block_elements=True),
        "`block_elements` to be an integer",
    ),
    (
        "replace_head factory None",
        lambda: replace_head(nn.Sequential(nn.Linear(D, K)), None),
        "`factory` to be a callable",
    ),
]

# (what is wrong, the call, the match of the message); every call is a ValueError
WRONG_VALUES: list[tuple[str, Callable[[], object], str]] = [
    ("head eps 0", lambda: SimplexETFHead(D, K, eps=0.0), "`eps` to be > 0"),
    ("head eps nan", lambda: SimplexETFHead(D, K, eps=math.nan), "`eps` to be > 0"),
    ("margin inf", lambda: CosineHead(D, K, margin=math.inf), "`margin`"),
    ("momentum 2", lambda: NearestETFHead(D, K, momentum=2.0), "`momentum` to be in"),
    ("gain nan", lambda: etf_init_(nn.Linear(D, K), gain=math.nan), "`gain` to be a finite"),
    ("tau inf", lambda: BalancedSoftmaxLoss([1, 2], tau=math.inf), "`tau` to be finite"),
    ("momentum tensor", lambda: NearestETFHead(D, K, momentum=torch.tensor(-0.5)), "`momentum`"),
    ("frame 1-D", lambda: FixedFrameHead(torch.ones(K)), "`frame` to be a 2-D tensor"),
    ("frame nan", lambda: FixedFrameHead(torch.full((K, D), math.nan)), "`frame` to be a finite"),
    ("similarity nan", lambda: hierarchy_frame(torch.full((K, K), math.nan)), "`similarity`"),
    ("init 1-D", lambda: etf_init_(torch.zeros(K)), "`target` to be a 2-D floating-point"),
    ("classifier 1-D", lambda: NeuralCollapse(K, classifier=torch.ones(K)), "weight of shape"),
    (
        "class_weight shape",
        lambda: dot_regression_loss(*_batch(), torch.randn(K, D), class_weight=torch.ones(2)),
        "`class_weight` .* tensor of 3",
    ),
    ("tracker target 2-D", lambda: _tracked(torch.zeros(9, 1)), r"`target` .* shape \(9, 1\)"),
    (
        "tracker pool 1-D",
        lambda: _tracked(_batch()[1], pool=lambda out: out[:, 0]),
        r"pooled output .* shape \(9,\)",
    ),
    (
        "variances shape",
        lambda: F.pairwise_geometry(torch.randn(K, D), variances=torch.ones(K + 1)),
        r"`variances` to have shape \(3,\)",
    ),
    (
        "gram shape",
        lambda: F.pairwise_geometry(torch.randn(K, D), gram=torch.eye(K + 1)),
        r"`gram` to have shape \(3, 3\)",
    ),
    (
        "block_elements 0",
        lambda: F.pairwise_geometry(torch.randn(K, D), block_elements=0),
        "`block_elements` to be a positive integer",
    ),
    (
        "block_elements -1",
        lambda: F.pairwise_geometry(torch.randn(K, D), block_elements=-1),
        "`block_elements` to be a positive integer",
    ),
    ("counts negative", lambda: BalancedSoftmaxLoss([1, -1]), "positive, finite counts"),
    ("counts 2-D", lambda: BalancedSoftmaxLoss([[1, 2]]), "1-D sequence"),
    ("dot counts negative", lambda: DotRegressionLoss(class_counts=[1, -1]), "non-negative"),
    (
        "nc4 mismatches < 0",
        lambda: F.neural_collapse_compute(_statistics(), nc4_counts=(-1.0, 10.0)),
        r"0 <= mismatches <= samples, but got \(-1\.0, 10\.0\)",
    ),
    (
        "nc4 mismatches > samples",
        lambda: F.neural_collapse_compute(
            _statistics(), nc4_counts=(torch.tensor(11.0), torch.tensor(10.0))
        ),
        r"0 <= mismatches <= samples, but got \(11\.0, 10\.0\)",
    ),
    (
        "nc4 nan",
        lambda: F.neural_collapse_compute(_statistics(), nc4_counts=(math.nan, 10.0)),
        "0 <= mismatches <= samples",
    ),
    (
        "nc4 counts tensor not of two values",
        lambda: F.neural_collapse_compute(_statistics(), nc4_counts=torch.tensor([1.0, 2.0, 10.0])),
        r"`nc4_counts` to be a pair \(mismatches, samples\) of counts, but got a tensor of"
        r" shape \(3,\)",
    ),
    (
        "nc4 three values",
        lambda: F.neural_collapse_compute(_statistics(), nc4_counts=(1.0, 2.0, 3.0)),
        "`nc4_counts` to be a pair .* but got 3 values",
    ),
]


@pytest.mark.parametrize(
    ("call", "match"), [case[1:] for case in WRONG_TYPES], ids=[case[0] for case in WRONG_TYPES]
)
def test_a_wrong_type_is_a_type_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(TypeError, match=rf"Expected .*{match}"):
        call()


@pytest.mark.parametrize(
    ("call", "match"), [case[1:] for case in WRONG_VALUES], ids=[case[0] for case in WRONG_VALUES]
)
def test_a_wrong_value_is_a_value_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=rf"Expected .*{match}"):
        call()


def test_nc4_counts_may_be_python_numbers() -> None:
    """``nc4_counts`` as Python numbers (an AttributeError before) give the NC4 of tensors,
    ``mismatches / samples`` exactly in float64; ``samples = 0`` leaves ``nc4`` out."""
    stats = _statistics()
    samples = int(torch.randint(1, 1000, ()))
    mismatches = int(torch.randint(0, samples + 1, ()))
    expected = torch.tensor(mismatches / samples, dtype=torch.float64)
    as_numbers = F.neural_collapse_compute(stats, nc4_counts=(mismatches, float(samples)))
    as_tensors = F.neural_collapse_compute(
        stats,
        nc4_counts=(
            torch.tensor(mismatches, dtype=torch.float64),
            torch.tensor(samples, dtype=torch.float64),
        ),
    )
    assert torch.equal(as_numbers["nc4"], expected)
    assert torch.equal(as_tensors["nc4"], expected)
    as_one_tensor = F.neural_collapse_compute(
        stats, nc4_counts=torch.tensor([mismatches, samples], dtype=torch.float64)
    )
    assert torch.equal(as_one_tensor["nc4"], expected)
    assert "nc4" not in F.neural_collapse_compute(stats, nc4_counts=(0, 0))


def test_pairwise_geometry_reads_block_elements_as_any_integer() -> None:
    """A numpy or 0-dim tensor integer is read as a Python int: the same values as without
    blocks (blocks of one row and of the whole matrix alike), in float64 to rounding."""
    import numpy as np

    vectors = torch.randn(7, 5, dtype=torch.float64)
    variances = torch.rand(7, dtype=torch.float64)
    expected = F.pairwise_geometry(vectors, variances=variances)
    for block in (np.int64(7), torch.tensor(1), 1, 1 << 20):
        got = F.pairwise_geometry(vectors, variances=variances, block_elements=block)  # type: ignore[arg-type]
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12, msg=key)
