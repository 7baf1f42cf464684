"""Recipe benchmarks: the demo's wall time, and ResNet-18 throughput with and without evaluation.

1. The default ``python recipes/generalization.py`` (the ``make demo`` run): wall time and CPU
   time of the whole study, with the machine's load average before and after (on a shared machine
   the wall time depends on the neighbours; CPU time much less).
2. ResNet-18 (CIFAR variant) training throughput in images/s, measured by the harness on the
   second epoch (the first warms up): training only, and training plus one evaluation pass per
   epoch (features of the train and test sets, every collapse metric, NC4 and NCC accuracy), with
   their ratio. Without ``--data-root`` the images are random ``uint8`` arrays in CIFAR-10's
   on-disk format (the same cost per image as CIFAR-10).

Commands::

    python benchmarks/recipes.py                                     # CPU, both parts
    python benchmarks/recipes.py --skip-default --device cuda --data-root ~/data --train 50000
    python benchmarks/recipes.py --skip-throughput

Prints a markdown table per part.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _cli as cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


def default_run() -> None:
    """Time the default generalization study in a child process."""
    load_before = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as out:
        tic = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "recipes" / "generalization.py"), "--no-progress",
             "--out", out],
            check=True,
        )  # fmt: skip
        wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    load_after = os.getloadavg()
    print("\n| run | wall time (s) | CPU time (s) | load avg before / after (1 min) |")
    print("|---|---|---|---|")
    from generalization import GeneralizationConfig

    defaults = GeneralizationConfig()
    label = (
        f"generalization.py defaults ({len(defaults.runs)} runs x {len(defaults.seeds)} seeds x "
        f"{defaults.epochs} epochs, {defaults.threads} thread)"
    )
    print(f"| {label} | {wall:.0f} | {cpu:.0f} | {load_before[0]:.1f} / {load_after[0]:.1f} |")


def throughput(args: argparse.Namespace) -> None:
    """ResNet-18 images/s with and without the evaluation pass, from the harness's own timers."""
    import generalization
    from harness.data import write_random_cifar10
    from harness.outputs import read_csv

    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root
        if data_root is None:
            data_root = str(Path(tmp) / "data")
            write_random_cifar10(data_root, args.train, args.test)
        common = [
            "--dataset", "cifar10", "--model", "resnet18", "--data-root", data_root,
            "--train-samples", str(args.train), "--test-samples", str(args.test),
            "--epochs", "2", "--eval-every", "1", "--seeds", "0", "--batch-size",
            str(args.batch_size), "--device", args.device, "--no-progress",
        ]  # fmt: skip
        # the recipes' own default is one thread: "none" must be passed on to mean torch's
        common += ["--threads", "none" if args.threads is None else str(args.threads)]
        print("\n| run | train images/s | train + eval images/s | eval share of an epoch |")
        print("|---|---|---|---|")
        for run in ("linear", "etf_reg"):
            out = Path(tmp) / run
            generalization.main([*common, "--runs", run, "--out", str(out)])
            row = read_csv(out / "metrics.csv")[-1]  # epoch 2
            train_rate = row["train_images_per_s"]
            with_eval = args.train / (row["train_time"] + row["eval_time"])
            share = row["eval_time"] / (row["train_time"] + row["eval_time"])
            print(f"| {run} | {train_rate:.1f} | {with_eval:.1f} | {share:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument(
        "--skip-default", action="store_true", help="skip part 1 (the default demo's wall time)"
    )
    parser.add_argument(
        "--skip-throughput", action="store_true", help="skip part 2 (ResNet-18 throughput)"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder holding cifar-10-batches-py (none: random images in its format)",
    )
    parser.add_argument(
        "--device",
        type=lambda text: text if text == "auto" else cli.device(text),
        default="auto",
        help="auto, cpu, cuda or cuda:N",
    )
    parser.add_argument(
        "--train", type=cli.positive_int, default=512, help="training images per epoch"
    )
    parser.add_argument(
        "--test", type=cli.positive_int, default=256, help="test images per evaluation"
    )
    parser.add_argument("--batch-size", type=cli.positive_int, default=128, help="batch size")
    parser.add_argument(
        "--threads", type=cli.threads, default=2, help="CPU threads (none: torch's own number)"
    )
    args = parser.parse_args()
    if not args.skip_default:
        default_run()
    if not args.skip_throughput:
        throughput(args)


if __name__ == "__main__":
    main()
