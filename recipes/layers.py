"""Does collapse progress with depth? NC1 layer by layer, over training, for two heads.

A :class:`torchcollapse.CollapseTracker` watches every block of the network (conv maps averaged
over their spatial axes) and the linear neck whose output the head reads, and measures NC1 at each
on the train and test sets every few epochs. Papyan (2020) saw class structure sharpen through the
layers; He & Su (2023, "A law of data separation in deep learning") found the separation fuzziness
``tr(Sigma_W Sigma_B^+)`` (NC1 up to the factor ``K``) decaying *geometrically* with depth in
well-trained networks. The report fits ``log NC1 = a + b * depth`` at the last epoch and gives the
decay ratio per layer ``exp(b)``, the fit's R^2, and how many steps from one layer to the next
actually decrease, for a learnable linear head and a fixed simplex ETF head.

Commands::

    python recipes/layers.py                        # MNIST-1D, 1-D CNN, 2 heads x 2 seeds
    python recipes/layers.py --model mlp            # the MLP's blocks
    python recipes/layers.py --preset paper         # 200 epochs, 3 seeds
    python recipes/layers.py --preset cifar --data-root ~/data     # ResNet-18 on CIFAR-10 (GPU)
    torchrun --nproc_per_node 4 recipes/layers.py --preset cifar --data-root ~/data
    python recipes/layers.py --resume --out runs/layers/<stamp>

Outputs in ``--out`` (default ``runs/layers/<timestamp>``): ``config.json``, ``metrics.csv``
(columns ``train_nc1@<layer>``...), ``nc1_heatmap.png`` (layers x epochs), ``nc1_depth.png`` and
``report.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from harness.config import TrainConfig, arg, check_choices, check_number, parse_config
from harness.evaluate import evaluate
from harness.models import MODEL_NAMES, CollapseModel, simplex_etf_head
from harness.outputs import (
    Stat,
    final_rows,
    format_stat,
    gap_note,
    without_diverged,
    write_report,
)
from harness.train import Experiment, Objective

__all__ = [
    "HEADS",
    "HEAD_INPUT",
    "LayersConfig",
    "depth_profile",
    "fit_geometric_decay",
    "main",
    "tracked_layers",
]

#: Display names of the runs.
HEADS = {"linear": "learnable linear head", "etf": "fixed ETF head"}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 200, "seeds": [0, 1, 2], "eval_every": 10},
    "cifar": {
        "dataset": "cifar10",
        "model": "resnet18",
        "epochs": 200,
        "batch_size": 128,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "seeds": [0, 1, 2],
        "eval_every": 10,
        "warmup_epochs": 2,
    },
}


@dataclasses.dataclass
class LayersConfig(TrainConfig):
    """Settings of the layers study (the shared ones are in ``TrainConfig``)."""

    study: ClassVar[str] = "layers"

    runs: tuple[str, ...] = arg(tuple(HEADS), f"Heads to train, from {', '.join(HEADS)}.")
    weight_decay: float = arg(5e-3, "Weight decay of every run (learnable heads need it).")
    etf_scale: float | None = arg(
        None, "Logit scale of the ETF head (default: none, the head's own: a 0.01 loss floor)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices("runs", self.runs, HEADS)
        check_number("etf_scale", self.etf_scale, "a finite number > 0", lambda v: v > 0)


def tracked_layers(model: CollapseModel) -> list[str]:
    """Every block of ``model.blocks``, then the neck (the features the head reads)."""
    return [f"blocks.{name}" for name, _ in model.blocks.named_children()] + ["neck"]


def _builder(
    name: str, config: LayersConfig, input_shape: tuple[int, ...], num_classes: int
) -> Callable[[], tuple[CollapseModel, Objective]]:
    def build() -> tuple[CollapseModel, Objective]:
        head = simplex_etf_head(config.etf_scale) if name == "etf" else None
        model = config.build_model(input_shape, num_classes, head)
        return model, Objective()

    return build


# ------------------------------------------------------------------------------------ the report


#: Pseudo-layer: the features the head's linear map reads (after the ETF head's normalisation).
HEAD_INPUT = "head input"


def _column(split: str, layer: str) -> str:
    return f"{split}_nc1" if layer == HEAD_INPUT else f"{split}_nc1@{layer}"


def depth_profile(
    rows: Sequence[Mapping[str, Any]], run: str, layers: Sequence[str], split: str = "train"
) -> list[Stat]:
    """Final-epoch ``{split}_nc1@layer`` of ``run`` over seeds, one :class:`Stat` per layer.

    The layer :data:`HEAD_INPUT` reads the main metric ``{split}_nc1`` (the head's input). A seed
    that diverged counts as NaN.
    """
    last = [r for r in final_rows(rows, _column(split, layers[0])) if r["run"] == run]
    return [
        Stat.of([float(r.get(_column(split, layer), math.nan)) for r in last]) for layer in layers
    ]


def fit_geometric_decay(values: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of ``log v = a + b * depth``; returns ``(exp(b), R^2)``."""
    xs = list(range(len(values)))
    ys = [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    residual = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys))
    total = sum((y - my) ** 2 for y in ys)
    return math.exp(slope), (1.0 - residual / total) if total > 0 else float("nan")


def _plots(
    rows: Sequence[Mapping[str, Any]], runs: Sequence[str], layers: Sequence[str], out: Path
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        evaluated = [r for r in rows if r["run"] == run and _column("train", layers[0]) in r]
        epochs = sorted({int(r["epoch"]) for r in evaluated})
        if not epochs:  # diverged before its first evaluation
            ax.set_axis_off()
            ax.set_title(f"{HEADS[run]}: not evaluated (diverged)")
            continue
        grid = [
            [
                math.log10(
                    sum(float(r[_column("train", layer)]) for r in evaluated if r["epoch"] == e)
                    / max(1, sum(1 for r in evaluated if r["epoch"] == e))
                )
                for e in epochs
            ]
            for layer in layers
        ]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="upper")
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs], fontsize=7)
        ax.set_xlabel("epoch")
        ax.set_title(f"log10 train NC1: {HEADS[run]}")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    heatmap = out / "nc1_heatmap.png"
    fig.savefig(heatmap, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, run in enumerate(runs):
        for split, style in (("train", "-"), ("test", "--")):
            stats = depth_profile(rows, run, layers, split)
            means = [s.mean for s in stats]
            ax.errorbar(
                range(len(layers)), means, yerr=[s.std for s in stats], fmt=style, marker="o",
                color=f"C{i}", label=f"{HEADS[run]} ({split})", capsize=3,
            )  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), layers, rotation=30, fontsize=7)
    ax.set_ylabel("NC1 at the last epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    depth = out / "nc1_depth.png"
    fig.savefig(depth, dpi=110)
    plt.close(fig)
    return [heatmap, depth]


def write_outputs(
    rows: Sequence[Mapping[str, Any]], config: LayersConfig, layers: Sequence[str]
) -> Path:
    """Plots, table and ``report.md`` in ``config.out``; returns the report's path."""
    out = Path(str(config.out))
    runs = [r for r in config.runs if any(row["run"] == r for row in rows)]
    shown = [*layers, HEAD_INPUT]
    plots = _plots(rows, runs, shown, out)
    header = "| layer | " + " | ".join(f"train NC1, {HEADS[r]}" for r in runs)
    header += " | " + " | ".join(f"test NC1, {HEADS[r]}" for r in runs) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(runs))]
    profiles = {(r, s): depth_profile(rows, r, shown, s) for r in runs for s in ("train", "test")}
    for i, layer in enumerate(shown):
        cells = [format_stat(profiles[(r, "train")][i]) for r in runs]
        cells += [format_stat(profiles[(r, "test")][i]) for r in runs]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    runs, left_out = without_diverged(runs, rows)  # NaN means would read as results
    findings = [left_out] if left_out else []
    for run in runs:
        means = [s.mean for s in profiles[(run, "train")][: len(layers)]]  # network layers only
        ratio, r2 = fit_geometric_decay(means)
        falls = sum(b < a for a, b in itertools.pairwise(means))
        trend = "falls" if means[-1] < means[0] else "rises"
        findings.append(
            f"**{HEADS[run]}**: train NC1 {trend} from {means[0]:.3g} at {layers[0]} to "
            f"{means[-1]:.3g} at {layers[-1]}; {falls} of {len(means) - 1} steps to the next "
            f"layer decrease it. A geometric fit over the layers gives a factor {ratio:.3g} per "
            "layer "
            f"(R² = {r2:.2f}"
            + ("; close to geometric decay" if r2 >= 0.9 and ratio < 1 else "")
            + ")."
        )
    if len(runs) == 2:
        a, b = (profiles[(r, "train")][-1] for r in runs)
        findings.append(
            f"On the features the head reads, the {HEADS[runs[1]]} reaches train NC1 "
            f"{format_stat(b)} against {format_stat(a)} for the {HEADS[runs[0]]} "
            f"({gap_note(b, a)})."
        )
    model = MODEL_NAMES[config.model]
    width, feature_dim = config.sizes
    setting = (
        f"{config.dataset}, {model} (width {width}, feature dim {feature_dim}), "
        f"{config.epochs} epochs, batch {config.batch_size}, "
        f"{config.optimizer} lr {config.lr} ({config.schedule}), weight decay "
        f"{config.weight_decay}, seeds {list(config.seeds)}; tracked layers: "
        f"{', '.join(layers)} (conv maps averaged over length/space)."
    )
    return write_report(
        out / "report.md",
        "Does collapse progress with depth?",
        [
            ("Setting", setting),
            ("NC1 per layer at the last epoch (mean ± std over seeds)", "\n".join(lines)),
            ("Findings", "\n".join(f"- {line}" for line in findings)),
        ],
        plots,
        rows=rows,
    )


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the study; returns the report's path (on every rank)."""
    config = parse_config(LayersConfig, argv, presets=PRESETS, description=__doc__)
    tic = time.perf_counter()
    with Experiment(config) as experiment:
        data, runtime = experiment.data, experiment.runtime
        builders = {n: _builder(n, config, data.input_shape, data.num_classes) for n in config.runs}
        # every run's model, before any training (the blocks are the same for every head)
        models = [build()[0] for build in builders.values()]
        layers = tracked_layers(models[0])

        def run_evaluation(model: CollapseModel) -> dict[str, float]:
            return evaluate(model, data, runtime, layers=layers)

        for name in config.runs:
            for seed in config.seeds:
                experiment.run(name, seed, builders[name], evaluate=run_evaluation)
        report = experiment.out / "report.md"
        if runtime.is_main:
            write_outputs(experiment.rows, config, layers)
            print(f"finished in {time.perf_counter() - tic:.0f} s; report: {report}")
    return report


if __name__ == "__main__":
    main()
