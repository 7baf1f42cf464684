"""Minority collapse under long-tailed training, and whether a fixed simplex ETF avoids it.

Fang et al. (2021, "Exploring deep neural networks via layer-peeled model: minority collapse in
imbalanced training") predict that, with a learnable classifier, the classifier vectors of the
minority classes collapse towards each other as the imbalance ratio grows, which costs those
classes their accuracy. Yang et al. (2022, "Inducing neural collapse in imbalanced learning: do we
really need a learnable classifier at the end of deep neural network?") fix the classifier to a
simplex ETF, whose vectors keep the pairwise cosine ``-1/(K-1)`` whatever the data, and train the
features with a dot-regression loss. This study trains, on the same long-tailed subset:

- ``linear_ce``: learnable linear head + cross-entropy;
- ``linear_bsl``: learnable linear head + balanced softmax (Ren et al., 2020),
  :class:`torchcollapse.losses.BalancedSoftmaxLoss`;
- ``etf_ce``: fixed simplex ETF head (:class:`torchcollapse.heads.SimplexETFHead`, normalised
  features, fixed scale) + cross-entropy;
- ``etf_dr``: the ETF head + :class:`torchcollapse.losses.DotRegressionLoss`;
- ``etf_dr_rw``: the same with the class re-weighting ``(n_mean / n_c)^(1/2)`` of Yang et al.

The training set is subsampled to a step (Buda et al., 2018; Cao et al., 2019; the setting of Fang
et al.) or exponential (Cui et al., 2019) profile at each imbalance ratio (``--ratios``), with the
majority classes keeping ``n_max`` samples (default: the smallest class of the full training set);
the test set stays as it is (balanced). Reported, per ratio and run, mean +- std over seeds:
balanced accuracy (mean per-class test accuracy), head (majority) and tail (minority) accuracy,
per-class accuracy (plot), **minority collapse**: the mean pairwise cosine of the minority classes'
classifier vectors and of their centred train class means, and the ratio of the mean classifier
norm of minority to majority classes, against the ETF value ``-1/(K-1)``; and NC1-NC3 on the
(long-tailed) training features. The report checks, from the numbers, whether the learnable
classifier's minority vectors move together as the ratio grows, whether the ETF heads keep the
minority means apart, and whether that buys balanced accuracy.

Commands::

    # default: MNIST-1D, step profile, ratios 10 and 100, 5 runs x 2 seeds each (~1 min, 2 cores)
    python recipes/imbalance.py
    python recipes/imbalance.py --profile exponential --ratios 10 100
    python recipes/imbalance.py --preset paper              # 200 epochs, 3 seeds, ratios 1-100
    python recipes/imbalance.py --resume --out runs/imbalance/<stamp>   # continue
    # GPU: CIFAR-10-LT (exponential, n_max 5000) and ResNet-18 from --data-root
    python recipes/imbalance.py --preset cifar --data-root ~/data
    torchrun --nproc_per_node 4 recipes/imbalance.py --preset cifar --data-root ~/data

Outputs in ``--out`` (default ``runs/imbalance/<timestamp>``): ``config.json``, ``metrics.csv``
(one row per run, seed and epoch; runs are named ``<method>_r<ratio>``), ``per_class.png``,
``minority_collapse.png``, ``curves.png`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from harness.config import TrainConfig, arg, check_choices, check_number, parse_config
from harness.data import Dataset, Split
from harness.evaluate import class_means, extract
from harness.longtail import head_tail_split, long_tail_counts, long_tail_indices
from harness.models import CollapseModel, build_model, simplex_etf_head
from harness.outputs import (
    Panel,
    Stat,
    format_stat,
    markdown_table,
    plot_panels,
    save_figure,
    summarize,
    without_diverged,
    write_report,
)
from harness.train import Experiment, Objective, Runtime
from torch import Tensor

from torchcollapse._distributed import all_reduce_sum, gather_with_grad
from torchcollapse.functional import neural_collapse
from torchcollapse.losses import BalancedSoftmaxLoss, DotRegressionLoss

__all__ = [
    "METHODS",
    "ImbalanceConfig",
    "findings",
    "main",
    "mean_pairwise_cosine",
    "minority_collapse",
    "run_name",
]

#: Display names of the methods.
METHODS = {
    "linear_ce": "linear + CE",
    "linear_bsl": "linear + balanced softmax",
    "etf_ce": "ETF + CE",
    "etf_dr": "ETF + dot regression",
    "etf_dr_rw": "ETF + dot regression, re-weighted",
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 200, "seeds": [0, 1, 2], "eval_every": 10, "ratios": [1, 10, 100]},
    "cifar": {
        "dataset": "cifar10",
        "model": "resnet18",
        "profile": "exponential",
        "ratios": [10, 100],
        "epochs": 200,
        "batch_size": 128,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "seeds": [0, 1, 2],
        "eval_every": 10,
        "warmup_epochs": 5,
    },
}


@dataclasses.dataclass
class ImbalanceConfig(TrainConfig):
    """Settings of the imbalance study (the shared ones are in ``TrainConfig``)."""

    study: ClassVar[str] = "imbalance"

    epochs: int = arg(30, "Training epochs.")
    weight_decay: float = arg(5e-4, "Weight decay of every run (Fang et al. need it).")
    eval_every: int = arg(10, "Evaluate every N epochs (and after the last).")
    profile: Literal["step", "exponential"] = arg("step", "Long-tail profile of the train set.")
    ratios: tuple[float, ...] = arg((10.0, 100.0), "Imbalance ratios n_max / n_min to train at.")
    minority_fraction: float = arg(0.5, "Fraction of minority (tail) classes.")
    max_count: int | None = arg(None, "n_max (default: the smallest class of the train set).")
    methods: tuple[str, ...] = arg(tuple(METHODS), f"Methods, from {', '.join(METHODS)}.")
    etf_scale: float = arg(10.0, "Fixed scale (inverse temperature) of the ETF head under CE.")
    subset_seed: int = arg(0, "Seed of the long-tailed subset (shared by all runs and seeds).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices("methods", self.methods, METHODS)
        if not self.ratios or any(not (math.isfinite(r) and r >= 1) for r in self.ratios):
            raise ValueError(
                "Expected argument `ratios` to hold finite numbers >= 1, but got "
                f"{list(self.ratios)}."
            )
        if len(set(self.ratios)) != len(self.ratios):
            raise ValueError(f"Expected distinct `ratios`, but got {list(self.ratios)}.")
        check_number("minority_fraction", self.minority_fraction, "in (0, 1)", lambda v: 0 < v < 1)
        check_number("etf_scale", self.etf_scale, "a finite number > 0", lambda v: v > 0)
        if self.max_count is not None and self.max_count < 1:
            raise ValueError(
                f"Expected argument `max_count` to be positive, but got {self.max_count}."
            )
        if self.subset_seed < 0:
            raise ValueError(
                f"Expected argument `subset_seed` to be >= 0, but got {self.subset_seed}."
            )


def run_name(method: str, ratio: float) -> str:
    """Name of a run in the CSV: ``<method>_r<ratio>``, e.g. ``etf_dr_r100``."""
    return f"{method}_r{ratio:g}"


# ----------------------------------------------------------------------- minority-collapse maths


def mean_pairwise_cosine(vectors: Tensor) -> float:
    """Mean cosine over the pairs ``i < j`` of the rows of ``vectors`` (float64).

    Example:
        >>> mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # 0, -1, 0
        -0.333...
    """
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(
            "Expected argument `vectors` to be a 2-D tensor with at least two rows, "
            f"but got shape {tuple(vectors.shape)}."
        )
    unit = F.normalize(vectors.double(), dim=1)
    k = unit.shape[0]
    # sum_{i<j} cos_ij = (||sum_i u_i||^2 - k) / 2, no K x K matrix needed.
    pair_sum = (unit.sum(0).square().sum() - unit.square().sum()) / 2
    return float(pair_sum / (k * (k - 1) / 2))


def minority_collapse(weight: Tensor, means: Tensor, minority: Tensor) -> dict[str, float]:
    """Minority-collapse quantities of Fang et al. (2021) for a classifier and class means.

    Args:
        weight: ``(K, d)`` classifier vectors ``w_c`` (rows).
        means: ``(K, d)`` class means ``mu_c``; centred on their unweighted mean (the global mean
            of the formula sheet) before taking cosines.
        minority: ``(K,)`` boolean mask of the minority classes (at least two, and one majority).

    Returns:
        ``minority_w_cos``: mean pairwise cosine of the minority ``w_c``;
        ``minority_mean_cos``: mean pairwise cosine of the minority ``mu_c - mu_G``;
        ``majority_w_cos``: the same for the majority ``w_c`` (one majority class: not reported);
        ``w_norm_ratio``: mean ``||w_c||`` over minority classes / mean over majority classes.
        A simplex ETF gives ``-1/(K-1)`` for every cosine and a norm ratio of 1.

    Example:
        >>> from torchcollapse.frames import simplex_etf
        >>> etf = simplex_etf(4, 3)
        >>> out = minority_collapse(etf, etf, torch.tensor([False, False, True, True]))
        >>> round(out["minority_w_cos"], 6), round(out["w_norm_ratio"], 6)
        (-0.333333, 1.0)
    """
    if weight.ndim != 2 or means.shape != weight.shape:
        raise ValueError(
            "Expected `weight` and `means` to be 2-D tensors of the same shape, but got "
            f"{tuple(weight.shape)} and {tuple(means.shape)}."
        )
    minority = minority.to(torch.bool).cpu()
    if minority.shape != (weight.shape[0],) or int(minority.sum()) < 2 or bool(minority.all()):
        raise ValueError(
            "Expected `minority` to mark at least two of the K classes and leave one majority "
            f"class, but got {minority.tolist()}."
        )
    w = weight.detach().double().cpu()
    mu = means.detach().double().cpu()
    centred = mu - mu.mean(dim=0)
    norms = torch.linalg.vector_norm(w, dim=1)
    out = {
        "minority_w_cos": mean_pairwise_cosine(w[minority]),
        "minority_mean_cos": mean_pairwise_cosine(centred[minority]),
        "w_norm_ratio": float(norms[minority].mean() / norms[~minority].mean()),
    }
    if int((~minority).sum()) >= 2:
        out["majority_w_cos"] = mean_pairwise_cosine(w[~minority])
    return out


# -------------------------------------------------------------------------------------- training


def _classifier_weight(model: CollapseModel, *, unit: bool = False) -> Tensor:
    """The head's ``(K, d)`` classifier: ``weight``, or with ``unit`` a fixed head's bare frame."""
    head = model.get_classifier()
    frame = getattr(head, "frame", None)
    weight = frame if unit and isinstance(frame, Tensor) else getattr(head, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"Expected the head {type(head).__name__} to expose a `weight` tensor, but it has none."
        )
    return weight


def _builder(
    method: str,
    config: ImbalanceConfig,
    input_shape: tuple[int, ...],
    counts: Sequence[int],
    device: torch.device,
) -> Callable[[], tuple[CollapseModel, Objective]]:
    num_classes = len(counts)

    def build() -> tuple[CollapseModel, Objective]:
        head = simplex_etf_head(config.etf_scale) if method.startswith("etf") else None
        model = build_model(
            config.model,
            input_shape,
            num_classes,
            width=config.width,
            feature_dim=config.feature_dim,
            neck_batchnorm=config.neck_batchnorm,
            head=head,
        )
        if method == "linear_bsl":
            balanced = BalancedSoftmaxLoss(counts, reduction="none", device=device)

            def sample_loss(logits: Tensor, features: Tensor, target: Tensor) -> Tensor:
                loss: Tensor = balanced(logits, target)
                return loss

            return model, Objective(sample_loss=sample_loss)
        if method in ("etf_dr", "etf_dr_rw"):
            weights = counts if method == "etf_dr_rw" else None
            dot = DotRegressionLoss(class_counts=weights, reduction="none").to(device)

            def sample_loss(logits: Tensor, features: Tensor, target: Tensor) -> Tensor:
                # Yang et al.: unit features against the unit-norm frame, 1/2 (cos - 1)^2.
                frame = F.normalize(_classifier_weight(model, unit=True), dim=1)
                loss: Tensor = dot(F.normalize(features, dim=1), target, frame)
                return loss

            return model, Objective(sample_loss=sample_loss)
        return model, Objective()

    return build


def _per_class_accuracy(logits: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Correct predictions and samples per class, summed over processes."""
    hits = target[logits.argmax(dim=1) == target]
    correct = torch.bincount(hits, minlength=num_classes).double()
    total = torch.bincount(target, minlength=num_classes).double()
    return all_reduce_sum(correct), all_reduce_sum(total)


def evaluate_imbalance(
    model: CollapseModel, data: Dataset, runtime: Runtime, minority: Tensor
) -> dict[str, float]:
    """Accuracies (overall, balanced, head, tail, per class) and collapse of one evaluation."""
    k = data.num_classes
    minority = minority.to(runtime.device)
    row: dict[str, float] = {}
    shards = {
        "train": extract(model, data.train, data, runtime),
        "test": extract(model, data.test, data, runtime),
    }
    for name, shard in shards.items():
        correct, total = _per_class_accuracy(shard.logits, shard.targets, k)
        present = total > 0
        per_class = correct / total.clamp_min(1)
        row[f"{name}_acc"] = float(correct.sum() / total.sum())
        row[f"{name}_bal_acc"] = float(per_class[present].mean())
        row[f"{name}_head_acc"] = float(per_class[present & ~minority].mean())
        row[f"{name}_tail_acc"] = float(per_class[present & minority].mean())
        if name == "test":
            # a class without test samples has no accuracy (NaN, a gap in the plot), not 0
            row.update(
                {
                    f"test_acc_c{c}": float(per_class[c]) if present[c] else math.nan
                    for c in range(k)
                }
            )
    train = shards["train"]
    weight = _classifier_weight(model).detach()
    row.update(minority_collapse(weight, class_means(train, k), minority))
    features = gather_with_grad(train.features.double())
    targets = gather_with_grad(train.targets)
    values = neural_collapse(features, targets, num_classes=k, weight=weight.double())
    for key in ("nc1", "nc2_equinorm", "nc2_etf_distance", "nc2_weight_etf_distance", "nc3"):
        if key in values:
            row[f"train_{key}"] = float(values[key])
    return row


# ------------------------------------------------------------------------------------ the report

TABLE = {
    "test_bal_acc": "balanced acc",
    "test_head_acc": "head acc",
    "test_tail_acc": "tail acc",
    "minority_w_cos": "minority cos(w)",
    "minority_mean_cos": "minority cos(μ)",
    "w_norm_ratio": "‖w‖ minority/majority",
    "train_nc1": "train NC1",
    "train_nc2_etf_distance": "NC2 (ETF dist.)",
    "train_nc3": "NC3",
}


def _verdict(a: Stat, b: Stat, expect_greater: bool) -> str:
    """Verdict on the claim ``a > b`` (``expect_greater``) or ``a < b``, given the seeds' spread."""
    direction = a.mean > b.mean if expect_greater else a.mean < b.mean
    if not direction:
        return "did not hold here"
    if min(a.n, b.n) < 2:
        return "pointed that way (one seed: no spread to judge it by)"
    if a.separated_from(b):
        return "held (the gap exceeds the spread over seeds)"
    return "pointed that way, but within the spread over seeds"


def _gap(a: Stat, b: Stat) -> str:
    """``higher``/``lower`` and whether the gap exceeds the seeds' spread."""
    word = "higher" if a.mean > b.mean else "lower"
    if min(a.n, b.n) < 2:
        return f"{word} (one seed)"
    return f"{word} ({'beyond' if a.separated_from(b) else 'within'} the spread)"


def findings(
    summary: Mapping[str, Mapping[str, Stat]],
    ratios: Sequence[float],
    methods: Sequence[str],
    num_classes: int,
) -> list[str]:
    """Sentences that answer the study's three questions from the final numbers."""
    etf_value = -1.0 / (num_classes - 1)
    lines: list[str] = []
    lo, hi = min(ratios), max(ratios)

    def stat(method: str, ratio: float, key: str) -> Stat | None:
        run = summary.get(run_name(method, ratio))
        return None if run is None or key not in run or run[key].n == 0 else run[key]

    # 1. Learnable classifiers: minority vectors move together as the ratio grows.
    for method in ("linear_ce", "linear_bsl"):
        if method not in methods:
            continue
        a, b = stat(method, hi, "minority_w_cos"), stat(method, lo, "minority_w_cos")
        if a is None or b is None:
            continue
        if lo == hi:
            lines.append(
                f"**Minority collapse ({METHODS[method]}).** Only one ratio ({hi:g}) was run: "
                f"minority cos(w) = {format_stat(a)} against the ETF value {etf_value:.3f}."
            )
            continue
        na, nb = stat(method, hi, "w_norm_ratio"), stat(method, lo, "w_norm_ratio")
        ma, mb = stat(method, hi, "minority_mean_cos"), stat(method, lo, "minority_mean_cos")
        text = (
            f"**Minority collapse ({METHODS[method]}).** From ratio {lo:g} to {hi:g} the mean "
            f"cosine between minority classifier vectors went from {format_stat(b)} to "
            f"{format_stat(a)} (ETF: {etf_value:.3f}); the claim that they move together as the "
            f"ratio grows {_verdict(a, b, expect_greater=True)}."
        )
        if ma is not None and mb is not None:
            text += f" Minority class means: {format_stat(mb)} -> {format_stat(ma)}."
        if na is not None and nb is not None:
            text += f" Norm ratio minority/majority: {format_stat(nb)} -> {format_stat(na)}."
        lines.append(text)

    # 2. A fixed ETF keeps the minority means apart (its classifier is fixed by construction).
    fixed = [m for m in ("etf_ce", "etf_dr", "etf_dr_rw") if m in methods]
    if "linear_ce" in methods and fixed:
        base = stat("linear_ce", hi, "minority_mean_cos")
        for method in fixed:
            a = stat(method, hi, "minority_mean_cos")
            w = stat(method, hi, "minority_w_cos")
            if a is None or base is None or w is None:
                continue
            lines.append(
                f"**Fixed ETF ({METHODS[method]}, ratio {hi:g}).** Its minority classifier "
                f"vectors keep cosine {format_stat(w)} (fixed); the minority class means have "
                f"cosine {format_stat(a)} vs {format_stat(base)} with the learnable linear head "
                f"(ETF: {etf_value:.3f}): that the ETF keeps them further apart "
                f"{_verdict(a, base, expect_greater=False)}."
            )

    # 3. Does that buy balanced (and tail) accuracy?
    for ratio in sorted(ratios):
        base = stat("linear_ce", ratio, "test_bal_acc")
        base_tail = stat("linear_ce", ratio, "test_tail_acc")
        if base is None or base_tail is None:
            continue
        parts = []
        gains = []
        for method in [m for m in methods if m != "linear_ce"]:
            a, tail = stat(method, ratio, "test_bal_acc"), stat(method, ratio, "test_tail_acc")
            if a is None or tail is None:
                continue
            parts.append(
                f"{METHODS[method]} {format_stat(a)}, {_gap(a, base)} (tail "
                f"{format_stat(tail)} vs {format_stat(base_tail)})"
            )
            if method.startswith("etf"):
                gains.append(_verdict(a, base, expect_greater=True))
        if not parts:
            continue
        text = (
            f"**Balanced accuracy at ratio {ratio:g}**, against linear + CE "
            f"({format_stat(base)}): " + "; ".join(parts) + "."
        )
        if gains:
            verdict = next((g for g in gains if g.startswith("held")), None)
            verdict = verdict or next((g for g in gains if g.startswith("pointed")), gains[0])
            text += f" That a fixed ETF buys balanced accuracy {verdict}."
        lines.append(text)
    best: dict[float, str] = {}
    for ratio in ratios:
        scored = [(s.mean, m) for m in methods if (s := stat(m, ratio, "test_bal_acc")) is not None]
        if scored:
            best[ratio] = max(scored)[1]
    if best:
        lines.append(
            "**Best balanced accuracy:** "
            + ", ".join(f"ratio {r:g}: {METHODS[m]}" for r, m in sorted(best.items()))
            + "."
        )
    return lines


def _plot_per_class(
    summary: Mapping[str, Mapping[str, Stat]],
    config: ImbalanceConfig,
    counts: Mapping[float, Sequence[int]],
    path: Path,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(config.ratios)
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.2 * len(ratios), 3.8), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        k = len(counts[ratio])
        for i, method in enumerate(config.methods):
            stats = summary.get(run_name(method, ratio), {})
            keys = [f"test_acc_c{c}" for c in range(k)]
            if not all(key in stats for key in keys):
                continue
            means = [stats[key].mean for key in keys]
            stds = [stats[key].std for key in keys]
            ax.errorbar(
                range(k), means, yerr=stds, marker="o", ms=3, capsize=2, color=f"C{i}",
                label=METHODS[method],
            )  # fmt: skip
        _, tail = head_tail_split(counts[ratio], config.minority_fraction)
        for c in torch.nonzero(tail).flatten().tolist():
            ax.axvspan(c - 0.5, c + 0.5, color="grey", alpha=0.1, linewidth=0)
        ax.set_title(f"ratio {ratio:g} ({config.profile}); tail shaded")
        ax.set_xlabel("class (train count)")
        ax.set_xticks(range(k), [f"{c}\n({n})" for c, n in enumerate(counts[ratio])], fontsize=7)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    return save_figure(fig, path, handles, names, ncol=3, bottom=0.12)


def _plot_minority(
    summary: Mapping[str, Mapping[str, Stat]], config: ImbalanceConfig, k: int, path: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("minority_w_cos", "cosine of minority classifier vectors", -1 / (k - 1)),
        ("minority_mean_cos", "cosine of minority class means", -1 / (k - 1)),
        ("w_norm_ratio", "‖w‖ minority / majority", 1.0),
    )
    ratios = sorted(config.ratios)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    for ax, (key, title, reference) in zip(axes[0], panels):
        for i, method in enumerate(config.methods):
            points = [
                (r, summary[run_name(method, r)][key])
                for r in ratios
                if key in summary.get(run_name(method, r), {})
            ]
            if points:
                ax.errorbar(
                    [p[0] for p in points], [p[1].mean for p in points],
                    yerr=[p[1].std for p in points], marker="o", capsize=3, color=f"C{i}",
                    label=METHODS[method],
                )  # fmt: skip
        ax.axhline(reference, color="k", linestyle="--", linewidth=1, label="simplex ETF")
        if len(ratios) > 1 and min(ratios) > 0:
            ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("imbalance ratio")
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    return save_figure(fig, path, handles, names, ncol=3, bottom=0.14)


def write_outputs(
    rows: Sequence[Mapping[str, Any]],
    config: ImbalanceConfig,
    counts: Mapping[float, Sequence[int]],
    seconds: float,
) -> Path:
    """Plots, tables and ``report.md`` in ``config.out``; returns the report's path."""
    out = Path(str(config.out))
    k = len(next(iter(counts.values())))
    per_class_keys = [f"test_acc_c{c}" for c in range(k)]
    summary = summarize(rows, [*TABLE, *per_class_keys, "test_acc", "majority_w_cos"])
    kept, left_out = without_diverged(summary, rows)  # NaN means would read as results
    lines = [left_out] if left_out else []
    lines += findings({run: summary[run] for run in kept}, config.ratios, config.methods, k)
    labels = {run_name(m, r): f"{METHODS[m]}, ρ={r:g}" for m in METHODS for r in config.ratios}
    plots = [
        _plot_per_class(summary, config, counts, out / "per_class.png"),
        _plot_minority(summary, config, k, out / "minority_collapse.png"),
        plot_panels(
            rows,
            [
                Panel("balanced test accuracy", {"test_bal_acc": ""}),
                Panel("cosine of minority classifier vectors", {"minority_w_cos": ""}),
                Panel("train NC1", {"train_nc1": ""}, log=True),
            ],
            out / "curves.png",
            labels,
        ),
    ]
    model = {"cnn": "1-D CNN", "mlp": "MLP", "resnet18": "ResNet-18"}[config.model]
    profile = "\n".join(
        f"- ratio {r:g}: {sum(c)} training samples, per class {list(c)}" for r, c in counts.items()
    )
    setting = (
        f"{config.dataset}, {config.profile} profile (minority fraction "
        f"{config.minority_fraction}), {model} (feature dim {config.sizes[1]}), "
        f"{config.epochs} epochs, batch {config.batch_size}, {config.optimizer} lr {config.lr} "
        f"({config.schedule}), weight decay {config.weight_decay}, ETF scale {config.etf_scale}, "
        f"seeds {list(config.seeds)}; wall time {seconds:.0f} s with "
        f"{torch.get_num_threads()} torch thread(s) per process.\n\n{profile}"
    )
    tables = []
    for ratio in config.ratios:
        part = {
            run_name(m, ratio): summary[run_name(m, ratio)]
            for m in config.methods
            if run_name(m, ratio) in summary
        }
        tables.append(
            f"**Ratio {ratio:g}**\n\n"
            + markdown_table(part, TABLE, {run_name(m, ratio): METHODS[m] for m in METHODS})
        )
    note = (
        f"Final epoch, mean ± std over seeds. Balanced accuracy is the mean per-class test "
        f"accuracy; head/tail are its means over the majority/minority classes. Cosines are means "
        f"over pairs of minority classes; the simplex ETF value is -1/(K-1) = {-1 / (k - 1):.3f}. "
        f"Class means are those of the (long-tailed) training features the head reads, centred "
        f"on their unweighted mean; NC1-NC3 follow the formula sheet of torchcollapse."
    )
    return write_report(
        out / "report.md",
        "Minority collapse under class imbalance: learnable classifier vs fixed simplex ETF",
        [
            ("Setting", setting),
            ("Results", "\n\n".join(tables) + "\n\n" + note),
            ("Findings", "\n".join(f"- {line}" for line in lines)),
        ],
        plots,
        rows=rows,
    )


def long_tail_subset(data: Dataset, counts: Sequence[int], seed: int) -> Dataset:
    """``data`` with its training split subsampled to ``counts`` per class (test unchanged)."""
    generator = torch.Generator().manual_seed(seed)
    index = long_tail_indices(data.train.targets.cpu(), counts, generator=generator)
    index = index.to(data.train.targets.device)
    train = Split(data.train.inputs[index], data.train.targets[index])
    return Dataset(data.name, train, data.test, data.num_classes)


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the study; returns the report's path (on every rank)."""
    config = parse_config(ImbalanceConfig, argv, presets=PRESETS, description=__doc__)
    tic = time.perf_counter()
    with Experiment(config) as experiment:
        full, runtime = experiment.data, experiment.runtime
        k = full.num_classes
        available = torch.bincount(full.train.targets.cpu(), minlength=k)
        n_max = config.max_count if config.max_count is not None else int(available.min())
        counts = {
            ratio: long_tail_counts(
                k, n_max, ratio, config.profile, minority_fraction=config.minority_fraction
            )
            for ratio in config.ratios
        }
        # before any training: the minority-collapse measures need >= 2 minority classes
        num_minority = math.floor(config.minority_fraction * k)
        if not 2 <= num_minority <= k - 1:
            raise ValueError(
                f"Expected argument `minority_fraction` to make between 2 and {k - 1} of the {k}"
                f" classes minority classes, but {config.minority_fraction} makes {num_minority}."
            )
        # every ratio's subset and every run's model and objective, before any training
        subsets = {r: long_tail_subset(full, counts[r], config.subset_seed) for r in config.ratios}
        builders = {
            (method, ratio): _builder(
                method, config, full.input_shape, counts[ratio], runtime.device
            )
            for ratio in config.ratios
            for method in config.methods
        }
        for build in builders.values():
            build()
        for ratio in config.ratios:
            data = subsets[ratio]
            experiment.data = data
            _, minority = head_tail_split(counts[ratio], config.minority_fraction)

            def run_evaluation(
                model: CollapseModel, data: Dataset = data, minority: Tensor = minority
            ) -> dict[str, float]:
                return evaluate_imbalance(model, data, runtime, minority)

            for method in config.methods:
                for seed in config.seeds:
                    experiment.run(
                        run_name(method, ratio),
                        seed,
                        builders[(method, ratio)],
                        evaluate=run_evaluation,
                    )
        experiment.data = full
        report = experiment.out / "report.md"
        if runtime.is_main:
            seconds = time.perf_counter() - tic
            write_outputs(experiment.rows, config, counts, seconds)
            print(f"finished in {seconds:.0f} s; report: {report}")
    return report


if __name__ == "__main__":
    main()
