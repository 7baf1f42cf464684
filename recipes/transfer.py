"""Does collapse on the source classes help or hurt features for new classes?

Kornblith et al. (2021, "Why do better loss functions lead to less transferable features?") and Hui
et al. (2022, "Limitations of neural collapse for understanding generalization in deep learning")
report that objectives which collapse the penultimate features more on the pre-training classes
give features that transfer worse to a linear probe on other classes. Galanti, György & Hutter
(2022, "On the role of neural collapse in transfer learning") argue that collapse *measured on the
new classes* (their class-distance normalized variance, CDNV) predicts few-shot accuracy there.

This study pre-trains on the source classes (MNIST-1D digits 0-4; CIFAR-100: the first 80
classes) with objectives that set the strength of collapse:

- ``ce``: cross-entropy (learnable linear head), the baseline;
- ``reg_neg`` / ``reg_pos``: cross-entropy + :class:`torchcollapse.losses.CollapseRegularizer`
  with a negative (holds collapse back) or positive (pushes it) NC1 weight;
- ``reg_target``: the regularizer aiming at a target NC1 level instead of zero;
- ``ls``: cross-entropy with label smoothing (Kornblith et al.'s strongest collapser);
- ``etf``: a fixed simplex ETF head (:class:`torchcollapse.heads.SimplexETFHead`).

Then the penultimate features (``forward_features``, frozen) are evaluated on the target classes
(MNIST-1D 5-9; CIFAR-100 the other 20): a full-data linear probe (multinomial logistic regression
in torch, L-BFGS on standardized features), nearest-class-mean few-shot accuracy with 1, 5, 20
shots and all data (several random draws of the support), and NC1 and CDNV on the target classes;
NC1 on the source classes too. The report plots target accuracy against source NC1 and against
target CDNV with Spearman's rank correlation (pooled over runs and seeds, with a permutation
p-value, and per seed), tabulates each configuration as mean +- std over seeds, and says from
those numbers whether each claim held here.

Commands::

    # default: MNIST-1D, 6 objectives x 3 seeds (~1 min on 2 CPU cores)
    python recipes/transfer.py
    python recipes/transfer.py --preset paper        # 100 epochs, 5 seeds (long)
    python recipes/transfer.py --resume --out runs/transfer/<stamp>   # continue
    # GPU: CIFAR-100 (80 source / 20 target classes) and ResNet-18 from --data-root
    python recipes/transfer.py --preset cifar --data-root ~/data
    torchrun --nproc_per_node 4 recipes/transfer.py --preset cifar --data-root ~/data

Outputs in ``--out`` (default ``runs/transfer/<timestamp>``): ``config.json``, ``metrics.csv`` (one
row per run, seed and epoch; the last row of each run also holds the transfer columns),
``scatter.png``, ``curves.png`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from harness.config import TrainConfig, arg, check_choices, check_number, parse_config
from harness.data import Dataset, Split
from harness.evaluate import evaluate
from harness.models import CollapseModel, build_model, simplex_etf_head
from harness.outputs import (
    Panel,
    Stat,
    final_rows,
    format_stat,
    markdown_table,
    plot_panels,
    save_figure,
    summarize,
    without_diverged,
    write_report,
)
from harness.probe import (
    few_shot_ncm_accuracy,
    fit_linear_probe,
    spearman_correlation,
    spearman_permutation_test,
)
from harness.train import Experiment, Objective, Runtime
from torch import Tensor

from torchcollapse._distributed import gather_with_grad
from torchcollapse.functional import neural_collapse
from torchcollapse.losses import CollapseRegularizer

__all__ = [
    "RUNS",
    "TransferConfig",
    "correlations",
    "findings",
    "main",
    "split_classes",
    "transfer_metrics",
]

#: Display names of the runs.
RUNS = {
    "ce": "CE",
    "reg_neg": "CE + reg. (NC1 weight < 0)",
    "reg_pos": "CE + reg. (NC1 weight > 0)",
    "reg_target": "CE + reg. (target NC1)",
    "ls": "CE + label smoothing",
    "etf": "ETF head",
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 100, "seeds": [0, 1, 2, 3, 4], "eval_every": 10},
    "cifar": {
        "dataset": "cifar100",
        "model": "resnet18",
        "epochs": 200,
        "batch_size": 128,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "seeds": [0, 1, 2],
        "eval_every": 20,
        "warmup_epochs": 2,
        "probe_weight_decay": 1e-4,
    },
}


@dataclasses.dataclass
class TransferConfig(TrainConfig):
    """Settings of the transfer study (the shared ones are in ``TrainConfig``)."""

    study: ClassVar[str] = "transfer"

    epochs: int = arg(30, "Training epochs on the source classes.")
    seeds: tuple[int, ...] = arg((0, 1, 2), "Seeds; each run is repeated once per seed.")
    weight_decay: float = arg(5e-4, "Weight decay of every run.")
    eval_every: int = arg(10, "Evaluate the source every N epochs (and after the last).")
    source_classes: int | None = arg(
        None, "Classes 0..S-1 are the source, the rest the target (default: 5; CIFAR-100: 80)."
    )
    runs: tuple[str, ...] = arg(tuple(RUNS), f"Runs to train, from {', '.join(RUNS)}.")
    reg_weight: float = arg(1.0, "Magnitude of the regularizer's NC1 weight (reg_neg/pos/target).")
    target_nc1: float = arg(0.2, "Target of `reg_target`, bounded NC1 trΣW/(trΣW+trΣB) in [0, 1].")
    label_smoothing: float = arg(0.3, "Label smoothing of the `ls` run.")
    etf_scale: float = arg(10.0, "Fixed scale (inverse temperature) of the ETF head.")
    shots: tuple[int, ...] = arg((1, 5, 20), "Shots per class of the few-shot evaluation.")
    draws: int = arg(20, "Random support sets per shot count.")
    probe_weight_decay: float = arg(1e-3, "L2 penalty of the linear probe (standardized features).")
    permutations: int = arg(10_000, "Permutations of the rank-correlation test.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices("runs", self.runs, RUNS)
        if not self.shots or any(s < 1 for s in self.shots):
            raise ValueError(
                f"Expected argument `shots` to hold positive integers, but got {list(self.shots)}."
            )
        if self.draws < 1:
            raise ValueError(f"Expected argument `draws` to be at least 1, but got {self.draws}.")
        check_number("reg_weight", self.reg_weight, "a finite number > 0", lambda v: v > 0)
        check_number("target_nc1", self.target_nc1, "in [0, 1]", lambda v: 0 <= v <= 1)
        check_number("label_smoothing", self.label_smoothing, "in [0, 1)", lambda v: 0 <= v < 1)
        check_number("etf_scale", self.etf_scale, "a finite number > 0", lambda v: v > 0)
        check_number(
            "probe_weight_decay", self.probe_weight_decay, "a finite number >= 0", lambda v: v >= 0
        )
        if self.permutations < 1:
            raise ValueError(
                f"Expected argument `permutations` to be at least 1, but got {self.permutations}."
            )
        if self.source_classes is not None and self.source_classes < 2:
            raise ValueError(
                "Expected argument `source_classes` to be at least 2, but got "
                f"{self.source_classes}."
            )


# ------------------------------------------------------------------------------------------ data


def _subset(split: Split, keep: Tensor, offset: int) -> Split:
    return Split(split.inputs[keep], split.targets[keep] - offset)


def split_classes(data: Dataset, source_classes: int) -> tuple[Dataset, Dataset]:
    """The source dataset (classes ``< S``) and the target dataset (classes ``>= S``, relabelled
    ``0..K-S-1``), each with its train and test split.

    Example:
        >>> y = torch.tensor([0, 3, 1, 2])
        >>> data = Dataset("toy", Split(y.float()[:, None], y), Split(y.float()[:, None], y), 4)
        >>> source, target = split_classes(data, 2)
        >>> source.train.targets.tolist(), target.train.targets.tolist(), target.num_classes
        ([0, 1], [1, 0], 2)
    """
    k = data.num_classes
    if not 2 <= source_classes <= k - 2:
        raise ValueError(
            f"Expected argument `source_classes` to leave at least two classes on each side of "
            f"the {k}, but got {source_classes}."
        )
    parts = []
    for low, high in ((0, source_classes), (source_classes, k)):
        train = (data.train.targets >= low) & (data.train.targets < high)
        test = (data.test.targets >= low) & (data.test.targets < high)
        parts.append(
            Dataset(
                data.name,
                _subset(data.train, train, low),
                _subset(data.test, test, low),
                high - low,
            )
        )
    return parts[0], parts[1]


# -------------------------------------------------------------------------------------- training


def _builder(
    name: str, config: TransferConfig, input_shape: tuple[int, ...], num_classes: int
) -> Callable[[], tuple[CollapseModel, Objective]]:
    def build() -> tuple[CollapseModel, Objective]:
        head = simplex_etf_head(config.etf_scale) if name == "etf" else None
        model = build_model(
            config.model,
            input_shape,
            num_classes,
            width=config.width,
            feature_dim=config.feature_dim,
            neck_batchnorm=config.neck_batchnorm,
            head=head,
        )
        if name == "ls":

            def smoothed(logits: Tensor, features: Tensor, target: Tensor) -> Tensor:
                return F.cross_entropy(
                    logits.float(), target, reduction="none", label_smoothing=config.label_smoothing
                )

            return model, Objective(sample_loss=smoothed)
        if name.startswith("reg_"):
            weight = -config.reg_weight if name == "reg_neg" else config.reg_weight
            target_nc1 = config.target_nc1 if name == "reg_target" else None
            regularizer = CollapseRegularizer(num_classes, nc1=weight, target_nc1=target_nc1)

            def batch_loss(features: Tensor, logits: Tensor, target: Tensor) -> Tensor:
                loss: Tensor = regularizer(features, target)
                return loss

            return model, Objective(batch_loss=batch_loss)
        return model, Objective()

    return build


def _penultimate(model: CollapseModel, data: Dataset, split: Split, runtime: Runtime) -> Split:
    """Frozen ``forward_features`` of a whole split, gathered from every process (float64).

    Each process runs its shard (``rank::world_size``); the gathered rows are put back in the
    split's order, so that whatever is drawn by position (the few-shot support) is the same
    for one process and N.
    """
    device = split.targets.device
    index = torch.arange(runtime.rank, len(split), runtime.world_size)
    features, targets = [], []
    with torch.no_grad():
        for chunk in index.split(1024):
            inputs, target = split.batch(chunk)
            features.append(model.forward_features(data.preprocess(inputs, train=False)).double())
            targets.append(target)
    local = (
        torch.cat(features)
        if features
        else torch.zeros(0, model.feature_dim, dtype=torch.float64, device=device)
    )
    local_target = (
        torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long, device=device)
    )
    if runtime.world_size == 1:
        return Split(local, local_target)
    order = torch.argsort(gather_with_grad(index.to(device)))  # gathered row -> sample
    return Split(gather_with_grad(local)[order], gather_with_grad(local_target)[order])


def transfer_metrics(
    model: CollapseModel,
    source: Dataset,
    target: Dataset,
    runtime: Runtime,
    config: TransferConfig,
    seed: int,
) -> dict[str, float]:
    """Source NC1, target NC1/CDNV, linear-probe and few-shot accuracy of the frozen features."""
    model.eval()
    src = _penultimate(model, source, source.train, runtime)
    train = _penultimate(model, target, target.train, runtime)
    test = _penultimate(model, target, target.test, runtime)
    row: dict[str, float] = {}
    values = neural_collapse(src.inputs, src.targets, num_classes=source.num_classes)
    row["source_nc1"] = float(values["nc1"])
    ratio = float(values["nc1_trace_ratio"])
    row["source_nc1_bounded"] = ratio / (1 + ratio)  # trΣW / (trΣW + trΣB), the regularizer's
    values = neural_collapse(train.inputs, train.targets, num_classes=target.num_classes)
    row["target_nc1"] = float(values["nc1"])
    row["target_cdnv"] = float(values["cdnv"])
    probe = fit_linear_probe(
        train.inputs, train.targets, target.num_classes, weight_decay=config.probe_weight_decay
    )
    row["probe_acc"] = float(
        (probe.predict(test.inputs).cpu() == test.targets.cpu()).double().mean()
    )
    row["probe_grad_norm"] = probe.grad_norm
    generator = torch.Generator().manual_seed(10_007 * seed + 17)
    for shots in config.shots:
        acc = few_shot_ncm_accuracy(
            train.inputs.cpu(),
            train.targets.cpu(),
            shots,
            num_classes=target.num_classes,
            num_draws=config.draws,
            query_features=test.inputs.cpu(),
            query_target=test.targets.cpu(),
            generator=generator,
        )
        row[f"ncm_{shots}shot_acc"] = float(acc.mean())
        row[f"ncm_{shots}shot_std"] = float(acc.std()) if len(acc) > 1 else 0.0
    row["ncm_all_acc"] = float(
        few_shot_ncm_accuracy(
            train.inputs.cpu(),
            train.targets.cpu(),
            None,
            num_classes=target.num_classes,
            query_features=test.inputs.cpu(),
            query_target=test.targets.cpu(),
        )[0]
    )
    return row


# ------------------------------------------------------------------------------------ the report


def accuracy_columns(config: TransferConfig) -> dict[str, str]:
    """Target-accuracy columns and their headers: the probe, each shot count, all data."""
    columns = {"probe_acc": "linear probe"}
    columns.update({f"ncm_{s}shot_acc": f"NCM {s}-shot" for s in config.shots})
    columns["ncm_all_acc"] = "NCM all"
    return columns


PREDICTORS = {"source_nc1": "source NC1", "target_nc1": "target NC1", "target_cdnv": "target CDNV"}


@dataclasses.dataclass(frozen=True)
class Correlation:
    """Spearman's rho pooled over (run, seed) points, its permutation p-value and per-seed rhos."""

    rho: float
    p_value: float
    points: int
    per_seed: Stat

    @property
    def undefined_because(self) -> str:
        """Why ``rho`` is NaN: too few points, or a constant column."""
        return f"only {self.points} points" if self.points < 3 else "a constant column"

    def describe(self) -> str:
        if math.isnan(self.rho):
            return f"undefined ({self.undefined_because})"
        seeds = (
            f"; per seed {format_stat(self.per_seed, 2)} over {self.per_seed.n} seeds"
            if self.per_seed.n > 0
            else ""
        )
        return f"ρ = {self.rho:+.2f} (p = {self.p_value:.3g}, n = {self.points}{seeds})"


def _varies(values: Tensor) -> bool:
    """Whether ``values`` hold at least two distinct numbers (a rank correlation is defined)."""
    return len(values.unique()) >= 2


def correlations(
    finals: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    *,
    permutations: int = 10_000,
) -> Correlation:
    """Rank correlation of ``y_key`` on ``x_key`` over the final rows (one per run and seed).

    Points where a value is NaN are left out; with fewer than three points left, or a constant
    column, the correlation is undefined (NaN). Any other error is raised.
    """
    points = [
        (float(r[x_key]), float(r[y_key]), int(r["seed"]))
        for r in finals
        if x_key in r and y_key in r and not (math.isnan(r[x_key]) or math.isnan(r[y_key]))
    ]
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    if len(points) < 3 or not (_varies(x) and _varies(y)):
        return Correlation(math.nan, math.nan, len(points), Stat.of([]))
    rho, p_value = spearman_permutation_test(
        x, y, num_permutations=permutations, generator=torch.Generator().manual_seed(0)
    )
    per_seed = []
    for seed in sorted({p[2] for p in points}):
        xs = torch.tensor([p[0] for p in points if p[2] == seed], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in points if p[2] == seed], dtype=torch.float64)
        if len(xs) >= 3 and _varies(xs) and _varies(ys):
            per_seed.append(spearman_correlation(xs, ys))
    return Correlation(rho, p_value, len(points), Stat.of(per_seed))


def _claim_verdict(corr: Correlation, expect_positive: bool, alpha: float = 0.05) -> str:
    if math.isnan(corr.rho):
        return f"could not be checked ({corr.undefined_because})"
    agrees = corr.rho > 0 if expect_positive else corr.rho < 0
    if not agrees:
        return "did not hold here"
    if corr.p_value < alpha:
        seeds = corr.per_seed
        if seeds.n > 1 and (
            seeds.mean - seeds.std > 0 if expect_positive else seeds.mean + seeds.std < 0
        ):
            return "held (significant pooled, and consistent across seeds)"
        return "held pooled (significant), but the per-seed correlations vary"
    return "pointed that way, but not significantly (p >= 0.05)"


def _leave_one_out(
    finals: Sequence[Mapping[str, Any]], x_key: str, y_key: str, permutations: int
) -> str:
    """How the pooled correlation moves when one configuration (all its seeds) is left out."""
    runs = list(dict.fromkeys(str(r["run"]) for r in finals))
    if len(runs) < 3:
        return ""
    results = []
    for run in runs:
        corr = correlations(
            [r for r in finals if str(r["run"]) != run], x_key, y_key, permutations=permutations
        )
        if not math.isnan(corr.rho):
            results.append((corr, run))
    if not results:
        return ""
    weakest = max(results, key=lambda item: item[0].p_value)
    rhos = [c.rho for c, _ in results]
    return (
        f" (leaving one configuration out, ρ spans {min(rhos):+.2f} to {max(rhos):+.2f}; the "
        f"largest p is {weakest[0].p_value:.3g}, without {RUNS.get(weakest[1], weakest[1])})"
    )


def _decreasing(values: Sequence[float]) -> bool:
    return all(a > b for a, b in itertools.pairwise(values))


def findings(
    summary: Mapping[str, Mapping[str, Stat]],
    finals: Sequence[Mapping[str, Any]],
    config: TransferConfig,
) -> list[str]:
    """Sentences that check the two claims from the final numbers (nothing hard-coded)."""
    lines: list[str] = []
    probe = correlations(finals, "source_nc1", "probe_acc", permutations=config.permutations)
    lines.append(
        "**Claim 1: more collapse on the source hurts a full-data linear probe** (Kornblith et "
        "al., 2021; Hui et al., 2022). Expected: lower source NC1, lower probe accuracy "
        f"(ρ > 0). Found {probe.describe()}: {_claim_verdict(probe, expect_positive=True)}"
        f"{_leave_one_out(finals, 'source_nc1', 'probe_acc', config.permutations)}."
    )
    arms = [r for r in ("reg_neg", "ce", "reg_pos") if r in summary]
    if len(arms) >= 2:
        # The regularizer's own quantity, then NC1 and the probe, from least to most pushed.
        def values(key: str) -> str:
            return " / ".join(format_stat(summary[r][key]) for r in arms)

        bounded = [summary[r]["source_nc1_bounded"].mean for r in arms]
        nc1 = [summary[r]["source_nc1"].mean for r in arms]
        probe_acc = [summary[r]["probe_acc"].mean for r in arms]
        first, last = summary[arms[0]]["probe_acc"], summary[arms[-1]]["probe_acc"]
        lines.append(
            f"Direct intervention ({' / '.join(RUNS[r] for r in arms)}): the bounded NC1 "
            f"trΣW/(trΣW+trΣB) that the regularizer acts on was {values('source_nc1_bounded')} "
            f"({'decreasing, as intended' if _decreasing(bounded) else 'NOT monotone'}); NC1 "
            f"was {values('source_nc1')} ({'decreasing' if _decreasing(nc1) else 'not monotone'}"
            f"); probe accuracy {values('probe_acc')} ("
            + ("decreasing with collapse" if _decreasing(probe_acc) else "not monotone")
            + f"; {RUNS[arms[0]]} vs {RUNS[arms[-1]]}: gap "
            + ("more than" if first.separated_from(last) else "within")
            + " the spread over seeds)."
        )
    few = []
    for shots in config.shots:
        corr = correlations(
            finals, "target_cdnv", f"ncm_{shots}shot_acc", permutations=config.permutations
        )
        few.append(
            f"{shots}-shot: {corr.describe()}, {_claim_verdict(corr, expect_positive=False)}"
            + _leave_one_out(finals, "target_cdnv", f"ncm_{shots}shot_acc", config.permutations)
        )
    lines.append(
        "**Claim 2: collapse on the new classes (CDNV) predicts few-shot accuracy** (Galanti et "
        "al., 2022). Expected: lower target CDNV, higher NCM accuracy (ρ < 0). Found: "
        + "; ".join(few)
        + "."
    )
    source_few = correlations(
        finals, "source_nc1", f"ncm_{config.shots[0]}shot_acc", permutations=config.permutations
    )
    lines.append(
        f"For comparison, source NC1 against {config.shots[0]}-shot accuracy: "
        f"{source_few.describe()}."
    )
    lines.append(
        "Points are (run, seed) pairs; p-values come from a permutation test of Spearman's ρ and "
        "are not corrected for the several comparisons above."
    )
    return lines


def _plot_scatter(finals: Sequence[Mapping[str, Any]], config: TransferConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = accuracy_columns(config)
    predictors = {"source_nc1": "source NC1", "target_cdnv": "target CDNV"}
    fig, axes = plt.subplots(
        len(predictors), len(columns), figsize=(3.4 * len(columns), 3.2 * len(predictors)),
        squeeze=False,
    )  # fmt: skip
    runs = list(dict.fromkeys(str(r["run"]) for r in finals))
    for i, (x_key, x_label) in enumerate(predictors.items()):
        for j, (y_key, y_label) in enumerate(columns.items()):
            ax = axes[i][j]
            positive = False
            for c, run in enumerate(runs):
                pts = [r for r in finals if str(r["run"]) == run and x_key in r and y_key in r]
                positive = positive or any(float(r[x_key]) > 0 for r in pts)
                ax.scatter(
                    [float(r[x_key]) for r in pts], [float(r[y_key]) for r in pts],
                    color=f"C{c}", s=18, label=RUNS.get(run, run),
                )  # fmt: skip
            corr = correlations(finals, x_key, y_key, permutations=1000)
            if positive:  # no point at all when every run diverged
                ax.set_xscale("log")
            ax.set_title(f"{y_label}: ρ = {corr.rho:+.2f}", fontsize=9)
            ax.set_xlabel(x_label, fontsize=8)
            ax.set_ylabel("target accuracy", fontsize=8)
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    return save_figure(fig, path, handles, names, ncol=6, bottom=0.07)


def write_outputs(
    rows: Sequence[Mapping[str, Any]], config: TransferConfig, seconds: float
) -> Path:
    """Plots, tables and ``report.md`` in ``config.out``; returns the report's path."""
    out = Path(str(config.out))
    columns = accuracy_columns(config)
    finals = final_rows(rows, "probe_acc")
    table = {
        "test_acc": "source test acc",
        "source_nc1_bounded": "source trΣW/(trΣW+trΣB)",
        "source_nc1": "source NC1",
        "target_nc1": "target NC1",
        "target_cdnv": "target CDNV",
        **columns,
    }
    summary = summarize(rows, list(table), key="probe_acc")
    kept, left_out = without_diverged(summary, rows)  # NaN means would read as results
    lines = [left_out] if left_out else []
    lines += findings({run: summary[run] for run in kept}, finals, config)
    plots = [
        _plot_scatter(finals, config, out / "scatter.png"),
        plot_panels(
            rows,
            [
                Panel("source train NC1 (head features)", {"train_nc1": ""}, log=True),
                Panel("source test accuracy", {"test_acc": ""}),
            ],
            out / "curves.png",
            RUNS,
        ),
    ]
    corr_lines = [
        "| target accuracy | vs source NC1 | vs target NC1 | vs target CDNV |",
        "|---|---|---|---|",
    ]
    for y_key, y_label in columns.items():
        cells = [
            correlations(finals, x_key, y_key, permutations=config.permutations).describe()
            for x_key in PREDICTORS
        ]
        corr_lines.append(f"| {y_label} | " + " | ".join(cells) + " |")
    model = {"cnn": "1-D CNN", "mlp": "MLP", "resnet18": "ResNet-18"}[config.model]
    source = _source_classes(config)
    setting = (
        f"{config.dataset}: source classes 0-{source - 1}, target classes the rest; {model} "
        f"(feature dim {config.sizes[1]}), {config.epochs} epochs, batch {config.batch_size}, "
        f"{config.optimizer} lr {config.lr} ({config.schedule}), weight decay "
        f"{config.weight_decay}, seeds {list(config.seeds)}. Regularizer NC1 weight "
        f"±{config.reg_weight} (bounded NC1), target NC1 {config.target_nc1}; label smoothing "
        f"{config.label_smoothing}; ETF scale {config.etf_scale}. Linear probe: L2 "
        f"{config.probe_weight_decay} on standardized features, fit on the target train split, "
        f"tested on the target test split; NCM: supports drawn {config.draws} times from the "
        f"target train split, queries the target test split. Wall time {seconds:.0f} s with "
        f"{torch.get_num_threads()} torch thread(s) per process."
    )
    note = (
        "Final epoch, mean ± std over seeds. NC1 = tr(Σ_W Σ_B⁺)/K and CDNV (Galanti et al., 2022) "
        "on the penultimate features (`forward_features`); source NC1 on the source train split, "
        "target NC1 and CDNV on the target train split."
    )
    return write_report(
        out / "report.md",
        "Collapse on the source classes and transfer to new classes",
        [
            ("Setting", setting),
            ("Results", markdown_table(summary, table, RUNS) + "\n\n" + note),
            ("Rank correlations", "\n".join(corr_lines)),
            ("Findings", "\n".join(f"- {line}" for line in lines)),
        ],
        plots,
        rows=rows,
    )


def _source_classes(config: TransferConfig) -> int:
    if config.source_classes is not None:
        return config.source_classes
    return 80 if config.dataset == "cifar100" else 5


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the study; returns the report's path (on every rank)."""
    config = parse_config(TransferConfig, argv, presets=PRESETS, description=__doc__)
    tic = time.perf_counter()
    with Experiment(config) as experiment:
        full, runtime = experiment.data, experiment.runtime
        source, target = split_classes(full, _source_classes(config))
        # before any training: every shot count must fit the smallest target class
        smallest = int(torch.bincount(target.train.targets.cpu()).min())
        if max(config.shots) > smallest:
            raise ValueError(
                f"Expected argument `shots` to be at most {smallest} (the smallest target class of"
                f" the training split), but got {list(config.shots)}."
            )
        experiment.data = source

        def run_evaluation(model: CollapseModel) -> dict[str, float]:
            return evaluate(model, source, runtime)

        builders = {
            name: _builder(name, config, source.input_shape, source.num_classes)
            for name in config.runs
        }
        for build in builders.values():  # every run's model and objective, before any training
            build()
        for name in config.runs:
            for seed in config.seeds:
                model, history = experiment.run(name, seed, builders[name], evaluate=run_evaluation)
                if history[-1].get("diverged"):  # no transfer columns: its features are not finite
                    continue
                history[-1].update(transfer_metrics(model, source, target, runtime, config, seed))
                experiment.write_csv()
        experiment.data = full
        report = experiment.out / "report.md"
        if runtime.is_main:
            seconds = time.perf_counter() - tic
            write_outputs(experiment.rows, config, seconds)
            print(f"finished in {seconds:.0f} s; report: {report}")
    return report


if __name__ == "__main__":
    main()
