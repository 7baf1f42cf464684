"""Evaluation: accuracy, nearest-class-centre accuracy and every collapse metric, train and test.

For each split the model runs once in eval mode; the features the head's linear map reads
(``forward_head(..., pre_logits=True)``) and the logits are kept for this process's shard of the
split. Then:

- ``{split}_acc``: accuracy of the logits;
- ``train`` class means: exact (float64 sums and counts, reduced over processes);
- ``{split}_nc1``, ``{split}_nc2_*``, ``{split}_nc3``, ... from
  :class:`torchcollapse.metrics.NeuralCollapse` with the model's head as the classifier
  (Papyan, Han & Donoho, 2020);
- ``{split}_nc4``: exact NC4 against the *train* class means (two passes: means first);
- ``{split}_ncc_acc``: accuracy of the nearest-class-centre rule with the train class means;
- with ``layers``: the same metrics at those layers through a
  :class:`~torchcollapse.tracking.CollapseTracker`, as ``{split}_{quantity}@{layer}``.

All reductions go over processes, so one process and ``torchrun`` report the same numbers.
Features or logits that are not finite (a diverged run) raise :class:`harness.train.Diverged` on
every process, before any metric is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.data import Dataset, Split
from harness.models import CollapseModel
from harness.train import Diverged, Runtime
from torchcollapse._distributed import all_reduce_sum
from torchcollapse.metrics import NeuralCollapse
from torchcollapse.tracking import CollapseTracker

__all__ = [
    "LAYER_KEYS",
    "METRIC_KEYS",
    "Features",
    "class_means",
    "evaluate",
    "extract",
    "ncc_accuracy",
]

#: Metric keys reported per split (the subset of NeuralCollapse's output kept in the CSV).
METRIC_KEYS = (
    "nc1",
    "nc1_trace_ratio",
    "cdnv",
    "nc2_equinorm",
    "nc2_equiangularity",
    "nc2_max_angle",
    "nc2_etf_distance",
    "nc2_weight_etf_distance",
    "nc3",
    "nc3_cosine",
    "nc4",
)
#: Metric keys reported per tracked layer.
LAYER_KEYS = ("nc1", "nc1_trace_ratio", "cdnv", "nc2_etf_distance")


@dataclass
class Features:
    """One process's shard of a split: pre-logits features, logits and targets."""

    features: Tensor
    logits: Tensor
    targets: Tensor


def extract(
    model: CollapseModel,
    split: Split,
    data: Dataset,
    runtime: Runtime,
    *,
    batch_size: int = 1024,
    tracker: CollapseTracker | None = None,
) -> Features:
    """Run ``model`` on this rank's shard (``rank::world_size``) of ``split``, no augmentation.

    With ``tracker`` the forward passes are recorded by its hooks.

    Raises:
        Diverged: on every process, when the features or logits of any process are not finite.
    """
    indices = torch.arange(runtime.rank, len(split), runtime.world_size)
    features, logits, targets = [], [], []
    for chunk in indices.split(batch_size):
        inputs, target = split.batch(chunk)
        inputs = data.preprocess(inputs, train=False)
        with torch.no_grad():
            if tracker is not None:
                with tracker.targets(target):
                    raw = model.forward_features(inputs)
            else:
                raw = model.forward_features(inputs)
            features.append(model.forward_head(raw, pre_logits=True).float())
            logits.append(model.forward_head(raw).float())
        targets.append(target)
    shard = Features(torch.cat(features), torch.cat(logits), torch.cat(targets))
    finite = bool(shard.features.isfinite().all()) and bool(shard.logits.isfinite().all())
    # agreed over processes, so that all of them raise (none is left waiting in a collective)
    bad = all_reduce_sum(torch.tensor(float(not finite), device=shard.targets.device))
    if bool(bad > 0):
        raise Diverged(
            f"Expected finite features and logits on the {len(split)} samples, but got NaN or inf."
        )
    return shard


def class_means(shard: Features, num_classes: int) -> Tensor:
    """Exact class means ``(K, d)`` in float64 over all processes (NaN rows for absent classes)."""
    d = shard.features.shape[1]
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=shard.features.device)
    sums.index_add_(0, shard.targets, shard.features.double())
    counts = torch.bincount(shard.targets, minlength=num_classes).double()
    all_reduce_sum(sums)
    all_reduce_sum(counts)
    return sums / counts.unsqueeze(1)


def ncc_accuracy(shard: Features, means: Tensor) -> float:
    """Accuracy of the nearest-class-centre rule ``argmin_c ||h - mu_c||`` over all processes."""
    present = ~means.isnan().any(dim=1)
    distances = torch.cdist(shard.features.double(), means.nan_to_num())
    distances[:, ~present] = float("inf")
    return _global_fraction(distances.argmin(dim=1) == shard.targets)


def _global_fraction(hits: Tensor) -> float:
    """Fraction of ``True`` in ``hits`` over the samples of every process."""
    counts = torch.stack([hits.sum(), torch.tensor(hits.numel(), device=hits.device)]).double()
    all_reduce_sum(counts)
    return float(counts[0] / counts[1])


def evaluate(
    model: CollapseModel,
    data: Dataset,
    runtime: Runtime,
    *,
    batch_size: int = 1024,
    layers: Sequence[str] | None = None,
) -> dict[str, float]:
    """Every number of one evaluation (see the module docstring); the model must be in eval mode."""
    num_classes = data.num_classes
    tracker = CollapseTracker(model, list(layers), num_classes) if layers is not None else None
    shards: dict[str, Features] = {}
    row: dict[str, float] = {}
    try:
        for name, split in (("train", data.train), ("test", data.test)):
            shards[name] = extract(
                model, split, data, runtime, batch_size=batch_size, tracker=tracker
            )
            if tracker is not None:
                for layer, values in tracker.compute().items():
                    for key in LAYER_KEYS:
                        row[f"{name}_{key}@{layer}"] = float(values[key])
                tracker.reset()
    finally:
        if tracker is not None:
            tracker.remove()
    means = class_means(shards["train"], num_classes)
    for name, shard in shards.items():
        row[f"{name}_acc"] = _global_fraction(shard.logits.argmax(dim=1) == shard.targets)
        row[f"{name}_ncc_acc"] = ncc_accuracy(shard, means)
        metric = NeuralCollapse(num_classes, classifier=model.get_classifier()).to(runtime.device)
        metric.set_class_means(means)
        metric.update(shard.features, shard.targets)
        values = metric.compute()
        row.update({f"{name}_{k}": float(values[k]) for k in METRIC_KEYS if k in values})
    return row
