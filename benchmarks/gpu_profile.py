"""Where the time of one metric update and of one regularizer goes: launches, host, device.

Run by ``benchmarks/gpu.sh`` (or alone)::

    python benchmarks/gpu_profile.py --device cuda
    python benchmarks/gpu_profile.py --device cpu      # dry run without a GPU

For each call it reports, per call: the operations dispatched (views and allocations left out;
on a GPU each one is a kernel launch or a host-side step of one), the device kernels and their
total time (CUDA only, from ``torch.profiler``; copies and fills not counted), the host time of
``--calls`` calls issued back to back without synchronising (the time to dispatch them) and the
wall time once the device has finished them. A call whose dispatch time exceeds its device
time is launch-bound: fewer operations, CUDA graphs or ``torch.compile`` would speed it up,
faster kernels would not.

Calls:

- ``NeuralCollapse(K).update`` on batches of 1000 float32 features at ``(d, K)`` = (256, 10000),
  (1024, 1000) and (4096, 100) (``validate_args=False``), next to the float32 Gram floor
  ``gram += X.T @ X`` of the same batch;
- each loss term of ``benchmarks/losses.py`` on ``(128, 512)`` features with 10 classes, forward
  + backward, next to a linear head + cross-entropy of the same shape.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import _cli as cli
from _device import sync
from losses import dispatched_ops, terms

from torchcollapse.metrics import NeuralCollapse


def _kernel_time_us(event: object) -> float:
    """Device time of a kernel event (``cuda_time`` before torch 2.4)."""
    name = "device_time" if hasattr(event, "device_time") else "cuda_time"
    return float(getattr(event, name, 0.0) or 0.0)


def measure(call: Callable[[], object], device: torch.device, calls: int) -> dict[str, float]:
    """Per-call operations, kernels, device time, dispatch time and wall time of ``call``."""
    for _ in range(3):
        call()
    sync(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        call()
        sync(device)
    events = prof.events()
    kernels = [
        event
        for event in events
        if event.device_type == DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset"))
    ]
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    dispatched = time.perf_counter() - start
    sync(device)
    wall = time.perf_counter() - start
    return {
        "ops": dispatched_ops(events),
        "kernels": len(kernels),
        "device_us": sum(_kernel_time_us(event) for event in kernels),
        "dispatch_us": dispatched / calls * 1e6,
        "wall_us": wall / calls * 1e6,
    }


def row(name: str, result: dict[str, float], device: torch.device) -> str:
    kernels = f"{result['kernels']:.0f}" if device.type == "cuda" else "-"
    device_us = f"{result['device_us']:.1f}" if device.type == "cuda" else "-"
    return (
        f"| {name} | {result['ops']:.0f} | {kernels} | {device_us} | "
        f"{result['dispatch_us']:.1f} | {result['wall_us']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--device", type=cli.device, default="cuda", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--calls", type=cli.positive_int, default=50, help="calls timed back to back"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, {args.calls} calls per timing\n")
    header = (
        "| call | operations | device kernels | device us | dispatch us (no sync) "
        "| wall us (synced) |\n|---|---:|---:|---:|---:|---:|"
    )
    print("### Metric update, batch of 1000 float32 features\n")
    print(header)
    g = torch.Generator().manual_seed(0)
    for d, k in [(256, 10000), (1024, 1000), (4096, 100)]:
        features = torch.randn(1000, d, generator=g).to(device)
        target = torch.randint(0, k, (1000,), generator=g).to(device)
        gram = torch.zeros(d, d, device=device)

        def floor(x: torch.Tensor = features, out: torch.Tensor = gram) -> None:
            out.add_(x.T @ x)

        metric = NeuralCollapse(k, num_features=d, validate_args=False).to(device)
        print(row(f"floor `gram += X.T @ X`, d = {d}", measure(floor, device, args.calls), device))
        update = metric.update
        result = measure(lambda u=update, x=features, y=target: u(x, y), device, args.calls)
        print(row(f"`NeuralCollapse.update`, d = {d}, K = {k}", result, device))
    print("\n### Loss terms, forward + backward, (128, 512) features, 10 classes\n")
    print(header)
    features = torch.randn(128, 512, generator=g).to(device).requires_grad_()
    target = (torch.arange(128) % 10).to(device)
    head = nn.Linear(512, 10).to(device)

    def reference() -> None:
        F.cross_entropy(head(features), target).backward()

    result = measure(reference, device, args.calls)
    print(row("reference: linear head + cross-entropy", result, device))
    for term_name, term in terms(10, 512, device, False).items():
        if term_name.startswith("reference"):
            continue

        def call(t: Callable[..., torch.Tensor] = term) -> None:
            t(features, target, head).backward()

        print(row(term_name, measure(call, device, args.calls), device))


if __name__ == "__main__":
    main()
