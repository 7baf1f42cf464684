"""NeuralCollapse and the single-quantity metrics against the float64 two-pass reference.

Tolerances: the metrics accumulate in float64 about per-class shifts, so on inputs rounded to the
tested dtype (the reference sees the same rounded values in float64) they agree to ~1e-12; the
issue's bound, relative error <= 1e-6, is asserted everywhere (atol only absorbs quantities that
are exactly 0, such as an NC4 of 0).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from tests._helpers.cases import collapse_case
from tests._helpers.ddp import run_distributed
from tests._helpers.device_tensors import OnDevice
from tests._helpers.reference import (
    reference_class_means,
    reference_nc4,
    reference_neural_collapse,
)
from tests._helpers.testers import check_deferred_init, check_metric
from torchcollapse.functional import neural_collapse
from torchcollapse.heads import (
    CosineHead,
    NearestETFHead,
    OrthogonalFrameHead,
    SimplexETFHead,
)
from torchcollapse.metrics import (
    NeuralCollapse,
    NeuralCollapseCDNV,
    NeuralCollapseETFDistance,
    NeuralCollapseNC1,
    NeuralCollapseNC3,
    NeuralCollapseNC4,
)
from torchcollapse.metrics._state import _check_holds_float64
from torchcollapse.stats import ClassStatistics

RTOL, ATOL = 1e-6, 1e-12


def _case(
    n: int,
    d: int,
    k: int,
    *,
    spread: float = 0.6,
    offset: float = 0.0,
    zipf: bool = False,
    empty: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    features, target, weight, bias = collapse_case(
        n, d, k, spread=spread, offset=offset, zipf=zipf, empty=empty, seed=seed, weight_noise=0.3
    )
    classifier = torch.nn.Linear(d, k)
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
    return features, target, classifier


def _reference(
    k: int,
    classifier: torch.nn.Linear | None = None,
    class_means: np.ndarray | None = None,
    global_mean: str = "classes",
) -> Any:
    weight = None if classifier is None else classifier.weight.detach()
    bias = None if classifier is None else classifier.bias.detach()

    def reference(features: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        out = reference_neural_collapse(
            features,
            target,
            k,
            weight=weight,
            bias=bias,
            global_mean=global_mean,
            class_means=class_means,
        )
        if class_means is None:
            out.pop("nc4", None)
        return out

    return reference


def test_neural_collapse_every_key_balanced_all_dtypes_streaming_ddp() -> None:
    features, target, classifier = _case(240, 10, 6)
    means = reference_class_means(features, target, 6)
    report = check_metric(
        lambda: NeuralCollapse(6, classifier=classifier, class_means=torch.from_numpy(means)),
        _reference(6, classifier, means),
        features,
        target,
        rtol=RTOL,
        atol=ATOL,
    )
    assert report.ddp is not None
    assert len(set(report.ddp.pids)) == 2
    assert any("float16/ddp" in c for c in report.checks)


def test_zipf_with_empty_class_and_more_classes_than_dimensions() -> None:
    # K - 1 >= d (no simplex, NC1 through the d x d branch), Zipf counts, class 4 never seen,
    # global mean of the samples.
    k, d = 13, 5
    features, target, classifier = _case(400, d, k, zipf=True, empty=4, seed=1)
    assert int((target == 4).sum()) == 0
    means = reference_class_means(features, target, k)
    check_metric(
        lambda: NeuralCollapse(
            k, classifier=classifier, class_means=torch.from_numpy(means), global_mean="samples"
        ),
        _reference(k, classifier, means, global_mean="samples"),
        features,
        target,
        rtol=RTOL,
        atol=ATOL,
        dtypes=(torch.bfloat16, torch.float32, torch.float64),
    )
    metric = NeuralCollapse(k)
    metric.update(features, target)
    assert int(metric.compute()["num_classes_present"]) == k - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nc1_one_in_a_million_behind_an_offset_of_a_thousand(dtype: torch.dtype) -> None:
    # Within-class spread 1e-3, class means ~1, common offset 1e3: NC1 ~ 1e-6.
    features, target, classifier = _case(1200, 8, 5, spread=1e-3, offset=1e3, seed=2)
    rounded = features.to(dtype)
    metric = NeuralCollapse(5, classifier=classifier)
    for f, t in zip(rounded.split(97), target.split(97)):
        metric.update(f, t)
    out = metric.compute()
    expected = _reference(5, classifier)(rounded.double(), target)
    assert 1e-7 < expected["nc1"] < 1e-5
    for key, value in expected.items():
        np.testing.assert_allclose(float(out[key]), value, rtol=RTOL, atol=0, err_msg=key)


def test_float32_products_trade_exactness_for_speed() -> None:
    # product_dtype=float32: the d x d product of centred batches in float32 (full IEEE precision).
    # Its relative error is ~1e-7 per entry (a few 1e-6 at worst on NC1), hence rtol 1e-5 here;
    # everything not computed from Sigma_W stays exact.
    features, target, classifier = _case(600, 12, 6, seed=9)
    metric = NeuralCollapse(6, classifier=classifier, product_dtype=torch.float32)
    for f, t in zip(features.float().split(128), target.split(128)):
        metric.update(f, t)
    out = metric.compute()
    expected = _reference(6, classifier)(features.float().double(), target)
    for key, value in expected.items():
        rtol = 1e-5 if key == "nc1" else 1e-12
        np.testing.assert_allclose(float(out[key]), value, rtol=rtol, atol=1e-14, err_msg=key)
    with pytest.raises(ValueError, match=r"`product_dtype` to be torch\.float32 or torch\.float64"):
        NeuralCollapse(6, product_dtype=torch.float16)


def test_nc1_without_the_offset_trick_would_fail() -> None:
    # The same data through a float32 one-pass second moment gives garbage (even negative NC1
    # contributions); a guard that the previous test is a real test.
    features, target, _ = _case(1200, 8, 5, spread=1e-3, offset=1e3, seed=2)
    x = features.float()
    raw = x.T @ x
    for c in range(5):
        rows = x[target == c]
        raw -= len(rows) * torch.outer(rows.mean(0), rows.mean(0))
    exact = ClassStatistics.from_features(features, target, 5).within_class_scatter()
    assert (raw.double().trace() - exact.trace()).abs() > 0.1 * exact.trace()


@pytest.mark.parametrize(
    ("factory", "key"),
    [
        (NeuralCollapseNC1, "nc1"),
        (NeuralCollapseCDNV, "cdnv"),
        (NeuralCollapseETFDistance, "nc2_etf_distance"),
        (NeuralCollapseNC3, "nc3"),
        (NeuralCollapseNC4, "nc4"),
    ],
)
def test_single_quantity_metrics(factory: Any, key: str) -> None:
    features, target, classifier = _case(150, 7, 5, seed=3)
    means = reference_class_means(features, target, 5)
    full = _reference(5, classifier, means)
    check_metric(
        lambda: factory(5, classifier=classifier, class_means=torch.from_numpy(means)),
        lambda f, t: full(f, t)[key],
        features,
        target,
        rtol=RTOL,
        atol=ATOL,
        dtypes=(torch.float32, torch.float64),
        ddp=False,
    )


def test_metric_collection_shares_one_state_and_updates_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    features, target, classifier = _case(200, 6, 4, seed=4)
    means = torch.from_numpy(reference_class_means(features, target, 4))
    kwargs: dict[str, Any] = {"classifier": classifier, "class_means": means}
    collection = MetricCollection(
        {
            "all": NeuralCollapse(4, **kwargs),
            "nc1": NeuralCollapseNC1(4, **kwargs),
            "cdnv": NeuralCollapseCDNV(4, **kwargs),
            "etf": NeuralCollapseETFDistance(4, **kwargs),
            "nc3": NeuralCollapseNC3(4, **kwargs),
            "nc4": NeuralCollapseNC4(4, **kwargs),
        }
    )
    calls = {"n": 0}
    original = ClassStatistics.update

    def counting(self: ClassStatistics, *args: Any, **kw: Any) -> ClassStatistics:
        calls["n"] += 1
        return original(self, *args, **kw)

    monkeypatch.setattr(ClassStatistics, "update", counting)
    batches = list(zip(features.split(50), target.split(50)))
    collection.update(*batches[0])  # the first update runs every metric and forms the groups
    assert calls["n"] == 6
    groups = [sorted(members) for members in collection.compute_groups.values()]
    assert groups == [["all", "cdnv", "etf", "nc1", "nc3", "nc4"]]
    for batch in batches[1:]:
        collection.update(*batch)
    assert calls["n"] == 6 + 3  # one update per batch for the whole collection
    out = collection.compute()
    expected = _reference(4, classifier, means.numpy())(features, target)
    for name, key in [("nc1", "nc1"), ("cdnv", "cdnv"), ("etf", "nc2_etf_distance")]:
        np.testing.assert_allclose(float(out[name]), expected[key], rtol=RTOL)
    np.testing.assert_allclose(float(out["nc3"]), expected["nc3"], rtol=RTOL)
    np.testing.assert_allclose(float(out["nc4"]), expected["nc4"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(out["all_nc1"]), expected["nc1"], rtol=RTOL)


def test_two_pass_nc4_with_class_means_equals_functional() -> None:
    features, target, classifier = _case(300, 6, 5, spread=1.0, seed=5)
    metric = NeuralCollapse(5, classifier=classifier)
    for f, t in zip(features.split(64), target.split(64)):
        metric.update(f, t)
    assert "nc4" not in metric.compute()  # no reference means: never approximated
    means = metric.class_means()
    np.testing.assert_allclose(
        means.numpy(), reference_class_means(features, target, 5), rtol=1e-12
    )
    metric.reset()
    metric.set_class_means(means)
    for f, t in zip(features.split(64), target.split(64)):
        metric.update(f, t)
    out = metric.compute()
    expected = neural_collapse(
        features, target, weight=classifier.weight, bias=classifier.bias, num_classes=5
    )
    assert 0 < float(out["nc4"]) < 1  # a real mix of agreements and disagreements
    assert float(out["nc4"]) == float(expected["nc4"])
    metric.set_class_means(None)
    metric.reset()
    metric.update(features, target)
    assert "nc4" not in metric.compute()


def _heads(k: int, d: int, g: torch.Generator) -> dict[str, torch.nn.Module]:
    """One classifier of each kind, in float64, with a bias where the kind has one."""
    f64: Any = {"dtype": torch.float64}
    linear = torch.nn.Linear(d, k, **f64)
    cosine = CosineHead(d, k, scale=16.0, **f64)
    with torch.no_grad():  # learnt rows of unequal norms: the raw weight is not what is applied
        cosine.weight.mul_(torch.rand(k, 1, generator=g, dtype=torch.float64) * 3 + 0.1)
    heads: dict[str, torch.nn.Module] = {
        "linear": linear,
        "cosine": cosine,
        "simplex_normalized_bias": SimplexETFHead(d, k, bias=True, **f64),
        "simplex_raw_bias": SimplexETFHead(
            d, k, normalize_features=False, scale=2.0, bias=True, **f64
        ),
        "orthogonal_normalized_bias": OrthogonalFrameHead(d, k, bias=True, **f64),
        "nearest_etf_normalized_bias": NearestETFHead(d, k, bias=True, **f64).eval(),
    }
    with torch.no_grad():
        for head in heads.values():
            if getattr(head, "bias", None) is not None:
                head.bias.copy_(torch.randn(k, generator=g, dtype=torch.float64))
    return heads


def test_nc4_counts_the_heads_own_decisions_and_the_weight_quantities_read_the_applied_one() -> (
    None
):
    # NC4 compares the decisions the classifier actually makes, head(h).argmax(1), with the
    # nearest reference mean (brute force); NC2/NC3 of the classifier read the weight it applies
    # (effective_weight). Everything in float64: the head's logits and the metric's agree up to
    # rounding, far from any tie on random inputs.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    k, d, n = 4, 8, 1500
    heads = _heads(k, d, g)
    for name, head in heads.items():
        means = 3 * torch.randn(k, d, generator=g, dtype=torch.float64)
        if name == "cosine":  # means along the head's rows: it decides like the nearest mean
            means = 3 * torch.nn.functional.normalize(head.weight.detach(), dim=1)
        target = torch.randint(0, k, (n,), generator=g)
        features = 4 * (means[target] + 1.5 * torch.randn(n, d, generator=g, dtype=torch.float64))
        metric = NeuralCollapse(k, classifier=head, class_means=4 * means)
        for f, t in zip(features.split(500), target.split(500)):
            metric.update(f, t)
        out = metric.compute()
        with torch.no_grad():
            decisions = head(features).argmax(1)
        nearest = torch.cdist(features, 4 * means).argmin(1)
        expected = float((decisions != nearest).double().mean())
        assert float(out["nc4"]) == expected, f"{name}, seed {seed}"
        if name == "cosine":
            assert expected == 0.0, f"seed {seed}"
        applied = getattr(head, "effective_weight", head.weight).detach()
        reference = reference_neural_collapse(features, target, k, weight=applied)
        for key in ("nc2_weight_equinorm", "nc2_weight_etf_distance", "nc3", "nc3_cosine"):
            np.testing.assert_allclose(
                float(out[key]), reference[key], rtol=RTOL, atol=ATOL, err_msg=f"{name}: {key}"
            )


def _nc4_brute_force(
    features: torch.Tensor, classifier: torch.nn.Linear, class_means: torch.Tensor
) -> float:
    """Fraction of samples where argmax(W h + b) differs from the nearest mean (float64 loops)."""
    h = features.double()
    logits = h @ classifier.weight.detach().double().T + classifier.bias.detach().double()
    nearest = torch.cdist(h, class_means.double()).argmin(1)
    return float((logits.argmax(1) != nearest).double().mean())


def test_a_first_batch_without_feature_columns_leaves_the_metric_usable() -> None:
    # The batch is refused (naming `features`) before any state is allocated from its shape, so
    # the next, valid batch is accumulated as if it were the first.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, _ = _case(90, 5, 3, seed=seed)
    metric = NeuralCollapse(3)
    with pytest.raises(ValueError, match="`features` to have at least one feature"):
        metric.update(torch.zeros(4, 0), target[:4])
    metric.update(features, target)
    expected = _reference(3)(features, target)
    out = metric.compute()
    for key, value in expected.items():
        np.testing.assert_allclose(
            float(out[key]), value, rtol=RTOL, atol=ATOL, err_msg=f"{key}, seed {seed}"
        )


@pytest.mark.parametrize("factory", [NeuralCollapse, NeuralCollapseNC4])
def test_new_reference_means_restart_the_nc4_counts(factory: Any) -> None:
    # NC4 is over the samples updated since the current reference means were set: counts against
    # earlier means are dropped (the class statistics are kept).
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, classifier = _case(200, 5, 4, spread=1.5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    first, second = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2))
    metric = factory(4, classifier=classifier, class_means=first)
    metric.update(features[:100], target[:100])
    metric.compute()  # a cached result must not survive either
    metric.set_class_means(second)
    metric.update(features[100:], target[100:])
    out = metric.compute()
    nc4 = out["nc4"] if isinstance(out, dict) else out
    assert float(nc4) == _nc4_brute_force(features[100:], classifier, second), f"seed {seed}"
    assert float(metric.class_statistics().total) == 200


@pytest.mark.parametrize("factory", [NeuralCollapse, NeuralCollapseNC4])
@pytest.mark.parametrize("means_at_construction", [False, True])
def test_nc4_resumed_from_a_checkpoint_equals_an_uninterrupted_run(
    factory: Any, means_at_construction: bool
) -> None:
    # The state_dict keeps the NC4 counts, not the means: after loading it, set_class_means with
    # the same means goes on counting (the restored counts are kept), and the result is that of
    # the uninterrupted run. Counts the metric then takes are dropped by new means as usual.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, classifier = _case(200, 5, 4, spread=1.5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    first, second = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2))

    def nc4(metric: Any) -> float:
        out = metric.compute()
        return float(out["nc4"] if isinstance(out, dict) else out)

    saved = factory(4, classifier=classifier, class_means=first)
    saved.update(features[:120], target[:120])
    saved.persistent(True)
    restored = factory(
        4, classifier=classifier, class_means=first if means_at_construction else None
    )
    restored.persistent(True)
    restored.load_state_dict(saved.state_dict())
    restored.set_class_means(first)  # as after loading any checkpoint
    restored.update(features[120:], target[120:])
    assert float(restored.nc4_samples) == 200, f"seed {seed}"
    assert nc4(restored) == _nc4_brute_force(features, classifier, first), f"seed {seed}"
    restored.set_class_means(second)  # counts taken against `first`: dropped
    restored.update(features[:80], target[:80])
    assert nc4(restored) == _nc4_brute_force(features[:80], classifier, second), f"seed {seed}"
    restored.set_class_means(None)
    assert float(restored.nc4_samples) == 0


def test_reference_means_set_after_the_first_update_of_a_collection() -> None:
    # Compute groups are formed at a MetricCollection's first update; afterwards only a group's
    # first metric (by name: here "nc1", without a classifier) is updated. Reference means set only
    # later count nothing: that is an error naming the cause (NeuralCollapseNC4) or a warning
    # (NeuralCollapse), never a silent gap. The two remedies the error gives both give NC4 right.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, classifier = _case(240, 6, 4, spread=2.0, seed=seed)
    means = torch.from_numpy(reference_class_means(features, target, 4))
    expected = _nc4_brute_force(features, classifier, means)
    assert 0 < expected < 1, f"seed {seed}"

    def epoch_two(*, first: torch.Tensor | None = None, **options: Any) -> MetricCollection:
        collection = MetricCollection(
            {
                "summary": NeuralCollapse(4, classifier=classifier, class_means=first),
                "nc4": NeuralCollapseNC4(4, classifier=classifier, class_means=first),
                "nc1": NeuralCollapseNC1(4),
            },
            **options,
        )
        collection.update(features, target)  # epoch one: no (or other) reference means
        collection.reset()
        for name in ("summary", "nc4"):  # every metric with a classifier
            collection[name].set_class_means(means)
        collection.update(features, target)
        return collection

    late = epoch_two()
    assert late.compute_groups == {0: ["nc1", "nc4", "summary"]}  # "nc1" updates the group
    remedies = r"(?s)MetricCollection.*`compute_groups=False`.*before the collection's first update"
    with pytest.warns(UserWarning, match=remedies):
        out = late.compute()  # NaN for NC4, the others computed
    assert torch.isnan(out["nc4"]), f"seed {seed}"
    assert "summary_nc4" not in out, f"seed {seed}"
    expected_nc1 = reference_neural_collapse(features, target, 4)["nc1"]
    np.testing.assert_allclose(float(out["nc1"]), expected_nc1, rtol=RTOL, err_msg=f"{seed}")
    with pytest.warns(UserWarning, match="counted no sample for NC4"):
        assert "nc4" not in late["summary"].compute()
    g = torch.Generator().manual_seed(seed)
    dummy = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for options in ({"compute_groups": False}, {"first": dummy}):
        collection = epoch_two(**options)
        out = collection.compute()
        assert float(out["nc4"]) == expected, f"{options}, seed {seed}"
        assert float(out["summary_nc4"]) == expected, f"{options}, seed {seed}"
    assert collection.compute_groups == {0: ["nc1"], 1: ["nc4", "summary"]}
    lone = NeuralCollapse(4, classifier=classifier)
    lone.update(features, target)
    lone.set_class_means(lone.class_means())  # and no update since
    with pytest.warns(UserWarning, match="counted no sample for NC4"):
        assert "nc4" not in lone.compute()


def test_nc4_in_a_collection_in_the_first_epoch_is_nan_and_the_collection_computes() -> None:
    # The documented previous-epoch pattern (`set_class_means(None)` in the first epoch) inside a
    # MetricCollection: the collection's compute gives the other metrics' values of that epoch,
    # and NC4 NaN with a warning saying why; the next epoch (own group: compute_groups=False)
    # gives NC4 against the first epoch's means, as the brute force does.
    from torchmetrics.classification import MulticlassAccuracy

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, classifier = _case(180, 6, 3, spread=2.0, seed=seed)
    collection = MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=3, average="micro"),
            "nc1": NeuralCollapseNC1(3),
            "nc4": NeuralCollapseNC4(3, classifier=classifier),
        },
        compute_groups=False,
    )
    weight, bias = classifier.weight.detach().double(), classifier.bias.detach().double()
    logits = features.double() @ weight.T + bias  # float64, as the reference
    means = None
    for epoch in range(2):
        collection["nc4"].set_class_means(means)  # None in the first epoch
        for rows in torch.arange(180).split(60):
            collection.update(preds=logits[rows], target=target[rows], features=features[rows])
        if epoch == 0:
            with pytest.warns(UserWarning, match=r"NC4 is undefined.*reference class means"):
                out = collection.compute()
            assert torch.isnan(out["nc4"]), f"seed {seed}"
        else:
            out = collection.compute()
            expected_nc4 = _nc4_brute_force(features, classifier, means)
            assert float(out["nc4"]) == expected_nc4, f"seed {seed}"
        accuracy = float((logits.argmax(1) == target).double().mean())
        assert float(out["acc"]) == pytest.approx(accuracy, rel=1e-6), f"seed {seed}"
        expected_nc1 = reference_neural_collapse(features, target, 3)["nc1"]
        np.testing.assert_allclose(float(out["nc1"]), expected_nc1, rtol=RTOL, err_msg=f"{seed}")
        means = torch.from_numpy(reference_class_means(features, target, 3))
        collection.reset()
    lone = NeuralCollapseNC4(3, classifier=classifier)  # forward and compute agree: NaN
    with pytest.warns(UserWarning, match="no value of its own"):
        assert torch.isnan(lone(features, target))
    with pytest.warns(UserWarning, match="NC4 is undefined"):
        assert torch.isnan(lone.compute())


def test_ddp_rank_without_data_and_synchronised_class_means() -> None:
    features, target, _ = _case(120, 5, 3, seed=6)

    def work(rank: int, world_size: int) -> dict[str, torch.Tensor]:
        metric = NeuralCollapse(3)  # lazily allocated: rank 1 never sees a batch
        if rank == 0:
            for f, t in zip(features.split(40), target.split(40)):
                metric.update(f, t)
        means = metric.class_means()  # synchronised: rank 1 gets them too
        with warnings.catch_warnings():
            # torchmetrics warns that rank 1 computes before any update; that is the point here
            warnings.simplefilter("ignore", UserWarning)
            out = metric.compute()
        out["means"] = means
        return out

    results = run_distributed(work, 2)
    expected = _reference(3)(features, target)
    for out in results:
        for key, value in expected.items():
            np.testing.assert_allclose(float(out[key]), value, rtol=RTOL, err_msg=key)
    for out in results:
        np.testing.assert_allclose(
            out["means"].numpy(), reference_class_means(features, target, 3), rtol=1e-12
        )


def test_classifier_is_read_live_and_not_a_submodule() -> None:
    features, target, classifier = _case(60, 4, 3, seed=7)
    metric = NeuralCollapse(3, classifier=classifier)
    metric.update(features, target)
    before = float(metric.compute()["nc3"])
    with torch.no_grad():
        classifier.weight.mul_(-1)
    assert float(metric.compute()["nc3"]) != before  # no stale cached result
    assert not NeuralCollapseNC3(3, classifier=classifier).compute_with_cache
    assert NeuralCollapse(3, classifier=classifier, compute_with_cache=True).compute_with_cache
    assert list(metric.parameters()) == []
    assert not any("weight" in k for k in metric.state_dict())


@pytest.mark.parametrize("factory", [NeuralCollapse, NeuralCollapseNC1])
def test_a_move_to_a_device_without_float64_names_the_workaround(factory: Any) -> None:
    # Apple's MPS has no float64, which the statistics accumulate in: the move is refused with
    # the workaround (the metric on the CPU, fed features.cpu()) before anything moves, in
    # place of torch's failure deep inside the move. The move here sends tensors to a stand-in
    # that claims the "mps" device and refuses float64, as MPS does.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, _ = _case(60, 4, 3, seed=seed)
    metric = factory(3)
    metric.update(features, target)
    before = {key: value.clone() for key, value in metric.metric_state.items()}
    with pytest.raises(TypeError, match=r"supports float64.*mps.*features\.cpu\(\)"):
        metric._apply(lambda tensor: OnDevice(tensor, "mps"))
    with pytest.raises(TypeError, match=r"features\.cpu\(\)"):
        _check_holds_float64(torch.device("mps"), "NeuralCollapse")
    _check_holds_float64(torch.device("cuda"), "NeuralCollapse")  # float64 there: no error
    assert metric.device == torch.device("cpu")
    for key, value in metric.metric_state.items():  # nothing moved, nothing changed
        assert type(value) is Tensor, key
        assert torch.equal(value, before[key]), key
    metric.update(features, target)  # and the metric goes on where it is
    assert metric.compute() is not None


@pytest.mark.parametrize("validate_args", [False, True])
def test_nc4_with_a_classifier_on_another_device_sees_its_changes(validate_args: bool) -> None:
    # The classifier on another device (a tensor that claims one, holding its values on the
    # CPU) is copied to the features' device at every update, so that NC4 sees every change:
    # in place, in place without torch's version counter (through `.data`, as fused optimizers
    # and collectives change parameters), and replaced. NC4 of three stretches of updates, each
    # with the classifier then current, equals the float64 brute force.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, head = _case(240, 6, 4, spread=1.5, seed=seed)
    means = torch.from_numpy(reference_class_means(features, target, 4))
    weight = OnDevice(head.weight.detach().clone(), "cuda", float64=True)
    metric = NeuralCollapse(4, classifier=weight, validate_args=validate_args)
    metric.set_class_means(means)
    mismatches = 0
    for stretch, rows in enumerate(features.split(80)):
        if stretch == 1:  # in place, unseen by the version counter (a fused optimizer step)
            version = weight._version
            weight.data.add_(OnDevice(torch.randn(weight.shape), "cuda", float64=True))
            assert weight._version == version
        elif stretch == 2:  # replaced (the classifier read is the metric's: give it the new one)
            weight = OnDevice(torch.randn(weight.shape), "cuda", float64=True)
            metric._classifier = type(metric._classifier)(weight)  # type: ignore[call-arg]
        labels = target[80 * stretch : 80 * (stretch + 1)]
        for i, (batch, batch_labels) in enumerate(zip(rows.split(20), labels.split(20))):
            metric.update(batch, batch_labels) if i % 2 else metric(batch, batch_labels)
        wrong, _ = reference_nc4(rows, weight.held, None, means.numpy())
        mismatches += wrong
    assert float(metric.compute()["nc4"]) == pytest.approx(mismatches / 240, abs=1e-12), (
        f"seed {seed}"
    )


class _ModelWithMetric(nn.Module):
    """A model holding its head and a metric that reads it, registered in either order."""

    def __init__(self, head: nn.Linear, *, metric_first: bool) -> None:
        super().__init__()
        metric = NeuralCollapse(head.out_features, classifier=head)
        if metric_first:  # the deep copy reaches the metric before the head
            self.metric = metric
            self.head = head
        else:
            self.head = head
            self.metric = metric


def _nc3_reference(features: Tensor, target: Tensor, head: nn.Linear) -> float:
    k = head.out_features
    weight, bias = head.weight.detach(), head.bias.detach()
    return reference_neural_collapse(features, target, k, weight=weight, bias=bias)["nc3"]


@pytest.mark.parametrize("metric_first", [False, True])
def test_a_deep_copy_of_a_model_measures_the_copys_head(metric_first: bool) -> None:
    # copy.deepcopy(model) (an EMA or teacher copy) must bind the copied metric to the copied
    # head, whichever of the two the copy reaches first; a copy of the metric alone (clone)
    # reads the model's live head. NC3 against the float64 two-pass reference on that head.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, head = _case(200, 6, 4, seed=seed)
    model = _ModelWithMetric(head, metric_first=metric_first)
    copied = copy.deepcopy(model)
    alone = model.metric.clone()
    assert copied.metric.classifier is copied.head, f"seed {seed}"
    assert alone.classifier is model.head, f"seed {seed}"
    with torch.no_grad():  # the copy's head diverges (an EMA step), the original is unchanged
        copied.head.weight.add_(torch.randn_like(copied.head.weight))
        copied.head.bias.add_(torch.randn_like(copied.head.bias))
    for metric in (model.metric, copied.metric, alone):
        metric.update(features, target)
    for metric, measured in ((copied.metric, copied.head), (model.metric, head), (alone, head)):
        expected = _nc3_reference(features, target, measured)
        actual = float(metric.compute()["nc3"])
        assert actual == pytest.approx(expected, rel=RTOL, abs=ATOL), f"seed {seed}"
    assert _nc3_reference(features, target, copied.head) != pytest.approx(
        _nc3_reference(features, target, head), rel=1e-3
    ), f"seed {seed}"  # the heads differ enough for the test to tell them apart


@pytest.mark.parametrize("call", ["update", "forward"])
def test_a_deep_copy_lets_the_original_go_at_its_first_update(call: str) -> None:
    # the copied metric kept the deep copy's memo (every object of the original) until its
    # classifier was first read, which `update` does only when it counts NC4: a model replaced
    # by its copy stayed in memory. The first update (or forward) binds the copy and lets go.
    import gc
    import weakref

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, head = _case(40, 6, 4, seed=seed)
    model = _ModelWithMetric(head, metric_first=True)  # the copy reaches the metric first
    original = weakref.ref(model.head.weight)
    copied = copy.deepcopy(model)
    del model, head
    getattr(copied.metric, call)(features, target)
    gc.collect()
    assert original() is None, f"seed {seed}: the original head is still alive"
    assert copied.metric.classifier is copied.head, f"seed {seed}"
    expected = _nc3_reference(features, target, copied.head)
    actual = float(copied.metric.compute()["nc3"])
    assert actual == pytest.approx(expected, rel=RTOL, abs=ATOL), f"seed {seed}"


def test_a_pickled_deep_copy_keeps_its_binding() -> None:
    # a copy pickled (torch.save) before its first use still reads its own head, and a metric
    # copied alone, then pickled alone, carries a copy of the head as any pickle does
    head = nn.Linear(5, 3)
    model = _ModelWithMetric(head, metric_first=True)
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(model), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.metric.classifier is loaded.head
    alone = pickle.loads(pickle.dumps(copy.deepcopy(model.metric)))
    assert isinstance(alone.classifier, nn.Linear)
    assert torch.equal(alone.classifier.weight, head.weight)
    assert copy.deepcopy(copy.deepcopy(model.metric)).classifier is head


def _dirty_allocator() -> None:
    # freed memory full of non-zero values, so that uninitialised states would show
    junk = [torch.full((4096,), 1e300, dtype=torch.float64) for _ in range(16)]
    del junk


def _persistent_metric(head: nn.Linear | None = None) -> Any:
    metric = NeuralCollapse(4, num_features=6, classifier=head)
    metric.persistent(True)
    return metric


def test_deferred_init_of_a_model_holding_a_metric_gives_a_reset_metric() -> None:
    # built under torch.device("meta"), then to_empty (FSDP, Lightning's empty_init): the
    # states and their defaults are zeros (not uninitialised memory), so the metric accumulates
    # from nothing, with reset() or without; reference means set on meta (no values) are cleared
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, _ = _case(120, 6, 4, seed=seed)
    batches = [(features[:70], target[:70]), (features[70:], target[70:])]
    _dirty_allocator()
    check_deferred_init(_persistent_metric, batches)  # states and batch values, bit for bit
    for built_on_meta in (True, False):
        with torch.device("meta" if built_on_meta else "cpu"):
            model = nn.Module()
            model.head = nn.Linear(6, 4)
            model.metric = _persistent_metric(model.head)
        if not built_on_meta:  # updated, with reference means, then moved to meta: no values
            model.metric.update(features, target)
            model.metric.set_class_means(torch.randn(4, 6, dtype=torch.float64))
            model.to("meta")
        _dirty_allocator()
        model.to_empty(device="cpu")
        metric = model.metric
        assert not metric.has_class_means, f"seed {seed}"
        for _ in range(2):  # as moved, then after reset() (a copy of the defaults)
            for name, default in metric._defaults.items():
                for tensor in (getattr(metric, name), default):
                    assert (tensor.device.type, tensor.dtype) == ("cpu", torch.float64)
                    assert torch.equal(tensor, torch.zeros_like(tensor)), f"seed {seed}: {name}"
            metric.reset()
        with torch.no_grad():
            model.head.weight.copy_(torch.randn(4, 6))
            model.head.bias.copy_(torch.randn(4))
        metric.update(features, target)
        out = metric.compute()
        expected = _reference(4, model.head)(features, target)
        assert "nc4" not in out, f"seed {seed}"
        for key, value in expected.items():
            actual = float(out[key])
            assert actual == pytest.approx(value, rel=RTOL, abs=ATOL), f"seed {seed}: {key}"


def test_plot(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    features, target, classifier = _case(90, 4, 3, seed=8)
    metric = NeuralCollapse(3, classifier=classifier)
    metric.update(features, target)
    fig, ax = metric.plot()
    labels = ax.get_legend_handles_labels()[1]
    assert "nc1" in labels
    assert "num_classes_present" not in labels
    values = [metric.compute(), metric.compute()]
    fig2, _ = metric.plot(values)
    # a key present in later results only (NC4 after reference means are set) gets a line too
    later = {**values[1], "nc4": torch.tensor(0.25, dtype=torch.float64)}
    for results in ([values[0], later], [later, values[0]]):
        _, axis = metric.plot(results)
        assert "nc4" in axis.get_legend_handles_labels()[1]
    single = NeuralCollapseNC1(3)
    single.update(features, target)
    fig3, _ = single.plot()
    plt.close("all")
    assert all(f is not None for f in (fig, fig2, fig3))
    import torchmetrics.utilities.plot as tm_plot

    monkeypatch.setattr(tm_plot, "_MATPLOTLIB_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match="matplotlib"):
        single.plot()


# ------------------------------------------------------------------ errors
def _fitted(**kwargs: Any) -> NeuralCollapse:
    metric = NeuralCollapse(3, **kwargs)
    metric.update(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    return metric


_NAN_ROW = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, float("nan"), 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


# Each message names the argument, what was expected and what was received, as a whole.
@pytest.mark.parametrize(
    ("features", "target", "error", "match"),
    [
        (
            torch.randn(4, 2, 2),
            torch.zeros(4, dtype=torch.long),
            ValueError,
            r"^Expected argument `features` to be a 2-D tensor of shape \(num_samples,"
            r" num_features\), but got shape \(4, 2, 2\)\.$",
        ),
        (
            torch.randn(4, 4),
            torch.tensor([0.0, 1.0, 1.0, 2.0]),
            TypeError,
            r"^Expected argument `target` to be an integer tensor of class indices, but got dtype"
            r" torch\.float32\.$",
        ),
        (
            torch.randn(4, 4),
            torch.tensor([0, 1, 3, 1]),
            ValueError,
            r"^Expected argument `target` to hold class indices in \[0, 2\] \(num_classes=3\),"
            r" but got values in \[0, 3\]\.$",
        ),
        (
            torch.randn(4, 4),
            torch.tensor([0, 1, 1]),
            ValueError,
            r"^Expected arguments `features` and `target` to have the same number of samples, but"
            r" got 4 and 3\.$",
        ),
        (
            _NAN_ROW,
            torch.tensor([0, 1, 2]),
            ValueError,
            r"^Expected argument `features` to be finite, but got NaN or Inf in 1 of 3 rows\."
            r" Pass `validate_args=False` to skip this check\.$",
        ),
        (
            torch.full((2, 4), float("inf")),
            torch.tensor([0, 1]),
            ValueError,
            r"^Expected argument `features` to be finite, but got NaN or Inf in 2 of 2 rows\.",
        ),
        (
            torch.randn(2, 5),
            torch.tensor([0, 1]),
            ValueError,
            r"^Expected argument `features` to have 4 features \(columns\), but got shape"
            r" \(2, 5\)\.$",
        ),
    ],
)
def test_update_errors(
    features: torch.Tensor, target: torch.Tensor, error: type, match: str
) -> None:
    metric = _fitted()
    with pytest.raises(error, match=match):
        metric.update(features, target)


def test_validate_args_false_skips_the_value_checks() -> None:
    metric = NeuralCollapse(3, validate_args=False)
    metric.update(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    assert float(metric.statistics[0]) == 1.0


def test_compute_errors() -> None:
    metric = NeuralCollapse(3)
    metric.update(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"at least 2 classes with samples.*got 1 \(classes \[0\]\)"
    ):
        metric.compute()
    nc4 = NeuralCollapseNC4(3, classifier=torch.randn(3, 4))
    nc4.update(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.warns(UserWarning, match=r"NC4 is undefined.*reference class means"):
        assert torch.isnan(nc4.compute())  # no reference means: NaN, as forward gives


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match=r"`classifier` to have a `weight` of shape \(3,"):
        NeuralCollapse(3, classifier=torch.nn.Linear(4, 5))
    layer = torch.nn.Linear(4, 3)
    layer.bias = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"`classifier.bias` to have shape \(num_classes,\)"):
        NeuralCollapse(3, classifier=layer)
    # a wrong type (a module without a weight, a list) is a TypeError naming the type given, a
    # weight of the wrong shape a ValueError
    with pytest.raises(TypeError, match=r"`classifier` to be a module with a `weight`.*ReLU"):
        NeuralCollapse(3, classifier=torch.nn.ReLU())
    with pytest.raises(TypeError, match=r"or such a tensor, but got list\."):
        NeuralCollapse(3, classifier=[[1.0, 0.0]] * 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"but got weight of shape \(3,\)"):
        NeuralCollapse(3, classifier=torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(3, 6\) for num_features=6"):
        NeuralCollapse(3, classifier=torch.nn.Linear(4, 3), num_features=6)
    with pytest.raises(ValueError, match=r"`classifier` .* for NeuralCollapseNC3, but got None"):
        NeuralCollapseNC3(3)
    with pytest.raises(ValueError, match="`num_classes` to be a positive integer"):
        NeuralCollapse(0)
    with pytest.raises(ValueError, match="`global_mean` to be one of"):
        NeuralCollapse(3, global_mean="median")
    with pytest.raises(ValueError, match="Unexpected keyword arguments: `foo`"):
        NeuralCollapse(3, foo=1)
    with pytest.raises(ValueError, match=r"`class_means` to have 3 rows"):
        NeuralCollapse(3, classifier=torch.randn(3, 4), class_means=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"`class_means` to have shape .*num_features=4"):
        NeuralCollapse(3, classifier=torch.randn(3, 4), class_means=torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least one finite row"):
        NeuralCollapse(3, class_means=torch.full((3, 4), float("nan")))
    with pytest.raises(ValueError, match="`num_classes` to be at least 2"):
        NeuralCollapse(1)
    with pytest.warns(UserWarning, match="no `classifier`, so NC4 is not measured"):
        NeuralCollapse(3, class_means=torch.randn(3, 4))


def test_classifier_with_nan_is_named_at_compute_and_in_validated_updates() -> None:
    features, target, _ = _case(30, 4, 3, seed=3)
    layer = torch.nn.Linear(4, 3).double()
    metric = NeuralCollapse(3, classifier=layer, class_means=torch.randn(3, 4))
    metric.update(features, target)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`classifier\.weight` to be finite"):
        metric.compute()
    with pytest.raises(ValueError, match=r"`classifier\.weight` to be finite"):
        metric.update(features, target)  # NC4 would count against a NaN classifier
    with torch.no_grad():
        layer.weight[0, 0] = 0.0
        layer.bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"`classifier\.bias` to be finite"):
        metric.compute()


@pytest.mark.parametrize("factory", [NeuralCollapse, NeuralCollapseNC4])
def test_nc4_survives_a_state_dict_round_trip_without_reference_means(factory: Any) -> None:
    # The counts are saved; the reference means are not (they are inputs, set each epoch).
    # NeuralCollapse and NeuralCollapseNC4 both report the restored counts.
    features, target, _ = _case(60, 4, 3, seed=4)
    weight = torch.randn(3, 4, dtype=torch.float64)
    means = torch.randn(3, 4)
    metric = factory(3, classifier=weight, class_means=means)
    metric.update(features, target)
    metric.persistent(True)
    out = metric.compute()
    expected = out["nc4"] if isinstance(out, dict) else out
    logits = features.double() @ weight.T
    nearest = torch.cdist(features.double(), means.double()).argmin(1)
    assert float(expected) == float((logits.argmax(1) != nearest).double().mean())
    restored = factory(3, classifier=weight)
    restored.load_state_dict(metric.state_dict())
    with pytest.warns(UserWarning, match="called before the ``update``"):  # torchmetrics' own
        result = restored.compute()
    result = result["nc4"] if isinstance(result, dict) else result
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    assert "nc4" not in NeuralCollapse(3, classifier=weight).forward(features, target)


def test_merging_states_of_other_sizes_names_the_mismatch() -> None:
    features, target, _ = _case(30, 4, 3, seed=5)
    mine, theirs = NeuralCollapse(3), NeuralCollapse(3)
    mine.update(features, target)
    theirs.update(torch.cat([features, features], 1), target)
    with pytest.raises(ValueError, match="3 classes and 4 features like this metric"):
        mine.merge_state(theirs)


def test_updates_inside_and_outside_inference_mode() -> None:
    # Lightning validates under torch.inference_mode(); the same metric (and the per-thread scratch
    # buffers) must keep working outside it, and the other way round.
    features, target, _ = _case(90, 4, 3, seed=10)
    metric = NeuralCollapse(3)  # lazily allocated: the first update allocates the state
    with torch.inference_mode():
        metric.update(features[:30], target[:30])
    metric.update(features[30:60], target[30:60])
    with torch.inference_mode():
        metric.update(features[60:], target[60:])
    expected = _reference(3)(features, target)
    np.testing.assert_allclose(float(metric.compute()["nc1"]), expected["nc1"], rtol=RTOL)


def test_reference_means_set_inside_inference_mode_and_counted_outside() -> None:
    # Lightning's validation hooks run under torch.inference_mode(): reference means set there
    # (which restart the NC4 counts) must leave counts that updates outside it can add to.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, classifier = _case(150, 5, 3, spread=1.5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 5, generator=g, dtype=torch.float64)
    metric = NeuralCollapse(3, classifier=classifier, class_means=means)
    metric.update(features[:50], target[:50])  # counted: the next means restart the counts
    with torch.inference_mode():
        metric.set_class_means(None)
        metric.set_class_means(means)
    metric.update(features[50:100], target[50:100])
    with torch.inference_mode():
        metric.update(features[100:], target[100:])
    expected = _nc4_brute_force(features[50:], classifier, means)
    assert float(metric.compute()["nc4"]) == expected, f"seed {seed}"


def test_forward_on_a_batch_without_a_value_keeps_the_accumulated_state() -> None:
    # torchmetrics' forward resets the state to compute the batch's own value, then merges the
    # accumulated state back; a batch of one class has no value, which must not lose the state.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, weight = _case(300, 6, 4, seed=seed)
    last = features[-1:], target[-1:]
    for metric in (
        NeuralCollapse(4),
        NeuralCollapseNC1(4),
        NeuralCollapseNC4(4, classifier=weight),  # no reference means: NC4 has no value
    ):
        if isinstance(metric, NeuralCollapseNC4):
            with pytest.warns(UserWarning, match="no value of its own"):
                metric(features[:-1], target[:-1])
        else:
            metric(features[:-1], target[:-1])
        with pytest.warns(UserWarning, match="no value of its own"):
            value = metric(*last)
        if isinstance(value, dict):
            assert value == {"num_classes_present": torch.tensor(1)}, f"seed {seed}"
        else:
            assert torch.isnan(value), f"seed {seed}"
        assert metric.class_statistics().total == 300, f"seed {seed}"
        if not isinstance(metric, NeuralCollapseNC4):
            expected = neural_collapse(features, target, num_classes=4)["nc1"]
            result = metric.compute()
            nc1 = result["nc1"] if isinstance(result, dict) else result
            torch.testing.assert_close(nc1, expected, rtol=1e-10, atol=0, msg=f"seed {seed}")
        metric.reset()
        metric.update(*last)
        if isinstance(metric, NeuralCollapseNC4):  # nothing counted: NaN, with a warning
            with pytest.warns(UserWarning, match="NC4 is undefined"):
                assert torch.isnan(metric.compute()), f"seed {seed}"
            continue
        with pytest.raises(ValueError, match="class"):  # compute itself still raises
            metric.compute()


def test_casting_a_model_that_holds_the_metric_keeps_the_statistics_in_float64() -> None:
    # model.float(), .half(), .to(torch.bfloat16) reach the metric's states and buffers through
    # _apply: the statistics (and NC4's reference means) must stay float64, counts exact past
    # bfloat16's 256, and NC4 must keep working.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, _ = _case(900, 5, 3, seed=seed)
    head = torch.nn.Linear(5, 3)
    means = torch.stack([features[target == c].mean(0) for c in range(3)]).double()
    model = torch.nn.Module()
    model.head = head
    model.metric = NeuralCollapse(3, classifier=head, class_means=means)
    casts = [
        lambda m: m.float(),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half(),
        lambda m: m.double(),
    ]
    for cast in casts:
        cast(model)
        model.metric.update(features.to(head.weight.dtype), target)
        for tensor in (model.metric.statistics, model.metric.nc4_samples):
            assert tensor.dtype == torch.float64, f"seed {seed}"
    counts = torch.bincount(target, minlength=3).double() * len(casts)
    assert torch.equal(model.metric.class_statistics().counts, counts), f"seed {seed}"
    assert torch.isfinite(model.metric.compute()["nc4"]), f"seed {seed}"


def test_a_zero_initialised_head_is_measured_without_its_angles() -> None:
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, _ = _case(200, 6, 4, seed=seed)
    head = torch.nn.Linear(6, 4)
    torch.nn.init.zeros_(head.weight)
    metric, nc3 = NeuralCollapse(4, classifier=head), NeuralCollapseNC3(4, classifier=head)
    metric.update(features, target)
    nc3.update(features, target)
    with pytest.warns(UserWarning, match="are zero"):
        out = metric.compute()
    assert "nc1" in out, f"seed {seed}"
    assert not [k for k in out if k.startswith(("nc2_weight_", "nc3"))], f"seed {seed}"
    with torch.no_grad():  # one row trained: the rows' Gram matrix (ETF distance) is defined
        head.weight[1] = torch.randn(6, dtype=head.weight.dtype)
    metric._computed = None
    with pytest.warns(UserWarning, match="are zero"):
        partial = metric.compute()
    weight = head.weight.detach().double()
    gram = weight @ weight.T
    simplex = (torch.eye(4, dtype=torch.float64) - 0.25) / math.sqrt(3.0)
    etf = torch.linalg.matrix_norm(gram / torch.linalg.matrix_norm(gram) - simplex)
    torch.testing.assert_close(partial["nc2_weight_etf_distance"], etf, rtol=1e-12, atol=0)
    torch.nn.init.zeros_(head.weight)
    with pytest.warns(UserWarning, match="are zero"), pytest.raises(ValueError, match="`nc3`"):
        nc3.compute()


def test_forward_keeps_the_state_whenever_the_batch_value_is_undefined() -> None:
    # Also when the quantity itself is undefined (NC3 of a zero-initialised head), and NC4 of a
    # batch of one class is a plain ratio of counts: defined.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, weight = _case(120, 6, 4, seed=seed)
    head = torch.nn.Linear(6, 4)
    torch.nn.init.zeros_(head.weight)
    nc3 = NeuralCollapseNC3(4, classifier=head)
    nc3.update(features[:100], target[:100])
    with (
        pytest.warns(UserWarning, match="no value of its own"),
        pytest.warns(UserWarning, match="are zero"),
    ):
        value = nc3(features[100:], target[100:])
    assert torch.isnan(value), f"seed {seed}"
    assert nc3.class_statistics().total == 120, f"seed {seed}"
    means = torch.stack([features[target == c].mean(0) for c in range(4)]).double()
    nc4 = NeuralCollapseNC4(4, classifier=weight, class_means=means)
    nc4(features[:100], target[:100])
    single = nc4(features[:1], target[:1])  # one class: NC4 is still defined
    assert torch.isfinite(single), f"seed {seed}"


def test_update_with_nc4_reads_and_copies_nothing_on_the_accelerator_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Documented: with ``validate_args=False`` ``update`` never synchronises host and device,
    NC4 counted included. Simulated on CPU: the accelerators' new-class selection (no read
    back), every host read refused, and no ``torch.tensor`` from Python values (a blocking
    host-to-device copy on an accelerator); the counts equal a brute-force loop."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    k, d, n = 6, 5, 90
    target = torch.randint(0, k, (n,), generator=g)
    features = 2.0 * torch.randn(k, d, generator=g)[target] + torch.randn(n, d, generator=g)
    head = nn.Linear(d, k).double()
    metric = NeuralCollapse(k, classifier=head, validate_args=False)
    metric.update(features, target)
    means = metric.class_means()
    metric.set_class_means(means)
    original = ClassStatistics._set_new_shifts

    def sync_free(
        self: ClassStatistics, f: torch.Tensor, t: torch.Tensor, **_: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return original(self, f, t, read_back=False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("update read a value on the host or copied one from it")

    with monkeypatch.context() as patch:
        patch.setattr(ClassStatistics, "_set_new_shifts", sync_free)
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            patch.setattr(torch.Tensor, name, refuse)
        patch.setattr(torch, "tensor", refuse)
        for f, t in zip(features.split(30), target.split(30)):
            metric.update(f, t)
    h = features.double()
    with torch.no_grad():
        decided = (h @ head.weight.T + head.bias).argmax(1)
    nearest = torch.cdist(h, means).argmin(1)
    expected = (decided != nearest).double().mean().item()
    assert metric.compute()["nc4"].item() == pytest.approx(expected, abs=1e-12), f"seed {seed}"


def test_nc4_counts_merged_in_are_dropped_by_new_reference_means() -> None:
    """Counts that ``merge_state`` brings in were taken against the sender's means: new means
    drop them, as the metric's own (NC4 is over the samples updated since the current means
    were set); the result equals a metric that saw only the later samples, and a brute-force
    count."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    k, d = 3, 4
    head = nn.Linear(d, k).double()
    first, second = torch.randn(k, d, generator=g), torch.randn(k, d, generator=g)
    h1, h2 = torch.randn(30, d, generator=g), torch.randn(30, d, generator=g)
    y1, y2 = torch.arange(30) % k, torch.randn(30, generator=g).argsort() % k
    sender = NeuralCollapse(k, classifier=head, class_means=first)
    sender.update(h1, y1)
    alone = NeuralCollapse(k, classifier=head, class_means=second)
    alone.update(h2, y2)
    h = h2.double()
    with torch.no_grad():
        decided = (h @ head.weight.T + head.bias).argmax(1)
    expected = (decided != torch.cdist(h, second.double()).argmin(1)).double().mean().item()
    assert alone.compute()["nc4"].item() == pytest.approx(expected, abs=1e-12), f"seed {seed}"
    # the sender itself, its state dict, and a plain dict whose counts are Python numbers
    numbers = dict(sender.metric_state)
    numbers["nc4_mismatches"] = float(sender.nc4_mismatches)
    numbers["nc4_samples"] = float(sender.nc4_samples)
    for incoming in (sender, dict(sender.metric_state), numbers):
        receiver = NeuralCollapse(k, classifier=head)
        receiver.merge_state(incoming)
        assert receiver.nc4_samples.item() == 30  # merged in, as torchmetrics merges
        receiver.set_class_means(second)
        receiver.update(h2, y2)
        assert receiver.nc4_samples.item() == 30, f"seed {seed}"
        nc4 = receiver.compute()["nc4"].item()
        assert nc4 == pytest.approx(expected, abs=1e-12), f"seed {seed}, {type(incoming)}"


def test_merging_no_nc4_counts_keeps_restored_ones_and_compute_sees_the_merge() -> None:
    """A merge that brings no NC4 counts (a metric without reference means) leaves counts
    restored from a state_dict to be kept by the next ``set_class_means``; and ``compute`` after
    ``merge_state`` gives the merged result, not the one cached before (equal to a metric that
    updated on both halves)."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    k, d = 3, 4
    head = nn.Linear(d, k).double()
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    h1, h2 = torch.randn(30, d, generator=g), torch.randn(30, d, generator=g)
    y1, y2 = torch.arange(30) % k, torch.randn(30, generator=g).argsort() % k
    counted = NeuralCollapse(k, classifier=head, class_means=means)
    counted.update(h1, y1)
    counted.persistent(True)
    restored = NeuralCollapse(k, classifier=head)
    restored.persistent(True)
    restored.load_state_dict(counted.state_dict())
    plain = NeuralCollapse(k)
    plain.update(h2, y2)
    restored.merge_state(plain)
    restored.set_class_means(means)
    assert restored.nc4_samples.item() == 30, f"seed {seed}"
    # compute after a merge: not the cached result
    first, second = NeuralCollapse(k), NeuralCollapse(k)
    first.update(h1, y1)
    second.update(h2, y2)
    before = first.compute()["nc1"].item()
    first.merge_state(second)
    both = NeuralCollapse(k)
    both.update(torch.cat([h1, h2]), torch.cat([y1, y2]))
    expected = both.compute()["nc1"].item()
    assert expected != pytest.approx(before, rel=1e-6), f"seed {seed}"
    assert first.compute()["nc1"].item() == pytest.approx(expected, rel=1e-12), f"seed {seed}"


def _nc4_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear, torch.Tensor]:
    """A case with a classifier and reference means far enough from the class means that NC4
    counts mismatches (fresh inputs from ``seed``)."""
    features, target, classifier = _case(120, 5, 4, spread=1.2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, 5, generator=g, dtype=torch.float64)
    return features, target, classifier, means


def test_merged_and_loaded_states_are_copies_never_shared() -> None:
    """``merge_state`` into an empty metric and ``load_state_dict`` take copies: updating the
    receiver leaves the sender (and the loaded dict) as they were, and every metric equals the
    float64 reference over its own samples."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, classifier, means = _nc4_case(seed)
    first, second = slice(0, 60), slice(60, 120)
    reference = _reference(4, classifier, means.numpy())

    def check(metric: NeuralCollapse, rows: slice | None) -> None:
        h, y = (features, target) if rows is None else (features[rows], target[rows])
        out, expected = metric.compute(), reference(h, y)
        np.testing.assert_allclose(float(out["nc1"]), expected["nc1"], rtol=RTOL, err_msg=seed)
        assert float(out["nc4"]) == _nc4_brute_force(h, classifier, means), f"seed {seed}"

    def fresh() -> NeuralCollapse:
        return NeuralCollapse(4, classifier=classifier, class_means=means)

    sender = fresh()
    sender.update(features[first], target[first])
    receiver = fresh()
    receiver.merge_state(sender)
    receiver.update(features[second], target[second])
    check(sender, first)
    check(receiver, None)
    sender.update(features[second], target[second])  # and the other way round
    check(receiver, None)
    assert receiver.statistics.data_ptr() != sender.statistics.data_ptr()

    source = fresh()
    source.update(features[first], target[first])
    source.persistent(True)
    state = source.state_dict()
    saved = {key: value.clone() for key, value in state.items()}
    loaded = [fresh(), fresh()]
    for metric in loaded:
        metric.persistent(True)
        metric.load_state_dict(state)
        metric.set_class_means(means)  # restored counts are kept (taken against these means)
    loaded[0].update(features[second], target[second])
    for key, value in state.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=f"{key}, seed {seed}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The ``compute`` method of metric")  # torchmetrics'
        check(loaded[1], first)
        check(source, first)
    check(loaded[0], None)


def test_loaded_statistics_of_another_dtype_accumulate_in_float64() -> None:
    """A state_dict cast to float16 (its values exact there: small integer features) loads as
    float64 statistics, so that later updates behind an offset of 100, where float16 would
    overflow and float32 lose NC1, match the float64 reference."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    k, d = 3, 3
    y1 = torch.arange(45) % k
    h1 = torch.randint(-2, 3, (45, d), generator=g).double()  # stats below 2048: exact in f16
    y2 = torch.arange(45) % k
    h2 = 100.0 + torch.randn(k, d, generator=g, dtype=torch.float64)[y2]
    h2 = h2 + 1e-3 * torch.randn(45, d, generator=g, dtype=torch.float64)
    source = NeuralCollapseNC1(k)
    source.update(h1, y1)
    source.persistent(True)
    for dtype in (torch.float16, torch.float32):
        state = {key: value.to(dtype) for key, value in source.state_dict().items()}
        restored = NeuralCollapseNC1(k)
        restored.persistent(True)
        restored.load_state_dict(state)
        assert restored.statistics.dtype == torch.float64
        assert restored.nc4_samples.dtype == torch.float64
        restored.update(h2, y2)
        expected = _reference(k)(torch.cat([h1, h2]), torch.cat([y1, y2]))["nc1"]
        np.testing.assert_allclose(
            float(restored.compute()), expected, rtol=RTOL, err_msg=f"{dtype}, seed {seed}"
        )


def test_states_of_another_size_are_refused_at_load_and_merge() -> None:
    features, target, _ = _case(60, 6, 4, seed=12)
    four = NeuralCollapseNC1(4)
    four.update(features, target)
    four.persistent(True)
    with pytest.raises(ValueError, match=r"`statistics` in the loaded state_dict .* 5 classes"):
        NeuralCollapseNC1(5).load_state_dict(four.state_dict())
    with pytest.raises(ValueError, match=r"`statistics` of the incoming state .* 5 classes"):
        NeuralCollapseNC1(5).merge_state(four)
    with pytest.raises(ValueError, match=r"4 classes and 5 features like this metric \(73 values"):
        NeuralCollapseNC1(4, num_features=5).load_state_dict(four.state_dict())
    with pytest.raises(ValueError, match=r"4 classes and 5 features like this metric"):
        NeuralCollapseNC1(4, num_features=5).merge_state(four)
    with pytest.raises(ValueError, match=r"`nc4_samples` in the loaded state_dict to be a real"):
        NeuralCollapseNC1(4).load_state_dict({**four.state_dict(), "nc4_samples": torch.ones(2)})
    # a state saved before any update (empty statistics) loads into a metric of known size
    empty = NeuralCollapseNC1(4)
    empty.persistent(True)
    sized = NeuralCollapseNC1(4, num_features=6)
    sized.load_state_dict(empty.state_dict())
    assert sized.statistics.numel() == ClassStatistics.packed_size(4, 6)
    sized.update(features, target)
    np.testing.assert_allclose(float(sized.compute()), float(four.compute()), rtol=1e-12)


@pytest.mark.parametrize("num_features", [None, 6])
def test_a_metric_built_on_meta_and_loaded_with_assign_holds_the_loaded_states(
    num_features: int | None,
) -> None:
    # torch's way to load a large checkpoint: build under torch.device("meta"), then
    # load_state_dict(sd, assign=True). The states take the loaded tensors' device (as
    # parameters do), in float64, and so do the defaults: compute, reset and update all work.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, head = _case(150, 6, 4, seed=seed)
    model = nn.Module()
    model.head = head
    model.metric = NeuralCollapse(4, classifier=head)
    model.metric.persistent(True)
    model.metric.update(features[:90].float(), target[:90])  # float32 features, float64 states
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    with torch.device("meta"):
        fresh = nn.Module()
        fresh.head = nn.Linear(6, 4)
        fresh.metric = NeuralCollapse(4, classifier=fresh.head, num_features=num_features)
    fresh.metric.persistent(True)
    refused = {**saved, "metric.statistics": saved["metric.statistics"][:-1]}
    with pytest.raises(ValueError, match="`statistics` in the loaded state_dict"):
        fresh.load_state_dict(refused, assign=True)
    assert fresh.metric.statistics.is_meta  # a refused state_dict moves nothing
    fresh.load_state_dict(saved, assign=True)
    metric = fresh.metric
    for name, default in metric._defaults.items():
        for tensor in (getattr(metric, name), default):
            assert (tensor.device.type, tensor.dtype) == ("cpu", torch.float64), name
    reference = _reference(4, fresh.head)
    seen = reference(features[:90], target[:90])
    with pytest.warns(UserWarning, match="called before the ``update``"):  # torchmetrics' own
        out = metric.compute()
    for key, value in seen.items():
        assert float(out[key]) == pytest.approx(value, rel=RTOL, abs=ATOL), f"seed {seed}: {key}"
    metric.update(features[90:], target[90:])  # goes on where the saved metric stopped
    out = metric.compute()
    for key, value in reference(features, target).items():
        assert float(out[key]) == pytest.approx(value, rel=RTOL, abs=ATOL), f"seed {seed}: {key}"
    metric.reset()
    metric.update(features[90:], target[90:])
    out = metric.compute()
    for key, value in reference(features[90:], target[90:]).items():
        assert float(out[key]) == pytest.approx(value, rel=RTOL, abs=ATOL), f"seed {seed}: {key}"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_metric_built_with_num_features_restores_from_a_distributed_checkpoint(
    tmp_path: Any,
) -> None:
    # torch.distributed.checkpoint loads in place into the fresh state_dict at the saved sizes:
    # with num_features the restore is exact; without it the fresh statistics hold 0 values and
    # DCP refuses the checkpoint (documented at `persistent`)
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, _ = _case(80, 6, 4, seed=seed)
    metric = NeuralCollapse(4)
    metric.update(features, target)
    metric.persistent(True)
    dcp.save(metric.state_dict(), checkpoint_id=str(tmp_path))
    unsized = NeuralCollapse(4)
    unsized.persistent(True)
    with pytest.raises(dcp.api.CheckpointException, match="Size mismatch"):
        dcp.load(unsized.state_dict(), checkpoint_id=str(tmp_path))
    sized = NeuralCollapse(4, num_features=6)
    sized.persistent(True)
    state = sized.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    sized.load_state_dict(state)
    assert torch.equal(sized.statistics, metric.statistics), f"seed {seed}"
    sized.update(features, target)
    out = sized.compute()
    expected = _reference(4)(torch.cat([features, features]), torch.cat([target, target]))
    for key, value in expected.items():
        assert float(out[key]) == pytest.approx(value, rel=RTOL, abs=ATOL), f"seed {seed}: {key}"


_K, _D = 4, 5
_LIN = torch.nn.Linear(_D, _K).double()
_MEANS = torch.randn(_K, _D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@pytest.mark.parametrize(
    ("factory", "key"),
    [
        (lambda: NeuralCollapse(_K, num_features=_D), "nc1"),
        (lambda: NeuralCollapse(_K, classifier=_LIN), "nc3"),
        (lambda: NeuralCollapse(_K, classifier=_LIN, class_means=_MEANS), "nc4"),
        (lambda: NeuralCollapseNC1(_K, num_features=_D), "nc1"),
        (lambda: NeuralCollapseCDNV(_K, num_features=_D), "cdnv"),
        (lambda: NeuralCollapseETFDistance(_K, num_features=_D), "nc2_etf_distance"),
        (lambda: NeuralCollapseNC3(_K, classifier=_LIN), "nc3"),
        (lambda: NeuralCollapseNC4(_K, classifier=_LIN, class_means=_MEANS), "nc4"),
    ],
    ids=["nc-sized", "nc-classifier", "nc-means", "nc1", "cdnv", "etf", "nc3", "nc4"],
)
def test_reset_forward_and_compute_under_inference_mode_then_updates_outside(
    factory: Any, key: str
) -> None:
    """The training loop of torchmetrics users: updates, an ``@torch.inference_mode()``
    evaluation that computes, resets and runs ``forward``, then updates outside it again (on
    states allocated in advance: ``num_features`` or a classifier given)."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, _ = _case(200, _D, _K, spread=1.2, seed=seed)
    batches = list(zip(features.split(50), target.split(50)))
    with torch.inference_mode():
        metric = factory()  # even built there
    metric.update(*batches[0])
    with torch.inference_mode():
        metric.compute()
        metric.reset()
    metric.update(*batches[1])
    with torch.inference_mode():
        metric(*batches[2])  # forward: the merged state is built there
    metric.update(*batches[3])
    with torch.inference_mode():
        out = metric.compute()
    value = out[key] if isinstance(out, dict) else out
    expected = _reference(_K, _LIN, _MEANS.numpy())(features[50:], target[50:])[key]
    np.testing.assert_allclose(float(value), expected, rtol=RTOL, atol=ATOL, err_msg=f"{seed}")
    assert not metric.statistics.is_inference()


@pytest.mark.parametrize("num_features", [None, 8])
def test_a_refused_forward_keeps_the_accumulated_state(num_features: int | None) -> None:
    """``forward`` validates the batch before torchmetrics sets the state aside: a batch of
    another feature count (named with the metric's and the batch's), labels out of range, NaN
    features or missing arguments raise and leave the state as it was."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, _ = _case(160, 8, 4, seed=seed)
    metric = NeuralCollapseNC1(4, num_features=num_features)
    metric(features[:80], target[:80])
    nan = features[80:96].clone()
    nan[3, 2] = float("nan")
    refused: list[tuple[tuple[Any, ...], type, str]] = [
        (
            (features[:32, :4], target[:32]),
            ValueError,
            r"argument `features` to have 8 features \(columns\), the feature dimension of this"
            r" metric's statistics, but got shape \(32, 4\)",
        ),
        (
            (features[:8], target[:8] + 4),
            ValueError,
            r"argument `target` to hold class indices in \[0, 3\] \(num_classes=4\), but got"
            rf" values in \[{int(target[:8].min()) + 4}, {int(target[:8].max()) + 4}\]",
        ),
        (
            (nan, target[80:96]),
            ValueError,
            r"argument `features` to be finite, but got NaN or Inf in 1 of 16 rows",
        ),
        ((features[:8],), TypeError, "NeuralCollapseNC1.forward: missing .*'target'"),
        (
            (features[:8].long(), target[:8]),
            TypeError,
            r"argument `features` to be a floating point tensor, but got dtype torch\.int64",
        ),
    ]
    for args, error, match in refused:
        with pytest.raises(error, match=match):
            metric(*args)
        assert metric.class_statistics().total == 80, f"seed {seed}, {match}"
    metric(features[80:], target[80:])
    expected = _reference(4)(features, target)["nc1"]
    np.testing.assert_allclose(float(metric.compute()), expected, rtol=RTOL, err_msg=f"{seed}")


def test_subclasses_overriding_update_keep_their_own_inputs_in_forward() -> None:
    """A subclass whose ``update`` takes other inputs (a feature map pooled over space, labels
    with an ignore value, an extra mask argument) works through ``forward`` as through
    ``update``: the batch check of ``forward`` is the base ``update``'s, run only when
    ``update`` is not overridden. Reference: the float64 two-pass NC1 of the pooled, kept
    samples; the values that reach the base ``update`` are still validated."""

    class Pooled(NeuralCollapseNC1):
        def update(self, features: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
            features = features.mean((2, 3))
            keep = target >= 0 if mask is None else mask & (target >= 0)
            super().update(features[keep], target[keep])

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(90, 6, 3, 3, generator=g, dtype=torch.float64)
    target = torch.arange(90) % 4
    target[::7] = -1  # ignored samples
    mask = torch.rand(90, generator=g) > 0.2
    metric = Pooled(4)
    metric(maps[:40], target[:40], mask=mask[:40])
    metric(maps[40:], target[40:], mask[40:])
    keep = mask & (target >= 0)
    expected = _reference(4)(maps.mean((2, 3))[keep], target[keep])["nc1"]
    np.testing.assert_allclose(float(metric.compute()), expected, rtol=RTOL, err_msg=f"{seed}")
    bad = maps[:8].clone()
    bad[1, 0, 0, 0] = float("nan")  # reaches the base update after pooling: still refused
    with pytest.raises(
        ValueError, match=r"argument `features` to be finite, but got NaN or Inf in 1 of 6 rows"
    ):
        metric(bad, target[:8])
    # ... and the state accumulated before is put back, with torchmetrics' sync settings
    assert metric.class_statistics().total == int(keep.sum()), f"seed {seed}"
    assert metric._to_sync == metric.sync_on_compute
    assert not metric._enable_grad
    np.testing.assert_allclose(float(metric.compute()), expected, rtol=RTOL, err_msg=f"{seed}")


def test_num_features_accepts_any_integer_type() -> None:
    for value in (np.int64(6), np.int32(6), torch.tensor(6), 6):
        metric = NeuralCollapse(3, num_features=value)  # type: ignore[arg-type]
        assert metric.num_features == 6
        assert type(metric.num_features) is int
        assert metric.statistics.numel() == ClassStatistics.packed_size(3, 6)
    for bad in (True, np.bool_(True), 6.0, torch.tensor(6.0), "6"):  # TypeError, as nn.Linear
        with pytest.raises(TypeError, match="`num_features` to be an integer"):
            NeuralCollapse(3, num_features=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`num_features` to be a positive integer, but got 0"):
        NeuralCollapse(3, num_features=0)


def test_states_moved_under_inference_mode_take_updates_outside_it() -> None:
    # a first `.to(device)` inside an inference-mode evaluation (the tracker moves its metrics to
    # the features' device at their first update) makes new tensors: normal ones
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, _ = _case(80, 4, 3, seed=seed)
    metric = NeuralCollapseNC1(3, num_features=4)
    with torch.inference_mode():
        metric._apply(lambda tensor: tensor.clone())  # as a move to another device does
        metric.update(features[:40], target[:40])
    metric.update(features[40:], target[40:])
    expected = _reference(3)(features, target)["nc1"]
    np.testing.assert_allclose(float(metric.compute()), expected, rtol=RTOL, err_msg=f"{seed}")
