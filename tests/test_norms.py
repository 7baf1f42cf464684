"""FeatureNorm and FeatureCenter against loops in float64, in half precision, and across processes.

Tolerances: float64 results differ from the loops by rounding only (rtol 1e-12); half-precision
outputs are compared with the float64 result on the same (rounded) inputs to the output dtype's
resolution (float16: 2**-11, bfloat16: 2**-8, so rtol 2e-3 / 1e-2).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from tests._helpers.ddp import run_distributed
from tests._helpers.testers import check_deferred_init, check_module, check_symbolic_trace
from torchcollapse.norms import FeatureCenter, FeatureNorm


def test_feature_norm_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(7, 5, dtype=torch.float64, generator=g)
    out = FeatureNorm(scale=3.5, dtype=torch.float64)(features)
    for i in range(7):
        norm = math.sqrt(sum(float(v) ** 2 for v in features[i]))
        for j in range(5):
            assert float(out[i, j]) == pytest.approx(3.5 * float(features[i, j]) / norm, rel=1e-12)


def test_feature_norm_along_a_chosen_dim() -> None:
    features = torch.randn(3, 4, 6, dtype=torch.float64)
    out = FeatureNorm(scale=2.0, dim=1).double()(features)
    torch.testing.assert_close(out.norm(dim=1), torch.full((3, 6), 2.0, dtype=torch.float64))
    torch.testing.assert_close(
        out / out.norm(dim=1, keepdim=True), features / features.norm(dim=1, keepdim=True)
    )


def test_learnable_scale_lives_in_log_space() -> None:
    norm = FeatureNorm(scale=4.0, learnable=True, dtype=torch.float64)
    assert isinstance(norm.log_scale, nn.Parameter)
    assert norm.log_scale.item() == pytest.approx(math.log(4.0))
    features = torch.randn(6, 3, dtype=torch.float64)
    upstream = torch.randn(6, 3, dtype=torch.float64)
    out = norm(features)
    (out * upstream).sum().backward()
    # d/d(log s) of sum(s * u * g) is sum(out * g)
    assert norm.log_scale.grad.item() == pytest.approx(
        float((out * upstream).sum().detach()), rel=1e-12
    )
    with torch.no_grad():
        norm.log_scale -= 100.0  # a huge step still leaves a positive scale
    assert norm.scale.item() > 0
    fixed = FeatureNorm(scale=4.0)
    assert "log_scale" in dict(fixed.named_buffers())
    assert not list(fixed.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_feature_norm_is_safe_in_half_precision(dtype: torch.dtype) -> None:
    rows = torch.tensor(
        [
            [300.0, 400.0, 0.0, 0.0],  # squares overflow float16 (max 65504)
            [3e-4, -4e-4, 0.0, 0.0],  # squares underflow float16
            [0.0, 0.0, 0.0, 0.0],  # the zero vector
            [1.0, 2.0, -2.0, 4.0],
        ]
    ).to(dtype)
    norm = FeatureNorm(scale=8.0)
    out = norm(rows)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    expected = FeatureNorm(scale=8.0).double()(rows.double())
    rtol = 2e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=1e-6)
    assert torch.equal(out[2], torch.zeros(4, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = nn.Linear(4, 4)(rows.float())
        assert torch.isfinite(norm(features)).all()
    leaf = rows.clone().requires_grad_()
    norm(leaf).sum().backward()
    assert torch.isfinite(leaf.grad[:2]).all()


def test_feature_norm_float16_gradient_is_exact_where_representable_and_inf_beyond() -> None:
    # The gradient is of order scale / ||h||: for the first row (norm ~2e-3) it fits float16 and
    # must match float64 to float16's resolution; for the second (norm ~2e-5) it exceeds 65504
    # and must come back as inf of the right sign (GradScaler's overflow signal), not clamped.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    direction = torch.nn.functional.normalize(torch.randn(2, 4, generator=g), dim=1)
    rows = direction * torch.tensor([[2e-3], [2e-5]])
    upstream = torch.randn(2, 4, generator=g).half()
    norm = FeatureNorm(scale=8.0)
    half = rows.half().requires_grad_()
    (norm(half) * upstream).sum().backward()
    exact = half.detach().double().requires_grad_()  # the same rounded inputs, in float64
    (norm.double()(exact) * upstream.double()).sum().backward()
    assert half.grad is not None
    assert exact.grad is not None
    # float16 output rounding (2**-11) relative to the row's gradient
    atol = 2e-3 * float(exact.grad[0].abs().max())
    torch.testing.assert_close(half.grad[0].double(), exact.grad[0], rtol=2e-3, atol=atol)
    beyond = exact.grad[1].abs() > torch.finfo(torch.float16).max
    assert beyond.any()
    assert torch.equal(half.grad[1][beyond].double(), exact.grad[1][beyond].sign() * math.inf)


def test_feature_center_matches_loop_over_steps() -> None:
    g = torch.Generator().manual_seed(1)
    for momentum in (0.25, None):
        center = FeatureCenter(3, momentum=momentum).double()
        running = [0.0, 0.0, 0.0]
        for step in range(4):
            batch = torch.randn(5 + step, 3, dtype=torch.float64, generator=g) + 2.0
            means = [
                sum(float(batch[i, j]) for i in range(len(batch))) / len(batch) for j in range(3)
            ]
            factor = 1.0 if step == 0 else (1.0 / (step + 1) if momentum is None else momentum)
            running = [r + factor * (m - r) for r, m in zip(running, means)]
            out = center(batch)
            expected = batch - torch.tensor(running, dtype=torch.float64)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        assert center.num_batches_tracked.item() == 4
        center.eval()
        probe = torch.randn(2, 3, dtype=torch.float64, generator=g)
        torch.testing.assert_close(
            center(probe), probe - torch.tensor(running, dtype=torch.float64)
        )
        assert center.num_batches_tracked.item() == 4  # no update in evaluation


def test_feature_center_gradient_passes_through_and_leading_dims() -> None:
    center = FeatureCenter(4).double()
    features = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    out = center(features)
    torch.testing.assert_close(center.running_mean, features.detach().reshape(-1, 4).mean(0))
    upstream = torch.randn(2, 3, 4, dtype=torch.float64)
    (out * upstream).sum().backward()
    torch.testing.assert_close(features.grad, upstream)  # the mean is a constant
    before = center.running_mean.clone()
    for momentum in (0.1, None):  # an empty batch changes nothing, bit for bit
        center.momentum = momentum
        empty = torch.empty(0, 4, dtype=torch.float64)
        assert center(empty).shape == (0, 4)
        assert center.num_batches_tracked.item() == 1
        torch.testing.assert_close(center.running_mean, before, rtol=0, atol=0)


def _loop_running_mean(batches: list[Tensor], momentum: float | None) -> Tensor:
    """The documented recursion, per coordinate with Python floats (float64); non-finite
    batch means are skipped."""
    running = [0.0] * batches[0].shape[-1]
    seen = 0
    for batch in batches:
        rows = batch.double().reshape(-1, len(running)).tolist()
        means = [sum(row[j] for row in rows) / len(rows) for j in range(len(running))]
        if not all(math.isfinite(m) for m in means):
            continue
        factor = 1.0 if seen == 0 else (1.0 / (seen + 1) if momentum is None else momentum)
        running = [r + factor * (m - r) for r, m in zip(running, means)]
        seen += 1
    return torch.tensor(running, dtype=torch.float64)


@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "inf-inf"])
@pytest.mark.parametrize("where", [0, 2])  # the first batch, or after two batches
def test_feature_center_skips_a_non_finite_batch(
    momentum: float | None, dtype: torch.dtype, bad: float | str, where: int
) -> None:
    """Documented: a training batch whose mean is not finite leaves ``running_mean`` and
    ``num_batches_tracked`` as they were, bit for bit, so that the layer with the bad batch ends
    with the buffers and outputs of the layer that never saw it; the bad batch's own output is
    the batch minus the running mean as it was (the batch itself when it comes first).
    Reference: the same module without the bad batch (bit for bit) and the float64 recursion
    (float32 buffer: rtol 1e-6)."""
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(5 + i, 4, generator=g) * 2 + 3).to(dtype) for i in range(4)]
    poisoned = (torch.randn(6, 4, generator=g) + 3).to(dtype)
    if bad == "inf-inf":  # every entry finite but one column's mean NaN
        poisoned[0, 1], poisoned[3, 1] = math.inf, -math.inf
    else:
        poisoned[2, 1] = bad
    clean = FeatureCenter(4, momentum=momentum)
    seen = FeatureCenter(4, momentum=momentum)
    for step, batch in enumerate(batches):
        if step == where:
            stored = seen.running_mean.clone()
            out = seen(poisoned)
            expected = poisoned - stored.to(dtype)  # the mean as it was
            torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(seen.running_mean, stored, rtol=0, atol=0)
        assert torch.equal(seen(batch), clean(batch)), f"seed {seed}, step {step}"
        assert torch.equal(seen.running_mean, clean.running_mean), f"seed {seed}, step {step}"
        assert torch.equal(seen.num_batches_tracked, clean.num_batches_tracked)
    assert seen.num_batches_tracked.item() == len(batches)
    torch.testing.assert_close(
        seen.running_mean.double(),
        _loop_running_mean(batches, momentum),
        rtol=1e-6,
        atol=1e-6,
        msg=f"seed {seed}",
    )
    seen.eval()
    probe = torch.randn(3, 4, generator=g).to(dtype)
    assert torch.equal(seen(probe), clean.eval()(probe))


def test_feature_center_half_inputs_accumulate_in_float32() -> None:
    center = FeatureCenter(2)
    features = torch.full((4096, 2), 1.0009765625, dtype=torch.float16)  # 1 + 2**-10
    out = center(features)
    assert out.dtype == torch.float16
    assert center.running_mean.dtype == torch.float32
    torch.testing.assert_close(center.running_mean, torch.full((2,), 1.0009765625))


def test_norm_modules_pass_module_checks() -> None:
    features = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    # a fixed scale keeps its float32 log under .to(dtype): float16 would round it
    check_module(lambda: FeatureNorm(scale=2.0), (features,), fixed_dtype_buffers=("log_scale",))
    check_module(lambda: FeatureNorm(scale=2.0, learnable=True), (features,))

    def trained_center() -> FeatureCenter:
        center = FeatureCenter(5, momentum=0.5)
        center(torch.randn(8, 5) + 3.0)
        return center

    check_module(trained_center, (features,))


def test_feature_center_takes_any_integer_size() -> None:
    """As ``nn.BatchNorm1d``: ``num_features`` may be a numpy integer or a 0-dim integer tensor,
    read as the Python int (same buffers and outputs); a bool is refused by its type."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batches = [torch.randn(5, 8, generator=g) for _ in range(3)]
    expected = FeatureCenter(8, momentum=None)
    outputs = [expected(x) for x in batches]
    for size in (np.int64(8), np.int32(8), torch.tensor(8)):
        center = FeatureCenter(size, momentum=None)  # type: ignore[arg-type]
        assert type(center.num_features) is int, type(size)
        assert center.num_features == 8, type(size)
        for x, out in zip(batches, outputs):
            assert torch.equal(center(x), out), type(size)
        assert torch.equal(center.running_mean, expected.running_mean), type(size)
    for bad in (True, np.bool_(True), torch.tensor(True), torch.tensor([8, 8]), "8", None):
        with pytest.raises(TypeError, match="`num_features` to be an integer, but got"):
            FeatureCenter(bad)  # type: ignore[arg-type]


def test_documented_errors() -> None:
    with pytest.raises(ValueError, match="`scale` to be positive"):
        FeatureNorm(scale=0.0)
    with pytest.raises(ValueError, match="`eps` to be positive"):
        FeatureNorm(eps=0.0)
    with pytest.raises(TypeError, match="floating-point tensor"):
        FeatureNorm()(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="`num_features` to be a positive integer, but got 0"):
        FeatureCenter(0)
    with pytest.raises(ValueError, match="`num_features` to be a positive integer, but got -2"):
        FeatureCenter(torch.tensor(-2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`num_features` to be an integer, but got bool"):
        FeatureCenter(True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`num_features` to be an integer, but got float"):
        FeatureCenter(4.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`momentum`"):
        FeatureCenter(3, momentum=0.0)
    with pytest.raises(ValueError, match="last dimension 3"):
        FeatureCenter(3)(torch.randn(2, 4))
    with pytest.raises(TypeError, match="floating-point tensor"):
        FeatureCenter(3)(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.complex128, "float32"]
)
def test_norms_refuse_a_non_floating_dtype(dtype: object) -> None:
    """An integer ``dtype`` truncated ``log(scale)`` (radius exp(2) = 7.39 for 10) and the
    running mean; a complex one is not a real feature space: both raise, naming ``dtype``, as
    the frames and heads do."""
    message = f"Expected argument `dtype` to be a floating dtype, but got {dtype!r}."
    for build in (
        lambda: FeatureNorm(10.0, dtype=dtype),  # type: ignore[arg-type]
        lambda: FeatureNorm(10.0, learnable=True, dtype=dtype),  # type: ignore[arg-type]
        lambda: FeatureCenter(4, dtype=dtype),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=re.escape(message)):
            build()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_norms_take_any_floating_dtype(dtype: torch.dtype) -> None:
    # reference: rows of norm 10 and the float64 batch mean, to the buffer dtype's resolution
    # (the running mean: the float64 mean rounded once to the dtype)
    features = torch.randn(6, 4, dtype=torch.float64) + 2.0
    for learnable in (False, True):
        norm = FeatureNorm(10.0, learnable=learnable, dtype=dtype)
        assert norm.log_scale.dtype == dtype
        # log(10) in [2, 4) rounds by at most eps of the dtype, so exp of it by a relative eps
        rtol = 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(
            norm(features).norm(dim=1),
            torch.full((6,), 10.0, dtype=torch.float64),
            rtol=rtol,
            atol=0.0,
        )
    center = FeatureCenter(4, dtype=dtype)
    assert center.running_mean.dtype == dtype
    center(features)
    torch.testing.assert_close(
        center.running_mean.double(), features.mean(0), rtol=torch.finfo(dtype).eps, atol=0.0
    )


def test_feature_norm_dim_is_an_integer() -> None:
    """``dim`` is read as an integer (numpy's and 0-dim tensors too, negative allowed); anything
    else raises at construction (``None`` normalised the whole batch, a string failed in
    forward), and a dimension the features lack raises in ``forward``, naming ``dim``.
    Reference: the row norms, and the module built with the Python int."""
    features = torch.randn(3, 5, dtype=torch.float64)
    for dim, axis in ((1, 1), (-1, 1), (0, 0), (-2, 0)):
        for given in (dim, np.int64(dim), np.int32(dim), torch.tensor(dim)):
            norm = FeatureNorm(2.0, dim=given, dtype=torch.float64)  # type: ignore[arg-type]
            assert type(norm.dim) is int
            assert norm.dim == dim
            assert f"dim={dim}" in repr(norm)
            out = norm(features)
            expected = 2.0 * features / features.norm(dim=axis, keepdim=True)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=0.0)
    for bad in (None, "1", 1.0, True, np.bool_(True), torch.tensor(True), torch.tensor([0, 1])):
        with pytest.raises(TypeError, match="Expected argument `dim` to be an integer, but got"):
            FeatureNorm(dim=bad)  # type: ignore[arg-type]
    for dim in (2, -3):
        with pytest.raises(
            IndexError, match=rf"`dim` to be a dimension .* in \[-2, 2\), but got {dim}"
        ):
            FeatureNorm(dim=dim)(features)
    assert FeatureNorm(dim=2)(torch.randn(2, 3, 4)).shape == (2, 3, 4)


@pytest.mark.parametrize("momentum", [0.5, None])
def test_feature_center_allows_deferred_initialisation_from_meta(momentum: float | None) -> None:
    """Built on the meta device, then ``to_empty`` + ``reset_parameters`` (FSDP, Lightning's
    ``empty_init``): zero running mean and count, as a directly built layer, and the same outputs
    and buffers over training batches (garbage in ``num_batches_tracked`` would blend the first
    batch's mean with the garbage running mean)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batches = [(torch.randn(6 + i, 4, generator=g) * 2 + 5,) for i in range(3)]
    check_deferred_init(lambda: FeatureCenter(4, momentum=momentum), batches)
    check_deferred_init(lambda: FeatureNorm(scale=3.0), batches)
    check_deferred_init(lambda: FeatureNorm(scale=3.0, learnable=True), batches)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_feature_center_running_mean_stays_float32_when_the_module_is_cast(
    dtype: torch.dtype,
) -> None:
    """Documented: statistics accumulate in at least float32, also after ``.half()``. Stored in
    16 bits, a mean near 1000 (float16 ulp 0.5, bfloat16 ulp 4) freezes under momentum 0.01: each
    update moves it less than half an ulp. Reference: the same recursion in float64 on the same
    (rounded) batch means; float32 storage loses a few ulps per step (rtol 1e-5)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    trained = FeatureCenter(2, momentum=0.01)
    trained(torch.randn(8, 2, generator=g) + 1000.0)
    before = trained.running_mean.clone()
    center = trained.to(dtype)
    assert center.running_mean.dtype == torch.float32
    assert torch.equal(center.running_mean, before)  # not a rounded copy
    running = before.double()
    for step in range(200):
        batch = (torch.tensor([1000.0, 3.0]) + 0.05 * step + torch.randn(16, 2, generator=g)).to(
            dtype
        )
        running = running + 0.01 * (batch.double().mean(0) - running)
        out = center(batch)
        assert out.dtype == dtype
    torch.testing.assert_close(center.running_mean.double(), running, rtol=1e-5, atol=1e-5)
    assert abs(float(center.running_mean[0]) - float(before[0])) > 4.0  # it moved
    assert center.double().running_mean.dtype == torch.float64  # widened with the module
    assert FeatureCenter(2).to("meta").half().running_mean.dtype == torch.float32


SPLITS = ((3, 9), (10, 4))  # ragged per-rank batch sizes at two steps


def _batches() -> list[Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(sum(s), 3, dtype=torch.float64, generator=g) * 2 + 1 for s in SPLITS]


def _center_worker(rank: int, world_size: int) -> dict[str, Tensor]:
    torch.manual_seed(0)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(3, 3), FeatureCenter(3, momentum=0.3)).double()
    )
    outputs = []
    for sizes, batch in zip(SPLITS, _batches()):
        rows = slice(0, sizes[0]) if rank == 0 else slice(sizes[0], None)
        outputs.append(model(batch[rows]).detach())
    return {"running_mean": model.module[1].running_mean.clone(), "output": torch.cat(outputs)}


@pytest.mark.ddp
def test_feature_center_averages_across_processes() -> None:
    results = run_distributed(_center_worker, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), FeatureCenter(3, momentum=0.3)).double()
    outputs = [model(batch).detach() for batch in _batches()]
    for result in results:
        torch.testing.assert_close(
            result["running_mean"], model[1].running_mean, rtol=1e-12, atol=1e-12
        )
    for step, sizes in enumerate(SPLITS):
        rank0 = (
            results[0]["output"][: sizes[0]] if step == 0 else results[0]["output"][SPLITS[0][0] :]
        )
        torch.testing.assert_close(rank0, outputs[step][: sizes[0]], rtol=1e-12, atol=1e-12)


def _poisoned_center_worker(rank: int, world_size: int) -> dict[str, Tensor]:
    # rank 0 sees an infinite feature after the first step, rank 1 only finite ones: the global
    # mean is infinite, so both ranks skip that batch, and end as ranks that never saw it
    seen = FeatureCenter(3, momentum=0.3).double()
    clean = FeatureCenter(3, momentum=0.3).double()
    for step, batch in enumerate(_batches()):
        rows = slice(0, SPLITS[step][0]) if rank == 0 else slice(SPLITS[step][0], None)
        local = batch[rows]
        seen(local)
        clean(local)
        if step == 0:
            poisoned = local + 1.0
            if rank == 0:
                poisoned[0, 2] = math.inf
            seen(poisoned)
    return {
        "running_mean": seen.running_mean.clone(),
        "count": seen.num_batches_tracked.clone(),
        "clean": clean.running_mean.clone(),
    }


@pytest.mark.ddp
def test_feature_center_skips_a_batch_non_finite_on_one_process() -> None:
    results = run_distributed(_poisoned_center_worker, 2)
    reference = FeatureCenter(3, momentum=0.3).double()
    for batch in _batches():
        reference(batch)
    for result in results:
        assert torch.equal(result["running_mean"], result["clean"])
        assert result["count"].item() == len(SPLITS)
        torch.testing.assert_close(
            result["running_mean"], reference.running_mean, rtol=1e-12, atol=1e-12
        )


def test_fixed_scale_and_class_counts_survive_half_precision_conversion() -> None:
    from torchcollapse.losses import DotRegressionLoss

    norm = FeatureNorm(scale=16.0).half()
    assert norm.log_scale.dtype == torch.float32
    assert float(norm.scale) == pytest.approx(16.0, rel=1e-6)  # float16 would give 16.0156
    out = norm(torch.tensor([[3.0, 4.0]], dtype=torch.float16))
    assert out.dtype == torch.float16
    assert torch.equal(out, torch.tensor([[9.6, 12.8]], dtype=torch.float16))
    loss = DotRegressionLoss(class_counts=[70000.0, 4973.0, 100.0]).half()
    assert loss.class_counts is not None
    assert loss.class_counts.tolist() == [70000.0, 4973.0, 100.0]  # no inf, no rounding
    value = loss(
        torch.randn(6, 3).half(), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(3, 3).half()
    )
    assert torch.isfinite(value)


def test_dtype_keeping_buffers_allow_deferred_initialisation_from_meta() -> None:
    from torchcollapse.losses import DotRegressionLoss

    norm = FeatureNorm(scale=16.0).to("meta").to_empty(device="cpu")
    norm.reset_parameters()
    assert float(norm.scale) == pytest.approx(16.0, rel=1e-6)
    loss = DotRegressionLoss(class_counts=[7.0, 3.0, 5.0]).to("meta").to_empty(device="cpu")
    assert loss.class_counts is not None
    assert loss.class_counts.device.type == "cpu"
    assert loss.class_counts.dtype == torch.float32


def test_feature_norm_repr_shows_the_current_scale() -> None:
    """``repr`` shows the scale the module applies (learned, or loaded from a state_dict), to six
    significant digits, not the constructor's: as the heads show theirs. Reference: the norm of
    the module's output."""
    learned = FeatureNorm(scale=16.0, learnable=True)
    with torch.no_grad():
        learned.log_scale.fill_(math.log(3.0))
    loaded = FeatureNorm(scale=1.0)
    loaded.load_state_dict(FeatureNorm(scale=10.0).state_dict())
    tiny = FeatureNorm(scale=2.5e-7)
    for module, scale in ((learned, 3.0), (loaded, 10.0), (tiny, 2.5e-7)):
        out = module(torch.randn(4, 6, dtype=torch.float64))
        torch.testing.assert_close(out.norm(dim=1), torch.full((4,), scale, dtype=torch.float64))
        assert f"scale={float(f'{scale:.6g}')!r}," in repr(module), repr(module)
    with torch.device("meta"):
        assert "scale=5.0," in repr(FeatureNorm(scale=5.0))


# ------------------------------------------------------------------------------------------------
# torch.fx symbolic tracing (create_feature_extractor, FX graph-mode quantization)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["norm", "norm_learnable", "norm_dim0", "center", "center_cumulative"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_norms_trace_symbolically_and_match_the_module(kind: str, dtype: torch.dtype) -> None:
    # torch.fx.symbolic_trace called forward with proxies, which the input checks refused. The
    # graph must compute what the layer computes, bit for bit (the dtype-dependent steps run when
    # the graph runs): outputs, gradients, and the running mean over training calls. It must
    # refuse what the layer refuses, with the same error and before the running mean changes
    # (the checks ran only while tracing: a training graph given features of another width
    # folded them into the running mean, an evaluation graph broadcast a (N, 1) batch).
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    factories = {
        "norm": lambda: FeatureNorm(2.5),
        "norm_learnable": lambda: FeatureNorm(4.0, learnable=True),
        "norm_dim0": lambda: FeatureNorm(3.0, dim=0),
        "center": lambda: FeatureCenter(6, momentum=0.3),
        "center_cumulative": lambda: FeatureCenter(6, momentum=None),
    }
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, generator=generator).to(dtype)
    # a batch of another shape (3-D: leading dimensions) and a zero row (the norm's eps clamp)
    z = torch.randn(2, 3, 6, generator=generator).to(dtype)
    z[0, 0] = 0.0
    refused: list[tuple[Tensor, ...]] = [(x.long(),)]
    if kind.startswith("center"):
        refused += [(torch.randn(5, 12, generator=generator).to(dtype),), (x[:, :1],)]
    try:
        check_symbolic_trace(
            lambda: factories[kind]().to(dtype), [(x,), (z,), (x + 1.0,)], refused=refused
        )
    except AssertionError as error:
        raise AssertionError(f"{kind}, {dtype}, seed {seed}: {error}") from error


def test_center_exports_in_training_with_a_dynamic_batch_and_matches_the_layer() -> None:
    # the batch count was a Python float of the batch size, which torch.export specialised
    # ("Constraints violated (batch)"), where nn.BatchNorm1d exports. The exported program must
    # update the running mean as the layer does, bit for bit, for batches of any size.
    import copy

    from torch.export import Dim

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    generator = torch.Generator().manual_seed(seed)
    center = FeatureCenter(6, momentum=0.3).train()
    exported = torch.export.export(
        copy.deepcopy(center),
        (torch.randn(8, 6, generator=generator),),
        dynamic_shapes={"features": {0: Dim("batch")}},
    ).module()
    sizes = torch.randint(2, 40, (3,), generator=generator).tolist()
    batches = [torch.randn(n, 6, generator=generator, dtype=torch.float64) for n in sizes]
    reference = torch.zeros(6, dtype=torch.float64)
    for step, batch in enumerate(batches):
        out = exported(batch.float())
        expected = center(batch.float())
        where = f"seed {seed}, sizes {sizes}, step {step}"
        assert torch.equal(out, expected), where
        assert torch.equal(exported.running_mean, center.running_mean), where
        assert int(exported.num_batches_tracked) == step + 1, where
        # the running mean in float64: the first batch's mean, then the momentum update
        mean = batch.mean(0)
        reference = mean if step == 0 else reference + 0.3 * (mean - reference)
        # float32 batches and sums of up to 40 rows: agreement to a few float32 ulps
        torch.testing.assert_close(
            exported.running_mean.double(), reference, rtol=1e-5, atol=1e-6, msg=where
        )


def test_tracing_the_center_update_refuses_a_process_group() -> None:
    # a graph cannot hold a process group: tracing the training update with one is refused by
    # name; in evaluation mode, or without sync_dist, the group does not enter the graph
    group = object()  # stands for a torch.distributed process group (never used here)
    center = FeatureCenter(4, process_group=group)
    with pytest.raises(RuntimeError, match=r"`process_group` of FeatureCenter to be None"):
        torch.fx.symbolic_trace(center.train())
    x = torch.randn(3, 4)
    assert torch.equal(torch.fx.symbolic_trace(center.eval())(x), center(x))
    unsynced = FeatureCenter(4, sync_dist=False, process_group=group).train()
    traced = torch.fx.symbolic_trace(unsynced)
    reference = FeatureCenter(4, sync_dist=False).train()
    assert torch.equal(traced(x), reference(x))
    assert torch.equal(unsynced.running_mean, reference.running_mean)
