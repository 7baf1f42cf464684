"""When the CPU update's symmetric product should go by panels: one ``addmm`` against panels.

Run from the repository root::

    .venv/bin/python benchmarks/gram_product.py --threads 2
    .venv/bin/python benchmarks/gram_product.py --threads 1

For each feature dimension ``d`` and number of rows, the float64 product ``X^T X`` added into a
``d x d`` output three ways: one full ``addmm``; the upper-triangle panels of
``torchcollapse.stats`` (forced, whatever the rows); and what ``ClassStatistics.update`` chooses
(``_gram_panel``). Prints a markdown table of the best of seven timings (microseconds) and the
ratios to the full product; the choice should be within a few percent of the better of the two.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import _cli as cli

from torchcollapse import stats

DEFAULT_CELLS = "192:128,256,512;256:64,128,256;512:64,128,256;1024:32,64,128;2048:32,64,96"


def best_us(fn: Callable[[], object], total_flops: float) -> float:
    calls = max(3, int(2e9 / (total_flops + 1e6)))
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def time_cell(d: int, rows: int, generator: torch.Generator) -> tuple[float, float, str]:
    """Microseconds of one full product and of the panels, and what the update chooses."""
    out = torch.zeros(d, d, dtype=torch.float64)
    x = torch.randn(rows, d, dtype=torch.float64, generator=generator)
    flops = 2.0 * rows * d * d
    decide = stats._gram_panel
    chosen = "panels" if decide(rows, d, x.device) < d else "one product"
    full = best_us(lambda: out.addmm_(x.T, x), flops)
    panel = 64 if d <= 512 else d // 8

    def forced(num_rows: int, num_features: int, device: torch.device) -> int:
        return panel

    stats._gram_panel = forced
    try:
        panels = best_us(lambda: stats._add_gram_(out, x, 1), flops)
    finally:
        stats._gram_panel = decide
    return full, panels, chosen


def _cells(text: str) -> list[tuple[int, list[int]]]:
    """``d:rows,rows;d:rows,...`` as ``[(d, [rows, ...]), ...]`` of positive integers."""
    cells = []
    for cell in text.split(";"):
        dim_text, _, rows_text = cell.partition(":")
        try:
            d, rows = (
                cli.positive_int(dim_text),
                [cli.positive_int(r) for r in rows_text.split(",")],
            )
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected d:rows,rows;d:rows,... of positive integers, got {text!r}"
            ) from None
        cells.append((d, rows))
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--cells",
        type=_cells,
        default=DEFAULT_CELLS,
        help="feature dimensions and their row counts: d:rows,rows;d:rows,...",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s), float64\n")
    print("| d | rows | full addmm us | panels us | panels / full | chosen | chosen / best |")
    print("|---:|---:|---:|---:|---:|---|---:|")
    generator = torch.Generator().manual_seed(0)
    for d, row_counts in args.cells:
        for rows in row_counts:
            full, panels, chosen = time_cell(d, rows, generator)
            picked = panels if chosen == "panels" else full
            print(
                f"| {d} | {rows} | {full:.0f} | {panels:.0f} | {panels / full:.2f} | {chosen} |"
                f" {picked / min(full, panels):.2f} |"
            )


if __name__ == "__main__":
    main()
