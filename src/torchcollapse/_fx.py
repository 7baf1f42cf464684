"""Symbolic tracing by ``torch.fx`` (``torch.fx.symbolic_trace``, torchvision's
``create_feature_extractor``, FX graph-mode quantization).

The tracer calls ``forward`` with :class:`torch.fx.Proxy` objects in place of tensors: a proxy
has no values, dtype or shape to check or branch on. The heads and norms therefore record their
input checks as calls of the graph (:func:`record_call`; each check returns its input, which the
rest of the graph takes, so dead-code elimination keeps it), and keep each step that depends on
dtypes or values (the normalized product and its float32 factors, a margin, a running-statistics
update) in a function registered with :func:`torch.fx.wrap`, which the graph calls as one node,
with tensors, when it runs: the traced graph checks its inputs as the module does, before any
buffer changes, and computes what the module computes, bit for bit, with the same backward.

``isinstance(value, torch.fx.Proxy)`` is the public test; ``torch.fx._symbolic_trace``'s
``is_fx_tracing()`` is private and also true while ``torch.export`` traces (with tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from torch import Tensor
from torch.fx import Proxy

__all__ = ["check_traceable_group", "is_proxy", "record_call"]


def is_proxy(value: object) -> bool:
    """Whether ``value`` is a ``torch.fx`` proxy, i.e. the caller is being traced symbolically."""
    return isinstance(value, Proxy)


def record_call(function: Callable[..., Any], *args: Any) -> Tensor:
    """The proxy of ``function(*args)`` (typed as the tensor it stands for), recorded as one
    call of the graph that the first proxy among ``args`` is traced into, as
    :func:`torch.fx.wrap` records a wrapped function: the graph calls ``function`` with the
    tensors when it runs. An input check calls this for a proxy and returns the result, so that
    a graph traced again (its own code calls the check with proxies) records the call again."""
    proxy = next(arg for arg in args if isinstance(arg, Proxy))
    return cast(Tensor, proxy.tracer.create_proxy("call_function", function, args, {}))


def check_traceable_group(module: object, process_group: Any) -> None:
    """Refuse, while ``torch.fx`` traces ``module`` in training mode, a process group (which the
    graph cannot hold: a group is no value FX can record)."""
    if process_group is not None:
        raise RuntimeError(
            f"Expected the `process_group` of {type(module).__name__} to be None while torch.fx "
            "traces its training-mode update (a graph cannot record a process group), but got "
            f"{type(process_group).__name__}. Trace it in eval mode, or make it a leaf module of "
            "the tracer (e.g. `Tracer.is_leaf_module`)."
        )
