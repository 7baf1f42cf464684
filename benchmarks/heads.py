"""Speed of the classifier heads against ``nn.Linear`` of the same shape.

Run::

    python benchmarks/heads.py            # full grid (a few minutes on 2 CPU cores)
    python benchmarks/heads.py --quick    # a smaller grid

Prints three markdown tables:

1. forward + backward (gradient for the input features, and for the parameters the head has) of
   each head against ``nn.Linear`` at batch N, feature dimension d and K classes, as a ratio to
   the ``nn.Linear`` time measured in the same run: each head is paired with ``nn.Linear`` alone
   and the two are sampled in turn, so that load from other processes hits both alike (the
   fastest of the samples is reported: other processes only add time);
2. the extra cost of :class:`~torchcollapse.heads.NearestETFHead`'s training step (running-mean
   update plus the Procrustes SVD) over ``nn.Linear``, against the time of a ResNet-18 training
   step (written here, no torchvision) at a small CPU batch;
3. construction time of :func:`~torchcollapse.frames.spherical_code`, uncached and cached, with
   the minimum angle reached, that of random points, and the upper bound.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import _cli as cli
import torch
import torch.nn.functional as F
from _device import sync
from torch import nn

from torchcollapse import frames
from torchcollapse.frames import frame_angle_report, frame_min_angle, spherical_code
from torchcollapse.heads import CosineHead, FixedFrameHead, NearestETFHead

CPU = torch.device("cpu")


def interleaved_times(
    steps: dict[str, Callable[[], object]], repeats: int, device: torch.device = CPU
) -> dict[str, float]:
    """Seconds per call of each step: the fastest of ``repeats`` samples, sampled in turn.

    Each sample runs a step enough times to last about 20 ms. Other processes only ever add
    time, so the fastest sample is the best estimate of a step's own cost on a shared machine;
    sampling the steps in turn exposes them to the same load.
    """
    inner: dict[str, int] = {}
    for name, step in steps.items():  # warm-up (about 50 ms of calls) and calibration
        step()
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        once = max(time.perf_counter() - start, 1e-6)
        inner[name] = max(1, min(1000, int(0.02 / once)))
        for _ in range(max(1, min(2000, int(0.05 / once)))):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                step()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner[name])
    return {name: min(values) for name, values in times.items()}


def forward_backward(
    module: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None
) -> Callable[[], object]:
    def step() -> object:
        module.zero_grad(set_to_none=True)
        x.grad = None
        logits = module(x) if target is None else module(x, target)
        logits.sum().backward()
        return logits

    return step


def head_table(
    grid: list[tuple[int, int, int]], repeats: int, device: torch.device = CPU
) -> list[str]:
    rows = [
        "| N | d | K | nn.Linear (ms) | fixed frame, normalized | fixed frame, unnormalized "
        "| CosineHead | CosineHead + ArcFace | NearestETFHead (train step) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(rows), flush=True)
    for n, d, k in grid:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=gen).to(device).requires_grad_()
        target = torch.randint(0, k, (n,), generator=gen).to(device)
        frame = spherical_code(k, d)  # the simplex when d >= K - 1
        steps: dict[str, Callable[[], object]] = {
            "linear": forward_backward(nn.Linear(d, k, device=device), x),
            "normalized": forward_backward(FixedFrameHead(frame, device=device), x),
            "unnormalized": forward_backward(
                FixedFrameHead(frame, normalize_features=False, device=device), x
            ),
            "cosine": forward_backward(CosineHead(d, k, device=device), x),
            "arcface": forward_backward(
                CosineHead(d, k, margin=0.5, margin_type="arcface", device=device), x, target
            ),
        }
        if d >= k - 1:
            nearest = NearestETFHead(d, k, device=device).train()
            steps["nearest"] = forward_backward(nearest, x, target)
        # each head is timed in turn with nn.Linear alone (pairwise), so that the other heads'
        # kernels and allocations do not sit between the two being compared
        linear = steps.pop("linear")
        ratios, bases = {}, []
        for name, step in steps.items():
            pair = interleaved_times({"linear": linear, name: step}, repeats, device)
            ratios[name] = pair[name] / pair["linear"]
            bases.append(pair["linear"])
        base = min(bases)
        cells = [f"{ratios[name]:.2f}x" for name in steps]
        if "nearest" not in steps:
            cells.append("n/a (d < K-1)")
        rows.append(f"| {n} | {d} | {k} | {1e3 * base:.2f} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (3x3 stem, 4 stages of 2 basic blocks, 512 features)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64))
        layers: list[nn.Module] = []
        inputs = 64
        for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)]
            inputs = outputs
        self.layers = nn.Sequential(*layers)
        self.head = head

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        features = F.adaptive_avg_pool2d(self.layers(F.relu(self.stem(x))), 1).flatten(1)
        return self.head(features) if target is None else self.head(features, target)


def nearest_overhead_table(batch: int, repeats: int, device: torch.device = CPU) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    rows = [
        f"ResNet-18 (CIFAR, 32x32) training step, batch {batch}, {device.type}:",
        "",
        "| K | d | ResNet-18 step, nn.Linear head (ms) | head step: nn.Linear (ms) "
        "| head step: NearestETFHead (ms) | overhead / ResNet-18 step |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(rows), flush=True)
    for k in (10, 100):
        target = torch.randint(0, k, (batch,), generator=gen).to(device)
        torch.manual_seed(0)
        model = ResNet18(nn.Linear(512, k)).to(device)
        model_step = forward_backward(model, images)
        model_time = interleaved_times({"model": model_step}, max(3, repeats // 4), device)["model"]
        # the heads alone, at the same batch, many repeats: their difference is what the
        # NearestETFHead adds to the step (the backbone's work is identical)
        x = torch.randn(batch, 512, generator=gen).to(device).requires_grad_()
        heads = interleaved_times(
            {
                "linear": forward_backward(nn.Linear(512, k, device=device), x),
                "nearest": forward_backward(
                    NearestETFHead(512, k, device=device).train(), x, target
                ),
            },
            repeats * 4,
            device,
        )
        extra = heads["nearest"] - heads["linear"]
        rows.append(
            f"| {k} | 512 | {1e3 * model_time:.1f} | {1e3 * heads['linear']:.3f} | "
            f"{1e3 * heads['nearest']:.3f} | {100 * extra / model_time:.2f}% |"
        )
        print(rows[-1], flush=True)
    return rows


def spherical_code_table(cases: list[tuple[int, int]]) -> list[str]:
    rows = [
        "| K | d | build (s) | cached (ms) | min angle (deg) | random points (deg) "
        "| upper bound (deg) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(rows), flush=True)
    for k, d in cases:
        frames._cached_code.cache_clear()
        start = time.perf_counter()
        code = spherical_code(k, d)
        built = time.perf_counter() - start
        start = time.perf_counter()
        spherical_code(k, d)
        cached = time.perf_counter() - start
        report = frame_angle_report(code)
        random_angle = frame_min_angle(
            torch.randn(k, d, generator=torch.Generator().manual_seed(0))
        )
        rows.append(
            f"| {k} | {d} | {built:.1f} | {1e3 * cached:.1f} | {report.min_angle:.2f} | "
            f"{random_angle:.2f} | {report.bound:.2f} ({report.bound_name}) |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller grid, fewer repeats")
    parser.add_argument(
        "--repeats",
        type=cli.positive_int,
        default=None,
        help="timed repeats per cell (none: 5 with --quick, else 11)",
    )
    parser.add_argument(
        "--resnet-batch", type=cli.positive_int, default=16, help="ResNet-18 step batch"
    )
    parser.add_argument(
        "--threads", type=cli.threads, default=None, help="torch threads (none: torch's own)"
    )
    parser.add_argument(
        "--device", type=cli.device, default="cpu", help="cpu or cuda (frames are built on CPU)"
    )
    parser.add_argument("--skip-codes", action="store_true", help="skip the spherical_code table")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 11)
    if args.quick:
        grid = [(256, 512, 10), (1024, 512, 100), (1024, 2048, 1000)]
        codes = [(1000, 64)]
    else:
        grid = [(n, d, k) for n in (256, 1024, 4096) for d in (512, 2048) for k in (10, 100, 1000)]
        codes = [(1000, 64), (10000, 128)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {where}\n")
    head_table(grid, repeats, device)
    print()
    nearest_overhead_table(args.resnet_batch, repeats, device)
    if not args.skip_codes:
        print()
        spherical_code_table(codes)


if __name__ == "__main__":
    main()
