"""Correctness checks of the neural collapse metrics on a GPU, against CPU float64 references.

Run by ``benchmarks/gpu.sh`` (or alone)::

    python benchmarks/gpu_checks.py --device cuda
    python benchmarks/gpu_checks.py --device cpu --large 3000x64x2000  # dry run without a GPU

Checks, each printed as one line with its largest relative error and PASS/FAIL:

1. every key of ``NeuralCollapse.compute()`` (streamed in ragged batches on the device, inputs in
   float16, bfloat16, float32 and float64) against the independent two-pass float64 numpy
   reference of the tests (``tests/_helpers/reference.py``, on the same rounded values), on a
   balanced case, a Zipf case with an empty class, a ``K - 1 >= d`` case and an NC1 ~ 1e-6 case
   behind an offset of 1e3, with TF32 matmuls enabled globally (they must not matter);
2. ``update`` performs no host-device synchronisation (``validate_args=False``, checked with
   ``torch.cuda.set_sync_debug_mode("error")``);
3. a large case (default ``K = 50,000``, ``d = 4,096``) computes, and its NC1, trace ratio,
   equiangularity and ETF distance match an independent float64 computation on the device (class
   means by a first pass, ``Sigma_W`` by a second pass, NC1 from ``eigh`` of ``Sigma_B``; the
   pairwise quantities from the Gram identities ``sum_{c != c'} cos = ||sum u||^2 - K`` and
   ``sum cos^2 = ||U^T U||_F^2 - K``);
4. ``product_dtype=torch.float32`` stays in full float32 precision with TF32 enabled through
   torch's per-backend settings (``torch.backends.fp32_precision = "tf32"``, torch >= 2.9):
   NC1 within 2e-5 of the float64 reference (a TF32 product errs by ~1e-3), settings unchanged.

Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import _cli as cli
import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, ROOT)

from tests._helpers.cases import collapse_case as make_case  # noqa: E402
from tests._helpers.reference import reference_neural_collapse  # noqa: E402
from torchcollapse.metrics import NeuralCollapse  # noqa: E402

FAILURES: list[str] = []


def report(name: str, error: float, bound: float, extra: str = "") -> None:
    ok = bool(np.isfinite(error)) and error <= bound
    if not ok:
        FAILURES.append(name)
    verdict = "PASS" if ok else "FAIL"
    print(f"{verdict} {name}: max relative error {error:.2e} (bound {bound:g}) {extra}")


def check_small_cases(device: torch.device) -> None:
    cases = {
        "balanced": {"n": 600, "d": 32, "k": 10},
        "zipf with an empty class": {"n": 800, "d": 24, "k": 12, "zipf": True, "empty": 3},
        "K - 1 >= d": {"n": 900, "d": 6, "k": 20},
        "NC1 ~ 1e-6 behind offset 1e3": {
            "n": 1200,
            "d": 16,
            "k": 8,
            "spread": 1e-3,
            "offset": 1e3,
        },
    }
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # must not change anything: float64 inside
    for name, spec in cases.items():
        features, target, weight, bias = make_case(**spec)  # type: ignore[arg-type]
        k = int(spec["k"])
        dtypes = [torch.float32, torch.float64]
        if not spec.get("offset"):
            dtypes = [torch.float16, torch.bfloat16, *dtypes]
        for dtype in dtypes:
            rounded = features.to(dtype)
            layer = torch.nn.Linear(features.shape[1], k, dtype=torch.float64).to(device)
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
            reference = reference_neural_collapse(
                rounded.double(), target, k, weight=weight, bias=bias
            )
            metric = NeuralCollapse(k, classifier=layer).to(device)
            means = torch.from_numpy(
                np.stack(
                    [
                        rounded.double()[target == c].mean(0).numpy()
                        if bool((target == c).any())
                        else np.full(features.shape[1], np.nan)
                        for c in range(k)
                    ]
                )
            )
            metric.set_class_means(means.to(device))
            sizes = [1, 7, 100, 33]
            sizes.append(features.shape[0] - sum(sizes))
            for f, t in zip(rounded.split(sizes), target.split(sizes)):
                metric.update(f.to(device), t.to(device))
            out = {key: float(v) for key, v in metric.compute().items()}
            missing = set(reference) ^ set(out)
            errors = [
                abs(out[key] - value) / max(abs(value), 1e-300)
                for key, value in reference.items()
                if key in out and not (value == 0.0 and out[key] == 0.0)
            ]
            report(
                f"{name} [{str(dtype).removeprefix('torch.')}] every key vs float64 reference",
                max(errors) if not missing else float("inf"),
                1e-6,
                f"keys differ: {sorted(missing)}" if missing else f"({len(reference)} keys)",
            )


def check_no_sync(device: torch.device) -> None:
    if device.type != "cuda":
        print("SKIP update synchronisation check (needs CUDA)")
        return
    features, target, _, _ = make_case(4096, 256, 1000)
    batches = list(zip(features.float().to(device).split(512), target.to(device).split(512)))
    plain = NeuralCollapse(1000, num_features=256, validate_args=False).to(device)
    # NC4 counted in update: a classifier and reference means from a first pass
    head = torch.nn.Linear(256, 1000).to(device)
    with_nc4 = NeuralCollapse(1000, num_features=256, classifier=head, validate_args=False)
    with_nc4 = with_nc4.to(device)
    for f, t in batches:
        with_nc4.update(f, t)
    with_nc4.set_class_means(with_nc4.class_means())
    for name, metric in (("", plain), (", NC4 counted", with_nc4)):
        metric.update(*batches[0])
        torch.cuda.synchronize(device)
        try:
            torch.cuda.set_sync_debug_mode("error")
            for f, t in batches[1:]:
                metric.update(f, t)
            ok = True
        except RuntimeError as error:
            ok = False
            print(f"  synchronisation{name}: {error}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        report(
            f"update(validate_args=False{name}) without host-device synchronisation",
            0.0 if ok else 1.0,
            0.0,
        )


def check_large(device: torch.device, n: int, d: int, k: int, batch: int) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    means = torch.randn(k, d, device=device, generator=g)

    def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=device).manual_seed(1)
        out = []
        for start in range(0, n, batch):
            size = min(batch, n - start)
            target = torch.randint(0, k, (size,), device=device, generator=gen)
            noise = torch.randn(size, d, device=device, generator=gen)
            out.append((means[target] + 0.5 * noise, target))
        return out

    data = batches()
    metric = NeuralCollapse(k, num_features=d, validate_args=False).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for f, t in data:
        metric.update(f, t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    update_s = time.perf_counter() - start
    start = time.perf_counter()
    out = metric.compute()
    compute_s = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    )
    print(
        f"  large case N={n} d={d} K={k}: update {update_s:.2f} s, compute {compute_s:.2f} s,"
        f" peak {peak:.1f} GiB, {int(out['num_classes_present'])} classes present"
    )
    # Independent two-pass float64 computation on the device.
    sums = torch.zeros(k, d, dtype=torch.float64, device=device)
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    for f, t in data:
        sums.index_add_(0, t, f.double())
        counts.index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
    present = counts > 0
    class_means = sums[present] / counts[present, None]
    within = torch.zeros(d, d, dtype=torch.float64, device=device)
    ssq = torch.zeros((), dtype=torch.float64, device=device)
    full_means = torch.zeros(k, d, dtype=torch.float64, device=device)
    full_means[present] = class_means
    for f, t in data:
        centred = f.double() - full_means[t]
        within += centred.T @ centred
        ssq += centred.square().sum()
    num = int(present.sum())
    sigma_w = within / counts.sum()
    centred_means = class_means - class_means.mean(0)
    sigma_b = centred_means.T @ centred_means / num
    values, vectors = torch.linalg.eigh(sigma_b)
    rank = min(num - 1, d)
    values, vectors = values[-rank:], vectors[:, -rank:]
    nc1 = float(((sigma_w @ vectors) * vectors).sum(0).div(values).sum() / num)
    trace_ratio = float((ssq / counts.sum()) / (centred_means.square().sum() / num))
    units = centred_means / centred_means.norm(dim=1, keepdim=True)
    pairs = num * (num - 1) / 2
    sum_cos = (float(units.sum(0).square().sum()) - num) / 2
    sum_cos2 = (float((units.T @ units).square().sum()) - num) / 2
    equiangularity = math.sqrt((sum_cos2 - sum_cos**2 / pairs) / (pairs - 1))
    gram_norm = float(torch.linalg.matrix_norm(centred_means.T @ centred_means))
    inner = float(centred_means.square().sum()) - float(centred_means.sum(0).square().sum()) / num
    etf = math.sqrt(max(0.0, 2.0 - 2.0 * inner / (gram_norm * math.sqrt(num - 1))))
    expected = {
        "nc1": nc1,
        "nc1_trace_ratio": trace_ratio,
        "nc2_equiangularity": equiangularity,
        "nc2_etf_distance": etf,
    }
    errors = [abs(float(out[key]) - value) / abs(value) for key, value in expected.items()]
    report(
        f"large case K={k} d={d} computes; NC1, trace ratio, equiangularity, ETF distance",
        max(errors),
        1e-6,
    )


def check_float32_product(device: torch.device) -> None:
    """Check 4 (last: it switches the process to torch's per-backend precision settings)."""
    if not hasattr(torch.backends, "fp32_precision"):
        print("SKIP float32 product under per-backend TF32 settings (torch < 2.9)")
        return
    torch.backends.fp32_precision = "tf32"
    before = torch.backends.cuda.matmul.fp32_precision
    features, target, _, _ = make_case(n=4000, d=64, k=10)
    metric = NeuralCollapse(10, product_dtype=torch.float32).to(device)
    for f, t in zip(features.split(1000), target.split(1000)):
        metric.update(f.float().to(device), t.to(device))
    got = float(metric.compute()["nc1"])
    rounded = features.float().double().numpy()  # the float32 values the metric sees
    expected = float(reference_neural_collapse(rounded, target.numpy(), 10)["nc1"])
    unchanged = torch.backends.cuda.matmul.fp32_precision == before
    report(
        "float32 product under torch.backends.fp32_precision='tf32'",
        abs(got - expected) / abs(expected) if unchanged else float("inf"),
        2e-5,
        "" if unchanged else "(the precision settings changed)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--device", type=cli.device, default="cuda", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--large", type=cli.size, default="100000x4096x50000", help="NxDxK of the large case"
    )
    parser.add_argument(
        "--batch", type=cli.positive_int, default=1000, help="samples per update batch"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}")
    check_small_cases(device)
    check_no_sync(device)
    n, d, k = args.large
    check_large(device, n, d, k, args.batch)
    check_float32_product(device)
    print("ALL PASSED" if not FAILURES else f"FAILED: {FAILURES}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
