"""Does a CUDA graph close the launch-bound gap of the metric update on a GPU?

Run on a CUDA machine (``benchmarks/gpu.sh`` does, as ``graphs.md``)::

    python benchmarks/gpu_graphs.py --device cuda

At small ``d`` the float32 Gram floor is one GEMM of microseconds while ``ClassStatistics.update``
launches ~17 kernels, so eager updates are launch-bound. The update performs no host-device
synchronisation with ``validate_args=False``, so it can be captured once into a CUDA graph and
replayed per batch (inputs copied into static buffers). For each size ``(batch, d, K)`` this prints
the time per batch of the float32 floor ``X.T @ X``, the eager update and the replayed graph, and
checks that the replayed statistics equal the eager ones (float64; the only difference allowed is
the order of atomic additions in ``index_add_``: relative 1e-12). On CPU it says so and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import _cli as cli
import torch
from torch import Tensor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from torchcollapse.stats import ClassStatistics

SIZES = "1000x256x10000,1000x1024x1000,1000x4096x100"


def measure(batch: int, d: int, k: int, device: torch.device, batches: int) -> str:
    """One table row: floor, eager and replayed-graph update times for ``(batch, d, K)``."""
    g = torch.Generator(device=device).manual_seed(0)
    data = [
        (
            torch.randn(batch, d, device=device, generator=g),
            torch.randint(0, k, (batch,), device=device, generator=g),
        )
        for _ in range(batches)
    ]

    def timed(step: Callable[[Tensor, Tensor], None]) -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for features, target in data:
            step(features, target)
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / len(data) * 1e6

    gram = torch.zeros(d, d, device=device)

    def floor(features: Tensor, target: Tensor) -> None:
        gram.add_(features.T @ features)

    eager = ClassStatistics.zeros(k, d, device=device)

    def eager_step(features: Tensor, target: Tensor) -> None:
        eager.update(features, target, validate_args=False)

    # capture: warm up on a side stream (as torch.cuda.graphs requires), then record one
    # update of the static buffers into the graph's statistics
    static_features = torch.zeros(batch, d, device=device)
    static_target = torch.zeros(batch, dtype=torch.long, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        warm = ClassStatistics.zeros(k, d, device=device)
        for features, target in data[:3]:
            warm.update(features, target, validate_args=False)
    torch.cuda.current_stream(device).wait_stream(side)
    captured = ClassStatistics.zeros(k, d, device=device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.update(static_features, static_target, validate_args=False)

    def graph_step(features: Tensor, target: Tensor) -> None:
        static_features.copy_(features)
        static_target.copy_(target)
        graph.replay()

    timed(floor)  # warm-up of the GEMM
    floor_us = timed(floor)
    eager_us = timed(eager_step)
    graph_us = timed(graph_step)
    mine, theirs = captured.pack(), eager.pack()
    same = torch.allclose(mine, theirs, rtol=1e-12, atol=1e-12 * float(theirs.abs().max()))
    return (
        f"| {batch} | {d} | {k} | {floor_us:.1f} | {eager_us:.1f} | {graph_us:.1f} |"
        f" {eager_us / floor_us:.2f} | {graph_us / floor_us:.2f} | {same} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--device", type=cli.device, default="cuda", help="cuda or cuda:N")
    parser.add_argument(
        "--sizes", type=cli.sizes, default=SIZES, help="comma-separated BxDxK sizes"
    )
    parser.add_argument(
        "--batches", type=cli.positive_int, default=50, help="batches per timed block"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("CUDA graphs need a CUDA device: skipped.")
        return
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}\n")
    print(
        "| batch | d | K | floor us / batch | eager us / batch | graph us / batch |"
        " eager / floor | graph / floor | graph == eager |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for batch, d, k in args.sizes:
        print(measure(batch, d, k, device, args.batches))


if __name__ == "__main__":
    main()
