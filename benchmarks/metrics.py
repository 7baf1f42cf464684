"""Speed and memory of the neural collapse metrics against the Gram floor and a two-pass baseline.

Run (2 CPU threads, the three sizes of the issue; prints a markdown table)::

    .venv/bin/python benchmarks/metrics.py --threads 2
    .venv/bin/python benchmarks/metrics.py --device cuda --sizes 20000x1024x1000,50000x4096x50000

For each size ``N x d x K`` the same ``N / batch`` batches (float32 features, generated on the fly
from a seed and excluded from the timings) go through three methods, each in a fresh forked
process so that its peak memory can be measured:

- **floor**: the float32 Gram ``X.T @ X`` of every batch, summed (what any second-moment metric
  must at least compute);
- **ours**: ``NeuralCollapse(K).update`` on every batch, then ``compute()`` (every key without a
  classifier); **f32-product**: the same with ``product_dtype=torch.float32`` (the ``d x d`` product
  of the centred batch in float32: faster where float64 is slow, ~1e-6 relative error);
- **two-pass**: a straightforward two-pass baseline as published measurement scripts do it: a first
  pass for the class means, a second pass looping over the classes of each batch to accumulate
  ``Sigma_W`` from ``(h - mu_c)^T (h - mu_c)`` in float32, then NC1 from the top ``K - 1``
  eigenpairs of ``Sigma_B``.

Columns: update time (all batches), compute time, peak memory (CPU: growth of the process's peak
resident set over its size before the method ran; CUDA: ``torch.cuda.max_memory_allocated``), and
the ratios of our update to the floor and of the baseline's total time to ours.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import _cli as cli
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from _device import sync

from torchcollapse.metrics import NeuralCollapse

DEFAULT_SIZES = "20000x1024x1000,50000x256x10000,100000x4096x100"


@dataclass
class Result:
    update_s: float
    compute_s: float
    peak_mb: float
    value: float


def batches(
    n: int, d: int, k: int, batch: int, device: torch.device, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic float32 batches: class means of norm ~sqrt(d), within-class spread 0.5."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g)
    for start in range(0, n, batch):
        size = min(batch, n - start)
        target = torch.randint(0, k, (size,), generator=g)
        features = means[target] + 0.5 * torch.randn(size, d, generator=g)
        yield features.to(device), target.to(device)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_floor(n: int, d: int, k: int, batch: int, device: torch.device) -> Result:
    gram = torch.zeros(d, d, device=device)
    elapsed = 0.0
    for features, _ in batches(n, d, k, batch, device):
        sync(device)
        start = time.perf_counter()
        gram += features.T @ features
        sync(device)
        elapsed += time.perf_counter() - start
    return Result(elapsed, 0.0, 0.0, float(gram.trace()))


def run_ours(
    n: int, d: int, k: int, batch: int, device: torch.device, product: torch.dtype = torch.float64
) -> Result:
    metric = NeuralCollapse(k, num_features=d, validate_args=False, product_dtype=product)
    metric = metric.to(device)
    elapsed = 0.0
    for features, target in batches(n, d, k, batch, device):
        sync(device)
        start = time.perf_counter()
        metric.update(features, target)
        sync(device)
        elapsed += time.perf_counter() - start
    start = time.perf_counter()
    out = metric.compute()
    sync(device)
    return Result(elapsed, time.perf_counter() - start, 0.0, float(out["nc1"]))


def run_two_pass(n: int, d: int, k: int, batch: int, device: torch.device) -> Result:
    sums = torch.zeros(k, d, device=device)
    counts = torch.zeros(k, device=device)
    elapsed = 0.0
    for features, target in batches(n, d, k, batch, device):
        sync(device)
        start = time.perf_counter()
        for c in target.unique().tolist():
            rows = features[target == c]
            sums[c] += rows.sum(0)
            counts[c] += rows.shape[0]
        sync(device)
        elapsed += time.perf_counter() - start
    means = sums / counts.clamp_min(1)[:, None]
    within = torch.zeros(d, d, device=device)
    for features, target in batches(n, d, k, batch, device):
        sync(device)
        start = time.perf_counter()
        for c in target.unique().tolist():
            centred = features[target == c] - means[c]
            within += centred.T @ centred
        sync(device)
        elapsed += time.perf_counter() - start
    start = time.perf_counter()
    present = counts > 0
    num = int(present.sum())
    sigma_w = within.double() / counts.sum().double()
    centred_means = (means[present] - means[present].mean(0)).double()
    sigma_b = centred_means.T @ centred_means / num
    values, vectors = torch.linalg.eigh(sigma_b)
    rank = min(num - 1, d)
    values, vectors = values[-rank:], vectors[:, -rank:]
    nc1 = ((sigma_w @ vectors) * vectors).sum(0).div(values).sum() / num
    sync(device)
    return Result(elapsed, time.perf_counter() - start, 0.0, float(nc1))


def run_ours_float32_products(n: int, d: int, k: int, batch: int, device: torch.device) -> Result:
    return run_ours(n, d, k, batch, device, product=torch.float32)


METHODS: dict[str, Callable[..., Result]] = {
    "floor": run_floor,
    "ours": run_ours,
    "ours-f32": run_ours_float32_products,
    "two-pass": run_two_pass,
}


def _best_of(name: str, args: tuple[Any, ...], repeats: int) -> Result:
    """The fastest of ``repeats`` runs (update and compute timed separately)."""
    results = [METHODS[name](*args) for _ in range(repeats)]
    best = min(results, key=lambda r: r.update_s)
    best.compute_s = min(r.compute_s for r in results)
    return best


def _child(name: str, args: tuple[Any, ...], threads: int, repeats: int, queue: Any) -> None:
    try:
        torch.set_num_threads(threads)
        device = args[-1]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = _current_rss_mb()
        result = _best_of(name, args, repeats)
        if device.type == "cuda":
            result.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            result.peak_mb = _rss_mb() - before
        queue.put((result, None))
    except BaseException as error:  # report, do not hang the parent
        queue.put((None, repr(error)))


def measure(name: str, args: tuple[Any, ...], threads: int, repeats: int, fork: bool) -> Result:
    if not fork:
        torch.set_num_threads(threads)
        return _best_of(name, args, repeats)
    ctx = mp.get_context("fork" if args[-1].type == "cpu" else "spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(name, args, threads, repeats, queue))
    process.start()
    result, error = queue.get()
    process.join()
    if error is not None:
        raise RuntimeError(f"{name} failed: {error}")
    assert isinstance(result, Result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument(
        "--sizes", type=cli.sizes, default=DEFAULT_SIZES, help="comma-separated NxDxK sizes"
    )
    parser.add_argument(
        "--batch", type=cli.positive_int, default=1000, help="samples per update batch"
    )
    parser.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--device", type=cli.device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--methods",
        type=cli.names(METHODS),
        default=",".join(METHODS),
        help=f"comma-separated methods to run, from {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=1, help="report the fastest of R runs"
    )
    parser.add_argument("--no-fork", action="store_true", help="run in this process (no memory)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    methods = args.methods
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name}, torch {torch.__version__}, threads {args.threads}, batch {args.batch},"
        f" best of {args.repeats}"
    )
    print()
    print(
        "| N | d | K | floor update s | ours update s | ours / floor | f32-product update s |"
        " f32-product / floor | ours compute s | ours peak MB | two-pass update s |"
        " two-pass compute s | two-pass peak MB | two-pass / ours (total) | NC1 ours |"
        " NC1 two-pass |"
    )
    print("|" + "---|" * 16)
    for n, d, k in args.sizes:
        call = (n, d, k, args.batch, device)
        res = {m: measure(m, call, args.threads, args.repeats, not args.no_fork) for m in methods}
        floor, ours, base = res.get("floor"), res.get("ours"), res.get("two-pass")
        fast = res.get("ours-f32")

        def fmt(value: float | None, spec: str = ".3f") -> str:
            return "-" if value is None else format(value, spec)

        ratio = ours.update_s / floor.update_s if ours and floor else None
        fast_ratio = fast.update_s / floor.update_s if fast and floor else None
        total = (
            (base.update_s + base.compute_s) / (ours.update_s + ours.compute_s)
            if ours and base
            else None
        )
        print(
            f"| {n} | {d} | {k} | {fmt(floor and floor.update_s)} |"
            f" {fmt(ours and ours.update_s)} | {fmt(ratio, '.2f')} |"
            f" {fmt(fast and fast.update_s)} | {fmt(fast_ratio, '.2f')} |"
            f" {fmt(ours and ours.compute_s)} | {fmt(ours and ours.peak_mb, '.0f')} |"
            f" {fmt(base and base.update_s)} | {fmt(base and base.compute_s)} |"
            f" {fmt(base and base.peak_mb, '.0f')} | {fmt(total, '.1f')} |"
            f" {fmt(ours and ours.value, '.6e')} | {fmt(base and base.value, '.6e')} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
