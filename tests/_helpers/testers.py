"""Shared testers: every metric and every module of torchcollapse is checked the same way.

In the spirit of torchmetrics' ``tests/unittests/_helpers/testers.py``, smaller:

- :func:`check_metric` runs a :class:`torchmetrics.Metric` through one-batch, ragged streaming,
  ``forward``, ``reset``, pickle/deepcopy, every input dtype and a real 2-process gloo DDP run, and
  compares each result with a float64 reference written by the test author.
- :func:`check_module` runs an :class:`torch.nn.Module` through ``state_dict`` round-trips into a
  fresh, differently seeded instance, ``.to(dtype)``, deepcopy/pickle, float64 ``gradcheck`` (inputs
  and parameters) and ``torch.compile``.
- :func:`check_symbolic_trace` compares the ``torch.fx.symbolic_trace`` graph of a module with the
  module, bit for bit, over several calls in training and evaluation mode, and checks that the
  graph refuses the inputs the module refuses, with the same error, before any buffer changes.

Every failed check raises :class:`AssertionError` whose message names the check (and, for metrics,
the dtype and the output key), so that ``pytest.raises(AssertionError, match=...)`` can tell which
check caught a defect. Both functions return a small report of what was run.

Example (a sum metric against its closed form)::

    check_metric(MySum, lambda features, target: features.sum(0), features, target)
    check_module(lambda: MyHead(8, 4), (torch.randn(6, 8),))
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric

from tests._helpers.ddp import run_distributed

__all__ = [
    "DDPEvidence",
    "MetricCheckReport",
    "ModuleCheckReport",
    "check_deferred_init",
    "check_metric",
    "check_module",
    "check_symbolic_trace",
]

_SPLIT_SEED = 20240601
_DDP_WORLD_SIZE = 2
_DEFAULT_METRIC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tolerances of a module run in a low dtype against the same module in float64 (``.to`` check) and
# of a compiled module against eager in the same dtype (``compile`` check). Unit roundoff is 2**-53
# (float64), 2**-24 (float32), 2**-11 (float16), 2**-8 (bfloat16); a forward pass of a few matmuls
# and reductions loses a few hundred ulps, hence rtol ~ 1e3 * eps, capped for the half types.
_MODULE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


@dataclass
class DDPEvidence:
    """What the 2-process DDP check of :func:`check_metric` observed.

    Attributes:
        pids: process id of each rank (distinct, none equal to the calling process).
        world_sizes: ``torch.distributed.get_world_size()`` as reported inside each rank.
        shard_sizes: number of samples each rank updated with (unequal by construction).
        local_states: per dtype, per rank, the metric states just before ``compute`` (the
            rank-local, unsynchronised sufficient statistics).
    """

    pids: list[int]
    world_sizes: list[int]
    shard_sizes: list[int]
    local_states: dict[torch.dtype, list[dict[str, Any]]]


@dataclass
class MetricCheckReport:
    """Which checks :func:`check_metric` ran (all of them passed when this is returned).

    Attributes:
        checks: ``"<dtype>/<check>"`` for every comparison made, in order.
        forward_batches_skipped: per dtype, the number of batches on which the reference raised, so
            ``forward``'s batch value was not compared (the batch was fed through ``update``).
        ddp: evidence of the DDP run, ``None`` when ``ddp=False``.
    """

    checks: list[str] = field(default_factory=list)
    forward_batches_skipped: dict[torch.dtype, int] = field(default_factory=dict)
    ddp: DDPEvidence | None = None


@dataclass
class ModuleCheckReport:
    """Which checks :func:`check_module` ran (all of them passed when this is returned)."""

    checks: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------


def _prefixed(prefix: str) -> Callable[[str], str]:
    def message(generated: str) -> str:
        return f"{prefix}: {generated}"

    return message


def _as_output(value: Any, where: str) -> Tensor | dict[str, Tensor]:
    if isinstance(value, Mapping):
        return {str(k): torch.as_tensor(v) for k, v in value.items()}
    if isinstance(value, (Tensor, float, int)):
        return torch.as_tensor(value)
    raise AssertionError(f"{where}: expected a Tensor or a dict of Tensors, got {type(value)}")


def _assert_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float,
    atol: float,
    where: str,
    keys: Sequence[str] | None = None,
) -> None:
    """Compare a metric output with a reference output, both cast to float64; NaN always fails."""
    act = _as_output(actual, f"{where} (metric)")
    exp = _as_output(expected, f"{where} (reference)")
    if isinstance(act, dict) != isinstance(exp, dict):
        raise AssertionError(
            f"{where}: metric returned {type(actual).__name__}, reference {type(expected).__name__}"
        )
    pairs: list[tuple[str | None, Tensor, Tensor]]
    if isinstance(act, dict) and isinstance(exp, dict):
        if keys is None:
            missing = sorted(set(exp) - set(act))
            extra = sorted(set(act) - set(exp))
            if missing or extra:
                raise AssertionError(
                    f"{where}: keys differ; missing from the metric {missing}, "
                    f"missing from the reference {extra}"
                )
            names = sorted(exp)
        else:
            names = list(keys)
            for name in names:
                if name not in act or name not in exp:
                    raise AssertionError(
                        f"{where}: key '{name}' missing from the "
                        f"{'metric' if name not in act else 'reference'} output"
                    )
        pairs = [(name, act[name], exp[name]) for name in names]
    else:
        assert isinstance(act, Tensor)
        assert isinstance(exp, Tensor)
        if keys is not None:
            raise AssertionError(f"{where}: `keys` given but the outputs are not dicts")
        pairs = [(None, act, exp)]
    for key, a, e in pairs:
        prefix = f"{where}" + ("" if key is None else f", key '{key}'")
        torch.testing.assert_close(
            a.detach().cpu().double(),
            e.detach().cpu().double(),
            rtol=rtol,
            atol=atol,
            equal_nan=False,
            msg=_prefixed(prefix),
        )


# --------------------------------------------------------------------------------------------------
# batch splits
# --------------------------------------------------------------------------------------------------


def _ragged_sizes(n: int, parts: int, generator: torch.Generator, min_size: int = 1) -> list[int]:
    """A uniformly random composition of ``n`` into ``parts`` sizes, each at least ``min_size``."""
    if parts < 1 or n < parts * min_size:
        raise ValueError(f"cannot split {n} samples into {parts} batches of at least {min_size}")
    spare = n - parts * min_size
    # stars and bars: choose parts - 1 bar positions among spare + parts - 1 slots
    bars = (
        torch.randperm(spare + parts - 1, generator=generator)[: parts - 1].sort().values.tolist()
    )
    edges = [-1, *bars, spare + parts - 1]
    return [min_size + edges[i + 1] - edges[i] - 1 for i in range(parts)]


def _streaming_sizes(n: int, parts: int, generator: torch.Generator) -> list[int]:
    """Ragged sizes for pure accumulation: the first batch holds a single sample."""
    if parts == 1 or n < parts + 1:
        return _ragged_sizes(n, parts, generator)
    return [1, *_ragged_sizes(n - 1, parts - 1, generator)]


def _forward_sizes(n: int, parts: int, generator: torch.Generator) -> list[int]:
    """Ragged sizes where each batch has at least ``n // (2 * parts)`` samples."""
    return _ragged_sizes(n, parts, generator, min_size=max(1, n // (2 * parts)))


def _slices(sizes: Sequence[int], start: int = 0) -> Iterator[slice]:
    for size in sizes:
        yield slice(start, start + size)
        start += size


def _call(fn: Callable[..., Any], features: Tensor, target: Tensor | None) -> Any:
    return fn(features) if target is None else fn(features, target)


def _rows(target: Tensor | None, s: slice) -> Tensor | None:
    return None if target is None else target[s]


def _snapshot_states(metric: Metric) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in metric._defaults:
        value = getattr(metric, name)
        if isinstance(value, Tensor):
            out[name] = value.detach().cpu().clone()
        else:
            out[name] = [v.detach().cpu().clone() for v in value]
    return out


def _to_cpu_double(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): torch.as_tensor(v).detach().cpu().double() for k, v in value.items()}
    return torch.as_tensor(value).detach().cpu().double()


# --------------------------------------------------------------------------------------------------
# check_metric
# --------------------------------------------------------------------------------------------------


def check_metric(
    metric_factory: Callable[[], Metric],
    reference: Callable[..., Any],
    features: Tensor,
    target: Tensor | None,
    *,
    num_batches: int = 5,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dtypes: Sequence[torch.dtype] = _DEFAULT_METRIC_DTYPES,
    ddp: bool = True,
    keys: Sequence[str] | None = None,
    tolerances: Mapping[torch.dtype, tuple[float, float]] | None = None,
) -> MetricCheckReport:
    """Check a torchmetrics ``Metric`` against a float64 reference, the way users will run it.

    For every ``dtype`` in ``dtypes`` the features are rounded once, ``rounded =
    features.to(dtype)``; the metric receives ``rounded`` as is (float16/bfloat16 included) and
    the reference receives ``rounded.double()``, so a metric that accumulates in float64 must
    match to ``rtol``/``atol`` whatever the input dtype: a metric that computes or stores anything
    in the input precision fails. ``tolerances`` may override ``(rtol, atol)`` per dtype. All
    single-process checks run for every dtype first, then the DDP check. Checks, in this order:

    1. ``one batch``: ``update(all data)`` then ``compute()`` equals ``reference(all data)``.
    2. ``streaming``: ``num_batches`` updates of unequal random sizes (the first holds a single
       sample, so ``update`` must accept one sample) then ``compute()`` equals the reference on
       all data.
    3. ``forward``: on a fresh metric, ``forward(batch)`` over ``num_batches`` unequal batches, each
       of at least ``N // (2 * num_batches)`` samples, returns the value on that batch alone (equal
       to the reference on that batch); afterwards ``compute()`` equals the reference on all data.
       When the reference *raises* on a batch (a quantity undefined on so few samples), that batch
       goes through ``update`` instead and its value is not compared; if no batch could be
       compared the check fails, so choose ``features`` with enough samples per batch.
    4. ``reset``: after ``reset()`` every state equals that of a fresh metric, and streaming the
       batches again gives the reference on all data.
    5. ``deepcopy`` / ``pickle``: copies of a metric updated with the first batches compute the
       reference on those batches, keep accumulating to the reference on all data, and leave the
       original untouched.
    6. ``ddp`` (when ``ddp=True``): ONE call of :func:`run_distributed` forks two gloo processes;
       for every dtype, rank ``r`` updates a fresh metric with its own contiguous shard (the two
       shards differ in size) in ragged batches and calls ``compute()``; the result on every rank
       must equal the single-process reference on all data. The DDP run asserts that the ranks
       are distinct processes reporting world size 2 and prints their pids.

    Outputs may be a Tensor or a ``dict[str, Tensor]``; dicts are compared key by key (all keys, or
    only ``keys``); a key missing from either side fails. Comparisons use
    ``torch.testing.assert_close(actual.double(), expected.double(), rtol, atol)``; a NaN on either
    side fails. Splits come from a generator seeded here, so runs are reproducible.

    Args:
        metric_factory: returns a fresh metric; called many times (and inside the DDP processes).
        reference: ``reference(features_f64, target)`` (``reference(features_f64)`` when ``target``
            is ``None``) returning a Tensor, a number or a dict of them.
        features: ``(N, ...)`` inputs, ``N >= num_batches + 1`` (``N >= 4`` for DDP).
        target: ``(N, ...)`` targets passed unchanged to every ``update``, or ``None`` for metrics
            whose ``update`` takes features only.
        num_batches: number of batches in the ragged splits.
        rtol: relative tolerance for every dtype not in ``tolerances``.
        atol: absolute tolerance for every dtype not in ``tolerances``.
        dtypes: input dtypes to test.
        ddp: run the 2-process gloo check.
        keys: compare only these keys of dict outputs.
        tolerances: optional ``{dtype: (rtol, atol)}`` overrides.

    Returns:
        A :class:`MetricCheckReport` of the checks made (with the DDP evidence).

    Raises:
        AssertionError: naming dtype, check and key, when any comparison fails.
        ValueError: when the inputs cannot be split as asked.
    """
    if not isinstance(features, Tensor) or features.ndim < 1:
        raise ValueError("Expected argument `features` to be a tensor of shape (N, ...).")
    n = features.shape[0]
    if target is not None and (not isinstance(target, Tensor) or target.shape[:1] != (n,)):
        raise ValueError(f"Expected argument `target` to be a tensor of shape ({n}, ...) or None.")
    if num_batches < 1 or n < num_batches + 1:
        raise ValueError(f"Expected at least num_batches + 1 = {num_batches + 1} samples, got {n}.")
    features = features.detach()
    tolerances = dict(tolerances or {})
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    report = MetricCheckReport()

    for dtype in dtypes:
        r_tol, a_tol = tolerances.get(dtype, (rtol, atol))
        rounded = features.to(dtype)
        ref_features = rounded.double()
        expected_all = _call(reference, ref_features, target)

        def compare(
            actual: Any,
            expected: Any,
            check: str,
            *,
            _r: float = r_tol,
            _a: float = a_tol,
            _dtype: torch.dtype = dtype,
        ) -> None:
            _assert_close(
                actual,
                expected,
                rtol=_r,
                atol=_a,
                keys=keys,
                where=f"check_metric dtype={_dtype}, check={check}",
            )
            report.checks.append(f"{_dtype}/{check}")

        # 1. one batch
        metric = metric_factory()
        _call(metric.update, rounded, target)
        compare(metric.compute(), expected_all, "one batch")

        # 2. ragged streaming
        stream_sizes = _streaming_sizes(n, num_batches, generator)
        metric = metric_factory()
        for s in _slices(stream_sizes):
            _call(metric.update, rounded[s], _rows(target, s))
        compare(metric.compute(), expected_all, f"streaming {stream_sizes}")

        # 3. forward returns the batch value and accumulates
        fwd_sizes = _forward_sizes(n, num_batches, generator)
        metric = metric_factory()
        skipped = 0
        for i, s in enumerate(_slices(fwd_sizes)):
            try:
                expected_batch = _call(reference, ref_features[s], _rows(target, s))
            except Exception:
                skipped += 1
                _call(metric.update, rounded[s], _rows(target, s))
                continue
            batch_value = _call(metric, rounded[s], _rows(target, s))
            compare(batch_value, expected_batch, f"forward batch {i} of {fwd_sizes}")
        if skipped == len(fwd_sizes):
            raise AssertionError(
                f"check_metric dtype={dtype}, check=forward: the reference raised on every batch "
                f"of {fwd_sizes}, so no batch value was compared; pass more samples or fewer "
                "batches"
            )
        report.forward_batches_skipped[dtype] = skipped
        compare(metric.compute(), expected_all, f"forward then compute {fwd_sizes}")

        # 4. reset
        metric.reset()
        fresh = _snapshot_states(metric_factory())
        for name, value in _snapshot_states(metric).items():
            default = fresh[name]
            same = (
                torch.equal(value, default)
                if isinstance(value, Tensor)
                else len(value) == len(default) and all(map(torch.equal, value, default))
            )
            if not same:
                raise AssertionError(
                    f"check_metric dtype={dtype}, check=reset: state '{name}' after reset() "
                    "differs from a fresh metric's"
                )
        for s in _slices(stream_sizes):
            _call(metric.update, rounded[s], _rows(target, s))
        compare(metric.compute(), expected_all, "reset then streaming")

        # 5. deepcopy / pickle of an updated metric
        head = max(1, len(fwd_sizes) // 2)
        n_head = sum(fwd_sizes[:head])
        original = metric_factory()
        for s in _slices(fwd_sizes[:head]):
            _call(original.update, rounded[s], _rows(target, s))
        try:
            expected_head = _call(reference, ref_features[:n_head], _rows(target, slice(0, n_head)))
        except Exception:
            expected_head = None
        copies = {
            "deepcopy": copy.deepcopy(original),
            "pickle": pickle.loads(pickle.dumps(original)),
        }
        for how, clone in copies.items():
            if expected_head is not None:
                compare(clone.compute(), expected_head, f"{how} of an updated metric")
            for s in _slices(fwd_sizes[head:], start=n_head):
                _call(clone.update, rounded[s], _rows(target, s))
            compare(clone.compute(), expected_all, f"{how} then more updates")
        if expected_head is not None:
            compare(original.compute(), expected_head, "original after its copies were updated")

    if ddp:
        report.ddp = _check_metric_ddp(
            metric_factory,
            reference,
            features,
            target,
            num_batches=num_batches,
            rtol=rtol,
            atol=atol,
            dtypes=dtypes,
            keys=keys,
            tolerances=tolerances,
            generator=generator,
            report=report,
        )
    return report


def _check_metric_ddp(
    metric_factory: Callable[[], Metric],
    reference: Callable[..., Any],
    features: Tensor,
    target: Tensor | None,
    *,
    num_batches: int,
    rtol: float,
    atol: float,
    dtypes: Sequence[torch.dtype],
    keys: Sequence[str] | None,
    tolerances: Mapping[torch.dtype, tuple[float, float]],
    generator: torch.Generator,
    report: MetricCheckReport,
) -> DDPEvidence:
    n = features.shape[0]
    if n < 2 * _DDP_WORLD_SIZE:
        raise ValueError(f"Expected at least {2 * _DDP_WORLD_SIZE} samples for DDP, got {n}.")
    # two contiguous shards of unequal size, each with at least a quarter of the samples
    shard_sizes = _ragged_sizes(n, _DDP_WORLD_SIZE, generator, min_size=n // 4)
    if shard_sizes[0] == shard_sizes[1]:
        shard_sizes = [shard_sizes[0] - 1, shard_sizes[1] + 1]
    shard_batches = [
        _ragged_sizes(size, max(1, min(size, num_batches // 2 + 1)), generator)
        for size in shard_sizes
    ]
    rounded = [features.to(dtype) for dtype in dtypes]

    def worker(rank: int, world_size: int) -> dict[str, Any]:
        start = sum(shard_sizes[:rank])
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "results": [],
        }
        for feats in rounded:
            metric = metric_factory()
            for s in _slices(shard_batches[rank], start=start):
                _call(metric.update, feats[s], _rows(target, s))
            local = _snapshot_states(metric)
            out["results"].append((local, _to_cpu_double(metric.compute())))
        return out

    per_rank = run_distributed(worker, _DDP_WORLD_SIZE)
    pids = [r["pid"] for r in per_rank]
    world_sizes = [r["world_size"] for r in per_rank]
    if [r["rank"] for r in per_rank] != list(range(_DDP_WORLD_SIZE)) or world_sizes != [
        _DDP_WORLD_SIZE
    ] * _DDP_WORLD_SIZE:
        raise AssertionError(f"check_metric ddp: ranks/world sizes wrong: {per_rank}")
    if len(set(pids)) != _DDP_WORLD_SIZE or os.getpid() in pids:
        raise AssertionError(f"check_metric ddp: expected {_DDP_WORLD_SIZE} processes, pids {pids}")
    local_states: dict[torch.dtype, list[dict[str, Any]]] = {}
    for i, dtype in enumerate(dtypes):
        r_tol, a_tol = tolerances.get(dtype, (rtol, atol))
        expected = _call(reference, rounded[i].double(), target)
        local_states[dtype] = [r["results"][i][0] for r in per_rank]
        for rank, r in enumerate(per_rank):
            _assert_close(
                r["results"][i][1],
                expected,
                rtol=r_tol,
                atol=a_tol,
                keys=keys,
                where=f"check_metric dtype={dtype}, check=ddp rank {rank} of {_DDP_WORLD_SIZE} "
                f"(shards {shard_sizes}, batches {shard_batches})",
            )
            report.checks.append(f"{dtype}/ddp rank {rank}")
    print(
        f"check_metric ddp: {_DDP_WORLD_SIZE} gloo processes (pids {pids}, parent {os.getpid()}), "
        f"shards {shard_sizes}, dtypes {[str(d) for d in dtypes]}: every rank matches the reference"
    )
    return DDPEvidence(pids, world_sizes, shard_sizes, local_states)


# --------------------------------------------------------------------------------------------------
# check_module
# --------------------------------------------------------------------------------------------------


def _leaves(value: Any) -> list[Tensor]:
    """Tensors of a (nested) tuple/list/dict output, in a fixed order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for k in sorted(value) for t in _leaves(value[k])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    return []


def _assert_outputs(
    actual: Any,
    expected: Any,
    where: str,
    *,
    exact: bool,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> None:
    act, exp = _leaves(actual), _leaves(expected)
    if len(act) != len(exp) or not exp:
        raise AssertionError(f"check_module {where}: {len(act)} output tensors vs {len(exp)}")
    for i, (a, e) in enumerate(zip(act, exp)):
        if exact:
            if a.dtype != e.dtype or a.shape != e.shape or not torch.equal(a, e):
                diff = (a.double() - e.double()).abs().max().item() if a.shape == e.shape else None
                raise AssertionError(
                    f"check_module {where}: output {i} differs (max abs diff {diff}, dtypes "
                    f"{a.dtype}/{e.dtype}, shapes {tuple(a.shape)}/{tuple(e.shape)})"
                )
        else:
            torch.testing.assert_close(
                a.detach().double(),
                e.detach().double(),
                rtol=rtol,
                atol=atol,
                equal_nan=False,
                msg=_prefixed(f"check_module {where}: output {i}"),
            )


def _plain_tensor_attributes(module: nn.Module) -> list[str]:
    """``name.attr`` of tensors stored on (sub)modules without being a parameter or buffer."""
    found = []
    for prefix, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, Tensor) and not attr.startswith("__"):
                found.append(f"{prefix + '.' if prefix else ''}{attr}")
    return found


def _moved(module: nn.Module, dtype: torch.dtype, keep: Collection[str] = ()) -> nn.Module:
    """``copy.deepcopy(module).to(dtype)``, checked to hold only floating ``dtype`` tensors
    (but the buffers named in ``keep``, which must keep their dtype)."""
    moved = copy.deepcopy(module).to(dtype)
    before = dict(module.named_buffers())
    wrong = [
        f"{name} ({t.dtype})"
        for name, t in [*moved.named_parameters(), *moved.named_buffers()]
        if t.is_floating_point() and t.dtype != (before[name].dtype if name in keep else dtype)
    ]
    if wrong:
        raise AssertionError(f"check_module .to({dtype}): not converted: {wrong}")
    return moved


def _cast_inputs(inputs: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, ...]:
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def check_module(
    module_factory: Callable[[], nn.Module],
    example_inputs: Sequence[Tensor] | Tensor,
    *,
    gradcheck: bool = True,
    compile_backend: str | Callable[..., Any] | None = "aot_eager",
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    forward_kwargs: Mapping[str, Any] | None = None,
    fixed_dtype_buffers: Collection[str] = (),
    load_into: Sequence[Callable[[], nn.Module]] = (),
) -> ModuleCheckReport:
    """Check that an ``nn.Module`` saves, moves, copies, differentiates and compiles correctly.

    All forward passes run in ``eval()`` mode on ``module(*example_inputs, **forward_kwargs)``; the
    output may be a Tensor or a (nested) tuple/list/dict of Tensors. Checks, in this order:

    1. ``state_dict``: a second instance built by ``module_factory()`` under a *different* global
       RNG state (so randomly initialised weights and frames differ) gets the first one's
       ``state_dict`` after a ``torch.save``/``torch.load(weights_only=True)`` round-trip, with
       identical keys, and must give *bit-identical* outputs. A fixed frame that is a plain tensor
       attribute or a ``persistent=False`` buffer drawn at random fails here. So must each
       module of ``load_into``: built with other settings, it computes what the saved module
       did once it has loaded that ``state_dict`` (a setting the output depends on, such as a
       fixed scale, kept as a plain attribute and missing from ``state_dict`` fails here).
    2. ``tensor attributes``: no (sub)module stores a tensor as a plain attribute (it would be
       missed by ``state_dict``, ``.to()`` and DDP); register it as a buffer.
    3. ``.to(dtype)`` for each of ``dtypes``: every floating parameter and buffer takes the dtype,
       every floating output has it, and the output agrees with the float64 module on the same
       (rounded) inputs to a dtype tolerance (float32: rtol 1e-4, atol 1e-5).
    4. ``deepcopy`` and ``pickle`` round-trips give bit-identical outputs.
    5. ``gradcheck`` (when ``gradcheck=True``): in float64, ``torch.autograd.gradcheck`` of the
       output with respect to every floating input and every parameter (``fast_mode`` when they
       hold more than 256 numbers), and a backward pass gives every parameter that requires grad
       a finite gradient.
    6. ``compile`` (unless ``compile_backend`` is ``None``): ``torch.compile(module,
       backend=compile_backend)`` gives the eager output and the eager gradients (parameters and
       floating inputs) within the dtype tolerance, in ``eval()`` mode and in ``train()`` mode,
       where the buffers a training call updates (running means, steps) must also match eager.
       A compile error is a failure, never skipped.

    The global RNG state is restored on return.

    Args:
        module_factory: returns a fresh module; called several times.
        example_inputs: a tuple of tensors (or one tensor) passed positionally to ``forward``.
        gradcheck: the module is differentiable: run check 5.
        compile_backend: ``torch.compile`` backend (``"aot_eager"`` is fast on CPU; ``"inductor"``
            compiles C++ and is slow), or ``None`` to skip check 6.
        dtypes: floating dtypes for check 3.
        forward_kwargs: keyword arguments passed to every ``forward`` call.
        fixed_dtype_buffers: buffers that deliberately keep their dtype under ``.to(dtype)``
            (counts, fixed constants); check 3 requires exactly that of them.
        load_into: factories of modules of the same kind and shape built with other settings
            (another fixed scale): check 1 loads the saved ``state_dict`` into each, strictly.

    Returns:
        A :class:`ModuleCheckReport` of the checks made.

    Raises:
        AssertionError: naming the check, when any check fails.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError("Expected argument `example_inputs` to be a non-empty tuple of tensors.")
    inputs = tuple(x.detach() for x in inputs)
    kwargs = dict(forward_kwargs or {})
    report = ModuleCheckReport()

    def run(module: nn.Module, args: Sequence[Tensor] = inputs) -> Any:
        with torch.no_grad():
            return module(*args, **kwargs)

    with torch.random.fork_rng(devices=[]):
        # 1. state_dict round-trip into a differently seeded instance
        torch.manual_seed(1234)
        module = module_factory().eval()
        torch.manual_seed(98765)
        fresh = module_factory().eval()
        expected = run(module)
        saved = module.state_dict()
        if list(saved) != list(fresh.state_dict()):
            raise AssertionError(
                f"check_module state_dict: keys differ between instances: {list(saved)} vs "
                f"{list(fresh.state_dict())}"
            )
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        try:
            fresh.load_state_dict(torch.load(buffer, weights_only=True))
        except RuntimeError as error:
            raise AssertionError(f"check_module state_dict: load failed: {error}") from error
        _assert_outputs(
            run(fresh),
            expected,
            "state_dict round-trip into a differently seeded instance "
            "(is every fixed tensor a persistent buffer?)",
            exact=True,
        )
        for index, factory in enumerate(load_into):
            other = factory().eval()
            buffer.seek(0)
            try:
                other.load_state_dict(torch.load(buffer, weights_only=True))
            except RuntimeError as error:
                raise AssertionError(
                    f"check_module state_dict: load into load_into[{index}] failed: {error}"
                ) from error
            _assert_outputs(
                run(other),
                expected,
                f"state_dict round-trip into load_into[{index}], built with other settings "
                "(is every setting the output depends on saved?)",
                exact=True,
            )
        report.checks.append("state_dict")

        # 2. no plain tensor attributes
        plain = _plain_tensor_attributes(module)
        if plain:
            raise AssertionError(
                f"check_module tensor attributes: {plain} are plain tensor attributes; register "
                "them with register_buffer so that state_dict and .to() see them"
            )
        report.checks.append("tensor attributes")

        # 3. .to(dtype)
        reference64 = _moved(module, torch.float64, fixed_dtype_buffers)
        for dtype in dtypes:
            moved = _moved(module, dtype, fixed_dtype_buffers)
            args = _cast_inputs(inputs, dtype)
            out = run(moved, args)
            bad = [t.dtype for t in _leaves(out) if t.is_floating_point() and t.dtype != dtype]
            if bad:
                raise AssertionError(f"check_module .to({dtype}): output dtypes {bad}")
            r_tol, a_tol = _MODULE_TOLERANCES.get(dtype, (1e-2, 1e-2))
            _assert_outputs(
                out,
                run(reference64, _cast_inputs(args, torch.float64)),
                f".to({dtype}) vs float64",
                exact=False,
                rtol=r_tol,
                atol=a_tol,
            )
            report.checks.append(f".to({dtype})")

        # 4. deepcopy / pickle
        _assert_outputs(run(copy.deepcopy(module)), expected, "deepcopy", exact=True)
        _assert_outputs(run(pickle.loads(pickle.dumps(module))), expected, "pickle", exact=True)
        report.checks.extend(["deepcopy", "pickle"])

        # 5. float64 gradcheck over inputs and parameters
        if gradcheck:
            _check_gradients(module, inputs, kwargs)
            report.checks.append("gradcheck")

        # 6. torch.compile == eager
        if compile_backend is not None:
            for training in (False, True):
                _check_compile(module, inputs, kwargs, compile_backend, training)
                mode = "train" if training else "eval"
                report.checks.append(f"compile[{_backend_name(compile_backend)}, {mode}]")
    return report


def _check_gradients(module: nn.Module, inputs: tuple[Tensor, ...], kwargs: dict[str, Any]) -> None:
    model = copy.deepcopy(module).double().eval()
    args = [x.double().requires_grad_() if x.is_floating_point() else x for x in inputs]
    grad_args = [i for i, x in enumerate(args) if x.requires_grad]
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    if not grad_args and not names:
        raise AssertionError("check_module gradcheck: no floating input and no parameter")

    def fn(*leaves: Tensor) -> tuple[Tensor, ...]:
        call_args = list(args)
        for i, leaf in zip(grad_args, leaves[: len(grad_args)]):
            call_args[i] = leaf
        overrides = dict(zip(names, leaves[len(grad_args) :]))
        out = torch.func.functional_call(model, overrides, tuple(call_args), kwargs)
        return tuple(t for t in _leaves(out) if t.is_floating_point())

    leaves = tuple(args[i] for i in grad_args) + tuple(
        params[n].detach().clone().requires_grad_() for n in names
    )
    size = sum(t.numel() for t in leaves)
    try:
        torch.autograd.gradcheck(fn, leaves, fast_mode=size > 256)
    except Exception as error:  # GradcheckError, or "no output requires grad"
        raise AssertionError(f"check_module gradcheck (float64): {error}") from error

    # every trainable parameter receives a finite gradient
    out = model(*args, **kwargs)
    floating = [t for t in _leaves(out) if t.is_floating_point() and t.requires_grad]
    if not floating:
        raise AssertionError("check_module gradcheck: no output requires grad")
    weights = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=weights, dtype=t.dtype)).sum() for t in floating)
    assert isinstance(loss, Tensor)
    loss.backward()  # type: ignore[no-untyped-call]
    for name, p in params.items():
        if p.grad is None or not torch.isfinite(p.grad).all():
            raise AssertionError(
                f"check_module gradcheck: parameter '{name}' got gradient "
                f"{None if p.grad is None else 'with non-finite values'}"
            )


def _backend_name(backend: str | Callable[..., Any]) -> str:
    return backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))


def _check_compile(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    kwargs: dict[str, Any],
    backend: str | Callable[..., Any],
    training: bool,
) -> None:
    import torch._dynamo

    if not torch._dynamo.eval_frame.is_dynamo_supported():  # pragma: no cover - platform dependent
        print("check_module compile: torch.compile is not supported here; check skipped")
        return
    torch._dynamo.reset()
    name = f"{_backend_name(backend)}, {'train' if training else 'eval'}"
    eager = copy.deepcopy(module).train(training)
    compiled_module = copy.deepcopy(module).train(training)
    # fullgraph: a graph break (a host read, an unsupported call) is a failure, not a fallback
    compiled = torch.compile(compiled_module, backend=backend, fullgraph=True)
    dtype = next(
        (x.dtype for x in inputs if x.is_floating_point()),
        next((p.dtype for p in module.parameters()), torch.float32),
    )
    r_tol, a_tol = _MODULE_TOLERANCES.get(dtype, (1e-2, 1e-2))

    def forward_backward(model: Callable[..., Any], target: nn.Module) -> tuple[Any, list[Tensor]]:
        torch.manual_seed(0)  # the same random draws, if any, in the eager and compiled calls
        args = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
        out = model(*args, **kwargs)
        floating = [t for t in _leaves(out) if t.is_floating_point() and t.requires_grad]
        grads: list[Tensor] = []
        if floating:
            weights = torch.Generator().manual_seed(11)
            loss = sum(
                (t * torch.randn(t.shape, generator=weights, dtype=t.dtype)).sum() for t in floating
            )
            assert isinstance(loss, Tensor)
            loss.backward()  # type: ignore[no-untyped-call]
            grads = [
                torch.zeros_like(t) if t.grad is None else t.grad
                for t in [*target.parameters(), *[a for a in args if a.requires_grad]]
            ]
        return out, grads

    out_eager, grads_eager = forward_backward(eager, eager)
    try:
        out_compiled, grads_compiled = forward_backward(compiled, compiled_module)
    except Exception as error:
        raise AssertionError(f"check_module compile[{name}]: compiled call failed: {error}") from (
            error
        )
    _assert_outputs(
        [t.detach() for t in _leaves(out_compiled)],
        [t.detach() for t in _leaves(out_eager)],
        f"compile[{name}] output vs eager",
        exact=False,
        rtol=r_tol,
        atol=a_tol,
    )
    if grads_eager:
        _assert_outputs(
            grads_compiled,
            grads_eager,
            f"compile[{name}] gradients vs eager",
            exact=False,
            rtol=r_tol,
            atol=a_tol,
        )
    buffers_eager = dict(eager.named_buffers())
    buffers_compiled = dict(compiled_module.named_buffers())
    if sorted(buffers_eager) != sorted(buffers_compiled):
        raise AssertionError(
            f"check_module compile[{name}]: buffers {sorted(buffers_compiled)} after the compiled "
            f"call, {sorted(buffers_eager)} after the eager one"
        )
    if buffers_eager:
        _assert_outputs(
            [buffers_compiled[key].detach() for key in sorted(buffers_eager)],
            [buffers_eager[key].detach() for key in sorted(buffers_eager)],
            f"compile[{name}] buffers vs eager",
            exact=False,
            rtol=r_tol,
            atol=a_tol,
        )


# --------------------------------------------------------------------------------------------------
# check_deferred_init
# --------------------------------------------------------------------------------------------------


def check_deferred_init(
    module_factory: Callable[[], nn.Module],
    batches: Sequence[Sequence[Tensor]],
    *,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Check deferred initialisation: built on the meta device, then ``to_empty`` and
    ``reset_parameters`` of every submodule that has it (what FSDP and Lightning's ``empty_init``
    do), a module equals one built directly.

    Both instances are built under the same global RNG state. Their ``state_dict``s must be
    bit-identical (``to_empty`` leaves uninitialised memory: a buffer that ``reset_parameters``
    does not set back fails here), and so must their outputs and buffers over ``batches``, fed in
    training mode (running statistics update) and then once more in evaluation mode.

    Raises:
        AssertionError: naming the check (``deferred init``) and what differed.
    """
    kwargs = dict(forward_kwargs or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        direct = module_factory()
        torch.manual_seed(4321)
        with torch.device("meta"):
            deferred = module_factory()
        deferred.to_empty(device="cpu")
        for sub in deferred.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()

    def compare(where: str) -> None:
        expected, actual = direct.state_dict(), deferred.state_dict()
        if list(expected) != list(actual):
            raise AssertionError(
                f"check_module {where}: state_dict keys {list(actual)}, expected {list(expected)}"
            )
        for key, value in expected.items():
            other = actual[key]
            if not isinstance(value, Tensor):
                continue
            if other.dtype != value.dtype or other.device != value.device:
                raise AssertionError(
                    f"check_module {where}: '{key}' is {other.dtype} on {other.device}, "
                    f"expected {value.dtype} on {value.device}"
                )
            if not torch.equal(other, value):
                raise AssertionError(f"check_module {where}: '{key}' differs: {other} vs {value}")

    compare("deferred init, after to_empty + reset_parameters")
    for training in (True, False):
        direct.train(training)
        deferred.train(training)
        for step, batch in enumerate(batches if training else batches[-1:]):
            where = f"deferred init, {'train' if training else 'eval'} batch {step}"
            with torch.no_grad():
                _assert_outputs(
                    deferred(*batch, **kwargs), direct(*batch, **kwargs), where, exact=True
                )
            compare(where)


# --------------------------------------------------------------------------------------------------
# check_symbolic_trace
# --------------------------------------------------------------------------------------------------


def check_symbolic_trace(
    module_factory: Callable[[], nn.Module],
    calls: Sequence[Sequence[Tensor]],
    *,
    modes: Sequence[bool] = (False, True),
    pickled: bool = False,
    refused: Sequence[Sequence[Any]] = (),
) -> None:
    """Check that ``torch.fx.symbolic_trace`` of a module computes what the module computes.

    For each mode of ``modes`` (``True``: training), a module from ``module_factory()`` is
    copied twice: one copy runs eagerly, the other is traced (``torch.fx.symbolic_trace``, then
    dead-code elimination and ``recompile``, as torchvision's ``create_feature_extractor`` and FX
    graph-mode quantization run it). Both run ``calls`` in order (each a tuple of positional
    inputs; the traced graph takes the root's ``forward`` arguments, so a call may leave out a
    trailing optional argument), each with a backward pass of a fixed random weighting of the
    floating outputs. After each call the outputs, the gradients of the floating inputs and of
    every parameter, and every buffer (running statistics a training call updates) must be
    *bit-identical*: the graph calls the same functions on the same tensors. With ``pickled``,
    a pickled graph must also give the same outputs in evaluation mode (torch 2.13 cannot pickle
    a graph whose root ``forward`` has string annotations, ``from __future__ import
    annotations``: pytorch/pytorch#167117).

    ``refused`` are calls the module refuses (in every mode of ``modes``, after ``calls``): the
    graph must raise the same exception, type and message, and neither the module nor the graph
    may change a buffer (running statistics) on the way. The graph, traced once, is also traced
    again (as a tool given an already traced model traces its code), and must refuse them too.

    Raises:
        AssertionError: naming the check (``symbolic_trace``), the mode and the call.
    """
    for training in modes:
        mode = "train" if training else "eval"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2468)
            module = module_factory().train(training)
        eager = copy.deepcopy(module)
        source = copy.deepcopy(module)  # the graph shares its parameters and buffers
        try:
            traced = torch.fx.symbolic_trace(source)
        except Exception as error:
            raise AssertionError(f"check_module symbolic_trace[{mode}]: {error}") from error
        traced.graph.eliminate_dead_code()
        traced.recompile()
        traced.train(training)
        for step, call in enumerate(calls):
            where = f"symbolic_trace[{mode}] call {step}"
            results = []
            for model, owner in ((eager, eager), (traced, source)):
                owner.zero_grad(set_to_none=True)
                args = [x.clone().requires_grad_() if x.is_floating_point() else x for x in call]
                out = model(*args)
                floating = [t for t in _leaves(out) if t.is_floating_point() and t.requires_grad]
                if floating:
                    weights = torch.Generator().manual_seed(13 + step)
                    loss = sum(
                        (t * torch.randn(t.shape, generator=weights, dtype=t.dtype)).sum()
                        for t in floating
                    )
                    assert isinstance(loss, Tensor)
                    loss.backward()  # type: ignore[no-untyped-call]
                grads = [
                    torch.zeros(()) if t.grad is None else t.grad
                    for t in [*[a for a in args if a.requires_grad], *owner.parameters()]
                ]
                buffers = [b.detach().clone() for _, b in sorted(owner.named_buffers())]
                results.append(([t.detach() for t in _leaves(out)], grads, buffers))
            (out_e, grads_e, buffers_e), (out_t, grads_t, buffers_t) = results
            _assert_outputs(out_t, out_e, f"{where} output vs the module", exact=True)
            if grads_e:
                _assert_outputs(grads_t, grads_e, f"{where} gradients vs the module", exact=True)
            if buffers_e:
                _assert_outputs(buffers_t, buffers_e, f"{where} buffers vs the module", exact=True)
        if pickled and not training:
            with torch.no_grad():
                _assert_outputs(
                    pickle.loads(pickle.dumps(traced))(*calls[0]),
                    eager(*calls[0]),
                    f"symbolic_trace[{mode}] pickled graph vs the module",
                    exact=True,
                )
        if refused:
            retraced = torch.fx.symbolic_trace(traced)  # shares the buffers of `source`
            for step, call in enumerate(refused):
                where = f"symbolic_trace[{mode}] refused call {step}"
                expected = _refusal(eager, eager, call, f"{where}: the module")
                for model, what in ((traced, "graph"), (retraced, "graph traced again")):
                    error = _refusal(model, source, call, f"{where}: the {what}")
                    if (type(error), str(error)) != (type(expected), str(expected)):
                        raise AssertionError(
                            f"check_module {where}: the {what} raised {type(error).__name__}:"
                            f" {error}, the module {type(expected).__name__}: {expected}"
                        )


def _refusal(model: nn.Module, owner: nn.Module, call: Sequence[Any], where: str) -> Exception:
    """The exception ``model(*call)`` raises, checked to leave the buffers of ``owner`` as they
    were, bit for bit."""
    before = [b.detach().clone() for _, b in sorted(owner.named_buffers())]
    try:
        model(*call)
    except Exception as error:
        after = [b.detach() for _, b in sorted(owner.named_buffers())]
        if not all(
            a.shape == b.shape
            and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
            for a, b in zip(after, before, strict=True)
        ):
            raise AssertionError(f"check_module {where} changed a buffer before raising") from error
        return error
    raise AssertionError(f"check_module {where} raised nothing")
