"""Does inducing neural collapse change generalization?

Trains the same network with four classifiers and objectives, several seeds each, measures
collapse on train and test features every few epochs and ends with a table and plots:

- ``linear``: learnable linear head + cross-entropy (no weight decay);
- ``linear_wd``: the same with weight decay (``--decay``), the setting in which Papyan, Han &
  Donoho (2020) observed collapse;
- ``etf``: a fixed simplex ETF head reading L2-normalised features (Hoffer et al., 2018; Zhu et al.,
  2021; Yang et al., 2022), :class:`torchcollapse.heads.SimplexETFHead`;
- ``etf_reg``: the ETF head plus :class:`torchcollapse.losses.CollapseRegularizer` (NC1 and NC3
  terms on the global batch).

The report compares, from the numbers of this run, whether the ETF heads collapse more on the
training set (train NC1) and whether test accuracy and test NC1 follow, with the spread over seeds.

Commands::

    # default: MNIST-1D, 1-D CNN, 4 runs x 2 seeds, about a minute on 2 CPU cores
    python recipes/generalization.py
    python recipes/generalization.py --model mlp           # the MLP instead of the CNN
    python recipes/generalization.py --preset paper        # 200 epochs, 3 seeds (long)
    python recipes/generalization.py --resume --out runs/generalization/<stamp>   # continue
    # GPU: CIFAR-10 and ResNet-18 from the python-pickle folder under --data-root
    python recipes/generalization.py --preset cifar --data-root ~/data
    # several processes (GPUs: nccl; CPU: gloo); --batch-size is the global batch
    torchrun --nproc_per_node 4 recipes/generalization.py --preset cifar --data-root ~/data
    torchrun --nproc_per_node 2 recipes/generalization.py

Outputs in ``--out`` (default ``runs/generalization/<timestamp>``): ``config.json``,
``metrics.csv`` (one row per run, seed and epoch), ``nc1.png``, ``accuracy.png``,
``geometry.png`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from harness.config import TrainConfig, arg, check_choices, check_number, parse_config
from harness.evaluate import evaluate
from harness.models import MODEL_NAMES, CollapseModel, simplex_etf_head
from harness.outputs import (
    Panel,
    Stat,
    format_stat,
    gap_note,
    markdown_table,
    plot_panels,
    summarize,
    without_diverged,
    write_report,
)
from harness.probe import spearman_correlation
from harness.train import Experiment, Objective
from torch import Tensor

from torchcollapse.losses import CollapseRegularizer

__all__ = ["RUNS", "GeneralizationConfig", "findings", "main", "spearman"]

#: Display names of the runs.
RUNS = {
    "linear": "linear + CE",
    "linear_wd": "linear + CE + weight decay",
    "etf": "ETF head",
    "etf_reg": "ETF head + regularizer",
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 200, "seeds": [0, 1, 2], "eval_every": 10},
    "cifar": {
        "dataset": "cifar10",
        "model": "resnet18",
        "epochs": 200,
        "batch_size": 128,
        "lr": 0.1,
        "decay": 5e-4,
        "seeds": [0, 1, 2],
        "eval_every": 10,
        "warmup_epochs": 2,
    },
}


@dataclasses.dataclass
class GeneralizationConfig(TrainConfig):
    """Settings of the generalization study (the shared ones are in ``TrainConfig``)."""

    study: ClassVar[str] = "generalization"

    epochs: int = arg(40, "Training epochs.")
    runs: tuple[str, ...] = arg(tuple(RUNS), f"Runs to train, from {', '.join(RUNS)}.")
    decay: float = arg(5e-3, "Weight decay of the `linear_wd` run.")
    etf_scale: float | None = arg(
        None, "Logit scale of the ETF head (default: none, the head's own: a 0.01 loss floor)."
    )
    reg_nc1: float = arg(1.0, "Weight of the regularizer's NC1 term (`etf_reg`).")
    reg_nc3: float = arg(1.0, "Weight of the regularizer's NC3 term (`etf_reg`).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices("runs", self.runs, RUNS)
        check_number("decay", self.decay, "a finite number >= 0", lambda v: v >= 0)
        check_number("etf_scale", self.etf_scale, "a finite number > 0", lambda v: v > 0)
        check_number("reg_nc1", self.reg_nc1, "a finite number", lambda v: True)
        check_number("reg_nc3", self.reg_nc3, "a finite number", lambda v: True)
        if "etf_reg" in self.runs and self.reg_nc1 == 0 and self.reg_nc3 == 0:
            raise ValueError(
                "Expected argument `reg_nc1` or `reg_nc3` to be non-zero for the `etf_reg` run, "
                "but got both 0."
            )


def _builder(
    name: str, config: GeneralizationConfig, input_shape: tuple[int, ...], num_classes: int
) -> Callable[[], tuple[CollapseModel, Objective]]:
    def build() -> tuple[CollapseModel, Objective]:
        head = simplex_etf_head(config.etf_scale) if name.startswith("etf") else None
        model = config.build_model(input_shape, num_classes, head)
        if name != "etf_reg":
            return model, Objective()
        regularizer = CollapseRegularizer(num_classes, nc1=config.reg_nc1, nc3=config.reg_nc3)

        def batch_loss(features: Tensor, logits: Tensor, target: Tensor) -> Tensor:
            loss: Tensor = regularizer(features, target, model.get_classifier())
            return loss

        return model, Objective(batch_loss=batch_loss)

    return build


# ------------------------------------------------------------------------------------ the report

TABLE = {
    "train_acc": "train acc",
    "test_acc": "test acc",
    "test_ncc_acc": "test NCC acc",
    "train_nc1": "train NC1",
    "test_nc1": "test NC1",
    "train_nc2_etf_distance": "train NC2 (ETF dist.)",
    "train_nc3": "train NC3",
    "test_nc4": "test NC4",
}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN below three points, when a value
    is NaN (a diverged run) or when one side is constant, so that a short or flat sweep reports
    no correlation instead of failing."""
    if len(x) < 3:
        return float("nan")
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if xs.isnan().any() or ys.isnan().any() or len(xs.unique()) < 2 or len(ys.unique()) < 2:
        return float("nan")
    return spearman_correlation(xs, ys)


def findings(summary: Mapping[str, Mapping[str, Stat]]) -> list[str]:
    """Sentences that answer the study's question from the final numbers (nothing hard-coded)."""
    lines: list[str] = []
    learnable = [r for r in ("linear", "linear_wd") if r in summary]
    fixed = [r for r in ("etf", "etf_reg") if r in summary]
    if learnable and fixed:
        best_l = min(learnable, key=lambda r: summary[r]["train_nc1"].mean)
        best_f = min(fixed, key=lambda r: summary[r]["train_nc1"].mean)
        f, lrn = summary[best_f], summary[best_l]
        more = f["train_nc1"].mean < lrn["train_nc1"].mean
        lines.append(
            f"**Train NC1.** The ETF heads collapse {'more' if more else 'less'} than the "
            f"learnable heads: the most collapsed ETF run ({RUNS[best_f]}) ends at train NC1 "
            f"{format_stat(f['train_nc1'])} against {format_stat(lrn['train_nc1'])} for the most "
            f"collapsed learnable run ({RUNS[best_l]}); the gap is "
            f"{gap_note(f['train_nc1'], lrn['train_nc1'])}."
        )
        acc_follows = (f["test_acc"].mean > lrn["test_acc"].mean) == more
        nc1_follows = (f["test_nc1"].mean < lrn["test_nc1"].mean) == more
        lines.append(
            f"**Test.** The same two runs reach test NC1 {format_stat(f['test_nc1'])} vs "
            f"{format_stat(lrn['test_nc1'])} ({gap_note(f['test_nc1'], lrn['test_nc1'])}) and test "
            f"accuracy {format_stat(f['test_acc'])} vs {format_stat(lrn['test_acc'])} "
            f"({gap_note(f['test_acc'], lrn['test_acc'])}): test NC1 "
            f"{'follows' if nc1_follows else 'does not follow'} the train collapse, test accuracy "
            f"{'follows it' if acc_follows else 'does not'}."
        )
    for base, extra, what in (
        ("linear", "linear_wd", "Weight decay"),
        ("etf", "etf_reg", "The regularizer"),
    ):
        if base in summary and extra in summary:
            x, y = summary[extra], summary[base]
            verb = "lowers" if x["train_nc1"].mean < y["train_nc1"].mean else "raises"
            direction = "up" if x["test_acc"].mean > y["test_acc"].mean else "down"
            lines.append(
                f"**{what}** {verb} train NC1 ({format_stat(x['train_nc1'])} vs "
                f"{format_stat(y['train_nc1'])}; {gap_note(x['train_nc1'], y['train_nc1'])}) and "
                f"moves test accuracy {direction} "
                f"({format_stat(x['test_acc'])} vs {format_stat(y['test_acc'])}; "
                f"{gap_note(x['test_acc'], y['test_acc'])})."
            )
    runs = list(summary)
    if len(runs) >= 3:
        nc1 = [summary[r]["train_nc1"].mean for r in runs]
        rho_acc = spearman(nc1, [summary[r]["test_acc"].mean for r in runs])
        rho_test = spearman(nc1, [summary[r]["test_nc1"].mean for r in runs])
        went = "higher" if rho_acc < 0 else "lower"
        lines.append(
            f"**Across the {len(runs)} runs** (means over seeds), lower train NC1 went with {went} "
            f"test accuracy (Spearman rho between train NC1 and test accuracy = {rho_acc:+.2f}; "
            f"between train and test NC1 = {rho_test:+.2f}). With {len(runs)} points only "
            "|rho| = 1 is a consistent ordering; read it together with the spreads above."
        )
    return lines


def _findings(
    summary: Mapping[str, Mapping[str, Stat]], rows: Sequence[Mapping[str, Any]]
) -> list[str]:
    """:func:`findings` of the runs that did not diverge, after a sentence naming the others."""
    kept, left_out = without_diverged(summary, rows)
    return ([left_out] if left_out else []) + findings({run: summary[run] for run in kept})


def write_outputs(rows: Sequence[Mapping[str, Any]], config: GeneralizationConfig) -> Path:
    """Plots, table and ``report.md`` in ``config.out``; returns the report's path."""
    out = Path(str(config.out))
    labels = {r: RUNS[r] for r in RUNS}
    plots = [
        plot_panels(
            rows,
            [
                Panel("train NC1", {"train_nc1": ""}, log=True),
                Panel("test NC1", {"test_nc1": ""}, log=True),
            ],
            out / "nc1.png",
            labels,
        ),
        plot_panels(
            rows,
            [
                Panel("train accuracy", {"train_acc": ""}),
                Panel("test accuracy", {"test_acc": "", "test_ncc_acc": "NCC"}),
            ],
            out / "accuracy.png",
            labels,
        ),
        plot_panels(
            rows,
            [
                Panel("NC2: ETF distance of train means", {"train_nc2_etf_distance": ""}, log=True),
                Panel("NC3: classifier vs train means", {"train_nc3": ""}, log=True),
                Panel("NC4: test, against train means", {"test_nc4": ""}),
            ],
            out / "geometry.png",
            labels,
        ),
    ]
    summary = summarize(rows, list(TABLE))
    model = MODEL_NAMES[config.model]
    width, feature_dim = config.sizes
    setting = (
        f"{config.dataset}, {model} (width {width}, feature dim {feature_dim}), "
        f"{config.epochs} epochs, batch {config.batch_size}, "
        f"{config.optimizer} lr {config.lr} ({config.schedule}), seeds {list(config.seeds)}; "
        f"weight decay {config.weight_decay} (`linear_wd`: {config.decay}); ETF scale "
        f"{config.etf_scale or 'default'}; regularizer NC1 {config.reg_nc1}, NC3 {config.reg_nc3}."
    )
    note = (
        "Final epoch, mean ± std over seeds. NC1 = tr(Σ_W Σ_B⁺)/K on the features the head "
        "reads (after the ETF head's normalisation); NC4 and NCC accuracy use the train class "
        "means."
    )
    return write_report(
        out / "report.md",
        "Does inducing neural collapse change generalization?",
        [
            ("Setting", setting),
            ("Results", markdown_table(summary, TABLE, labels) + "\n\n" + note),
            ("Findings", "\n".join(f"- {line}" for line in _findings(summary, rows))),
        ],
        plots,
        rows=rows,
    )


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the study; returns the report's path (on every rank)."""
    config = parse_config(GeneralizationConfig, argv, presets=PRESETS, description=__doc__)
    tic = time.perf_counter()
    with Experiment(config) as experiment:
        data, runtime = experiment.data, experiment.runtime

        def run_evaluation(model: CollapseModel) -> dict[str, float]:
            return evaluate(model, data, runtime)

        builders = {n: _builder(n, config, data.input_shape, data.num_classes) for n in config.runs}
        for build in builders.values():  # every run's model and objective, before any training
            build()
        for name in config.runs:
            decay = config.decay if name == "linear_wd" else None
            for seed in config.seeds:
                experiment.run(
                    name, seed, builders[name], evaluate=run_evaluation, weight_decay=decay
                )
        report = experiment.out / "report.md"
        if runtime.is_main:
            write_outputs(experiment.rows, config)
            print(f"finished in {time.perf_counter() - tic:.0f} s; report: {report}")
    return report


if __name__ == "__main__":
    main()
