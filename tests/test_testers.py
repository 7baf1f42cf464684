"""The shared testers pass correct components and catch each kind of defect they promise to catch.

``check_metric`` is run on a trivial per-class-mean metric (sum states) against a brute-force
float64 reference, and on four broken variants: a ``dist_reduce_fx="mean"`` count (seen only across
processes), a metric that keeps only the last batch, one that sums in the input precision and one
whose ``forward`` returns the accumulated value. ``check_module`` is run on a linear map through a
fixed random frame stored as a persistent buffer, and on a frame kept as a plain attribute, a
random ``persistent=False`` frame, a wrong custom backward and a compile backend that fails or
miscompiles. The DDP evidence (two distinct processes, world size 2, unequal rank-local states)
is asserted, not only printed.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from tests._helpers.testers import (
    _forward_sizes,
    _ragged_sizes,
    _streaming_sizes,
    check_metric,
    check_module,
)

NUM_CLASSES = 3
NUM_FEATURES = 4
NUM_SAMPLES = 60


# --------------------------------------------------------------------------------------------------
# metrics under test
# --------------------------------------------------------------------------------------------------


class ClassMeans(Metric):
    """Per-class means, the global mean and the sample count, from float64 sum states."""

    full_state_update = False
    class_sum: Tensor
    class_count: Tensor

    def __init__(self, reduce: str = "sum", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        zeros = torch.zeros(NUM_CLASSES, NUM_FEATURES, dtype=torch.float64)
        self.add_state("class_sum", zeros, dist_reduce_fx=reduce)
        self.add_state("class_count", torch.zeros(NUM_CLASSES, dtype=torch.float64), reduce)

    def _batch_sums(self, features: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        sums = torch.zeros_like(self.class_sum).index_add_(0, target, features.double())
        counts = torch.bincount(target, minlength=NUM_CLASSES).double()
        return sums, counts

    def update(self, features: Tensor, target: Tensor) -> None:
        sums, counts = self._batch_sums(features, target)
        self.class_sum += sums
        self.class_count += counts

    def compute(self) -> dict[str, Tensor]:
        count = self.class_count.sum()
        return {
            "class_means": self.class_sum / self.class_count[:, None],
            "global_mean": self.class_sum.sum(0) / count,
            "count": count,
        }


class MeanReducedCount(ClassMeans):
    """Wrong: states averaged over processes. Means are ratios and survive it; the count does not.

    ``full_state_update = True`` keeps ``forward`` from applying the reduction, so only a real
    multi-process run can see the defect.
    """

    full_state_update = True

    def __init__(self) -> None:
        super().__init__(reduce="mean")


class LastBatchOnly(ClassMeans):
    """Wrong: ``update`` overwrites the states instead of accumulating them."""

    def update(self, features: Tensor, target: Tensor) -> None:
        self.class_sum, self.class_count = self._batch_sums(features, target)


class InputPrecisionSums(ClassMeans):
    """Wrong: per-batch sums are formed in the input dtype (float16 loses ~1e-3 relative)."""

    def update(self, features: Tensor, target: Tensor) -> None:
        sums = torch.zeros(NUM_CLASSES, NUM_FEATURES, dtype=features.dtype)
        self.class_sum += sums.index_add_(0, target, features).double()
        self.class_count += torch.bincount(target, minlength=NUM_CLASSES).double()


class ForwardReturnsAccumulated(ClassMeans):
    """Wrong: ``forward`` returns the running value instead of the value on the batch."""

    def forward(self, features: Tensor, target: Tensor) -> dict[str, Tensor]:
        self.update(features, target)
        return self.compute()


def class_means_reference(features: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Brute-force float64 loops; raises when a class has no sample (its mean is undefined)."""
    means = []
    for k in range(NUM_CLASSES):
        rows = [features[i] for i in range(features.shape[0]) if int(target[i]) == k]
        if not rows:
            raise ValueError(f"class {k} has no sample")
        means.append(torch.stack(rows).sum(0) / len(rows))
    total = torch.zeros(NUM_FEATURES, dtype=torch.float64)
    for row in features:
        total = total + row
    return {
        "class_means": torch.stack(means),
        "global_mean": total / features.shape[0],
        "count": torch.tensor(float(features.shape[0])),
    }


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    # an offset of 3 makes float16/bfloat16 rounding visible in the sums
    features = 3.0 + torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=generator)
    target = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=generator)
    return features, target


# --------------------------------------------------------------------------------------------------
# check_metric
# --------------------------------------------------------------------------------------------------


def test_correct_metric_passes_every_check_and_ddp_runs_two_processes(
    data: tuple[Tensor, Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    features, target = data
    report = check_metric(ClassMeans, class_means_reference, features, target)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for dtype in dtypes:
        for check in ("one batch", "streaming", "forward batch", "reset", "deepcopy", "pickle"):
            assert any(c.startswith(f"{dtype}/{check}") for c in report.checks), (dtype, check)
        assert f"{dtype}/ddp rank 0" in report.checks
        assert f"{dtype}/ddp rank 1" in report.checks
    # the DDP path really ran two processes: distinct pids, neither this one, world size 2,
    # unequal shards, and rank-local (unsynchronised) states that differ and add up to the data
    ddp = report.ddp
    assert ddp is not None
    assert len(set(ddp.pids)) == 2
    assert os.getpid() not in ddp.pids
    assert ddp.world_sizes == [2, 2]
    assert ddp.shard_sizes[0] != ddp.shard_sizes[1]
    assert sum(ddp.shard_sizes) == NUM_SAMPLES
    for dtype in dtypes:
        local = ddp.local_states[dtype]
        counts = [state["class_count"].sum().item() for state in local]
        assert counts == [float(n) for n in ddp.shard_sizes]
        assert not torch.equal(local[0]["class_sum"], local[1]["class_sum"])
        torch.testing.assert_close(
            local[0]["class_sum"] + local[1]["class_sum"],
            torch.zeros(NUM_CLASSES, NUM_FEATURES, dtype=torch.float64).index_add_(
                0, target, features.to(dtype).double()
            ),
            rtol=1e-12,  # float64 sums of 60 numbers in a different order
            atol=1e-12,
        )
    with capsys.disabled():  # visible in the test output with or without -s
        print(
            f"\n[ddp evidence] parent pid {os.getpid()}, rank pids {ddp.pids}, world sizes "
            f"{ddp.world_sizes}, shard sizes {ddp.shard_sizes}"
        )


def test_mean_reduction_where_sum_is_needed_is_caught_only_by_ddp(
    data: tuple[Tensor, Tensor],
) -> None:
    features, target = data
    dtypes = (torch.float32, torch.float64)
    check_metric(
        MeanReducedCount, class_means_reference, features, target, ddp=False, dtypes=dtypes
    )
    with pytest.raises(AssertionError, match=r"check=ddp rank 0 .*key 'count'"):
        check_metric(MeanReducedCount, class_means_reference, features, target, dtypes=dtypes)


def test_keeping_only_the_last_batch_is_caught_by_streaming(data: tuple[Tensor, Tensor]) -> None:
    features, target = data
    with pytest.raises(AssertionError, match=r"dtype=torch.float16, check=streaming"):
        check_metric(LastBatchOnly, class_means_reference, features, target)


def test_input_precision_arithmetic_is_caught_by_the_half_dtypes(
    data: tuple[Tensor, Tensor],
) -> None:
    features, target = data
    # float64 inputs are summed exactly as the reference does, so only low dtypes expose it
    check_metric(
        InputPrecisionSums,
        class_means_reference,
        features,
        target,
        dtypes=(torch.float64,),
        ddp=False,
    )
    with pytest.raises(AssertionError, match=r"dtype=torch.float16, check=one batch"):
        check_metric(InputPrecisionSums, class_means_reference, features, target)
    with pytest.raises(AssertionError, match=r"dtype=torch.bfloat16, check=one batch"):
        check_metric(
            InputPrecisionSums, class_means_reference, features, target, dtypes=(torch.bfloat16,)
        )


def test_loose_tolerance_for_a_dtype_lets_rounding_through(data: tuple[Tensor, Tensor]) -> None:
    features, target = data
    # float16 sums of ~20 numbers near 3: relative error below 20 * 2**-11 ~ 1e-2
    check_metric(
        InputPrecisionSums,
        class_means_reference,
        features,
        target,
        dtypes=(torch.float16,),
        tolerances={torch.float16: (2e-2, 1e-2)},
        ddp=False,
    )


def test_forward_returning_the_accumulated_value_is_caught(data: tuple[Tensor, Tensor]) -> None:
    features, target = data
    with pytest.raises(AssertionError, match=r"check=forward batch 1"):
        check_metric(ForwardReturnsAccumulated, class_means_reference, features, target, ddp=False)


def test_keys_restrict_the_comparison_and_missing_keys_fail(data: tuple[Tensor, Tensor]) -> None:
    features, target = data
    f64 = (torch.float64,)

    def without_count(features: Tensor, target: Tensor) -> dict[str, Tensor]:
        out = class_means_reference(features, target)
        del out["count"]
        return out

    with pytest.raises(AssertionError, match=r"missing from the reference \['count'\]"):
        check_metric(ClassMeans, without_count, features, target, dtypes=f64, ddp=False)
    keys = ("class_means", "global_mean")
    check_metric(ClassMeans, without_count, features, target, dtypes=f64, ddp=False, keys=keys)
    with pytest.raises(AssertionError, match=r"key 'count' missing from the reference"):
        check_metric(
            ClassMeans, without_count, features, target, dtypes=f64, ddp=False, keys=("count",)
        )

    def tensor_only(features: Tensor, target: Tensor) -> Tensor:
        return class_means_reference(features, target)["count"]

    with pytest.raises(AssertionError, match="metric returned dict, reference Tensor"):
        check_metric(ClassMeans, tensor_only, features, target, dtypes=f64, ddp=False)


def test_nan_on_both_sides_fails(data: tuple[Tensor, Tensor]) -> None:
    features, target = data
    target = target.clone()
    target[target == 2] = 0  # class 2 is empty: the metric returns 0/0 = NaN for its mean

    def nan_reference(features: Tensor, target: Tensor) -> dict[str, Tensor]:
        # the mean of an empty class is NaN here too, so both sides agree, and still it fails
        return {"class_means": torch.stack([features[target == k].mean(0) for k in range(3)])}

    with pytest.raises(AssertionError, match="key 'class_means'"):
        check_metric(
            ClassMeans, nan_reference, features, target, dtypes=(torch.float64,), ddp=False,
            keys=("class_means",),
        )  # fmt: skip


def test_forward_skips_batches_where_the_reference_raises(data: tuple[Tensor, Tensor]) -> None:
    features, target = data

    def needs_twelve(features: Tensor, target: Tensor) -> dict[str, Tensor]:
        if features.shape[0] < 12:
            raise ValueError("too few samples")
        return class_means_reference(features, target)

    report = check_metric(
        ClassMeans, needs_twelve, features, target, dtypes=(torch.float64,), ddp=False
    )
    assert 0 < report.forward_batches_skipped[torch.float64] < 5

    def never(features: Tensor, target: Tensor) -> dict[str, Tensor]:
        if features.shape[0] < NUM_SAMPLES:
            raise ValueError("only on all data")
        return class_means_reference(features, target)

    with pytest.raises(AssertionError, match="reference raised on every batch"):
        check_metric(ClassMeans, never, features, target, dtypes=(torch.float64,), ddp=False)


def test_invalid_arguments_are_rejected(data: tuple[Tensor, Tensor]) -> None:
    features, target = data
    with pytest.raises(ValueError, match="`target`"):
        check_metric(ClassMeans, class_means_reference, features, target[:-1])
    with pytest.raises(ValueError, match="num_batches"):
        check_metric(ClassMeans, class_means_reference, features[:5], target[:5], num_batches=5)


@pytest.mark.parametrize(("n", "parts"), [(60, 5), (7, 6), (100, 1), (13, 13)])
def test_ragged_splits_cover_the_data_with_the_promised_sizes(n: int, parts: int) -> None:
    generator = torch.Generator().manual_seed(n)
    for _ in range(20):
        stream = _streaming_sizes(n, parts, generator)
        forward = _forward_sizes(n, parts, generator)
        for sizes in (stream, forward):
            assert len(sizes) == parts
            assert sum(sizes) == n
        assert min(stream) >= 1
        assert parts == 1 or n < parts + 1 or stream[0] == 1
        assert min(forward) >= max(1, n // (2 * parts))
    # ragged: over many draws, the batch sizes are not all equal
    draws = {tuple(_ragged_sizes(60, 5, generator)) for _ in range(20)}
    assert len(draws) > 1


# --------------------------------------------------------------------------------------------------
# modules under test
# --------------------------------------------------------------------------------------------------


class FramedLinear(nn.Module):
    """``x -> (x @ frame) @ weight.T + bias``, the fixed random frame a persistent buffer."""

    frame: Tensor

    def __init__(self, in_features: int = 5, out_features: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features))
        self.register_buffer("frame", torch.linalg.qr(torch.randn(in_features, in_features))[0])

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.frame) @ self.weight.T + self.bias


class FrameAsAttribute(FramedLinear):
    """Wrong: the frame is a plain tensor attribute (not saved, not moved by ``.to``)."""

    def __init__(self) -> None:
        super().__init__()
        frame = self.frame
        del self.frame
        self.frame = frame


class NonPersistentRandomFrame(FramedLinear):
    """Wrong: a random frame as a ``persistent=False`` buffer is lost by ``state_dict``."""

    def __init__(self) -> None:
        super().__init__()
        frame = self.frame
        del self.frame
        self.register_buffer("frame", frame, persistent=False)


class _SquareWithWrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        wrong: Tensor = grad * x  # wrong: the derivative of x**2 is 2x
        return wrong


class WrongBackward(FramedLinear):
    """Wrong: a custom autograd function with a buggy gradient."""

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = _SquareWithWrongBackward.apply(super().forward(x))  # type: ignore[no-untyped-call]
        return out


class PinnedFloat32(FramedLinear):
    """Wrong: the frame ignores ``.to(dtype)``."""

    def _apply(self, fn: Any, recurse: bool = True) -> PinnedFloat32:
        frame = self.frame
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self.frame = frame
        return self


class UnusedParameter(FramedLinear):
    """Wrong: a parameter that never reaches the output (breaks DDP, never trains)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(2))


class ScaledFramedLinear(FramedLinear):
    """Wrong: a fixed output scale kept as a plain float, so ``state_dict`` misses it."""

    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale


class FramedCrossEntropy(FramedLinear):
    """A loss-like module: ``(features, target, *, scale)`` -> dict of a scalar loss and logits."""

    def forward(  # type: ignore[override]
        self, x: Tensor, target: Tensor, *, scale: float = 1.0
    ) -> dict[str, Tensor]:
        logits = scale * super().forward(x)
        return {"loss": nn.functional.cross_entropy(logits, target), "logits": logits}


@pytest.fixture
def module_inputs() -> tuple[Tensor]:
    return (torch.randn(4, 5, generator=torch.Generator().manual_seed(1)),)


# --------------------------------------------------------------------------------------------------
# check_module
# --------------------------------------------------------------------------------------------------


def test_correct_module_passes_every_check(module_inputs: tuple[Tensor]) -> None:
    before = torch.random.get_rng_state()
    report = check_module(FramedLinear, module_inputs)
    assert report.checks == [
        "state_dict",
        "tensor attributes",
        ".to(torch.float32)",
        ".to(torch.float64)",
        "deepcopy",
        "pickle",
        "gradcheck",
        "compile[aot_eager, eval]",
        "compile[aot_eager, train]",
    ]
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone


def test_integer_inputs_keyword_arguments_and_dict_outputs_are_supported(
    module_inputs: tuple[Tensor],
) -> None:
    target = torch.tensor([0, 2, 1, 2])
    report = check_module(
        FramedCrossEntropy, (*module_inputs, target), forward_kwargs={"scale": 2.0}
    )
    assert report.checks[-3:] == [
        "gradcheck",
        "compile[aot_eager, eval]",
        "compile[aot_eager, train]",
    ]


def test_frame_as_plain_attribute_fails(module_inputs: tuple[Tensor]) -> None:
    with pytest.raises(AssertionError, match="check_module state_dict"):
        check_module(FrameAsAttribute, module_inputs)
    # the same frame drawn from a fixed seed survives state_dict but is still flagged
    with pytest.raises(AssertionError, match=r"\['frame'\] are plain tensor attributes"):
        check_module(lambda: _seeded(FrameAsAttribute), module_inputs, compile_backend=None)


def test_random_non_persistent_buffer_fails(module_inputs: tuple[Tensor]) -> None:
    with pytest.raises(AssertionError, match="state_dict round-trip into a differently seeded"):
        check_module(NonPersistentRandomFrame, module_inputs)


def test_a_setting_missing_from_state_dict_fails_the_load_into_another_instance(
    module_inputs: tuple[Tensor],
) -> None:
    # the same settings round-trip; another scale keeps its own value after the load
    check_module(ScaledFramedLinear, module_inputs, compile_backend=None, gradcheck=False)
    with pytest.raises(AssertionError, match=r"state_dict round-trip into load_into\[0\]"):
        check_module(
            ScaledFramedLinear,
            module_inputs,
            load_into=[lambda: ScaledFramedLinear(scale=3.0)],
            compile_backend=None,
        )


def test_unconverted_buffer_fails_the_to_check(module_inputs: tuple[Tensor]) -> None:
    with pytest.raises(AssertionError, match=r"\.to\(torch.float64\): not converted: \['frame"):
        check_module(PinnedFloat32, module_inputs, gradcheck=False, compile_backend=None)


def test_wrong_custom_backward_fails_gradcheck(module_inputs: tuple[Tensor]) -> None:
    check_module(WrongBackward, module_inputs, gradcheck=False, compile_backend=None)
    with pytest.raises(AssertionError, match=r"check_module gradcheck \(float64\)"):
        check_module(WrongBackward, module_inputs)


def test_unused_parameter_fails_the_gradient_check(module_inputs: tuple[Tensor]) -> None:
    with pytest.raises(AssertionError, match="parameter 'unused' got gradient None"):
        check_module(UnusedParameter, module_inputs, compile_backend=None)


def test_compile_failures_are_reported_not_skipped(module_inputs: tuple[Tensor]) -> None:
    def broken_backend(graph: torch.fx.GraphModule, example_inputs: Any) -> Any:
        raise RuntimeError("backend cannot compile this")

    def off_by_one_backend(graph: torch.fx.GraphModule, example_inputs: Any) -> Any:
        def run(*args: Any) -> Any:
            out = graph(*args)
            return [o + 1 if isinstance(o, Tensor) else o for o in out]

        return run

    with pytest.raises(
        AssertionError, match=r"compile\[broken_backend, eval\]: compiled call failed"
    ):
        check_module(FramedLinear, module_inputs, gradcheck=False, compile_backend=broken_backend)
    with pytest.raises(
        AssertionError, match=r"compile\[off_by_one_backend, eval\] output vs eager"
    ):
        check_module(
            FramedLinear, module_inputs, gradcheck=False, compile_backend=off_by_one_backend
        )


class RunningMeanSkippedWhenCompiled(nn.Module):
    """Tracks a running mean of its inputs in training, except under ``torch.compile``: the
    kind of host/compiled branch that silently drops a buffer update."""

    running: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5))
        self.register_buffer("running", torch.zeros(5))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not torch.compiler.is_compiling():
            with torch.no_grad():
                self.running.lerp_(x.mean(0), 0.1)
        return x @ self.weight.T


def test_a_buffer_update_missing_under_compile_fails_in_train_mode(
    module_inputs: tuple[Tensor],
) -> None:
    # eval mode hides the bug (no update either way); the train-mode compile check finds it
    with pytest.raises(AssertionError, match=r"compile\[aot_eager, train\] buffers vs eager"):
        check_module(RunningMeanSkippedWhenCompiled, module_inputs, gradcheck=False)


def _seeded(cls: type[nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls()
