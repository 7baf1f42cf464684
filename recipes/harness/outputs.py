"""What a study leaves in its output folder: tables, plots and ``report.md``.

The training loop writes ``config.json`` and ``metrics.csv`` (one row per run, seed and epoch);
this module turns those rows into what a reader wants: the final value of each metric as
``mean +- std`` over seeds (sample std, ``ddof=1``), curves over epochs with the spread of the seeds
shaded, and a markdown report that embeds the plots. Matplotlib runs headless (Agg).

A run that diverged (its last row has ``diverged``, see :class:`harness.train.Experiment`) counts
with NaN for every metric: its final row is the diverged one, so its table cells read ``nan``
rather than the numbers of an epoch before it diverged, and the report lists it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Panel",
    "Stat",
    "diverged_runs",
    "final_rows",
    "format_stat",
    "gap_note",
    "markdown_table",
    "plot_panels",
    "read_csv",
    "summarize",
    "throughput",
    "without_diverged",
    "write_report",
]


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (0 for one value) and count of a metric over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        n = len(values)
        if n == 0:
            return cls(math.nan, math.nan, 0)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        return cls(mean, math.sqrt(var), n)

    def separated_from(self, other: Stat) -> bool:
        """Whether the means differ by more than the two spreads together (a plain, strict test)."""
        return abs(self.mean - other.mean) > self.std + other.std


def gap_note(a: Stat, b: Stat) -> str:
    """Whether the gap between two means is larger than the seeds' spread, in words."""
    if min(a.n, b.n) < 2:
        return "one seed, so no spread to compare with"
    return ("more than" if a.separated_from(b) else "within") + " the spread over seeds"


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.csv``, numbers parsed (empty cells dropped)."""
    rows: list[dict[str, Any]] = []
    with Path(path).open(newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value in ("", None):
                    continue
                try:
                    number = float(value)
                    row[key] = int(number) if key in ("epoch", "seed") else number
                except ValueError:
                    row[key] = value
            rows.append(row)
    return rows


def final_rows(rows: Iterable[Mapping[str, Any]], key: str = "test_acc") -> list[Mapping[str, Any]]:
    """The last evaluated row (holding ``key``) of each (run, seed); for a (run, seed) that
    diverged, its diverged row (which holds no metrics)."""
    last: dict[tuple[str, int], Mapping[str, Any]] = {}
    for row in rows:
        if key in row or row.get("diverged"):
            ident = (str(row["run"]), int(row["seed"]))
            if ident not in last or row["epoch"] >= last[ident]["epoch"]:
                last[ident] = row
    return list(last.values())


def summarize(
    rows: Iterable[Mapping[str, Any]], metrics: Sequence[str], key: str = "test_acc"
) -> dict[str, dict[str, Stat]]:
    """``{run: {metric: Stat over seeds}}`` of the last evaluated rows (runs kept in order); a
    seed that diverged gives NaN for every metric."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for row in final_rows(rows, key):
        grouped.setdefault(str(row["run"]), []).append(row)
    return {
        run: {
            m: Stat.of(
                [
                    math.nan if r.get("diverged") else float(r[m])
                    for r in group
                    if m in r or r.get("diverged")
                ]
            )
            for m in metrics
        }
        for run, group in grouped.items()
    }


def diverged_runs(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows marked ``diverged`` (one per run and seed that diverged), in order."""
    return [row for row in rows if row.get("diverged")]


def without_diverged(
    runs: Iterable[str], rows: Iterable[Mapping[str, Any]]
) -> tuple[list[str], str | None]:
    """The ``runs`` none of whose seeds diverged, for the findings (whose comparisons of NaN means
    would read as results), and a sentence naming the runs left out (``None``: none)."""
    diverged = {str(row["run"]) for row in diverged_runs(rows)}
    runs = list(runs)
    left_out = [run for run in runs if run in diverged]
    kept = [run for run in runs if run not in diverged]
    if not left_out:
        return kept, None
    names = ", ".join(left_out)
    return kept, f"Left out of the findings below: {names} (a seed diverged; see Diverged runs)."


def format_stat(stat: Stat, digits: int = 3) -> str:
    """``mean +- std`` with ``digits`` significant digits (scientific below 1e-3)."""
    if stat.n == 0:
        return "n/a"

    def fmt(x: float) -> str:
        return f"{x:.{digits - 1}e}" if x != 0 and abs(x) < 1e-3 else f"{x:.{digits}g}"

    return f"{fmt(stat.mean)} ± {fmt(stat.std)}" if stat.n > 1 else fmt(stat.mean)


def markdown_table(
    summary: Mapping[str, Mapping[str, Stat]],
    columns: Mapping[str, str],
    labels: Mapping[str, str] | None = None,
) -> str:
    """A markdown table: one row per run (``labels`` gives display names), ``columns`` = {metric:
    header}; cells are ``mean ± std`` over seeds."""
    labels = labels or {}
    header = "| run | seeds | " + " | ".join(columns.values()) + " |"
    rule = "|" + "---|" * (len(columns) + 2)
    lines = [header, rule]
    for run, stats in summary.items():
        seeds = max((s.n for s in stats.values()), default=0)
        cells = [format_stat(stats[m]) if m in stats else "n/a" for m in columns]
        lines.append(f"| {labels.get(run, run)} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Panel:
    """One subplot: curves of ``columns`` (``{column: line style label}``) per run over epochs."""

    title: str
    columns: Mapping[str, str]
    log: bool = False
    ylabel: str = ""


_STYLES = ("-", "--", ":", "-.")


def plot_panels(
    rows: Sequence[Mapping[str, Any]],
    panels: Sequence[Panel],
    path: str | Path,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Save a row of subplots: for each run the mean over seeds, the seeds' range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    runs = list(dict.fromkeys(str(r["run"]) for r in rows))
    colours = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for run in runs:
            for style, (column, name) in zip(_STYLES, panel.columns.items()):
                by_epoch: dict[int, list[float]] = {}
                for r in rows:
                    if str(r["run"]) == run and column in r:
                        value = float(r[column])
                        if panel.log and value <= 0:
                            continue
                        by_epoch.setdefault(int(r["epoch"]), []).append(value)
                if not by_epoch:
                    continue
                epochs = sorted(by_epoch)
                mean = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
                low = [min(by_epoch[e]) for e in epochs]
                high = [max(by_epoch[e]) for e in epochs]
                label = f"{labels.get(run, run)}" + (f" ({name})" if name else "")
                ax.plot(epochs, mean, style, color=colours[run], label=label, marker=".")
                ax.fill_between(epochs, low, high, color=colours[run], alpha=0.15, linewidth=0)
        if panel.log:
            ax.set_yscale("log")
        ax.set_title(panel.title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    handles, names = list(legend.values()), list(legend)
    bottom = 0.06 + 0.05 * ((len(names) - 1) // 4)
    return save_figure(fig, path, handles, names, ncol=4, bottom=bottom)


def save_figure(
    fig: Any, path: str | Path, handles: list[Any], names: list[str], *, ncol: int, bottom: float
) -> Path:
    """Add a figure legend below the panels (when there is one), lay out, save as PNG, close."""
    import matplotlib.pyplot as plt

    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(ncol, len(names)), fontsize=8)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool), else ``None``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def throughput(rows: Iterable[Mapping[str, Any]]) -> str | None:
    """How fast the runs trained and evaluated, from the per-epoch rows (``train_images_per_s``,
    ``train_time``, ``eval_time``): the median training rate in images per second over every
    epoch of every run and seed, and the seconds spent training and evaluating in all (missing or
    non-finite times count as none); ``None`` without timed rows."""
    rates: list[float] = []
    train = evaluation = 0.0
    for row in rows:
        rate = _finite(row.get("train_images_per_s"))
        if rate is not None:
            rates.append(rate)
            train += _finite(row.get("train_time")) or 0.0
        evaluation += _finite(row.get("eval_time")) or 0.0
    if not rates:
        return None
    rates.sort()
    middle = len(rates) // 2
    median = rates[middle] if len(rates) % 2 else 0.5 * (rates[middle - 1] + rates[middle])
    return (
        f"Training: {median:,.0f} images/s (median over {len(rates)} epochs of every run and "
        f"seed); {train:.1f} s of training and {evaluation:.1f} s of evaluation in all."
    )


def write_report(
    path: str | Path,
    title: str,
    sections: Sequence[tuple[str, str]],
    plots: Sequence[Path] = (),
    rows: Iterable[Mapping[str, Any]] = (),
) -> Path:
    """Write ``report.md``: a title, ``(heading, markdown)`` sections, a ``Diverged runs`` section
    naming each run, seed and epoch that diverged (none when none did), a ``Throughput`` section
    from the per-epoch ``rows`` (see :func:`throughput`; none without timed rows) and the plots
    embedded."""
    path = Path(path)
    parts = [f"# {title}", ""]
    rows = list(rows)
    diverged = diverged_runs(rows)
    if diverged:
        lines = [
            f"- `{row['run']}`, seed {row['seed']}: diverged at epoch {row['epoch']} (training "
            f"loss {float(row.get('loss', math.nan)):.3g}); training stopped there."
            for row in diverged
        ]
        note = (
            "Their metrics count as NaN in the tables above (the spread of the other seeds is not "
            "shown alone). A lower `--lr` (or a warm-up, `--warmup-epochs`) may keep them stable."
        )
        sections = [*sections, ("Diverged runs", "\n".join(lines) + "\n\n" + note)]
    speed = throughput(rows)
    if speed is not None:
        sections = [*sections, ("Throughput", speed)]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.strip(), ""]
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{p.stem}]({p.relative_to(path.parent).as_posix()})" for p in plots]
        parts.append("")
    path.write_text("\n".join(parts))
    return path
