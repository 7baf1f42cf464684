"""Overhead of the collapse regularizers on a training step, and how their cost scales.

Run from the repository root::

    .venv/bin/python benchmarks/losses.py                       # CPU: MNIST-1D-sized 1-D CNN
    .venv/bin/python benchmarks/losses.py --device cuda --model resnet18 --batch-size 128 \
        --amp bf16                                               # GPU: ResNet-18 on 32x32 images

Part 1 times a full training step (forward, cross-entropy, backward, SGD step) of the recipes'
model with and without each loss term added to the cross-entropy, on random inputs of the model's
size, and prints the overhead relative to the plain step measured in the same run: every block of
steps of a variant is timed right after a block of plain steps, and the median over rounds of the
pair's ratio is reported, so that the drifts of a shared, noisy machine cancel. The target is an
overhead of at most 5%. On CPU the clock is the thread's CPU time (one intra-op thread by
default), which other processes on a shared machine disturb less than wall time.

Part 2 times one regularizer forward + backward on random features alone, for a grid of batch
size N, feature dimension d and number of classes K, against the cost of the thing it rides on:
a linear head plus cross-entropy (forward + backward) of the same N, d, K.

``--in-step`` instead times each term's forward inside the training step (right after the
model's forward, with the caches full of the step before) against the same call repeated alone:
on a CPU the first is several times the second, which is why a term's share of a small step is
larger than its standalone cost suggests.

``--count-ops`` instead counts the operations each term dispatches in one forward + backward
(batch 128, d = 512, 10 classes): on the CPU path (scalars as Python floats) and on the path of
accelerators and ``torch.compile`` (scalars as 0-dim tensors, index kernels), which it forces on
CPU, with the values that path reads back on the host (each one a synchronisation on a GPU; there
should be none). On a GPU every one of those operations is a kernel launch, whose cost does not
depend on the batch: a noise-free measure of what a term adds to a launch-bound training step.
Forced on CPU, the accelerator path still checks the label range the CPU way (an accelerator
runs one asynchronous assertion instead), so its counts are within an operation or two.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import _cli as cli
from _device import sync
from harness.models import CNN1d, CollapseModel, ResNet18

from torchcollapse.losses import (
    CollapseRegularizer,
    DotRegressionLoss,
    SelfDualityLoss,
    SimplexGeometryLoss,
    WithinClassVariabilityLoss,
)

Term = Callable[[Tensor, Tensor, nn.Module], Tensor]


def terms(
    num_classes: int, feature_dim: int, device: torch.device, compile_: bool
) -> dict[str, Term]:
    """Each loss term as ``term(features, target, head)``, modules built once."""
    wcv = WithinClassVariabilityLoss(num_classes, 0.1)
    ratio = WithinClassVariabilityLoss(num_classes, 0.1, form="ratio")
    running = WithinClassVariabilityLoss(
        num_classes, 0.01, form="running", in_features=feature_dim, device=device
    )
    nc2 = SimplexGeometryLoss(num_classes, 0.1)
    nc3 = SelfDualityLoss(num_classes, 0.1)
    combined = CollapseRegularizer(num_classes, nc1=0.1, nc2=0.1, nc3=0.1)
    aimed = CollapseRegularizer(num_classes, nc1=1.0, target_nc1=0.2)
    dot = DotRegressionLoss(class_counts="batch")
    out: dict[str, Term] = {
        "NC1 bounded": lambda f, y, h: wcv(f, y),
        "NC1 ratio": lambda f, y, h: ratio(f, y),
        "NC1 running means": lambda f, y, h: running(f, y),
        "NC2 batch means": lambda f, y, h: nc2(f, y),
        "NC2 classifier": lambda f, y, h: nc2(classifier=h),
        "NC3": lambda f, y, h: nc3(f, y, h),
        "CollapseRegularizer NC1+NC2+NC3": lambda f, y, h: combined(f, y, h),
        "CollapseRegularizer target NC1": lambda f, y, h: aimed(f, y),
        "DotRegressionLoss (batch counts)": lambda f, y, h: 0.1 * dot(f, y, h),
        # calibration: what twenty trivial kernels (and their backward) cost inside this step
        "reference: 20 x (f * i).mean()": lambda f, y, h: torch.stack(
            [(f * float(i)).mean() for i in range(20)]
        ).sum(),
    }
    if compile_:
        compiled = torch.compile(CollapseRegularizer(num_classes, nc1=0.1, nc2=0.1, nc3=0.1))
        out["CollapseRegularizer NC1+NC2+NC3, torch.compile"] = lambda f, y, h: compiled(f, y, h)
    return out


def build(
    name: str, num_classes: int, device: torch.device
) -> tuple[CollapseModel, tuple[int, ...]]:
    if name == "cnn":
        return CNN1d(1, 40, num_classes).to(device), (1, 40)
    if name == "resnet18":
        return ResNet18(num_classes).to(device), (3, 32, 32)
    raise SystemExit(f"unknown model {name!r}: use cnn or resnet18")


def clock(device: torch.device) -> float:
    """Seconds: this thread's CPU time on CPU (robust to other processes on a shared machine),
    wall time on an accelerator (after synchronising)."""
    if device.type == "cpu":
        return time.thread_time()
    return time.perf_counter()


def step_benchmark(
    args: argparse.Namespace, device: torch.device
) -> list[tuple[str, float, float]]:
    model, shape = build(args.model, args.num_classes, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.batch_size, *shape, generator=g).to(device)
    target = (torch.arange(args.batch_size) % args.num_classes).to(device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    variants: dict[str, Term | None] = {"plain step (baseline)": None}
    variants.update(terms(args.num_classes, model.feature_dim, device, args.compile))

    def step(term: Term | None) -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            features = model.forward_features(inputs)
            loss = F.cross_entropy(model.forward_head(features), target)
            if term is not None:
                loss = loss + term(features, target, model.head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def block(term: Term | None) -> float:
        sync(device)
        start = clock(device)
        for _ in range(args.steps):
            step(term)
        sync(device)
        return (clock(device) - start) / args.steps

    for _ in range(args.warmup):
        for term in variants.values():
            step(term)
    # each variant's block is timed right after a baseline block: the ratio of the pair cancels
    # the slow drifts of a shared machine; medians over rounds drop the outliers
    times: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, term in variants.items():
            base = block(None)
            cost = block(term) if term is not None else base
            times[name].append(cost)
            ratios[name].append(cost / base)
    rows = []
    for name in variants:
        ratio = statistics.median(ratios[name])
        rows.append((name, statistics.median(times[name]) * 1e3, 100.0 * (ratio - 1.0)))
    return rows


def in_step_benchmark(args: argparse.Namespace, device: torch.device) -> list[tuple[str, ...]]:
    """Each term's forward timed inside the training step (right after the model's forward, its
    code and data cold from the step that ran before) and the same call repeated alone (warm),
    forward and backward; medians of ``args.rounds * args.steps`` calls, microseconds."""
    model, shape = build(args.model, args.num_classes, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.batch_size, *shape, generator=g).to(device)
    target = (torch.arange(args.batch_size) % args.num_classes).to(device)
    calls = args.rounds * args.steps
    rows = []
    for name, term in terms(args.num_classes, model.feature_dim, device, False).items():
        in_step = []
        for _ in range(args.warmup + calls):
            features = model.forward_features(inputs)
            loss = F.cross_entropy(model.forward_head(features), target)
            sync(device)
            start = clock(device)
            value = term(features, target, model.head)
            sync(device)
            in_step.append(clock(device) - start)
            opt.zero_grad(set_to_none=True)
            (loss + value).backward()
            opt.step()
        leaf = model.forward_features(inputs).detach().requires_grad_()
        forward, backward = [], []
        for _ in range(args.warmup + calls):
            sync(device)
            start = clock(device)
            value = term(leaf, target, model.head)
            sync(device)
            middle = clock(device)
            value.backward()
            sync(device)
            forward.append(middle - start)
            backward.append(clock(device) - middle)
        rows.append(
            (
                name,
                *(
                    f"{statistics.median(times[args.warmup :]) * 1e6:.0f}"
                    for times in (in_step, forward, backward)
                ),
            )
        )
    return rows


def scaling_benchmark(
    args: argparse.Namespace, device: torch.device
) -> list[tuple[int, int, int, float, float, float]]:
    rows = []
    for n, d, k in [
        (256, 64, 10),
        (1024, 64, 10),
        (4096, 64, 10),
        (1024, 512, 10),
        (1024, 512, 100),
        (1024, 512, 1000),
    ]:
        g = torch.Generator().manual_seed(1)
        features = torch.randn(n, d, generator=g).to(device).requires_grad_()
        target = (torch.arange(n) % k).to(device)
        head = nn.Linear(d, k).to(device)
        reg = CollapseRegularizer(k, nc1=1.0, nc2=1.0, nc3=1.0)

        calls: dict[str, Callable[[], Tensor]] = {
            "baseline": lambda f=features, y=target, h=head: F.cross_entropy(h(f), y),
            "reg": lambda f=features, y=target, h=head, r=reg: r(f, y, h),
        }
        measured: dict[str, list[float]] = {"baseline": [], "reg": []}
        for fn in calls.values():
            fn().backward()
        for _ in range(args.rounds):
            for name, fn in calls.items():
                sync(device)
                start = clock(device)
                for _ in range(args.steps):
                    fn().backward()
                sync(device)
                measured[name].append((clock(device) - start) / args.steps)
        base = statistics.median(measured["baseline"])
        cost = statistics.median(measured["reg"])
        ratio = statistics.median(r / b for r, b in zip(measured["reg"], measured["baseline"]))
        rows.append((n, d, k, base * 1e3, cost * 1e3, ratio))
    return rows


_VIEWS = {
    f"aten::{name}"
    for name in [
        "view", "alias", "as_strided", "detach", "expand", "narrow", "numpy_T", "permute",
        "reshape", "_reshape_alias", "resolve_conj", "resolve_neg", "select", "slice", "split",
        "squeeze", "t", "transpose", "unbind", "unsqueeze", "_unsafe_view", "empty",
        "empty_like", "empty_strided", "result_type", "lift_fresh", "contiguous",
    ]
}  # fmt: skip
"""Operations that launch no kernel (views, allocations, metadata)."""
_HOST_READS = {"aten::item", "aten::_local_scalar_dense"}


def dispatched_ops(events: Any) -> int:
    """Operations among profiler ``events`` that do work: innermost ``aten::`` calls on the host
    side, views, allocations and host reads left out."""
    from torch.autograd import DeviceType

    skip = _VIEWS | _HOST_READS
    return sum(
        event.name.startswith("aten::")
        and event.device_type == DeviceType.CPU
        and event.name not in skip
        and not any(
            child.name.startswith("aten::") and child.name not in skip
            for child in event.cpu_children
        )
        for event in events
    )


def count_ops(accelerator_path: bool) -> list[tuple[str, int, int]]:
    """Operations (not views) each term dispatches in one forward + backward, on CPU, and the
    values it reads on the host; with ``accelerator_path`` the code path of accelerators and
    ``torch.compile`` is forced."""
    from contextlib import ExitStack
    from unittest import mock

    from torch.profiler import ProfilerActivity, profile

    import torchcollapse.losses._fused as fused

    n, d, k = 128, 512, 10
    features = torch.randn(n, d, requires_grad=True)
    target = torch.arange(n) % k
    head = nn.Linear(d, k)
    rows = []
    with ExitStack() as stack:
        if accelerator_path:
            stack.enter_context(mock.patch.object(fused, "_is_compiling", return_value=True))
            for module in ("_fused", "dot_regression", "within_class"):
                stack.enter_context(
                    mock.patch(f"torchcollapse.losses.{module}.host_scalars", return_value=False)
                )
        for name, term in terms(k, d, torch.device("cpu"), False).items():
            if name.startswith("reference"):
                continue
            for _ in range(2):
                term(features, target, head).backward()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                term(features, target, head).backward()
            events = prof.events()
            reads = sum(event.name == "aten::item" for event in events)
            rows.append((name, dispatched_ops(events), reads))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--device", type=cli.device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--model", default="cnn", choices=["cnn", "resnet18"], help="network of the step"
    )
    parser.add_argument("--batch-size", type=cli.positive_int, default=128, help="batch size")
    parser.add_argument(
        "--num-classes", type=cli.num_classes, default=10, help="number of classes K"
    )
    parser.add_argument(
        "--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision"
    )
    parser.add_argument("--steps", type=cli.positive_int, default=10, help="steps per timed block")
    parser.add_argument(
        "--rounds", type=cli.positive_int, default=7, help="interleaved timed blocks per variant"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timings")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="CPU intra-op threads")
    parser.add_argument(
        "--skip-scaling", action="store_true", help="skip the table of sizes (scaling)"
    )
    parser.add_argument(
        "--count-ops", action="store_true", help="count the operations of each term and exit"
    )
    parser.add_argument(
        "--compile", action="store_true", help="add a torch.compile'd CollapseRegularizer row"
    )
    parser.add_argument(
        "--in-step",
        action="store_true",
        help="time each term's forward inside the training step and alone, then exit",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, device {device} ({machine}), {threads} CPU thread(s)")
    if args.count_ops:
        print("\n### Operations per forward + backward (batch 128, d = 512, 10 classes)\n")
        print("| term | CPU path | accelerator path | host reads on the accelerator path |")
        print("|---|---:|---:|---:|")
        for (name, cpu, _), (_, accelerator, reads) in zip(count_ops(False), count_ops(True)):
            print(f"| {name} | {cpu} | {accelerator} | {reads} |")
        return
    if args.in_step:
        print(f"\n### Term forward inside the step vs alone (microseconds, {args.model})\n")
        print("| term | forward in the step | forward alone | backward alone |")
        print("|---|---:|---:|---:|")
        for row in in_step_benchmark(args, device):
            print("| " + " | ".join(row) + " |")
        return
    print(
        f"\n### Training-step overhead: {args.model}, batch {args.batch_size}, "
        f"{args.num_classes} classes, amp {args.amp}\n"
    )
    print("| variant | ms / step | overhead vs plain step |")
    print("|---|---:|---:|")
    for name, ms, overhead in step_benchmark(args, device):
        print(f"| {name} | {ms:.2f} | {overhead:+.1f}% |")
    if args.skip_scaling:
        return
    print("\n### CollapseRegularizer(NC1+NC2+NC3) forward+backward vs linear head + CE\n")
    print("(ratio: median over rounds of regularizer time / head + CE time measured alongside)\n")
    print("| N | d | K | head + CE (ms) | regularizer (ms) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, d, k, base, cost, ratio in scaling_benchmark(args, device):
        print(f"| {n} | {d} | {k} | {base:.3f} | {cost:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
