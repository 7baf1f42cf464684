"""Measure neural collapse at many layers at once, with forward hooks.

Papyan, Han & Donoho (2020) measured collapse at the last layer and found it building up through
training; Papyan (2020, "Traces of class/cross-class structure pervade deep learning spectra") and
He & Su (2023, "A law of data separation in deep learning") looked layer by layer and found the
within-class variability falling with depth, geometrically for well-trained networks.
:class:`CollapseTracker` makes that measurement one line: it hooks the named layers of a model,
pools each layer's output to one vector per sample (conv maps: mean over the spatial axes, with
einops) and feeds one :class:`~torchcollapse.metrics.NeuralCollapse` per layer.

Hooks only record inside ``with tracker.targets(y):`` (the labels of the batch being run), so the
same model can train outside it untouched; :meth:`CollapseTracker.update` runs a batch under
``torch.no_grad`` for you. The metrics are torchmetrics metrics: under
``DistributedDataParallel`` each process records its own samples and :meth:`compute` reduces them
over processes.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import einops
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric

from torchcollapse._numbers import read_int
from torchcollapse._warnings import user_stacklevel
from torchcollapse._wrappers import is_compiled, wrapper_chain
from torchcollapse.metrics import CollapseStatisticsMetric, NeuralCollapse
from torchcollapse.metrics._state import _holds_float64

__all__ = ["CollapseTracker", "pool_features"]

Pool = Literal["mean", "max", "flatten"]
LayerSelector = (
    str
    | Sequence[str]
    | type[nn.Module]
    | tuple[type[nn.Module], ...]
    | Callable[[str, nn.Module], bool]
)


def pool_features(output: Tensor, pool: Pool = "mean") -> Tensor:
    """Turn a layer's output into one vector per sample.

    A ``(N, C)`` output is returned as it is. A ``(N, C, *spatial)`` output (conv feature maps,
    channels first) is reduced over the spatial axes: ``"mean"`` (global average pooling, the
    default) or ``"max"``; ``"flatten"`` keeps everything, ``(N, C * prod(spatial))``.

    Outputs are taken channels first, as ``nn.Conv1d``/``nn.Conv2d`` give them. A layer whose
    features come last, such as a transformer block's ``(N, L, D)`` tokens or a channels-last
    map, needs its own pooling: pass the tracker a callable, e.g. ``pool=lambda out: out.mean(1)``
    (mean over the tokens) or ``pool=lambda out: out[:, 0]`` (the class token).

    Args:
        output: the layer's output, at least 2-D, batch first.
        pool: ``"mean"``, ``"max"`` or ``"flatten"``.

    Returns:
        A ``(N, D)`` tensor.

    Example:
        >>> import torch
        >>> maps = torch.arange(16.0).reshape(2, 2, 2, 2)  # (N, C, H, W)
        >>> pool_features(maps)                             # mean over H and W
        tensor([[ 1.5000,  5.5000],
                [ 9.5000, 13.5000]])
        >>> pool_features(maps, "flatten").shape
        torch.Size([2, 8])
    """
    if not isinstance(output, Tensor):
        raise TypeError(
            f"Expected the layer output to be a torch.Tensor, but got {type(output).__name__}; "
            "pass `pool=` a callable that picks the tensor to track."
        )
    if output.ndim < 2:
        raise ValueError(
            "Expected the layer output to be at least 2-D (batch first), but got shape "
            f"{tuple(output.shape)}."
        )
    if pool not in ("mean", "max", "flatten"):
        raise ValueError(
            "Expected argument `pool` to be 'mean', 'max', 'flatten' or a callable, but got "
            f"{pool!r}."
        )
    if output.ndim == 2:
        return output
    if pool == "flatten":
        return einops.rearrange(output, "n c ... -> n (c ...)")
    return einops.reduce(output, "n c ... -> n c", pool)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, nested in any order, else ``model``."""
    *_, (_, inner) = wrapper_chain(model)
    return inner


def _reset_if_compiled(model: nn.Module) -> None:
    """``torch.compiler.reset()`` when ``model`` is, or wraps, a compiled module: graphs
    compiled before hooks were added do not call them (dynamo does not guard on hooks), so they
    must be compiled again. The reset is process-wide (every compiled function recompiles)."""
    if _wraps_compiled(model):
        torch.compiler.reset()


def _wraps_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is, or wraps, a compiled module."""
    return any(is_compiled(module) for _, module in wrapper_chain(model))


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule of ``model`` called ``name`` (any of its names: ``named_modules()`` lists a
    module reached under two names once), else ``None``; not the model itself."""
    if not name:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _select_layers(model: nn.Module, layers: LayerSelector) -> dict[str, nn.Module]:
    inner = _unwrap(model)
    named = dict(inner.named_modules())
    named.pop("", None)
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, type) or (
        isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)
    ):
        types = layers if isinstance(layers, tuple) else (layers,)
        chosen = {name: module for name, module in named.items() if isinstance(module, types)}
        what = f"modules of type {', '.join(t.__name__ for t in types)}"
    elif callable(layers):
        predicate = layers
        chosen = {name: module for name, module in named.items() if predicate(name, module)}
        what = "modules matching the predicate"
    elif isinstance(layers, Sequence):
        chosen = {}
        for name in layers:
            if not isinstance(name, str):
                raise TypeError(
                    f"Expected argument `layers` to hold layer names (str), but got {name!r}."
                )
            module = _submodule(inner, name)
            stripped = name
            while module is None and stripped.startswith(("module.", "_orig_mod.")):
                stripped = stripped.split(".", 1)[1]  # a wrapper's prefix
                module = _submodule(inner, stripped)
            if module is None:
                available = ", ".join(list(named)[:12])
                raise ValueError(
                    f"Expected argument `layers` to name submodules of the model, but got "
                    f"{name!r}; some names: {available}{', ...' if len(named) > 12 else ''}."
                )
            chosen[name] = module
        what = "names"
    else:
        raise TypeError(
            "Expected argument `layers` to be layer names, a module type (or tuple of types) or a "
            f"predicate (name, module) -> bool, but got {type(layers).__name__}."
        )
    if not chosen:
        raise ValueError(f"Expected argument `layers` to select at least one layer, but no {what}.")
    return chosen


class CollapseTracker:
    """Neural collapse of several layers at once: forward hooks, one metric per layer.

    Every selected layer gets a forward hook. Inside ``with tracker.targets(y):`` each hook pools
    the layer's output to ``(N, D)`` (see :func:`pool_features`; conv maps are averaged over their
    spatial axes by default), detaches it, casts half precision to float32 and calls
    ``metric.update(features, y)`` on the layer's own
    :class:`~torchcollapse.metrics.NeuralCollapse`. Outside that context the hooks do nothing, so
    tracking can sit around a training loop and record only the batches you choose.
    :meth:`compute` returns ``{layer: {quantity: value}}``. As a context manager the tracker
    removes its hooks on exit; :meth:`remove` does the same by hand, and a tracker that is
    garbage-collected removes them too (the hooks hold it only weakly).

    Each layer records one output per ``targets()`` block: a module that runs several times in one
    forward pass (a shared activation, such as torchvision's ``BasicBlock.relu``) records its first
    call only and warns, since its later outputs are other features of the same samples. The
    model runs in whatever mode it is in: call ``model.eval()`` first to measure without dropout
    and without updating BatchNorm statistics.

    Works under ``torch.no_grad``, autocast and ``DistributedDataParallel`` (pass the wrapped or the
    inner model; names are those of the inner model, a ``module.`` prefix is accepted): each process
    records its own samples and :meth:`compute` reduces the statistics over processes, as
    torchmetrics does. ``nn.DataParallel`` over several devices is refused (its replicas run the
    hooks in threads on slices of the batch); use ``DistributedDataParallel``.

    Devices: each metric goes where its layer's features are, at their first update (the
    tracker moves it), and accumulates there. The metrics of this package hold float64
    statistics, which a device without float64 (Apple's MPS) cannot hold: there the tracker
    keeps them on the CPU and updates them with a copy of each pooled batch (``features.to("cpu")``,
    a copy and a synchronisation per batch and layer), while the model runs on the device.
    Other metrics (from ``metric_factory``) always go to the features' device.

    Works on a model compiled with ``torch.compile`` (the hooks sit on the inner model's
    layers) without breaking its graph: the compiled hooks only pool each layer's output and
    queue it, and the queued features update the metrics when the ``targets()`` block ends (or
    an inner one begins). Entering and leaving ``targets()`` costs one recompilation (a graph
    with the hooks' work, one without); errors about a layer's output (its shape, a layer run
    twice) then come at the end of the block rather than during the forward pass. Layer names
    are those of the inner model (a ``_orig_mod.`` or ``module.`` prefix is accepted). Compiled
    graphs do not call hooks added after they were compiled: given a compiled model
    (``torch.compile(model)``, also inside DDP), the tracker calls ``torch.compiler.reset()``
    when it is made, which is process-wide (every compiled function in the process compiles
    again at its next call). So make one tracker for the whole run (its hooks do nothing outside
    ``targets()``) rather than one per epoch; if the model is compiled elsewhere and has already
    run, call ``torch.compiler.reset()`` after making the tracker. After :meth:`remove`, graphs
    traced with the hooks keep running their (now idle) queueing until they recompile.

    Saving and copying: a model hooked by a live tracker can be saved whole
    (``torch.save(model)``, ``pickle``) or copied (``copy.deepcopy(model)``, as EMA and teacher
    models are made). The loaded or copied model carries the hooks as inert no-ops: they record
    nothing, into this tracker or any other, and stay on it (:meth:`remove` only removes the
    original's). To save a model without them, save its ``state_dict()`` or call :meth:`remove`
    first. ``copy.deepcopy(tracker)`` (or pickling it) copies the model and the metrics, with
    what they recorded, and hooks the copied model's layers into the copy in place of the inert
    hooks: the copy records its own model into its own metrics, the original is untouched (a
    copy of a tracker whose hooks were removed has none either; a copy made inside a
    ``targets()`` block is outside it). The copy's hooks run after the other forward hooks of
    their layers, which stay as they were, also when the tracker is loaded in a new process.
    On a compiled model (the copied model is compiled too) the copy calls
    ``torch.compiler.reset()``, as making a tracker does: process-wide, every compiled function
    compiles again at its next call. ``copy.copy(tracker)`` is refused.

    Args:
        model: the network to watch.
        layers: what to hook: layer names as in ``model.named_modules()`` (``"layer3"``,
            ``"blocks.0"``; any name ``model.get_submodule`` resolves, so also a second
            attribute holding the same module, which ``named_modules()`` lists once), a module
            type or tuple of types (every submodule of those types, in registration order), or a
            predicate ``(name, module) -> bool``.
        num_classes: number of classes ``K``.
        pool: ``"mean"``, ``"max"`` or ``"flatten"`` for outputs with more than two axes, taken
            channels first (see :func:`pool_features`), or a callable ``output -> (N, D) tensor``
            (the way to track token outputs ``(N, L, D)``, channels-last maps, or a layer whose
            output is a tuple).
        metric_factory: ``name -> Metric`` to build each layer's metric yourself (for instance to
            give the last layer its ``classifier`` for NC3/NC4); default
            ``NeuralCollapse(num_classes, **metric_kwargs)``.
        metric_kwargs: keyword arguments of the default :class:`NeuralCollapse`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchcollapse.tracking import CollapseTracker
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(
        ...     nn.Conv1d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14, 6), nn.Linear(6, 3)
        ... )
        >>> x, y = torch.randn(60, 1, 16), torch.arange(60) % 3
        >>> with CollapseTracker(model, ["0", "3"], num_classes=3) as tracker:
        ...     with torch.no_grad(), tracker.targets(y):   # hooks record this forward pass
        ...         logits = model(x)
        ...     results = tracker.compute()
        >>> list(results)                                  # one entry per layer
        ['0', '3']
        >>> bool(results["0"]["nc1"] > 0)                   # conv maps pooled to (N, 8)
        True
        >>> tracker.num_hooks                              # hooks are gone after the block
        0
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelector,
        num_classes: int,
        *,
        pool: Pool | Callable[[Any], Tensor] = "mean",
        metric_factory: Callable[[str], Metric] | None = None,
        metric_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                "Expected argument `model` to be a torch.nn.Module, but got "
                f"{type(model).__name__}."
            )
        num_classes = read_int(num_classes, "num_classes", 2)  # any integer type, not a bool
        if not callable(pool) and pool not in ("mean", "max", "flatten"):
            raise ValueError(
                "Expected argument `pool` to be 'mean', 'max', 'flatten' or a callable, but got "
                f"{pool!r}."
            )
        if metric_factory is not None and metric_kwargs is not None:
            raise ValueError(
                "Expected at most one of the arguments `metric_factory` and `metric_kwargs`, "
                "but got both."
            )
        if isinstance(model, nn.DataParallel) and len(model.device_ids or []) > 1:
            raise ValueError(
                "Expected argument `model` not to be an nn.DataParallel over several devices (its"
                " replicas run the hooks in threads, each on a slice of the batch), but got one"
                f" over {len(model.device_ids)} devices; use DistributedDataParallel, or track"
                " `model.module` on one device."
            )
        self.model = model
        self.num_classes = num_classes
        self.pool = pool
        _reset_if_compiled(model)  # graphs compiled before now do not see the hooks
        kwargs = dict(metric_kwargs or {})
        factory = metric_factory or (lambda name: NeuralCollapse(num_classes, **kwargs))
        self.modules: dict[str, nn.Module] = _select_layers(model, layers)
        self.metrics: dict[str, Metric] = {name: factory(name) for name in self.modules}
        for name, metric in self.metrics.items():
            if not isinstance(metric, Metric):
                raise TypeError(
                    "Expected argument `metric_factory` to return a torchmetrics Metric, but got"
                    f" {type(metric).__name__} for layer {name!r}."
                )
        self._target: Tensor | None = None
        self._recorded: set[str] = set()  # layers that recorded in the current targets() block
        # under torch.compile the hooks queue (layer, pooled features) here; see _record
        self._recording = False  # inside targets(): read by the compiled hooks
        self._pending: list[tuple[str, Tensor]] = []
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(_TrackerHook(weakref.ref(self), name))
            for name, module in self.modules.items()
        ]
        # a tracker dropped without remove() takes its hooks with it
        weakref.finalize(self, _remove_handles, self._handles)

    def __getstate__(self) -> dict[str, Any]:
        """What ``pickle`` and ``copy.deepcopy`` copy: the model, the metrics (with what the
        compiled hooks queued so far, as :meth:`compute` takes it) and the settings; the copy is
        outside any ``targets()`` block. The hook handles are replaced by their ids, which let
        the copy find the (inert) copies of the hooks on the copied model; whether the model is
        compiled is noted here, since the copy's model may not be built yet when the copy is
        (a model that holds its own tracker is copied around it)."""
        self._flush()
        state = self.__dict__.copy()
        state["_handles"] = [handle.id for handle in self._handles]
        state["_compiled"] = _wraps_compiled(self.model)
        state.update(_target=None, _recorded=set(), _recording=False, _pending=[])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Hook the copied model into the copy: the copied layers' inert hooks are swapped for
        live ones that record into the copy's metrics (none if the original's were removed)."""
        hook_ids: list[int] = state.pop("_handles")
        compiled: bool = state.pop("_compiled", False)
        self.__dict__.update(state)
        self._handles = []
        if hook_ids:  # none when the original's hooks were removed: neither has any then
            # in a new process torch's hook counter starts again at 0: the new hooks must not
            # take the id of a hook the tracked layers carry (it would replace that hook); the
            # layers, not the model, which may not be built yet (it holds this tracker)
            _advance_hook_ids(*self.modules.values())
            for (name, module), hook_id in zip(self.modules.items(), hook_ids, strict=True):
                copied = module._forward_hooks.get(hook_id)
                if isinstance(copied, _TrackerHook) and copied.tracker is None:
                    del module._forward_hooks[hook_id]  # the inert copy of the original's hook
                hook = _TrackerHook(weakref.ref(self), name)
                self._handles.append(module.register_forward_hook(hook))
            if compiled:  # as _reset_if_compiled, from the original's model
                torch.compiler.reset()
        weakref.finalize(self, _remove_handles, self._handles)

    def __copy__(self) -> CollapseTracker:
        raise TypeError(
            "Expected a CollapseTracker to be copied with `copy.deepcopy` (which copies the model"
            " and the metrics), but got `copy.copy`: a shallow copy would share them with the"
            " original."
        )

    @property
    def layers(self) -> list[str]:
        """The tracked layer names, in order."""
        return list(self.modules)

    @property
    def num_hooks(self) -> int:
        """Hooks still registered (0 after :meth:`remove`)."""
        return len(self._handles)

    def _record(self, name: str, output: Any) -> None:
        """The forward hook's work: pool ``output`` and update the layer's metric.

        Traced by torch.compile (the hooks of a compiled model are inlined into its graph), it
        only pools the output and queues the detached features, which the graph holds without a
        break; :meth:`_flush` records them when the ``targets()`` block ends."""
        if torch.compiler.is_compiling():
            if self._recording:
                self._pending.append((name, self._pooled(name, output).detach()))
            return
        target = self._target
        if target is None or self._is_repeat(name):
            return
        self._update_metric(name, self._pooled(name, output), target)

    def _is_repeat(self, name: str) -> bool:
        """Whether ``name`` already recorded in this ``targets()`` block (then a warning)."""
        if name not in self._recorded:
            return False
        warnings.warn(
            f"Layer {name!r} ran more than once in one forward pass inside `targets()` (a"
            " module reused in the forward, or several forward passes in one block); only its"
            " first output is recorded. Track a module that runs once per forward pass.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
        return True

    def _pooled(self, name: str, output: Any) -> Tensor:
        """``output`` pooled to a 2-D tensor (not yet detached)."""
        pooled = self.pool(output) if callable(self.pool) else pool_features(output, self.pool)
        if not isinstance(pooled, Tensor):  # a wrong type; a wrong shape below
            raise TypeError(
                f"Expected the pooled output of layer {name!r} to be a 2-D tensor, but got "
                f"{type(pooled).__name__}."
            )
        if pooled.ndim != 2:
            raise ValueError(
                f"Expected the pooled output of layer {name!r} to be a 2-D tensor, but got "
                f"shape {tuple(pooled.shape)}."
            )
        return pooled

    def _update_metric(self, name: str, pooled: Tensor, target: Tensor) -> None:
        """Update the metric of layer ``name`` with its pooled output, labelled ``target``."""
        if pooled.shape[0] != target.shape[0]:
            raise ValueError(
                f"Expected layer {name!r} to output one row per target ({target.shape[0]}), "
                f"but got {pooled.shape[0]}."
            )
        features = pooled.detach()
        if features.dtype in (torch.float16, torch.bfloat16):
            features = features.float()
        metric = self.metrics[name]
        device = features.device
        if isinstance(metric, CollapseStatisticsMetric) and not _holds_float64(device):
            device = torch.device("cpu")  # float64 statistics: fed copies of the features
        if metric.device != device:
            metric.to(device)
        metric.update(features.to(device), target.to(device))
        self._recorded.add(name)

    def _flush(self) -> None:
        """Record the features queued by hooks traced under torch.compile (see :meth:`_record`),
        labelled with the current targets, in the order the layers ran."""
        if not self._pending:
            return
        pending = list(self._pending)
        self._pending.clear()  # in place: the compiled code appends to this very list
        target = self._target
        if target is None:
            return
        for name, pooled in pending:
            if not self._is_repeat(name):
                self._update_metric(name, pooled, target)

    @contextlib.contextmanager
    def targets(self, target: Tensor) -> Iterator[CollapseTracker]:
        """Record the forward passes run inside the block, labelled with ``target`` ``(N,)``."""
        if not isinstance(target, Tensor):  # a wrong type; a wrong shape below
            raise TypeError(
                "Expected argument `target` to be a 1-D tensor of labels, but got "
                f"{type(target).__name__}."
            )
        if target.ndim != 1:
            raise ValueError(
                "Expected argument `target` to be a 1-D tensor of labels, but got shape "
                f"{tuple(target.shape)}."
            )
        if self.num_hooks == 0:
            raise RuntimeError(
                "Expected the tracker's hooks to be registered, but they were removed."
            )
        self._flush()  # what compiled hooks queued for an outer block, with its targets
        previous, self._target = self._target, target
        recorded, self._recorded = self._recorded, set()
        self._recording = True
        try:
            yield self
        finally:
            try:
                self._flush()
            finally:
                self._target, self._recorded = previous, recorded
                self._recording = previous is not None

    def update(self, inputs: Any, target: Tensor) -> Any:
        """Run ``model(inputs)`` under ``torch.no_grad`` inside :meth:`targets`; return it.

        The model runs in its current mode (``model.eval()`` first to measure without dropout
        and without touching BatchNorm's running statistics)."""
        with torch.no_grad(), self.targets(target):
            return self.model(inputs)

    def compute(self) -> dict[str, dict[str, Tensor]]:
        """``{layer: {quantity: value}}`` over everything recorded since the last :meth:`reset`.

        Layers that recorded nothing (never called by the forward passes, say an unused head)
        are left out with a warning; if no layer recorded anything, a ``RuntimeError``. Under
        ``torch.distributed`` a layer counts as silent only when it recorded nothing on every
        process (decided together, with one ``all_reduce`` of a flag per layer), so that every
        process runs the same collectives: a layer only some processes ran is computed on all of
        them, over the samples of those that ran it. There the layers' metrics never return a
        result cached by an earlier ``compute`` (torchmetrics drops it only on a local update, so
        a process that recorded nothing since would skip the synchronisation the others run).
        """
        self._flush()  # inside a targets() block: what compiled hooks queued so far
        recorded = _has_data_anywhere(self.metrics)
        silent = [name for name in self.metrics if not recorded[name]]
        if len(silent) == len(self.metrics):
            raise RuntimeError(
                f"Expected the tracked layers to have recorded samples, but none did ({silent}); "
                "run the model inside `with tracker.targets(y):` (a model compiled elsewhere"
                " that ran before the tracker was made keeps graphs without its hooks: call"
                " `torch.compiler.reset()` after making the tracker)."
            )
        if silent:
            warnings.warn(
                f"Layers {silent} recorded no samples (not called by the forward passes run "
                "inside `targets()`); they are left out of the results.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        results: dict[str, dict[str, Tensor]] = {}
        for name, metric in self.metrics.items():
            if name in silent:
                continue
            with warnings.catch_warnings():
                # a metric restored from a state_dict has data but no update count
                warnings.filterwarnings("ignore", "The ``compute`` method of metric")
                results[name] = metric.compute()
        return results

    def reset(self) -> None:
        """Forget everything recorded (the hooks stay)."""
        for metric in self.metrics.values():
            metric.reset()

    def remove(self) -> None:
        """Remove every hook (safe to call twice); the metrics keep what they recorded."""
        _remove_handles(self._handles)

    def __enter__(self) -> CollapseTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        pool = self.pool if isinstance(self.pool, str) else getattr(self.pool, "__name__", "custom")
        return (
            f"{type(self).__name__}(layers={self.layers}, num_classes={self.num_classes}, "
            f"pool={pool!r}, hooks={self.num_hooks})"
        )


class _TrackerHook:
    """The forward hook of layer ``name``: records its output into ``tracker`` while it is alive.

    A module-level class (not a closure) so that a model carrying it pickles. A copy of the hook,
    made by ``pickle`` (``torch.save(model)``) or ``copy.deepcopy(model)``, is inert: it holds no
    tracker and records nothing, so a copied model never feeds the tracker of the original.
    """

    def __init__(self, tracker: weakref.ref[CollapseTracker] | None, name: str) -> None:
        self.tracker = tracker
        self.name = name

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.tracker is None:
            return
        alive = self.tracker()
        if alive is not None:
            alive._record(self.name, output)

    def __reduce__(self) -> tuple[type[_TrackerHook], tuple[None, str]]:
        return (_TrackerHook, (None, self.name))  # copies are inert (pickle and deepcopy)

    def __repr__(self) -> str:
        state = "inert" if self.tracker is None else "live"
        return f"{type(self).__name__}(layer={self.name!r}, {state})"


def _advance_hook_ids(*roots: nn.Module) -> None:
    """Raise torch's hook counter (``RemovableHandle.next_id``, one per process) past the id of
    every hook that ``roots`` and their submodules hold, as unpickling a ``RemovableHandle``
    does: hooks unpickled with a module keep their ids, which a new process may hand out again,
    and a hook registered under an id already in use replaces the hook that has it."""
    highest = -1
    for root in roots:
        for module in root.modules():
            for attribute, value in vars(module).items():
                if "hook" in attribute and isinstance(value, dict):
                    for key in value:
                        if isinstance(key, int) and key > highest:
                            highest = key
    RemovableHandle.next_id = max(RemovableHandle.next_id, highest + 1)


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _syncs_on_compute(metric: Metric) -> bool:
    """Whether ``metric.compute()`` reduces its state over processes (torchmetrics' rule)."""
    if not getattr(metric, "sync_on_compute", False):
        return False
    available = getattr(metric, "distributed_available_fn", None)
    return bool(available()) if callable(available) else False


def _collective_device(group: Any) -> torch.device:
    """Where a tensor for a collective of ``group`` lives: the current CUDA device for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _has_data_anywhere(metrics: Mapping[str, Metric]) -> dict[str, bool]:
    """``{layer: whether its metric holds samples}``; for a metric that reduces over processes
    at compute, whether it holds samples on any of them (one ``all_reduce`` of the flags of the
    metrics of each process group, in the metrics' order, the same on every process)."""
    local = {name: _has_data(metric) for name, metric in metrics.items()}
    flags = dict(local)
    groups: list[tuple[Any, list[str]]] = []
    for name, metric in metrics.items():
        if not _syncs_on_compute(metric):
            continue
        group = getattr(metric, "process_group", None)
        for known, names in groups:
            if known is group:
                names.append(name)
                break
        else:
            groups.append((group, [name]))
    for group, names in groups:
        device = _collective_device(group)
        reduced = torch.tensor([local[name] for name in names], dtype=torch.int32, device=device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
        for name, anywhere in zip(names, reduced.tolist(), strict=True):
            flags[name] = bool(anywhere)
            metric = metrics[name]
            metric._computed = None  # torchmetrics' cached result: recomputed on every process
            if anywhere and not local[name] and device.type != "cpu" and metric.device != device:
                metric.to(device)  # empty here, never moved by a hook: gathered with the others
    return flags


def _has_data(metric: Metric) -> bool:
    """Whether ``metric`` holds samples: updated, or restored from a ``state_dict``."""
    if metric.update_count > 0:
        return True
    statistics = getattr(metric, "statistics", None)
    if (
        isinstance(statistics, Tensor)
        and statistics.numel() > 0
        and isinstance(metric, CollapseStatisticsMetric)
    ):
        return float(metric.class_statistics().total) > 0
    return False
