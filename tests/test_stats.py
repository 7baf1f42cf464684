"""ClassStatistics: exact streaming, exact merge, packing, cross-process reduction, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests._helpers.ddp import run_distributed
from tests._helpers.reference import reference_statistics, to_numpy
from torchcollapse.stats import ClassStatistics


def _data(
    n: int = 600,
    d: int = 12,
    k: int = 7,
    *,
    spread: float = 0.5,
    offset: float = 0.0,
    seed: int = 0,
    empty: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (n,), generator=g)
    if empty is not None:
        target[target == empty] = (empty + 1) % k
    features = offset + means[target] + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    return features, target


def _assert_matches_reference(
    stats: ClassStatistics, features: torch.Tensor, target: torch.Tensor, rtol: float
) -> None:
    ref = reference_statistics(features, target, stats.num_classes)
    np.testing.assert_array_equal(stats.counts.numpy(), ref["counts"])
    present = ref["counts"] > 0
    np.testing.assert_allclose(
        stats.class_means().numpy()[present], ref["means"][present], rtol=rtol, atol=0
    )
    assert np.isnan(stats.class_means().numpy()[~present]).all()
    scale = np.abs(ref["within_scatter"]).max()
    np.testing.assert_allclose(
        stats.within_class_scatter().numpy(), ref["within_scatter"], rtol=0, atol=rtol * scale
    )
    np.testing.assert_allclose(
        stats.within_class_sum_squares().numpy(),
        ref["within_sum_squares"],
        rtol=rtol,
        atol=0,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ragged_streaming_equals_two_pass_reference(dtype: torch.dtype) -> None:
    features, target = _data(empty=3)
    rounded = features.to(dtype)
    stats = ClassStatistics.zeros(7, 12)
    for size, start in zip([1, 17, 250, 2, 330], [0, 1, 18, 268, 270]):
        stats.update(rounded[start : start + size], target[start : start + size])
    # float64 accumulation of values rounded once: agreement to ~1e-13 relative.
    _assert_matches_reference(stats, rounded.double(), target, rtol=1e-11)
    whole = ClassStatistics.from_features(rounded, target, 7)
    torch.testing.assert_close(
        whole.within_class_scatter(), stats.within_class_scatter(), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_when_spread_is_tiny_behind_a_large_offset(dtype: torch.dtype) -> None:
    # Within-class spread 1e-3 behind an offset 1e3 (NC1 ~ 1e-6): a raw second moment would lose
    # every digit in float32 and most in float64; the shifted statistics lose none.
    features, target = _data(n=900, d=10, k=5, spread=1e-3, offset=1e3, seed=1)
    rounded = features.to(dtype)
    stats = ClassStatistics.zeros(5, 10)
    for chunk_f, chunk_t in zip(rounded.split(128), target.split(128)):
        stats.update(chunk_f, chunk_t)
    _assert_matches_reference(stats, rounded.double(), target, rtol=1e-9)
    naive = rounded.double().T @ rounded.double()
    for c in range(5):
        rows = rounded.double()[target == c]
        naive -= len(rows) * torch.outer(rows.mean(0), rows.mean(0))
    exact = torch.as_tensor(reference_statistics(rounded, target, 5)["within_scatter"])
    naive_error = (naive.diagonal() - exact.diagonal()).abs().max() / exact.diagonal().max()
    ours = (stats.within_class_scatter().diagonal() - exact.diagonal()).abs().max()
    assert naive_error > 1e-6  # the one-pass formula really fails here ...
    assert ours / exact.diagonal().max() < 1e-10  # ... and the shifted statistics do not


def test_merge_is_exact_across_different_shifts() -> None:
    features, target = _data(n=500, d=9, k=6, offset=50.0, seed=2, empty=5)
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(3))
    features, target = features[perm], target[perm]
    a = ClassStatistics.from_features(features[:120], target[:120], 6)
    b = ClassStatistics.from_features(features[120:], target[120:], 6)
    assert not torch.equal(a.shift, b.shift)
    merged = a.merge(b)
    _assert_matches_reference(merged, features, target, rtol=1e-11)
    # Merging with empty statistics changes nothing; merge_all folds left to right.
    empty = ClassStatistics.zeros(6, 9)
    torch.testing.assert_close(empty.merge(a).pack(), a.merge(empty).pack())
    parts = [
        ClassStatistics.from_features(f, t, 6) for f, t in zip(features.split(77), target.split(77))
    ]
    _assert_matches_reference(ClassStatistics.merge_all(parts), features, target, rtol=1e-11)


def test_pack_unpack_round_trip_and_views_write_through() -> None:
    features, target = _data(n=50, d=4, k=3)
    stats = ClassStatistics.from_features(features, target, 3)
    packed = stats.pack()
    assert packed.shape == (ClassStatistics.packed_size(3, 4),) == (2 * 3 + 2 * 3 * 4 + 16,)
    view = ClassStatistics.unpack(packed, 3)
    assert (view.num_classes, view.num_features) == (3, 4)
    torch.testing.assert_close(view.within_class_scatter(), stats.within_class_scatter())
    view.update(features[:5], target[:5])
    assert float(packed[:3].sum()) == 55.0  # the counts inside `packed` were updated
    with pytest.raises(ValueError, match="2K \\+ 2Kd \\+ d\\^2"):
        ClassStatistics.unpack(packed[:-1], 3)


_FIELDS = ("counts", "shift", "sums", "sum_squares", "scatter")  # the constructor's order


def _reference_fields(
    features: torch.Tensor, target: torch.Tensor, num_classes: int
) -> dict[str, np.ndarray]:
    """The stored fields by plain loops: a class's shift is its first sample (in stream order)."""
    h, y = to_numpy(features), to_numpy(target).astype(np.int64)
    d = h.shape[1]
    out = {
        "counts": np.zeros(num_classes),
        "shift": np.zeros((num_classes, d)),
        "sums": np.zeros((num_classes, d)),
        "sum_squares": np.zeros(num_classes),
        "scatter": np.zeros((d, d)),
    }
    for c in range(num_classes):
        rows = h[y == c]
        if len(rows):
            dev = rows - rows[0]
            out["counts"][c] = len(rows)
            out["shift"][c] = rows[0]
            out["sums"][c] = dev.sum(axis=0)
            out["sum_squares"][c] = float(np.sum(dev * dev))
            out["scatter"] += dev.T @ dev
    return out


def _ragged_sizes(n: int, parts: int, generator: torch.Generator) -> list[int]:
    """``parts`` random batch sizes summing to ``n``, the first one a single sample."""
    cuts = (torch.randperm(n - 2, generator=generator)[: parts - 2] + 2).sort().values.tolist()
    bounds = [0, 1, *cuts, n]
    return [b - a for a, b in itertools.pairwise(bounds)]


def test_differentiable_statistics_equal_the_plain_ones_and_the_reference() -> None:
    # Features that require grad take a separate, out-of-place branch of `update` (so that
    # autograd records it): every field it stores, and every statistic derived from them, must
    # equal those of the plain (no-grad) branch and of the float64 two-pass reference.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    message = f"seed {seed}"
    generator = torch.Generator().manual_seed(seed + 1)  # batch sizes
    features, target = _data(n=400, d=9, k=6, offset=20.0, seed=seed, empty=2)
    sizes = _ragged_sizes(400, 6, generator)
    leaf = features.clone().requires_grad_()
    plain, recorded = ClassStatistics.zeros(6, 9), ClassStatistics.zeros(6, 9)
    for f, x, t in zip(features.split(sizes), leaf.split(sizes), target.split(sizes)):
        plain.update(f, t)
        recorded.update(x, t)
    whole = ClassStatistics.from_features(leaf, target, 6)  # one recorded batch
    reference = _reference_fields(features, target, 6)
    derived = ("class_means", "within_class_scatter", "within_class_sum_squares")
    # float64 sums of a few hundred centred values in another order (the plain branch leaves out
    # the zero rows of new classes and multiplies panel by panel): ~1e-14 of the largest entry.
    for stats in (recorded, whole):
        assert not stats.counts.requires_grad, message
        for name in ("sums", "sum_squares", "scatter"):
            assert getattr(stats, name).requires_grad, f"{name}, {message}"
        for name in _FIELDS:
            ours, theirs = getattr(stats, name).detach(), getattr(plain, name)
            atol = 1e-12 * float(theirs.abs().max())
            torch.testing.assert_close(
                ours, theirs, rtol=1e-12, atol=atol, msg=f"{name}, {message}"
            )
            np.testing.assert_allclose(
                ours.numpy(), reference[name], rtol=1e-12, atol=atol, err_msg=f"{name}, {message}"
            )
        for name in derived:
            ours, theirs = getattr(stats, name)().detach(), getattr(plain, name)()
            atol = 1e-12 * float(theirs.nan_to_num().abs().max())
            torch.testing.assert_close(
                ours, theirs, rtol=1e-12, atol=atol, equal_nan=True, msg=f"{name}, {message}"
            )
        detached = ClassStatistics(*(getattr(stats, name).detach() for name in _FIELDS))
        _assert_matches_reference(detached, features, target, rtol=1e-11)


def test_statistics_are_differentiable_in_the_features() -> None:
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    generator = torch.Generator().manual_seed(seed + 1)  # batch sizes, weights
    features, target = _data(n=24, d=3, k=4, offset=5.0, seed=seed, empty=1)
    sizes = _ragged_sizes(24, 3, generator)

    def weights(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    w_scatter, w_within, w_sums, w_means = (
        weights(3, 3),
        weights(3, 3),
        weights(4, 3),
        weights(4, 3),
    )
    w_squares, w_within_squares = weights(4), weights(4)

    def read_all(stats: ClassStatistics, raw: bool) -> torch.Tensor:
        present = stats.present
        value = (
            (w_within * stats.within_class_scatter()).sum()
            + (w_within_squares * stats.within_class_sum_squares()).sum()
            + (w_means[present] * stats.class_means()[present]).sum()
        )
        if raw:
            value = (
                value
                + (w_scatter * stats.scatter).sum()
                + (w_squares * stats.sum_squares).sum()
                + (w_sums * stats.sums).sum()
            )
        return value

    def from_scratch(x: torch.Tensor) -> torch.Tensor:
        # Each class's shift is its first sample in `x`, a constant for autograd: the stored
        # fields' gradients hold the shift fixed, so only the shift-free statistics are read.
        stats = ClassStatistics.zeros(4, 3)
        for xb, tb in zip(x.split(sizes), target.split(sizes)):
            stats.update(xb, tb)
        return read_all(stats, raw=False)

    def after_a_constant_batch(x: torch.Tensor) -> torch.Tensor:
        # Shifts set by an earlier batch that does not depend on `x`: every field is a function
        # of `x` alone, and every one is read.
        stats = ClassStatistics.from_features(features, target, 4)
        for xb, tb in zip(x.split(sizes), target.split(sizes)):
            stats.update(xb, tb)
        return read_all(stats, raw=True)

    leaf = (features + 0.1 * weights(24, 3)).requires_grad_()
    assert torch.autograd.gradcheck(from_scratch, (leaf,)), f"seed {seed}"
    assert torch.autograd.gradcheck(after_a_constant_batch, (leaf,)), f"seed {seed}"


def test_reduce_across_two_processes_equals_one_process() -> None:
    features, target = _data(n=300, d=5, k=4, offset=10.0, seed=4)

    def work(rank: int, world_size: int) -> torch.Tensor:
        part = slice(0, 110) if rank == 0 else slice(110, 300)
        local = ClassStatistics.from_features(features[part], target[part], 4)
        return local.reduce().pack()

    packs = run_distributed(work, 2)
    whole = ClassStatistics.from_features(features, target, 4)
    for packed in packs:
        reduced = ClassStatistics.unpack(packed, 4)
        torch.testing.assert_close(reduced.counts, whole.counts)
        torch.testing.assert_close(reduced.class_means(), whole.class_means(), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            reduced.within_class_scatter(), whole.within_class_scatter(), rtol=1e-11, atol=1e-11
        )
    assert torch.equal(packs[0], packs[1])


def test_update_performs_no_k_by_d_work_on_absent_classes() -> None:
    # Rows of classes not in the batch are untouched (not rewritten): their shift stays as it was.
    stats = ClassStatistics.zeros(4, 2)
    stats.shift[3] = torch.tensor([7.0, 7.0], dtype=torch.float64)
    stats.update(torch.tensor([[1.0, 2.0]]), torch.tensor([0]))
    assert stats.shift[3].tolist() == [7.0, 7.0]
    assert stats.shift[0].tolist() == [1.0, 2.0]  # the first sample becomes the shift
    stats.update(torch.tensor([[5.0, 5.0]]), torch.tensor([0]))
    assert stats.shift[0].tolist() == [1.0, 2.0]  # and then stays


# Each message names the argument, what was expected and what was received, as a whole.
@pytest.mark.parametrize(
    ("features", "target", "error", "match"),
    [
        (
            torch.zeros(3, 2, 2),
            torch.zeros(3, dtype=torch.long),
            ValueError,
            r"^Expected argument `features` to be a 2-D tensor of shape \(num_samples,"
            r" num_features\), but got shape \(3, 2, 2\)\.$",
        ),
        (
            torch.zeros(3, 2, dtype=torch.long),
            torch.zeros(3),
            TypeError,
            r"^Expected argument `features` to be a floating point tensor, but got dtype"
            r" torch\.int64\.$",
        ),
        (
            torch.zeros(3, 2),
            torch.zeros(3),
            TypeError,
            r"^Expected argument `target` to be an integer tensor of class indices, but got dtype"
            r" torch\.float32\.$",
        ),
        (
            torch.zeros(3, 2),
            torch.zeros(3, 1, dtype=torch.long),
            ValueError,
            r"^Expected argument `target` to be a 1-D tensor of class indices, but got shape"
            r" \(3, 1\)\.$",
        ),
        (
            torch.zeros(3, 2),
            torch.zeros(4, dtype=torch.long),
            ValueError,
            r"^Expected arguments `features` and `target` to have the same number of samples, but"
            r" got 3 and 4\.$",
        ),
        (
            torch.zeros(3, 2),
            torch.tensor([0, 1, 5]),
            ValueError,
            r"^Expected argument `target` to hold class indices in \[0, 2\] \(num_classes=3\),"
            r" but got values in \[0, 5\]\.$",
        ),
        (
            torch.zeros(3, 2),
            torch.tensor([0, -1, 1]),
            ValueError,
            r"^Expected argument `target` to hold class indices in \[0, 2\] \(num_classes=3\),"
            r" but got values in \[-1, 1\]\.$",
        ),
        (
            torch.tensor([[0.0, float("nan")], [1, 1]]),
            torch.tensor([0, 1]),
            ValueError,
            r"^Expected argument `features` to be finite, but got NaN or Inf in 1 of 2 rows\."
            r" Pass `validate_args=False` to skip this check\.$",
        ),
        (
            torch.zeros(3, 5),
            torch.tensor([0, 1, 1]),
            ValueError,
            r"^Expected argument `features` to have 2 features \(columns\), but got shape"
            r" \(3, 5\)\.$",
        ),
        (
            [[0.0, 1.0]],
            torch.tensor([0]),
            TypeError,
            r"^Expected argument `features` to be a torch\.Tensor, but got <class 'list'>\.$",
        ),
        (
            torch.zeros(3, 0),
            torch.tensor([0, 1, 1]),
            ValueError,
            r"^Expected argument `features` to have at least one feature \(column\), but got"
            r" shape \(3, 0\)\.$",
        ),
    ],
)
def test_update_errors(features: object, target: object, error: type, match: str) -> None:
    stats = ClassStatistics.zeros(3, 2)
    with pytest.raises(error, match=match):
        stats.update(features, target)  # type: ignore[arg-type]


def test_validate_args_false_skips_value_checks() -> None:
    stats = ClassStatistics.zeros(2, 2)
    stats.update(torch.tensor([[float("inf"), 0.0]]), torch.tensor([1]), validate_args=False)
    assert stats.counts.tolist() == [0.0, 1.0]


def test_constructor_and_merge_errors() -> None:
    with pytest.raises(ValueError, match="`num_classes` to be a positive integer"):
        ClassStatistics.zeros(0, 3)
    with pytest.raises(ValueError, match="`num_features` to be a positive integer"):
        ClassStatistics.zeros(2, 0)
    with pytest.raises(ValueError, match="num_classes=2 and num_features=3"):
        ClassStatistics.zeros(2, 3).merge(ClassStatistics.zeros(2, 4))
    with pytest.raises(TypeError, match="ClassStatistics"):
        ClassStatistics.zeros(2, 3).merge("x")  # type: ignore[arg-type]


_PRECISION_SCRIPT = """
import sys, torch
from torchcollapse.stats import ClassStatistics
setup = sys.argv[1]
if setup == "global":
    torch.backends.fp32_precision = "tf32"  # torch's per-backend settings, inherited
elif setup == "cuda":
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
elif setup == "legacy":
    torch.backends.cuda.matmul.allow_tf32 = True
elif setup == "old torch":  # torch < 2.9: no per-backend settings (no mkldnn.matmul at all)
    import types
    torch.backends.mkldnn = types.SimpleNamespace()
    torch.set_float32_matmul_precision("medium")
def settings():
    if setup == "old torch":
        return [torch.get_float32_matmul_precision()]
    return [torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision]
before = settings()
from torchcollapse.stats import _full_precision_matmul
with _full_precision_matmul():  # full precision inside, whatever the setting outside
    inside = settings()
assert all(value in ("none", "ieee", "highest") for value in inside), inside
g = torch.Generator().manual_seed(int(sys.argv[2]))
features = torch.randn(300, 8, generator=g) + 3.0
target = torch.arange(300) % 4
fast = ClassStatistics.zeros(4, 8).update(features, target, product_dtype=torch.float32)
exact = ClassStatistics.from_features(features.double(), target, 4)
reference = exact.within_class_scatter()
error = float((fast.within_class_scatter() - reference).abs().max() / reference.abs().max())
assert error < 2e-5, error  # float32 sums of 300 products; bf16 or TF32 passes: ~1e-3
assert settings() == before, (settings(), before)
if setup == "global":  # still inherited: a later change of the global setting reaches them
    torch.backends.fp32_precision = "ieee"
    assert settings() == ["ieee", "ieee"], settings()
if setup == "legacy":
    assert torch.backends.cuda.matmul.allow_tf32 is True  # the legacy reading still works
print("ok", setup)
"""


@pytest.mark.parametrize("setup", ["default", "global", "cuda", "legacy", "old torch"])
def test_float32_products_keep_torch_precision_settings(setup: str) -> None:
    """The float32 product runs in IEEE precision whatever the process's matmul settings, set
    by torch's per-backend API (``torch.backends.fp32_precision``, ``.cuda.matmul`` and
    ``.mkldnn.matmul``) or its legacy one, and leaves them as they were: a per-backend setting
    inherited from the global one stays inherited. (The legacy reading, which the update used,
    raised once the new API was in use.) Settings are process-wide: each case runs in a
    process of its own."""
    import os
    import subprocess
    import sys

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch without per-backend fp32_precision settings")
    src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    seed = str(int(torch.randint(0, 2**31, ())))
    result = subprocess.run(
        [sys.executable, "-c", _PRECISION_SCRIPT, setup, seed],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, f"seed {seed}: {result.stderr[-2000:]}"
    assert result.stdout.strip() == f"ok {setup}"


def test_float32_products_are_close_and_ignore_global_low_precision_settings() -> None:
    features, target = _data(n=800, d=16, k=5, spread=0.3, offset=5.0, seed=6)
    exact = ClassStatistics.from_features(features.float(), target, 5)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # would allow bfloat16/TF32 passes
    try:
        fast = ClassStatistics.zeros(5, 16)
        for f, t in zip(features.float().split(300), target.split(300)):
            fast.update(f, t, product_dtype=torch.float32)
        assert torch.get_float32_matmul_precision() == "medium"  # restored
    finally:
        torch.set_float32_matmul_precision(previous)
    # float32 products of centred values: each entry within ~10 float32 ulps of the largest one.
    reference = exact.within_class_scatter()
    error = (fast.within_class_scatter() - reference).abs().max() / reference.abs().max()
    assert 0 < error < 1e-6
    torch.testing.assert_close(fast.class_means(), exact.class_means(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"`product_dtype` to be None, torch\.float32"):
        fast.update(features, target, product_dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_new_class_shifts_agree_with_and_without_reading_back(dtype: torch.dtype) -> None:
    # CPU reads back which classes are new and touches only their samples; accelerators run
    # masked arithmetic on every sample (no synchronisation), promoting the input's dtype on
    # the fly. Both must pick the same shifts (each class's first sample) and hence give
    # identical statistics, bit for bit.
    features, target = _data(n=700, d=6, k=40, spread=0.5, offset=3.0, seed=11)
    features = features.to(dtype)
    read, masked = ClassStatistics.zeros(40, 6), ClassStatistics.zeros(40, 6)
    original = ClassStatistics._set_new_shifts

    def sync_free(
        self: ClassStatistics, f: torch.Tensor, t: torch.Tensor, **_: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return original(self, f, t, read_back=False)

    for f, t in zip(features.split([1, 99, 250, 350]), target.split([1, 99, 250, 350])):
        read.update(f, t)
        ClassStatistics._set_new_shifts = sync_free  # type: ignore[method-assign]
        try:
            masked.update(f, t)
        finally:
            ClassStatistics._set_new_shifts = original  # type: ignore[method-assign]
    for name in ("counts", "shift", "sums", "sum_squares", "scatter"):
        assert torch.equal(getattr(read, name), getattr(masked, name)), name
    # the shift of every class is its first sample
    present = read.counts > 0
    first = torch.stack([features[(target == c).nonzero()[0, 0]] for c in range(40) if present[c]])
    assert torch.equal(read.shift[present], first.double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state", [torch.float64, torch.float32])
def test_accelerator_update_matches_cpu_update(
    dtype: torch.dtype, state: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The accelerators' update, simulated on CPU: masked new-class selection (no read back)
    # and, where the state dtype holds the input's, one mixed-dtype subtraction for centring.
    import torchcollapse.stats as stats_module

    features, target = _data(n=700, d=6, k=40, spread=0.5, offset=3.0, seed=12)
    features = features.to(dtype)
    sizes = [1, 99, 250, 350]
    cpu = ClassStatistics.zeros(40, 6, dtype=state)
    for f, t in zip(features.split(sizes), target.split(sizes)):
        cpu.update(f, t)
    original = ClassStatistics._set_new_shifts

    def sync_free(
        self: ClassStatistics, f: torch.Tensor, t: torch.Tensor, **_: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return original(self, f, t, read_back=False)

    subtractions: list[torch.dtype] = []
    original_sub = torch.sub

    def sub(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        subtractions.append(args[0].dtype)
        return original_sub(*args, **kwargs)

    monkeypatch.setattr(ClassStatistics, "_set_new_shifts", sync_free)
    monkeypatch.setattr(stats_module, "_one_kernel_centring", lambda device: True)
    monkeypatch.setattr(torch, "sub", sub)
    accelerator = ClassStatistics.zeros(40, 6, dtype=state)
    for f, t in zip(features.split(sizes), target.split(sizes)):
        accelerator.update(f, t)
    fused = torch.promote_types(dtype, state) == state
    assert subtractions == ([dtype] * len(sizes) if fused else [])
    # the CPU leaves the zero rows of new classes out of the product: another summation order,
    # which a float32 state rounds differently
    rtol = 1e-12 if state == torch.float64 else 1e-5
    for name in ("counts", "shift", "sums", "sum_squares", "scatter"):
        theirs = getattr(accelerator, name)
        assert theirs.dtype == state, name
        torch.testing.assert_close(theirs, getattr(cpu, name), rtol=rtol, atol=0, msg=name)


def test_cpu_update_skips_exactly_the_first_samples_of_new_classes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first sample of a class seen for the first time is its shift, so its centred row is
    # zero; on CPU the update leaves exactly those rows out of the centring and the product.
    import torchcollapse.stats as stats_module

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = _data(n=300, d=5, k=30, spread=0.5, offset=2.0, seed=seed)
    # a last batch of classes that are all seen already: nothing left out
    target[200:] = target[:100]
    multiplied: list[int] = []
    original = stats_module._add_gram_

    def spy(scatter: torch.Tensor, centred: torch.Tensor, parts: int | None = None) -> None:
        multiplied.append(int(centred.shape[0]))
        original(scatter, centred, parts)

    monkeypatch.setattr(stats_module, "_add_gram_", spy)
    stats = ClassStatistics.zeros(30, 5)
    for f, t in zip(features.split([40, 160, 100]), target.split([40, 160, 100])):
        seen = {int(c) for c in torch.nonzero(stats.counts).squeeze(1)}
        expected, firsts = [], set()
        for i, c in enumerate(t.tolist()):
            if c not in seen and c not in firsts:
                firsts.add(c)
            else:
                expected.append(i)
        probe = ClassStatistics.unpack(stats.pack(), 30)
        rows, shift = probe._set_new_shifts(f, t, read_back=True)
        assert shift is None, f"seed {seed}"
        if firsts:
            assert rows is not None, f"seed {seed}"
            assert rows.tolist() == expected, f"seed {seed}"
        else:
            assert rows is None, f"seed {seed}"
        stats.update(f, t)
        assert multiplied[-1] == len(expected), f"seed {seed}"
    assert multiplied[-1] == 100, f"seed {seed}"  # the last batch: every row
    _assert_matches_reference(stats, features, target, rtol=1e-10)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_cpu_product_matches_reference(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # With several threads the CPU product splits the rows into blocks (each >= 256 rows),
    # padding the centred batch with zero rows up to a multiple of the blocks; odd and prime
    # row counts, panels (d > 128), batches with new classes, the float32 product and
    # differentiable inputs all go through it.
    from torchcollapse.stats import symmetric_product

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    batched: list[int] = []
    original_bmm = torch.bmm

    def spy(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        batched.append(int(args[0].shape[0]))
        return original_bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        features, target = _data(n=2333, d=150, k=9, spread=0.5, offset=4.0, seed=seed)
        for product_dtype, rtol in ((None, 1e-10), (torch.float32, 1e-5)):
            stats = ClassStatistics.zeros(9, 150)
            sizes = [3, 1031, 1299]
            for f, t in zip(features.split(sizes), target.split(sizes)):
                stats.update(f.float(), t, product_dtype=product_dtype)
            _assert_matches_reference(stats, features.float(), target, rtol=rtol)
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(768, 300, dtype=torch.float64, generator=generator)
        message = f"seed {seed}, {threads} threads"
        torch.testing.assert_close(
            symmetric_product(matrix), matrix.T @ matrix, rtol=1e-12, atol=1e-10, msg=message
        )
        # differentiable: d <R, X^T X> / dX = X (R + R^T)
        weight = torch.randn(300, 300, dtype=torch.float64, generator=generator)
        leaf = matrix.clone().requires_grad_()
        (symmetric_product(leaf) * weight).sum().backward()
        assert leaf.grad is not None
        torch.testing.assert_close(
            leaf.grad, matrix @ (weight + weight.T), rtol=1e-10, atol=1e-9, msg=message
        )
    finally:
        torch.set_num_threads(previous)
    if threads > 1:
        assert threads in batched, message  # the split path ran
    else:
        assert not batched, message


def test_features_without_columns_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"`features` to have at least one feature.*\(4, 0\)"):
        ClassStatistics.from_features(torch.zeros(4, 0), torch.tensor([0, 1, 2, 0]), 3)


def test_zeros_reads_any_integer_type_for_both_sizes() -> None:
    for value in (np.int64(3), torch.tensor(3), 3):
        stats = ClassStatistics.zeros(2, value)  # type: ignore[arg-type]
        assert stats.num_features == 3
        assert stats.scatter.shape == (3, 3)
        assert ClassStatistics.zeros(value, 2).num_classes == 3  # type: ignore[arg-type]
    for bad in (True, np.bool_(True), 3.0, torch.tensor(3.0)):  # TypeError, as nn.Linear
        with pytest.raises(TypeError, match="`num_features` to be an integer"):
            ClassStatistics.zeros(2, bad)  # type: ignore[arg-type]


def test_to_merge_all_and_dtypes_as_torch_users_expect() -> None:
    """``to`` takes a dtype first, as ``Tensor.to`` (it went to ``torch.device``); an
    accumulation dtype other than float64/float32 is a ``TypeError`` naming ``dtype`` (int64
    truncated the means, bfloat16 counts stalled at 256, silently); ``merge_all`` of one
    statistics is a new object, as ``merge`` gives (it was
    the input itself). Reference: the statistics' own values, converted by torch."""
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    features, target = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.arange(20) % 4
    stats = ClassStatistics.from_features(features, target, 4)
    as32 = stats.to(torch.float32)
    assert as32.dtype == torch.float32
    torch.testing.assert_close(as32.scatter, stats.scatter.float())
    assert stats.to("cpu", torch.float32).dtype == torch.float32
    # 16-bit floats stop counting (bfloat16 counts stall at 256), integers truncate
    for bad in (torch.int64, torch.bool, torch.complex64, torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=r"`dtype` to be torch\.float64 .* or torch\.float32"):
            stats.to(dtype=bad)
        with pytest.raises(TypeError, match=r"`dtype` to be torch\.float64 .* or torch\.float32"):
            ClassStatistics.from_features(features, target, 4, dtype=bad)
    with pytest.raises(TypeError, match="one dtype"):
        stats.to(torch.float32, torch.float64)
    merged = ClassStatistics.merge_all([stats])
    assert merged is not stats
    merged.update(features, target)
    assert stats.total == 20  # the input is left as it was
    assert merged.total == 40
